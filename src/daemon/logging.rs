//! Leveled log lines on stderr. Under systemd stderr goes to journald,
//! which reads a leading `<N>` as the syslog priority of the line; on a
//! terminal the level is spelled out (coloured unless `NO_COLOR` is set).

use std::fmt;
use std::io::{IsTerminal, Write};
use std::sync::atomic::{AtomicU8, Ordering};
use std::sync::OnceLock;

#[derive(
    Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, serde::Deserialize, serde::Serialize,
)]
#[serde(rename_all = "lowercase")]
#[repr(u8)]
pub enum Level {
    Error = 0,
    #[serde(alias = "warning")]
    Warn = 1,
    Info = 2,
    Debug = 3,
}

impl Level {
    fn syslog_priority(self) -> u8 {
        match self {
            Level::Error => 3,
            Level::Warn => 4,
            Level::Info => 6,
            Level::Debug => 7,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Level::Error => "error",
            Level::Warn => "warn",
            Level::Info => "info",
            Level::Debug => "debug",
        }
    }

    fn colour(self) -> &'static str {
        match self {
            Level::Error => "\x1b[31m",
            Level::Warn => "\x1b[33m",
            Level::Info => "\x1b[32m",
            Level::Debug => "\x1b[2m",
        }
    }
}

static MAX_LEVEL: AtomicU8 = AtomicU8::new(Level::Info as u8);

#[derive(Clone, Copy)]
enum Style {
    Journal,
    Plain,
    Colour,
}

fn style() -> Style {
    static STYLE: OnceLock<Style> = OnceLock::new();
    *STYLE.get_or_init(|| {
        if !std::io::stderr().is_terminal() {
            Style::Journal
        } else if std::env::var_os("NO_COLOR").is_some_and(|v| !v.is_empty()) {
            Style::Plain
        } else {
            Style::Colour
        }
    })
}

pub fn set_level(level: Level) {
    MAX_LEVEL.store(level as u8, Ordering::Relaxed);
}

pub fn enabled(level: Level) -> bool {
    level as u8 <= MAX_LEVEL.load(Ordering::Relaxed)
}

/// Formats one log line; a message with newlines stays one journal entry
/// per line, each with its priority.
fn format(style: Style, level: Level, args: fmt::Arguments<'_>) -> String {
    let text = args.to_string();
    let mut out = String::with_capacity(text.len() + 16);
    for line in text.lines() {
        match style {
            Style::Journal => {
                out.push_str(&format!("<{}>{line}\n", level.syslog_priority()));
            }
            Style::Plain => out.push_str(&format!("crystald {}: {line}\n", level.name())),
            Style::Colour => out.push_str(&format!(
                "crystald {}{}\x1b[0m: {line}\n",
                level.colour(),
                level.name()
            )),
        }
    }
    out
}

pub fn log(level: Level, args: fmt::Arguments<'_>) {
    if !enabled(level) {
        return;
    }
    let line = format(style(), level, args);
    // One write per entry so lines from several threads never interleave.
    let _ = std::io::stderr().lock().write_all(line.as_bytes());
}

macro_rules! log_error {
    ($($t:tt)*) => { $crate::daemon::logging::log($crate::daemon::logging::Level::Error, format_args!($($t)*)) };
}
macro_rules! log_warn {
    ($($t:tt)*) => { $crate::daemon::logging::log($crate::daemon::logging::Level::Warn, format_args!($($t)*)) };
}
macro_rules! log_info {
    ($($t:tt)*) => { $crate::daemon::logging::log($crate::daemon::logging::Level::Info, format_args!($($t)*)) };
}
macro_rules! log_debug {
    ($($t:tt)*) => { $crate::daemon::logging::log($crate::daemon::logging::Level::Debug, format_args!($($t)*)) };
}
pub(crate) use {log_debug, log_error, log_info, log_warn};

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn journal_lines_carry_the_syslog_priority() {
        assert_eq!(
            format(Style::Journal, Level::Warn, format_args!("a\nb")),
            "<4>a\n<4>b\n"
        );
        assert_eq!(
            format(Style::Plain, Level::Info, format_args!("up")),
            "crystald info: up\n"
        );
    }

    #[test]
    fn levels_parse() {
        let level = |s| crate::daemon::config::from_name::<Level>("log_level", s);
        assert_eq!(level("warning"), Ok(Level::Warn));
        assert!(level("loud").unwrap_err().contains("loud"));
    }
}

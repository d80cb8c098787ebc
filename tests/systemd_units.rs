//! The systemd units in `systemd/`: valid for systemd itself, hardened, in
//! step with the daemon's defaults, and socket activation working.

mod common;

use common::*;
use crystald::daemon::config::{Config, DEFAULT_CONFIG, DEFAULT_SOCKET};
use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

fn unit_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("systemd")
}

fn read(name: &str) -> String {
    std::fs::read_to_string(unit_dir().join(name)).unwrap()
}

fn tool(name: &str) -> Command {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {name}")])
        .output()
        .is_ok_and(|o| o.status.success());
    assert!(
        found,
        "{name} is missing: run scripts/setup.sh (it installs systemd's tools)"
    );
    Command::new(name)
}

/// The units in a temporary directory, pointing at the binary under test
/// (verify checks that ExecStart exists).
fn units_for_test() -> tempfile::TempDir {
    let dir = temp_dir();
    let service = read("crystald.service").replace(
        "ExecStart=/usr/bin/crystald",
        &format!("ExecStart={}", env!("CARGO_BIN_EXE_crystald")),
    );
    std::fs::write(dir.path().join("crystald.service"), service).unwrap();
    std::fs::write(dir.path().join("crystald.socket"), read("crystald.socket")).unwrap();
    dir
}

#[test]
fn units_pass_systemd_analyze_verify_without_warnings() {
    let dir = units_for_test();
    let out = tool("systemd-analyze")
        .arg("verify")
        .arg(dir.path().join("crystald.service"))
        .arg(dir.path().join("crystald.socket"))
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{err}");
    // Unknown or misspelt keys are only warnings, with exit status 0.
    assert!(
        err.trim().is_empty(),
        "systemd-analyze verify complained: {err}"
    );
}

#[test]
fn the_mqtt_drop_in_is_valid_and_opens_only_the_network() {
    let dir = units_for_test();
    let dropin = read("crystald-mqtt.conf");
    // Repeated sections in one file mean what a drop-in means, and verify
    // then checks every key of the drop-in.
    let service = dir.path().join("crystald.service");
    let merged = format!("{}\n{dropin}", std::fs::read_to_string(&service).unwrap());
    std::fs::write(&service, merged).unwrap();
    let out = tool("systemd-analyze")
        .arg("verify")
        .arg(&service)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success() && err.trim().is_empty(), "{err}");
    let keys: Vec<&str> = dropin
        .lines()
        .filter(|l| l.contains('=') && !l.starts_with('#'))
        .map(|l| l.split('=').next().unwrap())
        .collect();
    assert_eq!(
        keys,
        [
            "Wants",
            "After",
            "PrivateNetwork",
            "IPAddressDeny",
            "RestrictAddressFamilies"
        ]
    );
}

#[test]
fn service_is_hardened() {
    let dir = units_for_test();
    let out = tool("systemd-analyze")
        .args([
            "security",
            "--offline=yes",
            "--no-pager",
            "crystald.service",
        ])
        .current_dir(dir.path())
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    let score: f64 = text
        .lines()
        .find_map(|l| {
            l.split("Overall exposure level for crystald.service: ")
                .nth(1)
        })
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| {
            panic!(
                "no exposure level in: {text}{}",
                String::from_utf8_lossy(&out.stderr)
            )
        });
    assert!(
        score <= 2.0,
        "exposure {score} (0 = locked down, 10 = none)\n{text}"
    );
    let unit = read("crystald.service");
    for line in [
        "Type=notify",
        "WatchdogSec=",
        "User=crystald",
        "ProtectSystem=strict",
        "ProtectHome=yes",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        "RuntimeDirectory=crystald",
        "CapabilityBoundingSet=\n",
        &format!("--config {DEFAULT_CONFIG}"),
    ] {
        assert!(unit.contains(line), "crystald.service lacks {line:?}");
    }
    let socket = read("crystald.socket");
    assert!(socket.contains(&format!("ListenStream={DEFAULT_SOCKET}")));
    assert!(socket.contains("SocketMode=0660"));
}

#[test]
fn example_config_documents_every_setting() {
    let text = read("crystald.toml");
    Config::parse(&text).expect("the example parses");
    let shown = |key: &str| {
        text.lines().any(|l| {
            let l = l.trim_start_matches('#').trim_start();
            l.starts_with(&format!("{key} =")) || l == format!("[{key}]")
        })
    };
    let keys = serde_json::to_value(Config::default()).unwrap();
    for key in keys.as_object().unwrap().keys() {
        assert!(shown(key), "systemd/crystald.toml does not show '{key}'");
    }
    let mqtt = serde_json::to_value(crystald::daemon::config::MqttConfig::default()).unwrap();
    for key in mqtt.as_object().unwrap().keys() {
        assert!(
            shown(key),
            "systemd/crystald.toml does not show mqtt '{key}'"
        );
    }
    let http = serde_json::to_value(crystald::daemon::config::HttpConfig::default()).unwrap();
    for key in http.as_object().unwrap().keys() {
        assert!(
            shown(key),
            "systemd/crystald.toml does not show http '{key}'"
        );
    }
    // The commented [http] and [mqtt] examples, uncommented, are a valid
    // configuration.
    let example: String = text
        .lines()
        .skip_while(|l| *l != "# [http]")
        .map(|l| l.strip_prefix("# ").unwrap_or(l))
        .filter(|l| l.starts_with('[') || l.contains(" = "))
        .map(|l| format!("{l}\n"))
        .collect();
    let cfg = Config::parse(&example).unwrap_or_else(|e| panic!("{e}\n{example}"));
    assert!(cfg.mqtt.is_some());
    assert_eq!(
        cfg.http,
        Some(crystald::daemon::config::HttpConfig {
            api_key_file: Some("/etc/crystald/api-keys".into()),
            ..Default::default()
        })
    );
}

#[test]
fn socket_activation_serves_on_the_passed_socket() {
    let dir = temp_dir();
    let socket = dir.path().join("activated.sock");
    let ignored = dir.path().join("not-used.sock");
    struct Kill(std::process::Child);
    impl Drop for Kill {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let mut activator = Kill(
        tool("systemd-socket-activate")
            .arg("-l")
            .arg(&socket)
            .arg(env!("CARGO_BIN_EXE_crystald"))
            .args([
                "serve",
                "--threads",
                "1",
                "--ctx",
                "256",
                "--config",
                "/dev/null",
            ])
            .arg("--model")
            .arg(converted("tiny-a", "q4_0"))
            .arg("--socket")
            .arg(&ignored)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap(),
    );
    // The file appears at bind(), a moment before listen(): until then a
    // connection is refused.
    let until = Instant::now() + Duration::from_secs(60);
    let mut s = loop {
        match UnixStream::connect(&socket) {
            Ok(s) => break s,
            Err(e) => {
                assert!(Instant::now() < until, "the activator never listened: {e}");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    };
    // The first connection starts the daemon, which answers on it.
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    s.write_all(b"{\"id\": 1, \"prompt\": \"Hi\", \"max_tokens\": 3}\n")
        .unwrap();
    let mut line = String::new();
    BufReader::new(&s).read_line(&mut line).unwrap();
    let v: serde_json::Value = serde_json::from_str(&line).unwrap();
    assert_eq!(v["event"], "done", "{v}");
    assert!(!ignored.exists(), "the daemon bound its own socket too");
    // The activator execs the daemon, so its pid is the daemon's.
    let pid = nix::unistd::Pid::from_raw(activator.0.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM).unwrap();
    let status = loop {
        if let Some(st) = activator.0.try_wait().unwrap() {
            break st;
        }
        assert!(Instant::now() < until, "the daemon did not stop");
        std::thread::sleep(Duration::from_millis(20));
    };
    let mut err = String::new();
    std::io::Read::read_to_string(&mut activator.0.stderr.take().unwrap(), &mut err).unwrap();
    assert!(status.success(), "{err}");
    assert!(err.contains("socket passed by systemd"), "{err}");
    // The socket belongs to systemd: the daemon leaves it in place.
    assert!(socket.exists());
}

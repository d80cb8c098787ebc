//! The daemon's settings: a TOML file (every key documented in
//! `systemd/crystald.toml`), then command-line flags on top.

use super::logging::Level;
use super::transport::mqtt::settings::Protocol;
use crate::model::{DeviceChoice, KvType, Prefetch};
use serde::de::DeserializeOwned;
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::path::{Path, PathBuf};

pub const DEFAULT_CONFIG: &str = "/etc/crystald/crystald.toml";
pub const DEFAULT_SOCKET: &str = "/run/crystald/crystald.sock";

/// A user or group, by name or by numeric id.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(untagged, expecting = "a name or a numeric id")]
pub enum Principal {
    Id(u32),
    Name(String),
}

/// Serialisable so tests can list every key the example file must document.
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    /// The GGUF model file.
    pub model: Option<PathBuf>,
    pub socket: PathBuf,
    /// Permission bits of the socket file, as an octal string ("0660").
    pub socket_mode: SocketMode,
    /// Group owning the socket file (default: the daemon's own group).
    pub socket_group: Option<String>,
    /// When either list is non-empty, only peers whose uid is in
    /// `allowed_users` or whose gid (primary, or supplementary per the
    /// group database) is in `allowed_groups` are served.
    pub allowed_users: Vec<Principal>,
    pub allowed_groups: Vec<Principal>,
    /// Compute threads (default: the physical cores).
    pub threads: Option<usize>,
    /// Kernel set: auto, scalar, avx2, avx512, neon, neon-dotprod.
    pub kernels: Option<String>,
    /// Where the model runs: cpu, cuda, or auto (the GPU when usable).
    pub device: DeviceChoice,
    /// Context window in tokens (default: the model's).
    pub ctx: Option<usize>,
    /// KV pool element type: f16, f32 or q8_0.
    pub kv_type: KvType,
    /// Requests generating together (continuous batching).
    pub parallel: usize,
    /// The KV pool shared by all requests: a number of tokens, or a size
    /// ("1536 MiB", "2 GiB"). At least one full context.
    pub kv_budget: KvBudget,
    /// Cached tokens kept for prefix reuse when the worker goes idle; the
    /// memory of the rest of the KV cache is given back.
    pub kv_keep_tokens: usize,
    /// What a start-up memory budget that does not fit does: "error" or "warn".
    pub memory_check: MemoryCheck,
    /// mlock the mapped weights.
    pub lock_weights: bool,
    /// Reading the weights in at start: "off", "background" or "wait".
    pub prefetch: Prefetch,
    /// Check the model file's checksum before serving (reads the whole file).
    pub verify_model: bool,
    /// Requests that may wait while one runs; more get `busy`.
    pub queue_size: usize,
    /// `max_tokens` for requests that do not say.
    pub default_max_tokens: usize,
    /// Longest request line in bytes.
    pub max_line_bytes: usize,
    /// Reply lines buffered per connection before a client that does not
    /// read is disconnected.
    pub max_pending_replies: usize,
    pub max_connections: usize,
    /// Seconds a running request may take to finish after SIGTERM.
    pub drain_timeout_s: f64,
    pub log_level: Level,
    /// The MQTT transport; absent: no MQTT.
    pub mqtt: Option<MqttConfig>,
    /// The OpenAI-compatible HTTP transport; absent: no HTTP.
    pub http: Option<HttpConfig>,
}

/// `[http]`: the OpenAI-compatible API (see `systemd/crystald.toml`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct HttpConfig {
    /// `HOST:PORT` (TCP) or `unix:/PATH` (a socket file with `socket_mode`,
    /// `socket_group` and the allow-lists of the Unix transport).
    pub listen: Vec<String>,
    /// Bearer tokens that may use the API, one per line (`#` comments).
    pub api_key_file: Option<PathBuf>,
    /// Serve a TCP address outside loopback without an API key.
    pub allow_unauthenticated: bool,
    /// Largest request body in bytes.
    pub max_body_bytes: usize,
    /// Seconds a client has to send a whole request once it started one.
    pub read_timeout_s: f64,
    /// Seconds an idle kept-alive connection is kept open.
    pub keep_alive_s: f64,
    /// Open HTTP connections; more are answered 503 and closed.
    pub max_connections: usize,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: vec!["127.0.0.1:8080".into()],
            api_key_file: None,
            allow_unauthenticated: false,
            max_body_bytes: 1 << 20,
            read_timeout_s: 10.0,
            keep_alive_s: 30.0,
            max_connections: 64,
        }
    }
}

/// `[mqtt]`: the broker connection and topics (see `systemd/crystald.toml`).
#[derive(Clone, Debug, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct MqttConfig {
    /// `mqtt://HOST[:PORT]` (1883) or `mqtts://HOST[:PORT]` (8883).
    pub url: String,
    /// Names this device in the default prefix and client id (default: the hostname).
    pub device_id: Option<String>,
    /// Topic prefix (default: `crystal/<device_id>`).
    pub prefix: Option<String>,
    /// Default: `crystald-<device_id>`.
    pub client_id: Option<String>,
    /// Join this MQTT shared-subscription group: requests are taken from
    /// `$share/<share_group>/<prefix>/request`, each by one member.
    pub share_group: Option<String>,
    /// "5" or "3.1.1".
    pub protocol: Protocol,
    pub keep_alive_s: u64,
    /// QoS of the subscription and of every message the daemon publishes.
    pub qos: u8,
    pub username: Option<String>,
    /// A file whose first line is the password.
    pub password_file: Option<PathBuf>,
    /// An environment variable holding the password.
    pub password_env: Option<String>,
    /// PEM file of the CA that signed the broker's certificate (`mqtts://`;
    /// default: the system's trusted CAs).
    pub ca_file: Option<PathBuf>,
    /// PEM client certificate and key, for brokers that require them.
    pub cert_file: Option<PathBuf>,
    pub key_file: Option<PathBuf>,
    /// Seconds between status refreshes when nothing changes.
    pub status_interval_s: u64,
    /// Longest wait between reconnection attempts (the wait doubles from 1 s).
    pub reconnect_max_s: u64,
    /// Give up (the daemon exits with an error) after this many failed
    /// attempts in a row before a first successful connection; 0: never.
    pub connect_attempts: u32,
    /// Reply messages held while the broker is away; beyond, token events
    /// are dropped (counted, logged); final events are always kept.
    pub max_pending_messages: usize,
    /// A request id seen again within this many seconds, for the same reply
    /// destination, is a redelivery and is not answered again.
    pub dedup_window_s: u64,
    /// The broker's own limit on the messages it accepts, in bytes
    /// (Mosquitto's `max_packet_size` or `message_size_limit`), as the
    /// operator set it there. MQTT 3.1.1 cannot ask the broker for a
    /// limit; stating it here says that nothing bigger can arrive.
    pub broker_max_packet_size: Option<usize>,
}

impl Default for MqttConfig {
    fn default() -> Self {
        MqttConfig {
            url: "mqtt://localhost:1883".into(),
            device_id: None,
            prefix: None,
            client_id: None,
            share_group: None,
            protocol: Protocol::V5,
            keep_alive_s: 30,
            qos: 1,
            username: None,
            password_file: None,
            password_env: None,
            ca_file: None,
            cert_file: None,
            key_file: None,
            status_interval_s: 60,
            reconnect_max_s: 30,
            connect_attempts: 0,
            max_pending_messages: 4096,
            dedup_window_s: 600,
            broker_max_packet_size: None,
        }
    }
}

impl Default for Config {
    fn default() -> Self {
        Config {
            model: None,
            socket: PathBuf::from(DEFAULT_SOCKET),
            socket_mode: SocketMode(0o660),
            socket_group: None,
            allowed_users: Vec::new(),
            allowed_groups: Vec::new(),
            threads: None,
            kernels: None,
            device: DeviceChoice::Auto,
            ctx: None,
            kv_type: KvType::F16,
            parallel: 4,
            kv_budget: KvBudget::Tokens(4096),
            kv_keep_tokens: 256,
            memory_check: MemoryCheck::Error,
            lock_weights: false,
            prefetch: Prefetch::Off,
            verify_model: false,
            queue_size: 8,
            default_max_tokens: 512,
            max_line_bytes: 1 << 20,
            max_pending_replies: 4096,
            max_connections: 64,
            drain_timeout_s: 10.0,
            log_level: Level::Info,
            mqtt: None,
            http: None,
        }
    }
}

impl Config {
    pub fn parse(text: &str) -> Result<Config, String> {
        toml::from_str(text).map_err(|e| e.to_string())
    }

    /// Reads `path`; a missing file is only an error when `required`
    /// (named on the command line), so the daemon runs without one.
    pub fn load(path: &Path, required: bool) -> Result<Config, String> {
        match std::fs::read_to_string(path) {
            Ok(text) => Config::parse(&text).map_err(|e| format!("{}: {e}", path.display())),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound && !required => {
                Ok(Config::default())
            }
            Err(e) => Err(format!("cannot read {}: {e}", path.display())),
        }
    }

    /// Checks the values the types cannot; called after flags are applied.
    pub fn validate(&self) -> Result<(), String> {
        if self.model.is_none() {
            return Err("no model: pass --model or set 'model' in the config file".into());
        }
        for (name, v) in [
            ("queue_size", self.queue_size),
            ("parallel", self.parallel),
            ("default_max_tokens", self.default_max_tokens),
            ("max_line_bytes", self.max_line_bytes),
            ("max_pending_replies", self.max_pending_replies),
            ("max_connections", self.max_connections),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        if self.threads == Some(0) || self.ctx == Some(0) {
            return Err("threads and ctx must be at least 1".into());
        }
        if !(self.drain_timeout_s.is_finite() && self.drain_timeout_s >= 0.0) {
            return Err("drain_timeout_s must be a number of seconds >= 0".into());
        }
        if let Some(h) = &self.http {
            if h.listen.is_empty() {
                return Err("http.listen needs at least one address".into());
            }
            for (name, v) in [
                ("http.max_body_bytes", h.max_body_bytes),
                ("http.max_connections", h.max_connections),
            ] {
                if v == 0 {
                    return Err(format!("{name} must be at least 1"));
                }
            }
            for (name, v) in [
                ("http.read_timeout_s", h.read_timeout_s),
                ("http.keep_alive_s", h.keep_alive_s),
            ] {
                if !(v.is_finite() && v > 0.0) {
                    return Err(format!("{name} must be a number of seconds > 0"));
                }
            }
        }
        Ok(())
    }
}

/// The KV pool's size: tokens, or bytes converted to tokens once the
/// model's shape is known.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum KvBudget {
    Tokens(usize),
    Bytes(u64),
}

impl KvBudget {
    /// Positions the pool holds, given the bytes one position takes.
    pub fn tokens(self, bytes_per_token: u64) -> usize {
        match self {
            KvBudget::Tokens(n) => n,
            KvBudget::Bytes(b) => (b / bytes_per_token.max(1)) as usize,
        }
    }
}

impl std::str::FromStr for KvBudget {
    type Err = String;
    fn from_str(text: &str) -> Result<Self, String> {
        let t = text.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = (&t[..split], t[split..].trim());
        let n: u64 = num.parse().map_err(|_| {
            format!("a number of tokens or a size like \"1536 MiB\" expected, got '{text}'")
        })?;
        let budget = match unit.to_ascii_lowercase().as_str() {
            "" | "tokens" => KvBudget::Tokens(n as usize),
            "mib" | "m" | "mb" => KvBudget::Bytes(n << 20),
            "gib" | "g" | "gb" => KvBudget::Bytes(n << 30),
            _ => {
                return Err(format!(
                    "unknown unit '{unit}' in '{text}' (tokens, MiB or GiB)"
                ))
            }
        };
        if n == 0 {
            return Err(format!("'{text}' leaves no room for the KV pool"));
        }
        Ok(budget)
    }
}

impl Serialize for KvBudget {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        match *self {
            KvBudget::Tokens(n) => s.serialize_u64(n as u64),
            KvBudget::Bytes(b) => s.serialize_str(&format!("{} MiB", b >> 20)),
        }
    }
}

impl<'de> Deserialize<'de> for KvBudget {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Tokens(u64),
            Text(String),
        }
        let text = match Raw::deserialize(d)? {
            Raw::Tokens(n) => n.to_string(),
            Raw::Text(t) => t,
        };
        text.parse().map_err(serde::de::Error::custom)
    }
}

/// What a start-up memory budget that does not fit does.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum MemoryCheck {
    /// Stop with an error naming the numbers.
    Error,
    /// Log them and start anyway.
    Warn,
}

/// Permission bits of a socket file, written as an octal string ("0660").
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SocketMode(pub u32);

impl Serialize for SocketMode {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{:04o}", self.0))
    }
}

impl<'de> Deserialize<'de> for SocketMode {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        u32::from_str_radix(&text, 8)
            .ok()
            .filter(|m| *m <= 0o777)
            .map(SocketMode)
            .ok_or_else(|| {
                serde::de::Error::custom(format!(
                    "octal permission bits like \"0660\" expected, got '{text}'"
                ))
            })
    }
}

/// Reads a setting given by name on the command line (`--kv-type f16`) the
/// way the config file reads it, with the same error.
pub fn from_name<T: DeserializeOwned>(flag: &str, value: &str) -> Result<T, String> {
    T::deserialize(serde::de::value::StrDeserializer::<serde::de::value::Error>::new(value))
        .map_err(|e| format!("{flag}: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_example_file_parses_and_sets_only_defaults() {
        let text = include_str!("../../systemd/crystald.toml");
        let cfg = Config::parse(text).unwrap();
        let expected = Config {
            model: Some("/var/lib/crystald/model.gguf".into()),
            ..Config::default()
        };
        assert_eq!(cfg, expected);
    }

    #[test]
    fn typos_and_bad_values_are_errors() {
        let e = Config::parse("queue_sise = 3").unwrap_err();
        assert!(e.contains("queue_sise"), "{e}");
        let cfg = Config::parse(
            "model = \"m\"\nsocket_mode = \"0640\"\nallowed_users = [\"alice\", 1000]",
        )
        .unwrap();
        assert_eq!(
            cfg.allowed_users,
            [Principal::Name("alice".into()), Principal::Id(1000)]
        );
        assert!(cfg.validate().is_ok());
        let e = Config::parse("socket_mode = \"0999\"").unwrap_err();
        assert!(e.contains("socket_mode") && e.contains("0999"), "{e}");
        let e = Config::parse("kv_type = \"f8\"").unwrap_err();
        assert!(e.contains("kv_type") && e.contains("f8"), "{e}");
        let e = Config::parse("[mqtt]\nprotocol = \"3\"").unwrap_err();
        assert!(e.contains("protocol"), "{e}");
        assert_eq!(from_name::<KvType>("--kv-type", "f32"), Ok(KvType::F32));
        assert_eq!(from_name::<KvType>("--kv-type", "q8_0"), Ok(KvType::Q8_0));
        let budget = |t: &str| Config::parse(t).map(|c| c.kv_budget);
        assert_eq!(budget("kv_budget = 2048"), Ok(KvBudget::Tokens(2048)));
        assert_eq!(
            budget("kv_budget = \"1536 MiB\""),
            Ok(KvBudget::Bytes(1536 << 20))
        );
        assert_eq!(budget("kv_budget = \"2GiB\""), Ok(KvBudget::Bytes(2 << 30)));
        for bad in [
            "kv_budget = 0",
            "kv_budget = \"12 parsecs\"",
            "kv_budget = \"lots\"",
        ] {
            let e = budget(bad).unwrap_err();
            assert!(e.contains("kv_budget"), "{bad}: {e}");
        }
        assert_eq!(
            from_name::<KvBudget>("--kv-budget", "3000"),
            Ok(KvBudget::Tokens(3000))
        );
        assert_eq!(KvBudget::Bytes(1 << 30).tokens(512 << 10), 2048);
        let e = Config::parse("model = \"m\"\nparallel = 0")
            .unwrap()
            .validate();
        assert!(e.unwrap_err().contains("parallel"));
        assert!(from_name::<MemoryCheck>("--memory-check", "maybe")
            .unwrap_err()
            .contains("--memory-check"));
    }

    #[test]
    fn a_missing_file_is_fine_unless_named() {
        let p = Path::new("/nonexistent/crystald.toml");
        assert_eq!(Config::load(p, false).unwrap(), Config::default());
        assert!(Config::load(p, true).is_err());
    }
}

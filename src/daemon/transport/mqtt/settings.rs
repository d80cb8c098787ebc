//! `[mqtt]` from the config file, checked and resolved once at start-up:
//! the URL split, the password read, the TLS configuration built. Every
//! mistake is reported here, before the daemon loads the model.

use crate::daemon::config::MqttConfig;
use std::path::Path;
use std::sync::Arc;

/// `protocol = "5"` or `"3.1.1"`.
#[derive(Clone, Copy, Debug, PartialEq, Eq, serde::Deserialize, serde::Serialize)]
pub enum Protocol {
    #[serde(rename = "5", alias = "5.0")]
    V5,
    #[serde(rename = "3.1.1", alias = "4")]
    V311,
}

#[derive(Clone)]
pub struct Settings {
    /// As configured, for logs.
    pub url: String,
    pub protocol: Protocol,
    pub host: String,
    pub port: u16,
    pub tls: Option<Arc<rustls::ClientConfig>>,
    pub client_id: String,
    pub prefix: String,
    /// The shared-subscription group this daemon serves requests in (a
    /// fleet); `None`: the request topic is this daemon's alone.
    pub share_group: Option<String>,
    pub keep_alive_s: u64,
    pub qos: u8,
    pub username: Option<String>,
    pub password: Option<String>,
    pub status_interval_s: u64,
    pub reconnect_max_s: u64,
    pub connect_attempts: u32,
    pub max_pending_messages: usize,
    pub dedup_window_s: u64,
    /// Seconds the broker keeps the daemon's session (subscription and
    /// unacknowledged messages) across a disconnection; 0: a clean session.
    pub session_expiry_s: u32,
    /// Largest request payload, in bytes.
    pub max_payload: usize,
    /// The broker's limit on messages, as stated in `broker_max_packet_size`.
    pub broker_max_packet_size: Option<usize>,
}

/// How long the broker keeps the session of a daemon that lost its
/// connection: long enough for a broker or network blip, short enough that
/// requests queued for a daemon that went away are not answered much later.
const SESSION_EXPIRY_S: u32 = 300;

impl Settings {
    pub fn resolve(c: &MqttConfig, max_payload: usize) -> Result<Settings, String> {
        let (tls, host, port) = parse_url(&c.url)?;
        let protocol = c.protocol;
        if c.qos > 2 {
            return Err(format!("qos must be 0, 1 or 2, got {}", c.qos));
        }
        let device_id = match &c.device_id {
            Some(d) => d.clone(),
            None => hostname()?,
        };
        check_topic_level("device_id", &device_id)?;
        if let Some(g) = &c.share_group {
            check_share_group(g)?;
        }
        // A fleet's request topic is the group's, not one device's.
        let prefix = c.prefix.clone().unwrap_or_else(|| match &c.share_group {
            Some(g) => format!("crystal/{g}"),
            None => format!("crystal/{device_id}"),
        });
        check_topic_name(&prefix).map_err(|e| format!("prefix '{prefix}': {e}"))?;
        if prefix.ends_with('/') {
            return Err(format!("prefix '{prefix}' must not end with '/'"));
        }
        let client_id = c
            .client_id
            .clone()
            .unwrap_or_else(|| format!("crystald-{device_id}"));
        if client_id.is_empty() || client_id.len() > 65535 {
            return Err("client_id must be 1 to 65535 bytes".into());
        }
        if c.share_group.is_some() {
            // It names the device's own status topic in a fleet.
            check_topic_level("client_id", &client_id)
                .map_err(|e| format!("{e}; with share_group it names the status topic"))?;
        }
        let password = match (&c.password_file, &c.password_env) {
            (Some(_), Some(_)) => return Err("give password_file or password_env, not both".into()),
            (Some(f), None) => Some(read_password(f)?),
            (None, Some(var)) => Some(std::env::var(var).map_err(|_| {
                format!("password_env names '{var}', which is not set or not UTF-8")
            })?),
            (None, None) => None,
        };
        if password.is_some() && c.username.is_none() {
            return Err("a password needs a username".into());
        }
        let tls = if tls {
            Some(tls_config(c)?)
        } else {
            if c.ca_file.is_some() || c.cert_file.is_some() || c.key_file.is_some() {
                return Err(format!(
                    "ca_file, cert_file and key_file need an mqtts:// url, got '{}'",
                    c.url
                ));
            }
            None
        };
        if let Some(n) = c.broker_max_packet_size {
            if !(20..=MQTT_MAX_PACKET).contains(&n) {
                return Err(format!(
                    "broker_max_packet_size must be 20 to {MQTT_MAX_PACKET} bytes (MQTT's largest packet), got {n}"
                ));
            }
        }
        for (name, v) in [
            ("max_pending_messages", c.max_pending_messages as u64),
            ("status_interval_s", c.status_interval_s),
            ("reconnect_max_s", c.reconnect_max_s),
        ] {
            if v == 0 {
                return Err(format!("{name} must be at least 1"));
            }
        }
        Ok(Settings {
            url: c.url.clone(),
            protocol,
            host,
            port,
            tls,
            client_id,
            prefix,
            share_group: c.share_group.clone(),
            keep_alive_s: c.keep_alive_s,
            qos: c.qos,
            username: c.username.clone(),
            password,
            status_interval_s: c.status_interval_s,
            reconnect_max_s: c.reconnect_max_s,
            connect_attempts: c.connect_attempts,
            max_pending_messages: c.max_pending_messages,
            dedup_window_s: c.dedup_window_s,
            // A fleet member's session ends with its connection: Mosquitto
            // hands requests round-robin to every member whose session
            // exists, connected or not, so a persistent session would keep
            // taking its share while the device is dead.
            session_expiry_s: if c.share_group.is_some() {
                0
            } else {
                SESSION_EXPIRY_S
            },
            max_payload,
            broker_max_packet_size: c.broker_max_packet_size,
        })
    }

    /// The topic requests are published to (in a fleet, by every member's
    /// clients alike).
    pub fn request_topic(&self) -> String {
        format!("{}/request", self.prefix)
    }

    /// What the daemon subscribes to: the request topic, or in a fleet the
    /// group's shared subscription of it. The broker delivers shared
    /// messages under the request topic itself.
    pub fn request_filter(&self) -> String {
        match &self.share_group {
            Some(g) => format!("$share/{g}/{}", self.request_topic()),
            None => self.request_topic(),
        }
    }

    /// The retained status topic: `<prefix>/status`, or in a fleet, whose
    /// members share the prefix, `<prefix>/status/<client_id>` (client ids
    /// are unique at a broker), so members do not overwrite each other.
    pub fn status_topic(&self) -> String {
        match &self.share_group {
            Some(_) => format!("{}/status/{}", self.prefix, self.client_id),
            None => format!("{}/status", self.prefix),
        }
    }

    /// Whether requests are acknowledged only when done with and the
    /// broker told how many the daemon can hold (flow control): in a fleet.
    pub fn flow_control(&self) -> bool {
        self.share_group.is_some() && self.qos > 0
    }

    /// The largest packet the client reads from the broker. A bigger one
    /// ends the connection at its fixed header, before any of it is
    /// buffered. Room for the topic and properties beyond the payload
    /// limit; a larger stated broker limit is read in full, since the
    /// broker guarantees nothing bigger arrives, so such messages get a
    /// `payload_too_large` reply instead of costing the session.
    pub fn max_incoming_packet(&self) -> usize {
        (self.max_payload + PACKET_HEADROOM)
            .max(self.broker_max_packet_size.unwrap_or(0))
            .min(MQTT_MAX_PACKET)
    }

    /// What to warn about at start-up: MQTT 3.1.1 cannot tell the broker
    /// the largest packet the daemon reads, so without a broker-side
    /// limit a bigger message reaches the daemon, which then has to drop
    /// its broker session to get rid of it.
    pub fn packet_limit_warning(&self) -> Option<String> {
        if self.protocol != Protocol::V311 || self.broker_max_packet_size.is_some() {
            return None;
        }
        Some(format!(
            "MQTT 3.1.1 cannot tell the broker the largest message the daemon reads ({} bytes); \
             a bigger one costs the daemon its broker session and the requests queued in it. \
             Limit messages at the broker (Mosquitto: max_packet_size {}) and state that limit \
             as broker_max_packet_size in [mqtt], or use protocol = \"5\"",
            self.max_incoming_packet(),
            self.max_incoming_packet()
        ))
    }
}

/// Room for the topic and properties beyond the payload limit.
pub const PACKET_HEADROOM: usize = 64 * 1024;
/// MQTT's largest packet (a remaining length of four bytes' worth).
pub const MQTT_MAX_PACKET: usize = 268_435_455;

/// `mqtt://host[:port]` or `mqtts://host[:port]`, host possibly `[v6]`.
fn parse_url(url: &str) -> Result<(bool, String, u16), String> {
    let bad = |why: &str| format!("url '{url}': {why}");
    let (tls, rest) = if let Some(r) = url.strip_prefix("mqtts://") {
        (true, r)
    } else if let Some(r) = url.strip_prefix("mqtt://") {
        (false, r)
    } else {
        return Err(bad("must start with mqtt:// or mqtts://"));
    };
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if rest.contains(['/', '@', '?', '#']) {
        return Err(bad(
            "only a host and port are allowed (credentials go in username and password_file)",
        ));
    }
    let (host, port) = if let Some(v6) = rest.strip_prefix('[') {
        let (h, after) = v6.split_once(']').ok_or_else(|| bad("unclosed '['"))?;
        (h, after.strip_prefix(':'))
    } else {
        match rest.rsplit_once(':') {
            Some((h, p)) => (h, Some(p)),
            None => (rest, None),
        }
    };
    if host.is_empty() {
        return Err(bad("no host"));
    }
    let port = match port {
        None => {
            if tls {
                8883
            } else {
                1883
            }
        }
        Some(p) => p
            .parse::<u16>()
            .ok()
            .filter(|&p| p > 0)
            .ok_or_else(|| bad("the port must be a number from 1 to 65535"))?,
    };
    Ok((tls, host.to_string(), port))
}

/// A shared-subscription group name: one topic level without wildcards
/// (MQTT 5, 4.8.2).
fn check_share_group(g: &str) -> Result<(), String> {
    if g.is_empty() {
        return Err("share_group must not be empty".into());
    }
    if g.contains(['/', '+', '#', '\0']) {
        return Err(format!(
            "share_group '{g}' must be one topic level without '/', '+' or '#'"
        ));
    }
    if g.len() > 256 {
        return Err(format!("share_group '{g}' is longer than 256 bytes"));
    }
    Ok(())
}

fn hostname() -> Result<String, String> {
    let h = nix::unistd::gethostname()
        .map_err(|e| format!("cannot read the hostname for device_id: {e}"))?;
    h.into_string()
        .map_err(|_| "the hostname is not UTF-8; set device_id".to_string())
}

/// A topic name one may publish to: not empty, no wildcards, no NUL, at
/// most 65535 bytes (MQTT 3.1.1 and 5, section 4.7).
pub fn check_topic_name(t: &str) -> Result<(), String> {
    if t.is_empty() {
        return Err("a topic must not be empty".into());
    }
    if t.len() > 65535 {
        return Err("a topic is at most 65535 bytes".into());
    }
    if t.contains(['+', '#']) {
        return Err("a topic to publish to must not contain the wildcards '+' or '#'".into());
    }
    if t.contains('\0') {
        return Err("a topic must not contain NUL".into());
    }
    Ok(())
}

pub fn check_topic_level(what: &str, v: &str) -> Result<(), String> {
    check_topic_name(v).map_err(|e| format!("{what} '{v}': {e}"))?;
    if v.contains('/') {
        return Err(format!("{what} '{v}' must be one topic level (no '/')"));
    }
    Ok(())
}

fn read_password(path: &Path) -> Result<String, String> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| format!("cannot read password_file {}: {e}", path.display()))?;
    let line = text.lines().next().unwrap_or("");
    if line.is_empty() {
        return Err(format!("password_file {} is empty", path.display()));
    }
    Ok(line.to_string())
}

fn read_pem(what: &str, path: &Path) -> Result<Vec<u8>, String> {
    std::fs::read(path).map_err(|e| format!("cannot read {what} {}: {e}", path.display()))
}

fn tls_config(c: &MqttConfig) -> Result<Arc<rustls::ClientConfig>, String> {
    use rustls::pki_types::CertificateDer;
    let mut roots = rustls::RootCertStore::empty();
    match &c.ca_file {
        Some(path) => {
            let pem = read_pem("ca_file", path)?;
            for cert in rustls_pemfile::certs(&mut pem.as_slice()) {
                let cert = cert.map_err(|e| format!("ca_file {}: {e}", path.display()))?;
                roots
                    .add(cert)
                    .map_err(|e| format!("ca_file {}: {e}", path.display()))?;
            }
            if roots.is_empty() {
                return Err(format!(
                    "ca_file {} holds no PEM certificate",
                    path.display()
                ));
            }
        }
        None => {
            let found = rustls_native_certs::load_native_certs();
            roots.add_parsable_certificates(found.certs);
            if roots.is_empty() {
                return Err(
                    "mqtts:// without ca_file needs the system's CA certificates, and none were found; set ca_file".into(),
                );
            }
        }
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS set-up: {e}"))?
        .with_root_certificates(roots);
    let config = match (&c.cert_file, &c.key_file) {
        (None, None) => builder.with_no_client_auth(),
        (Some(cert), Some(key)) => {
            let pem = read_pem("cert_file", cert)?;
            let chain: Vec<CertificateDer<'static>> = rustls_pemfile::certs(&mut pem.as_slice())
                .collect::<Result<_, _>>()
                .map_err(|e| format!("cert_file {}: {e}", cert.display()))?;
            if chain.is_empty() {
                return Err(format!(
                    "cert_file {} holds no PEM certificate",
                    cert.display()
                ));
            }
            let pem = read_pem("key_file", key)?;
            let key_der = rustls_pemfile::private_key(&mut pem.as_slice())
                .map_err(|e| format!("key_file {}: {e}", key.display()))?
                .ok_or_else(|| format!("key_file {} holds no PEM private key", key.display()))?;
            builder
                .with_client_auth_cert(chain, key_der)
                .map_err(|e| format!("cert_file/key_file: {e}"))?
        }
        _ => return Err("cert_file and key_file must be given together".into()),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls() {
        assert_eq!(
            parse_url("mqtt://broker").unwrap(),
            (false, "broker".into(), 1883)
        );
        assert_eq!(
            parse_url("mqtts://10.0.0.2:8884/").unwrap(),
            (true, "10.0.0.2".into(), 8884)
        );
        assert_eq!(
            parse_url("mqtt://[::1]:1999").unwrap(),
            (false, "::1".into(), 1999)
        );
        for bad in [
            "tcp://x",
            "mqtt://",
            "mqtt://h:0",
            "mqtt://h:99999",
            "mqtt://u:p@h",
            "mqtt://h/topic",
        ] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn topics() {
        assert!(check_topic_name("a/b/c").is_ok());
        assert!(check_topic_name("$share-free/ok").is_ok());
        for bad in ["", "a/+/b", "a/#", "x\0y"] {
            assert!(check_topic_name(bad).is_err(), "{bad:?}");
        }
        assert!(check_topic_level("device_id", "a/b").is_err());
    }

    #[test]
    fn packet_limit_for_3_1_1_and_the_stated_broker_limit() {
        let c = MqttConfig {
            device_id: Some("pi4".into()),
            protocol: Protocol::V311,
            ..MqttConfig::default()
        };
        let s = Settings::resolve(&c, 1000).unwrap();
        assert_eq!(s.max_incoming_packet(), 1000 + PACKET_HEADROOM);
        let w = s
            .packet_limit_warning()
            .expect("3.1.1 without a broker limit");
        assert!(w.contains("broker_max_packet_size") && w.contains("max_packet_size 66536"));
        // Stated: no warning; a larger broker limit is read in full.
        let stated = MqttConfig {
            broker_max_packet_size: Some(1 << 20),
            ..c.clone()
        };
        let s = Settings::resolve(&stated, 1000).unwrap();
        assert_eq!(s.packet_limit_warning(), None);
        assert_eq!(s.max_incoming_packet(), 1 << 20);
        // MQTT 5 tells the broker itself.
        let v5 = MqttConfig {
            protocol: Protocol::V5,
            ..c.clone()
        };
        assert_eq!(
            Settings::resolve(&v5, 1000).unwrap().packet_limit_warning(),
            None
        );
        for bad in [0, 19, MQTT_MAX_PACKET + 1] {
            let e = Settings::resolve(
                &MqttConfig {
                    broker_max_packet_size: Some(bad),
                    ..c.clone()
                },
                1000,
            )
            .err()
            .unwrap();
            assert!(e.contains("broker_max_packet_size"), "{e}");
        }
    }

    #[test]
    fn a_fleet_shares_the_request_topic_and_keeps_a_status_per_member() {
        let alone = MqttConfig {
            device_id: Some("pi4".into()),
            ..MqttConfig::default()
        };
        let s = Settings::resolve(&alone, 1000).unwrap();
        assert_eq!(s.request_filter(), "crystal/pi4/request");
        assert_eq!(s.status_topic(), "crystal/pi4/status");
        assert_eq!(s.session_expiry_s, SESSION_EXPIRY_S);
        assert!(!s.flow_control());
        let member = MqttConfig {
            share_group: Some("kitchen".into()),
            ..alone.clone()
        };
        let s = Settings::resolve(&member, 1000).unwrap();
        assert_eq!(s.request_topic(), "crystal/kitchen/request");
        assert_eq!(s.request_filter(), "$share/kitchen/crystal/kitchen/request");
        assert_eq!(s.status_topic(), "crystal/kitchen/status/crystald-pi4");
        assert_eq!(s.session_expiry_s, 0);
        assert!(s.flow_control());
        let s = Settings::resolve(
            &MqttConfig {
                prefix: Some("site/llm".into()),
                client_id: Some("gw-7".into()),
                ..member.clone()
            },
            1000,
        )
        .unwrap();
        assert_eq!(s.request_filter(), "$share/kitchen/site/llm/request");
        assert_eq!(s.status_topic(), "site/llm/status/gw-7");
        for bad in ["", "a/b", "a+", "#", "x\0y"] {
            let e = Settings::resolve(
                &MqttConfig {
                    share_group: Some(bad.into()),
                    ..alone.clone()
                },
                1000,
            )
            .err()
            .unwrap();
            assert!(e.contains("share_group"), "{bad:?}: {e}");
        }
        let e = Settings::resolve(
            &MqttConfig {
                client_id: Some("a/b".into()),
                ..member
            },
            1000,
        )
        .err()
        .unwrap();
        assert!(e.contains("client_id") && e.contains("share_group"), "{e}");
    }

    #[test]
    fn settings_defaults_and_mistakes() {
        let c = MqttConfig {
            device_id: Some("pi4".into()),
            ..MqttConfig::default()
        };
        let s = Settings::resolve(&c, 1000).unwrap();
        assert_eq!(
            (s.prefix.as_str(), s.client_id.as_str()),
            ("crystal/pi4", "crystald-pi4")
        );
        assert_eq!((s.protocol, s.qos, s.port), (Protocol::V5, 1, 1883));
        let err = |c: MqttConfig| Settings::resolve(&c, 1000).err().unwrap();
        assert!(err(MqttConfig {
            qos: 3,
            ..c.clone()
        })
        .contains("qos"));
        assert!(err(MqttConfig {
            prefix: Some("a/#".into()),
            ..c.clone()
        })
        .contains("wildcards"));
        assert!(err(MqttConfig {
            password_env: Some("CRYSTALD_TEST_SURELY_UNSET".into()),
            username: Some("u".into()),
            ..c.clone()
        })
        .contains("CRYSTALD_TEST_SURELY_UNSET"));
        assert!(err(MqttConfig {
            password_file: Some("/nonexistent/pw".into()),
            username: Some("u".into()),
            ..c.clone()
        })
        .contains("/nonexistent/pw"));
        assert!(err(MqttConfig {
            ca_file: Some("/tmp/ca.pem".into()),
            ..c.clone()
        })
        .contains("mqtts://"));
        assert!(err(MqttConfig {
            url: "mqtts://h".into(),
            ca_file: Some("/nonexistent/ca.pem".into()),
            ..c
        })
        .contains("/nonexistent/ca.pem"));
    }
}

//! Real services for end-to-end tests: a Mosquitto broker on a free
//! loopback port, `crystald serve` on a converted fixture with a socket and
//! MQTT, and MQTT test clients (rumqttc, v5 and 3.1.1).

use super::*;
use rumqttc::v5::mqttbytes::v5::PublishProperties;
use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

pub const WAIT: Duration = Duration::from_secs(60);
pub const PREFIX: &str = "crystal/test";
pub const CTX: &str = "448";

pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

pub fn mosquitto() -> &'static str {
    if Path::new("/usr/sbin/mosquitto").exists() {
        "/usr/sbin/mosquitto"
    } else {
        "mosquitto"
    }
}

pub fn run(cmd: &mut Command) {
    let out = cmd.output().unwrap_or_else(|e| panic!("{cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A test CA and a server certificate for 127.0.0.1 signed by it.
pub struct Pki {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

pub fn make_ca(dir: &Path, name: &str) -> (PathBuf, PathBuf) {
    let (crt, key) = (
        dir.join(format!("{name}.crt")),
        dir.join(format!("{name}.key")),
    );
    run(Command::new("openssl")
        .args([
            "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
        ])
        .args(["-subj", &format!("/CN={name}")])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&crt));
    (crt, key)
}

pub fn make_pki(dir: &Path) -> Pki {
    let (ca, ca_key) = make_ca(dir, "test-ca");
    let key = dir.join("server.key");
    let csr = dir.join("server.csr");
    let cert = dir.join("server.crt");
    let ext = dir.join("server.ext");
    std::fs::write(&ext, "subjectAltName=IP:127.0.0.1,DNS:localhost\n").unwrap();
    run(Command::new("openssl")
        .args([
            "req",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
        ])
        .arg("-keyout")
        .arg(&key)
        .arg("-out")
        .arg(&csr));
    run(Command::new("openssl")
        .args(["x509", "-req", "-days", "2", "-CAcreateserial"])
        .arg("-in")
        .arg(&csr)
        .arg("-CA")
        .arg(&ca)
        .arg("-CAkey")
        .arg(&ca_key)
        .arg("-extfile")
        .arg(&ext)
        .arg("-out")
        .arg(&cert));
    Pki { ca, cert, key }
}

pub struct Broker {
    pub child: Option<Child>,
    pub dir: tempfile::TempDir,
    pub port: u16,
}

impl Broker {
    /// Anonymous, plain TCP, with persistence so that sessions survive a
    /// restart.
    pub fn start() -> Broker {
        Self::with_listener(|_, port| format!("listener {port} 127.0.0.1\nallow_anonymous true\n"))
    }

    /// TLS with the test PKI, and user `crystal` with password `s3cret`.
    pub fn start_tls() -> (Broker, Pki) {
        let mut pki = None;
        let b = Self::with_listener(|dir, port| {
            let p = make_pki(dir);
            let pw = dir.join("passwd");
            std::fs::write(&pw, "").unwrap();
            run(Command::new("mosquitto_passwd")
                .arg("-b")
                .arg(&pw)
                .args(["crystal", "s3cret"]));
            let conf = format!(
                "listener {port} 127.0.0.1\nallow_anonymous false\npassword_file {}\n\
                 cafile {}\ncertfile {}\nkeyfile {}\n",
                pw.display(),
                p.ca.display(),
                p.cert.display(),
                p.key.display()
            );
            pki = Some(p);
            conf
        });
        (b, pki.unwrap())
    }

    pub fn with_listener(listener: impl FnOnce(&Path, u16) -> String) -> Broker {
        let dir = temp_dir();
        let port = free_port();
        // Started as root, mosquitto would switch to its own user, which
        // cannot read this test's files.
        let user = if nix::unistd::geteuid().is_root() {
            "user root\n"
        } else {
            ""
        };
        let conf = format!(
            "{user}{}persistence true\npersistence_location {}/\nlog_dest file {}\n",
            listener(dir.path(), port),
            dir.path().display(),
            dir.path().join("broker.log").display()
        );
        std::fs::write(dir.path().join("mosquitto.conf"), conf).unwrap();
        let mut b = Broker {
            child: None,
            dir,
            port,
        };
        b.launch();
        b
    }

    pub fn launch(&mut self) {
        let child = Command::new(mosquitto())
            .arg("-c")
            .arg(self.dir.path().join("mosquitto.conf"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("mosquitto (scripts/setup.sh installs it)");
        self.child = Some(child);
        let until = Instant::now() + WAIT;
        while TcpStream::connect(("127.0.0.1", self.port)).is_err() {
            let exited = self.child.as_mut().unwrap().try_wait().unwrap();
            assert!(
                exited.is_none() && Instant::now() < until,
                "mosquitto did not start ({exited:?}): {}",
                std::fs::read_to_string(self.dir.path().join("broker.log")).unwrap_or_default()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// A clean stop (SIGTERM), so the broker saves its sessions.
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            signal(&c, nix::sys::signal::Signal::SIGTERM);
            let _ = c.wait();
        }
    }

    pub fn url(&self) -> String {
        format!("mqtt://127.0.0.1:{}", self.port)
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

pub fn signal(c: &Child, sig: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(c.id() as i32), sig).unwrap();
}

pub struct Daemon {
    pub child: Child,
    pub dir: tempfile::TempDir,
}

impl Drop for Daemon {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Daemon {
    /// Starts `crystald serve` with `[mqtt]` settings `mqtt` (TOML lines)
    /// and top-level settings `top`; does not wait.
    pub fn spawn(url: &str, mqtt: &str, top: &str) -> Daemon {
        Self::spawn_config(
            &format!("{top}\n[mqtt]\ndevice_id = \"test\"\nstatus_interval_s = 1\n{mqtt}\n"),
            &["--mqtt-url", url],
        )
    }

    /// Starts `crystald serve` on the tiny-a q4_0 fixture with the
    /// configuration file `config` and extra flags (`--ctx` defaults to
    /// [`CTX`]); does not wait. The socket is [`Daemon::socket`], the log
    /// `log` in the daemon's directory.
    pub fn spawn_config(config: &str, args: &[&str]) -> Daemon {
        let dir = temp_dir();
        let cfg = dir.path().join("crystald.toml");
        std::fs::write(&cfg, config).unwrap();
        let log = std::fs::File::create(dir.path().join("log")).unwrap();
        let ctx: &[&str] = if args.contains(&"--ctx") {
            &[]
        } else {
            &["--ctx", CTX]
        };
        let child = Command::new(env!("CARGO_BIN_EXE_crystald"))
            .args(["serve", "--threads", "1", "--log-level", "debug"])
            .args(ctx)
            .arg("--model")
            .arg(converted("tiny-a", "q4_0"))
            .arg("--socket")
            .arg(dir.path().join("sock"))
            .arg("--config")
            .arg(&cfg)
            .args(args)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        Daemon { child, dir }
    }

    /// [`Daemon::spawn_config`], then waits until the socket accepts.
    pub fn serving(config: &str, args: &[&str]) -> Daemon {
        let mut d = Self::spawn_config(config, args);
        let until = Instant::now() + WAIT;
        while UnixStream::connect(d.socket()).is_err() {
            if let Some(status) = d.child.try_wait().unwrap() {
                panic!("daemon exited with {status}: {}", d.log());
            }
            assert!(Instant::now() < until, "daemon did not start: {}", d.log());
            std::thread::sleep(Duration::from_millis(20));
        }
        d
    }

    pub fn socket(&self) -> PathBuf {
        self.dir.path().join("sock")
    }

    /// Starts the daemon and waits until it is connected to the broker.
    pub fn start(url: &str, mqtt: &str, top: &str) -> Daemon {
        let d = Self::spawn(url, mqtt, top);
        d.wait_log("mqtt: connected");
        d
    }

    pub fn log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("log")).unwrap_or_default()
    }

    pub fn wait_log(&self, what: &str) -> String {
        let until = Instant::now() + WAIT;
        loop {
            let log = self.log();
            if log.contains(what) {
                return log;
            }
            assert!(Instant::now() < until, "log never said {what:?}: {log}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn wait_exit(&mut self) -> i32 {
        let until = Instant::now() + WAIT;
        loop {
            if let Some(s) = self.child.try_wait().unwrap() {
                return s.code().unwrap_or(-1);
            }
            assert!(
                Instant::now() < until,
                "daemon did not exit: {}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// One request over the Unix socket, for comparing transports.
    pub fn ask_socket(&self, req: &Value) -> Value {
        let mut s = UnixStream::connect(self.socket()).unwrap();
        s.set_read_timeout(Some(WAIT)).unwrap();
        s.write_all(format!("{req}\n").as_bytes()).unwrap();
        let mut r = BufReader::new(s);
        loop {
            let mut line = String::new();
            r.read_line(&mut line).unwrap();
            let v: Value = serde_json::from_str(&line).unwrap();
            if v["event"] != "token" {
                return v;
            }
        }
    }
}

/// A message a test client received.
#[derive(Debug)]
pub struct Got {
    pub topic: String,
    pub body: Value,
    pub raw: Vec<u8>,
    pub correlation: Option<Vec<u8>>,
    pub retain: bool,
}

pub enum Handle {
    V5(rumqttc::v5::Client),
    V4(rumqttc::Client),
}

/// A test client that (re)subscribes to `topics` on every connection and
/// hands over what it receives.
pub struct Peer {
    pub handle: Handle,
    pub rx: mpsc::Receiver<Got>,
}

impl Peer {
    /// An MQTT 5 client; `persistent` keeps its session across reconnections.
    pub fn v5(port: u16, name: &str, topics: &[&str], persistent: bool) -> Peer {
        use rumqttc::v5::{mqttbytes::QoS, Client, Event, Incoming, MqttOptions};
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(Some(1 << 20))
            .set_clean_start(!persistent);
        if persistent {
            o.set_session_expiry_interval(Some(600));
        }
        let (client, mut conn) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let sub = client.clone();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        for t in &topics {
                            sub.try_subscribe(t.as_str(), QoS::AtLeastOnce).unwrap();
                        }
                        if topics.is_empty() {
                            let _ = ready_tx.send(());
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let got = Got {
                            topic: String::from_utf8_lossy(&p.topic).into_owned(),
                            body: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                            raw: p.payload.to_vec(),
                            correlation: p
                                .properties
                                .and_then(|pr| pr.correlation_data.map(|d| d.to_vec())),
                            retain: p.retain,
                        };
                        if tx.send(got).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        ready_rx.recv_timeout(WAIT).expect("test client subscribed");
        Peer {
            handle: Handle::V5(client),
            rx,
        }
    }

    /// An MQTT 3.1.1 client.
    pub fn v4(port: u16, name: &str, topics: &[&str]) -> Peer {
        use rumqttc::{Client, Event, Incoming, MqttOptions, QoS};
        let mut o = MqttOptions::new(name, "127.0.0.1", port);
        o.set_keep_alive(Duration::from_secs(5))
            .set_max_packet_size(1 << 20, 1 << 20);
        let (client, mut conn) = Client::new(o, 64);
        let (tx, rx) = mpsc::channel();
        let (ready_tx, ready_rx) = mpsc::channel();
        let sub = client.clone();
        let topics: Vec<String> = topics.iter().map(|t| t.to_string()).collect();
        std::thread::spawn(move || {
            for ev in conn.iter() {
                match ev {
                    Ok(Event::Incoming(Incoming::ConnAck(_))) => {
                        for t in &topics {
                            sub.try_subscribe(t.as_str(), QoS::AtLeastOnce).unwrap();
                        }
                    }
                    Ok(Event::Incoming(Incoming::SubAck(_))) => {
                        let _ = ready_tx.send(());
                    }
                    Ok(Event::Incoming(Incoming::Publish(p))) => {
                        let got = Got {
                            topic: p.topic.clone(),
                            body: serde_json::from_slice(&p.payload).unwrap_or(Value::Null),
                            raw: p.payload.to_vec(),
                            correlation: None,
                            retain: p.retain,
                        };
                        if tx.send(got).is_err() {
                            return;
                        }
                    }
                    Ok(_) => {}
                    Err(_) => std::thread::sleep(Duration::from_millis(200)),
                }
            }
        });
        ready_rx.recv_timeout(WAIT).expect("test client subscribed");
        Peer {
            handle: Handle::V4(client),
            rx,
        }
    }

    pub fn publish(&self, topic: &str, payload: impl Into<Vec<u8>>) {
        self.publish_with(topic, payload.into(), None, false)
    }

    /// Publishes at QoS 1; `response` is an MQTT 5 response topic and
    /// correlation data.
    pub fn publish_with(
        &self,
        topic: &str,
        payload: Vec<u8>,
        response: Option<(&str, &[u8])>,
        retain: bool,
    ) {
        match &self.handle {
            Handle::V5(c) => {
                use rumqttc::v5::mqttbytes::QoS;
                match response {
                    Some((t, corr)) => {
                        let props = PublishProperties {
                            response_topic: Some(t.to_string()),
                            correlation_data: Some(corr.to_vec().into()),
                            ..Default::default()
                        };
                        c.publish_with_properties(topic, QoS::AtLeastOnce, retain, payload, props)
                    }
                    None => c.publish(topic, QoS::AtLeastOnce, retain, payload),
                }
                .unwrap()
            }
            Handle::V4(c) => c
                .publish(topic, rumqttc::QoS::AtLeastOnce, retain, payload)
                .unwrap(),
        }
    }

    pub fn recv(&self) -> Got {
        self.rx
            .recv_timeout(WAIT)
            .expect("no message within the time limit")
    }

    /// Receives until a final event (done or error); returns the streamed
    /// token events and the final one.
    pub fn finish(&self) -> (Vec<Value>, Got) {
        let mut tokens = Vec::new();
        loop {
            let g = self.recv();
            if g.body["event"] == "token" {
                tokens.push(g.body);
            } else {
                return (tokens, g);
            }
        }
    }

    /// Asserts that nothing arrives for `d`.
    pub fn quiet_for(&self, d: Duration) {
        if let Ok(g) = self.rx.recv_timeout(d) {
            panic!("unexpected message: {g:?}");
        }
    }
}

//! The broker connection, one shape for both protocol versions: rumqttc has
//! separate clients for MQTT 5 and 3.1.1, and the transport above only needs
//! to publish, subscribe and see a few kinds of events.

use super::settings::{Protocol, Settings, MQTT_MAX_PACKET};
use rumqttc::v5::mqttbytes::v5 as p5;
use std::time::Duration;

/// A message to publish.
#[derive(Clone, Debug)]
pub struct Message {
    pub topic: String,
    pub payload: Vec<u8>,
    pub retain: bool,
    /// MQTT 5 Correlation Data (ignored by 3.1.1).
    pub correlation: Option<Vec<u8>>,
}

/// A message received on a subscription.
#[derive(Clone, Debug)]
pub struct Received {
    pub topic: String,
    pub payload: Vec<u8>,
    /// Set when the broker delivers a stored retained message.
    pub retain: bool,
    /// MQTT 5 Response Topic, as sent (not yet validated).
    pub response_topic: Option<String>,
    pub correlation: Option<Vec<u8>>,
    /// Under manual acknowledgement, a QoS 1/2 message's packet id and
    /// QoS: the transport acknowledges it with [`Client::ack`].
    pub ack: Option<(u16, u8)>,
}

/// What the transport needs to know of the connection's progress.
pub enum LinkEvent {
    Connected {
        session_present: bool,
        /// This connection started a clean session to get rid of a
        /// message of this many bytes, over what the client reads (see
        /// [`Connection::next`]).
        dropped_oversize: Option<usize>,
    },
    Received(Received),
    /// A publish went out with this packet id (0 for QoS 0).
    Published(u16),
    /// The broker confirmed the publish with this packet id.
    Confirmed(u16),
    /// The broker refused the subscription, for this reason.
    SubscribeRefused(String),
    /// Our DISCONNECT went out.
    Disconnected,
    Other,
}

pub enum Client {
    V5(rumqttc::v5::Client),
    V4(rumqttc::Client),
}

pub struct Connection {
    inner: Inner,
    /// The session setting to return to after a clean one.
    clean: bool,
    /// Set by an oversized packet until the next connection is up.
    dropped_oversize: Option<usize>,
    /// Received messages are acknowledged by the transport, not rumqttc.
    manual_acks: bool,
}

enum Inner {
    V5(Box<rumqttc::v5::Connection>),
    V4(Box<rumqttc::Connection>),
}

/// Requests that may wait in rumqttc's channel; more wait in our outbox,
/// which is where the bound and the accounting are.
const CHANNEL: usize = 64;

/// The client and its connection, not connected yet: the connection
/// connects when first polled. Under flow control
/// ([`Settings::flow_control`]) received messages are acknowledged by the
/// transport, and an MQTT 5 broker is told to send at most `capacity`
/// unacknowledged ones (the Receive Maximum).
pub fn open(s: &Settings, will: Message, capacity: usize) -> (Client, Connection) {
    let keep_alive = Duration::from_secs(s.keep_alive_s.max(5));
    let clean = s.session_expiry_s == 0;
    let manual_acks = s.flow_control();
    let wrap = |inner| Connection {
        inner,
        clean,
        dropped_oversize: None,
        manual_acks,
    };
    match s.protocol {
        Protocol::V5 => {
            let mut o = rumqttc::v5::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(keep_alive)
                .set_clean_start(clean)
                .set_connection_timeout(10)
                // The broker drops what we could not read instead of
                // sending it and cutting the connection.
                .set_max_packet_size(Some(s.max_incoming_packet() as u32))
                .set_last_will(p5::LastWill::new(
                    will.topic,
                    will.payload,
                    qos5(s.qos),
                    will.retain,
                    None,
                ));
            if s.session_expiry_s > 0 {
                o.set_session_expiry_interval(Some(s.session_expiry_s));
            }
            if manual_acks {
                let max = capacity.clamp(1, u16::MAX as usize) as u16;
                o.set_manual_acks(true).set_receive_maximum(Some(max));
            }
            if let Some(user) = &s.username {
                o.set_credentials(user, s.password.as_deref().unwrap_or(""));
            }
            if let Some(tls) = &s.tls {
                o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            }
            let (c, conn) = rumqttc::v5::Client::new(o, CHANNEL);
            (Client::V5(c), wrap(Inner::V5(Box::new(conn))))
        }
        Protocol::V311 => {
            let mut o = rumqttc::MqttOptions::new(&s.client_id, &s.host, s.port);
            o.set_keep_alive(keep_alive)
                .set_clean_session(clean)
                // 3.1.1 cannot tell the broker this limit; a bigger packet
                // ends the connection at its header (see Connection::next).
                .set_max_packet_size(s.max_incoming_packet(), MQTT_MAX_PACKET)
                .set_last_will(rumqttc::LastWill::new(
                    will.topic,
                    will.payload,
                    qos4(s.qos),
                    will.retain,
                ));
            // No Receive Maximum in 3.1.1: the broker's own limit applies
            // (Mosquitto: max_inflight_messages).
            o.set_manual_acks(manual_acks);
            if let Some(user) = &s.username {
                o.set_credentials(user, s.password.as_deref().unwrap_or(""));
            }
            if let Some(tls) = &s.tls {
                o.set_transport(rumqttc::Transport::Tls(rumqttc::TlsConfiguration::Rustls(
                    tls.clone(),
                )));
            }
            let (c, conn) = rumqttc::Client::new(o, CHANNEL);
            (Client::V4(c), wrap(Inner::V4(Box::new(conn))))
        }
    }
}

fn qos5(q: u8) -> rumqttc::v5::mqttbytes::QoS {
    use rumqttc::v5::mqttbytes::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

fn qos4(q: u8) -> rumqttc::QoS {
    use rumqttc::QoS;
    match q {
        0 => QoS::AtMostOnce,
        1 => QoS::AtLeastOnce,
        _ => QoS::ExactlyOnce,
    }
}

impl Client {
    /// Hands a message to the connection without blocking; gives it back
    /// when the connection's channel is full (or the connection is gone).
    pub fn try_publish(&self, m: Message, qos: u8) -> Result<(), Message> {
        let back = m.clone();
        let taken = match self {
            Client::V5(c) => match m.correlation {
                Some(d) => {
                    let props = p5::PublishProperties {
                        correlation_data: Some(d.into()),
                        ..Default::default()
                    };
                    c.try_publish_with_properties(m.topic, qos5(qos), m.retain, m.payload, props)
                }
                None => c.try_publish(m.topic, qos5(qos), m.retain, m.payload),
            }
            .is_ok(),
            Client::V4(c) => c
                .try_publish(m.topic, qos4(qos), m.retain, m.payload)
                .is_ok(),
        };
        if taken {
            Ok(())
        } else {
            Err(back)
        }
    }

    /// Acknowledges a received message (manual acknowledgement) without
    /// blocking; false when the connection's channel is full.
    pub fn ack(&self, pkid: u16, qos: u8) -> bool {
        match self {
            Client::V5(c) => {
                let mut p = p5::Publish::new("", qos5(qos), Vec::new(), None);
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
            Client::V4(c) => {
                let mut p = rumqttc::Publish::new("", qos4(qos), Vec::new());
                p.pkid = pkid;
                c.try_ack(&p).is_ok()
            }
        }
    }

    pub fn subscribe(&self, topic: &str, qos: u8) -> Result<(), String> {
        match self {
            Client::V5(c) => c.try_subscribe(topic, qos5(qos)).map_err(|e| e.to_string()),
            Client::V4(c) => c.try_subscribe(topic, qos4(qos)).map_err(|e| e.to_string()),
        }
    }

    pub fn disconnect(&self) {
        let _ = match self {
            Client::V5(c) => c.try_disconnect().map_err(|e| e.to_string()),
            Client::V4(c) => c.try_disconnect().map_err(|e| e.to_string()),
        };
    }
}

/// Why a connection attempt or a connection failed, in words for the log.
pub struct LinkError {
    pub message: String,
}

impl Connection {
    /// Forgets every request rumqttc holds for the next connection: the
    /// transport resends what the broker has not confirmed itself, in its
    /// own order (rumqttc's replay follows packet ids, which wrap).
    pub fn forget_pending(&mut self) {
        match &mut self.inner {
            Inner::V5(c) => {
                c.eventloop.clean();
                c.eventloop.pending.clear();
            }
            Inner::V4(c) => {
                c.eventloop.clean();
                c.eventloop.pending.clear();
            }
        }
    }

    /// Drives the connection until its next event; connects (again) when
    /// not connected. `None`: every client handle is gone.
    ///
    /// A packet over the client's limit ends the connection at its fixed
    /// header, so it is never buffered. The broker would deliver it again
    /// to the same session after reconnection, forever; so the next
    /// connection starts a clean session, which the broker opens without
    /// that message (and without any others queued for the old one), and
    /// the ones after it are persistent again.
    pub fn next(&mut self) -> Option<Result<LinkEvent, LinkError>> {
        let manual = self.manual_acks;
        let (ev, oversize) = match &mut self.inner {
            Inner::V5(c) => match c.recv().ok()? {
                Ok(ev) => (Ok(event5(ev, manual)), None),
                Err(e) => (Err(error5(&e)), oversize5(&e)),
            },
            Inner::V4(c) => match c.recv().ok()? {
                Ok(ev) => (Ok(event4(ev, manual)), None),
                Err(e) => (Err(error4(&e)), oversize4(&e)),
            },
        };
        match ev {
            Ok(LinkEvent::Connected {
                session_present, ..
            }) => {
                let dropped_oversize = self.dropped_oversize.take();
                if dropped_oversize.is_some() {
                    self.set_clean(self.clean);
                }
                Some(Ok(LinkEvent::Connected {
                    session_present,
                    dropped_oversize,
                }))
            }
            Ok(ev) => Some(Ok(ev)),
            Err(message) => {
                if let Some(n) = oversize {
                    self.dropped_oversize = Some(n);
                    self.set_clean(true);
                }
                Some(Err(LinkError { message }))
            }
        }
    }

    fn set_clean(&mut self, clean: bool) {
        match &mut self.inner {
            Inner::V5(c) => {
                c.eventloop.options.set_clean_start(clean);
            }
            Inner::V4(c) => {
                c.eventloop.mqtt_options.set_clean_session(clean);
            }
        }
    }
}

/// The announced size of a packet refused for being over the client's limit.
fn oversize5(e: &rumqttc::v5::ConnectionError) -> Option<usize> {
    use rumqttc::v5::mqttbytes::Error;
    use rumqttc::v5::{ConnectionError, StateError};
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            Error::PayloadSizeLimitExceeded { pkt_size, .. },
        )) => Some(*pkt_size),
        _ => None,
    }
}

fn oversize4(e: &rumqttc::ConnectionError) -> Option<usize> {
    use rumqttc::{ConnectionError, Error, StateError};
    match e {
        ConnectionError::MqttState(StateError::Deserialization(
            Error::PayloadSizeLimitExceeded(n),
        )) => Some(*n),
        _ => None,
    }
}

/// The packet id and QoS to acknowledge a received message with, under
/// manual acknowledgement (QoS 0 has none).
fn to_ack(manual: bool, pkid: u16, qos: u8) -> Option<(u16, u8)> {
    (manual && qos > 0).then_some((pkid, qos))
}

fn event5(ev: rumqttc::v5::Event, manual: bool) -> LinkEvent {
    use rumqttc::v5::mqttbytes::v5::SubscribeReasonCode;
    use rumqttc::v5::{Event, Incoming};
    use rumqttc::Outgoing;
    match ev {
        Event::Incoming(Incoming::ConnAck(a)) => LinkEvent::Connected {
            session_present: a.session_present,
            dropped_oversize: None,
        },
        Event::Incoming(Incoming::SubAck(a)) => {
            match a
                .return_codes
                .iter()
                .find(|c| !matches!(c, SubscribeReasonCode::Success(_)))
            {
                Some(code) => LinkEvent::SubscribeRefused(format!("{code:?}")),
                None => LinkEvent::Other,
            }
        }
        Event::Incoming(Incoming::Publish(p)) => {
            let ack = to_ack(manual, p.pkid, p.qos as u8);
            let (response_topic, correlation) = match p.properties {
                Some(props) => (
                    props.response_topic,
                    props.correlation_data.map(|d| d.to_vec()),
                ),
                None => (None, None),
            };
            LinkEvent::Received(Received {
                topic: String::from_utf8_lossy(&p.topic).into_owned(),
                payload: p.payload.to_vec(),
                retain: p.retain,
                response_topic,
                correlation,
                ack,
            })
        }
        Event::Incoming(Incoming::PubAck(a)) => LinkEvent::Confirmed(a.pkid),
        Event::Incoming(Incoming::PubComp(a)) => LinkEvent::Confirmed(a.pkid),
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Published(pkid),
        Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Disconnected,
        _ => LinkEvent::Other,
    }
}

fn event4(ev: rumqttc::Event, manual: bool) -> LinkEvent {
    use rumqttc::{Event, Incoming, Outgoing, SubscribeReasonCode};
    match ev {
        Event::Incoming(Incoming::ConnAck(a)) => LinkEvent::Connected {
            session_present: a.session_present,
            dropped_oversize: None,
        },
        Event::Incoming(Incoming::SubAck(a))
            if a.return_codes.contains(&SubscribeReasonCode::Failure) =>
        {
            LinkEvent::SubscribeRefused("Failure".into())
        }
        Event::Incoming(Incoming::Publish(p)) => LinkEvent::Received(Received {
            ack: to_ack(manual, p.pkid, p.qos as u8),
            topic: p.topic,
            payload: p.payload.to_vec(),
            retain: p.retain,
            response_topic: None,
            correlation: None,
        }),
        Event::Incoming(Incoming::PubAck(a)) => LinkEvent::Confirmed(a.pkid),
        Event::Incoming(Incoming::PubComp(a)) => LinkEvent::Confirmed(a.pkid),
        Event::Outgoing(Outgoing::Publish(pkid)) => LinkEvent::Published(pkid),
        Event::Outgoing(Outgoing::Disconnect) => LinkEvent::Disconnected,
        _ => LinkEvent::Other,
    }
}

/// Connection errors in words for the log; the two protocol versions have
/// separate but alike error types.
macro_rules! describe_error {
    ($e:expr, $E:path, $C:path) => {{
        use $C as C;
        use $E as E;
        match $e {
            E::ConnectionRefused(C::BadUserNamePassword) => {
                "the broker refused the connection: bad user name or password".into()
            }
            E::ConnectionRefused(C::NotAuthorized) => {
                "the broker refused the connection: not authorized".into()
            }
            E::ConnectionRefused(code) => format!("the broker refused the connection: {code:?}"),
            E::Tls(t) => format!("TLS handshake with the broker failed: {t}"),
            E::Io(io) => format!("connection to the broker failed: {io}"),
            other => other.to_string(),
        }
    }};
}

fn error5(e: &rumqttc::v5::ConnectionError) -> String {
    describe_error!(
        e,
        rumqttc::v5::ConnectionError,
        rumqttc::v5::mqttbytes::v5::ConnectReturnCode
    )
}

fn error4(e: &rumqttc::ConnectionError) -> String {
    describe_error!(e, rumqttc::ConnectionError, rumqttc::ConnectReturnCode)
}

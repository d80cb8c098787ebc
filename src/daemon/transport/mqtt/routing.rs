//! Requests arriving on `<prefix>/request`: where their replies go, the
//! checks that need MQTT (retained, oversized, reply topics), redelivered
//! copies, and submitting to the scheduler. Under flow control every
//! message is acknowledged once the daemon is done with it: a request the
//! scheduler accepted when its final event is queued, anything else after
//! its immediate reply (if any).

use super::acks::Ticket;
use super::link::{Message, Received};
use super::{lock, settings, Route, Shared};
use crate::daemon::logging::{log_debug, log_info, log_warn};
use crate::daemon::protocol::{self, ApiError, ErrorCode, Event, Id, Incoming};
use crate::daemon::scheduler::EventSink;
use crate::daemon::transport::inflight::Refused;
use std::sync::Arc;
use std::time::Instant;

impl Shared {
    pub(super) fn on_message(self: &Arc<Self>, r: Received) {
        let mut ticket = r
            .ack
            .map(|(pkid, qos)| lock(&self.outbox).acks.received(pkid, qos));
        self.route_message(r, &mut ticket);
        // Not taken by an accepted request: done with.
        if let Some(t) = ticket {
            self.ack(t);
        }
    }

    /// Answers or submits one message; a request the scheduler accepts
    /// takes `ticket` with it.
    fn route_message(self: &Arc<Self>, r: Received, ticket: &mut Option<Ticket>) {
        // Shared subscriptions deliver under the request topic too.
        if r.topic != self.topics.request {
            log_debug!("mqtt: ignoring a message on {}", r.topic);
            return;
        }
        if r.payload.is_empty() {
            // What clearing a retained message looks like to subscribers.
            return;
        }
        // The MQTT 5 response topic, when usable, also carries errors.
        let v5_route = match r.response_topic {
            Some(t) => match settings::check_topic_name(&t) {
                Ok(()) => Some(Route {
                    topic: t,
                    correlation: r.correlation.clone(),
                }),
                Err(e) => {
                    // Brokers check this, so it is rare; nowhere to answer.
                    log_warn!("mqtt: request with an invalid response topic: {e}");
                    self.error_to(
                        None,
                        None,
                        ApiError::new(
                            ErrorCode::InvalidRequest,
                            format!("the response topic is not valid: {e}"),
                        ),
                    );
                    return;
                }
            },
            None => None,
        };
        if r.retain {
            self.on_stale(&r.payload);
            return;
        }
        if r.payload.len() > self.s.max_payload {
            let e = ApiError::new(
                ErrorCode::PayloadTooLarge,
                format!(
                    "the message is {} bytes; the limit is {}",
                    r.payload.len(),
                    self.s.max_payload
                ),
            );
            return self.error_to(v5_route.as_ref(), None, e);
        }
        let mut obj = match protocol::parse_json_object(&r.payload) {
            Ok(o) => o,
            Err(rej) => return self.error_to(v5_route.as_ref(), None, rej.error),
        };
        let id = protocol::id_of(&obj);
        let reply_to = match obj.remove("reply_to") {
            None => None,
            Some(serde_json::Value::String(t)) => match settings::check_topic_name(&t) {
                Ok(()) => Some(t),
                Err(e) => {
                    let e = ApiError::new(ErrorCode::InvalidRequest, format!("reply_to: {e}"));
                    return self.error_to(v5_route.as_ref(), id.as_ref(), e);
                }
            },
            Some(_) => {
                let e = ApiError::new(ErrorCode::InvalidRequest, "reply_to must be a topic string");
                return self.error_to(v5_route.as_ref(), id.as_ref(), e);
            }
        };
        let route = v5_route
            .or_else(|| {
                reply_to.map(|topic| Route {
                    topic,
                    correlation: None,
                })
            })
            .or_else(|| id.as_ref().and_then(|id| self.default_route(id)));
        match protocol::parse_object(obj) {
            Err(rej) => self.error_to(route.as_ref(), rej.id.as_ref(), rej.error),
            Ok(incoming) => match route {
                None => self.error_to(
                    None,
                    id.as_ref(),
                    ApiError::new(
                        ErrorCode::InvalidRequest,
                        "no reply destination: give an 'id' (replies go to <prefix>/response/<id>), a 'reply_to' topic, or an MQTT 5 response topic",
                    ),
                ),
                Some(route) => self.on_incoming(incoming, route, ticket),
            },
        }
    }

    /// `<prefix>/response/<id>`, when the id makes a valid topic level.
    fn default_route(&self, id: &Id) -> Option<Route> {
        let level = match id {
            Id::Text(t) => t.clone(),
            Id::Number(n) => n.to_string(),
        };
        let ok = settings::check_topic_level("id", &level).is_ok();
        ok.then(|| Route {
            topic: format!("{}/{level}", self.topics.response),
            correlation: None,
        })
    }

    /// A retained request was stored by the broker before we subscribed,
    /// perhaps long ago: answering it at every reconnection would repeat
    /// it. It is reported on the error topic and cleared from the broker.
    fn on_stale(&self, payload: &[u8]) {
        let id = protocol::parse_json_object(payload)
            .ok()
            .and_then(|o| protocol::id_of(&o));
        log_warn!(
            "mqtt: ignoring a retained request{} on {}; clearing it",
            id.as_ref()
                .map(|i| format!(" (id {i})"))
                .unwrap_or_default(),
            self.topics.request
        );
        self.error_to(
            None,
            id.as_ref(),
            ApiError::new(
                ErrorCode::StaleRequest,
                "a retained request is not answered: publish requests without the retain flag",
            ),
        );
        self.push(
            Message {
                topic: self.topics.request.clone(),
                payload: Vec::new(),
                retain: true,
                correlation: None,
            },
            true,
        );
    }

    fn on_incoming(
        self: &Arc<Self>,
        incoming: Incoming,
        route: Route,
        ticket: &mut Option<Ticket>,
    ) {
        match incoming {
            Incoming::Request(req) => self.submit(&req, route, ticket),
            Incoming::Control(c) => {
                let key_route = route.clone();
                if let Some((id, reply)) = self
                    .inflight
                    .control(&self.scheduler, c, |id| (key_route, id))
                {
                    self.reply(&route, id.as_ref(), &reply, true);
                }
            }
        }
    }

    fn submit(
        self: &Arc<Self>,
        req: &protocol::Request,
        route: Route,
        ticket: &mut Option<Ticket>,
    ) {
        let key = (route.clone(), req.id.clone());
        // Held while submitting, so a copy delivered while the original
        // finishes is either still in flight or already answered.
        let mut answered = lock(&self.answered);
        if answered.contains(&key, Instant::now()) {
            log_info!(
                "mqtt: request {} delivered again; already answered, ignored",
                req.id
            );
            return;
        }
        let sink = MqttSink {
            shared: self.clone(),
            route: route.clone(),
            id: req.id.clone(),
            // A copy: a refused request is acknowledged by the caller.
            ticket: *ticket,
        };
        match self
            .inflight
            .submit(&self.scheduler, key, req, Box::new(sink))
        {
            Ok(()) => {
                // Acknowledged by the sink with the final event.
                *ticket = None;
                log_debug!("mqtt: request {} queued", req.id)
            }
            Err(Refused::Duplicate) => log_info!(
                "mqtt: request {} delivered again; still running, ignored",
                req.id
            ),
            Err(Refused::Scheduler(e)) => {
                drop(answered);
                // Refused requests may be sent again with the same id.
                log_info!("mqtt: request {} refused: {e}", req.id);
                self.reply(&route, Some(&req.id), &Event::Error(e), true);
            }
        }
    }

    pub(super) fn error_to(&self, route: Option<&Route>, id: Option<&Id>, e: ApiError) {
        log_info!(
            "mqtt: rejected a message{}: {e}",
            id.map(|i| format!(" (id {i})")).unwrap_or_default()
        );
        let fallback = Route {
            topic: self.topics.error.clone(),
            correlation: None,
        };
        self.reply(route.unwrap_or(&fallback), id, &Event::Error(e), true);
    }

    fn reply(&self, route: &Route, id: Option<&Id>, event: &Event, keep: bool) {
        self.push(
            Message {
                topic: route.topic.clone(),
                payload: protocol::reply_json(id, event),
                retain: false,
                correlation: route.correlation.clone(),
            },
            keep,
        );
    }
}

/// Delivers one job's events as messages.
struct MqttSink {
    shared: Arc<Shared>,
    route: Route,
    id: Id,
    /// The request's acknowledgement under flow control, due with the
    /// final event.
    ticket: Option<Ticket>,
}

impl EventSink for MqttSink {
    fn send(&mut self, event: Event) -> bool {
        let last = event.is_final();
        if last {
            // Answered before released: a redelivery never finds neither.
            let key = (self.route.clone(), self.id.clone());
            lock(&self.shared.answered).insert(key.clone(), Instant::now());
            self.shared.inflight.release(&key);
        }
        self.shared.reply(&self.route, Some(&self.id), &event, last);
        if last {
            if let Some(t) = self.ticket.take() {
                self.shared.ack(t);
            }
        }
        // A full outbox drops tokens, not the job: the final event carries
        // the whole text.
        true
    }
}

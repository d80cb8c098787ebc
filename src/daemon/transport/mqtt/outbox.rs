//! Replies on their way to the broker: queued while the connection is down,
//! handed to it in order, and at QoS 1 and 2 kept until the broker confirms
//! them. When the connection breaks, the unconfirmed ones go back to the
//! head of the queue, in order, and are published again after
//! reconnection: at least once, in order, possibly a duplicate around the
//! break.
//!
//! Under flow control the acknowledgements of received requests go out
//! through here too, each after the messages queued before it was done
//! (its reply), so the broker never holds an acknowledged request whose
//! reply it has not been handed.

use super::acks::{Acks, Ticket};
use super::link::Message;
use std::collections::VecDeque;

struct Entry {
    msg: Message,
    /// The retained status, which a newer one replaces while queued.
    status: bool,
    /// Received requests to acknowledge once this message is handed over.
    then_ack: Vec<Ticket>,
}

impl Entry {
    fn new(msg: Message, status: bool) -> Entry {
        Entry {
            msg,
            status,
            then_ack: Vec::new(),
        }
    }
}

#[derive(Default)]
pub struct Outbox {
    /// Not yet handed to the connection.
    queue: VecDeque<Entry>,
    /// Handed over, waiting for the broker's confirmation (QoS 1 and 2),
    /// with the packet id once it went out.
    unconfirmed: VecDeque<(Option<u16>, Message)>,
    pub connected: bool,
    /// Token events dropped because the outbox was full.
    dropped: u64,
    /// Messages put back for resending since the last connection.
    resend: usize,
    /// Set at the very end of shutdown: the publisher stops.
    pub finished: bool,
    /// Received requests not yet acknowledged (flow control only).
    pub acks: Acks,
}

impl Outbox {
    /// Queues a message. A message that may be dropped (`keep` false: a
    /// token event) is, when `max` messages already wait; the error is the
    /// number dropped so far. Final events are always kept: at most one per
    /// request, and requests are bounded by the scheduler's queue.
    pub fn push(&mut self, msg: Message, keep: bool, max: usize) -> Result<(), u64> {
        if !keep && self.pending() >= max {
            self.dropped += 1;
            return Err(self.dropped);
        }
        self.queue.push_back(Entry::new(msg, false));
        Ok(())
    }

    /// Queues a status message, replacing one that has not gone out yet.
    pub fn push_status(&mut self, msg: Message) {
        match self.queue.iter_mut().find(|e| e.status) {
            Some(e) => e.msg = msg,
            None => self.queue.push_back(Entry::new(msg, true)),
        }
    }

    /// Messages not yet confirmed (queued or handed over).
    pub fn pending(&self) -> usize {
        self.queue.len() + self.unconfirmed.len()
    }

    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// The daemon is done with a received request: acknowledge it after
    /// every message queued so far (its reply among them) is handed over.
    pub fn ack_after_queued(&mut self, t: Ticket) {
        match self.queue.back_mut() {
            Some(e) => e.then_ack.push(t),
            None => self.acks.ready(t),
        }
    }

    /// Hands queued messages to the connection while it is up and takes
    /// them, then the acknowledgements due; `publish` gives a message back
    /// and `ack` refuses when the connection's channel is full. Returns
    /// whether it stalled on a full channel.
    pub fn hand_over(
        &mut self,
        qos: u8,
        mut publish: impl FnMut(Message) -> Result<(), Message>,
        ack: impl FnMut(u16, u8) -> bool,
    ) -> bool {
        let mut stalled = false;
        while self.connected {
            let Some(e) = self.queue.pop_front() else {
                break;
            };
            let kept = (qos > 0).then(|| e.msg.clone());
            match publish(e.msg) {
                Ok(()) => {
                    if let Some(m) = kept {
                        self.unconfirmed.push_back((None, m));
                    }
                    for t in e.then_ack {
                        self.acks.ready(t);
                    }
                }
                Err(msg) => {
                    self.queue.push_front(Entry {
                        msg,
                        status: e.status,
                        then_ack: e.then_ack,
                    });
                    stalled = true;
                    break;
                }
            }
        }
        if self.connected {
            stalled |= self.acks.flush(ack);
        }
        stalled
    }

    /// The connection sent a QoS 1/2 message with packet id `pkid`: it is
    /// the oldest handed-over one without an id (the connection sends in
    /// order), unless it is a resend of a known id.
    pub fn published(&mut self, pkid: u16) {
        // Packet id 0: a QoS 0 publish, which no confirmation follows.
        if pkid == 0 || self.unconfirmed.iter().any(|(p, _)| *p == Some(pkid)) {
            return;
        }
        if let Some(slot) = self.unconfirmed.iter_mut().find(|(p, _)| p.is_none()) {
            slot.0 = Some(pkid);
        }
    }

    /// The broker confirmed `pkid`; false if no message waits for it.
    pub fn confirmed(&mut self, pkid: u16) -> bool {
        match self.unconfirmed.iter().position(|(p, _)| *p == Some(pkid)) {
            Some(i) => {
                self.unconfirmed.remove(i);
                true
            }
            None => false,
        }
    }

    /// Puts every unconfirmed message back at the head of the queue, in
    /// order (they go out again, with new packet ids), and forgets the
    /// acknowledgements due on the broken connection. Returns whether the
    /// connection had been up.
    pub fn connection_lost(&mut self) -> bool {
        let was_up = std::mem::replace(&mut self.connected, false);
        self.acks.connection_lost();
        let back: Vec<_> = self.unconfirmed.drain(..).collect();
        self.resend += back.len();
        for (_, msg) in back.into_iter().rev() {
            self.queue.push_front(Entry::new(msg, false));
        }
        was_up
    }

    /// Marks the connection up; returns how many messages are sent again.
    pub fn reconnected(&mut self) -> usize {
        self.connected = true;
        std::mem::take(&mut self.resend)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn msg(n: u8) -> Message {
        Message {
            topic: format!("t/{n}"),
            payload: vec![n],
            retain: false,
            correlation: None,
        }
    }

    /// Hands everything over and returns the payloads sent.
    fn send_all(ob: &mut Outbox, qos: u8) -> Vec<u8> {
        let mut sent = Vec::new();
        ob.hand_over(
            qos,
            |m| {
                sent.push(m.payload[0]);
                Ok(())
            },
            |_, _| true,
        );
        sent
    }

    #[test]
    fn packet_ids_pair_with_messages_in_order_and_confirmations_free_them() {
        let mut ob = Outbox {
            connected: true,
            ..Outbox::default()
        };
        for n in 1..=3 {
            ob.push(msg(n), true, 10).unwrap();
        }
        assert_eq!(send_all(&mut ob, 1), [1, 2, 3]);
        ob.published(7);
        ob.published(0); // QoS 0: ignored
        ob.published(8);
        ob.published(7); // a resend of a known id
        let ids: Vec<_> = ob
            .unconfirmed
            .iter()
            .map(|(p, m)| (*p, m.payload[0]))
            .collect();
        assert_eq!(ids, [(Some(7), 1), (Some(8), 2), (None, 3)]);
        assert!(ob.confirmed(8));
        assert!(!ob.confirmed(8) && !ob.confirmed(99));
        assert_eq!(ob.pending(), 2);
        // QoS 0 keeps nothing.
        ob.push(msg(4), true, 10).unwrap();
        send_all(&mut ob, 0);
        assert_eq!(ob.pending(), 2);
    }

    #[test]
    fn a_broken_connection_resends_the_unconfirmed_first_in_order() {
        let mut ob = Outbox {
            connected: true,
            ..Outbox::default()
        };
        for n in 1..=3 {
            ob.push(msg(n), true, 10).unwrap();
        }
        send_all(&mut ob, 1);
        ob.published(1);
        assert!(ob.confirmed(1));
        ob.push(msg(4), true, 10).unwrap();
        assert!(ob.connection_lost());
        assert!(!ob.connection_lost(), "already down");
        // Nothing goes out while down.
        assert!(send_all(&mut ob, 1).is_empty());
        assert_eq!(ob.reconnected(), 2);
        assert_eq!(send_all(&mut ob, 1), [2, 3, 4]);
        assert_eq!(ob.reconnected(), 0);
    }

    #[test]
    fn tokens_are_dropped_beyond_the_limit_finals_never() {
        let mut ob = Outbox::default();
        ob.push(msg(1), false, 2).unwrap();
        ob.push(msg(2), false, 2).unwrap();
        assert_eq!(ob.push(msg(3), false, 2), Err(1));
        assert_eq!(ob.push(msg(4), false, 2), Err(2));
        ob.push(msg(5), true, 2).unwrap();
        assert_eq!(ob.pending(), 3);
    }

    #[test]
    fn a_queued_status_is_replaced_and_a_full_channel_stalls_in_place() {
        let mut ob = Outbox::default();
        ob.push_status(msg(1));
        ob.push(msg(2), true, 10).unwrap();
        ob.push_status(msg(3));
        ob.connected = true;
        let mut sent = Vec::new();
        let stalled = ob.hand_over(
            1,
            |m| {
                if sent.len() == 1 {
                    return Err(m);
                }
                sent.push(m.payload[0]);
                Ok(())
            },
            |_, _| true,
        );
        assert!(stalled);
        assert_eq!(sent, [3], "the newer status took the older one's place");
        assert_eq!(send_all(&mut ob, 1), [2], "the refused message is next");
    }

    /// Hands everything over; returns the payloads and acknowledged packet
    /// ids in the order they reached the connection.
    fn send_log(ob: &mut Outbox) -> Vec<String> {
        let log = std::cell::RefCell::new(Vec::new());
        ob.hand_over(
            1,
            |m| {
                log.borrow_mut().push(format!("m{}", m.payload[0]));
                Ok(())
            },
            |p, _| {
                log.borrow_mut().push(format!("ack{p}"));
                true
            },
        );
        log.into_inner()
    }

    #[test]
    fn an_acknowledgement_follows_the_reply_queued_before_it() {
        let mut ob = Outbox::default();
        let t1 = ob.acks.received(11, 1);
        let t2 = ob.acks.received(12, 1);
        // Nothing queued: due at once (after 11, which is not).
        ob.ack_after_queued(t2);
        ob.push(msg(1), true, 10).unwrap();
        ob.ack_after_queued(t1);
        assert!(send_log(&mut ob).is_empty(), "nothing goes out while down");
        ob.connected = true;
        assert_eq!(send_log(&mut ob), ["m1", "ack11", "ack12"]);
        // A stalled reply holds its acknowledgement back.
        let t3 = ob.acks.received(13, 1);
        ob.push(msg(2), true, 10).unwrap();
        ob.ack_after_queued(t3);
        let stalled = ob.hand_over(1, Err, |_, _| panic!("acknowledged before its reply"));
        assert!(stalled);
        assert_eq!(send_log(&mut ob), ["m2", "ack13"]);
    }

    #[test]
    fn a_broken_connection_drops_the_acknowledgements_due_on_it() {
        let mut ob = Outbox {
            connected: true,
            ..Outbox::default()
        };
        let t = ob.acks.received(5, 1);
        ob.push(msg(1), true, 10).unwrap();
        ob.ack_after_queued(t);
        ob.connection_lost();
        ob.reconnected();
        assert_eq!(send_log(&mut ob), ["m1"], "the reply again, no stale ack");
    }
}

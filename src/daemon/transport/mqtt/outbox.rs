//! Replies on their way to the broker: queued while the connection is down,
//! handed to it in order, and at QoS 1 and 2 kept until the broker confirms
//! them. When the connection breaks, the unconfirmed ones go back to the
//! head of the queue, in order, and are published again after
//! reconnection: at least once, in order, possibly a duplicate around the
//! break.

use super::link::Message;
use std::collections::VecDeque;

struct Entry {
    msg: Message,
    /// The retained status, which a newer one replaces while queued.
    status: bool,
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
        self.queue.push_back(Entry { msg, status: false });
        Ok(())
    }

    /// Queues a status message, replacing one that has not gone out yet.
    pub fn push_status(&mut self, msg: Message) {
        match self.queue.iter_mut().find(|e| e.status) {
            Some(e) => e.msg = msg,
            None => self.queue.push_back(Entry { msg, status: true }),
        }
    }

    /// Messages not yet confirmed (queued or handed over).
    pub fn pending(&self) -> usize {
        self.queue.len() + self.unconfirmed.len()
    }

    pub fn has_queued(&self) -> bool {
        !self.queue.is_empty()
    }

    /// Hands queued messages to the connection while it is up and takes
    /// them; `publish` gives a message back when the connection's channel
    /// is full. Returns whether it stalled on a full channel.
    pub fn hand_over(
        &mut self,
        qos: u8,
        mut publish: impl FnMut(Message) -> Result<(), Message>,
    ) -> bool {
        while self.connected {
            let Some(e) = self.queue.pop_front() else {
                return false;
            };
            let kept = (qos > 0).then(|| e.msg.clone());
            match publish(e.msg) {
                Ok(()) => {
                    if let Some(m) = kept {
                        self.unconfirmed.push_back((None, m));
                    }
                }
                Err(msg) => {
                    self.queue.push_front(Entry {
                        msg,
                        status: e.status,
                    });
                    return true;
                }
            }
        }
        false
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
    /// order (they go out again, with new packet ids). Returns whether the
    /// connection had been up.
    pub fn connection_lost(&mut self) -> bool {
        let was_up = std::mem::replace(&mut self.connected, false);
        let back: Vec<_> = self.unconfirmed.drain(..).collect();
        self.resend += back.len();
        for (_, msg) in back.into_iter().rev() {
            self.queue.push_front(Entry { msg, status: false });
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
        ob.hand_over(qos, |m| {
            sent.push(m.payload[0]);
            Ok(())
        });
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
        let stalled = ob.hand_over(1, |m| {
            if sent.len() == 1 {
                return Err(m);
            }
            sent.push(m.payload[0]);
            Ok(())
        });
        assert!(stalled);
        assert_eq!(sent, [3], "the newer status took the older one's place");
        assert_eq!(send_all(&mut ob, 1), [2], "the refused message is next");
    }
}

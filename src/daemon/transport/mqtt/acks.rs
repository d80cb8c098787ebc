//! Acknowledgements of received requests under flow control (a fleet):
//! a QoS 1/2 request is acknowledged only when the daemon is done with it,
//! so the messages the broker counts against the daemon's Receive Maximum
//! are the ones it holds. MQTT wants acknowledgements in the order the
//! messages arrived (MQTT 5 and 3.1.1, 4.6), so one that is ready waits for
//! the ones before it. Packet ids belong to a connection: when it breaks,
//! everything waiting is forgotten, and tickets from before are void.

use std::collections::VecDeque;

/// A received message's place in the acknowledgement order.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Ticket(u64);

#[derive(Default)]
pub struct Acks {
    /// The current connection's unacknowledged messages, in arrival order:
    /// packet id, QoS, ready.
    waiting: VecDeque<(u16, u8, bool)>,
    /// The ticket number of `waiting[0]`.
    first: u64,
}

impl Acks {
    /// A QoS 1 or 2 message arrived with packet id `pkid`.
    pub fn received(&mut self, pkid: u16, qos: u8) -> Ticket {
        self.waiting.push_back((pkid, qos, false));
        Ticket(self.first + self.waiting.len() as u64 - 1)
    }

    /// The daemon is done with the message: it may be acknowledged once
    /// the ones before it are. A ticket from a broken connection is ignored.
    pub fn ready(&mut self, t: Ticket) {
        if let Some(i) = t.0.checked_sub(self.first) {
            if let Some(slot) = self.waiting.get_mut(i as usize) {
                slot.2 = true;
            }
        }
    }

    /// Sends the acknowledgements that are due, in order; `ack` refuses
    /// one when the connection's channel is full, and the rest wait.
    /// Returns whether it stalled so.
    pub fn flush(&mut self, mut ack: impl FnMut(u16, u8) -> bool) -> bool {
        while let Some(&(pkid, qos, true)) = self.waiting.front() {
            if !ack(pkid, qos) {
                return true;
            }
            self.waiting.pop_front();
            self.first += 1;
        }
        false
    }

    /// The connection broke: its packet ids mean nothing to the next one.
    pub fn connection_lost(&mut self) {
        self.first += self.waiting.len() as u64;
        self.waiting.clear();
    }

    /// Messages received on this connection and not yet acknowledged.
    #[cfg(test)]
    pub fn unacknowledged(&self) -> usize {
        self.waiting.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flush_all(a: &mut Acks) -> Vec<u16> {
        let mut sent = Vec::new();
        a.flush(|p, _| {
            sent.push(p);
            true
        });
        sent
    }

    #[test]
    fn acknowledged_in_arrival_order_when_ready() {
        let mut a = Acks::default();
        let t1 = a.received(7, 1);
        let t2 = a.received(8, 1);
        let t3 = a.received(9, 2);
        a.ready(t2);
        assert!(flush_all(&mut a).is_empty(), "8 waits for 7");
        a.ready(t1);
        assert_eq!(flush_all(&mut a), [7, 8]);
        assert_eq!(a.unacknowledged(), 1);
        a.ready(t3);
        a.ready(t3);
        let mut sent = Vec::new();
        a.flush(|p, q| {
            sent.push((p, q));
            true
        });
        assert_eq!(sent, [(9, 2)]);
        a.ready(t1); // done already: nothing
        assert!(flush_all(&mut a).is_empty());
    }

    #[test]
    fn a_full_channel_keeps_the_rest_in_order() {
        let mut a = Acks::default();
        let ts: Vec<_> = (1..=3).map(|p| a.received(p, 1)).collect();
        for t in &ts {
            a.ready(*t);
        }
        let mut room = 1;
        let mut sent = Vec::new();
        let stalled = a.flush(|p, _| {
            if room == 0 {
                return false;
            }
            room -= 1;
            sent.push(p);
            true
        });
        assert!(stalled);
        assert_eq!(sent, [1]);
        assert_eq!(flush_all(&mut a), [2, 3]);
    }

    #[test]
    fn tickets_from_a_broken_connection_are_void() {
        let mut a = Acks::default();
        let old = a.received(1, 1);
        let _ = a.received(2, 1);
        a.connection_lost();
        assert_eq!(a.unacknowledged(), 0);
        // Packet id 1 again, on the new connection: a different message.
        let new = a.received(1, 1);
        a.ready(old);
        assert!(flush_all(&mut a).is_empty(), "the old ticket acks nothing");
        a.ready(new);
        assert_eq!(flush_all(&mut a), [1]);
    }
}

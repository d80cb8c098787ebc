//! Requests answered recently, by destination and id: QoS 1 may deliver a
//! message twice, and the second copy must not be answered again. Entries
//! expire after the dedup window, and at most `max` are kept.

use std::collections::{HashMap, VecDeque};
use std::hash::Hash;
use std::time::{Duration, Instant};

pub struct Answered<K> {
    at: HashMap<K, Instant>,
    /// In the order answered, for expiry.
    order: VecDeque<(Instant, K)>,
    window: Duration,
    max: usize,
}

impl<K: Eq + Hash + Clone> Answered<K> {
    pub fn new(window: Duration, max: usize) -> Self {
        Answered {
            at: HashMap::new(),
            order: VecDeque::new(),
            window,
            max,
        }
    }

    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.order.front() {
            if now.duration_since(*at) < self.window && self.order.len() <= self.max {
                break;
            }
            let (at, key) = self.order.pop_front().expect("non-empty");
            // A key answered again later has a newer entry: keep it.
            if self.at.get(&key) == Some(&at) {
                self.at.remove(&key);
            }
        }
    }

    /// Whether `key` was answered within the window.
    pub fn contains(&mut self, key: &K, now: Instant) -> bool {
        self.expire(now);
        self.at.contains_key(key)
    }

    pub fn insert(&mut self, key: K, now: Instant) {
        if self.window.is_zero() {
            return;
        }
        self.at.insert(key.clone(), now);
        self.order.push_back((now, key));
        self.expire(now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_are_remembered_for_the_window_and_up_to_the_limit() {
        let t0 = Instant::now();
        let s = Duration::from_secs(1);
        let mut a = Answered::new(10 * s, 2);
        a.insert("x", t0);
        assert!(a.contains(&"x", t0 + 9 * s));
        assert!(!a.contains(&"x", t0 + 10 * s), "expired after the window");
        let mut a = Answered::new(10 * s, 2);
        a.insert("a", t0);
        a.insert("b", t0 + s);
        a.insert("c", t0 + 2 * s);
        assert!(
            !a.contains(&"a", t0 + 2 * s),
            "the oldest goes beyond the limit"
        );
        assert!(a.contains(&"b", t0 + 2 * s) && a.contains(&"c", t0 + 2 * s));
        // Answered again: the newer entry counts when the older expires.
        let mut a = Answered::new(10 * s, 5);
        a.insert("a", t0);
        a.insert("a", t0 + 5 * s);
        assert!(a.contains(&"a", t0 + 12 * s));
        assert!(!a.contains(&"a", t0 + 15 * s));
        let mut off = Answered::new(Duration::ZERO, 10);
        off.insert("x", t0);
        assert!(!off.contains(&"x", t0), "a zero window remembers nothing");
    }
}

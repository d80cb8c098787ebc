//! Ways for clients to reach the scheduler. A transport frames requests and
//! replies and owns its connections; queueing and inference are the
//! scheduler's, shared by every transport.

pub mod http;
pub mod inflight;
pub mod mqtt;
pub mod unix;

use std::sync::{Arc, Condvar, Mutex, MutexGuard, Weak};
use std::time::{Duration, Instant};

/// The open connections of a stream transport: counted for its connection
/// limit, and listed so that shutdown can close them and wait for the
/// replies still being written.
pub struct Connections<C> {
    conns: Mutex<Vec<Weak<C>>>,
    /// Connections whose thread has not finished yet.
    live: Mutex<usize>,
    all_closed: Condvar,
}

impl<C> Default for Connections<C> {
    fn default() -> Self {
        Connections {
            conns: Mutex::new(Vec::new()),
            live: Mutex::new(0),
            all_closed: Condvar::new(),
        }
    }
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // Each update is one step: the state stays consistent after a panic.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<C> Connections<C> {
    /// Counts a new connection unless `max` are open.
    pub fn admit(&self, max: usize) -> bool {
        let mut live = lock(&self.live);
        if *live >= max {
            return false;
        }
        *live += 1;
        true
    }

    /// Lists an admitted connection for [`Connections::take_all`].
    pub fn track(&self, conn: &Arc<C>) {
        let mut conns = lock(&self.conns);
        conns.retain(|c| c.strong_count() > 0);
        conns.push(Arc::downgrade(conn));
    }

    /// An admitted connection is finished.
    pub fn closed(&self) {
        *lock(&self.live) -= 1;
        self.all_closed.notify_all();
    }

    /// The connections still open, for closing them at shutdown.
    pub fn take_all(&self) -> Vec<Arc<C>> {
        std::mem::take(&mut *lock(&self.conns))
            .iter()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// Waits up to `timeout` for every admitted connection to finish.
    pub fn wait_closed(&self, timeout: Duration) {
        let until = Instant::now() + timeout;
        let mut live = lock(&self.live);
        while *live > 0 {
            let Some(left) = until.checked_duration_since(Instant::now()) else {
                return;
            };
            live = self
                .all_closed
                .wait_timeout(live, left)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }
}

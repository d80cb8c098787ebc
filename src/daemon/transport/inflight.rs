//! The requests a client has in flight, by the key that names them to it
//! (an id on a socket connection; a reply destination and id over MQTT):
//! claimed before submitting, so a duplicate is refused even while the
//! first is being queued; released when the final event goes out or the
//! scheduler refuses; cancelled by key or all at once when the client
//! leaves. Shared by the transports that let clients choose ids.

use crate::daemon::protocol::{ApiError, Control, Event, Id, Request};
use crate::daemon::scheduler::{EventSink, JobHandle, Scheduler};
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};

/// Why a request was not queued.
#[derive(Debug, PartialEq)]
pub enum Refused {
    /// The key is already in flight.
    Duplicate,
    /// The scheduler refused it (the error is for the client).
    Scheduler(ApiError),
}

pub struct InFlight<K> {
    /// `None` while the submission is in progress.
    jobs: Mutex<HashMap<K, Option<JobHandle>>>,
}

impl<K: Eq + Hash + Clone> Default for InFlight<K> {
    fn default() -> Self {
        InFlight {
            jobs: Mutex::new(HashMap::new()),
        }
    }
}

impl<K: Eq + Hash + Clone> InFlight<K> {
    fn lock(&self) -> MutexGuard<'_, HashMap<K, Option<JobHandle>>> {
        // Each update is one step: the map stays consistent after a panic.
        self.jobs.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Claims `key` and submits `req`. The sink must call
    /// [`InFlight::release`] before delivering the final event, so a
    /// client reusing the key right after reading it is not refused.
    pub fn submit(
        &self,
        scheduler: &Scheduler,
        key: K,
        req: &Request,
        sink: Box<dyn EventSink>,
    ) -> Result<(), Refused> {
        {
            let mut jobs = self.lock();
            if jobs.contains_key(&key) {
                return Err(Refused::Duplicate);
            }
            // Claimed before submitting: the job may finish (and release
            // the key) before `submit` returns.
            jobs.insert(key.clone(), None);
        }
        match scheduler.submit(req, sink) {
            Ok(job) => {
                if let Some(slot) = self.lock().get_mut(&key) {
                    *slot = Some(job);
                }
                Ok(())
            }
            Err(e) => {
                self.lock().remove(&key);
                Err(Refused::Scheduler(e))
            }
        }
    }

    pub fn release(&self, key: &K) {
        self.lock().remove(key);
    }

    /// Cancels the request named `key`; false when it is not in flight
    /// (finished already: its final event is on the way).
    pub fn cancel(&self, scheduler: &Scheduler, key: &K) -> bool {
        let job = self.lock().get(key).cloned().flatten();
        match job {
            Some(job) => {
                scheduler.cancel(&job);
                true
            }
            None => false,
        }
    }

    /// Cancels everything in flight (the client is gone).
    pub fn cancel_all(&self, scheduler: &Scheduler) {
        let jobs: Vec<JobHandle> = self.lock().values().flatten().cloned().collect();
        for job in &jobs {
            scheduler.cancel(job);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.lock().is_empty()
    }

    /// Carries out a control message; returns the reply it asks for
    /// (health) with the id to send it under, if any. `key` turns the
    /// cancelled id into this table's key.
    pub fn control(
        &self,
        scheduler: &Scheduler,
        control: Control,
        key: impl FnOnce(Id) -> K,
    ) -> Option<(Option<Id>, Event)> {
        match control {
            Control::Cancel { id } => {
                let shown = id.to_string();
                if !self.cancel(scheduler, &key(id)) {
                    crate::daemon::logging::log_debug!("cancel of {shown}: not in flight");
                }
                None
            }
            Control::Health { id } => Some((id, Event::Health(Box::new(scheduler.health())))),
        }
    }
}

//! Counters and latency histograms of the requests the scheduler serves,
//! whatever transport they came by, rendered in the Prometheus text format
//! (`GET /metrics` on the HTTP transport).
//!
//! Updated once per request (never per token), so a mutex is cheap enough
//! and keeps the counters of one request consistent with each other.

use super::protocol::{Done, ErrorCode, Health};
use std::collections::BTreeMap;
use std::fmt::Write;
use std::sync::Mutex;

/// Bucket bounds in seconds for the time to the first token: from a cached
/// short prompt on a fast box to a long prompt on a Pi.
const TTFT_BUCKETS: &[f64] = &[
    0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];
/// Bucket bounds in seconds per generated token: 100 tok/s down to 0.5 tok/s.
const TPOT_BUCKETS: &[f64] = &[0.01, 0.025, 0.05, 0.1, 0.15, 0.25, 0.5, 1.0, 2.0];

#[derive(Clone, Debug)]
struct Histogram {
    bounds: &'static [f64],
    /// Per bucket, not cumulative; the last one is `+Inf`.
    counts: Vec<u64>,
    sum: f64,
    count: u64,
}

impl Histogram {
    fn new(bounds: &'static [f64]) -> Self {
        Histogram {
            bounds,
            counts: vec![0; bounds.len() + 1],
            sum: 0.0,
            count: 0,
        }
    }

    fn observe(&mut self, v: f64, times: u64) {
        let i = self
            .bounds
            .iter()
            .position(|&b| v <= b)
            .unwrap_or(self.bounds.len());
        self.counts[i] += times;
        self.sum += v * times as f64;
        self.count += times;
    }

    fn render(&self, out: &mut String, name: &str, help: &str) {
        let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} histogram");
        let mut cumulative = 0;
        for (i, c) in self.counts.iter().enumerate() {
            cumulative += c;
            let le = match self.bounds.get(i) {
                Some(b) => format!("{b}"),
                None => "+Inf".into(),
            };
            let _ = writeln!(out, "{name}_bucket{{le=\"{le}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_sum {}\n{name}_count {}", self.sum, self.count);
    }
}

#[derive(Clone, Debug)]
struct Inner {
    /// Final outcome of every request: a finish reason or an error code.
    outcomes: BTreeMap<&'static str, u64>,
    prompt_tokens: u64,
    completion_tokens: u64,
    cached_tokens: u64,
    ttft: Histogram,
    tpot: Histogram,
}

/// Shared by the scheduler (which records) and the transports (which render).
pub struct Metrics {
    inner: Mutex<Inner>,
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics {
            inner: Mutex::new(Inner {
                outcomes: BTreeMap::new(),
                prompt_tokens: 0,
                completion_tokens: 0,
                cached_tokens: 0,
                ttft: Histogram::new(TTFT_BUCKETS),
                tpot: Histogram::new(TPOT_BUCKETS),
            }),
        }
    }
}

/// What `/metrics` says about the build and the model beside the counters.
pub struct Info<'a> {
    pub version: &'a str,
    pub model: &'a str,
    pub kernels: &'a str,
}

impl Metrics {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A request that ended with an error, before or during its run.
    pub fn error(&self, code: ErrorCode) {
        *self.lock().outcomes.entry(code.as_str()).or_default() += 1;
    }

    /// A request that produced a reply (possibly cut short).
    pub fn done(&self, d: &Done) {
        let mut m = self.lock();
        *m.outcomes.entry(d.finish_reason.as_str()).or_default() += 1;
        m.prompt_tokens += d.usage.prompt_tokens as u64;
        m.completion_tokens += d.usage.completion_tokens as u64;
        m.cached_tokens += d.usage.cached_tokens as u64;
        if d.usage.completion_tokens > 0 {
            m.ttft
                .observe((d.timings.queued_ms + d.timings.prompt_ms) / 1e3, 1);
        }
        // Every decoded token (all but the first, which prefill gives)
        // counts once, at the request's mean step time.
        let decoded = d.usage.completion_tokens.saturating_sub(1) as u64;
        if decoded > 0 {
            let per_token = d.timings.generation_ms / 1e3 / decoded as f64;
            m.tpot.observe(per_token, decoded);
        }
    }

    /// The Prometheus text exposition (format 0.0.4).
    pub fn render(&self, health: &Health, info: &Info) -> String {
        let m = self.lock().clone();
        let mut out = String::with_capacity(4096);
        let label = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
        let _ = writeln!(
            out,
            "# HELP crystald_build_info The daemon's version, model and kernel set.\n\
             # TYPE crystald_build_info gauge\n\
             crystald_build_info{{version=\"{}\",model=\"{}\",kernels=\"{}\"}} 1",
            label(info.version),
            label(info.model),
            label(info.kernels)
        );
        let _ = writeln!(
            out,
            "# HELP crystald_requests_total Requests by how they ended: a finish reason or an error code.\n\
             # TYPE crystald_requests_total counter"
        );
        for (outcome, n) in &m.outcomes {
            let _ = writeln!(out, "crystald_requests_total{{outcome=\"{outcome}\"}} {n}");
        }
        for (name, help, v) in [
            (
                "crystald_prompt_tokens_total",
                "Prompt tokens of finished requests.",
                m.prompt_tokens,
            ),
            (
                "crystald_completion_tokens_total",
                "Generated tokens.",
                m.completion_tokens,
            ),
            (
                "crystald_cached_tokens_total",
                "Prompt tokens whose KV entries were reused from the prefix cache.",
                m.cached_tokens,
            ),
        ] {
            let _ = writeln!(
                out,
                "# HELP {name} {help}\n# TYPE {name} counter\n{name} {v}"
            );
        }
        for (name, help, v) in [
            (
                "crystald_queue_depth",
                "Requests waiting for the worker.",
                health.queue_depth as f64,
            ),
            (
                "crystald_queue_capacity",
                "Requests that may wait.",
                health.queue_capacity as f64,
            ),
            (
                "crystald_running_requests",
                "Requests being generated.",
                health.running as f64,
            ),
            (
                "crystald_context_tokens",
                "The context window served.",
                health.n_ctx as f64,
            ),
            (
                "crystald_uptime_seconds",
                "Seconds since the worker started.",
                health.uptime_s,
            ),
            (
                "crystald_worker_up",
                "1 while the inference worker runs.",
                f64::from(u8::from(health.status == "ok")),
            ),
        ] {
            let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} gauge\n{name} {v}");
        }
        m.ttft.render(
            &mut out,
            "crystald_time_to_first_token_seconds",
            "From arrival to the first generated token (queue and prompt).",
        );
        m.tpot.render(
            &mut out,
            "crystald_time_per_output_token_seconds",
            "Seconds per generated token after the first (each token at its request's mean).",
        );
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let mut h = Histogram::new(&[1.0, 2.0]);
        h.observe(0.5, 1);
        h.observe(2.0, 2);
        h.observe(9.0, 1);
        let mut out = String::new();
        h.render(&mut out, "x", "help");
        assert!(out.contains("x_bucket{le=\"1\"} 1\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"2\"} 3\n"), "{out}");
        assert!(out.contains("x_bucket{le=\"+Inf\"} 4\n"), "{out}");
        assert!(out.contains("x_sum 13.5\nx_count 4\n"), "{out}");
    }
}

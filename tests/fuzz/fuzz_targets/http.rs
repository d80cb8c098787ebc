//! An HTTP request as the OpenAI-compatible transport reads it: the
//! request head and body under their limits, then the JSON body of either
//! completion endpoint translated to the daemon's request and checked with
//! the real tokenizer. Every refusal must be an HTTP error status with an
//! OpenAI error object.
#![no_main]

use crystald::daemon::protocol::Limits;
use crystald::daemon::transport::http::{openai, wire};
use libfuzzer_sys::fuzz_target;
use std::time::Duration;

fuzz_target!(|data: &[u8]| {
    let limits = wire::Limits {
        max_head: 4096,
        max_body: 8192,
        read_timeout: Duration::from_secs(1),
        keep_alive: Duration::from_secs(1),
    };
    let parsed = wire::parse(data, &limits);
    crystald_fuzz::report(
        "wire",
        &parsed
            .as_ref()
            .map(|r| r.is_some())
            .map_err(|e| format!("{e:?}")),
    );
    let req = match parsed {
        Ok(Some(r)) => r,
        Ok(None) => return,
        Err(e) => {
            if let Some(reply) = e.reply() {
                assert!((400..500).contains(&reply.status) && !reply.message.is_empty());
            }
            return;
        }
    };
    let id = "fuzz".to_string();
    let translated = openai::parse_body(&req.body).and_then(|o| {
        if req.path.ends_with("/completions") && !req.path.contains("chat") {
            openai::completion_request(&o, id)
        } else {
            openai::chat_request(&o, id)
        }
    });
    crystald_fuzz::report(
        "translate",
        &translated.as_ref().map(|_| ()).map_err(|e| e.status),
    );
    match translated {
        Err(e) => {
            assert!((400..600).contains(&e.status));
            let body = serde_json::to_vec(&e.body()).expect("error body serialises");
            let v: serde_json::Value = serde_json::from_slice(&body).unwrap();
            assert!(v["error"]["message"].is_string());
        }
        Ok(t) => {
            let limits = Limits {
                n_ctx: 256,
                default_max_tokens: 64,
            };
            let prepared = t.request.prepare(crystald_fuzz::tokenizer(), &limits, || 7);
            crystald_fuzz::report("prepare", &prepared.as_ref().map(|p| p.prompt.len()));
            if let Err(e) = prepared {
                assert!((400..600).contains(&openai::HttpError::from(e).status));
            }
        }
    }
});

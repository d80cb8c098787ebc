//! A request line as the daemon reads it: JSON parsing, the request and
//! control schemas, then validation and prompt building with the real
//! tokenizer. Every outcome must serialize to one reply line.
#![no_main]

use crystald::daemon::protocol::{self, Event, Incoming, Limits};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let limits = Limits {
        n_ctx: 256,
        default_max_tokens: 64,
    };
    let one_line = |bytes: Vec<u8>| {
        assert_eq!(bytes.last(), Some(&b'\n'));
        assert!(!bytes[..bytes.len() - 1].contains(&b'\n'));
        let _: serde_json::Value = serde_json::from_slice(&bytes).expect("reply is JSON");
    };
    let parsed = protocol::parse_line(data);
    crystald_fuzz::report("parse", &parsed.as_ref().map(|_| ()).map_err(|r| &r.error));
    match parsed {
        Err(r) => one_line(protocol::reply_line(
            r.id.as_ref(),
            &Event::Error(r.error.clone()),
        )),
        Ok(Incoming::Control(_)) => {}
        Ok(Incoming::Request(req)) => {
            let prepared = req.prepare(crystald_fuzz::tokenizer(), &limits, || 7);
            crystald_fuzz::report("prepare", &prepared.as_ref().map(|p| p.prompt.len()));
            match prepared {
                Ok(p) => {
                    assert!(!p.prompt.is_empty() && p.prompt.len() < limits.n_ctx);
                    assert!((1..=limits.n_ctx).contains(&p.params.max_tokens));
                    let vocab = crystald_fuzz::tokenizer().vocab_size();
                    assert!(p.prompt.iter().all(|&id| (id as usize) < vocab));
                }
                Err(e) => one_line(protocol::reply_line(Some(&req.id), &Event::Error(e))),
            }
        }
    }
});

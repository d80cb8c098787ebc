//! The chat-template renderer on arbitrary conversations. The input is split
//! at 0x00 bytes into messages; each message's first byte picks the role
//! (mod 3: system, user, assistant), the rest is its content (lossy UTF-8).
#![no_main]

use crystald::tokenizer::{render, Message, Role};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let messages: Vec<Message> = data
        .split(|&b| b == 0)
        .filter(|m| !m.is_empty())
        .map(|m| {
            let role = [Role::System, Role::User, Role::Assistant][m[0] as usize % 3];
            Message::new(role, String::from_utf8_lossy(&m[1..]))
        })
        .collect();
    let tok = crystald_fuzz::tokenizer();
    let rendered = render(tok, &messages);
    crystald_fuzz::report("render", &rendered.as_ref().map(|ids| ids.len()));
    let Ok(ids) = rendered else {
        return;
    };
    let sp = crystald_fuzz::SPECIAL;
    assert_eq!(&ids[..2], &[sp.bos, sp.sys_start]);
    // Control ids come only from the template: user text that spells
    // "<|im_start|>" must not become the control token.
    let users = messages.iter().filter(|m| m.role == Role::User).count();
    let count = |id: u32| ids.iter().filter(|&&x| x == id).count();
    assert_eq!(count(sp.im_start), users);
    assert_eq!(count(sp.im_end), users);
    assert_eq!(
        (count(sp.bos), count(sp.sys_start), count(sp.sys_end)),
        (1, 1, 1)
    );
    assert_eq!(count(sp.eos), 0);
    assert!(ids.iter().all(|&id| (id as usize) < tok.vocab_size()));
});

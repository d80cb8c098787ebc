//! The streaming detokenizer on arbitrary ids (u32 little-endian, reduced
//! modulo a bit more than the vocabulary so out-of-range ids occur too):
//! the streamed pieces must concatenate to exactly `decode` of the ids.
#![no_main]

use crystald::tokenizer::StreamDecoder;
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let tok = crystald_fuzz::tokenizer();
    let vocab = tok.vocab_size() as u32;
    let ids: Vec<u32> = data
        .chunks_exact(4)
        .map(|c| u32::from_le_bytes(c.try_into().unwrap()) % (vocab + 16))
        .collect();
    let mut stream = StreamDecoder::new(tok);
    let mut text = String::new();
    let mut accepted = Vec::new();
    for &id in &ids {
        match stream.push(id) {
            Ok(piece) => {
                accepted.push(id);
                text.push_str(&piece);
            }
            Err(_) => assert!(id >= vocab, "id {id} is in the vocabulary"),
        }
        assert!(stream.pending_bytes() <= 3);
    }
    text.push_str(&stream.finish());
    assert_eq!(text, tok.decode(&accepted).unwrap());
    assert!(tok.decode(&ids).is_err() == (accepted.len() != ids.len()));
});

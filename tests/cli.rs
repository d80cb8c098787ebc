//! The `crystald` command as a user runs it on a converted fixture.

mod common;

use common::*;
use std::os::unix::ffi::OsStrExt;
use std::process::{Command, Output};

fn crystald(args: &[&std::ffi::OsStr]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_crystald"))
        .args(args)
        .output()
        .unwrap()
}

fn s(x: &str) -> &std::ffi::OsStr {
    x.as_ref()
}

fn stdout(o: &Output) -> String {
    assert!(
        o.status.success(),
        "crystald failed: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    String::from_utf8(o.stdout.clone()).unwrap()
}

#[test]
fn generate_streams_text_and_prints_stats() {
    let m = converted("tiny-a", "q4_0");
    let o = crystald(&[
        s("generate"),
        s("--model"),
        m.as_os_str(),
        s("--prompt"),
        s("Hello there"),
        s("--max-tokens"),
        s("12"),
        s("--seed"),
        s("1"),
    ]);
    let text = stdout(&o);
    assert!(!text.trim().is_empty(), "no text generated");
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        err.contains("prompt:") && err.contains("tok/s") && err.contains("finish:"),
        "stats missing: {err}"
    );
}

#[test]
fn a_full_context_ends_the_reply_cleanly() {
    let m = converted("tiny-a", "q4_0");
    let o = crystald(&[
        s("generate"),
        s("-m"),
        m.as_os_str(),
        s("-p"),
        s("def fibonacci(n):"),
        s("--raw"),
        s("--ctx"),
        s("40"),
        s("--max-tokens"),
        s("500"),
        s("--temperature"),
        s("0"),
    ]);
    stdout(&o);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(err.contains("finish: context"), "{err}");
}

#[test]
fn same_seed_same_bytes_different_seed_differs() {
    let m = converted("tiny-b", "q8_0");
    let run = |seed: &str| {
        let o = crystald(&[
            s("generate"),
            s("-m"),
            m.as_os_str(),
            s("-p"),
            s("Tell me a story"),
            s("--max-tokens"),
            s("24"),
            s("--temperature"),
            s("1.0"),
            s("--seed"),
            s(seed),
        ]);
        assert!(o.status.success());
        o.stdout
    };
    let a = run("42");
    assert_eq!(a, run("42"), "same seed gave different output");
    assert!(
        ["1", "2", "3"].iter().any(|seed| run(seed) != a),
        "different seeds gave the same output"
    );
}

#[test]
fn eval_dumps_reference_logits_and_greedy_tokens() {
    let m = converted("tiny-b", "f32");
    let exp = expected("tiny-b");
    let dir = temp_dir();
    let npy = dir.path().join("logits.npy");
    let tokens: Vec<String> = exp.tokens[1].iter().map(|t| t.to_string()).collect();
    let o = crystald(&[
        s("eval"),
        s("-m"),
        m.as_os_str(),
        s("--tokens"),
        s(&tokens.join(",")),
        s("--dump-logits"),
        npy.as_os_str(),
        s("--generate"),
        s("16"),
    ]);
    let out: serde_json::Value = serde_json::from_str(&stdout(&o)).unwrap();
    let generated: Vec<u32> = serde_json::from_value(out["generated"].clone()).unwrap();
    assert_eq!(generated, exp.greedy[1]);
    let bytes = std::fs::read(&npy).unwrap();
    assert_eq!(&bytes[..6], b"\x93NUMPY");
    let hlen = u16::from_le_bytes([bytes[8], bytes[9]]) as usize;
    let header = std::str::from_utf8(&bytes[10..10 + hlen]).unwrap();
    assert!(
        header.contains(&format!("'shape': ({}, 32032)", tokens.len())),
        "{header}"
    );
    let logits: Vec<f32> = bytes[10 + hlen..]
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes(c.try_into().unwrap()))
        .collect();
    let err = rel_l2(&logits, &exp.logits[1]);
    assert!(
        err < 1e-4,
        "dumped logits differ from the reference: {err:.2e}"
    );
}

#[test]
fn tokenize_text_and_messages() {
    let m = converted("tiny-a", "q4_0");
    let ids: Vec<u32> = serde_json::from_str(&stdout(&crystald(&[
        s("tokenize"),
        s("-m"),
        m.as_os_str(),
        s("--text"),
        s("Hello"),
    ])))
    .unwrap();
    assert!(
        !ids.is_empty() && ids[0] != 1,
        "text alone has no <s>: {ids:?}"
    );
    let dir = temp_dir();
    let f = dir.path().join("chat.json");
    std::fs::write(
        &f,
        r#"[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}]"#,
    )
    .unwrap();
    let chat: Vec<u32> = serde_json::from_str(&stdout(&crystald(&[
        s("tokenize"),
        s("-m"),
        m.as_os_str(),
        s("--messages"),
        f.as_os_str(),
    ])))
    .unwrap();
    assert_eq!(&chat[..2], &[1, 32020]);
    assert_eq!(
        *chat.last().unwrap(),
        32019,
        "ends with <|im_end|>, ready for the reply"
    );
    assert!(chat.windows(ids.len()).any(|w| w == ids.as_slice()));
}

fn expect_error(args: &[&std::ffi::OsStr], must_mention: &str) {
    let o = crystald(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "succeeded unexpectedly: {args:?}");
    assert!(
        err.contains(must_mention),
        "error should mention '{must_mention}': {err}"
    );
    assert!(
        !err.contains("panicked"),
        "panic instead of an error: {err}"
    );
}

#[test]
fn bad_inputs_are_clear_errors() {
    let m = converted("tiny-a", "q4_0");
    let model = m.to_str().unwrap();
    let long_ids = vec!["100"; 600].join(",");
    let long_text = "word ".repeat(800);
    let dir = temp_dir();
    let robot = dir.path().join("robot.json");
    std::fs::write(&robot, r#"[{"role": "robot", "content": "x"}]"#).unwrap();
    let empty = dir.path().join("empty.json");
    std::fs::write(&empty, "[]").unwrap();
    let (robot, empty) = (robot.to_str().unwrap(), empty.to_str().unwrap());
    let cases: &[(&[&str], &str)] = &[
        (&["eval", "-m", model, "--tokens", "1,32032"], "32032"),
        (
            &["eval", "-m", model, "--tokens", "1,abc"],
            "'abc' is not a token id",
        ),
        (&["eval", "-m", model, "--tokens", ""], "--tokens is empty"),
        (&["eval", "-m", model, "--tokens", &long_ids], "context"),
        (
            &["generate", "-m", model, "-p", &long_text, "--ctx", "64"],
            "context",
        ),
        (
            &["generate", "-m", model, "-p", "hi", "--max-tokens", "0"],
            "max-tokens",
        ),
        (
            &["generate", "-m", model, "-p", "hi", "--temperature=-1"],
            "temperature",
        ),
        (
            &["generate", "-m", "/nonexistent.gguf", "-p", "hi"],
            "/nonexistent.gguf",
        ),
        (
            &["generate", "-m", model, "-p", "hi", "--kernels", "sse9"],
            "sse9",
        ),
        (
            &["tokenize", "-m", model, "--messages", robot],
            "robot.json",
        ),
        (
            &["tokenize", "-m", model, "--messages", empty],
            "no messages",
        ),
    ];
    for (args, must_mention) in cases {
        let args: Vec<&std::ffi::OsStr> = args.iter().map(|a| s(a)).collect();
        expect_error(&args, must_mention);
    }
    let invalid = std::ffi::OsStr::from_bytes(b"caf\xe9");
    expect_error(
        &[s("generate"), s("-m"), m.as_os_str(), s("-p"), invalid],
        "UTF-8",
    );
}

#[test]
fn stop_strings_end_the_reply_and_are_not_printed() {
    let m = converted("tiny-b", "q8_0");
    let run = |extra: &[&str]| {
        let mut args = vec![
            s("generate"),
            s("-m"),
            m.as_os_str(),
            s("--raw"),
            s("-p"),
            s("Once upon a time"),
            s("--max-tokens"),
            s("40"),
            s("--seed"),
            s("5"),
        ];
        args.extend(extra.iter().map(|a| s(a)));
        stdout(&crystald(&args))
    };
    let full = run(&[]);
    let chars: Vec<char> = full.chars().collect();
    assert!(
        chars.len() > 12,
        "too little text to pick a stop string from: {full:?}"
    );
    let stop: String = chars[8..11].iter().collect();
    let cut = run(&["--stop", &stop]);
    let expected = &full[..full.find(&stop).unwrap()];
    assert_eq!(cut.trim_end_matches('\n'), expected, "stop string {stop:?}");
}

//! A raw HTTP/1.1 client for the tests of the HTTP transport: exact bytes
//! out, so bad requests can be sent, and every read bounded.

use super::services::WAIT;
use serde_json::Value;
use std::io::Read;
use std::net::TcpStream;

#[derive(Debug)]
pub struct Resp {
    pub status: u16,
    pub head: String,
    pub body: Vec<u8>,
}

impl Resp {
    pub fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }

    pub fn error(&self) -> Value {
        let v = self.json();
        assert!(v["error"]["message"].is_string(), "{v}");
        v["error"].clone()
    }
}

/// Reads one response (to the end of the connection, or of its
/// Content-Length), decoding a chunked body.
pub fn read_response(s: &mut TcpStream) -> Resp {
    s.set_read_timeout(Some(WAIT)).unwrap();
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i + 4;
        }
        let n = s.read(&mut chunk).expect("response head");
        assert!(n > 0, "closed before a response: {buf:?}");
        buf.extend_from_slice(&chunk[..n]);
    };
    let head = String::from_utf8_lossy(&buf[..head_end]).to_string();
    let status = head[9..12].parse().unwrap();
    let lower = head.to_ascii_lowercase();
    let mut rest = buf[head_end..].to_vec();
    let body = if let Some(len) = lower
        .lines()
        .find_map(|l| l.strip_prefix("content-length: "))
    {
        let len: usize = len.trim().parse().unwrap();
        while rest.len() < len {
            let n = s.read(&mut chunk).unwrap();
            assert!(n > 0);
            rest.extend_from_slice(&chunk[..n]);
        }
        rest.truncate(len);
        rest
    } else {
        // Chunked: read until the last chunk, then decode.
        while !rest.ends_with(b"0\r\n\r\n") {
            let n = s.read(&mut chunk).unwrap();
            assert!(
                n > 0,
                "stream ended early: {}",
                String::from_utf8_lossy(&rest)
            );
            rest.extend_from_slice(&chunk[..n]);
        }
        let mut body = Vec::new();
        let mut at = 0;
        loop {
            let line_end = at + rest[at..].windows(2).position(|w| w == b"\r\n").unwrap();
            let size = usize::from_str_radix(std::str::from_utf8(&rest[at..line_end]).unwrap(), 16)
                .unwrap();
            if size == 0 {
                break body;
            }
            body.extend_from_slice(&rest[line_end + 2..line_end + 2 + size]);
            at = line_end + 2 + size + 2;
        }
    };
    Resp { status, head, body }
}

pub fn request(method: &str, path: &str, auth: Option<&str>, body: Option<&[u8]>) -> Vec<u8> {
    let mut r = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n");
    if let Some(k) = auth {
        r.push_str(&format!("Authorization: Bearer {k}\r\n"));
    }
    if let Some(b) = body {
        r.push_str(&format!(
            "Content-Type: application/json\r\nContent-Length: {}\r\n",
            b.len()
        ));
    }
    let mut bytes = format!("{r}\r\n").into_bytes();
    bytes.extend_from_slice(body.unwrap_or_default());
    bytes
}

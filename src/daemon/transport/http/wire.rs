//! HTTP/1.1 framing: reading one request under a size limit and a deadline
//! (a client sending a header a byte a second is cut off, not waited for),
//! and writing responses, whole or as a chunked event stream.
//!
//! Parsing the request head is `httparse`'s; what is built here is the part
//! a daemon on a small device has to control itself: every byte it buffers
//! and every second it waits.

use super::openai::HttpError;
use crate::daemon::protocol::ErrorCode;
use std::io::{self, Read, Write};
use std::net::{Shutdown, TcpStream};
use std::os::fd::{AsFd, BorrowedFd};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

/// A client connection, over TCP or a Unix socket.
pub enum Stream {
    Tcp(TcpStream),
    Unix(UnixStream),
}

impl Stream {
    pub fn try_clone(&self) -> io::Result<Stream> {
        Ok(match self {
            Stream::Tcp(s) => Stream::Tcp(s.try_clone()?),
            Stream::Unix(s) => Stream::Unix(s.try_clone()?),
        })
    }

    pub fn shutdown(&self, how: Shutdown) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.shutdown(how),
            Stream::Unix(s) => s.shutdown(how),
        }
    }

    fn set_read_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_read_timeout(t),
            Stream::Unix(s) => s.set_read_timeout(t),
        }
    }

    pub fn set_write_timeout(&self, t: Option<Duration>) -> io::Result<()> {
        match self {
            Stream::Tcp(s) => s.set_write_timeout(t),
            Stream::Unix(s) => s.set_write_timeout(t),
        }
    }
}

impl AsFd for Stream {
    fn as_fd(&self) -> BorrowedFd<'_> {
        match self {
            Stream::Tcp(s) => s.as_fd(),
            Stream::Unix(s) => s.as_fd(),
        }
    }
}

impl Read for &Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).read(buf),
            Stream::Unix(s) => (&*s).read(buf),
        }
    }
}

impl Write for &Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Tcp(s) => (&*s).write(buf),
            Stream::Unix(s) => (&*s).write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

#[derive(Clone, Debug)]
pub struct Limits {
    /// Request line and headers together.
    pub max_head: usize,
    pub max_body: usize,
    /// From the first byte of a request to its last.
    pub read_timeout: Duration,
    /// Waiting for the first byte of the next request on a kept connection.
    pub keep_alive: Duration,
}

/// Most headers a request may have.
const MAX_HEADERS: usize = 64;

#[derive(Debug)]
pub struct Request {
    pub method: String,
    /// The path without the query string.
    pub path: String,
    pub headers: Vec<(String, Vec<u8>)>,
    pub body: Vec<u8>,
    /// Whether the client wants the connection kept after the response.
    pub keep_alive: bool,
}

impl Request {
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }
}

/// Why no request could be read. Each but `Closed` and `Idle` is answered
/// with [`ReadError::status`] before the connection is closed.
#[derive(Debug)]
pub enum ReadError {
    /// The client closed the connection between requests.
    Closed,
    /// No request came within the keep-alive time.
    Idle,
    /// The request did not arrive whole within the read timeout.
    Timeout,
    HeadTooLarge,
    BodyTooLarge {
        length: u64,
        limit: usize,
    },
    /// A body without a Content-Length (chunked uploads are not taken).
    LengthRequired,
    Malformed(String),
    Io(io::Error),
}

impl ReadError {
    /// The error to answer with, if any.
    pub fn reply(&self) -> Option<HttpError> {
        let invalid = |status, code, message: String| {
            HttpError::new(status, "invalid_request_error", code, message)
        };
        Some(match self {
            ReadError::Closed | ReadError::Idle | ReadError::Io(_) => return None,
            ReadError::Timeout => HttpError::new(
                408,
                "timeout_error",
                "timeout",
                "the request did not arrive in time",
            ),
            ReadError::HeadTooLarge => invalid(
                431,
                "headers_too_large",
                "the request line and headers are too large".into(),
            ),
            ReadError::BodyTooLarge { length, limit } => invalid(
                413,
                ErrorCode::PayloadTooLarge.as_str(),
                format!("the body is {length} bytes; the limit is {limit} (http.max_body_bytes)"),
            ),
            ReadError::LengthRequired => invalid(
                411,
                "length_required",
                "a request body needs a Content-Length header (chunked uploads are not supported)"
                    .into(),
            ),
            ReadError::Malformed(why) => invalid(
                400,
                "invalid_request",
                format!("malformed HTTP request: {why}"),
            ),
        })
    }
}

/// Reads requests from one connection, keeping bytes that arrive early
/// (pipelining) for the next one.
pub struct Reader {
    stream: Stream,
    buf: Vec<u8>,
}

impl Reader {
    pub fn new(stream: Stream) -> Reader {
        Reader {
            stream,
            buf: Vec::new(),
        }
    }

    /// Reads more bytes into the buffer before `deadline`; `Ok(false)` at
    /// end of input.
    fn fill(&mut self, deadline: Instant) -> Result<bool, ReadError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(ReadError::Timeout);
        }
        self.stream
            .set_read_timeout(Some(left))
            .map_err(ReadError::Io)?;
        let mut chunk = [0u8; 8192];
        loop {
            match (&self.stream).read(&mut chunk) {
                Ok(0) => return Ok(false),
                Ok(n) => {
                    self.buf.extend_from_slice(&chunk[..n]);
                    return Ok(true);
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e)
                    if matches!(
                        e.kind(),
                        io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
                    ) =>
                {
                    return Err(ReadError::Timeout)
                }
                Err(e) => return Err(ReadError::Io(e)),
            }
        }
    }

    /// Reads the next request. `on_continue` is written when the client
    /// asked for `100 Continue` before sending its body (curl does so for
    /// bodies over 1 KiB).
    pub fn next(&mut self, limits: &Limits, out: &Stream) -> Result<Request, ReadError> {
        if self.buf.is_empty() {
            match self.fill(Instant::now() + limits.keep_alive) {
                Ok(true) => {}
                Ok(false) => return Err(ReadError::Closed),
                Err(ReadError::Timeout) => return Err(ReadError::Idle),
                Err(e) => return Err(e),
            }
        }
        let deadline = Instant::now() + limits.read_timeout;
        let (head_len, mut req, length) = loop {
            if let Some(parsed) = parse_head(&self.buf)? {
                break parsed;
            }
            if self.buf.len() > limits.max_head {
                return Err(ReadError::HeadTooLarge);
            }
            if !self.fill(deadline)? {
                return Err(ReadError::Malformed(
                    "the connection closed inside the request head".into(),
                ));
            }
        };
        if head_len > limits.max_head {
            return Err(ReadError::HeadTooLarge);
        }
        self.buf.drain(..head_len);
        if length > limits.max_body as u64 {
            return Err(ReadError::BodyTooLarge {
                length,
                limit: limits.max_body,
            });
        }
        let length = length as usize;
        let expects_continue = req
            .header("expect")
            .is_some_and(|v| v.eq_ignore_ascii_case(b"100-continue"));
        if expects_continue && length > self.buf.len() {
            let _ = out.write_all_to(b"HTTP/1.1 100 Continue\r\n\r\n");
        }
        while self.buf.len() < length {
            if !self.fill(deadline)? {
                return Err(ReadError::Malformed(
                    "the connection closed inside the request body".into(),
                ));
            }
        }
        req.body = self.buf.drain(..length).collect();
        Ok(req)
    }
}

impl Stream {
    fn write_all_to(&self, bytes: &[u8]) -> io::Result<()> {
        let mut w = self;
        w.write_all(bytes)
    }
}

/// One whole request (head and body) from the start of `buf`, under the
/// size limits: what [`Reader::next`] returns once the bytes are in. `None`
/// when `buf` holds less than a whole request. For the fuzz target and tests.
pub fn parse(buf: &[u8], limits: &Limits) -> Result<Option<Request>, ReadError> {
    let Some((head_len, mut req, length)) = parse_head(buf)? else {
        return match buf.len() > limits.max_head {
            true => Err(ReadError::HeadTooLarge),
            false => Ok(None),
        };
    };
    if head_len > limits.max_head {
        return Err(ReadError::HeadTooLarge);
    }
    if length > limits.max_body as u64 {
        return Err(ReadError::BodyTooLarge {
            length,
            limit: limits.max_body,
        });
    }
    let Some(body) = buf[head_len..].get(..length as usize) else {
        return Ok(None);
    };
    req.body = body.to_vec();
    Ok(Some(req))
}

/// The head of a request when the buffer holds all of it: its length, the
/// request (without body) and the body's length.
fn parse_head(buf: &[u8]) -> Result<Option<(usize, Request, u64)>, ReadError> {
    let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut parsed = httparse::Request::new(&mut headers);
    let head_len = match parsed.parse(buf) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => return Err(ReadError::HeadTooLarge),
        Err(e) => return Err(ReadError::Malformed(e.to_string())),
    };
    let method = parsed.method.unwrap_or_default().to_string();
    let target = parsed.path.unwrap_or_default();
    let path = target.split('?').next().unwrap_or_default().to_string();
    let minor = parsed.version.unwrap_or(1);
    let headers: Vec<(String, Vec<u8>)> = parsed
        .headers
        .iter()
        .map(|h| (h.name.to_string(), h.value.to_vec()))
        .collect();
    let mut req = Request {
        method,
        path,
        headers,
        body: Vec::new(),
        keep_alive: false,
    };
    let connection = req
        .header("connection")
        .map(|v| String::from_utf8_lossy(v).to_ascii_lowercase());
    req.keep_alive = match (minor, connection.as_deref()) {
        (_, Some(c)) if c.contains("close") => false,
        (0, Some(c)) => c.contains("keep-alive"),
        (0, None) => false,
        _ => true,
    };
    if req.header("transfer-encoding").is_some() {
        return Err(ReadError::LengthRequired);
    }
    let lengths: Vec<&[u8]> = req
        .headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case("content-length"))
        .map(|(_, v)| v.as_slice())
        .collect();
    let length = match lengths.as_slice() {
        [] => 0,
        [one] => std::str::from_utf8(one)
            .ok()
            .filter(|s| !s.is_empty() && s.bytes().all(|b| b.is_ascii_digit()))
            .and_then(|s| s.parse::<u64>().ok())
            .ok_or_else(|| ReadError::Malformed("Content-Length is not a number".into()))?,
        _ => {
            return Err(ReadError::Malformed(
                "more than one Content-Length header".into(),
            ))
        }
    };
    Ok(Some((head_len, req, length)))
}

pub fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        411 => "Length Required",
        413 => "Content Too Large",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// A whole response.
pub struct Response {
    pub status: u16,
    pub content_type: &'static str,
    pub headers: Vec<(&'static str, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn new(status: u16, content_type: &'static str, body: Vec<u8>) -> Response {
        Response {
            status,
            content_type,
            headers: Vec::new(),
            body,
        }
    }

    pub fn json(status: u16, value: &serde_json::Value) -> Response {
        let mut body = serde_json::to_vec(value).expect("JSON values serialise");
        body.push(b'\n');
        Response::new(status, "application/json", body)
    }

    pub fn with_header(mut self, name: &'static str, value: impl Into<String>) -> Response {
        self.headers.push((name, value.into()));
        self
    }

    /// Writes the response; `keep_alive` false adds `Connection: close`.
    pub fn write(&self, out: &Stream, keep_alive: bool) -> io::Result<()> {
        let mut bytes = head(self.status, self.content_type, &self.headers, keep_alive);
        bytes.extend_from_slice(format!("Content-Length: {}\r\n\r\n", self.body.len()).as_bytes());
        bytes.extend_from_slice(&self.body);
        out.write_all_to(&bytes)
    }
}

fn head(
    status: u16,
    content_type: &str,
    headers: &[(&'static str, String)],
    keep_alive: bool,
) -> Vec<u8> {
    let mut h = format!(
        "HTTP/1.1 {status} {}\r\nContent-Type: {content_type}\r\nServer: crystald/{}\r\n",
        reason(status),
        env!("CARGO_PKG_VERSION")
    );
    for (name, value) in headers {
        h.push_str(&format!("{name}: {value}\r\n"));
    }
    if !keep_alive {
        h.push_str("Connection: close\r\n");
    }
    h.into_bytes()
}

/// A `text/event-stream` response sent as chunks, one per event, so the
/// connection can be kept for the next request once it ends.
pub struct EventStream<'a> {
    out: &'a Stream,
}

impl<'a> EventStream<'a> {
    pub fn start(out: &'a Stream, keep_alive: bool) -> io::Result<EventStream<'a>> {
        let mut bytes = head(
            200,
            "text/event-stream",
            &[("Cache-Control", "no-cache".into())],
            keep_alive,
        );
        bytes.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
        out.write_all_to(&bytes)?;
        Ok(EventStream { out })
    }

    /// Sends `data: PAYLOAD\n\n` as one chunk.
    pub fn send(&mut self, payload: &[u8]) -> io::Result<()> {
        let len = payload.len() + 8;
        let mut chunk = format!("{len:x}\r\ndata: ").into_bytes();
        chunk.extend_from_slice(payload);
        chunk.extend_from_slice(b"\n\n\r\n");
        self.out.write_all_to(&chunk)
    }

    /// The last chunk: the response is complete.
    pub fn finish(self) -> io::Result<()> {
        self.out.write_all_to(b"0\r\n\r\n")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pair() -> (Stream, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        (Stream::Unix(a), b)
    }

    fn limits() -> Limits {
        Limits {
            max_head: 1024,
            max_body: 16,
            read_timeout: Duration::from_millis(300),
            keep_alive: Duration::from_millis(300),
        }
    }

    fn read(input: &[u8]) -> Vec<Result<Request, ReadError>> {
        let (server, mut client) = pair();
        client.write_all(input).unwrap();
        client.shutdown(Shutdown::Write).unwrap();
        let out = server.try_clone().unwrap();
        let mut r = Reader::new(server);
        let mut got = Vec::new();
        loop {
            let res = r.next(&limits(), &out);
            let end = res.is_err();
            got.push(res);
            if end {
                return got;
            }
        }
    }

    #[test]
    fn pipelined_requests_are_read_in_turn() {
        let got = read(
            b"POST /v1/x?a=1 HTTP/1.1\r\nContent-Length: 3\r\n\r\nabcGET /health HTTP/1.0\r\n\r\n",
        );
        let first = got[0].as_ref().unwrap();
        assert_eq!(
            (first.method.as_str(), first.path.as_str()),
            ("POST", "/v1/x")
        );
        assert_eq!(
            (first.body.as_slice(), first.keep_alive),
            (&b"abc"[..], true)
        );
        let second = got[1].as_ref().unwrap();
        assert_eq!(
            (second.path.as_str(), second.keep_alive),
            ("/health", false)
        );
        assert!(matches!(got[2], Err(ReadError::Closed)));
    }

    #[test]
    fn a_buffer_parses_once_it_holds_a_whole_request() {
        let whole = b"POST /x HTTP/1.1\r\nContent-Length: 3\r\n\r\nabc";
        for cut in 0..whole.len() {
            assert!(parse(&whole[..cut], &limits()).unwrap().is_none(), "{cut}");
        }
        assert_eq!(parse(whole, &limits()).unwrap().unwrap().body, b"abc");
        let big = b"POST /x HTTP/1.1\r\nContent-Length: 17\r\n\r\n";
        assert!(matches!(
            parse(big, &limits()),
            Err(ReadError::BodyTooLarge { .. })
        ));
        assert!(matches!(
            parse(&[b'a'; 2000], &limits()),
            Err(ReadError::HeadTooLarge)
        ));
    }

    #[test]
    fn bad_requests_get_the_right_status() {
        let status = |input: &[u8]| {
            read(input)[0]
                .as_ref()
                .unwrap_err()
                .reply()
                .map(|e| e.status)
        };
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 17\r\n\r\n"),
            Some(413)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Some(411)
        );
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: x\r\n\r\n"),
            Some(400)
        );
        assert_eq!(status(b"GARBAGE\r\n\r\n"), Some(400));
        let long = format!("GET / HTTP/1.1\r\nX: {}\r\n\r\n", "a".repeat(2000));
        assert_eq!(status(long.as_bytes()), Some(431));
        assert_eq!(
            status(b"POST / HTTP/1.1\r\nContent-Length: 5\r\n\r\nab"),
            Some(400)
        );
        assert!(matches!(read(b"")[0], Err(ReadError::Closed)));
    }

    #[test]
    fn a_slow_head_times_out_and_an_idle_connection_ends_quietly() {
        let (server, mut client) = pair();
        let out = server.try_clone().unwrap();
        let mut r = Reader::new(server);
        assert!(matches!(r.next(&limits(), &out), Err(ReadError::Idle)));
        // A byte at a time, slower than the read timeout allows in total.
        let writer = std::thread::spawn(move || {
            for b in b"GET / HTTP/1.1\r\n" {
                if client.write_all(&[*b]).is_err() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            client
        });
        let t = Instant::now();
        let res = r.next(&limits(), &out);
        assert!(matches!(res, Err(ReadError::Timeout)), "{res:?}");
        assert!(t.elapsed() < Duration::from_secs(2));
        drop(writer.join());
    }

    #[test]
    fn event_stream_chunks_frame_the_events() {
        let (server, mut client) = pair();
        let mut s = EventStream::start(&server, true).unwrap();
        s.send(b"{\"a\":1}").unwrap();
        s.finish().unwrap();
        drop(server);
        let mut text = String::new();
        client.read_to_string(&mut text).unwrap();
        let body = text.split("\r\n\r\n").nth(1).unwrap();
        assert_eq!(body, "f\r\ndata: {\"a\":1}\n\n\r\n0");
        assert!(text.contains("Transfer-Encoding: chunked"));
    }
}

//! HTTP/1.1 on one connection of the API socket: requests read with `httparse` (heads of
//! at most [`MAX_HEAD`] bytes and [`MAX_HEADERS`] headers; bodies sized by
//! `Content-Length`, at most [`Limits::max_body`] bytes), responses written whole.
//! Connections stay open between requests (HTTP/1.1's default, as Firecracker's clients
//! expect) unless the client says `Connection: close`. `Expect: 100-continue` is
//! answered, so curl sends a large body at once. Chunked bodies are refused (501): no
//! client of Firecracker's API sends them.
//!
//! A client may wait between requests for as long as it likes, as Firecracker's may
//! (its SDKs keep idle connections for their next request); the server closes the
//! connection idle longest only to make room for a new one (see [`super::MAX_CLIENTS`]).
//! A request has [`Limits::request_timeout`] from its first byte to its last, after
//! which it gets a 408 and its connection is closed (so has a response it does not take
//! for as long): a client that stops in the middle of a request does not hold one of
//! the server's connections for ever.
//!
//! Where a request ends must be certain, or the next one would be read from the wrong
//! byte: a `Content-Length` that is not plain ASCII digits, two that differ, or one
//! beside `Transfer-Encoding` is a 400, and the connection is closed.

use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use crate::backends::Presence;

/// The longest request head (request line and headers) taken.
pub const MAX_HEAD: usize = 8192;
/// The most headers a request may have.
pub const MAX_HEADERS: usize = 32;
/// Firecracker's default limit on a request's body (its `--http-api-max-payload-size`).
pub const DEFAULT_MAX_BODY: usize = 51_200;

/// How long a request may take to arrive, from its first byte to its last (and a
/// response to be taken).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

/// What a connection accepts.
#[derive(Debug, Clone, Copy)]
pub struct Limits {
    /// The longest body taken.
    pub max_body: usize,
    /// How long a request may take from its first byte to its last
    /// ([`REQUEST_TIMEOUT`]): it is answered 408 then, and the connection closed. Each
    /// write of a response has as long.
    pub request_timeout: Duration,
}

impl Default for Limits {
    fn default() -> Self {
        Limits { max_body: DEFAULT_MAX_BODY, request_timeout: REQUEST_TIMEOUT }
    }
}

/// What a connection runs over: a stream whose reads and writes can be given a time
/// limit. The API socket's [`UnixStream`]; tests' and the fuzz target's in-memory
/// streams, which never wait, ignore the limits.
pub trait Stream: Read + Write {
    /// Limits each later read to `timeout` (not zero); `None`: reads wait as long as
    /// it takes.
    fn set_read_limit(&self, timeout: Option<Duration>) -> std::io::Result<()>;
    /// Limits each later write to `timeout` (not zero).
    fn set_write_limit(&self, timeout: Duration) -> std::io::Result<()>;
}

impl Stream for UnixStream {
    fn set_read_limit(&self, timeout: Option<Duration>) -> std::io::Result<()> {
        self.set_read_timeout(timeout)
    }

    fn set_write_limit(&self, timeout: Duration) -> std::io::Result<()> {
        self.set_write_timeout(Some(timeout))
    }
}

/// One request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// The method, as sent (`GET`, `PUT`, `PATCH`, ...).
    pub method: String,
    /// The path, without a query string.
    pub path: String,
    /// The body, if the request had one (a `Content-Length` above 0).
    pub body: Option<Vec<u8>>,
}

/// One response: a status and, unless it is 204, a JSON body.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Response {
    /// The status code.
    pub status: u16,
    /// The JSON body.
    pub body: Option<String>,
}

impl Response {
    /// 204 No Content.
    pub fn no_content() -> Self {
        Response { status: 204, body: None }
    }

    /// 200 with `body`.
    pub fn ok(body: String) -> Self {
        Response { status: 200, body: Some(body) }
    }

    /// `status` with Firecracker's error body, `{"fault_message": "..."}`.
    pub fn fault(status: u16, message: &str) -> Self {
        Response { status, body: Some(serde_json::json!({ "fault_message": message }).to_string()) }
    }
}

/// Why a connection ends (after the response, if the client is to get one).
#[derive(Debug, PartialEq, Eq)]
pub enum ConnectionEnd {
    /// The client closed it, between requests or in the middle of one.
    Closed,
    /// A request the connection cannot go on after: answered with this, then closed.
    /// (A request not whole within [`Limits::request_timeout`] too: 408.)
    Refused(Response),
}

/// One client connection: reads requests, writes responses.
#[derive(Debug)]
pub struct Connection<S> {
    stream: S,
    limits: Limits,
    /// Bytes read and not yet part of a request taken (a pipelined request's start).
    buf: Vec<u8>,
    /// The client asked to close after this response.
    close_after: bool,
    /// When the first byte of the request being read came (`None`: none has yet).
    started: Option<Instant>,
    /// Told when the connection waits for a request and when one starts (the API
    /// socket's connections).
    presence: Option<Presence>,
}

impl<S: Stream> Connection<S> {
    /// A connection over `stream`, its writes limited to [`Limits::request_timeout`].
    pub fn new(stream: S, limits: Limits) -> Self {
        // Cannot fail on a connected socket; if it did, writes would only wait longer.
        let _ = stream.set_write_limit(limits.request_timeout);
        Connection { stream, limits, buf: Vec::new(), close_after: false, started: None, presence: None }
    }

    /// The same, telling `presence` when it waits for a request (from the start: a
    /// client that sends nothing is idle) and when a request's first byte comes.
    pub(crate) fn watched(self, presence: Presence) -> Self {
        Connection { presence: Some(presence), ..self }
    }

    /// The next request. A malformed or oversized one is [`ConnectionEnd::Refused`] with
    /// the response it gets: the connection cannot be trusted past it.
    pub fn next_request(&mut self) -> Result<Request, ConnectionEnd> {
        // A pipelined request's first bytes came with the last one: its time starts now.
        self.started = (!self.buf.is_empty()).then(Instant::now);
        if let Some(presence) = &self.presence {
            match self.started {
                None => presence.idle(),
                Some(_) => presence.busy(),
            }
        }
        let (head_len, mut request, body_len, expects_continue) = loop {
            if let Some(head) = self.parse_head()? {
                break head;
            }
            if self.buf.len() >= MAX_HEAD {
                return Err(refused(431, &format!("The request head is over {MAX_HEAD} bytes.")));
            }
            self.fill(MAX_HEAD - self.buf.len())?;
        };
        if body_len > self.limits.max_body {
            // Firecracker's words and status (413).
            return Err(refused(
                413,
                &format!(
                    "Request payload with size {body_len} is larger than the limit of {} allowed by server.",
                    self.limits.max_body
                ),
            ));
        }
        if expects_continue && self.buf.len() < head_len + body_len {
            self.stream.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").map_err(|_| ConnectionEnd::Closed)?;
        }
        while self.buf.len() < head_len + body_len {
            self.fill(head_len + body_len - self.buf.len())?;
        }
        self.started = None;
        let rest = self.buf.split_off(head_len + body_len);
        let mut body = std::mem::replace(&mut self.buf, rest);
        if body_len > 0 {
            request.body = Some(body.split_off(head_len));
        }
        Ok(request)
    }

    /// Writes `response`; false when the connection is to close now (the client asked
    /// to, or is gone).
    pub fn respond(&mut self, response: &Response) -> bool {
        let written = self.stream.write_all(&encode(response, self.close_after)).and_then(|()| self.stream.flush());
        written.is_ok() && !self.close_after
    }

    /// Writes the response that ends the connection.
    pub fn refuse(&mut self, response: &Response) {
        let _ = self.stream.write_all(&encode(response, true)).and_then(|()| self.stream.flush());
    }

    /// The stream, given back.
    pub fn into_inner(self) -> S {
        self.stream
    }

    /// Reads at most `want` more bytes into the buffer (none if interrupted: the caller
    /// asks again), waiting no longer than the time left to the request, or, before its
    /// first byte, for as long as it takes.
    fn fill(&mut self, want: usize) -> Result<(), ConnectionEnd> {
        let timeout = match self.started {
            None => None,
            Some(started) => match self.limits.request_timeout.checked_sub(started.elapsed()) {
                Some(left) if !left.is_zero() => Some(left),
                _ => return Err(self.timed_out()),
            },
        };
        self.stream.set_read_limit(timeout).map_err(|_| ConnectionEnd::Closed)?;
        let mut chunk = [0u8; 4096];
        let want = want.min(chunk.len());
        match self.stream.read(&mut chunk[..want]) {
            Ok(0) => Err(ConnectionEnd::Closed),
            Ok(n) => {
                if self.started.is_none() {
                    self.started = Some(Instant::now());
                    if let Some(presence) = &self.presence {
                        presence.busy();
                    }
                }
                self.buf.extend_from_slice(&chunk[..n]);
                Ok(())
            }
            Err(e) if e.kind() == ErrorKind::Interrupted => Ok(()),
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => Err(self.timed_out()),
            Err(_) => Err(ConnectionEnd::Closed),
        }
    }

    /// How the connection ends when a request's time is up: with a 408 (nothing has
    /// answered it yet: a `100 Continue` is not an answer). (Reads between requests have
    /// no time limit: a timed-out one there is a failed connection.)
    fn timed_out(&self) -> ConnectionEnd {
        match self.started {
            None => ConnectionEnd::Closed,
            Some(_) => refused(
                408,
                &format!(
                    "The request did not arrive whole within {:?} of its first byte.",
                    self.limits.request_timeout
                ),
            ),
        }
    }

    /// The request head in the buffer, if it is whole: its length, the request, the
    /// body's length and whether the client waits for `100 Continue`.
    #[allow(clippy::type_complexity)]
    fn parse_head(&mut self) -> Result<Option<(usize, Request, usize, bool)>, ConnectionEnd> {
        let mut headers = [httparse::EMPTY_HEADER; MAX_HEADERS];
        let mut parsed = httparse::Request::new(&mut headers);
        let head_len = match parsed.parse(&self.buf) {
            Ok(httparse::Status::Complete(len)) => len,
            Ok(httparse::Status::Partial) => return Ok(None),
            Err(httparse::Error::TooManyHeaders) => {
                return Err(refused(431, &format!("A request has at most {MAX_HEADERS} headers.")))
            }
            Err(e) => return Err(refused(400, &format!("Malformed HTTP request: {e}."))),
        };
        let (Some(method), Some(target), Some(version)) = (parsed.method, parsed.path, parsed.version) else {
            return Err(refused(400, "Malformed HTTP request."));
        };
        let mut content_length: Option<usize> = None;
        let mut transfer_encoding = false;
        let mut expects_continue = false;
        // HTTP/1.0 closes after each response unless asked to keep the connection.
        let mut close = version == 0;
        for header in parsed.headers.iter() {
            let value = std::str::from_utf8(header.value).unwrap_or("").trim_matches([' ', '\t']);
            match header.name.to_ascii_lowercase().as_str() {
                "content-length" => match (parse_length(value), content_length) {
                    (Some(len), None) => content_length = Some(len),
                    (Some(len), Some(earlier)) if len == earlier => {}
                    _ => return Err(refused(400, "Invalid Content-Length header.")),
                },
                "transfer-encoding" => transfer_encoding = true,
                "expect" if value.eq_ignore_ascii_case("100-continue") => expects_continue = true,
                "connection" if value.eq_ignore_ascii_case("close") => close = true,
                "connection" if value.eq_ignore_ascii_case("keep-alive") => close = false,
                _ => {}
            }
        }
        // Both framings at once is how requests are smuggled past proxies: refused,
        // whichever header comes first.
        match (transfer_encoding, content_length) {
            (true, Some(_)) => {
                return Err(refused(400, "A request may not have both Content-Length and Transfer-Encoding headers."))
            }
            (true, None) => return Err(refused(501, "Chunked bodies are not supported.")),
            (false, _) => {}
        }
        let body_len = content_length.unwrap_or(0);
        self.close_after = close;
        let path = target.split(['?', '#']).next().unwrap_or("").to_string();
        let request = Request { method: method.to_string(), path, body: None };
        Ok(Some((head_len, request, body_len, expects_continue)))
    }
}

/// A `Content-Length` value: ASCII digits only (no sign, no list, no spaces inside), as
/// RFC 9112 has it. `None` for anything else, a number past `usize` included.
fn parse_length(value: &str) -> Option<usize> {
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse().ok()
}

fn refused(status: u16, message: &str) -> ConnectionEnd {
    ConnectionEnd::Refused(Response::fault(status, message))
}

/// The reason phrase of the statuses this server sends.
fn reason(status: u16) -> &'static str {
    match status {
        200 => "OK",
        204 => "No Content",
        400 => "Bad Request",
        404 => "Not Found",
        405 => "Method Not Allowed",
        408 => "Request Timeout",
        413 => "Payload Too Large",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        503 => "Service Unavailable",
        _ => "Unknown",
    }
}

/// `response` as bytes on the wire.
pub fn encode(response: &Response, close: bool) -> Vec<u8> {
    let mut head = format!("HTTP/1.1 {} {}\r\nServer: hvrun\r\n", response.status, reason(response.status));
    if close {
        head.push_str("Connection: close\r\n");
    }
    match &response.body {
        Some(body) => {
            head.push_str(&format!("Content-Type: application/json\r\nContent-Length: {}\r\n\r\n", body.len()));
            let mut bytes = head.into_bytes();
            bytes.extend_from_slice(body.as_bytes());
            bytes
        }
        None if response.status == 204 => {
            head.push_str("\r\n");
            head.into_bytes()
        }
        None => {
            head.push_str("Content-Length: 0\r\n\r\n");
            head.into_bytes()
        }
    }
}

#[cfg(test)]
mod tests;

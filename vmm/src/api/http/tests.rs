use std::io::{Cursor, Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Instant;

use proptest::prelude::*;

use super::*;

/// A client's bytes in, the server's out.
struct Pipe {
    input: Cursor<Vec<u8>>,
    output: Vec<u8>,
}

impl Read for Pipe {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.input.read(buf)
    }
}

impl Write for Pipe {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.output.write(buf)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

impl Stream for Pipe {
    fn set_read_limit(&self, _: Option<Duration>) -> std::io::Result<()> {
        Ok(())
    }
    fn set_write_limit(&self, _: Duration) -> std::io::Result<()> {
        Ok(())
    }
}

fn connection(bytes: &[u8]) -> Connection<Pipe> {
    Connection::new(Pipe { input: Cursor::new(bytes.to_vec()), output: Vec::new() }, Limits::default())
}

fn output(c: &Connection<Pipe>) -> String {
    String::from_utf8_lossy(&c.stream.output).into_owned()
}

#[test]
fn requests_on_one_connection_are_taken_in_turn_with_their_bodies() {
    let mut c = connection(
        b"PUT /machine-config HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
          Content-Length: 13\r\n\r\n{\"a\":1,\"b\":2}GET /?x=1 HTTP/1.1\r\n\r\n",
    );
    let first = c.next_request().unwrap();
    assert_eq!(
        first,
        Request { method: "PUT".into(), path: "/machine-config".into(), body: Some(b"{\"a\":1,\"b\":2}".to_vec()) }
    );
    assert!(c.respond(&Response::no_content()));
    let second = c.next_request().unwrap();
    assert_eq!(second, Request { method: "GET".into(), path: "/".into(), body: None });
    assert!(c.respond(&Response::ok("{}".into())));
    assert_eq!(c.next_request(), Err(ConnectionEnd::Closed));
    assert_eq!(
        output(&c),
        "HTTP/1.1 204 No Content\r\nServer: hvrun\r\n\r\n\
         HTTP/1.1 200 OK\r\nServer: hvrun\r\nContent-Type: application/json\r\nContent-Length: 2\r\n\r\n{}"
    );
}

#[test]
fn a_client_that_expects_100_continue_gets_it_and_connection_close_is_honoured() {
    let mut c =
        connection(b"PUT /vm HTTP/1.1\r\nExpect: 100-continue\r\nConnection: close\r\nContent-Length: 2\r\n\r\n");
    // The body has not come when the head is read: the client is told to send it (and
    // here it never does).
    assert_eq!(c.next_request(), Err(ConnectionEnd::Closed));
    assert_eq!(output(&c), "HTTP/1.1 100 Continue\r\n\r\n");

    let mut c = connection(b"GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    c.next_request().unwrap();
    assert!(!c.respond(&Response::ok("{}".into())), "the connection is to close");
    assert!(output(&c).contains("Connection: close\r\n"));
}

#[test]
fn oversized_malformed_and_chunked_requests_end_the_connection_with_firecrackers_statuses() {
    let refused = |bytes: &[u8]| match connection(bytes).next_request() {
        Err(ConnectionEnd::Refused(r)) => r,
        other => panic!("{other:?} for {}", String::from_utf8_lossy(bytes)),
    };
    let big = refused(b"PUT /drives/a HTTP/1.1\r\nContent-Length: 51201\r\n\r\n");
    assert_eq!(big.status, 413);
    assert_eq!(
        big.body.unwrap(),
        r#"{"fault_message":"Request payload with size 51201 is larger than the limit of 51200 allowed by server."}"#
    );
    assert_eq!(refused(b"PUT / HTTP/1.1\r\nContent-Length: -1\r\n\r\n").status, 400);
    assert_eq!(refused(b"PUT / HTTP/1.1\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n").status, 400);
    assert_eq!(refused(b"PUT / HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n").status, 501);
    assert_eq!(refused(b"GET\x00 / HTTP/1.1\r\n\r\n").status, 400);
    let mut many = b"GET / HTTP/1.1\r\n".to_vec();
    for i in 0..40 {
        many.extend_from_slice(format!("X-{i}: y\r\n").as_bytes());
    }
    many.extend_from_slice(b"\r\n");
    assert_eq!(refused(&many).status, 431);
    // A head that never ends is cut off at MAX_HEAD bytes, not buffered forever.
    let mut endless = b"GET / HTTP/1.1\r\nX: ".to_vec();
    endless.resize(3 * MAX_HEAD, b'a');
    assert_eq!(refused(&endless).status, 431);
}

#[test]
fn a_content_length_must_be_plain_digits_and_the_same_when_repeated() {
    let refused = |bytes: &[u8]| match connection(bytes).next_request() {
        Err(ConnectionEnd::Refused(r)) => r,
        other => panic!("{other:?} for {}", String::from_utf8_lossy(bytes)),
    };
    for head in [
        "Content-Length: 0\r\nContent-Length: 5",
        "Content-Length: 5\r\nContent-Length: 0",
        "Content-Length: +5",
        "Content-Length: 5 5",
        "Content-Length: 5,5",
        "Content-Length: 0x5",
        "Content-Length: ",
        "Content-Length: \u{a0}5",
        "Content-Length: 99999999999999999999999999",
        "Content-Length: 5\r\nTransfer-Encoding: chunked",
        "Transfer-Encoding: chunked\r\nContent-Length: 5",
        "Transfer-Encoding: identity\r\nContent-Length: 5",
    ] {
        let request = format!("PUT /vm HTTP/1.1\r\n{head}\r\n\r\nhello");
        let response = refused(request.as_bytes());
        assert_eq!(response.status, 400, "{head:?}");
        assert!(response.body.unwrap().starts_with(r#"{"fault_message":""#), "{head:?}");
    }
    // The same length twice is one length; spaces around it are not part of it.
    for head in ["Content-Length: 5\r\nContent-Length: 5", "Content-Length:  005\t"] {
        let request = format!("PUT /vm HTTP/1.1\r\n{head}\r\n\r\nhello");
        assert_eq!(connection(request.as_bytes()).next_request().unwrap().body.unwrap(), b"hello", "{head:?}");
    }
}

#[test]
fn a_client_gone_mid_request_is_a_closed_connection() {
    assert_eq!(connection(b"").next_request(), Err(ConnectionEnd::Closed));
    assert_eq!(connection(b"PUT /vm HTT").next_request(), Err(ConnectionEnd::Closed));
    assert_eq!(
        connection(b"PUT /vm HTTP/1.1\r\nContent-Length: 9\r\n\r\n{}").next_request(),
        Err(ConnectionEnd::Closed)
    );
}

proptest! {
    /// Whatever a client sends, the connection answers or ends, and never holds more
    /// than a head's and a body's worth of it.
    #[test]
    fn arbitrary_bytes_never_panic_and_stay_bounded(bytes in proptest::collection::vec(any::<u8>(), 0..20_000)) {
        let mut c = connection(&bytes);
        for _ in 0..64 {
            let taken = c.next_request();
            prop_assert!(c.buf.len() <= MAX_HEAD + DEFAULT_MAX_BODY);
            match taken {
                Ok(request) => {
                    prop_assert!(request.body.map_or(0, |b| b.len()) <= DEFAULT_MAX_BODY);
                    if !c.respond(&Response::no_content()) { break; }
                }
                Err(_) => break,
            }
        }
    }

    /// Well-formed requests with arbitrary paths and bodies come out as they went in.
    #[test]
    fn well_formed_requests_round_trip(path in "/[a-z0-9/_-]{0,40}", body in proptest::collection::vec(any::<u8>(), 1..2000)) {
        let mut bytes = format!("PATCH {path} HTTP/1.1\r\nContent-Length: {}\r\n\r\n", body.len()).into_bytes();
        bytes.extend_from_slice(&body);
        let request = connection(&bytes).next_request().unwrap();
        prop_assert_eq!(request, Request { method: "PATCH".into(), path, body: Some(body) });
    }
}

/// A short time limit on a request, for the tests that wait for it.
fn short(request_ms: u64) -> Limits {
    Limits { request_timeout: Duration::from_millis(request_ms), ..Limits::default() }
}

fn over_a_socket(limits: Limits) -> (Connection<UnixStream>, UnixStream) {
    let (ours, client) = UnixStream::pair().unwrap();
    (Connection::new(ours, limits), client)
}

fn status(end: Result<Request, ConnectionEnd>) -> u16 {
    match end {
        Err(ConnectionEnd::Refused(response)) => {
            assert!(response.body.as_deref().unwrap().starts_with(r#"{"fault_message":""#), "{response:?}");
            response.status
        }
        other => panic!("{other:?}"),
    }
}

/// A connection silent between requests used to be closed after 30 s; Firecracker's
/// clients keep idle connections for their next request, and it never closes them.
#[test]
fn a_connection_silent_before_a_request_waits_for_it_as_long_as_it_takes() {
    let (mut c, mut client) = over_a_socket(short(50));
    let writer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(300));
        client.write_all(b"GET /version HTTP/1.1\r\n\r\n").unwrap();
        client
    });
    assert_eq!(c.next_request().unwrap().path, "/version", "no time limit before a request's first byte");
    drop(writer.join().unwrap());
    assert_eq!(c.next_request(), Err(ConnectionEnd::Closed));
}

#[test]
fn a_request_not_whole_within_its_time_gets_408() {
    // Part of a head, part of a body.
    for sent in [&b"GET / HT"[..], b"PUT /vm HTTP/1.1\r\nContent-Length: 9\r\n\r\n{}"] {
        let (mut c, mut client) = over_a_socket(short(50));
        client.write_all(sent).unwrap();
        let start = Instant::now();
        assert_eq!(status(c.next_request()), 408);
        assert!(start.elapsed() < Duration::from_secs(5), "the request's time runs from its first byte");
        c.refuse(&Response::fault(408, "late"));
        let mut answer = vec![0u8; 4096];
        let n = client.read(&mut answer).unwrap();
        assert!(answer[..n].starts_with(b"HTTP/1.1 408 Request Timeout\r\n"), "{}", String::from_utf8_lossy(&answer));
    }
}

/// A client that sends a byte now and then never waits a read out: the request's time
/// still runs from its first byte.
#[test]
fn a_request_trickling_in_gets_408_when_its_time_is_up() {
    let (mut c, mut client) = over_a_socket(short(100));
    let writer = std::thread::spawn(move || {
        for byte in
            b"GET / HTTP/1.1\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa"
        {
            if client.write_all(&[*byte]).is_err() {
                return;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    });
    assert_eq!(status(c.next_request()), 408);
    drop(c);
    writer.join().unwrap();
}

/// Time between requests is not the request's: waiting longer than a request may take
/// is no fault. A pipelined request gets its own time. (The request's time is 1 s: a
/// pipelined request's few microseconds must never reach it, even on a loaded machine.)
#[test]
fn waiting_between_requests_is_not_a_late_request() {
    let limits = short(1000);
    let (mut c, mut client) = over_a_socket(limits);
    for _ in 0..2 {
        std::thread::sleep(limits.request_timeout + Duration::from_millis(200));
        client.write_all(b"GET / HTTP/1.1\r\n\r\nGET /version HTTP/1.1\r\n").unwrap();
        assert_eq!(c.next_request().unwrap().path, "/");
        assert!(c.respond(&Response::no_content()));
        client.write_all(b"\r\n").unwrap();
        assert_eq!(c.next_request().unwrap().path, "/version");
        assert!(c.respond(&Response::no_content()));
    }
    // A pipelined request that never ends is late like any other.
    client.write_all(b"GET / HTTP/1.1\r\n\r\nGET /").unwrap();
    assert_eq!(c.next_request().unwrap().path, "/");
    assert!(c.respond(&Response::no_content()));
    let start = Instant::now();
    assert_eq!(status(c.next_request()), 408);
    assert!(start.elapsed() >= limits.request_timeout / 2, "its whole time: {:?}", start.elapsed());
    assert!(start.elapsed() < Duration::from_secs(5), "the request's time: {:?}", start.elapsed());
}

//! The server over a real unix socket: silent clients, clients gone mid-request and
//! too many clients leave the API serving the others; idle clients stay connected
//! until a newcomer needs their place.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use super::*;

fn socket(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hvrun-api-{name}-{}.sock", std::process::id()))
}

/// One request on a new connection; the status line and the body. A client refused for
/// want of room is answered and closed after at most 100 ms, perhaps before it wrote (the
/// write fails) or with its request unread (the read ends in a reset after the answer):
/// the answer is what it read, an error noted after it.
fn get(path: &std::path::Path, request: &str) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let written = stream.write_all(request.as_bytes());
    let mut answer = Vec::new();
    let read = stream.read_to_end(&mut answer);
    let mut answer = String::from_utf8(answer).unwrap();
    if let Err(e) = written.and(read.map(drop)) {
        answer.push_str(&format!("\n(then: {e})"));
    }
    answer
}

#[test]
fn silent_and_vanishing_clients_do_not_stop_the_others() {
    let path = socket("silent");
    let (api, _) = router::tests::new_api();
    let _server = ApiServer::bind(&path).unwrap().serve(api, Limits::default()).unwrap();
    // One client says nothing; another leaves in the middle of a request's body.
    let _silent = UnixStream::connect(&path).unwrap();
    let mut gone = UnixStream::connect(&path).unwrap();
    gone.write_all(b"PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu").unwrap();
    drop(gone);
    let answer = get(&path, "GET / HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n"), "{answer}");
    assert!(answer.ends_with(r#""state":"Not started","vmm_version":"0.1.0"}"#), "{answer}");
    // The half-sent PUT changed nothing.
    let config = get(&path, "GET /machine-config HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(
        config.ends_with(r#"{"vcpu_count":1,"mem_size_mib":128,"smt":false,"track_dirty_pages":false}"#),
        "{config}"
    );
    // A body over the limit is refused with 413 and the connection closed.
    let mut body = "PUT /drives/a HTTP/1.1\r\nContent-Length: 99999\r\n\r\n".to_string();
    body.push_str(&"x".repeat(99_999));
    let big = get(&path, &body);
    assert!(big.starts_with("HTTP/1.1 413 Payload Too Large\r\n"), "{big}");
}

/// A client that has sent part of a request head (so is not idle).
/// (A client the server refused, and closed before it wrote, fails its write: it has then
/// ended.)
fn mid_request(path: &std::path::Path) -> UnixStream {
    let mut stream = UnixStream::connect(path).unwrap();
    let _ = stream.write_all(b"GET /version HT");
    stream
}

/// With every place taken by a client in the middle of a request, there is no idle one
/// to close for a newcomer: it gets 503.
#[test]
fn when_every_client_is_mid_request_a_newcomer_gets_503_and_the_socket_file_goes_with_the_server() {
    let path = socket("many");
    let (api, _) = router::tests::new_api();
    let server = ApiServer::bind(&path).unwrap().serve(api, Limits::default()).unwrap();
    let mut held: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| mid_request(&path)).collect();
    // A held client whose first bytes its thread has not read yet is idle: a newcomer
    // then takes its place. It is replaced, and another newcomer tried.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        let answer = get(&path, "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
        if answer.starts_with("HTTP/1.1 503") || Instant::now() > deadline {
            break answer;
        }
        for client in &mut held {
            if crate::testing::ended(client) {
                *client = mid_request(&path);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(refused.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{refused}");
    assert!(refused.contains("Too many API connections."), "{refused}");
    assert!(!held.iter().any(crate::testing::ended), "no client in the middle of a request is closed");
    drop(held);
    // Their threads end as they close: a client is served again.
    assert_served_again(&path);
    drop(server);
    assert!(!path.exists());
}

/// Waits (up to 10 s: the closed clients' threads may wait for a CPU) until a client of
/// the server at `path` is served again.
fn assert_served_again(path: &std::path::Path) {
    let mut answer = String::new();
    for _ in 0..500 {
        answer = get(path, "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(answer.contains("firecracker_version"), "{answer}");
}

/// A short time limit on a request, for the tests that wait for it.
fn short(request_ms: u64) -> Limits {
    Limits { request_timeout: Duration::from_millis(request_ms), ..Limits::default() }
}

/// One response on a connection that stays open: its head and its body.
fn exchange(stream: &mut UnixStream, request: &str) -> String {
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let mut byte = [0u8; 1];
    while !answer.ends_with(b"\r\n\r\n") {
        assert_eq!(stream.read(&mut byte).unwrap(), 1, "closed: {}", String::from_utf8_lossy(&answer));
        answer.push(byte[0]);
    }
    let head = String::from_utf8(answer).unwrap();
    let length =
        head.lines().find_map(|line| line.strip_prefix("Content-Length: ")).map_or(0, |n| n.parse::<usize>().unwrap());
    let mut body = vec![0u8; length];
    stream.read_exact(&mut body).unwrap();
    head + &String::from_utf8(body).unwrap()
}

/// MAX_CLIENTS clients that connected and said nothing used to lock every other client
/// out (503) for as long as they stayed; then they were closed after 30 s of silence,
/// and so were the idle keep-alive connections Firecracker's clients keep. Now a
/// newcomer takes the place of the one idle longest, at once.
#[test]
fn a_newcomer_past_the_limit_takes_the_place_of_the_client_idle_longest() {
    let path = socket("idle");
    let (api, _) = router::tests::new_api();
    let _server = ApiServer::bind(&path).unwrap().serve(api, Limits::default()).unwrap();
    // Accepted in turn: the first is idle longest.
    let mut silent: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&path).unwrap()).collect();
    let answer = get(&path, "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.contains("firecracker_version"), "{answer}");
    // The first was closed without a word; the others are served as they ask.
    let mut first = silent.remove(0);
    first.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut said = String::new();
    first.read_to_string(&mut said).unwrap();
    assert_eq!(said, "");
    let last = silent.last_mut().unwrap();
    assert!(exchange(last, "GET /version HTTP/1.1\r\n\r\n").contains("firecracker_version"));
}

/// An idle keep-alive connection (a Firecracker SDK's pooled one) stays open while the
/// server has room: its next request, longer after the last than a request may take,
/// is answered on it.
#[test]
fn an_idle_keep_alive_client_stays_connected_while_there_is_room() {
    let path = socket("keep");
    let (api, _) = router::tests::new_api();
    let _server = ApiServer::bind(&path).unwrap().serve(api, short(100)).unwrap();
    let mut client = UnixStream::connect(&path).unwrap();
    assert!(exchange(&mut client, "GET /version HTTP/1.1\r\n\r\n").starts_with("HTTP/1.1 200 OK\r\n"));
    std::thread::sleep(Duration::from_millis(1200));
    let answer = exchange(&mut client, "GET /version HTTP/1.1\r\n\r\n");
    assert!(answer.starts_with("HTTP/1.1 200 OK\r\n") && answer.contains("firecracker_version"), "{answer}");
}

#[test]
fn a_request_not_whole_in_time_is_answered_408_and_the_connection_closed() {
    let path = socket("late");
    let (api, _) = router::tests::new_api();
    let _server = ApiServer::bind(&path).unwrap().serve(api, short(50)).unwrap();
    let answer = get(&path, "PUT /machine-config HTTP/1.1\r\nContent-Length: 100\r\n\r\n{\"vcpu");
    assert!(answer.starts_with("HTTP/1.1 408 Request Timeout\r\n"), "{answer}");
    assert!(answer.contains("Connection: close\r\n"), "{answer}");
    assert!(answer.contains(r#"{"fault_message":"The request did not arrive whole within"#), "{answer}");
}

/// A second hvrun on the same path used to remove the first one's socket and serve there
/// in its place.
#[test]
fn a_second_server_on_a_live_socket_is_refused_and_the_first_serves_on() {
    let path = socket("twice");
    let (api, _) = router::tests::new_api();
    let first = ApiServer::bind(&path).unwrap().serve(api, Limits::default()).unwrap();
    let e = ApiServer::bind(&path).unwrap_err().to_string();
    assert_eq!(e, format!("--api-sock {}: in use by another process; stop it or choose another path", path.display()));
    let answer = get(&path, "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
    assert!(answer.contains("firecracker_version"), "{answer}");
    drop(first);
    assert!(!path.exists());
}

//! The server over a real unix socket: silent clients, clients gone mid-request and
//! too many clients leave the API serving the others.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::time::Duration;

use super::*;

fn socket(name: &str) -> std::path::PathBuf {
    std::env::temp_dir().join(format!("hvrun-api-{name}-{}.sock", std::process::id()))
}

/// One request on a new connection; the status line and the body.
fn get(path: &std::path::Path, request: &str) -> String {
    let mut stream = UnixStream::connect(path).unwrap();
    stream.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    stream.write_all(request.as_bytes()).unwrap();
    let mut answer = String::new();
    stream.read_to_string(&mut answer).unwrap();
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

#[test]
fn clients_past_the_limit_get_503_and_the_socket_file_goes_with_the_server() {
    let path = socket("many");
    let (api, _) = router::tests::new_api();
    let server = ApiServer::bind(&path).unwrap().serve(api, Limits::default()).unwrap();
    let held: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&path).unwrap()).collect();
    // The accept thread counts them as it takes them: wait until one more is refused.
    let mut refused = String::new();
    for _ in 0..100 {
        refused = get(&path, "GET / HTTP/1.1\r\n\r\n");
        if refused.starts_with("HTTP/1.1 503") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(refused.starts_with("HTTP/1.1 503 Service Unavailable\r\n"), "{refused}");
    assert!(refused.contains("Too many API connections."), "{refused}");
    drop(held);
    // Their threads end as they close: a client is served again.
    assert_served_again(&path);
    drop(server);
    assert!(!path.exists());
}

/// Waits (up to 2 s) until a client of the server at `path` is served again.
fn assert_served_again(path: &std::path::Path) {
    let mut answer = String::new();
    for _ in 0..100 {
        answer = get(path, "GET /version HTTP/1.1\r\nConnection: close\r\n\r\n");
        if answer.starts_with("HTTP/1.1 200") {
            break;
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    assert!(answer.contains("firecracker_version"), "{answer}");
}

/// Short limits, for the tests that wait for them.
fn short(idle_ms: u64, request_ms: u64) -> Limits {
    Limits {
        idle_timeout: Duration::from_millis(idle_ms),
        request_timeout: Duration::from_millis(request_ms),
        ..Limits::default()
    }
}

/// MAX_CLIENTS clients that connected and said nothing used to lock every other client
/// out (503) for as long as they stayed.
#[test]
fn silent_clients_are_dropped_after_the_idle_timeout_and_others_are_served() {
    let path = socket("idle");
    let (api, _) = router::tests::new_api();
    let _server = ApiServer::bind(&path).unwrap().serve(api, short(300, 100)).unwrap();
    let silent: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&path).unwrap()).collect();
    // Each is closed after the idle time, without a word.
    for mut client in silent {
        client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut answer = String::new();
        client.read_to_string(&mut answer).unwrap();
        assert_eq!(answer, "");
    }
    assert_served_again(&path);
}

#[test]
fn a_request_not_whole_in_time_is_answered_408_and_the_connection_closed() {
    let path = socket("late");
    let (api, _) = router::tests::new_api();
    let _server = ApiServer::bind(&path).unwrap().serve(api, short(10_000, 50)).unwrap();
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

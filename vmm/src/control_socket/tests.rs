use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

/// A VM stand-in that counts what it was asked.
#[derive(Default)]
struct Fake {
    paused: AtomicBool,
    stops: AtomicUsize,
    refuse_pause: bool,
}

impl Controls for Arc<Fake> {
    fn pause(&self) -> Result<(), String> {
        if self.refuse_pause {
            return Err("a vCPU did not come out".into());
        }
        self.paused.store(true, Ordering::SeqCst);
        Ok(())
    }
    fn resume(&self) {
        self.paused.store(false, Ordering::SeqCst);
    }
    fn paused(&self) -> bool {
        self.paused.load(Ordering::SeqCst)
    }
    fn stop(&self) {
        self.stops.fetch_add(1, Ordering::SeqCst);
    }
    fn snapshot(&self, dir: &Path) -> Result<(), String> {
        Err(format!("no snapshot to {}", dir.display()))
    }
}

fn json(s: &str) -> serde_json::Value {
    serde_json::from_str(s).unwrap()
}

#[test]
fn each_command_acts_and_answers_in_one_json_line() {
    let fake = Arc::new(Fake::default());
    assert_eq!(answer(&fake, r#"{"command":"pause"}"#), r#"{"ok":true}"#);
    assert_eq!(answer(&fake, r#" {"command": "status"} "#), r#"{"ok":true,"paused":true}"#);
    assert_eq!(json(&answer(&fake, r#"{"command":"resume"}"#)), json(r#"{"ok":true}"#));
    assert!(!fake.paused.load(Ordering::SeqCst));
    assert_eq!(json(&answer(&fake, r#"{"command":"stop"}"#)), json(r#"{"ok":true}"#));
    assert_eq!(fake.stops.load(Ordering::SeqCst), 1);
    let snap = answer(&fake, r#"{"command":"snapshot","dir":"/tmp/s"}"#);
    assert_eq!(snap, r#"{"ok":false,"error":"no snapshot to /tmp/s"}"#, "ok first, then the error");
    let refusing = Arc::new(Fake { refuse_pause: true, ..Fake::default() });
    assert_eq!(json(&answer(&refusing, r#"{"command":"pause"}"#))["error"], "a vCPU did not come out");
}

#[test]
fn malformed_or_unknown_commands_are_errors_that_change_nothing() {
    let fake = Arc::new(Fake::default());
    for line in [
        "",
        "pause",
        "{",
        "null",
        r#"{"command":"reboot"}"#,
        r#"{"command":"pause","now":true}"#,
        r#"{"command":"snapshot"}"#,
        r#"{"command":"snapshot","dir":7}"#,
        r#"{"cmd":"pause"}"#,
        "\u{0}\u{1}",
    ] {
        let reply = json(&answer(&fake, line));
        assert_eq!(reply["ok"], false, "{line:?} -> {reply}");
        assert!(reply["error"].as_str().unwrap().starts_with("bad command"), "{line:?} -> {reply}");
    }
    assert!(!fake.paused.load(Ordering::SeqCst) && fake.stops.load(Ordering::SeqCst) == 0);
}

#[test]
fn the_socket_serves_clients_line_by_line_and_drops_overlong_lines() {
    let path = std::env::temp_dir().join(format!("hvrun-test-{}-control.sock", std::process::id()));
    // A stale socket file is replaced; a regular file is refused.
    std::fs::write(&path, b"not a socket").unwrap();
    let e = ControlSocket::bind(&path).unwrap_err().to_string();
    assert!(e.starts_with("--control ") && e.contains("exists and is not a socket"), "{e}");
    std::fs::remove_file(&path).unwrap();
    drop(std::os::unix::net::UnixListener::bind(&path).unwrap());
    let fake = Arc::new(Fake::default());
    let server = ControlSocket::bind(&path).unwrap().serve(Arc::clone(&fake));

    let mut client = UnixStream::connect(&path).unwrap();
    let mut replies = BufReader::new(client.try_clone().unwrap());
    let mut reply = String::new();
    client.write_all(b"{\"command\":\"pause\"}\n\n{\"command\":\"status\"}\n").unwrap();
    replies.read_line(&mut reply).unwrap();
    assert_eq!(json(&reply), json(r#"{"ok":true}"#));
    reply.clear();
    replies.read_line(&mut reply).unwrap();
    assert_eq!(json(&reply), json(r#"{"ok":true,"paused":true}"#), "the blank line is skipped");

    // A second client at the same time.
    let mut other = UnixStream::connect(&path).unwrap();
    other.write_all(b"{\"command\":\"resume\"}\n").unwrap();
    reply.clear();
    BufReader::new(other.try_clone().unwrap()).read_line(&mut reply).unwrap();
    assert_eq!(json(&reply), json(r#"{"ok":true}"#));
    assert!(!fake.paused.load(Ordering::SeqCst));

    // An overlong line gets one error and the connection ends.
    client.write_all(&vec![b'x'; MAX_LINE + 10]).unwrap();
    reply.clear();
    replies.read_line(&mut reply).unwrap();
    assert!(json(&reply)["error"].as_str().unwrap().contains("at most"), "{reply}");
    reply.clear();
    // Closed: the end of the stream, or a reset for the bytes it never read.
    assert!(!matches!(replies.read_line(&mut reply), Ok(n) if n > 0), "{reply}");

    drop(server);
    assert!(!path.exists(), "the socket file goes with the server");
}

/// A line from the server ("" when it closed the connection); no answer in 10 s fails.
fn read_reply(client: &UnixStream) -> String {
    client.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut reply = String::new();
    match BufReader::new(client).read_line(&mut reply) {
        Err(e) if matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut) => {
            panic!("no answer: {e}")
        }
        _ => reply,
    }
}

fn control_path(name: &str) -> std::path::PathBuf {
    let path = std::env::temp_dir().join(format!("hvrun-test-{}-control-{name}.sock", std::process::id()));
    let _ = std::fs::remove_file(&path);
    path
}

fn status(client: &mut UnixStream) -> String {
    client.write_all(b"{\"command\":\"status\"}\n").unwrap();
    read_reply(client)
}

/// MAX_CLIENTS clients that connected and said nothing used to keep every other client
/// out for as long as they liked; then they were closed after 30 s of silence, and so
/// was a supervisor's one connection, kept open between commands. Now a newcomer takes
/// the place of the one silent longest, at once.
#[test]
fn a_newcomer_past_the_limit_takes_the_place_of_the_client_silent_longest() {
    let path = control_path("idle");
    let _server = ControlSocket::bind(&path).unwrap().serve(Arc::new(Fake::default()));
    // Accepted in turn: the first is silent longest.
    let mut silent: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| UnixStream::connect(&path).unwrap()).collect();
    assert_eq!(json(&status(&mut UnixStream::connect(&path).unwrap())), json(r#"{"ok":true,"paused":false}"#));
    assert_eq!(read_reply(&silent[0]), "", "closed without a word");
    assert_eq!(json(&status(&mut silent[MAX_CLIENTS - 1])), json(r#"{"ok":true,"paused":false}"#));
}

/// A client silent between lines (a supervisor's one connection) stays connected while
/// there is room, however long it waits: longer than a line may take here.
#[test]
fn a_client_silent_between_lines_stays_connected_while_there_is_room() {
    let path = control_path("keep");
    let _server = ControlSocket::bind(&path)
        .unwrap()
        .with_line_timeout(Duration::from_millis(100))
        .serve(Arc::new(Fake::default()));
    let mut client = UnixStream::connect(&path).unwrap();
    assert_eq!(json(&status(&mut client)), json(r#"{"ok":true,"paused":false}"#));
    std::thread::sleep(Duration::from_millis(1200));
    assert_eq!(json(&status(&mut client)), json(r#"{"ok":true,"paused":false}"#));
}

/// A client that has sent part of a command line (so is not idle). (A client the server
/// refused, and closed before it wrote, fails its write: it has then ended.)
fn mid_line(path: &Path) -> UnixStream {
    let mut stream = UnixStream::connect(path).unwrap();
    let _ = stream.write_all(b"{\"command\":");
    stream
}

/// With every place taken by a client in the middle of a line, there is no idle one to
/// close for a newcomer: it is answered an error.
#[test]
fn when_every_client_is_mid_line_a_newcomer_is_refused() {
    let path = control_path("full");
    let _server = ControlSocket::bind(&path).unwrap().serve(Arc::new(Fake::default()));
    let mut held: Vec<UnixStream> = (0..MAX_CLIENTS).map(|_| mid_line(&path)).collect();
    // A held client whose first bytes its thread has not read yet is idle: a newcomer
    // then takes its place. It is replaced, and another newcomer tried.
    let deadline = Instant::now() + Duration::from_secs(20);
    let refused = loop {
        // A refused newcomer is answered and closed at once, maybe before it writes: its
        // write then fails (EPIPE), and the answer is read all the same.
        let mut newcomer = UnixStream::connect(&path).unwrap();
        let _ = newcomer.write_all(b"{\"command\":\"status\"}\n");
        let answer = read_reply(&newcomer);
        if answer.contains("too many control clients") || Instant::now() > deadline {
            break answer;
        }
        for client in &mut held {
            if crate::testing::ended(client) {
                *client = mid_line(&path);
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    assert_eq!(json(&refused), json(r#"{"ok":false,"error":"too many control clients"}"#));
    assert!(!held.iter().any(crate::testing::ended), "no client in the middle of a line is closed");
    // The held clients' lines, finished, are answered.
    for client in &mut held {
        client.write_all(b"\"status\"}\n").unwrap();
        assert_eq!(json(&read_reply(client)), json(r#"{"ok":true,"paused":false}"#));
    }
}

#[test]
fn a_line_not_whole_in_time_gets_an_error_and_waiting_between_lines_is_no_fault() {
    let path = control_path("late");
    let line = Duration::from_millis(50);
    let _server = ControlSocket::bind(&path).unwrap().with_line_timeout(line).serve(Arc::new(Fake::default()));
    let mut late = UnixStream::connect(&path).unwrap();
    let start = Instant::now();
    late.write_all(b"{\"command\":").unwrap();
    let reply = read_reply(&late);
    assert!(json(&reply)["error"].as_str().unwrap().contains("whole within"), "{reply}");
    assert!(start.elapsed() < Duration::from_secs(5), "the line's time, not the idle time");
    assert_eq!(read_reply(&late), "");
    // A line trickling in byte by byte is late all the same.
    let mut slow = UnixStream::connect(&path).unwrap();
    let start = Instant::now();
    for byte in b"{\"command\":\"status\"}" {
        if slow.write_all(&[*byte]).is_err() {
            break;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    let reply = read_reply(&slow);
    assert!(json(&reply)["error"].as_str().unwrap().contains("whole within"), "{reply}");
    assert!(start.elapsed() < Duration::from_secs(5));
    // A command sent whole after a wait longer than a line's time is answered.
    let mut patient = UnixStream::connect(&path).unwrap();
    std::thread::sleep(2 * line);
    assert_eq!(json(&status(&mut patient)), json(r#"{"ok":true,"paused":false}"#));
    std::thread::sleep(2 * line);
    assert_eq!(json(&status(&mut patient)), json(r#"{"ok":true,"paused":false}"#));
}

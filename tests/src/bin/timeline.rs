//! `timeline TAG COMMAND [ARGS…]`: runs COMMAND and prints each line of its standard
//! output and standard error as it arrives, after the milliseconds since COMMAND was
//! started: `TIMELINE TAG +12.345 out|err LINE`; at the end `TIMELINE TAG +56.789 exit
//! CODE` (the moment the process ended; CODE is 128 + the signal when one ended it).
//! Exits with COMMAND's code. `cargo xtask compare` times hvrun's own start and teardown
//! with it in the rig, whose `/proc/uptime` counts in 10 ms steps.

use std::io::{BufRead, BufReader, Read};
use std::process::{Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::Instant;

/// What the threads report.
enum Event {
    Line { at: Instant, stream: &'static str, text: String },
    Exit { at: Instant, code: i32 },
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let [tag, program, rest @ ..] = args.as_slice() else {
        eprintln!("usage: timeline TAG COMMAND [ARGS...]");
        return ExitCode::from(2);
    };
    let start = Instant::now();
    let mut child = match Command::new(program).args(rest).stdout(Stdio::piped()).stderr(Stdio::piped()).spawn() {
        Ok(child) => child,
        Err(e) => {
            eprintln!("timeline: cannot run {program}: {e}");
            return ExitCode::from(127);
        }
    };
    let (tx, rx) = mpsc::channel();
    let streams: [(&'static str, Option<Box<dyn Read + Send>>); 2] = [
        ("out", child.stdout.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
        ("err", child.stderr.take().map(|s| Box::new(s) as Box<dyn Read + Send>)),
    ];
    for (stream, reader) in streams {
        let Some(reader) = reader else { continue };
        let tx = tx.clone();
        std::thread::spawn(move || {
            for text in BufReader::new(reader).split(b'\n').map_while(Result::ok) {
                let at = Instant::now();
                let text = String::from_utf8_lossy(&text).trim_end_matches('\r').to_string();
                if tx.send(Event::Line { at, stream, text }).is_err() {
                    break;
                }
            }
        });
    }
    std::thread::spawn(move || {
        let code = match child.wait() {
            Ok(status) => status.code().unwrap_or_else(|| 128 + signal(&status)),
            Err(_) => 127,
        };
        let _ = tx.send(Event::Exit { at: Instant::now(), code });
    });
    let ms = |at: Instant| at.duration_since(start).as_secs_f64() * 1000.0;
    // Lines written just before the exit may be read after it: after the exit, the lines
    // still coming are taken until the pipes close, or for a second (a grandchild may
    // hold them); the exit's line comes last.
    let mut exit = None;
    loop {
        let event = match exit {
            None => rx.recv().ok(),
            Some(_) => rx.recv_timeout(std::time::Duration::from_secs(1)).ok(),
        };
        match event {
            Some(Event::Line { at, stream, text }) => println!("TIMELINE {tag} +{:.3} {stream} {text}", ms(at)),
            Some(Event::Exit { at, code }) => exit = Some((at, code)),
            None => break,
        }
    }
    let Some((at, code)) = exit else { return ExitCode::from(1) };
    println!("TIMELINE {tag} +{:.3} exit {code}", ms(at));
    ExitCode::from(u8::try_from(code).unwrap_or(1))
}

#[cfg(unix)]
fn signal(status: &std::process::ExitStatus) -> i32 {
    std::os::unix::process::ExitStatusExt::signal(status).unwrap_or(0)
}

#[cfg(not(unix))]
fn signal(_: &std::process::ExitStatus) -> i32 {
    0
}

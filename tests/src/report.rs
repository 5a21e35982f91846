//! Reading the rig's console log: split it into scenarios, check each one's markers.
//!
//! The rig's init prints `E2E-BEGIN name` before a scenario and
//! `E2E-END name rc=N start=S end=E` after it (S and E from the rig's /proc/uptime);
//! everything in between is the scenario's output.

use std::time::Duration;

use crate::scenario::Scenario;

/// One console line and when the host received it (since QEMU started).
#[derive(Debug, Clone, PartialEq)]
pub struct Line {
    /// Host time since the rig started.
    pub at: Duration,
    /// The text, without the line ending.
    pub text: String,
}

/// The outcome of one scenario.
#[derive(Debug, Clone, PartialEq)]
pub struct Outcome {
    /// The scenario's name.
    pub name: String,
    /// Everything that went wrong; empty when it passed.
    pub failures: Vec<String>,
    /// Seconds the scenario took, measured inside the rig.
    pub rig_secs: Option<f64>,
    /// Seconds the scenario took, measured on the host from console timestamps.
    pub host_secs: Option<f64>,
    /// The scenario's console output.
    pub output: Vec<String>,
}

impl Outcome {
    /// Whether the scenario passed.
    pub fn passed(&self) -> bool {
        self.failures.is_empty()
    }

    /// For a failed scenario whose output shows a crash inside a guest, the first sign of
    /// it found ([`GUEST_CRASH_SIGNS`]).
    pub fn guest_crash(&self) -> Option<&'static str> {
        if self.passed() {
            return None;
        }
        GUEST_CRASH_SIGNS.iter().copied().find(|sign| self.output.iter().any(|line| line.contains(sign)))
    }
}

/// What a guest prints when it crashed rather than when hvrun did something wrong that
/// a scenario checks: a guest process killed by SIGSEGV (busybox's shell says so), its
/// init killed, a CPU of its kernel stalled. Rarely, and only in this nested rig, a guest
/// crashes so at boot or just after a restore: about 1 in 400 cold boots, with and without
/// hvrun's devices in use, with 1 and 2 vCPUs, never traced to hvrun; a loop of 737
/// restores of a 2-vCPU 2 GiB guest had none. A scenario that fails with one of these is
/// run once more in a fresh rig ([`to_run_again`]).
pub const GUEST_CRASH_SIGNS: &[&str] = &["Segmentation fault", "Attempted to kill init!", "self-detected stall on CPU"];

/// The most scenarios run once more after a guest crash: more than that in one run is
/// not the rare crash [`GUEST_CRASH_SIGNS`] describes, and they all stay failed.
pub const MAX_RUN_AGAIN: usize = 2;

/// The failed scenarios to run once more, with the sign of their guest's crash: those
/// whose output shows one, when there are at most [`MAX_RUN_AGAIN`] of them; none
/// otherwise.
pub fn to_run_again(outcomes: &[Outcome]) -> Vec<(&str, &'static str)> {
    let crashed: Vec<(&str, &'static str)> =
        outcomes.iter().filter_map(|o| o.guest_crash().map(|sign| (o.name.as_str(), sign))).collect();
    if crashed.len() > MAX_RUN_AGAIN {
        return Vec::new();
    }
    crashed
}

fn end_fields(rest: &str) -> (Option<i32>, Option<f64>, Option<f64>) {
    let field = |key: &str| rest.split_whitespace().find_map(|w| w.strip_prefix(key));
    (
        field("rc=").and_then(|v| v.parse().ok()),
        field("start=").and_then(|v| v.parse().ok()),
        field("end=").and_then(|v| v.parse().ok()),
    )
}

/// Checks `scenario` against the console `lines`.
pub fn check(scenario: &Scenario, lines: &[Line]) -> Outcome {
    let begin_marker = format!("E2E-BEGIN {}", scenario.name);
    let end_prefix = format!("E2E-END {} ", scenario.name);
    let mut outcome = Outcome {
        name: scenario.name.to_string(),
        failures: Vec::new(),
        rig_secs: None,
        host_secs: None,
        output: Vec::new(),
    };

    let Some(begin) = lines.iter().position(|l| l.text.trim_end() == begin_marker) else {
        outcome.failures.push("never started (the rig died or stopped before it)".into());
        return outcome;
    };
    let end = lines[begin..].iter().position(|l| l.text.starts_with(&end_prefix)).map(|i| begin + i);
    let section = &lines[begin + 1..end.unwrap_or(lines.len())];
    outcome.output = section.iter().map(|l| l.text.clone()).collect();

    match end {
        None => {
            outcome.failures.push(format!("did not finish (killed after {} s, or the rig died)", scenario.timeout_secs))
        }
        Some(end) => {
            let (rc, start, stop) = end_fields(&lines[end].text[end_prefix.len()..]);
            outcome.host_secs = Some((lines[end].at.saturating_sub(lines[begin].at)).as_secs_f64());
            if let (Some(a), Some(b)) = (start, stop) {
                outcome.rig_secs = Some(b - a);
            }
            match rc {
                Some(rc) if rc == scenario.exit_code => {}
                Some(rc) => outcome.failures.push(format!("exited {rc}, expected {}", scenario.exit_code)),
                None => outcome.failures.push(format!("unreadable end marker: {}", lines[end].text)),
            }
        }
    }

    let mut from = 0;
    for marker in scenario.markers {
        match section[from..].iter().position(|l| l.text.contains(marker)) {
            Some(i) => from += i + 1,
            None if section.iter().any(|l| l.text.contains(marker)) => {
                outcome.failures.push(format!("marker `{marker}` appeared, but out of order"));
            }
            None => outcome.failures.push(format!("missing marker `{marker}`")),
        }
    }
    for bad in scenario.forbidden {
        if let Some(line) = section.iter().find(|l| l.text.contains(bad)) {
            outcome.failures.push(format!("forbidden `{bad}` appeared: {}", line.text.trim()));
        }
    }
    outcome
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::scenario::OuterGic;

    const SCENARIO: Scenario = Scenario {
        name: "demo",
        about: "test",
        artifacts: &[],
        script: "true",
        exit_code: 0,
        markers: &["first", "second"],
        forbidden: &["panicked"],
        timeout_secs: 10,
        exchange: None,
        outer_gic: OuterGic::V2,
    };

    fn lines(texts: &[&str]) -> Vec<Line> {
        texts
            .iter()
            .enumerate()
            .map(|(i, t)| Line { at: Duration::from_millis(100 * i as u64), text: t.to_string() })
            .collect()
    }

    #[test]
    fn passes_with_markers_in_order_and_reports_times() {
        let log =
            lines(&["boot noise", "E2E-BEGIN demo", "first", "x second y", "E2E-END demo rc=0 start=1.50 end=3.75"]);
        let o = check(&SCENARIO, &log);
        assert!(o.passed(), "{:?}", o.failures);
        assert_eq!(o.rig_secs, Some(2.25));
        assert_eq!(o.host_secs, Some(0.3));
        assert_eq!(o.output, vec!["first", "x second y"]);
    }

    #[test]
    fn a_missing_marker_fails_and_is_named() {
        let log = lines(&["E2E-BEGIN demo", "first", "E2E-END demo rc=0 start=0 end=1"]);
        let o = check(&SCENARIO, &log);
        assert_eq!(o.failures, vec!["missing marker `second`"]);
    }

    #[test]
    fn markers_outside_the_section_do_not_count() {
        let log = lines(&["first", "second", "E2E-BEGIN demo", "E2E-END demo rc=0 start=0 end=1", "second"]);
        let o = check(&SCENARIO, &log);
        assert_eq!(o.failures, vec!["missing marker `first`", "missing marker `second`"]);
    }

    #[test]
    fn out_of_order_wrong_exit_forbidden_text_and_no_end() {
        let log =
            lines(&["E2E-BEGIN demo", "second", "first", "thread 'x' panicked", "E2E-END demo rc=1 start=0 end=1"]);
        let o = check(&SCENARIO, &log);
        assert_eq!(
            o.failures,
            vec![
                "exited 1, expected 0",
                "marker `second` appeared, but out of order",
                "forbidden `panicked` appeared: thread 'x' panicked"
            ]
        );
        let o = check(&SCENARIO, &lines(&["E2E-BEGIN demo", "first", "second"]));
        assert_eq!(o.failures, vec!["did not finish (killed after 10 s, or the rig died)"]);
        let o = check(&SCENARIO, &lines(&["nothing"]));
        assert!(!o.passed());
    }

    fn outcome(name: &str, failed: bool, output: &[&str]) -> Outcome {
        Outcome {
            name: name.into(),
            failures: if failed { vec!["missing marker `x`".into()] } else { Vec::new() },
            rig_secs: None,
            host_secs: None,
            output: output.iter().map(|l| l.to_string()).collect(),
        }
    }

    #[test]
    fn only_failed_scenarios_whose_guest_crashed_run_again_and_only_a_few() {
        let crashed = outcome("a", true, &["TIMELINE restore +486.9 out Segmentation faultrcu: INFO: stall"]);
        let plain = outcome("b", true, &["hvrun: error: no such file"]);
        let passed = outcome("c", false, &["Segmentation fault"]);
        let stalled = outcome("d", true, &["rcu: INFO: rcu_sched self-detected stall on CPU"]);
        assert_eq!(crashed.guest_crash(), Some("Segmentation fault"));
        assert_eq!(plain.guest_crash(), None, "a failure with no sign of a guest crash");
        assert_eq!(passed.guest_crash(), None, "a scenario that passed");
        let run = [crashed.clone(), plain, passed, stalled.clone()];
        assert_eq!(to_run_again(&run), vec![("a", "Segmentation fault"), ("d", "self-detected stall on CPU")]);
        let init = outcome("e", true, &["Kernel panic - not syncing: Attempted to kill init! exitcode=0x0000000b"]);
        assert!(to_run_again(&[crashed, stalled, init]).is_empty(), "three crashes in one run are no rare crash");
    }
}

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
}

//! Watching a machine on Virtualization.framework: what the watcher does next, given what
//! it has seen of the machine and what the host asked for. The framework layer feeds it
//! the machine's state, the completions of `start` and `stop`, and the machine
//! delegate's calls, and carries out the [`Action`]s; the rules live here, where they are
//! tested.
//!
//! The rules the framework imposes:
//! - The machine reads Stopped before `start` has begun (it starts asynchronously on its
//!   queue), so Stopped or Error ends the watch only once the start has completed or
//!   Running was seen; a start that fails reports the completion's error text.
//! - A stop asked for while the machine is still starting cannot be issued (the
//!   framework refuses `stop` then), so it waits for the start; the watch then waits for
//!   the stop to complete, so the machine is gone before its sockets and pipes are closed.
//! - The delegate tells a stop by the guest (`guestDidStopVirtualMachine:`) from a stop
//!   on an error (`virtualMachine:didStopWithError:`, with the framework's `NSError`). A
//!   guest's reboot also arrives as a stop by the guest: the framework does not tell the
//!   two apart, so a reboot is reported as a power-off.

use std::time::{Duration, Instant};

/// How long a guest asked to shut down (the power button) gets before it is stopped.
pub const GRACE: Duration = Duration::from_secs(30);
/// How long the framework gets to complete a start, or a stop, before the watch gives up
/// on its completion.
pub const COMPLETION_LIMIT: Duration = Duration::from_secs(30);
/// How long an Error state waits for the delegate's description of the error.
const ERROR_DETAIL: Duration = Duration::from_secs(1);

/// `VZVirtualMachineState`, mirrored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    /// Not running (also before the start has begun).
    Stopped,
    /// Running.
    Running,
    /// Paused.
    Paused,
    /// Stopped on an unrecoverable error.
    Error,
    /// Any transition (starting, pausing, resuming, stopping, saving, restoring) or a
    /// state this hvrun does not know.
    Busy,
}

impl State {
    /// The state `VZVirtualMachineState`'s raw value stands for.
    pub fn from_raw(raw: isize) -> Self {
        match raw {
            0 => State::Stopped,
            1 => State::Running,
            2 => State::Paused,
            3 => State::Error,
            _ => State::Busy,
        }
    }
}

/// What the machine's delegate reported.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ended {
    /// The guest stopped the machine (powered off, or rebooted).
    ByGuest,
    /// The machine stopped on an error; the error's description.
    OnError(String),
}

/// What the watcher saw since the last step.
#[derive(Debug, Clone, Default)]
pub struct Seen {
    /// The machine's state now (`None` when the watcher could not read it).
    pub state: Option<State>,
    /// The start's completion, when it arrived since the last step.
    pub started: Option<Result<(), String>>,
    /// The stop's completion, when it arrived since the last step.
    pub stopped: Option<Result<(), String>>,
    /// The delegate's report, when one arrived since the last step.
    pub ended: Option<Ended>,
}

/// What the host asks for now (the VM's control: `VmHandle`'s stop, pause and request to shut down).
#[derive(Debug, Clone, Copy, Default)]
pub struct Asked {
    /// When the guest was first asked to shut down (the power button).
    pub shutdown: Option<Instant>,
    /// Stop the machine now.
    pub stop: bool,
    /// Pause it (resume when false).
    pub pause: bool,
}

/// What the watcher does next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Nothing this time: look again later.
    Wait,
    /// Ask the guest to stop (`requestStop`: the power button).
    Press,
    /// The guest had its [`GRACE`]: stop the machine (the framework layer records the
    /// host's stop as the outcome; the next steps then issue it).
    GraceOver,
    /// Stop the machine (`stop`), and wait for its completion.
    Stop,
    /// Pause the machine (`true`) or resume it.
    Pause(bool),
    /// The watch is over.
    Finish(Finish),
}

/// How the machine ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Finish {
    /// The guest stopped it: a power-off (or a reboot; see the module's notes).
    ByGuest,
    /// The host stopped it: the outcome the host recorded.
    ByHost,
    /// It failed to start, or stopped on an error.
    Failed(String),
}

/// The watcher's memory between steps.
#[derive(Debug, Default)]
pub struct Watch {
    started: Option<Result<(), String>>,
    start_asked: Option<Instant>,
    running_seen: bool,
    ended: Option<Ended>,
    error_seen: Option<Instant>,
    pressed: bool,
    grace_over: bool,
    paused: bool,
    stop_since: Option<Instant>,
    stop_issued: bool,
    stop_result: Option<Result<(), String>>,
}

impl Watch {
    /// A watch over a machine whose start was issued at `now`.
    pub fn new(now: Instant) -> Self {
        Watch { start_asked: Some(now), ..Watch::default() }
    }

    fn started(&self) -> bool {
        self.running_seen || matches!(self.started, Some(Ok(())))
    }

    /// What to do, given what was `seen` and what the host `asked` for at `now`.
    pub fn step(&mut self, seen: Seen, asked: Asked, now: Instant) -> Action {
        if let Some(started) = seen.started {
            self.started.get_or_insert(started);
        }
        if let Some(ended) = seen.ended {
            self.ended.get_or_insert(ended);
        }
        if let Some(stopped) = seen.stopped {
            self.stop_result = Some(stopped);
        }
        let state = seen.state.unwrap_or(State::Busy);
        if state == State::Running {
            self.running_seen = true;
        }
        if state == State::Error {
            self.error_seen.get_or_insert(now);
        }
        let stopping = asked.stop || self.grace_over;

        // How the machine ended, where it did. (A failed start is reported even when a
        // stop was asked meanwhile: the stop is only issued once the start completed.)
        if let Some(Err(why)) = &self.started {
            return Action::Finish(Finish::Failed(format!("starting the machine: {why}")));
        }
        match &self.ended {
            Some(Ended::OnError(why)) if !stopping => {
                return Action::Finish(Finish::Failed(format!("the machine stopped with an error: {why}")))
            }
            Some(Ended::ByGuest) => return Action::Finish(Finish::ByGuest),
            _ => {}
        }
        if self.started() {
            match state {
                State::Stopped if stopping => return Action::Finish(Finish::ByHost),
                State::Stopped => return Action::Finish(Finish::ByGuest),
                State::Error if stopping => return Action::Finish(Finish::ByHost),
                State::Error if self.error_seen.is_some_and(|at| now.duration_since(at) >= ERROR_DETAIL) => {
                    return Action::Finish(Finish::Failed("the machine stopped with an error".into()))
                }
                _ => {}
            }
        } else if self.start_asked.is_some_and(|at| now.duration_since(at) >= COMPLETION_LIMIT) {
            return Action::Finish(if stopping {
                Finish::ByHost
            } else {
                Finish::Failed(format!(
                    "starting the machine: no answer from the framework in {} s",
                    COMPLETION_LIMIT.as_secs()
                ))
            });
        }

        // The host's stop: issued once the machine has started and only where the
        // framework accepts it (Running or Paused: not while pausing or resuming), then
        // waited for; a refused stop is issued again.
        if stopping {
            if !self.started() {
                return Action::Wait;
            }
            let since = *self.stop_since.get_or_insert(now);
            match self.stop_result.take() {
                Some(Ok(())) => return Action::Finish(Finish::ByHost),
                Some(Err(why)) => {
                    log::warn!("vz: stopping the machine: {why}; trying again");
                    self.stop_issued = false;
                }
                None => {}
            }
            if now.duration_since(since) >= COMPLETION_LIMIT {
                return Action::Finish(Finish::Failed(format!(
                    "stopping the machine: it has not stopped after {} s",
                    COMPLETION_LIMIT.as_secs()
                )));
            }
            if !self.stop_issued && matches!(state, State::Running | State::Paused) {
                self.stop_issued = true;
                return Action::Stop;
            }
            return Action::Wait;
        }

        // The power button, once the guest runs; the host's stop after the grace.
        if let Some(asked_at) = asked.shutdown {
            if !self.pressed && state == State::Running {
                self.pressed = true;
                log::info!("vz: asked the guest to shut down; stopping it in {} s otherwise", GRACE.as_secs());
                return Action::Press;
            }
            if !self.grace_over && now.duration_since(asked_at) >= GRACE {
                self.grace_over = true;
                return Action::GraceOver;
            }
        }
        if asked.pause != self.paused && matches!(state, State::Running | State::Paused) {
            self.paused = asked.pause;
            return Action::Pause(asked.pause);
        }
        Action::Wait
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seen(state: State) -> Seen {
        Seen { state: Some(state), ..Seen::default() }
    }

    const NOTHING: Asked = Asked { shutdown: None, stop: false, pause: false };

    #[test]
    fn stopped_before_the_start_completes_is_not_a_power_off() {
        let t = Instant::now();
        let mut watch = Watch::new(t);
        // The old watcher read Stopped here and reported a clean power-off (exit 0).
        assert_eq!(watch.step(seen(State::Stopped), NOTHING, t), Action::Wait);
        let failed = Seen { started: Some(Err("The virtual machine failed to start.".into())), ..seen(State::Stopped) };
        assert_eq!(
            watch.step(failed, NOTHING, t + Duration::from_millis(300)),
            Action::Finish(Finish::Failed("starting the machine: The virtual machine failed to start.".into()))
        );
    }

    #[test]
    fn a_start_that_never_completes_is_an_error_in_the_end() {
        let t = Instant::now();
        let mut watch = Watch::new(t);
        assert_eq!(watch.step(seen(State::Busy), NOTHING, t + Duration::from_secs(1)), Action::Wait);
        let late = watch.step(seen(State::Stopped), NOTHING, t + COMPLETION_LIMIT);
        assert!(matches!(late, Action::Finish(Finish::Failed(why)) if why.contains("no answer")));
    }

    #[test]
    fn the_guests_own_stop_is_a_power_off_and_an_error_keeps_its_text() {
        let t = Instant::now();
        let mut watch = Watch::new(t);
        let ok = Seen { started: Some(Ok(())), ..seen(State::Running) };
        assert_eq!(watch.step(ok, NOTHING, t), Action::Wait);
        let by_guest = Seen { ended: Some(Ended::ByGuest), ..seen(State::Stopped) };
        assert_eq!(watch.step(by_guest, NOTHING, t), Action::Finish(Finish::ByGuest));

        let mut watch = Watch::new(t);
        assert_eq!(watch.step(seen(State::Running), NOTHING, t), Action::Wait);
        // The state reads Error before the delegate's call arrives: wait for its text.
        assert_eq!(watch.step(seen(State::Error), NOTHING, t), Action::Wait);
        let ended = Seen { ended: Some(Ended::OnError("Internal Virtualization error.".into())), ..seen(State::Error) };
        assert_eq!(
            watch.step(ended, NOTHING, t),
            Action::Finish(Finish::Failed("the machine stopped with an error: Internal Virtualization error.".into()))
        );
        // Without the delegate's call, the error is reported anyway.
        let mut watch = Watch::new(t);
        watch.step(seen(State::Running), NOTHING, t);
        assert_eq!(watch.step(seen(State::Error), NOTHING, t), Action::Wait);
        let later = watch.step(seen(State::Error), NOTHING, t + ERROR_DETAIL);
        assert!(matches!(later, Action::Finish(Finish::Failed(_))));
    }

    #[test]
    fn a_stop_while_starting_waits_for_the_start_and_then_for_the_stop() {
        let t = Instant::now();
        let stop = Asked { stop: true, ..NOTHING };
        let mut watch = Watch::new(t);
        // The old watcher issued `stop` here (which the framework refuses while starting)
        // and returned at once, closing sockets under a machine that went on to run.
        assert_eq!(watch.step(seen(State::Busy), stop, t), Action::Wait);
        let ok = Seen { started: Some(Ok(())), ..seen(State::Running) };
        assert_eq!(watch.step(ok, stop, t), Action::Stop);
        assert_eq!(watch.step(seen(State::Busy), stop, t), Action::Wait, "stop issued once, then waited for");
        let done = Seen { stopped: Some(Ok(())), ..seen(State::Stopped) };
        assert_eq!(watch.step(done, stop, t), Action::Finish(Finish::ByHost));
    }

    #[test]
    fn a_stop_that_never_completes_is_an_error_after_the_limit() {
        let t = Instant::now();
        let stop = Asked { stop: true, ..NOTHING };
        let mut watch = Watch::new(t);
        watch.step(seen(State::Running), NOTHING, t);
        assert_eq!(watch.step(seen(State::Running), stop, t), Action::Stop);
        assert_eq!(watch.step(seen(State::Busy), stop, t + Duration::from_secs(5)), Action::Wait);
        let late = watch.step(seen(State::Busy), stop, t + COMPLETION_LIMIT);
        assert!(matches!(&late, Action::Finish(Finish::Failed(why)) if why.contains("has not stopped")), "{late:?}");
    }

    /// Found by review: a stop asked while the machine was pausing was refused by the
    /// framework, and the watch ended with the machine still there.
    #[test]
    fn a_stop_waits_for_a_state_that_takes_it_and_a_refused_stop_is_issued_again() {
        let t = Instant::now();
        let stop = Asked { stop: true, pause: true, ..NOTHING };
        let mut watch = Watch::new(t);
        watch.step(seen(State::Running), NOTHING, t);
        assert_eq!(watch.step(seen(State::Busy), stop, t), Action::Wait, "not while pausing");
        assert_eq!(watch.step(seen(State::Paused), stop, t), Action::Stop);
        let refused =
            Seen { stopped: Some(Err("Invalid virtual machine state transition.".into())), ..seen(State::Paused) };
        assert_eq!(watch.step(refused, stop, t), Action::Stop, "issued again, not finished");
        let done = Seen { stopped: Some(Ok(())), ..seen(State::Stopped) };
        assert_eq!(watch.step(done, stop, t), Action::Finish(Finish::ByHost));
    }

    #[test]
    fn a_failed_start_is_reported_even_when_a_stop_was_asked_meanwhile() {
        let t = Instant::now();
        let mut watch = Watch::new(t);
        assert_eq!(watch.step(seen(State::Busy), Asked { stop: true, ..NOTHING }, t), Action::Wait);
        let failed = Seen { started: Some(Err("no disk".into())), ..seen(State::Stopped) };
        let got = watch.step(failed, Asked { stop: true, ..NOTHING }, t);
        assert_eq!(got, Action::Finish(Finish::Failed("starting the machine: no disk".into())));
    }

    #[test]
    fn the_power_button_is_pressed_once_the_guest_runs_then_the_grace_runs_out() {
        let t = Instant::now();
        let asked = Asked { shutdown: Some(t), ..NOTHING };
        let mut watch = Watch::new(t);
        assert_eq!(watch.step(seen(State::Busy), asked, t), Action::Wait, "not while starting");
        assert_eq!(watch.step(seen(State::Running), asked, t), Action::Press);
        assert_eq!(watch.step(seen(State::Running), asked, t + Duration::from_secs(1)), Action::Wait);
        assert_eq!(watch.step(seen(State::Running), asked, t + GRACE), Action::GraceOver);
        // The grace over, the host's stop follows without the control's flag.
        assert_eq!(watch.step(seen(State::Running), asked, t + GRACE), Action::Stop);
        let gone = Seen { stopped: Some(Ok(())), ..seen(State::Stopped) };
        assert_eq!(watch.step(gone, asked, t + GRACE), Action::Finish(Finish::ByHost));
        // A guest that shuts down within the grace powered off.
        let mut watch = Watch::new(t);
        watch.step(seen(State::Running), asked, t);
        assert_eq!(
            watch.step(seen(State::Stopped), asked, t + Duration::from_secs(3)),
            Action::Finish(Finish::ByGuest)
        );
    }

    #[test]
    fn pause_and_resume_follow_the_host_once_the_machine_can() {
        let t = Instant::now();
        let pause = Asked { pause: true, ..NOTHING };
        let mut watch = Watch::new(t);
        assert_eq!(watch.step(seen(State::Busy), pause, t), Action::Wait);
        assert_eq!(watch.step(seen(State::Running), pause, t), Action::Pause(true));
        assert_eq!(watch.step(seen(State::Paused), pause, t), Action::Wait);
        assert_eq!(watch.step(seen(State::Paused), NOTHING, t), Action::Pause(false));
    }

    #[test]
    fn raw_states_map_as_the_framework_numbers_them() {
        assert_eq!(State::from_raw(0), State::Stopped);
        assert_eq!(State::from_raw(1), State::Running);
        assert_eq!(State::from_raw(2), State::Paused);
        assert_eq!(State::from_raw(3), State::Error);
        for raw in [4, 5, 6, 7, 8, 9, 42, -1] {
            assert_eq!(State::from_raw(raw), State::Busy);
        }
    }
}

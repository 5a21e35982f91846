//! (CLI) SIGTERM and SIGINT as a power button: the first asks the guest to shut down
//! cleanly, a second stops the VM at once, a third (if the stop hangs) ends the process.
//!
//! The two signals are blocked in the main thread before any other thread exists, so
//! every thread inherits the mask and they arrive only where one thread waits for them
//! (`sigwait`): no handler runs on a vCPU thread, and nothing is async-signal-unsafe.
//! On a raw terminal Ctrl-C reaches the guest as a byte and sends no SIGINT; then only
//! SIGTERM (or a SIGINT from `kill`) presses the button.

use std::io;

use hvrun::VmHandle;

/// SIGINT and SIGTERM, blocked in the calling thread and every thread it starts from now.
pub struct Blocked(libc::sigset_t);

/// Blocks SIGINT and SIGTERM; call it before the program starts any thread.
pub fn block() -> io::Result<Blocked> {
    // SAFETY: a zeroed sigset_t is valid storage for sigemptyset to initialize.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is valid; sigemptyset and sigaddset initialize and extend it; the
    // mask call changes only this thread's mask.
    let rc = unsafe {
        libc::sigemptyset(&mut set);
        libc::sigaddset(&mut set, libc::SIGINT);
        libc::sigaddset(&mut set, libc::SIGTERM);
        libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut())
    };
    if rc != 0 {
        return Err(io::Error::from_raw_os_error(rc));
    }
    Ok(Blocked(set))
}

/// Starts the thread that takes the blocked signals and calls `on_signal` with how many
/// have come so far (1 for the first). From the third on, when two have not ended the
/// process, the signal takes its own course: it is unblocked and raised again, so the
/// console's handler restores the terminal and the process dies of it, as it would have
/// without this (a stop that does not finish must not leave hvrun unkillable).
fn watch(blocked: Blocked, on_signal: impl Fn(u32) + Send + 'static) {
    let spawned = std::thread::Builder::new().name("signals".into()).spawn(move || {
        let mut seen = 0u32;
        loop {
            let mut signal = 0;
            // SAFETY: the set is initialized and blocked in this thread (inherited); sigwait
            // stores the signal taken in `signal`.
            if unsafe { libc::sigwait(&blocked.0, &mut signal) } != 0 {
                continue;
            }
            seen = seen.saturating_add(1);
            if seen < 3 {
                on_signal(seen);
                continue;
            }
            // SAFETY: unblocking in this thread only, then raising a signal at it: its
            // handler (the console's, restoring the terminal) or its default action runs.
            unsafe {
                libc::pthread_sigmask(libc::SIG_UNBLOCK, &blocked.0, std::ptr::null_mut());
                libc::raise(signal);
            }
        }
    });
    if let Err(e) = spawned {
        log::warn!("no thread for SIGINT and SIGTERM ({e}): they are ignored");
    }
}

/// The CLI's rule for a running VM: the first signal presses its power button
/// ([`VmHandle::request_shutdown`]), a later one stops it. Signals that came while the VM
/// was being built waited, blocked, and count now. Without `blocked` (the mask could not
/// be set) the signals keep their default action.
pub fn press_then_stop(blocked: io::Result<Blocked>, vm: VmHandle) {
    let blocked = match blocked {
        Ok(blocked) => blocked,
        Err(e) => return log::warn!("SIGINT and SIGTERM keep their default action ({e})"),
    };
    watch(blocked, move |nth| press_or_stop(&vm, nth));
}

/// [`press_then_stop`] for a VM that starts later (through the API): until `vm` is set,
/// a signal calls `before` (which ends hvrun).
pub fn press_then_stop_once_running(
    blocked: io::Result<Blocked>,
    vm: std::sync::Arc<std::sync::OnceLock<VmHandle>>,
    before: impl Fn() + Send + 'static,
) {
    let blocked = match blocked {
        Ok(blocked) => blocked,
        Err(e) => return log::warn!("SIGINT and SIGTERM keep their default action ({e})"),
    };
    watch(blocked, move |nth| match vm.get() {
        None => before(),
        Some(vm) => press_or_stop(vm, nth),
    });
}

/// What the `nth` signal does to a running VM.
fn press_or_stop(vm: &VmHandle, nth: u32) {
    match nth {
        1 if vm.request_shutdown() => {
            say("asked the guest to shut down (its power button); signal again to stop it now")
        }
        1 => say("the guest has no driver for its power button (virtio-input); signal again to stop it now"),
        _ => vm.stop(),
    }
}

/// The CLI's rule for `hvrun macos install`: the first signal cancels the install
/// (through `vm`'s stop); a third ends hvrun at once.
pub fn cancel(blocked: io::Result<Blocked>, vm: VmHandle) {
    let blocked = match blocked {
        Ok(blocked) => blocked,
        Err(e) => return log::warn!("SIGINT and SIGTERM keep their default action ({e})"),
    };
    watch(blocked, move |nth| {
        if nth == 1 {
            say("cancelling the install; the unfinished bundle will be removed");
        }
        vm.stop();
    });
}

/// Tells the user, on standard error, what a signal did (with a carriage return: the
/// terminal may be in raw mode).
fn say(text: &str) {
    // Not eprint!, which panics when standard error is a full FIFO (`PUT /logger`).
    use std::io::Write as _;
    let _ = write!(std::io::stderr(), "hvrun: {text}\r\n");
}

//! Kicking a vCPU thread out of `KVM_RUN`.
//!
//! The method KVM's API documentation recommends for `immediate_exit`: a signal whose
//! handler sets `kvm_run.immediate_exit` on the interrupted thread. A signal that lands
//! while the thread is in `KVM_RUN` makes the ioctl return `EINTR`; one that lands just
//! before it sets `immediate_exit`, so `KVM_RUN` returns `EINTR` without entering the
//! guest. Nothing is lost in between, and no signal mask juggling is needed.

use std::cell::Cell;
use std::sync::{Mutex, Once};

use kvm_bindings::kvm_run;

thread_local! {
    /// The `kvm_run` of the vCPU living on this thread, for the signal handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

/// The signal used for kicks.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

extern "C" fn on_kick(_signal: libc::c_int, _info: *mut libc::siginfo_t, _context: *mut libc::c_void) {
    // A const-initialized, Drop-free thread local is a plain TLS load: safe in a handler.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: the pointer is this thread's vCPU `kvm_run` mapping, registered by
        // `register` and cleared by `unregister` before the mapping goes away; only this
        // thread (or this handler, on it) writes `immediate_exit` through it.
        unsafe { std::ptr::addr_of_mut!((*run).immediate_exit).write_volatile(1) };
    }
}

/// Whether a kick landed since the vCPU last ran (its handler set `immediate_exit`),
/// clearing the flag. The accesses are volatile: the handler writes the field behind the
/// compiler's back, on this thread, between any two instructions.
pub fn take_pending(run: &mut kvm_run) -> bool {
    let field = std::ptr::addr_of_mut!(run.immediate_exit);
    // SAFETY: `field` points into the `kvm_run` mapping that `run` borrows, alive and
    // aligned; the handler only ever stores 1 into it.
    unsafe {
        if field.read_volatile() == 0 {
            return false;
        }
        field.write_volatile(0);
    }
    true
}

/// Installs the kick signal's handler, once per process.
pub fn install_handler() -> std::io::Result<()> {
    static INSTALL: Once = Once::new();
    static RESULT: Mutex<Option<i32>> = Mutex::new(None);
    INSTALL.call_once(|| {
        // SAFETY: a zeroed sigaction is a valid "no flags, empty mask" value; we then set
        // the handler and flags. No SA_RESTART: KVM_RUN must return EINTR.
        let rc = unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_kick as *const () as usize;
            action.sa_flags = libc::SA_SIGINFO;
            libc::sigemptyset(&mut action.sa_mask);
            libc::sigaction(kick_signal(), &action, std::ptr::null_mut())
        };
        if rc != 0 {
            *RESULT.lock().unwrap_or_else(|e| e.into_inner()) = std::io::Error::last_os_error().raw_os_error();
        }
    });
    match *RESULT.lock().unwrap_or_else(|e| e.into_inner()) {
        Some(errno) => Err(std::io::Error::from_raw_os_error(errno)),
        None => Ok(()),
    }
}

/// Registers `run` as this thread's vCPU mapping.
pub fn register(run: *mut kvm_run) {
    KVM_RUN.with(|c| c.set(run));
}

/// Forgets this thread's vCPU mapping.
pub fn unregister() {
    KVM_RUN.with(|c| c.set(std::ptr::null_mut()));
}

/// Kicks one vCPU thread; inert once the vCPU is dropped.
#[derive(Debug)]
pub struct ThreadKicker {
    /// The vCPU's thread while the vCPU exists. The lock makes `kick` and the vCPU's
    /// drop exclusive, so a signal never targets a thread that has moved on.
    thread: Mutex<Option<libc::pthread_t>>,
}

impl ThreadKicker {
    /// A kicker for the calling thread.
    pub fn for_current_thread() -> Self {
        // SAFETY: pthread_self has no preconditions.
        ThreadKicker { thread: Mutex::new(Some(unsafe { libc::pthread_self() })) }
    }

    /// Makes every later kick a no-op.
    pub fn disarm(&self) {
        *self.thread.lock().unwrap_or_else(|e| e.into_inner()) = None;
    }
}

impl crate::Kicker for ThreadKicker {
    fn kick(&self) {
        let thread = self.thread.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(thread) = *thread {
            // SAFETY: the thread is alive: `disarm` runs on it (when its vCPU is dropped)
            // before it can exit, and takes the lock we hold.
            let rc = unsafe { libc::pthread_kill(thread, kick_signal()) };
            if rc != 0 {
                log::warn!("kicking a vCPU thread failed: {}", std::io::Error::from_raw_os_error(rc));
            }
        }
    }
}

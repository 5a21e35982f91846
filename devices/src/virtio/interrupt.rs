//! A transport's interrupt, shared by the transport and its device: the InterruptStatus
//! register, the line behind it, and the device's "needs reset" state.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use crate::irq::IrqLine;
use crate::warn_ratelimited;

/// Interrupt status bit: the device used buffers.
pub const INT_USED_RING: u32 = 1;
/// Interrupt status bit: the configuration changed.
pub const INT_CONFIG: u32 = 2;

struct Inner {
    /// The InterruptStatus register. The line is driven under this lock, so the line's
    /// level is always the register's (`status != 0`), whatever threads race on it.
    status: Mutex<u32>,
    line: Arc<dyn IrqLine>,
    /// The device met a driver error it cannot go on from (virtio 1.2, 2.1.2).
    needs_reset: AtomicBool,
    /// Interrupts raised ([`Interrupt::trigger`] calls), for metrics.
    triggered: AtomicU64,
    /// Times the device failed ([`Interrupt::fail`]), for metrics.
    failures: AtomicU64,
}

/// A transport's interrupt: the InterruptStatus register and the line behind it. The line
/// is high while any status bit is set; the driver clears bits through InterruptACK.
///
/// It also carries DEVICE_NEEDS_RESET from the device to the transport: a device that
/// meets a driver error it cannot recover from ([`Interrupt::fail`]) stops serving its
/// queues until the driver resets it.
#[derive(Clone)]
pub struct Interrupt {
    inner: Arc<Inner>,
}

impl std::fmt::Debug for Interrupt {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Interrupt")
            .field("status", &self.status())
            .field("needs_reset", &self.needs_reset())
            .finish_non_exhaustive()
    }
}

impl Interrupt {
    /// An interrupt with no status bits set, driving `line`.
    pub fn new(line: Arc<dyn IrqLine>) -> Self {
        Interrupt {
            inner: Arc::new(Inner {
                status: Mutex::new(0),
                line,
                needs_reset: AtomicBool::new(false),
                triggered: AtomicU64::new(0),
                failures: AtomicU64::new(0),
            }),
        }
    }

    /// Sets or clears status bits through `change`, then drives the line from the result,
    /// all under the register's lock.
    fn update(&self, change: impl FnOnce(u32) -> u32) {
        let mut status = crate::bus::lock(&self.inner.status);
        let before = *status;
        *status = change(before);
        if (before != 0) != (*status != 0) {
            self.inner.line.set_level(*status != 0);
        }
    }

    /// Sets status `bits` and raises the line.
    pub fn trigger(&self, bits: u32) {
        self.inner.triggered.fetch_add(1, Ordering::Relaxed);
        self.update(|status| status | bits);
    }

    /// How many interrupts were raised so far.
    pub fn triggered(&self) -> u64 {
        self.inner.triggered.load(Ordering::Relaxed)
    }

    /// How many times the device failed ([`Interrupt::fail`]) so far.
    pub fn failures(&self) -> u64 {
        self.inner.failures.load(Ordering::Relaxed)
    }

    /// Clears status `bits` (InterruptACK); lowers the line when none remain.
    pub fn acknowledge(&self, bits: u32) {
        self.update(|status| status & !bits);
    }

    /// The InterruptStatus register.
    pub fn status(&self) -> u32 {
        *crate::bus::lock(&self.inner.status)
    }

    /// The device cannot go on (the driver broke a rule a device cannot recover from,
    /// such as an available index more than a queue ahead): logs `why` with a rate
    /// limit, sets DEVICE_NEEDS_RESET and raises a configuration-change interrupt, as
    /// virtio 1.2 section 2.1.2 says. The device serves nothing more until a reset.
    pub fn fail(&self, device: &str, why: std::fmt::Arguments<'_>) {
        // The status bit first, then the interrupt: a driver that takes the interrupt
        // and reads Status sees DEVICE_NEEDS_RESET.
        if !self.inner.needs_reset.swap(true, Ordering::SeqCst) {
            self.inner.failures.fetch_add(1, Ordering::Relaxed);
            self.trigger(INT_CONFIG);
            warn_ratelimited!("{device}: {why}; the device stops until the driver resets it");
        }
    }

    /// Whether the device needs a reset ([`Interrupt::fail`]).
    pub fn needs_reset(&self) -> bool {
        self.inner.needs_reset.load(Ordering::Relaxed)
    }

    /// Takes a saved InterruptStatus and DEVICE_NEEDS_RESET (a snapshot's), driving the
    /// line to match.
    pub(crate) fn restore(&self, status: u32, needs_reset: bool) {
        self.inner.needs_reset.store(needs_reset, Ordering::SeqCst);
        self.update(|_| status);
    }

    /// Back to the state after [`Interrupt::new`] (a device reset).
    pub(crate) fn clear(&self) {
        self.inner.needs_reset.store(false, Ordering::SeqCst);
        self.update(|_| 0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::mpsc::{channel, Receiver, Sender};
    use std::time::Duration;

    /// A line that, the first time it is lowered, tells the test and then waits (at most
    /// a while) for the test to say go: a window in which another thread triggers.
    struct SlowLower {
        level: AtomicBool,
        lowering: Mutex<Option<Sender<()>>>,
        go: Mutex<Receiver<()>>,
    }

    impl IrqLine for SlowLower {
        fn set_level(&self, level: bool) {
            if !level {
                if let Some(tell) = self.lowering.lock().unwrap().take() {
                    tell.send(()).unwrap();
                    let _ = self.go.lock().unwrap().recv_timeout(Duration::from_millis(300));
                }
            }
            self.level.store(level, Ordering::SeqCst);
        }
    }

    /// Hole 5 of issue 12: an acknowledge racing with a trigger left a status bit set
    /// with the line low, and the guest's I/O stalled. The window is made wide here; the
    /// line must end at the register's level.
    #[test]
    fn a_trigger_racing_an_acknowledge_never_leaves_the_line_low_with_status_set() {
        let (tell, lowering) = channel();
        let (go, wait) = channel();
        let line = Arc::new(SlowLower {
            level: AtomicBool::new(false),
            lowering: Mutex::new(Some(tell)),
            go: Mutex::new(wait),
        });
        let interrupt = Interrupt::new(line.clone());
        interrupt.trigger(INT_USED_RING);
        std::thread::scope(|s| {
            let acker = interrupt.clone();
            s.spawn(move || acker.acknowledge(INT_USED_RING));
            lowering.recv().unwrap();
            // The acknowledge is between clearing the bit and lowering the line.
            let trigger = interrupt.clone();
            let done = s.spawn(move || trigger.trigger(INT_USED_RING));
            std::thread::sleep(Duration::from_millis(50));
            let _ = go.send(());
            done.join().unwrap();
        });
        assert_eq!(interrupt.status(), INT_USED_RING);
        assert!(line.level.load(Ordering::SeqCst), "status is set, so the line must be high");
    }

    #[test]
    fn fail_sets_needs_reset_once_and_clear_forgets_it() {
        let line = Arc::new(crate::testing::Line::default());
        let interrupt = Interrupt::new(line.clone());
        interrupt.fail("test", format_args!("broken"));
        assert!(interrupt.needs_reset() && line.high());
        assert_eq!(interrupt.status(), INT_CONFIG);
        interrupt.acknowledge(INT_CONFIG);
        interrupt.fail("test", format_args!("again"));
        assert_eq!(interrupt.status(), 0, "one configuration interrupt per failure");
        interrupt.clear();
        assert!(!interrupt.needs_reset() && !line.high());
    }
}

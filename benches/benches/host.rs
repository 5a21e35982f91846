//! What this machine charges for handing work to another thread, a cost every device
//! model with a thread of its own pays when that thread sleeps: the round trip of a
//! wake-up between two threads through a pair of eventfds (the worker's `Waker` is an
//! eventfd on Linux), once with a peer that sleeps in `read`, once with a peer that spins
//! on an atomic. The first row is what a sleeping device thread costs per request; on a
//! virtualized host (an idle CPU is a halted vCPU of the host's own VM) it is much more
//! than on bare metal. `docs/BENCHMARKS.md` reads the device rows against it.

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use criterion::{criterion_group, criterion_main, Criterion};

fn eventfd() -> OwnedFd {
    // SAFETY: eventfd takes no pointers; a non-negative result is a new descriptor.
    let fd = unsafe { libc::eventfd(0, libc::EFD_CLOEXEC) };
    assert!(fd >= 0, "eventfd: {}", std::io::Error::last_os_error());
    // SAFETY: `fd` was just created and is owned by nobody else.
    unsafe { OwnedFd::from_raw_fd(fd) }
}

fn signal(fd: &OwnedFd) {
    let one = 1u64;
    // SAFETY: writes the 8 bytes of `one`.
    let n = unsafe { libc::write(fd.as_raw_fd(), (&one as *const u64).cast(), 8) };
    assert_eq!(n, 8, "eventfd write: {}", std::io::Error::last_os_error());
}

/// Blocks until `fd` was signalled; false once it is closed or fails.
fn wait(fd: &OwnedFd) -> bool {
    let mut value = 0u64;
    // SAFETY: reads at most 8 bytes into `value`.
    unsafe { libc::read(fd.as_raw_fd(), (&mut value as *mut u64).cast(), 8) == 8 }
}

fn wake_ups(c: &mut Criterion) {
    let (ping, pong) = (Arc::new(eventfd()), Arc::new(eventfd()));
    let (p, q) = (Arc::clone(&ping), Arc::clone(&pong));
    std::thread::spawn(move || {
        while wait(&p) {
            signal(&q);
        }
    });
    c.bench_function("host thread wake-up round trip (eventfd, peer sleeping)", |b| {
        b.iter(|| {
            signal(&ping);
            wait(&pong);
        })
    });

    let flag = Arc::new(AtomicU32::new(0));
    let peer = Arc::clone(&flag);
    std::thread::spawn(move || loop {
        match peer.load(Ordering::Acquire) {
            1 => peer.store(2, Ordering::Release),
            3 => return,
            _ => std::hint::spin_loop(),
        }
    });
    c.bench_function("host thread round trip (peer spinning)", |b| {
        b.iter(|| {
            flag.store(1, Ordering::Release);
            while flag.load(Ordering::Acquire) != 2 {
                std::hint::spin_loop();
            }
        })
    });
    flag.store(3, Ordering::Release);
}

criterion_group!(benches, wake_ups);
criterion_main!(benches);

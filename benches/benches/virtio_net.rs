//! virtio-net driven through guest memory and its two virtqueues, its backend one end of
//! a unix datagram socketpair, 32 frames per iteration (posted together, one notify):
//! - `tx`: the guest sends, the host `recv`s them from the other end (polling: see
//!   [`recv_polling`]);
//! - `rx`: the host `send`s, the guest's posted buffers fill.
//!
//! The `host` twin moves the same 32 frames through another socketpair with `send` and
//! `recv` and no VMM in between, from (tx) or into (rx) 32 buffers as the guest's frames
//! are, so `cargo xtask bench` can print hvrun/host.

use std::hint::black_box;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use criterion::{criterion_group, criterion_main, BenchmarkId, Criterion, Throughput};
use devices::virtio::net::backend::{Unixgram, VNET_HDR_LEN};
use devices::virtio::net::Net;
use hvrun_benches::{Driver, DATA, WRITE};
use vm_memory::{Bytes, GuestAddress};

const RX: usize = 0;
const TX: usize = 1;
/// Frames per iteration.
const BATCH: u16 = 32;
/// Room per frame buffer: the largest frame plus the virtio-net header.
const SLOT: u64 = 65_536 + 128;

fn socketpair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints for socketpair to fill.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    let size: libc::c_int = 8 << 20;
    for fd in fds {
        for opt in [libc::SO_SNDBUF, libc::SO_RCVBUF] {
            // SAFETY: `size` is a valid c_int option value for this socket.
            unsafe { libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&size as *const libc::c_int).cast(), 4) };
        }
    }
    // SAFETY: both descriptors were just created and are owned by nobody else.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(fd: &OwnedFd, frame: &[u8]) {
    // SAFETY: `frame` is a valid buffer of its length.
    let n = unsafe { libc::send(fd.as_raw_fd(), frame.as_ptr().cast(), frame.len(), 0) };
    assert_eq!(n as usize, frame.len(), "send: {}", std::io::Error::last_os_error());
}

fn recv(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    // SAFETY: `buf` is a valid writable buffer of its length.
    let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
    assert!(n >= 0, "recv: {}", std::io::Error::last_os_error());
    n as usize
}

/// [`recv`] for the frames the device sends: polls (yielding the CPU after a short spin,
/// as [`hvrun_benches::Driver::wait_used`] does) rather than sleeping in the socket. A
/// sleeping reader would time this machine's thread wake-ups, not the device: a wake-up
/// of a sleeping thread costs tens of microseconds on a virtualized host, more than a
/// frame (the `host` twin never waits, its frames are all sent before it reads).
fn recv_polling(fd: &OwnedFd, buf: &mut [u8]) -> usize {
    let mut spins = 0u32;
    loop {
        // SAFETY: `buf` is a valid writable buffer of its length.
        let n = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), libc::MSG_DONTWAIT) };
        if n >= 0 {
            return n as usize;
        }
        let e = std::io::Error::last_os_error();
        assert_eq!(e.kind(), std::io::ErrorKind::WouldBlock, "recv: {e}");
        spins += 1;
        if spins > 64 {
            std::thread::yield_now();
        }
    }
}

fn buffer(i: u16) -> u64 {
    DATA + u64::from(i) * SLOT
}

fn virtio_net(c: &mut Criterion) {
    for (name, size) in [("64B", 64usize), ("1500B", 1500), ("64KiB", 65_536)] {
        let mut group = c.benchmark_group(format!("virtio-net/{name}x{BATCH}"));
        group.throughput(Throughput::Bytes(size as u64 * u64::from(BATCH)));
        let (device_end, host_end) = socketpair();
        let backend = Unixgram::from_fd(device_end).expect("backend");
        let mut driver = Driver::start(Box::new(Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1])), 2, 256, 8 << 20);
        // The frames the guest sends hold bytes (memory never written would read as the
        // shared zero page, always in the cache).
        driver.mem.write_slice(&vec![0x42u8; BATCH as usize * SLOT as usize], GuestAddress(DATA)).expect("frames");
        for i in 0..BATCH {
            driver.mem.write_slice(&[0; VNET_HDR_LEN], GuestAddress(buffer(i))).expect("headers");
        }
        let mut scratch = vec![0u8; 70_000];
        let frame = vec![0x42u8; size];

        group.bench_function(BenchmarkId::new("hvrun", "tx"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    driver.post(TX, i, &[(buffer(i), (VNET_HDR_LEN + size) as u32, 0)]);
                }
                driver.notify(TX);
                for _ in 0..BATCH {
                    black_box(recv_polling(&host_end, &mut scratch));
                }
                driver.wait_used(TX, BATCH);
            })
        });
        group.bench_function(BenchmarkId::new("hvrun", "rx"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    driver.post(RX, i, &[(buffer(BATCH + i), SLOT as u32, WRITE)]);
                }
                driver.notify(RX);
                for _ in 0..BATCH {
                    send(&host_end, &frame);
                }
                black_box(driver.wait_used(RX, BATCH));
            })
        });

        // The twin uses buffers as the guest does: 32 of them, one per frame, where the
        // guest's frames come from (tx) or go to (rx); the other side uses one buffer, as
        // the host end above does.
        let (a, b_end) = socketpair();
        let mut slots = vec![0x42u8; BATCH as usize * SLOT as usize];
        let slot = |i: u16| i as usize * SLOT as usize;
        group.bench_function(BenchmarkId::new("host", "tx"), |b| {
            b.iter(|| {
                for i in 0..BATCH {
                    send(&a, &slots[slot(i)..slot(i) + size]);
                }
                for _ in 0..BATCH {
                    black_box(recv(&b_end, &mut scratch));
                }
            })
        });
        group.bench_function(BenchmarkId::new("host", "rx"), |b| {
            b.iter(|| {
                for _ in 0..BATCH {
                    send(&a, &frame);
                }
                for i in 0..BATCH {
                    black_box(recv(&b_end, &mut slots[slot(i)..slot(i + 1)]));
                }
            })
        });
        group.finish();
    }
}

criterion_group!(benches, virtio_net);
criterion_main!(benches);

//! Queue notifications that arrive on a file descriptor instead of as a write to the
//! transport's QueueNotify register.
//!
//! On KVM the VMM asks the hypervisor to turn the guest's 4-byte write of a queue's index
//! to QueueNotify into a signal on an eventfd (`ioeventfd`): the vCPU does not leave the
//! guest, and the device's own event loop, which watches the descriptor, learns of the
//! notification directly. Where the hypervisor cannot (Hypervisor.framework), or for
//! writes it does not match, the write stays an MMIO exit and reaches the device through
//! [`super::VirtioDevice::queue_notify`] as before; a device that takes notifiers serves
//! both.

use std::io;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, OwnedFd};

/// One queue's notification descriptor: readable once the driver has notified the queue
/// since the last [`QueueNotifier::take`].
#[derive(Debug)]
pub struct QueueNotifier {
    queue: u16,
    fd: OwnedFd,
}

impl QueueNotifier {
    /// Notifications of queue `queue` on `fd`, a non-blocking descriptor (an eventfd,
    /// or a pipe's read end in tests) that becomes readable on each one.
    pub fn new(queue: u16, fd: OwnedFd) -> Self {
        QueueNotifier { queue, fd }
    }

    /// The queue it notifies.
    pub fn queue(&self) -> u16 {
        self.queue
    }

    /// Takes the notifications that came, so the descriptor is quiet until the next:
    /// whether there were any. Never blocks.
    pub fn take(&self) -> bool {
        let mut any = false;
        loop {
            let mut counter = [0u8; 8];
            // SAFETY: reads at most 8 bytes into a local buffer of 8 bytes, from a
            // descriptor this notifier owns.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), counter.as_mut_ptr().cast(), counter.len()) };
            match n {
                n if n > 0 => any = true,
                0 => return any,
                _ => {
                    let e = io::Error::last_os_error();
                    match e.kind() {
                        io::ErrorKind::Interrupted => continue,
                        io::ErrorKind::WouldBlock => return any,
                        _ => {
                            crate::warn_ratelimited!("queue {} notifier: {e}", self.queue);
                            return any;
                        }
                    }
                }
            }
        }
    }
}

impl AsFd for QueueNotifier {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::os::fd::FromRawFd;

    /// A notifier on a non-blocking pipe, and the write end that notifies it.
    pub(crate) fn pipe_notifier(queue: u16) -> (QueueNotifier, std::fs::File) {
        let mut fds = [0; 2];
        // SAFETY: `pipe` fills the two descriptors it creates into a local array of two.
        assert_eq!(unsafe { libc::pipe(fds.as_mut_ptr()) }, 0);
        // SAFETY: the read end is ours, open, and owned by nothing else; O_NONBLOCK so
        // `take` never waits.
        unsafe { libc::fcntl(fds[0], libc::F_SETFL, libc::O_NONBLOCK) };
        // SAFETY: both descriptors were just created and are owned by nothing else.
        let (read, write) = unsafe { (OwnedFd::from_raw_fd(fds[0]), std::fs::File::from_raw_fd(fds[1])) };
        (QueueNotifier::new(queue, read), write)
    }

    #[test]
    fn take_drains_every_notification_and_never_blocks() {
        use std::io::Write;
        let (notifier, mut notify) = pipe_notifier(3);
        assert_eq!(notifier.queue(), 3);
        assert!(!notifier.take(), "nothing yet, and no wait");
        for _ in 0..100 {
            notify.write_all(&1u64.to_ne_bytes()).unwrap();
        }
        assert!(notifier.take());
        assert!(!notifier.take(), "all taken at once");
        drop(notify);
        assert!(!notifier.take(), "a closed writer is no notification");
    }
}

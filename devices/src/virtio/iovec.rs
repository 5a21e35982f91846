//! A descriptor chain's guest buffers as `iovec`s, for vectored system calls that move
//! data straight between guest memory and a file or socket, with no copy through a
//! buffer of ours.
//!
//! Every buffer is checked against guest memory first (`GuestMemoryBackend::get_slice`), so the
//! kernel only ever sees host addresses inside the guest's mapping. What this cannot
//! express (a buffer straddling two memory regions, a chain of more than [`MAX_IOVECS`]
//! pieces, a chain in the wrong order) is `None`, and the device falls back to copying,
//! which validates and reports as before.

use std::marker::PhantomData;

use guest_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::GuestMemoryBackend;

/// The most pieces one vectored call is given: a full queue's worth of descriptors (the
/// block device's `seg_max` is 254), well below the kernel's `UIO_MAXIOV` (1024).
pub const MAX_IOVECS: usize = 256;

/// Guest buffers as `iovec`s. Borrows guest memory, so the mapping outlives the calls.
pub struct GuestIovecs<'m> {
    iovecs: Vec<libc::iovec>,
    len: usize,
    _memory: PhantomData<&'m GuestMemoryMmap>,
}

impl std::fmt::Debug for GuestIovecs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIovecs").field("pieces", &self.iovecs.len()).field("len", &self.len).finish()
    }
}

impl<'m> GuestIovecs<'m> {
    /// The device-readable buffers of `chain` (`writable` false: data the guest gives)
    /// or its device-writable ones (`writable` true: room the guest offers), skipping the
    /// first `skip` bytes of them. `None` if the chain mixes the two out of order (a
    /// readable buffer after a writable one), a buffer is not in guest memory, there are
    /// fewer than `skip` bytes or more than `skip + limit`, or the pieces are too many.
    pub fn from_chain(
        memory: &'m GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        writable: bool,
        skip: usize,
        limit: usize,
    ) -> Option<Self> {
        let mut iovecs = Vec::with_capacity(4);
        let (mut to_skip, mut len) = (skip, 0usize);
        let mut seen_writable = false;
        for desc in chain {
            if desc.is_write_only() {
                seen_writable = true;
            } else if seen_writable {
                return None; // readable after writable: malformed, whichever side is wanted
            }
            if desc.is_write_only() != writable {
                continue;
            }
            let slice = memory.get_slice(desc.addr(), desc.len() as usize).ok()?;
            let mut offset = 0usize;
            if to_skip > 0 {
                offset = to_skip.min(slice.len());
                to_skip -= offset;
            }
            let take = slice.len() - offset;
            if take > limit - len {
                return None;
            }
            if take == 0 {
                continue;
            }
            if iovecs.len() == MAX_IOVECS {
                return None;
            }
            let base = if writable { slice.ptr_guard_mut().as_ptr() } else { slice.ptr_guard().as_ptr().cast_mut() };
            // `offset + take <= slice.len()`, so the piece stays inside the checked slice.
            iovecs.push(libc::iovec { iov_base: base.wrapping_add(offset).cast(), iov_len: take });
            len += take;
        }
        if to_skip > 0 {
            return None;
        }
        Some(GuestIovecs { iovecs, len, _memory: PhantomData })
    }

    /// Total bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces, for `writev`, `sendmsg`, `preadv`...
    pub fn iovecs(&self) -> &[libc::iovec] {
        &self.iovecs
    }

    /// Keeps only the first `n` bytes.
    pub fn truncate(&mut self, mut n: usize) {
        if n >= self.len {
            return;
        }
        self.len = n;
        let mut keep = 0;
        for iov in &mut self.iovecs {
            if n == 0 {
                break;
            }
            iov.iov_len = iov.iov_len.min(n);
            n -= iov.iov_len;
            keep += 1;
        }
        self.iovecs.truncate(keep);
    }

    /// Drops the first `n` bytes (after a short read or write).
    pub fn advance(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        let mut drop = 0;
        for iov in &mut self.iovecs {
            if n == 0 {
                break;
            }
            let step = n.min(iov.iov_len);
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(step).cast();
            iov.iov_len -= step;
            n -= step;
            if iov.iov_len == 0 {
                drop += 1;
            }
        }
        self.iovecs.drain(..drop);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Bytes, GuestAddress};

    const WRITE: u16 = 2;

    /// A chain of `(addr, len, flags)` buffers in a fresh 1 MiB guest memory.
    fn with_chain(
        buffers: &[(u64, u32, u16)],
        check: impl FnOnce(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>),
    ) {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        let queue = MockSplitQueue::new(&mem, 16);
        let descs: Vec<RawDescriptor> = buffers
            .iter()
            .enumerate()
            .map(|(i, &(addr, len, flags))| {
                let next = if i + 1 < buffers.len() { 1 } else { 0 };
                RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1))
            })
            .collect();
        queue.build_desc_chain(&descs).unwrap();
        let mut q: virtio_queue::Queue = queue.create_queue().unwrap();
        use virtio_queue::QueueOwnedT;
        let chain = q.iter(&mem).unwrap().next().unwrap();
        check(&mem, chain);
    }

    fn bytes(iov: &GuestIovecs<'_>) -> Vec<u8> {
        let mut out = Vec::new();
        for piece in iov.iovecs() {
            // SAFETY: each piece lies inside the test's guest memory, alive here.
            out.extend_from_slice(unsafe { std::slice::from_raw_parts(piece.iov_base.cast::<u8>(), piece.iov_len) });
        }
        out
    }

    #[test]
    fn readable_buffers_after_a_header_skipped_across_descriptors() {
        with_chain(&[(0x1000, 8, 0), (0x2000, 10, 0), (0x3000, 100, WRITE)], |mem, chain| {
            mem.write_slice(&[1; 8], GuestAddress(0x1000)).unwrap();
            mem.write_slice(&(0..10).collect::<Vec<u8>>(), GuestAddress(0x2000)).unwrap();
            // Skip 12: all of the first buffer and 4 bytes of the second.
            let iov = GuestIovecs::from_chain(mem, chain, false, 12, usize::MAX).unwrap();
            assert_eq!(iov.len(), 6);
            assert_eq!(bytes(&iov), vec![4, 5, 6, 7, 8, 9]);
        });
    }

    #[test]
    fn writable_buffers_with_a_limit_and_advance() {
        with_chain(&[(0x1000, 16, 0), (0x2000, 10, WRITE), (0x3000, 10, WRITE)], |mem, chain| {
            assert!(GuestIovecs::from_chain(mem, chain.clone(), true, 0, 19).is_none(), "over the limit");
            let mut iov = GuestIovecs::from_chain(mem, chain, true, 0, 20).unwrap();
            iov.truncate(15);
            assert_eq!((iov.len(), iov.iovecs().len()), (15, 2));
            iov.advance(12);
            assert_eq!((iov.len(), iov.iovecs().len()), (3, 1));
            assert_eq!(
                iov.iovecs()[0].iov_base as usize - mem.get_host_address(GuestAddress(0x3000)).unwrap() as usize,
                2
            );
        });
    }

    #[test]
    fn hostile_chains_are_refused_not_trusted() {
        // A buffer past the end of guest memory.
        with_chain(&[(0xf_ff00, 0x1000, 0)], |mem, chain| {
            assert!(GuestIovecs::from_chain(mem, chain, false, 0, usize::MAX).is_none());
        });
        // A readable buffer after a writable one.
        with_chain(&[(0x1000, 8, WRITE), (0x2000, 8, 0)], |mem, chain| {
            assert!(GuestIovecs::from_chain(mem, chain, true, 0, usize::MAX).is_none());
        });
        // The same chain asked for its readable buffers (a virtio-net transmit): refused
        // too. The virtio_ring fuzz target found it taken, so the zero-copy transmit sent a
        // frame from a chain that the copying path drops as malformed.
        with_chain(&[(0x1000, 8, WRITE), (0x2000, 8, 0)], |mem, chain| {
            assert!(GuestIovecs::from_chain(mem, chain, false, 0, usize::MAX).is_none());
        });
        with_chain(&[(0x1000, 16, 0), (0x2000, 8, WRITE), (0x3000, 0, 0)], |mem, chain| {
            assert!(GuestIovecs::from_chain(mem, chain, false, 0, usize::MAX).is_none(), "even an empty one");
        });
        // Fewer bytes than the header to skip.
        with_chain(&[(0x1000, 8, 0)], |mem, chain| {
            assert!(GuestIovecs::from_chain(mem, chain, false, 12, usize::MAX).is_none());
        });
    }
}

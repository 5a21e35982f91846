//! A request's guest buffers as `iovec`s, gathered in the one walk over its descriptor
//! chain ([`super::request::Request::parse`]) and kept inline, so serving a request
//! allocates nothing.
//!
//! Every piece was checked to lie inside guest memory (`GuestMemoryBackend::get_slices`,
//! split where a buffer straddles two regions) before it was stored, so the kernel and
//! the copies below only ever see host addresses inside the guest's mapping. Whoever holds
//! [`Pieces`] keeps that mapping alive (the queue's `GuestMemory` handle) for as long as
//! it uses them.

use std::marker::PhantomData;

/// The most pieces one request may have: the data of SEG_MAX (254) descriptors, the
/// status descriptor, and one piece to spare for a buffer that straddles two regions of
/// guest memory. A chain with more is answered with an I/O error.
pub const MAX_PIECES: usize = 256;

const EMPTY: libc::iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };

/// A chain's device-readable pieces (after the request header) and device-writable ones
/// (the status byte included), in one inline array: the readable ones fill it from the
/// front, the writable ones from the back.
pub(crate) struct Pieces {
    iov: [libc::iovec; MAX_PIECES],
    readable: usize,
    writable: usize,
}

// SAFETY: the pointers are into guest memory, which the holder of the queue's
// `GuestMemory` keeps mapped while any request taken from the queue is in flight (the
// queue's worker stops its I/O threads before it lets go of the memory). A `Pieces` moves
// between threads whole (a request handed to an I/O thread and back), never shared.
unsafe impl Send for Pieces {}

impl std::fmt::Debug for Pieces {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pieces").field("readable", &self.readable).field("writable", &self.writable).finish()
    }
}

impl Pieces {
    /// No pieces.
    pub(crate) const fn new() -> Self {
        Pieces { iov: [EMPTY; MAX_PIECES], readable: 0, writable: 0 }
    }

    /// Forgets every piece.
    pub(crate) fn clear(&mut self) {
        self.readable = 0;
        self.writable = 0;
    }

    fn full(&self) -> bool {
        self.readable + self.writable == MAX_PIECES
    }

    /// Adds a piece of `len` bytes at host address `base`; false when the array is full.
    /// The writable ones are stored back to front until [`Pieces::seal`].
    ///
    /// # Safety
    ///
    /// `base..base + len` lies inside guest memory that stays mapped for as long as these
    /// pieces are used (see the module).
    pub(crate) unsafe fn push(&mut self, writable: bool, base: *mut u8, len: usize) -> bool {
        if self.full() {
            return false;
        }
        let piece = libc::iovec { iov_base: base.cast(), iov_len: len };
        if writable {
            self.writable += 1;
            self.iov[MAX_PIECES - self.writable] = piece;
        } else {
            self.iov[self.readable] = piece;
            self.readable += 1;
        }
        true
    }

    /// Puts the writable pieces in chain order, once the walk is over.
    pub(crate) fn seal(&mut self) {
        self.iov[MAX_PIECES - self.writable..].reverse();
    }

    /// Drops the last byte of the writable pieces (the status byte, which is not data).
    pub(crate) fn drop_last_writable_byte(&mut self) {
        if self.writable > 0 {
            let last = &mut self.iov[MAX_PIECES - 1];
            last.iov_len -= 1;
            if last.iov_len == 0 {
                // The writable pieces end one slot earlier: shift them up by one.
                self.iov.copy_within(MAX_PIECES - self.writable..MAX_PIECES - 1, MAX_PIECES - self.writable + 1);
                self.writable -= 1;
            }
        }
    }

    /// The readable pieces (`len` bytes in all) or the writable ones, as buffers to move
    /// data through.
    pub(crate) fn buffers(&mut self, writable: bool, len: usize) -> GuestBuffers<'_> {
        let range = if writable { MAX_PIECES - self.writable..MAX_PIECES } else { 0..self.readable };
        GuestBuffers { iov: &mut self.iov[range], len, _guest: PhantomData }
    }
}

/// A request's data buffers in guest memory, for a [`Disk`](super::disk::Disk) to fill or
/// write out directly (`preadv`/`pwritev` over [`GuestBuffers::iovecs`]) or to copy
/// through ([`GuestBuffers::fill_from`], [`GuestBuffers::drain_into`]). Every piece lies
/// inside guest memory, which stays mapped while the buffers exist; only the device makes
/// them.
pub struct GuestBuffers<'a> {
    iov: &'a mut [libc::iovec],
    len: usize,
    _guest: PhantomData<&'a mut [u8]>,
}

impl std::fmt::Debug for GuestBuffers<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestBuffers").field("pieces", &self.iov.len()).field("len", &self.len).finish()
    }
}

impl GuestBuffers<'_> {
    /// Bytes left.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether no bytes are left.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The pieces left, for `preadv`, `pwritev`, `writev`...
    pub fn iovecs(&self) -> &[libc::iovec] {
        self.iov
    }

    /// Drops the first `n` bytes (after a short read or write).
    pub fn advance(&mut self, n: usize) {
        let mut n = n.min(self.len);
        self.len -= n;
        let iov = std::mem::take(&mut self.iov);
        // The pieces `n` covers whole go; the next one loses its first bytes.
        let mut whole = 0;
        while whole < iov.len() && iov[whole].iov_len <= n {
            n -= iov[whole].iov_len;
            whole += 1;
        }
        let rest = &mut iov[whole..];
        if let Some(first) = rest.first_mut() {
            first.iov_base = first.iov_base.cast::<u8>().wrapping_add(n).cast();
            first.iov_len -= n;
        }
        self.iov = rest;
    }

    /// Copies the first bytes of `src` into the buffers and drops them from the front;
    /// returns how many (all of `src`, or as many as there was room for).
    pub fn fill_from(&mut self, src: &[u8]) -> usize {
        let mut done = 0;
        while done < src.len() {
            let Some(piece) = self.iov.first() else { break };
            let n = piece.iov_len.min(src.len() - done);
            // SAFETY: the piece lies in guest memory that stays mapped while `self` exists
            // (see the type), is at least `n` bytes long, and cannot overlap `src`, which
            // is the caller's own memory.
            unsafe { std::ptr::copy_nonoverlapping(src[done..].as_ptr(), piece.iov_base.cast::<u8>(), n) };
            done += n;
            self.advance(n);
        }
        done
    }

    /// Copies the buffers' first bytes into `dst` and drops them from the front; returns
    /// how many (all of `dst`, or as many as the buffers held).
    pub fn drain_into(&mut self, dst: &mut [u8]) -> usize {
        let mut done = 0;
        while done < dst.len() {
            let Some(piece) = self.iov.first() else { break };
            let n = piece.iov_len.min(dst.len() - done);
            // SAFETY: as in `fill_from`, copying the other way.
            unsafe { std::ptr::copy_nonoverlapping(piece.iov_base.cast::<u8>(), dst[done..].as_mut_ptr(), n) };
            done += n;
            self.advance(n);
        }
        done
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Pieces of `bytes`: (writable, start, len).
    fn pieces_of(bytes: &mut [u8], spans: &[(bool, usize, usize)]) -> Pieces {
        let mut pieces = Pieces::new();
        for &(writable, at, len) in spans {
            assert!(at + len <= bytes.len());
            // SAFETY: the span lies inside `bytes`, which outlives the pieces in each test.
            assert!(unsafe { pieces.push(writable, bytes.as_mut_ptr().wrapping_add(at), len) });
        }
        pieces.seal();
        pieces
    }

    #[test]
    fn readable_and_writable_pieces_share_one_array_in_order() {
        let mut bytes = [0u8; 64];
        let mut pieces = pieces_of(&mut bytes, &[(false, 0, 4), (true, 10, 3), (false, 4, 2), (true, 20, 5)]);
        pieces.buffers(false, 6).fill_from(&[1, 2, 3, 4, 5, 6]);
        pieces.buffers(true, 8).fill_from(&[7; 8]);
        assert_eq!(&bytes[..6], &[1, 2, 3, 4, 5, 6]);
        assert_eq!(&bytes[10..13], &[7; 3]);
        assert_eq!(&bytes[20..25], &[7; 5]);
    }

    #[test]
    fn the_status_byte_comes_off_the_end() {
        let mut bytes = [0u8; 16];
        let mut pieces = pieces_of(&mut bytes, &[(true, 0, 4), (true, 8, 1)]);
        pieces.drop_last_writable_byte();
        let buffers = pieces.buffers(true, 4);
        assert_eq!(buffers.iovecs().len(), 1, "a one-byte status piece goes away whole");
        assert_eq!(buffers.iovecs()[0].iov_len, 4);
        pieces.drop_last_writable_byte();
        assert_eq!(pieces.buffers(true, 3).iovecs()[0].iov_len, 3, "a longer one shrinks");
    }

    #[test]
    fn a_full_array_refuses_more_and_buffers_advance_across_pieces() {
        let mut bytes = [0u8; 8];
        let spans: Vec<_> = (0..MAX_PIECES).map(|i| (i % 2 == 0, 0, 1)).collect();
        let mut pieces = pieces_of(&mut bytes, &spans);
        // SAFETY: as in `pieces_of`.
        assert!(!unsafe { pieces.push(false, bytes.as_mut_ptr(), 1) }, "full");
        let mut pieces = pieces_of(&mut bytes, &[(false, 0, 3), (false, 3, 5)]);
        let mut buffers = pieces.buffers(false, 8);
        buffers.advance(4);
        assert_eq!((buffers.len(), buffers.iovecs().len()), (4, 1));
        let mut out = [0u8; 2];
        assert_eq!(buffers.drain_into(&mut out), 2);
        assert_eq!(buffers.len(), 2);
        let mut rest = [0u8; 9];
        assert_eq!(buffers.drain_into(&mut rest), 2, "only what is left");
        assert!(buffers.is_empty());
    }
}

//! A descriptor chain's guest buffers as `iovec`s, for vectored system calls that move
//! data straight between guest memory and a file or socket, with no copy through a
//! buffer of ours.
//!
//! Every buffer is checked against guest memory first (`GuestMemoryBackend::get_slice`), so the
//! kernel only ever sees host addresses inside the guest's mapping. What this cannot
//! express (a buffer straddling two memory regions, a chain of more than [`MAX_IOVECS`]
//! pieces, a chain in the wrong order) is `None`, and the device falls back to copying,
//! which validates and reports as before.
//!
//! No allocation per chain: the pieces live in a small array inside the value (chains
//! of up to 16 pieces: every network frame and console buffer, most block requests), or
//! in a buffer the device owns and reuses ([`GuestIovecs::with_spill`]). Only
//! [`GuestIovecs::from_chain`] on a chain of more pieces than the array holds allocates.

use std::collections::VecDeque;
use std::io;
use std::marker::PhantomData;
use std::os::fd::RawFd;

use guest_memory::GuestMemoryMmap;
use virtio_queue::DescriptorChain;
use vm_memory::{GuestMemoryBackend, VolatileSlice};

/// The most pieces one vectored call is given: a full queue's worth of descriptors (the
/// block device's `seg_max` is 254), well below the kernel's `UIO_MAXIOV` (1024). One
/// more may follow: the host buffer of [`GuestIovecs::push_overflow`].
pub const MAX_IOVECS: usize = 256;

/// Pieces kept inside the value itself. A larger array would make every move of a
/// `GuestIovecs` (returning it, say) copy kilobytes; this one is 256 bytes.
const INLINE: usize = 16;

const EMPTY: libc::iovec = libc::iovec { iov_base: std::ptr::null_mut(), iov_len: 0 };

/// A device's own storage for [`GuestIovecs`] (see [`GuestIovecs::with_spill`]) and for
/// windows on them ([`GuestIovecs::window`]), reused from one call to the next.
pub struct IovecBuf {
    pieces: Vec<libc::iovec>,
}

// SAFETY: the pointers it holds are only followed during a call by the `GuestIovecs` or
// the caller that filled it, into memory they keep alive; between calls they are never
// followed, so the buffer may move to another thread with the device that owns it.
unsafe impl Send for IovecBuf {}

impl Default for IovecBuf {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for IovecBuf {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IovecBuf").field("capacity", &self.pieces.capacity()).finish()
    }
}

impl IovecBuf {
    /// Room for [`MAX_IOVECS`] pieces and an overflow buffer, allocated once.
    pub fn new() -> Self {
        IovecBuf { pieces: Vec::with_capacity(MAX_IOVECS + 1) }
    }

    /// The pieces last written by [`GuestIovecs::window`].
    pub fn as_slice(&self) -> &[libc::iovec] {
        &self.pieces
    }
}

/// Where the pieces beyond the inline array go.
enum Spill<'m> {
    /// Not used yet: the pieces are in the inline array.
    Inline,
    /// Allocated by [`GuestIovecs::from_chain`] for a chain of many pieces.
    Owned(Vec<libc::iovec>),
    /// The device's own reusable buffer: holds every piece from the first.
    Borrowed(&'m mut Vec<libc::iovec>),
}

/// What a walk over a chain takes: its buffers of one kind (device-writable or readable),
/// whether every buffer must be of that kind (`only`), the bytes to skip first and the
/// most bytes to add.
#[derive(Clone, Copy)]
struct Walk {
    writable: bool,
    only: bool,
    skip: usize,
    limit: usize,
}

/// Guest buffers as `iovec`s. Borrows guest memory, so the mapping outlives the calls.
pub struct GuestIovecs<'m> {
    inline: [libc::iovec; INLINE],
    spill: Spill<'m>,
    /// The live pieces are `start..end` of the storage in use.
    start: usize,
    end: usize,
    len: usize,
    /// The last piece is a host buffer ([`GuestIovecs::push_overflow`]).
    overflow: bool,
    _memory: PhantomData<&'m GuestMemoryMmap>,
}

impl std::fmt::Debug for GuestIovecs<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("GuestIovecs").field("pieces", &(self.end - self.start)).field("len", &self.len).finish()
    }
}

impl Default for GuestIovecs<'_> {
    fn default() -> Self {
        Self::new()
    }
}

impl<'m> GuestIovecs<'m> {
    /// No pieces yet; [`GuestIovecs::push_chain`] adds them.
    pub fn new() -> Self {
        GuestIovecs {
            inline: [EMPTY; INLINE],
            spill: Spill::Inline,
            start: 0,
            end: 0,
            len: 0,
            overflow: false,
            _memory: PhantomData,
        }
    }

    /// No pieces yet, kept in `spill` (cleared first): storage the device owns and
    /// reuses, so that no chain, however many pieces it has, costs an allocation.
    pub fn with_spill(spill: &'m mut IovecBuf) -> Self {
        spill.pieces.clear();
        GuestIovecs { spill: Spill::Borrowed(&mut spill.pieces), ..Self::new() }
    }

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
        let mut this = Self::new();
        this.push_chain(memory, chain, writable, skip, limit)?;
        Some(this)
    }

    /// Appends the pieces [`GuestIovecs::from_chain`] would give for `chain`, so that one
    /// call covers several chains (a received frame spread over the guest's buffers).
    /// Returns the bytes added; `None`, with nothing added, where `from_chain` says `None`
    /// or after [`GuestIovecs::push_overflow`].
    pub fn push_chain(
        &mut self,
        memory: &'m GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        writable: bool,
        skip: usize,
        limit: usize,
    ) -> Option<usize> {
        self.push_checked(memory, chain, Walk { writable, only: false, skip, limit }, None)
    }

    /// [`GuestIovecs::push_chain`] for a chain whose buffers must all be of the kind
    /// wanted (a receive buffer, a console's output): `None` if one is of the other.
    pub fn push_uniform_chain(
        &mut self,
        memory: &'m GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        writable: bool,
        skip: usize,
        limit: usize,
    ) -> Option<usize> {
        self.push_checked(memory, chain, Walk { writable, only: true, skip, limit }, None)
    }

    /// [`GuestIovecs::push_uniform_chain`] that also gives the guest memory of the
    /// `skip` bytes it skips (a header the device writes itself) when they lie in the
    /// chain's first buffer (Linux's receive buffers: a header and its payload in one),
    /// so the header is written without walking the chain again. Returns the bytes
    /// added and that slice (`None` when the first buffer does not hold them all: they span
    /// buffers, or the first is empty).
    pub fn push_uniform_chain_head<'a: 'm>(
        &mut self,
        memory: &'a GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        writable: bool,
        skip: usize,
        limit: usize,
    ) -> Option<(usize, Option<VolatileSlice<'a>>)> {
        let mut head = None;
        let added = self.push_checked(memory, chain, Walk { writable, only: true, skip, limit }, Some(&mut head))?;
        Some((added, head))
    }

    /// Adds the chain's pieces as [`Walk`] says, or nothing (`None`): a chain that fails
    /// half-way leaves the list as it was.
    fn push_checked<'a: 'm>(
        &mut self,
        memory: &'a GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        walk: Walk,
        head: Option<&mut Option<VolatileSlice<'a>>>,
    ) -> Option<usize> {
        if self.overflow {
            return None;
        }
        let (end, len) = (self.end, self.len);
        let added = self.push_pieces(memory, chain, walk, head);
        if added.is_none() {
            self.end = end;
            self.len = len;
            if let Spill::Borrowed(spill) = &mut self.spill {
                spill.truncate(end);
            }
        }
        added
    }

    /// Adds the chain's pieces as [`Walk`] says; `head`, if given, gets the skipped bytes'
    /// slice when the first buffer holds them.
    fn push_pieces<'a: 'm>(
        &mut self,
        memory: &'a GuestMemoryMmap,
        chain: DescriptorChain<&GuestMemoryMmap>,
        walk: Walk,
        mut head: Option<&mut Option<VolatileSlice<'a>>>,
    ) -> Option<usize> {
        let Walk { writable, only, skip, limit } = walk;
        let (mut to_skip, mut added) = (skip, 0usize);
        let mut seen_writable = false;
        let mut first = true;
        for desc in chain {
            if desc.is_write_only() {
                seen_writable = true;
            } else if seen_writable {
                return None; // readable after writable: malformed, whichever side is wanted
            }
            if only && desc.is_write_only() != writable {
                return None;
            }
            if desc.is_write_only() != writable {
                continue;
            }
            let slice = memory.get_slice(desc.addr(), desc.len() as usize).ok()?;
            if std::mem::take(&mut first) && slice.len() >= skip {
                if let Some(head) = head.as_deref_mut() {
                    *head = slice.subslice(0, skip).ok();
                }
            }
            let mut offset = 0usize;
            if to_skip > 0 {
                offset = to_skip.min(slice.len());
                to_skip -= offset;
            }
            let take = slice.len() - offset;
            if take > limit - added {
                return None;
            }
            if take == 0 {
                continue;
            }
            let base = if writable { slice.ptr_guard_mut().as_ptr() } else { slice.ptr_guard().as_ptr().cast_mut() };
            // `offset + take <= slice.len()`, so the piece stays inside the checked slice.
            if !self.push(libc::iovec { iov_base: base.wrapping_add(offset).cast(), iov_len: take }, MAX_IOVECS) {
                return None;
            }
            added += take;
        }
        if to_skip > 0 {
            return None;
        }
        Some(added)
    }

    /// Appends a host buffer after the guest's, for a receive whose data may not all fit
    /// in them: what overflows lands in `buf`. Nothing can be appended after it. False
    /// if there is no room for another piece.
    pub fn push_overflow(&mut self, buf: &'m mut [u8]) -> bool {
        let piece = libc::iovec { iov_base: buf.as_mut_ptr().cast(), iov_len: buf.len() };
        if self.overflow || !self.push(piece, MAX_IOVECS + 1) {
            return false;
        }
        self.overflow = true;
        true
    }

    /// Adds one piece; false when there are `most` already.
    fn push(&mut self, piece: libc::iovec, most: usize) -> bool {
        if self.end - self.start >= most {
            return false;
        }
        match &mut self.spill {
            Spill::Inline if self.end < INLINE => self.inline[self.end] = piece,
            Spill::Inline => {
                let mut pieces = Vec::with_capacity(4 * INLINE);
                pieces.extend_from_slice(&self.inline[..self.end]);
                pieces.push(piece);
                self.spill = Spill::Owned(pieces);
            }
            Spill::Owned(pieces) => pieces.push(piece),
            Spill::Borrowed(pieces) => pieces.push(piece),
        }
        self.end += 1;
        self.len += piece.iov_len;
        true
    }

    fn storage(&self) -> &[libc::iovec] {
        match &self.spill {
            Spill::Inline => &self.inline[..self.end],
            Spill::Owned(pieces) => pieces,
            Spill::Borrowed(pieces) => pieces,
        }
    }

    fn storage_mut(&mut self) -> &mut [libc::iovec] {
        match &mut self.spill {
            Spill::Inline => &mut self.inline[..self.end],
            Spill::Owned(pieces) => pieces,
            Spill::Borrowed(pieces) => pieces,
        }
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
        &self.storage()[self.start..self.end]
    }

    /// Keeps only the first `n` bytes.
    pub fn truncate(&mut self, mut n: usize) {
        if n >= self.len {
            return;
        }
        self.len = n;
        let start = self.start;
        let mut keep = 0;
        for iov in &mut self.storage_mut()[start..] {
            if n == 0 {
                break;
            }
            iov.iov_len = iov.iov_len.min(n);
            n -= iov.iov_len;
            keep += 1;
        }
        if start + keep < self.end {
            self.overflow = false; // the last piece is gone, whatever it was
        }
        self.end = start + keep;
        match &mut self.spill {
            Spill::Inline => {}
            Spill::Owned(pieces) => pieces.truncate(self.end),
            Spill::Borrowed(pieces) => pieces.truncate(self.end),
        }
    }

    /// Drops the first `n` bytes (after a short read or write).
    pub fn advance(&mut self, mut n: usize) {
        n = n.min(self.len);
        self.len -= n;
        let (start, end) = (self.start, self.end);
        let mut dropped = 0;
        for iov in &mut self.storage_mut()[start..end] {
            if n == 0 {
                break;
            }
            let step = n.min(iov.iov_len);
            iov.iov_base = iov.iov_base.cast::<u8>().wrapping_add(step).cast();
            iov.iov_len -= step;
            n -= step;
            if iov.iov_len == 0 {
                dropped += 1;
            }
        }
        self.start += dropped;
        if self.start == self.end {
            self.overflow = false;
        }
    }

    /// The pieces covering bytes `offset..offset + len` (fewer where the pieces end),
    /// written into `out` (cleared first): for a vectored call on part of the buffers (the
    /// rest of a frame after a short read).
    pub fn window(&self, mut offset: usize, mut len: usize, out: &mut IovecBuf) {
        let out = &mut out.pieces;
        out.clear();
        for piece in self.iovecs() {
            if len == 0 {
                break;
            }
            let skip = offset.min(piece.iov_len);
            offset -= skip;
            let take = (piece.iov_len - skip).min(len);
            if take > 0 {
                // `skip + take <= iov_len`: inside the piece.
                out.push(libc::iovec {
                    iov_base: piece.iov_base.cast::<u8>().wrapping_add(skip).cast(),
                    iov_len: take,
                });
                len -= take;
            }
        }
    }

    /// The pieces' bytes from `offset` on, as volatile slices (guest memory may change
    /// under us: the guest owns it).
    fn slices_from(&self, mut offset: usize) -> impl Iterator<Item = VolatileSlice<'_>> + '_ {
        self.iovecs().iter().filter_map(move |piece| {
            let skip = offset.min(piece.iov_len);
            offset -= skip;
            (skip < piece.iov_len).then(|| {
                // SAFETY: every piece lies in guest memory checked when it was added (or
                // in the host buffer of `push_overflow`), which `'m` keeps mapped, and
                // `skip < iov_len` keeps the slice inside it.
                unsafe { VolatileSlice::new(piece.iov_base.cast::<u8>().add(skip), piece.iov_len - skip) }
            })
        })
    }

    /// Copies `data` into the pieces from byte `offset` on; returns how much fitted.
    pub fn write_bytes(&self, offset: usize, data: &[u8]) -> usize {
        let mut done = 0;
        for slice in self.slices_from(offset) {
            if done == data.len() {
                break;
            }
            let n = slice.len().min(data.len() - done);
            slice.copy_from(&data[done..done + n]);
            done += n;
        }
        done
    }

    /// Copies the pieces' bytes from `offset` on into `out`; returns how many there were.
    pub fn read_bytes(&self, offset: usize, out: &mut [u8]) -> usize {
        let mut done = 0;
        for slice in self.slices_from(offset) {
            if done == out.len() {
                break;
            }
            done += slice.copy_to(&mut out[done..]);
        }
        done
    }

    /// Appends `len` bytes from `offset` on to `out` (fewer if the pieces end first).
    pub fn append_to(&self, offset: usize, len: usize, out: &mut VecDeque<u8>) {
        let mut buf = [0u8; 4096];
        let mut done = 0;
        while done < len {
            let want = (len - done).min(buf.len());
            let n = self.read_bytes(offset + done, &mut buf[..want]);
            if n == 0 {
                break;
            }
            out.extend(&buf[..n]);
            done += n;
        }
    }

    /// Writes the pieces to the file `fd` with one `writev`: the bytes it took, `Ok(0)`
    /// when it would block.
    pub fn write_file(&self, fd: RawFd) -> io::Result<usize> {
        let pieces = self.iovecs();
        let count = pieces.len().min(MAX_IOVECS) as libc::c_int;
        retry(|| {
            // SAFETY: the pieces were checked to lie in guest memory (or are a host
            // buffer this value borrows), kept mapped for the call; writev only reads
            // them, and `count` is at most their number.
            unsafe { libc::writev(fd, pieces.as_ptr(), count) }
        })
    }

    /// Sends the pieces on the stream socket `fd` with one `sendmsg`, with no SIGPIPE
    /// for a peer that went away (an error instead): the bytes the socket took, `Ok(0)`
    /// when it would block.
    pub fn send_stream(&self, fd: RawFd) -> io::Result<usize> {
        let pieces = self.iovecs();
        // SAFETY: an all-zero msghdr is valid (no address, no control data).
        let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
        msg.msg_iov = pieces.as_ptr().cast_mut();
        msg.msg_iovlen = pieces.len() as _;
        retry(|| {
            // SAFETY: `msg` points at pieces that were checked to lie in guest memory
            // (or are a host buffer this value borrows), kept mapped for the call;
            // sendmsg only reads them.
            unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL) }
        })
    }
}

/// Calls `op` (a system call that returns a byte count or -1) until it is not
/// interrupted: the bytes it moved, `Ok(0)` when it would block.
fn retry(mut op: impl FnMut() -> libc::ssize_t) -> io::Result<usize> {
    loop {
        let n = op();
        if n >= 0 {
            // A non-negative `ssize_t` fits in `usize`.
            return Ok(n as usize);
        }
        let e = io::Error::last_os_error();
        match e.kind() {
            io::ErrorKind::Interrupted => {}
            io::ErrorKind::WouldBlock => return Ok(0),
            _ => return Err(e),
        }
    }
}

#[cfg(test)]
mod tests;

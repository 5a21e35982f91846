//! Moving frames between the queues and the backend, on the device's event loop.

use std::io::ErrorKind;
use std::sync::Arc;
use std::time::Duration;

use guest_memory::GuestMemoryMmap;
use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend as _};

use super::backend::{NetBackend, VNET_HDR_LEN};
use super::receive::Receiver;
use crate::virtio::counters::DeviceCounters;
use crate::virtio::iovec::{GuestIovecs, IovecBuf};
use crate::virtio::worker::{Handler, PollWindow, Wake};
use crate::virtio::{check_notified, has_pending, Chains, GuestMemory, Interrupt};
use crate::warn_ratelimited;

const NAME: &str = "virtio-net";
const BACKEND: Token = Token(0);
/// The largest frame with its header: a 64 KiB TSO packet, its ethernet and VLAN
/// headers, and the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_536 + 64;
/// How soon a frame the backend could not take is offered again (macOS sends no
/// writable event for a datagram socket whose peer was full).
const RETRY: Duration = Duration::from_millis(1);

struct Running {
    memory: GuestMemory,
    rx: Queue,
    tx: Queue,
    interrupt: Interrupt,
    mergeable: bool,
}

/// The device's frames in flight and its backend.
pub(super) struct Frames {
    backend: Box<dyn NetBackend>,
    running: Option<Running>,
    receiver: Receiver,
    /// Frames each way, for metrics (shared with the receiver and the device).
    counters: Arc<DeviceCounters>,
    /// A frame from the guest the backend could not take yet: `tx_buf[..tx_len]`.
    tx_buf: Vec<u8>,
    tx_len: usize,
    /// The pieces of a frame sent straight from the guest's buffers.
    tx_iov: IovecBuf,
    /// A chain the backend could not take straight from the guest's buffers went back to
    /// the ring: try again on a timer (macOS sends no writable event after ENOBUFS).
    tx_blocked: bool,
    /// How long the loop keeps looking at the queues (and the backend) after a pass: a
    /// steady stream of frames is then served without a thread wake-up per batch.
    window: PollWindow,
}

impl Frames {
    pub(super) fn new(backend: Box<dyn NetBackend>, counters: Arc<DeviceCounters>) -> Self {
        Frames {
            backend,
            running: None,
            receiver: Receiver::new(Arc::clone(&counters)),
            counters,
            tx_buf: vec![0; MAX_FRAME],
            tx_len: 0,
            tx_iov: IovecBuf::new(),
            tx_blocked: false,
            window: PollWindow::new(),
        }
    }

    pub(super) fn attach(
        &mut self,
        memory: GuestMemory,
        rx: Queue,
        tx: Queue,
        interrupt: Interrupt,
        features: u64,
    ) -> std::io::Result<()> {
        self.backend.set_offloads(features)?;
        let mergeable = features & (1 << VIRTIO_NET_F_MRG_RXBUF) != 0;
        self.running = Some(Running { memory, rx, tx, interrupt, mergeable });
        Ok(())
    }

    fn pump(&mut self) {
        let Some(mut run) = self.running.take() else { return };
        let memory = run.memory.memory();
        // Each pass interrupts the driver, if it asked to be, when it ends.
        self.transmit(memory, &mut Chains::new(NAME, &mut run.tx, memory, &run.interrupt));
        let mut rx = Chains::new(NAME, &mut run.rx, memory, &run.interrupt);
        self.receiver.receive(&mut *self.backend, memory, &mut rx, run.mergeable);
        drop(rx);
        self.running = Some(run);
    }

    fn transmit(&mut self, memory: &GuestMemoryMmap, tx: &mut Chains<'_, '_>) {
        self.tx_blocked = false;
        match self.backend.flush() {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(e) => warn_ratelimited!("{NAME}: frame not sent: {e}"),
        }
        let skip = if self.backend.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        while let Some(mut batch) = tx.batch() {
            loop {
                if !self.send_copied() {
                    return;
                }
                let Some(chain) = batch.next() else { break };
                let head = chain.head_index();
                // Straight from the guest's buffers when the backend can; else copy below.
                let mut frame = GuestIovecs::with_spill(&mut self.tx_iov);
                let pushed = frame.push_chain(memory, chain.clone(), false, skip, MAX_FRAME - skip).filter(|&n| n > 0);
                let direct = pushed.and_then(|_| self.backend.send_guest(&frame));
                drop(frame);
                match direct {
                    Some(Err(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                        // Nothing sent: the chain goes back, to be sent when the backend is ready.
                        batch.put_back(1);
                        self.tx_blocked = true;
                        return;
                    }
                    Some(Ok(())) => {
                        // The frame's bytes, without the virtio-net header.
                        let sent = pushed.unwrap_or(0).saturating_sub(VNET_HDR_LEN - skip);
                        self.counters.request(0, sent as u64);
                    }
                    Some(Err(e)) => {
                        warn_ratelimited!("{NAME}: frame not sent: {e}");
                        self.counters.request(0, 0);
                        self.counters.error();
                    }
                    None => {
                        self.tx_len = gather(memory, chain, &mut self.tx_buf).unwrap_or(0);
                        // Counted here; a send that then fails counts an error too.
                        self.counters.request(0, self.tx_len.saturating_sub(VNET_HDR_LEN) as u64);
                        if self.tx_len == 0 {
                            self.counters.error();
                        }
                    }
                }
                if !batch.give_back(head, 0) {
                    return;
                }
            }
        }
        self.send_copied();
    }

    /// Sends the frame copied from the guest, if any; false if the backend cannot take
    /// it yet.
    fn send_copied(&mut self) -> bool {
        if self.tx_len == 0 {
            return true;
        }
        let skip = if self.backend.vnet_hdr() { 0 } else { VNET_HDR_LEN };
        match self.backend.send(&self.tx_buf[skip..self.tx_len]) {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return false,
            Err(e) => {
                warn_ratelimited!("{NAME}: frame not sent: {e}");
                self.counters.error();
            }
        }
        self.tx_len = 0;
        true
    }
}

/// Bytes the chain's leading device-writable descriptors can take, counting only those
/// that lie inside guest memory (how much of a received frame a receive chain takes;
/// public for the fuzz targets).
pub fn capacity(memory: &GuestMemoryMmap, chain: &DescriptorChain<&GuestMemoryMmap>) -> usize {
    let mut total = 0usize;
    for desc in chain.clone() {
        if !desc.is_write_only() || !memory.check_range(desc.addr(), desc.len() as usize) {
            break;
        }
        total = total.saturating_add(desc.len() as usize);
    }
    total
}

/// Copies a transmit chain (header and frame) into `buf`; `None` for a chain that is
/// malformed, outside guest memory, shorter than the header or longer than
/// [`MAX_FRAME`] (the copy taken when a frame cannot go straight from the guest's
/// buffers; public for the fuzz targets).
pub fn gather(memory: &GuestMemoryMmap, chain: DescriptorChain<&GuestMemoryMmap>, buf: &mut [u8]) -> Option<usize> {
    let mut len = 0usize;
    for desc in chain {
        let n = desc.len() as usize;
        if desc.is_write_only() || n > buf.len() - len {
            warn_ratelimited!("{NAME}: transmit chain malformed or over {MAX_FRAME} bytes; dropped");
            return None;
        }
        if memory.read_slice(&mut buf[len..len + n], desc.addr()).is_err() {
            warn_ratelimited!("{NAME}: transmit buffer at {:#x} is outside guest memory; dropped", desc.addr().0);
            return None;
        }
        len += n;
    }
    if len < VNET_HDR_LEN {
        warn_ratelimited!("{NAME}: transmit chain of {len} bytes has no room for a header; dropped");
        return None;
    }
    Some(len)
}

impl Handler for Frames {
    fn register(&mut self, registry: &Registry) -> std::io::Result<()> {
        match self.backend.fd() {
            Some(fd) => registry.register(&mut SourceFd(&fd), BACKEND, Interest::READABLE | Interest::WRITABLE),
            None => Ok(()),
        }
    }

    fn set_wake(&mut self, wake: Wake) {
        self.backend.set_wake(wake);
    }

    fn notified(&mut self, _registry: &Registry, queues: u32) {
        if queues & !crate::virtio::worker::BACKEND != 0 {
            // The driver's notification, not the backend's wake: the time asleep tells
            // how close together the guest's requests come.
            self.window.woke();
        }
        if let Some(run) = &self.running {
            check_notified(NAME, queues, &[&run.rx, &run.tx], run.memory.memory(), &run.interrupt);
        }
        self.pump();
    }

    fn ready(&mut self, _registry: &Registry, _event: &Event) {
        self.pump();
    }

    fn deregister(&mut self, registry: &Registry) {
        if let Some(fd) = self.backend.fd() {
            let _ = registry.deregister(&mut SourceFd(&fd));
        }
    }

    fn detach(&mut self) {
        self.running = None;
        // Frames in flight belonged to the driver that reset the device.
        self.receiver.clear();
        self.tx_len = 0;
        self.tx_blocked = false;
        self.window = PollWindow::new();
    }

    fn poll_window(&mut self) -> Duration {
        self.window.next(self.running.is_some())
    }

    /// Frames the guest queued to send, or (when it has receive buffers posted) frames
    /// that reached the backend: a hit only if the pass moved some, so a backend that
    /// takes nothing ends the spin.
    fn poll(&mut self, _registry: &Registry) -> bool {
        let Some(run) = self.running.as_ref() else { return false };
        let memory = run.memory.memory();
        let send = self.tx_len == 0 && !self.tx_blocked && has_pending(NAME, &run.tx, memory, &run.interrupt);
        if !send && !has_pending(NAME, &run.rx, memory, &run.interrupt) {
            return false;
        }
        let positions = |run: &Running| (run.tx.next_avail(), run.rx.next_avail());
        let before = positions(run);
        self.pump();
        if self.running.as_ref().map(positions) == Some(before) {
            return false;
        }
        self.window.hit();
        true
    }

    fn poll_expired(&mut self) {
        self.window.expired();
    }

    fn next_timeout(&self) -> Option<Duration> {
        (self.tx_len > 0 || self.tx_blocked).then_some(RETRY)
    }

    fn timeout(&mut self, _registry: &Registry) {
        self.pump();
    }
}

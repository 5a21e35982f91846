//! Moving frames between the queues and the backend, on the device's event loop.

use std::io::ErrorKind;
use std::time::Duration;

use guest_memory::GuestMemoryMmap;
use mio::event::Event;
use mio::unix::SourceFd;
use mio::{Interest, Registry, Token};
use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Bytes, GuestMemoryBackend as _};

use super::backend::{NetBackend, VNET_HDR_LEN};
use super::QUEUE_SIZE;
use crate::virtio::iovec::GuestIovecs;
use crate::virtio::worker::{Handler, Wake};
use crate::virtio::{check_notified, give_back, next_chain, notify_driver, write_chain, GuestMemory, Interrupt};
use crate::warn_ratelimited;

const NAME: &str = "virtio-net";
const BACKEND: Token = Token(0);
/// The largest frame with its header: a 64 KiB TSO packet, its ethernet and VLAN
/// headers, and the virtio-net header.
pub const MAX_FRAME: usize = VNET_HDR_LEN + 65_536 + 64;
/// The most receives in a row that bring no frame before the device waits for the
/// backend's next readiness.
const MAX_FRUITLESS_RECEIVES: u32 = 64;
/// How soon a frame the backend could not take is offered again (macOS sends no
/// writable event for a datagram socket whose peer was full).
const RETRY: Duration = Duration::from_millis(1);
/// Offset of `num_buffers` in the virtio-net header.
const NUM_BUFFERS: usize = 10;

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
    /// A received frame (with header) waiting for guest buffers: `rx_buf[..rx_len]`.
    rx_buf: Vec<u8>,
    rx_len: usize,
    /// A frame from the guest the backend could not take yet: `tx_buf[..tx_len]`.
    tx_buf: Vec<u8>,
    tx_len: usize,
    /// A chain the backend could not take straight from the guest's buffers went back to
    /// the ring: try again on a timer (macOS sends no writable event after ENOBUFS).
    tx_blocked: bool,
}

/// What became of a received frame.
enum Delivery {
    Delivered,
    /// Not enough guest buffers: the frame waits.
    NoBuffers,
    Dropped,
}

impl Frames {
    pub(super) fn new(backend: Box<dyn NetBackend>) -> Self {
        Frames {
            backend,
            running: None,
            rx_buf: vec![0; MAX_FRAME],
            rx_len: 0,
            tx_buf: vec![0; MAX_FRAME],
            tx_len: 0,
            tx_blocked: false,
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
        let (tx_from, rx_from) = (run.tx.next_used(), run.rx.next_used());
        self.transmit(memory, &mut run.tx, &run.interrupt);
        self.receive(memory, &mut run.rx, &run.interrupt, run.mergeable);
        notify_driver(NAME, &mut run.tx, memory, &run.interrupt, tx_from);
        notify_driver(NAME, &mut run.rx, memory, &run.interrupt, rx_from);
        self.running = Some(run);
    }

    fn transmit(&mut self, memory: &GuestMemoryMmap, tx: &mut Queue, interrupt: &Interrupt) {
        self.tx_blocked = false;
        match self.backend.flush() {
            Ok(()) => {}
            Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
            Err(e) => warn_ratelimited!("{NAME}: frame not sent: {e}"),
        }
        loop {
            if self.tx_len > 0 {
                let skip = if self.backend.vnet_hdr() { 0 } else { VNET_HDR_LEN };
                match self.backend.send(&self.tx_buf[skip..self.tx_len]) {
                    Ok(()) => self.tx_len = 0,
                    Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => return,
                    Err(e) => {
                        warn_ratelimited!("{NAME}: frame not sent: {e}");
                        self.tx_len = 0;
                    }
                }
            }
            let Some(chain) = next_chain(NAME, tx, memory, interrupt) else { return };
            let head = chain.head_index();
            // Straight from the guest's buffers when the backend can; else copy below.
            let skip = if self.backend.vnet_hdr() { 0 } else { VNET_HDR_LEN };
            let direct = GuestIovecs::from_chain(memory, chain.clone(), false, skip, MAX_FRAME - skip)
                .filter(|frame| !frame.is_empty())
                .and_then(|frame| self.backend.send_guest(&frame));
            match direct {
                Some(Err(e)) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::Interrupted) => {
                    // Nothing sent: the chain goes back, to be sent when the backend is ready.
                    tx.set_next_avail(tx.next_avail().wrapping_sub(1));
                    self.tx_blocked = true;
                    return;
                }
                Some(result) => {
                    if let Err(e) = result {
                        warn_ratelimited!("{NAME}: frame not sent: {e}");
                    }
                    if !give_back(NAME, tx, memory, head, 0) {
                        return;
                    }
                    continue;
                }
                None => {}
            }
            self.tx_len = gather(memory, chain, &mut self.tx_buf).unwrap_or(0);
            if !give_back(NAME, tx, memory, head, 0) {
                return;
            }
        }
    }

    fn receive(&mut self, memory: &GuestMemoryMmap, rx: &mut Queue, interrupt: &Interrupt, mergeable: bool) {
        // Receives that bring no frame (a short one, an interruption): a backend that does
        // only that (an embedder's, say) must not keep the device's thread here for ever.
        let mut fruitless = 0u32;
        loop {
            if self.rx_len == 0 {
                if fruitless == MAX_FRUITLESS_RECEIVES {
                    warn_ratelimited!(
                        "{NAME}: the backend keeps returning no frame; receiving waits for its next wake"
                    );
                    return;
                }
                let vnet_hdr = self.backend.vnet_hdr();
                let buf = if vnet_hdr { &mut self.rx_buf[..] } else { &mut self.rx_buf[VNET_HDR_LEN..] };
                let room = buf.len();
                match self.backend.recv(buf) {
                    Ok(n) if n > room => {
                        warn_ratelimited!("{NAME}: the backend says it received {n} bytes into {room}; dropped");
                        fruitless += 1;
                        continue;
                    }
                    Ok(n) if vnet_hdr && n < VNET_HDR_LEN => {
                        fruitless += 1;
                        continue;
                    }
                    Ok(n) => {
                        self.rx_len = if vnet_hdr { n } else { n + VNET_HDR_LEN };
                        if !vnet_hdr {
                            self.rx_buf[..VNET_HDR_LEN].fill(0);
                        }
                    }
                    Err(e) if e.kind() == ErrorKind::Interrupted => {
                        fruitless += 1;
                        continue;
                    }
                    Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                    Err(e) => {
                        warn_ratelimited!("{NAME}: receive failed: {e}");
                        return;
                    }
                }
            }
            match self.deliver(memory, rx, interrupt, mergeable) {
                Delivery::NoBuffers => return,
                Delivery::Delivered | Delivery::Dropped => self.rx_len = 0,
            }
        }
    }

    /// Writes the waiting frame into as many receive buffers as it needs (one without
    /// MRG_RXBUF), setting the header's `num_buffers`.
    fn deliver(
        &mut self,
        memory: &GuestMemoryMmap,
        rx: &mut Queue,
        interrupt: &Interrupt,
        mergeable: bool,
    ) -> Delivery {
        let len = self.rx_len;
        let most = if mergeable { usize::from(QUEUE_SIZE) } else { 1 };
        let mut picked: Vec<(DescriptorChain<&GuestMemoryMmap>, usize)> = Vec::new();
        let mut room = 0usize;
        while room < len {
            let Some(chain) = next_chain(NAME, rx, memory, interrupt) else {
                // Put the chains back for when the driver has added more.
                rx.set_next_avail(rx.next_avail().wrapping_sub(picked.len() as u16));
                return Delivery::NoBuffers;
            };
            let capacity = capacity(memory, &chain);
            picked.push((chain, capacity));
            room += capacity;
            if capacity == 0 || (picked.len() == most && room < len) {
                // Malformed or too small: the frame is dropped and the buffers go back empty.
                warn_ratelimited!("{NAME}: receive buffers too small or malformed; a {len}-byte frame is dropped");
                for (chain, _) in &picked {
                    give_back(NAME, rx, memory, chain.head_index(), 0);
                }
                return Delivery::Dropped;
            }
        }
        let count = picked.len() as u16;
        self.rx_buf[NUM_BUFFERS..NUM_BUFFERS + 2].copy_from_slice(&count.to_le_bytes());
        let mut at = 0usize;
        for (chain, capacity) in picked {
            let head = chain.head_index();
            let n = capacity.min(len - at);
            // Within the capacity checked above, so it all fits.
            write_chain(NAME, memory, chain, &self.rx_buf[at..at + n]);
            at += n;
            give_back(NAME, rx, memory, head, n as u32);
        }
        Delivery::Delivered
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
        self.rx_len = 0;
        self.tx_len = 0;
        self.tx_blocked = false;
    }

    fn next_timeout(&self) -> Option<Duration> {
        (self.tx_len > 0 || self.tx_blocked).then_some(RETRY)
    }

    fn timeout(&mut self, _registry: &Registry) {
        self.pump();
    }
}

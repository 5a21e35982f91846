//! virtio-console (virtio spec v1.2 section 5.3): one port, `hvc0` in a Linux guest.
//!
//! Queue 0 (receiveq) carries host input to the guest, queue 1 (transmitq) guest output
//! to the host. The backend is a [`Backend`]: a writer with an optional input pipe (the
//! host terminal, a FIFO), a regular file the device writes itself, or a unix socket
//! served to one client at a time. The device
//! runs on a [`Worker`](super::worker::Worker) event loop, so guest output never blocks
//! a vCPU and host input is read only when the guest has posted buffers for it, and
//! only once the guest has written to the port: Linux discards input that arrives
//! between posting its first buffers and connecting the console (without MULTIPORT
//! there is no other sign that it is ready).
//! MULTIPORT, SIZE and EMERG_WRITE are not offered; EVENT_IDX is.

mod port;
#[cfg(test)]
mod tests;

use std::sync::Arc;

use mio::net::UnixListener;
use mio::unix::pipe;
use virtio_bindings::virtio_ids::VIRTIO_ID_CONSOLE;
use virtio_bindings::virtio_ring::VIRTIO_RING_F_EVENT_IDX;

use self::port::Port;
pub use self::port::{collect, MAX_CHAIN_OUTPUT};
use super::counters::{DeviceCounters, DeviceStats};
use super::notifier::QueueNotifier;
use super::worker::Slot;
use super::{queue_pair, ActivateError, Activation, VirtioDevice};
use crate::output::Output;

/// Queue size offered to the driver.
pub const QUEUE_SIZE: u16 = 256;
/// The receive queue's index.
pub const RX_QUEUE: u16 = 0;
/// The transmit queue's index.
pub const TX_QUEUE: u16 = 1;
/// Guest output a [`Backend::Stream`]'s [`Output`] holds for the host (and as much
/// again being written): more than a pass's worth of the guest's usual buffers, so the
/// device empties the ring without waiting for the writer's thread.
pub const OUTPUT_BUFFER: usize = 256 * 1024;

/// An [`Output`] for a [`Backend::Stream`] to `writer`.
pub fn stream_output(writer: Box<dyn std::io::Write + Send>) -> Output {
    Output::new("virtio-console-out", writer, OUTPUT_BUFFER)
}

/// Where the console's bytes go and come from.
pub enum Backend {
    /// Output to a writer (the terminal, a file); input, if any, from a pipe that the
    /// host side fills (the terminal's reader thread, an embedder's reader).
    Stream {
        /// Where guest output goes: a thread of its own writes it, so a host writer that
        /// blocks holds up neither a vCPU nor the device (which stops taking output from
        /// the guest while the buffer is full).
        output: Output,
        /// Host input; `None` for an output-only console.
        input: Option<pipe::Receiver>,
    },
    /// Output to a regular file, written by the device itself straight from the guest's
    /// buffers (one `writev` a pass, no copy and no thread between): a regular file
    /// takes its writes without waiting for a reader. Anything else that may block (a
    /// terminal, a FIFO) belongs in a [`Backend::Stream`].
    File(std::fs::File),
    /// A unix socket the VMM listens on. One client at a time has the console (a new
    /// one takes over once it has stayed `host_socket::NEWCOMER_GRACE`, so a connection
    /// that closes at once displaces nobody); output written while none is connected is
    /// kept (the last 64 KiB) for the next one. A client that shuts only its writing
    /// side keeps getting output.
    Socket(UnixListener),
}

impl std::fmt::Debug for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Backend::Stream { input, .. } => write!(f, "Stream(input: {})", input.is_some()),
            Backend::File(_) => f.write_str("File"),
            Backend::Socket(_) => f.write_str("Socket"),
        }
    }
}

/// The console device.
pub struct Console {
    port: Slot<Port>,
    counters: Arc<DeviceCounters>,
}

impl std::fmt::Debug for Console {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Console").field("port", &self.port).finish()
    }
}

impl Console {
    /// A console over `backend`.
    pub fn new(backend: Backend) -> Self {
        let counters = Arc::new(DeviceCounters::default());
        Console { port: Slot::new("virtio-console", Port::new(backend, Arc::clone(&counters))), counters }
    }
}

impl VirtioDevice for Console {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_CONSOLE
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        1 << VIRTIO_RING_F_EVENT_IDX
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, .. } = activation;
        let (rx, tx) = queue_pair(queues)?;
        self.port.start(|port| {
            port.attach(memory, rx, tx, interrupt);
            Ok(())
        })
    }

    fn queue_notify(&mut self, index: u16) {
        self.port.notify(index);
    }

    fn wants_notifiers(&self) -> bool {
        true
    }

    fn set_notifiers(&mut self, notifiers: Vec<QueueNotifier>) {
        self.port.watch_all(notifiers);
    }

    fn reset(&mut self) {
        self.port.stop();
    }

    fn counters(&self) -> Option<DeviceStats> {
        Some(self.counters.snapshot())
    }
}

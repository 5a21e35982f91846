//! virtio-input (virtio spec v1.2 section 5.8) as a power button: an input device whose
//! only key is KEY_POWER, which the host presses to ask the guest to shut down cleanly.
//!
//! Why virtio-input and not QEMU's PL061 GPIO with a `gpio-keys` node: Debian's cloud
//! arm64 kernel has no `gpio-keys` driver, while every Debian arm64 kernel (and hvrun's
//! own) has `virtio_input`. The guest's input layer turns the key into an `EV_KEY`
//! event on `/dev/input/event*`, where systemd-logind (`HandlePowerKey=poweroff`), acpid
//! or a script of the guest's own acts on it.
//!
//! Two queues: the event queue, into whose device-writable buffers the device writes
//! `struct virtio_input_event` (8 bytes), and the status queue (LEDs and the like),
//! whose buffers are returned unread. A press is four events (key down, report, key up,
//! report). Presses wait for the driver's buffers, at most [`MAX_PENDING`] events: a host
//! that presses faster than the guest listens loses presses, never memory. A press before
//! the driver starts is not taken.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex};

use guest_memory::GuestMemoryMmap;
use virtio_bindings::virtio_ids::VIRTIO_ID_INPUT;
use virtio_bindings::virtio_input::{
    virtio_input_config_select_VIRTIO_INPUT_CFG_EV_BITS as CFG_EV_BITS,
    virtio_input_config_select_VIRTIO_INPUT_CFG_ID_DEVIDS as CFG_ID_DEVIDS,
    virtio_input_config_select_VIRTIO_INPUT_CFG_ID_NAME as CFG_ID_NAME,
};
use virtio_queue::Queue;
use vm_memory::Bytes;

use super::{drain_queue, drain_queue_while, has_pending, queue_pair, read_config_bytes, Chain};
use super::{ActivateError, Activation, GuestMemory, Interrupt, VirtioDevice};
use crate::warn_ratelimited;

/// The key a press sends (Linux's `KEY_POWER`).
pub const KEY_POWER: u16 = 116;
/// The most events waiting for the driver's buffers.
pub const MAX_PENDING: usize = 64;
/// Queue size offered to the driver (Linux posts as many event buffers as it may).
const QUEUE_SIZE: u16 = 64;
const EV_SYN: u16 = 0;
const EV_KEY: u16 = 1;
const SYN_REPORT: u16 = 0;
/// The device's name, as `/sys/class/input/*/name` shows it.
pub const NAME: &str = "hvrun power button";
/// `BUS_VIRTUAL` from Linux's `input.h`.
const BUS_VIRTUAL: u16 = 6;
/// Where the answer to a select starts in the configuration space (after select,
/// subsel, size and 5 reserved bytes).
const CONFIG_DATA: usize = 8;

/// One `struct virtio_input_event`: type, code, value, little-endian.
fn event(kind: u16, code: u16, value: u32) -> [u8; 8] {
    let mut e = [0u8; 8];
    e[..2].copy_from_slice(&kind.to_le_bytes());
    e[2..4].copy_from_slice(&code.to_le_bytes());
    e[4..].copy_from_slice(&value.to_le_bytes());
    e
}

struct Running {
    memory: GuestMemory,
    events: Queue,
    status: Queue,
    interrupt: Interrupt,
}

#[derive(Default)]
struct State {
    running: Option<Running>,
    pending: VecDeque<[u8; 8]>,
}

impl State {
    /// Hands waiting events to the driver's buffers, one event a buffer.
    fn deliver(&mut self) {
        let State { running: Some(run), pending } = self else { return };
        let memory = run.memory.memory();
        let (queue, interrupt) = (&mut run.events, &run.interrupt);
        let waiting = std::cell::Cell::new(pending.len());
        drain_queue_while(
            "virtio-input",
            queue,
            memory,
            interrupt,
            || waiting.get() > 0,
            |chain| {
                waiting.set(waiting.get() - 1);
                pending.pop_front().map_or(0, |e| write_event(memory, chain, &e))
            },
        );
    }
}

/// Writes `e` into the chain's first descriptor; the bytes written (0 when the driver's
/// buffer cannot hold an event: the event is lost, as on a full queue).
fn write_event(memory: &GuestMemoryMmap, mut chain: Chain<'_>, e: &[u8; 8]) -> u32 {
    match chain.next() {
        Some(desc) if desc.is_write_only() && desc.len() as usize >= e.len() => {
            if memory.write_slice(e, desc.addr()).is_ok() {
                return e.len() as u32;
            }
            warn_ratelimited!("virtio-input: event buffer at {:#x} is outside guest memory", desc.addr().0);
            0
        }
        _ => {
            warn_ratelimited!("virtio-input: an event buffer that is not an 8-byte device-writable one");
            0
        }
    }
}

/// Presses the power button from any thread.
#[derive(Clone)]
pub struct PowerButton {
    state: Arc<Mutex<State>>,
}

impl std::fmt::Debug for PowerButton {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerButton").finish_non_exhaustive()
    }
}

impl PowerButton {
    /// Presses and releases the key. Returns whether the press was taken: a driver is
    /// running the device, and the events waiting for its buffers stay within
    /// [`MAX_PENDING`]. A press before the driver has started is not kept: the guest's
    /// input layer would deliver it to nobody (no program has the device open yet).
    pub fn press(&self) -> bool {
        let mut state = lock(&self.state);
        if state.running.is_none() {
            return false;
        }
        if state.pending.len() + 4 > MAX_PENDING {
            warn_ratelimited!("virtio-input: the guest takes no events; a press is dropped");
            return false;
        }
        let press = [event(EV_KEY, KEY_POWER, 1), event(EV_SYN, SYN_REPORT, 0)];
        let release = [event(EV_KEY, KEY_POWER, 0), event(EV_SYN, SYN_REPORT, 0)];
        state.pending.extend(press.into_iter().chain(release));
        state.deliver();
        true
    }
}

fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|e| e.into_inner())
}

/// The power-button device.
pub struct PowerButtonDevice {
    state: Arc<Mutex<State>>,
    select: u8,
    subsel: u8,
}

impl std::fmt::Debug for PowerButtonDevice {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("PowerButtonDevice").field("select", &self.select).finish_non_exhaustive()
    }
}

impl PowerButtonDevice {
    /// A device and the button that presses it.
    pub fn new() -> (Self, PowerButton) {
        let state = Arc::new(Mutex::new(State::default()));
        (PowerButtonDevice { state: Arc::clone(&state), select: 0, subsel: 0 }, PowerButton { state })
    }

    /// The answer to the driver's current select/subsel: what follows `size`.
    fn answer(&self) -> Vec<u8> {
        match u32::from(self.select) {
            CFG_ID_NAME => NAME.as_bytes().to_vec(),
            CFG_ID_DEVIDS => [BUS_VIRTUAL, 0, 1, 1].iter().flat_map(|v| v.to_le_bytes()).collect(),
            CFG_EV_BITS if u16::from(self.subsel) == EV_KEY => {
                let mut bitmap = vec![0u8; usize::from(KEY_POWER) / 8 + 1];
                bitmap[usize::from(KEY_POWER) / 8] |= 1 << (KEY_POWER % 8);
                bitmap
            }
            // No serial, properties, other event types or axes.
            _ => Vec::new(),
        }
    }
}

impl VirtioDevice for PowerButtonDevice {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_INPUT
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        0
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        let answer = self.answer();
        let mut config = vec![0u8; CONFIG_DATA + answer.len()];
        config[0] = self.select;
        config[1] = self.subsel;
        config[2] = answer.len() as u8;
        config[CONFIG_DATA..].copy_from_slice(&answer);
        read_config_bytes(&config, offset, data);
    }

    fn write_config(&mut self, offset: u64, data: &[u8]) {
        // Only select (byte 0) and subsel (byte 1) are the driver's to write.
        for (i, &byte) in data.iter().enumerate() {
            match offset.checked_add(i as u64) {
                Some(0) => self.select = byte,
                Some(1) => self.subsel = byte,
                _ => {}
            }
        }
    }

    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, .. } = activation;
        let (events, status) = queue_pair(queues)?;
        let mut state = lock(&self.state);
        state.running = Some(Running { memory, events, status, interrupt });
        Ok(())
    }

    fn queue_notify(&mut self, index: u16) {
        let mut state = lock(&self.state);
        match index {
            0 => {
                // Checked even with no event to give: a driver that broke the ring fails
                // the device now, not at the next press.
                if let Some(run) = state.running.as_ref() {
                    has_pending("virtio-input", &run.events, run.memory.memory(), &run.interrupt);
                }
                state.deliver();
            }
            _ => {
                let Some(run) = state.running.as_mut() else { return };
                // Status (the keyboard LEDs of a keyboard): nothing to show; returned.
                drain_queue("virtio-input", &mut run.status, run.memory.memory(), &run.interrupt, |_| 0);
            }
        }
    }

    fn reset(&mut self) {
        *lock(&self.state) = State::default();
        (self.select, self.subsel) = (0, 0);
    }

    /// The driver's select and subsel.
    fn save_state(&self) -> Vec<u8> {
        vec![self.select, self.subsel]
    }

    fn restore_state(&mut self, state: &[u8]) -> Result<(), String> {
        let [select, subsel] = *state else {
            return Err(format!("{} bytes of state, virtio-input's is 2", state.len()));
        };
        (self.select, self.subsel) = (select, subsel);
        Ok(())
    }
}

impl Drop for PowerButtonDevice {
    fn drop(&mut self) {
        // The button may outlive the machine (a `VmHandle` kept by an embedder): it must
        // not keep the guest's memory alive through the running queues.
        *lock(&self.state) = State::default();
    }
}

#[cfg(test)]
mod tests;

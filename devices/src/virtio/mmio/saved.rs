//! A virtio-mmio transport's state for snapshots: its registers, each queue's
//! configuration and position, the interrupt status and the device's own state.
//!
//! Saving stops the device ([`VirtioDevice::reset`]: its worker ends between passes, and a
//! block device's requests in hand finish on the disk). Each started queue's position is
//! then the used ring's index in guest memory: every chain the device gave back is there,
//! and a chain it took and did not give back (a request it was serving, a buffer it held
//! for later) is taken again after the restore, as the driver still owns none of them.
//! QEMU's virtio migration re-submits a block device's requests in flight the same way.
//!
//! Restoring (into a fresh transport, or into the same one to resume after a snapshot)
//! checks the whole saved state against the device and guest memory before it changes
//! anything, then starts the device again if the driver had it started.

use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use virtio_bindings::virtio_config::VIRTIO_CONFIG_S_DRIVER_OK;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};

use super::{join, new_queues, rings_outside_memory, MmioTransport, QueueAddrs, STATUS_BITS};

/// One queue as the driver configured it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedQueue {
    /// QueueNum.
    pub size: u16,
    /// QueueReady.
    pub ready: bool,
    /// The descriptor table's address as written (low, high).
    pub desc: [u32; 2],
    /// The available ring's address as written.
    pub avail: [u32; 2],
    /// The used ring's address as written.
    pub used: [u32; 2],
    /// The last QueueNum written was refused.
    pub bad_size: bool,
    /// Where the device goes on: its next available and next used index (the used
    /// ring's index when it was saved). 0 for a queue the device was not given.
    pub position: u16,
}

/// A transport's state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SavedTransport {
    /// The device's type, which the restoring transport's must match.
    pub device_type: u32,
    /// The Status register (without DEVICE_NEEDS_RESET, which `needs_reset` holds).
    pub status: u32,
    /// DeviceFeaturesSel.
    pub device_features_sel: u32,
    /// DriverFeaturesSel.
    pub driver_features_sel: u32,
    /// The features the driver accepted.
    pub acked_features: u64,
    /// QueueSel.
    pub queue_sel: u32,
    /// ConfigGeneration.
    pub config_generation: u32,
    /// InterruptStatus.
    pub interrupt_status: u32,
    /// The device had failed (DEVICE_NEEDS_RESET).
    pub needs_reset: bool,
    /// Every queue the device has, in order.
    pub queues: Vec<SavedQueue>,
    /// The device's own state ([`VirtioDevice::save_state`](super::VirtioDevice::save_state)).
    pub device: Vec<u8>,
}

/// How long a snapshot waits for a device to answer the requests it took.
const DRAIN: Duration = Duration::from_secs(10);

/// Why a transport cannot be saved now.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportSaveError {
    /// The device did not answer the requests it took in time (a disk that hangs).
    #[error("virtio device type {device_type} did not finish the requests of queue {queue} within {} s", DRAIN.as_secs())]
    Busy {
        /// The device's type.
        device_type: u32,
        /// The queue still busy.
        queue: usize,
    },
}

/// Why a saved transport cannot be restored into this one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TransportRestoreError {
    /// Saved from another kind of device.
    #[error("the saved device is of type {saved}, this one is of type {here}")]
    DeviceType {
        /// The saved device's type.
        saved: u32,
        /// This device's.
        here: u32,
    },
    /// A different number of queues.
    #[error("the saved device has {saved} queues, this one {here}")]
    QueueCount {
        /// Saved.
        saved: usize,
        /// Here.
        here: usize,
    },
    /// Features this device does not offer, or status bits no driver sets.
    #[error("the saved {what} {value:#x} is not one this device can have")]
    Register {
        /// Which register.
        what: &'static str,
        /// Its value.
        value: u64,
    },
    /// A queue's size or rings are not valid here.
    #[error("saved queue {index}: {why}")]
    Queue {
        /// The queue.
        index: usize,
        /// What is wrong.
        why: String,
    },
    /// The device refused its own state.
    #[error("the device's own state: {0}")]
    Device(String),
}

impl MmioTransport {
    /// Stops the device, if it runs, and returns the transport's state (a device that
    /// answers every chain answers those it took first). The transport then
    /// stands as it was, with the device stopped: [`MmioTransport::restore`] with the
    /// returned state starts it again (the guest must not run in between).
    pub fn save(&mut self) -> Result<SavedTransport, TransportSaveError> {
        if self.active && self.device.answers_every_chain() {
            self.drain()?;
        }
        // The device's own state first: stopping a device resets what the driver set.
        let device = self.device.save_state();
        if self.active {
            self.device.reset();
            self.active = false;
        }
        let memory = self.memory.memory();
        let mut queues = Vec::with_capacity(self.addrs.len());
        for (index, a) in self.addrs.iter().enumerate() {
            let QueueAddrs { desc, avail, used, bad_size } = *a;
            let saved = match self.queues.get(index) {
                // Before DRIVER_OK: the transport still holds the queue.
                Some(q) => SavedQueue { size: q.size(), ready: q.ready(), desc, avail, used, bad_size, position: 0 },
                // Handed to the device: its size is the handed-over one, its place the
                // used ring's index (inside memory: checked when it became ready).
                None => {
                    // A queue the driver did not enable keeps no size worth saving (it
                    // cannot be set up again before a reset): the device's largest.
                    let max = self.device.queue_max_sizes().get(index).copied().unwrap_or(0);
                    let size = self.handed_sizes.get(index).copied().unwrap_or(max);
                    let ready = index < self.handed_over;
                    let position = if ready {
                        memory
                            .read_obj::<u16>(GuestAddress(join(used).0.wrapping_add(2)))
                            .map(u16::from_le)
                            .unwrap_or(0)
                    } else {
                        0
                    };
                    SavedQueue { size, ready, desc, avail, used, bad_size, position }
                }
            };
            queues.push(saved);
        }
        Ok(SavedTransport {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            interrupt_status: self.interrupt.status(),
            needs_reset: self.interrupt.needs_reset(),
            queues,
            device,
        })
    }

    /// Waits until every started queue's used index equals its available index (the
    /// guest is paused: nothing new comes), so the device holds no request.
    fn drain(&self) -> Result<(), TransportSaveError> {
        let memory = self.memory.memory();
        let index_at = |ring: [u32; 2]| {
            memory.read_obj::<u16>(GuestAddress(join(ring).0.wrapping_add(2))).map(u16::from_le).unwrap_or(0)
        };
        let deadline = Instant::now() + DRAIN;
        loop {
            let busy = self.addrs[..self.handed_over].iter().position(|a| index_at(a.avail) != index_at(a.used));
            match busy {
                None => return Ok(()),
                Some(queue) if Instant::now() >= deadline => {
                    return Err(TransportSaveError::Busy { device_type: self.device.device_type(), queue })
                }
                Some(_) => std::thread::sleep(Duration::from_millis(1)),
            }
        }
    }

    /// Takes `saved` as this transport's state and starts the device if the driver had
    /// it started. The transport's part is checked whole first, so on an error the
    /// transport is as it was; a device that refuses its own state is left stopped.
    pub fn restore(&mut self, saved: &SavedTransport) -> Result<(), TransportRestoreError> {
        let here = self.device.device_type();
        if saved.device_type != here {
            return Err(TransportRestoreError::DeviceType { saved: saved.device_type, here });
        }
        let queues = self.rebuild_queues(saved)?;
        if saved.acked_features & !self.offered_features() != 0 {
            return Err(TransportRestoreError::Register { what: "driver features", value: saved.acked_features });
        }
        if saved.status & !STATUS_BITS != 0 {
            return Err(TransportRestoreError::Register { what: "status", value: u64::from(saved.status) });
        }
        if self.active {
            self.device.reset();
            self.active = false;
        }
        self.device.restore_state(&saved.device).map_err(TransportRestoreError::Device)?;
        self.handed_over = 0;
        self.handed_sizes.clear();
        self.status = saved.status;
        self.device_features_sel = saved.device_features_sel;
        self.driver_features_sel = saved.driver_features_sel;
        self.acked_features = saved.acked_features;
        self.queue_sel = saved.queue_sel;
        self.config_generation = saved.config_generation;
        self.queues = queues;
        self.addrs = saved
            .queues
            .iter()
            .map(|q| QueueAddrs { desc: q.desc, avail: q.avail, used: q.used, bad_size: q.bad_size })
            .collect();
        self.interrupt.restore(saved.interrupt_status, saved.needs_reset);
        if self.status & VIRTIO_CONFIG_S_DRIVER_OK != 0 && !saved.needs_reset {
            self.activate();
        }
        Ok(())
    }

    /// The device's queues as `saved` configured them, each checked as the driver's own
    /// writes would have been.
    fn rebuild_queues(&self, saved: &SavedTransport) -> Result<Vec<Queue>, TransportRestoreError> {
        let mut queues = new_queues(self.device.as_ref());
        if queues.len() != saved.queues.len() {
            return Err(TransportRestoreError::QueueCount { saved: saved.queues.len(), here: queues.len() });
        }
        for (index, (q, s)) in queues.iter_mut().zip(&saved.queues).enumerate() {
            let fail = |why: String| TransportRestoreError::Queue { index, why };
            q.try_set_size(s.size).map_err(|e| fail(format!("size {}: {e}", s.size)))?;
            if !s.ready {
                continue;
            }
            q.try_set_desc_table_address(join(s.desc))
                .and_then(|()| q.try_set_avail_ring_address(join(s.avail)))
                .and_then(|()| q.try_set_used_ring_address(join(s.used)))
                .map_err(|e| fail(e.to_string()))?;
            if let Some(ring) = rings_outside_memory(q, self.memory.memory()) {
                return Err(fail(format!("its {ring} is not inside guest memory")));
            }
            q.set_ready(true);
            q.set_next_avail(s.position);
            q.set_next_used(s.position);
        }
        Ok(queues)
    }
}

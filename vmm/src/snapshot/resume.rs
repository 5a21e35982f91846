//! Continuing a snapshot in a new machine: each vCPU takes its state on its own thread
//! (the first one checks this host's CPU against the snapshot's first), then the
//! interrupt controller, the UART, the RTC and every virtio transport take theirs, the
//! controller first so the devices' interrupt lines meet it restored.

use std::sync::{Arc, Mutex};

use devices::bus::lock;
use devices::pl011::Pl011;
use devices::pl031::Pl031;
use devices::virtio::mmio::MmioTransport;
use hypervisor::Vcpu;

use super::machine::{Loaded, Parts};
use super::{cpu_features, Requirements, SnapshotError};
use crate::irqchip::Irqchip;

/// A snapshot being continued in a machine built for it.
#[derive(Debug)]
pub struct Resume {
    loaded: Loaded,
    uart: Arc<Mutex<Pl011>>,
    rtc: Arc<Mutex<Pl031>>,
    transports: Vec<Arc<Mutex<MmioTransport>>>,
}

impl Resume {
    /// `loaded`, to be continued in the machine whose parts are `parts`: the same virtio
    /// devices in the same slots, or an error naming the first that differs.
    pub fn new(loaded: Loaded, parts: &Parts) -> Result<Resume, SnapshotError> {
        let saved: Vec<u32> = loaded.virtio.iter().map(|t| t.device_type).collect();
        let here: Vec<u32> = parts.transports.iter().map(|t| lock(t).device_type()).collect();
        if saved != here {
            return Err(SnapshotError::Mismatch(format!(
                "the snapshot's guest has virtio devices of types {saved:?} (in slot order), this machine {here:?}: \
                 give the same disks, network interfaces, console, balloon and vsock"
            )));
        }
        Ok(Resume {
            loaded,
            uart: Arc::clone(&parts.uart),
            rtc: Arc::clone(&parts.rtc),
            transports: parts.transports.clone(),
        })
    }

    /// Gives vCPU `index`, just created and not yet run, its saved state. The first
    /// checks this host's CPU features against the snapshot's before anything is written.
    pub fn vcpu<C: Vcpu + ?Sized>(&self, index: u32, vcpu: &mut C) -> hypervisor::Result<()> {
        let refuse = |why: String| hypervisor::Error::Unsupported(why);
        if index == 0 {
            let host = vcpu.save_state()?;
            let offered = Requirements { cpu_features: cpu_features(&host), ..self.loaded.requirements.clone() };
            self.loaded
                .requirements
                .check(&offered)
                .map_err(|e| refuse(format!("cannot restore on this host: {e}")))?;
        }
        let state = self.loaded.vcpus.get(index as usize).ok_or_else(|| refuse(format!("no saved vCPU {index}")))?;
        log::debug!("vcpu{index}: restoring {} registers, power {:?}", state.regs.len(), state.power);
        vcpu.restore_state(state)
    }

    /// Once every vCPU has its state: the interrupt controller, the UART, the RTC and the
    /// virtio transports (which start their devices again) take theirs.
    pub fn devices(&self, irqchip: &dyn Irqchip) -> Result<(), SnapshotError> {
        let mismatch = |what: &str, why: String| SnapshotError::Mismatch(format!("{what}: {why}"));
        irqchip.restore(&self.loaded.irqchip).map_err(|e| mismatch("the interrupt controller", e))?;
        lock(&self.uart).restore(&self.loaded.uart).map_err(|e| mismatch("the UART", e))?;
        lock(&self.rtc).restore(&self.loaded.rtc);
        for (slot, (transport, saved)) in self.transports.iter().zip(&self.loaded.virtio).enumerate() {
            lock(transport).restore(saved).map_err(|e| mismatch(&format!("virtio slot {slot}"), e.to_string()))?;
        }
        Ok(())
    }
}

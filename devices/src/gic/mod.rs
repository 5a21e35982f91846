//! An emulated GICv2: distributor and CPU interfaces in userspace.
//!
//! One [`Gic`] holds the state behind one lock (its critical sections are short: no
//! I/O but the output notification). It appears on the bus as two windows,
//! [`Gic::distributor`] and [`Gic::cpu_interface`]; devices raise SPIs through
//! [`Gic::spi_line`]; a vCPU's timer raises its PPI with [`Gic::set_ppi_level`]. The GIC
//! tells the VMM when a CPU's IRQ output changes through [`CpuIrqSink`], which each
//! hypervisor backend implements its own way (KVM: `KVM_IRQ_LINE`; HVF: mark the vCPU
//! and kick it), so this module never names a hypervisor.

mod regs;
pub mod state;

use std::sync::{Arc, Mutex};

use crate::bus::{lock, read_le, write_le, MmioDevice};
use crate::irq::IrqLine;
use crate::warn_ratelimited;
pub use state::{GicRestoreError, GicState, SavedGic, MAX_CPUS, NUM_SPIS, SPURIOUS};

/// The INTID of the EL1 virtual timer's PPI.
pub const VTIMER_PPI: u32 = 27;

/// Receives a CPU interface's IRQ output.
pub trait CpuIrqSink: Send + Sync {
    /// CPU `cpu`'s IRQ line is now `level`.
    fn set_cpu_irq(&self, cpu: usize, level: bool);
}

/// An emulated GICv2.
pub struct Gic {
    state: Mutex<GicState>,
    sink: Arc<dyn CpuIrqSink>,
}

impl std::fmt::Debug for Gic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Gic").finish_non_exhaustive()
    }
}

impl Gic {
    /// A GIC for `num_cpus` CPUs (1..=8) reporting outputs to `sink`.
    pub fn new(num_cpus: usize, sink: Arc<dyn CpuIrqSink>) -> Arc<Self> {
        Arc::new(Gic { state: Mutex::new(GicState::new(num_cpus)), sink })
    }

    fn with<R>(&self, f: impl FnOnce(&mut GicState) -> R) -> R {
        let mut state = lock(&self.state);
        let result = f(&mut state);
        state.update(&*self.sink);
        result
    }

    /// The GIC's whole state, for a snapshot.
    pub fn save(&self) -> SavedGic {
        lock(&self.state).save()
    }

    /// Puts back a state [`Gic::save`] gave (checked whole first: a refused one changes
    /// nothing), then drives the CPU lines it raises.
    pub fn restore(&self, saved: &SavedGic) -> Result<(), GicRestoreError> {
        self.with(|state| state.restore(saved))
    }

    /// The distributor window (4 KiB of registers).
    pub fn distributor(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(Distributor(Arc::clone(self)))
    }

    /// The CPU interface window (8 KiB of registers, banked per CPU).
    pub fn cpu_interface(self: &Arc<Self>) -> Arc<dyn MmioDevice> {
        Arc::new(CpuInterface(Arc::clone(self)))
    }

    /// The input line of SPI `spi` (INTID `32 + spi`), for a device.
    pub fn spi_line(self: &Arc<Self>, spi: u32) -> Arc<dyn IrqLine> {
        Arc::new(SpiLine { gic: Arc::clone(self), spi })
    }

    /// Drives PPI `id` (16..32) of `cpu`, e.g. [`VTIMER_PPI`].
    pub fn set_ppi_level(&self, cpu: usize, id: u32, level: bool) {
        self.with(|s| s.set_ppi_level(cpu, id, level));
    }

    /// The GIC's state, for debugging.
    pub fn dump(&self) -> String {
        lock(&self.state).dump()
    }

    /// Whether `cpu`'s IRQ output is asserted now.
    pub fn irq_asserted(&self, cpu: usize) -> bool {
        lock(&self.state).irq_out(cpu)
    }
}

struct SpiLine {
    gic: Arc<Gic>,
    spi: u32,
}

impl IrqLine for SpiLine {
    fn set_level(&self, level: bool) {
        self.gic.with(|s| s.set_spi_level(self.spi, level));
    }
}

/// Splits an access into its 32-bit register and the lanes it covers; `None` when it
/// crosses a register boundary.
fn lanes(offset: u64, len: usize) -> Option<(u64, u32, u8)> {
    let shift = (offset & 3) as u32;
    (len > 0 && shift as usize + len <= 4).then(|| (offset & !3, shift * 8, (((1u16 << len) - 1) << shift) as u8))
}

struct Distributor(Arc<Gic>);

impl MmioDevice for Distributor {
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]) {
        let value = match lanes(offset, data.len()) {
            Some((reg, shift, _)) if data.len() == 4 || regs::dist_byte_accessible(offset) => {
                let state = lock(&self.0.state);
                regs::dist_read32(&state, vcpu, reg) >> shift
            }
            _ => {
                warn_ratelimited!("gic: {}-byte distributor read at {offset:#x} ignored", data.len());
                0
            }
        };
        write_le(data, u64::from(value));
    }

    fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
        match lanes(offset, data.len()) {
            Some((reg, shift, mask)) if data.len() == 4 || regs::dist_byte_accessible(offset) => {
                let value = (read_le(data) as u32) << shift;
                self.0.with(|s| regs::dist_write32(s, vcpu, reg, value, mask));
            }
            _ => warn_ratelimited!("gic: {}-byte distributor write at {offset:#x} ignored", data.len()),
        }
    }
}

struct CpuInterface(Arc<Gic>);

impl MmioDevice for CpuInterface {
    fn read(&self, vcpu: usize, offset: u64, data: &mut [u8]) {
        let value = if data.len() == 4 && offset & 3 == 0 {
            self.0.with(|s| regs::cpu_read32(s, vcpu, offset))
        } else {
            warn_ratelimited!("gic: {}-byte cpu interface read at {offset:#x} ignored", data.len());
            0
        };
        write_le(data, u64::from(value));
    }

    fn write(&self, vcpu: usize, offset: u64, data: &[u8]) {
        if data.len() == 4 && offset & 3 == 0 {
            self.0.with(|s| regs::cpu_write32(s, vcpu, offset, read_le(data) as u32));
        } else {
            warn_ratelimited!("gic: {}-byte cpu interface write at {offset:#x} ignored", data.len());
        }
    }
}

#[cfg(test)]
mod tests;

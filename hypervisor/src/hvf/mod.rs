//! The Hypervisor.framework backend for Apple Silicon macOS, over `applevisor`.
//!
//! Not implemented yet (issue 5): creating a VM reports that clearly. The module exists
//! so the trait shape is checked against the real `applevisor` crate on every CI run.

use std::sync::Arc;

use crate::{Error, GuestRam, Reg, Result, VcpuExit, VmConfig};

/// Hypervisor.framework.
#[derive(Debug)]
pub struct Hvf {
    max_ipa_bits: u32,
}

impl Hvf {
    /// Checks that the framework is usable in this process.
    pub fn new() -> Result<Self> {
        let max_ipa_bits = applevisor::vm::VirtualMachineConfig::get_max_ipa_size().map_err(|e| {
            Error::Unavailable(format!(
                "Hypervisor.framework is not usable ({e:?}): run on Apple Silicon with the \
                 com.apple.security.hypervisor entitlement"
            ))
        })?;
        Ok(Hvf { max_ipa_bits })
    }
}

impl crate::Hypervisor for Hvf {
    type Vm = HvfVm;

    fn name(&self) -> &'static str {
        "hvf"
    }

    fn create_vm(&self, config: &VmConfig) -> Result<HvfVm> {
        if config.ipa_bits > self.max_ipa_bits {
            return Err(Error::Unsupported(format!(
                "this Mac supports {}-bit guest physical addresses, the machine needs {}",
                self.max_ipa_bits, config.ipa_bits
            )));
        }
        Err(Error::Unavailable("the Hypervisor.framework backend is not implemented yet".into()))
    }
}

/// A Hypervisor.framework VM (none can be created yet).
#[derive(Debug)]
pub enum HvfVm {}

impl crate::Vm for HvfVm {
    type Vcpu = HvfVcpu;

    fn map_memory(&mut self, _memory: &Arc<GuestRam>) -> Result<()> {
        match *self {}
    }

    fn create_vcpu(&self, _index: u32) -> Result<HvfVcpu> {
        match *self {}
    }
}

/// A Hypervisor.framework vCPU (none can be created yet).
#[derive(Debug)]
pub enum HvfVcpu {}

impl crate::Vcpu for HvfVcpu {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        match *self {}
    }

    fn kicker(&self) -> Arc<dyn crate::Kicker> {
        match *self {}
    }

    fn vtimer_asserted(&mut self) -> bool {
        match *self {}
    }

    fn set_irq_line(&mut self, _level: bool) -> Result<()> {
        match *self {}
    }

    fn set_reg(&mut self, _reg: Reg, _value: u64) -> Result<()> {
        match *self {}
    }

    fn get_reg(&mut self, _reg: Reg) -> Result<u64> {
        match *self {}
    }
}

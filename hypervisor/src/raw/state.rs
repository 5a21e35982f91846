//! A [`RawLoop`]'s vCPU saved and restored for snapshots (Hypervisor.framework): the
//! registers of [`state_regs`] (with the framework's GIC, its CPU interface's too), read
//! and written through [`RawVcpu::state_reg`] and [`RawVcpu::set_state_reg`], the
//! guest's virtual counter from the VM's clock, and the power state the loop keeps (on,
//! off, or waiting in WFI).

use crate::hvf_regs::{state_regs, state_width, StateReg};
use crate::state::{Power as SavedPower, RegValue, VcpuState};
use crate::{Error, Result};

use super::{RawLoop, RawVcpu, State};

impl<V: RawVcpu> RawLoop<V> {
    /// The vCPU's state, out of the guest (the VM paused). A load the VMM served and the
    /// guest has not yet taken completes first, as it would at the next run.
    pub(super) fn save(&mut self) -> Result<VcpuState> {
        self.finish_load()?;
        let clock = self.clock.clone().ok_or_else(|| Error::Unsupported("a vCPU without the VM's clock".into()))?;
        let mut regs = Vec::new();
        for reg in state_regs(self.kernel_gic) {
            let value = match reg {
                StateReg::VirtualCounter => clock.guest_counter().to_le_bytes().to_vec(),
                other => self.raw.state_reg(other)?,
            };
            if value.len() != reg.width() {
                return Err(Error::Unsupported(format!("{reg:?} read as {} bytes", value.len())));
            }
            regs.push(RegValue { id: reg.id(), value });
        }
        let power = match self.state {
            State::Off => SavedPower::Off,
            State::Running => SavedPower::On,
            State::Waiting => SavedPower::Suspended,
        };
        Ok(VcpuState { regs, power, serror: None })
    }

    /// Puts back a state [`RawLoop::save`] gave, on a vCPU not yet run: checked whole
    /// first (exactly this hvrun's register list, each of its width; no pending SError,
    /// which this backend never saves), then written. The guest's counter goes on from
    /// the saved value.
    pub(super) fn restore(&mut self, state: &VcpuState) -> Result<()> {
        let refuse = |why: String| Error::Unsupported(why);
        state.check(state_width).map_err(|e| refuse(e.to_string()))?;
        if state.regs.iter().map(|r| r.id).ne(state_regs(self.kernel_gic).map(StateReg::id)) {
            return Err(refuse("the saved vCPU's registers are not Hypervisor.framework's list of this hvrun".into()));
        }
        if state.serror.is_some() {
            return Err(refuse("the saved vCPU has a pending SError, which Hypervisor.framework cannot take".into()));
        }
        let clock = self.clock.clone().ok_or_else(|| refuse("a vCPU without the VM's clock".into()))?;
        let mut counter = None;
        for (reg, saved) in state_regs(self.kernel_gic).zip(&state.regs) {
            match reg {
                StateReg::VirtualCounter => {
                    counter = saved.value.as_slice().try_into().ok().map(u64::from_le_bytes);
                }
                other => self.raw.set_state_reg(other, &saved.value)?,
            }
        }
        if let Some(counter) = counter {
            clock.set_guest_counter(counter);
            self.applied_offset = None;
        }
        self.pending_load = None;
        self.wait_until = None;
        if std::mem::take(&mut self.vtimer_level) {
            self.raw.set_vtimer_mask(false)?;
        }
        let running_before = matches!(self.state, State::Running);
        self.state = match state.power {
            SavedPower::Off => State::Off,
            SavedPower::On => State::Running,
            SavedPower::Suspended => State::Waiting,
        };
        let running = matches!(self.state, State::Running);
        self.power.set_on(self.index, !matches!(self.state, State::Off));
        match (running_before, running) {
            (true, false) => self.power.leave_guest(),
            (false, true) => self.power.enter_guest(),
            _ => {}
        }
        Ok(())
    }
}

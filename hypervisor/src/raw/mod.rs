//! A [`Vcpu`] for frameworks that hand the VMM raw exceptions, as Hypervisor.framework
//! does: [`RawVcpu`] is the framework's per-vCPU calls, [`RawLoop`] does the rest in
//! portable code. It completes MMIO loads and stores, answers PSCI (CPU_ON through a
//! shared [`Power`]), sleeps in WFI until an interrupt, a kick or the virtual timer's
//! deadline, follows the virtual timer, and injects aborts and UNDEFs the way hardware
//! would. The HVF backend implements [`RawVcpu`] with framework calls; the tests here
//! implement it with a scripted fake.
//!
//! With the framework's own GIC ([`RawLoop::with_kernel_gic`]) the framework delivers
//! interrupts and the virtual timer itself. A WFI that exits naps until the timer's
//! deadline (or WFIT's), a kick, or an SPI the VMM raises ([`WakingSpis`]); and, while
//! another vCPU is in the guest, at most [`KERNEL_GIC_NAP`]: an SGI it sends goes through
//! the framework and never reaches the VMM. With every vCPU asleep nobody can send one,
//! so an idle VM costs no wake-ups (see [`Power`]).
//!
//! Every vCPU runs with the VM's one virtual-counter offset ([`VmClock`], set before it
//! first runs and again after a pause, which does not count as guest time).

mod clock;
mod power;
mod state;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use arch_aarch64::esr::MmioAccess;
use arch_aarch64::inject::{self, Fault};
use arch_aarch64::psci::{self, Action};
use arch_aarch64::sysreg::{
    CNTV_CTL_EL0, CNTV_CVAL_EL0, CPACR_EL1, SCTLR_EL1, SCTLR_EL1_RESET, SCTLR_EL2, SCTLR_EL2_RESET,
};
pub use clock::VmClock;
pub use power::{Power, Signal, WakingSpis, Woke};

use crate::exits::{decide, Decision};
use crate::hvf_regs::StateReg;
use crate::{IrqInput, Kicker, Reg, Result, SystemEvent, Vcpu, VcpuExit};

/// Why the framework's run returned.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RawExit {
    /// Another thread asked it to return.
    Canceled,
    /// The guest took an exception to the hypervisor.
    Exception {
        /// ESR_EL2.
        esr: u64,
        /// The faulting virtual address.
        va: u64,
        /// The faulting guest-physical address.
        ipa: u64,
    },
    /// The virtual timer fired; the framework masked it.
    VtimerActivated,
    /// Anything else, with the framework's code.
    Unknown(u32),
}

/// `hv_exit_reason_t`'s values in Apple's header.
const HV_EXIT_REASON_CANCELED: u32 = 0;
const HV_EXIT_REASON_EXCEPTION: u32 = 1;
const HV_EXIT_REASON_VTIMER_ACTIVATED: u32 = 2;

impl RawExit {
    /// The exit `hv_vcpu_exit_t` describes, from its fields read as plain integers. A
    /// reason this code does not know (Apple's own `HV_EXIT_REASON_UNKNOWN`, or one added
    /// later) is [`RawExit::Unknown`] with its number, which ends the run with an error
    /// that names it.
    pub fn from_framework(reason: u32, syndrome: u64, va: u64, ipa: u64) -> RawExit {
        match reason {
            HV_EXIT_REASON_CANCELED => RawExit::Canceled,
            HV_EXIT_REASON_EXCEPTION => RawExit::Exception { esr: syndrome, va, ipa },
            HV_EXIT_REASON_VTIMER_ACTIVATED => RawExit::VtimerActivated,
            code => RawExit::Unknown(code),
        }
    }
}

/// The per-vCPU calls of the framework, made on the vCPU's own thread.
pub trait RawVcpu {
    /// Runs the guest until an exit.
    fn run(&mut self) -> Result<RawExit>;
    /// Reads a register.
    fn reg(&mut self, reg: Reg) -> Result<u64>;
    /// Writes a register.
    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()>;
    /// Sets the IRQ input for the next run (it lasts one run).
    fn set_pending_irq(&mut self, pending: bool) -> Result<()>;
    /// Masks or unmasks the virtual timer's exits.
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<()>;
    /// Sets the offset of the guest's virtual counter from the host's.
    fn set_vtimer_offset(&mut self, offset: u64) -> Result<()>;
    /// The guest's virtual counter now.
    fn virtual_counter(&mut self) -> Result<u64>;
    /// Whether the framework's GIC holds an interrupt this vCPU would take (an SGI or PPI
    /// pending and enabled in its redistributor), when the framework can say; `None`
    /// when it cannot (then a nap ends with a run of the guest, to see).
    fn pending_interrupt(&mut self) -> Result<Option<bool>> {
        Ok(None)
    }
    /// Reads a register a snapshot saves, as [`StateReg::width`] little-endian bytes
    /// (never [`StateReg::VirtualCounter`], which the loop keeps).
    fn state_reg(&mut self, reg: StateReg) -> Result<Vec<u8>> {
        Err(crate::Error::Unsupported(format!("this framework cannot read {reg:?} for a snapshot")))
    }
    /// Writes a register a snapshot saved ([`RawVcpu::state_reg`]'s bytes).
    fn set_state_reg(&mut self, reg: StateReg, value: &[u8]) -> Result<()> {
        let _ = value;
        Err(crate::Error::Unsupported(format!("this framework cannot write {reg:?} from a snapshot")))
    }
    /// Counter ticks per second.
    fn counter_frequency(&self) -> u64;
    /// Makes a running [`RawVcpu::run`] return [`RawExit::Canceled`], from any thread.
    fn canceller(&self) -> Arc<dyn Fn() + Send + Sync>;
}

/// Logs `message` the first time `flag` is seen: a misbehaving guest is reported once,
/// not once per attempt.
pub(crate) fn warn_once(flag: &AtomicBool, message: std::fmt::Arguments<'_>) {
    if !flag.swap(true, Ordering::Relaxed) {
        log::warn!("{message} (reported once)");
    }
}

static BAD_ACCESS: AtomicBool = AtomicBool::new(false);
static BAD_CALL: AtomicBool = AtomicBool::new(false);
static KERNEL_GIC_TIMER: AtomicBool = AtomicBool::new(false);

/// Whether syndrome `esr` is seen for the first time: each unknown register or
/// instruction is reported once. A guest can try all 2^16 system registers, so only the
/// first [`REPORTED`] distinct ones are remembered (and reported).
fn first_time(esr: u64) -> bool {
    static SEEN: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());
    // The syndrome without the register operand (Rt, bits 9:5): the same register read
    // into another Xn is the same register.
    let key = esr & !(0x1f << 5);
    let mut seen = SEEN.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
    if seen.contains(&key) || seen.len() >= REPORTED {
        return false;
    }
    seen.push(key);
    true
}

/// How many distinct unknown registers and instructions are reported.
const REPORTED: usize = 64;

/// The longest a WFI exit sleeps in the VMM when the framework's GIC holds the
/// interrupts (see the module documentation).
pub const KERNEL_GIC_NAP: Duration = Duration::from_millis(1);

/// The earlier of an optional deadline and another.
fn earlier(a: Option<Instant>, b: Instant) -> Option<Instant> {
    Some(a.map_or(b, |a| a.min(b)))
}

/// CNTV_CTL_EL0 bits.
const TIMER_ENABLE: u64 = 1;
const TIMER_IMASK: u64 = 2;
const TIMER_ISTATUS: u64 = 4;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// Powered off, waiting for CPU_ON.
    Off,
    /// In the guest.
    Running,
    /// In WFI (or CPU_SUSPEND), waiting for an interrupt.
    Waiting,
}

/// How many exits [`RawLoop`] remembers for [`Vcpu::recent_exits`].
const TRACE: usize = 16;

/// What a run ends with, before it borrows the MMIO buffer.
enum Outcome {
    Read { addr: u64, size: usize },
    Write { addr: u64, size: usize },
    System(SystemEvent),
    Interrupted,
    Unhandled(String),
}

struct RawKicker {
    signal: Arc<Signal>,
    cancel: Arc<dyn Fn() + Send + Sync>,
}

impl Kicker for RawKicker {
    fn kick(&self) {
        self.signal.kick();
        (self.cancel)();
    }
}

/// A vCPU over a [`RawVcpu`].
pub struct RawLoop<V: RawVcpu> {
    raw: V,
    index: usize,
    power: Arc<Power>,
    signal: Arc<Signal>,
    kicker: Arc<RawKicker>,
    state: State,
    irq_level: bool,
    vtimer_level: bool,
    /// The framework's GIC delivers interrupts and the timer (macOS 15's `hv_gic`).
    kernel_gic: bool,
    /// The guest has EL2 (`--nested`): it starts there, and takes exceptions there.
    el2: bool,
    /// A load waiting for the VMM's data: it completes at the next run.
    pending_load: Option<MmioAccess>,
    /// In WFIT: the virtual count at which the wait ends.
    wait_until: Option<u64>,
    /// The VM's clock, and the offset this vCPU last set from it.
    clock: Option<Arc<VmClock>>,
    applied_offset: Option<u64>,
    /// The last [`TRACE`] exits, a ring; `trace_next` is the oldest. (Kept as the
    /// framework gave them: nothing more is read on the exit path for it.)
    trace: [Option<RawExit>; TRACE],
    trace_next: usize,
    buf: [u8; 8],
}

impl<V: RawVcpu> std::fmt::Debug for RawLoop<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RawLoop").field("index", &self.index).field("state", &self.state).finish_non_exhaustive()
    }
}

impl<V: RawVcpu> RawLoop<V> {
    /// vCPU `index` of a VM whose vCPUs share `power`. vCPU 0 starts running; the others
    /// wait for CPU_ON.
    pub fn new(raw: V, index: usize, power: Arc<Power>) -> Self {
        let signal = power.signal(index).unwrap_or_default();
        let kicker = Arc::new(RawKicker { signal: Arc::clone(&signal), cancel: raw.canceller() });
        power.attach(index, kicker.clone());
        let state = if index == 0 { State::Running } else { State::Off };
        RawLoop {
            raw,
            index,
            power,
            signal,
            kicker,
            state,
            irq_level: false,
            vtimer_level: false,
            kernel_gic: false,
            el2: false,
            pending_load: None,
            wait_until: None,
            clock: None,
            applied_offset: None,
            trace: [None; TRACE],
            trace_next: 0,
            buf: [0; 8],
        }
    }

    /// Runs with the VM's virtual-counter offset from `clock`.
    pub fn with_clock(mut self, clock: Arc<VmClock>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Sets the VM's counter offset if it is not the one this vCPU runs with (before the
    /// first run, and after a pause moved it).
    fn apply_clock(&mut self) -> Result<()> {
        if let Some(offset) = self.clock.as_ref().map(|c| c.offset()) {
            if self.applied_offset != Some(offset) {
                self.raw.set_vtimer_offset(offset)?;
                self.applied_offset = Some(offset);
            }
        }
        Ok(())
    }

    /// The guest has EL2: CPU_ON starts this vCPU at EL2h with EL2's MMU off, and an
    /// exception the loop injects goes to EL2 where the architecture sends it there
    /// ([`inject::target_el`]).
    pub fn with_el2(mut self) -> Self {
        self.el2 = true;
        self
    }

    /// The framework's GIC delivers this vCPU's interrupts and timer: no pending-IRQ
    /// input, no timer following, and WFI naps instead of waiting for the VMM's GIC.
    pub fn with_kernel_gic(mut self) -> Self {
        self.kernel_gic = true;
        self
    }

    /// WFI, WFIT or CPU_SUSPEND: wait for the VMM's GIC, or nap with the framework's
    /// (see the module documentation).
    fn idle(&mut self) -> Result<()> {
        if !self.kernel_gic {
            self.state = State::Waiting;
            return Ok(());
        }
        let wfit = self.wait_until.take();
        let mut until = None;
        let (armed, met, cval) = self.timer()?;
        if armed {
            if met {
                return Ok(());
            }
            until = Some(self.deadline(cval)?);
        }
        if let Some(deadline) = wfit {
            if self.raw.virtual_counter()? >= deadline {
                return Ok(());
            }
            until = earlier(until, self.deadline(deadline)?);
        }
        if self.el2 {
            // A guest at EL2 may be waiting on timers this loop does not follow (EL2's
            // physical and virtual timers, a nested guest's): one short nap, then the guest
            // runs again (a WFI may end early) and the framework delivers what is due.
            self.power.leave_guest();
            self.signal.wait(earlier(until, Instant::now() + KERNEL_GIC_NAP));
            self.power.enter_guest();
            return Ok(());
        }
        // Decided while this vCPU still counts as in the guest: another vCPU in there may
        // have sent it an SGI before it trapped.
        let mut counted = true;
        // Another vCPU went into the guest since this one last looked, and the framework
        // cannot say whether it sent an SGI: the next nap is short, then the guest runs.
        let mut unsure = false;
        loop {
            let alone = !unsure && self.power.try_unbounded_nap(counted);
            if std::mem::take(&mut counted) {
                self.power.leave_guest();
            }
            let nap = if alone { until } else { earlier(until, Instant::now() + KERNEL_GIC_NAP) };
            let woke = self.signal.wait(nap);
            if alone {
                self.power.end_unbounded_nap();
            }
            let deadline_passed = until.is_some_and(|u| Instant::now() >= u);
            if matches!(woke, Woke::Kick | Woke::Wake) || deadline_passed {
                break;
            }
            // A short nap ran out, or another vCPU entered the guest: nap on if the
            // framework says nothing waits for this vCPU (so an idle VM settles with every
            // vCPU asleep); else run the guest, which takes what is pending.
            match (self.raw.pending_interrupt()?, woke) {
                (Some(false), _) => unsure = false,
                (None, Woke::Rethink) => unsure = true,
                _ => break,
            }
        }
        self.power.enter_guest();
        Ok(())
    }

    /// When the virtual counter reaches `cval`.
    fn deadline(&mut self, cval: u64) -> Result<Instant> {
        let ticks = cval.saturating_sub(self.raw.virtual_counter()?);
        let frequency = self.raw.counter_frequency().max(1);
        let nanos = u128::from(ticks) * 1_000_000_000 / u128::from(frequency);
        let wait = Duration::from_nanos(u64::try_from(nanos).unwrap_or(u64::MAX));
        Ok(Instant::now().checked_add(wait).unwrap_or_else(|| Instant::now() + Duration::from_secs(86_400)))
    }

    /// CPU_ON: the vCPU starts at `entry` with `context` in X0 as from a reset (PSCI:
    /// EL1h, or EL2h for a guest with EL2, interrupts masked, the MMU and caches off),
    /// whatever it was doing before a CPU_OFF: its MMU, caches and FP access are reset, and
    /// so is what this loop kept for its last life (a load in flight, a timer it held).
    /// Without that, a CPU brought back online fetched its physical entry address with the
    /// MMU still on. At EL2 the rest of EL2's state (HCR_EL2, CPTR_EL2, VBAR_EL2) keeps its
    /// last values: no translation or trap depends on them before the entry code, which
    /// sets them (Linux's `init_el2` does).
    fn power_on(&mut self, entry: u64, context: u64) -> Result<()> {
        self.raw.set_reg(Reg::Sys(SCTLR_EL1), SCTLR_EL1_RESET)?;
        self.raw.set_reg(Reg::Sys(CPACR_EL1), 0)?;
        if self.el2 {
            self.raw.set_reg(Reg::Sys(SCTLR_EL2), SCTLR_EL2_RESET)?;
        }
        let pstate = if self.el2 { inject::PSTATE_EL2H_MASKED } else { inject::PSTATE_EL1H_MASKED };
        self.raw.set_reg(Reg::Pstate, pstate)?;
        self.raw.set_reg(Reg::Pc, entry)?;
        self.raw.set_reg(Reg::X(0), context)?;
        self.pending_load = None;
        self.wait_until = None;
        if std::mem::take(&mut self.vtimer_level) {
            self.raw.set_vtimer_mask(false)?;
        }
        self.state = State::Running;
        self.power.enter_guest();
        Ok(())
    }

    fn step_pc(&mut self) -> Result<()> {
        let pc = self.raw.reg(Reg::Pc)?;
        self.raw.set_reg(Reg::Pc, pc.wrapping_add(4))
    }

    /// Completes a load the VMM has served, then steps past it.
    fn finish_load(&mut self) -> Result<()> {
        if let Some(access) = self.pending_load.take() {
            let raw = u64::from_le_bytes(self.buf);
            if access.reg != 31 {
                self.raw.set_reg(Reg::X(access.reg), access.load_value(raw))?;
            }
            self.step_pc()?;
        }
        Ok(())
    }

    /// The timer's state: (enabled and unmasked, condition met, compare value).
    fn timer(&mut self) -> Result<(bool, bool, u64)> {
        let ctl = self.raw.reg(Reg::Sys(CNTV_CTL_EL0))?;
        let armed = ctl & TIMER_ENABLE != 0 && ctl & TIMER_IMASK == 0;
        let cval = self.raw.reg(Reg::Sys(CNTV_CVAL_EL0))?;
        let met = ctl & TIMER_ISTATUS != 0 || self.raw.virtual_counter()? >= cval;
        Ok((armed, met, cval))
    }

    /// After an exit: a timer the VMM holds asserted is let go once the guest has
    /// disabled, masked or re-armed it, and its exits are unmasked again.
    fn follow_timer(&mut self) -> Result<()> {
        if self.vtimer_level {
            let (armed, met, _) = self.timer()?;
            if !(armed && met) {
                self.vtimer_level = false;
                self.raw.set_vtimer_mask(false)?;
            }
        }
        Ok(())
    }

    /// In WFI: whether to resume now, or else when the timer will fire (or WFIT's
    /// deadline pass).
    fn wait_ends(&mut self) -> Result<(bool, Option<Instant>)> {
        if self.irq_level {
            return Ok((true, None));
        }
        let mut until = None;
        if let Some(deadline) = self.wait_until {
            if self.raw.virtual_counter()? >= deadline {
                return Ok((true, None));
            }
            until = Some(self.deadline(deadline)?);
        }
        let (armed, met, cval) = self.timer()?;
        if !armed {
            return Ok((false, until));
        }
        if met {
            // The framework only reports the timer while the guest runs: raise it here,
            // masked as the framework would, and let the VMM deliver it.
            self.vtimer_level = true;
            self.raw.set_vtimer_mask(true)?;
            return Ok((true, None));
        }
        Ok((false, earlier(until, self.deadline(cval)?)))
    }

    fn inject(&mut self, fault: Fault) -> Result<()> {
        let pc = self.raw.reg(Reg::Pc)?;
        let pstate = self.raw.reg(Reg::Pstate)?;
        let hcr = self.guest_hcr(pstate)?;
        let to = inject::target_el(fault, pstate, hcr);
        let vbar = self.raw.reg(Reg::Sys(to.vbar))?;
        let entry = inject::take(fault, pc, pstate, to, vbar);
        self.raw.set_reg(Reg::Sys(to.elr), entry.elr)?;
        self.raw.set_reg(Reg::Sys(to.spsr), entry.spsr)?;
        self.raw.set_reg(Reg::Sys(to.esr), entry.esr)?;
        if let Some(far) = entry.far {
            self.raw.set_reg(Reg::Sys(to.far), far)?;
        }
        self.raw.set_reg(Reg::Pstate, entry.pstate)?;
        self.raw.set_reg(Reg::Pc, entry.pc)
    }

    /// The guest's HCR_EL2 where it routes exceptions from EL0 or EL1 (a guest with EL2,
    /// below EL2); 0 otherwise.
    fn guest_hcr(&mut self, pstate: u64) -> Result<u64> {
        if self.el2 && inject::current_el(pstate) < 2 {
            self.raw.reg(Reg::Sys(inject::HCR_EL2))
        } else {
            Ok(0)
        }
    }

    /// An HVC or SMC in a guest with EL2, whose device tree calls PSCI through SMC: an
    /// HVC belongs to the guest's own EL2, and so does an SMC from EL1 that the guest's
    /// HCR_EL2.TSC traps there; an SMC from EL2, or from EL1 untrapped, is a PSCI call to
    /// the VMM. (Answering a nested guest's calls as PSCI would let it power off or
    /// restart the outer VM's vCPUs.)
    fn nested_call(&mut self, smc: bool, imm: u16) -> Result<Option<Outcome>> {
        let pstate = self.raw.reg(Reg::Pstate)?;
        let el = inject::current_el(pstate);
        let trapped = smc && el == 1 && self.guest_hcr(pstate)? & inject::HCR_TSC != 0;
        match (smc, el) {
            (true, 0) => self.inject(Fault::Undefined).map(|()| None),
            (true, _) if !trapped => self.psci(true),
            (true, _) => self.inject(Fault::Smc { imm }).map(|()| None),
            (false, _) => self.inject(Fault::Hvc { imm }).map(|()| None),
        }
    }

    fn psci(&mut self, smc: bool) -> Result<Option<Outcome>> {
        let mut x = [0u64; 4];
        for (i, v) in x.iter_mut().enumerate() {
            *v = self.raw.reg(Reg::X(i as u8))?;
        }
        let result = match psci::handle(x, &self.power.states()) {
            Action::Return(value) => {
                if value == psci::RET_NOT_SUPPORTED || value == psci::RET_INVALID_PARAMETERS {
                    let (index, function) = (self.index, x[0]);
                    warn_once(
                        &BAD_CALL,
                        format_args!("vcpu{index}: PSCI/SMCCC call {function:#x} refused with {value}"),
                    );
                }
                value
            }
            Action::CpuOn { index, entry, context } => {
                if self.power.start(index, entry, context) {
                    psci::RET_SUCCESS
                } else {
                    psci::RET_ALREADY_ON
                }
            }
            Action::CpuOff => {
                self.power.stop(self.index);
                self.power.leave_guest();
                self.state = State::Off;
                return Ok(None);
            }
            Action::Suspend => {
                self.idle()?;
                psci::RET_SUCCESS
            }
            Action::SystemOff => return Ok(Some(Outcome::System(SystemEvent::Shutdown))),
            Action::SystemReset => return Ok(Some(Outcome::System(SystemEvent::Reset))),
        };
        self.raw.set_reg(Reg::X(0), result as u64)?;
        if smc {
            self.step_pc()?;
        }
        Ok(None)
    }

    /// Carries out the decision for one exception; `Some` when the VMM must act.
    fn exception(&mut self, esr: u64, va: u64, ipa: u64) -> Result<Option<Outcome>> {
        let decision = decide(esr, ipa);
        match decision {
            Decision::Mmio { addr, access } if access.write => {
                let value = if access.reg == 31 { 0 } else { self.raw.reg(Reg::X(access.reg))? };
                self.buf = access.store_bytes(value);
                self.step_pc()?;
                Ok(Some(Outcome::Write { addr, size: access.size }))
            }
            Decision::Mmio { addr, access } => {
                self.buf = [0; 8];
                self.pending_load = Some(access);
                Ok(Some(Outcome::Read { addr, size: access.size }))
            }
            Decision::Psci { smc } if self.el2 => self.nested_call(smc, esr as u16),
            Decision::Psci { smc } => self.psci(smc),
            Decision::WaitForInterrupt => {
                self.step_pc()?;
                self.idle()?;
                Ok(None)
            }
            Decision::WaitUntil { reg } => {
                let deadline = if reg == 31 { 0 } else { self.raw.reg(Reg::X(reg))? };
                self.step_pc()?;
                if self.raw.virtual_counter()? < deadline {
                    self.wait_until = Some(deadline);
                    self.idle()?;
                }
                Ok(None)
            }
            Decision::Skip => self.step_pc().map(|()| None),
            Decision::ReadZero { rt } => {
                if rt != 31 {
                    self.raw.set_reg(Reg::X(rt), 0)?;
                }
                self.step_pc().map(|()| None)
            }
            Decision::InjectDataAbort { addr } => {
                let index = self.index;
                warn_once(
                    &BAD_ACCESS,
                    format_args!(
                        "vcpu{index}: an access to {addr:#x} that no device can serve; the guest gets an abort"
                    ),
                );
                self.inject(Fault::DataAbort { far: va, write: esr & (1 << 6) != 0 }).map(|()| None)
            }
            Decision::InjectInstructionAbort { addr } => {
                let index = self.index;
                warn_once(
                    &BAD_ACCESS,
                    format_args!(
                        "vcpu{index}: an instruction fetch from {addr:#x}, where no RAM is; the guest gets an abort"
                    ),
                );
                self.inject(Fault::InstructionAbort { far: va }).map(|()| None)
            }
            Decision::InjectUndef => {
                let index = self.index;
                if first_time(esr) {
                    log::warn!(
                        "vcpu{index}: ESR {esr:#x} (an unknown system register or instruction); \
                         the guest gets UNDEF (reported once for each)"
                    );
                }
                self.inject(Fault::Undefined).map(|()| None)
            }
            Decision::Unhandled(ec) => {
                Ok(Some(Outcome::Unhandled(format!("exception class {ec:#x} (ESR {esr:#x}) at IPA {ipa:#x}"))))
            }
        }
    }

    /// Runs until the VMM must act.
    fn step(&mut self) -> Result<Outcome> {
        self.finish_load()?;
        self.apply_clock()?;
        loop {
            if self.signal.take() {
                return Ok(Outcome::Interrupted);
            }
            match self.state {
                State::Off => {
                    if let Some((entry, context)) = self.power.take_start(self.index) {
                        self.power_on(entry, context)?;
                    } else {
                        self.signal.wait(None);
                    }
                    continue;
                }
                State::Waiting => {
                    let (resume, until) = self.wait_ends()?;
                    if !resume {
                        self.signal.wait(until);
                        continue;
                    }
                    self.state = State::Running;
                    self.wait_until = None;
                    if self.vtimer_level {
                        // Woken by the timer: the VMM raises its interrupt first.
                        return Ok(Outcome::Interrupted);
                    }
                }
                State::Running => {}
            }
            if !self.kernel_gic {
                self.raw.set_pending_irq(self.irq_level)?;
            }
            // What a wake-up was for (an SPI) is pending in the framework's GIC now. Only
            // the framework's GIC wakes naps, so only then is there anything to clear (this
            // runs before every entry: no lock taken for nothing).
            if self.kernel_gic {
                self.signal.clear_wake();
            }
            let exit = self.raw.run()?;
            self.trace[self.trace_next] = Some(exit);
            self.trace_next = (self.trace_next + 1) % TRACE;
            if !self.kernel_gic {
                self.follow_timer()?;
            }
            match exit {
                RawExit::Canceled => {}
                RawExit::VtimerActivated if self.kernel_gic => {
                    // Not expected with the framework's GIC, which owns the timer; let
                    // the timer go again rather than leave it masked for good.
                    let index = self.index;
                    warn_once(&KERNEL_GIC_TIMER, format_args!("vcpu{index}: timer exit with the in-kernel GIC"));
                    self.raw.set_vtimer_mask(false)?;
                }
                RawExit::VtimerActivated => {
                    self.vtimer_level = true;
                    return Ok(Outcome::Interrupted);
                }
                RawExit::Unknown(code) => return Ok(Outcome::Unhandled(format!("exit reason {code}"))),
                RawExit::Exception { esr, va, ipa } => {
                    if let Some(outcome) = self.exception(esr, va, ipa)? {
                        return Ok(outcome);
                    }
                }
            }
        }
    }
}

impl<V: RawVcpu> IrqInput for RawLoop<V> {
    fn vtimer_asserted(&mut self) -> bool {
        self.vtimer_level
    }

    fn set_irq_line(&mut self, level: bool) -> Result<()> {
        self.irq_level = level;
        Ok(())
    }
}

impl<V: RawVcpu> Vcpu for RawLoop<V> {
    fn run(&mut self) -> Result<VcpuExit<'_>> {
        Ok(match self.step()? {
            Outcome::Read { addr, size } => VcpuExit::MmioRead { addr, data: &mut self.buf[..size] },
            Outcome::Write { addr, size } => VcpuExit::MmioWrite { addr, data: &self.buf[..size] },
            Outcome::System(event) => VcpuExit::System(event),
            Outcome::Interrupted => VcpuExit::Interrupted,
            Outcome::Unhandled(why) => VcpuExit::Unhandled(why),
        })
    }

    fn kicker(&self) -> Arc<dyn Kicker> {
        self.kicker.clone()
    }

    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()> {
        self.raw.set_reg(reg, value)
    }

    fn get_reg(&mut self, reg: Reg) -> Result<u64> {
        self.raw.reg(reg)
    }

    fn save_state(&mut self) -> Result<crate::state::VcpuState> {
        self.save()
    }

    fn restore_state(&mut self, state: &crate::state::VcpuState) -> Result<()> {
        self.restore(state)
    }

    fn recent_exits(&mut self) -> Vec<String> {
        let (newer, older) = self.trace.split_at(self.trace_next);
        let mut lines: Vec<String> = older
            .iter()
            .chain(newer)
            .flatten()
            .map(|exit| match *exit {
                RawExit::Exception { esr, va, ipa } => {
                    format!("exception ESR {esr:#010x} (EC {:#04x}) VA {va:#x} IPA {ipa:#x}", esr >> 26)
                }
                other => format!("{other:?}"),
            })
            .collect();
        if !lines.is_empty() {
            let pc = self.raw.reg(Reg::Pc).map_or_else(|e| e.to_string(), |pc| format!("{pc:#x}"));
            lines.push(format!("the PC after the last one: {pc}"));
        }
        lines
    }
}

//! The run loop against a scripted fake of the framework: each step sets some guest
//! registers (what the guest did) and ends with an exit.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use arch_aarch64::esr::{SysRegAccess, EC_DABT_LOW, EC_HVC64, EC_SMC64, EC_WFX};
use arch_aarch64::inject::{ESR_EL1, FAR_EL1, VBAR_EL1};
use arch_aarch64::psci;
use arch_aarch64::sysreg::{SysReg, CNTV_CTL_EL0, CNTV_CVAL_EL0};

use super::*;
use crate::{GuestClock, SpiSink};

/// Counter frequency of the fake: 1 MHz, so a tick is a microsecond.
const FREQUENCY: u64 = 1_000_000;
const UART: u64 = 0x0900_0000;

struct Step {
    set: Vec<(Reg, u64)>,
    exit: RawExit,
}

fn step(set: &[(Reg, u64)], exit: RawExit) -> Step {
    Step { set: set.to_vec(), exit }
}

fn exception(esr: u64, ipa: u64) -> RawExit {
    RawExit::Exception { esr, va: ipa | 0xffff_0000_0000_0000, ipa }
}

/// `str wN, [..]` of 4 bytes to MMIO.
fn store32(reg: u64) -> u64 {
    (u64::from(EC_DABT_LOW) << 26) | (1 << 24) | (2 << 22) | (reg << 16) | (1 << 6)
}

/// `ldr wN, [..]` of 4 bytes from MMIO.
fn load32(reg: u64) -> u64 {
    (u64::from(EC_DABT_LOW) << 26) | (1 << 24) | (2 << 22) | (reg << 16)
}

fn call(class: u8) -> u64 {
    u64::from(class) << 26
}

#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<String>>>);

impl Log {
    fn push(&self, s: String) {
        self.0.lock().unwrap().push(s);
    }
    fn has(&self, s: &str) -> bool {
        self.0.lock().unwrap().iter().any(|l| l == s)
    }
}

struct Fake {
    script: VecDeque<Step>,
    /// What `pending_interrupt` answers.
    pending: Option<bool>,
    /// Runs so far.
    runs: Arc<std::sync::atomic::AtomicUsize>,
    regs: Vec<(Reg, u64)>,
    born: Instant,
    cancelled: Arc<AtomicBool>,
    log: Log,
    /// The registers a snapshot saves, by id (zeros until written).
    state: std::collections::HashMap<u64, Vec<u8>>,
}

impl Fake {
    fn new(script: Vec<Step>, log: Log) -> Self {
        Fake {
            script: script.into(),
            pending: None,
            runs: Arc::default(),
            regs: vec![(Reg::Pc, 0x4008_0000), (Reg::Pstate, 0x3c5), (Reg::Sys(VBAR_EL1), 0x8000)],
            born: Instant::now(),
            cancelled: Arc::default(),
            log,
            state: std::collections::HashMap::new(),
        }
    }
}

impl RawVcpu for Fake {
    fn run(&mut self) -> Result<RawExit> {
        self.runs.fetch_add(1, Ordering::SeqCst);
        let Some(step) = self.script.pop_front() else { return Ok(RawExit::Unknown(999)) };
        for (reg, value) in step.set {
            self.set_reg(reg, value)?;
        }
        Ok(step.exit)
    }
    fn reg(&mut self, reg: Reg) -> Result<u64> {
        Ok(self.regs.iter().find(|(r, _)| *r == reg).map_or(0, |(_, v)| *v))
    }
    fn set_reg(&mut self, reg: Reg, value: u64) -> Result<()> {
        match self.regs.iter_mut().find(|(r, _)| *r == reg) {
            Some(slot) => slot.1 = value,
            None => self.regs.push((reg, value)),
        }
        Ok(())
    }
    fn set_pending_irq(&mut self, pending: bool) -> Result<()> {
        self.log.push(format!("irq {}", u8::from(pending)));
        Ok(())
    }
    fn set_vtimer_mask(&mut self, masked: bool) -> Result<()> {
        self.log.push(format!("vtimer mask {}", u8::from(masked)));
        Ok(())
    }
    fn set_vtimer_offset(&mut self, offset: u64) -> Result<()> {
        self.log.push(format!("offset {offset}"));
        Ok(())
    }
    fn virtual_counter(&mut self) -> Result<u64> {
        Ok(self.born.elapsed().as_micros() as u64)
    }
    fn counter_frequency(&self) -> u64 {
        FREQUENCY
    }
    fn pending_interrupt(&mut self) -> Result<Option<bool>> {
        Ok(self.pending)
    }
    fn state_reg(&mut self, reg: StateReg) -> Result<Vec<u8>> {
        Ok(self.state.get(&reg.id()).cloned().unwrap_or_else(|| vec![0; reg.width()]))
    }
    fn set_state_reg(&mut self, reg: StateReg, value: &[u8]) -> Result<()> {
        self.state.insert(reg.id(), value.to_vec());
        Ok(())
    }
    fn canceller(&self) -> Arc<dyn Fn() + Send + Sync> {
        let flag = Arc::clone(&self.cancelled);
        Arc::new(move || flag.store(true, Ordering::SeqCst))
    }
}

fn exit_of<V: RawVcpu>(vcpu: &mut RawLoop<V>) -> String {
    match vcpu.run().unwrap() {
        VcpuExit::MmioWrite { addr, data } => format!("write {addr:#x} {data:?}"),
        VcpuExit::MmioRead { addr, data } => {
            data.copy_from_slice(&[0x78, 0x56, 0x34, 0x12][..data.len()]);
            format!("read {addr:#x}")
        }
        other => format!("{other:?}"),
    }
}

#[test]
fn uart_output_a_timer_interrupt_in_wfi_and_power_off() {
    let log = Log::default();
    let script = vec![
        // The guest writes 'h' to the UART and reads a register back into w2.
        step(&[(Reg::X(1), u64::from(b'h'))], exception(store32(1), UART)),
        step(&[], exception(load32(2), UART + 0x18)),
        // It arms its timer 30 ms out and waits for it.
        step(&[(Reg::Sys(CNTV_CTL_EL0), 1), (Reg::Sys(CNTV_CVAL_EL0), 30_000)], exception(call(EC_WFX), 0)),
        // Its handler masks the timer, then it asks the PSCI version through SMC.
        step(&[(Reg::Sys(CNTV_CTL_EL0), 3), (Reg::X(0), u64::from(psci::PSCI_VERSION))], exception(call(EC_SMC64), 0)),
        step(&[(Reg::X(0), u64::from(psci::SYSTEM_OFF))], exception(call(EC_HVC64), 0)),
    ];
    // Timed from before the fake's counter starts (its deadline is 30 ms from then).
    let start = Instant::now();
    let mut vcpu = RawLoop::new(Fake::new(script, log.clone()), 0, Power::new(&[0x8000_0000]));
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [104, 0, 0, 0]"));
    assert_eq!(vcpu.get_reg(Reg::Pc).unwrap(), 0x4008_0004, "the store is stepped over");
    assert_eq!(exit_of(&mut vcpu), format!("read {:#x}", UART + 0x18));
    // The load completes on the next run; then WFI sleeps until the timer's deadline.
    assert_eq!(exit_of(&mut vcpu), "Interrupted");
    assert_eq!(vcpu.get_reg(Reg::X(2)).unwrap(), 0x1234_5678);
    assert!(start.elapsed() >= Duration::from_millis(25), "slept until the deadline");
    assert!(vcpu.vtimer_asserted(), "the timer is raised for the VMM's GIC");
    assert!(log.has("vtimer mask 1"));
    vcpu.set_irq_line(true).unwrap(); // what the VMM does with PPI 27
    assert_eq!(exit_of(&mut vcpu), "System(Shutdown)");
    assert!(log.has("irq 1"), "the interrupt went into the guest");
    assert!(!vcpu.vtimer_asserted(), "the masked timer is let go");
    assert!(log.has("vtimer mask 0"));
    assert_eq!(vcpu.get_reg(Reg::X(0)).unwrap(), u64::from(psci::SYSTEM_OFF));
    assert_eq!(vcpu.get_reg(Reg::Pc).unwrap(), 0x4008_0010, "store, load, WFI and SMC stepped; HVC not");
}

#[test]
fn a_second_vcpu_comes_up_with_cpu_on_and_a_kick_wakes_a_sleeper() {
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    let log = Log::default();
    let secondary = {
        let power = Arc::clone(&power);
        let log = log.clone();
        std::thread::spawn(move || {
            let script = vec![step(&[(Reg::X(5), u64::from(b'2'))], exception(store32(5), UART))];
            let mut vcpu = RawLoop::new(Fake::new(script, log), 1, power);
            // It waits, off, until CPU_ON (whose kick may surface as an interruption, as
            // any kick does); then it starts where it was told.
            let first = loop {
                let exit = exit_of(&mut vcpu);
                if exit != "Interrupted" {
                    break exit;
                }
            };
            (first, vcpu.get_reg(Reg::Pc).unwrap(), vcpu.get_reg(Reg::X(0)).unwrap())
        })
    };
    std::thread::sleep(Duration::from_millis(20));
    let on = [(Reg::X(0), u64::from(psci::CPU_ON_64)), (Reg::X(1), 1), (Reg::X(2), 0x4010_0000), (Reg::X(3), 77)];
    let script = vec![
        step(&on, exception(call(EC_HVC64), 0)),
        // A second CPU_ON for the same vCPU: already on. Then WFI with no timer.
        step(&on, exception(call(EC_HVC64), 0)),
        step(&[(Reg::X(0), 0)], exception(call(EC_WFX), 0)),
    ];
    let mut primary = RawLoop::new(Fake::new(script, log), 0, Arc::clone(&power));
    let kicker = primary.kicker();
    // The kick must come once the primary sleeps in its WFI: one taken before its run
    // would end that run at once, before CPU_ON (and the secondary would wait for ever).
    // Its sleep cannot be watched from here; 200 ms leaves a loaded host room.
    let waker = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(200));
        kicker.kick();
    });
    // Both calls answered, then WFI sleeps until the kick.
    assert_eq!(exit_of(&mut primary), "Interrupted");
    assert_eq!(primary.get_reg(Reg::X(0)).unwrap(), 0);
    waker.join().unwrap();
    let (first, pc, x0) = secondary.join().unwrap();
    assert_eq!(first, format!("write {UART:#x} [50, 0, 0, 0]"));
    assert_eq!((pc, x0), (0x4010_0004, 77), "started at the entry with the context in X0");
    assert!(power.states().iter().all(|c| c.on));
}

#[test]
fn hostile_guests_get_architected_errors_and_the_loop_goes_on() {
    let log = Log::default();
    // mrs x0, S3_3_C15_C0_0
    let sysreg_trap = SysRegAccess { reg: SysReg::new(3, 3, 15, 0, 0), rt: 0, read: true }.syndrome();
    let script = vec![
        // ldp to MMIO (no syndrome): a data abort into the guest's vector.
        step(&[], exception(u64::from(EC_DABT_LOW) << 26, 0x0a00_0000)),
        // An unknown system register: UNDEF.
        step(&[(Reg::Pc, 0x4008_0000), (Reg::Pstate, 0x3c5)], exception(sysreg_trap, 0)),
        // An unknown HVC, and CPU_ON for a vCPU that does not exist.
        step(&[(Reg::Pc, 0x4008_0000), (Reg::X(0), 0x8600_0000)], exception(call(EC_HVC64), 0)),
        step(&[(Reg::X(0), u64::from(psci::CPU_ON_64)), (Reg::X(1), 9)], exception(call(EC_HVC64), 0)),
        step(&[], exception(0x3c << 26, 0)), // BRK: not something to emulate
    ];
    let mut vcpu = RawLoop::new(Fake::new(script, log), 0, Power::new(&[0x8000_0000]));
    // Everything before the BRK is dealt with inside the loop; the VMM sees only the BRK.
    let last = exit_of(&mut vcpu);
    assert!(last.starts_with("Unhandled(\"exception class 0x3c"), "{last}");
    assert_eq!(vcpu.get_reg(Reg::X(0)).unwrap() as i64, psci::RET_INVALID_PARAMETERS);
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL1)).unwrap(), 1 << 25, "the last injection was UNDEF");
    assert_eq!(vcpu.get_reg(Reg::Sys(FAR_EL1)).unwrap(), 0xffff_0000_0a00_0000, "the abort's address");
}

#[test]
fn with_the_frameworks_gic_wfi_naps_and_no_interrupt_is_injected_by_hand() {
    let log = Log::default();
    // vCPU 1 is in the guest (and could send an SGI that never reaches the VMM):
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    power.enter_guest();
    let script = vec![
        // WFI with no timer: a nap of at most KERNEL_GIC_NAP, then the guest goes on.
        step(&[], exception(call(EC_WFX), 0)),
        // WFI with the timer far out: still just a nap.
        step(&[(Reg::Sys(CNTV_CTL_EL0), 1), (Reg::Sys(CNTV_CVAL_EL0), 1_000_000_000)], exception(call(EC_WFX), 0)),
        // A timer exit the framework should not send: the timer is unmasked again.
        step(&[], RawExit::VtimerActivated),
        step(&[(Reg::X(0), u64::from(psci::SYSTEM_OFF))], exception(call(EC_HVC64), 0)),
    ];
    let mut vcpu = RawLoop::new(Fake::new(script, log.clone()), 0, power).with_kernel_gic();
    let start = Instant::now();
    assert_eq!(exit_of(&mut vcpu), "System(Shutdown)");
    // Naps of KERNEL_GIC_NAP (1 ms): a second leaves a loaded host room to run the thread.
    assert!(start.elapsed() < Duration::from_secs(1), "naps are short: {:?}", start.elapsed());
    assert_eq!(vcpu.get_reg(Reg::Pc).unwrap(), 0x4008_0008, "both WFIs stepped");
    assert!(!log.has("irq 0") && !log.has("irq 1"), "no pending-interrupt calls");
    assert!(log.has("vtimer mask 0"));
    assert!(!vcpu.vtimer_asserted());
}

/// Issue 12, hole 4: a guest that jumped to an address no RAM backs ended the run (an
/// unhandled exit) on Hypervisor.framework. It gets a prefetch abort, and runs on.
#[test]
fn an_instruction_fetch_from_mmio_is_a_prefetch_abort_and_the_loop_goes_on() {
    let script = vec![
        step(
            &[(Reg::Pc, 0x0a00_0000)],
            exception((u64::from(arch_aarch64::esr::EC_IABT_LOW) << 26) | 0x10, 0x0a00_0000),
        ),
        step(&[], exception(store32(1), UART)),
    ];
    let mut vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000]));
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"), "the guest ran on");
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL1)).unwrap() >> 26, 0x21, "a prefetch abort from EL1");
    assert_eq!(vcpu.get_reg(Reg::Sys(FAR_EL1)).unwrap(), 0xffff_0000_0a00_0000);
    assert_eq!(vcpu.get_reg(Reg::Sys(arch_aarch64::inject::ELR_EL1)).unwrap(), 0x0a00_0000, "the fetch address");
}

/// Issue 14, fix 2: CPU_ON only set PSTATE, PC and X0, so a vCPU brought back after a
/// CPU_OFF kept its MMU and caches on (and its FP access, and a timer the loop held) and
/// fetched its physical entry address through stale translations. It starts as from reset.
#[test]
fn cpu_on_after_cpu_off_starts_from_reset_state() {
    use arch_aarch64::sysreg::{CPACR_EL1, SCTLR_EL1, SCTLR_EL1_RESET};
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    assert!(power.start(1, 0x4010_0000, 5), "the first CPU_ON");
    let log = Log::default();
    // Its first life: the MMU and caches on, FP enabled, a timer it held; then CPU_OFF.
    let lived = [(Reg::Sys(SCTLR_EL1), 0x3050_199d), (Reg::Sys(CPACR_EL1), 3 << 20)];
    let off = [(Reg::X(0), u64::from(psci::CPU_OFF))];
    let script = vec![
        step(&lived, RawExit::VtimerActivated),
        step(&off, exception(call(EC_HVC64), 0)),
        step(&[], exception(store32(1), UART)),
    ];
    let mut vcpu = RawLoop::new(Fake::new(script, log.clone()), 1, Arc::clone(&power));
    assert_eq!(exit_of(&mut vcpu), "Interrupted", "the timer fired");
    let waker = {
        let power = Arc::clone(&power);
        std::thread::spawn(move || {
            std::thread::sleep(Duration::from_millis(50));
            assert!(power.start(1, 0x4020_0000, 6), "the second CPU_ON");
        })
    };
    let next = loop {
        let exit = exit_of(&mut vcpu);
        if exit != "Interrupted" {
            break exit;
        }
    };
    waker.join().unwrap();
    assert_eq!(next, format!("write {UART:#x} [0, 0, 0, 0]"));
    assert_eq!(vcpu.get_reg(Reg::Sys(SCTLR_EL1)).unwrap(), SCTLR_EL1_RESET, "MMU and caches off");
    assert_eq!(vcpu.get_reg(Reg::Sys(CPACR_EL1)).unwrap(), 0, "FP access as after a reset");
    assert_eq!((vcpu.get_reg(Reg::Pc).unwrap(), vcpu.get_reg(Reg::X(0)).unwrap()), (0x4020_0004, 6));
    assert!(!vcpu.vtimer_asserted(), "the timer it held went with its last life");
    assert!(log.has("vtimer mask 0"), "and its exits are unmasked again");
}

/// Issue 14, fix 8 (`--nested`): a guest with EL2 is started by CPU_ON at EL2h with EL2's
/// MMU off, and an exception the loop injects while it runs at EL2 goes through EL2's
/// registers and vector, not EL1's.
#[test]
fn a_guest_with_el2_starts_at_el2_and_takes_injected_exceptions_there() {
    use arch_aarch64::inject::{ELR_EL2, ESR_EL2, SPSR_EL2, VBAR_EL2};
    use arch_aarch64::sysreg::{SCTLR_EL2, SCTLR_EL2_RESET};
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    assert!(power.start(1, 0x4010_0000, 5));
    let sysreg_trap = SysRegAccess { reg: SysReg::new(3, 3, 15, 0, 0), rt: 0, read: true }.syndrome();
    let script = vec![
        // A last life left EL2's MMU on; the first instruction reads an unknown register.
        step(&[(Reg::Sys(VBAR_EL2), 0x9000)], exception(sysreg_trap, 0)),
        step(&[], exception(store32(1), UART)),
    ];
    let mut fake = Fake::new(script, Log::default());
    fake.regs.push((Reg::Sys(SCTLR_EL2), 0x30d5_199d));
    let mut vcpu = RawLoop::new(fake, 1, Arc::clone(&power)).with_el2();
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"));
    assert_eq!(vcpu.get_reg(Reg::Sys(SCTLR_EL2)).unwrap(), SCTLR_EL2_RESET, "EL2's MMU off at CPU_ON");
    assert_eq!(vcpu.get_reg(Reg::Sys(SPSR_EL2)).unwrap(), 0x3c9, "it ran at EL2h");
    assert_eq!(vcpu.get_reg(Reg::Sys(ELR_EL2)).unwrap(), 0x4010_0000, "the entry point trapped");
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL2)).unwrap(), 1 << 25, "UNDEF at EL2");
    assert_eq!(vcpu.get_reg(Reg::Pc).unwrap(), 0x9204, "EL2's current-EL-SPx vector (then the store)");
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL1)).unwrap(), 0, "EL1's registers untouched");
}

/// `--nested`: a lone vCPU's WFI with the framework's GIC napped until CNTV_CVAL, the
/// only timer the loop follows; a guest at EL2 waits on EL2's timers, so it would have
/// slept for ever. With EL2 a nap is short, and the guest runs again.
#[test]
fn with_el2_a_lone_vcpus_wfi_is_a_short_nap_whatever_timer_it_waits_on() {
    let script = vec![
        step(&[], exception(call(EC_WFX), 0)),
        step(&[(Reg::X(0), u64::from(psci::SYSTEM_OFF))], exception(call(EC_SMC64), 0)),
    ];
    let vcpu =
        RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000])).with_kernel_gic().with_el2();
    let start = Instant::now();
    let (exit, at) = first_exit(vcpu).recv_timeout(Duration::from_secs(5)).expect("the WFI ended");
    assert_eq!(exit, "System(Shutdown)");
    assert!(at - start < Duration::from_secs(1), "a short nap: {:?}", at - start);
}

/// `--nested` (review of fix 8): every HVC and SMC was answered as PSCI, so a nested
/// guest's HVC SYSTEM_OFF powered off the outer VM. An HVC goes to the guest's EL2, and
/// so does an SMC its HCR_EL2.TSC traps; only an SMC from EL2 (or untrapped) reaches PSCI.
#[test]
fn with_el2_only_the_guest_hypervisors_smc_reaches_psci() {
    use arch_aarch64::inject::{ELR_EL2, ESR_EL2, HCR_EL2, HCR_TSC, VBAR_EL2};
    let off = (Reg::X(0), u64::from(psci::SYSTEM_OFF));
    let log = Log::default();
    let script = vec![
        // A nested guest's kernel at EL1: HVC #5 with SYSTEM_OFF in X0 (the return address
        // is already past the HVC).
        step(
            &[off, (Reg::Pstate, 0x3c5), (Reg::Pc, 0x1004), (Reg::Sys(VBAR_EL2), 0x9000)],
            exception(call(EC_HVC64) | 5, 0),
        ),
        // Back at EL1, an SMC its hypervisor traps (HCR_EL2.TSC).
        step(
            &[off, (Reg::Pstate, 0x3c5), (Reg::Pc, 0x2000), (Reg::Sys(HCR_EL2), HCR_TSC)],
            exception(call(EC_SMC64), 0),
        ),
        step(&[], exception(store32(1), UART)),
    ];
    let mut vcpu = RawLoop::new(Fake::new(script, log), 0, Power::new(&[0x8000_0000])).with_el2();
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"), "no power-off");
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL2)).unwrap() >> 26, 0x17, "the last one: the trapped SMC, at EL2");
    assert_eq!(vcpu.get_reg(Reg::Sys(ELR_EL2)).unwrap(), 0x2000, "returning to the SMC");
    assert_eq!(vcpu.get_reg(Reg::Pc).unwrap(), 0x9404, "EL2's lower-EL vector (then the store)");
    let hvc = vec![
        step(
            &[off, (Reg::Pstate, 0x3c5), (Reg::Pc, 0x1004), (Reg::Sys(VBAR_EL2), 0x9000)],
            exception(call(EC_HVC64) | 5, 0),
        ),
        step(&[], exception(store32(1), UART)),
    ];
    let mut vcpu = RawLoop::new(Fake::new(hvc, Log::default()), 0, Power::new(&[0x8000_0000])).with_el2();
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"), "no power-off");
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL2)).unwrap(), (0x16 << 26) | (1 << 25) | 5, "the HVC, at EL2");
    assert_eq!(vcpu.get_reg(Reg::Sys(ELR_EL2)).unwrap(), 0x1004);
    // The guest hypervisor's own SMC, at EL2, is PSCI.
    let own = vec![step(&[off, (Reg::Pstate, 0x3c9)], exception(call(EC_SMC64), 0))];
    let mut vcpu = RawLoop::new(Fake::new(own, Log::default()), 0, Power::new(&[0x8000_0000])).with_el2();
    assert_eq!(exit_of(&mut vcpu), "System(Shutdown)");
}

/// `--nested`: the user space of a kernel at EL2 (HCR_EL2.TGE) takes its aborts at EL2.
#[test]
fn with_el2_user_space_of_a_kernel_at_el2_takes_its_aborts_at_el2() {
    use arch_aarch64::inject::{ESR_EL2, FAR_EL2, HCR_EL2, VBAR_EL2};
    let host_kernel = [
        (Reg::Pstate, 0x0),
        (Reg::Sys(HCR_EL2), (1 << 34) | (1 << 27)),
        (Reg::Sys(VBAR_EL2), 0x9000),
        (Reg::Pc, 0x40_0000),
    ];
    let script = vec![
        step(&host_kernel, exception(u64::from(EC_DABT_LOW) << 26, 0x0a00_0000)),
        step(&[], exception(store32(1), UART)),
    ];
    let mut vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000])).with_el2();
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"));
    assert_eq!(vcpu.get_reg(Reg::Sys(ESR_EL2)).unwrap() >> 26, 0x24, "a data abort from a lower EL");
    assert_eq!(vcpu.get_reg(Reg::Sys(FAR_EL2)).unwrap(), 0xffff_0000_0a00_0000);
    assert_eq!(vcpu.get_reg(Reg::Pc).unwrap(), 0x9404, "the lower-EL vector (then the store)");
    assert_eq!(vcpu.get_reg(Reg::Pstate).unwrap(), 0x3c9);
}

/// Issue 14, fix 7: applevisor read the exit reason as a Rust enum (undefined for a reason
/// Apple adds). It is read as a number, and one the loop does not know ends the run with
/// an error that names it.
#[test]
fn exit_reasons_are_numbers_and_an_unknown_one_is_an_error_naming_it() {
    assert_eq!(RawExit::from_framework(0, 1, 2, 3), RawExit::Canceled);
    assert_eq!(RawExit::from_framework(1, 0x9200_0046, 5, 6), RawExit::Exception { esr: 0x9200_0046, va: 5, ipa: 6 });
    assert_eq!(RawExit::from_framework(2, 0, 0, 0), RawExit::VtimerActivated);
    assert_eq!(RawExit::from_framework(3, 0, 0, 0), RawExit::Unknown(3), "HV_EXIT_REASON_UNKNOWN");
    assert_eq!(RawExit::from_framework(0x8000_0001, 0, 0, 0), RawExit::Unknown(0x8000_0001));
    let script = vec![step(&[], RawExit::from_framework(17, 0, 0, 0))];
    let mut vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000]));
    assert_eq!(exit_of(&mut vcpu), "Unhandled(\"exit reason 17\")");
}

/// Runs `vcpu` on a thread until its first exit that is not an interruption, which it
/// sends (with the time it came) on the returned channel.
fn first_exit<V: RawVcpu + Send + 'static>(mut vcpu: RawLoop<V>) -> std::sync::mpsc::Receiver<(String, Instant)> {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || loop {
        let exit = exit_of(&mut vcpu);
        if exit != "Interrupted" {
            let _ = tx.send((exit, Instant::now()));
            return;
        }
    });
    rx
}

/// WFIT on x4 (RN = 4, RV set).
fn wfit_x4() -> u64 {
    call(EC_WFX) | (4 << 5) | (1 << 2) | 2
}

/// Issue 14, fix 3: WFIT was a WFI without its timeout, so a guest waiting with its
/// timer disarmed slept for ever. It wakes at the deadline in its register, with either
/// GIC.
#[test]
fn wfit_wakes_at_its_deadline_with_the_timer_disarmed() {
    for kernel_gic in [false, true] {
        let script = vec![
            // 40 ms from the start (the fake's counter is in microseconds).
            step(&[(Reg::X(4), 40_000)], exception(wfit_x4(), 0)),
            step(&[], exception(store32(1), UART)),
        ];
        // Timed from before the fake's counter starts (the deadline is 40 ms from then).
        let start = Instant::now();
        let vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000]));
        let vcpu = if kernel_gic { vcpu.with_kernel_gic() } else { vcpu };
        let exits = first_exit(vcpu);
        let (exit, at) = exits.recv_timeout(Duration::from_secs(5)).expect("WFIT ended at its deadline");
        assert_eq!(exit, format!("write {UART:#x} [0, 0, 0, 0]"));
        assert!(at - start >= Duration::from_millis(30), "kernel_gic {kernel_gic}: woke early: {:?}", at - start);
    }
    // A deadline already past (or XZR) does not wait at all.
    let script = vec![step(&[(Reg::X(4), 1)], exception(wfit_x4(), 0)), step(&[], exception(store32(1), UART))];
    let mut vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000]));
    let start = Instant::now();
    assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"));
    assert!(start.elapsed() < Duration::from_millis(500));
}

/// Issue 14, fix 6: every vCPU runs with the VM's one counter offset, set before it first
/// runs, and again after a pause moved it.
#[test]
fn every_vcpu_runs_with_the_vms_counter_offset() {
    use std::sync::atomic::AtomicU64;
    let host = Arc::new(AtomicU64::new(1_000));
    let clock = {
        let host = Arc::clone(&host);
        VmClock::new(move || host.load(Ordering::SeqCst))
    };
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    assert!(power.start(1, 0x4010_0000, 0));
    let logs = [Log::default(), Log::default()];
    let mut vcpus: Vec<_> = (0..2)
        .map(|i| {
            let script = vec![step(&[], exception(store32(1), UART)), step(&[], exception(store32(1), UART))];
            RawLoop::new(Fake::new(script, logs[i].clone()), i, Arc::clone(&power)).with_clock(Arc::clone(&clock))
        })
        .collect();
    for vcpu in &mut vcpus {
        while exit_of(vcpu) == "Interrupted" {}
    }
    assert!(logs.iter().all(|l| l.has("offset 1000")), "the same offset on every vCPU");
    clock.stop();
    host.store(9_000, Ordering::SeqCst);
    clock.start();
    for vcpu in &mut vcpus {
        while exit_of(vcpu) == "Interrupted" {}
    }
    assert!(logs.iter().all(|l| l.has("offset 9000")), "the pause's 8000 ticks are not the guest's");
}

/// Issue 14, fix 5: with the framework's GIC a WFI napped 1 ms at a time (1000 wake-ups a
/// second for an idle vCPU) and an SPI waited for the end of a nap. A vCPU alone naps
/// until something happens, and an SPI the VMM raises ends the nap at once.
#[test]
fn with_the_frameworks_gic_an_idle_vcpu_sleeps_until_an_spi() {
    #[derive(Debug)]
    struct Sink;
    impl SpiSink for Sink {
        fn set_spi(&self, _: u32, _: bool) -> Result<()> {
            Ok(())
        }
    }
    let power = Power::new(&[0x8000_0000]);
    let script = vec![step(&[], exception(call(EC_WFX), 0)), step(&[], exception(store32(1), UART))];
    let vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Arc::clone(&power)).with_kernel_gic();
    let exits = first_exit(vcpu);
    assert!(exits.recv_timeout(Duration::from_millis(200)).is_err(), "the idle vCPU went on without a reason");
    let spis = WakingSpis::new(Arc::new(Sink), power);
    spis.set_spi(40, false).unwrap();
    assert!(exits.recv_timeout(Duration::from_millis(100)).is_err(), "a falling level wakes nobody");
    let raised = Instant::now();
    spis.set_spi(40, true).unwrap();
    let (exit, at) = exits.recv_timeout(Duration::from_secs(5)).expect("the SPI woke it");
    assert_eq!(exit, format!("write {UART:#x} [0, 0, 0, 0]"));
    // Without the wake the nap would not end; a second leaves a loaded host room to run
    // the woken thread.
    assert!(at - raised < Duration::from_secs(1), "woken at once: {:?}", at - raised);
}

/// With the framework's GIC an SGI never reaches the VMM: while another vCPU is in the
/// guest (and could send one) a nap stays short; a vCPU that napped alone is woken when
/// another enters the guest.
#[test]
fn with_the_frameworks_gic_a_nap_is_short_while_another_vcpu_could_send_an_sgi() {
    let script = || vec![step(&[], exception(call(EC_WFX), 0)), step(&[], exception(store32(1), UART))];
    // vCPU 0 is in the guest: vCPU 1's nap ends by itself.
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    assert!(power.start(1, 0x4010_0000, 0));
    let vcpu = RawLoop::new(Fake::new(script(), Log::default()), 1, Arc::clone(&power)).with_kernel_gic();
    let start = Instant::now();
    let (_, at) = first_exit(vcpu).recv_timeout(Duration::from_secs(5)).expect("a short nap");
    assert!(at - start < Duration::from_secs(1), "{:?}", at - start);
    // vCPU 0 is asleep too: vCPU 1 naps until vCPU 0 enters the guest again.
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    power.leave_guest();
    assert!(power.start(1, 0x4010_0000, 0));
    let vcpu = RawLoop::new(Fake::new(script(), Log::default()), 1, Arc::clone(&power)).with_kernel_gic();
    let exits = first_exit(vcpu);
    assert!(exits.recv_timeout(Duration::from_millis(200)).is_err(), "nobody could send an SGI");
    let entered = Instant::now();
    power.enter_guest();
    let (_, at) = exits.recv_timeout(Duration::from_secs(5)).expect("woken when vCPU 0 ran");
    assert!(at - entered < Duration::from_secs(1), "{:?}", at - entered);
}

/// From the review of issue 14's fix 5: with two or more vCPUs an idle VM never settled:
/// each short nap ended with a run of the guest, whose return woke the other vCPU. Where
/// the framework says nothing is pending, a short nap that runs out naps on, and two idle
/// vCPUs come to rest.
#[test]
fn with_the_frameworks_gic_an_idle_vm_of_two_vcpus_comes_to_rest() {
    let power = Power::new(&[0x8000_0000, 0x8000_0001]);
    assert!(power.start(1, 0x4010_0000, 0));
    let stop = Arc::new(AtomicBool::new(false));
    let mut runs = Vec::new();
    let mut kickers = Vec::new();
    let threads: Vec<_> = (0..2)
        .map(|index| {
            let script = (0..100_000).map(|_| step(&[], exception(call(EC_WFX), 0))).collect();
            let mut fake = Fake::new(script, Log::default());
            fake.pending = Some(false);
            runs.push(Arc::clone(&fake.runs));
            let mut vcpu = RawLoop::new(fake, index, Arc::clone(&power)).with_kernel_gic();
            kickers.push(vcpu.kicker());
            let stop = Arc::clone(&stop);
            std::thread::spawn(move || {
                while !stop.load(Ordering::SeqCst) {
                    let _ = exit_of(&mut vcpu);
                }
            })
        })
        .collect();
    let total = || runs.iter().map(|r| r.load(Ordering::SeqCst)).sum::<usize>();
    std::thread::sleep(Duration::from_millis(100));
    let settled = total();
    std::thread::sleep(Duration::from_millis(300));
    let idle_runs = total() - settled;
    stop.store(true, Ordering::SeqCst);
    for kicker in &kickers {
        kicker.kick();
    }
    for thread in threads {
        thread.join().unwrap();
    }
    assert!(idle_runs < 30, "{idle_runs} guest entries in 300 ms of idleness (1 ms naps: about 600)");
}

/// WFIT on XZR: a deadline of 0, already past: no wait at all.
#[test]
fn wfit_on_xzr_does_not_wait() {
    let wfit_xzr = call(EC_WFX) | (31 << 5) | (1 << 2) | 2;
    for kernel_gic in [false, true] {
        let script = vec![step(&[], exception(wfit_xzr, 0)), step(&[], exception(store32(1), UART))];
        let vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000]));
        let mut vcpu = if kernel_gic { vcpu.with_kernel_gic() } else { vcpu };
        let start = Instant::now();
        assert_eq!(exit_of(&mut vcpu), format!("write {UART:#x} [0, 0, 0, 0]"));
        assert!(start.elapsed() < Duration::from_millis(500));
    }
}

/// For the self-test's report: the last exits, oldest first, with syndrome and addresses
/// (at most the last 16), then the PC.
#[test]
fn the_last_exits_are_kept_for_a_bug_report() {
    let mut script: Vec<Step> = (0..20).map(|i| step(&[(Reg::X(1), i)], exception(store32(1), UART))).collect();
    script.push(step(&[], RawExit::VtimerActivated));
    let mut vcpu = RawLoop::new(Fake::new(script, Log::default()), 0, Power::new(&[0x8000_0000]));
    assert!(vcpu.recent_exits().is_empty());
    for _ in 0..21 {
        let _ = exit_of(&mut vcpu);
    }
    let exits = vcpu.recent_exits();
    assert_eq!(exits.len(), 17, "{exits:?}");
    assert_eq!(exits[15], "VtimerActivated");
    let store =
        format!("exception ESR {:#010x} (EC 0x24) VA {:#x} IPA {UART:#x}", store32(1), UART | 0xffff_0000_0000_0000);
    assert_eq!(exits[0], store);
    assert_eq!(exits[16], "the PC after the last one: 0x40080050", "20 stores stepped over");
}

/// A 2-vCPU VM's vCPU `index` on a fake with `script`, sharing `power` and `clock`.
fn clocked(index: usize, script: Vec<Step>, power: &Arc<Power>, clock: &Arc<VmClock>) -> RawLoop<Fake> {
    RawLoop::new(Fake::new(script, Log::default()), index, Arc::clone(power)).with_clock(Arc::clone(clock))
}

#[test]
fn a_saved_vcpu_comes_back_in_a_new_vm_with_its_registers_power_and_counter() {
    let host = Arc::new(std::sync::atomic::AtomicU64::new(1_000));
    let now = {
        let host = Arc::clone(&host);
        move || host.load(Ordering::SeqCst)
    };
    let (power, clock) = (Power::new(&[0x8000_0000, 0x8000_0001]), VmClock::new(now.clone()));
    let mut first = clocked(0, Vec::new(), &power, &clock);
    let q5 = crate::hvf_regs::StateReg::Simd(5);
    first.raw.state.insert(q5.id(), (1..=16).collect());
    host.store(4_000, Ordering::SeqCst);
    clock.stop();
    let saved = first.save_state().unwrap();
    assert_eq!(saved.power, crate::state::Power::On);
    let second = clocked(1, Vec::new(), &power, &clock).save_state().unwrap();
    assert_eq!(second.power, crate::state::Power::Off);
    let counter = |s: &crate::state::VcpuState| s.regs.last().map(|r| r.value.clone());
    assert_eq!(counter(&saved), Some(3_000u64.to_le_bytes().to_vec()), "the counter as the pause left it");
    assert_eq!(counter(&saved), counter(&second), "every vCPU saves the same counter");

    // A new VM: vCPU 1 was off, and comes back in WFI.
    host.store(100_000, Ordering::SeqCst);
    let (power, clock) = (Power::new(&[0x8000_0000, 0x8000_0001]), VmClock::new(now));
    let mut again = clocked(1, Vec::new(), &power, &clock);
    let suspended = crate::state::VcpuState { power: crate::state::Power::Suspended, ..saved.clone() };
    again.restore_state(&suspended).unwrap();
    assert_eq!(again.raw.state.get(&q5.id()), Some(&(1..=16).collect::<Vec<u8>>()));
    assert_eq!(clock.guest_counter(), 3_000, "the guest's counter goes on from the saved one");
    assert!(power.states()[1].on, "PSCI sees it on");
    assert_eq!(again.save_state().unwrap().power, crate::state::Power::Suspended);

    // Damaged or foreign states are refused before anything is written.
    let mut fresh = clocked(0, Vec::new(), &power, &clock);
    let mut short = saved.clone();
    short.regs.pop();
    assert!(fresh.restore_state(&short).unwrap_err().to_string().contains("not Hypervisor.framework's list"));
    let mut wide = saved.clone();
    wide.regs[0].value.push(0);
    assert!(fresh.restore_state(&wide).is_err());
    let serror = crate::state::VcpuState { serror: Some(crate::state::PendingSerror { esr: None }), ..saved };
    assert!(fresh.restore_state(&serror).unwrap_err().to_string().contains("SError"));
    assert!(fresh.raw.state.is_empty(), "nothing written");
}

#[test]
fn a_load_the_vmm_served_completes_before_the_vcpu_is_saved() {
    let script = vec![step(&[], exception(load32(3), UART))];
    let power = Power::new(&[0x8000_0000]);
    let clock = VmClock::new(|| 0);
    let mut vcpu = clocked(0, script, &power, &clock);
    assert_eq!(exit_of(&mut vcpu), format!("read {UART:#x}"));
    vcpu.save_state().unwrap();
    assert_eq!(vcpu.raw.reg(Reg::X(3)).unwrap(), 0x1234_5678);
    assert_eq!(vcpu.raw.reg(Reg::Pc).unwrap(), 0x4008_0004, "stepped past the load");
}

#[test]
fn with_the_frameworks_gic_a_vcpu_saves_its_cpu_interface_and_a_vm_without_it_refuses_it() {
    let (power, clock) = (Power::new(&[0x8000_0000]), VmClock::new(|| 0));
    let sre = crate::hvf_regs::StateReg::GicCpu(0xc665);
    let mut with = clocked(0, Vec::new(), &power, &clock).with_kernel_gic();
    with.raw.state.insert(sre.id(), 7u64.to_le_bytes().to_vec());
    let saved = with.save_state().unwrap();
    let plain = clocked(0, Vec::new(), &power, &clock).save_state().unwrap();
    assert_eq!(saved.regs.len(), plain.regs.len() + 9, "the ICC registers");
    let mut again = clocked(0, Vec::new(), &power, &clock).with_kernel_gic();
    again.restore_state(&saved).unwrap();
    assert_eq!(again.raw.state.get(&sre.id()), Some(&7u64.to_le_bytes().to_vec()));
    let mut without = clocked(0, Vec::new(), &power, &clock);
    assert!(without.restore_state(&saved).is_err(), "a snapshot with the framework's GIC needs it");
}

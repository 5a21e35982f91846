//! The vCPU loop: run the guest, serve its exits, stop when it asks.
//!
//! Generic over [`hypervisor::Vcpu`], so the same loop serves every backend and is
//! tested here against a scripted fake vCPU.

use devices::bus::MmioBus;
use devices::warn_ratelimited;
use hypervisor::{IrqInput, SystemEvent, Vcpu, VcpuExit};

use crate::control::Control;
use crate::irqchip::{Irqchip, VcpuIrq};
use crate::metrics::VcpuCounters;
use crate::{Error, ExitReason};

/// What a vCPU loop works with besides its vCPU.
#[derive(Debug, Clone, Copy)]
pub struct VcpuContext<'a> {
    /// The vCPU's index (0 boots; the others wait for PSCI CPU_ON).
    pub index: u32,
    /// The MMIO bus.
    pub bus: &'a MmioBus,
    /// The interrupt controller: the loop runs its per-vCPU hooks around every run.
    pub irqchip: &'a dyn Irqchip,
    /// The machine's stop switch.
    pub control: &'a Control,
}

/// Runs `vcpu` until the machine stops: the guest powers off, resets or crashes, the
/// backend fails, or someone else stops the machine (then `None`).
///
/// MMIO exits go to the bus. An access no device claims reads as zero and its write is
/// dropped, with a rate-limited warning: a guest poking at random addresses must not
/// stop the VMM. The interrupt controller's hooks ([`VcpuIrq`]) run before every run and
/// after every exit; the loop is chosen once, so with the hypervisor's GIC (no hooks) an
/// exit costs nothing for interrupts at all.
pub fn run_loop<V: Vcpu + IrqInput>(ctx: VcpuContext<'_>, vcpu: &mut V) -> Option<Result<ExitReason, Error>> {
    match ctx.irqchip.vcpu(ctx.index, vcpu.kicker()) {
        Some(mut hooks) => drive(ctx, vcpu, &mut *hooks),
        None => drive(ctx, vcpu, &mut NoHooks),
    }
}

/// The hooks of a controller that needs none.
struct NoHooks;

impl VcpuIrq for NoHooks {
    #[inline(always)]
    fn before_run(&mut self, _: &mut dyn IrqInput) -> hypervisor::Result<()> {
        Ok(())
    }
    #[inline(always)]
    fn after_exit(&mut self, _: &mut dyn IrqInput) {}
}

fn drive<V: Vcpu + IrqInput, H: VcpuIrq + ?Sized>(
    ctx: VcpuContext<'_>,
    vcpu: &mut V,
    hooks: &mut H,
) -> Option<Result<ExitReason, Error>> {
    let mut stats = ExitStats::new(ctx.control.metrics().vcpu(ctx.index));
    let mut outcome = None;
    while outcome.is_none() && !ctx.control.stopping() {
        ctx.control.park_if_paused(ctx.index, &mut || vcpu.save_state());
        if ctx.control.stopping() {
            break;
        }
        if let Err(e) = hooks.before_run(vcpu) {
            outcome = Some(Err(e.into()));
            break;
        }
        outcome = serve_one(ctx, vcpu, &mut stats);
        hooks.after_exit(vcpu);
    }
    stats.timer_changes = hooks.timer_changes();
    stats.log(ctx.index);
    ctx.control.record_exits(ctx.index, vcpu.recent_exits());
    outcome
}

/// What a vCPU's exits were: counters for metrics ([`crate::metrics`]), and for
/// `RUST_LOG=info` (totals) and `debug` (busiest registers) when the loop ends.
#[derive(Debug)]
struct ExitStats {
    counters: std::sync::Arc<VcpuCounters>,
    timer_changes: u64,
    by_addr: Option<std::collections::HashMap<u64, u64>>,
    /// Accesses at addresses past the first [`MAX_ADDRS`] (the guest picks them).
    other_addrs: u64,
}

/// Distinct MMIO addresses counted one by one; a guest that touches more (a scan of
/// unused address space) has the rest counted together, so the map stays bounded.
const MAX_ADDRS: usize = 4096;

impl ExitStats {
    fn new(counters: std::sync::Arc<VcpuCounters>) -> Self {
        let by_addr = log::log_enabled!(log::Level::Debug).then(std::collections::HashMap::new);
        ExitStats { counters, timer_changes: 0, by_addr, other_addrs: 0 }
    }

    fn mmio(&mut self, addr: u64) {
        let Some(map) = &mut self.by_addr else { return };
        if let Some(count) = map.get_mut(&addr) {
            *count += 1;
        } else if map.len() < MAX_ADDRS {
            map.insert(addr, 1);
        } else {
            self.other_addrs += 1;
        }
    }

    fn log(&self, index: u32) {
        let get = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let (reads, writes, interrupted) =
            (get(&self.counters.mmio_reads), get(&self.counters.mmio_writes), get(&self.counters.interrupted));
        log::info!(
            "vcpu{index}: {} exits: {} MMIO reads, {} MMIO writes, {} interrupted; {} timer level changes",
            reads + writes + interrupted,
            reads,
            writes,
            interrupted,
            self.timer_changes
        );
        if let Some(map) = &self.by_addr {
            let mut busiest: Vec<_> = map.iter().collect();
            busiest.sort_by(|a, b| b.1.cmp(a.1));
            for (addr, count) in busiest.into_iter().take(10) {
                log::debug!("vcpu{index}: {count:>9} accesses at {addr:#x}");
            }
            if self.other_addrs > 0 {
                log::debug!("vcpu{index}: {:>9} accesses at addresses past the first {MAX_ADDRS}", self.other_addrs);
            }
        }
    }
}

/// Runs the guest once and serves the exit; `Some` when the machine must stop.
fn serve_one<V: Vcpu>(ctx: VcpuContext<'_>, vcpu: &mut V, stats: &mut ExitStats) -> Option<Result<ExitReason, Error>> {
    let index = ctx.index;
    let bus = ctx.bus;
    let exit = match vcpu.run() {
        Ok(exit) => exit,
        Err(e) => return Some(Err(e.into())),
    };
    match exit {
        VcpuExit::MmioRead { addr, data } => {
            VcpuCounters::bump(&stats.counters.mmio_reads);
            stats.mmio(addr);
            if let Err(e) = bus.read(index as usize, addr, data) {
                data.fill(0);
                VcpuCounters::bump(&stats.counters.bad_accesses);
                warn_ratelimited!("vcpu{index}: {e}: read returns 0");
            }
        }
        VcpuExit::MmioWrite { addr, data } => {
            VcpuCounters::bump(&stats.counters.mmio_writes);
            stats.mmio(addr);
            if let Err(e) = bus.write(index as usize, addr, data) {
                VcpuCounters::bump(&stats.counters.bad_accesses);
                warn_ratelimited!("vcpu{index}: {e}: write ignored");
            }
        }
        VcpuExit::System(SystemEvent::Shutdown) => return Some(Ok(ExitReason::PowerOff)),
        VcpuExit::System(SystemEvent::Reset) => return Some(Ok(ExitReason::Reset)),
        VcpuExit::System(SystemEvent::Crash) => return Some(Ok(ExitReason::Crash)),
        VcpuExit::Interrupted => VcpuCounters::bump(&stats.counters.interrupted),
        VcpuExit::Unhandled(why) => return Some(Err(Error::UnhandledExit { vcpu: index, why })),
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irqchip::{EmulatedGic, HypervisorGic};
    use devices::bus::MmioDeviceMut;
    use devices::gic::VTIMER_PPI;
    use hypervisor::{Kicker, Reg};
    use std::collections::VecDeque;
    use std::sync::{Arc, Mutex};

    /// One scripted exit.
    #[derive(Debug, Clone)]
    enum Step {
        Read(u64, usize),
        Write(u64, Vec<u8>),
        System(SystemEvent),
        /// An interrupted run after which the timer reads as this level.
        Timer(bool),
        Unhandled,
    }

    /// A vCPU that replays a script and records what the loop gave back for reads.
    #[derive(Default)]
    struct Scripted {
        steps: VecDeque<Step>,
        buf: [u8; 8],
        reads: Vec<Vec<u8>>,
        pending_read: Option<usize>,
        timer: bool,
        /// Every level the loop set on the IRQ line.
        irq_levels: Vec<bool>,
    }

    struct NoKick;
    impl Kicker for NoKick {
        fn kick(&self) {}
    }

    impl Vcpu for Scripted {
        fn run(&mut self) -> hypervisor::Result<VcpuExit<'_>> {
            // Completing the previous read, as a backend does on re-entry.
            if let Some(len) = self.pending_read.take() {
                self.reads.push(self.buf[..len].to_vec());
            }
            let step = self.steps.pop_front().expect("the loop ran past the end of the script");
            Ok(match step {
                Step::Read(addr, len) => {
                    self.buf = [0xee; 8];
                    self.pending_read = Some(len);
                    VcpuExit::MmioRead { addr, data: &mut self.buf[..len] }
                }
                Step::Write(addr, data) => {
                    self.buf[..data.len()].copy_from_slice(&data);
                    VcpuExit::MmioWrite { addr, data: &self.buf[..data.len()] }
                }
                Step::System(event) => VcpuExit::System(event),
                Step::Timer(level) => {
                    self.timer = level;
                    VcpuExit::Interrupted
                }
                Step::Unhandled => VcpuExit::Unhandled("KVM_EXIT_FAIL_ENTRY".into()),
            })
        }
        fn kicker(&self) -> Arc<dyn Kicker> {
            Arc::new(NoKick)
        }
        fn set_reg(&mut self, _: Reg, _: u64) -> hypervisor::Result<()> {
            Ok(())
        }
        fn get_reg(&mut self, _: Reg) -> hypervisor::Result<u64> {
            Ok(0)
        }
    }

    impl IrqInput for Scripted {
        fn vtimer_asserted(&mut self) -> bool {
            self.timer
        }
        fn set_irq_line(&mut self, level: bool) -> hypervisor::Result<()> {
            self.irq_levels.push(level);
            Ok(())
        }
    }

    #[derive(Default)]
    struct Register {
        value: u8,
    }
    impl MmioDeviceMut for Register {
        fn read(&mut self, _: usize, _: u64, data: &mut [u8]) {
            data.fill(self.value);
        }
        fn write(&mut self, _: usize, _: u64, data: &[u8]) {
            self.value = data[0];
        }
    }

    struct Machine {
        bus: MmioBus,
        irqchip: Arc<dyn Irqchip>,
        control: Arc<Control>,
    }

    fn machine() -> Machine {
        let mut bus = MmioBus::new();
        bus.insert(0x1000, 0x100, Arc::new(Mutex::new(Register::default()))).unwrap();
        Machine { bus, irqchip: Arc::new(EmulatedGic::new(1)), control: Control::new() }
    }

    fn run_vcpu(m: &Machine, steps: Vec<Step>) -> (Option<Result<ExitReason, Error>>, Scripted) {
        let mut vcpu = Scripted { steps: steps.into(), ..Default::default() };
        let ctx = VcpuContext { index: 0, bus: &m.bus, irqchip: &*m.irqchip, control: &m.control };
        let result = run_loop(ctx, &mut vcpu);
        (result, vcpu)
    }

    fn run(m: &Machine, steps: Vec<Step>) -> (Option<Result<ExitReason, Error>>, Vec<Vec<u8>>) {
        let (result, vcpu) = run_vcpu(m, steps);
        (result, vcpu.reads)
    }

    #[test]
    fn device_accesses_and_power_off() {
        let (result, reads) = run(
            &machine(),
            vec![
                Step::Write(0x1000, vec![0x42]),
                Step::Read(0x1004, 4),
                Step::Timer(false),
                Step::System(SystemEvent::Shutdown),
            ],
        );
        assert_eq!(result.unwrap().unwrap(), ExitReason::PowerOff);
        assert_eq!(reads, vec![vec![0x42; 4]]);
    }

    #[test]
    fn unclaimed_accesses_read_zero_and_keep_running() {
        let (result, reads) = run(
            &machine(),
            vec![
                Step::Write(0xdead_0000, vec![1, 2, 3, 4]),
                Step::Read(0xdead_0000, 8),
                // Straddling the end of a device is not the device's business either.
                Step::Read(0x10fe, 4),
                Step::System(SystemEvent::Reset),
            ],
        );
        assert_eq!(result.unwrap().unwrap(), ExitReason::Reset);
        assert_eq!(reads, vec![vec![0; 8], vec![0; 4]]);
    }

    #[test]
    fn crash_and_unhandled_exits_end_the_loop_without_panicking() {
        let crash = run(&machine(), vec![Step::System(SystemEvent::Crash)]).0;
        assert_eq!(crash.unwrap().unwrap(), ExitReason::Crash);
        let err = run(&machine(), vec![Step::Unhandled]).0.unwrap().unwrap_err();
        assert!(err.to_string().contains("KVM_EXIT_FAIL_ENTRY"), "{err}");
    }

    #[test]
    fn timer_level_reaches_the_gic_as_ppi_27() {
        let chip = Arc::new(EmulatedGic::new(1));
        let m = Machine { irqchip: chip.clone(), ..machine() };
        let (dist, cpu) = (chip.gic().distributor(), chip.gic().cpu_interface());
        dist.write(0, 0x000, &1u32.to_le_bytes());
        dist.write(0, 0x100, &(1u32 << VTIMER_PPI).to_le_bytes());
        cpu.write(0, 0x00, &1u32.to_le_bytes());
        cpu.write(0, 0x04, &0xf0u32.to_le_bytes());
        let steps = vec![Step::Timer(true), Step::Timer(true), Step::Timer(false), Step::System(SystemEvent::Shutdown)];
        let (_, vcpu) = run_vcpu(&m, steps);
        // The line follows the timer, set by the loop itself before a run when it changed.
        assert_eq!(vcpu.irq_levels, vec![true, false]);
    }

    #[test]
    fn with_the_hypervisors_gic_the_loop_leaves_irq_lines_and_the_timer_alone() {
        #[derive(Debug)]
        struct Sink;
        impl hypervisor::SpiSink for Sink {
            fn set_spi(&self, _: u32, _: bool) -> hypervisor::Result<()> {
                Ok(())
            }
        }
        let mut m = machine();
        let layout = arch_aarch64::layout::GicV3Layout { distributor: (0, 0), redistributors: (0, 0) };
        m.irqchip = Arc::new(HypervisorGic::new(Arc::new(Sink), layout));
        let steps = vec![Step::Timer(true), Step::Timer(false), Step::System(SystemEvent::Shutdown)];
        let (result, vcpu) = run_vcpu(&m, steps);
        assert!(matches!(result, Some(Ok(ExitReason::PowerOff))));
        assert!(vcpu.irq_levels.is_empty(), "{:?}", vcpu.irq_levels);
    }

    #[test]
    fn a_stopped_machine_does_not_run() {
        let m = machine();
        m.control.stop(Ok(ExitReason::Stopped));
        // An empty script: running at all would panic.
        assert!(run(&m, vec![]).0.is_none());
    }

    #[test]
    fn a_scan_of_many_addresses_is_counted_in_a_bounded_map() {
        let mut stats = ExitStats::new(Arc::default());
        stats.by_addr = Some(std::collections::HashMap::new()); // as with RUST_LOG=debug
        for addr in 0..(MAX_ADDRS as u64 + 1000) {
            stats.mmio(0x1000_0000 + 4 * addr);
        }
        stats.mmio(0x1000_0000);
        let map = stats.by_addr.as_ref().expect("the map");
        assert_eq!(map.len(), MAX_ADDRS);
        assert_eq!(map[&0x1000_0000], 2, "an address already counted is still counted");
        assert_eq!(stats.other_addrs, 1000);
    }
}

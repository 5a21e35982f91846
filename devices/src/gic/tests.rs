use super::*;
use std::sync::Mutex;

/// Records every output change.
#[derive(Default)]
struct Outputs(Mutex<Vec<(usize, bool)>>);

impl CpuIrqSink for Outputs {
    fn set_cpu_irq(&self, cpu: usize, level: bool) {
        self.0.lock().unwrap().push((cpu, level));
    }
}

struct Rig {
    gic: Arc<Gic>,
    outputs: Arc<Outputs>,
    dist: Arc<dyn MmioDevice>,
    cpu: Arc<dyn MmioDevice>,
}

impl Rig {
    fn new(cpus: usize) -> Self {
        let outputs = Arc::new(Outputs::default());
        let gic = Gic::new(cpus, outputs.clone());
        let (dist, cpu) = (gic.distributor(), gic.cpu_interface());
        let rig = Rig { gic, outputs, dist, cpu };
        // What Linux's GICv2 driver does at boot, in short.
        rig.dw(0, 0x000, 1);
        for c in 0..cpus {
            rig.cw(c, 0x00, 1); // enable the CPU interface
            rig.cw(c, 0x04, 0xf0); // PMR
        }
        rig
    }
    fn dr(&self, vcpu: usize, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.dist.read(vcpu, offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn dw(&self, vcpu: usize, offset: u64, value: u32) {
        self.dist.write(vcpu, offset, &value.to_le_bytes());
    }
    fn cr(&self, vcpu: usize, offset: u64) -> u32 {
        let mut b = [0u8; 4];
        self.cpu.read(vcpu, offset, &mut b);
        u32::from_le_bytes(b)
    }
    fn cw(&self, vcpu: usize, offset: u64, value: u32) {
        self.cpu.write(vcpu, offset, &value.to_le_bytes());
    }
    fn iar(&self, vcpu: usize) -> u32 {
        self.cr(vcpu, 0x0c)
    }
    fn eoi(&self, vcpu: usize, value: u32) {
        self.cw(vcpu, 0x10, value);
    }
    fn enable(&self, vcpu: usize, id: u32) {
        self.dw(vcpu, 0x100 + u64::from(id / 32) * 4, 1 << (id % 32));
    }
    fn set_priority(&self, vcpu: usize, id: u32, priority: u8) {
        self.dist.write(vcpu, 0x400 + u64::from(id), &[priority]);
    }
    fn target(&self, id: u32, mask: u8) {
        self.dist.write(0, 0x800 + u64::from(id), &[mask]);
    }
    fn asserted(&self, vcpu: usize) -> bool {
        self.gic.irq_asserted(vcpu)
    }
}

const UART: u32 = 33;

fn rig_with_spi(id: u32, priority: u8) -> Rig {
    let r = Rig::new(2);
    r.enable(0, id);
    r.set_priority(0, id, priority);
    r.target(id, 0b01);
    r
}

#[test]
fn typer_iidr_and_banked_targets() {
    let r = Rig::new(4);
    assert_eq!(r.dr(0, 0x004), (3 << 5) | 2, "4 CPUs, 96 interrupts");
    assert_eq!(r.dr(0, 0x008), 0x0200_043b);
    assert_eq!(r.dr(0, 0xfe8), 0x2b, "PIDR2 says GICv2");
    // ITARGETSR0..7 read as the reading CPU's own bit: Linux learns its CPU mask here.
    assert_eq!(r.dr(0, 0x800), 0x0101_0101);
    assert_eq!(r.dr(2, 0x81c), 0x0404_0404);
    // SPI targets are kept per interrupt and drop non-existent CPUs.
    r.target(40, 0xff);
    assert_eq!(r.dr(0, 0x828) & 0xff, 0x0f);
    // SGIs read back as edge-triggered in ICFGR0.
    assert_eq!(r.dr(0, 0xc00), 0xaaaa_aaaa);
}

#[test]
fn iar_eoir_handshake_with_a_level_spi() {
    let r = rig_with_spi(UART, 0xa0);
    assert_eq!(r.iar(0), SPURIOUS, "nothing pending");
    let line = r.gic.spi_line(UART - 32);
    line.set_level(true);
    assert!(r.asserted(0));
    assert!(!r.asserted(1), "targeted at CPU 0 only");
    assert_eq!(r.cr(0, 0x18), UART, "HPPIR");
    assert_eq!(r.iar(0), UART);
    assert_eq!(r.cr(0, 0x14), 0xa0, "RPR is the active priority");
    assert!(!r.asserted(0), "active, so no longer signalled");
    assert_eq!(r.dr(0, 0x304) & 2, 2, "ISACTIVER1 shows it");
    // Still asserted at EOI: level-sensitive, so pending again.
    r.eoi(0, UART);
    assert_eq!(r.cr(0, 0x14), 0xff, "idle");
    assert!(r.asserted(0));
    assert_eq!(r.iar(0), UART);
    line.set_level(false);
    r.eoi(0, UART);
    assert!(!r.asserted(0));
    assert_eq!(r.iar(0), SPURIOUS);
    let outputs = r.outputs.0.lock().unwrap().clone();
    assert_eq!(outputs, vec![(0, true), (0, false), (0, true), (0, false)]);
}

#[test]
fn edge_spi_latches_one_pulse_and_remembers_one_while_active() {
    let r = rig_with_spi(40, 0x80);
    r.dw(0, 0xc08, 2 << 16); // ICFGR2: INTID 40 edge-triggered
    let line = r.gic.spi_line(8);
    line.set_level(true);
    line.set_level(false);
    assert!(r.asserted(0), "the edge latched");
    assert_eq!(r.iar(0), 40);
    line.set_level(true);
    line.set_level(false);
    assert!(!r.asserted(0), "pending and active: not signalled");
    r.eoi(0, 40);
    assert_eq!(r.iar(0), 40, "the second edge was kept");
    r.eoi(0, 40);
    assert_eq!(r.iar(0), SPURIOUS);
}

#[test]
fn priority_mask_blocks_equal_and_lower_priorities() {
    let r = rig_with_spi(UART, 0x80);
    r.gic.spi_line(UART - 32).set_level(true);
    r.cw(0, 0x04, 0x80);
    assert!(!r.asserted(0), "priority must be strictly higher than PMR");
    assert_eq!(r.iar(0), SPURIOUS);
    r.cw(0, 0x04, 0x88);
    assert!(r.asserted(0));
    assert_eq!(r.cr(0, 0x04), 0x88);
    r.cw(0, 0x04, 0x00);
    assert!(!r.asserted(0));
    // Unimplemented low priority bits read as zero.
    r.set_priority(0, UART, 0xff);
    assert_eq!(r.dr(0, 0x420) >> 8 & 0xff, 0xf8);
}

#[test]
fn preemption_follows_group_priority() {
    let r = Rig::new(1);
    for (id, prio) in [(33, 0x80), (34, 0x40), (35, 0xc0), (36, 0x88)] {
        r.enable(0, id);
        r.set_priority(0, id, prio);
        r.target(id, 1);
    }
    r.gic.spi_line(1).set_level(true); // 33 @ 0x80
    assert_eq!(r.iar(0), 33);
    r.gic.spi_line(3).set_level(true); // 35 @ 0xc0: lower, must wait
    r.gic.spi_line(4).set_level(true); // 36 @ 0x88: lower than running 0x80
    assert!(!r.asserted(0));
    r.gic.spi_line(2).set_level(true); // 34 @ 0x40: preempts
    assert!(r.asserted(0));
    assert_eq!(r.iar(0), 34);
    assert_eq!(r.cr(0, 0x14), 0x40);
    r.gic.spi_line(2).set_level(false);
    r.eoi(0, 34);
    assert_eq!(r.cr(0, 0x14), 0x80, "back to the preempted one");
    r.gic.spi_line(1).set_level(false);
    r.eoi(0, 33);
    assert_eq!(r.iar(0), 36, "then the highest of the rest");
    // With a binary point of 7 the whole priority is sub-priority: no preemption at all.
    r.cw(0, 0x08, 7);
    r.gic.spi_line(2).set_level(true);
    assert!(!r.asserted(0));
    r.cw(0, 0x08, 0);
    assert_eq!(r.cr(0, 0x08), 2, "BPR has a minimum of 2 with five priority bits");
    assert!(r.asserted(0));
}

#[test]
fn sgis_reach_their_target_list_with_the_source_cpu() {
    let r = Rig::new(4);
    for c in 0..4 {
        r.enable(c, 3);
        r.set_priority(c, 3, 0x00);
    }
    // CPU 0 sends SGI 3 to CPUs 1 and 2.
    r.dw(0, 0xf00, (0b0110 << 16) | 3);
    assert_eq!((0..4).map(|c| r.asserted(c)).collect::<Vec<_>>(), [false, true, true, false]);
    assert_eq!(r.iar(1), 3, "source CPU 0 in bits 12:10");
    // CPU 3 sends to all but itself, then to itself.
    r.dw(3, 0xf00, (1 << 24) | 3);
    assert_eq!(r.dr(2, 0xf10) >> 24, 0b1001, "CPENDSGIR: pending from CPUs 0 and 3");
    assert_eq!(r.iar(2), 3);
    r.eoi(2, 3);
    assert_eq!(r.iar(2), 3 | (3 << 10), "one source at a time");
    r.dw(3, 0xf00, (2 << 24) | 3);
    assert_eq!(r.iar(3), 3 | (3 << 10));
    // CPU 1 acknowledged SGI 3 from CPU 0 and got CPU 3's send while it was active.
    r.eoi(1, 3);
    assert_eq!(r.iar(1), 3 | (3 << 10));
    // CPU 0 got CPU 3's broadcast too.
    assert_eq!(r.iar(0), 3 | (3 << 10));
    r.eoi(0, 3);
    assert!(!r.asserted(0));
    // SPENDSGIR sets, CPENDSGIR clears.
    r.dist.write(0, 0xf23, &[0b10]);
    assert!(r.asserted(0));
    r.dist.write(0, 0xf13, &[0b10]);
    assert!(!r.asserted(0));
}

#[test]
fn eoimode_splits_priority_drop_from_deactivation() {
    let r = rig_with_spi(UART, 0xa0);
    r.cw(0, 0x00, 1 | (1 << 9));
    assert_eq!(r.cr(0, 0x00), 1 | (1 << 9));
    r.gic.spi_line(1).set_level(true);
    assert_eq!(r.iar(0), UART);
    r.eoi(0, UART);
    assert_eq!(r.cr(0, 0x14), 0xff, "priority dropped");
    assert!(!r.asserted(0), "still active until DIR");
    r.cw(0, 0x1000, UART);
    assert!(r.asserted(0), "deactivated; the level keeps it pending");
}

#[test]
fn timer_ppi_is_per_cpu() {
    let r = Rig::new(2);
    for c in 0..2 {
        r.enable(c, VTIMER_PPI);
        r.set_priority(c, VTIMER_PPI, 0xa0);
    }
    r.gic.set_ppi_level(1, VTIMER_PPI, true);
    assert!(!r.asserted(0));
    assert!(r.asserted(1));
    assert_eq!(r.iar(1), VTIMER_PPI);
    r.gic.set_ppi_level(1, VTIMER_PPI, false);
    r.eoi(1, VTIMER_PPI);
    assert!(!r.asserted(1));
    // ISENABLER0 is banked: CPU 0's view has the PPI enabled too, CPU 1 can disable its own.
    r.dw(1, 0x180, 1 << VTIMER_PPI);
    assert_eq!(r.dr(1, 0x100) & (1 << VTIMER_PPI), 0);
    assert_ne!(r.dr(0, 0x100) & (1 << VTIMER_PPI), 0);
}

#[test]
fn disabled_distributor_or_interface_signals_nothing() {
    let r = rig_with_spi(UART, 0xa0);
    r.gic.spi_line(1).set_level(true);
    assert!(r.asserted(0));
    r.dw(0, 0x000, 0);
    assert!(!r.asserted(0));
    assert_eq!(r.iar(0), SPURIOUS);
    r.dw(0, 0x000, 1);
    r.cw(0, 0x00, 0);
    assert!(!r.asserted(0));
    r.cw(0, 0x00, 1);
    assert!(r.asserted(0));
}

#[test]
fn bogus_eoi_and_software_pending() {
    let r = rig_with_spi(UART, 0xa0);
    r.eoi(0, UART); // never acknowledged: ignored
    r.eoi(0, 1023); // spurious: ignored
    r.dw(0, 0x204, 1 << 1); // ISPENDR1: INTID 33
    assert!(r.asserted(0));
    r.dw(0, 0x284, 1 << 1); // ICPENDR1
    assert!(!r.asserted(0));
    // SGI bits of ISPENDR0 are read-only.
    r.enable(0, 1);
    r.dw(0, 0x200, 0xffff);
    assert_eq!(r.dr(0, 0x200) & 0xffff, 0);
}

#[test]
fn garbage_at_every_offset_and_size_never_panics() {
    let r = Rig::new(8);
    for vcpu in [0, 7, 8, 200] {
        for offset in (0..0x1100u64).step_by(1) {
            for len in [1usize, 2, 4, 8] {
                let junk = vec![0xffu8; len];
                r.dist.write(vcpu, offset, &junk);
                r.cpu.write(vcpu, offset, &junk);
                let mut buf = vec![0u8; len];
                r.dist.read(vcpu, offset, &mut buf);
                r.cpu.read(vcpu, offset, &mut buf);
            }
        }
    }
    // Still a working GIC afterwards: reset the state Linux would and use it.
    let r2 = rig_with_spi(UART, 0xa0);
    r2.gic.spi_line(1).set_level(true);
    assert_eq!(r2.iar(0), UART);
}

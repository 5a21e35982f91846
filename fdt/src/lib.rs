//! Builds the flattened device tree (DTB) that describes an hvrun machine to the guest.
//!
//! The VMM fills a [`Machine`] with what it actually created (RAM, vCPUs, devices,
//! command line, initrd) and [`build`] turns it into a blob with `vm-fdt`. Node shapes
//! follow the kernel's bindings (Documentation/devicetree/bindings): PSCI with the
//! `hvc` conduit, a GICv2 (`arm,cortex-a15-gic`) or GICv3 (`arm,gic-v3`) as the interrupt parent, the
//! `arm,armv8-timer` PPIs, an `arm,pl011` UART and an `arm,pl031` RTC (both
//! `arm,primecell`, with the `apb_pclk` clock), and a `/chosen` node with `bootargs`,
//! `stdout-path`, the initrd range and seeds for the kernel's RNG and KASLR.

use vm_fdt::FdtWriter;

/// Errors building a device tree.
#[derive(Debug, thiserror::Error)]
pub enum FdtError {
    /// `vm-fdt` refused the tree (a bad name or an oversized blob).
    #[error("building the device tree failed: {0}")]
    Writer(#[from] vm_fdt::Error),
    /// The finished blob is larger than the arm64 boot protocol allows.
    #[error("the device tree is {0} bytes, more than the 2 MiB the arm64 boot protocol allows")]
    TooLarge(usize),
}

/// A guest-physical register window.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWindow {
    /// Guest-physical base.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
}

/// A memory-mapped device: its window and, when wired to the GIC, its SPI (offset from
/// INTID 32; level-triggered, active high).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Device {
    /// The register window.
    pub window: MmioWindow,
    /// The SPI number, if the device raises an interrupt.
    pub spi: Option<u32>,
}

/// The interrupt controller.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gic {
    /// A GICv2: distributor and CPU interface windows.
    V2 {
        /// The distributor.
        distributor: MmioWindow,
        /// The CPU interface.
        cpu_interface: MmioWindow,
    },
    /// A GICv3: the distributor and one region holding every vCPU's redistributor.
    V3 {
        /// The distributor.
        distributor: MmioWindow,
        /// The redistributors, contiguous, two 64 KiB frames each.
        redistributors: MmioWindow,
    },
}

/// What the device tree describes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Machine {
    /// RAM: guest-physical base and size.
    pub ram: (u64, u64),
    /// The MPIDR_EL1 of each vCPU, in vCPU order.
    pub cpu_mpidrs: Vec<u64>,
    /// The kernel command line.
    pub cmdline: String,
    /// The initrd's guest-physical start and end (exclusive).
    pub initrd: Option<(u64, u64)>,
    /// The interrupt controller; with it come the architected timer's PPIs.
    pub gic: Option<Gic>,
    /// The PL011 UART.
    pub uart: Option<Device>,
    /// The PL031 RTC.
    pub rtc: Option<Device>,
    /// virtio-mmio devices, each with its window and SPI.
    pub virtio: Vec<Device>,
    /// The virtio-mmio devices' SPIs are rising-edge triggered (IRQ_TYPE_EDGE_RISING)
    /// rather than level-high: when the VMM raises them through the hypervisor's edge
    /// triggers (KVM's irqfd), which pulse the line.
    pub virtio_edge: bool,
    /// Bytes for `/chosen/rng-seed` (the kernel's entropy at boot); none when empty.
    pub rng_seed: Vec<u8>,
    /// `/chosen/kaslr-seed`, when non-zero.
    pub kaslr_seed: u64,
    /// The guest has EL2 (`--nested`): PSCI is called with SMC (an HVC at EL2 is the
    /// guest's own), and the GICv3 names its maintenance interrupt, which a guest
    /// hypervisor's vGIC needs.
    pub el2: bool,
}

const CLOCK_PHANDLE: u32 = 1;
const GIC_PHANDLE: u32 = 2;
/// GIC interrupt specifier types (first cell).
const GIC_SPI: u32 = 0;
const GIC_PPI: u32 = 1;
/// Level-triggered, active high (IRQ_TYPE_LEVEL_HIGH).
const IRQ_LEVEL_HIGH: u32 = 4;
/// Edge-triggered, rising (IRQ_TYPE_EDGE_RISING).
const IRQ_EDGE_RISING: u32 = 1;
/// The architected timer's PPIs in the binding's order: secure physical, non-secure
/// physical, virtual, hypervisor (INTIDs 29, 30, 27, 26). The optional fifth, EL2's
/// virtual timer, is left out: Hypervisor.framework's GIC has none (`hv_gic_intid_t`),
/// and Linux at EL2 uses the hypervisor physical timer.
const TIMER_PPIS: [u32; 4] = [13, 14, 11, 10];
/// The GICv3 maintenance interrupt (INTID 25), which a guest hypervisor's vGIC needs.
const GIC_MAINTENANCE_PPI: u32 = 9;
/// The PL011's reference clock; Linux only needs it to exist and be fixed.
const APB_PCLK_HZ: u32 = 24_000_000;

/// Builds the DTB for `machine`.
pub fn build(machine: &Machine) -> Result<Vec<u8>, FdtError> {
    let mut fdt = FdtWriter::new()?;
    let root = fdt.begin_node("")?;
    fdt.property_string("compatible", "linux,dummy-virt")?;
    fdt.property_string("model", "hvrun")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 2)?;
    if machine.gic.is_some() {
        fdt.property_u32("interrupt-parent", GIC_PHANDLE)?;
    }

    let cpus = fdt.begin_node("cpus")?;
    fdt.property_u32("#address-cells", 2)?;
    fdt.property_u32("#size-cells", 0)?;
    for mpidr in &machine.cpu_mpidrs {
        // The reg of an arm64 cpu node is MPIDR_EL1's affinity fields.
        let reg = mpidr & 0xff_00ff_ffff;
        let cpu = fdt.begin_node(&format!("cpu@{reg:x}"))?;
        fdt.property_string("device_type", "cpu")?;
        fdt.property_string("compatible", "arm,arm-v8")?;
        fdt.property_string("enable-method", "psci")?;
        fdt.property_u64("reg", reg)?;
        fdt.end_node(cpu)?;
    }
    fdt.end_node(cpus)?;

    let psci = fdt.begin_node("psci")?;
    fdt.property_string_list("compatible", vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()])?;
    fdt.property_string("method", if machine.el2 { "smc" } else { "hvc" })?;
    fdt.end_node(psci)?;

    let (ram_base, ram_size) = machine.ram;
    let memory = fdt.begin_node(&format!("memory@{ram_base:x}"))?;
    fdt.property_string("device_type", "memory")?;
    fdt.property_array_u64("reg", &[ram_base, ram_size])?;
    fdt.end_node(memory)?;

    let clock = fdt.begin_node("apb-pclk")?;
    fdt.property_string("compatible", "fixed-clock")?;
    fdt.property_u32("#clock-cells", 0)?;
    fdt.property_u32("clock-frequency", APB_PCLK_HZ)?;
    fdt.property_string("clock-output-names", "clk24mhz")?;
    fdt.property_phandle(CLOCK_PHANDLE)?;
    fdt.end_node(clock)?;

    if let Some(gic) = machine.gic {
        let (compatible, first, second, cpu_mask) = match gic {
            // GICv2 PPI specifiers carry the mask of CPUs the PPI is wired to in bits 15:8.
            Gic::V2 { distributor, cpu_interface } => {
                ("arm,cortex-a15-gic", distributor, cpu_interface, (1u32 << machine.cpu_mpidrs.len().clamp(1, 8)) - 1)
            }
            // GICv3 has no such mask: the field must be zero.
            Gic::V3 { distributor, redistributors } => ("arm,gic-v3", distributor, redistributors, 0),
        };
        let node = fdt.begin_node(&format!("intc@{:x}", first.base))?;
        fdt.property_string("compatible", compatible)?;
        fdt.property_u32("#interrupt-cells", 3)?;
        fdt.property_null("interrupt-controller")?;
        fdt.property_array_u64("reg", &[first.base, first.size, second.base, second.size])?;
        if let Gic::V3 { .. } = gic {
            fdt.property_u32("#redistributor-regions", 1)?;
            if machine.el2 {
                fdt.property_array_u32("interrupts", &[GIC_PPI, GIC_MAINTENANCE_PPI, IRQ_LEVEL_HIGH])?;
            }
        }
        fdt.property_phandle(GIC_PHANDLE)?;
        fdt.end_node(node)?;

        let timer = fdt.begin_node("timer")?;
        fdt.property_string("compatible", "arm,armv8-timer")?;
        let cells: Vec<u32> =
            TIMER_PPIS.iter().flat_map(|&ppi| [GIC_PPI, ppi, (cpu_mask << 8) | IRQ_LEVEL_HIGH]).collect();
        fdt.property_array_u32("interrupts", &cells)?;
        fdt.property_null("always-on")?;
        fdt.end_node(timer)?;
    }

    let primecell = |fdt: &mut FdtWriter, name: &str, compatible: &str, dev: Device, clocks: &[&str]| {
        let node = fdt.begin_node(&format!("{name}@{:x}", dev.window.base))?;
        fdt.property_string_list("compatible", vec![compatible.into(), "arm,primecell".into()])?;
        fdt.property_array_u64("reg", &[dev.window.base, dev.window.size])?;
        if let (Some(spi), true) = (dev.spi, machine.gic.is_some()) {
            fdt.property_array_u32("interrupts", &[GIC_SPI, spi, IRQ_LEVEL_HIGH])?;
        }
        fdt.property_array_u32("clocks", &vec![CLOCK_PHANDLE; clocks.len()])?;
        fdt.property_string_list("clock-names", clocks.iter().map(|c| c.to_string()).collect())?;
        fdt.end_node(node)
    };
    let mut stdout_path = None;
    if let Some(uart) = machine.uart {
        primecell(&mut fdt, "pl011", "arm,pl011", uart, &["uartclk", "apb_pclk"])?;
        stdout_path = Some(format!("/pl011@{:x}", uart.window.base));
    }
    if let Some(rtc) = machine.rtc {
        primecell(&mut fdt, "pl031", "arm,pl031", rtc, &["apb_pclk"])?;
    }
    for dev in &machine.virtio {
        let node = fdt.begin_node(&format!("virtio_mmio@{:x}", dev.window.base))?;
        fdt.property_string("compatible", "virtio,mmio")?;
        fdt.property_array_u64("reg", &[dev.window.base, dev.window.size])?;
        if let (Some(spi), true) = (dev.spi, machine.gic.is_some()) {
            let trigger = if machine.virtio_edge { IRQ_EDGE_RISING } else { IRQ_LEVEL_HIGH };
            fdt.property_array_u32("interrupts", &[GIC_SPI, spi, trigger])?;
        }
        fdt.property_null("dma-coherent")?;
        fdt.end_node(node)?;
    }

    let chosen = fdt.begin_node("chosen")?;
    fdt.property_string("bootargs", &machine.cmdline)?;
    if let Some(path) = &stdout_path {
        fdt.property_string("stdout-path", path)?;
    }
    if let Some((start, end)) = machine.initrd {
        fdt.property_u64("linux,initrd-start", start)?;
        fdt.property_u64("linux,initrd-end", end)?;
    }
    if !machine.rng_seed.is_empty() {
        fdt.property("rng-seed", &machine.rng_seed)?;
    }
    if machine.kaslr_seed != 0 {
        fdt.property_u64("kaslr-seed", machine.kaslr_seed)?;
    }
    fdt.end_node(chosen)?;

    fdt.end_node(root)?;
    let blob = fdt.finish()?;
    if blob.len() as u64 > arch_aarch64::layout::FDT_MAX_SIZE {
        return Err(FdtError::TooLarge(blob.len()));
    }
    Ok(blob)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::process::{Command, Stdio};

    /// Decodes a blob to DTS source with `dtc` (installed by `cargo xtask setup`).
    fn decompile(blob: &[u8]) -> String {
        let mut child = Command::new("dtc")
            .args(["-I", "dtb", "-O", "dts", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("dtc is needed for this test: run `cargo xtask setup` (package device-tree-compiler)");
        child.stdin.take().unwrap().write_all(blob).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(out.status.success(), "dtc failed: {}", String::from_utf8_lossy(&out.stderr));
        // dtc 1.6 prints a string list as "a\0b"; newer ones as "a", "b". Normalize.
        String::from_utf8(out.stdout).unwrap().replace("\\0", "\", \"")
    }

    fn machine() -> Machine {
        Machine {
            ram: (0x4000_0000, 0x2000_0000),
            cpu_mpidrs: vec![0x8000_0000, 0x8000_0001],
            cmdline: "console=ttyAMA0 quiet".into(),
            initrd: Some((0x5f00_0000, 0x5f12_3456)),
            gic: Some(Gic::V2 {
                distributor: MmioWindow { base: 0x0800_0000, size: 0x1000 },
                cpu_interface: MmioWindow { base: 0x0801_0000, size: 0x2000 },
            }),
            uart: Some(Device { window: MmioWindow { base: 0x0900_0000, size: 0x1000 }, spi: Some(1) }),
            rtc: Some(Device { window: MmioWindow { base: 0x0901_0000, size: 0x1000 }, spi: None }),
            virtio: vec![Device { window: MmioWindow { base: 0x0a00_0000, size: 0x200 }, spi: Some(16) }],
            virtio_edge: false,
            rng_seed: vec![0xab; 32],
            kaslr_seed: 0x1234_5678_9abc_def0,
            el2: false,
        }
    }

    #[test]
    fn decodes_with_the_expected_nodes() {
        let dts = decompile(&build(&machine()).unwrap());
        for needle in [
            "compatible = \"linux,dummy-virt\";",
            "cpu@0 {",
            "cpu@1 {",
            "enable-method = \"psci\";",
            "reg = <0x00 0x01>;",
            "compatible = \"arm,psci-1.0\", \"arm,psci-0.2\";",
            "method = \"hvc\";",
            "memory@40000000 {",
            "reg = <0x00 0x40000000 0x00 0x20000000>;",
            "pl011@9000000 {",
            "compatible = \"arm,pl011\", \"arm,primecell\";",
            "clock-names = \"uartclk\", \"apb_pclk\";",
            "bootargs = \"console=ttyAMA0 quiet\";",
            "stdout-path = \"/pl011@9000000\";",
            "linux,initrd-start = <0x00 0x5f000000>;",
            "linux,initrd-end = <0x00 0x5f123456>;",
            "interrupt-parent = <0x02>;",
            "intc@8000000 {",
            "compatible = \"arm,cortex-a15-gic\";",
            "#interrupt-cells = <0x03>;",
            "interrupt-controller;",
            "reg = <0x00 0x8000000 0x00 0x1000 0x00 0x8010000 0x00 0x2000>;",
            "compatible = \"arm,armv8-timer\";",
            "interrupts = <0x01 0x0d 0x304 0x01 0x0e 0x304 0x01 0x0b 0x304 0x01 0x0a 0x304>;",
            "interrupts = <0x00 0x01 0x04>;",
            "pl031@9010000 {",
            "compatible = \"arm,pl031\", \"arm,primecell\";",
            "kaslr-seed = <0x12345678 0x9abcdef0>;",
            "rng-seed = <0xabababab 0xabababab",
            "virtio_mmio@a000000 {",
            "compatible = \"virtio,mmio\";",
            "reg = <0x00 0xa000000 0x00 0x200>;",
            "interrupts = <0x00 0x10 0x04>;",
            "dma-coherent;",
        ] {
            assert!(dts.contains(needle), "missing `{needle}` in:\n{dts}");
        }
    }

    #[test]
    fn a_gicv3_has_its_redistributor_region_and_no_ppi_cpu_mask() {
        let v3 = Machine {
            gic: Some(Gic::V3 {
                distributor: MmioWindow { base: 0x0800_0000, size: 0x1_0000 },
                redistributors: MmioWindow { base: 0x0801_0000, size: 0x4_0000 },
            }),
            ..machine()
        };
        let dts = decompile(&build(&v3).unwrap());
        for needle in [
            "intc@8000000 {",
            "compatible = \"arm,gic-v3\";",
            "#interrupt-cells = <0x03>;",
            "reg = <0x00 0x8000000 0x00 0x10000 0x00 0x8010000 0x00 0x40000>;",
            "#redistributor-regions = <0x01>;",
            "interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;",
            "interrupt-parent = <0x02>;",
            "interrupts = <0x00 0x10 0x04>;",
        ] {
            assert!(dts.contains(needle), "missing `{needle}` in:\n{dts}");
        }
        assert!(!dts.contains("cortex-a15-gic"));
    }

    #[test]
    fn virtio_interrupts_are_rising_edges_when_asked_and_the_uart_stays_level() {
        let edge = Machine { virtio_edge: true, ..machine() };
        let dts = decompile(&build(&edge).unwrap());
        assert!(dts.contains("virtio_mmio@a000000 {\n\t\tcompatible = \"virtio,mmio\";\n\t\treg = <0x00 0xa000000 0x00 0x200>;\n\t\tinterrupts = <0x00 0x10 0x01>;"), "{dts}");
        assert!(dts.contains("interrupts = <0x00 0x01 0x04>;"), "the PL011's SPI is level-high: {dts}");
    }

    #[test]
    fn a_guest_with_el2_calls_psci_with_smc_and_has_the_gic_maintenance_interrupt() {
        let nested = Machine {
            gic: Some(Gic::V3 {
                distributor: MmioWindow { base: 0x0800_0000, size: 0x1_0000 },
                redistributors: MmioWindow { base: 0x0801_0000, size: 0x4_0000 },
            }),
            el2: true,
            ..machine()
        };
        let dts = decompile(&build(&nested).unwrap());
        for needle in [
            "method = \"smc\";",
            "#redistributor-regions = <0x01>;\n\t\tinterrupts = <0x01 0x09 0x04>;",
            "interrupts = <0x01 0x0d 0x04 0x01 0x0e 0x04 0x01 0x0b 0x04 0x01 0x0a 0x04>;",
        ] {
            assert!(dts.contains(needle), "missing `{needle}` in:\n{dts}");
        }
        let plain = decompile(&build(&Machine { el2: false, ..nested }).unwrap());
        assert!(plain.contains("method = \"hvc\";") && !plain.contains("0x01 0x09 0x04"));
    }

    #[test]
    fn optional_parts_are_left_out() {
        let bare = Machine { initrd: None, uart: None, gic: None, rng_seed: vec![], kaslr_seed: 0, ..machine() };
        let dts = decompile(&build(&bare).unwrap());
        for absent in ["initrd", "pl011", "stdout-path", "intc", "timer", "interrupt", "seed"] {
            assert!(!dts.contains(absent), "`{absent}` in:\n{dts}");
        }
        // The RTC has no interrupt, and its node is there.
        assert!(dts.contains("pl031@9010000"));
    }
}

//! Builds the flattened device tree (DTB) that describes an hvrun machine to the guest.
//!
//! The VMM fills a [`Machine`] with what it actually created (RAM, vCPUs, devices,
//! command line, initrd) and [`build`] turns it into a blob with `vm-fdt`. Node shapes
//! follow the kernel's bindings (Documentation/devicetree/bindings): PSCI with the
//! `hvc` conduit, an `arm,pl011` + `arm,primecell` UART with its `apb_pclk` clock, and a
//! `/chosen` node with `bootargs`, `stdout-path` and the initrd range.

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

/// A memory-mapped device: its window and, when wired, its SPI (offset from INTID 32).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MmioWindow {
    /// Guest-physical base.
    pub base: u64,
    /// Window size in bytes.
    pub size: u64,
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
    /// The PL011 UART.
    pub uart: Option<MmioWindow>,
}

const CLOCK_PHANDLE: u32 = 1;
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
    fdt.property_string_list(
        "compatible",
        vec!["arm,psci-1.0".into(), "arm,psci-0.2".into()],
    )?;
    fdt.property_string("method", "hvc")?;
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

    let mut stdout_path = None;
    if let Some(uart) = machine.uart {
        let name = format!("pl011@{:x}", uart.base);
        let node = fdt.begin_node(&name)?;
        fdt.property_string_list(
            "compatible",
            vec!["arm,pl011".into(), "arm,primecell".into()],
        )?;
        fdt.property_array_u64("reg", &[uart.base, uart.size])?;
        fdt.property_array_u32("clocks", &[CLOCK_PHANDLE, CLOCK_PHANDLE])?;
        fdt.property_string_list("clock-names", vec!["uartclk".into(), "apb_pclk".into()])?;
        fdt.end_node(node)?;
        stdout_path = Some(format!("/{name}"));
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
        assert!(
            out.status.success(),
            "dtc failed: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        // dtc 1.6 prints a string list as "a\0b"; newer ones as "a", "b". Normalize.
        String::from_utf8(out.stdout)
            .unwrap()
            .replace("\\0", "\", \"")
    }

    fn machine() -> Machine {
        Machine {
            ram: (0x4000_0000, 0x2000_0000),
            cpu_mpidrs: vec![0x8000_0000, 0x8000_0001],
            cmdline: "console=ttyAMA0 quiet".into(),
            initrd: Some((0x5f00_0000, 0x5f12_3456)),
            uart: Some(MmioWindow {
                base: 0x0900_0000,
                size: 0x1000,
            }),
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
        ] {
            assert!(dts.contains(needle), "missing `{needle}` in:\n{dts}");
        }
    }

    #[test]
    fn optional_parts_are_left_out() {
        let dts = decompile(
            &build(&Machine {
                initrd: None,
                uart: None,
                ..machine()
            })
            .unwrap(),
        );
        assert!(!dts.contains("initrd"));
        assert!(!dts.contains("pl011"));
        assert!(!dts.contains("stdout-path"));
    }
}

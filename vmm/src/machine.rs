//! Building the machine and running it: memory, kernel, device tree, devices, vCPUs.
//!
//! Compiled for arm64 hosts only (`linux-loader`'s arm64 Image loader exists only there);
//! everything it decides is computed by tested portable code in `arch-aarch64`.

use std::sync::{Arc, Mutex};

use arch_aarch64::boot::{mpidr, BootRegs};
use arch_aarch64::image;
use arch_aarch64::layout::{IPA_BITS, RAM_BASE, UART_BASE, UART_SIZE};
use devices::bus::MmioBus;
use devices::irq::NoIrq;
use devices::pl011::Pl011;
use hypervisor::{Hypervisor, Reg, Vcpu, Vm};
use linux_loader::loader::{pe::PE, KernelLoader};
use vm_memory::{Bytes, GuestAddress, GuestMemoryMmap};

use crate::boot_files::BootFiles;
use crate::{vcpu, Error, ExitReason, VmConfig};

/// Runs `config` on this host's hypervisor.
pub fn run(config: &VmConfig) -> Result<ExitReason, Error> {
    let files = BootFiles::open(config)?;
    #[cfg(target_os = "linux")]
    let hv = hypervisor::kvm::Kvm::new()?;
    #[cfg(target_os = "macos")]
    let hv = hypervisor::hvf::Hvf::new()?;
    run_on(&hv, config, files)
}

fn run_on<H: Hypervisor>(hv: &H, config: &VmConfig, files: BootFiles) -> Result<ExitReason, Error> {
    let (memory, regs) = load(config, files)?;
    let memory = Arc::new(memory);
    let mut vm = hv.create_vm(&hypervisor::VmConfig { ipa_bits: IPA_BITS })?;
    vm.map_memory(&memory)?;

    let mut bus = MmioBus::new();
    let uart = Pl011::new(Box::new(std::io::stdout()), Arc::new(NoIrq));
    bus.insert(UART_BASE, UART_SIZE, Arc::new(Mutex::new(uart)))?;

    let mut vcpu = vm.create_vcpu(0)?;
    vcpu.set_reg(Reg::Pc, regs.pc)?;
    vcpu.set_reg(Reg::X(0), regs.x0)?;
    vcpu.set_reg(Reg::Pstate, regs.pstate)?;
    log::info!("booting on {} with {} MiB", hv.name(), config.memory >> 20);
    vcpu::run_loop(0, &mut vcpu, &bus)
}

/// Creates guest RAM and loads the kernel, initrd and device tree into it.
fn load(config: &VmConfig, files: BootFiles) -> Result<(GuestMemoryMmap, BootRegs), Error> {
    let BootFiles { mut kernel, kernel_size, header, initrd } = files;
    let initrd_size = initrd.as_ref().map(|(_, size)| *size);
    let plan = image::plan(RAM_BASE, config.memory, &header, kernel_size, initrd_size)
        .map_err(|source| Error::Kernel { path: config.kernel.clone(), source })?;

    let ram_len = usize::try_from(config.memory).map_err(|_| Error::Memory("RAM size overflows".into()))?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_BASE), ram_len)])
        .map_err(|e| Error::Memory(format!("cannot allocate {} MiB: {e}", config.memory >> 20)))?;

    PE::load(&memory, Some(GuestAddress(plan.kernel_base)), &mut kernel, None)
        .map_err(|e| Error::Memory(format!("loading kernel {}: {e}", config.kernel.display())))?;

    let mut initrd_range = None;
    if let (Some((mut file, size)), Some(at)) = (initrd, plan.initrd) {
        let len = usize::try_from(size).map_err(|_| Error::Memory("initrd size overflows".into()))?;
        memory
            .read_exact_volatile_from(GuestAddress(at), &mut file, len)
            .map_err(|e| Error::Memory(format!("loading initrd: {e}")))?;
        initrd_range = Some((at, at + size));
    }

    let blob = fdt::build(&fdt::Machine {
        ram: (RAM_BASE, config.memory),
        cpu_mpidrs: (0..config.cpus).map(mpidr).collect(),
        cmdline: config.cmdline.clone(),
        initrd: initrd_range,
        uart: Some(fdt::MmioWindow { base: UART_BASE, size: UART_SIZE }),
    })?;
    memory
        .write_slice(&blob, GuestAddress(plan.fdt))
        .map_err(|e| Error::Memory(format!("writing the device tree: {e}")))?;

    Ok((memory, BootRegs::linux(plan.kernel_entry, plan.fdt)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use arch_aarch64::layout::FDT_MAX_SIZE;
    use vm_memory::GuestMemoryBackend;

    fn temp(name: &str, bytes: &[u8]) -> std::path::PathBuf {
        let path = std::env::temp_dir().join(format!("hvrun-machine-{}-{name}", std::process::id()));
        std::fs::write(&path, bytes).unwrap();
        path
    }

    #[test]
    fn loads_kernel_initrd_and_device_tree_where_the_plan_says() {
        let mut image = vec![0xa5u8; 8192];
        image[..64].fill(0);
        image[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes()); // 1 MiB with BSS
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp("Image", &image);
        let initrd = temp("initrd", &[0x5a; 5000]);
        let config = VmConfig { initrd: Some(initrd.clone()), memory: 64 << 20, ..VmConfig::new(&kernel) };

        let (memory, regs) = load(&config, BootFiles::open(&config).unwrap()).unwrap();
        assert_eq!(memory.num_regions(), 1);
        assert_eq!(regs.pc, RAM_BASE);
        let mut first = [0u8; 8192];
        memory.read_slice(&mut first, GuestAddress(RAM_BASE)).unwrap();
        assert_eq!(first.as_slice(), image.as_slice());

        let fdt = RAM_BASE + (64 << 20) - FDT_MAX_SIZE;
        assert_eq!(regs.x0, fdt);
        let magic: u32 = memory.read_obj(GuestAddress(fdt)).unwrap();
        assert_eq!(u32::from_be(magic), 0xd00d_feed);

        // The initrd sits page-aligned just below the device tree.
        let at = arch_aarch64::layout::align_down(fdt - 5000, arch_aarch64::layout::PAGE_SIZE);
        let mut initrd_bytes = [0u8; 5000];
        memory.read_slice(&mut initrd_bytes, GuestAddress(at)).unwrap();
        assert!(initrd_bytes.iter().all(|&b| b == 0x5a));
        std::fs::remove_file(kernel).unwrap();
        std::fs::remove_file(initrd).unwrap();
    }

    #[test]
    fn a_kernel_too_big_for_ram_is_refused_before_anything_runs() {
        let mut image = vec![0u8; 4096];
        image[16..24].copy_from_slice(&(100u64 << 20).to_le_bytes()); // 100 MiB of BSS
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp("Huge", &image);
        let config = VmConfig { memory: 64 << 20, ..VmConfig::new(&kernel) };
        let err = load(&config, BootFiles::open(&config).unwrap()).unwrap_err();
        assert!(err.to_string().contains("does not fit in guest RAM"), "{err}");
        std::fs::remove_file(kernel).unwrap();
    }
}

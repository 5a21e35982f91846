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
    let BootFiles {
        mut kernel,
        kernel_size,
        header,
        initrd,
    } = files;
    let initrd_size = initrd.as_ref().map(|(_, size)| *size);
    let plan = image::plan(RAM_BASE, config.memory, &header, kernel_size, initrd_size).map_err(
        |source| Error::Kernel {
            path: config.kernel.clone(),
            source,
        },
    )?;

    let ram_len =
        usize::try_from(config.memory).map_err(|_| Error::Memory("RAM size overflows".into()))?;
    let memory = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(RAM_BASE), ram_len)])
        .map_err(|e| Error::Memory(format!("cannot allocate {} MiB: {e}", config.memory >> 20)))?;

    PE::load(
        &memory,
        Some(GuestAddress(plan.kernel_base)),
        &mut kernel,
        None,
    )
    .map_err(|e| Error::Memory(format!("loading kernel {}: {e}", config.kernel.display())))?;

    let mut initrd_range = None;
    if let (Some((mut file, size)), Some(at)) = (initrd, plan.initrd) {
        let len =
            usize::try_from(size).map_err(|_| Error::Memory("initrd size overflows".into()))?;
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
        uart: Some(fdt::MmioWindow {
            base: UART_BASE,
            size: UART_SIZE,
        }),
    })?;
    memory
        .write_slice(&blob, GuestAddress(plan.fdt))
        .map_err(|e| Error::Memory(format!("writing the device tree: {e}")))?;

    Ok((memory, BootRegs::linux(plan.kernel_entry, plan.fdt)))
}

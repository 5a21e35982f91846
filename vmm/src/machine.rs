//! Building the machine and running it: memory, kernel, device tree, devices, vCPUs.
//!
//! Compiled for arm64 hosts only; everything it decides is computed by tested portable
//! code in `arch-aarch64`. The kernel and initrd are loaded by `guest_memory::load`, on
//! several threads (`linux-loader`'s Image loader reads the file on one).

use std::io::{Read, Write};
use std::sync::{Arc, Condvar, Mutex, OnceLock};
use std::time::Instant;

use arch_aarch64::boot::{mpidr, BootRegs};
use arch_aarch64::image;
use arch_aarch64::layout::*;
use devices::boot_timer::BootTimer;
use devices::bus::MmioBus;
use devices::output::Output;
use devices::pl011::{self, Pl011};
use devices::pl031::Pl031;
use devices::probe::Probe;
use devices::virtio::input::PowerButtonDevice;
use devices::virtio::mmio::{self, MmioTransport};
use devices::virtio::notifier::QueueNotifier;
use devices::virtio::{block::Block, console::Console, net::Net, rng::Rng, Interrupt, VirtioDevice};
use guest_memory::load;
use hypervisor::{GuestRam, Hypervisor, Reg, Vcpu, Vm};
use vm_memory::{Bytes, GuestAddress};

use crate::backends;
use crate::boot_files::BootFiles;
use crate::console::{self, InputTarget, RawTerminal};
use crate::control::{Control, DiskSlot};
use crate::embed::Io;
use crate::irqchip::{self, Irqchip};
use crate::slots::Slot;
use crate::snapshot::machine::{Loaded, Parts};
use crate::snapshot::{self, Resume};
use crate::timeline::Timeline;
use crate::vcpu::{self, VcpuContext};
use crate::{Error, Event, ExitReason, VmConfig};

/// The hypervisor this host's machines run on, as a snapshot names it.
#[cfg(target_os = "linux")]
const HYPERVISOR: snapshot::Hypervisor = snapshot::Hypervisor::Kvm;
#[cfg(target_os = "macos")]
const HYPERVISOR: snapshot::Hypervisor = snapshot::Hypervisor::Hvf;

/// How long a stopped machine waits for the host to take the serial port's last output.
const SERIAL_FLUSH: std::time::Duration = std::time::Duration::from_secs(2);

/// A built machine, ready to run: everything that can fail before the guest runs has.
pub type Ready = Box<dyn FnOnce() -> Result<ExitReason, Error> + Send>;

/// Builds the machine `config` describes on this host's hypervisor, with `io` for its
/// consoles and `control` for stopping, pausing and events. Returns the run, which
/// creates the vCPUs (one thread each) and returns when the machine stops.
pub fn build(config: &VmConfig, io: Io, control: Arc<Control>) -> Result<Ready, Error> {
    let mut timeline = Timeline::new(Instant::now());
    let files = match &io.restore {
        Some(restore) => {
            let loaded = Loaded::read(&restore.files)?;
            loaded.check_disks(&config.disks, restore.trust_disks)?;
            Begin::Restore(Box::new(loaded))
        }
        None => Begin::Boot(BootFiles::open_with(config, &io.images)?),
    };
    timeline.mark("files");
    #[cfg(target_os = "linux")]
    let hv = hypervisor::kvm::Kvm::new()?;
    #[cfg(target_os = "macos")]
    let hv = hypervisor::hvf::Hvf::new()?;
    timeline.mark("hypervisor");
    build_on(&hv, config, files, io, control, timeline)
}

/// How a machine starts: booting its kernel, or from a snapshot.
enum Begin {
    Boot(BootFiles),
    Restore(Box<Loaded>),
}

fn build_on<H: Hypervisor>(
    hv: &H,
    config: &VmConfig,
    begin: Begin,
    io: Io,
    control: Arc<Control>,
    mut timeline: Timeline,
) -> Result<Ready, Error>
where
    H::Vm: 'static,
{
    let Io {
        console: console_io,
        serial,
        serial_input,
        disks,
        nets: extra_nets,
        devices: extra_devices,
        probe,
        dump_after,
        vsock_listeners,
        ..
    } = io;
    let mut console = backends::open_console(&config.effective_console(), config.console_stdin)?;
    let mut console_input = None;
    if let Some(custom) = console_io {
        let (backend, input) = backends::open_console_io(custom)?;
        console.backend = Some(backend);
        console_input = input;
    }
    let mut nets = backends::open_nets(&config.nets, &config.identity())?;
    for (backend, mac) in extra_nets {
        let position = nets.len();
        nets.push((backend, mac.unwrap_or_else(|| devices::virtio::net::mac_from_seed(&format!("net{position}")))));
    }
    let (button_device, button) = PowerButtonDevice::new();
    control.set_power_button(Box::new(move || button.press()));
    let balloon = config.balloon.map(|options| {
        let (device, handle) = devices::virtio::balloon::Balloon::new(options);
        control.set_balloon(handle);
        device
    });
    let vsock = match &config.vsock {
        Some(vsock) => {
            let listener = devices::virtio::vsock::bind(&vsock.socket)?;
            let (device, handle) = devices::virtio::vsock::Vsock::new(vsock.cid, listener, vsock.socket.clone())?;
            for (port, connections) in vsock_listeners {
                handle.listen(port, connections);
            }
            control.set_vsock(handle);
            Some(device)
        }
        None => None,
    };
    let extras = Extras { disks, devices: extra_devices, power_button: button_device, balloon, vsock };
    timeline.mark("backends");
    let (files, loaded, disk_files) = match begin {
        Begin::Boot(mut files) => {
            let disks = std::mem::take(&mut files.disks);
            (Some(files), None, disks)
        }
        Begin::Restore(loaded) => (None, Some(loaded), crate::boot_files::open_disks(config)?),
    };
    let (virtio, disk_slots) = virtio_devices(config, disk_files, extras, nets, console.backend.take())?;
    timeline.mark("devices");
    let slots = crate::slots::assign(virtio.len())?;
    let vm_config =
        hypervisor::VmConfig { ipa_bits: ipa_bits_for(config.memory), vcpus: config.cpus, nested: config.nested };
    let mut vm = hv.create_vm(&vm_config)?;
    // A restore gets the controller the snapshot's guest had, or an error.
    let gic = match loaded.as_ref().map(|l| l.requirements.irqchip) {
        Some(snapshot::IrqChip::GicV2) => crate::config::GicChoice::V2,
        Some(snapshot::IrqChip::GicV3) => crate::config::GicChoice::V3,
        None => config.gic,
    };
    let layout = irqchip::choose(gic, config.cpus, vm.gicv3_needs(), config.nested)?;
    let irqchip = irqchip::build(&mut vm, layout, config.cpus)?;
    let requirements = snapshot::Requirements {
        hypervisor: HYPERVISOR,
        irqchip: if layout.is_some() { snapshot::IrqChip::GicV3 } else { snapshot::IrqChip::GicV2 },
        vcpus: config.cpus,
        memory: vec![(RAM_BASE, config.memory)],
        cpu_features: Vec::new(),
    };
    timeline.mark("vm");
    let (memory, regs) = match (files, &loaded) {
        (Some(files), _) => {
            let (memory, regs) = load(config, files, &slots, (irqchip.fdt(), irqchip.virtio_edge()), &mut timeline)?;
            (memory, Some(regs))
        }
        (None, Some(loaded)) => {
            loaded.fits(config, &requirements)?;
            let memory = loaded.memory()?;
            timeline.mark("ram");
            (memory, None)
        }
        (None, None) => unreachable!("a machine boots or is restored"),
    };
    vm.map_memory(&memory)?;
    timeline.mark("map");
    if let Some(clock) = vm.clock() {
        control.set_clock(clock);
    }

    let first_entry = Arc::new(OnceLock::new());
    let uart = Arc::new(Mutex::new(Pl011::new(
        Output::lines("serial-out", serial.unwrap_or_else(|| Box::new(std::io::sink())), pl011::OUTPUT_BUFFER),
        irqchip.spi_line(UART_SPI),
    )));
    let mut bus = MmioBus::new();
    irqchip.attach(&mut bus)?;
    bus.insert(UART_BASE, UART_SIZE, uart.clone())?;
    let rtc = Arc::new(Mutex::new(Pl031::new()));
    bus.insert(RTC_BASE, RTC_SIZE, rtc.clone())?;
    let entry = first_entry.clone();
    let events = Arc::clone(&control);
    let started = timeline.start();
    let timer = BootTimer::new(Box::new(move |at: Instant| {
        let since_entry = entry.get().map(|e: &Instant| at.duration_since(*e));
        let since_start = at.duration_since(started);
        let after_entry =
            since_entry.map_or(String::new(), |d| format!(", {} ms after the first vCPU entry", d.as_millis()));
        log::info!("guest boot-timer: {} ms after hvrun started{after_entry}", since_start.as_millis());
        events.emit(Event::BootTimer { since_start, since_first_entry: since_entry });
    }));
    bus.insert(BOOT_TIMER_BASE, BOOT_TIMER_SIZE, Arc::new(Mutex::new(timer)))?;
    if let Some(verdict) = probe {
        let (gic, redistributors) = irqchip.version();
        bus.insert(PROBE_BASE, PROBE_SIZE, Arc::new(Mutex::new(Probe::new(gic, redistributors, verdict))))?;
    }
    let mut transports = Vec::with_capacity(virtio.len());
    for (slot, mut device) in slots.iter().zip(virtio) {
        if device.wants_notifiers() {
            device.set_notifiers(queue_notifiers(&vm, slot.base, device.queue_max_sizes().len()));
        }
        let kind = device.device_type();
        let interrupt = Interrupt::new(irqchip.virtio_line(slot.spi));
        let transport = MmioTransport::new(device, memory.clone(), interrupt)
            .map_err(|source| Error::Virtio { device: kind, source })?;
        let transport = Arc::new(Mutex::new(transport));
        bus.insert(slot.base, VIRTIO_MMIO_SIZE, transport.clone())?;
        transports.push(transport);
    }
    let parts = Parts {
        config: config.clone(),
        requirements,
        memory: Arc::clone(&memory),
        irqchip: Arc::clone(&irqchip),
        uart: Arc::clone(&uart),
        rtc,
        transports,
    };
    let begin = match (regs, loaded) {
        (Some(regs), _) => Start::Boot(regs),
        (None, Some(loaded)) => Start::Restore(Box::new(Resume::new(*loaded, &parts)?)),
        (None, None) => unreachable!("a machine boots or is restored"),
    };
    control.set_snapshot_parts(Some(parts));

    let terminal = if config.console_stdin {
        let raw = RawTerminal::enter().map_err(|source| Error::Console { what: "the terminal".into(), source })?;
        let target = match console.stdin_pipe.take() {
            Some(pipe) => InputTarget::Pipe(pipe),
            None => InputTarget::Uart(uart.clone()),
        };
        console::spawn_input(Box::new(std::io::stdin()), target, control.clone(), raw.is_some());
        raw
    } else {
        None
    };
    if let Some((reader, pipe)) = console_input {
        console::spawn_input(reader, InputTarget::Pipe(pipe), control.clone(), false);
    }
    if let Some(reader) = serial_input {
        console::spawn_input(reader, InputTarget::Uart(uart.clone()), control.clone(), false);
    }

    control.set_disks(Some(disk_slots));
    log::info!(
        "booting on {} with {} vCPU(s), {} MiB and {}",
        hv.name(),
        config.cpus,
        config.memory >> 20,
        irqchip.name()
    );
    if let Some(after) = dump_after {
        spawn_state_dump(after, Arc::clone(&irqchip));
    }
    let cpus = config.cpus;
    timeline.mark("bus");
    Ok(Box::new(move || {
        // Kept until the machine stops: the terminal's mode, the console socket's file.
        let _keep = (terminal, console.socket);
        timeline.mark("waiting to run");
        let vcpus = Vcpus { cpus, begin: &begin, first_entry: &first_entry, timeline: &timeline };
        run_vcpus(&vm, vcpus, &bus, &*irqchip, &control);
        control.set_snapshot_parts(None);
        control.set_disks(None);
        drop(begin);
        // How the machine comes down, from the first stop (the guest's power-off).
        let mut down = Timeline::new(control.stopped_at().unwrap_or_else(Instant::now));
        down.mark("vcpus out");
        // The guest's last words reach the host before the caller goes on (or exits).
        devices::bus::lock(&uart).flush_output(SERIAL_FLUSH);
        down.mark("serial flushed");
        drop(bus);
        down.mark("devices stopped");
        drop(vm);
        down.mark("vm closed");
        log::info!("stop timeline: {}", down.summary());
        control.take_outcome().unwrap_or(Ok(ExitReason::Stopped))
    }))
}

/// Notifiers for the queues of the virtio-mmio transport at `base` where the hypervisor
/// has them (KVM's ioeventfd): the driver's write of a queue's index to QueueNotify then
/// wakes the device's event loop without the vCPU leaving the guest. A queue without one
/// is notified through the MMIO exit, as on every hypervisor without them.
fn queue_notifiers<V: Vm>(vm: &V, base: u64, queues: usize) -> Vec<QueueNotifier> {
    let mut notifiers = Vec::new();
    for queue in (0..queues).filter_map(|q| u16::try_from(q).ok()) {
        match vm.write_notifier(base + mmio::QUEUE_NOTIFY, u32::from(queue)) {
            Ok(Some(fd)) => notifiers.push(QueueNotifier::new(queue, fd)),
            Ok(None) => break,
            Err(e) => log::warn!("virtio-mmio at {base:#x}: queue {queue} is notified through exits: {e}"),
        }
    }
    notifiers
}

/// What the vCPU threads start from.
struct Vcpus<'a> {
    cpus: u32,
    begin: &'a Start,
    /// Set by vCPU 0 when it first enters the guest.
    first_entry: &'a OnceLock<Instant>,
    /// The start so far, logged with the vCPUs' part by vCPU 0 as it enters.
    timeline: &'a Timeline,
}

/// One thread per vCPU; returns when all end. (A backend that needs its vCPUs created
/// in index order, as KVM does, orders the creation itself.) Every vCPU is created and
/// given its first state (boot registers, or a snapshot's), then vCPU 0 has the
/// controller (and, on a restore, the devices) take theirs, then they run: none runs
/// before all of that is done, and none runs if any of it failed.
fn run_vcpus<V: Vm>(vm: &V, vcpus: Vcpus<'_>, bus: &MmioBus, irqchip: &dyn Irqchip, control: &Control) {
    let Vcpus { cpus, begin, first_entry, timeline } = vcpus;
    let all_created = Gate::new(cpus as usize);
    let all_ready = Gate::new(cpus as usize);
    std::thread::scope(|scope| {
        for index in 0..cpus {
            let (all_created, all_ready) = (&all_created, &all_ready);
            let spawned = std::thread::Builder::new().name(format!("vcpu{index}")).spawn_scoped(scope, move || {
                let vcpu = vm.create_vcpu(index).and_then(|mut vcpu| {
                    begin.vcpu(index, &mut vcpu)?;
                    Ok(vcpu)
                });
                let vcpu = vcpu.map_err(|e| control.stop(Err(e.into()))).ok();
                // Every vCPU exists before any runs: CPU_ON can only target one that does.
                all_created.pass();
                if index == 0 {
                    irqchip.vcpus_created();
                    if !control.stopping() {
                        if let Err(e) = begin.devices(irqchip) {
                            control.stop(Err(e));
                        }
                    }
                }
                all_ready.pass();
                let Some(mut vcpu) = vcpu else { return };
                control.add_kicker(vcpu.kicker());
                if index == 0 {
                    let now = Instant::now();
                    let _ = first_entry.set(now);
                    let mut start = timeline.clone();
                    start.mark_at("vcpus", now);
                    log::info!("start timeline: {}", start.summary());
                }
                let ctx = VcpuContext { index, bus, irqchip, control };
                if let Some(outcome) = vcpu::run_loop(ctx, &mut vcpu) {
                    control.stop(outcome);
                }
            });
            if let Err(e) = spawned {
                control.stop(Err(Error::Thread(e)));
                // The threads that never start must not hold the others at the gates.
                for _ in index..cpus {
                    all_created.pass_without_waiting();
                    all_ready.pass_without_waiting();
                }
                break;
            }
        }
    });
}

/// Prints the interrupt controller's state to standard error `after` the start: what a
/// hung guest is waiting for ([`crate::VmBuilder::dump_state_after`]).
fn spawn_state_dump(after: std::time::Duration, irqchip: Arc<dyn Irqchip>) {
    let _ = std::thread::Builder::new().name("state-dump".into()).spawn(move || {
        std::thread::sleep(after);
        let secs = after.as_secs();
        // Not eprintln!, which panics when standard error is a full FIFO (`PUT /logger`).
        let _ = match irqchip.dump() {
            Some(state) => writeln!(std::io::stderr(), "hvrun state after {secs} s:\n{state}"),
            None => {
                writeln!(std::io::stderr(), "hvrun state after {secs} s: {} keeps its state to itself", irqchip.name())
            }
        };
    });
}

/// A barrier that a party can also pass without waiting (a vCPU thread that failed to start).
struct Gate {
    remaining: Mutex<usize>,
    open: Condvar,
}

impl Gate {
    fn new(parties: usize) -> Self {
        Gate { remaining: Mutex::new(parties), open: Condvar::new() }
    }

    fn arrive(&self) -> std::sync::MutexGuard<'_, usize> {
        let mut remaining = self.remaining.lock().unwrap_or_else(|e| e.into_inner());
        *remaining = remaining.saturating_sub(1);
        if *remaining == 0 {
            self.open.notify_all();
        }
        remaining
    }

    /// Arrives and waits until every party has arrived.
    fn pass(&self) {
        let remaining = self.arrive();
        let _open = self.open.wait_while(remaining, |r| *r > 0).unwrap_or_else(|e| e.into_inner());
    }

    /// Arrives for a party that will never come.
    fn pass_without_waiting(&self) {
        drop(self.arrive());
    }
}

/// How the vCPUs start: at the kernel's entry, or where a snapshot left them.
enum Start {
    Boot(BootRegs),
    Restore(Box<Resume>),
}

impl Start {
    /// Gives vCPU `index`, just created, its first state.
    fn vcpu<C: Vcpu>(&self, index: u32, vcpu: &mut C) -> hypervisor::Result<()> {
        match self {
            Start::Boot(regs) if index == 0 => {
                vcpu.set_reg(Reg::Pc, regs.pc)?;
                vcpu.set_reg(Reg::X(0), regs.x0)?;
                vcpu.set_reg(Reg::Pstate, regs.pstate)
            }
            Start::Boot(_) => Ok(()),
            Start::Restore(resume) => resume.vcpu(index, vcpu),
        }
    }

    /// Once every vCPU has its state: on a restore, the interrupt controller's, then the
    /// devices'.
    fn devices(&self, irqchip: &dyn Irqchip) -> Result<(), Error> {
        match self {
            Start::Boot(_) => Ok(()),
            Start::Restore(resume) => Ok(resume.devices(irqchip)?),
        }
    }
}

/// Virtio devices, in slot order.
type VirtioList = Vec<Box<dyn VirtioDevice>>;

/// An embedder's disks (with their serials) and virtio devices, and the power button.
struct Extras {
    disks: Vec<(Box<dyn devices::virtio::block::disk::Disk>, String)>,
    devices: Vec<Box<dyn VirtioDevice>>,
    power_button: PowerButtonDevice,
    balloon: Option<devices::virtio::balloon::Balloon>,
    vsock: Option<devices::virtio::vsock::Vsock>,
}

/// The virtio devices, in slot order (`crate::slots`): the disks first, the
/// configuration's then the embedder's (so the first is `/dev/vda`), the network
/// interfaces, the entropy device, the console, the power button, the balloon, the vsock
/// device, then the embedder's own devices; and the configuration's disks for
/// [`Control::replace_disk`].
fn virtio_devices(
    config: &VmConfig,
    disks: Vec<devices::virtio::block::disk::FileDisk>,
    extras: Extras,
    nets: Vec<backends::OpenNet>,
    console: Option<devices::virtio::console::Backend>,
) -> Result<(VirtioList, Vec<DiskSlot>), Error> {
    let mut devices: VirtioList = Vec::new();
    let mut slots = Vec::with_capacity(disks.len());
    // A queue per vCPU (up to block::MAX_QUEUES) for disks that serve requests in parallel.
    let queues = usize::try_from(config.cpus).unwrap_or(1);
    for (index, (image, cfg)) in disks.into_iter().zip(&config.disks).enumerate() {
        let id = cfg.id.clone().unwrap_or_else(|| format!("hvrun-disk{index}"));
        let block = Block::with_queues(Box::new(image.clone()), &id, queues);
        slots.push(DiskSlot { index, id, read_only: cfg.read_only, handle: block.handle(), image });
        devices.push(Box::new(block));
    }
    for (disk, id) in extras.disks {
        devices.push(Box::new(Block::with_queues(disk, &id, queues)));
    }
    for (backend, mac) in nets {
        devices.push(Box::new(Net::new(backend, mac)));
    }
    let urandom = std::fs::File::open("/dev/urandom").map_err(|source| Error::File {
        what: "entropy source",
        path: "/dev/urandom".into(),
        source,
    })?;
    devices.push(Box::new(Rng::new(Box::new(urandom))));
    if let Some(backend) = console {
        devices.push(Box::new(Console::new(backend)));
    }
    devices.push(Box::new(extras.power_button));
    if let Some(balloon) = extras.balloon {
        devices.push(Box::new(balloon));
    }
    if let Some(vsock) = extras.vsock {
        devices.push(Box::new(vsock));
    }
    devices.extend(extras.devices);
    Ok((devices, slots))
}

/// An [`Error::Memory`] for `what`, caused by `source`.
fn memory_error(what: String, source: impl std::error::Error + Send + Sync + 'static) -> Error {
    Error::Memory { what, source: Some(Box::new(source)) }
}

/// 64 bytes from the host's entropy source, for the kernel's RNG and KASLR seeds.
fn entropy() -> Vec<u8> {
    let mut seed = vec![0u8; 64];
    match std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut seed)) {
        Ok(()) => seed,
        Err(e) => {
            log::warn!("no host entropy for the guest's RNG seed: {e}");
            Vec::new()
        }
    }
}

/// Creates guest RAM and loads the kernel, initrd and device tree (with `gic`) into it.
fn load(
    config: &VmConfig,
    files: BootFiles,
    virtio_slots: &[Slot],
    (gic, virtio_edge): (fdt::Gic, bool),
    timeline: &mut Timeline,
) -> Result<(Arc<GuestRam>, BootRegs), Error> {
    let BootFiles { kernel, kernel_size, header, initrd, .. } = files;
    let initrd_size = initrd.as_ref().map(|(_, size)| *size);
    let plan = image::plan(RAM_BASE, config.memory, &header, kernel_size, initrd_size)
        .map_err(|source| Error::Kernel { path: config.kernel.clone(), source })?;

    let ram_len = usize::try_from(config.memory).map_err(|e| memory_error("sizing RAM".into(), e))?;
    let memory = GuestRam::new(&[(GuestAddress(RAM_BASE), ram_len)]).map_err(hypervisor::Error::from)?;
    timeline.mark("ram");
    let kernel_len = usize::try_from(kernel_size).map_err(|e| memory_error("sizing the kernel".into(), e))?;
    load::load(&memory, GuestAddress(plan.kernel_entry), kernel.source(), kernel_len)
        .map_err(|e| memory_error(format!("loading kernel {}", config.kernel.display()), e))?;
    timeline.mark("kernel");

    let mut initrd_range = None;
    if let (Some((file, size)), Some(at)) = (initrd, plan.initrd) {
        let len = usize::try_from(size).map_err(|e| memory_error("sizing the initrd".into(), e))?;
        load::load(&memory, GuestAddress(at), file.source(), len)
            .map_err(|e| memory_error("loading initrd".into(), e))?;
        initrd_range = Some((at, at + size));
        timeline.mark("initrd");
    }

    let seed = entropy();
    let kaslr_seed = seed.get(..8).and_then(|b| b.try_into().ok()).map_or(0, u64::from_le_bytes);
    let window = |base, size| fdt::MmioWindow { base, size };
    let blob = fdt::build(&fdt::Machine {
        ram: (RAM_BASE, config.memory),
        cpu_mpidrs: (0..config.cpus).map(mpidr).collect(),
        cmdline: config.effective_cmdline(),
        initrd: initrd_range,
        gic: Some(gic),
        uart: Some(fdt::Device { window: window(UART_BASE, UART_SIZE), spi: Some(UART_SPI) }),
        rtc: Some(fdt::Device { window: window(RTC_BASE, RTC_SIZE), spi: None }),
        virtio: virtio_slots
            .iter()
            .map(|slot| fdt::Device { window: window(slot.base, VIRTIO_MMIO_SIZE), spi: Some(slot.spi) })
            .collect(),
        virtio_edge,
        rng_seed: seed.get(8..).map(<[u8]>::to_vec).unwrap_or_default(),
        kaslr_seed,
        el2: config.nested,
    })?;
    memory.write_slice(&blob, GuestAddress(plan.fdt)).map_err(|e| memory_error("writing the device tree".into(), e))?;
    timeline.mark("device tree");

    let regs = BootRegs::linux(plan.kernel_entry, plan.fdt);
    Ok((memory, if config.nested { regs.at_el2() } else { regs }))
}
#[cfg(test)]
mod tests {
    use super::*;
    use crate::testing::temp_file as temp;
    use arch_aarch64::layout::FDT_MAX_SIZE;
    use vm_memory::GuestMemoryBackend;

    #[test]
    fn loads_kernel_initrd_and_device_tree_where_the_plan_says() {
        let mut image = vec![0xa5u8; 8192];
        image[..64].fill(0);
        image[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes()); // 1 MiB with BSS
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp("Image", &image);
        let initrd = temp("initrd", &[0x5a; 5000]);
        let config = VmConfig { initrd: Some(initrd.clone()), memory: 64 << 20, ..VmConfig::new(&kernel) };

        let (memory, regs) = load(
            &config,
            BootFiles::open(&config).unwrap(),
            &crate::slots::assign(1).unwrap(),
            (irqchip::EmulatedGic::new(1).fdt(), false),
            &mut Timeline::new(Instant::now()),
        )
        .unwrap();
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
    fn a_nested_guest_boots_at_el2_with_psci_over_smc() {
        let mut image = vec![0u8; 4096];
        image[16..24].copy_from_slice(&(1u64 << 20).to_le_bytes());
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp("Nested", &image);
        let window = |base, size| fdt::MmioWindow { base, size };
        let gic =
            fdt::Gic::V3 { distributor: window(0x0800_0000, 0x1_0000), redistributors: window(0x080a_0000, 0x2_0000) };
        let blob = |nested| {
            let config = VmConfig { memory: 64 << 20, nested, ..VmConfig::new(&kernel) };
            let (memory, regs) =
                load(&config, BootFiles::open(&config).unwrap(), &[], (gic, true), &mut Timeline::new(Instant::now()))
                    .unwrap();
            let mut blob = vec![0u8; FDT_MAX_SIZE as usize];
            memory.read_slice(&mut blob, GuestAddress(regs.x0)).unwrap();
            (regs.pstate, blob)
        };
        let has = |blob: &[u8], s: &[u8]| blob.windows(s.len()).any(|w| w == s);
        let (pstate, nested) = blob(true);
        assert_eq!(pstate & 0xf, 0b1001, "EL2h");
        assert!(has(&nested, b"smc\0") && !has(&nested, b"hvc\0"));
        let (pstate, plain) = blob(false);
        assert_eq!(pstate & 0xf, 0b0101, "EL1h");
        assert!(has(&plain, b"hvc\0"));
        std::fs::remove_file(kernel).unwrap();
    }

    #[test]
    fn a_failed_party_does_not_hold_the_gate() {
        let gate = Gate::new(3);
        std::thread::scope(|s| {
            let waiters: Vec<_> = (0..2).map(|_| s.spawn(|| gate.pass())).collect();
            gate.pass_without_waiting();
            for w in waiters {
                w.join().unwrap();
            }
        });
        // Extra arrivals after it opened are harmless.
        gate.pass();
    }

    #[test]
    fn a_kernel_too_big_for_ram_is_refused_before_anything_runs() {
        let mut image = vec![0u8; 4096];
        image[16..24].copy_from_slice(&(100u64 << 20).to_le_bytes()); // 100 MiB of BSS
        image[56..60].copy_from_slice(b"ARMd");
        let kernel = temp("Huge", &image);
        let config = VmConfig { memory: 64 << 20, ..VmConfig::new(&kernel) };
        let err = load(
            &config,
            BootFiles::open(&config).unwrap(),
            &[],
            (irqchip::EmulatedGic::new(1).fdt(), false),
            &mut Timeline::new(Instant::now()),
        )
        .unwrap_err();
        assert!(err.to_string().contains("does not fit in guest RAM"), "{err}");
        std::fs::remove_file(kernel).unwrap();
    }
}

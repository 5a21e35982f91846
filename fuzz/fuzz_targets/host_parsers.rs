//! The host-side parsers: `--memory` sizes, `--disk`, `--net`, `--console`, `--share`
//! and `--gic` values, the kernel's Image header and the boot placement, kernel files in
//! every format (`hvrun::kernel_file`: gzip'd, EFI zboot, other compressions), and the
//! device tree built from arbitrary machines.
//!
//! Oracles: no panic; an unpacked kernel stays within its bound; sizes round-trip through `format_size`; a boot plan that is
//! accepted keeps the kernel, the initrd and the device tree inside RAM and apart; a
//! device tree that builds is a well-formed blob whose `/chosen/bootargs` is the command
//! line (parsed back with an independent reader, below).

#![no_main]

use arbitrary::Arbitrary;
use libfuzzer_sys::{arbitrary, fuzz_target};

use arch_aarch64::image::{self, ImageHeader};
use arch_aarch64::layout::{RAM_BASE, RAM_MAX};
use hvrun::config::{self, ConsoleConfig, GicChoice, NetConfig, ShareConfig};

#[derive(Arbitrary, Debug)]
enum Input {
    Size(String),
    Disk(String),
    Net(String),
    Console(String),
    Share(String),
    Gic(String),
    Cmdline(String),
    Image { head: Vec<u8>, file_size: u64, ram: u64, initrd: Option<u64> },
    Fdt(Machine),
    KernelFile(Vec<u8>),
}

#[derive(Arbitrary, Debug)]
struct Machine {
    ram: (u64, u64),
    cpus: u8,
    cmdline: String,
    initrd: Option<(u64, u64)>,
    gic_v3: Option<bool>,
    windows: [(u64, u64); 2],
    uart: bool,
    virtio: Vec<(u64, u64, Option<u32>)>,
    rng_seed: Vec<u8>,
    kaslr_seed: u64,
    el2: bool,
}

fuzz_target!(|input: Input| match input {
    Input::Size(text) => {
        if let Ok(bytes) = config::parse_size(&text) {
            assert_eq!(config::parse_size(&config::format_size(bytes)), Ok(bytes), "{text}");
        }
    }
    Input::Disk(text) => drop(config::parse_disk(&text)),
    Input::Net(text) => drop(NetConfig::parse(&text).map(|net| net.mac_seed())),
    Input::Console(text) => drop(ConsoleConfig::parse(&text)),
    Input::Share(text) => drop(ShareConfig::parse(&text)),
    Input::Gic(text) => drop(GicChoice::parse(&text)),
    Input::Cmdline(text) => drop(ConsoleConfig::for_cmdline(&text)),
    Input::Image { head, file_size, ram, initrd } => image_plan(&head, file_size, ram, initrd),
    Input::Fdt(machine) => device_tree(machine),
    Input::KernelFile(file) => kernel_file(&file),
});

fn kernel_file(file: &[u8]) {
    use hvrun::kernel_file::{detect, unpack, Format, MAX_UNPACKED};
    let format = detect(&file[..file.len().min(4096)]);
    let unpacked = unpack(&mut std::io::Cursor::new(file), file.len() as u64, &format);
    match (&format, unpacked) {
        (Format::Image, Ok(None)) => {}
        (Format::Image, other) => panic!("an Image was unpacked: {other:?}"),
        (_, Ok(Some(bytes))) => assert!(bytes.len() as u64 <= MAX_UNPACKED),
        (_, Ok(None)) => panic!("{format:?} needs unpacking"),
        (_, Err(_)) => {}
    }
}

fn image_plan(head: &[u8], file_size: u64, ram: u64, initrd: Option<u64>) {
    let Ok(header) = ImageHeader::parse(head, file_size) else { return };
    let ram = ram % (RAM_MAX + 1);
    let Ok(plan) = image::plan(RAM_BASE, ram, &header, file_size, initrd) else { return };
    let end = RAM_BASE + ram;
    assert!(plan.kernel_base >= RAM_BASE && plan.kernel_entry >= plan.kernel_base);
    assert!(plan.kernel_end <= plan.fdt && plan.fdt < end, "{plan:?}");
    if let (Some(at), Some(size)) = (plan.initrd, initrd) {
        assert!(at >= plan.kernel_end && at + size <= plan.fdt, "{plan:?}");
    }
}

fn device_tree(m: Machine) {
    let window = |(base, size): (u64, u64)| fdt::MmioWindow { base, size };
    let gic = m.gic_v3.map(|v3| {
        let (distributor, other) = (window(m.windows[0]), window(m.windows[1]));
        if v3 {
            fdt::Gic::V3 { distributor, redistributors: other }
        } else {
            fdt::Gic::V2 { distributor, cpu_interface: other }
        }
    });
    let machine = fdt::Machine {
        ram: m.ram,
        cpu_mpidrs: (0..u32::from(m.cpus % 130)).map(arch_aarch64::boot::mpidr).collect(),
        cmdline: m.cmdline.clone(),
        initrd: m.initrd,
        gic,
        uart: m.uart.then(|| fdt::Device { window: window(m.windows[0]), spi: Some(1) }),
        rtc: None,
        virtio: m.virtio.iter().take(64).map(|&(b, s, spi)| fdt::Device { window: window((b, s)), spi }).collect(),
        virtio_edge: m.el2 && m.kaslr_seed & 1 == 1,
        rng_seed: m.rng_seed,
        kaslr_seed: m.kaslr_seed,
        el2: m.el2,
    };
    let Ok(blob) = fdt::build(&machine) else { return };
    let bootargs = hvrun_fuzz::dtb::property(&blob, "/chosen", "bootargs").expect("a well-formed blob");
    let text = bootargs.strip_suffix(&[0]).expect("a NUL-terminated string");
    assert_eq!(text, m.cmdline.as_bytes());
}

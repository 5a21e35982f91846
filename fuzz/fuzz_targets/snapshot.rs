//! A snapshot's state file, from a damaged or hostile source: the container
//! (`hvrun::snapshot::format`), every section decoded as what a restore needs
//! (`Loaded::parse`, with its cross-checks), then the parts a restore hands to devices:
//! the GICv2's state into a GIC of its CPU count, the UART's into a UART, each virtio
//! transport's into a virtio-rng transport over a small guest memory, and KVM's vGICv3
//! state checked against the machine it names.
//!
//! Inputs are either raw bytes or a valid container whose sections are arbitrary
//! (so the decoders and checks are reached without the fuzzer having to forge CRCs).
//!
//! Oracles: no panic, no hang, bounded memory; whatever a restore accepts leaves the
//! device working (a transport restored reads its registers; a GIC answers an IAR read).

#![no_main]

use std::path::Path;
use std::sync::Arc;

use arbitrary::Arbitrary;
use libfuzzer_sys::{arbitrary, fuzz_target};

use devices::bus::MmioDeviceMut;
use devices::gic::Gic;
use devices::output::Output;
use devices::pl011::{self, Pl011};
use devices::virtio::mmio::MmioTransport;
use devices::virtio::rng::Rng;
use devices::virtio::Interrupt;
use hvrun::snapshot::format::Writer;
use hvrun::snapshot::machine::{Loaded, SnapshotFiles};
use vm_memory::GuestAddress;

#[derive(Arbitrary, Debug)]
enum Input {
    Raw(Vec<u8>),
    Sections(Vec<(String, Vec<u8>)>),
}

/// A line that goes nowhere.
struct Nowhere;
impl devices::irq::IrqLine for Nowhere {
    fn set_level(&self, _: bool) {}
}
impl devices::gic::CpuIrqSink for Nowhere {
    fn set_cpu_irq(&self, _: usize, _: bool) {}
}

fuzz_target!(|input: Input| {
    let bytes = match input {
        Input::Raw(bytes) => bytes,
        Input::Sections(sections) => {
            let mut w = Writer::new();
            for (name, payload) in sections {
                if w.add_encoded(&name, payload).is_err() {
                    return;
                }
            }
            w.to_bytes()
        }
    };
    let Ok(loaded) = Loaded::parse(&SnapshotFiles::in_dir(Path::new("/nonexistent")), &bytes) else { return };
    match &loaded.irqchip {
        hvrun::snapshot::SavedIrqchip::GicV2(saved) => {
            let gic = Gic::new(loaded.config.cpus.clamp(1, 8) as usize, Arc::new(Nowhere));
            if gic.restore(saved).is_ok() {
                let mut iar = [0u8; 4];
                gic.cpu_interface().read(0, 0x0c, &mut iar);
            }
        }
        hvrun::snapshot::SavedIrqchip::GicV3(hypervisor::gicv3_state::HypervisorGicState::Kvm(saved)) => {
            let shape = hypervisor::gicv3_state::GicV3Shape::new(96, loaded.config.cpus.min(512));
            let _ = saved.check(&shape);
        }
        hvrun::snapshot::SavedIrqchip::GicV3(hypervisor::gicv3_state::HypervisorGicState::Hvf(_)) => {}
    }
    let out = Output::new("fuzz-serial", Box::new(std::io::sink()), pl011::OUTPUT_BUFFER);
    let _ = Pl011::new(out, Arc::new(Nowhere)).restore(&loaded.uart);
    let ram = guest_memory::GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let memory: devices::virtio::GuestMemory = Arc::new(Box::new(ram));
    for saved in loaded.virtio.iter().take(64) {
        let rng = Rng::new(Box::new(std::io::repeat(1)));
        let mut t = MmioTransport::new(Box::new(rng), memory.clone(), Interrupt::new(Arc::new(Nowhere))).unwrap();
        if t.restore(saved).is_ok() {
            let mut status = [0u8; 4];
            t.read(0, 0x70, &mut status);
        }
    }
});

//! An embedder's own virtio device: a second entropy device (virtio-rng) whose "entropy"
//! is a fixed text, so the guest can show where its bytes came from. hvrun places and
//! wires it as it does its own devices (a virtio-mmio window, an interrupt line, a
//! device-tree node); the device serves its queue with `hvrun::extend::drain_queue`,
//! which guards against a hostile driver.
//!
//! ```text
//! cargo run --example own_device -- Image initramfs.cpio
//! ```
//! The guest is hvrun's test initramfs (`cargo xtask guest`), on hvrun's kernel (which has
//! the virtio-rng driver built in). The rig runs it as the `embed-device` scenario.

#[path = "common/mod.rs"]
mod common;

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use common::{keyboard, powered_off, test_guest, wait_for_init, Captured, Failure};
use hvrun::extend::virtio_queue::Queue;
use hvrun::extend::vm_memory::Bytes;
use hvrun::extend::{drain_queue, single_queue, ActivateError, Activation, GuestMemory, Interrupt, VirtioDevice};
use hvrun::Vm;

/// What the device hands out, over and over.
const PATTERN: &[u8] = b"hvrun-own-device-";
/// The most it writes into one request (the guest asks for at most a page or so).
const MAX_PER_REQUEST: usize = 4096;
/// virtio's device ID of an entropy source.
const VIRTIO_ID_RNG: u32 = 4;

struct Running {
    memory: GuestMemory,
    queue: Queue,
    interrupt: Interrupt,
}

/// An entropy device that is not random at all.
struct PatternRng {
    running: Option<Running>,
    requests: Arc<AtomicU64>,
}

impl VirtioDevice for PatternRng {
    fn device_type(&self) -> u32 {
        VIRTIO_ID_RNG
    }
    fn queue_max_sizes(&self) -> &[u16] {
        &[64]
    }
    fn features(&self) -> u64 {
        0
    }
    fn activate(&mut self, activation: Activation) -> Result<(), ActivateError> {
        let Activation { memory, queues, interrupt, .. } = activation;
        self.running = Some(Running { memory, queue: single_queue(queues)?, interrupt });
        Ok(())
    }
    fn queue_notify(&mut self, _index: u16) {
        let Some(run) = &mut self.running else { return };
        let memory = run.memory.memory();
        let requests = &self.requests;
        drain_queue("pattern-rng", &mut run.queue, memory, &run.interrupt, |chain| {
            requests.fetch_add(1, Ordering::SeqCst);
            let mut written = 0usize;
            for desc in chain {
                // The driver's buffers: device-writable ones only, within guest memory.
                if !desc.is_write_only() {
                    break;
                }
                let len = (desc.len() as usize).min(MAX_PER_REQUEST - written);
                let bytes: Vec<u8> = (written..written + len).map(|i| PATTERN[i % PATTERN.len()]).collect();
                if memory.write_slice(&bytes, desc.addr()).is_err() {
                    break;
                }
                written += len;
                if written == MAX_PER_REQUEST {
                    break;
                }
            }
            written as u32
        });
    }
    fn reset(&mut self) {
        self.running = None;
    }
}

fn run(kernel: &str, initrd: &str) -> Result<(), Failure> {
    let requests = Arc::new(AtomicU64::new(0));
    let config = test_guest(kernel, initrd);
    let output = Captured::default();
    let (keyboard, typed) = keyboard();
    let vm = Vm::builder(config)
        .console(typed, output.clone())
        .virtio(PatternRng { running: None, requests: Arc::clone(&requests) })
        .start()
        .map_err(|e| format!("start: {e}"))?;
    wait_for_init(&vm, &output)?;
    let rng = "/sys/class/misc/hw_random";
    keyboard.line(&format!("echo sources=$(cat {rng}/rng_available)"))?;
    keyboard.line(&format!(
        "for r in $(cat {rng}/rng_available); do echo $r > {rng}/rng_current; \
         echo \"from $r: $(head -c 34 /dev/hwrng | tr -c 'a-z-' '.')\"; done"
    ))?;
    keyboard.line("poweroff -f")?;
    let text = powered_off("own_device", vm, &output)?;
    let sources = text.lines().find(|l| l.starts_with("sources=")).unwrap_or_default().trim_end();
    println!("own_device: the guest's entropy {sources}");
    // Besides the virtio devices, the guest may have the hypervisor's (KVM's smccc_trng).
    let names = sources.trim_start_matches("sources=").split_whitespace();
    if names.filter(|s| s.starts_with("virtio_rng")).count() != 2 {
        return Err(
            format!("the guest should see two virtio entropy devices, hvrun's and this one; console:\n{text}").into()
        );
    }
    let ours = text.lines().find(|l| l.contains("hvrun-own-device-hvrun-own-device"));
    match ours {
        Some(line) => println!("own_device: {}", line.trim_end()),
        None => return Err(format!("no bytes from this device reached the guest; console:\n{text}").into()),
    }
    println!("own_device: the device served {} request(s)", requests.load(Ordering::SeqCst));
    Ok(())
}

fn main() -> std::process::ExitCode {
    common::main("own_device", "KERNEL INITRD", |args| run(&args[0], &args[1]))
}

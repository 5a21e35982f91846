use std::sync::Arc;

use guest_memory::GuestMemoryMmap;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::{PowerButton, PowerButtonDevice, KEY_POWER, MAX_PENDING, NAME};
use crate::bus::MmioDeviceMut;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{desc, mem, start, write_reg, Line, Mem, W};
use crate::virtio::Interrupt;

fn started(m: &Arc<Mem>) -> (MmioTransport, PowerButton, Arc<Line>) {
    let (device, button) = PowerButtonDevice::new();
    let line = Arc::new(Line::default());
    let t = MmioTransport::new(Box::new(device), m.clone(), Interrupt::new(line.clone())).unwrap();
    (t, button, line)
}

fn queues(m: &Mem) -> (MockSplitQueue<'_, GuestMemoryMmap>, MockSplitQueue<'_, GuestMemoryMmap>) {
    (MockSplitQueue::create(&m.0, GuestAddress(0x8_0000), 16), MockSplitQueue::create(&m.0, GuestAddress(0x9_0000), 16))
}

/// Selects `select`/`subsel` as a driver does and reads back the size and the answer.
fn config(t: &mut MmioTransport, select: u8, subsel: u8) -> Vec<u8> {
    t.write(0, 0x100, &[select]);
    t.write(0, 0x101, &[subsel]);
    let mut size = [0u8];
    t.read(0, 0x102, &mut size);
    let mut data = vec![0u8; usize::from(size[0])];
    t.read(0, 0x108, &mut data);
    data
}

/// The events in the first `n` event buffers (8 bytes each, at 0x1000 + i * 0x100).
fn events(m: &Mem, n: usize) -> Vec<(u16, u16, u32)> {
    (0..n)
        .map(|i| {
            let mut e = [0u8; 8];
            m.read_slice(&mut e, GuestAddress(0x1000 + i as u64 * 0x100)).unwrap();
            (
                u16::from_le_bytes([e[0], e[1]]),
                u16::from_le_bytes([e[2], e[3]]),
                u32::from_le_bytes([e[4], e[5], e[6], e[7]]),
            )
        })
        .collect()
}

/// `n` event buffers from the `first`-th on.
fn buffers_from(first: u64, n: u64) -> Vec<virtio_queue::desc::RawDescriptor> {
    (first..first + n).map(|i| desc(0x1000 + i * 0x100, 8, W)).collect()
}

fn buffers(n: u64) -> Vec<virtio_queue::desc::RawDescriptor> {
    buffers_from(0, n)
}

const PRESS: [(u16, u16, u32); 4] = [(1, KEY_POWER, 1), (0, 0, 0), (1, KEY_POWER, 0), (0, 0, 0)];

#[test]
fn the_driver_finds_a_device_with_one_key_the_power_key() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, _button, _line) = started(&m);
    assert_eq!(config(&mut t, 1, 0), NAME.as_bytes(), "ID_NAME");
    assert_eq!(config(&mut t, 2, 0), b"", "no serial");
    assert_eq!(config(&mut t, 3, 0), [6, 0, 0, 0, 1, 0, 1, 0], "ID_DEVIDS: BUS_VIRTUAL");
    let keys = config(&mut t, 0x11, 1);
    assert_eq!(keys.len(), 15, "a bitmap up to KEY_POWER");
    assert_eq!(keys[14], 1 << 4, "bit 116");
    assert!(keys[..14].iter().all(|&b| b == 0), "and no other key");
    for other in [0u8, 2, 3, 4, 5, 0x11] {
        assert_eq!(config(&mut t, 0x11, other), b"", "event type {other}: none");
    }
    assert_eq!(config(&mut t, 0x12, 0), b"", "no axes");
    // Bytes past select and subsel are not the driver's to write.
    t.write(0, 0x102, &[0xff; 8]);
    assert_eq!(config(&mut t, 1, 0), NAME.as_bytes());
}

#[test]
fn a_press_is_key_down_report_key_up_report_and_an_interrupt() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, button, line) = started(&m);
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    ev.add_desc_chains(&buffers(8), 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    assert!(button.press(), "a driver listens");
    assert_eq!(ev.used().idx().load(), 4);
    assert_eq!(events(&m, 4), PRESS);
    assert!(line.high());
}

#[test]
fn a_press_before_the_driver_is_not_taken_and_one_before_its_buffers_waits_for_them() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, button, _line) = started(&m);
    assert!(!button.press(), "no driver yet: nobody in the guest could hear it");
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    assert!(button.press(), "the driver runs");
    assert_eq!(ev.used().idx().load(), 0, "no buffers yet");
    ev.add_desc_chains(&buffers(2), 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    assert_eq!(ev.used().idx().load(), 2, "as many events as buffers");
    ev.add_desc_chains(&buffers_from(2, 2), 2).unwrap();
    write_reg(&mut t, 0x50, 0);
    assert_eq!(ev.used().idx().load(), 4);
    assert_eq!(events(&m, 4), PRESS, "one press, nothing from before the driver");
}

/// The button outlives the machine when an embedder keeps a handle: it must not keep the
/// guest's memory (and through it the VM) alive.
#[test]
fn a_button_kept_after_the_device_is_gone_holds_no_guest_memory() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, button, _line) = started(&m);
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    drop((ev, status));
    let before = Arc::strong_count(&m);
    drop(t);
    assert!(Arc::strong_count(&m) < before, "the transport let go");
    assert_eq!(Arc::strong_count(&m), 1, "and so did the device, though the button lives");
    assert!(!button.press(), "a press reaches nobody now");
}

#[test]
fn a_host_pressing_into_a_deaf_guest_holds_a_bounded_backlog() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, button, _line) = started(&m);
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    let taken = (0..10_000).filter(|_| button.press()).count();
    assert_eq!(taken, MAX_PENDING / 4, "presses past the backlog are refused, and say so");
    assert_eq!(super::lock(&button.state).pending.len(), MAX_PENDING);
}

#[test]
fn bad_buffers_lose_the_event_and_nothing_else() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, button, _line) = started(&m);
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    // Device-readable, too short, outside memory, then good ones.
    let bad = [desc(0x1000, 8, 0), desc(0x1100, 4, W), desc(0xffff_0000, 8, W)];
    ev.add_desc_chains(&bad, 0).unwrap();
    ev.add_desc_chains(&buffers(1), 3).unwrap();
    write_reg(&mut t, 0x50, 0);
    button.press();
    assert_eq!(ev.used().idx().load(), 4, "every buffer returned");
    assert_eq!(events(&m, 1), [PRESS[3]], "the good buffer got the last event");
    // Status buffers are returned unread.
    status.add_desc_chains(&[desc(0x2000, 8, 0)], 0).unwrap();
    write_reg(&mut t, 0x50, 1);
    assert_eq!(status.used().idx().load(), 1);
}

#[test]
fn a_reset_forgets_waiting_presses() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, button, _line) = started(&m);
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    assert!(button.press());
    write_reg(&mut t, 0x70, 0);
    let (ev, status) = queues(&m);
    start(&mut t, &[&ev, &status]);
    ev.add_desc_chains(&buffers(4), 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    assert_eq!(ev.used().idx().load(), 0, "nothing from before the reset");
}

/// The hostile-driver scenario: a runaway available index on the event queue went
/// unnoticed while no press was waiting (the device took nothing, so it checked nothing).
/// Either queue's broken ring fails the device at the notify.
#[test]
fn a_runaway_available_index_on_either_queue_needs_a_reset() {
    use crate::virtio::testing::a_runaway_index_needs_reset;
    let m = Arc::new(Mem(mem(0x20_0000)));
    for index in [0, 1] {
        let (t, _button, _line) = started(&m);
        let mut t = a_runaway_index_needs_reset(t, &m, 2, index, 17);
        // And it works after the reset.
        let (ev, status) = queues(&m);
        start(&mut t, &[&ev, &status]);
        status.add_desc_chains(&[desc(0x2000, 8, 0)], 0).unwrap();
        write_reg(&mut t, 0x50, 1);
        assert_eq!(status.used().idx().load(), 1);
    }
}

#[test]
fn the_drivers_select_carries_over_a_restore_and_a_press_reaches_the_restored_device() {
    let m = Arc::new(Mem(mem(1 << 20)));
    let (mut t, _button, _line) = started(&m);
    let (events, status) = queues(&m);
    start(&mut t, &[&events, &status]);
    events.build_multiple_desc_chains(&[desc(0x1000, 8, W), desc(0x1100, 8, W)]).unwrap();
    let name = config(&mut t, 1, 0);
    let saved = t.save().unwrap();
    assert_eq!(saved.device, [1, 0]);

    let (mut again, button, _line) = started(&m);
    again.restore(&saved).unwrap();
    let mut size = [0u8];
    again.read(0, 0x102, &mut size);
    assert_eq!(usize::from(size[0]), name.len(), "the same select answers");
    // The event buffers the first device held are the restored one's.
    assert!(button.press());
    crate::virtio::testing::wait_for("the press", || events.used().idx().load() == 2);

    let mut bad = saved;
    bad.device.push(0);
    assert!(again.restore(&bad).unwrap_err().to_string().contains("virtio-input's is 2"));
}

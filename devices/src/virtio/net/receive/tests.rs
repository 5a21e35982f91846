//! The receive path over the mock queues: frames read in place into chains of several
//! buffers, frames longer than the room gathered, buffers too small, chains the device
//! cannot write in place.

use std::os::fd::OwnedFd;
use std::os::unix::net::UnixDatagram;
use std::sync::Arc;

use virtio_bindings::virtio_net::VIRTIO_NET_F_MRG_RXBUF;
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

use super::super::backend::{NetBackend, Unixgram, VNET_HDR_LEN};
use super::super::tests::{queues, started};
use super::super::{Net, MAX_FRAME};
use crate::virtio::iovec::GuestIovecs;
use crate::virtio::mmio::MmioTransport;
use crate::virtio::testing::{chained, desc, mem, start, start_without, wait_for, write_reg, Line, Mem, W};
use crate::virtio::Interrupt;

/// A datagram backend that cannot tell a frame's length before taking it (as a tap), and
/// must never be asked to copy one.
struct InPlaceOnly(Unixgram);

impl NetBackend for InPlaceOnly {
    fn fd(&self) -> Option<std::os::fd::RawFd> {
        self.0.fd()
    }
    fn vnet_hdr(&self) -> bool {
        false
    }
    fn send(&mut self, frame: &[u8]) -> std::io::Result<()> {
        self.0.send(frame)
    }
    fn recv(&mut self, _buf: &mut [u8]) -> std::io::Result<usize> {
        panic!("the frame was copied, not received in place");
    }
    fn recv_guest(&mut self, frame: &GuestIovecs<'_>) -> Option<std::io::Result<usize>> {
        self.0.recv_guest(frame)
    }
}

/// A started device over [`InPlaceOnly`], with MRG_RXBUF.
fn in_place_only(m: &Arc<Mem>) -> (MmioTransport, UnixDatagram) {
    let (ours, theirs) = UnixDatagram::pair().unwrap();
    let backend = InPlaceOnly(Unixgram::from_fd(OwnedFd::from(ours)).unwrap());
    let net = Net::new(Box::new(backend), [2, 0, 0, 0, 0, 1]);
    let t = MmioTransport::new(Box::new(net), m.clone(), Interrupt::new(Arc::new(Line::default()))).unwrap();
    (t, theirs)
}

/// A frame of `len` bytes that says where each byte is.
fn frame(len: usize, seed: u8) -> Vec<u8> {
    (0..len).map(|i| (i % 251) as u8 ^ seed).collect()
}

/// Used entry `i` of `q`: (head, length).
fn used(q: &MockSplitQueue<'_, guest_memory::GuestMemoryMmap>, i: u16) -> (u32, u32) {
    let elem = q.used().ring().ref_at(usize::from(i)).unwrap().load();
    (elem.id(), elem.len())
}

/// Fails with the first byte where `got` and `want` differ (not with both in full).
#[track_caller]
fn same(got: &[u8], want: &[u8]) {
    let at = got.iter().zip(want).position(|(a, b)| a != b);
    assert!(at.is_none() && got.len() == want.len(), "differ at {at:?} (lengths {} and {})", got.len(), want.len());
}

/// What the guest's buffers `(addr, len)` hold, one after the other.
fn gathered(m: &Mem, buffers: &[(u64, usize)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(addr, len) in buffers {
        let mut part = vec![0u8; len];
        m.read_slice(&mut part, GuestAddress(addr)).unwrap();
        out.extend(part);
    }
    out
}

#[test]
fn a_frame_lands_in_place_across_the_buffers_of_one_chain() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer) = in_place_only(&m);
    let (rx, tx) = queues(&m);
    start(&mut t, &[&rx, &tx]);
    // The header in a buffer of its own, then the frame over two more.
    let chain = [chained(0x1_0000, 12, W, 1), chained(0x2_0000, 20, W, 2), desc(0x3_0000, 2000, W)];
    rx.add_desc_chains(&chain, 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    let sent = frame(1000, 7);
    peer.send(&sent).unwrap();
    wait_for("the frame", || rx.used().idx().load() == 1);
    assert_eq!(used(&rx, 0), (0, 1012));
    let got = gathered(&m, &[(0x1_0000, 12), (0x2_0000, 20), (0x3_0000, 980)]);
    assert_eq!(got[..VNET_HDR_LEN], [0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 1, 0], "no offloads, num_buffers 1");
    same(&got[VNET_HDR_LEN..], &sent);
}

#[test]
fn a_frame_longer_than_the_room_gathered_overflows_and_spans_more_buffers() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer) = in_place_only(&m);
    // 32 entries for 12 chains: the mock's used ring overlaps its available ring past
    // half the entries (see `testing::start`).
    let (rx, tx) = (MockSplitQueue::create(&m.0, GuestAddress(0x8_0000), 32), queues(&m).1);
    start(&mut t, &[&rx, &tx]);
    let buffers: Vec<_> = (0..12).map(|i| desc(0x1_0000 + i * 0x1000, 1024, W)).collect();
    rx.add_desc_chains(&buffers, 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    // The device gathers room for a full-size ethernet frame (2 buffers) and cannot tell
    // this one is longer: what overflows is copied into 3 more.
    let first = frame(5000, 1);
    peer.send(&first).unwrap();
    wait_for("the first frame", || rx.used().idx().load() == 5);
    let lens: Vec<_> = (0..5).map(|i| used(&rx, i)).collect();
    assert_eq!(lens, [(0, 1024), (1, 1024), (2, 1024), (3, 1024), (4, 5012 - 4096)]);
    let places: Vec<_> = (0..5).map(|i| (0x1_0000 + i * 0x1000, 1024)).collect();
    let got = gathered(&m, &places);
    assert_eq!(got[VNET_HDR_LEN - 2..VNET_HDR_LEN], [5, 0], "num_buffers 5");
    same(&got[VNET_HDR_LEN..5012], &first);
    // Now it gathers as much as that frame took: the next one lands in place.
    let second = frame(5000, 2);
    peer.send(&second).unwrap();
    wait_for("the second frame", || rx.used().idx().load() == 10);
    let lens: Vec<_> = (5..10).map(|i| used(&rx, i)).collect();
    assert_eq!(lens, [(5, 1024), (6, 1024), (7, 1024), (8, 1024), (9, 5012 - 4096)]);
    let places: Vec<_> = (5..10).map(|i| (0x1_0000 + i * 0x1000, 1024)).collect();
    let got = gathered(&m, &places);
    assert_eq!(got[VNET_HDR_LEN - 2..VNET_HDR_LEN], [5, 0]);
    same(&got[VNET_HDR_LEN..5012], &second);
}

#[test]
fn a_frame_waits_in_the_socket_until_the_buffers_its_length_needs_are_there() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer, _line) = started(&m);
    let (rx, tx) = queues(&m);
    start(&mut t, &[&rx, &tx]);
    rx.add_desc_chains(&[desc(0x1_0000, 1024, W), desc(0x1_1000, 1024, W)], 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    let sent = frame(3000, 3);
    peer.send(&sent).unwrap();
    std::thread::sleep(std::time::Duration::from_millis(30));
    assert_eq!(rx.used().idx().load(), 0, "two buffers are not enough");
    rx.add_desc_chains(&[desc(0x1_2000, 1024, W)], 2).unwrap();
    write_reg(&mut t, 0x50, 0);
    wait_for("the frame", || rx.used().idx().load() == 3);
    let got = gathered(&m, &[(0x1_0000, 1024), (0x1_1000, 1024), (0x1_2000, 1024)]);
    assert_eq!(got[VNET_HDR_LEN - 2..VNET_HDR_LEN], [3, 0]);
    same(&got[VNET_HDR_LEN..3012], &sent);
}

#[test]
fn without_mrg_rxbuf_a_frame_longer_than_its_buffer_is_dropped_and_the_buffer_comes_back_empty() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer, _line) = started(&m);
    let (rx, tx) = queues(&m);
    start_without(&mut t, &[&rx, &tx], 1 << VIRTIO_NET_F_MRG_RXBUF);
    rx.add_desc_chains(&[desc(0x1_0000, 1024, W), desc(0x1_1000, 4096, W)], 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    peer.send(&frame(3000, 4)).unwrap();
    let kept = frame(100, 5);
    peer.send(&kept).unwrap();
    wait_for("both buffers back", || rx.used().idx().load() == 2);
    assert_eq!(used(&rx, 0), (0, 0), "the 3000-byte frame did not fit: dropped");
    assert_eq!(used(&rx, 1), (1, 112));
    let got = gathered(&m, &[(0x1_1000, 112)]);
    assert_eq!(got[VNET_HDR_LEN - 2..VNET_HDR_LEN], [1, 0]);
    same(&got[VNET_HDR_LEN..], &kept);
}

/// Fuzzing finding (mmio_transport): with MRG_RXBUF, a first buffer smaller than the
/// header got the header's first bytes and the rest went to the next buffer.
#[test]
fn a_first_buffer_smaller_than_the_header_drops_the_frame() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer, _line) = started(&m);
    let (rx, tx) = queues(&m);
    start(&mut t, &[&rx, &tx]);
    rx.add_desc_chains(&[desc(0x1_0000, 4, W), desc(0x1_1000, 1024, W), desc(0x1_2000, 1024, W)], 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    peer.send(&frame(16, 11)).unwrap();
    let kept = frame(16, 12);
    peer.send(&kept).unwrap();
    wait_for("two chains back", || rx.used().idx().load() == 2);
    assert_eq!([used(&rx, 0), used(&rx, 1)], [(0, 0), (1, 28)], "the first frame dropped, the second whole");
    assert_eq!(gathered(&m, &[(0x1_1000 + VNET_HDR_LEN as u64, 16)]), kept);
}

#[test]
fn chains_with_readable_buffers_or_buffers_outside_memory_take_the_copying_path() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer, _line) = started(&m);
    let (rx, tx) = queues(&m);
    start(&mut t, &[&rx, &tx]);
    rx.add_desc_chains(
        &[
            // A readable buffer after the writable one: the writable part takes the frame.
            chained(0x1_0000, 64, W, 1),
            desc(0x1_1000, 64, 0),
            // A readable one first: no room at all, the frame is lost.
            chained(0x1_2000, 64, 0, 3),
            desc(0x1_3000, 64, W),
            // The second buffer outside memory: the first takes the frame.
            chained(0x1_4000, 64, W, 5),
            desc(0xfff_0000, 64, W),
        ],
        0,
    )
    .unwrap();
    write_reg(&mut t, 0x50, 0);
    let frames = [frame(20, 6), frame(20, 7), frame(20, 8)];
    for sent in &frames {
        peer.send(sent).unwrap();
    }
    wait_for("three chains back", || rx.used().idx().load() == 3);
    assert_eq!([used(&rx, 0), used(&rx, 1), used(&rx, 2)], [(0, 32), (2, 0), (4, 32)]);
    assert_eq!(gathered(&m, &[(0x1_0000 + VNET_HDR_LEN as u64, 20)]), frames[0]);
    assert_eq!(gathered(&m, &[(0x1_4000 + VNET_HDR_LEN as u64, 20)]), frames[2]);
}

#[test]
fn a_datagram_longer_than_the_largest_frame_is_dropped_and_the_next_one_kept() {
    let m = Arc::new(Mem(mem(0x10_0000)));
    let (mut t, peer, _line) = started(&m);
    let (rx, tx) = queues(&m);
    start(&mut t, &[&rx, &tx]);
    rx.add_desc_chains(&[desc(0x1_0000, 0x1_0000, W), desc(0x2_0000, 0x1_0000, W)], 0).unwrap();
    write_reg(&mut t, 0x50, 0);
    peer.send(&frame(MAX_FRAME, 9)).unwrap();
    let kept = frame(60, 10);
    peer.send(&kept).unwrap();
    wait_for("the small frame", || rx.used().idx().load() == 1);
    assert_eq!(used(&rx, 0), (0, 72));
    assert_eq!(gathered(&m, &[(0x1_0000 + VNET_HDR_LEN as u64, 60)]), kept);
    std::thread::sleep(std::time::Duration::from_millis(20));
    assert_eq!(rx.used().idx().load(), 1, "nothing else arrived");
}

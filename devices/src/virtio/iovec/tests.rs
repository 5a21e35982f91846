use super::*;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::{Bytes, GuestAddress};

const WRITE: u16 = 2;

/// A chain of `(addr, len, flags)` buffers in a fresh 1 MiB guest memory.
fn with_chain(buffers: &[(u64, u32, u16)], check: impl FnOnce(&GuestMemoryMmap, DescriptorChain<&GuestMemoryMmap>)) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let queue = MockSplitQueue::new(&mem, 16);
    let descs: Vec<RawDescriptor> = buffers
        .iter()
        .enumerate()
        .map(|(i, &(addr, len, flags))| {
            let next = if i + 1 < buffers.len() { 1 } else { 0 };
            RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, i as u16 + 1))
        })
        .collect();
    queue.build_desc_chain(&descs).unwrap();
    let mut q: virtio_queue::Queue = queue.create_queue().unwrap();
    use virtio_queue::QueueOwnedT;
    let chain = q.iter(&mem).unwrap().next().unwrap();
    check(&mem, chain);
}

fn bytes(iov: &GuestIovecs<'_>) -> Vec<u8> {
    let mut out = Vec::new();
    for piece in iov.iovecs() {
        // SAFETY: each piece lies inside the test's guest memory, alive here.
        out.extend_from_slice(unsafe { std::slice::from_raw_parts(piece.iov_base.cast::<u8>(), piece.iov_len) });
    }
    out
}

#[test]
fn readable_buffers_after_a_header_skipped_across_descriptors() {
    with_chain(&[(0x1000, 8, 0), (0x2000, 10, 0), (0x3000, 100, WRITE)], |mem, chain| {
        mem.write_slice(&[1; 8], GuestAddress(0x1000)).unwrap();
        mem.write_slice(&(0..10).collect::<Vec<u8>>(), GuestAddress(0x2000)).unwrap();
        // Skip 12: all of the first buffer and 4 bytes of the second.
        let iov = GuestIovecs::from_chain(mem, chain, false, 12, usize::MAX).unwrap();
        assert_eq!(iov.len(), 6);
        assert_eq!(bytes(&iov), vec![4, 5, 6, 7, 8, 9]);
    });
}

#[test]
fn writable_buffers_with_a_limit_and_advance() {
    with_chain(&[(0x1000, 16, 0), (0x2000, 10, WRITE), (0x3000, 10, WRITE)], |mem, chain| {
        assert!(GuestIovecs::from_chain(mem, chain.clone(), true, 0, 19).is_none(), "over the limit");
        let mut iov = GuestIovecs::from_chain(mem, chain, true, 0, 20).unwrap();
        iov.truncate(15);
        assert_eq!((iov.len(), iov.iovecs().len()), (15, 2));
        iov.advance(12);
        assert_eq!((iov.len(), iov.iovecs().len()), (3, 1));
        assert_eq!(iov.iovecs()[0].iov_base as usize - mem.get_host_address(GuestAddress(0x3000)).unwrap() as usize, 2);
    });
}

#[test]
fn hostile_chains_are_refused_not_trusted() {
    // A buffer past the end of guest memory.
    with_chain(&[(0xf_ff00, 0x1000, 0)], |mem, chain| {
        assert!(GuestIovecs::from_chain(mem, chain, false, 0, usize::MAX).is_none());
    });
    // A readable buffer after a writable one.
    with_chain(&[(0x1000, 8, WRITE), (0x2000, 8, 0)], |mem, chain| {
        assert!(GuestIovecs::from_chain(mem, chain, true, 0, usize::MAX).is_none());
    });
    // The same chain asked for its readable buffers (a virtio-net transmit): refused
    // too. The virtio_ring fuzz target found it taken, so the zero-copy transmit sent a
    // frame from a chain that the copying path drops as malformed.
    with_chain(&[(0x1000, 8, WRITE), (0x2000, 8, 0)], |mem, chain| {
        assert!(GuestIovecs::from_chain(mem, chain, false, 0, usize::MAX).is_none());
    });
    with_chain(&[(0x1000, 16, 0), (0x2000, 8, WRITE), (0x3000, 0, 0)], |mem, chain| {
        assert!(GuestIovecs::from_chain(mem, chain, false, 0, usize::MAX).is_none(), "even an empty one");
    });
    // Fewer bytes than the header to skip.
    with_chain(&[(0x1000, 8, 0)], |mem, chain| {
        assert!(GuestIovecs::from_chain(mem, chain, false, 12, usize::MAX).is_none());
    });
}

/// The chains `buffers` (one inner list each) in a 256-entry queue at address 0, their
/// buffers from 64 KiB on, in a fresh 1 MiB guest memory.
fn with_chains(
    buffers: &[&[(u64, u32, u16)]],
    check: impl FnOnce(&GuestMemoryMmap, Vec<DescriptorChain<&GuestMemoryMmap>>),
) {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
    let queue = MockSplitQueue::new(&mem, 256);
    let mut first = 0u16;
    let mut descs = Vec::new();
    for chain in buffers {
        for (i, &(addr, len, flags)) in chain.iter().enumerate() {
            let next = if i + 1 < chain.len() { 1 } else { 0 };
            descs.push(RawDescriptor::from(SplitDescriptor::new(addr, len, flags | next, first + i as u16 + 1)));
        }
        first += chain.len() as u16;
    }
    queue.add_desc_chains(&descs, 0).unwrap();
    let mut q: virtio_queue::Queue = queue.create_queue().unwrap();
    use virtio_queue::QueueOwnedT;
    let chains: Vec<_> = q.iter(&mem).unwrap().collect();
    assert_eq!(chains.len(), buffers.len());
    check(&mem, chains);
}

/// `count` buffers of `len` bytes, `flags` each, 4 KiB apart from `at`.
fn spread(at: u64, count: u64, len: u32, flags: u16) -> Vec<(u64, u32, u16)> {
    (0..count).map(|i| (at + i * 0x1000, len, flags)).collect()
}

#[test]
fn a_chain_of_more_pieces_than_the_inline_array_holds() {
    let pieces = spread(0x1_0000, 20, 100, WRITE);
    with_chains(&[&pieces], |mem, mut chains| {
        let mut iov = GuestIovecs::from_chain(mem, chains.remove(0), true, 0, usize::MAX).unwrap();
        assert_eq!((iov.len(), iov.iovecs().len()), (2000, 20));
        for (i, piece) in iov.iovecs().iter().enumerate() {
            let at = mem.get_host_address(GuestAddress(0x1_0000 + i as u64 * 0x1000)).unwrap();
            assert_eq!((piece.iov_base as usize, piece.iov_len), (at as usize, 100));
        }
        iov.advance(1750);
        assert_eq!((iov.len(), iov.iovecs().len()), (250, 3));
        iov.truncate(120);
        assert_eq!((iov.len(), iov.iovecs().len()), (120, 2));
    });
}

#[test]
fn several_chains_in_a_reused_spill_buffer_and_an_overflow_buffer_last() {
    let first = spread(0x1_0000, 2, 10, WRITE);
    let second = [(0x2_0000, 8, WRITE), (0x2_1000, 8, 0)]; // readable after writable: refused
    let third = spread(0x3_0000, 1, 6, WRITE);
    with_chains(&[&first, &second, &third], |mem, chains| {
        let mut spill = IovecBuf::new();
        let capacity = spill.pieces.capacity();
        let mut overflow = [0u8; 8];
        let mut chains = chains.into_iter();
        let mut iov = GuestIovecs::with_spill(&mut spill);
        assert_eq!(iov.push_chain(mem, chains.next().unwrap(), true, 4, usize::MAX), Some(16), "the header skipped");
        assert_eq!(iov.push_chain(mem, chains.next().unwrap(), true, 0, usize::MAX), None);
        assert_eq!((iov.len(), iov.iovecs().len()), (16, 2), "a refused chain adds nothing");
        let third = chains.next().unwrap();
        assert_eq!(iov.push_chain(mem, third.clone(), true, 0, 5), None, "over its limit");
        assert_eq!(iov.push_chain(mem, third.clone(), true, 0, 6), Some(6));
        assert!(iov.push_overflow(&mut overflow));
        assert!(iov.push_chain(mem, third, true, 0, usize::MAX).is_none(), "nothing after the overflow");
        assert_eq!((iov.len(), iov.iovecs().len()), (30, 4));
        // Bytes across every piece, the overflow included, from an offset.
        let data: Vec<u8> = (1..=29).collect();
        assert_eq!(iov.write_bytes(1, &data), 29);
        let mut back = [0u8; 40];
        assert_eq!(iov.read_bytes(0, &mut back), 30);
        assert_eq!(back[1..30], data[..]);
        drop(iov);
        assert_eq!(&overflow[..], &data[21..29]);
        assert_eq!(mem.read_obj::<[u8; 6]>(GuestAddress(0x1_0004)).unwrap(), [0, 1, 2, 3, 4, 5]);
        assert_eq!(mem.read_obj::<[u8; 6]>(GuestAddress(0x3_0000)).unwrap(), [16, 17, 18, 19, 20, 21]);
        assert_eq!(spill.pieces.capacity(), capacity, "the spill buffer was reused, not grown");
    });
}

#[test]
fn at_most_max_iovecs_pieces_then_the_overflow() {
    // A chain of 16 pieces 17 times: 272 pieces, past MAX_IOVECS.
    let pieces = spread(0x1_0000, 16, 8, WRITE);
    with_chains(&[&pieces], |mem, chains| {
        let mut spill = IovecBuf { pieces: Vec::new() };
        let mut iov = GuestIovecs::with_spill(&mut spill);
        let added: Vec<_> = (0..17).map(|_| iov.push_chain(mem, chains[0].clone(), true, 0, usize::MAX)).collect();
        assert!(added[..16].iter().all(|a| *a == Some(128)));
        assert_eq!(added[16], None);
        assert_eq!(iov.iovecs().len(), MAX_IOVECS);
        let mut overflow = [0u8; 1];
        assert!(iov.push_overflow(&mut overflow), "one more piece for the overflow");
        assert_eq!(iov.iovecs().len(), MAX_IOVECS + 1);
    });
}

#[test]
fn a_window_on_part_of_the_pieces() {
    let pieces = spread(0x1_0000, 3, 10, WRITE);
    with_chains(&[&pieces], |mem, mut chains| {
        let iov = GuestIovecs::from_chain(mem, chains.remove(0), true, 0, usize::MAX).unwrap();
        let base = |i: u64| mem.get_host_address(GuestAddress(0x1_0000 + i * 0x1000)).unwrap() as usize;
        let mut out = IovecBuf { pieces: vec![EMPTY; 9] };
        let pieces =
            |out: &IovecBuf| out.as_slice().iter().map(|p| (p.iov_base as usize, p.iov_len)).collect::<Vec<_>>();
        iov.window(7, 15, &mut out);
        assert_eq!(pieces(&out), [(base(0) + 7, 3), (base(1), 10), (base(2), 2)]);
        iov.window(25, 100, &mut out);
        assert_eq!(pieces(&out), [(base(2) + 5, 5)]);
        iov.window(30, 1, &mut out);
        assert!(out.as_slice().is_empty());
    });
}

#[test]
fn a_uniform_chain_has_buffers_of_one_kind_only() {
    let mixed = [(0x1_0000, 8, 0), (0x1_1000, 8, WRITE)];
    let writable = spread(0x2_0000, 2, 8, WRITE);
    with_chains(&[&mixed, &writable], |mem, chains| {
        let mut iov = GuestIovecs::new();
        assert_eq!(iov.push_chain(mem, chains[0].clone(), true, 0, usize::MAX), Some(8), "the readable one skipped");
        assert_eq!(iov.push_uniform_chain(mem, chains[0].clone(), true, 0, usize::MAX), None);
        assert_eq!(iov.push_uniform_chain(mem, chains[0].clone(), false, 0, usize::MAX), None);
        assert_eq!(iov.push_uniform_chain(mem, chains[1].clone(), true, 0, usize::MAX), Some(16));
        assert_eq!(iov.push_uniform_chain(mem, chains[1].clone(), false, 0, usize::MAX), None);
    });
}

#[test]
fn a_header_in_the_first_buffer_is_given_with_the_pieces_after_it() {
    let one = [(0x1_0000, 44 + 100, WRITE)];
    let exact = [(0x2_0000, 44, WRITE), (0x2_1000, 100, WRITE)];
    let split = [(0x3_0000, 40, WRITE), (0x3_1000, 104, WRITE)];
    let mixed = [(0x4_0000, 44, 0), (0x4_1000, 100, WRITE)];
    with_chains(&[&one, &exact, &split, &mixed], |mem, chains| {
        let host = |at: u64| mem.get_host_address(GuestAddress(at)).unwrap() as usize;
        for (i, at) in [(0, 0x1_0000), (1, 0x2_0000)] {
            let mut iov = GuestIovecs::new();
            let (added, head) = iov.push_uniform_chain_head(mem, chains[i].clone(), true, 44, usize::MAX).unwrap();
            let head = head.expect("the header's place");
            assert_eq!((added, head.len(), head.ptr_guard().as_ptr() as usize), (100, 44, host(at)), "chain {i}");
            assert_eq!(iov.len(), 100);
            // The header written through it lands at the chain's start, the pieces stay after it.
            head.write(&[7; 44], 0).unwrap();
            let mut back = [0u8; 45];
            mem.read_slice(&mut back, GuestAddress(at)).unwrap();
            assert_eq!((back[0], back[43], back[44]), (7, 7, 0));
            assert_eq!(iov.iovecs()[0].iov_base as usize, if i == 0 { host(at) + 44 } else { host(0x2_1000) });
        }
        // A header across two buffers: the pieces, but no place for it (written the slow way).
        let mut iov = GuestIovecs::new();
        let (added, head) = iov.push_uniform_chain_head(mem, chains[2].clone(), true, 44, usize::MAX).unwrap();
        assert_eq!((added, head.is_none(), iov.iovecs()[0].iov_base as usize), (100, true, host(0x3_1000) + 4));
        // Not all device-writable: none of it.
        let mut iov = GuestIovecs::new();
        assert!(iov.push_uniform_chain_head(mem, chains[3].clone(), true, 44, usize::MAX).is_none());
        assert!(iov.is_empty());
    });
}

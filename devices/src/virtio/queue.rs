//! Taking chains from a virtqueue and giving them back, with every index the driver wrote
//! checked first: a driver that breaks the ring's rules gets DEVICE_NEEDS_RESET
//! ([`Interrupt::fail`]), never a device that spins, and never a call into `virtio-queue`
//! that would log an error of its own for it.
//!
//! A device's pass over a queue goes through [`Chains`]: it reads the available index
//! once per batch of chains rather than once per chain, writes the used ring through one
//! checked view of it, and interrupts the driver once at the end of the pass.

use std::num::Wrapping;
use std::sync::atomic::{fence, Ordering};

use guest_memory::GuestMemoryMmap;
use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::{Interrupt, INT_USED_RING};
use crate::warn_ratelimited;

/// A chain the driver made available.
pub type Chain<'a> = DescriptorChain<&'a GuestMemoryMmap>;

/// How many chains the driver has made available that the device has not taken, or why
/// the ring is broken: an available index more than a queue ahead of the device's
/// position (the driver would be offering entries twice), or a ring that cannot be read.
fn available(queue: &Queue, memory: &GuestMemoryMmap) -> Result<u16, String> {
    let idx =
        queue.avail_idx(memory, Ordering::Acquire).map_err(|e| format!("cannot read the available index: {e}"))?;
    let ahead = (idx - Wrapping(queue.next_avail())).0;
    if ahead > queue.size() {
        return Err(format!(
            "the available index {} is {ahead} entries past the device's {} in a queue of {}",
            idx.0,
            queue.next_avail(),
            queue.size()
        ));
    }
    Ok(ahead)
}

/// Whether the driver has made chains available that the device has not taken. A
/// broken ring fails the device (and says no); a failed device has nothing to do.
pub fn has_pending(device: &str, queue: &Queue, memory: &GuestMemoryMmap, interrupt: &Interrupt) -> bool {
    if interrupt.needs_reset() {
        return false;
    }
    match available(queue, memory) {
        Ok(n) => n > 0,
        Err(why) => {
            interrupt.fail(device, format_args!("{why}"));
            false
        }
    }
}

/// Checks the rings of the queues a notification names (bit `i` of `notified` for
/// `queues[i]`), even those the device takes nothing from yet (a receive queue with no
/// input waiting): a driver that broke a ring fails the device at once.
pub fn check_notified(device: &str, notified: u32, queues: &[&Queue], memory: &GuestMemoryMmap, interrupt: &Interrupt) {
    for (i, queue) in queues.iter().enumerate() {
        if notified & (1 << i) != 0 {
            has_pending(device, queue, memory, interrupt);
        }
    }
}

/// The next chain the driver made available. When there is none, notifications are
/// re-enabled (with EVENT_IDX: the avail event moves up) and the queue looked at once
/// more, so a chain added meanwhile is not missed. Never more than that: a ring that
/// says there is work but yields none is broken, and the device fails (see
/// [`has_pending`]); so does a chain whose head is not a descriptor of the queue.
pub fn next_chain<'a>(
    device: &str,
    queue: &mut Queue,
    memory: &'a GuestMemoryMmap,
    interrupt: &Interrupt,
) -> Option<Chain<'a>> {
    for second_look in [false, true] {
        if has_pending(device, queue, memory, interrupt) {
            let Some(chain) = queue.pop_descriptor_chain(memory) else {
                interrupt.fail(device, format_args!("the available ring cannot be read"));
                return None;
            };
            if chain.head_index() >= queue.size() {
                let (head, size) = (chain.head_index(), queue.size());
                interrupt.fail(device, format_args!("the driver offered descriptor {head} in a queue of {size}"));
                return None;
            }
            return Some(chain);
        }
        if second_look || interrupt.needs_reset() {
            return None;
        }
        match queue.enable_notification(memory) {
            Ok(true) => {}
            Ok(false) => return None,
            Err(e) => {
                warn_ratelimited!("{device}: queue error: {e}");
                return None;
            }
        }
    }
    None
}

/// Returns a chain the device is done with, `len` bytes written into it. False (with a
/// rate-limited warning) when the used ring cannot take it.
pub fn give_back(device: &str, queue: &mut Queue, memory: &GuestMemoryMmap, head: u16, len: u32) -> bool {
    match queue.add_used(memory, head, len) {
        Ok(()) => true,
        Err(e) => {
            warn_ratelimited!("{device}: cannot return a buffer: {e}");
            false
        }
    }
}

/// Serves every chain the driver has made available: `serve` handles one and returns how
/// many bytes it wrote into it. With EVENT_IDX, chains that raced with re-enabling
/// notifications are served too. Then interrupts the driver if it asked to be.
/// `device` names the device in logs.
pub fn drain_queue(
    device: &str,
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &Interrupt,
    serve: impl FnMut(Chain<'_>) -> u32,
) {
    drain_queue_while(device, queue, memory, interrupt, || true, serve);
}

/// [`drain_queue`], taking no further chain once `go_on` says no (the device is asked to
/// stop): a reset waits for the request in hand, not for all the guest queued.
pub fn drain_queue_while(
    device: &str,
    queue: &mut Queue,
    memory: &GuestMemoryMmap,
    interrupt: &Interrupt,
    mut go_on: impl FnMut() -> bool,
    mut serve: impl FnMut(Chain<'_>) -> u32,
) {
    let mut chains = Chains::new(device, queue, memory, interrupt);
    while let Some(mut batch) = chains.batch() {
        loop {
            if !go_on() {
                return;
            }
            let Some(chain) = batch.next() else { break };
            let head = chain.head_index();
            let len = serve(chain);
            if !batch.give_back(head, len) {
                return;
            }
        }
    }
}

/// Interrupts the driver if buffers were used since the used index was `used_from`, and
/// the driver asked for it (always without EVENT_IDX; with it, when the used index passed
/// the driver's used event). Work that used nothing (a wake-up with no data, a driver's
/// spurious notify) interrupts no one.
///
/// The used event is compared with `used_from` itself, not with `virtio-queue`'s count
/// of buffers added since its last check (`Queue::needs_notification`), which only its
/// own `add_used` keeps: [`Chains`] writes the used ring itself.
pub fn notify_driver(device: &str, queue: &mut Queue, memory: &GuestMemoryMmap, interrupt: &Interrupt, used_from: u16) {
    let used = Wrapping(queue.next_used());
    if used.0 == used_from {
        return;
    }
    if queue.event_idx_enabled() {
        // The used ring's entries and index are written; the used event must be read
        // after them (the driver writes it, then reads the used index).
        fence(Ordering::SeqCst);
        let at = GuestAddress(queue.avail_ring()).checked_add(4 + 2 * u64::from(queue.size()));
        let event = match at.map(|at| memory.load::<u16>(at, Ordering::Relaxed)) {
            Some(Ok(event)) => Wrapping(u16::from_le(event)),
            Some(Err(e)) => return warn_ratelimited!("{device}: queue error: cannot read the used event: {e}"),
            None => return warn_ratelimited!("{device}: queue error: the used event's address overflows"),
        };
        // As Linux's vring_need_event: did the index move past the event in this pass?
        if used - event - Wrapping(1) >= used - Wrapping(used_from) {
            return;
        }
    }
    interrupt.trigger(INT_USED_RING);
}

/// Writes `data` across the chain's leading device-writable buffers; returns how many
/// bytes it wrote. Stops, with a rate-limited warning naming `device`, at a
/// device-readable buffer or one outside guest memory: the guest gets what fitted before.
pub fn write_chain(device: &str, memory: &GuestMemoryMmap, chain: Chain<'_>, data: &[u8]) -> usize {
    write_chain_at(device, memory, chain, 0, data)
}

/// [`write_chain`] from byte `offset` of the chain's device-writable buffers on (a field
/// of a header written earlier); returns how many bytes of `data` it wrote.
pub fn write_chain_at(device: &str, memory: &GuestMemoryMmap, chain: Chain<'_>, offset: usize, data: &[u8]) -> usize {
    let (mut skip, mut written) = (offset, 0usize);
    for desc in chain {
        if written == data.len() {
            break;
        }
        if !desc.is_write_only() {
            warn_ratelimited!("{device}: device-readable descriptor where the device writes; chain ends");
            break;
        }
        let len = desc.len() as usize;
        if skip >= len {
            skip -= len;
            continue;
        }
        let n = (len - skip).min(data.len() - written);
        // `skip < len <= u32::MAX`; an address past the end of guest memory fails the write.
        let at = GuestAddress(desc.addr().0.wrapping_add(skip as u64));
        if memory.write_slice(&data[written..written + n], at).is_err() {
            warn_ratelimited!("{device}: buffer at {:#x} is outside guest memory; chain ends", desc.addr().0);
            break;
        }
        skip = 0;
        written += n;
    }
    written
}

mod chains;
#[cfg(test)]
mod tests;

pub use chains::{Batch, Chains};

//! The guest-physical memory map of an hvrun machine.
//!
//! Devices live below 1 GiB, RAM starts at 1 GiB (the layout of QEMU's `virt`
//! machine), and everything stays below 64 GiB: the default IPA size of
//! Hypervisor.framework on M1/M2 is 36 bits. Every region is aligned to 16 KiB, the
//! host page size on Apple Silicon, so the same layout maps on HVF and on KVM.
//!
//! | range                      | what                               |
//! |----------------------------|------------------------------------|
//! | `0x0800_0000..0x0801_0000` | GIC distributor                    |
//! | `0x0801_0000..0x0802_0000` | GIC CPU interface (GICv2)          |
//! | `0x0801_0000..0x0900_0000` | GICv3 redistributors, when the hypervisor has its own GICv3 (see [`place_gicv3`]) |
//! | `0x0900_0000..0x0900_1000` | PL011 UART                         |
//! | `0x0901_0000..0x0901_1000` | PL031 RTC                          |
//! | `0x0902_0000..0x0902_1000` | boot timer                         |
//! | `0x0903_0000..0x0903_1000` | self-test probe (`hvrun selftest` only) |
//! | `0x0a00_0000..`            | virtio-mmio slots, 0x200 bytes each|
//! | `0x1000_0000..0x4000_0000` | a hypervisor's GICv3 redistributor region too large for the window below the UART |
//! | `0x4000_0000..RAM end`     | RAM (at most 1023 GiB)             |

/// The host page size on Apple Silicon; every guest region is aligned to it.
pub const PAGE_SIZE: u64 = 16 * 1024;

/// Bits of guest-physical address space a machine with up to 63 GiB of RAM uses (64 GiB):
/// every Apple Silicon Mac offers them.
pub const IPA_BITS_MIN: u32 = 36;
/// Bits a larger machine uses (1 TiB), where the hypervisor allows them.
pub const IPA_BITS_MAX: u32 = 40;

/// The guest-physical address bits a machine with `ram` bytes of RAM needs: the smallest
/// that hold its RAM, at least [`IPA_BITS_MIN`] (the devices' windows lie below RAM).
pub const fn ipa_bits_for(ram: u64) -> u32 {
    let end = RAM_BASE.saturating_add(ram);
    if end <= 1 << IPA_BITS_MIN {
        IPA_BITS_MIN
    } else if end <= 1 << 39 {
        39
    } else {
        IPA_BITS_MAX
    }
}

/// The most RAM a machine can have in `ipa_bits` of guest-physical address space.
pub const fn ram_limit(ipa_bits: u32) -> u64 {
    if ipa_bits >= 64 {
        u64::MAX - RAM_BASE
    } else {
        (1u64 << ipa_bits).saturating_sub(RAM_BASE)
    }
}

/// Base of the GIC distributor.
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// Size of the GIC distributor window.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// Base of the GICv2 CPU interface.
pub const GIC_CPU_BASE: u64 = 0x0801_0000;
/// Size of the GICv2 CPU interface window.
pub const GIC_CPU_SIZE: u64 = 0x1_0000;

/// First address past the window that GICv3 redistributors may use.
pub const GIC_REDIST_LIMIT: u64 = UART_BASE;
/// Where a hypervisor's redistributor region goes when it does not fit below the UART:
/// the free space between the virtio slots and RAM (768 MiB).
pub const GIC_REDIST_HIGH_BASE: u64 = 0x1000_0000;

/// What a hypervisor's own GICv3 asks of the memory map (its numbers, not ours: on HVF
/// they come from the framework at run time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicV3Needs {
    /// Bytes of the distributor.
    pub distributor_size: u64,
    /// Alignment of the distributor's base (a power of two).
    pub distributor_align: u64,
    /// Bytes of one vCPU's redistributor (two 64 KiB frames).
    pub redistributor_size: u64,
    /// Bytes the redistributor region spans for every vCPU the hypervisor allows (HVF
    /// reports it, and its GIC may claim all of it): reserved whole, so no device lies
    /// inside; the device tree describes the VM's vCPUs' part.
    pub redistributor_region: u64,
    /// Alignment of the redistributor region's base (a power of two).
    pub redistributor_align: u64,
    /// The first SPI INTID it offers and how many.
    pub spis: (u32, u32),
}

impl GicV3Needs {
    /// The usual GICv3 geometry (KVM's vGICv3 has it): a 64 KiB distributor, two 64 KiB
    /// frames per redistributor, 64 KiB alignment for both, a redistributor region sized
    /// for `vcpus`, and `spis` (first INTID, count).
    pub const fn standard(vcpus: u32, spis: (u32, u32)) -> Self {
        GicV3Needs {
            distributor_size: 0x1_0000,
            distributor_align: 0x1_0000,
            redistributor_size: 0x2_0000,
            redistributor_region: 0x2_0000 * vcpus as u64,
            redistributor_align: 0x1_0000,
            spis,
        }
    }
}

/// Where a GICv3 goes in the memory map.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GicV3Layout {
    /// Distributor base and size.
    pub distributor: (u64, u64),
    /// Redistributor region base, and the size that `vcpus` redistributors span (what
    /// the device tree describes).
    pub redistributors: (u64, u64),
}

/// The virtual timer's interrupt (PPI 11), as the device tree gives it to the guest.
pub const VTIMER_INTID: u32 = 27;

impl GicV3Layout {
    /// Checks what a hypervisor's GIC says it did against this layout, which the device
    /// tree describes to the guest: vCPU `index`'s redistributor at `reported` must be one
    /// of the region's slots, `size` bytes apart. (Which slot is the hypervisor's choice:
    /// the guest finds its own by affinity, and vCPUs may be created in any order.)
    pub fn check_redistributor(&self, index: u32, size: u64, reported: u64) -> Result<(), String> {
        let (base, len) = self.redistributors;
        let offset = reported.wrapping_sub(base);
        if size > 0 && reported >= base && offset < len && offset % size == 0 {
            Ok(())
        } else {
            Err(format!(
                "the hypervisor's GIC put vCPU {index}'s redistributor at {reported:#x}, outside the \
                 {size:#x}-byte slots of {base:#x}..{:#x} that the device tree describes",
                base.saturating_add(len)
            ))
        }
    }
}

/// Checks the INTID a hypervisor's GIC raises the virtual timer with against the device
/// tree's.
pub fn check_vtimer_intid(reported: u32) -> Result<(), String> {
    check_intid("the virtual timer", VTIMER_INTID, reported)
}

/// The per-CPU interrupts a guest with EL2 is told of, as (what, INTID): the GIC's
/// maintenance interrupt (PPI 9) and EL2's physical timer (PPI 10).
pub const EL2_INTIDS: [(&str, u32); 2] = [("the GIC maintenance interrupt", 25), ("EL2's physical timer", 26)];

/// Checks the INTID a hypervisor's GIC raises `what` with against the device tree's.
pub fn check_intid(what: &str, expected: u32, reported: u32) -> Result<(), String> {
    if reported == expected {
        Ok(())
    } else {
        Err(format!("the hypervisor's GIC raises {what} as INTID {reported}, the device tree says {expected}"))
    }
}

/// Why a hypervisor's GICv3 cannot be placed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum GicPlacementError {
    /// The hypervisor's GIC needs more room than the device window has.
    #[error("its redistributors need {need:#x} bytes, the memory map has {room:#x}")]
    NoRoom {
        /// Bytes needed from the redistributor base on.
        need: u64,
        /// Bytes available there.
        room: u64,
    },
    /// A size or alignment the hypervisor reported makes no sense.
    #[error("it reported an unusable {0}")]
    Nonsense(&'static str),
    /// The machine's SPIs are not all inside the range the GIC offers.
    #[error("it offers SPIs {first}..{end}, the machine uses {SPI_BASE}..{needed}")]
    Spis {
        /// First SPI INTID offered.
        first: u32,
        /// One past the last offered.
        end: u64,
        /// One past the last INTID the machine uses.
        needed: u32,
    },
}

/// Places a hypervisor's GICv3 for `vcpus` vCPUs: the distributor at [`GIC_DIST_BASE`],
/// the redistributor region right after it (aligned as asked) when the whole of it fits
/// below [`GIC_REDIST_LIMIT`], else at [`GIC_REDIST_HIGH_BASE`] (on newer chips the region
/// the framework reserves for every possible vCPU can outgrow the window below the UART;
/// the GIC is moved rather than left off). The machine's devices must find their SPIs
/// (INTIDs `SPI_BASE..SPI_BASE + spis_used`) in the range it offers.
pub fn place_gicv3(needs: &GicV3Needs, vcpus: u32, spis_used: u32) -> Result<GicV3Layout, GicPlacementError> {
    let pow2 = |v: u64, what| if v.is_power_of_two() { Ok(v) } else { Err(GicPlacementError::Nonsense(what)) };
    let dist_align = pow2(needs.distributor_align, "distributor alignment")?;
    let redist_align = pow2(needs.redistributor_align, "redistributor alignment")?;
    if needs.distributor_size == 0 || needs.redistributor_size == 0 {
        return Err(GicPlacementError::Nonsense("size of zero"));
    }
    if GIC_DIST_BASE % dist_align != 0 {
        return Err(GicPlacementError::Nonsense("distributor alignment"));
    }
    let after_dist = GIC_DIST_BASE.checked_add(needs.distributor_size).ok_or(GicPlacementError::Nonsense("size"))?;
    let used = needs.redistributor_size.checked_mul(u64::from(vcpus)).ok_or(GicPlacementError::Nonsense("size"))?;
    let need = needs.redistributor_region.max(used);
    let fits = |start: u64, limit: u64| {
        let base = align_up(start, redist_align)?;
        (base.checked_add(need)? <= limit).then_some(base)
    };
    let redist = fits(after_dist, GIC_REDIST_LIMIT)
        .or_else(|| fits(GIC_REDIST_HIGH_BASE, RAM_BASE))
        .ok_or(GicPlacementError::NoRoom { need, room: RAM_BASE.saturating_sub(GIC_REDIST_HIGH_BASE) })?;
    let (first, count) = needs.spis;
    let needed = SPI_BASE + spis_used;
    let end = u64::from(first) + u64::from(count);
    if first > SPI_BASE || end < u64::from(needed) {
        return Err(GicPlacementError::Spis { first, end, needed });
    }
    Ok(GicV3Layout { distributor: (GIC_DIST_BASE, needs.distributor_size), redistributors: (redist, used) })
}

/// Base of the PL011 UART.
pub const UART_BASE: u64 = 0x0900_0000;
/// Size of the PL011 UART window.
pub const UART_SIZE: u64 = 0x1000;
/// Base of the PL031 real-time clock.
pub const RTC_BASE: u64 = 0x0901_0000;
/// Size of the PL031 window.
pub const RTC_SIZE: u64 = 0x1000;
/// Base of the boot-timer device.
pub const BOOT_TIMER_BASE: u64 = 0x0902_0000;
/// Size of the boot-timer window.
pub const BOOT_TIMER_SIZE: u64 = 0x1000;
/// Base of the self-test probe (only `hvrun selftest`'s machines have it).
pub const PROBE_BASE: u64 = 0x0903_0000;
/// Size of the probe's window.
pub const PROBE_SIZE: u64 = 0x1000;

/// Base of the first virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;

/// First guest-physical address of RAM.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Largest amount of RAM a machine can have ([`IPA_BITS_MAX`] of address space).
pub const RAM_MAX: u64 = ram_limit(IPA_BITS_MAX);

/// Alignment the arm64 boot protocol requires of the kernel's load base.
pub const KERNEL_ALIGN: u64 = 2 * 1024 * 1024;
/// Largest device tree the arm64 boot protocol accepts.
pub const FDT_MAX_SIZE: u64 = 2 * 1024 * 1024;

/// First shared peripheral interrupt (INTID) number.
pub const SPI_BASE: u32 = 32;
/// SPI offset (from [`SPI_BASE`]) of the PL011 UART.
pub const UART_SPI: u32 = 1;
/// SPI offset (from [`SPI_BASE`]) of the PL031 RTC.
pub const RTC_SPI: u32 = 2;
/// SPI offset of the first virtio-mmio slot; slot `n` uses `VIRTIO_SPI_BASE + n`.
pub const VIRTIO_SPI_BASE: u32 = 16;

/// Rounds `value` up to a multiple of `align` (a power of two), or `None` on overflow.
pub const fn align_up(value: u64, align: u64) -> Option<u64> {
    match value.checked_add(align - 1) {
        Some(v) => Some(v & !(align - 1)),
        None => None,
    }
}

/// Rounds `value` down to a multiple of `align` (a power of two).
pub const fn align_down(value: u64, align: u64) -> u64 {
    value & !(align - 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn device_windows_do_not_overlap_and_sit_below_ram() {
        let mut windows = [
            (GIC_DIST_BASE, GIC_DIST_SIZE),
            (GIC_CPU_BASE, GIC_CPU_SIZE),
            (UART_BASE, UART_SIZE),
            (RTC_BASE, RTC_SIZE),
            (BOOT_TIMER_BASE, BOOT_TIMER_SIZE),
            (PROBE_BASE, PROBE_SIZE),
            (VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE * 32),
        ];
        windows.sort();
        for pair in windows.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        let (last, size) = windows[windows.len() - 1];
        assert!(last + size <= RAM_BASE);
    }

    fn kvm_like(vcpus: u32) -> GicV3Needs {
        GicV3Needs::standard(vcpus, (32, 988))
    }

    #[test]
    fn gicv3_goes_after_the_distributor_below_the_uart() {
        let layout = place_gicv3(&kvm_like(4), 4, 64).unwrap();
        assert_eq!(layout.distributor, (GIC_DIST_BASE, 0x1_0000));
        assert_eq!(layout.redistributors, (GIC_DIST_BASE + 0x1_0000, 4 * 0x2_0000));
        // 127 redistributors fit between the distributor and the UART; 128 go up.
        assert_eq!(place_gicv3(&kvm_like(127), 127, 64).unwrap().redistributors.0, GIC_DIST_BASE + 0x1_0000);
        assert_eq!(place_gicv3(&kvm_like(128), 128, 64).unwrap().redistributors.0, GIC_REDIST_HIGH_BASE);
    }

    /// Issue 14, fix 4: the whole region the framework reports (one redistributor for
    /// every vCPU it allows) had to fit below the UART, so on a chip where it is larger
    /// than the window the in-kernel GIC was silently off. It is reserved whole (the
    /// framework may decode all of it: no device may lie inside), and moves above the
    /// virtio slots when it does not fit below the UART.
    #[test]
    fn a_redistributor_region_too_large_for_the_window_moves_up_whole() {
        // An HVF-like GIC: a region for 64 vCPUs, a 2 MiB-aligned redistributor base.
        let needs = GicV3Needs { redistributor_region: 64 * 0x2_0000, redistributor_align: 2 << 20, ..kvm_like(2) };
        let layout = place_gicv3(&needs, 2, 64).unwrap();
        assert_eq!(layout.redistributors, (GIC_DIST_BASE + (2 << 20), 2 * 0x2_0000));
        let huge = GicV3Needs { redistributor_region: 32 << 20, ..needs };
        let high = place_gicv3(&huge, 2, 64).unwrap();
        assert_eq!(high.redistributors, (GIC_REDIST_HIGH_BASE, 2 * 0x2_0000), "the device tree's part");
        const { assert!(GIC_REDIST_HIGH_BASE + (32 << 20) <= RAM_BASE) };
        // No device inside the moved region.
        const { assert!(VIRTIO_MMIO_BASE + 64 * VIRTIO_MMIO_SIZE <= GIC_REDIST_HIGH_BASE) };
        let absurd = GicV3Needs { redistributor_region: 1 << 30, ..needs };
        assert!(matches!(place_gicv3(&absurd, 2, 64), Err(GicPlacementError::NoRoom { .. })));
    }

    #[test]
    fn what_the_hypervisors_gic_reports_is_checked_against_the_device_tree() {
        let layout = place_gicv3(&kvm_like(4), 4, 64).unwrap();
        let base = layout.redistributors.0;
        assert_eq!(layout.check_redistributor(0, 0x2_0000, base), Ok(()));
        assert_eq!(layout.check_redistributor(1, 0x2_0000, base + 3 * 0x2_0000), Ok(()), "any slot");
        let past = layout.check_redistributor(1, 0x2_0000, base + 4 * 0x2_0000).unwrap_err();
        assert!(past.contains("vCPU 1") && past.contains(&format!("{:#x}", base + 4 * 0x2_0000)), "{past}");
        assert!(layout.check_redistributor(0, 0x2_0000, base + 0x1_0000).is_err(), "between slots");
        assert!(layout.check_redistributor(0, 0x2_0000, base - 0x2_0000).is_err(), "below the region");
        assert!(layout.check_redistributor(0, 0, base).is_err());
        assert_eq!(check_vtimer_intid(27), Ok(()));
        assert!(check_vtimer_intid(30).unwrap_err().contains("the virtual timer as INTID 30"));
        let [maintenance, el2_timer] = EL2_INTIDS;
        assert_eq!(check_intid(maintenance.0, maintenance.1, 25), Ok(()));
        assert!(check_intid(el2_timer.0, el2_timer.1, 30).unwrap_err().contains("EL2's physical timer as INTID 30"));
    }

    #[test]
    fn gicv3_with_nonsense_numbers_or_too_few_spis_is_refused() {
        let odd = GicV3Needs { redistributor_align: 0x3000, ..kvm_like(1) };
        assert_eq!(place_gicv3(&odd, 1, 64), Err(GicPlacementError::Nonsense("redistributor alignment")));
        let zero = GicV3Needs { redistributor_size: 0, ..kvm_like(1) };
        assert!(matches!(place_gicv3(&zero, 1, 64), Err(GicPlacementError::Nonsense(_))));
        let huge_align = GicV3Needs { distributor_align: 1 << 40, ..kvm_like(1) };
        assert!(matches!(place_gicv3(&huge_align, 1, 64), Err(GicPlacementError::Nonsense(_))));
        let few = GicV3Needs { spis: (32, 32), ..kvm_like(1) };
        assert_eq!(place_gicv3(&few, 1, 64), Err(GicPlacementError::Spis { first: 32, end: 64, needed: 96 }));
        let overflow = GicV3Needs { redistributor_size: u64::MAX, ..kvm_like(1) };
        assert!(place_gicv3(&overflow, 2, 64).is_err());
    }

    /// Issue 14, fix 8: every machine asked for 36 bits, so RAM stopped at 63 GiB. The
    /// bits follow the RAM: 36 while it fits, then 39 or 40.
    #[test]
    fn the_address_space_grows_with_the_ram() {
        assert_eq!(ipa_bits_for(512 << 20), 36);
        assert_eq!(ipa_bits_for(ram_limit(36)), 36, "63 GiB");
        assert_eq!(ipa_bits_for(ram_limit(36) + PAGE_SIZE), 39);
        assert_eq!(ipa_bits_for(ram_limit(39)), 39, "511 GiB");
        assert_eq!(ipa_bits_for(ram_limit(39) + PAGE_SIZE), 40);
        assert_eq!(ipa_bits_for(RAM_MAX), 40);
        assert_eq!(ram_limit(36), 63 << 30);
        assert_eq!(ram_limit(40), 1023 << 30);
        assert_eq!(ram_limit(64), u64::MAX - RAM_BASE);
    }

    #[test]
    fn ram_is_page_and_kernel_aligned() {
        assert_eq!(RAM_BASE % PAGE_SIZE, 0);
        assert_eq!(RAM_BASE % KERNEL_ALIGN, 0);
        assert_eq!(RAM_BASE + RAM_MAX, 1 << IPA_BITS_MAX);
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(1, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_up(PAGE_SIZE, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_up(u64::MAX, PAGE_SIZE), None);
        assert_eq!(align_down(PAGE_SIZE + 1, PAGE_SIZE), PAGE_SIZE);
    }
}

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
//! | `0x0900_0000..0x0900_1000` | PL011 UART                         |
//! | `0x0901_0000..0x0901_1000` | PL031 RTC                          |
//! | `0x0902_0000..0x0902_1000` | boot timer                         |
//! | `0x0a00_0000..`            | virtio-mmio slots, 0x200 bytes each|
//! | `0x4000_0000..RAM end`     | RAM (at most 63 GiB)               |

/// The host page size on Apple Silicon; every guest region is aligned to it.
pub const PAGE_SIZE: u64 = 16 * 1024;

/// Number of bits of guest-physical address space the machine uses (64 GiB).
pub const IPA_BITS: u32 = 36;
/// First guest-physical address past the machine's address space.
pub const IPA_LIMIT: u64 = 1 << IPA_BITS;

/// Base of the GIC distributor.
pub const GIC_DIST_BASE: u64 = 0x0800_0000;
/// Size of the GIC distributor window.
pub const GIC_DIST_SIZE: u64 = 0x1_0000;
/// Base of the GICv2 CPU interface.
pub const GIC_CPU_BASE: u64 = 0x0801_0000;
/// Size of the GICv2 CPU interface window.
pub const GIC_CPU_SIZE: u64 = 0x1_0000;

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

/// Base of the first virtio-mmio slot.
pub const VIRTIO_MMIO_BASE: u64 = 0x0a00_0000;
/// Size of one virtio-mmio slot.
pub const VIRTIO_MMIO_SIZE: u64 = 0x200;

/// First guest-physical address of RAM.
pub const RAM_BASE: u64 = 0x4000_0000;
/// Largest amount of RAM that fits below [`IPA_LIMIT`].
pub const RAM_MAX: u64 = IPA_LIMIT - RAM_BASE;

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
            (VIRTIO_MMIO_BASE, VIRTIO_MMIO_SIZE * 32),
        ];
        windows.sort();
        for pair in windows.windows(2) {
            assert!(pair[0].0 + pair[0].1 <= pair[1].0, "{pair:x?} overlap");
        }
        let (last, size) = windows[windows.len() - 1];
        assert!(last + size <= RAM_BASE);
    }

    #[test]
    fn ram_is_page_and_kernel_aligned() {
        assert_eq!(RAM_BASE % PAGE_SIZE, 0);
        assert_eq!(RAM_BASE % KERNEL_ALIGN, 0);
        assert_eq!(RAM_BASE + RAM_MAX, IPA_LIMIT);
    }

    #[test]
    fn alignment_helpers() {
        assert_eq!(align_up(1, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_up(PAGE_SIZE, PAGE_SIZE), Some(PAGE_SIZE));
        assert_eq!(align_up(u64::MAX, PAGE_SIZE), None);
        assert_eq!(align_down(PAGE_SIZE + 1, PAGE_SIZE), PAGE_SIZE);
    }
}

// The smallest guest with a mark: writes hvrun's boot-timer device with its first store,
// then powers off (PSCI SYSTEM_OFF). hvrun logs the boot timer at once, so the time of
// that line is the time of the guest's first instructions: `cargo xtask compare`'s
// timeline of hvrun's own start and teardown (hvrun only: on another VMM the address
// is some other device).
#include "image-header.S"

entry:
    ldr     x1, =0x09020000         // the boot timer (arch_aarch64::layout::BOOT_TIMER_BASE)
    mov     w2, #123
    strb    w2, [x1]
    b       system_off

    .ltorg
    .balign 8
_image_end:

// Touches addresses no device claims: reads must return zero, writes must be
// ignored, and the VMM must keep running. Prints a verdict, then powers off.
#include "image-header.S"

entry:
    ldr     x1, =0x09000000         // PL011 base
    ldr     x4, =0x0c000000         // nothing lives here (below RAM, between devices)
    ldr     x5, =0x0900fff0         // inside the UART's 64 KiB slot but past its 4 KiB window
    mov     x6, #0
    mov     x10, #1000              // many times, to exercise the rate-limited warning
1:  str     x10, [x4]               // 64-bit write to nowhere
    ldr     x7, [x4]                // 64-bit read from nowhere: must be 0
    orr     x6, x6, x7
    ldr     w8, [x5]                // 32-bit read past the UART: must be 0
    orr     x6, x6, x8
    subs    x10, x10, #1
    b.ne    1b
    adr     x2, pass
    cbz     x6, 2f
    adr     x2, fail
2:  bl      puts
    b       system_off

pass:
    .asciz  "unmapped accesses read as zero\n"
fail:
    .asciz  "FAIL: an unmapped read returned nonzero\n"
    .ltorg
    .balign 8
_image_end:

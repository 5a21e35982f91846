// `hvrun selftest`, mmio-sign: sign-extending loads of 1, 2 and 4 bytes from MMIO into
// W and X registers. A value that comes back zero-extended instead (the loaded bytes
// and nothing above them) is counted in a mask reported to the probe's value register,
// not failed at once: Linux's KVM drops the extension itself (vcpu_data_host_to_guest
// masks the value to the access size), which `hvrun selftest` recognises and reports as
// the host's. Anything else is a failure.
#include "image-header.S"
#include "selftest.inc"

// Check \reg against \value; its zero-extended form \zext sets bit \bit of x11.
.macro signed reg, value, zext, bit
    ldr     x9, =\value
    cmp     \reg, x9
    b.eq    .Lsigned\@
    ldr     x9, =\zext
    cmp     \reg, x9
    mov     x8, \reg
    b.ne    failed_with
    orr     x11, x11, #(1 << \bit)
.Lsigned\@:
    add     x10, x10, #1
.endm

entry:
    start
    mov     x11, #0
    ldr     x5, =0xfedcba98f6e5d4c3
    str     x5, [x4]
    ldrsb   x6, [x4]                // 1-2: bytes
    signed  x6, 0xffffffffffffffc3, 0xc3, 0
    ldrsb   w6, [x4]
    signed  x6, 0xffffffc3, 0xc3, 1
    ldrsh   x6, [x4]                // 3-4: halfwords
    signed  x6, 0xffffffffffffd4c3, 0xd4c3, 2
    ldrsh   w6, [x4]
    signed  x6, 0xffffd4c3, 0xd4c3, 3
    ldrsw   x6, [x4]                // 5: a word
    signed  x6, 0xfffffffff6e5d4c3, 0xf6e5d4c3, 4
    mov     w7, #0x54               // 6: a positive byte stays positive
    strb    w7, [x4, #1]
    ldrsb   x6, [x4, #1]
    signed  x6, 0x54, 0x54, 5
    str     x11, [x4, #PROBE_VALUE]
    b       passed

ok_msg:
    .asciz  "selftest: mmio-sign done\n"
fail_msg:
    .asciz  "selftest: mmio-sign FAILED\n"
    .ltorg
    .balign 8
_image_end:

// `hvrun selftest`, mmio: loads and stores of 1, 2, 4 and 8 bytes to MMIO (the probe's
// scratch register), zero-extended into W and X registers, stores from XZR, and a load
// into XZR, which must not touch X30 (sign extension: selftest-mmio-sign.S). Each check
// has a number; the first that fails is reported to the probe.
#include "image-header.S"
#include "selftest.inc"

entry:
    start
    ldr     x5, =0xfedcba98f6e5d4c3
    str     x5, [x4]                // 1: an 8-byte store and load
    ldr     x6, [x4]
    expect  x6, 0xfedcba98f6e5d4c3
    ldrb    w6, [x4]                // 2: a byte
    expect  x6, 0xc3
    ldrh    w6, [x4]                // 3: a halfword
    expect  x6, 0xd4c3
    ldr     w6, [x4]                // 4-5: words, at both offsets
    expect  x6, 0xf6e5d4c3
    ldr     w6, [x4, #4]
    expect  x6, 0xfedcba98
    ldrb    w6, [x4, #7]            // 6: the last byte
    expect  x6, 0xfe
    ldrh    w6, [x4, #6]            // 7: the last halfword
    expect  x6, 0xfedc
    mov     w7, #0x11               // 8-10: stores of 1, 2 and 4 bytes
    strb    w7, [x4, #1]
    ldr     x6, [x4]
    expect  x6, 0xfedcba98f6e511c3
    mov     w7, #0xbeef
    strh    w7, [x4, #2]
    ldr     x6, [x4]
    expect  x6, 0xfedcba98beef11c3
    ldr     w7, =0x01020304
    str     w7, [x4, #4]
    ldr     x6, [x4]
    expect  x6, 0x01020304beef11c3
    str     xzr, [x4]               // 11: a store of XZR writes zeros
    ldr     x6, [x4]
    expect  x6, 0
    mov     x30, #0x1234            // 12: a load into XZR leaves X30 alone
    str     x5, [x4]
    ldr     xzr, [x4]
    expect  x30, 0x1234
    strb    wzr, [x4, #3]           // 13: a one-byte store of WZR
    ldr     x6, [x4]
    expect  x6, 0xfedcba9800e5d4c3
    b       passed

ok_msg:
    .asciz  "selftest: mmio ok\n"
fail_msg:
    .asciz  "selftest: mmio FAILED\n"
    .ltorg
    .balign 8
_image_end:

// MMIO accesses the VMM cannot emulate: a load pair, a store pair and a load with
// writeback (the CPU gives the hypervisor no syndrome for them), and an instruction
// fetch from MMIO. On hardware each is an abort the guest's kernel handles; the VMM must
// deliver the same aborts and keep running, never end the VM (issue 12, hole 4).
// Counts the aborts in its own vector table, prints a verdict, then powers off.
#include "image-header.S"

entry:
    ldr     x1, =0x09000000         // PL011 base
    adr     x9, vectors
    msr     vbar_el1, x9
    isb
    ldr     x4, =0x0a000000         // virtio-mmio slot 0
    mov     x20, #0                 // data aborts taken
    mov     x23, #0                 // prefetch aborts taken
    ldp     x5, x6, [x4]
    stp     x5, x6, [x4]
    ldr     x5, [x4, #8]!           // pre-index writeback
    ldr     x4, =0x0a000000
    blr     x4                      // execute MMIO: the handler returns to x30
    adr     x2, fail
    cmp     x20, #3
    b.ne    1f
    cmp     x23, #1
    b.ne    1f
    adr     x2, pass
1:  bl      puts
    b       system_off

// Synchronous exceptions from the current EL with SP_ELx: a data abort returns past
// the faulting instruction, a prefetch abort returns to the caller (x30).
handler:
    mrs     x22, esr_el1
    ubfx    x22, x22, #26, #6       // EC (Linux 6.1's KVM injects ESRs with bits 63:32 set)
    cmp     x22, #0x21
    b.eq    2f
    add     x20, x20, #1
    mrs     x21, elr_el1
    add     x21, x21, #4
    msr     elr_el1, x21
    eret
2:  add     x23, x23, #1
    msr     elr_el1, x30
    eret

pass:
    .asciz  "mmio-aborts: 3 data aborts and 1 prefetch abort taken; the VMM kept running\n"
fail:
    .asciz  "FAIL: mmio-aborts: the wrong aborts were taken\n"
    .ltorg

    .balign 2048
vectors:
    .skip   0x200
    b       handler                 // current EL with SP_ELx, synchronous
    .balign 8
_image_end:

// `hvrun selftest`, timer: the virtual timer's interrupt (INTID 27) taken through the
// GIC the machine has (hvrun's GICv2, or the hypervisor's GICv3, which the probe names)
// while the guest waits in WFI: the WFI must end, the vector must run once per firing,
// and acknowledging must return INTID 27. Two rounds.
#include "image-header.S"
#include "selftest.inc"

#define GICD            0x08000000
#define GICC            0x08010000
#define ICC_SRE_EL1     S3_0_C12_C12_5
#define ICC_PMR_EL1     S3_0_C4_C6_0
#define ICC_IGRPEN1_EL1 S3_0_C12_C12_7
#define ICC_IAR1_EL1    S3_0_C12_C12_0
#define ICC_EOIR1_EL1   S3_0_C12_C12_1

entry:
    start   vectors
    ldr     x15, [x4, #PROBE_GIC]
    cmp     x15, #3
    b.eq    gicv3
    ldr     x8, =GICD               // GICv2: distributor on, PPI 27 enabled,
    mov     w9, #1
    str     w9, [x8]
    mov     w9, #(1 << 27)
    str     w9, [x8, #0x100]
    ldr     x8, =GICC               // CPU interface on, every priority let through.
    mov     w9, #0xf0
    str     w9, [x8, #4]
    mov     w9, #1
    str     w9, [x8]
    b       armed
gicv3:
    ldr     x8, =GICD               // GICv3: affinity routing, group 1 on;
    mov     w9, #0x13
    str     w9, [x8]
    ldr     x8, [x4, #PROBE_REDIST] // find this vCPU's redistributor by affinity;
    mrs     x11, mpidr_el1
    and     x11, x11, #0xffffff
1:  ldr     x12, [x8, #8]           // GICR_TYPER
    lsr     x13, x12, #32
    cmp     x13, x11
    b.eq    2f
    tbnz    x12, #4, failed         // Last: not found (check 1)
    add     x8, x8, #0x20000
    b       1b
2:  add     x10, x10, #1
    ldr     w9, [x8, #0x14]         // wake it (GICR_WAKER.ProcessorSleep = 0);
    bic     w9, w9, #2
    str     w9, [x8, #0x14]
3:  ldr     w9, [x8, #0x14]
    tbnz    w9, #2, 3b
    add     x8, x8, #0x10000        // PPI 27 in group 1, enabled;
    ldr     w9, [x8, #0x80]
    orr     w9, w9, #(1 << 27)
    str     w9, [x8, #0x80]
    mov     w9, #(1 << 27)
    str     w9, [x8, #0x100]
    mrs     x9, ICC_SRE_EL1         // the system-register CPU interface on.
    orr     x9, x9, #1
    msr     ICC_SRE_EL1, x9
    isb
    mov     x9, #0xf0
    msr     ICC_PMR_EL1, x9
    mov     x9, #1
    msr     ICC_IGRPEN1_EL1, x9
    isb
armed:
    mov     x19, #2                 // rounds
    mov     x20, #0                 // interrupts taken
    mov     x22, #0                 // the last INTID acknowledged
    msr     daifclr, #2             // IRQs unmasked
round:
    mrs     x9, cntfrq_el0          // fire in about 8 ms
    lsr     x9, x9, #7
    msr     cntv_tval_el0, x9
    mov     x9, #1                  // enabled, not masked
    msr     cntv_ctl_el0, x9
    isb
    mov     x21, x20
4:  wfi                             // woken by the timer's interrupt
    cmp     x20, x21
    b.eq    4b
    expect  x22, 27                 // the INTID acknowledged was the timer's
    subs    x19, x19, #1
    b.ne    round
    msr     daifset, #2
    expect  x20, 2                  // once per firing
    b       passed

// IRQ: acknowledge, mask the timer (its level drops), end the interrupt.
irq:
    cmp     x15, #3
    b.eq    1f
    ldr     x8, =GICC
    ldr     w22, [x8, #0x0c]        // GICC_IAR
    mov     x9, #3                  // enabled, masked
    msr     cntv_ctl_el0, x9
    isb
    str     w22, [x8, #0x10]        // GICC_EOIR
    b       2f
1:  mrs     x22, ICC_IAR1_EL1
    mov     x9, #3
    msr     cntv_ctl_el0, x9
    isb
    msr     ICC_EOIR1_EL1, x22
2:  and     x22, x22, #0x3ff
    add     x20, x20, #1
    eret

sync:
    mrs     x21, esr_el1
    ubfx    x21, x21, #26, #6
    ldr     x4, =PROBE
    str     x21, [x4, #PROBE_VALUE]
    b       failed

ok_msg:
    .asciz  "selftest: timer ok (WFI woken twice by the virtual timer through the GIC)\n"
fail_msg:
    .asciz  "selftest: timer FAILED\n"
    .ltorg

    .balign 2048
vectors:
    .skip   0x200
    b       sync                    // current EL with SP_ELx, synchronous
    .balign 0x80
    b       irq                     // current EL with SP_ELx, IRQ
    .balign 8
_image_end:

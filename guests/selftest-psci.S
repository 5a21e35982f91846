// `hvrun selftest`, psci: PSCI_VERSION through HVC and SMC, then vCPU 1 brought up with
// CPU_ON and down with CPU_OFF, twice (it stores the context CPU_ON gave it, so the
// primary knows it ran), AFFINITY_INFO seeing it off each time; SYSTEM_OFF at the end.
// SMC is PSCI's other conduit: a hypervisor may answer it (Hypervisor.framework does,
// through hvrun) or not (KVM returns NOT_SUPPORTED); either is correct, the answer is
// printed.
#include "image-header.S"
#include "selftest.inc"

#define PSCI_VERSION    0x84000000
#define CPU_OFF         0x84000002
#define CPU_ON_64       0xc4000003
#define AFFINITY_INFO   0xc4000004

entry:
    start
    ldr     x0, =PSCI_VERSION       // 1: VERSION over HVC is 0.2 or later
    hvc     #0
    mov     w21, w0
    cmp     w21, #2
    b.lo    failed
    tbnz    w21, #31, failed
    add     x10, x10, #1
    ldr     x0, =PSCI_VERSION       // 2: over SMC, the same version or NOT_SUPPORTED
    smc     #0
    ldr     x1, =0x09000000         // SMCCC lets a call clobber x1-x3
    adr     x2, smc_psci
    cmp     w0, w21
    b.eq    1f
    adr     x2, smc_none
    cmn     w0, #1
    b.ne    failed
1:  bl      puts
    add     x10, x10, #1
    mov     x19, #2                 // 3-8: two rounds of CPU_ON / CPU_OFF
round:
    adr     x20, flag
    str     xzr, [x20]
    dsb     sy
    ldr     x0, =CPU_ON_64
    mov     x1, #1                  // vCPU 1's MPIDR affinity
    adr     x2, secondary
    mov     x3, x19                 // its context: the round
    hvc     #0
    ldr     x1, =0x09000000
    expect  x0, 0                   // CPU_ON succeeded
    ldr     x11, =100000000
2:  ldr     x12, [x20]              // it ran and stored its context
    cmp     x12, x19
    b.eq    3f
    subs    x11, x11, #1
    b.ne    2b
    b       failed
3:  add     x10, x10, #1
    ldr     x11, =100000000
4:  ldr     x0, =AFFINITY_INFO      // and then turned itself off
    mov     x1, #1
    mov     x2, #0
    hvc     #0
    cmp     x0, #1                  // OFF
    b.eq    5f
    subs    x11, x11, #1
    b.ne    4b
    b       failed
5:  add     x10, x10, #1
    ldr     x1, =0x09000000
    subs    x19, x19, #1
    b.ne    round
    b       passed

// vCPU 1: stores its context (x0) where the primary looks, then CPU_OFF.
secondary:
    adr     x20, flag
    str     x0, [x20]
    dsb     sy
    ldr     x0, =CPU_OFF
    hvc     #0
    b       .

ok_msg:
    .asciz  "selftest: psci ok (VERSION, CPU_ON and CPU_OFF twice, AFFINITY_INFO)\n"
fail_msg:
    .asciz  "selftest: psci FAILED\n"
smc_psci:
    .asciz  "selftest: psci over SMC answered\n"
smc_none:
    .asciz  "selftest: psci over SMC not supported by this hypervisor\n"
    .ltorg
    .balign 8
flag:
    .quad   0
_image_end:

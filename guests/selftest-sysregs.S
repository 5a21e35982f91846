// `hvrun selftest`, sysregs: the ID registers Linux reads at boot (including those the
// hypervisor may trap, which must read as zero, never UNDEF), SME hidden, and an
// IMPLEMENTATION DEFINED register, which must UNDEF (one exception, and the guest goes
// on). Counts the exceptions in its own vector table.
#include "image-header.S"
#include "selftest.inc"

entry:
    start   vectors
    mov     x20, #0                 // UNDEFs taken
    mrs     x5, midr_el1
    mrs     x5, mpidr_el1
    mrs     x5, S3_0_C0_C4_0        // ID_AA64PFR0_EL1
    mrs     x6, S3_0_C0_C4_1        // ID_AA64PFR1_EL1
    mrs     x5, S3_0_C0_C4_4        // ID_AA64ZFR0_EL1
    mrs     x5, S3_0_C0_C4_5        // ID_AA64SMFR0_EL1
    mrs     x5, S3_0_C0_C5_0        // ID_AA64DFR0_EL1
    mrs     x5, S3_0_C0_C6_0        // ID_AA64ISAR0_EL1
    mrs     x5, S3_0_C0_C6_1        // ID_AA64ISAR1_EL1
    mrs     x5, S3_0_C0_C6_2        // ID_AA64ISAR2_EL1 (Linux 5.17+ reads it)
    mrs     x5, S3_0_C0_C7_0        // ID_AA64MMFR0_EL1
    mrs     x5, S3_0_C0_C7_1        // ID_AA64MMFR1_EL1
    mrs     x5, S3_0_C0_C7_2        // ID_AA64MMFR2_EL1
    mrs     x5, S3_0_C0_C3_7        // unallocated in the ID space: reads as zero
    expect  x20, 0                  // 1: no UNDEF
    ubfx    x7, x6, #24, #4         // 2: ID_AA64PFR1_EL1.SME is 0
    expect  x7, 0
    mrs     x5, S3_3_C15_C0_0       // 3: an IMPDEF register: exactly one UNDEF
    expect  x20, 1
    b       passed

// Synchronous exception: an UNDEF (EC 0) is counted and stepped over; anything else
// fails the test with its EC in the probe's value register.
sync:
    mrs     x21, esr_el1
    ubfx    x21, x21, #26, #6
    cbnz    x21, 1f
    add     x20, x20, #1
    mrs     x21, elr_el1
    add     x21, x21, #4
    msr     elr_el1, x21
    eret
1:  ldr     x4, =PROBE
    str     x21, [x4, #PROBE_VALUE]
    b       failed

ok_msg:
    .asciz  "selftest: sysregs ok\n"
fail_msg:
    .asciz  "selftest: sysregs FAILED\n"
    .ltorg

    .balign 2048
vectors:
    .skip   0x200
    b       sync                    // current EL with SP_ELx, synchronous
    .balign 8
_image_end:

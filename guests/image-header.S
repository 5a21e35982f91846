// The 64-byte arm64 Linux Image header (Documentation/arch/arm64/booting.rst), so
// that test programs boot through exactly the loader path a Linux kernel takes.
// Include this first; it jumps to the label `entry`.
    .text
    .globl _start
_start:
    b       entry                   // code0: branch over the header
    .long   0                       // code1
    .quad   0                       // text_offset: load at the 2 MiB-aligned base
    .quad   _image_end - _start     // image_size: what the loader must reserve
    .quad   0x0a                    // flags: little-endian, 4 KiB pages, anywhere in RAM
    .quad   0, 0, 0                 // res2..res4
    .ascii  "ARM\x64"               // magic
    .long   0                       // res5 (PE header offset; none)

// Prints the NUL-terminated string at x2 on the PL011 at x1. Clobbers w3.
puts:
    ldrb    w3, [x2], #1
    cbz     w3, 1f
    strb    w3, [x1]                // UARTDR: an MMIO write the VMM serves
    b       puts
1:  ret

// PSCI SYSTEM_OFF through the HVC conduit; never returns.
system_off:
    ldr     x0, =0x84000008
    hvc     #0
    b       .

// The first guest: print one line on the UART, then power off with PSCI.
#include "image-header.S"

entry:
    ldr     x1, =0x09000000         // PL011 base (arch_aarch64::layout::UART_BASE)
    adr     x2, message
    bl      puts
    b       system_off

message:
    .asciz  "hello from the hvrun guest\n"
    .ltorg
    .balign 8
_image_end:

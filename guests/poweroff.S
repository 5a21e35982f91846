// The smallest guest: powers off at once (PSCI SYSTEM_OFF), so that booting it measures
// only the VMM's own start and teardown (`cargo xtask compare`, against QEMU too: the
// Image header makes it bootable by any arm64 Linux loader).
#include "image-header.S"

entry:
    b       system_off

    .ltorg
    .balign 8
_image_end:

# fio-verify: fio writes random 4 KiB blocks at queue depth 32 through hvrun's virtio-blk
# with an fsync every 16 writes and reads every block back, checking its crc32c
# (guests/io/verify, guests/io/verify.fio). Then the image is checked again twice: on
# the rig host, by fio on the image file with no VMM in the way, and in a second boot.
# Last, one block is changed on purpose, and the check must fail: the proof that it
# would see a write that went wrong.
set -o pipefail
size=4M
img=/tmp/verify.img
boot() {
    /bin/hvrun --kernel /guest/vmlinuz --initrd /guest/io-initramfs.cpio --memory 512M --disk "$img,id=verify" \
        --cmdline "console=ttyAMA0 quiet -- /io/verify $1 $size" 2>&1 | tr -d '\r' | awk -v p="$2" '{ print p ": " $0; fflush() }'
    echo "$2: hvrun exit $?"
}
host_check() {
    FIO_DISK=$img FIO_ENGINE=psync FIO_DIRECT=0 FIO_SIZE=$size \
        io fio --verify_only --output-format=terse --terse-version=3 /tmp/io/io/verify.fio >/tmp/host-check.out 2>&1
}
dd if=/dev/zero of=$img bs=1M count=8 2>/dev/null
boot write boot1
if host_check; then
    echo "rig host: the image verifies ($(awk -F';' '/^3;/ { print $6 }' /tmp/host-check.out) KiB read back)"
else
    cat /tmp/host-check.out
    echo 'rig host: the image does NOT verify'
fi
boot check boot2
# On purpose: block 1000 changed, as a lost or misplaced write would leave it; the rig
# host's check must fail now. (A third boot's check fails the same way: shown once, by
# hand, as it costs as much as the second.)
printf 'changed by the scenario' | dd of=$img bs=1 seek=$((4096 * 1000 + 512)) conv=notrunc 2>/dev/null
if host_check; then
    echo 'rig host: the changed image PASSED'
else
    echo "rig host: the changed image fails: $(grep -o 'verify failed at .*' /tmp/host-check.out | head -n 1)"
fi
# The rig's /tmp is its RAM, shared with the scenarios after this one.
rm -rf /tmp/io "$img" /tmp/host-check.out

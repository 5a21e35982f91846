# kill-durability: $rounds times, boot hvrun's kernel with /t/durability-writer on a fresh
# copy of an empty ext4 image, wait for the writer's first "durable:" marker, wait a random
# 0 to 2 s more (so kills land anywhere in the write loop, mid-write included), kill -9
# hvrun, and store the image as round r of this scenario's exchange slot. The host then
# checks every round's image against the markers printed here (checks::kill_durability).
# `rounds` and `image_mb` are checks::DURABILITY_ROUNDS and DURABILITY_IMAGE_MB (a unit
# test holds them equal).
rounds=20
image_mb=8
insmod /guest/virtio_mmio.ko; insmod /guest/virtio_blk.ko
n=0; until [ -b /dev/vda ] || [ $n -ge 20 ]; do sleep 1; n=$((n+1)); done
dd if=/dev/vda of=/tmp/empty.img bs=1M skip=$E2E_SLOT_MB count=$image_mb 2>/dev/null || exit 1
now() { cut -d. -f1 /proc/uptime; }
r=0
while [ $r -lt $rounds ]; do
    cp /tmp/empty.img /tmp/round.img
    ms=$(( $(od -An -N2 -tu2 /dev/urandom) % 2001 ))
    /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M --disk /tmp/round.img \
        --cmdline 'console=ttyAMA0 quiet -- /t/durability-writer' >/tmp/out 2>&1 &
    pid=$!
    t0=$(cut -d' ' -f1 /proc/uptime)
    end=$(( $(now) + 60 ))
    until grep -q '^durable: ' /tmp/out || ! kill -0 $pid 2>/dev/null || [ $(now) -ge $end ]; do sleep 0.05; done
    seen=$(awk -v s=$t0 '{ printf "%.1f", $1 - s }' /proc/uptime)
    sleep $(( ms / 1000 )).$(printf '%03d' $(( ms % 1000 )))
    kill -9 $pid
    wait $pid
    rc=$?
    tr -d '\r' </tmp/out | awk -v r=$r '{ print "round " r ": " $0 }'
    echo "round $r: killed $ms ms after the first marker (seen ${seen} s after hvrun started); hvrun status $rc"
    dd if=/tmp/round.img of=/dev/vda bs=1M seek=$(( E2E_SLOT_MB + r * image_mb )) conv=fsync 2>/dev/null \
        && echo "round $r: image stored"
    r=$((r + 1))
done
echo "kill-durability: $rounds rounds done"

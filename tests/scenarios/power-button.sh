# power-button: SIGTERM or SIGINT to hvrun presses the guest's power button (hvrun's
# virtio-input device); the guest takes its shutdown path and hvrun exits 0. Once with
# Debian's stock kernel (the drivers as modules) and SIGTERM, once with hvrun's own kernel
# (built in) and SIGINT; then a guest that ignores the button is stopped by a second
# signal (exit 5).
now() { cut -d. -f1 /proc/uptime; }
# boot NAME KERNEL COMMAND: starts hvrun in the background, the guest's console in
# /tmp/NAME, hvrun's own messages in /tmp/NAME.err (apart: the console's line the signal
# comes after may not have its newline yet).
boot() {
    /bin/hvrun --kernel "$2" --initrd /guest/initramfs.cpio --memory 256M \
        --cmdline "console=ttyAMA0 quiet -- $3" </dev/null >/tmp/$1 2>/tmp/$1.err &
    pid=$!
}
# wait_for NAME TEXT: until TEXT is in /tmp/NAME, hvrun has gone, or 120 s.
wait_for() {
    end=$(( $(now) + 120 ))
    until grep -q "$2" /tmp/$1 || ! kill -0 $pid 2>/dev/null || [ $(now) -ge $end ]; do sleep 0.1; done
}
# finish NAME: waits for hvrun, prints its output and status.
finish() {
    wait $pid
    rc=$?
    tr -d '\r' </tmp/$1 | sed "s/^/$1: /"
    sed "s/^/$1: /" </tmp/$1.err
    echo "$1: hvrun exit $rc"
}

boot debian /guest/vmlinuz /t/power-button
wait_for debian 'waiting for the power button'
kill -TERM $pid
finish debian

boot own /guest/Image /t/power-button
wait_for own 'waiting for the power button'
kill -INT $pid
finish own

boot deaf /guest/Image 'echo deaf-guest-up; sleep 1000'
wait_for deaf deaf-guest-up
kill -TERM $pid
sleep 1
kill -TERM $pid
finish deaf

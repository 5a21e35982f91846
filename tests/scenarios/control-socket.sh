# The rig's side of the `control-socket` scenario (tests/src/scenarios/machine.rs says
# what it proves): hvrun boots its kernel with --control; the guest prints a tick every
# second on the serial port; the rig host pauses, checks the status and that no tick
# comes while paused, resumes, sends a bad command, and stops the VM, all through the
# control socket with vsock-peer's `uds-connect` (nc -U).
now() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }
# wait_in FILE PATTERN SECONDS: waits for PATTERN to show in FILE.
wait_in() {
    end=$(( $(now) + $3 ))
    until grep -q "$2" "$1" 2>/dev/null || [ $(now) -ge $end ]; do sleep 1; done
    grep -q "$2" "$1" 2>/dev/null
}
ctl() { echo "$1" | timeout 30 vsock-peer uds-connect /tmp/ctl.sock; }
ticks() { grep -c '^tick' /tmp/out; }
rm -f /tmp/ctl.sock
: >/tmp/out
(/bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M --control /tmp/ctl.sock \
  --cmdline 'console=ttyAMA0 quiet -- i=0; while true; do i=$((i+1)); echo tick $i; sleep 1; done'
 echo "hvrun exit $?") 2>&1 | tr -d '\r' >/tmp/out &
if ! wait_in /tmp/out '^tick 2' 120; then
    echo "control: FAIL: the guest did not tick"
    cat /tmp/out
    kill $(pidof hvrun) 2>/dev/null
    exit 0
fi
echo "control: pause -> $(ctl '{"command":"pause"}')"
echo "control: status -> $(ctl '{"command":"status"}')"
# A tick already on its way may land just after the pause; none after that.
sleep 1
before=$(ticks)
sleep 3
after=$(ticks)
[ "$before" = "$after" ] && echo "control: no tick while paused ($after)" || echo "control: FAIL: ticks went from $before to $after while paused"
echo "control: resume -> $(ctl '{"command":"resume"}')"
wait_in /tmp/out "^tick $((after + 1))\$" 30 && echo "control: ticks again after the resume"
echo "control: bogus -> $(ctl '{"command":"reboot"}')"
echo "control: stop -> $(ctl '{"command":"stop"}')"
wait_in /tmp/out 'hvrun exit' 30 || { echo "control: FAIL: hvrun still runs"; kill $(pidof hvrun) 2>/dev/null; }
wait
grep 'hvrun' /tmp/out
[ -e /tmp/ctl.sock ] && echo "control: FAIL: the socket file stayed" || echo "control: the socket file is gone"

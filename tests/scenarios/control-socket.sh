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
rm -f /tmp/ctl.sock /tmp/con.sock
: >/tmp/out
(RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M --control /tmp/ctl.sock \
  --console socket=/tmp/con.sock \
  --cmdline 'console=ttyAMA0 quiet -- i=0; while true; do i=$((i+1)); echo tick $i; echo hvc-tick $i >/dev/hvc0; sleep 1; done'
 echo "hvrun exit $?") 2>&1 | tr -d '\r' >/tmp/out &
if ! wait_in /tmp/out '^tick 2' 120; then
    echo "control: FAIL: the guest did not tick"
    cat /tmp/out
    kill $(pidof hvrun) 2>/dev/null
    exit 0
fi
# hvc0's socket has a client that only reads (its writing half shut at once). A second
# hvrun given either socket must refuse it, one line, before any vCPU runs, and leave
# the first one's sockets working: its check of the path (a connection that closes at
# once) must not take the console from the client, nor break the control socket.
vsock-peer uds-connect /tmp/con.sock </dev/null >/tmp/con.out 2>&1 &
reader=$!
wait_in /tmp/con.out '^hvc-tick' 30 && echo "control: the console client gets hvc0"
for flag in "--control /tmp/ctl.sock" "--console socket=/tmp/con.sock"; do
    timeout 60 /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 128M $flag \
        --cmdline 'console=ttyAMA0 quiet -- echo SECOND-GUEST-RAN' >/tmp/second.out 2>&1
    rc=$?
    lines=$(wc -l </tmp/second.out)
    if [ $rc = 1 ] && [ "$lines" = 1 ] && grep -q 'in use by another process' /tmp/second.out; then
        echo "control: a second hvrun with $flag: refused (exit 1, one line)"
    else
        echo "control: FAIL: a second hvrun with $flag: exit $rc, $lines line(s):"
        sed 's/^hvrun: error:/second hvrun said:/' /tmp/second.out
    fi
done
seen=$(grep -c '^hvc-tick' /tmp/con.out)
sleep 3
if [ "$(grep -c '^hvc-tick' /tmp/con.out)" -gt "$seen" ]; then
    echo "control: the console client still gets hvc0 after the second hvruns"
else
    echo "control: FAIL: the console client got nothing more after the second hvruns"
    kill -0 $reader 2>/dev/null && echo "control: (its reader still runs)" || echo "control: (its reader ended)"
    tail -n 5 /tmp/con.out
    grep -c '^tick' /tmp/out
    grep -i 'console' /tmp/out
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
kill $reader 2>/dev/null
wait
grep 'hvrun' /tmp/out
[ -e /tmp/ctl.sock ] && echo "control: FAIL: the socket file stayed" || echo "control: the socket file is gone"
[ -e /tmp/con.sock ] && echo "control: FAIL: the console's socket file stayed" || echo "control: the console's socket file is gone"

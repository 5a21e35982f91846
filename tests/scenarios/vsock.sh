# The rig's side of the `vsock` scenario (tests/src/scenarios/vsock.rs says what it
# proves): hvrun boots hvrun's kernel with --vsock and the guest's t/vsock-check; the rig
# host then talks to the guest's ports through vsock-peer (tests/src/bin/vsock-peer.rs).
# The host's clients never half-close: a host stream's end ends the connection both ways
# for the guest (Firecracker's rule), so the echo client (--echo) closes once its bytes
# came back, and the others once the guest ended its side.
now() { cut -d' ' -f1 /proc/uptime; }
# took T0: the seconds since T0, and 64 MiB's rate over them.
took() { awk -v s="$1" '{ d = $1 - s; if (d < 0.01) d = 0.01; printf "%.2f s (%.1f MiB/s)", d, 64 / d }' /proc/uptime; }
rss_kb() { awk '/^VmRSS/ { print $2 }' /proc/$(pidof hvrun | cut -d' ' -f1)/status 2>/dev/null; }
# wait_in FILE PATTERN SECONDS: waits for PATTERN to show in FILE.
wait_in() {
    end=$(( $(now | cut -d. -f1) + $3 ))
    until grep -q "$2" "$1" 2>/dev/null || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done
    grep -q "$2" "$1" 2>/dev/null
}
wait_file() {
    end=$(( $(now | cut -d. -f1) + $2 ))
    until [ -e "$1" ] || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done
    [ -e "$1" ]
}
fail() { echo "vsock: FAIL: $*"; }
sha() { sha256sum "$1" | cut -d' ' -f1; }
# Ends the scenario: waits (a while) for hvrun to exit, then cleans up.
finish() {
    wait_in /tmp/out 'hvrun exit' "$1" || { fail "hvrun still runs; killing it"; kill $(pidof hvrun) 2>/dev/null; }
    wait
    rm -f /tmp/vsock-* /tmp/v.sock /tmp/v.sock_6000
    exit 0
}
rm -f /tmp/vsock-* /tmp/v.sock /tmp/v.sock_6000
cat /guest/initramfs.cpio /guest/vsock-peer.cpio >/tmp/vsock-initrd.cpio || fail "building the guest's initrd"
dd if=/dev/urandom of=/tmp/vsock-to-guest bs=1M count=64 2>/dev/null
: >/tmp/out
(/bin/hvrun --kernel /guest/Image --initrd /tmp/vsock-initrd.cpio --memory 512M --vsock cid=3,socket=/tmp/v.sock \
  --cmdline 'console=ttyAMA0 quiet -- /t/vsock-check'; echo "hvrun exit $?") 2>&1 | tr -d '\r' | tee /tmp/out &
if ! wait_in /tmp/out 'vsock-check: ready' 300; then
    fail "the guest was not ready within 300 s"
    finish 1
fi

got=$(echo ping-42 | timeout 60 vsock-peer hybrid --echo /tmp/v.sock 5000)
[ "$got" = ping-42 ] && echo "vsock: echo round trip ok" || fail "the echo on port 5000 came back as '$got'"

t=$(now)
timeout 300 vsock-peer hybrid /tmp/v.sock 5001 </tmp/vsock-to-guest >/dev/null || fail "sending 64 MiB to port 5001"
echo "vsock: host sent 64 MiB to the guest in $(took $t)"
wait_in /tmp/out 'vsock-check: received sha256' 120
got=$(sed -n 's/^vsock-check: received sha256 //p' /tmp/out)
want=$(sha /tmp/vsock-to-guest)
echo "vsock: host sent sha256 $want"
[ -n "$got" ] && [ "$got" = "$want" ] && echo "vsock: host-to-guest 64 MiB intact" \
    || fail "host-to-guest: the guest received sha256 '$got'"

t=$(now)
timeout 300 vsock-peer hybrid /tmp/v.sock 5002 </dev/null >/tmp/vsock-from-guest || fail "receiving from port 5002"
echo "vsock: host received $(wc -c </tmp/vsock-from-guest) bytes from the guest in $(took $t)"
sent=$(sed -n 's/^vsock-check: sending sha256 //p' /tmp/out)
got=$(sha /tmp/vsock-from-guest)
echo "vsock: host received sha256 $got"
[ -n "$sent" ] && [ "$sent" = "$got" ] && echo "vsock: guest-to-host 64 MiB intact" \
    || fail "guest-to-host: the guest sent sha256 '$sent'"
rm -f /tmp/vsock-to-guest /tmp/vsock-from-guest

ok=0; i=0
while [ $i -lt 100 ] && [ $((i - ok)) -lt 5 ]; do
    i=$((i + 1))
    got=$(echo "ping-$i" | timeout 20 vsock-peer hybrid --echo /tmp/v.sock 5000 2>>/tmp/vsock-conns.err)
    [ "$got" = "ping-$i" ] && ok=$((ok + 1))
done
echo "vsock: $ok of 100 connections echoed"
[ $ok -eq 100 ] || { fail "$((i - ok)) of $i connections failed"; grep -v '^vsock-peer: OK' /tmp/vsock-conns.err | tail -5; }

timeout 120 vsock-peer hybrid-hold /tmp/v.sock 5003 2>/tmp/vsock-hold.err &
hold=$!
if wait_in /tmp/vsock-hold.err '^vsock-peer: OK ' 30; then
    before=$(rss_kb); sleep 10; after=$(rss_kb)
    before=${before:-0}; after=${after:-0}
    echo "vsock: hvrun RSS with a client that does not read: $((before / 1024)) MiB, 10 s later: $((after / 1024)) MiB"
    [ $before -gt 0 ] && [ $((after - before)) -lt 8192 ] && echo "vsock: RSS stayed bounded" \
        || fail "hvrun's RSS grew by $(( (after - before) / 1024 )) MiB in 10 s"
else
    fail "the connection to port 5003 was not accepted: $(cat /tmp/vsock-hold.err)"
fi
kill $hold 2>/dev/null

timeout 120 vsock-peer uds-listen --ready /tmp/vsock-ready-6000 /tmp/v.sock_6000 </dev/null >/tmp/vsock-from-6000 &
listener=$!
wait_file /tmp/vsock-ready-6000 30 || fail "vsock-peer is not listening on /tmp/v.sock_6000"
timeout 60 vsock-peer hybrid /tmp/v.sock 5004 </dev/null >/dev/null || fail "signalling the guest on port 5004"
wait $listener || fail "the listener on /tmp/v.sock_6000 ended with an error"
said=$(cat /tmp/vsock-from-6000)
[ "$said" = hello-from-guest ] && echo "vsock: the guest's connection to port 6000 said hello-from-guest" \
    || fail "the guest's connection to port 6000 said '$said'"

timeout 30 vsock-peer hybrid /tmp/v.sock 7777 </dev/null >/dev/null 2>/tmp/vsock-refused.err
rc=$?
cat /tmp/vsock-refused.err
[ $rc -eq 3 ] && echo "vsock: a connect to a closed port was refused" || fail "a CONNECT to port 7777 ended with status $rc"

timeout 60 vsock-peer hybrid /tmp/v.sock 5009 </dev/null >/dev/null || fail "telling the guest we are done (port 5009)"
finish 120

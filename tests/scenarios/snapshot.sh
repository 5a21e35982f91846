# The rig's side of the `snapshot` scenario (tests/src/scenarios/machine.rs says what it
# proves). A guest with 2 vCPUs counts every 100 ms (guests/initramfs/t/snapshot-loop)
# to the serial port, its disk and a TCP connection to this host. Through the control
# socket the rig host snapshots it, then kills hvrun with SIGKILL, and continues the
# snapshot twice, one clone after the other: the first on the same disk and tap, the
# second on a copy of the disk taken at the snapshot. hvrun's log goes to OUT.log, apart
# from the guest's serial output in OUT: a log line written between two pieces of a guest
# line would cut it in two.
now() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }
# whole FILE: FILE without an unfinished last line (one the guest is still writing, or
# was writing when it was paused); nothing for a FILE not there yet.
whole() { [ -e "$1" ] || return 0; if [ -n "$(tail -c 1 "$1")" ]; then sed '$d' "$1"; else cat "$1"; fi; }
# wait_in FILE PATTERN SECONDS: waits for PATTERN to show on a whole line of FILE.
wait_in() {
    end=$(( $(now) + $3 ))
    until whole "$1" | grep -q "$2" || [ $(now) -ge $end ]; do sleep 1; done
    whole "$1" | grep -q "$2"
}
ctl() { echo "$2" | timeout 120 vsock-peer uds-connect "$1"; }
counts() { whole "$1" | sed -n 's/^count \([0-9]*\)$/\1/p'; }
fail() { echo "snapshot: FAIL: $*"; for f in /tmp/out*; do echo "== $f"; grep -v '^rcu' "$f" | tail -60; done; kill -9 $(pidof hvrun) 2>/dev/null; exit 0; }
ip link set lo up; insmod /guest/tun.ko 2>/dev/null
tunctl -t tap0 >/dev/null && ip link set tap0 up && ip addr add 10.0.2.1/24 dev tap0
rm -f /tmp/hold; mkfifo /tmp/hold
nc -l -p 5010 <>/tmp/hold >/tmp/tcp.log &
dd if=/dev/zero of=/tmp/disk.img bs=1M count=4 2>/dev/null
rm -rf /tmp/snap
(RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --cpus 2 --memory 256M --disk /tmp/disk.img \
  --net tap=tap0 --control /tmp/ctl0.sock --cmdline 'console=ttyAMA0 quiet -- /t/snapshot-loop 10.0.2' 2>/tmp/out0.log
 echo "hvrun exit $?") | tr -d '\r' >/tmp/out0 &
wait_in /tmp/out0 '^count 30$' 240 || fail "the guest did not count to 30"
echo "snapshot: $(grep -o 'booting on .*' /tmp/out0.log)"
echo "snapshot: $(ctl /tmp/ctl0.sock '{"command":"snapshot","dir":"/tmp/snap"}')"
c=$(counts /tmp/out0 | tail -1)
sleep 2
[ "$(counts /tmp/out0 | tail -1)" = "$c" ] && echo "snapshot: left paused at count $c" || fail "the guest counted on after the snapshot"
kill -9 $(pidof hvrun)
wait_in /tmp/out0 'hvrun exit' 30 || fail "hvrun did not die"
echo "snapshot: files: $(ls -s /tmp/snap | tr '\n' ' ')"
cp /tmp/disk.img /tmp/disk2.img
# The pause may have come while the guest was half-way through a line: a restored guest
# writes the rest of it first. Each clone's output starts with the part written before.
part=$(tail -n 1 /tmp/out0 | sed 's/hvrun exit.*//')

# restore OUT CTL ARGS...: continues the snapshot; prints how long until its first count.
restore() {
    out=$1; sock=$2; shift 2
    t=$(cut -d' ' -f1 /proc/uptime)
    printf '%s' "$part" >"$out"
    (RUST_LOG=info /bin/hvrun --restore /tmp/snap --control "$sock" "$@" 2>"$out.log"; echo "hvrun exit $?") | tr -d '\r' >>"$out" &
    wait_in "$out" "^count $((c + 1))\$" 60 || { ctl "$sock" '{"command":"stop"}'; sleep 5; fail "$out: no count $((c + 1)) after the restore"; }
    echo "$out: first count $(awk -v s="$t" '{ print $1 - s }' /proc/uptime) s after hvrun started"
    first=$(counts "$out" | head -1)
    [ "$first" = $((c + 1)) ] && echo "$out: continues at count $first" || fail "$out: went on at count $first, not $((c + 1))"
    wait_in "$out" "^dmesg checked at count $(( (c / 20 + 2) * 20 ))\$" 120 || fail "$out: no dmesg check after the restore"
    echo "$out: dmesg checked after the restore"
}
restore /tmp/out1 /tmp/ctl1.sock
wait_in /tmp/tcp.log "^count $((c + 25))\$" 60 && echo "clone 1: the guest's TCP connection carries count $((c + 25))"
echo "clone 1: stop -> $(ctl /tmp/ctl1.sock '{"command":"stop"}')"
wait_in /tmp/out1 'hvrun exit' 30 || fail "clone 1 still runs"
n=$(head -c 32 /tmp/disk.img | sed -n 's/^count \([0-9]*\).*/\1/p')
[ -n "$n" ] && [ "$n" -gt "$((c + 20))" ] && echo "clone 1: its disk holds count $n" || fail "clone 1's disk holds '$n'"
n=$(head -c 32 /tmp/disk2.img | sed -n 's/^count \([0-9]*\).*/\1/p')
[ "$n" = "$c" ] || [ "$n" = "$((c - 1))" ] && echo "snapshot: the disk copy holds count $n" || fail "the disk at the snapshot holds '$n', the count was $c"

restore /tmp/out2 /tmp/ctl2.sock --disk /tmp/disk2.img
echo "clone 2: stop -> $(ctl /tmp/ctl2.sock '{"command":"stop"}')"
wait_in /tmp/out2 'hvrun exit' 30 || fail "clone 2 still runs"
# The same snapshot with a disk that is not its own is refused in one line.
dd if=/dev/urandom of=/tmp/disk2.img bs=1k count=1 conv=notrunc 2>/dev/null
/bin/hvrun --restore /tmp/snap --disk /tmp/disk2.img 2>&1 | sed 's/^/wrong disk: /'
grep -hiE 'DMESG-BAD|stall|panic|hvrun exit|hvrun: error' /tmp/out0 /tmp/out1 /tmp/out2 /tmp/out*.log

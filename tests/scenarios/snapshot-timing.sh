# The rig's side of the `snapshot-timing` scenario (tests/src/scenarios/machine.rs says
# what it proves): for a 256 MiB and a 2 GiB guest with 2 vCPUs, how long hvrun takes
# from its start to a running guest: a cold boot to the guest's init (the boot-timer
# line), 3 times, then a restore of a snapshot of the same guest to its vCPUs' first
# entry (the start timeline line), 10 times, each run timed by the rig's `timeline` tool
# after the caches are dropped. Prints min/median/max of each and the ratios.
now() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }
wait_in() {
    end=$(( $(now) + $3 ))
    until grep -q "$2" "$1" 2>/dev/null || [ $(now) -ge $end ]; do sleep 1; done
    grep -q "$2" "$1" 2>/dev/null
}
ctl() { echo "$2" | timeout 120 vsock-peer uds-connect "$1"; }
fail() { echo "timing: FAIL: $*"; tail -20 /tmp/t.out; kill -9 $(pidof hvrun) 2>/dev/null; exit 0; }
drop() { sync; echo 3 >/proc/sys/vm/drop_caches; }
# ms TAG PATTERN FILE: the milliseconds at which the first line matching PATTERN came.
ms() { sed -n "s/^TIMELINE $1 +\([0-9.]*\) [a-z]* .*$2.*/\1/p" "$3" | head -1; }
# stats: min median max of the numbers on standard input.
stats() { sort -n | awk '{ v[NR] = $1 } END { printf "min %.1f median %.1f max %.1f", v[1], v[int((NR + 1) / 2)], v[NR] }'; }
median() { sort -n | awk '{ v[NR] = $1 } END { print v[int((NR + 1) / 2)] }'; }
loop='console=ttyAMA0 quiet -- i=0; while :; do i=$((i + 1)); echo count $i; sleep 0.1; done'
for size in 256M 2G; do
    : >/tmp/cold.$size; : >/tmp/restore.$size
    for n in 1 2 3; do
        drop
        timeline cold env RUST_LOG=info /bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --cpus 2 \
            --memory $size --gic v2 --cmdline 'console=ttyAMA0 quiet -- true' </dev/null >/tmp/t.out 2>&1
        t=$(ms cold 'guest boot-timer' /tmp/t.out)
        [ -n "$t" ] && echo "$t" >>/tmp/cold.$size || fail "$size cold boot $n: no boot-timer line"
    done
    rm -rf /tmp/snap.$size
    (/bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --cpus 2 --memory $size --gic v2 \
        --control /tmp/c.sock --cmdline "$loop" </dev/null >/tmp/t.out 2>&1; echo "hvrun exit $?" >>/tmp/t.out) &
    wait_in /tmp/t.out '^count 10' 240 || fail "$size: the guest did not count"
    [ "$(ctl /tmp/c.sock "{\"command\":\"snapshot\",\"dir\":\"/tmp/snap.$size\"}")" = '{"ok":true}' ] || fail "$size: snapshot"
    ctl /tmp/c.sock '{"command":"stop"}' >/dev/null; wait
    echo "timing: $size snapshot: $(du -k /tmp/snap.$size/memory | cut -f1) KiB of memory file on disk (of $(ls -l /tmp/snap.$size/memory | awk '{ print $5 }') bytes)"
    for n in 1 2 3 4 5 6 7 8 9 10; do
        drop
        (timeline restore env RUST_LOG=info /bin/hvrun --restore /tmp/snap.$size --control /tmp/r.sock </dev/null >/tmp/t.out 2>&1) &
        wait_in /tmp/t.out 'count' 60 || fail "$size restore $n: the guest did not go on"
        t=$(ms restore 'start timeline' /tmp/t.out)
        ctl /tmp/r.sock '{"command":"stop"}' >/dev/null; wait
        [ -n "$t" ] && echo "$t" >>/tmp/restore.$size || fail "$size restore $n: no start timeline line"
    done
    echo "timing: $size cold boot to init (ms, 3 runs): $(stats </tmp/cold.$size)"
    echo "timing: $size restore to the guest running (ms, 10 runs): $(stats </tmp/restore.$size)"
    rm -rf /tmp/snap.$size
done
r=$(median </tmp/restore.256M); c=$(median </tmp/cold.256M); r2=$(median </tmp/restore.2G); c2=$(median </tmp/cold.2G)
echo "timing: restore/cold boot (medians): 256M $(awk -v a=$r -v b=$c 'BEGIN { printf "%.3f", a / b }'), 2G $(awk -v a=$r2 -v b=$c2 'BEGIN { printf "%.3f", a / b }')"
echo "timing: 2G restore / 256M restore (medians): $(awk -v a=$r2 -v b=$r 'BEGIN { printf "%.2f", a / b }')"

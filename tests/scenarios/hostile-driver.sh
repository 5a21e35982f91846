# hostile-driver: a hostile virtio driver (guests/tools/virtio-attack.c) inside a guest of
# Debian's stock kernel attacks every queue of every device hvrun has: a disk, a network
# interface on a tap, virtio-rng and a console to a file. hvrun must not hang (the guest
# powers off and hvrun exits 0 in time), must keep serving (every device works after each
# attack and a reset), and must not bloat: its peak resident memory beyond guest RAM,
# sampled here from /proc/PID/status and /proc/PID/smaps when the program says the attacks
# start and when it says they are done, may grow by at most $BOUND_KB.
#
# The notify storm: at most STORM QueueNotify writes per device, in at most STORM_SECS
# for all four devices (see the "notify storm" lines for what the rig managed). Every
# write traps to hvrun, which under the rig's nested emulation is slow: measured 0.3 ms
# (virtio-rng, served on the vCPU) to 3.6 ms (the console, whose worker thread wakes for
# each) per write, several times more when the 2-core host is busy; a million writes
# would take 5 to 60 minutes. So the storm is bounded by time, and the program shortens
# it if the attacks before it were slow (--deadline, seconds after the program starts).
STORM=1000000
STORM_SECS=60
BOUND_KB=8192
now() { cut -d. -f1 /proc/uptime; }
insmod /guest/tun.ko 2>/dev/null
tunctl -t tap5 >/dev/null
# No IPv6 on the tap, so the only frames the guest receives are the answers to its ARP
# requests (the attacks on the receive queue need input, and get it that way).
echo 1 >/proc/sys/net/ipv6/conf/tap5/disable_ipv6
ip link set tap5 up && ip addr add 10.0.5.1/24 dev tap5
dd if=/dev/zero of=/tmp/disk.img bs=1M count=0 seek=32 2>/dev/null
/bin/hvrun --kernel /guest/vmlinuz --initrd /guest/initramfs.cpio --memory 256M \
    --disk /tmp/disk.img,id=hostile-disk --net tap=tap5 --console file=/tmp/hvc.log \
    --cmdline "console=ttyAMA0 quiet iomem=relaxed -- /bin/virtio-attack --storm $STORM --storm-secs $STORM_SECS --deadline 170 --arp-target 10.0.5.1" \
    >/tmp/out 2>/tmp/err &
pid=$!
start=$(now)
echo "rig: hvrun started"

# hvrun's threads: name, state (R running, S sleeping, D uninterruptible), CPU ticks used.
# (A thread may end while this looks: it is left out.)
threads() {
    for t in /proc/$pid/task/*; do
        name=$(cat $t/comm 2>/dev/null) && stat=$(sed 's/.*) //' $t/stat 2>/dev/null) || continue
        echo "$name $(echo "$stat" | awk '{ print $1, $12 + $13 }')"
    done | awk '{ printf "%s%s %s %s", n++ ? ", " : "", $1, $2, $3 }'
}

# hvrun's output, as far as this script reads it: the first MiB of the guest's serial
# port (stdout) and of hvrun's log (stderr). They are kept apart: the serial port's bytes
# reach stdout in whatever pieces its output thread takes, so a log line written between
# two of them would cut a guest line in two. hvrun rate-limits what a guest can make it
# log, so the whole run writes far less (about 100 KB); a flood of output is a failure
# of its own, and must not make this script slow.
out() { head -c 1048576 /tmp/out | tr -d '\r'; }
err() { head -c 1048576 /tmp/err | tr -d '\r'; }
bytes() { cat /tmp/out /tmp/err | wc -c; }
# Waits (at most $2 s) for a line of the guest's output to contain $1, while hvrun runs.
# Says every 30 s how long it has waited, and what hvrun's threads are doing.
wait_for() {
    end=$(( $(now) + $2 )); next=$(( $(now) + 30 ))
    until out | grep -q "$1" || ! kill -0 $pid 2>/dev/null || [ $(now) -ge $end ]; do
        sleep 1
        if [ $(now) -ge $next ]; then
            next=$(( $(now) + 30 ))
            echo "rig: +$(( $(now) - start )) s, waiting for '$1'; output $(bytes) bytes;" \
                "$(awk '/^VmHWM:/ { print $1, $2, $3 }' /proc/$pid/status); hvrun threads: $(threads)"
        fi
    done
    out | grep -q "$1"
}
# hvrun's memory: the three figures of /proc/PID/status, and the resident part of its
# largest mapping, guest RAM (from smaps). "Beyond guest RAM" is VmHWM (peak) minus that.
sample() {
    status=$(awk '/^(VmHWM|VmRSS|RssAnon):/ { printf "%s %s kB, ", $1, $2 }' /proc/$pid/status)
    hwm=$(awk '/^VmHWM:/ { print $2 }' /proc/$pid/status)
    rss=$(awk '/^VmRSS:/ { print $2 }' /proc/$pid/status)
    guest=$(timeout 10 awk '/^Size:/ { s = $2 } /^Rss:/ { if (s > max) { max = s; r = $2 } } END { print r + 0 }' /proc/$pid/smaps)
    line="${status}guest RAM resident $guest kB: peak beyond guest RAM $((hwm - guest)) kB, now $((rss - guest)) kB"
}
before=""; after=""
# The program sleeps 3 s after each of these lines: the samples fall in those pauses.
if wait_for 'virtio-attack: attack starts' 120; then
    seen_start=$(( $(now) - start ))
    sleep 1; sample; before=$line; b=$((hwm - guest))
    echo "rig: the attacks started after $seen_start s"
fi
if wait_for 'virtio-attack: attacks done' $(( 210 - ($(now) - start) )); then
    seen_done=$(( $(now) - start ))
    sleep 1; sample; after=$line; a=$((hwm - guest))
    echo "rig: the attacks were done after $seen_done s"
fi
# Then the guest powers off by itself. A hung hvrun is shown (its last lines, its threads)
# and killed, which fails the scenario; all of this stays within the scenario's time.
end=$(( $(now) + 10 ))
while kill -0 $pid 2>/dev/null && [ $(now) -lt $end ]; do sleep 1; done
if kill -0 $pid 2>/dev/null; then
    echo "HVRUN STILL RUNNING after $(( $(now) - start )) s; its last lines:"
    tail -c 2000 /tmp/out | tr -d '\r' | tail -5
    echo "hvrun's last log lines:"
    tail -c 2000 /tmp/err | tr -d '\r' | tail -5
    echo "hvrun threads: $(threads)"
    sleep 5
    echo "hvrun threads 5 s later: $(threads)"
    kill -9 $pid
    end=$(( $(now) + 10 ))
    while kill -0 $pid 2>/dev/null && [ $(now) -lt $end ]; do sleep 1; done
fi
if kill -0 $pid 2>/dev/null; then rc="unkillable"; else wait $pid; rc=$?; fi

# hvrun's output: the program's lines; hvrun's (rate-limited) warnings are counted by
# kind (numbers collapsed to N), not shown one by one; anything else hvrun wrote to its
# log (an error, a panic) is shown as it is.
size=$(bytes)
[ $size -gt 1048576 ] && echo "HVRUN OUTPUT FLOODED: $size bytes; from its first MiB:"
log='^\[[^]]* (WARN|ERROR) *\]'
out | head -300
err | grep -Ev "$log" | head -20
echo "hvrun log lines: $(err | grep -Ec "$log"), by kind:"
err | grep -E "$log" | sed -e 's/^\[[^ ]* //' -E -e 's/0x[0-9a-f]+|[0-9]+/N/g' | sort | uniq -c | sort -rn | head -60
echo "console file: $(grep -c 'console check' /tmp/hvc.log) check lines, $(grep -c 'in flight' /tmp/hvc.log) in-flight lines"
echo "memory at attack start (+${seen_start:-?} s): ${before:-NOT SAMPLED}"
echo "memory at attacks done (+${seen_done:-?} s): ${after:-NOT SAMPLED}"
if [ -n "$before" ] && [ -n "$after" ]; then
    growth=$((a - b))
    echo "peak beyond guest RAM grew by $growth kB (bound $BOUND_KB kB)"
    [ $growth -le $BOUND_KB ] && echo "memory bound held"
fi
echo "hvrun exit $rc after $(( $(now) - start )) s"

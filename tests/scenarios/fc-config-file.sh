# fc-config-file: `hvrun --config-file FILE --no-api`, Firecracker's JSON configuration
# as flintlock and the SDKs start it, with no API socket: the guest of fc-api (2 vCPUs
# counting to its serial port, its disk and a TCP connection, waiting for its power
# button) boots from the file's boot-source (the getting-started guide's aarch64
# boot_args), machine-config, a root drive, network-interfaces (a tap and its MAC),
# entropy and metrics; the guest prints its /proc/cmdline (console=ttyAMA0, root=/dev/vda,
# rw) and its MAC; SIGTERM presses its power button and hvrun exits 0. A second, short
# boot of the same file with --api-sock beside it: FlushMetrics writes a metrics line,
# checked for the vCPUs' exits (the totals and each vCPU's in `vcpus`), the devices'
# interrupts, and the disk's, the network's and the entropy device's requests, bytes and
# errors. Then a file hvrun cannot use (a machine-config without mem_size_mib) is one
# line on standard error and exit status 1, with --no-api.
now() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }
wait_in() {
    end=$(( $(now) + $3 ))
    until tr -d '\r' <"$1" 2>/dev/null | grep -q "$2" || [ $(now) -ge $end ]; do sleep 1; done
    tr -d '\r' <"$1" 2>/dev/null | grep -q "$2"
}
alive() { [ -e /proc/$1/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$1/status; }
# stop PID: SIGTERM, then up to 60 s for hvrun to exit; prints its exit status.
stop() {
    kill -TERM $1
    end=$(( $(now) + 60 ))
    while alive $1 && [ $(now) -lt $end ]; do sleep 1; done
    if alive $1; then
        echo "fc-config-file: FAIL: hvrun still runs 60 s after SIGTERM"; kill -9 $1
    fi
    wait $1
}
ip link set lo up; insmod /guest/tun.ko 2>/dev/null
tunctl -t tap7 >/dev/null && ip link set tap7 up && ip addr add 10.0.7.1/24 dev tap7
rm -f /tmp/cf-hold; mkfifo /tmp/cf-hold
nc -l -p 5010 <>/tmp/cf-hold >/tmp/cf-tcp.log &
tcp=$!
dd if=/dev/zero of=/tmp/cf-disk.img bs=1M count=4 2>/dev/null
# The guest reads 64 bytes of the entropy device before it counts.
cat >/tmp/vm.json <<'JSON'
{
  "boot-source": {
    "kernel_image_path": "/guest/Image",
    "initrd_path": "/guest/initramfs.cpio",
    "boot_args": "keep_bootcon console=ttyS0 reboot=k panic=1 quiet -- echo cmdline: $(cat /proc/cmdline); echo mac: $(cat /sys/class/net/eth0/address); head -c 64 /dev/hwrng >/dev/null; /t/snapshot-loop 10.0.7 & /t/power-button"
  },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256, "smt": false },
  "drives": [
    { "drive_id": "rootfs", "path_on_host": "/tmp/cf-disk.img", "is_root_device": true, "is_read_only": false }
  ],
  "network-interfaces": [
    { "iface_id": "eth0", "guest_mac": "06:00:0a:00:07:0f", "host_dev_name": "tap7" }
  ],
  "entropy": {},
  "metrics": { "metrics_path": "/tmp/cf-metrics.json" }
}
JSON
: >/tmp/cf-metrics.json
/bin/hvrun --config-file /tmp/vm.json --no-api </dev/null >/tmp/cf.out 2>/tmp/cf.err &
pid=$!
if wait_in /tmp/cf.out '^count 20$' 240; then
    echo "fc-config-file: the guest counts (count 20)"
else
    echo "fc-config-file: FAIL: no count 20"; tr -d '\r' </tmp/cf.out | tail -20; tail -20 /tmp/cf.err
fi
wait_in /tmp/cf.out 'waiting for the power button' 30 && echo "fc-config-file: the guest waits for its power button"
grep -q 'count' /tmp/cf-tcp.log && echo "fc-config-file: counts arrive over TCP"
cmdline=$(tr -d '\r' </tmp/cf.out | sed -n 's/^cmdline: //p' | head -n 1)
echo "fc-config-file: the guest's /proc/cmdline: $cmdline"
has() { case " $cmdline " in *" $1 "*) ;; *) return 1 ;; esac; }
has console=ttyAMA0 && has root=/dev/vda && has rw && ! has console=ttyS0 \
    && echo "fc-config-file: the guest's command line has console=ttyAMA0 (not ttyS0), root=/dev/vda and rw"
echo "fc-config-file: the guest's MAC: $(tr -d '\r' </tmp/cf.out | sed -n 's/^mac: //p' | head -n 1) (its eth0), $(awk '$1 == "10.0.7.15" { print $4 }' /proc/net/arp) (the host's ARP table)"
[ -e /tmp/cf.sock ] && echo "fc-config-file: FAIL: an API socket with --no-api"
stop $pid
echo "fc-config-file: after SIGTERM hvrun exit $?"
tr -d '\r' </tmp/cf.out | grep -E '^power-button:'

# The same file with an API socket beside it, for FlushMetrics; a new listener for the
# guest's TCP connection (nc took one and ended with it).
kill $tcp 2>/dev/null
nc -l -p 5010 <>/tmp/cf-hold >/tmp/cf-tcp.log &
tcp=$!
: >/tmp/cf-metrics.json
/bin/hvrun --config-file /tmp/vm.json --api-sock /tmp/cf.sock </dev/null >/tmp/cf2.out 2>/tmp/cf2.err &
pid=$!
wait_in /tmp/cf2.out '^count 20$' 240 \
    || { echo "fc-config-file: FAIL: no count 20 with --api-sock"; tr -d '\r' </tmp/cf2.out | tail -20; tail -20 /tmp/cf2.err; }
code=$(curl -s --unix-socket /tmp/cf.sock -o /tmp/cf-body -w '%{http_code}' -X PUT http://localhost/actions \
    -H 'Content-Type: application/json' -d '{"action_type": "FlushMetrics"}')
echo "fc-config-file: with --api-sock: PUT /actions FlushMetrics -> $code"
# The counters of the last line: the vCPUs' exits, the disk's and the network's interrupts.
metric() { tail -n 1 /tmp/cf-metrics.json | grep -o "\"$1\":{[^}]*}" | grep -o "\"$2\":[0-9]*" | head -n 1 | cut -d: -f2; }
echo "fc-config-file: metrics line: $(wc -l </tmp/cf-metrics.json) line(s); vcpu exit_mmio_write $(metric vcpu exit_mmio_write), block0 interrupts $(metric block0 interrupts), net0 interrupts $(metric net0 interrupts), uart tx_bytes $(metric uart tx_bytes)"
[ "$(metric vcpu exit_mmio_write)" -gt 0 ] && [ "$(metric block0 interrupts)" -gt 0 ] && [ "$(metric net0 interrupts)" -gt 0 ] \
    && echo "fc-config-file: the metrics count the guest's work"
# Each device's own counters: the disk's requests and the bytes the guest wrote to it,
# the frames and bytes the guest sent and received, the entropy it was given.
echo "fc-config-file: block0 requests $(metric block0 requests), tx_bytes $(metric block0 tx_bytes), rx_bytes $(metric block0 rx_bytes), errors $(metric block0 errors); net0 requests $(metric net0 requests), tx_bytes $(metric net0 tx_bytes), rx_bytes $(metric net0 rx_bytes), errors $(metric net0 errors)"
[ "$(metric block0 requests)" -gt 0 ] && [ "$(metric block0 tx_bytes)" -gt 0 ] && [ "$(metric block0 errors)" -eq 0 ] \
    && [ "$(metric net0 tx_bytes)" -gt 0 ] && [ "$(metric net0 rx_bytes)" -gt 0 ] \
    && echo "fc-config-file: the metrics count each device's requests and bytes"
echo "fc-config-file: entropy0 activations $(metric entropy0 activations), interrupts $(metric entropy0 interrupts), requests $(metric entropy0 requests), rx_bytes $(metric entropy0 rx_bytes), tx_bytes $(metric entropy0 tx_bytes), errors $(metric entropy0 errors)"
[ "$(metric entropy0 activations)" -eq 1 ] && [ "$(metric entropy0 requests)" -gt 0 ] && [ "$(metric entropy0 interrupts)" -gt 0 ] \
    && [ "$(metric entropy0 rx_bytes)" -ge 64 ] && [ "$(metric entropy0 tx_bytes)" -eq 0 ] && [ "$(metric entropy0 errors)" -eq 0 ] \
    && echo "fc-config-file: the metrics count the entropy the guest read"
# Each vCPU's exits (`vcpus`, in vCPU order): one entry per vCPU, each with exits of
# its own, adding up to the `vcpu` totals.
vcpus=$(tail -n 1 /tmp/cf-metrics.json | grep -o '"vcpus":\[[^]]*\]' | grep -o '{[^}]*}')
vsum() { echo "$vcpus" | grep -o "\"$1\":[0-9]*" | cut -d: -f2 | awk '{ s += $1 } END { print s + 0 }'; }
echo "fc-config-file: vcpus: $(echo "$vcpus" | wc -l) entries; exit_mmio_write $(echo "$vcpus" | grep -o '"exit_mmio_write":[0-9]*' | cut -d: -f2 | tr '\n' ' ')(sum $(vsum exit_mmio_write)); exit_mmio_read sum $(vsum exit_mmio_read), vcpu total $(metric vcpu exit_mmio_read)"
busy=$(echo "$vcpus" | while read -r v; do
    echo "$v" | grep -o '"exit_[a-z_]*":[0-9]*' | cut -d: -f2 | awk '{ s += $1 } END { if (s > 0) print "busy" }'
done | grep -c busy)
[ "$(echo "$vcpus" | wc -l)" -eq 2 ] && [ "$busy" -eq 2 ] \
    && [ "$(vsum exit_mmio_write)" -eq "$(metric vcpu exit_mmio_write)" ] && [ "$(vsum exit_mmio_read)" -eq "$(metric vcpu exit_mmio_read)" ] \
    && echo "fc-config-file: the metrics count each vCPU's exits (vcpus: 2 entries, adding up to the totals)"
stop $pid
echo "fc-config-file: with --api-sock: after SIGTERM hvrun exit $?"
kill $tcp 2>/dev/null

echo '{"boot-source": {"kernel_image_path": "/guest/Image"}, "machine-config": {"vcpu_count": 2}}' >/tmp/bad.json
/bin/hvrun --config-file /tmp/bad.json --no-api </dev/null >/tmp/bad.out 2>/tmp/bad.err
rc=$?
echo "fc-config-file: an invalid file: exit $rc, $(wc -l </tmp/bad.err) line(s): $(cat /tmp/bad.err)"
/bin/hvrun --config-file /tmp/nonexistent.json </dev/null >/tmp/bad.out 2>/tmp/bad.err
echo "fc-config-file: a missing file: exit $?, $(wc -l </tmp/bad.err) line(s): $(cat /tmp/bad.err)"
rm -f /tmp/cf-disk.img /tmp/cf-hold

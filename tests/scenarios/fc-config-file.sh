# fc-config-file: `hvrun --config-file FILE`, Firecracker's JSON configuration as
# flintlock and the SDKs start it: the guest of fc-api (2 vCPUs counting to its serial
# port, its disk and a TCP connection, waiting for its power button) boots from the
# file's boot-source, machine-config, drives, network-interfaces and metrics; with
# --api-sock beside it, FlushMetrics writes a metrics line (checked for the vCPUs'
# exits, the devices' interrupts, and the disk's and the network's requests and bytes); SIGTERM presses the power button and hvrun exits
# 0. Then a file hvrun cannot use (a machine-config without mem_size_mib) is one line on
# standard error and exit status 1, with --no-api.
now() { cut -d' ' -f1 /proc/uptime | cut -d. -f1; }
wait_in() {
    end=$(( $(now) + $3 ))
    until tr -d '\r' <"$1" 2>/dev/null | grep -q "$2" || [ $(now) -ge $end ]; do sleep 1; done
    tr -d '\r' <"$1" 2>/dev/null | grep -q "$2"
}
ip link set lo up; insmod /guest/tun.ko 2>/dev/null
tunctl -t tap7 >/dev/null && ip link set tap7 up && ip addr add 10.0.7.1/24 dev tap7
rm -f /tmp/cf-hold; mkfifo /tmp/cf-hold
nc -l -p 5010 <>/tmp/cf-hold >/tmp/cf-tcp.log &
tcp=$!
dd if=/dev/zero of=/tmp/cf-disk.img bs=1M count=4 2>/dev/null
cat >/tmp/vm.json <<'JSON'
{
  "boot-source": {
    "kernel_image_path": "/guest/Image",
    "initrd_path": "/guest/initramfs.cpio",
    "boot_args": "console=ttyS0 quiet -- /t/snapshot-loop 10.0.7 & /t/power-button"
  },
  "machine-config": { "vcpu_count": 2, "mem_size_mib": 256, "smt": false },
  "drives": [
    { "drive_id": "data", "path_on_host": "/tmp/cf-disk.img", "is_root_device": false, "is_read_only": false }
  ],
  "network-interfaces": [
    { "iface_id": "eth0", "guest_mac": "06:00:0a:00:07:0f", "host_dev_name": "tap7" }
  ],
  "entropy": {},
  "metrics": { "metrics_path": "/tmp/cf-metrics.json" }
}
JSON
: >/tmp/cf-metrics.json
/bin/hvrun --config-file /tmp/vm.json --api-sock /tmp/cf.sock </dev/null >/tmp/cf.out 2>/tmp/cf.err &
pid=$!
if wait_in /tmp/cf.out '^count 20$' 240; then
    echo "fc-config-file: the guest counts (count 20)"
else
    echo "fc-config-file: FAIL: no count 20"; tr -d '\r' </tmp/cf.out | tail -20; tail -20 /tmp/cf.err
fi
wait_in /tmp/cf.out 'waiting for the power button' 30 && echo "fc-config-file: the guest waits for its power button"
grep -q 'count' /tmp/cf-tcp.log && echo "fc-config-file: counts arrive over TCP"
echo "fc-config-file: the guest's MAC (the host's ARP table): $(awk '$1 == "10.0.7.15" { print $4 }' /proc/net/arp)"
code=$(curl -s --unix-socket /tmp/cf.sock -o /tmp/cf-body -w '%{http_code}' -X PUT http://localhost/actions \
    -H 'Content-Type: application/json' -d '{"action_type": "FlushMetrics"}')
echo "fc-config-file: PUT /actions FlushMetrics -> $code"
# The counters of the last line: the vCPUs' exits, the disk's and the network's interrupts.
metric() { tail -n 1 /tmp/cf-metrics.json | grep -o "\"$1\":{[^}]*}" | grep -o "\"$2\":[0-9]*" | head -n 1 | cut -d: -f2; }
echo "fc-config-file: metrics line: $(wc -l </tmp/cf-metrics.json) line(s); vcpu exit_mmio_write $(metric vcpu exit_mmio_write), block0 interrupts $(metric block0 interrupts), net0 interrupts $(metric net0 interrupts), uart tx_bytes $(metric uart tx_bytes)"
[ "$(metric vcpu exit_mmio_write)" -gt 0 ] && [ "$(metric block0 interrupts)" -gt 0 ] && [ "$(metric net0 interrupts)" -gt 0 ] \
    && echo "fc-config-file: the metrics count the guest's work"
# Each device's own counters: the disk's requests and the bytes the guest wrote to it,
# the frames and bytes the guest sent and received.
echo "fc-config-file: block0 requests $(metric block0 requests), tx_bytes $(metric block0 tx_bytes), rx_bytes $(metric block0 rx_bytes), errors $(metric block0 errors); net0 requests $(metric net0 requests), tx_bytes $(metric net0 tx_bytes), rx_bytes $(metric net0 rx_bytes), errors $(metric net0 errors)"
[ "$(metric block0 requests)" -gt 0 ] && [ "$(metric block0 tx_bytes)" -gt 0 ] && [ "$(metric block0 errors)" -eq 0 ] \
    && [ "$(metric net0 tx_bytes)" -gt 0 ] && [ "$(metric net0 rx_bytes)" -gt 0 ] \
    && echo "fc-config-file: the metrics count each device's requests and bytes"
kill -TERM $pid
end=$(( $(now) + 60 ))
while [ -e /proc/$pid/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$pid/status && [ $(now) -lt $end ]; do sleep 1; done
if [ -e /proc/$pid/status ] && ! grep -q '^State:[[:space:]]*Z' /proc/$pid/status; then
    echo "fc-config-file: FAIL: hvrun still runs 60 s after SIGTERM"; kill -9 $pid
fi
wait $pid
echo "fc-config-file: after SIGTERM hvrun exit $?"
tr -d '\r' </tmp/cf.out | grep -E '^power-button:'
kill $tcp 2>/dev/null

echo '{"boot-source": {"kernel_image_path": "/guest/Image"}, "machine-config": {"vcpu_count": 2}}' >/tmp/bad.json
/bin/hvrun --config-file /tmp/bad.json --no-api </dev/null >/tmp/bad.out 2>/tmp/bad.err
rc=$?
echo "fc-config-file: an invalid file: exit $rc, $(wc -l </tmp/bad.err) line(s): $(cat /tmp/bad.err)"
/bin/hvrun --config-file /tmp/nonexistent.json </dev/null >/tmp/bad.out 2>/tmp/bad.err
echo "fc-config-file: a missing file: exit $?, $(wc -l </tmp/bad.err) line(s): $(cat /tmp/bad.err)"
rm -f /tmp/cf-disk.img /tmp/cf-hold

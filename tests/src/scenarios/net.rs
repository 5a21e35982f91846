//! virtio-net scenarios: a tap, and unix sockets through a forwarder to a tap.

use crate::scenario::{OuterGic, Scenario};

/// The rig's side of a network scenario: `$setup` gives the host end an address in
/// `$net.0/24` as `$net.1`; then hvrun boots hvrun's kernel with `$flag`, and the guest
/// (`t/net-check`) pings the host and moves 64 MiB each way, checksummed at both ends.
macro_rules! net_scenario_script {
    ($setup:literal, $flag:literal, $net:literal) => {
        concat!(
            "now() { cut -d' ' -f1 /proc/uptime; }\n",
            "secs() { awk -v s=\"$1\" '{ print $1 - s }' /proc/uptime; }\n",
            "ip link set lo up; insmod /guest/tun.ko 2>/dev/null\n",
            $setup,
            "\ndd if=/dev/urandom of=/tmp/to-guest bs=1M count=64 2>/dev/null\n",
            "rm -f /tmp/hold; mkfifo /tmp/hold\n",
            "nc -l -p 5003 <>/tmp/hold >/dev/null & sleep 1; t=$(now)\n",
            "nc 127.0.0.1 5003 </tmp/to-guest && echo \"rig host loopback TCP: 64 MiB in $(secs $t) s\"\n",
            "nc -l -p 5001 <>/tmp/hold >/tmp/from-guest & receiver=$!\n",
            "(/bin/hvrun --kernel /guest/Image --initrd /guest/initramfs.cpio --memory 512M ",
            $flag,
            " --cmdline 'console=ttyAMA0 quiet -- /t/net-check ",
            $net,
            "'; echo \"hvrun exit $?\") 2>&1 | tr -d '\\r' | tee /tmp/out &\n",
            "vm=$!\n",
            "end=$(( $(now | cut -d. -f1) + 240 ))\n",
            "until grep -q 'guest: listening' /tmp/out || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done; sleep 1\n",
            "t=$(now); nc ",
            $net,
            ".15 5002 </tmp/to-guest && echo \"host sent 64 MiB to the guest in $(secs $t) s\"\n",
            "wait $vm; kill $receiver 2>/dev/null\n",
            "sent=$(sed -n 's/^guest-out sha256: //p' /tmp/out)\n",
            "[ -n \"$sent\" ] && [ \"$sent\" = \"$(sha256sum /tmp/from-guest | cut -d' ' -f1)\" ] ",
            "&& echo 'guest-to-host 64 MiB intact'\n",
            "got=$(sed -n 's/^guest-in sha256: //p' /tmp/out)\n",
            "[ -n \"$got\" ] && [ \"$got\" = \"$(sha256sum /tmp/to-guest | cut -d' ' -f1)\" ] ",
            "&& echo 'host-to-guest 64 MiB intact'\n",
            "true"
        )
    };
}

/// A network scenario: `name`, `about`, then [`net_scenario_script!`]'s arguments and
/// the timeout. Tap-backed ones need `tun.ko` in the rig; all share [`NET_MARKERS`].
macro_rules! net_scenario {
    ($name:literal, $about:literal, $setup:literal, $flag:literal, $net:literal, $timeout:literal) => {
        Scenario {
            name: $name,
            about: $about,
            artifacts: &["Image", "initramfs.cpio", "tun.ko"],
            script: net_scenario_script!($setup, $flag, $net),
            exit_code: 0,
            markers: NET_MARKERS,
            forbidden: &["hvrun: error", "panicked"],
            timeout_secs: $timeout,
            exchange: None,
            outer_gic: OuterGic::V2,
        }
    };
}

/// What every network scenario must show (see `guests/initramfs/t/net-check`).
const NET_MARKERS: &[&str] = &[
    "ping host ok: 3 packets received",
    "guest: listening",
    "host sent 64 MiB to the guest in",
    "guest received 67108864 bytes",
    "guest sent 64 MiB",
    "hvrun exit 0",
    "guest-to-host 64 MiB intact",
    "host-to-guest 64 MiB intact",
];

pub const NET_TAP: Scenario = net_scenario!(
    "net-tap",
    "virtio-net on a tap device with offloads: ping, and 64 MiB each way over TCP, checksummed",
    "tunctl -t tap0 >/dev/null && ip link set tap0 up && ip addr add 10.0.2.1/24 dev tap0",
    "--net tap=tap0",
    "10.0.2",
    300
);

pub const NET_UNIXGRAM: Scenario = net_scenario!(
        "net-unixgram",
        "virtio-net over a unix datagram socket with vfkit's handshake, through a frame forwarder to a tap",
        "net-forwarder /tmp/fwd.sock tap1 >/tmp/fwd.log 2>&1 &\n\
         end=$(( $(now | cut -d. -f1) + 20 )); until [ -S /tmp/fwd.sock ] || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done\n\
         ip link set tap1 up && ip addr add 10.0.3.1/24 dev tap1",
        "--net unixgram=/tmp/fwd.sock,vfkit",
        "10.0.3",
        480
);

pub const NET_UNIXSTREAM: Scenario = net_scenario!(
        "net-unixstream",
        "virtio-net over a unix stream socket with length-prefixed frames (socket_vmnet's protocol), through a forwarder to a tap",
        "net-forwarder --stream /tmp/fwd-stream.sock tap2 >/tmp/fwd.log 2>&1 &\n\
         end=$(( $(now | cut -d. -f1) + 20 )); until [ -S /tmp/fwd-stream.sock ] || [ $(now | cut -d. -f1) -ge $end ]; do sleep 1; done\n\
         ip link set tap2 up && ip addr add 10.0.4.1/24 dev tap2",
        "--net unixstream=/tmp/fwd-stream.sock",
        "10.0.4",
        480
);

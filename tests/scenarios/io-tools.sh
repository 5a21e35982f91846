# The rig's `io PROGRAM ARGS...`: runs /usr/bin/PROGRAM of the I/O guest's initramfs
# (fio, iperf3) on the rig host, through the loader it carries (the rig has no libc),
# after unpacking the archive into /tmp/io once.
io() {
    [ -d /tmp/io ] || { mkdir -p /tmp/io && (cd /tmp/io && cpio -i -d </guest/io-initramfs.cpio 2>/dev/null); }
    p=$1; shift
    /tmp/io/lib/aarch64-linux-gnu/ld-linux-aarch64.so.1 --library-path /tmp/io/lib/aarch64-linux-gnu /tmp/io/usr/bin/$p "$@"
}

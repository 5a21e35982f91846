/*
 * virtio-attack: a hostile virtio driver, for the `hostile-driver` scenario (issue 12:
 * "a hostile guest can't hang, bloat or stop hvrun").
 *
 * It runs in a guest of Debian's stock kernel with hvrun's test initramfs, whose virtio
 * drivers are modules nobody loads: no guest driver is bound to any virtio device, so this
 * program owns them all. It maps the virtio-mmio window through /dev/mem (the command line
 * has `iomem=relaxed`), finds the devices by their MagicValue and DeviceID, and drives
 * them itself (virtio 1.2, section 4.2.3: the modern MMIO transport, split virtqueues).
 * Then it breaks every rule a driver can break, on every queue of every device:
 *
 *   - garbage in the registers: every offset at every width, status steps skipped and
 *     taken back, features without VERSION_1, queue sizes and ring addresses that are
 *     invalid, outside RAM or on MMIO, DRIVER_OK with no usable queue, random writes;
 *   - ring indexes: an available index a queue and one ahead (size+1), 0x8000 and 0xffff
 *     ahead, or moved backwards; a chain head at or beyond the queue size;
 *   - chains: looping, running past the descriptor table, as long as the table, with
 *     buffers at 0, at the end of RAM, far beyond RAM, on the UART, on the device's own
 *     registers, of length 0 or 0xffffffff, in the wrong direction, or indirect (a feature
 *     this driver never negotiates) with loops, nesting, odd or huge tables, 65535 entries;
 *   - the three rings of a queue on top of each other;
 *   - a reset with requests in flight (block reads of 1 MiB each, network frames, console
 *     output) after which the device must not touch guest memory any more;
 *   - a notify storm: as many QueueNotify writes as its time allows (each one traps to
 *     hvrun), to running, stopped and failed devices, for real and for missing queues.
 *
 * What hvrun must do (devices/src/virtio/{mmio,queue,interrupt}.rs): a broken available
 * index or chain head sets DEVICE_NEEDS_RESET (0x40 in Status, so a started device reads
 * 0x4f) and raises a configuration interrupt (InterruptStatus 0x2); the device then serves
 * nothing until Status is written 0, after which it works again. Buffers outside RAM or on
 * MMIO end their chain (the request is returned with what fitted); chains are bounded.
 * Where hvrun may choose (a malformed chain may be returned or fail the device), either is
 * accepted; a device that does neither, or claims to have written into a buffer outside
 * RAM, fails. After every attack this program resets the device, starts it again and
 * checks that a well-formed request is answered (a GET_ID, an ARP request out and its
 * answer in, a console line, 64 random bytes). Each attack prints one line ending in "ok"
 * or "FAIL: why"; the last lines say how many failed and show a final virtio-rng request
 * answered with random bytes. Any FAIL makes the exit status 1.
 *
 * Between the lines "attack starts" and "attacks done" the program sleeps a few seconds so
 * the rig can sample hvrun's memory (/proc/PID/status) at both points.
 *
 * Usage: virtio-attack [--storm N] [--storm-secs S] [--deadline S] [--only PHASES]
 *                      [--arp-target A.B.C.D] [--guest-ip A.B.C.D]
 *   --storm N        QueueNotify writes per device in the notify storm, at most (1000000)
 *   --storm-secs S   time for the whole storm, at most, shared by the devices (60)
 *   --deadline S     finish the attacks within S seconds of starting, if need be by
 *                    shortening the storm (never under 15 s); 0, the default: no limit
 *   --only PHASES    run only these of registers,rings,resets,storm (all by default)
 *   --arp-target IP  the tap's address on the host side, asked for with ARP (10.0.5.1)
 *   --guest-ip IP    the address this program claims in its ARP requests (10.0.5.2)
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <inttypes.h>
#include <linux/virtio_blk.h>
#include <linux/virtio_config.h>
#include <linux/virtio_ids.h>
#include <linux/virtio_mmio.h>
#include <linux/virtio_ring.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

/* ------------------------------------------------------------------------------------ */
/* The machine (arch-aarch64/src/layout.rs)                                             */
/* ------------------------------------------------------------------------------------ */

#define VIRTIO_BASE 0x0a000000ul /* virtio-mmio slot 0 */
#define VIRTIO_SLOT 0x200ul      /* one slot's registers */
#define MAX_SLOTS 32
#define UART_BASE 0x09000000ul   /* the PL011 */
#define MAX_DEVS 8
#define MAX_QUEUES 2
#define RING_SIZE 256            /* the most descriptors a 4 KiB table holds */
#define VNET_HDR_LEN 12          /* struct virtio_net_hdr_mrg_rxbuf (VERSION_1) */
#define BLK_ID_LEN 20            /* VIRTIO_BLK_ID_BYTES */
#define HUGE_LEN 0xffffffffu

/* ------------------------------------------------------------------------------------ */
/* Output                                                                                */
/* ------------------------------------------------------------------------------------ */

static unsigned attacks_run, attacks_failed;

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("virtio-attack: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    fflush(stdout);
    va_end(ap);
}

static void die(const char *fmt, ...) __attribute__((format(printf, 1, 2), noreturn));
static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("virtio-attack: FAIL: ", stdout);
    vprintf(fmt, ap);
    fputc('\n', stdout);
    fflush(stdout);
    va_end(ap);
    exit(1);
}

static double now(void) {
    struct timespec t;
    clock_gettime(CLOCK_MONOTONIC, &t);
    return (double)t.tv_sec + (double)t.tv_nsec / 1e9;
}

static uint64_t seed = 0x243f6a8885a308d3ull;
static uint64_t rnd(void) {
    seed ^= seed << 13;
    seed ^= seed >> 7;
    seed ^= seed << 17;
    return seed;
}

/* ------------------------------------------------------------------------------------ */
/* MMIO: plain single loads and stores. Written in assembly so the compiler never uses  */
/* a pair or a writeback form, which a hypervisor cannot emulate (KVM reports no        */
/* syndrome for them). The barrier orders ring updates in RAM before the store that     */
/* tells the device about them.                                                          */
/* ------------------------------------------------------------------------------------ */

static inline void wmb(void) { __asm__ volatile("dsb st" ::: "memory"); }
static inline void mb(void) { __asm__ volatile("dsb sy" ::: "memory"); }

static inline void w8(volatile uint8_t *a, uint8_t v) { __asm__ volatile("strb %w0, [%1]" ::"rZ"(v), "r"(a) : "memory"); }
static inline void w16(volatile uint8_t *a, uint16_t v) { __asm__ volatile("strh %w0, [%1]" ::"rZ"(v), "r"(a) : "memory"); }
static inline void w32(volatile uint8_t *a, uint32_t v) { __asm__ volatile("str %w0, [%1]" ::"rZ"(v), "r"(a) : "memory"); }
static inline void w64(volatile uint8_t *a, uint64_t v) { __asm__ volatile("str %x0, [%1]" ::"rZ"(v), "r"(a) : "memory"); }
static inline uint8_t r8(volatile uint8_t *a) { uint32_t v; __asm__ volatile("ldrb %w0, [%1]" : "=r"(v) : "r"(a) : "memory"); return (uint8_t)v; }
static inline uint16_t r16(volatile uint8_t *a) { uint32_t v; __asm__ volatile("ldrh %w0, [%1]" : "=r"(v) : "r"(a) : "memory"); return (uint16_t)v; }
static inline uint32_t r32(volatile uint8_t *a) { uint32_t v; __asm__ volatile("ldr %w0, [%1]" : "=r"(v) : "r"(a) : "memory"); return v; }
static inline uint64_t r64(volatile uint8_t *a) { uint64_t v; __asm__ volatile("ldr %x0, [%1]" : "=r"(v) : "r"(a) : "memory"); return v; }

/* ------------------------------------------------------------------------------------ */
/* Guest-physical memory for rings and buffers.                                          */
/*                                                                                       */
/* The device reads and writes guest-physical addresses, so this program needs memory   */
/* whose physical address it knows and that stays put. It takes two 2 MiB hugetlb pages  */
/* (after asking the kernel for a few with /proc/sys/vm/nr_hugepages): a hugetlb page is */
/* physically contiguous, is never swapped and is not moved by compaction, and it is     */
/* ordinary cacheable RAM, so what the device writes through hvrun's mapping is what     */
/* this program reads (a /dev/mem mapping of RAM would be uncached, and booting with     */
/* mem= below the VM's RAM to get a free range needs the initrd and DTB, at the top of    */
/* RAM, out of the way). Its physical address comes from /proc/self/pagemap (root sees   */
/* the frame numbers), checked for every 4 KiB page of it.                               */
/*                                                                                       */
/* Page A (`small`) holds, per queue slot k (16 KiB each, from 0): the descriptor table, */
/* the available ring, the used ring and a spare page for request headers and indirect   */
/* tables; from 512 KiB a canary never given to a device; from 1 MiB a 64 KiB data       */
/* buffer per queue slot. Page B (`big`) is for 1 MiB block reads and for buffers of     */
/* length 0xffffffff, so whatever a device writes lands in memory this program owns.     */
/* ------------------------------------------------------------------------------------ */

#define HUGE_PAGE (2ul << 20)
#define SLOT_BYTES 0x4000ul
#define CANARY_AT 0x80000ul
#define CANARY_LEN 0x10000ul
#define BUFS_AT 0x100000ul
#define BUF_BYTES 0x10000ul

struct pool {
    uint8_t *va;
    uint64_t pa;
};
static struct pool small, big;
static uint64_t ram_start, ram_end;

static uint64_t pfn_of(int pagemap, const void *va) {
    uint64_t entry = 0;
    long page = sysconf(_SC_PAGESIZE);
    off_t at = (off_t)((uintptr_t)va / (uintptr_t)page) * 8;
    if (pread(pagemap, &entry, sizeof entry, at) != (ssize_t)sizeof entry) die("reading /proc/self/pagemap");
    if (!(entry >> 63)) die("a page of the pool is not present");
    uint64_t pfn = entry & ((1ull << 55) - 1);
    if (pfn == 0) die("/proc/self/pagemap shows no frame numbers (not root?)");
    return pfn;
}

static void get_pools(void) {
    FILE *f = fopen("/proc/sys/vm/nr_hugepages", "w");
    if (!f || fprintf(f, "4\n") < 0 || fclose(f) != 0) die("cannot ask for hugetlb pages");
    uint8_t *va = mmap(NULL, 2 * HUGE_PAGE, PROT_READ | PROT_WRITE,
                       MAP_PRIVATE | MAP_ANONYMOUS | MAP_HUGETLB | MAP_POPULATE | MAP_LOCKED, -1, 0);
    if (va == MAP_FAILED) die("no hugetlb pages: %m");
    memset(va, 0, 2 * HUGE_PAGE);
    int pagemap = open("/proc/self/pagemap", O_RDONLY);
    if (pagemap < 0) die("/proc/self/pagemap: %m");
    long page = sysconf(_SC_PAGESIZE);
    struct pool *pools[2] = {&small, &big};
    for (int i = 0; i < 2; i++) {
        uint8_t *base = va + i * HUGE_PAGE;
        uint64_t first = pfn_of(pagemap, base);
        for (unsigned long off = 0; off < HUGE_PAGE; off += (unsigned long)page)
            if (pfn_of(pagemap, base + off) != first + off / (unsigned long)page)
                die("hugetlb page %d is not physically contiguous", i);
        pools[i]->va = base;
        pools[i]->pa = first * (uint64_t)page;
        if (pools[i]->pa < ram_start || pools[i]->pa + HUGE_PAGE > ram_end) die("the pool is not in RAM");
    }
    close(pagemap);
}

/* The guest-physical address of `p`, which must be in one of the pools. */
static uint64_t pa(const volatile void *p) {
    const uint8_t *b = (const uint8_t *)(uintptr_t)p;
    if (b >= small.va && b < small.va + HUGE_PAGE) return small.pa + (uint64_t)(b - small.va);
    if (b >= big.va && b < big.va + HUGE_PAGE) return big.pa + (uint64_t)(b - big.va);
    die("address %p is not in the pool", (const void *)b);
}

/* RAM's range, from the device tree hvrun wrote (/proc/device-tree/memory@.../reg). */
static void find_ram(void) {
    DIR *dir = opendir("/proc/device-tree");
    if (!dir) die("/proc/device-tree: %m");
    struct dirent *e;
    while ((e = readdir(dir))) {
        if (strncmp(e->d_name, "memory", 6) != 0) continue;
        char path[300];
        snprintf(path, sizeof path, "/proc/device-tree/%s/reg", e->d_name);
        FILE *f = fopen(path, "r");
        uint8_t reg[16];
        if (!f || fread(reg, 1, sizeof reg, f) != sizeof reg) die("%s: cannot read", path);
        fclose(f);
        uint64_t base = 0, size = 0;
        for (int i = 0; i < 8; i++) {
            base = base << 8 | reg[i];
            size = size << 8 | reg[8 + i];
        }
        ram_start = base;
        ram_end = base + size;
    }
    closedir(dir);
    if (!ram_end) die("no memory node in the device tree");
}

/* Makes the guest touch (nearly) all of its RAM once, then gives it back. hvrun's guest  */
/* RAM is anonymous memory that becomes resident as the guest first touches it; doing it */
/* now, before "attack starts", means that any growth of hvrun's peak resident set       */
/* measured across the attacks is hvrun's own memory, not guest RAM becoming resident.   */
static void touch_guest_ram(void) {
    FILE *f = fopen("/proc/meminfo", "r");
    if (!f) die("/proc/meminfo: %m");
    char line[128];
    unsigned long free_kb = 0;
    while (fgets(line, sizeof line, f))
        if (sscanf(line, "MemFree: %lu kB", &free_kb) == 1) break;
    fclose(f);
    unsigned long keep_kb = 16 * 1024;
    if (free_kb <= keep_kb) return;
    size_t len = (free_kb - keep_kb) * 1024;
    double t0 = now();
    void *p = mmap(NULL, len, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
    if (p == MAP_FAILED) die("touching guest RAM: %m");
    munmap(p, len);
    say("touched %zu MiB of guest RAM in %.1f s (all but 16 MiB of what was free)", len >> 20, now() - t0);
}

/* ------------------------------------------------------------------------------------ */
/* Devices and queues                                                                    */
/* ------------------------------------------------------------------------------------ */

struct desc { /* struct vring_desc, as the device reads it */
    uint64_t addr;
    uint32_t len;
    uint16_t flags;
    uint16_t next;
};

struct vq {
    volatile struct desc *desc;
    volatile uint16_t *avail; /* [0] flags, [1] idx, [2 + i] ring[i] */
    volatile uint8_t *used;   /* u16 flags, u16 idx, then { u32 id; u32 len; }[size] */
    uint8_t *spare;           /* 4 KiB for this queue's headers and indirect tables */
    uint8_t *buf;             /* 64 KiB for this queue's data */
    uint16_t size;
};

struct dev {
    volatile uint8_t *regs;
    unsigned slot;
    uint32_t id;
    const char *name;
    unsigned nq;
    struct vq q[MAX_QUEUES];
    unsigned checks; /* well-formed requests made so far (console lines are numbered) */
};

static struct dev devs[MAX_DEVS];
static unsigned ndevs;
static volatile uint8_t *window;
static uint32_t arp_target, guest_ip;

static uint32_t rd(struct dev *d, unsigned off) { return r32(d->regs + off); }
static void wr(struct dev *d, unsigned off, uint32_t v) {
    wmb();
    w32(d->regs + off, v);
}

static uint16_t used_idx(struct vq *q) { return *(volatile uint16_t *)(q->used + 2); }
static uint32_t used_len(struct vq *q, uint16_t at) {
    mb();
    return *(volatile uint32_t *)(q->used + 4 + 8 * (at % q->size) + 4);
}

static void set_desc(struct vq *q, unsigned i, uint64_t addr, uint32_t len, uint16_t flags, uint16_t next) {
    q->desc[i].addr = addr;
    q->desc[i].len = len;
    q->desc[i].flags = flags;
    q->desc[i].next = next;
}

/* Puts `head` in the available ring at position `at` and publishes index `idx`. */
static void offer(struct vq *q, uint16_t at, uint16_t head, uint16_t idx) {
    q->avail[2 + at % q->size] = head;
    wmb();
    q->avail[1] = idx;
    wmb();
}

static void notify(struct dev *d, unsigned qi) { wr(d, VIRTIO_MMIO_QUEUE_NOTIFY, qi); }

static const char *type_name(uint32_t id) {
    switch (id) {
    case VIRTIO_ID_NET: return "net";
    case VIRTIO_ID_BLOCK: return "blk";
    case VIRTIO_ID_CONSOLE: return "console";
    case VIRTIO_ID_RNG: return "rng";
    case VIRTIO_ID_INPUT: return "input";
    default: return NULL;
    }
}

/* Devices with a receive-like queue 0 and a transmit-like queue 1. */
static int two_way(uint32_t id) { return id == VIRTIO_ID_NET || id == VIRTIO_ID_CONSOLE || id == VIRTIO_ID_INPUT; }
static unsigned queue_count(uint32_t id) { return two_way(id) ? 2 : 1; }

/* Whether the device writes into this queue's buffers (receive-like) or reads them. */
static int device_writes(struct dev *d, unsigned qi) {
    if (d->id == VIRTIO_ID_RNG) return 1;
    if (two_way(d->id)) return qi == 0;
    return 0; /* the block queue mixes both: its chains are built by hand */
}

/* A receive queue whose chains the device takes only when input arrives: network input */
/* can be provoked (an ARP request on the transmit queue gets an answer from the host);  */
/* the console's file backend never has any, nor the power button unpressed.              */
static int needs_input(struct dev *d, unsigned qi) { return two_way(d->id) && qi == 0; }
static int can_provoke(struct dev *d, unsigned qi) { return d->id == VIRTIO_ID_NET && qi == 0; }

/* Slot order: disks, network interfaces, virtio-rng, console, the power button (virtio-input). */
/* Stops at the first empty slot.                                                           */
static void discover(void) {
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) die("/dev/mem: %m");
    window = mmap(NULL, MAX_SLOTS * VIRTIO_SLOT, PROT_READ | PROT_WRITE, MAP_SHARED, fd, VIRTIO_BASE);
    if (window == MAP_FAILED) die("mapping the virtio window: %m");
    char found[256] = "";
    for (unsigned slot = 0; slot < MAX_SLOTS && ndevs < MAX_DEVS; slot++) {
        volatile uint8_t *regs = window + slot * VIRTIO_SLOT;
        if (r32(regs + VIRTIO_MMIO_MAGIC_VALUE) != 0x74726976) break; /* "virt" */
        uint32_t id = r32(regs + VIRTIO_MMIO_DEVICE_ID);
        uint32_t version = r32(regs + VIRTIO_MMIO_VERSION);
        const char *name = type_name(id);
        if (!name || version != 2) {
            say("slot %u: device type %u, version %u: not attacked", slot, id, version);
            continue;
        }
        struct dev *d = &devs[ndevs];
        d->regs = regs;
        d->slot = slot;
        d->id = id;
        d->name = name;
        d->nq = queue_count(id);
        for (unsigned qi = 0; qi < d->nq; qi++) {
            unsigned k = ndevs * MAX_QUEUES + qi;
            uint8_t *at = small.va + k * SLOT_BYTES;
            d->q[qi].desc = (volatile struct desc *)at;
            d->q[qi].avail = (volatile uint16_t *)(at + 0x1000);
            d->q[qi].used = at + 0x2000;
            d->q[qi].spare = at + 0x3000;
            d->q[qi].buf = small.va + BUFS_AT + k * BUF_BYTES;
        }
        size_t n = strlen(found);
        snprintf(found + n, sizeof found - n, "%s%s@%u", n ? " " : "", name, slot);
        ndevs++;
    }
    close(fd);
    if (!ndevs) die("no virtio devices found");
    say("devices: %s", found);
}

/* ------------------------------------------------------------------------------------ */
/* The well-behaved part: reset and start a device (virtio 1.2, 3.1.1)                   */
/* ------------------------------------------------------------------------------------ */

static void reset(struct dev *d) { wr(d, VIRTIO_MMIO_STATUS, 0); }

/* Resets the device and starts it with VERSION_1 as the only feature (no EVENT_IDX, no */
/* INDIRECT_DESC, no offloads) and every queue at RING_SIZE with fresh rings. Queue      */
/* `overlap_q` (if any) gets its three rings at one address. Dies if the device refuses. */
static void start_layout(struct dev *d, int overlap_q) {
    reset(d);
    wr(d, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE);
    wr(d, VIRTIO_MMIO_STATUS, VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 1u << (VIRTIO_F_VERSION_1 - 32));
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 0);
    uint32_t s = VIRTIO_CONFIG_S_ACKNOWLEDGE | VIRTIO_CONFIG_S_DRIVER | VIRTIO_CONFIG_S_FEATURES_OK;
    wr(d, VIRTIO_MMIO_STATUS, s);
    if (!(rd(d, VIRTIO_MMIO_STATUS) & VIRTIO_CONFIG_S_FEATURES_OK)) die("%s refused FEATURES_OK", d->name);
    for (unsigned qi = 0; qi < d->nq; qi++) {
        struct vq *q = &d->q[qi];
        memset((void *)q->desc, 0, 0x3000);
        wr(d, VIRTIO_MMIO_QUEUE_SEL, qi);
        uint32_t max = rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
        q->size = max < RING_SIZE ? (uint16_t)max : RING_SIZE;
        if (!q->size) die("%s queue %u: QueueNumMax 0", d->name, qi);
        uint64_t desc = pa(q->desc), avail = pa(q->avail), used = pa(q->used);
        if ((int)qi == overlap_q) avail = used = desc;
        wr(d, VIRTIO_MMIO_QUEUE_NUM, q->size);
        wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)desc);
        wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(desc >> 32));
        wr(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)avail);
        wr(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (uint32_t)(avail >> 32));
        wr(d, VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)used);
        wr(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (uint32_t)(used >> 32));
        wr(d, VIRTIO_MMIO_QUEUE_READY, 1);
        if (rd(d, VIRTIO_MMIO_QUEUE_READY) != 1) die("%s queue %u did not become ready", d->name, qi);
    }
    wr(d, VIRTIO_MMIO_STATUS, s | VIRTIO_CONFIG_S_DRIVER_OK);
    uint32_t got = rd(d, VIRTIO_MMIO_STATUS);
    if (got != (s | VIRTIO_CONFIG_S_DRIVER_OK)) die("%s did not start: status %#x", d->name, got);
}

static void start(struct dev *d) { start_layout(d, -1); }

/* What became of a request: the device returned it in the used ring, it declared itself */
/* broken (DEVICE_NEEDS_RESET), or nothing happened before the deadline.                 */
enum outcome { NOTHING, RETURNED, NEEDS_RESET };

struct seen {
    enum outcome what;
    uint32_t status, isr, len;
};

static struct seen wait_for(struct dev *d, unsigned qi, uint16_t used_before, unsigned timeout_ms) {
    struct vq *q = &d->q[qi];
    double until = now() + timeout_ms / 1e3;
    struct seen s = {NOTHING, 0, 0, 0};
    for (;;) {
        s.status = rd(d, VIRTIO_MMIO_STATUS);
        if (s.status & VIRTIO_CONFIG_S_NEEDS_RESET) {
            s.what = NEEDS_RESET;
            break;
        }
        if (used_idx(q) != used_before) {
            s.what = RETURNED;
            s.len = used_len(q, used_before);
            break;
        }
        if (now() > until) break;
        usleep(200);
    }
    s.isr = rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    /* hvrun sets DEVICE_NEEDS_RESET, logs why, then raises the interrupt: a driver polling
     * Status can see the first a moment before the second. Give it 500 ms. */
    for (int i = 0; s.what == NEEDS_RESET && !(s.isr & VIRTIO_MMIO_INT_CONFIG) && i < 500; i++) {
        usleep(1000);
        s.isr = rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    }
    return s;
}

static void describe(char *out, size_t n, struct seen s, unsigned waited_ms) {
    switch (s.what) {
    case NEEDS_RESET:
        snprintf(out, n, "needs reset (status %#x, isr %#x)", s.status, s.isr);
        break;
    case RETURNED:
        snprintf(out, n, "returned, %u bytes written", s.len);
        break;
    case NOTHING:
        snprintf(out, n, "untouched after %u ms (status %#x)", waited_ms, s.status);
        break;
    }
}

/* ------------------------------------------------------------------------------------ */
/* Well-formed requests                                                                  */
/* ------------------------------------------------------------------------------------ */

/* An ARP request for `arp_target`, after a zeroed virtio-net header; returns its length. */
static size_t arp_request(uint8_t *p) {
    static const uint8_t mac[6] = {0x02, 0x68, 0x76, 0x72, 0x75, 0x6e};
    memset(p, 0, VNET_HDR_LEN);
    uint8_t *f = p + VNET_HDR_LEN;
    memset(f, 0xff, 6);
    memcpy(f + 6, mac, 6);
    f[12] = 0x08, f[13] = 0x06;             /* ARP */
    f[14] = 0, f[15] = 1;                   /* Ethernet */
    f[16] = 0x08, f[17] = 0x00;             /* IPv4 */
    f[18] = 6, f[19] = 4, f[20] = 0, f[21] = 1; /* request */
    memcpy(f + 22, mac, 6);
    memcpy(f + 28, &guest_ip, 4);
    memset(f + 32, 0, 6);
    memcpy(f + 38, &arp_target, 4);
    return VNET_HDR_LEN + 42;
}

/* The head chain of a well-formed request on queue `qi`, at descriptors 0.., with the */
/* buffers zeroed. Returns how many descriptors; `*payload` is the one attacks change   */
/* (the data buffer; for a block request the ID buffer between header and status).     */
static unsigned build_request(struct dev *d, unsigned qi, unsigned *payload) {
    struct vq *q = &d->q[qi];
    memset(q->spare, 0, 0x1000);
    memset(q->buf, 0, 4096);
    *payload = 0;
    switch (d->id) {
    case VIRTIO_ID_RNG:
        set_desc(q, 0, pa(q->buf), 64, VRING_DESC_F_WRITE, 0);
        return 1;
    case VIRTIO_ID_BLOCK: {
        struct virtio_blk_outhdr *h = (struct virtio_blk_outhdr *)q->spare;
        h->type = VIRTIO_BLK_T_GET_ID;
        q->spare[64] = 0xff; /* the status byte, until the device writes it */
        set_desc(q, 0, pa(q->spare), sizeof *h, VRING_DESC_F_NEXT, 1);
        set_desc(q, 1, pa(q->buf), BLK_ID_LEN, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, 2);
        set_desc(q, 2, pa(q->spare + 64), 1, VRING_DESC_F_WRITE, 0);
        *payload = 1;
        return 3;
    }
    case VIRTIO_ID_NET:
        if (qi == 0) set_desc(q, 0, pa(q->buf), 2048, VRING_DESC_F_WRITE, 0);
        else set_desc(q, 0, pa(q->spare), (uint32_t)arp_request(q->spare), 0, 0);
        return 1;
    case VIRTIO_ID_CONSOLE:
        if (qi == 0) {
            set_desc(q, 0, pa(q->buf), 64, VRING_DESC_F_WRITE, 0);
        } else {
            int n = snprintf((char *)q->spare, 128, "virtio-attack: console check %u\n", ++d->checks);
            set_desc(q, 0, pa(q->spare), (uint32_t)n, 0, 0);
        }
        return 1;
    case VIRTIO_ID_INPUT:
        /* An event buffer, or a status event (EV_LED, LED_NUML, on) for the device to read. */
        if (qi == 0) {
            set_desc(q, 0, pa(q->buf), 8, VRING_DESC_F_WRITE, 0);
        } else {
            static const uint8_t led[8] = {0x11, 0, 0, 0, 1, 0, 0, 0};
            memcpy(q->spare, led, sizeof led);
            set_desc(q, 0, pa(q->spare), sizeof led, 0, 0);
        }
        return 1;
    }
    return 0;
}

/* Sends one ARP request on the network device's transmit queue, so the host answers   */
/* into its receive queue: the input a receive-queue attack needs. The request uses the */
/* transmit queue's next free descriptor and ring position (it may be used repeatedly). */
static void provoke(struct dev *d) {
    struct vq *tx = &d->q[1];
    uint16_t at = tx->avail[1];
    uint8_t *frame = tx->spare + 0x800 + (at % 8) * 64;
    set_desc(tx, 200 + at % 8, pa(frame), (uint32_t)arp_request(frame), 0, 0);
    offer(tx, at, 200 + at % 8, at + 1);
    notify(d, 1);
}

/* The check after every attack: reset, start, and one well-formed request on the     */
/* device's main path, which must be answered. Writes what it saw into `out`.         */
static int works(struct dev *d, char *out, size_t n) {
    start(d);
    unsigned payload;
    switch (d->id) {
    case VIRTIO_ID_RNG: {
        struct vq *q = &d->q[0];
        build_request(d, 0, &payload);
        offer(q, 0, 0, 1);
        notify(d, 0);
        struct seen s = wait_for(d, 0, 0, 3000);
        int nonzero = 0;
        for (int i = 0; i < 64; i++) nonzero += q->buf[i] != 0;
        if (s.what != RETURNED || s.len != 64 || nonzero < 32) {
            describe(out, n, s, 3000);
            return 0;
        }
        snprintf(out, n, "64 random bytes");
        return 1;
    }
    case VIRTIO_ID_BLOCK: {
        struct vq *q = &d->q[0];
        build_request(d, 0, &payload);
        offer(q, 0, 0, 1);
        notify(d, 0);
        struct seen s = wait_for(d, 0, 0, 3000);
        char id[BLK_ID_LEN + 1];
        memcpy(id, q->buf, BLK_ID_LEN);
        id[BLK_ID_LEN] = 0;
        if (s.what != RETURNED || q->spare[64] != VIRTIO_BLK_S_OK || !id[0]) {
            describe(out, n, s, 3000);
            return 0;
        }
        snprintf(out, n, "GET_ID \"%s\"", id);
        return 1;
    }
    case VIRTIO_ID_NET: {
        struct vq *rx = &d->q[0], *tx = &d->q[1];
        build_request(d, 0, &payload);
        offer(rx, 0, 0, 1);
        notify(d, 0);
        build_request(d, 1, &payload);
        offer(tx, 0, 0, 1);
        notify(d, 1);
        struct seen t = wait_for(d, 1, 0, 3000);
        struct seen r = wait_for(d, 0, 0, 3000);
        if (t.what != RETURNED || r.what != RETURNED || r.len < VNET_HDR_LEN + 14) {
            char a[64], b[64];
            describe(a, sizeof a, t, 3000);
            describe(b, sizeof b, r, 3000);
            snprintf(out, n, "transmit %s, receive %s", a, b);
            return 0;
        }
        const uint8_t *f = rx->buf + VNET_HDR_LEN;
        int arp_reply = f[12] == 0x08 && f[13] == 0x06 && f[21] == 2;
        snprintf(out, n, "frame out, %s in", arp_reply ? "ARP reply" : "a frame");
        return 1;
    }
    case VIRTIO_ID_CONSOLE: {
        struct vq *q = &d->q[1];
        build_request(d, 1, &payload);
        offer(q, 0, 0, 1);
        notify(d, 1);
        struct seen s = wait_for(d, 1, 0, 3000);
        if (s.what != RETURNED) {
            describe(out, n, s, 3000);
            return 0;
        }
        snprintf(out, n, "console line %u out", d->checks);
        return 1;
    }
    case VIRTIO_ID_INPUT: {
        /* The status queue answers, and the configuration space still names the device. */
        struct vq *q = &d->q[1];
        build_request(d, 1, &payload);
        offer(q, 0, 0, 1);
        notify(d, 1);
        struct seen s = wait_for(d, 1, 0, 3000);
        char name[32] = "";
        w8(d->regs + VIRTIO_MMIO_CONFIG, 1); /* VIRTIO_INPUT_CFG_ID_NAME */
        w8(d->regs + VIRTIO_MMIO_CONFIG + 1, 0);
        unsigned size = r8(d->regs + VIRTIO_MMIO_CONFIG + 2);
        for (unsigned i = 0; i < size && i < sizeof name - 1; i++) name[i] = (char)r8(d->regs + VIRTIO_MMIO_CONFIG + 8 + i);
        if (s.what != RETURNED || strcmp(name, "hvrun power button") != 0) {
            describe(out, n, s, 3000);
            return 0;
        }
        snprintf(out, n, "status event taken, name \"%s\"", name);
        return 1;
    }
    }
    return 0;
}

/* Checks that the device works after a reset, then prints the attack's line: what was */
/* seen, and "ok" (the device did what it must, and then answered a well-formed request) */
/* or "FAIL: why". Lines are short: every character costs two trapped UART accesses.    */
static void verdict(struct dev *d, const char *what, const char *observed, const char *bad) {
    char after[160];
    int ok = works(d, after, sizeof after);
    attacks_run++;
    if (bad || !ok) attacks_failed++;
    if (bad) say("%s %s: %s; FAIL: %s", d->name, what, observed, bad);
    else if (!ok) say("%s %s: %s; FAIL: after a reset: %s", d->name, what, observed, after);
    else say("%s %s: %s; ok", d->name, what, observed);
}

/* ------------------------------------------------------------------------------------ */
/* Attack 1: garbage in the registers                                                    */
/* ------------------------------------------------------------------------------------ */

/* A random value for a register write, except that ring addresses always end up outside */
/* RAM (bit 31 of the low word set: at or above 2 GiB, or above 4 GiB): a queue set up by */
/* chance at a real address would let the device write into the guest kernel.            */
static uint64_t garbage_for(unsigned off) {
    uint64_t v = rnd();
    if (off == VIRTIO_MMIO_QUEUE_DESC_LOW || off == VIRTIO_MMIO_QUEUE_AVAIL_LOW || off == VIRTIO_MMIO_QUEUE_USED_LOW)
        v |= 0x80000000u;
    return v;
}

static void attack_registers(struct dev *d) {
    unsigned reads = 0, writes = 0;
    char bad[200] = "";
    reset(d);
    /* Every offset of the slot at every width: the registers take aligned 32-bit accesses
     * only (others read as 0 and are ignored); the configuration space takes any. */
    volatile uint64_t sink = 0;
    for (unsigned off = 0; off < VIRTIO_SLOT; off++) {
        sink += r8(d->regs + off), reads++;
        if (off % 2 == 0) sink += r16(d->regs + off), reads++;
        if (off % 4 == 0) sink += r32(d->regs + off), reads++;
        if (off % 8 == 0) sink += r64(d->regs + off), reads++;
    }
    (void)sink;
    for (unsigned off = 0; off < VIRTIO_SLOT; off++) {
        w8(d->regs + off, (uint8_t)garbage_for(off)), writes++;
        if (off % 2 == 0) w16(d->regs + off, (uint16_t)garbage_for(off)), writes++;
        if (off % 8 == 0) w64(d->regs + off, garbage_for(off)), writes++;
        if (off >= VIRTIO_MMIO_CONFIG && off % 4 == 0) w32(d->regs + off, (uint32_t)garbage_for(off)), writes++;
    }

    /* The status state machine: DRIVER_OK out of nowhere; FEATURES_OK for a driver that
     * accepts everything but VERSION_1 (a legacy driver: the device must refuse it). */
    const uint32_t ack = VIRTIO_CONFIG_S_ACKNOWLEDGE, drv = VIRTIO_CONFIG_S_DRIVER;
    const uint32_t fok = VIRTIO_CONFIG_S_FEATURES_OK, dok = VIRTIO_CONFIG_S_DRIVER_OK;
    reset(d);
    wr(d, VIRTIO_MMIO_STATUS, dok), writes++;
    uint32_t skipped = rd(d, VIRTIO_MMIO_STATUS);
    wr(d, VIRTIO_MMIO_STATUS, ack);
    wr(d, VIRTIO_MMIO_STATUS, ack | drv);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 0xffffffff);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 0xfffffffe);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 0x7fffffff);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 0xffffffff);
    wr(d, VIRTIO_MMIO_DEVICE_FEATURES_SEL, 0xffffffff);
    wr(d, VIRTIO_MMIO_STATUS, ack | drv | fok), writes += 9;
    uint32_t legacy = rd(d, VIRTIO_MMIO_STATUS);
    reads += 2;

    /* Now a proper negotiation, then queue registers full of nonsense. */
    reset(d);
    wr(d, VIRTIO_MMIO_STATUS, ack);
    wr(d, VIRTIO_MMIO_STATUS, ack | drv);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES_SEL, 1);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 1u << (VIRTIO_F_VERSION_1 - 32));
    wr(d, VIRTIO_MMIO_STATUS, ack | drv | fok);
    wr(d, VIRTIO_MMIO_DRIVER_FEATURES, 0xffffffff); /* after FEATURES_OK: too late */
    wr(d, VIRTIO_MMIO_STATUS, ack); /* taking steps back */
    wr(d, VIRTIO_MMIO_QUEUE_SEL, 0xffff); /* a queue that does not exist */
    wr(d, VIRTIO_MMIO_QUEUE_NUM, 8);
    wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)pa(d->q[0].desc));
    wr(d, VIRTIO_MMIO_QUEUE_READY, 1), writes += 10;
    unsigned ready = rd(d, VIRTIO_MMIO_QUEUE_READY) + rd(d, VIRTIO_MMIO_QUEUE_NUM_MAX);
    reads += 2;
    /* Queue 0: sizes that are 0, not a power of two, above the maximum or above 16 bits;
     * then a valid size with rings on the UART, on the virtio window, at 0, straddling
     * the end of RAM, misaligned, or with garbage in the high words. None may be ready. */
    static const uint32_t sizes[] = {0, 3, 255, 512, 0x10000, 0xffffffff};
    wr(d, VIRTIO_MMIO_QUEUE_SEL, 0);
    for (unsigned i = 0; i < sizeof sizes / sizeof sizes[0]; i++) {
        wr(d, VIRTIO_MMIO_QUEUE_NUM, sizes[i]);
        wr(d, VIRTIO_MMIO_QUEUE_READY, 1), writes += 2;
        ready += rd(d, VIRTIO_MMIO_QUEUE_READY), reads++;
    }
    const uint64_t good = pa(d->q[0].desc);
    const uint64_t bad_rings[][3] = {
        {UART_BASE, good + 0x1000, good + 0x2000},
        {good, VIRTIO_BASE + d->slot * VIRTIO_SLOT, good + 0x2000},
        {good, good + 0x1000, 0},
        {ram_end - 0x800, good + 0x1000, good + 0x2000},
        {good, good + 0x1000, ram_end - 0x10},
        {good + 1, good + 0x1000, good + 0x2000},
        {good, good + 0x1001, good + 0x2002},
        {good | 0xffffffff00000000ull, good + 0x1000, good + 0x2000},
        {good, good + 0x1000, good + 0x2000 + (0x1234ull << 32)},
    };
    for (unsigned i = 0; i < sizeof bad_rings / sizeof bad_rings[0]; i++) {
        wr(d, VIRTIO_MMIO_QUEUE_NUM, RING_SIZE);
        wr(d, VIRTIO_MMIO_QUEUE_DESC_LOW, (uint32_t)bad_rings[i][0]);
        wr(d, VIRTIO_MMIO_QUEUE_DESC_HIGH, (uint32_t)(bad_rings[i][0] >> 32));
        wr(d, VIRTIO_MMIO_QUEUE_AVAIL_LOW, (uint32_t)bad_rings[i][1]);
        wr(d, VIRTIO_MMIO_QUEUE_AVAIL_HIGH, (uint32_t)(bad_rings[i][1] >> 32));
        wr(d, VIRTIO_MMIO_QUEUE_USED_LOW, (uint32_t)bad_rings[i][2]);
        wr(d, VIRTIO_MMIO_QUEUE_USED_HIGH, (uint32_t)(bad_rings[i][2] >> 32));
        wr(d, VIRTIO_MMIO_QUEUE_READY, 1), writes += 8;
        ready += rd(d, VIRTIO_MMIO_QUEUE_READY), reads++;
    }
    /* DRIVER_OK with no usable queue: the device cannot start and must say so. */
    wr(d, VIRTIO_MMIO_STATUS, ack | drv | fok | dok), writes++;
    uint32_t no_queues = rd(d, VIRTIO_MMIO_STATUS);
    uint32_t no_queues_isr = rd(d, VIRTIO_MMIO_INTERRUPT_STATUS);
    wr(d, VIRTIO_MMIO_INTERRUPT_ACK, 0xffffffff);
    wr(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0);
    wr(d, VIRTIO_MMIO_QUEUE_NOTIFY, 0xffffffff), writes += 3;
    reads += 2;

    /* Random writes anywhere in the slot, at random widths, from a reset device. */
    reset(d);
    for (unsigned i = 0; i < 4000; i++) {
        unsigned width = 1u << (rnd() % 4);
        unsigned off = (unsigned)(rnd() % VIRTIO_SLOT) & ~(width - 1);
        uint64_t v = garbage_for(off);
        switch (width) {
        case 1: w8(d->regs + off, (uint8_t)v); break;
        case 2: w16(d->regs + off, (uint16_t)v); break;
        case 4: w32(d->regs + off, (uint32_t)v); break;
        default: w64(d->regs + off, v); break;
        }
        writes++;
    }
    reset(d);

    if (skipped != 0) snprintf(bad, sizeof bad, "DRIVER_OK from reset was taken (status %#x)", skipped);
    else if (legacy & fok) snprintf(bad, sizeof bad, "FEATURES_OK accepted without VERSION_1 (status %#x)", legacy);
    else if (ready) snprintf(bad, sizeof bad, "a queue with a bad size or rings became ready");
    else if (!(no_queues & VIRTIO_CONFIG_S_NEEDS_RESET) || !(no_queues_isr & VIRTIO_MMIO_INT_CONFIG))
        snprintf(bad, sizeof bad, "DRIVER_OK with no queue: status %#x", no_queues);
    char observed[300];
    snprintf(observed, sizeof observed,
             "%u reads, %u writes; FEATURES_OK without VERSION_1: status %#x; 15 bad queues: not ready; "
             "DRIVER_OK without queues: status %#x, isr %#x",
             reads, writes, legacy, no_queues, no_queues_isr);
    verdict(d, "garbage registers", observed, bad[0] ? bad : NULL);
}

/* ------------------------------------------------------------------------------------ */
/* Attack 2: the rings and the chains, on one queue                                      */
/* ------------------------------------------------------------------------------------ */

enum attack {
    AVAIL_SIZE_PLUS_1, /* available index one more than a whole queue ahead */
    AVAIL_8000,        /* ... half the index space ahead */
    AVAIL_FFFF,        /* ... all of it */
    AVAIL_BACKWARDS,   /* an index that moves back after a request was served */
    HEAD_SIZE,         /* a chain head equal to the queue size */
    HEAD_FFFF,         /* a chain head of 0xffff */
    LOOP_SELF,         /* the last descriptor's next is itself */
    LOOP_HEAD,         /* the last descriptor's next is the head */
    NEXT_BEYOND,       /* next points past the table */
    NEXT_FFFF,         /* next is 0xffff */
    WHOLE_TABLE,       /* a chain through all RING_SIZE descriptors */
    ADDR_ZERO,         /* a buffer at guest-physical 0 (nothing there) */
    ADDR_RAM_END,      /* a buffer at the first byte past RAM */
    ADDR_STRADDLE,     /* a buffer that starts in RAM and ends past it (device-read only) */
    ADDR_FAR,          /* a buffer at 0xffff_ffff_ffff_f000 (address + length wraps) */
    ADDR_UART,         /* a buffer on the PL011 */
    ADDR_VIRTIO,       /* a buffer on the device's own registers */
    LEN_ZERO,          /* a buffer of length 0 */
    LEN_HUGE,          /* a buffer of length 0xffffffff */
    WRONG_WAY,         /* a device-readable buffer where the device writes, or the reverse */
    INDIRECT,          /* the request in an indirect table (INDIRECT_DESC not negotiated) */
    INDIRECT_LOOP,     /* an indirect table whose chain loops */
    INDIRECT_NESTED,   /* an indirect descriptor inside an indirect table */
    INDIRECT_ODD,      /* an indirect table of 24 bytes (not a multiple of 16) */
    INDIRECT_HUGE,     /* an indirect table of 0xfffffff0 bytes */
    INDIRECT_UART,     /* an indirect table on the PL011 */
    INDIRECT_LONG,     /* an indirect table of 65535 one-byte buffers */
    RINGS_OVERLAP,     /* descriptor table, available and used ring at one address */
    ATTACKS
};

static const char *attack_name(enum attack a, uint16_t size, char *buf, size_t n) {
    switch (a) {
    case AVAIL_SIZE_PLUS_1: snprintf(buf, n, "avail idx %u", size + 1u); return buf;
    case AVAIL_8000: return "avail idx 0x8000";
    case AVAIL_FFFF: return "avail idx 0xffff";
    case AVAIL_BACKWARDS: return "avail idx backwards";
    case HEAD_SIZE: snprintf(buf, n, "chain head %u", size); return buf;
    case HEAD_FFFF: return "chain head 0xffff";
    case LOOP_SELF: return "chain looping on itself";
    case LOOP_HEAD: return "chain looping to its head";
    case NEXT_BEYOND: snprintf(buf, n, "next %u beyond the table", size + 7u); return buf;
    case NEXT_FFFF: return "next 0xffff";
    case WHOLE_TABLE: snprintf(buf, n, "chain of %u descriptors", size); return buf;
    case ADDR_ZERO: return "buffer at 0";
    case ADDR_RAM_END: return "buffer at the end of RAM";
    case ADDR_STRADDLE: return "buffer across the end of RAM";
    case ADDR_FAR: return "buffer at 0xfffffffffffff000";
    case ADDR_UART: return "buffer on the UART";
    case ADDR_VIRTIO: return "buffer on its own registers";
    case LEN_ZERO: return "length 0";
    case LEN_HUGE: return "length 0xffffffff";
    case WRONG_WAY: return "buffer in the wrong direction";
    case INDIRECT: return "indirect without the feature";
    case INDIRECT_LOOP: return "indirect table looping";
    case INDIRECT_NESTED: return "indirect inside indirect";
    case INDIRECT_ODD: return "indirect table of 24 bytes";
    case INDIRECT_HUGE: return "indirect table of 0xfffffff0 bytes";
    case INDIRECT_UART: return "indirect table on the UART";
    case INDIRECT_LONG: return "indirect table of 65535 buffers";
    case RINGS_OVERLAP: return "rings on top of each other";
    case ATTACKS: break;
    }
    return "?";
}

/* Copies the request chain (descriptors 0..n-1) into an indirect table at `table`. */
static void chain_to_table(struct vq *q, struct desc *table, unsigned n) {
    for (unsigned i = 0; i < n; i++) {
        table[i].addr = q->desc[i].addr;
        table[i].len = q->desc[i].len;
        table[i].flags = q->desc[i].flags;
        table[i].next = q->desc[i].next;
    }
}

/* Whether `a` is an index or head attack, after which the device must need a reset. */
static int breaks_ring(enum attack a) { return a <= HEAD_FFFF; }
static int heads_only(enum attack a) { return a == HEAD_SIZE || a == HEAD_FFFF; }
/* Whether `a` moves the payload buffer wholly outside RAM (or onto MMIO). */
static int outside_ram(enum attack a) {
    return a == ADDR_ZERO || a == ADDR_RAM_END || a == ADDR_FAR || a == ADDR_UART || a == ADDR_VIRTIO;
}

static void attack_queue(struct dev *d, unsigned qi, enum attack a) {
    struct vq *q = &d->q[qi];
    char namebuf[48], what[80], observed[160], bad[160] = "";
    int writes = device_writes(d, qi);

    /* A buffer across the end of RAM is only offered to be read: a device writing the part
     * inside RAM would scribble on the guest's last bytes, which this program does not own. */
    if (a == ADDR_STRADDLE && (writes || d->id == VIRTIO_ID_BLOCK)) return;
    /* "Backwards" needs one request served first: not on a queue without input. */
    if (a == AVAIL_BACKWARDS && needs_input(d, qi) && !can_provoke(d, qi)) return;

    start_layout(d, a == RINGS_OVERLAP ? (int)qi : -1);
    snprintf(what, sizeof what, "q%u %s", qi, attack_name(a, q->size, namebuf, sizeof namebuf));
    unsigned p;
    unsigned n = build_request(d, qi, &p);
    volatile struct desc *pd = &q->desc[p];
    struct desc *table = (struct desc *)(q->spare + 0x400);
    uint16_t head = 0, idx = 1, used_before = 0;

    switch (a) {
    case AVAIL_SIZE_PLUS_1: idx = q->size + 1; break;
    case AVAIL_8000: idx = 0x8000; break;
    case AVAIL_FFFF: idx = 0xffff; break;
    case AVAIL_BACKWARDS: {
        offer(q, 0, 0, 1);
        notify(d, qi);
        if (can_provoke(d, qi)) provoke(d);
        struct seen s = wait_for(d, qi, 0, 3000);
        if (s.what != RETURNED) {
            describe(observed, sizeof observed, s, 3000);
            verdict(d, what, observed, "the first, well-formed request was not answered");
            return;
        }
        idx = 0;
        used_before = 1;
        break;
    }
    case HEAD_SIZE: head = q->size; break;
    case HEAD_FFFF: head = 0xffff; break;
    case LOOP_SELF: q->desc[n - 1].flags |= VRING_DESC_F_NEXT, q->desc[n - 1].next = (uint16_t)(n - 1); break;
    case LOOP_HEAD: q->desc[n - 1].flags |= VRING_DESC_F_NEXT, q->desc[n - 1].next = 0; break;
    case NEXT_BEYOND: q->desc[n - 1].flags |= VRING_DESC_F_NEXT, q->desc[n - 1].next = q->size + 7; break;
    case NEXT_FFFF: q->desc[n - 1].flags |= VRING_DESC_F_NEXT, q->desc[n - 1].next = 0xffff; break;
    case WHOLE_TABLE:
        /* From the payload on, every descriptor is a one-byte piece of the payload. */
        for (unsigned i = p; i < q->size; i++)
            set_desc(q, i, pd->addr, 1, (uint16_t)((pd->flags & VRING_DESC_F_WRITE) | VRING_DESC_F_NEXT),
                     (uint16_t)(i + 1));
        q->desc[q->size - 1].flags &= (uint16_t)~VRING_DESC_F_NEXT;
        break;
    case ADDR_ZERO: pd->addr = 0; break;
    case ADDR_RAM_END: pd->addr = ram_end; break;
    case ADDR_STRADDLE: pd->addr = ram_end - 8; pd->len = 64; break;
    case ADDR_FAR: pd->addr = 0xfffffffffffff000ull; pd->len = 0x2000; break;
    case ADDR_UART: pd->addr = UART_BASE; break;
    case ADDR_VIRTIO: pd->addr = VIRTIO_BASE + d->slot * VIRTIO_SLOT; break;
    case LEN_ZERO: pd->len = 0; break;
    case LEN_HUGE: pd->addr = big.pa; pd->len = HUGE_LEN; break;
    case WRONG_WAY: pd->flags ^= VRING_DESC_F_WRITE; break;
    case INDIRECT:
        chain_to_table(q, table, n);
        set_desc(q, 0, pa(table), 16 * n, VRING_DESC_F_INDIRECT, 0);
        break;
    case INDIRECT_LOOP:
        chain_to_table(q, table, n);
        table[n - 1].flags |= VRING_DESC_F_NEXT;
        table[n - 1].next = 0;
        set_desc(q, 0, pa(table), 16 * n, VRING_DESC_F_INDIRECT, 0);
        break;
    case INDIRECT_NESTED:
        table[0] = (struct desc){pa(table), 16, VRING_DESC_F_INDIRECT, 0};
        set_desc(q, 0, pa(table), 16, VRING_DESC_F_INDIRECT, 0);
        break;
    case INDIRECT_ODD:
        chain_to_table(q, table, n);
        set_desc(q, 0, pa(table), 24, VRING_DESC_F_INDIRECT, 0);
        break;
    case INDIRECT_HUGE: set_desc(q, 0, pa(table), 0xfffffff0u, VRING_DESC_F_INDIRECT, 0); break;
    case INDIRECT_UART: set_desc(q, 0, UART_BASE, 16 * n, VRING_DESC_F_INDIRECT, 0); break;
    case INDIRECT_LONG: {
        /* 65535 entries fill 1 MiB of the big page: the request's leading descriptors
         * (the block header), then one-byte pieces of a buffer in the big page. */
        struct desc *t = (struct desc *)big.va;
        chain_to_table(q, t, p);
        uint16_t flags = (uint16_t)((pd->flags & VRING_DESC_F_WRITE) | VRING_DESC_F_NEXT);
        for (unsigned i = p; i < 0xffff; i++) t[i] = (struct desc){big.pa + 0x180000, 1, flags, (uint16_t)(i + 1)};
        t[0xfffe].flags &= (uint16_t)~VRING_DESC_F_NEXT;
        if (p) t[p - 1].next = (uint16_t)p;
        set_desc(q, 0, big.pa, 16 * 0xffff, VRING_DESC_F_INDIRECT, 0);
        break;
    }
    case RINGS_OVERLAP: break; /* the layout is the attack; the request sits in the overlap */
    case ATTACKS: return;
    }

    if (a == RINGS_OVERLAP) {
        /* Writing the available ring rewrites descriptor 0 (head 0 is then a descriptor
         * whose address is 0x10000: not RAM); whatever the device writes in the used ring
         * rewrites both. Only the check after the reset says anything. */
        offer(q, 0, 0, 1);
        notify(d, qi);
        if (can_provoke(d, qi)) provoke(d);
        usleep(300 * 1000);
        snprintf(observed, sizeof observed, "status %#x", rd(d, VIRTIO_MMIO_STATUS));
        verdict(d, what, observed, NULL);
        return;
    }

    offer(q, used_before, head, idx);
    notify(d, qi);
    if (can_provoke(d, qi)) provoke(d);
    /* A receive queue without input keeps its chains: wait less for nothing to happen. */
    int quiet_ok = needs_input(d, qi) && !can_provoke(d, qi);
    unsigned timeout = quiet_ok && !(breaks_ring(a) && !heads_only(a)) ? 100 : 3000;
    struct seen s = wait_for(d, qi, used_before, timeout);
    describe(observed, sizeof observed, s, timeout);

    if (breaks_ring(a) && !(heads_only(a) && quiet_ok)) {
        /* The device must declare itself broken, with a configuration interrupt. */
        if (s.what != NEEDS_RESET || !(s.isr & VIRTIO_MMIO_INT_CONFIG))
            snprintf(bad, sizeof bad, "expected DEVICE_NEEDS_RESET and a configuration interrupt");
    } else if (s.what == NOTHING && !quiet_ok) {
        snprintf(bad, sizeof bad, "the device neither returned the chain nor asked for a reset");
    } else if (s.what == RETURNED && writes && outside_ram(a) && s.len) {
        /* The only buffer was outside RAM: nothing can have been written into it. */
        snprintf(bad, sizeof bad, "the device claims %u bytes written into a buffer outside RAM", s.len);
    }
    verdict(d, what, observed, bad[0] ? bad : NULL);
}

/* ------------------------------------------------------------------------------------ */
/* Attack 3: reset with requests in flight                                               */
/* ------------------------------------------------------------------------------------ */

/* Fills the queue with well-formed requests (for the block device: 80 reads of 1 MiB   */
/* each, into the big page), notifies, and writes Status 0 at once. After the reset     */
/* returns, the device must not write guest memory any more: the used ring and the      */
/* buffers are compared with a snapshot 300 ms later.                                   */
static void attack_reset_in_flight(struct dev *d) {
    unsigned qi = two_way(d->id) ? 1 : 0;
    struct vq *q = &d->q[qi];
    start(d);
    unsigned requests = 0;
    switch (d->id) {
    case VIRTIO_ID_BLOCK:
        for (unsigned i = 0; i < 80; i++) {
            struct virtio_blk_outhdr *h = (struct virtio_blk_outhdr *)(q->spare + 16 * i);
            h->type = VIRTIO_BLK_T_IN;
            h->ioprio = 0;
            h->sector = (i % 16) * 2048; /* 1 MiB steps through the first 16 MiB */
            q->spare[0x800 + i] = 0xff;
            set_desc(q, 3 * i, pa(h), sizeof *h, VRING_DESC_F_NEXT, (uint16_t)(3 * i + 1));
            set_desc(q, 3 * i + 1, big.pa, 1u << 20, VRING_DESC_F_WRITE | VRING_DESC_F_NEXT, (uint16_t)(3 * i + 2));
            set_desc(q, 3 * i + 2, pa(q->spare + 0x800 + i), 1, VRING_DESC_F_WRITE, 0);
            q->avail[2 + i] = (uint16_t)(3 * i);
            requests++;
        }
        break;
    case VIRTIO_ID_NET:
        /* Broadcast frames of a local experimental ethertype: the host answers none. */
        for (unsigned i = 0; i < q->size - 1u; i++) {
            uint8_t *f = q->buf + 128 * (i % 256);
            memset(f, 0, VNET_HDR_LEN + 60);
            memset(f + VNET_HDR_LEN, 0xff, 6);
            f[VNET_HDR_LEN + 12] = 0x88, f[VNET_HDR_LEN + 13] = 0xb5;
            set_desc(q, i, pa(f), VNET_HDR_LEN + 60, 0, 0);
            q->avail[2 + i] = (uint16_t)i;
            requests++;
        }
        break;
    case VIRTIO_ID_CONSOLE:
        for (unsigned i = 0; i < q->size - 1u; i++) {
            char *line = (char *)q->buf + 64 * i;
            int len = snprintf(line, 64, "virtio-attack: in flight %u\n", i);
            set_desc(q, i, pa(line), (uint32_t)len, 0, 0);
            q->avail[2 + i] = (uint16_t)i;
            requests++;
        }
        break;
    case VIRTIO_ID_INPUT:
        /* Status events (EV_LED) for the device to read and return. */
        for (unsigned i = 0; i < q->size - 1u; i++) {
            uint8_t *e = q->buf + 8 * i;
            memset(e, 0, 8);
            e[0] = 0x11;
            set_desc(q, i, pa(e), 8, 0, 0);
            q->avail[2 + i] = (uint16_t)i;
            requests++;
        }
        break;
    case VIRTIO_ID_RNG:
        for (unsigned i = 0; i < q->size - 1u; i++) {
            set_desc(q, i, big.pa + 0x1000 * i, 0x1000, VRING_DESC_F_WRITE, 0);
            q->avail[2 + i] = (uint16_t)i;
            requests++;
        }
        break;
    }
    wmb();
    q->avail[1] = (uint16_t)requests;
    notify(d, qi);
    /* Reset once the device is busy: when it has returned its first request (virtio-rng,
     * which serves on the notifying vCPU, has returned them all by now). */
    for (double until = now() + 3; used_idx(q) == 0 && now() < until;) continue;
    double t0 = now();
    reset(d);
    double took = now() - t0;
    uint16_t done = used_idx(q);
    /* Snapshot what the device may write: the used ring, the buffers. */
    static uint8_t used_copy[0x1000], data_copy[0x10000], big_copy[1u << 20];
    memcpy(used_copy, (const void *)q->used, sizeof used_copy);
    memcpy(data_copy, q->spare, 0x1000);
    memcpy(big_copy, big.va, sizeof big_copy);
    usleep(300 * 1000);
    int changed = memcmp(used_copy, (const void *)q->used, sizeof used_copy) ||
                  memcmp(data_copy, q->spare, 0x1000) || memcmp(big_copy, big.va, sizeof big_copy);
    char what[64], observed[200];
    snprintf(what, sizeof what, "q%u reset with %u requests in flight", qi, requests);
    snprintf(observed, sizeof observed, "reset took %.0f ms, %u of them done by then, %s", took * 1e3, done,
             changed ? "MEMORY WRITTEN AFTER IT" : "no writes after");
    verdict(d, what, observed, changed ? "the device wrote guest memory after the reset" : NULL);
}

/* ------------------------------------------------------------------------------------ */
/* Attack 4: the notify storm                                                            */
/* ------------------------------------------------------------------------------------ */

static unsigned long storm_per_dev = 1000000;
static double storm_secs_budget = 60;
/* Seconds after the program started by which the attacks should be done (0: no limit): */
/* the storm gets less time when the rest took longer (the rig's speed varies with the  */
/* load on the machine running it), but never under 15 s.                              */
static double deadline;
static unsigned long storm_total;
static double storm_secs;

/* QueueNotify writes to one device, until `storm_per_dev` or its share of the storm's  */
/* time budget (each write traps to hvrun: under nested emulation, that is what takes   */
/* the time). 16 in 18 go to the device's real queues while it runs with empty rings, 2 */
/* in 18 to queues that do not exist; then a ninth more while it needs a reset (after a */
/* runaway index) and as many while it is stopped. Nothing of it may cost hvrun memory. */
static void attack_storm(struct dev *d, double share) {
    static const uint32_t nowhere[] = {2, 7, 0xffff, 0x10000, 0xffffffff};
    volatile uint8_t *reg = d->regs + VIRTIO_MMIO_QUEUE_NOTIFY;
    unsigned long running = 0, missing = 0;
    start(d);
    double t0 = now(), stop_at = t0 + share * 0.9;
    while (running + missing < storm_per_dev * 9 / 10 && now() < stop_at)
        for (int i = 0; i < 900; i++) {
            if (i % 9 == 8) w32(reg, nowhere[missing++ % 5]);
            else w32(reg, (uint32_t)(running++ % d->nq));
        }
    uint32_t before_fail = rd(d, VIRTIO_MMIO_STATUS);
    unsigned long failed = (running + missing) / 18, stopped = failed;
    offer(&d->q[0], 0, 0, 0x8000);
    notify(d, 0);
    uint32_t broken = 0;
    for (int i = 0; i < 3000 && !(broken & VIRTIO_CONFIG_S_NEEDS_RESET); i++) {
        broken = rd(d, VIRTIO_MMIO_STATUS);
        if (!(broken & VIRTIO_CONFIG_S_NEEDS_RESET)) usleep(1000);
    }
    for (unsigned long i = 0; i < failed; i++) w32(reg, (uint32_t)(i % d->nq));
    reset(d);
    for (unsigned long i = 0; i < stopped; i++) w32(reg, (uint32_t)(i % d->nq));
    double took = now() - t0;
    unsigned long count = running + missing + failed + stopped + 1;
    storm_total += count;
    storm_secs += took;
    char observed[200], bad[120] = "";
    snprintf(observed, sizeof observed,
             "%lu QueueNotify writes in %.1f s (%.0f us each): %lu running, %lu to missing queues, "
             "%lu needing a reset, %lu stopped",
             count, took, took * 1e6 / (double)count, running, missing, failed, stopped);
    if (before_fail != 0xf) snprintf(bad, sizeof bad, "the storm on empty rings broke the device (status %#x)", before_fail);
    else if (!(broken & VIRTIO_CONFIG_S_NEEDS_RESET)) snprintf(bad, sizeof bad, "the runaway index went unnoticed");
    verdict(d, "notify storm", observed, bad[0] ? bad : NULL);
}

/* ------------------------------------------------------------------------------------ */

static void parse_ip(const char *s, uint32_t *out) {
    struct in_addr a;
    if (inet_pton(AF_INET, s, &a) != 1) die("bad IPv4 address %s", s);
    *out = a.s_addr;
}

/* The phases to run (--only registers,rings,resets,storm; all by default). */
static const char *only;
static int phase(const char *name) { return !only || strstr(only, name); }

int main(int argc, char **argv) {
    double program_start = now();
    setvbuf(stdout, NULL, _IOLBF, 0);
    parse_ip("10.0.5.1", &arp_target);
    parse_ip("10.0.5.2", &guest_ip);
    for (int i = 1; i < argc; i++) {
        if (!strcmp(argv[i], "--storm") && i + 1 < argc) storm_per_dev = strtoul(argv[++i], NULL, 0);
        else if (!strcmp(argv[i], "--storm-secs") && i + 1 < argc) storm_secs_budget = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--deadline") && i + 1 < argc) deadline = strtod(argv[++i], NULL);
        else if (!strcmp(argv[i], "--only") && i + 1 < argc) only = argv[++i];
        else if (!strcmp(argv[i], "--arp-target") && i + 1 < argc) parse_ip(argv[++i], &arp_target);
        else if (!strcmp(argv[i], "--guest-ip") && i + 1 < argc) parse_ip(argv[++i], &guest_ip);
        else die("usage: virtio-attack [--storm N] [--storm-secs S] [--deadline S] [--only PHASES] [--arp-target IP] "
                 "[--guest-ip IP]");
    }
    find_ram();
    get_pools();
    discover();
    for (unsigned long i = 0; i < CANARY_LEN; i++) small.va[CANARY_AT + i] = (uint8_t)(i * 7 + 1);
    touch_guest_ram();
    say("RAM %#" PRIx64 "-%#" PRIx64 ", rings and buffers at %#" PRIx64 " and %#" PRIx64, ram_start, ram_end,
        small.pa, big.pa);

    /* Each device works before anything is tried on it. */
    for (unsigned i = 0; i < ndevs; i++) {
        char got[160];
        if (!works(&devs[i], got, sizeof got)) die("%s does not work before the attacks: %s", devs[i].name, got);
        say("%s works: %s", devs[i].name, got);
    }

    say("attack starts");
    sleep(3); /* the rig samples hvrun's memory now */
    double t0 = now(), t = t0;
    if (phase("registers")) {
        for (unsigned i = 0; i < ndevs; i++) attack_registers(&devs[i]);
        say("registers attacked in %.1f s", now() - t);
    }
    if (phase("rings")) {
        t = now();
        for (unsigned i = 0; i < ndevs; i++)
            for (unsigned qi = 0; qi < devs[i].nq; qi++)
                for (int a = 0; a < ATTACKS; a++) attack_queue(&devs[i], qi, (enum attack)a);
        say("rings and chains attacked in %.1f s", now() - t);
    }
    if (phase("resets")) {
        t = now();
        for (unsigned i = 0; i < ndevs; i++) attack_reset_in_flight(&devs[i]);
        say("resets in flight done in %.1f s", now() - t);
    }
    if (phase("storm")) {
        double storm_time = storm_secs_budget;
        if (deadline > 0 && deadline - (now() - program_start) - 10 < storm_time)
            storm_time = deadline - (now() - program_start) - 10;
        if (storm_time < 15) storm_time = 15;
        say("notify storm: %.0f s for it", storm_time);
        for (unsigned i = 0; i < ndevs; i++) attack_storm(&devs[i], storm_time / ndevs);
        say("notify storm: %lu QueueNotify writes in %.1f s in all (%.0f us each)", storm_total, storm_secs,
            storm_secs * 1e6 / (double)(storm_total ? storm_total : 1));
    }

    for (unsigned long i = 0; i < CANARY_LEN; i++)
        if (small.va[CANARY_AT + i] != (uint8_t)(i * 7 + 1)) {
            attacks_failed++;
            say("FAIL: memory never given to a device was written (canary byte %lu)", i);
            break;
        }

    /* The last word: a well-formed virtio-rng request must still be answered. */
    struct dev *rng = NULL;
    for (unsigned i = 0; i < ndevs; i++)
        if (devs[i].id == VIRTIO_ID_RNG) rng = &devs[i];
    if (!rng) die("no virtio-rng device");
    char got[160];
    if (works(rng, got, sizeof got)) {
        say("final rng request answered: %s", got);
    } else {
        attacks_failed++;
        say("FAIL: the final rng request was not answered: %s", got);
    }
    say("attacks done: %u attacks on %u devices in %.0f s, %u failed", attacks_run, ndevs, now() - t0,
        attacks_failed);
    sleep(3); /* the rig samples hvrun's memory again */
    return attacks_failed ? 1 : 0;
}

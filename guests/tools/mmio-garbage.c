/*
 * Writes garbage to every register offset of the GIC and the UART, at every width,
 * through /dev/mem, then powers the machine off. hvrun must survive all of it: the
 * guest is hostile. Needs `iomem=relaxed` on the guest's command line (the drivers own
 * these regions).
 */
#include <fcntl.h>
#include <stdint.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/reboot.h>
#include <unistd.h>

static const struct { const char *name; unsigned long base, size; } regions[] = {
    { "gic-distributor", 0x08000000, 0x1000 },
    { "gic-cpu-interface", 0x08010000, 0x2000 },
    { "pl011", 0x09000000, 0x1000 },
};

static uint64_t seed = 0x9e3779b97f4a7c15ull;
static uint64_t next(void) {
    seed ^= seed << 13; seed ^= seed >> 7; seed ^= seed << 17;
    return seed;
}

int main(void) {
    int fd = open("/dev/mem", O_RDWR | O_SYNC);
    if (fd < 0) { perror("mmio-garbage: /dev/mem"); return 1; }
    unsigned long accesses = 0;
    for (unsigned r = 0; r < sizeof regions / sizeof regions[0]; r++) {
        volatile uint8_t *p = mmap(0, regions[r].size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, regions[r].base);
        if (p == MAP_FAILED) { perror("mmio-garbage: mmap"); return 1; }
        printf("mmio-garbage: %s at %#lx\n", regions[r].name, regions[r].base);
        fflush(stdout);
        for (unsigned long off = 0; off < regions[r].size; off++) {
            uint64_t v = (off & 1) ? next() : ~0ull;
            volatile uint64_t sink;
            p[off] = (uint8_t)v; sink = p[off]; accesses += 2;
            if (off % 2 == 0) { *(volatile uint16_t *)(p + off) = (uint16_t)v; sink = *(volatile uint16_t *)(p + off); accesses += 2; }
            if (off % 4 == 0) { *(volatile uint32_t *)(p + off) = (uint32_t)v; sink = *(volatile uint32_t *)(p + off); accesses += 2; }
            if (off % 8 == 0) { *(volatile uint64_t *)(p + off) = v; sink = *(volatile uint64_t *)(p + off); accesses += 2; }
            (void)sink;
        }
    }
    /* The console may be unusable now (the UART and GIC hold garbage): say it through
     * the kernel log, whose console output polls the UART. */
    int kmsg = open("/dev/kmsg", O_WRONLY);
    if (kmsg >= 0) {
        char line[96];
        int n = snprintf(line, sizeof line, "<2>mmio-garbage: %lu accesses done, powering off\n", accesses);
        write(kmsg, line, n);
    }
    sync();
    reboot(RB_POWER_OFF);
    return 1;
}

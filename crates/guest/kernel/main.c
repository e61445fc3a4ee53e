/*
 * livemig workload guest.
 *
 * Writes stamped pages at a paced rate from every worker vCPU, keeps a generation per page so
 * it can check that memory holds what it last wrote, prints a heartbeat on COM1 and answers a
 * verify command from its VMM. Parameters come from the PVH command line (key=value, spaces).
 */
#include "abi.h"
#include "guest.h"

#define MIB (1024ULL * 1024)
#define GIB (1024ULL * MIB)
#define MAX_CPUS 64
#define MAX_SEGS 8
#define AP_STACK 16384
#define TRAMPOLINE_BASE 0x10000ULL
#define LAPIC_BASE 0xFEE00000ULL
#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xFF

struct hvm_start_info {
    u32 magic, version, flags, nr_modules;
    u64 modlist_paddr, cmdline_paddr, rsdp_paddr, memmap_paddr;
    u32 memmap_entries, reserved;
};
struct hvm_memmap_entry {
    u64 addr, size;
    u32 type, reserved;
};

extern char __image_end[];
extern char trampoline_start[], trampoline_end[];
extern u64 pdpt[512];
extern u64 ap_boot_stack;
extern const u64 exception_stubs[22];
extern char lapic_timer_isr[], spurious_isr[];

/* ---- low level ---- */
static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* One string instruction each, not a loop of thousands: where guests run by instruction
 * emulation, clearing a disk block's buffer per byte made a disk verify outlast its timeout. */
void *memset(void *d, int c, size_t n) {
    void *r = d;
    __asm__ volatile("rep stosb" : "+D"(d), "+c"(n) : "a"(c) : "memory");
    return r;
}
void *memcpy(void *d, const void *s, size_t n) {
    void *r = d;
    __asm__ volatile("rep movsb" : "+D"(d), "+S"(s), "+c"(n) : : "memory");
    return r;
}

/* ---- console ---- */
static volatile u32 print_lock;
static void lock(volatile u32 *l) { while (__atomic_exchange_n(l, 1, __ATOMIC_ACQUIRE)) cpu_relax(); }
static void unlock(volatile u32 *l) { __atomic_store_n(l, 0, __ATOMIC_RELEASE); }

static void putc_raw(char c) {
    for (int i = 0; i < 100000 && !(inb(0x3f8 + 5) & 0x20); i++) cpu_relax();
    outb(0x3f8, (u8)c);
}
static void puts_raw(const char *s) {
    while (*s) {
        if (*s == '\n') putc_raw('\r');
        putc_raw(*s++);
    }
}
static char *fmt_u64(char *end, u64 v, int base) {
    *--end = 0;
    do {
        *--end = "0123456789abcdef"[v % base];
        v /= base;
    } while (v);
    return end;
}
/* Minimal printf: %s %u (u64) %x (u64, 0x-prefixed). */
void print(const char *fmt, ...) {
    __builtin_va_list ap;
    char buf[24];
    __builtin_va_start(ap, fmt);
    lock(&print_lock);
    for (const char *f = fmt; *f; f++) {
        if (*f != '%') {
            if (*f == '\n') putc_raw('\r');
            putc_raw(*f);
            continue;
        }
        f++;
        if (*f == 's') puts_raw(__builtin_va_arg(ap, const char *));
        else if (*f == 'u') puts_raw(fmt_u64(buf + sizeof buf, __builtin_va_arg(ap, u64), 10));
        else if (*f == 'x') {
            puts_raw("0x");
            puts_raw(fmt_u64(buf + sizeof buf, __builtin_va_arg(ap, u64), 16));
        }
    }
    unlock(&print_lock);
    __builtin_va_end(ap);
}

void report(u32 status, u64 payload) {
    outl(PORT_RESULT_LO, (u32)payload);
    outl(PORT_RESULT_HI, (u32)(payload >> 32));
    outl(PORT_RESULT, status);
}

static void halt_forever(void) {
    for (;;) __asm__ volatile("cli; hlt");
}

void exception_handler(u64 *frame) {
    u64 cr2;
    __asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
    print("PANIC exception=%u error=%x rip=%x cr2=%x\n", frame[0], frame[1], frame[2], cr2);
    report(RESULT_PANIC, frame[2]);
    halt_forever();
}

/* ---- parameters ---- */
enum pattern { PAT_SEQ, PAT_UNIFORM, PAT_ZIPF };
static struct {
    u64 ws_bytes, ws_off, rate, seed, tsc_khz, hb_ms;
    struct devices_cfg dev;
    u32 vcpus, workers, burst, hot_pct, hot_write_pct;
    enum pattern pattern;
    int rate_max, style_burst;
} cfg;

static int streq(const char *a, const char *b, size_t n) {
    for (size_t i = 0; i < n; i++)
        if (a[i] != b[i]) return 0;
    return b[n] == 0;
}
/* Decimal with an optional K/M/G suffix (powers of 1024). */
static u64 parse_num(const char *s, size_t n) {
    u64 v = 0;
    size_t i = 0;
    for (; i < n && s[i] >= '0' && s[i] <= '9'; i++) v = v * 10 + (u64)(s[i] - '0');
    if (i < n) {
        if (s[i] == 'K' || s[i] == 'k') v <<= 10;
        else if (s[i] == 'M' || s[i] == 'm') v <<= 20;
        else if (s[i] == 'G' || s[i] == 'g') v <<= 30;
    }
    return v;
}
/* A.B.C.D/N */
static void parse_ip(const char *s, size_t n, u32 *ip, u32 *prefix) {
    u32 v = 0, part = 0, dots = 0;
    size_t i = 0;
    for (; i < n && s[i] != '/'; i++) {
        if (s[i] == '.') {
            v = (v << 8) | (part & 0xff);
            part = 0;
            dots++;
        } else if (s[i] >= '0' && s[i] <= '9') part = part * 10 + (u32)(s[i] - '0');
    }
    v = (v << 8) | (part & 0xff);
    if (dots != 3) return;
    *ip = v;
    *prefix = i < n ? (u32)parse_num(s + i + 1, n - i - 1) : 24;
}
static void apply_param(const char *k, size_t kn, const char *v, size_t vn) {
    u64 n = parse_num(v, vn);
    if (streq(k, "ws", kn)) cfg.ws_bytes = n;
    else if (streq(k, "wsoff", kn)) cfg.ws_off = n;
    else if (streq(k, "rate", kn)) {
        cfg.rate_max = streq(v, "max", vn);
        cfg.rate = n;
    } else if (streq(k, "seed", kn)) cfg.seed = n;
    else if (streq(k, "tsc_khz", kn)) cfg.tsc_khz = n;
    else if (streq(k, "hb_ms", kn)) cfg.hb_ms = n;
    else if (streq(k, "disk", kn)) cfg.dev.disk_rate = n;
    else if (streq(k, "disk_blocks", kn)) cfg.dev.disk_blocks = n;
    else if (streq(k, "ip", kn)) parse_ip(v, vn, &cfg.dev.ip, &cfg.dev.prefix);
    else if (streq(k, "vcpus", kn)) cfg.vcpus = (u32)n;
    else if (streq(k, "workers", kn)) cfg.workers = (u32)n;
    else if (streq(k, "burst", kn)) cfg.burst = (u32)n;
    else if (streq(k, "hot", kn)) cfg.hot_pct = (u32)n;
    else if (streq(k, "hotw", kn)) cfg.hot_write_pct = (u32)n;
    else if (streq(k, "style", kn)) cfg.style_burst = streq(v, "burst", vn);
    else if (streq(k, "pattern", kn)) {
        if (streq(v, "seq", vn)) cfg.pattern = PAT_SEQ;
        else if (streq(v, "uniform", vn)) cfg.pattern = PAT_UNIFORM;
        else cfg.pattern = PAT_ZIPF;
    }
}
static void parse_cmdline(const char *s) {
    cfg.ws_bytes = 64 * MIB;
    cfg.rate = 1000;
    cfg.seed = 1;
    cfg.hb_ms = 250;
    cfg.vcpus = 1;
    cfg.workers = 0;
    cfg.burst = 0;
    cfg.hot_pct = 10;
    cfg.hot_write_pct = 90;
    cfg.pattern = PAT_ZIPF;
    if (!s) return;
    while (*s) {
        while (*s == ' ') s++;
        const char *k = s;
        while (*s && *s != '=' && *s != ' ') s++;
        size_t kn = (size_t)(s - k);
        if (*s != '=') continue;
        const char *v = ++s;
        while (*s && *s != ' ') s++;
        apply_param(k, kn, v, (size_t)(s - v));
    }
    if (cfg.vcpus < 1) cfg.vcpus = 1;
    if (cfg.vcpus > MAX_CPUS) cfg.vcpus = MAX_CPUS;
    if (cfg.workers == 0 || cfg.workers > cfg.vcpus) cfg.workers = cfg.vcpus;
    /* style=word writes one word a page; style=burst writes `burst` words (default 64). */
    if (!cfg.style_burst) cfg.burst = 1;
    else if (cfg.burst < 1) cfg.burst = 64;
    if (cfg.burst > PAGE / 8) cfg.burst = PAGE / 8;
    if (cfg.hot_pct < 1 || cfg.hot_pct > 100) cfg.hot_pct = 10;
    if (cfg.hot_write_pct > 100) cfg.hot_write_pct = 90;
    if (cfg.hb_ms < 10) cfg.hb_ms = 10;
}

/* ---- memory ---- */
struct seg {
    u64 first_page, phys, pages;
};
static struct seg segs[MAX_SEGS];
static u32 nsegs;
static u64 ram_top;
static u64 bump;

void *bump_alloc(u64 bytes) {
    u64 p = (bump + PAGE - 1) & ~(PAGE - 1);
    bump = p + ((bytes + PAGE - 1) & ~(PAGE - 1));
    return (void *)p;
}
static void zero_words(u64 *p, u64 words) {
    for (u64 i = 0; i < words; i++) p[i] = 0;
}

/* Maps RAM above the static 4 GiB identity map with 2 MiB pages. */
static void map_high(void) {
    u64 gibs = (ram_top + GIB - 1) / GIB;
    if (gibs > 512) gibs = 512;
    for (u64 g = 4; g < gibs; g++) {
        u64 *pd = bump_alloc(PAGE);
        for (u64 j = 0; j < 512; j++) pd[j] = (g * GIB + j * 2 * MIB) | 0x83;
        pdpt[g] = (u64)pd | 0x3;
    }
}

/* Lays the working set over the RAM above the guest's own allocations. */
static u64 build_segments(const struct hvm_start_info *si, u64 usable_base) {
    const struct hvm_memmap_entry *mm = (const void *)si->memmap_paddr;
    u64 skip = cfg.ws_off / PAGE, logical = 0, total = 0;
    for (u32 i = 0; i < si->memmap_entries && nsegs < MAX_SEGS; i++) {
        if (mm[i].type != 1) continue;
        u64 lo = mm[i].addr, hi = mm[i].addr + mm[i].size;
        if (hi <= usable_base) continue;
        if (lo < usable_base) lo = usable_base;
        lo = (lo + PAGE - 1) & ~(PAGE - 1);
        u64 pages = (hi - lo) / PAGE;
        if (skip >= pages) {
            skip -= pages;
            continue;
        }
        lo += skip * PAGE;
        pages -= skip;
        skip = 0;
        segs[nsegs].first_page = logical;
        segs[nsegs].phys = lo;
        segs[nsegs].pages = pages;
        nsegs++;
        logical += pages;
        total += pages;
    }
    return total;
}
static inline u64 *page_ptr(u64 idx) {
    if (nsegs == 1) return (u64 *)(segs[0].phys + idx * PAGE);
    for (u32 s = 0; s + 1 < nsegs; s++)
        if (idx < segs[s + 1].first_page) return (u64 *)(segs[s].phys + (idx - segs[s].first_page) * PAGE);
    return (u64 *)(segs[nsegs - 1].phys + (idx - segs[nsegs - 1].first_page) * PAGE);
}

/* ---- time ---- */
u64 tsc_khz;
static u64 lapic_per_ms;

static u64 calibrate_tsc_with_pit(void) {
    const u64 ms = 50;
    const u32 latch = (u32)(1193182ULL * ms / 1000);
    outb(0x61, (inb(0x61) & ~0x02) | 0x01);
    outb(0x43, 0xB0);
    outb(0x42, latch & 0xff);
    outb(0x42, latch >> 8);
    u64 t0 = rdtsc();
    while (!(inb(0x61) & 0x20)) cpu_relax();
    return (rdtsc() - t0) / ms;
}
static void lapic_enable(void) {
    lapic_write(0xF0, 0x100 | SPURIOUS_VECTOR);
    lapic_write(0x3E0, 0xB);
    lapic_write(0x320, TIMER_VECTOR);
}
static void calibrate_lapic(void) {
    lapic_write(0x380, 0xFFFFFFFF);
    u64 t0 = rdtsc();
    while (rdtsc() - t0 < tsc_khz * 10) cpu_relax();
    u32 left = lapic_read(0x390);
    lapic_write(0x380, 0);
    lapic_per_ms = (0xFFFFFFFFULL - left) / 10;
}
/* Sleeps with hlt on the LAPIC one-shot timer so an idle guest costs its host nothing. */
void sleep_until(u64 deadline) {
    for (;;) {
        u64 now = rdtsc();
        if (now >= deadline) return;
        /* A device interrupt ends the sleep of the vCPU that serves the devices. */
        if (irq_pending && lapic_read(0x20) == 0) return;
        if (!lapic_per_ms) {
            cpu_relax();
            continue;
        }
        u64 ticks = (deadline - now) * lapic_per_ms / tsc_khz;
        if (ticks < 1) ticks = 1;
        if (ticks > 0xFFFFFFF0ULL) ticks = 0xFFFFFFF0ULL;
        lapic_write(0x380, (u32)ticks);
        __asm__ volatile("sti; hlt; cli" ::: "memory");
    }
}

/* ---- interrupts ---- */
struct idt_entry {
    u16 off0, sel;
    u8 ist, type;
    u16 off1;
    u32 off2, zero;
} __attribute__((packed));
static struct idt_entry idt[256] __attribute__((aligned(16)));
static struct {
    u16 limit;
    u64 base;
} __attribute__((packed)) idt_ptr;

static void idt_set(int v, u64 handler) {
    idt[v].off0 = (u16)handler;
    idt[v].sel = 0x18;
    idt[v].ist = 0;
    idt[v].type = 0x8E;
    idt[v].off1 = (u16)(handler >> 16);
    idt[v].off2 = (u32)(handler >> 32);
    idt[v].zero = 0;
}
static void idt_load(void) { __asm__ volatile("lidt %0" ::"m"(idt_ptr)); }
static void idt_init(void) {
    for (int v = 0; v < 22; v++) idt_set(v, exception_stubs[v]);
    idt_set(TIMER_VECTOR, (u64)lapic_timer_isr);
    idt_set(SPURIOUS_VECTOR, (u64)spurious_isr);
    for (int v = 0; v < DEVICE_VECTORS; v++) idt_set(DEVICE_VECTOR_BASE + v, device_isrs[v]);
    idt_ptr.limit = sizeof idt - 1;
    idt_ptr.base = (u64)idt;
    idt_load();
}
/* Remap the legacy PICs away from the exception vectors and mask them: we poll, we don't take IRQs. */
static void pic_mask_all(void) {
    outb(0x20, 0x11); outb(0xA0, 0x11);
    outb(0x21, 0x20); outb(0xA1, 0x28);
    outb(0x21, 0x04); outb(0xA1, 0x02);
    outb(0x21, 0x01); outb(0xA1, 0x01);
    outb(0x21, 0xFF); outb(0xA1, 0xFF);
}

/* ---- workload ---- */
static u32 *gen;         /* generation last written, per working-set page; 0 = never */
static u64 ws_pages;
static volatile u32 park_request, parked, ap_started, ap_cpu_id;
/* Pages written per worker, for the heartbeat line (one writer each, read racily). */
static volatile u64 pages_written[MAX_CPUS];

u64 mix64(u64 x) {
    x ^= x >> 33;
    x *= 0xff51afd7ed558ccdULL;
    x ^= x >> 33;
    x *= 0xc4ceb9fe1a85ec53ULL;
    x ^= x >> 33;
    return x;
}
/* Unique per (page, generation, word) and cheap: under instruction emulation every
 * instruction on the write path costs about a microsecond. */
static u64 stamp_key;
static inline u64 stamp(u64 idx, u32 g, u32 word) {
    return stamp_key ^ (idx << 24) ^ g ^ ((u64)word << 56);
}

struct writer {
    u32 id;
    u64 first, stride, pages, hot_pages; /* pages idx = first + j * stride, j < pages */
    u64 rng, seq, start, written, rate, tsc_hz;
};

static inline u64 next_rand(struct writer *w) {
    w->rng ^= w->rng << 13;
    w->rng ^= w->rng >> 7;
    w->rng ^= w->rng << 17;
    return w->rng;
}
static inline __attribute__((always_inline)) void write_page(u64 idx) {
    u32 g = gen[idx] + 1;
    if (g == 0) g = 1;
    gen[idx] = g;
    u64 *p = page_ptr(idx);
    for (u32 w = 0; w < cfg.burst; w++) p[w] = stamp(idx, g, w);
}
static u64 total_written(void) {
    u64 t = 0;
    for (u32 i = 0; i < cfg.workers; i++) t += pages_written[i];
    return t;
}
/* r scaled into [0, n) by a multiply-high: no division on the write path. */
static inline u64 scale(u64 r, u64 n) { return (u64)(((unsigned __int128)r * n) >> 64); }
static u64 hot_threshold;
static inline __attribute__((always_inline)) u64 pick(struct writer *w) {
    u64 j;
    if (cfg.pattern == PAT_SEQ) {
        j = w->seq++;
        if (w->seq >= w->pages) w->seq = 0;
    } else if (cfg.pattern == PAT_UNIFORM || next_rand(w) >= hot_threshold) {
        j = scale(next_rand(w), w->pages);
    } else {
        j = scale(next_rand(w), w->hot_pages);
    }
    return w->first + j * w->stride;
}
/* Writes n pages. The common case (one RAM segment, one word a page, random picks) has its own
 * loop with everything in registers: about half the instructions of the general path. */
static void write_batch(struct writer *w, u64 n) {
    if (nsegs == 1 && cfg.burst == 1 && cfg.pattern != PAT_SEQ) {
        u64 *base = (u64 *)segs[0].phys;
        u32 *gn = gen;
        const u64 key = stamp_key, first = w->first, stride = w->stride;
        const u64 all = w->pages, hot = w->hot_pages, thr = hot_threshold;
        const int uniform = cfg.pattern == PAT_UNIFORM;
        u64 r = w->rng;
        for (u64 i = 0; i < n; i++) {
            u64 range = all;
            if (!uniform) {
                r ^= r << 13; r ^= r >> 7; r ^= r << 17;
                if (r < thr) range = hot;
            }
            r ^= r << 13; r ^= r >> 7; r ^= r << 17;
            u64 idx = first + scale(r, range) * stride;
            u32 g = gn[idx] + 1;
            if (!g) g = 1;
            gn[idx] = g;
            base[idx * (PAGE / 8)] = key ^ (idx << 24) ^ g; /* == stamp(idx, g, 0) */
        }
        w->rng = r;
        return;
    }
    for (u64 i = 0; i < n; i++) write_page(pick(w));
}

static void writer_init(struct writer *w, u32 id) {
    w->id = id;
    w->first = id;
    w->stride = cfg.workers;
    w->pages = ws_pages > id ? (ws_pages - id + cfg.workers - 1) / cfg.workers : 0;
    w->hot_pages = w->pages * cfg.hot_pct / 100;
    if (w->hot_pages == 0) w->hot_pages = 1;
    w->rng = mix64(cfg.seed + id + 1) | 1;
    w->seq = 0;
    w->rate = cfg.rate / cfg.workers;
    w->tsc_hz = tsc_khz * 1000;
    w->start = rdtsc();
    w->written = 0;
}
/* Writes what the pacing allows now; returns 0 to be called again at once, else when next due. */
static u64 writer_step(struct writer *w, u64 now) {
    if (!w->pages) return now + w->tsc_hz;
    if (cfg.rate_max) {
        write_batch(w, 64);
        pages_written[w->id] += 64;
        return 0;
    }
    if (!w->rate) return now + w->tsc_hz;
    /* Rebase once a second so the arithmetic cannot overflow; a backlog older than that is dropped. */
    while (now - w->start > w->tsc_hz) {
        w->start += w->tsc_hz;
        w->written = w->written > w->rate ? w->written - w->rate : 0;
    }
    u64 due = (now - w->start) * w->rate / w->tsc_hz;
    if (w->written < due) {
        u64 n = due - w->written;
        if (n > 64) n = 64;
        write_batch(w, n);
        w->written += n;
        pages_written[w->id] += n;
        return 0;
    }
    u64 next = w->start + (w->written + 1) * w->tsc_hz / w->rate;
    u64 min_sleep = now + tsc_khz; /* batch wake-ups to at most one a millisecond */
    return next > min_sleep ? next : min_sleep;
}
static void maybe_park(void) {
    if (!park_request) return;
    __atomic_add_fetch(&parked, 1, __ATOMIC_SEQ_CST);
    while (park_request) sleep_until(rdtsc() + tsc_khz);
    __atomic_sub_fetch(&parked, 1, __ATOMIC_SEQ_CST);
}

static void verify(void) {
    /* The disk's verdict goes first: the memory verdict completes a verify for the VMM. */
    devices_verify();
    park_request = 1;
    while (parked != cfg.workers - 1) sleep_until(rdtsc() + tsc_khz);
    u64 checked = 0, bad = 0, first_bad = 0;
    for (u64 idx = 0; idx < ws_pages; idx++) {
        if ((idx & 31) == 0) devices_serve();
        u32 g = gen[idx];
        if (!g) continue;
        checked++;
        u64 *p = page_ptr(idx);
        for (u32 w = 0; w < cfg.burst; w++) {
            if (p[w] != stamp(idx, g, w)) {
                if (!bad) first_bad = (u64)&p[w];
                bad++;
                break;
            }
        }
    }
    park_request = 0;
    if (bad) {
        print("VERIFY FAIL addr=%x bad=%u pages=%u\n", first_bad, bad, checked);
        report(RESULT_VERIFY_BAD, first_bad);
    } else {
        print("VERIFY OK pages=%u\n", checked);
        report(RESULT_VERIFY_OK, checked);
    }
}

void ap_main(void) {
    u32 id = ap_cpu_id;
    idt_load();
    lapic_enable();
    __atomic_store_n(&ap_started, 1, __ATOMIC_RELEASE);
    struct writer w;
    writer_init(&w, id);
    for (;;) {
        maybe_park();
        u64 next = writer_step(&w, rdtsc());
        if (next) sleep_until(next);
    }
}

static void delay_ms(u64 ms) { sleep_until(rdtsc() + ms * tsc_khz); }

static u32 start_aps(void) {
    u32 n = (u32)(trampoline_end - trampoline_start);
    memcpy((void *)TRAMPOLINE_BASE, trampoline_start, n);
    u32 started = 1;
    for (u32 cpu = 1; cpu < cfg.workers; cpu++) {
        ap_boot_stack = (u64)bump_alloc(AP_STACK) + AP_STACK;
        ap_cpu_id = cpu;
        ap_started = 0;
        barrier();
        lapic_write(0x310, cpu << 24);
        lapic_write(0x300, 0x4500);
        delay_ms(10);
        for (int attempt = 0; attempt < 2 && !ap_started; attempt++) {
            lapic_write(0x310, cpu << 24);
            lapic_write(0x300, 0x4600 | (u32)(TRAMPOLINE_BASE >> 12));
            for (int i = 0; i < 200 && !ap_started; i++) delay_ms(1);
        }
        if (!ap_started) {
            print("WARN vcpu %u did not start\n", (u64)cpu);
            break;
        }
        started++;
    }
    return started;
}

void kmain(u32 start_info_paddr) {
    const struct hvm_start_info *si = (const void *)(u64)start_info_paddr;
    if (si->magic != 0x336ec578 || si->version < 1) {
        print("PANIC bad hvm_start_info\n");
        report(RESULT_PANIC, 0);
        halt_forever();
    }
    parse_cmdline(si->cmdline_paddr ? (const char *)si->cmdline_paddr : 0);
    stamp_key = mix64(cfg.seed ^ 0x6c6976656d6967ULL);
    hot_threshold = cfg.hot_write_pct >= 100 ? ~0ULL : (~0ULL / 100) * cfg.hot_write_pct;
    idt_init();
    pic_mask_all();
    lapic_enable();
    tsc_khz = cfg.tsc_khz ? cfg.tsc_khz : calibrate_tsc_with_pit();
    calibrate_lapic();

    const struct hvm_memmap_entry *mm = (const void *)si->memmap_paddr;
    for (u32 i = 0; i < si->memmap_entries; i++)
        if (mm[i].type == 1 && mm[i].addr + mm[i].size > ram_top) ram_top = mm[i].addr + mm[i].size;
    bump = ((u64)__image_end + 2 * MIB - 1) & ~(2 * MIB - 1);
    map_high();

    /* The generation table and AP stacks come before the working set. */
    u64 want = cfg.ws_bytes / PAGE;
    gen = bump_alloc(want * sizeof(u32));
    zero_words((u64 *)gen, (want * sizeof(u32) + 7) / 8);
    devices_init(&cfg.dev);
    u64 stacks = bump + (u64)cfg.workers * (AP_STACK + PAGE);
    u64 avail = build_segments(si, (stacks + 2 * MIB - 1) & ~(2 * MIB - 1));
    ws_pages = want < avail ? want : avail;
    if (ws_pages < want) print("WARN working set clamped to %u pages\n", ws_pages);

    print("livemig-guest: vcpus=%u workers=%u ram_top=%x ws_pages=%u ws_base=%x rate=%u burst=%u tsc_khz=%u\n",
          (u64)cfg.vcpus, (u64)cfg.workers, ram_top, ws_pages, nsegs ? segs[0].phys : 0,
          cfg.rate_max ? ~0ULL : cfg.rate, (u64)cfg.burst, tsc_khz);
    if (!ws_pages) cfg.workers = 1;
    u32 started = start_aps();
    if (started < cfg.workers) cfg.workers = started;
    print("READY workers=%u\n", (u64)cfg.workers);
    report(RESULT_READY, ws_pages);

    struct writer w;
    writer_init(&w, 0);
    u64 hb = 0, hb_tsc = cfg.hb_ms * tsc_khz, next_hb = rdtsc();
    for (;;) {
        u64 now = rdtsc();
        if (now >= next_hb) {
            hb++;
            u64 written = total_written();
            print("HB %u writes=%u\n", hb, written);
            report(RESULT_MEM_WRITES, written);
            devices_heartbeat();
            outl(PORT_HEARTBEAT, (u32)hb);
            u8 cmd = inb(PORT_COMMAND);
            if (cmd == CMD_VERIFY || ((inb(0x3f8 + 5) & 1) && inb(0x3f8) == SERIAL_CMD_VERIFY)) verify();
            next_hb += hb_tsc;
            /* After a long pause (snapshot, migration) skip the missed beats instead of bursting. */
            now = rdtsc();
            if (next_hb < now) next_hb = now + hb_tsc;
        }
        u64 next = writer_step(&w, now);
        u64 dev = devices_poll(rdtsc());
        if (next) {
            u64 until = next < next_hb ? next : next_hb;
            if (dev && dev < until) until = dev;
            sleep_until(until);
        }
    }
}

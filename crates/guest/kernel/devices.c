/*
 * The workload guest's devices: a PCI scan on configuration mechanism #1, virtio 1.x over PCI
 * (modern: capabilities, split queues, MSI-X), and what the guest does with them:
 *
 *   net   answers ARP for its address, ICMP echo and UDP echo (port 7) on ip=A.B.C.D/N.
 *   disk  writes stamped 4 KiB blocks at a paced rate (disk=RATE a second, over disk_blocks
 *         blocks), remembers the last acknowledged version of each, and on verify reads every
 *         acknowledged block back: lost, stale and torn blocks are counted and reported.
 *
 * Completions raise MSI-X vectors whose handlers (entry.S) wake the vCPU from hlt; the queues
 * are looked at again on every heartbeat, so a lost interrupt delays but never hangs.
 */
#include "abi.h"
#include "guest.h"

volatile u32 irq_pending;

static inline void outw(u16 p, u16 v) { __asm__ volatile("outw %0, %1" ::"a"(v), "Nd"(p)); }

/* ---- PCI ---- */
static u32 pci_addr(u32 slot, u32 reg) { return 0x80000000u | slot << 11 | (reg & 0xfc); }
static u32 pci_read32(u32 slot, u32 reg) {
    outl(0xCF8, pci_addr(slot, reg));
    return inl(0xCFC);
}
static u8 pci_read8(u32 slot, u32 reg) { return (u8)(pci_read32(slot, reg) >> ((reg & 3) * 8)); }
static u16 pci_read16(u32 slot, u32 reg) { return (u16)(pci_read32(slot, reg) >> ((reg & 2) * 8)); }
static void pci_write16(u32 slot, u32 reg, u16 v) {
    outl(0xCF8, pci_addr(slot, reg));
    outw((u16)(0xCFC + (reg & 2)), v);
}

/* ---- virtio over PCI ---- */
#define VIRTIO_VENDOR 0x1af4
#define VIRTIO_F_VERSION_1 (1ULL << 32)
#define S_ACK 1
#define S_DRIVER 2
#define S_DRIVER_OK 4
#define S_FEATURES_OK 8
#define NO_VECTOR 0xffff
#define QUEUE_SIZE 64

struct vdev {
    u32 slot;
    u64 common, notify, isr, device, msix_table;
    u32 notify_mult, msix_cap;
    u16 vectors_used;
};

struct vq_desc {
    u64 addr;
    u32 len;
    u16 flags, next;
};
#define DESC_NEXT 1
#define DESC_WRITE 2

struct vq {
    u16 size, index, last_used, avail_idx, free_head, num_free;
    struct vq_desc *desc;
    volatile u16 *avail; /* flags, idx, ring[size] */
    volatile u8 *used;   /* flags, idx, ring[size] of {u32 id, u32 len} */
    u64 notify;
    u32 irq_bit;
};

/* The address BAR `n` decodes at (as the firmware placed it; 64-bit BARs span two). */
static u64 pci_bar(u32 slot, u32 n) {
    if (n > 5) return 0;
    u32 lo = pci_read32(slot, 0x10 + 4 * n);
    if (lo & 1) return 0; /* I/O space: virtio 1.x structures live in memory BARs */
    u64 hi = ((lo & 6) == 4 && n < 5) ? pci_read32(slot, 0x14 + 4 * n) : 0;
    return hi << 32 | (lo & ~0xfu);
}

/* Finds the virtio structures and the MSI-X table through the capability list; each names
 * its own BAR (livemig puts them all in BAR 0, QEMU in BARs 1 and 4). */
static int vdev_find(u32 slot, struct vdev *d) {
    memset(d, 0, sizeof *d);
    d->slot = slot;
    u8 p = pci_read8(slot, 0x34);
    for (int guard = 0; p && guard < 48; guard++, p = pci_read8(slot, p + 1u)) {
        u8 id = pci_read8(slot, p);
        if (id == 0x11) {
            u32 table = pci_read32(slot, p + 4u);
            d->msix_cap = p;
            d->msix_table = pci_bar(slot, table & 7u) + (table & ~7u);
        } else if (id == 0x09) {
            u8 type = pci_read8(slot, p + 3u);
            u64 at = pci_bar(slot, pci_read8(slot, p + 4u)) + pci_read32(slot, p + 8u);
            if (type == 1 && !d->common) d->common = at;
            else if (type == 2 && !d->notify) {
                d->notify = at;
                d->notify_mult = pci_read32(slot, p + 16u);
            } else if (type == 3 && !d->isr) d->isr = at;
            else if (type == 4 && !d->device) d->device = at;
        }
    }
    return d->common && d->notify && d->device && d->msix_cap;
}

/* Resets the device and negotiates `wanted` (VERSION_1 is required); MSI-X on. */
static int vdev_init(struct vdev *d, u64 wanted) {
    u64 c = d->common;
    pci_write16(d->slot, 4, pci_read16(d->slot, 4) | 0x6); /* memory space, bus master */
    mmio_w8(c + 0x14, 0);
    while (mmio_r8(c + 0x14)) cpu_relax();
    mmio_w8(c + 0x14, S_ACK);
    mmio_w8(c + 0x14, S_ACK | S_DRIVER);
    mmio_w32(c + 0x00, 0);
    u64 offered = mmio_r32(c + 0x04);
    mmio_w32(c + 0x00, 1);
    offered |= (u64)mmio_r32(c + 0x04) << 32;
    u64 f = offered & (wanted | VIRTIO_F_VERSION_1);
    if (!(f & VIRTIO_F_VERSION_1)) return 0;
    mmio_w32(c + 0x08, 0);
    mmio_w32(c + 0x0c, (u32)f);
    mmio_w32(c + 0x08, 1);
    mmio_w32(c + 0x0c, (u32)(f >> 32));
    mmio_w8(c + 0x14, S_ACK | S_DRIVER | S_FEATURES_OK);
    if (!(mmio_r8(c + 0x14) & S_FEATURES_OK)) return 0;
    pci_write16(d->slot, d->msix_cap + 2, pci_read16(d->slot, d->msix_cap + 2) | 0x8000);
    mmio_w16(c + 0x10, NO_VECTOR);
    return 1;
}

static u32 next_irq_bit;

/* Sets up queue `index` with its own MSI-X vector. */
static int vq_init(struct vdev *d, struct vq *q, u16 index) {
    u64 c = d->common;
    mmio_w16(c + 0x16, index);
    u16 max = mmio_r16(c + 0x18);
    if (!max || next_irq_bit >= DEVICE_VECTORS) return 0;
    u16 size = QUEUE_SIZE;
    while (size > max) size >>= 1;
    mmio_w16(c + 0x18, size);
    memset(q, 0, sizeof *q);
    q->size = size;
    q->index = index;
    u8 *mem = bump_alloc(2 * PAGE);
    memset(mem, 0, 2 * PAGE);
    q->desc = (struct vq_desc *)mem;
    q->avail = (volatile u16 *)(mem + 16u * size);
    q->used = mem + PAGE;
    for (u16 i = 0; i < size; i++) q->desc[i].next = (u16)(i + 1);
    q->num_free = size;
    q->irq_bit = next_irq_bit++;
    u16 entry = d->vectors_used++;
    u64 e = d->msix_table + 16ULL * entry;
    mmio_w32(e + 0, 0xFEE00000u); /* the BSP, fixed delivery */
    mmio_w32(e + 4, 0);
    mmio_w32(e + 8, DEVICE_VECTOR_BASE + q->irq_bit);
    mmio_w32(e + 12, 0);
    mmio_w16(c + 0x1a, entry);
    if (mmio_r16(c + 0x1a) != entry) return 0;
    mmio_w64(c + 0x20, (u64)q->desc);
    mmio_w64(c + 0x28, (u64)q->avail);
    mmio_w64(c + 0x30, (u64)q->used);
    q->notify = d->notify + (u64)mmio_r16(c + 0x1e) * d->notify_mult;
    mmio_w16(c + 0x1c, 1);
    return 1;
}

static void vdev_ready(struct vdev *d) {
    mmio_w8(d->common + 0x14, S_ACK | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK);
}

/* Makes a chain of n buffers available; returns its head, or -1 with no room. */
static int vq_add(struct vq *q, const u64 *addr, const u32 *len, const int *write, int n) {
    if (n > q->num_free) return -1;
    u16 head = q->free_head, i = head, last = head;
    for (int k = 0; k < n; k++) {
        struct vq_desc *dsc = &q->desc[i];
        dsc->addr = addr[k];
        dsc->len = len[k];
        dsc->flags = (u16)((k + 1 < n ? DESC_NEXT : 0) | (write[k] ? DESC_WRITE : 0));
        last = i;
        i = dsc->next;
    }
    q->free_head = q->desc[last].next;
    q->num_free = (u16)(q->num_free - n);
    q->avail[2 + q->avail_idx % q->size] = head;
    barrier();
    q->avail_idx++;
    q->avail[1] = q->avail_idx;
    return head;
}

static void vq_kick(struct vq *q) {
    mb();
    mmio_w16(q->notify, q->index);
}

/* The next used chain: its head (freed), or -1. */
static int vq_used(struct vq *q, u32 *len) {
    u16 idx = *(volatile u16 *)(q->used + 2);
    if (idx == q->last_used) return -1;
    barrier();
    volatile u32 *e = (volatile u32 *)(q->used + 4 + 8u * (q->last_used % q->size));
    u16 head = (u16)e[0];
    if (len) *len = e[1];
    q->last_used++;
    if (head >= q->size) return -1;
    u16 i = head, n = 1;
    while ((q->desc[i].flags & DESC_NEXT) && n < q->size) {
        i = q->desc[i].next;
        n++;
    }
    q->desc[i].next = q->free_head;
    q->free_head = head;
    q->num_free = (u16)(q->num_free + n);
    return head;
}

/* ---- disk ---- */
#define BLOCK 4096u
#define SECTOR 512u
#define SECTORS (BLOCK / SECTOR)
#define DISK_MAGIC 0x31304b5349444d4cULL /* "LMDISK01" */
#define VIRTIO_BLK_F_FLUSH (1ULL << 9)
#define BLK_T_IN 0
#define BLK_T_OUT 1

struct blk_req {
    u32 type, reserved;
    u64 sector;
};

static struct {
    int present, busy, busy_write;
    struct vdev d;
    struct vq q;
    u64 capacity, nblocks;
    u32 *acked; /* the version the device acknowledged, per block; 0: never written */
    struct blk_req *req;
    u8 *wbuf, *rbuf;
    /* Written only by the device: every fourth request reads an acknowledged block into it,
     * so a migration must carry the device's writes for verify to find it intact. */
    u8 *pbuf;
    int busy_peek;
    u64 peek_block;
    u32 peek_version;
    volatile u8 *status;
    u64 busy_block;
    u32 busy_version;
    u64 rate, start, issued, tsc_hz, rng, key;
    u64 acked_writes, errors;
    /* When the request in flight went to the device; the longest write since the last verify. */
    u64 submitted, wmax;
} blk;

static u64 sector_sum(const u64 *w) { return mix64(w[0] ^ w[1] * 3 ^ w[2] * 5 ^ w[3] * 7 ^ w[4] * 11); }

/* A block's stamp: each sector says which block, which version, which sector, and sums it. */
static void stamp_block(u8 *buf, u64 block, u32 version) {
    for (u32 s = 0; s < SECTORS; s++) {
        u64 *w = (u64 *)(buf + s * SECTOR);
        w[0] = DISK_MAGIC;
        w[1] = block;
        w[2] = version;
        w[3] = s;
        w[4] = blk.key;
        w[SECTOR / 8 - 1] = sector_sum(w);
    }
}

enum block_check { BLOCK_OK, BLOCK_LOST, BLOCK_STALE, BLOCK_TORN };

static enum block_check check_block(const u8 *buf, u64 block, u32 want) {
    u32 version = 0, blank = 0;
    for (u32 s = 0; s < SECTORS; s++) {
        const u64 *w = (const u64 *)(buf + s * SECTOR);
        if (w[0] == 0 && w[2] == 0 && w[SECTOR / 8 - 1] == 0) {
            blank++;
            continue;
        }
        if (w[0] != DISK_MAGIC || w[1] != block || w[3] != s || w[4] != blk.key ||
            w[SECTOR / 8 - 1] != sector_sum(w))
            return BLOCK_TORN;
        if (version && w[2] != version) return BLOCK_TORN;
        version = (u32)w[2];
    }
    if (blank == SECTORS) return BLOCK_LOST;
    if (blank) return BLOCK_TORN;
    if (version == want) return BLOCK_OK;
    return version < want ? BLOCK_STALE : BLOCK_TORN;
}

static int blk_submit(u32 type, u64 block, u8 *buf) {
    blk.req->type = type;
    blk.req->reserved = 0;
    blk.req->sector = block * (BLOCK / SECTOR);
    *blk.status = 0xff;
    u64 addr[3] = {(u64)blk.req, (u64)buf, (u64)blk.status};
    u32 len[3] = {sizeof(struct blk_req), BLOCK, 1};
    int write[3] = {0, type == BLK_T_IN, 1};
    if (vq_add(&blk.q, addr, len, write, 3) < 0) return 0;
    blk.busy = 1;
    blk.busy_write = type == BLK_T_OUT;
    blk.busy_peek = buf == blk.pbuf;
    blk.busy_block = block;
    blk.submitted = rdtsc();
    vq_kick(&blk.q);
    return 1;
}

/* Takes the device's completion, if there is one; returns 1 when a request finished. */
static int blk_complete(void) {
    if (!blk.busy || vq_used(&blk.q, 0) < 0) return 0;
    blk.busy = 0;
    if (*blk.status != 0) {
        blk.errors++;
        return 1;
    }
    if (blk.busy_write) {
        u64 took = rdtsc() - blk.submitted;
        if (took > blk.wmax) blk.wmax = took;
        blk.acked[blk.busy_block] = blk.busy_version;
        blk.acked_writes++;
    } else if (blk.busy_peek) {
        blk.peek_block = blk.busy_block;
        blk.peek_version = blk.busy_version;
    }
    return 1;
}

static void blk_init(u32 slot, const struct devices_cfg *c) {
    if (!vdev_find(slot, &blk.d) || !vdev_init(&blk.d, VIRTIO_BLK_F_FLUSH) ||
        !vq_init(&blk.d, &blk.q, 0)) {
        print("WARN disk at slot %u: not a usable virtio-blk\n", (u64)slot);
        return;
    }
    vdev_ready(&blk.d);
    blk.capacity = (u64)mmio_r32(blk.d.device) | (u64)mmio_r32(blk.d.device + 4) << 32;
    blk.nblocks = blk.capacity / (BLOCK / SECTOR);
    u64 want = c->disk_blocks ? c->disk_blocks : 4096;
    if (blk.nblocks > want) blk.nblocks = want;
    blk.acked = bump_alloc(blk.nblocks * sizeof(u32) + 8);
    memset(blk.acked, 0, blk.nblocks * sizeof(u32));
    u8 *io = bump_alloc(4 * PAGE);
    blk.wbuf = io;
    blk.rbuf = io + PAGE;
    blk.pbuf = io + 3 * PAGE;
    blk.req = (struct blk_req *)(io + 2 * PAGE);
    blk.status = io + 2 * PAGE + 64;
    memset(io, 0, 4 * PAGE);
    blk.rate = c->disk_rate;
    blk.tsc_hz = tsc_khz * 1000;
    blk.start = rdtsc();
    blk.rng = mix64(blk.start) | 1;
    blk.key = mix64(0x6469736b ^ blk.start);
    blk.present = 1;
    print("DISK slot=%u sectors=%u blocks=%u rate=%u\n", (u64)slot, blk.capacity, blk.nblocks,
          blk.rate);
}

/* Paced stamped writes, one in flight; returns when the next is due (0: on completion). */
static u64 blk_poll(u64 now) {
    blk_complete();
    if (!blk.present || !blk.rate || !blk.nblocks) return 0;
    if (blk.busy) return 0;
    while (now - blk.start > blk.tsc_hz) {
        blk.start += blk.tsc_hz;
        blk.issued = blk.issued > blk.rate ? blk.issued - blk.rate : 0;
    }
    u64 due = (now - blk.start) * blk.rate / blk.tsc_hz;
    if (blk.issued >= due) return blk.start + (blk.issued + 1) * blk.tsc_hz / blk.rate;
    blk.rng ^= blk.rng << 13;
    blk.rng ^= blk.rng >> 7;
    blk.rng ^= blk.rng << 17;
    u64 block = (u64)(((unsigned __int128)blk.rng * blk.nblocks) >> 64);
    if ((blk.issued & 3) == 3 && blk.acked[block]) {
        blk.busy_version = blk.acked[block];
        if (blk_submit(BLK_T_IN, block, blk.pbuf)) blk.issued++;
        return 0;
    }
    u32 version = blk.acked[block] + 1;
    stamp_block(blk.wbuf, block, version);
    blk.busy_version = version;
    if (blk_submit(BLK_T_OUT, block, blk.wbuf)) blk.issued++;
    return 0;
}

static void net_poll(void);

/* Waits (interrupt or heartbeat-length sleep) for the request in flight; 0 on timeout. The
 * network is served meanwhile: a verify must not look like an outage to the VM's clients. */
static int blk_wait(void) {
    u64 deadline = rdtsc() + 10000 * tsc_khz;
    while (blk.busy) {
        if (blk_complete()) break;
        if (rdtsc() > deadline) return 0;
        __atomic_exchange_n(&irq_pending, 0, __ATOMIC_SEQ_CST);
        net_poll();
        if (blk_complete()) break;
        /* Short: a completion whose interrupt this sleep misses costs the verify at most 1 ms. */
        sleep_until(rdtsc() + tsc_khz);
    }
    return 1;
}

static void blk_verify(void) {
    u64 lost = 0, stale = 0, torn = 0, checked = 0;
    if (!blk_wait()) print("WARN disk: the write in flight did not complete\n");
    if (blk.peek_version && check_block(blk.pbuf, blk.peek_block, blk.peek_version) != BLOCK_OK) {
        print("DISK: the page the device last read block %u into is not what it read\n",
              blk.peek_block);
        stale++;
    }
    for (u64 b = 0; b < blk.nblocks; b++) {
        u32 want = blk.acked[b];
        if (!want) continue;
        checked++;
        memset(blk.rbuf, 0, BLOCK);
        if (!blk_submit(BLK_T_IN, b, blk.rbuf) || !blk_wait() || *blk.status != 0) {
            lost++;
            continue;
        }
        enum block_check r = check_block(blk.rbuf, b, want);
        if (r == BLOCK_LOST) lost++;
        else if (r == BLOCK_STALE) stale++;
        else if (r == BLOCK_TORN) torn++;
    }
    u64 wmax_us = blk.wmax * 1000 / tsc_khz;
    blk.wmax = 0;
    if (lost || stale || torn)
        print("DISK VERIFY FAIL lost=%u stale=%u torn=%u blocks=%u writes=%u wmax_us=%u\n", lost, stale,
              torn, checked, blk.acked_writes, wmax_us);
    else
        print("DISK VERIFY OK blocks=%u writes=%u wmax_us=%u\n", checked, blk.acked_writes, wmax_us);
    report(RESULT_DISK_LOST, lost);
    report(RESULT_DISK_STALE, stale);
    report(RESULT_DISK_TORN, torn);
    report(RESULT_DISK_CHECKED, checked);
}


/* ---- network ---- */
#define VIRTIO_NET_F_MAC (1ULL << 5)
#define NET_HDR 12
#define NET_BUF 2048u
#define ETH_ARP 0x0806
#define ETH_IP 0x0800

static struct {
    int present;
    struct vdev d;
    struct vq rx, tx;
    u8 mac[6];
    u32 ip;
    u8 *rxbuf, *txbuf; /* a buffer per descriptor of each queue */
    u64 rx_frames, tx_frames, answered;
} net;

static u16 be16(const u8 *p) { return (u16)(p[0] << 8 | p[1]); }
static u32 be32(const u8 *p) { return (u32)p[0] << 24 | (u32)p[1] << 16 | (u32)p[2] << 8 | p[3]; }
static void put16(u8 *p, u16 v) { p[0] = (u8)(v >> 8); p[1] = (u8)v; }
static void put32(u8 *p, u32 v) { put16(p, (u16)(v >> 16)); put16(p + 2, (u16)v); }

static u16 inet_sum(const u8 *p, u32 n) {
    u32 s = 0;
    for (u32 i = 0; i + 1 < n; i += 2) s += be16(p + i);
    if (n & 1) s += (u32)p[n - 1] << 8;
    while (s >> 16) s = (s & 0xffff) + (s >> 16);
    return (u16)~s;
}

/* Gives the device a receive buffer: the one paired with the next free descriptor. */
static void net_post_rx(void) {
    u64 addr = (u64)(net.rxbuf + (u64)net.rx.free_head * NET_BUF);
    u32 len = NET_BUF;
    int write = 1;
    vq_add(&net.rx, &addr, &len, &write, 1);
}

/* Sends the frame at f (len bytes, built in a transmit buffer's frame part). */
static void net_send(u8 *buf, u32 len) {
    memset(buf, 0, NET_HDR);
    u64 addr = (u64)buf;
    u32 n = NET_HDR + len;
    int write = 0;
    if (vq_add(&net.tx, &addr, &n, &write, 1) >= 0) {
        vq_kick(&net.tx);
        net.tx_frames++;
    }
}

/* A transmit buffer whose descriptor is free (descriptors and buffers pair up). */
static u8 *net_tx_buffer(void) {
    while (vq_used(&net.tx, 0) >= 0) {}
    if (!net.tx.num_free) return 0;
    return net.txbuf + (u64)net.tx.free_head * NET_BUF;
}

/* Answers ARP for our address, ICMP echo and UDP echo (port 7) to it. */
static void net_answer(const u8 *f, u32 len) {
    if (len < 14 || !net.ip) return;
    u16 type = be16(f + 12);
    u8 *out = net_tx_buffer();
    if (!out) return;
    u8 *o = out + NET_HDR;
    if (type == ETH_ARP && len >= 42) {
        const u8 *a = f + 14;
        if (be16(a) != 1 || be16(a + 2) != ETH_IP || be16(a + 6) != 1 || be32(a + 24) != net.ip) return;
        memcpy(o, f + 6, 6);
        memcpy(o + 6, net.mac, 6);
        put16(o + 12, ETH_ARP);
        u8 *r = o + 14;
        put16(r, 1);
        put16(r + 2, ETH_IP);
        r[4] = 6;
        r[5] = 4;
        put16(r + 6, 2);
        memcpy(r + 8, net.mac, 6);
        put32(r + 14, net.ip);
        memcpy(r + 18, a + 8, 10); /* their MAC and address */
        net_send(out, 42);
        net.answered++;
        return;
    }
    if (type != ETH_IP || len < 34) return;
    const u8 *ip = f + 14;
    u32 ihl = (u32)(ip[0] & 0xf) * 4, total = be16(ip + 2);
    if ((ip[0] >> 4) != 4 || ihl < 20 || total < ihl || 14 + total > len || total > NET_BUF - NET_HDR - 14) return;
    if (be32(ip + 16) != net.ip) return;
    u8 proto = ip[9];
    const u8 *l4 = ip + ihl;
    u32 l4len = total - ihl;
    if (proto == 1) {
        if (l4len < 8 || l4[0] != 8) return;
    } else if (proto == 17) {
        if (l4len < 8 || be16(l4 + 2) != 7) return;
    } else return;
    memcpy(o, f + 6, 6);
    memcpy(o + 6, net.mac, 6);
    put16(o + 12, ETH_IP);
    u8 *oip = o + 14;
    memcpy(oip, ip, total);
    memcpy(oip + 12, ip + 16, 4);
    memcpy(oip + 16, ip + 12, 4);
    oip[8] = 64;
    put16(oip + 10, 0);
    put16(oip + 10, inet_sum(oip, ihl));
    u8 *ol4 = oip + ihl;
    if (proto == 1) {
        ol4[0] = 0;
        put16(ol4 + 2, 0);
        put16(ol4 + 2, inet_sum(ol4, l4len));
    } else {
        memcpy(ol4, l4 + 2, 2);
        memcpy(ol4 + 2, l4, 2);
        put16(ol4 + 6, 0); /* no checksum: allowed over IPv4 */
    }
    net_send(out, 14 + total < 60 ? 60 : 14 + total);
    net.answered++;
}

static void net_init(u32 slot, const struct devices_cfg *c) {
    if (!vdev_find(slot, &net.d) || !vdev_init(&net.d, VIRTIO_NET_F_MAC) ||
        !vq_init(&net.d, &net.rx, 0) || !vq_init(&net.d, &net.tx, 1)) {
        print("WARN NIC at slot %u: not a usable virtio-net\n", (u64)slot);
        return;
    }
    for (int i = 0; i < 6; i++) net.mac[i] = mmio_r8(net.d.device + (u64)i);
    net.ip = c->ip;
    net.rxbuf = bump_alloc((u64)net.rx.size * NET_BUF);
    net.txbuf = bump_alloc((u64)net.tx.size * NET_BUF);
    vdev_ready(&net.d);
    for (u16 i = 0; i < net.rx.size; i++) net_post_rx();
    vq_kick(&net.rx);
    net.present = 1;
    print("NIC slot=%u mac=%x ip=%x\n", (u64)slot,
          (u64)net.mac[0] << 40 | (u64)net.mac[1] << 32 | (u64)net.mac[2] << 24 |
              (u64)net.mac[3] << 16 | (u64)net.mac[4] << 8 | net.mac[5],
          (u64)net.ip);
}

static void net_poll(void) {
    if (!net.present) return;
    u32 len;
    int head, got = 0;
    while ((head = vq_used(&net.rx, &len)) >= 0) {
        net.rx_frames++;
        if (len > NET_HDR && len <= NET_BUF)
            net_answer(net.rxbuf + (u64)head * NET_BUF + NET_HDR, len - NET_HDR);
        net_post_rx();
        got = 1;
    }
    if (got) vq_kick(&net.rx);
    while (vq_used(&net.tx, 0) >= 0) {}
}

/* ---- the guest's devices ---- */
void devices_init(const struct devices_cfg *c) {
    for (u32 slot = 1; slot < 32; slot++) {
        u32 id = pci_read32(slot, 0);
        if ((id & 0xffff) != VIRTIO_VENDOR) continue;
        u16 device = (u16)(id >> 16);
        if (device == 0x1042 && !blk.present) blk_init(slot, c);
        else if (device == 0x1041 && !net.present) net_init(slot, c);
    }
}

u64 devices_poll(u64 now) {
    __atomic_exchange_n(&irq_pending, 0, __ATOMIC_SEQ_CST);
    net_poll();
    return blk_poll(now);
}

void devices_heartbeat(void) {
    if (blk.present) report(RESULT_DISK_ACKED, blk.acked_writes);
    if (net.present) report(RESULT_NET, (net.rx_frames & 0xffffffffu) | net.tx_frames << 32);
}

void devices_serve(void) { net_poll(); }

void devices_verify(void) {
    if (blk.present) blk_verify();
}

/*
 * What the workload guest's parts share: integer types, port and MMIO access, the console,
 * time, the boot allocator and the device interrupt flags.
 */
#ifndef LIVEMIG_GUEST_H
#define LIVEMIG_GUEST_H
#include <stdint.h>
#include <stddef.h>

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define PAGE 4096ULL

static inline void outb(u16 p, u8 v) { __asm__ volatile("outb %0, %1" ::"a"(v), "Nd"(p)); }
static inline void outl(u16 p, u32 v) { __asm__ volatile("outl %0, %1" ::"a"(v), "Nd"(p)); }
static inline u8 inb(u16 p) { u8 v; __asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u32 inl(u16 p) { u32 v; __asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(p)); return v; }
static inline u64 rdtsc(void) {
    u32 lo, hi;
    __asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
    return ((u64)hi << 32) | lo;
}
static inline void cpu_relax(void) { __asm__ volatile("pause" ::: "memory"); }
static inline void barrier(void) { __asm__ volatile("" ::: "memory"); }
static inline void mb(void) { __asm__ volatile("mfence" ::: "memory"); }

static inline u8 mmio_r8(u64 a) { return *(volatile u8 *)a; }
static inline u16 mmio_r16(u64 a) { return *(volatile u16 *)a; }
static inline u32 mmio_r32(u64 a) { return *(volatile u32 *)a; }
static inline void mmio_w8(u64 a, u8 v) { *(volatile u8 *)a = v; }
static inline void mmio_w16(u64 a, u16 v) { *(volatile u16 *)a = v; }
static inline void mmio_w32(u64 a, u32 v) { *(volatile u32 *)a = v; }
static inline void mmio_w64(u64 a, u64 v) {
    mmio_w32(a, (u32)v);
    mmio_w32(a + 4, (u32)(v >> 32));
}

void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
/* %s %u (u64) %x (u64, 0x-prefixed) */
void print(const char *fmt, ...);
void report(u32 status, u64 payload);
void *bump_alloc(u64 bytes);
void sleep_until(u64 deadline);
u64 mix64(u64 x);
extern u64 tsc_khz;

/* Bit n is set by the handler of vector DEVICE_VECTOR_BASE + n (entry.S). */
#define DEVICE_VECTOR_BASE 0x50
#define DEVICE_VECTORS 8
extern volatile u32 irq_pending;
extern const u64 device_isrs[DEVICE_VECTORS];

/* devices.c */
struct devices_cfg {
    u64 disk_rate, disk_blocks;
    u32 ip, prefix;
};
void devices_init(const struct devices_cfg *c);
/* Serves the devices; returns when it next has something to do (0: nothing planned). */
u64 devices_poll(u64 now);
void devices_heartbeat(void);
void devices_verify(void);
/* Answers the network between other work (verify). */
void devices_serve(void);
#endif

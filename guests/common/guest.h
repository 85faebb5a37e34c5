/*
 * Shared declarations of the test guests.
 *
 * Execution model: a small ring-0 "kernel" (entry.S, kernel.c) sets up long
 * mode, an identity map of all RAM with user-accessible pages, GDT/TSS/IDT,
 * masks the legacy PIC and drops to ring 3 with IOPL=3. Everything else runs
 * in ring 3, because kvm_pvm emulates ring-0 code instruction by instruction
 * (hundreds of times slower). Ring 3 does port I/O directly (IOPL=3; the #GP
 * handler emulates in/out should a hypervisor not honour IOPL) and touches
 * the LAPIC through its identity-mapped MMIO page. It enters ring 0 only
 * through `ud2` (the #UD handler is the system-call path: int 0x80 and
 * sysret fault under kvm_pvm) to sleep with hlt or to halt for good.
 */
#ifndef GUEST_H
#define GUEST_H

#include <stdarg.h>
#include <stddef.h>
#include <stdint.h>

#include "start_info.h"

typedef uint8_t u8;
typedef uint16_t u16;
typedef uint32_t u32;
typedef uint64_t u64;

#define PAGE_SIZE 4096ull
#define TIMER_VECTOR 0x40
#define SPURIOUS_VECTOR 0xff
#define LAPIC_BASE 0xfee00000ull

/* ---- port I/O (works in ring 0 and, with IOPL=3, in ring 3) ---- */
static inline void outb(u16 port, u8 v) { __asm__ volatile("outb %0, %1" : : "a"(v), "Nd"(port)); }
static inline u8 inb(u16 port)
{
	u8 v;
	__asm__ volatile("inb %1, %0" : "=a"(v) : "Nd"(port));
	return v;
}
static inline u64 rdtsc(void)
{
	u32 lo, hi;
	__asm__ volatile("rdtsc" : "=a"(lo), "=d"(hi));
	return ((u64)hi << 32) | lo;
}
static inline void cpuid(u32 leaf, u32 sub, u32 r[4])
{
	__asm__ volatile("cpuid" : "=a"(r[0]), "=b"(r[1]), "=c"(r[2]), "=d"(r[3]) : "a"(leaf), "c"(sub));
}

/* a * b / c with a 128-bit intermediate (no libgcc); saturates instead of #DE. */
static inline u64 muldiv(u64 a, u64 b, u64 c)
{
	u64 hi, lo, q, r;
	__asm__("mulq %3" : "=a"(lo), "=d"(hi) : "a"(a), "rm"(b) : "cc");
	if (hi >= c)
		return ~0ull;
	__asm__("divq %4" : "=a"(q), "=d"(r) : "a"(lo), "d"(hi), "rm"(c) : "cc");
	return q;
}

/* ---- system calls: ud2 with the number in rax, argument in rdi ---- */
enum { SYS_WAIT = 1, SYS_HALT = 2, SYS_WRITE = 3, SYS_NOP = 4, SYS_PIT_SAMPLE = 5, SYS_CPUID = 6 };
/* SYS_PIT_SAMPLE fills this: PIT channel 0 count bracketed by two TSC reads. */
struct pit_sample { u64 tsc_before, tsc_after, count; };
static inline u64 syscall1(u64 nr, u64 arg)
{
	u64 ret;
	__asm__ volatile("ud2" : "=a"(ret) : "a"(nr), "D"(arg) : "memory");
	return ret;
}
static inline u64 syscall2(u64 nr, u64 a, u64 b)
{
	u64 ret;
	__asm__ volatile("ud2" : "=a"(ret) : "a"(nr), "D"(a), "S"(b) : "memory");
	return ret;
}
static inline int in_user_mode(void)
{
	u16 cs;
	__asm__ volatile("mov %%cs, %0" : "=r"(cs));
	return (cs & 3) == 3;
}
/* Sleep until the next interrupt (sti; hlt in ring 0). */
static inline void sys_wait(void) { syscall1(SYS_WAIT, 0); }
/* Stop for good (cli; hlt loop). */
__attribute__((noreturn)) void sys_halt(void);

/* ---- kernel state visible to ring 3 (all pages are user-accessible) ---- */
extern volatile u64 irq_count;       /* LAPIC timer interrupts taken */
extern volatile u64 other_irq_count; /* any other vector >= 32 */
extern u32 start_info_pa;            /* ebx at entry */
extern u64 alloc_top;                /* first free byte after the image and kernel allocations */
extern char _image_start[], _image_end[];

/* ---- lib.c ---- */
void *memset(void *d, int c, size_t n);
void *memcpy(void *d, const void *s, size_t n);
size_t strlen(const char *s);
int streq(const char *a, const char *b);

/* ---- serial.c (16550 at 0x3f8, polled) ---- */
void serial_init(void);
void serial_write(const char *s, size_t n);  /* from ring 3: one SYS_WRITE trap */
void serial_write_direct(const char *s, size_t n);
/* Minimal printf: %s %c %lu %lx %ld %%; integer arguments must be 64-bit (use the l forms). */
__attribute__((format(printf, 1, 2))) void print(const char *fmt, ...);
void vprint(const char *fmt, va_list ap);

/* ---- boot.c: what the start_info says ---- */
#define MAX_MEMMAP 64
struct ram_range { u64 start, end; };   /* page-aligned, [start, end) */
extern struct ram_range ram[MAX_MEMMAP];
extern int ram_count;
extern u64 ram_bytes;                   /* sum of RAM ranges */
extern char cmdline[1024];
/* Copies cmdline and memmap out of the start_info; prints an error and halts on a bad one. */
void boot_info_init(void);
__attribute__((noreturn, format(printf, 1, 2))) void fail(const char *fmt, ...);

/* ---- cmdline.c ---- */
/* Calls fn(key, value) for each key=value token (value "" when there is no '='). */
void cmdline_foreach(const char *cmdline, void (*fn)(const char *key, const char *val));
/* "64M", "4k", "1G", "123": returns 0 on success. */
int parse_size(const char *s, u64 *out);
int parse_uint(const char *s, u64 *out);

/* ---- time.c: TSC and LAPIC timer ---- */
extern u64 tsc_hz;
extern u64 lapic_hz;
void time_init(void);                   /* calibrates TSC (and the LAPIC timer) */
void lapic_timer_periodic(u32 hz);      /* vector TIMER_VECTOR; hz == 0 stops it */
static inline u64 ms_to_tsc(u64 ms) { return muldiv(tsc_hz, ms, 1000); }

/*
 * A report schedule on the TSC that survives being stopped and migrated:
 * a late or early (TSC jumped forward or back) schedule produces at most
 * one line and restarts from now, it never bursts or stalls.
 */
struct schedule { u64 period, next, prev; };
void schedule_start(struct schedule *s, u64 period);
int schedule_due(struct schedule *s, u64 now);

/* "info tsc_hz=.. lapic_hz=.. ram=.. io=iopl|trap": diagnostics, one line. */
void guest_info(void);

/* Provided by each guest: runs in ring 3. */
void guest_main(void);

#endif

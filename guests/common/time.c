/*
 * Time: the TSC, calibrated once (CPUID leaf 0x40000010 when the
 * hypervisor offers it, else against PIT channel 0, which both QEMU and
 * KVM's in-kernel PIT provide; microvm has no port 0x61 for channel 2),
 * and the LAPIC timer, calibrated against the TSC. Runs in ring 3: port
 * I/O through IOPL=3, LAPIC through its identity-mapped MMIO page.
 *
 * No paravirtual clock is enabled: the hypervisor must never write guest
 * RAM behind our back (RAM is compared byte for byte after migration).
 * After a migration the TSC may jump; callers treat time as monotonic and
 * resynchronise instead of catching up.
 */
#include "guest.h"

#define PIT_HZ 1193182ull
#define LAPIC_SVR 0xf0
#define LAPIC_LVT_TIMER 0x320
#define LAPIC_LVT_LINT0 0x350
#define LAPIC_LVT_LINT1 0x360
#define LAPIC_LVT_ERROR 0x370
#define LAPIC_TIMER_ICR 0x380
#define LAPIC_TIMER_CCR 0x390
#define LAPIC_TIMER_DCR 0x3e0
#define LVT_MASKED (1u << 16)
#define LVT_PERIODIC (1u << 17)

u64 tsc_hz;
u64 lapic_hz;

static inline u32 lapic_read(u32 reg) { return *(volatile u32 *)(LAPIC_BASE + reg); }
static inline void lapic_write(u32 reg, u32 v) { *(volatile u32 *)(LAPIC_BASE + reg) = v; }

/* One PIT-timed measurement of the TSC rate over ~42 ms; 0 if disturbed. */
static u64 tsc_pit_once(void)
{
	struct pit_sample s0, s;
	outb(0x43, 0x30);  /* channel 0, lobyte/hibyte, mode 0 (one shot), binary */
	outb(0x40, 0xff);
	outb(0x40, 0xff);
	syscall1(SYS_PIT_SAMPLE, (u64)&s0);
	u64 last = s0.count, same = 0;
	for (;;) {
		syscall1(SYS_PIT_SAMPLE, (u64)&s);
		if (s.count > s0.count)
			return 0;  /* wrapped: we were descheduled too long */
		if (s0.count - s.count >= 50000)
			break;
		if (s.count != last) {
			last = s.count;
			same = 0;
		} else if (++same > 100000) {
			fail("cannot calibrate the TSC: PIT channel 0 is not counting");
		}
	}
	/* midpoints of each sample's bracket; the brackets bound the error */
	u64 cycles = (s.tsc_before + s.tsc_after) / 2 - (s0.tsc_before + s0.tsc_after) / 2;
	return muldiv(cycles, PIT_HZ, s0.count - s.count);
}

/* CPUID as the kernel sees it (hypervisor leaves are only reliable in ring 0). */
static void kernel_cpuid(u32 leaf, u32 r[4])
{
	if (in_user_mode())
		syscall2(SYS_CPUID, leaf, (u64)r);
	else
		cpuid(leaf, 0, r);
}

static void tsc_calibrate(void)
{
	u32 r[4];
	kernel_cpuid(0x40000000, r);
	if (r[0] >= 0x40000010 && r[0] < 0x40010000) {
		kernel_cpuid(0x40000010, r);
		if (r[0]) {
			tsc_hz = (u64)r[0] * 1000;
			if (r[1])
				lapic_hz = (u64)r[1] * 1000;
			return;
		}
	}
	for (int tries = 0; tries < 5 && !tsc_hz; tries++)
		tsc_hz = tsc_pit_once();
	if (!tsc_hz)
		fail("cannot calibrate the TSC against the PIT");
}

static void lapic_calibrate(void)
{
	lapic_write(LAPIC_TIMER_DCR, 0xb);  /* divide by 1 */
	lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
	lapic_write(LAPIC_TIMER_ICR, 0xffffffffu);
	u64 t0 = rdtsc();
	u32 c0 = lapic_read(LAPIC_TIMER_CCR);
	u64 t0b = rdtsc();
	u64 want = tsc_hz / 50;  /* 20 ms */
	u64 t1, t1b;
	u32 c1;
	do {
		t1 = rdtsc();
		c1 = lapic_read(LAPIC_TIMER_CCR);
		t1b = rdtsc();
	} while (t1 - t0 < want);
	lapic_write(LAPIC_TIMER_ICR, 0);
	u64 cycles = (t1 + t1b) / 2 - (t0 + t0b) / 2;
	lapic_hz = muldiv(c0 - c1, tsc_hz, cycles);
	if (!lapic_hz)
		fail("cannot calibrate the LAPIC timer");
}

void time_init(void)
{
	/* LAPIC on, spurious vector 0xff; LINT0/1 and error masked (the PIC is masked too). */
	lapic_write(LAPIC_SVR, 0x100 | SPURIOUS_VECTOR);
	lapic_write(LAPIC_LVT_LINT0, LVT_MASKED);
	lapic_write(LAPIC_LVT_LINT1, LVT_MASKED);
	lapic_write(LAPIC_LVT_ERROR, LVT_MASKED);
	tsc_calibrate();
	if (!lapic_hz)
		lapic_calibrate();
}

void lapic_timer_periodic(u32 hz)
{
	if (!hz) {
		lapic_write(LAPIC_LVT_TIMER, LVT_MASKED | TIMER_VECTOR);
		lapic_write(LAPIC_TIMER_ICR, 0);
		return;
	}
	u64 count = lapic_hz / hz;
	if (count == 0)
		count = 1;
	if (count > 0xffffffffull)
		count = 0xffffffffull;
	lapic_write(LAPIC_TIMER_DCR, 0xb);
	lapic_write(LAPIC_LVT_TIMER, LVT_PERIODIC | TIMER_VECTOR);
	lapic_write(LAPIC_TIMER_ICR, (u32)count);
}

void schedule_start(struct schedule *s, u64 period)
{
	s->period = period;
	s->prev = rdtsc();
	s->next = s->prev + period;
}

int schedule_due(struct schedule *s, u64 now)
{
	int backwards = (int64_t)(now - s->prev) < 0;
	s->prev = now;
	if (backwards) {
		s->next = now + s->period;
		return 1;
	}
	if ((int64_t)(now - s->next) < 0)
		return 0;
	s->next = (now - s->next > s->period) ? now + s->period : s->next + s->period;
	return 1;
}

/*
 * ticker: periodic LAPIC timer interrupts through the IDT, a line every
 * tick. Sleeps with hlt between interrupts. A migration that loses the
 * LAPIC/timer/interrupt state shows as ticks stopping or irqs not growing.
 *
 * Parameters: hz=N (timer rate, default 100, 1..1000), tick=MS (report
 * interval, default 100).
 * Output: "info ..." diagnostics lines (as memwriter), "ticker ready hz=<n>"
 * once, then "tick <n> irqs=<total>" every tick.
 */
#include "common/guest.h"

static u64 hz = 100, tick_ms = 100;

static void param(const char *key, const char *val)
{
	if (streq(key, "hz")) {
		if (parse_uint(val, &hz) || hz < 1 || hz > 1000)
			fail("bad hz=%s (1..1000)", val);
	} else if (streq(key, "tick")) {
		if (parse_uint(val, &tick_ms) || tick_ms < 1 || tick_ms > 3600000)
			fail("bad tick=%s (1..3600000 ms)", val);
	} else {
		for (const char *p = key; *p; p++)
			if (*p == '.')
				return;  /* module-style parameters a VMM may append */
		fail("unknown parameter %s", key);
	}
}

void guest_main(void)
{
	cmdline_foreach(cmdline, param);
	time_init();
	lapic_timer_periodic((u32)hz);
	guest_info();
	print("ticker ready hz=%lu\n", hz);
	struct schedule sched;
	u64 n = 0;
	schedule_start(&sched, ms_to_tsc(tick_ms));
	for (;;) {
		sys_wait();
		if (schedule_due(&sched, rdtsc()))
			print("tick %lu irqs=%lu\n", ++n, irq_count);
	}
}

/*
 * memwriter: a dirtying workload with end-to-end verification, for
 * migration tests and benchmarks.
 *
 * It rewrites the pages of a working set (ws) over and over, in ring 3.
 * Each page write fills the whole page with 8-byte stores: word 0 = the
 * page's guest-physical address, word 1 = its generation, the middle a
 * pattern derived from both, word 511 = a tail check of both. A table of
 * expected generations (u32 per ws page) lives in RAM just below the
 * working set. Before rewriting a page its stamp is checked against the
 * table, so a page that a migration loses (zero), leaves stale (old
 * generation) or tears (mismatched tail) is reported.
 *
 * Parameters (key=value, SIZE takes K/M/G suffixes or plain bytes):
 *   ws=SIZE      working set, default 64M; 0 = idle after the fill (still ticks)
 *   rate=SIZE    bytes of page writes per second, 0 (default) = flat out
 *   fill=zero|random  random: fill all other RAM once at start, page-unique data
 *   order=seq|random  page order, default seq
 *   tick=MS      report interval, default 100
 *   hz=N         sleep timer rate when pacing or idle, default 100 (1..1000)
 *
 * Output lines:
 *   info tsc_hz=<n> lapic_hz=<n> ram=<bytes> io=iopl|trap   (diagnostics)
 *   info ram 0x<start>-0x<end>                             (one per RAM range)
 *   memwriter ready ram=<bytes> ws=<bytes>
 *   tick <n> writes=<total> verified=<total> errors=<total>
 *   CORRUPT gpa=0x<hex> expected=<gen> found=<gen>[ stamp=0x<hex>][ tail=0x<hex>]
 *   error <message>
 * writes counts page rewrites after "ready" (the initial pass that gives
 * every ws page generation 1 is not counted); verified counts stamp checks
 * that matched, errors the ones that did not.
 */
#include "common/guest.h"

#define CORRUPT_LINES_PER_TICK 10
#define BATCH 64

static u64 ws_bytes = 64ull << 20, rate, tick_ms = 100, hz = 100;
static int fill_random, order_random;

static void param(const char *key, const char *val)
{
	if (streq(key, "ws")) {
		if (parse_size(val, &ws_bytes))
			fail("bad ws=%s", val);
	} else if (streq(key, "rate")) {
		if (parse_size(val, &rate))
			fail("bad rate=%s", val);
	} else if (streq(key, "fill")) {
		if (streq(val, "zero")) fill_random = 0;
		else if (streq(val, "random")) fill_random = 1;
		else fail("bad fill=%s (zero|random)", val);
	} else if (streq(key, "order")) {
		if (streq(val, "seq")) order_random = 0;
		else if (streq(val, "random")) order_random = 1;
		else fail("bad order=%s (seq|random)", val);
	} else if (streq(key, "tick")) {
		if (parse_uint(val, &tick_ms) || tick_ms < 1 || tick_ms > 3600000)
			fail("bad tick=%s (1..3600000 ms)", val);
	} else if (streq(key, "hz")) {
		if (parse_uint(val, &hz) || hz < 1 || hz > 1000)
			fail("bad hz=%s (1..1000)", val);
	} else {
		for (const char *p = key; *p; p++)
			if (*p == '.')
				return;  /* module-style parameters a VMM may append */
		fail("unknown parameter %s", key);
	}
}

/* ---- the working set: up to MAX_MEMMAP extents of RAM, in address order ---- */
struct extent { u64 start, pages, first; };  /* first = index of its first page */
static struct extent ext[MAX_MEMMAP];
static int ext_count;
static u64 ws_pages;
static u32 *gen;            /* expected generation per ws page; 0 = not yet written */
static u64 ws_end;          /* end address of the last extent */

static u64 page_addr(u64 i)
{
	int e = 0;
	while (e + 1 < ext_count && i >= ext[e + 1].first)
		e++;
	return ext[e].start + (i - ext[e].first) * PAGE_SIZE;
}

static void layout(void)
{
	u64 base = alloc_top;  /* after the image and the kernel's page tables */
	u64 avail = 0;
	int base_range = -1;
	for (int r = 0; r < ram_count; r++) {
		if (ram[r].end <= base)
			continue;
		if (ram[r].start <= base)
			base_range = r;
		u64 s = ram[r].start > base ? ram[r].start : base;
		avail += (ram[r].end - s) / PAGE_SIZE;
	}
	if (base_range < 0)
		fail("image is not in RAM (alloc_top=0x%lx)", base);
	u64 want = (ws_bytes + PAGE_SIZE - 1) / PAGE_SIZE;
	u64 table_pages;
	for (;;) {
		table_pages = (want * sizeof(u32) + PAGE_SIZE - 1) / PAGE_SIZE;
		if (want + table_pages <= avail && base + table_pages * PAGE_SIZE <= ram[base_range].end)
			break;
		/* clamp: shrink until the pages and their table fit */
		u64 fit = avail > table_pages ? avail - table_pages : 0;
		want = want > fit ? fit : want - 1;
	}
	ws_pages = want;
	ws_bytes = ws_pages * PAGE_SIZE;
	gen = (u32 *)base;
	u64 next = base + table_pages * PAGE_SIZE, left = ws_pages, idx = 0;
	ws_end = next;
	for (int r = 0; r < ram_count && left; r++) {
		if (ram[r].end <= next)
			continue;
		u64 s = ram[r].start > next ? ram[r].start : next;
		u64 n = (ram[r].end - s) / PAGE_SIZE;
		if (n > left)
			n = left;
		ext[ext_count++] = (struct extent){ s, n, idx };
		idx += n;
		left -= n;
		ws_end = s + n * PAGE_SIZE;
	}
}

/* ---- page contents ---- */
#define K_MID 0xff51afd7ed558ccdull
#define K_STEP 0xc4ceb9fe1a85ec53ull
#define K_TAIL 0x9e3779b97f4a7c15ull

static inline u64 tail_of(u64 addr, u64 g) { return ~addr ^ (g * K_TAIL); }

static inline void write_page(u64 addr, u64 g)
{
	volatile u64 *p = (volatile u64 *)addr;  /* every store happens, in order */
	u64 x = (addr * K_MID) ^ g;
	p[0] = addr;
	p[1] = g;
	for (int i = 2; i < 511; i++) {
		p[i] = x;
		x += K_STEP;
	}
	p[511] = tail_of(addr, g);
}

static void fill_page_random(u64 addr)
{
	volatile u64 *p = (volatile u64 *)addr;
	u64 s = (addr * K_TAIL) | 1;
	for (int i = 0; i < 512; i++) {
		s ^= s << 13;
		s ^= s >> 7;
		s ^= s << 17;
		p[i] = s;
	}
}

/* ---- counters and reporting ---- */
static u64 writes, verified, errors, corrupt_lines;

static void report_corrupt(u64 addr, u64 expected)
{
	const volatile u64 *p = (const volatile u64 *)addr;
	u64 w0 = p[0], w1 = p[1], w511 = p[511];
	if (corrupt_lines >= CORRUPT_LINES_PER_TICK)
		return;
	corrupt_lines++;
	if (w0 != addr)
		print("CORRUPT gpa=0x%lx expected=%lu found=%lu stamp=0x%lx\n", addr, expected, w1, w0);
	else if (w1 == expected)
		print("CORRUPT gpa=0x%lx expected=%lu found=%lu tail=0x%lx\n", addr, expected, w1, w511);
	else
		print("CORRUPT gpa=0x%lx expected=%lu found=%lu\n", addr, expected, w1);
}

/* Verify page i against the table, then rewrite it with the next generation. */
static inline void rewrite(u64 i, u64 addr)
{
	u32 g = gen[i];
	const volatile u64 *p = (const volatile u64 *)addr;
	if (p[0] == addr && p[1] == g && p[511] == tail_of(addr, g)) {
		verified++;
	} else {
		errors++;
		report_corrupt(addr, g);
	}
	if (++g == 0)
		g = 1;
	write_page(addr, g);
	/* the table follows the page: a guest stopped mid-write resumes consistently */
	__asm__ volatile("" ::: "memory");
	gen[i] = g;
	writes++;
}

/* ---- page order ---- */
static int cur_ext;
static u64 cur_addr, cur_left, cur_index;
static u64 rng = 0x2545f4914f6cdd1dull;

static void write_batch(u64 n)
{
	if (order_random) {
		while (n--) {
			rng ^= rng << 13;
			rng ^= rng >> 7;
			rng ^= rng << 17;
			u64 i = (u64)(((unsigned __int128)rng * ws_pages) >> 64);
			rewrite(i, page_addr(i));
		}
		return;
	}
	while (n--) {
		if (!cur_left) {
			if (++cur_ext >= ext_count)
				cur_ext = 0;
			cur_addr = ext[cur_ext].start;
			cur_left = ext[cur_ext].pages;
			cur_index = ext[cur_ext].first;
		}
		rewrite(cur_index, cur_addr);
		cur_index++;
		cur_addr += PAGE_SIZE;
		cur_left--;
	}
}

static void initial_pass(void)
{
	for (int e = 0; e < ext_count; e++)
		for (u64 k = 0; k < ext[e].pages; k++) {
			u64 addr = ext[e].start + k * PAGE_SIZE;
			write_page(addr, 1);
			gen[ext[e].first + k] = 1;
		}
	cur_ext = ext_count - 1;  /* the first batch wraps to extent 0 */
	cur_left = 0;
}

/* Everything in RAM below the image and above the working set. */
static void random_fill(void)
{
	u64 lo = (u64)_image_start;
	for (int r = 0; r < ram_count; r++) {
		for (u64 a = ram[r].start; a < ram[r].end && a < lo; a += PAGE_SIZE)
			fill_page_random(a);
		for (u64 a = ram[r].start > ws_end ? ram[r].start : ws_end; a < ram[r].end; a += PAGE_SIZE)
			fill_page_random(a);
	}
}

void guest_main(void)
{
	cmdline_foreach(cmdline, param);
	time_init();
	layout();
	guest_info();
	initial_pass();
	if (fill_random)
		random_fill();
	print("memwriter ready ram=%lu ws=%lu\n", ram_bytes, ws_bytes);

	int sleeps = rate || !ws_pages;
	if (sleeps)
		lapic_timer_periodic((u32)hz);
	struct schedule sched;
	u64 n = 0, last = rdtsc();
	u64 credit = 0, credit_max = rate / 10 + PAGE_SIZE;  /* at most 100 ms of catch-up */
	schedule_start(&sched, ms_to_tsc(tick_ms));
	for (;;) {
		u64 now = rdtsc();
		if (schedule_due(&sched, now)) {
			print("tick %lu writes=%lu verified=%lu errors=%lu\n", ++n, writes, verified, errors);
			corrupt_lines = 0;
		}
		if (!ws_pages) {
			sys_wait();
			continue;
		}
		if (!rate) {
			write_batch(BATCH);
			continue;
		}
		u64 dt = now - last;
		last = now;
		if ((int64_t)dt < 0)
			dt = 0;  /* TSC went back (migration): no credit */
		if (dt > tsc_hz / 10)
			dt = tsc_hz / 10;
		credit += muldiv(rate, dt, tsc_hz);
		if (credit > credit_max)
			credit = credit_max;
		u64 pages = credit / PAGE_SIZE;
		if (!pages) {
			sys_wait();  /* next timer interrupt: 1/hz */
			continue;
		}
		if (pages > BATCH)
			pages = BATCH;
		write_batch(pages);
		credit -= pages * PAGE_SIZE;
	}
}

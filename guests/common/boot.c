/*
 * Ring-3 start: read the hvm_start_info (command line, memory map) into
 * the guest's own memory, then run the guest. Nothing here depends on the
 * start_info staying intact afterwards (fill=random overwrites low RAM).
 */
#include "guest.h"

struct ram_range ram[MAX_MEMMAP];
int ram_count;
u64 ram_bytes;
char cmdline[1024];

void fail(const char *fmt, ...)
{
	va_list ap;
	print("error ");
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
	print("\n");
	sys_halt();
}

static void add_range(u64 start, u64 end)
{
	start = (start + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);
	end &= ~(PAGE_SIZE - 1);
	if (end <= start || ram_count == MAX_MEMMAP)
		return;
	int i = ram_count++;
	while (i > 0 && ram[i - 1].start > start) {  /* keep sorted */
		ram[i] = ram[i - 1];
		i--;
	}
	ram[i].start = start;
	ram[i].end = end;
}

void boot_info_init(void)
{
	const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)start_info_pa;
	if (!start_info_pa || si->magic != HVM_START_MAGIC)
		fail("bad hvm_start_info at 0x%lx", (u64)start_info_pa);
	if (si->cmdline_paddr) {
		const char *c = (const char *)si->cmdline_paddr;
		size_t i = 0;
		while (c[i] && i < sizeof(cmdline) - 1) {
			cmdline[i] = c[i];
			i++;
		}
		cmdline[i] = 0;
	}
	if (si->version < 1 || !si->memmap_paddr || !si->memmap_entries)
		fail("no memory map in hvm_start_info (version %lu)", (u64)si->version);
	const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
	for (u32 i = 0; i < si->memmap_entries; i++)
		if (e[i].type == HVM_MEMMAP_TYPE_RAM)
			add_range(e[i].addr, e[i].addr + e[i].size);
	/* merge touching or overlapping ranges */
	int n = 0;
	for (int i = 0; i < ram_count; i++) {
		if (n && ram[i].start <= ram[n - 1].end) {
			if (ram[i].end > ram[n - 1].end)
				ram[n - 1].end = ram[i].end;
		} else {
			ram[n++] = ram[i];
		}
	}
	ram_count = n;
	ram_bytes = 0;
	for (int i = 0; i < ram_count; i++)
		ram_bytes += ram[i].end - ram[i].start;
}

void user_entry(void)
{
	serial_init();
	boot_info_init();
	guest_main();
	sys_halt();
}

extern u64 gp_emulations;

void guest_info(void)
{
	print("info tsc_hz=%lu lapic_hz=%lu ram=%lu io=%s\n", tsc_hz, lapic_hz, ram_bytes,
	      gp_emulations ? "trap" : "iopl");
	for (int i = 0; i < ram_count; i++)
		print("info ram 0x%lx-0x%lx\n", ram[i].start, ram[i].end);
}

/*
 * Ring-0 part of the test guests: descriptor tables, the legacy PIC, RAM
 * above 4 GiB in the identity map, the trap handler (system calls through
 * ud2, in/out emulation for ring 3, panics) and the drop to ring 3.
 *
 * Everything here runs emulated under kvm_pvm (about a microsecond or more
 * per instruction), so it does as little as possible, once.
 */
#include "guest.h"

struct tss {
	u32 reserved0;
	u64 rsp[3];
	u64 reserved1;
	u64 ist[7];
	u64 reserved2;
	u16 reserved3;
	u16 iomap_base;
} __attribute__((packed));

struct idt_gate {
	u16 off0;
	u16 sel;
	u8 ist;
	u8 type;      /* 0x8e: present, DPL 0, 64-bit interrupt gate */
	u16 off1;
	u32 off2;
	u32 reserved;
} __attribute__((packed));

struct trap_frame {
	u64 r15, r14, r13, r12, r11, r10, r9, r8, rbp, rdi, rsi, rdx, rcx, rbx, rax;
	u64 vector, error;
	u64 rip, cs, rflags, rsp, ss;
};

extern u64 gdt[];
extern u64 pdpt[];
extern char isr_stubs[], timer_isr[], spurious_isr[], kstack_top[];
extern void enter_user(void (*rip)(void), void *rsp) __attribute__((noreturn));
void user_entry(void);

u32 start_info_pa;
u64 alloc_top;
volatile u64 irq_count;
volatile u64 other_irq_count;

static struct tss tss __attribute__((aligned(16)));
static struct idt_gate idt[256] __attribute__((aligned(16)));
static u8 ustack[65536] __attribute__((aligned(16)));

static void set_gate(int v, void *handler)
{
	u64 a = (u64)handler;
	idt[v].off0 = (u16)a;
	idt[v].sel = 0x08;
	idt[v].ist = 0;
	idt[v].type = 0x8e;
	idt[v].off1 = (u16)(a >> 16);
	idt[v].off2 = (u32)(a >> 32);
	idt[v].reserved = 0;
}

/* Legacy 8259s: remap to 0x20..0x2f (away from exception vectors) and mask all. */
static void pic_mask_all(void)
{
	outb(0x20, 0x11); outb(0xa0, 0x11);     /* ICW1: init, ICW4 follows */
	outb(0x21, 0x20); outb(0xa1, 0x28);     /* ICW2: vector bases */
	outb(0x21, 0x04); outb(0xa1, 0x02);     /* ICW3: cascade on IRQ2 */
	outb(0x21, 0x01); outb(0xa1, 0x01);     /* ICW4: 8086 mode */
	outb(0x21, 0xff); outb(0xa1, 0xff);     /* OCW1: mask everything */
}

/*
 * Identity-map RAM above 4 GiB (the low 4 GiB are static in entry.S): with
 * 1 GiB pages when the CPU has them, else 2 MiB pages in page directories
 * taken from just after the image.
 */
static void map_high_ram(void)
{
	const struct hvm_start_info *si = (const struct hvm_start_info *)(u64)start_info_pa;
	u64 top = 0;
	u32 r[4];

	if (si->magic != HVM_START_MAGIC || si->version < 1 || !si->memmap_paddr)
		return;  /* user_entry reports it */
	const struct hvm_memmap_table_entry *e = (const void *)si->memmap_paddr;
	for (u32 i = 0; i < si->memmap_entries; i++)
		if (e[i].type == HVM_MEMMAP_TYPE_RAM && e[i].addr + e[i].size > top)
			top = e[i].addr + e[i].size;
	if (top <= (4ull << 30))
		return;
	u64 gigs = (top + (1ull << 30) - 1) >> 30;
	if (gigs > 512)
		gigs = 512;  /* one PDPT: 512 GiB */
	cpuid(0x80000000, 0, r);
	int has_1g = 0;
	if (r[0] >= 0x80000001) {
		cpuid(0x80000001, 0, r);
		has_1g = (r[3] >> 26) & 1;
	}
	for (u64 g = 4; g < gigs; g++) {
		if (has_1g) {
			pdpt[g] = (g << 30) | 0x87;
		} else {
			u64 *pd = (u64 *)alloc_top;
			alloc_top += PAGE_SIZE;
			for (u64 j = 0; j < 512; j++)
				pd[j] = (g << 30) | (j << 21) | 0x87;
			pdpt[g] = (u64)pd | 0x07;
		}
	}
}

static void kputs(const char *s) { serial_write(s, strlen(s)); }
static void kputhex(u64 v)
{
	char b[19];
	b[0] = '0'; b[1] = 'x';
	for (int i = 0; i < 16; i++)
		b[2 + i] = "0123456789abcdef"[(v >> (60 - 4 * i)) & 15];
	serial_write(b, 18);
}

static __attribute__((noreturn)) void panic(struct trap_frame *f)
{
	u64 cr2;
	__asm__ volatile("mov %%cr2, %0" : "=r"(cr2));
	kputs("\nerror exception vector=");
	kputhex(f->vector);
	kputs(" error=");
	kputhex(f->error);
	kputs(" rip=");
	kputhex(f->rip);
	kputs(" cs=");
	kputhex(f->cs);
	kputs(" rsp=");
	kputhex(f->rsp);
	kputs(" cr2=");
	kputhex(cr2);
	kputs("\n");
	for (;;)
		__asm__ volatile("cli; hlt");
}

/*
 * Emulate in/out for ring 3 should the CPU raise #GP despite IOPL=3.
 * Handles the forms the guests use: in/out al|ax|eax with dx or imm8.
 * Returns the instruction length, 0 if it is not port I/O.
 */
static int emulate_io(struct trap_frame *f)
{
	const u8 *p = (const u8 *)f->rip;
	int len = 0, size = 4;
	if (p[0] == 0x66) {
		size = 2;
		p++;
		len++;
	}
	u8 op = p[0];
	u16 port;
	switch (op) {
	case 0xe4: case 0xe5: case 0xe6: case 0xe7:
		port = p[1];
		len += 2;
		break;
	case 0xec: case 0xed: case 0xee: case 0xef:
		port = (u16)f->rdx;
		len += 1;
		break;
	default:
		return 0;
	}
	if (!(op & 1))
		size = 1;
	int out = op & 2;
	if (out) {
		if (size == 1) outb(port, (u8)f->rax);
		else if (size == 2) __asm__ volatile("outw %0, %1" : : "a"((u16)f->rax), "Nd"(port));
		else __asm__ volatile("outl %0, %1" : : "a"((u32)f->rax), "Nd"(port));
	} else {
		u32 v;
		if (size == 1) {
			v = inb(port);
			f->rax = (f->rax & ~0xffull) | v;
		} else if (size == 2) {
			u16 w;
			__asm__ volatile("inw %1, %0" : "=a"(w) : "Nd"(port));
			f->rax = (f->rax & ~0xffffull) | w;
		} else {
			__asm__ volatile("inl %1, %0" : "=a"(v) : "Nd"(port));
			f->rax = v;
		}
	}
	return len;
}

u64 gp_emulations;  /* how often ring-3 port I/O needed the #GP path */

void trap(struct trap_frame *f)
{
	int from_user = (f->cs & 3) == 3;
	if (f->vector == 6 && from_user && *(const u16 *)f->rip == 0x0b0f) {
		f->rip += 2;
		switch (f->rax) {
		case SYS_WAIT:
			/* sti's shadow covers hlt: an interrupt cannot slip in between. */
			__asm__ volatile("sti; hlt; cli" ::: "memory");
			f->rax = 0;
			return;
		case SYS_WRITE:
			if (f->rsi <= 4096)
				serial_write_direct((const char *)f->rdi, f->rsi);
			f->rax = 0;
			return;
		case SYS_PIT_SAMPLE: {
			/* in ring 0 the bracket is 3 port accesses, not 3 traps */
			struct pit_sample *ps = (struct pit_sample *)f->rdi;
			u64 a = rdtsc();
			outb(0x43, 0x00);
			u8 lo = inb(0x40);
			u8 hi = inb(0x40);
			u64 b = rdtsc();
			ps->tsc_before = a;
			ps->tsc_after = b;
			ps->count = (u64)lo | (u64)hi << 8;
			f->rax = 0;
			return;
		}
		case SYS_CPUID: {
			/* Ring 3 may see the host's CPUID under a nested hypervisor
			 * (kvm_pvm): the hypervisor leaves are only right in ring 0. */
			u32 *r = (u32 *)f->rsi;
			cpuid((u32)f->rdi, 0, r);
			f->rax = 0;
			return;
		}
		case SYS_NOP:
			f->rax = 0;
			return;
		case SYS_HALT:
			for (;;)
				__asm__ volatile("cli; hlt");
		default:
			f->rax = (u64)-1;
			return;
		}
	}
	if (f->vector == 13 && from_user) {
		int len = emulate_io(f);
		if (len) {
			gp_emulations++;
			f->rip += len;
			return;
		}
	}
	if (f->vector >= 32) {
		other_irq_count++;
		*(volatile u32 *)(LAPIC_BASE + 0xb0) = 0;
		return;
	}
	panic(f);
}

void kmain(void)
{
	alloc_top = ((u64)_image_end + PAGE_SIZE - 1) & ~(PAGE_SIZE - 1);

	u64 t = (u64)&tss;
	tss.rsp[0] = (u64)kstack_top;
	tss.iomap_base = sizeof(tss);  /* no I/O bitmap: IOPL alone decides */
	gdt[5] = (sizeof(tss) - 1) | ((t & 0xffffff) << 16) | (0x89ull << 40) | ((t >> 24 & 0xff) << 56);
	gdt[6] = t >> 32;
	__asm__ volatile("ltr %w0" : : "r"(0x28));

	for (int v = 0; v < 256; v++)
		set_gate(v, isr_stubs + 16 * v);
	set_gate(TIMER_VECTOR, timer_isr);
	set_gate(SPURIOUS_VECTOR, spurious_isr);
	struct { u16 limit; u64 base; } __attribute__((packed)) idtr = { sizeof(idt) - 1, (u64)idt };
	__asm__ volatile("lidt %0" : : "m"(idtr));

	pic_mask_all();
	map_high_ram();
	enter_user(user_entry, ustack + sizeof(ustack));
}

void sys_halt(void)
{
	for (;;)
		syscall1(SYS_HALT, 0);
}

/*
 * PVH entry, long-mode switch, interrupt stubs and the jump to ring 3.
 *
 * The VMM starts us in 32-bit protected mode, flat segments, paging off,
 * interrupts off, with ebx = physical address of the hvm_start_info. The
 * image is linked and loaded at 1 MiB, virtual == physical.
 *
 * The page tables for the low 4 GiB are built by the assembler (no ring-0
 * loop: kvm_pvm emulates ring-0 code slowly); kernel.c adds RAM above 4 GiB.
 * Every entry has the user bit: ring 3 reaches all of RAM, the LAPIC page
 * and the kernel's own counters. This is a test guest, not an OS.
 */
#define KCODE 0x08
#define KDATA 0x10
#define PTE_P 0x1
#define PTE_RW 0x2
#define PTE_US 0x4
#define PTE_PWT 0x8
#define PTE_PCD 0x10
#define PTE_PS 0x80

/*
 * XEN_ELFNOTE_PHYS32_ENTRY (type 18), 4-byte descriptor. QEMU reads the
 * descriptor as a size_t, so an empty note follows to make the upper four
 * bytes zero; standard note parsers just skip it.
 */
	.section .note.Xen, "a"
	.balign 4
	.long 4, 4, 18
	.asciz "Xen"
	.long pvh_start32
	.long 0, 0, 0

	.section .text.entry, "ax"
	.code32
	.globl pvh_start32
pvh_start32:
	cli
	cld
	movl %ebx, start_info_pa
	lgdt gdt_ptr
	movl $pml4, %eax
	movl %eax, %cr3
	movl %cr4, %eax
	orl $0x20, %eax                 /* PAE */
	movl %eax, %cr4
	movl $0xc0000080, %ecx          /* EFER.LME */
	rdmsr
	orl $0x100, %eax
	wrmsr
	movl %cr0, %eax
	orl $0x80000001, %eax           /* PG | PE */
	andl $0x9fffffff, %eax          /* caches on (CD, NW clear) */
	movl %eax, %cr0
	ljmp $KCODE, $start64

	.code64
start64:
	movl $KDATA, %eax
	movl %eax, %ds
	movl %eax, %es
	movl %eax, %ss
	movl %eax, %fs
	movl %eax, %gs
	leaq kstack_top(%rip), %rsp
	xorl %ebp, %ebp
	call kmain
1:	cli
	hlt
	jmp 1b

/* enter_user(rip, rsp): iretq to ring 3 with IF=1 and IOPL=3. */
	.globl enter_user
enter_user:
	movl $0x23, %eax                /* user data selector, RPL 3 */
	movl %eax, %ds
	movl %eax, %es
	pushq $0x23                     /* ss */
	pushq %rsi                      /* rsp */
	pushq $0x3202                   /* rflags: IOPL=3, IF, bit 1 */
	pushq $0x1b                     /* cs: user code, RPL 3 */
	pushq %rdi                      /* rip */
	xorl %eax, %eax
	xorl %ebp, %ebp
	iretq

/*
 * Interrupt stubs: 256 of them, 16 bytes apart (isr_stubs + 16 * vector).
 * Each pushes a zero error code when the CPU does not push one, then the
 * vector, and joins isr_common, which calls trap(struct trap_frame *).
 */
	.balign 16
	.globl isr_stubs
isr_stubs:
	.set vec, 0
	.rept 256
	.balign 16
	.if !(vec == 8 || (vec >= 10 && vec <= 14) || vec == 17 || vec == 21 || vec == 29 || vec == 30)
	pushq $0
	.endif
	pushq $vec
	jmp isr_common
	.set vec, vec + 1
	.endr

isr_common:
	pushq %rax
	pushq %rbx
	pushq %rcx
	pushq %rdx
	pushq %rsi
	pushq %rdi
	pushq %rbp
	pushq %r8
	pushq %r9
	pushq %r10
	pushq %r11
	pushq %r12
	pushq %r13
	pushq %r14
	pushq %r15
	movq %rsp, %rdi
	call trap
	popq %r15
	popq %r14
	popq %r13
	popq %r12
	popq %r11
	popq %r10
	popq %r9
	popq %r8
	popq %rbp
	popq %rdi
	popq %rsi
	popq %rdx
	popq %rcx
	popq %rbx
	popq %rax
	addq $16, %rsp
	iretq

/*
 * LAPIC timer: the hot interrupt, kept to a handful of instructions since
 * each one is emulated when it runs in ring 0.
 */
	.globl timer_isr
timer_isr:
	lock incq irq_count(%rip)
	pushq %rax
	movabsq $0xfee000b0, %rax       /* EOI */
	movl $0, (%rax)
	popq %rax
	iretq

	.globl spurious_isr
spurious_isr:
	iretq

	.data
	.balign 16
	.globl gdt
gdt:
	.quad 0
	.quad 0x00af9a000000ffff        /* 0x08 kernel code, 64-bit */
	.quad 0x00cf92000000ffff        /* 0x10 kernel data */
	.quad 0x00affa000000ffff        /* 0x18 user code, 64-bit, DPL 3 */
	.quad 0x00cff2000000ffff        /* 0x20 user data, DPL 3 */
	.quad 0, 0                      /* 0x28 TSS, filled in by kmain */
gdt_end:
	.balign 8
	.globl gdt_ptr
gdt_ptr:
	.word gdt_end - gdt - 1
	.quad gdt

	.section .data.pagetables, "aw"
	.balign 4096
	.globl pml4, pdpt
pml4:
	.quad pdpt + (PTE_P | PTE_RW | PTE_US)
	.fill 511, 8, 0
pdpt:
	.quad pd0 + (PTE_P | PTE_RW | PTE_US)
	.quad pd0 + 0x1000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd0 + 0x2000 + (PTE_P | PTE_RW | PTE_US)
	.quad pd0 + 0x3000 + (PTE_P | PTE_RW | PTE_US)
	.fill 508, 8, 0
pd0:
	/*
	 * 2048 x 2 MiB pages = 0..4 GiB, write-back except the top 32 MiB
	 * (IOAPIC, HPET, LAPIC: uncached). Write-back up to there keeps RAM
	 * fast wherever a VMM ends low memory (3 GiB on microvm, more on pc).
	 */
	.set i, 0
	.rept 2048
	.quad (i << 21) | (PTE_P | PTE_RW | PTE_US | PTE_PS) | ((i >= 2032) & (PTE_PCD | PTE_PWT))
	.set i, i + 1
	.endr

	.bss
	.balign 16
	.globl kstack_top
kstack:
	.skip 16384
kstack_top:

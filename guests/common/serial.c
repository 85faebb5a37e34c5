/*
 * Polled output on the 16550A at 0x3f8, no interrupts. Each port access is a
 * VM exit (about 12 us under kvm_pvm, more when the VMM handles it in another
 * thread), so the transmit FIFO is used as a 16550A driver does: once LSR
 * says the transmitter is empty, up to 16 bytes go in without polling again.
 */
#include "guest.h"

#define COM1 0x3f8
#define LSR_THRE 0x20
#define TX_FIFO 16

void serial_init(void)
{
	outb(COM1 + 1, 0x00);  /* IER: no interrupts */
	outb(COM1 + 3, 0x80);  /* LCR: divisor latch */
	outb(COM1 + 0, 0x01);  /* 115200 */
	outb(COM1 + 1, 0x00);
	outb(COM1 + 3, 0x03);  /* 8N1 */
	outb(COM1 + 2, 0x07);  /* FCR: FIFOs on and cleared */
}

/*
 * From ring 3 a whole buffer goes through one SYS_WRITE trap: under kvm_pvm
 * IOPL=3 is not honoured, so each ring-3 in/out would be a #GP trap of its
 * own (~100 us each, measured), while the ring-0 loop costs one trap plus
 * the port accesses.
 */
void serial_write(const char *s, size_t n)
{
	if (in_user_mode())
		syscall2(SYS_WRITE, (u64)s, n);
	else
		serial_write_direct(s, n);
}

void serial_write_direct(const char *s, size_t n)
{
	for (size_t i = 0; i < n;) {
		unsigned spins = 0;
		while (!(inb(COM1 + 5) & LSR_THRE) && ++spins < 100000)
			;
		/* THRE with FIFOs on: the whole transmit FIFO is free. */
		for (size_t k = 0; k < TX_FIFO && i < n; k++, i++)
			outb(COM1, (u8)s[i]);
	}
}

static size_t fmt_u64(char *b, u64 v, unsigned base)
{
	char t[24];
	size_t n = 0, i;
	do {
		t[n++] = "0123456789abcdef"[v % base];
		v /= base;
	} while (v);
	for (i = 0; i < n; i++)
		b[i] = t[n - 1 - i];
	return n;
}

/*
 * Minimal printf: %s, %c, %u and %x (u64), %d (s64), %%. Length modifiers
 * (l, ll) are accepted and ignored: integer arguments are always 64-bit.
 * Output is assembled in a buffer and written once.
 */
void vprint(const char *fmt, va_list ap)
{
	char buf[256];
	size_t n = 0;
#define PUT(c) do { if (n < sizeof(buf)) buf[n++] = (c); } while (0)
	for (const char *p = fmt; *p; p++) {
		if (*p != '%') {
			PUT(*p);
			continue;
		}
		p++;
		while (*p == 'l')
			p++;
		char tmp[24];
		size_t k = 0;
		switch (*p) {
		case 's': {
			const char *s = va_arg(ap, const char *);
			while (*s)
				PUT(*s++);
			break;
		}
		case 'c':
			PUT((char)va_arg(ap, int));
			break;
		case 'u':
			k = fmt_u64(tmp, va_arg(ap, u64), 10);
			break;
		case 'x':
			k = fmt_u64(tmp, va_arg(ap, u64), 16);
			break;
		case 'd': {
			int64_t v = va_arg(ap, int64_t);
			if (v < 0) {
				PUT('-');
				v = -v;
			}
			k = fmt_u64(tmp, (u64)v, 10);
			break;
		}
		case '%':
			PUT('%');
			break;
		default:
			PUT('?');
			break;
		}
		for (size_t i = 0; i < k; i++)
			PUT(tmp[i]);
		if (!*p)
			break;
	}
#undef PUT
	serial_write(buf, n);
}

void print(const char *fmt, ...)
{
	va_list ap;
	va_start(ap, fmt);
	vprint(fmt, ap);
	va_end(ap);
}

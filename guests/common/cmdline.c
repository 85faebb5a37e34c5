/* Command-line tokens (key=value, space separated) and number parsing. */
#include "guest.h"

void cmdline_foreach(const char *s, void (*fn)(const char *key, const char *val))
{
	char key[64], val[192];
	while (*s) {
		while (*s == ' ' || *s == '\t' || *s == '\n')
			s++;
		if (!*s)
			break;
		size_t k = 0, v = 0;
		while (*s && *s != '=' && *s != ' ' && *s != '\t' && *s != '\n') {
			if (k < sizeof(key) - 1)
				key[k++] = *s;
			s++;
		}
		key[k] = 0;
		if (*s == '=') {
			s++;
			while (*s && *s != ' ' && *s != '\t' && *s != '\n') {
				if (v < sizeof(val) - 1)
					val[v++] = *s;
				s++;
			}
		}
		val[v] = 0;
		fn(key, val);
	}
}

int parse_uint(const char *s, u64 *out)
{
	u64 v = 0;
	if (!*s)
		return -1;
	for (; *s; s++) {
		if (*s < '0' || *s > '9')
			return -1;
		if (v > (~0ull - 9) / 10)
			return -1;
		v = v * 10 + (u64)(*s - '0');
	}
	*out = v;
	return 0;
}

int parse_size(const char *s, u64 *out)
{
	char digits[32];
	size_t n = strlen(s), shift = 0;
	if (n == 0 || n >= sizeof(digits))
		return -1;
	switch (s[n - 1]) {
	case 'k': case 'K': shift = 10; n--; break;
	case 'm': case 'M': shift = 20; n--; break;
	case 'g': case 'G': shift = 30; n--; break;
	default: break;
	}
	memcpy(digits, s, n);
	digits[n] = 0;
	u64 v;
	if (parse_uint(digits, &v))
		return -1;
	if (shift && v > (~0ull >> shift))
		return -1;
	*out = v << shift;
	return 0;
}

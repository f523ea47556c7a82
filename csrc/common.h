/* Shared by xskcheck and xsksend: the payload format, its checksum, and
 * small helpers (clock, CPU lists, integer options).
 *
 * A racelab frame is Ethernet + IPv4 (IHL 5) + UDP + this payload:
 *
 *   u32 magic   0x52414345 ("RACE"), network byte order
 *   u32 flow    network byte order
 *   u64 seq     network byte order; strictly increasing per flow
 *   u32 csum    payload_csum() over the bytes after it, network byte order
 *   u8  rest[]  payload_fill(): pseudo-random, derived from seed/flow/seq
 *
 * The checksum only has to catch truncation, swapped frames and stale
 * contents, so it is a fast multiply-xor hash, not a CRC.
 */
#ifndef RACELAB_COMMON_H
#define RACELAB_COMMON_H

#include <errno.h>
#include <stddef.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#define RACE_MAGIC 0x52414345u
#define ETH_HLEN_ 14
#define IP_HLEN_ 20
#define UDP_HLEN_ 8
#define HDRS_LEN (ETH_HLEN_ + IP_HLEN_ + UDP_HLEN_) /* 42 */
#define PL_HDR_LEN 20                              /* magic flow seq csum */
#define MIN_FRAME (HDRS_LEN + PL_HDR_LEN)          /* 62 */
#define UDP_PORT_BASE 0x5243                       /* source port = base + (flow & 0xff) */
#define UDP_DPORT 0x5244

static inline uint64_t now_ns(void)
{
	struct timespec ts;
	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000ull + (uint64_t)ts.tv_nsec;
}

/* An integer option in [lo, hi] (decimal, 0x hex): its value, or exit 2 naming the
 * option, the range and what was given.  prog: the binary's name for the message. */
static inline long parse_long_opt(const char *prog, const char *s, const char *name, long lo, long hi)
{
	char *end;
	long v;

	errno = 0;
	v = strtol(s, &end, 0);
	if (errno || *end || end == s || v < lo || v > hi) {
		fprintf(stderr, "%s: --%s must be an integer in [%ld, %ld], got '%s'\n", prog, name, lo, hi, s);
		exit(2);
	}
	return v;
}

static inline uint64_t splitmix64(uint64_t *s)
{
	uint64_t z = (*s += 0x9e3779b97f4a7c15ull);
	z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
	z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
	return z ^ (z >> 31);
}

/* Four independent multiply-xor lanes, so a 1500-byte frame costs about a
 * quarter of a single serial chain; then one final mix. */
static inline uint32_t payload_csum(const uint8_t *p, size_t n)
{
	const uint64_t k = 0x100000001b3ull;
	uint64_t h0 = 0xcbf29ce484222325ull ^ (uint64_t)n, h1 = 0x9e3779b97f4a7c15ull;
	uint64_t h2 = 0xc2b2ae3d27d4eb4full, h3 = 0x165667b19e3779f9ull;
	uint64_t w0, w1, w2, w3;

	while (n >= 32) {
		memcpy(&w0, p, 8);
		memcpy(&w1, p + 8, 8);
		memcpy(&w2, p + 16, 8);
		memcpy(&w3, p + 24, 8);
		h0 = (h0 ^ w0) * k;
		h1 = (h1 ^ w1) * k;
		h2 = (h2 ^ w2) * k;
		h3 = (h3 ^ w3) * k;
		h0 ^= h0 >> 29;
		h1 ^= h1 >> 29;
		h2 ^= h2 >> 29;
		h3 ^= h3 >> 29;
		p += 32;
		n -= 32;
	}
	while (n >= 8) {
		memcpy(&w0, p, 8);
		h0 = (h0 ^ w0) * k;
		h0 ^= h0 >> 29;
		p += 8;
		n -= 8;
	}
	w0 = 0;
	memcpy(&w0, p, n);
	h0 ^= w0 ^ ((uint64_t)n << 56);
	h0 ^= (h1 << 17 | h1 >> 47) ^ (h2 << 31 | h2 >> 33) ^ (h3 << 47 | h3 >> 17);
	h0 *= 0xff51afd7ed558ccdull;
	h0 ^= h0 >> 32;
	return (uint32_t)h0;
}

static inline void payload_fill(uint8_t *p, size_t n, uint64_t seed, uint32_t flow, uint64_t seq)
{
	uint64_t s = seed ^ ((uint64_t)flow << 40) ^ (seq * 0xd6e8feb86659fd93ull);
	uint64_t w;

	while (n >= 8) {
		w = splitmix64(&s);
		memcpy(p, &w, 8);
		p += 8;
		n -= 8;
	}
	if (n) {
		w = splitmix64(&s);
		memcpy(p, &w, n);
	}
}

/* "0,2-3,5" -> cpus[]; returns the count, or -1 on a malformed list. */
static inline int parse_cpu_list(const char *s, int *cpus, int max)
{
	int n = 0;
	char *end;

	while (*s) {
		long a = strtol(s, &end, 10), b;

		if (end == s || a < 0 || a > 4095)
			return -1;
		b = a;
		s = end;
		if (*s == '-') {
			s++;
			b = strtol(s, &end, 10);
			if (end == s || b < a || b > 4095)
				return -1;
			s = end;
		}
		for (long c = a; c <= b; c++) {
			if (n >= max)
				return -1;
			cpus[n++] = (int)c;
		}
		if (*s == ',')
			s++;
		else if (*s)
			return -1;
	}
	return n;
}

#endif

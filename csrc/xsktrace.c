// SPDX-License-Identifier: GPL-2.0-only
/* xsktrace: the interleaving counts of a racelab raw trace, in the guest.
 *
 *   xsktrace TRACE
 *
 * TRACE is the file lab/evidence.py's _Streamer writes: RAW_MAGIC, then
 * records (tag[4], u32 cpu, u32 len, payload): HEAD (JSON: event formats,
 * callers, clock), PAGE (one ring-buffer page of one CPU, as trace_pipe_raw
 * gave it) and TAIL (JSON: kprobe_profile, per-CPU stats).  The pages are
 * decoded like evidence._cpu_events() (page header, type_len/time delta,
 * time extends, absolute stamps, padding, the "missed events" flags), every
 * CPU's stream is merged by timestamp like evidence.raw_events() (heapq.merge:
 * ties go to the lower CPU number), and the events are counted like
 * evidence._Analyzer, including the withdrawal of hits that relied on a CPU
 * that later lost events: the counts are exact, not upper bounds.
 *
 * Output: one JSON line on stdout (the counts; the fields named like
 * Analysis.to_dict()).  No examples, marks' texts or interleaving: a trace
 * that has any of those is analysed on the host.  Exit 0 ok, 2 bad arguments
 * or not a raw trace, 3 a trace this reader cannot decode.
 *
 * One pass over an mmap of the file, no allocation per event (the only
 * growing arrays are the page index, the clock marks and the hit log).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <strings.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <unistd.h>

#include "common.h"

#define RAW_MAGIC "RACELAB-FTRACE-RAW 1\n"
#define CLOCK_MARK "racelab-clock"
#define VIOLATION_MARK "racelab violation"
#define SELF_FLUSHING_CALLER "xsk_generic_rcv"
#define RB_MISSED_EVENTS (1ull << 31)
#define RB_MISSED_STORED (1ull << 30)
#define MAX_CPUS 64 /* holders are a bit mask */
#define MAX_DECODERS 32
#define MAX_CALLERS 16
#define MAX_TOKENS 4096

static const uint8_t *D; /* the mapped trace */
static size_t DN;

static void __attribute__((noreturn, format(printf, 2, 3))) die(int rc, const char *fmt, ...)
{
	va_list ap;

	va_start(ap, fmt);
	fputs("xsktrace: ", stderr);
	vfprintf(stderr, fmt, ap);
	fputc('\n', stderr);
	va_end(ap);
	exit(rc);
}

static void *grow(void *p, size_t *cap, size_t need, size_t elem)
{
	if (need <= *cap)
		return p;
	size_t n = *cap ? *cap : 64;

	while (n < need)
		n *= 2;
	p = realloc(p, n * elem);
	if (!p)
		die(3, "out of memory");
	*cap = n;
	return p;
}

static inline bool in_file(size_t off, size_t n)
{
	return off <= DN && n <= DN - off;
}

/* n (<= 8) little-endian bytes at off; the traces are written on x86 hosts and guests */
static inline uint64_t rdn(size_t off, size_t n)
{
	uint64_t v = 0;

	if (!in_file(off, n))
		die(3, "an event reads past the end of the file (offset %zu)", off);
	memcpy(&v, D + off, n);
	return v;
}

static inline uint16_t rd16(size_t off) { return (uint16_t)rdn(off, 2); }
static inline uint32_t rd32(size_t off) { return (uint32_t)rdn(off, 4); }
static inline uint64_t rd64(size_t off) { return rdn(off, 8); }

/* ---------------------------------------------------------------- JSON (HEAD, TAIL) */

/* A flat token list: enough for the two small records json.dumps wrote. */
enum { J_OBJ, J_ARR, J_STR, J_PRIM };

struct jtok {
	int type;
	size_t start, end; /* J_STR: inside the quotes */
	int next;	   /* index of the token after this one's subtree */
};

struct json {
	const char *s;
	size_t n, pos;
	struct jtok t[MAX_TOKENS];
	int nt;
};

static void jws(struct json *j)
{
	while (j->pos < j->n && (j->s[j->pos] == ' ' || j->s[j->pos] == '\t' || j->s[j->pos] == '\n' ||
				 j->s[j->pos] == '\r'))
		j->pos++;
}

static int jparse(struct json *j, int depth)
{
	int me;

	jws(j);
	if (j->pos >= j->n || j->nt >= MAX_TOKENS || depth > 32)
		return -1;
	me = j->nt++;
	j->t[me].start = j->pos;
	char c = j->s[j->pos];

	if (c == '{' || c == '[') {
		char close = c == '{' ? '}' : ']';

		j->t[me].type = c == '{' ? J_OBJ : J_ARR;
		j->pos++;
		jws(j);
		if (j->pos < j->n && j->s[j->pos] == close) {
			j->pos++;
		} else {
			for (;;) {
				if (c == '{') {
					jws(j);
					if (j->pos >= j->n || j->s[j->pos] != '"' || jparse(j, depth + 1) < 0)
						return -1;
					jws(j);
					if (j->pos >= j->n || j->s[j->pos] != ':')
						return -1;
					j->pos++;
				}
				if (jparse(j, depth + 1) < 0)
					return -1;
				jws(j);
				if (j->pos >= j->n)
					return -1;
				if (j->s[j->pos] == ',') {
					j->pos++;
					continue;
				}
				if (j->s[j->pos] != close)
					return -1;
				j->pos++;
				break;
			}
		}
	} else if (c == '"') {
		j->t[me].type = J_STR;
		j->t[me].start = ++j->pos;
		while (j->pos < j->n && j->s[j->pos] != '"')
			j->pos += j->s[j->pos] == '\\' ? 2 : 1;
		if (j->pos >= j->n)
			return -1;
		j->t[me].end = j->pos++;
		j->t[me].next = j->nt;
		return me;
	} else {
		j->t[me].type = J_PRIM;
		while (j->pos < j->n && !strchr(",]} \t\r\n", j->s[j->pos]))
			j->pos++;
	}
	j->t[me].end = j->pos;
	j->t[me].next = j->nt;
	return me;
}

static bool jload(struct json *j, const uint8_t *p, size_t n)
{
	j->s = (const char *)p;
	j->n = n;
	j->pos = 0;
	j->nt = 0;
	return jparse(j, 0) == 0;
}

static bool jstreq(const struct json *j, int i, const char *lit)
{
	size_t n = strlen(lit);

	return j->t[i].type == J_STR && j->t[i].end - j->t[i].start == n && !memcmp(j->s + j->t[i].start, lit, n);
}

/* The value of key in object i, or -1. */
static int jget(const struct json *j, int i, const char *key)
{
	if (i < 0 || j->t[i].type != J_OBJ)
		return -1;
	for (int k = i + 1; k < j->t[i].next; k = j->t[j->t[k].next].next)
		if (jstreq(j, k, key))
			return j->t[k].next;
	return -1;
}

/* Element n of array i, or -1. */
static int jat(const struct json *j, int i, int n)
{
	if (i < 0 || j->t[i].type != J_ARR)
		return -1;
	for (int k = i + 1; k < j->t[i].next; k = j->t[k].next)
		if (n-- == 0)
			return k;
	return -1;
}

/* A number, or a string holding one (the stats values): Python's int() of either. */
static bool jint(const struct json *j, int i, long long *out)
{
	char buf[40];
	char *end;
	size_t n;

	if (i < 0 || (j->t[i].type != J_PRIM && j->t[i].type != J_STR))
		return false;
	n = j->t[i].end - j->t[i].start;
	if (n == 0 || n >= sizeof(buf))
		return false;
	memcpy(buf, j->s + j->t[i].start, n);
	buf[n] = 0;
	errno = 0;
	*out = strtoll(buf, &end, 10);
	while (*end == ' ')
		end++;
	return !errno && *end == 0 && end != buf;
}

static bool juint(const struct json *j, int i, uint64_t *out)
{
	char buf[40];
	char *end;
	size_t n;

	if (i < 0 || j->t[i].type != J_PRIM)
		return false;
	n = j->t[i].end - j->t[i].start;
	if (n == 0 || n >= sizeof(buf) || j->s[j->t[i].start] == '-')
		return false;
	memcpy(buf, j->s + j->t[i].start, n);
	buf[n] = 0;
	errno = 0;
	*out = strtoull(buf, &end, 10);
	return !errno && *end == 0;
}

/* ---------------------------------------------------------------- decoders (HEAD) */

enum kind { K_OTHER, K_RCV, K_RCVRET, K_FLUSH, K_FLUSHALL, K_MARK, K_LOST };

struct decoder {
	enum kind kind;
	int xs;	 /* offset of the socket (rcv, flush), -1: none */
	int ret; /* rcvret: offset of ret, -1: none */
	int ip;	 /* rcvret: offset of __probe_ret_ip, -1: none */
	int buf; /* mark: offset of buf, -1: none */
};

static struct decoder decs[MAX_DECODERS];
static int16_t dec_of[65536]; /* event id -> decs[] index + 1 */
static struct {
	uint64_t lo, hi;
	bool self_flushing;
} callers[MAX_CALLERS];
static int ncallers;

static int field_offset(const struct json *j, int fields, const char *name)
{
	long long off;

	return jint(j, jat(j, jget(j, fields, name), 0), &off) ? (int)off : -1;
}

static void load_head(const struct json *j, char *clock, size_t clock_len)
{
	int events = jget(j, 0, "events"), cl = jget(j, 0, "callers"), ck = jget(j, 0, "clock");
	int ndec = 0;

	if (events >= 0 && j->t[events].type == J_OBJ)
		for (int k = events + 1; k < j->t[events].next; k = j->t[j->t[k].next].next) {
			int spec = j->t[k].next, name = jget(j, spec, "name"), fields = jget(j, spec, "fields");
			long long id;
			struct decoder d = { K_OTHER, -1, -1, -1, -1 };

			if (!jint(j, k, &id) || id < 0 || id > 65535 || name < 0)
				die(3, "HEAD: a malformed event entry");
			if (ndec >= MAX_DECODERS)
				die(3, "HEAD: more than %d event formats", MAX_DECODERS);
			if (jstreq(j, name, "rcv") || jstreq(j, name, "flush")) {
				d.kind = jstreq(j, name, "rcv") ? K_RCV : K_FLUSH;
				d.xs = field_offset(j, fields, "xs");
			} else if (jstreq(j, name, "rcvret")) {
				d.kind = K_RCVRET;
				d.ret = field_offset(j, fields, "ret");
				d.ip = field_offset(j, fields, "__probe_ret_ip");
			} else if (jstreq(j, name, "flushall")) {
				d.kind = K_FLUSHALL;
			} else if (jstreq(j, name, "mark")) {
				d.kind = K_MARK;
				d.buf = field_offset(j, fields, "buf");
			} else if (jstreq(j, name, "lost")) {
				die(3, "HEAD: an event named \"lost\"");
			}
			decs[ndec] = d;
			dec_of[id] = (int16_t)(ndec + 1); /* a later duplicate id wins, like a dict */
			ndec++;
		}
	if (cl >= 0 && j->t[cl].type == J_OBJ)
		for (int k = cl + 1; k < j->t[cl].next; k = j->t[j->t[k].next].next) {
			int range = j->t[k].next;

			if (ncallers >= MAX_CALLERS)
				break;
			if (!juint(j, jat(j, range, 0), &callers[ncallers].lo) ||
			    !juint(j, jat(j, range, 1), &callers[ncallers].hi))
				die(3, "HEAD: a malformed callers entry");
			callers[ncallers].self_flushing = jstreq(j, k, SELF_FLUSHING_CALLER);
			ncallers++;
		}
	/* str(header.get("clock") or "counter"), printed as the JSON string it was */
	if (ck >= 0 && j->t[ck].type == J_STR && j->t[ck].end > j->t[ck].start) {
		size_t n = j->t[ck].end - j->t[ck].start;

		if (n + 1 > clock_len)
			die(3, "HEAD: clock name too long");
		memcpy(clock, j->s + j->t[ck].start, n);
		clock[n] = 0;
	} else if (ck < 0 || j->t[ck].type == J_STR || jstreq(j, ck, "null") || jstreq(j, ck, "false") ||
		   jstreq(j, ck, "0")) {
		snprintf(clock, clock_len, "counter");
	} else {
		die(3, "HEAD: clock is not a string");
	}
}

/* ---------------------------------------------------------------- page streams */

struct page {
	size_t off, len;
};

struct pages {
	struct page *p;
	size_t n, cap;
};

struct ev {
	uint64_t ts;
	enum kind kind;
	uint64_t a;    /* rcv/flush: socket; rcvret: ret; lost: count; mark: offset of its text */
	size_t alen;   /* mark: length of its text */
	bool has_a;    /* rcv/flush: socket known; rcvret: ret known; lost: count known; mark: buf known */
	bool self_flush; /* rcvret: the caller flushes (xsk_generic_rcv) */
};

struct stream {
	int cpu;
	const struct pages *pg;
	size_t pi;	/* next page */
	size_t p, end;	/* position in the current page */
	bool in_page;
	uint64_t ts;
	struct ev head;
	bool has;
};

/* The next event of one CPU, like one step of evidence._cpu_events(). */
static bool stream_next(struct stream *s, struct ev *e)
{
	for (;;) {
		if (!s->in_page) {
			if (s->pi >= s->pg->n)
				return false;
			const struct page *pg = &s->pg->p[s->pi++];
			uint64_t commit = rd64(pg->off + 8), size;

			s->ts = rd64(pg->off);
			size = commit & ~(RB_MISSED_EVENTS | RB_MISSED_STORED) & 0xffffffffull;
			s->p = pg->off + 16;
			s->end = pg->len < 16 ? s->p : s->p + (size < pg->len - 16 ? size : pg->len - 16);
			s->in_page = true;
			if (commit & RB_MISSED_EVENTS) {
				e->ts = s->ts;
				e->kind = K_LOST;
				e->has_a = false;
				if ((commit & RB_MISSED_STORED) && 16 + size + 8 <= pg->len) {
					e->a = rd64(pg->off + 16 + size);
					e->has_a = true;
				}
				return true;
			}
		}
		while (s->p + 4 <= s->end) {
			uint32_t h = rd32(s->p), tl = h & 31, delta = h >> 5;
			size_t q;
			int64_t n;

			if (tl == 29) { /* padding */
				if (delta == 0)
					break;
				s->p += 4 + (size_t)rd32(s->p + 4);
				continue;
			}
			if (tl == 30) { /* time extend */
				s->ts += delta + ((uint64_t)rd32(s->p + 4) << 27);
				s->p += 8;
				continue;
			}
			if (tl == 31) { /* absolute time stamp */
				uint64_t abs_ts = delta + ((uint64_t)rd32(s->p + 4) << 27);

				s->ts = abs_ts | (s->ts & ~((1ull << 59) - 1));
				s->p += 8;
				continue;
			}
			s->ts += delta;
			if (tl == 0) {
				n = (int64_t)rd32(s->p + 4) - 4;
				q = s->p + 8;
			} else {
				n = tl * 4;
				q = s->p + 4;
			}
			s->p = (size_t)((int64_t)q + n);
			uint16_t eid = rd16(q);
			int di = dec_of[eid];

			if (!di)
				continue;
			const struct decoder *d = &decs[di - 1];

			e->ts = s->ts;
			e->kind = d->kind;
			e->has_a = false;
			e->self_flush = false;
			switch (d->kind) {
			case K_RCV:
			case K_FLUSH:
				if (d->xs >= 0) {
					e->a = rd64(q + d->xs);
					e->has_a = true;
				}
				break;
			case K_RCVRET:
				if (d->ret >= 0) {
					e->a = (uint64_t)(int64_t)(int32_t)rd32(q + d->ret);
					e->has_a = true;
				}
				if (d->ip >= 0 && ncallers) {
					uint64_t ip = rd64(q + d->ip);

					for (int k = 0; k < ncallers; k++)
						if (callers[k].lo <= ip && ip < callers[k].hi) {
							e->self_flush = callers[k].self_flushing;
							break;
						}
				}
				break;
			case K_MARK:
				if (d->buf >= 0) {
					/* bytes(d[q + o:q + n]) clamps to the file; then up to the first NUL */
					size_t lo = q + d->buf, hi = (size_t)((int64_t)q + n);

					if (hi > DN)
						hi = DN;
					if (lo > hi)
						lo = hi;
					const uint8_t *z = memchr(D + lo, 0, hi - lo);

					e->a = lo;
					e->alen = z ? (size_t)(z - (D + lo)) : hi - lo;
					e->has_a = true;
				}
				break;
			default:
				break;
			}
			return true;
		}
		s->in_page = false;
	}
}

/* ---------------------------------------------------------------- the analysis (evidence._Analyzer) */

struct sock {
	uint64_t xs;
	bool used;
	uint64_t held; /* CPUs with unflushed successful receives into it */
};

struct logent {
	uint64_t commit, ts;
	uint64_t holders;
	char kind; /* 'u' unflushed, 'o' overlap */
};

struct clockmark {
	uint64_t ts;
	double s;
};

static struct {
	struct sock *socks;
	size_t nsocks, cap; /* cap: power of two */
	struct {
		bool on;
		uint64_t ts, xs, holders;
	} open[MAX_CPUS];
	uint64_t last[MAX_CPUS], gap_at[MAX_CPUS]; /* gap_at: its last gap, where its recorder restarts */
	uint64_t has_last, has_gap, cpus, opened;   /* bit masks of CPUs */
	struct logent *log;
	size_t nlog, logcap;
	struct clockmark *clock;
	size_t nclock, clockcap;
	bool has_first_rcv, has_first, has_violation, outcomes;
	uint64_t first_rcv, first_ts, last_ts, violation_ts;
	uint64_t receives, failed, flushes, gaps, lost, retracted, marks, events;
} A;

static struct sock *sock_get(uint64_t xs)
{
	if ((A.nsocks + 1) * 2 > A.cap) {
		size_t ncap = A.cap ? A.cap * 2 : 16;
		struct sock *n = calloc(ncap, sizeof(*n));

		if (!n)
			die(3, "out of memory");
		for (size_t i = 0; i < A.cap; i++)
			if (A.socks[i].used) {
				size_t k = (A.socks[i].xs * 0x9e3779b97f4a7c15ull >> 20) & (ncap - 1);

				while (n[k].used)
					k = (k + 1) & (ncap - 1);
				n[k] = A.socks[i];
			}
		free(A.socks);
		A.socks = n;
		A.cap = ncap;
	}
	size_t k = (xs * 0x9e3779b97f4a7c15ull >> 20) & (A.cap - 1);

	while (A.socks[k].used && A.socks[k].xs != xs)
		k = (k + 1) & (A.cap - 1);
	if (!A.socks[k].used) {
		A.socks[k].used = true;
		A.socks[k].xs = xs;
		A.socks[k].held = 0;
		A.nsocks++;
	}
	return &A.socks[k];
}

static void log_add(uint64_t commit, uint64_t ts, char kind, uint64_t holders)
{
	A.log = grow(A.log, &A.logcap, A.nlog + 1, sizeof(*A.log));
	A.log[A.nlog++] = (struct logent){ commit, ts, holders, kind };
}

static void close_rcv(int cpu, bool has_ret, int64_t ret, bool self_flush, uint64_t now)
{
	uint64_t ts = A.open[cpu].ts, xs = A.open[cpu].xs, holders = A.open[cpu].holders;
	struct sock *s;

	A.open[cpu].on = false;
	A.opened &= ~(1ull << cpu);
	if (has_ret && ret != 0) {
		A.failed++; /* reserved nothing and is not on the flush list */
		return;
	}
	if (holders)
		log_add(now, ts, 'u', holders);
	s = sock_get(xs);
	if (self_flush)
		s->held &= ~(1ull << cpu);
	else
		s->held |= 1ull << cpu;
}

static void lost_events(int cpu, uint64_t ts, const struct ev *e)
{
	bool has_gap_start = A.has_last >> cpu & 1;
	uint64_t gap_start = A.last[cpu];
	size_t w, r, keep_from;

	A.gaps++;
	if (e->has_a && e->a > 0)
		A.lost += e->a;
	A.open[cpu].on = false;
	A.opened &= ~(1ull << cpu);
	for (size_t i = 0; i < A.cap; i++)
		if (A.socks[i].used)
			A.socks[i].held &= ~(1ull << cpu);
	/* pop the log's tail committed after the gap started; withdraw what relied on cpu there */
	keep_from = A.nlog;
	while (keep_from > 0 && (!has_gap_start || A.log[keep_from - 1].commit > gap_start))
		keep_from--;
	for (w = r = keep_from; r < A.nlog; r++) {
		const struct logent *l = &A.log[r];

		if ((!has_gap_start || l->ts > gap_start) && (l->holders >> cpu & 1))
			A.retracted++;
		else
			A.log[w++] = *l;
	}
	A.nlog = w;
	A.last[cpu] = ts;
	A.gap_at[cpu] = ts;
	A.has_last |= 1ull << cpu;
	A.has_gap |= 1ull << cpu;
}

static bool py_space(uint8_t c)
{
	return c == ' ' || (c >= '\t' && c <= '\r') || (c >= 0x1c && c <= 0x1f);
}

/* Python's float() of one split() token: a decimal number, inf or nan. */
static bool py_float(const char *t, double *out)
{
	const char *p = t;
	bool digits = false;

	if (*p == '+' || *p == '-')
		p++;
	if (!strcasecmp(p, "inf") || !strcasecmp(p, "infinity") || !strcasecmp(p, "nan")) {
		*out = strtod(t, NULL);
		return true;
	}
	while (*p >= '0' && *p <= '9')
		p++, digits = true;
	if (*p == '.')
		for (p++; *p >= '0' && *p <= '9'; p++)
			digits = true;
	if (!digits)
		return false;
	if (*p == 'e' || *p == 'E') {
		p++;
		if (*p == '+' || *p == '-')
			p++;
		if (!(*p >= '0' && *p <= '9'))
			return false;
		while (*p >= '0' && *p <= '9')
			p++;
	}
	if (*p)
		return false;
	*out = strtod(t, NULL);
	return true;
}

static void mark(uint64_t ts, const struct ev *e)
{
	const uint8_t *p = D + e->a, *q = p + e->alen;

	if (!e->has_a) { /* str(None) */
		A.marks++;
		return;
	}
	while (p < q && py_space(*p))
		p++;
	while (q > p && py_space(q[-1]))
		q--;
	size_t n = (size_t)(q - p), cl = strlen(CLOCK_MARK), vl = strlen(VIOLATION_MARK);

	if (n >= cl && !memcmp(p, CLOCK_MARK, cl)) {
		/* float(text.split()[1]) */
		const uint8_t *a = p, *b;
		char tok[64];
		double v;

		while (a < q && !py_space(*a))
			a++;
		while (a < q && py_space(*a))
			a++;
		for (b = a; b < q && !py_space(*b); b++)
			;
		if (a == b || (size_t)(b - a) >= sizeof(tok))
			return;
		memcpy(tok, a, (size_t)(b - a));
		tok[b - a] = 0;
		if (!py_float(tok, &v))
			return;
		A.clock = grow(A.clock, &A.clockcap, A.nclock + 1, sizeof(*A.clock));
		A.clock[A.nclock++] = (struct clockmark){ ts, v };
		return;
	}
	A.marks++;
	if (n >= vl && !memcmp(p, VIOLATION_MARK, vl) && !A.has_violation) {
		A.has_violation = true;
		A.violation_ts = ts;
	}
}

static void feed(int cpu, const struct ev *e)
{
	uint64_t ts = e->ts, bit = 1ull << cpu;

	A.events++;
	if (!A.has_first) {
		A.has_first = true;
		A.first_ts = ts;
	}
	A.last_ts = ts;
	if (e->kind == K_MARK) {
		mark(ts, e);
		return;
	}
	if (e->kind == K_LOST) {
		lost_events(cpu, ts, e);
		return;
	}
	if (e->kind == K_OTHER)
		return;
	A.cpus |= bit;
	A.last[cpu] = ts;
	A.has_last |= bit;
	if (e->kind == K_RCVRET) {
		if (A.open[cpu].on) {
			A.outcomes = A.outcomes || e->has_a;
			close_rcv(cpu, e->has_a, (int64_t)e->a, e->self_flush, ts);
		}
		return;
	}
	if (A.open[cpu].on) /* its return never came: outcome unknown */
		close_rcv(cpu, false, 0, false, ts);
	if (e->kind == K_FLUSHALL) {
		A.flushes++;
		for (size_t i = 0; i < A.cap; i++)
			if (A.socks[i].used)
				A.socks[i].held &= ~bit;
		return;
	}
	if (!e->has_a)
		return;
	struct sock *s = sock_get(e->a);

	if (e->kind == K_FLUSH) {
		A.flushes++;
		s->held &= ~bit;
		return;
	}
	A.receives++;
	if (!A.has_first_rcv) {
		A.has_first_rcv = true;
		A.first_rcv = ts;
	}
	uint64_t inside = 0;

	for (uint64_t m = A.opened & ~bit; m; m &= m - 1) {
		int c = __builtin_ctzll(m);

		if (A.open[c].xs == e->a)
			inside |= 1ull << c;
	}
	if (inside)
		log_add(ts, ts, 'o', inside);
	A.open[cpu].on = true;
	A.opened |= bit;
	A.open[cpu].ts = ts;
	A.open[cpu].xs = e->a;
	A.open[cpu].holders = (s->held & ~bit) | inside;
}

/* _Analyzer._seconds: linear between the clock marks around ts, clamped outside them. */
static double seconds(uint64_t ts)
{
	const struct clockmark *c = A.clock;
	size_t lo = 0, hi = A.nclock;

	if (ts <= c[0].ts)
		return c[0].s;
	if (ts >= c[A.nclock - 1].ts)
		return c[A.nclock - 1].s;
	while (lo < hi) { /* bisect_left(c, (ts, -inf)) */
		size_t mid = (lo + hi) / 2;

		if (c[mid].ts < ts)
			lo = mid + 1;
		else
			hi = mid;
	}
	uint64_t x0 = c[lo - 1].ts, x1 = c[lo].ts;
	double y0 = c[lo - 1].s, y1 = c[lo].s;

	return x1 != x0 ? y0 + (double)((int64_t)(ts - x0)) * (y1 - y0) / (double)(int64_t)(x1 - x0) : y0;
}

/* round(x, 4), as JSON: "%.4f" is the exact binary value rounded half-even, like Python's round() */
static void print_s(const char *key, bool have, double x)
{
	if (have)
		printf(",\"%s\":%.4f", key, x);
	else
		printf(",\"%s\":null", key);
}

static void print_ts(const char *key, bool have, uint64_t ts)
{
	if (have)
		printf(",\"%s\":%" PRIu64, key, ts);
	else
		printf(",\"%s\":null", key);
}

/* ---------------------------------------------------------------- main */

static struct pages cpu_pages[MAX_CPUS];
static struct json head_json, tail_json;

int main(int argc, char **argv)
{
	size_t off = strlen(RAW_MAGIC), head_off = 0, head_len = 0, tail_off = 0, tail_len = 0, npages = 0;
	bool has_head = false, has_tail = false;
	char clock[128];
	long long kprobe_missed = 0, dropped = 0;
	uint64_t t0 = now_ns();
	struct stat st;
	int fd;

	if (argc != 2 || argv[1][0] == '-') {
		fprintf(stderr, "usage: xsktrace TRACE   (a racelab raw trace; prints its interleaving counts as JSON)\n");
		return 2;
	}
	fd = open(argv[1], O_RDONLY);
	if (fd < 0 || fstat(fd, &st) < 0)
		die(2, "%s: %s", argv[1], strerror(errno));
	DN = (size_t)st.st_size;
	if (DN < off)
		die(2, "%s: not a racelab raw trace", argv[1]);
	D = mmap(NULL, DN, PROT_READ, MAP_PRIVATE, fd, 0);
	if (D == MAP_FAILED)
		die(2, "%s: mmap: %s", argv[1], strerror(errno));
	close(fd);
	madvise((void *)D, DN, MADV_SEQUENTIAL);
	if (memcmp(D, RAW_MAGIC, off))
		die(2, "%s: not a racelab raw trace", argv[1]);

	/* the records, like evidence.read_raw(): a truncated last record is left out */
	while (off + 12 <= DN) {
		uint32_t cpu = rd32(off + 4), len = rd32(off + 8);

		if (len > DN - off - 12)
			break;
		if (!memcmp(D + off, "PAGE", 4)) {
			struct pages *pg;

			if (cpu >= MAX_CPUS)
				die(3, "a page of cpu %u: at most %d CPUs", cpu, MAX_CPUS);
			pg = &cpu_pages[cpu];
			pg->p = grow(pg->p, &pg->cap, pg->n + 1, sizeof(*pg->p));
			pg->p[pg->n++] = (struct page){ off + 12, len };
			npages++;
		} else if (!memcmp(D + off, "HEAD", 4)) {
			has_head = true;
			head_off = off + 12;
			head_len = len;
		} else if (!memcmp(D + off, "TAIL", 4)) {
			has_tail = true;
			tail_off = off + 12;
			tail_len = len;
		}
		off += 12 + len;
	}
	if (has_head && !jload(&head_json, D + head_off, head_len))
		die(3, "HEAD is not JSON this reader understands");
	if (has_head)
		load_head(&head_json, clock, sizeof(clock));
	else
		snprintf(clock, sizeof(clock), "counter");
	if (has_tail) {
		const struct json *j = &tail_json;
		int prof, stats;

		if (!jload(&tail_json, D + tail_off, tail_len))
			die(3, "TAIL is not JSON this reader understands");
		prof = jget(j, 0, "kprobe_profile");
		stats = jget(j, 0, "stats");
		if (prof >= 0 && j->t[prof].type == J_OBJ)
			for (int k = prof + 1; k < j->t[prof].next; k = j->t[j->t[k].next].next) {
				long long v;

				if (!jint(j, jat(j, j->t[k].next, 1), &v))
					die(3, "TAIL: a malformed kprobe_profile entry");
				kprobe_missed += v;
			}
		if (stats >= 0 && j->t[stats].type == J_OBJ)
			for (int k = stats + 1; k < j->t[stats].next; k = j->t[j->t[k].next].next) {
				long long v;
				int dv = jget(j, j->t[k].next, "dropped events");

				if (dv >= 0 && jint(j, dv, &v))
					dropped += v;
			}
	}

	/* every CPU's stream, merged: the lowest (ts, cpu) head first, as heapq.merge does */
	struct stream streams[MAX_CPUS];
	int ns = 0;

	for (int c = 0; c < MAX_CPUS; c++)
		if (cpu_pages[c].n) {
			struct stream *s = &streams[ns++];

			memset(s, 0, sizeof(*s));
			s->cpu = c;
			s->pg = &cpu_pages[c];
			s->has = stream_next(s, &s->head);
		}
	for (;;) {
		struct stream *best = NULL;

		for (int i = 0; i < ns; i++)
			if (streams[i].has && (!best || streams[i].head.ts < best->head.ts))
				best = &streams[i];
		if (!best)
			break;
		feed(best->cpu, &best->head);
		best->has = stream_next(best, &best->head);
	}

	/* _Analyzer.finish() */
	for (int c = 0; c < MAX_CPUS; c++)
		if (A.open[c].on)
			close_rcv(c, false, 0, false, A.has_first ? A.last_ts : 0);
	uint64_t hits = 0, overlaps = 0, first_hit = 0, first_overlap = 0, hits_before = 0, overlaps_before = 0;

	for (size_t i = 0; i < A.nlog; i++) {
		const struct logent *l = &A.log[i];
		bool u = l->kind == 'u';

		if (u) {
			first_hit = !hits || l->ts < first_hit ? l->ts : first_hit;
			hits++;
		} else {
			first_overlap = !overlaps || l->ts < first_overlap ? l->ts : first_overlap;
			overlaps++;
		}
		if (A.has_violation && l->ts < A.violation_ts) {
			if (u)
				hits_before++;
			else
				overlaps_before++;
		}
	}
	bool timed = A.has_first_rcv && A.nclock >= 2;
	double t_first = timed ? seconds(A.first_rcv) : 0;

	printf("{\"scanner\":\"xsktrace\",\"hits_upper_bound\":false");
	printf(",\"receives\":%" PRIu64 ",\"failed_receives\":%" PRIu64 ",\"flushes\":%" PRIu64, A.receives, A.failed,
	       A.flushes);
	printf(",\"window_hits\":%" PRIu64 ",\"unflushed_hits\":%" PRIu64 ",\"overlap_hits\":%" PRIu64, hits, hits,
	       overlaps);
	printf(",\"sockets\":%zu,\"cpus\":[", A.nsocks);
	for (int c = 0, first = 1; c < MAX_CPUS; c++)
		if (A.cpus >> c & 1) {
			printf("%s%d", first ? "" : ",", c);
			first = 0;
		}
	printf("],\"lost\":%" PRIu64 ",\"gaps\":%" PRIu64 ",\"retracted\":%" PRIu64, A.lost, A.gaps, A.retracted);
	printf(",\"dropped\":%lld,\"kprobe_missed\":%lld,\"outcomes_traced\":%s", dropped, kprobe_missed,
	       A.outcomes ? "true" : "false");
	printf(",\"trace_clock\":\"%s\"", clock);
	print_ts("first_ts", A.has_first, A.first_ts);
	print_ts("last_ts", A.has_first, A.last_ts);
	print_ts("first_hit_ts", hits > 0, first_hit);
	print_ts("first_overlap_ts", overlaps > 0, first_overlap);
	print_s("span_s", timed && A.has_first, timed ? seconds(A.last_ts) - t_first : 0);
	print_s("first_hit_s", timed && hits, timed && hits ? seconds(first_hit) - t_first : 0);
	print_s("first_overlap_s", timed && overlaps, timed && overlaps ? seconds(first_overlap) - t_first : 0);
	printf(",\"violation\":%s", A.has_violation ? "true" : "false");
	print_ts("violation_ts", A.has_violation, A.violation_ts);
	if (A.has_violation)
		printf(",\"hits_before_violation\":%" PRIu64 ",\"overlaps_before_violation\":%" PRIu64, hits_before,
		       overlaps_before);
	else
		printf(",\"hits_before_violation\":null,\"overlaps_before_violation\":null");
	printf(",\"recorder_s\":{");
	if (A.has_violation && A.nclock >= 2) {
		double tv = seconds(A.violation_ts);
		int first = 1;

		/* from the trace's start, or the CPU's last gap: a CPU that began receiving late
		   was recorded, idle, all along (as lab.evidence) */
		for (int c = 0; c < MAX_CPUS; c++) {
			uint64_t start = (A.has_gap >> c & 1) ? A.gap_at[c] : A.first_ts;

			if (((A.cpus | A.has_gap) >> c & 1) && start <= A.violation_ts) {
				printf("%s\"%d\":%.4f", first ? "" : ",", c, tv - seconds(start));
				first = 0;
			}
		}
	}
	printf("},\"marks\":%" PRIu64 ",\"clock_marks\":%zu,\"tail\":%s,\"head\":%s", A.marks, A.nclock,
	       has_tail ? "true" : "false", has_head ? "true" : "false");
	printf(",\"events\":%" PRIu64 ",\"pages\":%zu,\"trace_bytes\":%zu,\"seconds\":%.3f}\n", A.events, npages, DN,
	       (double)(now_ns() - t0) / 1e9);
	return fflush(stdout) ? 3 : 0;
}

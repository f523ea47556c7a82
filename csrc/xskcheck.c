// SPDX-License-Identifier: GPL-2.0-only
/* xskcheck: the racelab AF_XDP ring checker.
 *
 * Opens copy-mode AF_XDP sockets on queues 0..N-1 of --dev (and of
 * --peer-dev in forward mode), loads a hand-assembled XDP program with raw
 * bpf() calls, attaches it with rtnetlink, and then checks every descriptor
 * the kernel hands out against the invariants a correct kernel keeps (one
 * detector per kind, listed in lab/dataplane.py VIOLATION_KINDS).  No libbpf,
 * libxdp or clang.
 *
 * Threads: one worker per "group": a socket (rxdrop), the pair of sockets
 * on queue q of both devices (forward), or the --sockets-per-queue sockets
 * bound to one queue with XDP_SHARED_UMEM (rxdrop), which share one buffer
 * pool and so one FILL ring.  A group owns a fixed range of UMEM frames and
 * all per-frame bookkeeping for them, so the hot path takes no locks.  The
 * main thread prints stats and handles signals.
 *
 * main() runs its phases in order, each a function at the end of this file:
 * find the devices, lay out the groups and UMEMs, size the rings and tables
 * (--selfbench stops here), load the BPF objects, open and poison the
 * sockets, post the FILL rings, attach XDP, print "ready", start the
 * workers, print stats until the stop, then join, detach and print "done".
 *
 * Output: JSON lines on stdout (ready, violation, stats, done); diagnostics
 * on stderr.  Exit 0 ok, 2 bad arguments / no XDP sockets / not permitted,
 * 3 runtime failure.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <endian.h>
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <linux/bpf.h>
#include <linux/if_link.h>
#include <linux/if_xdp.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <net/if.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/mman.h>
#include <sys/mount.h>
#include <sys/stat.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bpfasm.h"
#include "common.h"

#ifndef AF_XDP
#define AF_XDP 44
#endif
#ifndef SOL_XDP
#define SOL_XDP 283
#endif

#ifndef SO_PREFER_BUSY_POLL
#define SO_PREFER_BUSY_POLL 69
#endif
#ifndef SO_BUSY_POLL_BUDGET
#define SO_BUSY_POLL_BUDGET 70
#endif

#define POISON 0xdeadbeefdeadbeefull
#define XDP_META_MAGIC 0x58534b4du /* "XSKM": written by our XDP program */
#define APP_MAGIC 0x53544d50u	   /* "STMP": the application's own stamp */
#define XDP_HEADROOM 256	   /* XDP_PACKET_HEADROOM */
#define META_LEN 8
#define TOMB UINT32_MAX
#define NONE UINT32_MAX
#define MAX_QUEUES 64
#define MAX_SOCKS (2 * MAX_QUEUES)
#define MAX_SPQ 8 /* sockets sharing one queue's pool */
#define MAX_BATCH 1024
#define FLOWTAB 1024
#define PRINT_CAP 1000
#define IDLE_SLEEPS 2000 /* idle sleeps in a row before blocking in poll() */
#define INJECT_TIMES 3
#define INJECT_FIRST 500  /* rx descriptors before the first injected fault */
#define INJECT_EVERY 2000 /* and between the next ones */

/* ------------------------------------------------------------------ */
/* kinds, states, options                                              */

enum kind { K_ORDER, K_POISON, K_DUPLICATE, K_OFFSET, K_OVERHELD, K_META, K_LENGTH,
	    K_STATE, K_SEQUENCE, K_CHECKSUM, K_LATE, NKINDS };
static const char *const kind_name[NKINDS] = {
	"order", "poison", "duplicate", "offset", "over-held", "meta", "length",
	"state", "sequence", "checksum", "late",
};

/* Per-frame owner, from the application's point of view. */
enum fstate { S_FREE, S_FILL, S_RX, S_TX, S_COMP };
static const char *const state_name[] = { "FREE", "FILL", "RX", "TX", "COMP" };

/* per-frame flags */
#define F_STAMPED 1 /* the app stamp is in the frame's metadata slot */
#define F_DUPINJ 2  /* injected duplicate FILL post: its second RX is expected */
#define F_TXDUPINJ 4 /* injected duplicate TX post: its second completion is expected */
#define F_SKIPPED 8  /* passed over when the FILL FIFO resynchronised: if it arrives, it is late */

/* Onsets.  One kernel fault usually shows as several violations (one lost
 * FILL descriptor, one stale slot, one held-twice frame ripple through the
 * next descriptors), and the rate statistics need independent events.  A
 * violation is an onset when its socket saw max(ONSET_QUIET, 2 x its group's frames) descriptors
 * without any violation before it (or none ever): by then every frame that
 * was in flight at the previous fault has come back through the rings twice,
 * so what follows is no longer that fault's echo. */
#define ONSET_QUIET 256
/* FILL order resynchronisation: an RX frame found at most RESYNC_MAX FIFO
 * slots behind the head means the entries before it were lost or overtaken;
 * they are passed over (F_SKIPPED) so that the frames after it are checked
 * against the right order again.  A frame further away is a stale or
 * misplaced descriptor, not a loss: the FIFO keeps its head then. */
#define RESYNC_MAX 16
#define PHANTOM (UINT32_MAX - 1) /* --inject order: a FILL entry the kernel never had */

static struct {
	const char *dev, *peer_dev;
	bool forward;
	bool native;
	int queues;
	uint32_t frame_size, headroom, frames, ring;
	bool shared_umem;
	int batch;
	double duration;
	int stats_ms;
	bool checks;
	int inject; /* -1 none, else enum kind */
	bool stop_on_first, trace_marker;
	int cpus[256], ncpus;
	uint64_t seed;
	int spin;
	int busy_poll_us; /* 0: off */
	int spq;	  /* sockets per queue, sharing that queue's pool */
	bool pick_rr;	  /* the XDP program picks the socket round-robin, not by CPU */
	int idle_us;	  /* idle: sleep this long instead of poll() (0: poll) */
	uint64_t selfbench; /* > 0: no kernel, an in-memory one; this many descriptors */
	uint32_t selfbench_size; /* its frame size */
} opt = {
	.queues = 1, .frame_size = 2048, .frames = 256, .batch = 64, .stats_ms = 500,
	.checks = true, .inject = -1, .seed = 1, .spin = 0, .idle_us = 50, .selfbench_size = 64,
	.spq = 1,
};

static uint32_t exp_off; /* expected addr % frame_size of an RX descriptor */
static unsigned fs_shift; /* frame_size = 1 << fs_shift: no division per descriptor */
static uint64_t t0;
static volatile sig_atomic_t stop_flag;
static volatile int fatal_flag;
static const char *stop_reason = "signal";
static pthread_mutex_t out_lock = PTHREAD_MUTEX_INITIALIZER;
static uint64_t printed, total_violations;
static int inject_left = INJECT_TIMES;
static int trace_fd = -1, tracing_on_fd = -1;
static int tracing_stopped;

/* ------------------------------------------------------------------ */
/* data structures                                                     */

struct ring {
	uint32_t *prod, *cons, *flags;
	void *descs;
	uint32_t mask, size;
	uint32_t local;	 /* our producer (FILL/TX) or consumer (RX/COMP) index */
	uint32_t cached; /* last seen consumer (FILL/TX) or producer (RX/COMP) */
	void *map;
	size_t maplen;
};

struct fifo { /* frames posted to one FILL ring, in posting order */
	uint32_t *e;
	uint32_t mask, head, tail;
};

struct flowent {
	uint32_t flow, used;
	uint64_t last;
};

struct stats {
	uint64_t rx, tx, fill, comp, foreign, ours, viol, kicks, onsets, skipped;
	uint64_t kinds[NKINDS], onset_kinds[NKINDS];
} __attribute__((aligned(64)));

struct group;

struct xsk {
	int fd;
	int devno; /* 0 = --dev, 1 = --peer-dev */
	const char *dev;
	int ifindex;
	uint32_t queue;
	struct ring rx, tx, fill, comp;
	uint8_t *umem;	      /* this socket's UMEM (shared or own) */
	uint64_t umem_frames; /* frames in that UMEM */
	uint32_t gbase;	      /* global frame number of UMEM address 0 */
	bool owns_umem;
	size_t umem_maplen;
	struct fifo fifo;
	struct flowent *flows;
	uint32_t home_first, home_n; /* the frames this socket fills */
	uint32_t *pend;		     /* frames waiting for FILL space */
	uint32_t npend;
	struct xsk *peer; /* forward: where frames received here are sent */
	struct xsk *fq;	  /* whose FILL ring (the pool's) takes this socket's frames back: itself,
			   * or the queue's first socket when several share its pool */
	int slot;	  /* index in its group */
	uint64_t last_fseq; /* pooled: FILL posting number of the last frame received here */
	struct group *g;
	uint64_t rx_count;
	uint64_t seen;	    /* RX descriptors checked in the pool (kept on s->fq) */
	uint64_t last_viol; /* `seen` at its last violation */
	bool any_viol;
};

struct outd {
	uint64_t addr;
	uint32_t fi, len;
};

struct group {
	int id;
	struct xsk *s[MAX_SPQ];
	int ns;
	uint32_t first, nframes;
	uint8_t *umem; /* UMEM holding this group's frames */
	uint32_t umem_gbase;
	uint64_t fill_seq; /* pooled: FILL postings so far, across the pool */
	int64_t held;
	int cpu;
	pthread_t th;
	struct stats st;
	uint64_t next_inject;
	bool armed;
	struct outd out[MAX_BATCH];
	uint32_t tmp[2][MAX_BATCH];
};

static struct xsk socks[MAX_SOCKS];
static int nsocks;
static struct group groups[MAX_QUEUES];
static int ngroups;
static uint8_t *fstate, *fflags; /* per global frame */
static uint64_t *fseq;		  /* pooled: per frame, its FILL posting number in its pool */
static uint8_t *fsock;		  /* pooled: per frame, the slot of the socket that last received it */
static const char *dev_name[2]; /* --dev, --peer-dev */
static int ifindex[2];
static int xskmap_fd[2] = { -1, -1 }, prog_fd[2] = { -1, -1 }, ctl_fd = -1;
static bool attached[2];
static uint8_t *shared_map; /* --shared-umem: the one UMEM */
static size_t shared_maplen;

#define INC(x) __atomic_store_n(&(x), (x) + 1, __ATOMIC_RELAXED)
#define ADD(x, n) __atomic_store_n(&(x), (x) + (n), __ATOMIC_RELAXED)
#define RD(x) __atomic_load_n(&(x), __ATOMIC_RELAXED)

/* ------------------------------------------------------------------ */
/* output                                                              */

static double tnow(void)
{
	return t0 ? (double)(now_ns() - t0) / 1e9 : 0.0;
}

static void emit(const char *line)
{
	pthread_mutex_lock(&out_lock);
	if (fputs(line, stdout) == EOF || fflush(stdout) == EOF) {
		/* nobody reads us any more: stop, and still clean up */
		stop_reason = "stdout closed";
		stop_flag = 1;
	}
	pthread_mutex_unlock(&out_lock);
}

static void write_str(int fd, const char *s)
{
	if (fd >= 0 && write(fd, s, strlen(s)) < 0) {
		/* tracing is best effort */
	}
}

static void violation(struct group *g, struct xsk *s, enum kind k, uint64_t addr, uint64_t expected,
		      uint64_t actual, const char *fmt, ...)
{
	char detail[160], line[512];
	uint64_t quiet = 2ull * g->nframes > ONSET_QUIET ? 2ull * g->nframes : ONSET_QUIET;
	struct xsk *o = s->fq; /* onsets per pool: one fault echoes on all the sockets sharing it */
	bool onset = !o->any_viol || o->seen - o->last_viol >= quiet;
	uint64_t n;
	bool stop_trace;
	va_list ap;

	o->any_viol = true;
	o->last_viol = o->seen;
	INC(g->st.kinds[k]);
	INC(g->st.viol);
	if (onset) {
		INC(g->st.onsets);
		INC(g->st.onset_kinds[k]);
	}
	n = __atomic_fetch_add(&total_violations, 1, __ATOMIC_RELAXED);
	/* flight recorder: the trace ends at the first violation, whether or not the run does;
	 * after its marker, since the kernel refuses trace_marker writes while tracing is off */
	stop_trace = (opt.stop_on_first || opt.trace_marker) && n == 0 &&
		     !__atomic_exchange_n(&tracing_stopped, 1, __ATOMIC_RELAXED);
	if (opt.stop_on_first && n == 0) {
		stop_reason = "stop-on-first";
		stop_flag = 1;
	}
	if (__atomic_fetch_add(&printed, 1, __ATOMIC_RELAXED) >= PRINT_CAP) {
		if (stop_trace)
			write_str(tracing_on_fd, "0");
		return;
	}
	va_start(ap, fmt);
	vsnprintf(detail, sizeof(detail), fmt, ap);
	va_end(ap);
	for (char *p = detail; *p; p++)
		if (*p == '"' || *p == '\\' || (unsigned char)*p < 0x20)
			*p = '\'';
	if (trace_fd >= 0) {
		snprintf(line, sizeof(line),
			 "racelab violation kind=%s dev=%s queue=%u addr=%llu expected=%llu actual=%llu %s\n",
			 kind_name[k], s->dev, s->queue, (unsigned long long)addr, (unsigned long long)expected,
			 (unsigned long long)actual, detail);
		write_str(trace_fd, line);
	}
	if (stop_trace)
		write_str(tracing_on_fd, "0");
	snprintf(line, sizeof(line),
		 "{\"type\":\"violation\",\"t\":%.6f,\"kind\":\"%s\",\"dev\":\"%s\",\"queue\":%u,\"cpu\":%d,"
		 "\"addr\":%llu,\"expected\":%llu,\"actual\":%llu,\"rx\":%llu,\"onset\":%s,\"detail\":\"%s\"}\n",
		 tnow(), kind_name[k], s->dev, s->queue, sched_getcpu(), (unsigned long long)addr,
		 (unsigned long long)expected, (unsigned long long)actual, (unsigned long long)RD(g->st.rx),
		 onset ? "true" : "false", detail);
	emit(line);
}

/* ------------------------------------------------------------------ */
/* rings                                                               */

static inline uint32_t cons_avail(struct ring *r, uint32_t max)
{
	uint32_t n = r->cached - r->local;

	if (n == 0) {
		r->cached = __atomic_load_n(r->prod, __ATOMIC_ACQUIRE);
		n = r->cached - r->local;
	}
	return n < max ? n : max;
}

static inline void cons_release(struct ring *r, uint32_t n)
{
	r->local += n;
	__atomic_store_n(r->cons, r->local, __ATOMIC_RELEASE);
}

static inline uint32_t prod_free(struct ring *r, uint32_t want)
{
	uint32_t free_ = r->size - (r->local - r->cached);

	if (free_ < want) {
		r->cached = __atomic_load_n(r->cons, __ATOMIC_ACQUIRE);
		free_ = r->size - (r->local - r->cached);
	}
	return free_;
}

static inline void prod_submit(struct ring *r)
{
	__atomic_store_n(r->prod, r->local, __ATOMIC_RELEASE);
}

/* ------------------------------------------------------------------ */
/* the FILL-order FIFO                                                 */

static inline void fifo_push(struct fifo *f, uint32_t fi)
{
	if (f->tail - f->head > f->mask) /* only after kernel bugs */
		f->head++;
	f->e[f->tail++ & f->mask] = fi;
}

static inline uint32_t fifo_head(struct fifo *f)
{
	while (f->head != f->tail && f->e[f->head & f->mask] == TOMB)
		f->head++;
	return f->head == f->tail ? NONE : f->e[f->head & f->mask];
}

/* FIFO slots between the head and fi, or NONE when fi is not in the FIFO. */
static uint32_t fifo_find(struct fifo *f, uint32_t fi)
{
	for (uint32_t i = f->head; i != f->tail; i++)
		if (f->e[i & f->mask] == fi)
			return i - f->head;
	return NONE;
}

/* Resynchronise: pass over the d slots before the frame at distance d, and that frame. */
static void fifo_skip(struct group *g, struct fifo *f, uint32_t d)
{
	for (uint32_t i = 0; i < d; i++) {
		uint32_t e = f->e[(f->head + i) & f->mask];

		if (e == TOMB)
			continue;
		if (e != PHANTOM)
			fflags[e] |= F_SKIPPED;
		INC(g->st.skipped);
	}
	f->head += d + 1;
}

static bool fifo_remove(struct fifo *f, uint32_t fi)
{
	for (uint32_t i = f->head; i != f->tail; i++) {
		if (f->e[i & f->mask] == fi) {
			f->e[i & f->mask] = TOMB;
			return true;
		}
	}
	return false;
}

/* ------------------------------------------------------------------ */
/* frames                                                              */

static inline uint8_t *frame_ptr(struct group *g, uint32_t fi)
{
	return g->umem + (uint64_t)(fi - g->umem_gbase) * opt.frame_size;
}

static inline uint64_t frame_addr(struct xsk *s, uint32_t fi)
{
	return (uint64_t)(fi - s->gbase) * opt.frame_size;
}

static inline uint32_t stamp_of(uint32_t fi)
{
	return fi ^ 0x5a5a0000u;
}

static bool take_inject(void)
{
	int v = __atomic_load_n(&inject_left, __ATOMIC_RELAXED);

	while (v > 0)
		if (__atomic_compare_exchange_n(&inject_left, &v, v - 1, false, __ATOMIC_RELAXED,
						__ATOMIC_RELAXED))
			return true;
	return false;
}

static inline bool armed_for(struct group *g, enum kind k)
{
	return g->armed && opt.inject == (int)k;
}

/* Several sockets consume one pool's FILL ring: the kernel hands FILL
 * entries to whichever socket the XDP program picked, so no socket sees the
 * whole FILL order; each sees a subsequence of it (checked with fseq). */
static inline bool pooled(void)
{
	return opt.spq > 1;
}

/* Before the application gives frame fi back to the kernel (FILL or TX):
 * the frame must be the application's, and its stamp intact. */
static bool check_giveback(struct group *g, struct xsk *s, uint32_t fi, enum fstate to)
{
	uint8_t st = fstate[fi];

	if (fflags[fi] & F_STAMPED) {
		uint32_t *m = (uint32_t *)(frame_ptr(g, fi) + exp_off - META_LEN);

		if (m[1] != APP_MAGIC || m[0] != stamp_of(fi))
			violation(g, s, K_META, frame_addr(s, fi), ((uint64_t)APP_MAGIC << 32) | stamp_of(fi),
				  ((uint64_t)m[1] << 32) | m[0],
				  "app stamp changed while the app held the frame (frame %u)", fi);
		fflags[fi] &= (uint8_t)~F_STAMPED;
	}
	if (st == S_RX || st == S_COMP || st == S_FREE)
		return true;
	if (st == (uint8_t)to || (st == S_FILL && to == S_TX) || (st == S_TX && to == S_FILL)) {
		if (st == S_FILL || st == S_TX)
			violation(g, s, K_DUPLICATE, frame_addr(s, fi), 0, 0,
				  "frame %u given to %s while still outstanding in %s", fi, state_name[to],
				  state_name[st]);
		return false;
	}
	violation(g, s, K_STATE, frame_addr(s, fi), S_RX, st, "%s->%s (frame %u)", state_name[st],
		  state_name[to], fi);
	return false;
}

/* Post frames to s's FILL ring; what does not fit waits in s->pend. */
static void post_fill(struct group *g, struct xsk *s, const uint32_t *list, uint32_t n)
{
	uint32_t fr, k = 0;
	bool lost = false;

	if (s->npend) { /* keep FILL order: older frames first */
		if (n)
			memcpy(s->pend + s->npend, list, n * sizeof(*list));
		s->npend += n;
		list = s->pend;
		n = s->npend;
	}
	if (n == 0)
		return;
	fr = prod_free(&s->fill, n);
	if (fr > n)
		fr = n;
	if (opt.checks && !pooled() && armed_for(g, K_ORDER) && fr >= 1 && take_inject()) {
		/* record a FILL entry the kernel never gets: the lost descriptor of a
		 * FILL-ring race, which must give one order onset, not a cascade */
		lost = true;
		g->armed = false;
	}
	for (; k < fr; k++) {
		uint32_t fi = list[k];

		if (opt.checks) {
			check_giveback(g, s, fi, S_FILL);
			fstate[fi] = S_FILL;
			if (pooled()) {
				fseq[fi] = ++g->fill_seq;
			} else {
				if (lost && k == 0)
					fifo_push(&s->fifo, PHANTOM);
				fifo_push(&s->fifo, fi);
			}
		}
		((uint64_t *)s->fill.descs)[s->fill.local++ & s->fill.mask] = frame_addr(s, fi);
		g->held--;
	}
	if (opt.checks && fr > 0 && armed_for(g, K_LATE)) {
		uint32_t h = fifo_head(&s->fifo);

		/* bookkeeping bug: believe the oldest FILL entry was passed over */
		if (h != NONE && h != PHANTOM && take_inject()) {
			fflags[h] |= F_SKIPPED;
			s->fifo.head++;
			g->armed = false;
		}
	}
	if (opt.checks && fr > 0 && g->armed && !opt.forward) {
		uint32_t last = list[fr - 1];

		if (opt.inject == K_DUPLICATE && prod_free(&s->fill, 1) >= 1 && take_inject()) {
			/* post the same frame again: a real second FILL entry */
			check_giveback(g, s, last, S_FILL);
			if (pooled())
				fseq[last] = ++g->fill_seq;
			else
				fifo_push(&s->fifo, last);
			fflags[last] |= F_DUPINJ;
			((uint64_t *)s->fill.descs)[s->fill.local++ & s->fill.mask] = frame_addr(s, last);
			g->armed = false;
		} else if (opt.inject == K_STATE && take_inject()) {
			/* bookkeeping bug: believe a frame in FILL came back on COMP */
			fstate[last] = S_COMP;
			g->armed = false;
		}
	}
	prod_submit(&s->fill);
	ADD(g->st.fill, fr);
	if (fr < n) {
		memmove(s->pend, list + fr, (n - fr) * sizeof(*list));
		s->npend = n - fr;
	} else {
		s->npend = 0;
	}
}

static void post_tx(struct group *g, struct xsk *s, const struct outd *list, uint32_t n)
{
	struct xdp_desc *d;
	uint32_t fr = prod_free(&s->tx, n);

	/* The TX ring holds every frame of the group, so it cannot be full. */
	if (fr < n) {
		fprintf(stderr, "xskcheck: TX ring of %s q%u full (ring too small?)\n", s->dev, s->queue);
		n = fr;
	}
	for (uint32_t k = 0; k < n; k++) {
		if (opt.checks) {
			if (!check_giveback(g, s, list[k].fi, S_TX))
				continue;
			fstate[list[k].fi] = S_TX;
		}
		d = &((struct xdp_desc *)s->tx.descs)[s->tx.local++ & s->tx.mask];
		d->addr = list[k].addr;
		d->len = list[k].len;
		d->options = 0;
		g->held--;
	}
	if (opt.checks && n > 0 && g->armed && fstate[list[n - 1].fi] == S_TX) {
		uint32_t last = list[n - 1].fi;

		if (opt.inject == K_DUPLICATE && prod_free(&s->tx, 1) >= 1 && take_inject()) {
			/* send the same frame twice: a real second TX entry, so a second completion */
			d = &((struct xdp_desc *)s->tx.descs)[s->tx.local++ & s->tx.mask];
			d->addr = list[n - 1].addr;
			d->len = list[n - 1].len;
			d->options = 0;
			fflags[last] |= F_TXDUPINJ;
			g->armed = false;
		} else if (opt.inject == K_STATE && take_inject()) {
			/* bookkeeping bug: believe a frame just sent is back in FILL */
			fstate[last] = S_FILL;
			g->armed = false;
		}
	}
	prod_submit(&s->tx);
	ADD(g->st.tx, n);
}

/* ------------------------------------------------------------------ */
/* payload                                                             */

static void check_payload(struct group *g, struct xsk *s, uint64_t addr, uint8_t *p, uint32_t len)
{
	uint8_t *ip = p + ETH_HLEN_, *pl = p + HDRS_LEN;
	uint32_t magic, flow, csum, want, tot, rest;
	uint64_t seq, sq;
	struct flowent *fe;

	if (len < MIN_FRAME || p[12] != 0x08 || p[13] != 0x00 || ip[0] != 0x45 || ip[9] != 17) {
		INC(g->st.foreign);
		return;
	}
	memcpy(&magic, pl, 4);
	if (ntohl(magic) != RACE_MAGIC) {
		INC(g->st.foreign);
		return;
	}
	INC(g->st.ours);
	memcpy(&flow, pl + 4, 4);
	flow = ntohl(flow);
	fe = &s->flows[flow & (FLOWTAB - 1)];
	if (fe->used && fe->flow == flow && armed_for(g, K_SEQUENCE) && take_inject()) {
		sq = htobe64(fe->last); /* rewrite the frame: a seq this flow already had */
		memcpy(pl + 8, &sq, 8);
		g->armed = false;
	}
	if (armed_for(g, K_CHECKSUM) && take_inject()) {
		pl[16] ^= 0x5a; /* damage the stored checksum */
		g->armed = false;
	}
	memcpy(&sq, pl + 8, 8);
	seq = be64toh(sq);
	memcpy(&csum, pl + 16, 4);
	csum = ntohl(csum);
	tot = ((uint32_t)ip[2] << 8) | ip[3];
	if (tot < IP_HLEN_ + UDP_HLEN_ + PL_HDR_LEN) {
		violation(g, s, K_CHECKSUM, addr, 0, tot, "flow %u seq %llu: ip total length %u too short", flow,
			  (unsigned long long)seq, tot);
	} else if (ETH_HLEN_ + tot > len) {
		violation(g, s, K_CHECKSUM, addr, ETH_HLEN_ + tot, len, "flow %u seq %llu: truncated frame",
			  flow, (unsigned long long)seq);
	} else {
		rest = tot - IP_HLEN_ - UDP_HLEN_ - PL_HDR_LEN;
		want = payload_csum(pl + PL_HDR_LEN, rest);
		if (want != csum)
			violation(g, s, K_CHECKSUM, addr, want, csum, "flow %u seq %llu: payload checksum", flow,
				  (unsigned long long)seq);
	}
	if (!fe->used || fe->flow != flow) {
		fe->used = 1;
		fe->flow = flow;
		fe->last = seq;
	} else {
		if (seq <= fe->last)
			violation(g, s, K_SEQUENCE, addr, fe->last + 1, seq, "flow %u: seq %llu after %llu", flow,
				  (unsigned long long)seq, (unsigned long long)fe->last);
		else
			fe->last = seq;
	}
}

/* ------------------------------------------------------------------ */
/* the RX checks                                                       */

#define RX_DISCARD (-1)
#define RX_WITHHOLD (-2)

/* Check one RX descriptor.  Returns the global frame number to pass on,
 * RX_DISCARD (not ours to pass on: a stale, duplicate or foreign address),
 * or RX_WITHHOLD (keep it: the injected duplicate is still to come). */
static int64_t check_rx(struct group *g, struct xsk *s, const struct xdp_desc *d)
{
	uint64_t addr = d->addr, local;
	uint32_t len = d->len, fi, off, head = NONE;
	uint32_t *m;
	uint8_t st;
	bool off_ok;

	s->fq->seen++; /* counted per pool, like the onsets */
	if (addr == POISON) {
		violation(g, s, K_POISON, addr, 0, addr, "RX slot still holds the poison: never written");
		g->held--;
		return RX_DISCARD;
	}
	local = addr >> fs_shift;
	off = (uint32_t)(addr & (opt.frame_size - 1));
	if (local >= s->umem_frames) {
		violation(g, s, K_STATE, addr, s->umem_frames, local, "address beyond the UMEM (%llu frames)",
			  (unsigned long long)s->umem_frames);
		g->held--;
		return RX_DISCARD;
	}
	fi = s->gbase + (uint32_t)local;
	if (fi < g->first || fi >= g->first + g->nframes) {
		violation(g, s, K_STATE, addr, g->first, fi, "frame %u was never posted to this FILL ring", fi);
		g->held--;
		return RX_DISCARD;
	}
	off_ok = off == exp_off;
	if (!off_ok)
		violation(g, s, K_OFFSET, addr, exp_off, off, "addr %% frame_size = %u, expected %u", off, exp_off);

	st = fstate[fi];
	if (st == S_RX) {
		if (fflags[fi] & F_DUPINJ) {
			/* the injected second FILL entry arrived: hand the frame back now */
			if (pooled())
				violation(g, s, K_DUPLICATE, addr, 0, fi,
					  "frame %u received on socket %d while the app holds it from socket %d", fi,
					  s->slot, fsock[fi]);
			else
				violation(g, s, K_DUPLICATE, addr, 0, fi, "frame %u received while the app holds it",
					  fi);
			fflags[fi] &= (uint8_t)~F_DUPINJ;
			if (fifo_head(&s->fifo) == fi)
				s->fifo.head++;
			g->held--;
			return fi;
		}
		if (pooled())
			violation(g, s, K_DUPLICATE, addr, 0, fi,
				  "frame %u received on socket %d while the app holds it from socket %d", fi, s->slot,
				  fsock[fi]);
		else
			violation(g, s, K_DUPLICATE, addr, 0, fi, "frame %u received while the app holds it", fi);
		g->held--;
		return RX_DISCARD;
	}
	if (st == S_TX) {
		violation(g, s, K_STATE, addr, S_FILL, st, "TX->RX (frame %u)", fi);
		g->held--;
		return RX_DISCARD;
	}
	if (st != S_FILL) /* the app thinks it holds it: take it (once) */
		violation(g, s, K_STATE, addr, S_FILL, st, "%s->RX (frame %u)", state_name[st], fi);

	if (pooled()) {
		uint64_t q = fseq[fi];

		if (armed_for(g, K_ORDER) && take_inject()) {
			/* bookkeeping bug: believe this socket already had a frame posted after this one */
			s->last_fseq = q;
			g->armed = false;
		}
		if (q <= s->last_fseq)
			violation(g, s, K_ORDER, addr, s->last_fseq + 1, q,
				  "RX frame %u on socket %d: FILL post %llu after post %llu, not a subsequence of "
				  "the pool's FILL order", fi, s->slot, (unsigned long long)q,
				  (unsigned long long)s->last_fseq);
		s->last_fseq = q; /* one violation per fault, not a cascade */
		fsock[fi] = (uint8_t)s->slot;
	} else if ((head = fifo_head(&s->fifo)) == fi) {
		s->fifo.head++;
	} else if (fflags[fi] & F_SKIPPED) {
		fflags[fi] &= (uint8_t)~F_SKIPPED;
		violation(g, s, K_LATE, addr, head == NONE || head == PHANTOM ? POISON : frame_addr(s, head),
			  frame_addr(s, fi), "RX frame %u after FILL entries posted later than it", fi);
	} else {
		uint32_t d = fifo_find(&s->fifo, fi);

		violation(g, s, K_ORDER, addr, head == NONE || head == PHANTOM ? POISON : frame_addr(s, head),
			  frame_addr(s, fi), "RX frame %u, FILL order expects %d (%s)", fi,
			  head == NONE || head == PHANTOM ? -1 : (int)head,
			  d == NONE ? "not in the FIFO" : d <= RESYNC_MAX ? "resynchronised" : "far behind");
		if (d != NONE && d <= RESYNC_MAX)
			fifo_skip(g, &s->fifo, d);
		else if (d != NONE)
			fifo_remove(&s->fifo, fi);
	}
	fstate[fi] = S_RX;
	if (!off_ok)
		return fi; /* metadata and payload are not where we can trust them */
	if (fflags[fi] & F_DUPINJ)
		return RX_WITHHOLD; /* the kernel may be writing the second copy now */

	m = (uint32_t *)(frame_ptr(g, fi) + off - META_LEN);
	if (m[1] == XDP_META_MAGIC) {
		if (m[0] != len)
			violation(g, s, K_LENGTH, addr, m[0], len, "desc.len %u, XDP saw %u", len, m[0]);
	} else if (m[1] == APP_MAGIC) {
		violation(g, s, K_META, addr, XDP_META_MAGIC, m[1],
			  "frame %u still has the app stamp: the kernel did not write it", fi);
	} else {
		violation(g, s, K_META, addr, XDP_META_MAGIC, m[1], "no XDP metadata in front of the data");
	}
	m[0] = stamp_of(fi);
	m[1] = APP_MAGIC;
	fflags[fi] |= F_STAMPED;
	if (armed_for(g, K_META) && take_inject()) {
		m[1] ^= 0x01000000u; /* a stray write into a frame the app owns */
		g->armed = false;
	}
	check_payload(g, s, addr, frame_ptr(g, fi) + off, len);
	return fi;
}

/* ------------------------------------------------------------------ */
/* the worker                                                          */

static struct xsk *home_of(struct group *g, uint32_t fi)
{
	if (g->ns == 1)
		return g->s[0];
	return fi < g->s[1]->home_first ? g->s[0] : g->s[1];
}

static void set_len_bias(uint32_t v);

static uint32_t do_rx(struct group *g, struct xsk *s)
{
	struct xdp_desc *ring = s->rx.descs;
	uint32_t n = cons_avail(&s->rx, (uint32_t)opt.batch), k = 0, base = s->rx.local;

	if (n == 0)
		return 0;
	g->held += n;
	if (opt.checks) {
		int64_t extra = 0;

		if (armed_for(g, K_OVERHELD) && take_inject()) {
			extra = g->nframes; /* count frames as held twice */
			g->armed = false;
		}
		if (g->held + extra > (int64_t)g->nframes)
			violation(g, s, K_OVERHELD, 0, g->nframes, (uint64_t)(g->held + extra),
				  pooled() ? "the app holds %lld frames across the pool's sockets, the pool has %u"
					   : "the app holds %lld frames, the group has %u",
				  (long long)(g->held + extra), g->nframes);
		if (armed_for(g, K_OFFSET) && take_inject()) {
			/* as if the kernel had written a descriptor with a wrong offset */
			ring[base & s->rx.mask].addr += exp_off + 64 < opt.frame_size ? 64 : (uint64_t)-64;
			g->armed = false;
		}
	}
	if (opt.checks) {
		/* the kernel just wrote these frames from another CPU: fetch the
		 * metadata+headers line and the payload line of all of them at once */
		for (uint32_t i = 0; i < n; i++) {
			uint64_t a = ring[(base + i) & s->rx.mask].addr;

			if ((a >> fs_shift) < s->umem_frames) {
				uint8_t *p = s->umem + a - META_LEN;

				__builtin_prefetch(p, 1);
				__builtin_prefetch(p + 64, 0);
			}
		}
	}
	for (uint32_t i = 0; i < n; i++) {
		struct xdp_desc *d = &ring[(base + i) & s->rx.mask];
		int64_t fi;

		if (opt.checks) {
			fi = check_rx(g, s, d);
			if (fi < 0)
				continue;
		} else {
			fi = s->gbase + (uint32_t)(d->addr >> fs_shift);
		}
		g->out[k].fi = (uint32_t)fi;
		g->out[k].addr = d->addr;
		g->out[k].len = d->len;
		k++;
	}
	if (opt.checks)
		for (uint32_t i = 0; i < n; i++)
			ring[(base + i) & s->rx.mask].addr = POISON;
	cons_release(&s->rx, n);
	if (opt.checks && armed_for(g, K_POISON) && !opt.forward) {
		/* re-read the slot we just released, as a buggy consumer would */
		struct xdp_desc *d = &ring[(s->rx.local - 1) & s->rx.mask];

		if (d->addr == POISON && take_inject()) {
			check_rx(g, s, d);
			g->held++; /* check_rx() dropped a frame we never counted */
			g->armed = false;
		}
	}
	ADD(g->st.rx, n);
	s->rx_count += n;

	if (opt.forward) {
		post_tx(g, s->peer, g->out, k);
	} else {
		uint32_t *list = g->tmp[0];

		for (uint32_t i = 0; i < k; i++)
			list[i] = g->out[i].fi;
		post_fill(g, s->fq, list, k);
	}

	if (opt.inject >= 0 && RD(g->st.rx) >= g->next_inject) {
		g->next_inject += INJECT_EVERY;
		if (__atomic_load_n(&inject_left, __ATOMIC_RELAXED) > 0) {
			g->armed = true;
			if (opt.inject == K_LENGTH && take_inject()) {
				set_len_bias(3); /* the XDP program adds 1 to the next 3 lengths */
				g->armed = false;
			}
		}
	}
	return n;
}

/* Check one COMP entry.  Returns the global frame number to give back to
 * FILL, RX_DISCARD (not a frame to give back) or RX_WITHHOLD (keep it: the
 * injected second completion is still to come). */
static int64_t check_comp(struct group *g, struct xsk *s, uint64_t addr)
{
	uint32_t fi = s->gbase + (uint32_t)(addr >> fs_shift);

	if (addr == POISON) {
		violation(g, s, K_POISON, addr, 0, addr, "COMP slot still holds the poison: never written");
		g->held--;
		return RX_DISCARD;
	}
	if ((addr >> fs_shift) >= s->umem_frames || fi < g->first || fi >= g->first + g->nframes) {
		violation(g, s, K_STATE, addr, 0, addr, "completion of a frame never sent here");
		g->held--;
		return RX_DISCARD;
	}
	if (fstate[fi] != S_TX) {
		violation(g, s, fstate[fi] == S_COMP ? K_DUPLICATE : K_STATE, addr, S_TX, fstate[fi],
			  "%s->COMP (frame %u)", state_name[fstate[fi]], fi);
		g->held--;
		if (fstate[fi] == S_COMP && (fflags[fi] & F_TXDUPINJ)) {
			/* the injected second completion: now the frame goes back to FILL */
			fflags[fi] &= (uint8_t)~F_TXDUPINJ;
			return fi;
		}
		return RX_DISCARD;
	}
	fstate[fi] = S_COMP;
	if (fflags[fi] & F_TXDUPINJ)
		return RX_WITHHOLD;
	return fi;
}

static uint32_t do_comp(struct group *g, struct xsk *s)
{
	uint64_t *ring = s->comp.descs;
	uint32_t n = cons_avail(&s->comp, (uint32_t)opt.batch), nk[2] = { 0, 0 };

	if (n == 0)
		return 0;
	g->held += n;
	if (opt.checks && g->held > (int64_t)g->nframes)
		violation(g, s, K_OVERHELD, 0, g->nframes, (uint64_t)g->held,
			  "the app holds %lld frames, the group has %u", (long long)g->held, g->nframes);
	for (uint32_t i = 0; i < n; i++) {
		uint64_t addr = ring[(s->comp.local + i) & s->comp.mask];
		int64_t fi = opt.checks ? check_comp(g, s, addr) : s->gbase + (int64_t)(addr >> fs_shift);
		struct xsk *h;

		if (fi < 0)
			continue;
		h = home_of(g, (uint32_t)fi);
		g->tmp[h == g->s[0] ? 0 : 1][nk[h == g->s[0] ? 0 : 1]++] = (uint32_t)fi;
	}
	if (opt.checks)
		for (uint32_t i = 0; i < n; i++)
			ring[(s->comp.local + i) & s->comp.mask] = POISON;
	cons_release(&s->comp, n);
	if (opt.checks && armed_for(g, K_POISON)) {
		/* re-read the COMP slot just released, as a buggy consumer would */
		uint64_t addr = ring[(s->comp.local - 1) & s->comp.mask];

		if (addr == POISON && take_inject()) {
			g->held++; /* check_comp() drops a frame we never counted */
			(void)check_comp(g, s, addr);
			g->armed = false;
		}
	}
	ADD(g->st.comp, n);
	for (int j = 0; j < g->ns; j++)
		if (nk[j])
			post_fill(g, g->s[j], g->tmp[j], nk[j]);
	return n;
}

static bool kick_tx(struct group *g, struct xsk *s)
{
	if (s->tx.local == __atomic_load_n(s->tx.cons, __ATOMIC_ACQUIRE))
		return false;
	if (sendto(s->fd, NULL, 0, MSG_DONTWAIT, NULL, 0) < 0 && errno != EAGAIN && errno != EBUSY &&
	    errno != ENOBUFS && errno != ENOMEM && errno != EINTR) {
		fprintf(stderr, "xskcheck: TX kick on %s q%u: %s\n", s->dev, s->queue, strerror(errno));
		if (errno == ENETDOWN || errno == ENXIO) {
			stop_reason = "error";
			fatal_flag = 1;
			stop_flag = 1;
		}
	}
	INC(g->st.kicks);
	return true;
}

static void *worker(void *arg)
{
	struct group *g = arg;
	struct pollfd pfd[MAX_SPQ];
	int idle = 0;

	if (g->cpu >= 0) {
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(g->cpu, &set);
		if (pthread_setaffinity_np(pthread_self(), sizeof(set), &set))
			fprintf(stderr, "xskcheck: cannot pin group %d to cpu %d\n", g->id, g->cpu);
	}
	for (int j = 0; j < g->ns; j++) {
		pfd[j].fd = g->s[j]->fd;
		pfd[j].events = POLLIN;
	}
	while (!stop_flag) {
		uint32_t work = 0;
		bool tx_busy = false;

		for (int j = 0; j < g->ns; j++) {
			struct xsk *s = g->s[j];

			if (s->npend)
				post_fill(g, s, NULL, 0);
			work += do_rx(g, s);
		}
		if (opt.forward) {
			for (int j = 0; j < g->ns; j++) {
				work += do_comp(g, g->s[j]);
				tx_busy |= kick_tx(g, g->s[j]);
			}
		}
		if (work) {
			idle = 0;
			continue;
		}
		if (opt.busy_poll_us) {
			/* drive the device's NAPI from here (preferred busy polling) */
			for (int j = 0; j < g->ns; j++)
				recvfrom(g->s[j]->fd, NULL, 0, MSG_DONTWAIT, NULL, NULL);
			continue;
		}
		idle++;
		if (tx_busy) { /* completions come without a wakeup */
			__builtin_ia32_pause();
			if (idle > 64)
				sched_yield();
			continue;
		}
		if (idle <= opt.spin) {
			__builtin_ia32_pause();
			continue;
		}
		if (opt.idle_us && idle <= opt.spin + IDLE_SLEEPS) {
			/* Sleeping lets a batch build up; poll() would be woken by
			 * every packet, which costs both CPUs more than the checks. */
			struct timespec ts = { 0, opt.idle_us * 1000L };

			nanosleep(&ts, NULL);
		} else {
			poll(pfd, (nfds_t)g->ns, 50); /* no traffic for a while */
		}
	}
	return NULL;
}

/* ------------------------------------------------------------------ */
/* BPF: maps, the program, attaching it                                */

/* the instruction macros and sys_bpf(): bpfasm.h, shared with xskamp */

static int map_create(enum bpf_map_type type, uint32_t max_entries, const char *name)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_type = type;
	a.key_size = 4;
	a.value_size = 4;
	a.max_entries = max_entries;
	snprintf(a.map_name, sizeof(a.map_name), "%s", name);
	return sys_bpf(BPF_MAP_CREATE, &a);
}

static int map_update(int fd, uint32_t key, uint32_t value)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)fd;
	a.key = (uint64_t)(uintptr_t)&key;
	a.value = (uint64_t)(uintptr_t)&value;
	a.flags = BPF_ANY;
	return sys_bpf(BPF_MAP_UPDATE_ELEM, &a);
}

static uint32_t fake_len_bias; /* --selfbench: the fake kernel's length fault budget */
static uint64_t fake_unwritten; /* --selfbench-unwritten N: the fake kernel publishes its Nth RX slot
				 * without writing it, as the veth NAPI race does (0: never) */

static void set_len_bias(uint32_t v)
{
	if (opt.selfbench) {
		fake_len_bias = v;
		return;
	}
	/* a budget: the XDP program counts it down itself */
	if (map_update(ctl_fd, 0, v))
		fprintf(stderr, "xskcheck: cannot set the length bias: %s\n", strerror(errno));
}

/* The XDP program:
 *   bias = ctl[0] ? (ctl[0]--, 1) : 0        (length fault injection budget)
 *   if (bpf_xdp_adjust_meta(ctx, -8) == 0 && data_meta + 8 <= data)
 *       meta = { data_end - data + bias, XDP_META_MAGIC }
 *   return bpf_redirect_map(&xskmap, ctx->rx_queue_index, XDP_PASS)
 * With --sockets-per-queue K > 1 the key is rx_queue_index * K + pick, pick =
 * bpf_get_smp_processor_id() % K (so two CPUs feed two sockets of one pool at
 * once), or with --pick rr a counter in ctl[1] % K.
 */
static int load_prog(int xskmap, int ctl)
{
	struct bpf_insn head[] = {
		BPF_MOV64_REG(BPF_REG_6, BPF_REG_1),
		/* r7 = bias */
		BPF_MOV64_IMM(BPF_REG_7, 0),
		BPF_ST_MEM(BPF_W, BPF_REG_10, -4, 0),
		BPF_MOV64_REG(BPF_REG_2, BPF_REG_10),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_2, -4),
		BPF_LD_MAP_FD(BPF_REG_1, ctl),
		BPF_CALL_FN(BPF_FUNC_map_lookup_elem),
		BPF_JMP_IMM(BPF_JEQ, BPF_REG_0, 0, 5),
		BPF_LDX_MEM(BPF_W, BPF_REG_8, BPF_REG_0, 0),
		BPF_JMP_IMM(BPF_JEQ, BPF_REG_8, 0, 3),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_8, -1),
		BPF_STX_MEM(BPF_W, BPF_REG_0, BPF_REG_8, 0),
		BPF_MOV64_IMM(BPF_REG_7, 1),
		/* metadata */
		BPF_MOV64_REG(BPF_REG_1, BPF_REG_6),
		BPF_MOV64_IMM(BPF_REG_2, -META_LEN),
		BPF_CALL_FN(BPF_FUNC_xdp_adjust_meta),
		BPF_JMP_IMM(BPF_JNE, BPF_REG_0, 0, 10),
		BPF_LDX_MEM(BPF_W, BPF_REG_2, BPF_REG_6, offsetof(struct xdp_md, data)),
		BPF_LDX_MEM(BPF_W, BPF_REG_3, BPF_REG_6, offsetof(struct xdp_md, data_meta)),
		BPF_LDX_MEM(BPF_W, BPF_REG_4, BPF_REG_6, offsetof(struct xdp_md, data_end)),
		BPF_MOV64_REG(BPF_REG_5, BPF_REG_3),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_5, META_LEN),
		BPF_JMP_REG(BPF_JGT, BPF_REG_5, BPF_REG_2, 4),
		BPF_ALU64_REG(BPF_SUB, BPF_REG_4, BPF_REG_2), /* pkt_end - pkt: needs CAP_PERFMON */
		BPF_ALU64_REG(BPF_ADD, BPF_REG_4, BPF_REG_7),
		BPF_STX_MEM(BPF_W, BPF_REG_3, BPF_REG_4, 0),
		BPF_ST_MEM(BPF_W, BPF_REG_3, 4, (int32_t)XDP_META_MAGIC),
	};
	struct bpf_insn one[] = { /* key = rx_queue_index */
		BPF_LDX_MEM(BPF_W, BPF_REG_8, BPF_REG_6, offsetof(struct xdp_md, rx_queue_index)),
	};
	struct bpf_insn by_cpu[] = { /* key = rx_queue_index * K + cpu % K */
		BPF_LDX_MEM(BPF_W, BPF_REG_8, BPF_REG_6, offsetof(struct xdp_md, rx_queue_index)),
		BPF_ALU64_IMM(BPF_MUL, BPF_REG_8, opt.spq),
		BPF_CALL_FN(BPF_FUNC_get_smp_processor_id),
		BPF_ALU64_IMM(BPF_MOD, BPF_REG_0, opt.spq),
		BPF_ALU64_REG(BPF_ADD, BPF_REG_8, BPF_REG_0),
	};
	struct bpf_insn by_rr[] = { /* key = rx_queue_index * K + ctl[1]++ % K */
		BPF_LDX_MEM(BPF_W, BPF_REG_8, BPF_REG_6, offsetof(struct xdp_md, rx_queue_index)),
		BPF_ALU64_IMM(BPF_MUL, BPF_REG_8, opt.spq),
		BPF_ST_MEM(BPF_W, BPF_REG_10, -8, 1),
		BPF_MOV64_REG(BPF_REG_2, BPF_REG_10),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_2, -8),
		BPF_LD_MAP_FD(BPF_REG_1, ctl),
		BPF_CALL_FN(BPF_FUNC_map_lookup_elem),
		BPF_MOV64_IMM(BPF_REG_9, 0),
		BPF_JMP_IMM(BPF_JEQ, BPF_REG_0, 0, 4),
		BPF_LDX_MEM(BPF_W, BPF_REG_9, BPF_REG_0, 0),
		BPF_MOV64_REG(BPF_REG_1, BPF_REG_9),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_1, 1), /* unlocked: a lost count only skews the pick */
		BPF_STX_MEM(BPF_W, BPF_REG_0, BPF_REG_1, 0),
		BPF_ALU64_IMM(BPF_MOD, BPF_REG_9, opt.spq),
		BPF_ALU64_REG(BPF_ADD, BPF_REG_8, BPF_REG_9),
	};
	struct bpf_insn tail[] = {
		BPF_LD_MAP_FD(BPF_REG_1, xskmap),
		BPF_MOV64_REG(BPF_REG_2, BPF_REG_8),
		BPF_MOV64_IMM(BPF_REG_3, XDP_PASS),
		BPF_CALL_FN(BPF_FUNC_redirect_map),
		BPF_EXIT_INSN(),
	};
	struct bpf_insn insns[sizeof(head) / sizeof(head[0]) + sizeof(by_rr) / sizeof(by_rr[0]) +
			      sizeof(tail) / sizeof(tail[0])];
	const struct bpf_insn *pick = opt.spq == 1 ? one : opt.pick_rr ? by_rr : by_cpu;
	size_t npick = opt.spq == 1 ? sizeof(one) : opt.pick_rr ? sizeof(by_rr) : sizeof(by_cpu);
	size_t n = 0;
	static char log[65536];
	union bpf_attr a;
	int fd;

	memcpy(insns, head, sizeof(head));
	n += sizeof(head) / sizeof(head[0]);
	memcpy(insns + n, pick, npick);
	n += npick / sizeof(insns[0]);
	memcpy(insns + n, tail, sizeof(tail));
	n += sizeof(tail) / sizeof(tail[0]);

	memset(&a, 0, sizeof(a));
	a.prog_type = BPF_PROG_TYPE_XDP;
	a.insns = (uint64_t)(uintptr_t)insns;
	a.insn_cnt = (uint32_t)n;
	a.license = (uint64_t)(uintptr_t) "GPL";
	snprintf(a.prog_name, sizeof(a.prog_name), "xskcheck");
	fd = sys_bpf(BPF_PROG_LOAD, &a);
	if (fd >= 0 || errno == EPERM)
		return fd;
	a.log_buf = (uint64_t)(uintptr_t)log;
	a.log_size = sizeof(log);
	a.log_level = 1;
	fd = sys_bpf(BPF_PROG_LOAD, &a);
	if (fd < 0)
		fprintf(stderr, "xskcheck: verifier log:\n%s\n", log);
	return fd;
}

/* Attach (prog >= 0) or detach (prog = -1) an XDP program via rtnetlink. */
static int xdp_set(int ifidx, int prog, uint32_t flags, char *err, size_t errlen)
{
	struct {
		struct nlmsghdr nh;
		struct ifinfomsg ifi;
		char attrs[64];
	} req;
	char buf[4096];
	struct nlattr *nest, *na;
	int sock, one = 1, rc = -EIO;
	ssize_t r;

	if (err && errlen)
		err[0] = 0;
	sock = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	if (sock < 0)
		return -errno;
	setsockopt(sock, SOL_NETLINK, NETLINK_EXT_ACK, &one, sizeof(one));
	setsockopt(sock, SOL_NETLINK, NETLINK_CAP_ACK, &one, sizeof(one));
	memset(&req, 0, sizeof(req));
	req.nh.nlmsg_len = NLMSG_LENGTH(sizeof(struct ifinfomsg));
	req.nh.nlmsg_type = RTM_SETLINK;
	req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK;
	req.nh.nlmsg_seq = 1;
	req.ifi.ifi_family = AF_UNSPEC;
	req.ifi.ifi_index = ifidx;
	nest = (struct nlattr *)((char *)&req + NLMSG_ALIGN(req.nh.nlmsg_len));
	nest->nla_type = NLA_F_NESTED | IFLA_XDP;
	nest->nla_len = NLA_HDRLEN;
	na = (struct nlattr *)((char *)nest + nest->nla_len);
	na->nla_type = IFLA_XDP_FD;
	na->nla_len = NLA_HDRLEN + 4;
	memcpy((char *)na + NLA_HDRLEN, &prog, 4);
	nest->nla_len += NLA_ALIGN(na->nla_len);
	na = (struct nlattr *)((char *)nest + nest->nla_len);
	na->nla_type = IFLA_XDP_FLAGS;
	na->nla_len = NLA_HDRLEN + 4;
	memcpy((char *)na + NLA_HDRLEN, &flags, 4);
	nest->nla_len += NLA_ALIGN(na->nla_len);
	req.nh.nlmsg_len = NLMSG_ALIGN(req.nh.nlmsg_len) + nest->nla_len;

	if (send(sock, &req, req.nh.nlmsg_len, 0) < 0) {
		rc = -errno;
		goto out;
	}
	r = recv(sock, buf, sizeof(buf), 0);
	if (r < 0) {
		rc = -errno;
		goto out;
	}
	for (struct nlmsghdr *nh = (struct nlmsghdr *)buf; NLMSG_OK(nh, (size_t)r); nh = NLMSG_NEXT(nh, r)) {
		struct nlmsgerr *e;

		if (nh->nlmsg_type != NLMSG_ERROR)
			continue;
		e = NLMSG_DATA(nh);
		rc = e->error;
		if (rc && err && (nh->nlmsg_flags & NLM_F_ACK_TLVS)) {
			size_t off = NLMSG_HDRLEN + sizeof(*e); /* capped: no original payload */
			struct nlattr *a = (struct nlattr *)((char *)nh + off);
			size_t left = nh->nlmsg_len > off ? nh->nlmsg_len - off : 0;

			while (left >= NLA_HDRLEN && a->nla_len >= NLA_HDRLEN && a->nla_len <= left) {
				if ((a->nla_type & NLA_TYPE_MASK) == NLMSGERR_ATTR_MSG)
					snprintf(err, errlen, "%.*s", (int)(a->nla_len - NLA_HDRLEN),
						 (char *)a + NLA_HDRLEN);
				left -= (size_t)NLA_ALIGN(a->nla_len) < left ? (size_t)NLA_ALIGN(a->nla_len) : left;
				a = (struct nlattr *)((char *)a + NLA_ALIGN(a->nla_len));
			}
		}
		break;
	}
out:
	close(sock);
	return rc;
}

static uint32_t xdp_mode_flag(void)
{
	return opt.native ? XDP_FLAGS_DRV_MODE : XDP_FLAGS_SKB_MODE;
}

static void detach_all(void)
{
	for (int d = 0; d < 2; d++) {
		if (attached[d]) {
			xdp_set(ifindex[d], -1, xdp_mode_flag(), NULL, 0);
			attached[d] = false;
		}
	}
}

/* ------------------------------------------------------------------ */
/* sockets                                                             */

/* Every RX and COMP slot starts as the poison, as a consumed one ends.  A slot the
 * kernel publishes before writing it then reads as the poison on the ring's first
 * pass too, not as zeros: addr 0 is frame 0, a real frame, and taking it would put
 * frame 0 in circulation twice and turn one fault into a cascade that never ends
 * (the veth race did that: one onset, then thousands of echoes for 30 s).  Before
 * bind(): no traffic yet, every slot is the kernel's to write. */
static void poison_rings(struct xsk *s)
{
	if (!opt.checks)
		return;
	for (uint32_t i = 0; i < s->rx.size; i++)
		((struct xdp_desc *)s->rx.descs)[i].addr = POISON;
	if (s->fq == s && s->comp.map)
		for (uint32_t i = 0; i < s->comp.size; i++)
			((uint64_t *)s->comp.descs)[i] = POISON;
}

static int map_ring(int fd, struct ring *r, uint32_t size, const struct xdp_ring_offset *o, off_t pgoff,
		    size_t desc)
{
	r->maplen = o->desc + size * desc;
	r->map = mmap(NULL, r->maplen, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_POPULATE, fd, pgoff);
	if (r->map == MAP_FAILED) {
		r->map = NULL;
		return -1;
	}
	r->prod = (uint32_t *)((char *)r->map + o->producer);
	r->cons = (uint32_t *)((char *)r->map + o->consumer);
	r->flags = (uint32_t *)((char *)r->map + o->flags);
	r->descs = (char *)r->map + o->desc;
	r->size = size;
	r->mask = size - 1;
	r->local = r->cached = 0;
	return 0;
}

static void fail_errno(const char *what, struct xsk *s)
{
	int e = errno;

	fprintf(stderr, "xskcheck: %s on %s queue %u: %s\n", what, s->dev, s->queue, strerror(e));
	if (e == EPERM || e == EACCES) {
		fprintf(stderr, "xskcheck: needs root (CAP_NET_ADMIN, CAP_NET_RAW, CAP_BPF)\n");
		exit(2);
	}
}

static int setup_socket(struct xsk *s, struct xsk *umem_owner)
{
	struct xdp_mmap_offsets off;
	struct sockaddr_xdp sxdp;
	socklen_t optlen = sizeof(off);
	uint32_t ring = opt.ring;
	uint64_t deadline;

	s->fd = socket(AF_XDP, SOCK_RAW | SOCK_CLOEXEC, 0);
	if (s->fd < 0) {
		if (errno == EAFNOSUPPORT) {
			fprintf(stderr, "xskcheck: kernel has no XDP sockets (CONFIG_XDP_SOCKETS=y is missing)\n");
			exit(2);
		}
		fail_errno("socket(AF_XDP)", s);
		return -1;
	}
	if (s->owns_umem) {
		struct xdp_umem_reg mr = {
			.addr = (uint64_t)(uintptr_t)s->umem,
			.len = s->umem_frames * opt.frame_size,
			.chunk_size = opt.frame_size,
			.headroom = opt.headroom,
		};

		if (setsockopt(s->fd, SOL_XDP, XDP_UMEM_REG, &mr, sizeof(mr))) {
			fail_errno("XDP_UMEM_REG", s);
			return -1;
		}
	}
	/* a socket joining another's pool (same device and queue) must not have
	 * FILL/COMP rings of its own: bind() refuses them (EINVAL) */
	if ((s->fq == s && (setsockopt(s->fd, SOL_XDP, XDP_UMEM_FILL_RING, &ring, sizeof(ring)) ||
			    setsockopt(s->fd, SOL_XDP, XDP_UMEM_COMPLETION_RING, &ring, sizeof(ring)))) ||
	    setsockopt(s->fd, SOL_XDP, XDP_RX_RING, &ring, sizeof(ring)) ||
	    (opt.forward && setsockopt(s->fd, SOL_XDP, XDP_TX_RING, &ring, sizeof(ring)))) {
		fail_errno("setting ring sizes", s);
		return -1;
	}
	if (getsockopt(s->fd, SOL_XDP, XDP_MMAP_OFFSETS, &off, &optlen)) {
		fail_errno("XDP_MMAP_OFFSETS", s);
		return -1;
	}
	if ((s->fq == s && (map_ring(s->fd, &s->fill, ring, &off.fr, XDP_UMEM_PGOFF_FILL_RING, 8) ||
			    map_ring(s->fd, &s->comp, ring, &off.cr, XDP_UMEM_PGOFF_COMPLETION_RING, 8))) ||
	    map_ring(s->fd, &s->rx, ring, &off.rx, XDP_PGOFF_RX_RING, sizeof(struct xdp_desc)) ||
	    (opt.forward && map_ring(s->fd, &s->tx, ring, &off.tx, XDP_PGOFF_TX_RING, sizeof(struct xdp_desc)))) {
		fail_errno("mmap of a ring", s);
		return -1;
	}
	poison_rings(s);
	memset(&sxdp, 0, sizeof(sxdp));
	sxdp.sxdp_family = AF_XDP;
	sxdp.sxdp_ifindex = (uint32_t)s->ifindex;
	sxdp.sxdp_queue_id = s->queue;
	if (umem_owner && umem_owner != s) {
		/* XDP_SHARED_UMEM takes no other flags: copy mode comes from the owner */
		sxdp.sxdp_flags = XDP_SHARED_UMEM;
		sxdp.sxdp_shared_umem_fd = (uint32_t)umem_owner->fd;
	} else {
		sxdp.sxdp_flags = XDP_COPY;
	}
	if (opt.busy_poll_us) {
		int one = 1, budget = opt.batch;

		if (setsockopt(s->fd, SOL_SOCKET, SO_PREFER_BUSY_POLL, &one, sizeof(one)) ||
		    setsockopt(s->fd, SOL_SOCKET, SO_BUSY_POLL, &opt.busy_poll_us, sizeof(int)) ||
		    setsockopt(s->fd, SOL_SOCKET, SO_BUSY_POLL_BUDGET, &budget, sizeof(budget)))
			fprintf(stderr, "xskcheck: busy polling on %s q%u: %s (continuing without)\n", s->dev,
				s->queue, strerror(errno));
	}
	/* The previous socket's pool on this queue is freed late: EBUSY for a while. */
	deadline = now_ns() + 2500000000ull;
	while (bind(s->fd, (struct sockaddr *)&sxdp, sizeof(sxdp))) {
		if (errno == EBUSY && now_ns() < deadline && !stop_flag) {
			usleep(20000);
			continue;
		}
		if (errno == EINVAL)
			fprintf(stderr, "xskcheck: bind: does %s have %d rx and tx queues?\n", s->dev, opt.queues);
		fail_errno("bind", s);
		return -1;
	}
	return 0;
}

static void close_all(void)
{
	detach_all();
	for (int i = 0; i < nsocks; i++) {
		struct xsk *s = &socks[i];
		struct ring *rs[] = { &s->rx, &s->tx, &s->fill, &s->comp };

		for (int j = 0; j < 4; j++)
			if (rs[j]->map)
				munmap(rs[j]->map, rs[j]->maplen);
		if (s->fd > 0)
			close(s->fd);
		if (!opt.shared_umem && s->owns_umem && s->umem)
			munmap(s->umem, s->umem_maplen);
	}
	nsocks = 0;
	if (shared_map) {
		munmap(shared_map, shared_maplen);
		shared_map = NULL;
	}
}

static void bail(int code)
{
	close_all();
	exit(code);
}

/* ------------------------------------------------------------------ */
/* stats                                                               */

static void print_stats(const char *type)
{
	char line[2048];
	struct stats sum = { 0 };
	uint64_t xs[6] = { 0 };
	int n;

	for (int i = 0; i < ngroups; i++) {
		struct stats *st = &groups[i].st;

		sum.rx += RD(st->rx);
		sum.tx += RD(st->tx);
		sum.fill += RD(st->fill);
		sum.comp += RD(st->comp);
		sum.foreign += RD(st->foreign);
		sum.ours += RD(st->ours);
		sum.viol += RD(st->viol);
		sum.kicks += RD(st->kicks);
		sum.onsets += RD(st->onsets);
		sum.skipped += RD(st->skipped);
		for (int k = 0; k < NKINDS; k++) {
			sum.kinds[k] += RD(st->kinds[k]);
			sum.onset_kinds[k] += RD(st->onset_kinds[k]);
		}
	}
	for (int i = 0; i < nsocks; i++) {
		struct xdp_statistics x;
		socklen_t len = sizeof(x);

		memset(&x, 0, sizeof(x));
		if (socks[i].fd > 0 && getsockopt(socks[i].fd, SOL_XDP, XDP_STATISTICS, &x, &len) == 0) {
			xs[0] += x.rx_dropped;
			xs[1] += x.rx_invalid_descs;
			xs[2] += x.tx_invalid_descs;
			xs[3] += x.rx_ring_full;
			xs[4] += x.rx_fill_ring_empty_descs;
			xs[5] += x.tx_ring_empty_descs;
		}
	}
	n = snprintf(line, sizeof(line),
		     "{\"type\":\"%s\",\"t\":%.3f,\"rx\":%llu,\"tx\":%llu,\"fill\":%llu,\"comp\":%llu,"
		     "\"foreign\":%llu,\"ours\":%llu,\"violations\":%llu,\"by_kind\":{",
		     type, tnow(), (unsigned long long)sum.rx, (unsigned long long)sum.tx,
		     (unsigned long long)sum.fill, (unsigned long long)sum.comp, (unsigned long long)sum.foreign,
		     (unsigned long long)sum.ours, (unsigned long long)sum.viol);
	for (int k = 0; k < NKINDS; k++)
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%s\"%s\":%llu", k ? "," : "", kind_name[k],
			      (unsigned long long)sum.kinds[k]);
	n += snprintf(line + n, sizeof(line) - (size_t)n, "},\"onsets\":%llu,\"skipped\":%llu,\"onsets_by_kind\":{",
		      (unsigned long long)sum.onsets, (unsigned long long)sum.skipped);
	for (int k = 0; k < NKINDS; k++)
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%s\"%s\":%llu", k ? "," : "", kind_name[k],
			      (unsigned long long)sum.onset_kinds[k]);
	n += snprintf(line + n, sizeof(line) - (size_t)n,
		      "},\"rx_dropped\":%llu,\"rx_invalid\":%llu,\"tx_invalid\":%llu,\"rx_ring_full\":%llu,"
		      "\"fill_empty\":%llu,\"tx_ring_empty\":%llu,\"kicks\":%llu,\"socket_rx\":[",
		      (unsigned long long)xs[0], (unsigned long long)xs[1], (unsigned long long)xs[2],
		      (unsigned long long)xs[3], (unsigned long long)xs[4], (unsigned long long)xs[5],
		      (unsigned long long)sum.kicks);
	for (int i = 0; i < nsocks; i++)
		n += snprintf(line + n, sizeof(line) - (size_t)n, "%s%llu", i ? "," : "",
			      (unsigned long long)RD(socks[i].rx_count));
	n += snprintf(line + n, sizeof(line) - (size_t)n, "]");
	{
		/* the checker's own CPU time: its cost per packet, whatever the load */
		struct rusage ru;

		getrusage(RUSAGE_SELF, &ru);
		n += snprintf(line + n, sizeof(line) - (size_t)n, ",\"cpu_user\":%.3f,\"cpu_sys\":%.3f",
			      (double)ru.ru_utime.tv_sec + (double)ru.ru_utime.tv_usec / 1e6,
			      (double)ru.ru_stime.tv_sec + (double)ru.ru_stime.tv_usec / 1e6);
	}
	if (!strcmp(type, "done"))
		n += snprintf(line + n, sizeof(line) - (size_t)n, ",\"reason\":\"%s\",\"printed\":%llu", stop_reason,
			      (unsigned long long)(printed < PRINT_CAP ? printed : PRINT_CAP));
	snprintf(line + n, sizeof(line) - (size_t)n, "}\n");
	emit(line);
}

/* ------------------------------------------------------------------ */
/* arguments                                                           */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: xskcheck --dev IF [--peer-dev IF2] --mode rxdrop|forward --xdp native|generic\n"
		"                [--queues N] [--frame-size 2048|4096] [--headroom H] [--frames F]\n"
		"                [--shared-umem] [--ring R] [--batch 64] [--duration SEC] [--stats-ms 500]\n"
		"                [--checks all|none] [--inject KIND] [--stop-on-first] [--trace-marker]\n"
		"                [--cpus LIST] [--seed N] [--idle-us 50 (0: block in poll)] [--spin 0]\n"
		"                [--busy-poll] [--busy-poll-usec 20] [--sockets-per-queue K] [--pick cpu|rr]\n"
		"       xskcheck --selfbench N [--selfbench-size 64] [--checks all|none] [--inject KIND] [--frames F]\n"
		"                [--selfbench-unwritten K]\n"
		"                (no kernel: time the checks against a correct in-memory one; K: its Kth RX\n"
		"                slot is published unwritten, the veth NAPI race's fault)\n"
		"inject kinds: order poison duplicate offset over-held meta length state sequence checksum late\n"
		"--sockets-per-queue K: K rxdrop sockets bound to each queue with XDP_SHARED_UMEM, one pool and\n"
		"                one FILL ring per queue; the XDP program picks the socket by CPU (or --pick rr)\n");
}

static void die_usage(const char *fmt, const char *arg)
{
	fprintf(stderr, "xskcheck: ");
	fprintf(stderr, fmt, arg);
	fputc('\n', stderr);
	usage(stderr);
	exit(2);
}

static long parse_long(const char *s, const char *name, long lo, long hi)
{
	return parse_long_opt("xskcheck", s, name, lo, hi);
}

static void parse_args(int argc, char **argv)
{
	static const struct option lo[] = {
		{ "dev", required_argument, 0, 'd' },	     { "peer-dev", required_argument, 0, 'p' },
		{ "mode", required_argument, 0, 'm' },	     { "xdp", required_argument, 0, 'x' },
		{ "queues", required_argument, 0, 'q' },     { "frame-size", required_argument, 0, 'F' },
		{ "headroom", required_argument, 0, 'H' },   { "frames", required_argument, 0, 'f' },
		{ "shared-umem", no_argument, 0, 'u' },	     { "ring", required_argument, 0, 'r' },
		{ "batch", required_argument, 0, 'b' },	     { "duration", required_argument, 0, 't' },
		{ "stats-ms", required_argument, 0, 'T' },   { "checks", required_argument, 0, 'c' },
		{ "inject", required_argument, 0, 'i' },     { "stop-on-first", no_argument, 0, '1' },
		{ "trace-marker", no_argument, 0, 'M' },     { "cpus", required_argument, 0, 'C' },
		{ "seed", required_argument, 0, 'S' },	     { "spin", required_argument, 0, 's' },
		{ "selfbench", required_argument, 0, 'X' }, { "selfbench-size", required_argument, 0, 'Z' }, { "selfbench-unwritten", required_argument, 0, 'W' }, { "idle-us", required_argument, 0, 'I' },   { "busy-poll", no_argument, 0, 'B' },	     { "busy-poll-usec", required_argument, 0, 'U' },
		{ "sockets-per-queue", required_argument, 0, 'K' }, { "pick", required_argument, 0, 'P' },
		{ "help", no_argument, 0, 'h' },	     { 0, 0, 0, 0 },
	};
	bool have_mode = false, have_xdp = false;
	char *end;
	int c;

	while ((c = getopt_long(argc, argv, "", lo, NULL)) != -1) {
		switch (c) {
		case 'd': opt.dev = optarg; break;
		case 'p': opt.peer_dev = optarg; break;
		case 'm':
			if (!strcmp(optarg, "rxdrop"))
				opt.forward = false;
			else if (!strcmp(optarg, "forward"))
				opt.forward = true;
			else
				die_usage("--mode must be rxdrop or forward, got '%s'", optarg);
			have_mode = true;
			break;
		case 'x':
			if (!strcmp(optarg, "native"))
				opt.native = true;
			else if (!strcmp(optarg, "generic"))
				opt.native = false;
			else
				die_usage("--xdp must be native or generic, got '%s'", optarg);
			have_xdp = true;
			break;
		case 'q': opt.queues = (int)parse_long(optarg, "queues", 1, MAX_QUEUES); break;
		case 'F':
			opt.frame_size = (uint32_t)parse_long(optarg, "frame-size", 2048, 4096);
			if (opt.frame_size != 2048 && opt.frame_size != 4096)
				die_usage("--frame-size must be 2048 or 4096, got '%s'", optarg);
			break;
		case 'H': opt.headroom = (uint32_t)parse_long(optarg, "headroom", 0, 4096); break;
		case 'f': opt.frames = (uint32_t)parse_long(optarg, "frames", 1, 1 << 20); break;
		case 'u': opt.shared_umem = true; break;
		case 'r':
			opt.ring = (uint32_t)parse_long(optarg, "ring", 1, 1 << 20);
			if (opt.ring & (opt.ring - 1))
				die_usage("--ring must be a power of two, got '%s'", optarg);
			break;
		case 'b': opt.batch = (int)parse_long(optarg, "batch", 1, MAX_BATCH); break;
		case 't':
			errno = 0;
			opt.duration = strtod(optarg, &end);
			if (errno || *end || end == optarg || opt.duration < 0)
				die_usage("--duration must be a number of seconds >= 0, got '%s'", optarg);
			break;
		case 'T': opt.stats_ms = (int)parse_long(optarg, "stats-ms", 10, 3600000); break;
		case 'c':
			if (!strcmp(optarg, "all"))
				opt.checks = true;
			else if (!strcmp(optarg, "none"))
				opt.checks = false;
			else
				die_usage("--checks must be all or none, got '%s'", optarg);
			break;
		case 'i':
			opt.inject = -1;
			for (int k = 0; k < NKINDS; k++)
				if (!strcmp(optarg, kind_name[k]))
					opt.inject = k;
			if (opt.inject < 0)
				die_usage("unknown --inject kind '%s'", optarg);
			break;
		case '1': opt.stop_on_first = true; break;
		case 'M': opt.trace_marker = true; break;
		case 'C':
			opt.ncpus = parse_cpu_list(optarg, opt.cpus, 256);
			if (opt.ncpus <= 0)
				die_usage("bad --cpus list '%s'", optarg);
			break;
		case 'S': opt.seed = (uint64_t)parse_long(optarg, "seed", 0, 0x7fffffffffffffffL); break;
		case 's': opt.spin = (int)parse_long(optarg, "spin", 0, 1 << 30); break;
		case 'X': opt.selfbench = (uint64_t)parse_long(optarg, "selfbench", 1, 1L << 40); break;
		case 'W': fake_unwritten = (uint64_t)parse_long(optarg, "selfbench-unwritten", 1, 1L << 40); break;
		case 'Z': opt.selfbench_size = (uint32_t)parse_long(optarg, "selfbench-size", 64, 1514); break;
		case 'I': opt.idle_us = (int)parse_long(optarg, "idle-us", 0, 100000); break;
		case 'B':
			if (!opt.busy_poll_us)
				opt.busy_poll_us = 20;
			break;
		case 'U': opt.busy_poll_us = (int)parse_long(optarg, "busy-poll-usec", 1, 1000000); break;
		case 'K': opt.spq = (int)parse_long(optarg, "sockets-per-queue", 1, MAX_SPQ); break;
		case 'P':
			if (!strcmp(optarg, "cpu"))
				opt.pick_rr = false;
			else if (!strcmp(optarg, "rr"))
				opt.pick_rr = true;
			else
				die_usage("--pick must be cpu or rr, got '%s'", optarg);
			break;
		case 'h': usage(stdout); exit(0);
		default: usage(stderr); exit(2);
		}
	}
	if (optind < argc)
		die_usage("unexpected argument '%s'", argv[optind]);
	if (opt.selfbench) {
		if (!opt.dev)
			opt.dev = "selfbench";
		have_mode = have_xdp = true;
		if (opt.forward || opt.queues != 1)
			die_usage("--selfbench checks one rxdrop socket%s", "");
	}
	if (!opt.dev || !have_mode || !have_xdp)
		die_usage("--dev, --mode and --xdp are required%s", "");
	if (opt.forward && !opt.peer_dev)
		die_usage("--mode forward needs --peer-dev%s", "");
	if (!opt.forward && opt.peer_dev)
		die_usage("--peer-dev only makes sense with --mode forward%s", "");
	if (opt.forward && !opt.shared_umem) {
		/* frames move between the two devices' sockets: one UMEM */
		opt.shared_umem = true;
	}
	if (opt.headroom >= opt.frame_size - XDP_HEADROOM)
		die_usage("--headroom must be below frame-size - 256%s", "");
	if (!opt.checks && opt.inject >= 0)
		die_usage("--inject needs --checks all%s", "");
	if (opt.spq > 1 && opt.forward)
		die_usage("--sockets-per-queue > 1 is for --mode rxdrop (forward pairs one socket per device)%s", "");
	if (opt.spq > 1 && opt.selfbench)
		die_usage("--selfbench checks one socket%s", "");
	if (opt.spq > 1 && opt.inject == K_LATE)
		die_usage("--inject late needs one socket per queue: with several there is no FILL FIFO to "
			  "pass entries over%s", "");
	if (opt.queues * opt.spq > MAX_SOCKS)
		die_usage("--queues x --sockets-per-queue must be at most 128%s", "");
	{
		uint32_t nsock = (uint32_t)opt.queues * (opt.forward ? 2 : 1);

		if (opt.frames < nsock) {
			fprintf(stderr, "xskcheck: --frames %u is fewer than the %u sockets (one frame each at least)\n",
				opt.frames, nsock);
			exit(2);
		}
	}
	if (opt.frame_size - XDP_HEADROOM - opt.headroom < 1514)
		fprintf(stderr, "xskcheck: note: frames longer than %u bytes will be dropped (rx_dropped)\n",
			opt.frame_size - XDP_HEADROOM - opt.headroom);
}

/* ------------------------------------------------------------------ */
/* main                                                                */

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

/* tracefs is often not mounted, and `ip netns exec` remounts /sys anyway:
 * then mount a private instance on a temporary directory just long enough
 * to open the files (the fds stay valid after the lazy unmount). */
static void open_tracing(void)
{
	static const char *const dirs[] = { "/sys/kernel/tracing", "/sys/kernel/debug/tracing" };
	char path[160], tmp[64] = "";

	for (int i = 0; i < 3 && trace_fd < 0 && tracing_on_fd < 0; i++) {
		const char *dir = i < 2 ? dirs[i] : NULL;

		if (!dir) {
			snprintf(tmp, sizeof(tmp), "/tmp/xskcheck-tracefs.%d", (int)getpid());
			if (mkdir(tmp, 0700))
				break;
			if (mount("nodev", tmp, "tracefs", 0, NULL)) {
				rmdir(tmp);
				break;
			}
			dir = tmp;
		}
		if (opt.trace_marker) {
			snprintf(path, sizeof(path), "%s/trace_marker", dir);
			trace_fd = open(path, O_WRONLY | O_CLOEXEC);
		}
		if (opt.stop_on_first || opt.trace_marker) {
			snprintf(path, sizeof(path), "%s/tracing_on", dir);
			tracing_on_fd = open(path, O_WRONLY | O_CLOEXEC);
		}
	}
	if (tmp[0]) {
		umount2(tmp, MNT_DETACH);
		rmdir(tmp);
	}
	if (opt.trace_marker && trace_fd < 0)
		fprintf(stderr, "xskcheck: no tracefs trace_marker: violations go to stdout only\n");
}

/* ------------------------------------------------------------------ */
/* --selfbench: the checker against a correct in-memory "kernel"       */

static void fake_ring(struct ring *r, uint32_t size, size_t desc)
{
	r->map = calloc(1, 3 * 64 + size * desc);
	r->maplen = 0; /* not mmapped */
	r->prod = (uint32_t *)r->map;
	r->cons = (uint32_t *)((char *)r->map + 64);
	r->flags = (uint32_t *)((char *)r->map + 128);
	r->descs = (char *)r->map + 192;
	r->size = size;
	r->mask = size - 1;
}

/* What copy mode does per packet: take the next FILL address, write the
 * XDP metadata and the frame, publish an RX descriptor. */
static void fake_kernel(struct xsk *s, uint32_t max, uint64_t *seq, const uint8_t *tmpl, uint32_t len)
{
	uint32_t fprod = __atomic_load_n(s->fill.prod, __ATOMIC_ACQUIRE), fcons = *s->fill.cons;
	uint32_t rprod = *s->rx.prod, rcons = __atomic_load_n(s->rx.cons, __ATOMIC_ACQUIRE);

	for (uint32_t k = 0; k < max && fcons != fprod && rprod - rcons < s->rx.size; k++) {
		uint64_t addr = ((uint64_t *)s->fill.descs)[fcons++ & s->fill.mask] + exp_off;
		uint8_t *p = s->umem + addr;
		struct xdp_desc *d = &((struct xdp_desc *)s->rx.descs)[rprod++ & s->rx.mask];
		uint64_t be = htobe64(++*seq);
		uint32_t meta[2] = { len, XDP_META_MAGIC };

		if (*seq == fake_unwritten)
			continue; /* the FILL entry is taken and the slot published, never written */

		if (fake_len_bias) {
			meta[0]++;
			fake_len_bias--;
		}
		memcpy(p - META_LEN, meta, META_LEN);
		memcpy(p, tmpl, len);
		memcpy(p + HDRS_LEN + 8, &be, 8);
		d->addr = addr;
		d->len = len;
		d->options = 0;
	}
	__atomic_store_n(s->fill.cons, fcons, __ATOMIC_RELEASE);
	__atomic_store_n(s->rx.prod, rprod, __ATOMIC_RELEASE);
}

static int selfbench(void)
{
	struct group *g = &groups[0];
	struct xsk *s = g->s[0];
	static uint8_t tmpl[1514];
	uint32_t len = opt.selfbench_size, v32, *list;
	uint64_t seq = 0, spent = 0, n = 0;

	/* a valid 64-byte racelab frame: flow 0, seq patched per packet */
	tmpl[12] = 0x08;
	tmpl[ETH_HLEN_] = 0x45;
	tmpl[ETH_HLEN_ + 2] = (uint8_t)((len - ETH_HLEN_) >> 8);
	tmpl[ETH_HLEN_ + 3] = (uint8_t)(len - ETH_HLEN_);
	tmpl[ETH_HLEN_ + 9] = 17;
	v32 = htonl(RACE_MAGIC);
	memcpy(tmpl + HDRS_LEN, &v32, 4);
	payload_fill(tmpl + MIN_FRAME, len - MIN_FRAME, opt.seed, 0, 0);
	v32 = htonl(payload_csum(tmpl + MIN_FRAME, len - MIN_FRAME));
	memcpy(tmpl + HDRS_LEN + 16, &v32, 4);

	s->fd = -1;
	fake_ring(&s->fill, opt.ring, 8);
	fake_ring(&s->rx, opt.ring, sizeof(struct xdp_desc));
	poison_rings(s);
	list = calloc(s->home_n, sizeof(uint32_t));
	for (uint32_t k = 0; k < s->home_n; k++)
		list[k] = s->home_first + k;
	post_fill(g, s, list, s->home_n);
	free(list);
	g->st.fill = 0;
	t0 = now_ns();
	while (n < opt.selfbench && !stop_flag) {
		uint64_t a;
		uint32_t got;

		uint64_t left = opt.selfbench - n;

		fake_kernel(s, left < (uint64_t)opt.batch ? (uint32_t)left : (uint32_t)opt.batch, &seq, tmpl, len);
		a = now_ns();
		got = do_rx(g, s);
		spent += now_ns() - a;
		if (!got && !s->npend) {
			fprintf(stderr, "xskcheck: selfbench stalled after %llu descriptors\n", (unsigned long long)n);
			return 3;
		}
		n += got;
	}
	{
		char line[256];

		snprintf(line, sizeof(line),
			 "{\"type\":\"selfbench\",\"t\":%.3f,\"checks\":\"%s\",\"descs\":%llu,\"ns_per_desc\":%.2f}\n",
			 tnow(), opt.checks ? "all" : "none", (unsigned long long)n, n ? (double)spent / (double)n : 0.0);
		emit(line);
	}
	stop_reason = "selfbench";
	print_stats("done");
	return 0;
}

/* ------------------------------------------------------------------ */
/* main's phases, in the order it runs them                            */

/* The devices by name and ifindex (dev_name[], ifindex[]), before anything
 * is allocated.  Returns 0, or the exit code. */
static int find_devices(void)
{
	dev_name[0] = opt.dev;
	dev_name[1] = opt.peer_dev;
	for (int d = 0; d < (opt.forward ? 2 : 1) && !opt.selfbench; d++) {
		ifindex[d] = (int)if_nametoindex(dev_name[d]);
		if (!ifindex[d]) {
			fprintf(stderr, "xskcheck: no such device: %s\n", dev_name[d]);
			return 2;
		}
	}
	return 0;
}

/* Splits the frames among the groups (one per queue) and lays out their
 * sockets: groups[0..ngroups), socks[0..nsocks) with their home frames, pool
 * and peer, the per-frame tables, and the UMEMs mmapped (shared_map with
 * --shared-umem).  No socket is open yet.  Returns 0, or the exit code. */
static int make_groups(void)
{
	uint32_t per_group, rem, fpos = 0;

	ngroups = opt.queues;
	per_group = opt.frames / (uint32_t)ngroups;
	rem = opt.frames % (uint32_t)ngroups;
	fstate = calloc(opt.frames, 1);
	fflags = calloc(opt.frames, 1);
	fseq = calloc(opt.frames, sizeof(*fseq));
	fsock = calloc(opt.frames, 1);
	if (opt.shared_umem) {
		shared_maplen = ((size_t)opt.frames * opt.frame_size + 4095) & ~(size_t)4095;
		shared_map = mmap(NULL, shared_maplen, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE,
				  -1, 0);
		if (shared_map == MAP_FAILED) {
			shared_map = NULL;
			perror("xskcheck: mmap UMEM");
			return 3;
		}
	}
	for (int gi = 0; gi < ngroups; gi++) {
		struct group *g = &groups[gi];
		uint32_t n = per_group + ((uint32_t)gi < rem ? 1 : 0);

		g->id = gi;
		g->first = fpos;
		g->nframes = n;
		g->held = n;
		g->ns = opt.forward ? 2 : opt.spq;
		g->cpu = opt.ncpus ? opt.cpus[gi % opt.ncpus] : -1;
		g->next_inject = INJECT_FIRST;
		if (opt.forward && n < 2) {
			fprintf(stderr, "xskcheck: forward mode needs at least 2 frames per queue\n");
			return 2;
		}
		for (int j = 0; j < g->ns; j++) {
			struct xsk *s = &socks[nsocks++];
			uint32_t half = n / 2;

			g->s[j] = s;
			s->g = g;
			s->slot = j;
			s->devno = opt.forward ? j : 0;
			s->dev = dev_name[s->devno];
			s->ifindex = ifindex[s->devno];
			s->queue = (uint32_t)gi;
			s->fq = opt.forward || j == 0 ? s : g->s[0];
			if (opt.forward) {
				s->home_first = j == 0 ? fpos : fpos + half;
				s->home_n = j == 0 ? half : n - half;
			} else { /* pooled: every frame starts in the pool's one FILL ring */
				s->home_first = fpos;
				s->home_n = j == 0 ? n : 0;
			}
			if (s->fq != s && !opt.shared_umem) { /* the pool's UMEM, registered by its first socket */
				s->umem = g->s[0]->umem;
				s->umem_frames = n;
				s->gbase = fpos;
				s->owns_umem = false;
				s->umem_maplen = g->s[0]->umem_maplen;
			} else if (opt.shared_umem) {
				s->umem = shared_map;
				s->umem_frames = opt.frames;
				s->gbase = 0;
				s->owns_umem = s == &socks[0];
				s->umem_maplen = shared_maplen;
			} else {
				s->umem_maplen = ((size_t)n * opt.frame_size + 4095) & ~(size_t)4095;
				s->umem = mmap(NULL, s->umem_maplen, PROT_READ | PROT_WRITE,
					       MAP_PRIVATE | MAP_ANONYMOUS | MAP_POPULATE, -1, 0);
				if (s->umem == MAP_FAILED) {
					perror("xskcheck: mmap UMEM");
					return 3;
				}
				s->umem_frames = n;
				s->gbase = fpos;
				s->owns_umem = true;
			}
		}
		if (g->ns == 2) {
			g->s[0]->peer = g->s[1];
			g->s[1]->peer = g->s[0];
		}
		g->umem = g->s[0]->umem;
		g->umem_gbase = g->s[0]->gbase;
		fpos += n;
	}
	return 0;
}

/* opt.ring: without --ring, the smallest power of two that holds a
 * group's frames, so that RX can never overflow (overflow reorders on a
 * correct kernel); the injected duplicate FILL entry needs one more slot. */
static void choose_ring_size(void)
{
	uint32_t max_group = 0;

	for (int gi = 0; gi < ngroups; gi++)
		if (groups[gi].nframes > max_group)
			max_group = groups[gi].nframes;
	if (!opt.ring) {
		uint32_t need = max_group + (opt.inject == K_DUPLICATE ? 1 : 0);

		opt.ring = 4;
		while (opt.ring < need)
			opt.ring <<= 1;
	} else if (opt.ring < max_group) {
		fprintf(stderr, "xskcheck: note: --ring %u < %u frames per queue: RX may overflow and reorder\n",
			opt.ring, max_group);
	}
}

/* Each socket's checker state, sized from opt.ring and its group: the FILL
 * FIFO, the flow table, the frames waiting for FILL space.  Returns 0, or
 * the exit code. */
static int alloc_tables(void)
{
	for (int i = 0; i < nsocks; i++) {
		struct xsk *s = &socks[i];
		uint32_t cap = 4;

		while (cap < 2 * opt.ring + 2)
			cap <<= 1;
		s->fifo.e = calloc(cap, sizeof(uint32_t));
		s->fifo.mask = cap - 1;
		s->flows = calloc(FLOWTAB, sizeof(struct flowent));
		s->pend = calloc(2 * (size_t)s->g->nframes + 2 * MAX_BATCH, sizeof(uint32_t));
		if (!s->fifo.e || !s->flows || !s->pend) {
			fprintf(stderr, "xskcheck: out of memory\n");
			return 3;
		}
	}
	return 0;
}

/* The BPF objects (ctl_fd, xskmap_fd[], prog_fd[]), before any socket so
 * that EPERM is reported early.  Nothing is attached yet.  Returns 0, or the
 * exit code. */
static int load_bpf(void)
{
	ctl_fd = map_create(BPF_MAP_TYPE_ARRAY, 2, "xskcheck_ctl"); /* [0] length bias, [1] rr pick */
	if (ctl_fd < 0) {
		fprintf(stderr, "xskcheck: cannot create a BPF map: %s\n", strerror(errno));
		return errno == EPERM ? 2 : 3;
	}
	for (int d = 0; d < (opt.forward ? 2 : 1); d++) {
		xskmap_fd[d] = map_create(BPF_MAP_TYPE_XSKMAP, (uint32_t)(opt.queues * opt.spq), "xskcheck_xsks");
		if (xskmap_fd[d] < 0) {
			fprintf(stderr, "xskcheck: cannot create the XSKMAP: %s\n", strerror(errno));
			return 3;
		}
		prog_fd[d] = load_prog(xskmap_fd[d], ctl_fd);
		if (prog_fd[d] < 0) {
			fprintf(stderr, "xskcheck: cannot load the XDP program: %s\n", strerror(errno));
			return errno == EPERM ? 2 : 3;
		}
	}
	return 0;
}

/* SIGTERM and SIGINT set stop_flag; start_workers() keeps them off the
 * workers, so only the main thread takes them. */
static void catch_signals(void)
{
	struct sigaction sa;

	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);
}

/* Opens, maps, poisons (poison_rings(), before bind()) and binds every
 * socket, and puts it in its device's XSKMAP.  Exits 3 on failure (2 when
 * not permitted), closing what it opened. */
static void open_sockets(void)
{
	for (int i = 0; i < nsocks; i++) {
		struct xsk *s = &socks[i];

		/* a socket on its pool's queue joins that pool (same device and queue:
		 * one FILL ring); a queue's first socket joins the shared UMEM, if any */
		if (setup_socket(s, s->fq != s ? s->fq : opt.shared_umem ? &socks[0] : s))
			bail(3);
		/* forward: slot 1 is on the peer device, in its own map */
		if (map_update(xskmap_fd[s->devno],
			       s->queue * (uint32_t)opt.spq + (opt.forward ? 0u : (uint32_t)s->slot), (uint32_t)s->fd)) {
			fail_errno("adding the socket to the XSKMAP", s);
			bail(3);
		}
	}
}

/* Every frame starts in its home socket's FILL ring; the groups' fill
 * counters stay 0 (the initial posting is not counted). */
static void post_initial_fill(void)
{
	for (int i = 0; i < nsocks; i++) {
		struct xsk *s = &socks[i];
		uint32_t *list = calloc(s->home_n ? s->home_n : 1, sizeof(uint32_t));

		for (uint32_t k = 0; k < s->home_n; k++)
			list[k] = s->home_first + k;
		post_fill(s->g, s, list, s->home_n);
		free(list);
	}
	for (int i = 0; i < ngroups; i++)
		groups[i].st.fill = 0;
}

/* The XDP program on each device, in the --xdp mode (attached[] says which
 * are, for detach_all()).  Exits 3 on failure. */
static void attach_xdp(void)
{
	char err[256];
	int rc;

	for (int d = 0; d < (opt.forward ? 2 : 1); d++) {
		/* a program left by a killed checker (either mode) would block us */
		xdp_set(ifindex[d], -1, XDP_FLAGS_SKB_MODE, NULL, 0);
		xdp_set(ifindex[d], -1, XDP_FLAGS_DRV_MODE, NULL, 0);
		rc = xdp_set(ifindex[d], prog_fd[d], xdp_mode_flag(), err, sizeof(err));
		if (rc) {
			fprintf(stderr, "xskcheck: attaching XDP (%s) to %s: %s%s%s\n", opt.native ? "native" : "generic",
				dev_name[d], strerror(-rc), err[0] ? ": " : "", err);
			bail(3);
		}
		attached[d] = true;
	}
}

/* The "ready" event: what the checker runs with, at t = 0. */
static void print_ready(void)
{
	char line[768];

	snprintf(line, sizeof(line),
		 "{\"type\":\"ready\",\"t\":0.0,\"sockets\":%d,\"queues\":%d,\"xdp\":\"%s\",\"mode\":\"%s\","
		 "\"frames\":%u,\"frame_size\":%u,\"headroom\":%u,\"expected_offset\":%u,\"ring\":%u,"
		 "\"shared_umem\":%s,\"sockets_per_queue\":%d,\"pick\":\"%s\",\"busy_poll_usec\":%d,\"checks\":\"%s\",\"inject\":%s%s%s,\"dev\":\"%s\",\"peer_dev\":%s%s%s,"
		 "\"pid\":%d}\n",
		 nsocks, opt.queues, opt.native ? "native" : "generic", opt.forward ? "forward" : "rxdrop",
		 opt.frames, opt.frame_size, opt.headroom, exp_off, opt.ring, opt.shared_umem ? "true" : "false",
		 opt.spq, opt.pick_rr ? "rr" : "cpu", opt.busy_poll_us, opt.checks ? "all" : "none", opt.inject >= 0 ? "\"" : "",
		 opt.inject >= 0 ? kind_name[opt.inject] : "null", opt.inject >= 0 ? "\"" : "", opt.dev,
		 opt.peer_dev ? "\"" : "", opt.peer_dev ? opt.peer_dev : "null", opt.peer_dev ? "\"" : "",
		 (int)getpid());
	emit(line);
}

/* One worker() thread per group (groups[].th), with SIGTERM and SIGINT
 * blocked in them.  Exits 3 if one cannot start, after stopping the others. */
static void start_workers(void)
{
	sigset_t block, old;

	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	pthread_sigmask(SIG_BLOCK, &block, &old);
	for (int i = 0; i < ngroups; i++) {
		if (pthread_create(&groups[i].th, NULL, worker, &groups[i])) {
			fprintf(stderr, "xskcheck: cannot start worker threads\n");
			stop_flag = 1;
			for (int j = 0; j < i; j++)
				pthread_join(groups[j].th, NULL);
			bail(3);
		}
	}
	pthread_sigmask(SIG_SETMASK, &old, NULL);
}

/* The main thread while the workers check: a "stats" event every
 * --stats-ms, until a signal, a worker (stop_flag) or --duration
 * (stop_reason "duration") ends the run.  It sleeps at most 50 ms at a
 * time, so that a stop is seen soon. */
static void wait_for_stop(void)
{
	uint64_t deadline = 0, next_stats;

	if (opt.duration > 0)
		deadline = t0 + (uint64_t)(opt.duration * 1e9);
	next_stats = t0 + (uint64_t)opt.stats_ms * 1000000ull;
	while (!stop_flag) {
		uint64_t n = now_ns(), wake = next_stats;
		struct timespec ts;

		if (deadline && n >= deadline) {
			stop_reason = "duration";
			break;
		}
		if (n >= next_stats) {
			print_stats("stats");
			next_stats += (uint64_t)opt.stats_ms * 1000000ull;
			if (next_stats < n)
				next_stats = n + (uint64_t)opt.stats_ms * 1000000ull;
			continue;
		}
		if (deadline && deadline < wake)
			wake = deadline;
		if (wake - n > 50000000ull)
			wake = n + 50000000ull;
		ts.tv_sec = (time_t)((wake - n) / 1000000000ull);
		ts.tv_nsec = (long)((wake - n) % 1000000000ull);
		nanosleep(&ts, NULL);
	}
}

/* Stops and joins the workers, detaches XDP before the final counters are
 * read, prints "done", closes everything.  Returns the exit code: 3 if a
 * worker failed, else 0. */
static int finish(void)
{
	stop_flag = 1;
	for (int i = 0; i < ngroups; i++)
		pthread_join(groups[i].th, NULL);
	detach_all();
	print_stats("done");
	close_all();
	return fatal_flag ? 3 : 0;
}

/* Each phase leaves behind what the next one needs; see its comment.
 * --selfbench stops after the layout and runs against an in-memory kernel. */
int main(int argc, char **argv)
{
	struct rlimit rl = { RLIM_INFINITY, RLIM_INFINITY };
	int rc;

	setvbuf(stdout, NULL, _IOFBF, 1 << 16);
	parse_args(argc, argv);
	exp_off = XDP_HEADROOM + opt.headroom;
	fs_shift = (unsigned)__builtin_ctz(opt.frame_size);
	setrlimit(RLIMIT_MEMLOCK, &rl);

	if ((rc = find_devices()) || (rc = make_groups()))
		return rc;
	choose_ring_size();
	if ((rc = alloc_tables()))
		return rc;
	if (opt.selfbench)
		return selfbench();

	if ((rc = load_bpf()))
		return rc;
	catch_signals();
	open_sockets();
	post_initial_fill();
	attach_xdp();
	if (opt.trace_marker || opt.stop_on_first)
		open_tracing();

	t0 = now_ns();
	print_ready();
	start_workers();
	wait_for_stop();
	return finish();
}

// SPDX-License-Identifier: GPL-2.0-only
/* xskamp: the racelab run-time race-window amplifier.
 *
 * Places a kprobe at each --probe SYM+OFF on every online CPU, through the
 * kprobe PMU (perf_event_open with the symbol name and offset; no tracefs),
 * counts its hits per CPU and, with --delay-ns N, attaches a hand-assembled
 * BPF program to it that busy-waits N ns each time it fires.  It lives for
 * the run and is stopped with SIGTERM.  No libbpf, clang or kernel patch.
 *
 * Why: the veth NAPI race, fixed by commit fa349e396e48 ("veth: Fix race
 * with AF_XDP exposing old or uninitialized descriptors", in v6.2), only
 * reaches user space when another CPU's xsk_flush() publishes the producer
 * while this CPU is between `cached_prod++` and the two descriptor stores of
 * xskq_prod_reserve_desc() (inlined into __xsk_rcv_zc() in 6.1): a few
 * instructions, so a flush almost never lands there and a vulnerable kernel
 * looks fixed.  A probe on the first store after `cached_prod++` holds the
 * CPU inside that window; its int3 trap alone is some delay, the BPF busy
 * wait a chosen one.  On a fixed kernel NAPI serialises the producer against
 * the flush, so the same probe must stay harmless there: a fair control.
 * The offset for a kernel build is found by lab/amplifier.py.
 *
 * Kprobe optimisation is switched off (/proc/sys/debug/kprobes-optimization
 * = 0) while the probes stand and restored on exit (SIGTERM, SIGINT, SIGHUP,
 * --duration, an error; not SIGKILL): an optimised kprobe is a jump, far
 * less delay than the int3 trap the lab's measurements used.
 *
 * The delay loop: `start = bpf_ktime_get_ns(); while (now - start < N)`,
 * inside bpf_loop() (helper 181, Linux 5.17) where the kernel has it, else a
 * loop with a fixed iteration bound (the verifier takes bounded loops since
 * 5.3, walking every iteration, so the bound stays far under its 1M
 * instruction limit).  --loop auto tries bpf_loop() first.  The program adds
 * the ns it really waited into a per-CPU map, so the delay is reported, not
 * assumed.  It is attached to the probe's first per-CPU event only: the BPF
 * program of a kprobe runs on whichever CPU hits it, and each per-CPU event
 * is a kprobe of its own, so one program per event would wait once per CPU.
 *
 * Output: JSON lines on stdout; diagnostics on stderr.
 *   ready  t=0 once every probe is placed: probes [{probe, cpus}], cpu_list,
 *          method kprobe|kprobe-delay, delay_ns, loop bpf_loop|bounded|null,
 *          optimisation_was (the sysctl's old value, or null without one)
 *   stats  every --stats-ms: hits (per CPU of cpu_list, all probes summed),
 *          hits_total, by_probe [{probe, hits_total, hold}]
 *   done   the final stats, plus reason, runs (delay program runs),
 *          waited_ns_total, waited_ns_avg, waited_ns_max, waited_under_2n
 *          (runs that waited less than 2N), capped (runs that ran out of
 *          loop iterations before N), optimisation_restored
 * --try-prog R runs the delay program R times through BPF_PROG_TEST_RUN,
 * loaded as a socket filter, with no probe: the verifier's verdict on both
 * loops and the delay they give, on a kernel without kprobes too.
 *
 * Exit 0 ok; 2 bad arguments, a probe or program the kernel refuses, a
 * kernel without the support needed, not permitted; 3 runtime failure.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <inttypes.h>
#include <linux/perf_event.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "bpfasm.h"
#include "common.h"

#define MAX_PROBES 16
#define MAX_CPUS 1024
#define MAX_SYM 128
#define MAX_DELAY_NS 1000000 /* 1 ms: more is a stall, not a window */
#define LOOP_NR_MAX (1u << 23) /* bpf_loop()'s own limit */
#define BOUNDED_MIN 256
#define BOUNDED_MAX 50000 /* about 7 verified instructions each: 350 k of the 1 M */

#define KPROBE_PMU "/sys/bus/event_source/devices/kprobe/type"
#define OPT_SYSCTL "/proc/sys/debug/kprobes-optimization"

enum { LOOP_AUTO, LOOP_BPF_LOOP, LOOP_BOUNDED };
static const char *const loop_name[] = { "auto", "bpf_loop", "bounded" };

struct probe {
	char sym[MAX_SYM];
	uint64_t off;
	char name[MAX_SYM + 24]; /* SYM+0xOFF */
	int fd[MAX_CPUS];	 /* per cpu_list entry; -1 not open */
	bool hold;		 /* --hold: waits --hold-ns on every hit, never gated */
};

/* The per-CPU map value the delay program updates. */
struct waited {
	uint64_t ns, runs, capped, max;
	uint64_t under_2n; /* runs that waited < 2N: under TCG a vCPU thread the host
			    * preempts mid-wait makes a few waits of milliseconds,
			    * which the average alone would hide the typical wait behind */
};

static struct {
	struct probe probes[MAX_PROBES];
	int nprobes;
	uint64_t delay_ns;
	int stats_ms;
	double duration;
	int loop;
	uint32_t try_prog; /* > 0: no probes; run the program this many times (BPF_PROG_TEST_RUN) */
	char gate[MAX_SYM]; /* --gate SYM: delay only while another CPU is inside SYM */
	uint64_t hold_ns;   /* --hold probes' wait (0: --delay-ns) */
} opt = { .stats_ms = 1000, .loop = LOOP_AUTO };

static int cpus[MAX_CPUS], ncpus;
static int map_fd = -1, prog_fd = -1, hold_fd = -1, loop_used = -1;
/* --gate: an array map "CPU i is inside SYM" (1/0), written by an entry
 * kprobe and a kretprobe on SYM; the delay program reads the other CPUs' */
static int gate_map_fd = -1, gate_nr, gate_evt[2] = { -1, -1 }, gate_prog[2] = { -1, -1 };
static char opt_old[32];	/* the sysctl's value before us; "" = none / untouched */
static bool opt_touched, opt_restored;
static char vlog[1 << 24];	/* verifier log: 16 MB, the limit before Linux 5.2 */

/* ------------------------------------------------------------------ */
/* small helpers                                                       */

static void usage(FILE *f)
{
	fprintf(f,
		"usage: xskamp --probe SYM+OFF [--probe SYM+OFF ...] [--delay-ns N] [--loop auto|bpf_loop|bounded]\n"
		"              [--gate SYM] [--hold SYM+OFF ... [--hold-ns N]] [--stats-ms 1000]\n"
		"              [--duration SEC (0: until SIGTERM)]\n"
		"       xskamp --try-prog REPEAT --delay-ns N [--loop ...]\n"
		"              (no probes: run the delay program REPEAT times with BPF_PROG_TEST_RUN, as a socket\n"
		"              filter, on a kernel without kprobes too)\n"
		"  OFF is decimal or 0x hex (SYM alone is SYM+0); N is 0..%d ns (0: the probe's trap only)\n"
		"  --gate SYM: wait only while another CPU is inside SYM (e.g. veth_poll)\n"
		"  --hold SYM+OFF: a probe on the other side of the window (e.g. xdp_do_flush): it waits\n"
		"    --hold-ns N (default: --delay-ns) on every hit, whatever --gate says\n",
		MAX_DELAY_NS);
}

static void die_usage(const char *what, const char *arg)
{
	fprintf(stderr, "xskamp: %s%s%s%s\n", what, arg ? " '" : "", arg ? arg : "", arg ? "'" : "");
	usage(stderr);
	exit(2);
}

static int read_file(const char *path, char *buf, size_t len)
{
	int fd = open(path, O_RDONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = read(fd, buf, len - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = '\0';
	while (n > 0 && (buf[n - 1] == '\n' || buf[n - 1] == ' '))
		buf[--n] = '\0';
	return 0;
}

static int write_file(const char *path, const char *val)
{
	int fd = open(path, O_WRONLY | O_CLOEXEC);
	ssize_t n;

	if (fd < 0)
		return -1;
	n = write(fd, val, strlen(val));
	close(fd);
	return n == (ssize_t)strlen(val) ? 0 : -1;
}

/* A wait in ns, lo..MAX_DELAY_NS; anything else is a usage error saying what. */
static uint64_t parse_ns(const char *arg, long long lo, const char *what)
{
	char *end;
	long long v;

	errno = 0;
	v = strtoll(arg, &end, 10);
	if (errno || *end || end == arg || v < lo || v > MAX_DELAY_NS)
		die_usage(what, arg);
	return (uint64_t)v;
}

/* "SYM", "SYM+123", "SYM+0x7a" -> probe; -1 if malformed. */
static int parse_probe(const char *s, struct probe *p)
{
	const char *plus = strchr(s, '+');
	size_t n = plus ? (size_t)(plus - s) : strlen(s);
	char *end;

	if (n == 0 || n >= MAX_SYM)
		return -1;
	for (size_t i = 0; i < n; i++) {
		char c = s[i];

		if (!(c == '_' || c == '.' || (c >= 'a' && c <= 'z') || (c >= 'A' && c <= 'Z') ||
		      (c >= '0' && c <= '9')))
			return -1;
	}
	memcpy(p->sym, s, n);
	p->sym[n] = '\0';
	p->off = 0;
	if (plus) {
		const char *o = plus + 1;
		bool hex = o[0] == '0' && (o[1] == 'x' || o[1] == 'X');

		if (!*o || (hex && !o[2]) || (!hex && (*o < '0' || *o > '9')))
			return -1;
		errno = 0;
		p->off = strtoull(hex ? o + 2 : o, &end, hex ? 16 : 10);
		if (errno || *end || p->off > 0xfffff)
			return -1;
	}
	snprintf(p->name, sizeof(p->name), "%.*s+0x%" PRIx64, (int)n, s, p->off);
	for (int i = 0; i < MAX_CPUS; i++)
		p->fd[i] = -1;
	return 0;
}

/* ------------------------------------------------------------------ */
/* kprobe optimisation: off while we run, the old value back on exit   */

static void opt_disable(void)
{
	if (read_file(OPT_SYSCTL, opt_old, sizeof(opt_old)) != 0) {
		opt_old[0] = '\0'; /* no CONFIG_OPTPROBES: every kprobe is a trap already */
		return;
	}
	if (strcmp(opt_old, "0") != 0 && write_file(OPT_SYSCTL, "0") != 0) {
		fprintf(stderr, "xskamp: cannot write 0 to %s: %s\n", OPT_SYSCTL, strerror(errno));
		exit(2);
	}
	opt_touched = true;
}

/* Called after the probes are gone, so none of ours is optimised in between. */
static void opt_restore(void)
{
	if (!opt_touched || opt_restored)
		return;
	if (strcmp(opt_old, "0") != 0 && write_file(OPT_SYSCTL, opt_old) != 0) {
		fprintf(stderr, "xskamp: cannot restore %s to %s: %s\n", OPT_SYSCTL, opt_old, strerror(errno));
		return;
	}
	opt_restored = true;
}

/* ------------------------------------------------------------------ */
/* the delay program                                                   */

/* Shared tail: r8 = ns waited; add it to the per-CPU map, return 1 so the
 * perf event still counts the hit (0 would drop it). */
#define TAIL_LEN 26
static void emit_tail(struct bpf_insn *p, int mfd, int32_t n)
{
	struct bpf_insn t[TAIL_LEN] = {
		BPF_ST_MEM(BPF_W, BPF_REG_10, -24, 0),
		BPF_MOV64_REG(BPF_REG_2, BPF_REG_10),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_2, -24),
		BPF_LD_MAP_FD(BPF_REG_1, mfd),
		BPF_CALL_FN(BPF_HELPER_map_lookup_elem),
		BPF_JMP_IMM(BPF_JEQ, BPF_REG_0, 0, 17), /* to out */
		BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_0, offsetof(struct waited, ns)),
		BPF_ALU64_REG(BPF_ADD, BPF_REG_1, BPF_REG_8),
		BPF_STX_MEM(BPF_DW, BPF_REG_0, BPF_REG_1, offsetof(struct waited, ns)),
		BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_0, offsetof(struct waited, runs)),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_1, 1),
		BPF_STX_MEM(BPF_DW, BPF_REG_0, BPF_REG_1, offsetof(struct waited, runs)),
		BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_0, offsetof(struct waited, max)),
		BPF_JMP_REG(BPF_JGE, BPF_REG_1, BPF_REG_8, 1),
		BPF_STX_MEM(BPF_DW, BPF_REG_0, BPF_REG_8, offsetof(struct waited, max)),
		BPF_JMP_IMM(BPF_JGE, BPF_REG_8, 2 * n, 3),
		BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_0, offsetof(struct waited, under_2n)),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_1, 1),
		BPF_STX_MEM(BPF_DW, BPF_REG_0, BPF_REG_1, offsetof(struct waited, under_2n)),
		BPF_JMP_IMM(BPF_JGE, BPF_REG_8, n, 3), /* to out */
		BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_0, offsetof(struct waited, capped)),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_1, 1),
		BPF_STX_MEM(BPF_DW, BPF_REG_0, BPF_REG_1, offsetof(struct waited, capped)),
		/* out: */
		BPF_MOV64_IMM(BPF_REG_0, 1),
		BPF_EXIT_INSN(),
	};
	memcpy(p, t, sizeof(t));
}

/*   struct { u64 waited; u64 start; } c = { 0, bpf_ktime_get_ns() };   (fp-16)
 *   bpf_loop(1 << 23, cb, &c, 0);       cb: c->waited = now - c->start;
 *                                           return c->waited >= N;
 * The callback's address is a BPF_PSEUDO_FUNC load; the verifier takes it
 * only with BTF naming the callback static, and only with the JIT on. */
static int build_bpf_loop(struct bpf_insn *p, int mfd, int32_t n, uint32_t *cb_off)
{
	int i = 0, ld, cb;

	p[i++] = BPF_CALL_FN(BPF_HELPER_ktime_get_ns);
	p[i++] = BPF_STX_MEM(BPF_DW, BPF_REG_10, BPF_REG_0, -8);
	p[i++] = BPF_ST_MEM(BPF_DW, BPF_REG_10, -16, 0);
	p[i++] = BPF_MOV64_IMM(BPF_REG_1, (int32_t)LOOP_NR_MAX);
	ld = i;
	p[i++] = (struct bpf_insn)BPF_LD_FUNC(BPF_REG_2, 0); /* off fixed below */
	p[i++] = INSN(0, 0, 0, 0, 0);
	p[i++] = BPF_MOV64_REG(BPF_REG_3, BPF_REG_10);
	p[i++] = BPF_ALU64_IMM(BPF_ADD, BPF_REG_3, -16);
	p[i++] = BPF_MOV64_IMM(BPF_REG_4, 0);
	p[i++] = BPF_CALL_FN(BPF_HELPER_loop);
	p[i++] = BPF_LDX_MEM(BPF_DW, BPF_REG_8, BPF_REG_10, -16);
	emit_tail(p + i, mfd, n);
	i += TAIL_LEN;
	cb = i;
	p[ld].imm = cb - (ld + 1);
	*cb_off = (uint32_t)cb;
	/* cb(u32 index, void *ctx = r2) */
	p[i++] = BPF_MOV64_REG(BPF_REG_6, BPF_REG_2);
	p[i++] = BPF_CALL_FN(BPF_HELPER_ktime_get_ns);
	p[i++] = BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_6, 8);
	p[i++] = BPF_ALU64_REG(BPF_SUB, BPF_REG_0, BPF_REG_1);
	p[i++] = BPF_STX_MEM(BPF_DW, BPF_REG_6, BPF_REG_0, 0);
	p[i++] = BPF_JMP_IMM(BPF_JGE, BPF_REG_0, n, 2);
	p[i++] = BPF_MOV64_IMM(BPF_REG_0, 0); /* go on */
	p[i++] = BPF_EXIT_INSN();
	p[i++] = BPF_MOV64_IMM(BPF_REG_0, 1); /* stop */
	p[i++] = BPF_EXIT_INSN();
	return i;
}

/*   start = bpf_ktime_get_ns();
 *   for (i = 0; i < bound; i++) if ((waited = now - start) >= N) break;
 * Shaped for the verifier: the exit test falls through to the tail and the
 * loop goes on by a taken jump, so its stack of branches to explore stays
 * one deep (it is limited to 8192), and every iteration's visit to the tail
 * after the first is pruned (the counter r7 is dead there). */
static int build_bounded(struct bpf_insn *p, int mfd, int32_t n, int32_t bound)
{
	int i = 0;

	p[i++] = BPF_CALL_FN(BPF_HELPER_ktime_get_ns);
	p[i++] = BPF_MOV64_REG(BPF_REG_6, BPF_REG_0);
	p[i++] = BPF_MOV64_IMM(BPF_REG_7, 0);
	/* loop: */
	p[i++] = BPF_CALL_FN(BPF_HELPER_ktime_get_ns);
	p[i++] = BPF_ALU64_REG(BPF_SUB, BPF_REG_0, BPF_REG_6);
	p[i++] = BPF_MOV64_REG(BPF_REG_8, BPF_REG_0);
	p[i++] = BPF_ALU64_IMM(BPF_ADD, BPF_REG_7, 1);
	p[i++] = BPF_JMP_IMM(BPF_JLT, BPF_REG_8, n, 1);
	p[i++] = BPF_JMP_A(1);				    /* waited >= N: to the tail */
	p[i++] = BPF_JMP_IMM(BPF_JLT, BPF_REG_7, bound, -7); /* to loop: */
	emit_tail(p + i, mfd, n);
	return i + TAIL_LEN;
}

/* The --gate prologue: go on to the delay only if another CPU is inside the
 * gate function, else return 1 at once (the hit is still counted):
 *   me = smp_processor_id();
 *   for (i = 0; i < gate_nr; i++) if (i != me && inside[i]) goto body;
 *   return 1;
 * The race's window only matters while another CPU is in the same poll
 * (veth_poll(): on the affected kernel it is between napi_complete_done()
 * and its flush), so delaying only then keeps every other receive fast: an
 * unconditional delay per receive slows the poll until it always uses its
 * whole budget, and a poll that uses its budget never opens the window. */
#define GATE_LEN 18
static void emit_gate(struct bpf_insn *p, int gfd, int32_t nr)
{
	struct bpf_insn g[GATE_LEN] = {
		BPF_CALL_FN(BPF_HELPER_get_smp_processor_id),
		BPF_MOV64_REG(BPF_REG_7, BPF_REG_0),
		BPF_MOV64_IMM(BPF_REG_6, 0),
		/* 3 loop: */
		BPF_JMP_IMM(BPF_JGE, BPF_REG_6, nr, 12),	/* to nodelay (16) */
		BPF_JMP_REG(BPF_JEQ, BPF_REG_6, BPF_REG_7, 9),	/* to next (14) */
		BPF_STX_MEM(BPF_W, BPF_REG_10, BPF_REG_6, -32),
		BPF_MOV64_REG(BPF_REG_2, BPF_REG_10),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_2, -32),
		BPF_LD_MAP_FD(BPF_REG_1, gfd),
		BPF_CALL_FN(BPF_HELPER_map_lookup_elem),
		BPF_JMP_IMM(BPF_JEQ, BPF_REG_0, 0, 2),		/* to next (14) */
		BPF_LDX_MEM(BPF_DW, BPF_REG_1, BPF_REG_0, 0),
		BPF_JMP_IMM(BPF_JNE, BPF_REG_1, 0, 4),		/* to body (18) */
		/* 14 next: */
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_6, 1),
		BPF_JMP_A(-13),					/* to loop (3) */
		/* 16 nodelay: */
		BPF_MOV64_IMM(BPF_REG_0, 1),
		BPF_EXIT_INSN(),
	};
	memcpy(p, g, sizeof(g));
}

/* The gate's entry (val 1) and return (val 0) programs: inside[cpu] = val.
 * They return 0: no perf sample, nothing counted, as cheap as a probe gets. */
static int load_gate_prog(int val)
{
	struct bpf_insn p[] = {
		BPF_CALL_FN(BPF_HELPER_get_smp_processor_id),
		BPF_STX_MEM(BPF_W, BPF_REG_10, BPF_REG_0, -8),
		BPF_MOV64_REG(BPF_REG_2, BPF_REG_10),
		BPF_ALU64_IMM(BPF_ADD, BPF_REG_2, -8),
		BPF_LD_MAP_FD(BPF_REG_1, gate_map_fd),
		BPF_CALL_FN(BPF_HELPER_map_lookup_elem),
		BPF_JMP_IMM(BPF_JEQ, BPF_REG_0, 0, 1),
		BPF_ST_MEM(BPF_DW, BPF_REG_0, 0, val),
		BPF_MOV64_IMM(BPF_REG_0, 0),
		BPF_EXIT_INSN(),
	};
	int fd = bpf_prog_load_log(BPF_PROG_TYPE_KPROBE, p, sizeof(p) / sizeof(p[0]),
				   val ? "xskamp_gate_in" : "xskamp_gate_out", running_kernel_version(), -1, NULL, 0,
				   vlog, sizeof(vlog));

	if (fd < 0) {
		fprintf(stderr, "xskamp: the kernel refused the --gate program: %s; verifier log tail:\n%s\n",
			strerror(errno), log_tail(vlog, 20));
		exit(2);
	}
	return fd;
}

/* One attempt at loading the program with the given loop; the fd, or -1
 * with errno and the reason in why[] (the verifier log is in vlog). */
static int try_load(int loop, uint64_t delay_ns, bool gated, char *why, size_t whylen)
{
	static struct bpf_insn insns[256];
	int pro = gated && gate_map_fd >= 0 ? GATE_LEN : 0; /* the --gate prologue goes first */
	struct bpf_func_info fi[2] = { { 0, 4 }, { 0, 6 } }; /* bpf_btf_main_and_callback()'s ids */
	int32_t n = (int32_t)delay_ns;
	/* a call to bpf_ktime_get_ns() takes >= 4 ns on any machine we know, so
	 * N/4 iterations reach N; the bound only stops a clock that stood still */
	int64_t bound = (int64_t)delay_ns / 4;
	int btf_fd = -1, nfi = 0, cnt, fd, e;

	vlog[0] = '\0';
	if (loop == LOOP_BPF_LOOP) {
		cnt = build_bpf_loop(insns + pro, map_fd, n, &fi[1].insn_off);
		fi[1].insn_off += (uint32_t)pro;
		btf_fd = bpf_btf_main_and_callback("xskamp_delay", "xskamp_wait");
		if (btf_fd < 0) {
			e = errno;
			snprintf(why, whylen, "its callback needs BTF and BPF_BTF_LOAD failed: %s", strerror(e));
			errno = e;
			return -1;
		}
		nfi = 2;
	} else {
		bound = bound < BOUNDED_MIN ? BOUNDED_MIN : bound > BOUNDED_MAX ? BOUNDED_MAX : bound;
		cnt = build_bounded(insns + pro, map_fd, n, (int32_t)bound);
	}
	if (pro)
		emit_gate(insns, gate_map_fd, gate_nr);
	cnt += pro;
	fd = bpf_prog_load_log(opt.try_prog ? BPF_PROG_TYPE_SOCKET_FILTER : BPF_PROG_TYPE_KPROBE, insns, (uint32_t)cnt, "xskamp_delay", running_kernel_version(),
			       btf_fd, fi, (uint32_t)nfi, vlog, sizeof(vlog));
	e = errno;
	if (btf_fd >= 0)
		close(btf_fd); /* a loaded program keeps its own reference */
	if (fd < 0) {
		const char *tail = log_tail(vlog, 1);

		snprintf(why, whylen, "%s%s%s", strerror(e), *tail ? ": " : "", tail);
	}
	errno = e;
	return fd;
}

/* The delay program waiting delay_ns, behind the --gate prologue if gated.  The
 * gate and the waited map are made once and shared by both programs. */
static int load_delay_prog(uint64_t delay_ns, bool gated)
{
	char why[2][512];
	int tries[2], ntries = 0, fd = -1;

	if (opt.gate[0] && gate_map_fd < 0) {
		gate_nr = cpus[ncpus - 1] + 1;	/* CPU ids index the map */
		gate_map_fd = bpf_map_create_sized(BPF_MAP_TYPE_ARRAY, sizeof(uint64_t), (uint32_t)gate_nr,
						   "xskamp_gate");
		if (gate_map_fd < 0) {
			fprintf(stderr, "xskamp: cannot create the --gate map: %s\n", strerror(errno));
			exit(errno == ENOMEM ? 3 : 2);
		}
		gate_prog[0] = load_gate_prog(1);
		gate_prog[1] = load_gate_prog(0);
	}

	if (map_fd < 0)
		map_fd = bpf_map_create_sized(BPF_MAP_TYPE_PERCPU_ARRAY, sizeof(struct waited), 1, "xskamp_waited");
	if (map_fd < 0) {
		int e = errno;

		fprintf(stderr, "xskamp: cannot create the BPF map: %s%s\n", strerror(e),
			e == ENOSYS ? " (no bpf(2): the kernel needs CONFIG_BPF_SYSCALL=y)"
			: e == EPERM ? " (needs root, or CAP_BPF and CAP_PERFMON)" : "");
		exit(e == ENOMEM ? 3 : 2);
	}
	if (opt.loop != LOOP_BOUNDED)
		tries[ntries++] = LOOP_BPF_LOOP;
	if (opt.loop != LOOP_BPF_LOOP)
		tries[ntries++] = LOOP_BOUNDED;
	for (int t = 0; t < ntries; t++) {
		fd = try_load(tries[t], delay_ns, gated, why[t], sizeof(why[t]));
		if (fd >= 0) {
			loop_used = tries[t];
			if (t > 0) /* said, because the bounded loop caps the delay */
				fprintf(stderr, "xskamp: bpf_loop() refused (%s); using the bounded loop\n", why[0]);
			return fd;
		}
		if (errno == EPERM) {
			fprintf(stderr, "xskamp: loading the delay program: not permitted "
					"(needs root, or CAP_BPF and CAP_PERFMON)\n");
			exit(2);
		}
	}
	if (errno == EINVAL && vlog[0] == '\0' && tries[ntries - 1] == LOOP_BOUNDED) {
		fprintf(stderr, "xskamp: the kernel refuses kprobe BPF programs (EINVAL, no verifier log): "
				"it needs CONFIG_BPF_EVENTS=y\n");
	} else {
		if (ntries > 1)
			fprintf(stderr, "xskamp: bpf_loop() refused: %s\n", why[0]);
		fprintf(stderr, "xskamp: the kernel refused the %s delay program (%s)", loop_name[tries[ntries - 1]],
			why[ntries - 1]);
		if (vlog[0])
			fprintf(stderr, "; verifier log tail%s:\n%s", strlen(vlog) >= sizeof(vlog) - 1 ? " (log truncated)" : "",
				log_tail(vlog, 30));
		fprintf(stderr, "\n");
	}
	exit(2);
}

/* ------------------------------------------------------------------ */
/* probes                                                              */

static int sys_perf_event_open(struct perf_event_attr *a, int cpu)
{
	return (int)syscall(__NR_perf_event_open, a, -1, cpu, -1, PERF_FLAG_FD_CLOEXEC);
}

/* 1: SYM is a text symbol in /proc/kallsyms, 0: it is not, -1: unknown.
 * *size gets its size where the addresses are visible (else 0). */
static int kallsyms_find(const char *sym, uint64_t *size)
{
	FILE *f = fopen("/proc/kallsyms", "re");
	char line[512], name[256], type;
	unsigned long long addr, want = 0;
	int found = 0;

	*size = 0;
	if (!f)
		return -1;
	while (fgets(line, sizeof(line), f)) {
		if (sscanf(line, "%llx %c %255s", &addr, &type, name) != 3)
			continue;
		if (found == 1 && addr > want) {
			*size = want ? addr - want : 0;
			break;
		}
		if (!found && (type == 't' || type == 'T') && strcmp(name, sym) == 0) {
			found = 1;
			want = addr;
		}
	}
	fclose(f);
	return found;
}

static void die_probe(const struct probe *p, int e)
{
	uint64_t size = 0;
	int known = (e == ENOENT || e == EINVAL || e == EILSEQ) ? kallsyms_find(p->sym, &size) : -1;

	fprintf(stderr, "xskamp: the kernel refused the kprobe %s: ", p->name);
	if (e == EILSEQ)
		fprintf(stderr, "0x%" PRIx64 " is not an instruction boundary in %s (EILSEQ); "
				"take an offset where an instruction starts in its disassembly\n", p->off, p->sym);
	else if (e == ENOENT || known == 0)
		fprintf(stderr, "no such symbol %s in this kernel (%s)\n", p->sym,
			known == 0 ? "not a text symbol in /proc/kallsyms" : "ENOENT");
	else if (e == EINVAL && size && p->off >= size)
		fprintf(stderr, "offset 0x%" PRIx64 " is past the end of %s, which is 0x%" PRIx64 " bytes "
				"(EINVAL)\n", p->off, p->sym, size);
	else if (e == EINVAL)
		fprintf(stderr, "EINVAL: not an instruction boundary, outside %s, or %s cannot be probed "
				"(notrace, or in /sys/kernel/debug/kprobes/blacklist)\n", p->sym, p->sym);
	else if (e == EACCES || e == EPERM)
		fprintf(stderr, "not permitted (needs root, or CAP_PERFMON; see kernel.perf_event_paranoid)\n");
	else
		fprintf(stderr, "%s\n", strerror(e));
}

static void close_probes(void)
{
	for (int g = 0; g < 2; g++)
		if (gate_evt[g] >= 0) {
			close(gate_evt[g]);
			gate_evt[g] = -1;
		}
	for (int i = 0; i < opt.nprobes; i++)
		for (int c = 0; c < ncpus; c++)
			if (opt.probes[i].fd[c] >= 0) {
				close(opt.probes[i].fd[c]);
				opt.probes[i].fd[c] = -1;
			}
}

static void cleanup(void)
{
	close_probes();
	opt_restore();
}

static int place_probes(uint32_t pmu_type)
{
	for (int i = 0; i < opt.nprobes; i++) {
		struct probe *p = &opt.probes[i];

		for (int c = 0; c < ncpus; c++) {
			struct perf_event_attr a;

			memset(&a, 0, sizeof(a));
			a.size = sizeof(a);
			a.type = pmu_type;
			a.config = 0; /* not a kretprobe */
			a.config1 = (uint64_t)(uintptr_t)p->sym;
			a.config2 = p->off;
			a.disabled = 1;
			p->fd[c] = sys_perf_event_open(&a, cpus[c]);
			if (p->fd[c] < 0) {
				int e = errno;

				die_probe(p, e);
				return e == ENOMEM || e == EMFILE ? 3 : 2;
			}
		}
		int pfd = p->hold ? hold_fd : prog_fd;

		if (pfd >= 0 && ioctl(p->fd[0], PERF_EVENT_IOC_SET_BPF, pfd) != 0) {
			int e = errno;

			fprintf(stderr, "xskamp: attaching the delay program to %s: %s%s\n", p->name, strerror(e),
				e == EOPNOTSUPP || e == EINVAL || e == ENOTTY
				? " (the kernel needs CONFIG_BPF_EVENTS=y)" : "");
			return 2;
		}
	}
	if (gate_map_fd >= 0) {
		/* one entry probe and one kretprobe on the gate function: a kprobe's
		 * program runs on whichever CPU hits it (see the delay program) */
		struct probe g = { .off = 0 };

		snprintf(g.sym, sizeof(g.sym), "%s", opt.gate);
		snprintf(g.name, sizeof(g.name), "%s (--gate)", opt.gate);
		for (int k = 0; k < 2; k++) {
			struct perf_event_attr a;

			memset(&a, 0, sizeof(a));
			a.size = sizeof(a);
			a.type = pmu_type;
			a.config = (uint64_t)k; /* bit 0 of the kprobe PMU's config: retprobe */
			a.config1 = (uint64_t)(uintptr_t)g.sym;
			a.disabled = 1;
			gate_evt[k] = sys_perf_event_open(&a, cpus[0]);
			if (gate_evt[k] < 0) {
				int e = errno;

				die_probe(&g, e);
				return e == ENOMEM || e == EMFILE ? 3 : 2;
			}
			if (ioctl(gate_evt[k], PERF_EVENT_IOC_SET_BPF, gate_prog[k]) != 0 ||
			    ioctl(gate_evt[k], PERF_EVENT_IOC_ENABLE, 0) != 0) {
				fprintf(stderr, "xskamp: attaching the --gate program to %s%s: %s\n", opt.gate,
					k ? " (return)" : "", strerror(errno));
				return 2;
			}
		}
	}
	for (int i = 0; i < opt.nprobes; i++)
		for (int c = 0; c < ncpus; c++)
			if (ioctl(opt.probes[i].fd[c], PERF_EVENT_IOC_ENABLE, 0) != 0) {
				fprintf(stderr, "xskamp: enabling %s on CPU %d: %s\n", opt.probes[i].name, cpus[c],
					strerror(errno));
				return 3;
			}
	return 0;
}

/* ------------------------------------------------------------------ */
/* output                                                              */

static uint64_t t_ready;

struct hits {
	uint64_t cpu[MAX_CPUS]; /* per cpus[] entry, all probes summed */
	uint64_t probe[MAX_PROBES];
	uint64_t total;
};

/* read() of a counting perf event gives its count: the probe's hits on its CPU. */
static void read_hits(struct hits *h)
{
	memset(h, 0, sizeof(*h));
	for (int i = 0; i < opt.nprobes; i++)
		for (int c = 0; c < ncpus; c++) {
			uint64_t v = 0;

			if (opt.probes[i].fd[c] >= 0 && read(opt.probes[i].fd[c], &v, sizeof(v)) == sizeof(v)) {
				h->cpu[c] += v;
				h->probe[i] += v;
				h->total += v;
			}
		}
}

static void print_hits(const char *type, const struct hits *h, const char *extra)
{
	printf("{\"type\":\"%s\",\"t\":%.3f,\"hits\":[", type, (double)(now_ns() - t_ready) / 1e9);
	for (int c = 0; c < ncpus; c++)
		printf("%s%" PRIu64, c ? "," : "", h->cpu[c]);
	printf("],\"hits_total\":%" PRIu64 ",\"by_probe\":[", h->total);
	for (int i = 0; i < opt.nprobes; i++)
		printf("%s{\"probe\":\"%s\",\"hits_total\":%" PRIu64 ",\"hold\":%s}", i ? "," : "",
		       opt.probes[i].name, h->probe[i], opt.probes[i].hold ? "true" : "false");
	printf("]%s}\n", extra ? extra : "");
	fflush(stdout);
}

static int possible_cpus(void)
{
	char buf[4096];
	static int list[MAX_CPUS * 4];
	int n;

	if (read_file("/sys/devices/system/cpu/possible", buf, sizeof(buf)) != 0)
		return -1;
	n = parse_cpu_list(buf, list, MAX_CPUS * 4);
	return n;
}

/* The delay program's totals over every CPU, into extra (a JSON tail). */
static void waited_json(char *extra, size_t len, const char *reason)
{
	uint64_t ns = 0, runs = 0, capped = 0, max = 0, under = 0;
	int np = possible_cpus();
	struct waited *w;

	if (map_fd >= 0 && np > 0 && (w = calloc((size_t)np, sizeof(*w))) != NULL) {
		if (bpf_map_lookup(map_fd, 0, w) == 0)
			for (int i = 0; i < np; i++) {
				ns += w[i].ns;
				runs += w[i].runs;
				capped += w[i].capped;
				under += w[i].under_2n;
				if (w[i].max > max)
					max = w[i].max;
			}
		else
			fprintf(stderr, "xskamp: reading the waited-ns map: %s\n", strerror(errno));
		free(w);
	}
	snprintf(extra, len,
		 ",\"reason\":\"%s\",\"runs\":%" PRIu64 ",\"waited_ns_total\":%" PRIu64
		 ",\"waited_ns_avg\":%.1f,\"waited_ns_max\":%" PRIu64 ",\"waited_under_2n\":%" PRIu64
		 ",\"capped\":%" PRIu64 ",\"optimisation_restored\":%s",
		 reason, runs, ns, runs ? (double)ns / (double)runs : 0.0, max, under, capped,
		 !opt_touched ? "null" : opt_restored ? "true" : "false");
}

/* --try-prog: the same instructions as a socket filter (its helpers are the
 * same base set), run by the kernel on a dummy packet: proves the verifier
 * takes both loops and shows the delay they give, where no kprobe can be
 * placed (the host of the lab's tests). */
static int try_prog(void)
{
	static uint8_t pkt[64];
	union bpf_attr a;
	char extra[512];
	uint64_t t;

	prog_fd = load_delay_prog(opt.delay_ns, true);
	memset(&a, 0, sizeof(a));
	a.test.prog_fd = (uint32_t)prog_fd;
	a.test.data_in = (uint64_t)(uintptr_t)pkt;
	a.test.data_size_in = sizeof(pkt);
	a.test.repeat = opt.try_prog;
	t_ready = now_ns();
	printf("{\"type\":\"ready\",\"t\":0.0,\"probes\":[],\"method\":\"try-prog\",\"delay_ns\":%" PRIu64
	       ",\"loop\":\"%s\",\"optimisation_was\":null,\"pid\":%d}\n", opt.delay_ns, loop_name[loop_used],
	       (int)getpid());
	fflush(stdout);
	if (sys_bpf(BPF_PROG_TEST_RUN, &a) != 0) {
		fprintf(stderr, "xskamp: BPF_PROG_TEST_RUN: %s\n", strerror(errno));
		return 3;
	}
	t = now_ns() - t_ready;
	waited_json(extra, sizeof(extra), "try-prog");
	printf("{\"type\":\"done\",\"t\":%.3f,\"retval\":%u,\"run_ns_avg\":%.1f%s}\n", (double)t / 1e9,
	       a.test.retval, (double)t / opt.try_prog, extra);
	return a.test.retval == 1 ? 0 : 3;
}

/* ------------------------------------------------------------------ */

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "probe", required_argument, 0, 'p' },	   { "delay-ns", required_argument, 0, 'n' },
		{ "stats-ms", required_argument, 0, 's' }, { "duration", required_argument, 0, 't' },
		{ "loop", required_argument, 0, 'l' },	   { "try-prog", required_argument, 0, 'T' },
		{ "gate", required_argument, 0, 'g' },	   { "help", no_argument, 0, 'h' },
		{ "hold", required_argument, 0, 'H' },	   { "hold-ns", required_argument, 0, 'N' },
		{ 0, 0, 0, 0 },
	};
	char buf[64], extra[512], *end;
	const char *reason = "signal";
	sigset_t sigs;
	uint32_t pmu_type;
	static struct hits h;
	uint64_t next;
	int c, rc;

	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'p':
			if (opt.nprobes >= MAX_PROBES)
				die_usage("too many --probe (at most 16)", optarg);
			if (parse_probe(optarg, &opt.probes[opt.nprobes]) != 0)
				die_usage("bad --probe (SYM+OFF, OFF decimal or 0x hex, e.g. __xsk_rcv_zc+0x7a)", optarg);
			opt.nprobes++;
			break;
		case 'H':
			if (opt.nprobes >= MAX_PROBES)
				die_usage("too many --probe and --hold (at most 16)", optarg);
			if (parse_probe(optarg, &opt.probes[opt.nprobes]) != 0)
				die_usage("bad --hold (SYM+OFF, OFF decimal or 0x hex, e.g. xdp_do_flush)", optarg);
			opt.probes[opt.nprobes++].hold = true;
			break;
		case 'N': opt.hold_ns = parse_ns(optarg, 1, "bad --hold-ns (1..1000000)"); break;
		case 'n': opt.delay_ns = parse_ns(optarg, 0, "bad --delay-ns (0..1000000)"); break;
		case 's':
			opt.stats_ms = (int)strtol(optarg, &end, 10);
			if (*end || end == optarg || opt.stats_ms < 10 || opt.stats_ms > 3600000)
				die_usage("bad --stats-ms (10..3600000)", optarg);
			break;
		case 't':
			opt.duration = strtod(optarg, &end);
			if (*end || end == optarg || !(opt.duration >= 0))
				die_usage("bad --duration (seconds, >= 0)", optarg);
			break;
		case 'l':
			for (opt.loop = 0; opt.loop < 3 && strcmp(optarg, loop_name[opt.loop]) != 0; opt.loop++)
				;
			if (opt.loop == 3)
				die_usage("bad --loop (auto, bpf_loop or bounded)", optarg);
			break;
		case 'T': {
			long v = strtol(optarg, &end, 10);

			if (*end || end == optarg || v < 1 || v > 1000000)
				die_usage("bad --try-prog (1..1000000 runs)", optarg);
			opt.try_prog = (uint32_t)v;
			break;
		}
		case 'g':
			if (!*optarg || strlen(optarg) >= MAX_SYM ||
			    strspn(optarg, "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_.") != strlen(optarg))
				die_usage("bad --gate (a function name, e.g. veth_poll)", optarg);
			snprintf(opt.gate, sizeof(opt.gate), "%s", optarg);
			break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc)
		die_usage("unexpected argument", argv[optind]);
	if (opt.try_prog) {
		if (opt.nprobes || opt.delay_ns == 0)
			die_usage("--try-prog takes --delay-ns N > 0 and no --probe", NULL);
		return try_prog();
	}
	if (opt.nprobes == 0)
		die_usage("at least one --probe SYM+OFF is needed", NULL);
	if (opt.gate[0] && opt.delay_ns == 0)
		die_usage("--gate needs --delay-ns N > 0 (it gates the delay)", opt.gate);
	for (int i = 0; i < opt.nprobes; i++)
		for (int j = 0; j < i; j++)
			if (strcmp(opt.probes[i].sym, opt.probes[j].sym) == 0 && opt.probes[i].off == opt.probes[j].off)
				die_usage("the same --probe twice", opt.probes[i].name);

	/* Signals are taken synchronously (sigtimedwait), so a SIGTERM at any
	 * point, setup included, ends in the one cleanup path. */
	sigemptyset(&sigs);
	sigaddset(&sigs, SIGTERM);
	sigaddset(&sigs, SIGINT);
	sigaddset(&sigs, SIGHUP);
	sigaddset(&sigs, SIGPIPE);
	sigprocmask(SIG_BLOCK, &sigs, NULL);

	if (read_file(KPROBE_PMU, buf, sizeof(buf)) != 0) {
		fprintf(stderr, "xskamp: no kprobe PMU (%s: %s): the kernel needs CONFIG_KPROBES=y, "
				"CONFIG_KPROBE_EVENTS=y and CONFIG_PERF_EVENTS=y (Linux >= 4.17)\n",
			KPROBE_PMU, strerror(errno));
		return 2;
	}
	pmu_type = (uint32_t)strtoul(buf, NULL, 10);
	{
		static char online[4096];

		if (read_file("/sys/devices/system/cpu/online", online, sizeof(online)) != 0 ||
		    (ncpus = parse_cpu_list(online, cpus, MAX_CPUS)) <= 0) {
			fprintf(stderr, "xskamp: cannot read the online CPUs from /sys/devices/system/cpu/online\n");
			return 3;
		}
	}
	{
		bool window = false, hold = false;

		for (int i = 0; i < opt.nprobes; i++)
			*(opt.probes[i].hold ? &hold : &window) = true;
		if (opt.delay_ns > 0 && window)
			prog_fd = load_delay_prog(opt.delay_ns, true);
		if (hold && (opt.hold_ns ? opt.hold_ns : opt.delay_ns) > 0)
			hold_fd = load_delay_prog(opt.hold_ns ? opt.hold_ns : opt.delay_ns, false);
	}

	opt_disable();
	rc = place_probes(pmu_type);
	if (rc != 0) {
		cleanup();
		return rc;
	}

	t_ready = now_ns();
	printf("{\"type\":\"ready\",\"t\":0.0,\"probes\":[");
	for (int i = 0; i < opt.nprobes; i++)
		printf("%s{\"probe\":\"%s\",\"cpus\":%d,\"hold\":%s}", i ? "," : "", opt.probes[i].name, ncpus,
		       opt.probes[i].hold ? "true" : "false");
	printf("],\"cpu_list\":[");
	for (int i = 0; i < ncpus; i++)
		printf("%s%d", i ? "," : "", cpus[i]);
	printf("],\"method\":\"%s\",\"delay_ns\":%" PRIu64 ",\"hold_ns\":%" PRIu64 ",\"loop\":",
	       prog_fd >= 0 || hold_fd >= 0 ? "kprobe-delay" : "kprobe", opt.delay_ns,
	       hold_fd >= 0 ? (opt.hold_ns ? opt.hold_ns : opt.delay_ns) : 0);
	if (loop_used >= 0)
		printf("\"%s\"", loop_name[loop_used]);
	else
		printf("null");
	if (opt.gate[0])
		printf(",\"gate\":\"%s\"", opt.gate);
	else
		printf(",\"gate\":null");
	if (opt_touched)
		printf(",\"optimisation_was\":\"%s\"", opt_old);
	else
		printf(",\"optimisation_was\":null");
	printf(",\"pid\":%d}\n", (int)getpid());
	fflush(stdout);

	next = t_ready + (uint64_t)opt.stats_ms * 1000000ull;
	for (;;) {
		uint64_t now = now_ns(), until = next;
		uint64_t end_at = opt.duration > 0 ? t_ready + (uint64_t)(opt.duration * 1e9) : 0;
		struct timespec ts;
		int sig;

		if (end_at && end_at < until)
			until = end_at;
		if (now < until) {
			ts.tv_sec = (time_t)((until - now) / 1000000000ull);
			ts.tv_nsec = (long)((until - now) % 1000000000ull);
			sig = sigtimedwait(&sigs, NULL, &ts);
			if (sig > 0) {
				reason = sig == SIGPIPE ? "stdout closed" : "signal";
				break;
			}
			continue; /* timeout or EINTR: check the clock again */
		}
		if (end_at && now >= end_at) {
			reason = "duration";
			break;
		}
		read_hits(&h);
		print_hits("stats", &h, NULL);
		next += (uint64_t)opt.stats_ms * 1000000ull;
		if (next < now)
			next = now + (uint64_t)opt.stats_ms * 1000000ull;
	}

	/* The counts first, then the probes go, then the sysctl comes back; the
	 * done line comes last, so it can say the sysctl was restored. */
	read_hits(&h);
	cleanup();
	waited_json(extra, sizeof(extra), reason);
	print_hits("done", &h, extra);
	return 0;
}

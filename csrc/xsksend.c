// SPDX-License-Identifier: GPL-2.0-only
/* xsksend: the racelab packet sender.
 *
 * Forks N sender processes, each pinned to one CPU, each with a raw
 * AF_PACKET socket on --dev sending sendmmsg() bursts of UDP/IPv4 frames
 * that carry the racelab payload (common.h).  Sender i sends flow
 * flow_base + i with seq 1, 2, 3, ...
 *
 * Why processes pinned to CPUs: the generic-receive race needs two CPUs
 * running the receive path of one socket at once, and for veth that path
 * runs in the softirq of the sending CPU.
 *
 * Why PACKET_QDISC_BYPASS: it is faster, and the tx queue (so the peer's rx
 * queue) then follows the sending CPU, which spreads senders over queues.
 *
 * Output (stdout, JSON lines): ready, stats every --stats-ms, done.  stats
 * and done carry sent, enobufs (back-pressure: ENOBUFS, EAGAIN or ENOMEM,
 * which a veth gives whenever its peer's backlog is full; the unsent frames
 * are a sequence gap, which the checker allows) and errors (every other send
 * error; error names the last one).  A reader must treat errors > 0 as a
 * load that did not run as asked.
 * Exit: 0 ok, 2 bad arguments, 3 runtime failure (a sender that cannot be
 * pinned to its CPU is one: see sender_main()).
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <getopt.h>
#include <linux/if_packet.h>
#include <net/ethernet.h>
#include <net/if.h>
#include <sched.h>
#include <signal.h>
#include <stdbool.h>
#include <stdio.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/prctl.h>
#include <sys/socket.h>
#include <sys/wait.h>
#include <unistd.h>

#include "common.h"

#define MAX_SENDERS 256
#define MAX_BURST 1024
#define INJECT_EVERY 1000 /* packets between injected faults */
#define INJECT_TIMES 5	  /* injection points... */
#define INJECT_RUN 4	  /* ...of this many faulty packets each: a drop must not hide them all */

struct counters {
	volatile uint64_t sent;
	volatile uint64_t enobufs; /* back-pressure (ENOBUFS, EAGAIN, ENOMEM): normal on veth */
	volatile uint64_t errors;  /* any other send error: the load did not run as asked */
	volatile int failed;	   /* errno of a fatal error, or 0 */
	volatile int last_errno;   /* errno of the last counted error */
	char pad[64 - 3 * 8 - 2 * 4];
};

static struct {
	const char *dev;
	uint8_t dst_mac[6];
	uint32_t src_ip, dst_ip; /* network order */
	int senders;
	int cpus[MAX_SENDERS];
	int ncpus;
	int burst;
	uint64_t gap_ns;
	int size;
	double duration;
	double rate;
	uint32_t flow_base;
	uint64_t seed;
	int inject; /* 0 none, 1 sequence, 2 checksum */
	int stats_ms;
} opt = {
	.senders = 1, .burst = 32, .size = 64, .stats_ms = 1000, .seed = 1,
};

static volatile sig_atomic_t stop_flag;

static void on_signal(int sig)
{
	(void)sig;
	stop_flag = 1;
}

static void usage(FILE *f)
{
	fprintf(f,
		"usage: xsksend --dev IF --dst-mac MAC --src-ip A --dst-ip B [--senders N]\n"
		"               [--cpus LIST] [--burst 32] [--gap-ns 0] [--size 64..1514]\n"
		"               [--duration SEC (0 = until SIGTERM/SIGINT)] [--rate PPS (total, 0 = max)]\n"
		"               [--flow-base 0] [--seed N] [--inject sequence|checksum] [--stats-ms 1000]\n");
}

static void die_usage(const char *msg, const char *arg)
{
	fprintf(stderr, "xsksend: %s%s%s\n", msg, arg ? ": " : "", arg ? arg : "");
	usage(stderr);
	exit(2);
}

static long parse_long(const char *s, const char *name, long lo, long hi)
{
	return parse_long_opt("xsksend", s, name, lo, hi);
}

static double parse_double(const char *s, const char *name)
{
	char *end;
	double v;

	errno = 0;
	v = strtod(s, &end);
	if (errno || *end || end == s || v < 0) {
		fprintf(stderr, "xsksend: --%s must be a number >= 0, got '%s'\n", name, s);
		exit(2);
	}
	return v;
}

static uint16_t ip_csum(const void *hdr, int len)
{
	const uint16_t *p = hdr;
	uint32_t sum = 0;

	for (int i = 0; i < len / 2; i++)
		sum += p[i];
	while (sum >> 16)
		sum = (sum & 0xffff) + (sum >> 16);
	return (uint16_t)~sum;
}

static void build_headers(uint8_t *f, const uint8_t *src_mac, uint32_t flow)
{
	uint8_t *ip = f + ETH_HLEN_, *udp = ip + IP_HLEN_;
	uint16_t v16;

	memcpy(f, opt.dst_mac, 6);
	memcpy(f + 6, src_mac, 6);
	f[12] = 0x08;
	f[13] = 0x00;
	memset(ip, 0, IP_HLEN_);
	ip[0] = 0x45;
	v16 = htons((uint16_t)(opt.size - ETH_HLEN_));
	memcpy(ip + 2, &v16, 2);
	ip[6] = 0x40; /* DF */
	ip[8] = 64;
	ip[9] = 17;
	memcpy(ip + 12, &opt.src_ip, 4);
	memcpy(ip + 16, &opt.dst_ip, 4);
	v16 = ip_csum(ip, IP_HLEN_);
	memcpy(ip + 10, &v16, 2);
	v16 = htons((uint16_t)(UDP_PORT_BASE + (flow & 0xff)));
	memcpy(udp, &v16, 2);
	v16 = htons(UDP_DPORT);
	memcpy(udp + 2, &v16, 2);
	v16 = htons((uint16_t)(opt.size - ETH_HLEN_ - IP_HLEN_));
	memcpy(udp + 4, &v16, 2);
	udp[6] = udp[7] = 0; /* no UDP checksum: legal for IPv4 */
}

static void stamp(uint8_t *f, uint32_t flow, uint64_t seq, bool bad_csum)
{
	uint8_t *pl = f + HDRS_LEN;
	size_t rest = (size_t)opt.size - MIN_FRAME;
	uint32_t v32, c;
	uint64_t v64;

	v32 = htonl(RACE_MAGIC);
	memcpy(pl, &v32, 4);
	v32 = htonl(flow);
	memcpy(pl + 4, &v32, 4);
	v64 = htobe64(seq);
	memcpy(pl + 8, &v64, 8);
	payload_fill(pl + PL_HDR_LEN, rest, opt.seed, flow, seq);
	c = payload_csum(pl + PL_HDR_LEN, rest);
	if (bad_csum)
		c ^= 0x00dead00u;
	v32 = htonl(c);
	memcpy(pl + 16, &v32, 4);
}

static void busy_wait_until(uint64_t t)
{
	while (!stop_flag) {
		uint64_t n = now_ns();

		if (n >= t)
			return;
		/* nanosleep costs ~1 ms under TCG: sleep only for long waits */
		if (t - n > 3000000) {
			struct timespec ts = { 0, (long)(t - n - 2000000) };

			nanosleep(&ts, NULL);
		}
	}
}

static int sender_main(int idx, struct counters *ctr, const uint8_t *src_mac, int ifindex, pid_t parent)
{
	uint32_t flow = opt.flow_base + (uint32_t)idx;
	static uint8_t bufs[MAX_BURST][1536];
	struct mmsghdr msgs[MAX_BURST];
	struct iovec iov[MAX_BURST];
	struct sockaddr_ll sll = { 0 };
	uint64_t seq = 1, deadline = 0, start, sent = 0, inj_next = INJECT_EVERY;
	int inj_left = (opt.inject && idx == 0) ? INJECT_TIMES * INJECT_RUN : 0;
	double rate = opt.rate / opt.senders;
	int fd, one = 1;

	prctl(PR_SET_PDEATHSIG, SIGTERM);
	if (getppid() != parent)
		return 0;
	if (opt.ncpus > 0 || opt.senders > 0) {
		long ncpu = sysconf(_SC_NPROCESSORS_ONLN);
		int cpu = opt.ncpus ? opt.cpus[idx % opt.ncpus] : (int)(idx % (ncpu > 0 ? ncpu : 1));
		cpu_set_t set;

		CPU_ZERO(&set);
		CPU_SET(cpu, &set);
		/* Fatal, not a warning: an unpinned sender migrates between CPUs, so
		 * its own flow can be received out of order (a false "sequence"
		 * violation), and the races need senders on distinct CPUs. */
		if (sched_setaffinity(0, sizeof(set), &set)) {
			fprintf(stderr, "xsksend[%d]: cannot pin to cpu %d: %s (is it online and in this "
				"process's cpuset?)\n", idx, cpu, strerror(errno));
			ctr->failed = errno;
			return 3;
		}
	}
	fd = socket(AF_PACKET, SOCK_RAW, 0); /* protocol 0: never receives */
	if (fd < 0) {
		ctr->failed = errno;
		return 3;
	}
	sll.sll_family = AF_PACKET;
	sll.sll_ifindex = ifindex;
	if (bind(fd, (struct sockaddr *)&sll, sizeof(sll))) {
		ctr->failed = errno;
		return 3;
	}
	if (setsockopt(fd, SOL_PACKET, PACKET_QDISC_BYPASS, &one, sizeof(one)))
		fprintf(stderr, "xsksend[%d]: PACKET_QDISC_BYPASS: %s (continuing)\n", idx, strerror(errno));

	for (int i = 0; i < opt.burst; i++) {
		build_headers(bufs[i], src_mac, flow);
		iov[i].iov_base = bufs[i];
		iov[i].iov_len = (size_t)opt.size;
		memset(&msgs[i], 0, sizeof(msgs[i]));
		msgs[i].msg_hdr.msg_iov = &iov[i];
		msgs[i].msg_hdr.msg_iovlen = 1;
	}
	start = now_ns();
	if (opt.duration > 0)
		deadline = start + (uint64_t)(opt.duration * 1e9);

	while (!stop_flag) {
		int n = opt.burst, done = 0;

		if (deadline && now_ns() >= deadline)
			break;
		if (rate > 0)
			busy_wait_until(start + (uint64_t)((double)sent * 1e9 / rate));
		for (int i = 0; i < n; i++) {
			bool bad = false;
			uint64_t s = seq++;

			if (inj_left && sent + (uint64_t)i >= inj_next) {
				if (opt.inject == 1)
					s = 1; /* a seq this flow already used */
				else
					bad = true;
				if (--inj_left % INJECT_RUN == 0)
					inj_next += INJECT_EVERY;
			}
			stamp(bufs[i], flow, s, bad);
		}
		while (done < n && !stop_flag) {
			int r = sendmmsg(fd, msgs + done, (unsigned)(n - done), 0);

			if (r < 0) {
				if (errno == ENOBUFS || errno == EAGAIN || errno == ENOMEM) {
					ctr->enobufs++;
					/* the unsent frames' seqs become a gap: allowed */
					break;
				}
				if (errno == EINTR)
					continue;
				ctr->errors++;
				ctr->last_errno = errno;
				if (errno == ENETDOWN || errno == ENXIO || errno == ENODEV) {
					ctr->failed = errno;
					return 3;
				}
				break;
			}
			done += r;
		}
		sent += (uint64_t)n; /* pacing counts attempts, not successes */
		ctr->sent += (uint64_t)done;
		if (opt.gap_ns) {
			uint64_t t = now_ns() + opt.gap_ns;

			while (now_ns() < t && !stop_flag)
				__builtin_ia32_pause();
		}
	}
	close(fd);
	return 0;
}

static int parse_mac(const char *s, uint8_t *mac)
{
	unsigned v[6];
	char extra;

	if (sscanf(s, "%x:%x:%x:%x:%x:%x%c", &v[0], &v[1], &v[2], &v[3], &v[4], &v[5], &extra) != 6)
		return -1;
	for (int i = 0; i < 6; i++) {
		if (v[i] > 255)
			return -1;
		mac[i] = (uint8_t)v[i];
	}
	return 0;
}

static void print_stats(const char *type, uint64_t t0, struct counters *ctr, bool per_sender)
{
	uint64_t sent = 0, enobufs = 0, errors = 0;
	double t = (double)(now_ns() - t0) / 1e9;
	int last = 0;

	for (int i = 0; i < opt.senders; i++) {
		sent += ctr[i].sent;
		enobufs += ctr[i].enobufs;
		errors += ctr[i].errors;
		if (ctr[i].last_errno)
			last = ctr[i].last_errno;
		if (ctr[i].failed)
			last = ctr[i].failed;
	}
	printf("{\"type\":\"%s\",\"t\":%.3f,\"sent\":%llu,\"enobufs\":%llu,\"errors\":%llu,\"pps\":%.0f", type, t,
	       (unsigned long long)sent, (unsigned long long)enobufs, (unsigned long long)errors,
	       t > 0 ? (double)sent / t : 0.0);
	if (last)
		printf(",\"error\":\"%s\"", strerror(last));
	if (per_sender) {
		printf(",\"per_sender\":[");
		for (int i = 0; i < opt.senders; i++)
			printf("%s%llu", i ? "," : "", (unsigned long long)ctr[i].sent);
		printf("]");
	}
	printf("}\n");
	fflush(stdout);
}

int main(int argc, char **argv)
{
	static const struct option longopts[] = {
		{ "dev", required_argument, 0, 'd' },	   { "dst-mac", required_argument, 0, 'm' },
		{ "src-ip", required_argument, 0, 's' },   { "dst-ip", required_argument, 0, 'D' },
		{ "senders", required_argument, 0, 'n' },  { "cpus", required_argument, 0, 'c' },
		{ "burst", required_argument, 0, 'b' },	   { "gap-ns", required_argument, 0, 'g' },
		{ "size", required_argument, 0, 'z' },	   { "duration", required_argument, 0, 't' },
		{ "rate", required_argument, 0, 'r' },	   { "flow-base", required_argument, 0, 'f' },
		{ "seed", required_argument, 0, 'S' },	   { "inject", required_argument, 0, 'i' },
		{ "stats-ms", required_argument, 0, 'T' }, { "help", no_argument, 0, 'h' },
		{ 0, 0, 0, 0 },
	};
	bool have_mac = false, have_src = false, have_dst = false;
	struct counters *ctr;
	uint8_t src_mac[6];
	pid_t pids[MAX_SENDERS], self = getpid();
	struct sigaction sa = { 0 };
	struct ifreq ifr = { 0 };
	uint64_t t0, next_stats, deadline = 0;
	int c, ifindex, fd, alive, rc = 0;

	while ((c = getopt_long(argc, argv, "", longopts, NULL)) != -1) {
		switch (c) {
		case 'd': opt.dev = optarg; break;
		case 'm':
			if (parse_mac(optarg, opt.dst_mac))
				die_usage("bad --dst-mac", optarg);
			have_mac = true;
			break;
		case 's':
			if (inet_pton(AF_INET, optarg, &opt.src_ip) != 1)
				die_usage("bad --src-ip", optarg);
			have_src = true;
			break;
		case 'D':
			if (inet_pton(AF_INET, optarg, &opt.dst_ip) != 1)
				die_usage("bad --dst-ip", optarg);
			have_dst = true;
			break;
		case 'n': opt.senders = (int)parse_long(optarg, "senders", 1, MAX_SENDERS); break;
		case 'c':
			opt.ncpus = parse_cpu_list(optarg, opt.cpus, MAX_SENDERS);
			if (opt.ncpus <= 0)
				die_usage("bad --cpus list", optarg);
			break;
		case 'b': opt.burst = (int)parse_long(optarg, "burst", 1, MAX_BURST); break;
		case 'g': opt.gap_ns = (uint64_t)parse_long(optarg, "gap-ns", 0, 10000000000L); break;
		case 'z': opt.size = (int)parse_long(optarg, "size", 64, 1514); break;
		case 't': opt.duration = parse_double(optarg, "duration"); break;
		case 'r': opt.rate = parse_double(optarg, "rate"); break;
		case 'f': opt.flow_base = (uint32_t)parse_long(optarg, "flow-base", 0, 0xffffffffL); break;
		case 'S': opt.seed = (uint64_t)parse_long(optarg, "seed", 0, 0x7fffffffffffffffL); break;
		case 'i':
			if (!strcmp(optarg, "sequence"))
				opt.inject = 1;
			else if (!strcmp(optarg, "checksum"))
				opt.inject = 2;
			else
				die_usage("--inject must be sequence or checksum", optarg);
			break;
		case 'T': opt.stats_ms = (int)parse_long(optarg, "stats-ms", 10, 3600000); break;
		case 'h': usage(stdout); return 0;
		default: usage(stderr); return 2;
		}
	}
	if (optind < argc)
		die_usage("unexpected argument", argv[optind]);
	if (!opt.dev || !have_mac || !have_src || !have_dst)
		die_usage("--dev, --dst-mac, --src-ip and --dst-ip are required", NULL);

	ifindex = (int)if_nametoindex(opt.dev);
	if (!ifindex) {
		fprintf(stderr, "xsksend: no such device: %s\n", opt.dev);
		return 2;
	}
	fd = socket(AF_INET, SOCK_DGRAM, 0);
	snprintf(ifr.ifr_name, IFNAMSIZ, "%s", opt.dev);
	if (fd < 0 || ioctl(fd, SIOCGIFHWADDR, &ifr)) {
		fprintf(stderr, "xsksend: cannot read the MAC of %s: %s\n", opt.dev, strerror(errno));
		return 3;
	}
	close(fd);
	memcpy(src_mac, ifr.ifr_hwaddr.sa_data, 6);

	ctr = mmap(NULL, sizeof(*ctr) * MAX_SENDERS, PROT_READ | PROT_WRITE, MAP_SHARED | MAP_ANONYMOUS, -1, 0);
	if (ctr == MAP_FAILED) {
		perror("xsksend: mmap");
		return 3;
	}
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);
	signal(SIGPIPE, SIG_IGN);

	for (int i = 0; i < opt.senders; i++) {
		pids[i] = fork();
		if (pids[i] < 0) {
			perror("xsksend: fork");
			stop_flag = 1;
			for (int j = 0; j < i; j++)
				kill(pids[j], SIGTERM);
			for (int j = 0; j < i; j++)
				waitpid(pids[j], NULL, 0);
			return 3;
		}
		if (pids[i] == 0)
			_exit(sender_main(i, &ctr[i], src_mac, ifindex, self));
	}
	t0 = now_ns();
	printf("{\"type\":\"ready\",\"t\":0.0,\"senders\":%d,\"size\":%d,\"burst\":%d,\"flow_base\":%u,\"pid\":%d}\n",
	       opt.senders, opt.size, opt.burst, opt.flow_base, (int)self);
	fflush(stdout);
	next_stats = t0 + (uint64_t)opt.stats_ms * 1000000ull;
	if (opt.duration > 0)
		deadline = t0 + (uint64_t)(opt.duration * 1e9);

	alive = opt.senders;
	while (alive > 0) {
		struct timespec ts = { 0, 20 * 1000000 };
		int status;
		pid_t p;

		if (stop_flag || (deadline && now_ns() >= deadline + 500000000ull)) {
			for (int i = 0; i < opt.senders; i++)
				if (pids[i] > 0)
					kill(pids[i], SIGTERM);
		}
		while ((p = waitpid(-1, &status, WNOHANG)) > 0) {
			for (int i = 0; i < opt.senders; i++) {
				if (pids[i] != p)
					continue;
				pids[i] = 0;
				alive--;
				if (!WIFEXITED(status) || WEXITSTATUS(status) != 0) {
					if (!(WIFSIGNALED(status) && WTERMSIG(status) == SIGTERM)) {
						fprintf(stderr, "xsksend: sender %d failed: %s\n", i,
							ctr[i].failed ? strerror(ctr[i].failed) : "killed");
						rc = 3;
						stop_flag = 1; /* one dead sender spoils the run */
					}
				}
			}
		}
		if (alive <= 0)
			break;
		if (now_ns() >= next_stats) {
			print_stats("stats", t0, ctr, false);
			next_stats += (uint64_t)opt.stats_ms * 1000000ull;
		}
		nanosleep(&ts, NULL);
	}
	print_stats("done", t0, ctr, true);
	return rc;
}

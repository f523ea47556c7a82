// SPDX-License-Identifier: GPL-2.0-only
/* racelab-init: PID 1 of every racelab guest (there is no systemd), installed
 * as /sbin/racelab-init (lab.image.GUEST_INIT).
 *
 * Gets the guest to "sshd is started" as fast as it can, prints the ready
 * marker that lab/vm.py waits for on the serial console, then reaps orphans
 * forever.  Everything after that happens over SSH.
 *
 * Kernel command line options read here:
 *   racelab.hostname=NAME   guest hostname (default: racelab)
 *   racelab.ip=ADDR/LEN     address of the user-net NIC (default: QEMU's 10.0.2.15/24)
 *
 * Under TCG every fork+exec costs ~100 ms, and a shell init spent five of them
 * (mount, mount -a, mkdir, ip, sleep) before its marker.  This program does all
 * of it with system calls; its only exec is sshd's.
 *
 * Console lines (stdout of PID 1 is /dev/console), matched by the host:
 *   racelab-init: ready host=NAME nic=NIC uptime=N.NNs    (lab.image.READY_MARKER)
 *   racelab-init: warning: ...  /  racelab-init: error: ...
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <limits.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <mntent.h>
#include <net/if.h>
#include <signal.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mount.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/wait.h>
#include <time.h>
#include <unistd.h>

#define FSTAB "/etc/racelab/fstab"
#define MODULES_DIR "/lib/modules/racelab"
#define SSHD "/usr/sbin/sshd"
#define NIC_WAIT_STEPS 100             /* x 50 ms: the NIC's driver may still be probing */
#ifndef MODULE_INIT_COMPRESSED_FILE
#define MODULE_INIT_COMPRESSED_FILE 4  /* Linux 6.4: the kernel decompresses */
#endif

static void say(const char *fmt, ...)
{
	char line[512];
	int n = snprintf(line, sizeof(line), "racelab-init: ");
	va_list ap;

	va_start(ap, fmt);
	n += vsnprintf(line + n, sizeof(line) - n - 1, fmt, ap);
	va_end(ap);
	if (n > (int)sizeof(line) - 2)
		n = sizeof(line) - 2;
	line[n++] = '\n';
	/* one write(2): the line is never interleaved with sshd's or the kernel's */
	if (write(STDOUT_FILENO, line, n) < 0) {
		/* no console: nothing to tell anyone */
	}
}

/* ---------------------------------------------------------------- mounts */

struct mount_flag {
	const char *name;
	unsigned long set, clear;
};

/* The options mount(8) turns into MS_* flags; anything else goes to the
 * filesystem as data (mode=, gid=, ...), except the userspace-only ones. */
static const struct mount_flag mount_flags[] = {
	{"defaults", 0, 0},
	{"rw", 0, MS_RDONLY},       {"ro", MS_RDONLY, 0},
	{"suid", 0, MS_NOSUID},     {"nosuid", MS_NOSUID, 0},
	{"dev", 0, MS_NODEV},       {"nodev", MS_NODEV, 0},
	{"exec", 0, MS_NOEXEC},     {"noexec", MS_NOEXEC, 0},
	{"async", 0, MS_SYNCHRONOUS}, {"sync", MS_SYNCHRONOUS, 0},
	{"dirsync", MS_DIRSYNC, 0},
	{"atime", 0, MS_NOATIME},   {"noatime", MS_NOATIME, 0},
	{"diratime", 0, MS_NODIRATIME}, {"nodiratime", MS_NODIRATIME, 0},
	{"relatime", MS_RELATIME, 0}, {"norelatime", 0, MS_RELATIME},
	{"strictatime", MS_STRICTATIME, 0},
	{"lazytime", MS_LAZYTIME, 0},
	{"silent", MS_SILENT, 0},   {"loud", 0, MS_SILENT},
	{"auto", 0, 0},             {"nofail", 0, 0},
	{"user", 0, 0},             {"nouser", 0, 0},
	{"_netdev", 0, 0},
};

struct mount_opts {
	unsigned long flags;
	char data[256];
	bool mkdir, nofail, noauto;
};

static void parse_opts(const char *opts, struct mount_opts *o)
{
	char buf[256], *save = NULL;

	memset(o, 0, sizeof(*o));
	snprintf(buf, sizeof(buf), "%s", opts);
	for (char *t = strtok_r(buf, ",", &save); t; t = strtok_r(NULL, ",", &save)) {
		bool known = false;

		if (!strcmp(t, "nofail"))
			o->nofail = true;
		if (!strcmp(t, "noauto")) {
			o->noauto = true;
			continue;
		}
		if (!strncmp(t, "X-mount.mkdir", 13)) {
			o->mkdir = true;
			continue;
		}
		if (!strncmp(t, "X-", 2) || !strncmp(t, "x-", 2) || !strncmp(t, "comment=", 8))
			continue;
		for (size_t i = 0; i < sizeof(mount_flags) / sizeof(mount_flags[0]); i++) {
			if (!strcmp(t, mount_flags[i].name)) {
				o->flags = (o->flags | mount_flags[i].set) & ~mount_flags[i].clear;
				known = true;
				break;
			}
		}
		if (!known) {
			size_t n = strlen(o->data);

			snprintf(o->data + n, sizeof(o->data) - n, "%s%s", n ? "," : "", t);
		}
	}
}

static bool is_mounted(const char *target)
{
	FILE *f = setmntent("/proc/self/mounts", "re");
	struct mntent m;
	char buf[4096];
	bool found = false;

	if (!f)
		return false;
	while (!found && getmntent_r(f, &m, buf, sizeof(buf)))
		found = !strcmp(m.mnt_dir, target);
	endmntent(f);
	return found;
}

/* mount -a -T FSTAB: every entry, in order, skipping what is mounted already
 * (the deb: initramfs moves its /dev here before switch_root).  False if an
 * entry without nofail did not mount. */
static bool mount_all(void)
{
	FILE *f = setmntent(FSTAB, "re");
	struct mntent *m, ent;
	char buf[4096];     /* getmntent_r: is_mounted() reads another table meanwhile */
	bool ok = true;

	if (!f) {
		say("warning: cannot read %s: %s", FSTAB, strerror(errno));
		return false;
	}
	while ((m = getmntent_r(f, &ent, buf, sizeof(buf)))) {
		struct mount_opts o;

		parse_opts(m->mnt_opts, &o);
		if (o.noauto || is_mounted(m->mnt_dir))
			continue;
		if (o.mkdir && mkdir(m->mnt_dir, 0755) < 0 && errno != EEXIST && !o.nofail)
			say("warning: mkdir %s: %s", m->mnt_dir, strerror(errno));
		if (mount(m->mnt_fsname, m->mnt_dir, m->mnt_type, o.flags, o.data[0] ? o.data : NULL) < 0
		    && !o.nofail) {
			say("warning: mount %s on %s (%s): %s", m->mnt_fsname, m->mnt_dir, m->mnt_type,
			    strerror(errno));
			ok = false;
		}
	}
	endmntent(f);
	return ok;
}

/* ---------------------------------------------------------------- sshd */

static pid_t start_sshd(void)
{
	char *argv[] = {SSHD, "-D", "-r", "-E", "/run/racelab/sshd.log", NULL};
	pid_t pid = fork();

	if (pid != 0) {
		if (pid < 0)
			say("error: fork for sshd: %s; SSH will not work", strerror(errno));
		return pid;
	}
	/* what a shell's background job gets: stdin /dev/null, a clean signal state */
	sigset_t none;
	int fd = open("/dev/null", O_RDONLY | O_CLOEXEC);

	sigemptyset(&none);
	sigprocmask(SIG_SETMASK, &none, NULL);
	for (int s = 1; s < NSIG; s++)
		signal(s, SIG_DFL);
	if (fd >= 0) {
		dup2(fd, STDIN_FILENO);
	}
	setsid();
	execv(SSHD, argv);
	say("error: exec %s: %s; SSH will not work", SSHD, strerror(errno));
	_exit(127);
}

/* ---------------------------------------------------------------- cmdline */

static void read_cmdline(char *hostname, size_t hlen, char *ip, size_t iplen)
{
	char buf[4096], *save = NULL;
	int fd = open("/proc/cmdline", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, buf, sizeof(buf) - 1) : -1;

	if (fd >= 0)
		close(fd);
	if (n <= 0)
		return;
	buf[n] = 0;
	for (char *t = strtok_r(buf, " \t\n", &save); t; t = strtok_r(NULL, " \t\n", &save)) {
		if (!strncmp(t, "racelab.hostname=", 17))
			snprintf(hostname, hlen, "%s", t + 17);
		else if (!strncmp(t, "racelab.ip=", 11))
			snprintf(ip, iplen, "%s", t + 11);
	}
}

/* ---------------------------------------------------------------- modules */

static void load_modules(void)
{
	FILE *f = fopen(MODULES_DIR "/load-order", "re");
	char line[PATH_MAX], path[PATH_MAX + sizeof(MODULES_DIR) + 1];

	if (!f)
		return;
	while (fgets(line, sizeof(line), f)) {
		line[strcspn(line, "\r\n")] = 0;
		if (!line[0])
			continue;
		snprintf(path, sizeof(path), "%s/%s", MODULES_DIR, line);
		int fd = open(path, O_RDONLY | O_CLOEXEC);

		if (fd < 0)
			continue;
		/* errors ignored like insmod's in the shell init: the deb: initramfs has
		 * loaded its own list already, so EEXIST is the usual answer */
		if (syscall(SYS_finit_module, fd, "", 0) < 0 && errno != EEXIST)
			syscall(SYS_finit_module, fd, "", MODULE_INIT_COMPRESSED_FILE);
		close(fd);
	}
	fclose(f);
}

/* ---------------------------------------------------------------- network */

/* The user-net NIC is the only device-backed interface at boot: the first one
 * (by name, like a shell glob) with a `device` link in /sys/class/net. */
static bool find_nic(char *nic, size_t len)
{
	DIR *d = opendir("/sys/class/net");
	struct dirent *e;
	char path[PATH_MAX];
	bool found = false;

	if (!d)
		return false;
	while ((e = readdir(d))) {
		if (e->d_name[0] == '.' || strlen(e->d_name) >= len)
			continue;
		snprintf(path, sizeof(path), "/sys/class/net/%s/device", e->d_name);
		if (access(path, F_OK) == 0 && (!found || strcmp(e->d_name, nic) < 0)) {
			memcpy(nic, e->d_name, strlen(e->d_name) + 1);
			found = true;
		}
	}
	closedir(d);
	return found;
}

static bool link_up(int sock, const char *name)
{
	struct ifreq ifr = {0};

	snprintf(ifr.ifr_name, sizeof(ifr.ifr_name), "%s", name);
	if (ioctl(sock, SIOCGIFFLAGS, &ifr) < 0)
		return false;
	ifr.ifr_flags |= IFF_UP;
	return ioctl(sock, SIOCSIFFLAGS, &ifr) == 0;
}

/* `ip addr add ADDR/LEN dev NIC`: RTM_NEWADDR with IFA_LOCAL = IFA_ADDRESS, no
 * broadcast (SIOCSIFADDR would add one), acknowledged.  0 or an errno. */
static int add_address(const char *nic, const char *cidr)
{
	char addr[64], *slash;
	struct in_addr in;
	long len = 24;
	unsigned int index = if_nametoindex(nic);

	snprintf(addr, sizeof(addr), "%s", cidr);
	slash = strchr(addr, '/');
	if (slash) {
		char *end;

		*slash = 0;
		len = strtol(slash + 1, &end, 10);
		if (*end || len < 0 || len > 32)
			return EINVAL;
	}
	if (inet_pton(AF_INET, addr, &in) != 1 || !index)
		return index ? EINVAL : ENODEV;

	struct {
		struct nlmsghdr nh;
		struct ifaddrmsg ifa;
		char attrs[2 * RTA_SPACE(4)];
	} req = {0};
	struct rtattr *rta;

	req.nh.nlmsg_len = NLMSG_LENGTH(sizeof(req.ifa));
	req.nh.nlmsg_type = RTM_NEWADDR;
	req.nh.nlmsg_flags = NLM_F_REQUEST | NLM_F_ACK | NLM_F_CREATE | NLM_F_EXCL;
	req.nh.nlmsg_seq = 1;
	req.ifa.ifa_family = AF_INET;
	req.ifa.ifa_prefixlen = len;
	req.ifa.ifa_scope = RT_SCOPE_UNIVERSE;
	req.ifa.ifa_index = index;
	for (int type = IFA_LOCAL; type; type = type == IFA_LOCAL ? IFA_ADDRESS : 0) {
		rta = (struct rtattr *)((char *)&req + NLMSG_ALIGN(req.nh.nlmsg_len));
		rta->rta_type = type;
		rta->rta_len = RTA_LENGTH(4);
		memcpy(RTA_DATA(rta), &in, 4);
		req.nh.nlmsg_len = NLMSG_ALIGN(req.nh.nlmsg_len) + RTA_SPACE(4);
	}

	int fd = socket(AF_NETLINK, SOCK_RAW | SOCK_CLOEXEC, NETLINK_ROUTE);
	struct sockaddr_nl kernel = {.nl_family = AF_NETLINK};
	char reply[512];
	int err = 0;

	if (fd < 0)
		return errno;
	if (sendto(fd, &req, req.nh.nlmsg_len, 0, (struct sockaddr *)&kernel, sizeof(kernel)) < 0) {
		err = errno;
	} else {
		ssize_t n = recv(fd, reply, sizeof(reply), 0);
		struct nlmsghdr *nh = (struct nlmsghdr *)reply;

		if (n < 0)
			err = errno;
		else if (NLMSG_OK(nh, (size_t)n) && nh->nlmsg_type == NLMSG_ERROR)
			err = -((struct nlmsgerr *)NLMSG_DATA(nh))->error;
	}
	close(fd);
	return err;
}

static void bring_up_network(const char *nic, const char *ip)
{
	int sock = socket(AF_INET, SOCK_DGRAM | SOCK_CLOEXEC, 0);
	int err;

	if (sock < 0) {
		say("warning: socket: %s", strerror(errno));
		return;
	}
	if (!link_up(sock, "lo"))
		say("warning: cannot set lo up: %s", strerror(errno));
	if (nic[0]) {
		if ((err = add_address(nic, ip)) != 0)
			say("warning: cannot add address %s to %s: %s", ip, nic, strerror(err));
		if (!link_up(sock, nic))
			say("warning: cannot set %s up: %s", nic, strerror(errno));
	}
	close(sock);
}

/* ---------------------------------------------------------------- PID 1 */

static void on_sigchld(int sig)
{
	(void)sig;
}

/* PID 1 must reap orphans and never exit.  SIGCHLD stays blocked and is taken
 * with sigwaitinfo(), so no child's exit is missed between two waits. */
static void __attribute__((noreturn)) reap_forever(const sigset_t *chld)
{
	for (;;) {
		while (waitpid(-1, NULL, WNOHANG) > 0)
			;
		sigwaitinfo(chld, NULL);
	}
}

int main(void)
{
	char hostname[HOST_NAME_MAX + 2] = "racelab", ip[64] = "10.0.2.15/24", nic[IF_NAMESIZE] = "";
	char up[32] = "?";
	sigset_t chld;

	if (getpid() != 1) {
		fprintf(stderr, "racelab-init: this is the guest's PID 1 (init=/sbin/racelab-init), "
				"not a command to run\n");
		return 2;
	}
	/* the environment sshd (and every SSH session) inherits, as the shell init set it */
	setenv("PATH", "/usr/sbin:/usr/bin:/sbin:/bin", 1);
	setenv("HOME", "/root", 1);
	umask(022);

	/* Signals a PID 1 would die of are ignored (the kernel drops most of them for
	 * init anyway); SIGCHLD is blocked, taken by reap_forever(). */
	signal(SIGHUP, SIG_IGN);
	signal(SIGINT, SIG_IGN);
	signal(SIGTERM, SIG_IGN);
	signal(SIGPIPE, SIG_IGN);
	signal(SIGUSR1, SIG_IGN);
	signal(SIGUSR2, SIG_IGN);
	signal(SIGCHLD, on_sigchld);
	sigemptyset(&chld);
	sigaddset(&chld, SIGCHLD);
	sigprocmask(SIG_BLOCK, &chld, NULL);

	if (access("/proc/self", F_OK) != 0
	    && mount("proc", "/proc", "proc", MS_NOSUID | MS_NODEV | MS_NOEXEC, NULL) < 0)
		say("warning: mount /proc: %s", strerror(errno));
	if (!mount_all())
		say("warning: some filesystems did not mount");

	/* sshd first: it loads while the rest runs on the other vCPU.  It binds
	 * 0.0.0.0:22, so the NIC may come up after it.  -r: no re-exec per
	 * connection (one exec fewer on every SSH login under TCG). */
	if (mkdir("/run/sshd", 0755) < 0 && errno != EEXIST)
		say("warning: mkdir /run/sshd: %s", strerror(errno));
	if (mkdir("/run/racelab", 0755) < 0 && errno != EEXIST)
		say("warning: mkdir /run/racelab: %s", strerror(errno));
	start_sshd();

	read_cmdline(hostname, sizeof(hostname), ip, sizeof(ip));
	if (sethostname(hostname, strlen(hostname)) < 0)
		say("warning: hostname %s: %s", hostname, strerror(errno));

	/* Modules shipped inside the root itself (the deb: initramfs has already
	 * loaded its own list). */
	load_modules();

	for (int i = 0; !find_nic(nic, sizeof(nic)) && i < NIC_WAIT_STEPS; i++)
		nanosleep(&(struct timespec){.tv_nsec = 50 * 1000 * 1000}, NULL);
	bring_up_network(nic, ip);
	if (!nic[0])
		say("error: no network interface appeared; SSH will not work");

	/* "Ready" means booted with sshd started; the host retries SSH until sshd
	 * listens, which costs nothing here, unlike polling for it. */
	int fd = open("/proc/uptime", O_RDONLY | O_CLOEXEC);
	ssize_t n = fd >= 0 ? read(fd, up, sizeof(up) - 1) : -1;

	if (fd >= 0)
		close(fd);
	if (n > 0) {
		up[n] = 0;
		up[strcspn(up, " \n")] = 0;
	}
	say("ready host=%s nic=%s uptime=%ss", hostname, nic, up);

	reap_forever(&chld);
}

/* Hand-assembling BPF programs and loading them with raw bpf(2) calls, for
 * tools that need no libbpf or clang.  The instruction macros have the names
 * and meaning of the kernel's include/linux/filter.h.
 *
 * xskcheck has its own copy of the first block (it predates this header);
 * the definitions are the same, so it can switch to this one as is.
 */
#ifndef RACELAB_BPFASM_H
#define RACELAB_BPFASM_H

#include <errno.h>
#include <linux/bpf.h>
#include <linux/btf.h>
#include <stdint.h>
#include <stdio.h>
#include <string.h>
#include <sys/syscall.h>
#include <sys/utsname.h>
#include <unistd.h>

#define INSN(CODE, DST, SRC, OFF, IMM) \
	((struct bpf_insn){ .code = (CODE), .dst_reg = (DST), .src_reg = (SRC), .off = (OFF), .imm = (IMM) })
#define BPF_MOV64_REG(D, S) INSN(BPF_ALU64 | BPF_MOV | BPF_X, D, S, 0, 0)
#define BPF_MOV64_IMM(D, I) INSN(BPF_ALU64 | BPF_MOV | BPF_K, D, 0, 0, I)
#define BPF_ALU64_REG(OP, D, S) INSN(BPF_ALU64 | (OP) | BPF_X, D, S, 0, 0)
#define BPF_ALU64_IMM(OP, D, I) INSN(BPF_ALU64 | (OP) | BPF_K, D, 0, 0, I)
#define BPF_LDX_MEM(SZ, D, S, OFF) INSN(BPF_LDX | (SZ) | BPF_MEM, D, S, OFF, 0)
#define BPF_STX_MEM(SZ, D, S, OFF) INSN(BPF_STX | (SZ) | BPF_MEM, D, S, OFF, 0)
#define BPF_ST_MEM(SZ, D, OFF, I) INSN(BPF_ST | (SZ) | BPF_MEM, D, 0, OFF, I)
#define BPF_JMP_REG(OP, D, S, OFF) INSN(BPF_JMP | (OP) | BPF_X, D, S, OFF, 0)
#define BPF_JMP_IMM(OP, D, I, OFF) INSN(BPF_JMP | (OP) | BPF_K, D, 0, OFF, I)
#define BPF_JMP_A(OFF) INSN(BPF_JMP | BPF_JA, 0, 0, OFF, 0)
#define BPF_CALL_FN(FN) INSN(BPF_JMP | BPF_CALL, 0, 0, 0, FN)
#define BPF_EXIT_INSN() INSN(BPF_JMP | BPF_EXIT, 0, 0, 0, 0)
#define BPF_LD_MAP_FD(D, FD) \
	INSN(BPF_LD | BPF_DW | BPF_IMM, D, BPF_PSEUDO_MAP_FD, 0, FD), INSN(0, 0, 0, 0, 0)

/* The address of a subprogram (a callback), OFF instructions after the next
 * one: what clang emits for `&fn` when fn is a bpf_loop() callback. */
#ifndef BPF_PSEUDO_FUNC
#define BPF_PSEUDO_FUNC 4
#endif
#define BPF_LD_FUNC(D, OFF) \
	INSN(BPF_LD | BPF_DW | BPF_IMM, D, BPF_PSEUDO_FUNC, 0, OFF), INSN(0, 0, 0, 0, 0)

/* Helper numbers are ABI; older uapi headers lack the newer names. */
#define BPF_HELPER_ktime_get_ns 5
#define BPF_HELPER_get_smp_processor_id 8
#define BPF_HELPER_map_lookup_elem 1
#define BPF_HELPER_loop 181 /* bpf_loop(), Linux 5.17 */

static inline int sys_bpf(int cmd, union bpf_attr *attr)
{
	return (int)syscall(__NR_bpf, cmd, attr, sizeof(*attr));
}

static inline int bpf_map_create_sized(enum bpf_map_type type, uint32_t value_size,
				       uint32_t max_entries, const char *name)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_type = type;
	a.key_size = 4;
	a.value_size = value_size;
	a.max_entries = max_entries;
	snprintf(a.map_name, sizeof(a.map_name), "%s", name);
	return sys_bpf(BPF_MAP_CREATE, &a);
}

static inline int bpf_map_lookup(int fd, uint32_t key, void *value)
{
	union bpf_attr a;

	memset(&a, 0, sizeof(a));
	a.map_fd = (uint32_t)fd;
	a.key = (uint64_t)(uintptr_t)&key;
	a.value = (uint64_t)(uintptr_t)value;
	return sys_bpf(BPF_MAP_LOOKUP_ELEM, &a);
}

/* LINUX_VERSION_CODE of the running kernel, from uname: kprobe programs
 * before Linux 5.0 are refused unless kern_version matches it exactly. */
static inline uint32_t running_kernel_version(void)
{
	struct utsname u;
	unsigned a = 0, b = 0, c = 0;

	if (uname(&u) != 0 || sscanf(u.release, "%u.%u.%u", &a, &b, &c) < 2)
		return 0;
	return (a << 16) + (b << 8) + (c > 255 ? 255 : c);
}

/* BPF_PROG_LOAD; on failure (other than EPERM) loads again with the verifier
 * log on, into log[loglen], so the caller can show why.  errno is that of the
 * first attempt's failure.  The log is off at first because a program that
 * passes would fill it for nothing: level 1 prints every instruction it
 * walks.  Before Linux 6.4 a full log keeps its beginning, not its end (the
 * kernel then fails with ENOSPC), so give a big buffer. */
static inline int bpf_prog_load_log(enum bpf_prog_type type, const struct bpf_insn *insns,
				    uint32_t n, const char *name, uint32_t kern_version,
				    int btf_fd, const struct bpf_func_info *fi, uint32_t nfi,
				    char *log, uint32_t loglen)
{
	union bpf_attr a;
	int fd, err;

	memset(&a, 0, sizeof(a));
	a.prog_type = type;
	a.insns = (uint64_t)(uintptr_t)insns;
	a.insn_cnt = n;
	a.license = (uint64_t)(uintptr_t) "GPL";
	a.kern_version = kern_version;
	if (btf_fd >= 0 && nfi) {
		a.prog_btf_fd = (uint32_t)btf_fd;
		a.func_info = (uint64_t)(uintptr_t)fi;
		a.func_info_cnt = nfi;
		a.func_info_rec_size = sizeof(*fi);
	}
	snprintf(a.prog_name, sizeof(a.prog_name), "%s", name);
	if (log && loglen)
		log[0] = '\0';
	fd = sys_bpf(BPF_PROG_LOAD, &a);
	if (fd >= 0 || errno == EPERM || !log || !loglen)
		return fd;
	err = errno;
	a.log_buf = (uint64_t)(uintptr_t)log;
	a.log_size = loglen;
	a.log_level = 1;
	fd = sys_bpf(BPF_PROG_LOAD, &a);
	if (fd >= 0) /* refused once, accepted with the log on: take it */
		return fd;
	errno = err;
	return -1;
}

/* BTF for a program of two functions, which the verifier needs before it
 * takes a callback (a BPF_PSEUDO_FUNC address; it checks the callback is
 * static): `int main_name(void *ctx)` at instruction 0 and
 * `static int cb_name(int index, void *ctx)`.  Loaded with BPF_BTF_LOAD; the
 * fd, or -1 with errno.  Type ids: 1 int, 2 void *, 3 and 4 main's proto and
 * func, 5 and 6 the callback's. */
static inline int bpf_btf_main_and_callback(const char *main_name, const char *cb_name)
{
	char strs[128];
	uint32_t types[64], nt = 0, o_int, o_ctx, o_idx, o_main, o_cb, slen = 0;
	struct btf_header h;
	static uint8_t blob[sizeof(h) + sizeof(types) + sizeof(strs)];
	union bpf_attr a;

#define STR(S) (slen + strlen(S) + 1 <= sizeof(strs) ? \
		(memcpy(strs + slen, S, strlen(S) + 1), slen += (uint32_t)strlen(S) + 1, slen - (uint32_t)strlen(S) - 1) : 0)
	strs[slen++] = '\0';
	o_int = STR("int");
	o_ctx = STR("ctx");
	o_idx = STR("index");
	o_main = STR(main_name);
	o_cb = STR(cb_name);
#undef STR
	/* 1: int */
	types[nt++] = o_int;
	types[nt++] = (uint32_t)BTF_KIND_INT << 24;
	types[nt++] = 4;
	types[nt++] = (BTF_INT_SIGNED << 24) | 32;
	/* 2: void * */
	types[nt++] = 0;
	types[nt++] = (uint32_t)BTF_KIND_PTR << 24;
	types[nt++] = 0;
	/* 3: int (void *ctx) */
	types[nt++] = 0;
	types[nt++] = ((uint32_t)BTF_KIND_FUNC_PROTO << 24) | 1;
	types[nt++] = 1;
	types[nt++] = o_ctx;
	types[nt++] = 2;
	/* 4: main */
	types[nt++] = o_main;
	types[nt++] = ((uint32_t)BTF_KIND_FUNC << 24) | BTF_FUNC_STATIC;
	types[nt++] = 3;
	/* 5: int (int index, void *ctx) */
	types[nt++] = 0;
	types[nt++] = ((uint32_t)BTF_KIND_FUNC_PROTO << 24) | 2;
	types[nt++] = 1;
	types[nt++] = o_idx;
	types[nt++] = 1;
	types[nt++] = o_ctx;
	types[nt++] = 2;
	/* 6: the callback */
	types[nt++] = o_cb;
	types[nt++] = ((uint32_t)BTF_KIND_FUNC << 24) | BTF_FUNC_STATIC;
	types[nt++] = 5;

	memset(&h, 0, sizeof(h));
	h.magic = BTF_MAGIC;
	h.version = BTF_VERSION;
	h.hdr_len = sizeof(h);
	h.type_off = 0;
	h.type_len = nt * 4;
	h.str_off = h.type_len;
	h.str_len = slen;
	memcpy(blob, &h, sizeof(h));
	memcpy(blob + sizeof(h), types, h.type_len);
	memcpy(blob + sizeof(h) + h.type_len, strs, slen);
	memset(&a, 0, sizeof(a));
	a.btf = (uint64_t)(uintptr_t)blob;
	a.btf_size = (uint32_t)(sizeof(h) + h.type_len + slen);
	return sys_bpf(BPF_BTF_LOAD, &a);
}

/* The last `lines` lines of a verifier log: where it gave up. */
static inline const char *log_tail(const char *log, int lines)
{
	const char *p = log + strlen(log);

	while (p > log && (p[-1] == '\n' || p[-1] == ' '))
		p--;
	while (p > log) {
		if (p[-1] == '\n' && --lines == 0)
			break;
		p--;
	}
	return p;
}

#endif

/*
 * bartest: the devmodel test guest's BAR exerciser.
 *
 * Runs inside the guest's initramfs as root. It finds the devmodel PCI function by
 * vendor:device, enables it, maps BAR0 (the lent-memory aperture) and BAR2 (the register block)
 * through sysfs with O_SYNC (uncached, so every load and store is one trapped access of exactly
 * its size), runs the tests named on the kernel command line and prints one result line per
 * test on the console:
 *
 *     DEVMODEL-RESULT {"test":"pattern","ok":true,...}
 *
 * Busybox's devmem forks per access (about 5.6 ms each), far too slow for loops; this program
 * does the tight loops in C. Built on the host with gcc -static by build-initramfs; the result
 * format is documented in qemu-configs/README.md.
 *
 * Kernel command line (read from /proc/cmdline; any argument names override devmodel.test):
 *   devmodel.test=a,b,c   tests to run in order: enumerate pattern boundary regs timing smp
 *                         watch stall demo bench evict churn xbench xfault soak irq msi
 *   devmodel.pciid=V:D    the function to find (hex, default 1234:10e5)
 *   devmodel.bytes=N      size of the pattern region at the start of BAR0 (K/M/G suffixes;
 *                         default 1M; the last 64 KiB of the BAR are always tested too)
 *   devmodel.iters=N      loop count of the timing tests (default 20000)
 *   devmodel.scratch=OFF  BAR2 offset of a register the regs test may write (default: none)
 *   devmodel.rounds=N     rounds of the demo test (default 0: forever)
 *   devmodel.piece=N      demo: bytes per piece; the pieces are spread over BAR0 (default 256K)
 *   devmodel.watch_ms=N   watch: how long to wait for all-ones (default 30000)
 *   devmodel.after_ms=N   watch: how long to go on reading after all-ones (default 0)
 *   devmodel.pause_ms=N   watch: idle this long between "watching" and the reads (default 0)
 *   devmodel.pause_until=NAME  watch: end that pause as soon as BAR2's counter NAME (e.g.
 *                         lender_losses) has grown, polling it every 10 ms; pause_ms bounds it
 *   devmodel.window=N     stall: the window (in granules) the host made unanswerable (default 1)
 *   devmodel.windows=N    evict, churn, soak: how many lease windows (from window 0) to use
 *                         (default 8)
 *   devmodel.revokes=N    evict: after the fill, wait until BAR2's REVOKES grew by N (default 0)
 *   devmodel.wait_ms=N    evict, soak: give up waiting for those revokes after this long
 *                         (default 30000)
 *   devmodel.slots=N      churn, soak: records per window and thread (default 32)
 *   devmodel.run_ms=N     churn, soak: how long the writer threads go on (default 10000)
 *   devmodel.peer=V:D     xbench, xfault: the peer's function (hex), a minimal C ioreq
 *                         server the figures are compared with (default: none)
 *   devmodel.per_round=N  xbench, xfault: timed reads per target and size in each round
 *                         (default 50; xfault: resident and peer reads after each fault);
 *                         xbench takes devmodel.rounds (0, the default, means 20)
 *   devmodel.fault_rounds=N  xfault: rounds over the windows (default 4)
 *   devmodel.irqs=N       irq, msi: doorbell rounds (default 5; msi: with MSI)
 */
#define _GNU_SOURCE
#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <sys/stat.h>
#include <sys/syscall.h>
#include <sys/sysinfo.h>
#include <time.h>
#include <unistd.h>

#define PREFIX "DEVMODEL-RESULT "
#define SYSFS_PCI "/sys/bus/pci/devices"
#define TAIL_BYTES (64u << 10)
#define REGS_BYTES 0x60u
#define MAX_TESTS 24
#define BAR2_MAGIC 0x4c444d44u /* "DMDL", devmodel's BAR2 offset 0 */
#define PEER_MAGIC 0x52454550u /* "PEER", the peer's BAR0 offset 0 (bench/xen_ioreq_peer.c) */
/* Linux's IORESOURCE_* bits as sysfs `resource` shows them. */
#define IORESOURCE_IO 0x00000100ull
#define IORESOURCE_MEM 0x00000200ull
#define IORESOURCE_PREFETCH 0x00002000ull
#define IORESOURCE_MEM_64 0x00100000ull

struct options {
	unsigned vendor, device;
	uint64_t bytes, iters;
	long scratch; /* BAR2 offset of a register free for tests; -1: none */
	uint64_t rounds, piece, watch_ms, after_ms, pause_ms, window;
	uint64_t windows, revokes, wait_ms, slots, run_ms;
	unsigned peer_vendor, peer_device; /* 0: no peer */
	uint64_t per_round, fault_rounds, irqs;
	const char *pause_until; /* watch: a BAR2 counter's name; NULL: a plain pause */
	char *tests[MAX_TESTS];
	int ntests;
};

struct resource {
	uint64_t start, end, flags;
};

struct device {
	int found;
	char path[300];
	char name[256];
	struct resource res[6];
	volatile uint8_t *bar0, *bar2;
	uint64_t bar0_size, bar2_size;
};

static struct options opt = {.vendor = 0x1234, .device = 0x10e5, .bytes = 1u << 20,
			     .iters = 20000, .scratch = -1, .piece = 256u << 10,
			     .watch_ms = 30000, .window = 1, .windows = 8, .wait_ms = 30000,
			     .slots = 32, .run_ms = 10000, .per_round = 50, .fault_rounds = 4,
			     .irqs = 5};
static struct device dev, peer;

/* ---- output: one JSON object per line, written with one write() so lines never interleave */

struct line {
	char buf[8192];
	size_t len;
};

static void add(struct line *l, const char *fmt, ...) __attribute__((format(printf, 2, 3)));
static void add(struct line *l, const char *fmt, ...)
{
	va_list ap;
	int n;

	if (l->len >= sizeof(l->buf))
		return;
	va_start(ap, fmt);
	n = vsnprintf(l->buf + l->len, sizeof(l->buf) - l->len, fmt, ap);
	va_end(ap);
	if (n > 0)
		l->len += (size_t)n;
	if (l->len >= sizeof(l->buf))
		l->len = sizeof(l->buf) - 1;
}

static void begin(struct line *l, const char *test)
{
	l->len = 0;
	add(l, PREFIX "{\"test\":\"%s\"", test);
}

/* Lines that are not a test's result (start, end) carry "event" instead of "test". */
static void begin_event(struct line *l, const char *event)
{
	l->len = 0;
	add(l, PREFIX "{\"event\":\"%s\"", event);
}

static void emit(struct line *l)
{
	const char *p;
	size_t left;
	ssize_t n;

	add(l, "}\n");
	for (p = l->buf, left = l->len; left > 0; p += n, left -= (size_t)n) {
		n = write(STDOUT_FILENO, p, left);
		if (n <= 0)
			return;
	}
}

/* A result line for a test that could not run; `why` must not need JSON escaping. */
static int fail_line(const char *test, const char *why, ...) __attribute__((format(printf, 2, 3)));
static int fail_line(const char *test, const char *why, ...)
{
	struct line l;
	char msg[512];
	va_list ap;

	va_start(ap, why);
	vsnprintf(msg, sizeof(msg), why, ap);
	va_end(ap);
	begin(&l, test);
	add(&l, ",\"ok\":false,\"error\":\"%s\"", msg);
	emit(&l);
	return 1;
}

static uint64_t now_ns(void)
{
	struct timespec ts;

	clock_gettime(CLOCK_MONOTONIC, &ts);
	return (uint64_t)ts.tv_sec * 1000000000u + (uint64_t)ts.tv_nsec;
}

/* ---- command line */

static uint64_t parse_size(const char *s)
{
	char *end;
	uint64_t v = strtoull(s, &end, 0);

	switch (*end) {
	case 'k': case 'K': return v << 10;
	case 'm': case 'M': return v << 20;
	case 'g': case 'G': return v << 30;
	default: return v;
	}
}

static void split_tests(char *list)
{
	char *save = NULL, *t;

	opt.ntests = 0;
	for (t = strtok_r(list, ",", &save); t && opt.ntests < MAX_TESTS;
	     t = strtok_r(NULL, ",", &save))
		opt.tests[opt.ntests++] = t;
}

static void parse_cmdline(void)
{
	static char cmdline[4096];
	char *save = NULL, *tok;
	FILE *f = fopen("/proc/cmdline", "r");

	if (!f)
		return;
	if (!fgets(cmdline, sizeof(cmdline), f))
		cmdline[0] = 0;
	fclose(f);
	for (tok = strtok_r(cmdline, " \n", &save); tok; tok = strtok_r(NULL, " \n", &save)) {
		if (!strncmp(tok, "devmodel.pciid=", 15))
			sscanf(tok + 15, "%x:%x", &opt.vendor, &opt.device);
		else if (!strncmp(tok, "devmodel.bytes=", 15))
			opt.bytes = parse_size(tok + 15);
		else if (!strncmp(tok, "devmodel.iters=", 15))
			opt.iters = parse_size(tok + 15);
		else if (!strncmp(tok, "devmodel.scratch=", 17))
			opt.scratch = strtol(tok + 17, NULL, 0);
		else if (!strncmp(tok, "devmodel.rounds=", 16))
			opt.rounds = parse_size(tok + 16);
		else if (!strncmp(tok, "devmodel.piece=", 15))
			opt.piece = parse_size(tok + 15);
		else if (!strncmp(tok, "devmodel.watch_ms=", 18))
			opt.watch_ms = parse_size(tok + 18);
		else if (!strncmp(tok, "devmodel.after_ms=", 18))
			opt.after_ms = parse_size(tok + 18);
		else if (!strncmp(tok, "devmodel.pause_ms=", 18))
			opt.pause_ms = parse_size(tok + 18);
		else if (!strncmp(tok, "devmodel.pause_until=", 21))
			opt.pause_until = tok + 21;
		else if (!strncmp(tok, "devmodel.window=", 16))
			opt.window = parse_size(tok + 16);
		else if (!strncmp(tok, "devmodel.windows=", 17))
			opt.windows = parse_size(tok + 17);
		else if (!strncmp(tok, "devmodel.revokes=", 17))
			opt.revokes = parse_size(tok + 17);
		else if (!strncmp(tok, "devmodel.wait_ms=", 17))
			opt.wait_ms = parse_size(tok + 17);
		else if (!strncmp(tok, "devmodel.slots=", 15))
			opt.slots = parse_size(tok + 15);
		else if (!strncmp(tok, "devmodel.run_ms=", 16))
			opt.run_ms = parse_size(tok + 16);
		else if (!strncmp(tok, "devmodel.peer=", 14))
			sscanf(tok + 14, "%x:%x", &opt.peer_vendor, &opt.peer_device);
		else if (!strncmp(tok, "devmodel.per_round=", 19))
			opt.per_round = parse_size(tok + 19);
		else if (!strncmp(tok, "devmodel.fault_rounds=", 22))
			opt.fault_rounds = parse_size(tok + 22);
		else if (!strncmp(tok, "devmodel.irqs=", 14))
			opt.irqs = parse_size(tok + 14);
		else if (!strncmp(tok, "devmodel.test=", 14))
			split_tests(tok + 14);
	}
}

/* ---- finding, enabling and mapping the device */

static int read_file(const char *dir, const char *name, char *buf, size_t size)
{
	char path[400];
	ssize_t n;
	int fd;

	snprintf(path, sizeof(path), "%s/%s", dir, name);
	fd = open(path, O_RDONLY);
	if (fd < 0)
		return -1;
	n = read(fd, buf, size - 1);
	close(fd);
	if (n < 0)
		return -1;
	buf[n] = 0;
	return (int)n;
}

static unsigned long read_hex(const char *dir, const char *name)
{
	char buf[64];

	if (read_file(dir, name, buf, sizeof(buf)) < 0)
		return ~0ul;
	return strtoul(buf, NULL, 16);
}

static volatile uint8_t *map_bar(const struct device *d, int index, uint64_t size)
{
	char path[400];
	void *p;
	int fd;

	snprintf(path, sizeof(path), "%s/resource%d", d->path, index);
	fd = open(path, O_RDWR | O_SYNC);
	if (fd < 0)
		return NULL;
	p = mmap(NULL, size, PROT_READ | PROT_WRITE, MAP_SHARED, fd, 0);
	close(fd);
	return p == MAP_FAILED ? NULL : p;
}

/* Finds the function vendor:device, enables it and maps its BAR0 and BAR2 into `d`. */
static void find_device(struct device *d, unsigned vendor, unsigned device)
{
	struct dirent *e;
	DIR *dir = opendir(SYSFS_PCI);
	char buf[1024], *p;
	int i, fd;

	if (!dir)
		return;
	while ((e = readdir(dir))) {
		if (e->d_name[0] == '.')
			continue;
		snprintf(d->path, sizeof(d->path), SYSFS_PCI "/%s", e->d_name);
		if (read_hex(d->path, "vendor") == vendor &&
		    read_hex(d->path, "device") == device) {
			snprintf(d->name, sizeof(d->name), "%s", e->d_name);
			d->found = 1;
			break;
		}
	}
	closedir(dir);
	if (!d->found)
		return;
	if (read_file(d->path, "resource", buf, sizeof(buf)) > 0) {
		p = buf;
		for (i = 0; i < 6; i++) {
			struct resource *r = &d->res[i];

			if (sscanf(p, "%" SCNx64 " %" SCNx64 " %" SCNx64, &r->start, &r->end,
				   &r->flags) != 3)
				break;
			p = strchr(p, '\n');
			if (!p)
				break;
			p++;
		}
	}
	/* Enabling turns on memory decoding; without it every access reads all-ones. */
	snprintf(buf, sizeof(buf), "%s/enable", d->path);
	fd = open(buf, O_WRONLY);
	if (fd >= 0) {
		if (write(fd, "1", 1) != 1)
			perror("bartest: enable");
		close(fd);
	}
	if (d->res[0].start) {
		d->bar0_size = d->res[0].end - d->res[0].start + 1;
		d->bar0 = map_bar(d, 0, d->bar0_size);
	}
	if (d->res[2].start) {
		d->bar2_size = d->res[2].end - d->res[2].start + 1;
		d->bar2 = map_bar(d, 2, d->bar2_size);
	}
}

/* ---- access helpers: volatile, so each is exactly one load or store of its size */

static inline void wr(volatile uint8_t *b, uint64_t off, unsigned size, uint64_t v)
{
	switch (size) {
	case 1: *(volatile uint8_t *)(b + off) = (uint8_t)v; break;
	case 2: *(volatile uint16_t *)(b + off) = (uint16_t)v; break;
	case 4: *(volatile uint32_t *)(b + off) = (uint32_t)v; break;
	default: *(volatile uint64_t *)(b + off) = v; break;
	}
}

static inline uint64_t rd(volatile uint8_t *b, uint64_t off, unsigned size)
{
	switch (size) {
	case 1: return *(volatile uint8_t *)(b + off);
	case 2: return *(volatile uint16_t *)(b + off);
	case 4: return *(volatile uint32_t *)(b + off);
	default: return *(volatile uint64_t *)(b + off);
	}
}

static inline uint64_t size_mask(unsigned size)
{
	return size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
}

/* The pattern's byte at BAR offset `off`: depends on the position and a per-run seed, so data
 * left from an earlier run or written to the wrong place never matches by accident. */
static inline uint8_t pat(uint64_t seed, uint64_t off)
{
	uint64_t x = (off + seed) * 0x9e3779b97f4a7c15ull;

	return (uint8_t)((x >> 56) ^ (x >> 29));
}

/* What an access of `size` bytes at `off` must see (little-endian, as the guest is). */
static inline uint64_t expect(uint64_t seed, uint64_t off, unsigned size)
{
	uint64_t v = 0;
	unsigned i;

	for (i = 0; i < size; i++)
		v |= (uint64_t)pat(seed, off + i) << (8 * i);
	return v;
}

struct verify {
	uint64_t mismatches[4][4]; /* [log2 write size][log2 read size] */
	uint64_t accesses;
	uint64_t first_off;        /* valid when first_size != 0 */
	unsigned first_size;
	uint64_t first_want, first_got;
};

/* Fill [off, off+len) and read it back so that every pair of access sizes meets once.
 *
 * The range is cut into 16 equal pieces. Quarter w (pieces 4w..4w+3) is written with
 * (1 << w)-byte stores; piece 4w+r is then read with (1 << r)-byte loads. Every byte is written
 * once and read once (reading the whole range with all four sizes would take four times as
 * long: each trapped read is a round trip to the device model), yet each write size is
 * checked against each read size. `len` must be a multiple of 128. */
static void fill_verify(volatile uint8_t *bar, uint64_t off, uint64_t len, uint64_t seed,
			struct verify *v)
{
	uint64_t piece = len / 16, o, end, got, want;
	unsigned w, r, size;

	for (w = 0; w < 4; w++) {
		size = 1u << w;
		for (o = off + 4 * w * piece, end = o + 4 * piece; o < end; o += size)
			wr(bar, o, size, expect(seed, o, size));
		v->accesses += 4 * piece / size;
	}
	for (w = 0; w < 4; w++) {
		for (r = 0; r < 4; r++) {
			size = 1u << r;
			o = off + (4 * w + r) * piece;
			for (end = o + piece; o < end; o += size) {
				got = rd(bar, o, size);
				want = expect(seed, o, size);
				if (got == want)
					continue;
				if (!v->mismatches[w][r]++ && !v->first_size) {
					v->first_off = o;
					v->first_size = size;
					v->first_want = want;
					v->first_got = got;
				}
			}
			v->accesses += piece / size;
		}
	}
}

static uint64_t total_mismatches(const struct verify *v)
{
	uint64_t n = 0;
	int w, r;

	for (w = 0; w < 4; w++)
		for (r = 0; r < 4; r++)
			n += v->mismatches[w][r];
	return n;
}

static void add_verify(struct line *l, const struct verify *v)
{
	int w, r;

	add(l, ",\"mismatches\":%" PRIu64 ",\"by_size\":{", total_mismatches(v));
	for (w = 0; w < 4; w++)
		for (r = 0; r < 4; r++)
			add(l, "%s\"w%dr%d\":%" PRIu64, w || r ? "," : "", 1 << w, 1 << r,
			    v->mismatches[w][r]);
	add(l, "},\"accesses\":%" PRIu64, v->accesses);
	if (v->first_size)
		add(l, ",\"first_mismatch\":{\"offset\":\"0x%" PRIx64 "\",\"size\":%u,"
		       "\"want\":\"0x%" PRIx64 "\",\"got\":\"0x%" PRIx64 "\"}",
		    v->first_off, v->first_size, v->first_want, v->first_got);
}

static uint64_t pattern_bytes(void)
{
	uint64_t n = opt.bytes & ~127ull;

	if (n < 128)
		n = 128;
	if (n > dev.bar0_size - TAIL_BYTES)
		n = dev.bar0_size - TAIL_BYTES;
	return n;
}

static int need_bar0(const char *test)
{
	if (!dev.found)
		return fail_line(test, "no PCI function %04x:%04x", opt.vendor, opt.device);
	if (!dev.bar0)
		return fail_line(test, "cannot map BAR0 of %s: %s", dev.name, strerror(errno));
	if (dev.bar0_size < 2 * TAIL_BYTES)
		return fail_line(test, "BAR0 is too small (%" PRIu64 " bytes)", dev.bar0_size);
	return 0;
}

/* ---- tests; each prints its lines and returns 0 when it passed */

static int test_enumerate(void)
{
	struct line l;
	unsigned char cfg[64];
	char buf[400];
	uint32_t bar0_reg = 0;
	int i, fd, first = 1, ok;

	if (!dev.found)
		return fail_line("enumerate", "no PCI function %04x:%04x", opt.vendor, opt.device);
	snprintf(buf, sizeof(buf), "%s/config", dev.path);
	fd = open(buf, O_RDONLY);
	if (fd >= 0) {
		if (read(fd, cfg, sizeof(cfg)) == (ssize_t)sizeof(cfg))
			memcpy(&bar0_reg, cfg + 0x10, 4);
		close(fd);
	}
	/* BAR0 must decode as memory, 64-bit, prefetchable: type bits 2:1 = 10b, bit 3 set. */
	ok = (bar0_reg & 0xf) == 0xc && dev.bar0_size > 0;
	begin(&l, "enumerate");
	add(&l, ",\"ok\":%s,\"slot\":\"%s\",\"vendor\":\"0x%04lx\",\"device\":\"0x%04lx\"",
	    ok ? "true" : "false", dev.name, read_hex(dev.path, "vendor"),
	    read_hex(dev.path, "device"));
	add(&l, ",\"subsystem_vendor\":\"0x%04lx\",\"subsystem_device\":\"0x%04lx\"",
	    read_hex(dev.path, "subsystem_vendor"), read_hex(dev.path, "subsystem_device"));
	add(&l, ",\"class\":\"0x%06lx\",\"revision\":\"0x%02lx\",\"bar0_reg\":\"0x%08" PRIx32 "\"",
	    read_hex(dev.path, "class"), read_hex(dev.path, "revision"), bar0_reg);
	add(&l, ",\"bars\":[");
	for (i = 0; i < 6; i++) {
		const struct resource *r = &dev.res[i];

		if (!r->flags)
			continue;
		add(&l, "%s{\"index\":%d,\"start\":\"0x%" PRIx64 "\",\"size\":%" PRIu64
			",\"flags\":\"0x%" PRIx64 "\",\"mem\":%s,\"io\":%s,\"mem64\":%s,"
			"\"prefetch\":%s}",
		    first ? "" : ",", i, r->start, r->start ? r->end - r->start + 1 : 0, r->flags,
		    r->flags & IORESOURCE_MEM ? "true" : "false",
		    r->flags & IORESOURCE_IO ? "true" : "false",
		    r->flags & IORESOURCE_MEM_64 ? "true" : "false",
		    r->flags & IORESOURCE_PREFETCH ? "true" : "false");
		first = 0;
	}
	add(&l, "]");
	emit(&l);
	return !ok;
}

static int test_pattern(void)
{
	uint64_t seed = now_ns(), n, t0;
	struct { const char *name; uint64_t off, len; } ranges[2];
	struct verify v;
	struct line l;
	int i, failed = 0;

	if (need_bar0("pattern"))
		return 1;
	n = pattern_bytes();
	ranges[0].name = "start";
	ranges[0].off = 0;
	ranges[0].len = n;
	ranges[1].name = "tail";
	ranges[1].off = dev.bar0_size - TAIL_BYTES;
	ranges[1].len = TAIL_BYTES;
	for (i = 0; i < 2; i++) {
		memset(&v, 0, sizeof(v));
		t0 = now_ns();
		fill_verify(dev.bar0, ranges[i].off, ranges[i].len, seed, &v);
		begin(&l, "pattern");
		add(&l, ",\"ok\":%s,\"range\":\"%s\",\"offset\":\"0x%" PRIx64 "\",\"bytes\":%" PRIu64
			",\"seed\":\"0x%" PRIx64 "\",\"ms\":%" PRIu64,
		    total_mismatches(&v) ? "false" : "true", ranges[i].name, ranges[i].off,
		    ranges[i].len, seed, (now_ns() - t0) / 1000000);
		add_verify(&l, &v);
		emit(&l);
		failed |= total_mismatches(&v) != 0;
	}
	return failed;
}

static void boundary_end(struct line *l, uint64_t qword_off, int at_end, uint64_t seed,
			 int *failures)
{
	uint64_t shadow, got, want, off, val, mask;
	unsigned size, shift;

	shadow = expect(seed, qword_off, 8);
	wr(dev.bar0, qword_off, 8, shadow);
	/* Stores of 8, 4, 2, 1 bytes against the BAR's edge, each read back at once... */
	for (size = 8; size >= 1; size /= 2) {
		off = at_end ? qword_off + 8 - size : qword_off;
		shift = (unsigned)(off - qword_off) * 8;
		mask = size_mask(size);
		val = (seed * size) & mask;
		wr(dev.bar0, off, size, val);
		shadow = (shadow & ~(mask << shift)) | (val << shift);
		got = rd(dev.bar0, off, size);
		if (got != val)
			add(l, "%s{\"op\":\"readback\",\"offset\":\"0x%" PRIx64 "\",\"size\":%u,"
			       "\"want\":\"0x%" PRIx64 "\",\"got\":\"0x%" PRIx64 "\"}",
			    (*failures)++ ? "," : "", off, size, val, got);
	}
	/* ...then loads of 1, 2, 4, 8 bytes against the same edge see the merged qword. */
	for (size = 1; size <= 8; size *= 2) {
		off = at_end ? qword_off + 8 - size : qword_off;
		shift = (unsigned)(off - qword_off) * 8;
		want = (shadow >> shift) & size_mask(size);
		got = rd(dev.bar0, off, size);
		if (got != want)
			add(l, "%s{\"op\":\"read\",\"offset\":\"0x%" PRIx64 "\",\"size\":%u,"
			       "\"want\":\"0x%" PRIx64 "\",\"got\":\"0x%" PRIx64 "\"}",
			    (*failures)++ ? "," : "", off, size, want, got);
	}
}

/* Accesses of every size at offset 0 and at the last byte, word, dword and qword of BAR0:
 * catches byte-lane errors and off-by-one range checks at the BAR's end. */
static int test_boundary(void)
{
	uint64_t seed = now_ns() | 0x0101010101010101ull;
	struct line l;
	int failures = 0;

	if (need_bar0("boundary"))
		return 1;
	begin(&l, "boundary");
	add(&l, ",\"bar_size\":%" PRIu64 ",\"checks\":16,\"failed\":[", dev.bar0_size);
	boundary_end(&l, 0, 0, seed, &failures);
	boundary_end(&l, dev.bar0_size - 8, 1, seed ^ 0xa5a5a5a5a5a5a5a5ull, &failures);
	add(&l, "],\"failures\":%d,\"ok\":%s", failures, failures ? "false" : "true");
	emit(&l);
	return failures != 0;
}

/* BAR2's first 0x60 bytes (the scalar registers) as dwords and as qwords, for the host to
 * decode with the layout in devmodel/pci/registers.py, which this program does not repeat.
 * With devmodel.scratch=OFFSET it also writes a register the host names as scratch: a dword,
 * then one byte inside it, each read back (BAR2 writes and their byte lanes). */
static int test_regs(void)
{
	uint64_t want, got, seed = now_ns() & 0xffffffffu;
	struct line l;
	unsigned off, n;
	int ok = 1;

	if (!dev.found)
		return fail_line("regs", "no PCI function %04x:%04x", opt.vendor, opt.device);
	if (!dev.bar2)
		return fail_line("regs", "cannot map BAR2 of %s", dev.name);
	n = dev.bar2_size < REGS_BYTES ? (unsigned)dev.bar2_size : REGS_BYTES;
	begin(&l, "regs");
	add(&l, ",\"bar2_size\":%" PRIu64 ",\"dwords\":[", dev.bar2_size);
	for (off = 0; off < n; off += 4)
		add(&l, "%s\"0x%08" PRIx64 "\"", off ? "," : "", rd(dev.bar2, off, 4));
	add(&l, "],\"qwords\":[");
	for (off = 0; off + 8 <= n; off += 8)
		add(&l, "%s\"0x%016" PRIx64 "\"", off ? "," : "", rd(dev.bar2, off, 8));
	add(&l, "]");
	if (opt.scratch >= 0 && (uint64_t)opt.scratch + 4 <= dev.bar2_size) {
		off = (unsigned)opt.scratch & ~3u;
		wr(dev.bar2, off, 4, seed);
		got = rd(dev.bar2, off, 4);
		add(&l, ",\"scratch\":{\"offset\":\"0x%x\",\"wrote\":\"0x%08" PRIx64
			"\",\"read\":\"0x%08" PRIx64 "\"", off, seed, got);
		ok &= got == seed;
		wr(dev.bar2, off + 1, 1, 0xa5);
		want = (seed & ~0xff00ull) | 0xa500;
		got = rd(dev.bar2, off, 4);
		add(&l, ",\"byte1_wrote\":\"0xa5\",\"read_after\":\"0x%08" PRIx64
			"\",\"want_after\":\"0x%08" PRIx64 "\"}", got, want);
		ok &= got == want;
	}
	add(&l, ",\"ok\":%s", ok ? "true" : "false");
	emit(&l);
	return !ok;
}

struct timing {
	uint64_t read4_ns, read8_ns, write4_ns, reg_read4_ns;
};

/* Tight loops of trapped accesses at `off` in BAR0; ns per access. The write loop ends with a
 * read so that the posted writes have reached the device model before the clock stops. */
static void time_accesses(uint64_t off, uint64_t iters, struct timing *t)
{
	volatile uint64_t sink = 0;
	uint64_t i, t0;

	t0 = now_ns();
	for (i = 0; i < iters; i++)
		sink += rd(dev.bar0, off, 4);
	t->read4_ns = (now_ns() - t0) / iters;
	t0 = now_ns();
	for (i = 0; i < iters; i++)
		sink += rd(dev.bar0, off, 8);
	t->read8_ns = (now_ns() - t0) / iters;
	t0 = now_ns();
	for (i = 0; i < iters; i++)
		wr(dev.bar0, off, 4, i);
	sink += rd(dev.bar0, off, 4);
	t->write4_ns = (now_ns() - t0) / iters;
	t->reg_read4_ns = 0;
	if (dev.bar2) {
		t0 = now_ns();
		for (i = 0; i < iters; i++)
			sink += rd(dev.bar2, 0, 4);
		t->reg_read4_ns = (now_ns() - t0) / iters;
	}
	(void)sink;
}

static void add_timing(struct line *l, uint64_t iters, const struct timing *t)
{
	add(l, ",\"iters\":%" PRIu64 ",\"read4_ns\":%" PRIu64 ",\"read8_ns\":%" PRIu64
	       ",\"write4_ns\":%" PRIu64 ",\"reg_read4_ns\":%" PRIu64,
	    iters, t->read4_ns, t->read8_ns, t->write4_ns, t->reg_read4_ns);
}

static int test_timing(void)
{
	struct timing t;
	struct line l;
	uint64_t iters = opt.iters ? opt.iters : 1;

	if (need_bar0("timing"))
		return 1;
	time_accesses(0x1000, iters, &t);
	begin(&l, "timing");
	add(&l, ",\"ok\":true");
	add_timing(&l, iters, &t);
	emit(&l);
	return 0;
}

struct smp_thread {
	pthread_t id;
	int index, ncpus, cpu;
	uint64_t off, len, iters, ms;
	struct verify v;
	struct timing t;
};

static void *smp_run(void *arg)
{
	struct smp_thread *s = arg;
	cpu_set_t set;
	uint64_t t0;

	if (s->index < s->ncpus) {
		CPU_ZERO(&set);
		CPU_SET(s->index, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	s->cpu = sched_getcpu();
	t0 = now_ns();
	fill_verify(dev.bar0, s->off, s->len, now_ns() + (uint64_t)s->index, &s->v);
	s->ms = (now_ns() - t0) / 1000000;
	time_accesses(s->off, s->iters, &s->t);
	return NULL;
}

/* Two threads, one per vCPU, each filling and verifying its own half of the pattern region and
 * then timing accesses, all at once: concurrent trapped accesses from several vCPUs. */
static int test_smp(void)
{
	struct smp_thread th[2];
	struct line l;
	uint64_t half, mismatches = 0;
	int i, started = 0, ncpus = get_nprocs();

	if (need_bar0("smp"))
		return 1;
	half = (pattern_bytes() / 2) & ~127ull;
	if (half < 128)
		half = 128;
	memset(th, 0, sizeof(th));
	for (i = 0; i < 2; i++) {
		th[i].index = i;
		th[i].ncpus = ncpus;
		th[i].off = (uint64_t)i * half;
		th[i].len = half;
		th[i].iters = opt.iters ? opt.iters : 1;
		if (pthread_create(&th[i].id, NULL, smp_run, &th[i]) == 0)
			started++;
		else
			break;
	}
	for (i = 0; i < started; i++)
		pthread_join(th[i].id, NULL);
	for (i = 0; i < started; i++) {
		begin(&l, "smp");
		add(&l, ",\"ok\":%s,\"thread\":%d,\"cpu\":%d,\"offset\":\"0x%" PRIx64
			"\",\"bytes\":%" PRIu64 ",\"ms\":%" PRIu64,
		    total_mismatches(&th[i].v) ? "false" : "true", i, th[i].cpu, th[i].off,
		    th[i].len, th[i].ms);
		add_verify(&l, &th[i].v);
		add_timing(&l, th[i].iters, &th[i].t);
		emit(&l);
		mismatches += total_mismatches(&th[i].v);
	}
	begin(&l, "smp");
	add(&l, ",\"ok\":%s,\"summary\":true,\"threads\":%d,\"cpus\":%d,\"mismatches\":%" PRIu64,
	    started == 2 && !mismatches ? "true" : "false", started, ncpus, mismatches);
	emit(&l);
	return started != 2 || mismatches != 0;
}

/* ---- counters, for tests that report what the device model did */

/* BAR2 counters by offset, as devmodel/pci/registers.py lays them out (each a u64).
 * tests/qemu/test_bartest_source.py checks this table against that file. */
static const struct {
	const char *name;
	unsigned off;
} counters[] = {
	{"trapped_reads", 0x20}, {"trapped_writes", 0x28}, {"page_ins", 0x40},
	{"failed_accesses", 0x48}, {"grants", 0x60},        {"revokes", 0x70},
	{"faults", 0x78},          {"lender_losses", 0x80},
};
#define GRANULE_REG 0x10u
#define ALL_ONES (~0ull)

static void add_counters_as(struct line *l, const char *key)
{
	unsigned i;

	if (!dev.bar2)
		return;
	add(l, ",\"%s\":{", key);
	for (i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
		add(l, "%s\"%s\":%" PRIu64, i ? "," : "", counters[i].name,
		    rd(dev.bar2, counters[i].off, 8));
	add(l, "}");
}

static void add_counters(struct line *l)
{
	add_counters_as(l, "counters");
}

/* ---- watch: what the guest sees when the device model goes away under it */

static long counter_offset(const char *name);

#define WATCH_OFFSET 0x2000u

/* Writes a value, then reads it back in a tight loop until it turns into all-ones (the device
 * model died: QEMU answers every access itself) or devmodel.watch_ms passes. The "watching"
 * event tells the host when to pull the plug (devmodel.pause_ms: the guest then idles that long
 * before it reads), the "ones" event when it happened; with
 * devmodel.after_ms it then keeps reading (and writing) that long, slowly, to see whether the
 * device ever comes back (a restarted device model on the same socket). */
static int test_watch(void)
{
	uint64_t value = (now_ns() * 0x9e3779b97f4a7c15ull) >> 1; /* never all-ones */
	uint64_t t0, t, got, good = 0, other = 0, last_other = 0, ones_ms = 0;
	uint64_t a0, s, spent = 0, after_reads = 0, after_ones = 0, after_other = 0;
	uint64_t first_other = 0, first_other_ms = 0, magic_after = 0, until0 = 0, paused_ms;
	long until_off = -1;
	struct line l;
	int saw = 0, until_grew = 0;

	if (need_bar0("watch"))
		return 1;
	if (opt.pause_until && (!dev.bar2 || (until_off = counter_offset(opt.pause_until)) < 0))
		return fail_line("watch", "devmodel.pause_until=%s: no such BAR2 counter",
				 opt.pause_until);
	wr(dev.bar0, WATCH_OFFSET, 8, value);
	got = rd(dev.bar0, WATCH_OFFSET, 8);
	if (got != value)
		return fail_line("watch", "read back 0x%" PRIx64 " right after writing 0x%" PRIx64,
				 got, value);
	if (opt.pause_until)
		until0 = rd(dev.bar2, (uint64_t)until_off, 8);
	begin_event(&l, "watching");
	add(&l, ",\"offset\":\"0x%x\",\"value\":\"0x%" PRIx64 "\"", WATCH_OFFSET, value);
	emit(&l);
	/* With a pause, the device model goes away while the guest does not touch BAR0. With
	 * pause_until the pause ends once BAR2 shows it happened (on a loaded host, how long
	 * the host takes to pull the plug is not known), pause_ms bounding it. */
	t0 = now_ns();
	if (opt.pause_ms && opt.pause_until) {
		while (rd(dev.bar2, (uint64_t)until_off, 8) == until0 &&
		       now_ns() - t0 < opt.pause_ms * 1000000)
			usleep(10000);
		until_grew = rd(dev.bar2, (uint64_t)until_off, 8) != until0;
	} else if (opt.pause_ms) {
		usleep((useconds_t)(opt.pause_ms * 1000));
	}
	paused_ms = (now_ns() - t0) / 1000000;
	t0 = now_ns();
	for (;;) {
		got = rd(dev.bar0, WATCH_OFFSET, 8);
		t = now_ns();
		if (got == value) {
			good++;
		} else if (got == ALL_ONES) {
			saw = 1;
			ones_ms = (t - t0) / 1000000;
			break;
		} else {
			other++;
			last_other = got;
		}
		if (t - t0 > opt.watch_ms * 1000000)
			break;
	}
	if (saw) {
		begin_event(&l, "ones");
		add(&l, ",\"good_reads\":%" PRIu64 ",\"ms\":%" PRIu64, good, ones_ms);
		emit(&l);
	}
	if (saw && opt.after_ms) {
		a0 = now_ns();
		while (now_ns() - a0 < opt.after_ms * 1000000) {
			s = now_ns();
			wr(dev.bar0, WATCH_OFFSET, 8, value);
			got = rd(dev.bar0, WATCH_OFFSET, 8);
			spent += now_ns() - s;
			after_reads++;
			if (got == ALL_ONES) {
				after_ones++;
			} else if (!after_other++) {
				first_other = got;
				first_other_ms = (now_ns() - a0) / 1000000;
			}
			/* Every failed access makes QEMU log a line: keep the rate modest. */
			usleep(2000);
		}
	}
	if (dev.bar2)
		magic_after = rd(dev.bar2, 0, 4);
	begin(&l, "watch");
	add(&l, ",\"ok\":%s,\"offset\":\"0x%x\",\"value\":\"0x%" PRIx64 "\",\"good_reads\":%" PRIu64
		",\"other_reads\":%" PRIu64 ",\"saw_all_ones\":%s,\"ms_to_all_ones\":%" PRIu64,
	    saw ? "true" : "false", WATCH_OFFSET, value, good, other, saw ? "true" : "false",
	    ones_ms);
	if (other)
		add(&l, ",\"last_other\":\"0x%" PRIx64 "\"", last_other);
	add(&l, ",\"after_ms\":%" PRIu64 ",\"after_reads\":%" PRIu64 ",\"after_all_ones\":%" PRIu64
		",\"after_other\":%" PRIu64 ",\"recovered\":%s,\"after_access_ns\":%" PRIu64,
	    opt.after_ms, after_reads, after_ones, after_other, after_other ? "true" : "false",
	    after_reads ? spent / after_reads / 2 : 0);
	if (after_other)
		add(&l, ",\"first_recovered\":\"0x%" PRIx64 "\",\"first_recovered_ms\":%" PRIu64,
		    first_other, first_other_ms);
	add(&l, ",\"bar2_magic_after\":\"0x%08" PRIx64 "\",\"paused_ms\":%" PRIu64, magic_after,
	    paused_ms);
	if (opt.pause_until)
		add(&l, ",\"pause_until\":\"%s\",\"pause_ended_by_counter\":%s", opt.pause_until,
		    until_grew ? "true" : "false");
	add_counters(&l);
	emit(&l);
	return !saw;
}

/* ---- stall: a window whose page-in the lender never answers */

/* The host's lender granted the aperture, evicted window devmodel.window and will never answer
 * its PAGE_IN. Accesses there must come back (all-ones, after the device model's page-in
 * deadline, well before QEMU's reply timeout), and the other windows must keep working: before,
 * in between and after. Times are in microseconds. */
static int test_stall(void)
{
	uint64_t granule, win = opt.window, want[4] = {0}, seed = now_ns() | 1, t0, i, got;
	uint64_t first, second, first_us, write_us, second_us, others = 0, bad = 0;
	struct line l;

	if (need_bar0("stall"))
		return 1;
	if (!dev.bar2)
		return fail_line("stall", "cannot map BAR2 of %s", dev.name);
	granule = rd(dev.bar2, GRANULE_REG, 4);
	if (!granule || 4 * granule > dev.bar0_size || win > 3)
		return fail_line("stall", "needs windows 0-3 (granule %" PRIu64 ", window %" PRIu64
				 ")", granule, win);
#define WIN_OFF(i) ((i) * granule + 0x100)
	for (i = 0; i < 4; i++) {
		if (i == win)
			continue;
		want[i] = ((seed * (i + 1)) * 0x9e3779b97f4a7c15ull) >> 1;
		wr(dev.bar0, WIN_OFF(i), 8, want[i]);
		bad += rd(dev.bar0, WIN_OFF(i), 8) != want[i];
		others++;
	}
	t0 = now_ns();
	first = rd(dev.bar0, WIN_OFF(win), 8);
	first_us = (now_ns() - t0) / 1000;
	/* A posted write to the stalled window, then a read elsewhere: the device model answers in
	 * order, so the read waits for the write's page-in deadline too. */
	t0 = now_ns();
	wr(dev.bar0, WIN_OFF(win), 8, seed);
	for (i = 0; i < 4; i++)
		if (i != win)
			bad += rd(dev.bar0, WIN_OFF(i), 8) != want[i];
	write_us = (now_ns() - t0) / 1000;
	t0 = now_ns();
	second = rd(dev.bar0, WIN_OFF(win), 8);
	second_us = (now_ns() - t0) / 1000;
	for (i = 0; i < 4; i++) {
		if (i == win)
			continue;
		want[i] ^= 0x5a5a5a5a5a5a5a5aull;
		wr(dev.bar0, WIN_OFF(i), 8, want[i]);
		got = rd(dev.bar0, WIN_OFF(i), 8);
		bad += got != want[i];
	}
#undef WIN_OFF
	begin(&l, "stall");
	add(&l, ",\"ok\":%s,\"granule\":%" PRIu64 ",\"window\":%" PRIu64 ",\"offset\":\"0x%" PRIx64
		"\",\"first_read\":\"0x%" PRIx64 "\",\"first_us\":%" PRIu64
		",\"write_then_reads_us\":%" PRIu64 ",\"second_read\":\"0x%" PRIx64
		"\",\"second_us\":%" PRIu64 ",\"other_windows\":%" PRIu64 ",\"other_bad\":%" PRIu64,
	    first == ALL_ONES && second == ALL_ONES && !bad ? "true" : "false", granule, win,
	    win * granule + 0x100, first, first_us, write_us, second, second_us, others, bad);
	add_counters(&l);
	emit(&l);
	return !(first == ALL_ONES && second == ALL_ONES && !bad);
}

/* ---- demo: rounds of fill and verify spread over BAR0, forever or devmodel.rounds times */

/* The size of each access to qword `q`: mostly 8 bytes (every trapped read is a round trip),
 * with a steady sprinkling of 1, 2 and 4-byte ones (3 qwords in 32). Writes and reads use other
 * salts, so the sizes written and read differ from qword to qword and from round to round. */
static unsigned demo_size(uint64_t q, uint64_t salt)
{
	switch (((q + salt) * 0x9e3779b97f4a7c15ull) >> 59) {
	case 0: return 1;
	case 1: return 2;
	case 2: return 4;
	default: return 8;
	}
}

struct demo_check {
	uint64_t writes, reads, mismatches;
	uint64_t first_off, first_want, first_got;
	unsigned first_size;
};

static void demo_fill(uint64_t off, uint64_t len, uint64_t seed, uint64_t salt,
		      struct demo_check *c)
{
	uint64_t o, b;
	unsigned size;

	for (o = off; o < off + len; o += 8) {
		size = demo_size(o >> 3, salt);
		for (b = 0; b < 8; b += size)
			wr(dev.bar0, o + b, size, expect(seed, o + b, size));
		c->writes += 8 / size;
	}
}

static void demo_verify(uint64_t off, uint64_t len, uint64_t seed, uint64_t salt,
			struct demo_check *c)
{
	uint64_t o, b, got, want;
	unsigned size;

	for (o = off; o < off + len; o += 8) {
		size = demo_size(o >> 3, salt);
		for (b = 0; b < 8; b += size) {
			got = rd(dev.bar0, o + b, size);
			want = expect(seed, o + b, size);
			if (got != want && !c->mismatches++) {
				c->first_off = o + b;
				c->first_size = size;
				c->first_want = want;
				c->first_got = got;
			}
		}
		c->reads += 8 / size;
	}
}

/* Each round writes a round-specific pattern into devmodel.bytes of BAR0, cut into pieces of
 * devmodel.piece bytes spread evenly over the whole BAR (so that they fall into different lease
 * windows and a lender under memory pressure must page some of them back in), then reads it all
 * back. One result line per round with its timing and BAR2's counters. */
static int test_demo(void)
{
	uint64_t piece = opt.piece & ~4095ull, npieces, stride, round, p, base_seed, seed;
	uint64_t t0, t1, t2, failed = 0;
	struct demo_check c;
	struct line l;

	if (need_bar0("demo"))
		return 1;
	if (piece < 4096)
		piece = 4096;
	if (piece > dev.bar0_size)
		piece = dev.bar0_size;
	npieces = opt.bytes / piece;
	if (npieces < 1)
		npieces = 1;
	if (npieces > dev.bar0_size / piece)
		npieces = dev.bar0_size / piece;
	stride = (dev.bar0_size / npieces) & ~4095ull;
	base_seed = now_ns();
	for (round = 1; !opt.rounds || round <= opt.rounds; round++) {
		seed = base_seed + round * 0x100000001b3ull;
		memset(&c, 0, sizeof(c));
		t0 = now_ns();
		for (p = 0; p < npieces; p++)
			demo_fill(p * stride, piece, seed, 2 * round, &c);
		t1 = now_ns();
		for (p = 0; p < npieces; p++)
			demo_verify(p * stride, piece, seed, 2 * round + 1, &c);
		t2 = now_ns();
		begin(&l, "demo");
		add(&l, ",\"ok\":%s,\"round\":%" PRIu64 ",\"bytes\":%" PRIu64 ",\"pieces\":%" PRIu64
			",\"piece\":%" PRIu64 ",\"stride\":%" PRIu64 ",\"ms\":%" PRIu64
			",\"writes\":%" PRIu64 ",\"reads\":%" PRIu64 ",\"ns_per_access\":%" PRIu64
			",\"write_ns\":%" PRIu64 ",\"read_ns\":%" PRIu64 ",\"mismatches\":%" PRIu64,
		    c.mismatches ? "false" : "true", round, npieces * piece, npieces, piece, stride,
		    (t2 - t0) / 1000000, c.writes, c.reads, (t2 - t0) / (c.writes + c.reads),
		    (t1 - t0) / c.writes, (t2 - t1) / c.reads, c.mismatches);
		if (c.mismatches)
			add(&l, ",\"first_mismatch\":{\"offset\":\"0x%" PRIx64 "\",\"size\":%u,"
			       "\"want\":\"0x%" PRIx64 "\",\"got\":\"0x%" PRIx64 "\"}",
			    c.first_off, c.first_size, c.first_want, c.first_got);
		add_counters(&l);
		emit(&l);
		failed += c.mismatches != 0;
	}
	return failed != 0;
}

/* ---- evict: fill windows, let the lender take everything back, read it all back */

/* The BAR2 offset of the counter called `name` in the table above (-1 if there is none). */
static long counter_offset(const char *name)
{
	unsigned i;

	for (i = 0; i < sizeof(counters) / sizeof(counters[0]); i++)
		if (!strcmp(counters[i].name, name))
			return counters[i].off;
	return -1;
}

/* Lease windows 0 .. devmodel.windows-1 of devmodel.granule bytes each get a piece of
 * devmodel.piece bytes at their start and another against their end (mixed access sizes, a
 * pattern seeded per run); event "filled". The guest then waits, touching nothing but BAR2's
 * REVOKES counter (every 2 ms), until it has grown by devmodel.revokes: the host makes the
 * lender evict everything meanwhile and passes how many leases that is. Event "evicted", then
 * every piece is read back (other access sizes) and compared. A window's pieces are both
 * written before the eviction and both read after it, so each window needs one page-in and a
 * page-in that brought back only part of a window shows as mismatches. */
static int test_evict(void)
{
	uint64_t granule, nwin = opt.windows, piece = opt.piece, seed = now_ns(), w, r0, r, t0;
	uint64_t wait_ms = 0, fill_ms, verify_ms, bad_windows = 0, before;
	long revokes_off = counter_offset("revokes");
	struct demo_check c;
	struct line l;
	int waited_out = 0;

	if (need_bar0("evict"))
		return 1;
	if (!dev.bar2 || revokes_off < 0)
		return fail_line("evict", "cannot map BAR2 of %s", dev.name);
	granule = rd(dev.bar2, GRANULE_REG, 4);
	piece &= ~7ull;
	if (!granule || !nwin || nwin * granule > dev.bar0_size || piece < 8 ||
	    2 * piece > granule)
		return fail_line("evict", "bad geometry: granule %" PRIu64 ", %" PRIu64 " windows, "
				 "piece %" PRIu64, granule, nwin, piece);
	memset(&c, 0, sizeof(c));
	t0 = now_ns();
	for (w = 0; w < nwin; w++) {
		demo_fill(w * granule, piece, seed, 2, &c);
		demo_fill((w + 1) * granule - piece, piece, seed, 2, &c);
	}
	/* A read orders after the posted writes: once it returns, the device model has them. */
	r0 = rd(dev.bar2, (uint64_t)revokes_off, 8);
	fill_ms = (now_ns() - t0) / 1000000;
	begin_event(&l, "filled");
	add(&l, ",\"windows\":%" PRIu64 ",\"granule\":%" PRIu64 ",\"piece\":%" PRIu64
		",\"writes\":%" PRIu64 ",\"ms\":%" PRIu64 ",\"wait_for_revokes\":%" PRIu64,
	    nwin, granule, piece, c.writes, fill_ms, opt.revokes);
	add_counters(&l);
	emit(&l);
	t0 = now_ns();
	for (;;) {
		r = rd(dev.bar2, (uint64_t)revokes_off, 8);
		wait_ms = (now_ns() - t0) / 1000000;
		if (r - r0 >= opt.revokes)
			break;
		if (wait_ms > opt.wait_ms) {
			waited_out = 1;
			break;
		}
		usleep(2000);
	}
	begin_event(&l, "evicted");
	add(&l, ",\"revokes_seen\":%" PRIu64 ",\"ms\":%" PRIu64 ",\"timed_out\":%s", r - r0,
	    wait_ms, waited_out ? "true" : "false");
	add_counters(&l);
	emit(&l);
	t0 = now_ns();
	for (w = 0; w < nwin; w++) {
		before = c.mismatches;
		demo_verify(w * granule, piece, seed, 3, &c);
		demo_verify((w + 1) * granule - piece, piece, seed, 3, &c);
		bad_windows += c.mismatches != before;
	}
	verify_ms = (now_ns() - t0) / 1000000;
	begin(&l, "evict");
	add(&l, ",\"ok\":%s,\"windows\":%" PRIu64 ",\"granule\":%" PRIu64 ",\"piece\":%" PRIu64
		",\"bytes\":%" PRIu64 ",\"seed\":\"0x%" PRIx64 "\",\"writes\":%" PRIu64
		",\"reads\":%" PRIu64 ",\"fill_ms\":%" PRIu64 ",\"wait_ms\":%" PRIu64
		",\"waited_out\":%s,\"verify_ms\":%" PRIu64 ",\"mismatches\":%" PRIu64
		",\"bad_windows\":%" PRIu64,
	    !c.mismatches && !waited_out ? "true" : "false", nwin, granule, piece,
	    2 * nwin * piece, seed, c.writes, c.reads, fill_ms, wait_ms,
	    waited_out ? "true" : "false", verify_ms, c.mismatches, bad_windows);
	if (c.mismatches)
		add(&l, ",\"first_mismatch\":{\"offset\":\"0x%" PRIx64 "\",\"size\":%u,"
		       "\"want\":\"0x%" PRIx64 "\",\"got\":\"0x%" PRIx64 "\"}",
		    c.first_off, c.first_size, c.first_want, c.first_got);
	add_counters(&l);
	emit(&l);
	return c.mismatches || waited_out;
}

/* ---- churn: writer threads on every vCPU while the lender revokes windows at random */

#define CHURN_THREADS 2

/* Record written by thread `t` in pass `p` at BAR offset `off`: the high half names the
 * thread and the pass, the low half is a hash of all three. A qword that reads back
 * self-consistent but from an older pass is a lost write; one whose halves disagree is torn. */
static inline uint32_t churn_hash(unsigned t, uint64_t p, uint64_t off)
{
	uint64_t x = (off ^ (p << 40) ^ ((uint64_t)t << 62)) * 0x9e3779b97f4a7c15ull;

	return (uint32_t)(x >> 32) ^ (uint32_t)x;
}

static inline uint64_t churn_record(unsigned t, uint64_t p, uint64_t off)
{
	uint64_t hi = ((uint64_t)t << 28) | (p & 0x0fffffffu);

	return (hi << 32) | churn_hash(t, p & 0x0fffffffu, off);
}

struct churn_check {
	uint64_t reads, mismatches, lost, torn, other;
	uint64_t first_off, first_want, first_got;
};

static void churn_compare(struct churn_check *c, unsigned t, uint64_t p, uint64_t off,
			  uint64_t got)
{
	uint64_t want = churn_record(t, p, off);
	uint32_t hi = (uint32_t)(got >> 32), lo = (uint32_t)got;
	unsigned gt = hi >> 28;
	uint64_t gp = hi & 0x0fffffffu;

	c->reads++;
	if (got == want)
		return;
	if (!c->mismatches++) {
		c->first_off = off;
		c->first_want = want;
		c->first_got = got;
	}
	if (lo == churn_hash(gt, gp, off) && gt == t && gp < (p & 0x0fffffffu))
		c->lost++;
	else if ((got >> 32) == (want >> 32) || lo == (uint32_t)want)
		c->torn++;
	else
		c->other++;
}

/* Where thread `t` keeps record `s` of window `w`: the window is cut into devmodel.slots
 * strides; even slots sit at the start of theirs, odd ones against its end (so both ends of a
 * window are used), and the threads' records are neighbours in one 16-byte pair. */
static inline uint64_t churn_offset(uint64_t granule, uint64_t stride, uint64_t w, uint64_t s,
				    unsigned t)
{
	return w * granule + s * stride + ((s & 1) ? stride - 16 : 0) + 8u * t;
}

struct churn_thread {
	pthread_t id;
	unsigned index;
	int ncpus, cpu;
	uint64_t granule, stride, nwin, slots, run_ns, start_ns;
	uint64_t passes, writes;
	pthread_barrier_t *barrier;
	struct churn_check c;
};

/* Pass after pass until the deadline: write every record of this thread with the pass number
 * (8-byte posted stores), then read them all back and check them. Each pass starts at another
 * window, so the threads and the lender's revocations meet everywhere. The threads start
 * together (a barrier, once each is on its vCPU) and each finishes at least one pass: on the
 * Xen test bed under TCG one vCPU was once descheduled for the whole 20 s of a run, so a
 * deadline counted from thread creation left its thread with nothing written. */
static void *churn_run(void *arg)
{
	struct churn_thread *th = arg;
	uint64_t p, i, w, s, off, end_ns;
	cpu_set_t set;

	if ((int)th->index < th->ncpus) {
		CPU_ZERO(&set);
		CPU_SET(th->index, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	th->cpu = sched_getcpu();
	pthread_barrier_wait(th->barrier);
	th->start_ns = now_ns();
	end_ns = th->start_ns + th->run_ns;
	for (p = 1; now_ns() < end_ns || p == 1; p++) {
		for (i = 0; i < th->nwin; i++) {
			w = (i + p + th->index * th->nwin / 2) % th->nwin;
			for (s = 0; s < th->slots; s++) {
				off = churn_offset(th->granule, th->stride, w, s, th->index);
				wr(dev.bar0, off, 8, churn_record(th->index, p, off));
				th->writes++;
			}
		}
		for (i = 0; i < th->nwin; i++) {
			w = (i + p + 1 + th->index * th->nwin / 2) % th->nwin;
			for (s = 0; s < th->slots; s++) {
				off = churn_offset(th->granule, th->stride, w, s, th->index);
				churn_compare(&th->c, th->index, p, off, rd(dev.bar0, off, 8));
			}
		}
		th->passes = p;
	}
	return NULL;
}

static void add_churn_check(struct line *l, const struct churn_check *c)
{
	add(l, ",\"reads\":%" PRIu64 ",\"mismatches\":%" PRIu64 ",\"lost\":%" PRIu64
	       ",\"torn\":%" PRIu64 ",\"other\":%" PRIu64,
	    c->reads, c->mismatches, c->lost, c->torn, c->other);
	if (c->mismatches)
		add(l, ",\"first_mismatch\":{\"offset\":\"0x%" PRIx64 "\",\"want\":\"0x%" PRIx64
		       "\",\"got\":\"0x%" PRIx64 "\"}", c->first_off, c->first_want, c->first_got);
}

/* Two writer threads, pinned to vCPU 0 and 1, for devmodel.run_ms over windows
 * 0 .. devmodel.windows-1 while the host's lender revokes windows at random (and pages them
 * back in when touched). One line per thread, then a final pass by one thread over every
 * record of both: each must hold its thread's last pass. */
static int test_churn(void)
{
	struct churn_thread th[CHURN_THREADS];
	struct churn_check final;
	uint64_t granule, stride, nwin = opt.windows, slots = opt.slots, t0, s, w, off, ms;
	uint64_t mismatches = 0;
	int ncpus = get_nprocs(), started = 0, i;
	pthread_barrier_t barrier;
	struct line l;

	if (need_bar0("churn"))
		return 1;
	if (!dev.bar2)
		return fail_line("churn", "cannot map BAR2 of %s", dev.name);
	granule = rd(dev.bar2, GRANULE_REG, 4);
	stride = slots ? (granule / slots) & ~15ull : 0;
	if (!granule || !nwin || nwin * granule > dev.bar0_size || stride < 32)
		return fail_line("churn", "bad geometry: granule %" PRIu64 ", %" PRIu64 " windows, "
				 "%" PRIu64 " slots", granule, nwin, slots);
	begin_event(&l, "churning");
	add(&l, ",\"threads\":%d,\"cpus\":%d,\"windows\":%" PRIu64 ",\"slots\":%" PRIu64
		",\"run_ms\":%" PRIu64, CHURN_THREADS, ncpus, nwin, slots, opt.run_ms);
	add_counters(&l);
	emit(&l);
	memset(th, 0, sizeof(th));
	pthread_barrier_init(&barrier, NULL, CHURN_THREADS);
	t0 = now_ns();
	for (i = 0; i < CHURN_THREADS; i++) {
		th[i].index = (unsigned)i;
		th[i].ncpus = ncpus;
		th[i].granule = granule;
		th[i].stride = stride;
		th[i].nwin = nwin;
		th[i].slots = slots;
		th[i].run_ns = opt.run_ms * 1000000;
		th[i].barrier = &barrier;
		if (pthread_create(&th[i].id, NULL, churn_run, &th[i]))
			break;
		started++;
	}
	/* Both or none: a thread left alone at the barrier would wait for ever. */
	if (started != CHURN_THREADS) {
		for (i = 0; i < started; i++)
			pthread_cancel(th[i].id);
		return fail_line("churn", "could not start %d threads", CHURN_THREADS);
	}
	for (i = 0; i < started; i++)
		pthread_join(th[i].id, NULL);
	pthread_barrier_destroy(&barrier);
	ms = (now_ns() - t0) / 1000000;
	/* What the device model did while the threads ran (the final pass comes after). */
	begin_event(&l, "churned");
	add(&l, ",\"ms\":%" PRIu64 ",\"start_ms\":%" PRIu64, ms,
	    (th[0].start_ns - t0) / 1000000);
	add_counters(&l);
	emit(&l);
	for (i = 0; i < started; i++) {
		begin(&l, "churn");
		add(&l, ",\"ok\":%s,\"thread\":%d,\"cpu\":%d,\"passes\":%" PRIu64
			",\"writes\":%" PRIu64,
		    th[i].c.mismatches || !th[i].passes ? "false" : "true", i, th[i].cpu,
		    th[i].passes, th[i].writes);
		add_churn_check(&l, &th[i].c);
		emit(&l);
		mismatches += th[i].c.mismatches;
	}
	/* Every record of every thread, read once more now that nobody writes. */
	memset(&final, 0, sizeof(final));
	for (w = 0; w < nwin; w++)
		for (s = 0; s < slots; s++)
			for (i = 0; i < started; i++) {
				off = churn_offset(granule, stride, w, s, (unsigned)i);
				churn_compare(&final, (unsigned)i, th[i].passes, off,
					      rd(dev.bar0, off, 8));
			}
	begin(&l, "churn");
	add(&l, ",\"ok\":%s,\"summary\":true,\"threads\":%d,\"cpus\":%d,\"windows\":%" PRIu64
		",\"slots\":%" PRIu64 ",\"ms\":%" PRIu64 ",\"thread_mismatches\":%" PRIu64,
	    started == CHURN_THREADS && !mismatches && !final.mismatches ? "true" : "false",
	    started, ncpus, nwin, slots, ms, mismatches);
	add(&l, ",\"final\":{\"records\":%" PRIu64, nwin * slots * (uint64_t)started);
	add_churn_check(&l, &final);
	add(&l, "}");
	add_counters(&l);
	emit(&l);
	return started != CHURN_THREADS || mismatches || final.mismatches;
}

/* ---- soak: sequence-numbered records across BAR0 while the lender revokes at random */

/*
 * Each thread owns devmodel.slots records in each of devmodel.windows windows (churn's
 * layout) and keeps, per record, the sequence number of its last acknowledged write. A write
 * is one 8-byte store, or two 4-byte stores (low half first), of record(thread, seq, offset)
 * with a fresh seq; it is ACKNOWLEDGED when the same thread's 8-byte read of the record right
 * after it returns exactly that value (a read is not posted and cannot pass the thread's
 * earlier posted stores, so the device model had the write when it answered). From then on
 * every read of the record must return it until the thread's next acknowledged write. A
 * write whose read-back shows something else is unacknowledged: the record may then hold
 * either value, and the host checks that each such write is covered by a failed access.
 *
 * A read is classified as: ok; poison (a half holds the bytes de ad be ef, the lender's fill
 * of freed memory: devmodel read memory it no longer held); ones (all-ones, the failure policy);
 * zero (the contents were lost); stale (an older record of this thread: a lost write); torn
 * (one half of the wanted record); other.
 */

#define SOAK_THREADS 2
/* The lender's poison, the bytes de ad be ef, read as a little-endian u32. */
#define SOAK_POISON 0xefbeaddeu
#define SOAK_SEQ_MAX 0x0fffffffu
#define SOAK_PROGRESS_NS (30ull * 1000000000u)

struct soak_slot {
	uint32_t acked, pending; /* sequence numbers; 0: none */
};

struct soak_check {
	uint64_t reads, ok, poison, ones, zero, stale, torn, other;
	uint64_t first_off, first_want, first_got;
};

struct soak_thread {
	pthread_t id;
	unsigned index;
	int ncpus, cpu;
	uint64_t granule, stride, nwin, slots, end_ns, rng;
	uint64_t seq, passes, writes, split_writes, acked, unacked;
	struct soak_slot *slot;
	struct soak_check ack; /* the read-backs of unacknowledged writes */
	struct soak_check c;	/* the verification sweeps */
};

static inline uint64_t soak_record(unsigned t, uint32_t seq, uint64_t off)
{
	return seq ? churn_record(t, seq, off) : 0; /* 0: never written, the fresh aperture */
}

static inline uint64_t soak_bad(const struct soak_check *c)
{
	return c->poison + c->zero + c->stale + c->torn + c->other;
}

static void soak_compare(struct soak_check *c, unsigned t, uint64_t off,
			 const struct soak_slot *sl, uint64_t got)
{
	uint64_t want = soak_record(t, sl->acked, off);
	uint32_t hi = (uint32_t)(got >> 32), lo = (uint32_t)got;
	uint32_t gs = hi & SOAK_SEQ_MAX;

	c->reads++;
	if (got == want || (sl->pending && got == soak_record(t, sl->pending, off))) {
		c->ok++;
		return;
	}
	if (!soak_bad(c) && !c->ones) {
		c->first_off = off;
		c->first_want = want;
		c->first_got = got;
	}
	if (hi == SOAK_POISON || lo == SOAK_POISON)
		c->poison++;
	else if (got == ALL_ONES)
		c->ones++;
	else if (!got)
		c->zero++;
	else if (hi >> 28 == t && gs && gs < sl->acked && lo == churn_hash(t, gs, off))
		c->stale++;
	else if (hi == (uint32_t)(want >> 32) || lo == (uint32_t)want)
		c->torn++;
	else
		c->other++;
}

static inline uint64_t soak_next(uint64_t *x)
{
	*x ^= *x << 13;
	*x ^= *x >> 7;
	*x ^= *x << 17;
	return *x;
}

static void soak_write(struct soak_thread *th, uint64_t k)
{
	uint64_t w = k / th->slots, s = k % th->slots, rec, got;
	uint64_t off = churn_offset(th->granule, th->stride, w, s, th->index);
	struct soak_slot *sl = &th->slot[k], before = *sl;
	uint32_t seq;

	if (th->seq >= SOAK_SEQ_MAX)
		return; /* out of sequence numbers: only verify from now on */
	seq = (uint32_t)++th->seq;
	rec = soak_record(th->index, seq, off);
	if (soak_next(&th->rng) & 1) {
		wr(dev.bar0, off, 4, (uint32_t)rec);
		wr(dev.bar0, off + 4, 4, rec >> 32);
		th->split_writes++;
	} else {
		wr(dev.bar0, off, 8, rec);
	}
	th->writes++;
	got = rd(dev.bar0, off, 8);
	if (got == rec) {
		sl->acked = seq;
		sl->pending = 0;
		th->acked++;
		return;
	}
	th->unacked++;
	before.pending = 0;
	soak_compare(&th->ack, th->index, off, &before, got);
	sl->pending = seq;
}

static void soak_sweep(struct soak_thread *th, struct soak_check *c)
{
	uint64_t i, w, s, first = soak_next(&th->rng) % th->nwin, off;

	for (i = 0; i < th->nwin; i++) {
		w = (first + i) % th->nwin;
		for (s = 0; s < th->slots; s++) {
			off = churn_offset(th->granule, th->stride, w, s, th->index);
			soak_compare(c, th->index, off, &th->slot[w * th->slots + s],
				     rd(dev.bar0, off, 8));
		}
	}
}

static void add_soak_check(struct line *l, const char *key, const struct soak_check *c)
{
	add(l, ",\"%s\":{\"reads\":%" PRIu64 ",\"ok\":%" PRIu64 ",\"poison\":%" PRIu64
	       ",\"ones\":%" PRIu64 ",\"zero\":%" PRIu64 ",\"stale\":%" PRIu64 ",\"torn\":%" PRIu64
	       ",\"other\":%" PRIu64, key, c->reads, c->ok, c->poison, c->ones, c->zero, c->stale,
	    c->torn, c->other);
	if (soak_bad(c) || c->ones)
		add(l, ",\"first_bad\":{\"offset\":\"0x%" PRIx64 "\",\"want\":\"0x%" PRIx64
		       "\",\"got\":\"0x%" PRIx64 "\"}", c->first_off, c->first_want, c->first_got);
	add(l, "}");
}

static void soak_add(struct soak_check *sum, const struct soak_check *c)
{
	if (!soak_bad(sum) && !sum->ones && (soak_bad(c) || c->ones)) {
		sum->first_off = c->first_off;
		sum->first_want = c->first_want;
		sum->first_got = c->first_got;
	}
	sum->reads += c->reads;
	sum->ok += c->ok;
	sum->poison += c->poison;
	sum->ones += c->ones;
	sum->zero += c->zero;
	sum->stale += c->stale;
	sum->torn += c->torn;
	sum->other += c->other;
}

/* Until the deadline: a first pass writes every record in order, then each pass writes as
 * many records as the thread owns, chosen at random (so a record may be written several times
 * between two checks, or not at all), and sweeps all of them from a random window on. Thread
 * 0 prints a progress event every 30 s, for long runs. */
static void *soak_run(void *arg)
{
	struct soak_thread *th = arg;
	uint64_t n = th->nwin * th->slots, k, next_progress = now_ns() + SOAK_PROGRESS_NS;
	cpu_set_t set;
	struct line l;

	if ((int)th->index < th->ncpus) {
		CPU_ZERO(&set);
		CPU_SET(th->index, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	th->cpu = sched_getcpu();
	for (k = 0; k < n; k++)
		soak_write(th, k);
	soak_sweep(th, &th->c);
	th->passes = 1;
	while (now_ns() < th->end_ns) {
		for (k = 0; k < n; k++)
			soak_write(th, soak_next(&th->rng) % n);
		soak_sweep(th, &th->c);
		th->passes++;
		if (th->index == 0 && now_ns() >= next_progress) {
			next_progress += SOAK_PROGRESS_NS;
			begin_event(&l, "soak-progress");
			add(&l, ",\"thread\":0,\"passes\":%" PRIu64 ",\"writes\":%" PRIu64
				",\"bad\":%" PRIu64, th->passes, th->writes,
			    soak_bad(&th->c) + soak_bad(&th->ack));
			add_counters(&l);
			emit(&l);
		}
	}
	return NULL;
}

/* Two soak threads, pinned to vCPU 0 and 1, for devmodel.run_ms over windows
 * 0 .. devmodel.windows-1 (event "soaked" when they stop). Then the guest touches nothing but
 * BAR2 until every lease granted so far has been revoked (GRANTS == REVOKES; the host has the
 * lender evict everything; devmodel.wait_ms bounds the wait; event "revoked"), and one final
 * sweep reads every record of both threads, paging the windows back in. One line per thread,
 * then a summary. */
static int test_soak(void)
{
	struct soak_thread th[SOAK_THREADS];
	struct soak_check final, sweeps, acks;
	uint64_t granule, stride, nwin = opt.windows, slots = opt.slots, t0, ms, wait_ms = 0;
	uint64_t grants = 0, revokes = 0, writes = 0, acked = 0, unacked = 0, passes = 0, bad;
	long grants_off = counter_offset("grants"), revokes_off = counter_offset("revokes");
	int ncpus = get_nprocs(), started = 0, i, waited_out = 0;
	struct line l;

	if (need_bar0("soak"))
		return 1;
	if (!dev.bar2 || grants_off < 0 || revokes_off < 0)
		return fail_line("soak", "cannot map BAR2 of %s", dev.name);
	granule = rd(dev.bar2, GRANULE_REG, 4);
	stride = slots ? (granule / slots) & ~15ull : 0;
	if (!granule || !nwin || nwin * granule > dev.bar0_size || stride < 32)
		return fail_line("soak", "bad geometry: granule %" PRIu64 ", %" PRIu64 " windows, "
				 "%" PRIu64 " slots", granule, nwin, slots);
	memset(th, 0, sizeof(th));
	for (i = 0; i < SOAK_THREADS; i++) {
		th[i].slot = calloc(nwin * slots, sizeof(*th[i].slot));
		if (!th[i].slot) {
			while (i--)
				free(th[i].slot);
			return fail_line("soak", "out of memory");
		}
	}
	begin_event(&l, "soaking");
	add(&l, ",\"threads\":%d,\"cpus\":%d,\"windows\":%" PRIu64 ",\"slots\":%" PRIu64
		",\"run_ms\":%" PRIu64, SOAK_THREADS, ncpus, nwin, slots, opt.run_ms);
	add_counters(&l);
	emit(&l);
	t0 = now_ns();
	for (i = 0; i < SOAK_THREADS; i++) {
		th[i].index = (unsigned)i;
		th[i].ncpus = ncpus;
		th[i].granule = granule;
		th[i].stride = stride;
		th[i].nwin = nwin;
		th[i].slots = slots;
		th[i].end_ns = t0 + opt.run_ms * 1000000;
		th[i].rng = (t0 ^ (0x9e3779b97f4a7c15ull * (uint64_t)(i + 1))) | 1;
		if (pthread_create(&th[i].id, NULL, soak_run, &th[i]))
			break;
		started++;
	}
	for (i = 0; i < started; i++)
		pthread_join(th[i].id, NULL);
	ms = (now_ns() - t0) / 1000000;
	begin_event(&l, "soaked");
	add(&l, ",\"ms\":%" PRIu64, ms);
	add_counters(&l);
	emit(&l);
	t0 = now_ns();
	for (;;) {
		grants = rd(dev.bar2, (uint64_t)grants_off, 8);
		revokes = rd(dev.bar2, (uint64_t)revokes_off, 8);
		wait_ms = (now_ns() - t0) / 1000000;
		if (grants == revokes)
			break;
		if (wait_ms > opt.wait_ms) {
			waited_out = 1;
			break;
		}
		usleep(2000);
	}
	begin_event(&l, "revoked");
	add(&l, ",\"ms\":%" PRIu64 ",\"timed_out\":%s,\"grants\":%" PRIu64 ",\"revokes\":%" PRIu64,
	    wait_ms, waited_out ? "true" : "false", grants, revokes);
	add_counters(&l);
	emit(&l);
	memset(&final, 0, sizeof(final));
	memset(&sweeps, 0, sizeof(sweeps));
	memset(&acks, 0, sizeof(acks));
	for (i = 0; i < started; i++)
		soak_sweep(&th[i], &final);
	for (i = 0; i < started; i++) {
		begin(&l, "soak");
		add(&l, ",\"ok\":%s,\"thread\":%d,\"cpu\":%d,\"passes\":%" PRIu64
			",\"writes\":%" PRIu64 ",\"split_writes\":%" PRIu64 ",\"acked\":%" PRIu64
			",\"unacked\":%" PRIu64,
		    soak_bad(&th[i].c) || soak_bad(&th[i].ack) || !th[i].passes ? "false" : "true",
		    i, th[i].cpu, th[i].passes, th[i].writes, th[i].split_writes, th[i].acked,
		    th[i].unacked);
		add_soak_check(&l, "sweeps", &th[i].c);
		add_soak_check(&l, "acks", &th[i].ack);
		emit(&l);
		soak_add(&sweeps, &th[i].c);
		soak_add(&acks, &th[i].ack);
		writes += th[i].writes;
		acked += th[i].acked;
		unacked += th[i].unacked;
		passes += th[i].passes;
		free(th[i].slot);
	}
	bad = soak_bad(&sweeps) + soak_bad(&acks) + soak_bad(&final);
	begin(&l, "soak");
	add(&l, ",\"ok\":%s,\"summary\":true,\"threads\":%d,\"cpus\":%d,\"windows\":%" PRIu64
		",\"slots\":%" PRIu64 ",\"ms\":%" PRIu64 ",\"records\":%" PRIu64
		",\"passes\":%" PRIu64 ",\"writes\":%" PRIu64 ",\"acked\":%" PRIu64
		",\"unacked\":%" PRIu64 ",\"bad\":%" PRIu64 ",\"revoke_wait_timed_out\":%s",
	    started == SOAK_THREADS && !bad && !waited_out ? "true" : "false", started, ncpus,
	    nwin, slots, ms, nwin * slots * (uint64_t)started, passes, writes, acked, unacked, bad,
	    waited_out ? "true" : "false");
	add_soak_check(&l, "sweeps", &sweeps);
	add_soak_check(&l, "acks", &acks);
	add_soak_check(&l, "final", &final);
	add_counters(&l);
	emit(&l);
	return started != SOAK_THREADS || bad || waited_out;
}

/* ---- bench: trapped-access latency and throughput */

static const struct bench_op {
	const char *name;
	int bar;
	unsigned size, write;
} bench_ops[] = {
	{"read4", 0, 4, 0},  {"read8", 0, 8, 0},     {"write4", 0, 4, 1},
	{"write8", 0, 8, 1}, {"reg_read4", 2, 4, 0},
};
#define BENCH_MAX_THREADS 4

struct bench_thread {
	pthread_t id;
	int index;
	const struct bench_op *op;
	uint64_t iters, start, end;
	pthread_barrier_t *barrier;
};

static volatile uint8_t *bench_bar(const struct bench_op *op)
{
	return op->bar == 2 ? dev.bar2 : dev.bar0;
}

/* Thread `index` uses its own page of BAR0 (BAR2's first register for reg_read4). */
static uint64_t bench_offset(const struct bench_op *op, int index)
{
	return op->bar == 2 ? 0 : 0x1000u * (unsigned)(index + 1);
}

static void *bench_run(void *arg)
{
	struct bench_thread *t = arg;
	volatile uint8_t *bar = bench_bar(t->op);
	uint64_t off = bench_offset(t->op, t->index), i;
	volatile uint64_t sink = 0;
	cpu_set_t set;

	CPU_ZERO(&set);
	CPU_SET(t->index, &set);
	sched_setaffinity(0, sizeof(set), &set);
	pthread_barrier_wait(t->barrier);
	t->start = now_ns();
	if (t->op->write) {
		for (i = 0; i < t->iters; i++)
			wr(bar, off, t->op->size, i);
		sink += rd(bar, off, 4); /* the posted writes have reached the device model */
	} else {
		for (i = 0; i < t->iters; i++)
			sink += rd(bar, off, t->op->size);
	}
	t->end = now_ns();
	(void)sink;
	return NULL;
}

static int cmp_u64(const void *a, const void *b)
{
	uint64_t x = *(const uint64_t *)a, y = *(const uint64_t *)b;

	return x < y ? -1 : x > y;
}

/* One access at a time, each timed on its own: the distribution of what one trapped access
 * costs the vCPU (for posted writes: until the vCPU may go on, not until the device has it). */
static void bench_latency(const struct bench_op *op, uint64_t iters, uint64_t *samples)
{
	volatile uint8_t *bar = bench_bar(op);
	uint64_t off = bench_offset(op, 0), i, t0, sum = 0;
	volatile uint64_t sink = 0;
	struct line l;

	for (i = 0; i < iters; i++) {
		t0 = now_ns();
		if (op->write)
			wr(bar, off, op->size, i);
		else
			sink += rd(bar, off, op->size);
		samples[i] = now_ns() - t0;
		sum += samples[i];
	}
	if (op->write)
		sink += rd(bar, off, 4);
	(void)sink;
	qsort(samples, iters, sizeof(samples[0]), cmp_u64);
	begin(&l, "bench");
	add(&l, ",\"ok\":true,\"op\":\"%s\",\"bar\":%d,\"size\":%u,\"kind\":\"latency\""
		",\"iters\":%" PRIu64 ",\"min_ns\":%" PRIu64 ",\"p50_ns\":%" PRIu64
		",\"p90_ns\":%" PRIu64 ",\"p99_ns\":%" PRIu64 ",\"max_ns\":%" PRIu64
		",\"mean_ns\":%" PRIu64,
	    op->name, op->bar, op->size, iters, samples[0], samples[iters / 2],
	    samples[iters * 9 / 10], samples[iters * 99 / 100], samples[iters - 1], sum / iters);
	emit(&l);
}

/* `nthreads` threads, one per vCPU, each running `iters` accesses back to back, all released
 * at once: aggregate accesses per second and bytes per second over the common wall time. */
static int bench_throughput(const struct bench_op *op, uint64_t iters, int nthreads)
{
	struct bench_thread th[BENCH_MAX_THREADS];
	pthread_barrier_t barrier;
	uint64_t first = ~0ull, last = 0, wall, total;
	double aps;
	struct line l;
	int i, started = 0;

	pthread_barrier_init(&barrier, NULL, (unsigned)nthreads);
	memset(th, 0, sizeof(th));
	for (i = 0; i < nthreads; i++) {
		th[i].index = i;
		th[i].op = op;
		th[i].iters = iters;
		th[i].barrier = &barrier;
		if (pthread_create(&th[i].id, NULL, bench_run, &th[i]))
			break;
		started++;
	}
	if (started != nthreads) {
		/* The barrier would never open: nothing sensible left to do in a test program. */
		fail_line("bench", "could not start %d threads", nthreads);
		exit(1);
	}
	for (i = 0; i < nthreads; i++) {
		pthread_join(th[i].id, NULL);
		first = th[i].start < first ? th[i].start : first;
		last = th[i].end > last ? th[i].end : last;
	}
	pthread_barrier_destroy(&barrier);
	wall = last > first ? last - first : 1;
	total = iters * (uint64_t)nthreads;
	aps = (double)total * 1e9 / (double)wall;
	begin(&l, "bench");
	add(&l, ",\"ok\":true,\"op\":\"%s\",\"bar\":%d,\"size\":%u,\"kind\":\"throughput\""
		",\"threads\":%d,\"iters\":%" PRIu64 ",\"wall_ns\":%" PRIu64
		",\"ns_per_access\":%" PRIu64 ",\"accesses_per_s\":%.0f,\"mb_per_s\":%.3f",
	    op->name, op->bar, op->size, nthreads, iters, wall, wall / total, aps,
	    aps * op->size / 1e6);
	emit(&l);
	return 0;
}

/* Latency of each kind of trapped access, then throughput with 1 .. (vCPUs, at most 4)
 * threads; qemu-configs/bench-guest boots guests with one and two vCPUs and tabulates it. */
static int test_bench(void)
{
	uint64_t iters = opt.iters ? opt.iters : 1, *samples;
	int ncpus = get_nprocs(), n;
	size_t k;

	if (need_bar0("bench"))
		return 1;
	if (!dev.bar2)
		return fail_line("bench", "cannot map BAR2 of %s", dev.name);
	samples = malloc(iters * sizeof(*samples));
	if (!samples)
		return fail_line("bench", "no memory for %" PRIu64 " samples", iters);
	if (ncpus > BENCH_MAX_THREADS)
		ncpus = BENCH_MAX_THREADS;
	for (k = 0; k < sizeof(bench_ops) / sizeof(bench_ops[0]); k++) {
		bench_latency(&bench_ops[k], iters, samples);
		for (n = 1; n <= ncpus; n++)
			bench_throughput(&bench_ops[k], iters, n);
	}
	free(samples);
	return 0;
}

/* ---- xbench, xfault: devmodel's trapped reads next to a minimal C ioreq server's (Xen) */

/* What one series of timed reads came to; `v` is sorted in place. */
struct xstats {
	uint64_t count, min, median, p99, max, mean;
};

static void xstats_of(uint64_t *v, uint64_t n, struct xstats *st)
{
	uint64_t i, sum = 0;

	memset(st, 0, sizeof(*st));
	if (!n)
		return;
	qsort(v, n, sizeof(v[0]), cmp_u64);
	for (i = 0; i < n; i++)
		sum += v[i];
	st->count = n;
	st->min = v[0];
	st->median = v[n / 2];
	st->p99 = v[n * 99 / 100];
	st->max = v[n - 1];
	st->mean = sum / n;
}

static void add_xstats(struct line *l, const char *key, const struct xstats *st)
{
	add(l, ",\"%s\":{\"count\":%" PRIu64 ",\"median_ns\":%" PRIu64 ",\"p99_ns\":%" PRIu64
	       ",\"min_ns\":%" PRIu64 ",\"max_ns\":%" PRIu64 ",\"mean_ns\":%" PRIu64 "}",
	    key, st->count, st->median, st->p99, st->min, st->max, st->mean);
}

/* The peer's function, found (and enabled) on first use; 0 when there is none. */
static int find_peer(void)
{
	if (!opt.peer_vendor)
		return 0;
	if (!peer.found)
		find_device(&peer, opt.peer_vendor, opt.peer_device);
	return peer.found && peer.bar0;
}

/* The targets: devmodel's register block (BAR2, trapped, answered from the device's registers),
 * its lent memory (BAR0, trapped, a resident window of the lease engine) and the peer's BAR0. */
enum { X_BAR2, X_BAR0, X_PEER, X_TARGETS };
static const char *const xtarget_names[X_TARGETS] = {"devmodel_bar2", "devmodel_bar0",
						     "peer_bar0"};
#define X_SIZES 2
#define X_SERIES (X_TARGETS * X_SIZES)

struct xbench_thread {
	pthread_t id;
	int index, cpu, pin;
	uint64_t rounds, per_round, n[X_SERIES], mismatches[X_SERIES];
	uint64_t *samples[X_SERIES];
	pthread_barrier_t *barrier;
};

static volatile uint8_t *xtarget_bar(int t)
{
	return t == X_BAR2 ? dev.bar2 : t == X_BAR0 ? dev.bar0 : peer.bar0;
}

/* Thread `index` reads its own page of devmodel's BAR0; BAR2 and the peer at offset 0. */
static uint64_t xtarget_offset(int t, int index)
{
	return t == X_BAR0 ? 0x1000u * (unsigned)(index + 1) : 0;
}

/* Round r reads each target in turn, K times per size, all timed one by one; odd rounds go
 * the other way round (targets and sizes), so that neither server always follows the other.
 * Every value is checked against what the target held before the timing started. A warm-up
 * round, untimed, comes first (first touches: page tables, the lease of devmodel's window). */
static void *xbench_run(void *arg)
{
	struct xbench_thread *th = arg;
	uint64_t want[X_SERIES], r, k, i, t0, dt, got;
	int step, t, z, s, targets = peer.found && peer.bar0 ? X_TARGETS : X_PEER;
	cpu_set_t set;

	if (th->pin) {
		CPU_ZERO(&set);
		CPU_SET(th->index, &set);
		sched_setaffinity(0, sizeof(set), &set);
	}
	th->cpu = sched_getcpu();
	wr(dev.bar0, xtarget_offset(X_BAR0, th->index), 8,
	   0x5851000000000000ull | (uint64_t)th->index);
	for (s = 0; s < X_SERIES; s++)
		want[s] = rd(xtarget_bar(s / X_SIZES), xtarget_offset(s / X_SIZES, th->index),
			     4u << (s % X_SIZES));
	if (th->barrier)
		pthread_barrier_wait(th->barrier);
	for (r = 0; r <= th->rounds; r++) {
		for (step = 0; step < targets * X_SIZES; step++) {
			i = (r & 1) ? (uint64_t)(targets * X_SIZES - 1 - step) : (uint64_t)step;
			t = (int)i / X_SIZES;
			z = (int)i % X_SIZES;
			s = t * X_SIZES + z;
			for (k = 0; k < th->per_round; k++) {
				t0 = now_ns();
				got = rd(xtarget_bar(t), xtarget_offset(t, th->index), 4u << z);
				dt = now_ns() - t0;
				if (!r)
					continue; /* the warm-up round */
				th->samples[s][th->n[s]++] = dt;
				th->mismatches[s] += got != want[s];
			}
		}
	}
	return NULL;
}

/* One variant: `nthreads` threads (one per vCPU) at once; one line per target and size with
 * every thread's samples together, then a summary with devmodel's medians over the peer's. */
static int xbench_variant(int nthreads, uint64_t rounds, uint64_t per_round)
{
	struct xbench_thread th[2];
	pthread_barrier_t barrier;
	uint64_t *all, total, mismatches = 0, peer_median[X_SIZES] = {0}, n;
	struct xstats st[X_SERIES];
	struct line l;
	int i, s, started = 0, ok;

	memset(th, 0, sizeof(th));
	for (i = 0; i < nthreads; i++) {
		th[i].index = i;
		th[i].pin = 1;
		th[i].rounds = rounds;
		th[i].per_round = per_round;
		th[i].barrier = nthreads > 1 ? &barrier : NULL;
		for (s = 0; s < X_SERIES; s++) {
			th[i].samples[s] = malloc(rounds * per_round * sizeof(uint64_t));
			if (!th[i].samples[s])
				return fail_line("xbench", "no memory for the samples");
		}
	}
	if (nthreads > 1) {
		pthread_barrier_init(&barrier, NULL, (unsigned)nthreads);
		for (i = 0; i < nthreads; i++) {
			if (pthread_create(&th[i].id, NULL, xbench_run, &th[i])) {
				/* The barrier would never open. */
				fail_line("xbench", "could not start %d threads", nthreads);
				exit(1);
			}
			started++;
		}
		for (i = 0; i < started; i++)
			pthread_join(th[i].id, NULL);
		pthread_barrier_destroy(&barrier);
	} else {
		xbench_run(&th[0]);
	}
	all = malloc((size_t)nthreads * rounds * per_round * sizeof(uint64_t));
	if (!all)
		return fail_line("xbench", "no memory for the samples");
	for (s = 0; s < X_SERIES; s++) {
		uint64_t bad = 0;

		for (total = 0, i = 0; i < nthreads; i++) {
			memcpy(all + total, th[i].samples[s], th[i].n[s] * sizeof(uint64_t));
			total += th[i].n[s];
			bad += th[i].mismatches[s];
		}
		xstats_of(all, total, &st[s]);
		if (!total)
			continue;
		mismatches += bad;
		if (s / X_SIZES == X_PEER)
			peer_median[s % X_SIZES] = st[s].median;
		begin(&l, "xbench");
		add(&l, ",\"ok\":%s,\"vcpus\":%d,\"target\":\"%s\",\"size\":%u,\"mismatches\":%" PRIu64,
		    bad ? "false" : "true", nthreads, xtarget_names[s / X_SIZES],
		    4u << (s % X_SIZES), bad);
		add_xstats(&l, "reads", &st[s]);
		emit(&l);
	}
	ok = !mismatches && st[0].count;
	begin(&l, "xbench");
	add(&l, ",\"ok\":%s,\"summary\":true,\"vcpus\":%d,\"rounds\":%" PRIu64
		",\"per_round\":%" PRIu64 ",\"cpus\":[",
	    ok ? "true" : "false", nthreads, rounds, per_round);
	for (i = 0; i < nthreads; i++)
		add(&l, "%s%d", i ? "," : "", th[i].cpu);
	add(&l, "],\"devmodel\":\"%s\",\"peer\":\"%s\",\"mismatches\":%" PRIu64 ",\"ratio\":{",
	    dev.name, peer.found ? peer.name : "", mismatches);
	for (n = 0, s = 0; s < X_PEER * X_SIZES; s++) {
		if (!peer_median[s % X_SIZES] || !st[s].count)
			continue;
		add(&l, "%s\"%s_read%u\":%.2f", n++ ? "," : "", xtarget_names[s / X_SIZES],
		    4u << (s % X_SIZES), (double)st[s].median / (double)peer_median[s % X_SIZES]);
	}
	add(&l, "}");
	emit(&l);
	for (i = 0; i < nthreads; i++)
		for (s = 0; s < X_SERIES; s++)
			free(th[i].samples[s]);
	free(all);
	return !ok;
}

/* Trapped reads of 4 and 8 bytes, each timed on its own, of devmodel's BAR2 and BAR0 and of
 * the peer's BAR0 (devmodel.peer), in interleaved rounds: one vCPU, then one thread per vCPU
 * at once (devmodel answers each vCPU's slot in its own worker; the peer has one thread). */
static int test_xbench(void)
{
	uint64_t rounds = opt.rounds ? opt.rounds : 20, per_round = opt.per_round;
	int failed, ncpus = get_nprocs();

	if (need_bar0("xbench"))
		return 1;
	if (!dev.bar2)
		return fail_line("xbench", "cannot map BAR2 of %s", dev.name);
	if (opt.peer_vendor && !find_peer())
		return fail_line("xbench", "no peer function %04x:%04x (or its BAR0 does not map)",
				 opt.peer_vendor, opt.peer_device);
	if (peer.found && rd(peer.bar0, 0, 4) != PEER_MAGIC)
		return fail_line("xbench", "the peer's BAR0 reads 0x%08" PRIx64
				 ", not PEER (0x52454550)", rd(peer.bar0, 0, 4));
	if (rd(dev.bar2, 0, 4) != BAR2_MAGIC)
		return fail_line("xbench", "devmodel's BAR2 reads 0x%08" PRIx64
				 ", not DMDL (0x4c444d44)", rd(dev.bar2, 0, 4));
	if (!per_round)
		per_round = 1;
	failed = xbench_variant(1, rounds, per_round);
	if (ncpus >= 2)
		failed |= xbench_variant(2, rounds, per_round);
	return failed;
}

/* The fault next to the resident read: the first read of each of devmodel.windows lease
 * windows in turn, round after round, while the lender has room for fewer (the reference
 * lender with little VRAM): each such read waits for a page-in, whose eviction of another
 * window the lender does meanwhile. BAR2's FAULTS counter, read around each first read (not
 * timed), says whether it waited; then devmodel.per_round resident reads of the same window
 * and as many of the peer's BAR0. 8-byte reads. */
static int test_xfault(void)
{
	uint64_t rounds = opt.fault_rounds ? opt.fault_rounds : 1;
	uint64_t k = opt.per_round ? opt.per_round : 1;
	uint64_t granule, nwin = opt.windows, r, w, i, f0, t0, dt, n_fault = 0, n_first_res = 0;
	uint64_t n_res = 0, n_peer = 0, *fault, *first_res, *res, *peer_s;
	long faults_off = counter_offset("faults");
	struct xstats sf, sfr, sr, sp;
	volatile uint64_t sink = 0;
	struct line l;
	int ok;

	if (need_bar0("xfault"))
		return 1;
	if (!dev.bar2 || faults_off < 0)
		return fail_line("xfault", "cannot map BAR2 of %s", dev.name);
	if (opt.peer_vendor && !find_peer())
		return fail_line("xfault", "no peer function %04x:%04x", opt.peer_vendor,
				 opt.peer_device);
	granule = rd(dev.bar2, GRANULE_REG, 4);
	if (!granule || !nwin || nwin * granule > dev.bar0_size)
		return fail_line("xfault", "bad geometry: granule %" PRIu64 ", %" PRIu64 " windows",
				 granule, nwin);
	fault = malloc(rounds * nwin * sizeof(uint64_t));
	first_res = malloc(rounds * nwin * sizeof(uint64_t));
	res = malloc(rounds * nwin * k * sizeof(uint64_t));
	peer_s = malloc(rounds * nwin * k * sizeof(uint64_t));
	if (!fault || !first_res || !res || !peer_s)
		return fail_line("xfault", "no memory for the samples");
	for (r = 0; r < rounds; r++) {
		for (w = 0; w < nwin; w++) {
			f0 = rd(dev.bar2, (uint64_t)faults_off, 8);
			t0 = now_ns();
			sink += rd(dev.bar0, w * granule + 0x100, 8);
			dt = now_ns() - t0;
			if (rd(dev.bar2, (uint64_t)faults_off, 8) != f0)
				fault[n_fault++] = dt;
			else
				first_res[n_first_res++] = dt;
			for (i = 0; i < k; i++) {
				t0 = now_ns();
				sink += rd(dev.bar0, w * granule + 0x100, 8);
				res[n_res++] = now_ns() - t0;
			}
			for (i = 0; peer.found && i < k; i++) {
				t0 = now_ns();
				sink += rd(peer.bar0, 8, 8);
				peer_s[n_peer++] = now_ns() - t0;
			}
		}
	}
	(void)sink;
	xstats_of(fault, n_fault, &sf);
	xstats_of(first_res, n_first_res, &sfr);
	xstats_of(res, n_res, &sr);
	xstats_of(peer_s, n_peer, &sp);
	ok = n_fault > 0;
	begin(&l, "xfault");
	add(&l, ",\"ok\":%s,\"windows\":%" PRIu64 ",\"granule\":%" PRIu64 ",\"rounds\":%" PRIu64
		",\"per_round\":%" PRIu64 ",\"size\":8,\"peer\":\"%s\"",
	    ok ? "true" : "false", nwin, granule, rounds, k, peer.found ? peer.name : "");
	add_xstats(&l, "fault", &sf);
	add_xstats(&l, "first_read_resident", &sfr);
	add_xstats(&l, "resident", &sr);
	add_xstats(&l, "peer", &sp);
	if (sr.median)
		add(&l, ",\"fault_over_resident\":%.1f", (double)sf.median / (double)sr.median);
	if (sp.median)
		add(&l, ",\"resident_over_peer\":%.2f,\"fault_over_peer\":%.1f",
		    (double)sr.median / (double)sp.median, (double)sf.median / (double)sp.median);
	add_counters(&l);
	emit(&l);
	free(fault);
	free(first_res);
	free(res);
	free(peer_s);
	return !ok;
}


/* ---- irq: the device's interrupts, seen by the guest's kernel */

/* BAR2's interrupt registers (devmodel/pci/registers.py; tests/qemu/test_bartest_source.py
 * checks these against it). */
#define INTERRUPTS_REG 0xa0u
#define DOORBELL_REG 0xa8u
#define IRQ_STATUS_REG 0xacu
/* Config space: the command register's high byte holds Interrupt Disable (bit 10 -> bit 2),
 * the status register's low byte Interrupt Status (bit 3). */
#define CFG_COMMAND_HI 5
#define CFG_STATUS_LO 6
#define CMD_HI_INTX_DISABLE 0x04u
#define STATUS_LO_INTERRUPT 0x08u
#define IRQ_WAIT_MS 30000

/* Loads a module from the initramfs (build-initramfs unpacks the guest kernel's uio modules
 * into /lib/modules); 0 if loaded now or before. */
static int load_module(const char *name)
{
	char path[128];
	long rc;
	int fd, err;

	snprintf(path, sizeof(path), "/lib/modules/%s.ko", name);
	fd = open(path, O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return errno;
	rc = syscall(SYS_finit_module, fd, "", 0);
	err = rc ? errno : 0;
	close(fd);
	return err == EEXIST ? 0 : err;
}

static int cfg_byte(int fd, unsigned off)
{
	uint8_t b;

	return pread(fd, &b, 1, off) == 1 ? b : -1;
}

static int set_intx_disable(int fd, int disable)
{
	int hi = cfg_byte(fd, CFG_COMMAND_HI);
	uint8_t b;

	if (hi < 0)
		return -1;
	b = disable ? (uint8_t)(hi | CMD_HI_INTX_DISABLE) : (uint8_t)(hi & ~CMD_HI_INTX_DISABLE);
	return pwrite(fd, &b, 1, CFG_COMMAND_HI) == 1 ? 0 : -1;
}

/* INTx end to end, with no driver of our own: bind the function to uio_pci_generic (which
 * needs PCI 2.3 INTx masking: its handler claims the interrupt only if the config status
 * register's Interrupt Status bit is set, and masks it with the command register's Interrupt
 * Disable bit), then per round: unmask the pin, ring BAR2's DOORBELL, wait for /dev/uioN to
 * count the interrupt, check what the handler saw and did, acknowledge in IRQ_STATUS. Reports
 * uio's count after each round (1, 2, ...: an interrupt storm or a lost one shows) and
 * BAR2's INTERRUPTS before and after. Then one more doorbell while the pin is masked: held
 * (the device asserts it: status set) until the pin is unmasked, then delivered once. */
static int test_irq(void)
{
	char buf[400], uio[300] = "";
	uint64_t before, after, r, received = 0, flagged = 0, cleared = 0;
	uint32_t icount;
	struct pollfd pfd;
	struct dirent *e;
	struct line l;
	DIR *dir;
	int err, fd, cfg, uiofd, ok, st, hi, masked_held, masked_late;

	if (!dev.found)
		return fail_line("irq", "no PCI function %04x:%04x", opt.vendor, opt.device);
	if (!dev.bar2)
		return fail_line("irq", "cannot map BAR2 of %s", dev.name);
	if ((err = load_module("uio")) || (err = load_module("uio_pci_generic")))
		return fail_line("irq", "cannot load the uio modules from /lib/modules: %s "
				 "(qemu-configs/provision fetches them)", strerror(err));
	fd = open("/sys/bus/pci/drivers/uio_pci_generic/new_id", O_WRONLY);
	if (fd < 0)
		return fail_line("irq", "no uio_pci_generic driver in sysfs: %s", strerror(errno));
	snprintf(buf, sizeof(buf), "%04x %04x", opt.vendor, opt.device);
	if (write(fd, buf, strlen(buf)) < 0 && errno != EEXIST) {
		err = errno;
		close(fd);
		return fail_line("irq", "new_id: %s", strerror(err));
	}
	close(fd);
	snprintf(buf, sizeof(buf), "%s/uio", dev.path);
	dir = opendir(buf);
	while (dir && (e = readdir(dir)))
		if (!strncmp(e->d_name, "uio", 3))
			snprintf(uio, sizeof(uio), "/dev/%s", e->d_name);
	if (dir)
		closedir(dir);
	if (!uio[0])
		return fail_line("irq", "uio_pci_generic did not bind %s (see the kernel log)",
				 dev.name);
	uiofd = open(uio, O_RDWR);
	snprintf(buf, sizeof(buf), "%s/config", dev.path);
	cfg = open(buf, O_RDWR);
	if (uiofd < 0 || cfg < 0)
		return fail_line("irq", "cannot open %s or %s/config", uio, dev.path);
	begin(&l, "irq");
	if (read_file(dev.path, "irq", buf, sizeof(buf)) < 0)
		buf[0] = 0;
	add(&l, ",\"uio\":\"%s\",\"irq\":%lu", uio, strtoul(buf, NULL, 10));
	before = rd(dev.bar2, INTERRUPTS_REG, 8);
	add(&l, ",\"icounts\":[");
	for (r = 0; r < opt.irqs; r++) {
		if (set_intx_disable(cfg, 0))
			break;
		wr(dev.bar2, DOORBELL_REG, 4, 0);
		pfd.fd = uiofd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, IRQ_WAIT_MS) != 1 || read(uiofd, &icount, 4) != 4)
			break;
		received++;
		add(&l, "%s%" PRIu32, r ? "," : "", icount);
		/* What uio_pci_generic's handler saw and did: the status bit set (so the interrupt
		 * was claimed), the pin masked. IRQ_STATUS says the device still asserts it. */
		st = cfg_byte(cfg, CFG_STATUS_LO);
		hi = cfg_byte(cfg, CFG_COMMAND_HI);
		if (st >= 0 && hi >= 0 && (st & STATUS_LO_INTERRUPT) && (hi & CMD_HI_INTX_DISABLE) &&
		    rd(dev.bar2, IRQ_STATUS_REG, 4) == 1)
			flagged++;
		wr(dev.bar2, IRQ_STATUS_REG, 4, 1);
		st = cfg_byte(cfg, CFG_STATUS_LO);
		if (st >= 0 && !(st & STATUS_LO_INTERRUPT) && rd(dev.bar2, IRQ_STATUS_REG, 4) == 0)
			cleared++;
	}
	add(&l, "]");
	/* Rung while the pin is masked: the device asserts it (IRQ_STATUS, Interrupt Status) but
	 * the line stays down; unmasking the pin must then deliver it. */
	masked_held = masked_late = 0;
	if (received == opt.irqs && !set_intx_disable(cfg, 1)) {
		wr(dev.bar2, DOORBELL_REG, 4, 0);
		st = cfg_byte(cfg, CFG_STATUS_LO);
		masked_held = st >= 0 && (st & STATUS_LO_INTERRUPT) &&
			      rd(dev.bar2, IRQ_STATUS_REG, 4) == 1;
		set_intx_disable(cfg, 0);
		pfd.fd = uiofd;
		pfd.events = POLLIN;
		if (poll(&pfd, 1, IRQ_WAIT_MS) == 1 && read(uiofd, &icount, 4) == 4) {
			masked_late = icount == opt.irqs + 1;
			wr(dev.bar2, IRQ_STATUS_REG, 4, 1);
		}
	}
	set_intx_disable(cfg, 0);
	after = rd(dev.bar2, INTERRUPTS_REG, 8);
	ok = received == opt.irqs && flagged == opt.irqs && cleared == opt.irqs &&
	     masked_held && masked_late && after - before == opt.irqs + 1;
	add(&l, ",\"rounds\":%" PRIu64 ",\"received\":%" PRIu64 ",\"flagged\":%" PRIu64
		",\"cleared\":%" PRIu64 ",\"masked_held\":%s,\"masked_delivered\":%s"
		",\"interrupts_before\":%" PRIu64 ",\"interrupts_after\":%" PRIu64 ",\"ok\":%s",
	    opt.irqs, received, flagged, cleared, masked_held ? "true" : "false",
	    masked_late ? "true" : "false", before, after, ok ? "true" : "false");
	emit(&l);
	close(cfg);
	close(uiofd);
	return !ok;
}

/* ---- msi: MSI and MSI-X messages, programmed here, received by the guest's local APIC */

/* Debian's kernels have no VFIO_NOIOMMU and a guest here has no IOMMU, so no stock driver
 * lets userspace make the kernel enable MSI or MSI-X on a function of no known kind. bartest
 * is the driver instead: it writes the messages itself (MSI capability through sysfs
 * `config`, MSI-X table through BAR2) and aims them, physical destination APIC ID 0, at x86
 * Linux system vectors whose handlers only acknowledge and count, and that nothing else sends
 * in a guest that runs no guests of its own: KVM's posted-interrupt vectors (installed
 * whenever the kernel has CONFIG_KVM, which Debian's do, as a module) and the APIC error
 * vector. /proc/interrupts shows their counts (PIN, PIW, NPI, ERR), so each vector's
 * interrupts are counted apart. Vector numbers: arch/x86/include/asm/irq_vectors.h. */
#define MSI_ADDRESS 0xfee00000u
#define MSI_TARGETS 4
#define MSI_WAIT_MS 30000
#define PCI_COMMAND 0x04u
#define CMD_MEMORY_BUS_MASTER 0x0006u
#define PCI_CAP_POINTER 0x34u
#define CAP_ID_MSI 0x05
#define CAP_ID_MSIX 0x11
#define MSI_CTL_ENABLE 0x0001u
#define MSI_CTL_MME 0x0070u
#define MSI_CTL_64BIT 0x0080u
#define MSIX_CTL_ENABLE 0x8000u
#define MSIX_CTL_FMASK 0x4000u
#define MSIX_ENTRY 16u
#define MSIX_CTRL_MASKBIT 1u

static const struct {
	unsigned vector;
	const char *label;
} msi_targets[MSI_TARGETS] = {{0xf2, "PIN"}, {0xf1, "PIW"}, {0xf0, "NPI"}, {0xfe, "ERR"}};

/* Each target's count in /proc/interrupts, summed over the CPUs; -1 if a line is missing. */
static int msi_counts(uint64_t out[MSI_TARGETS])
{
	static char buf[1 << 16];
	char *line, *p, *end;
	int fd, seen = 0;
	ssize_t n;
	size_t len = 0;
	unsigned t, l;

	fd = open("/proc/interrupts", O_RDONLY | O_CLOEXEC);
	if (fd < 0)
		return -1;
	while (len < sizeof(buf) - 1 && (n = read(fd, buf + len, sizeof(buf) - 1 - len)) > 0)
		len += (size_t)n;
	close(fd);
	buf[len] = 0;
	for (line = buf; line && *line; line = strchr(line, '\n') ? strchr(line, '\n') + 1 : NULL) {
		p = line;
		while (*p == ' ')
			p++;
		for (t = 0; t < MSI_TARGETS; t++) {
			l = (unsigned)strlen(msi_targets[t].label);
			if (strncmp(p, msi_targets[t].label, l) || p[l] != ':')
				continue;
			out[t] = 0;
			p += l + 1;
			for (;;) {
				while (*p == ' ')
					p++;
				if (*p < '0' || *p > '9')
					break;
				out[t] += strtoull(p, &end, 10);
				p = end;
			}
			seen |= 1 << t;
		}
	}
	return seen == (1 << MSI_TARGETS) - 1 ? 0 : -1;
}

/* Until target t's count reaches want (polled every millisecond), at most MSI_WAIT_MS. */
static int msi_wait(unsigned t, uint64_t want, uint64_t now[MSI_TARGETS])
{
	struct timespec ms = {0, 1000000};
	uint64_t end = now_ns() + (uint64_t)MSI_WAIT_MS * 1000000u;

	for (;;) {
		if (msi_counts(now) == 0 && now[t] >= want)
			return 1;
		if (now_ns() > end)
			return 0;
		nanosleep(&ms, NULL);
	}
}

static uint32_t cfg_rd(int fd, unsigned off, unsigned size)
{
	uint32_t v = 0;

	return pread(fd, &v, size, off) == (ssize_t)size ? v : 0xffffffffu;
}

static int cfg_wr(int fd, unsigned off, unsigned size, uint32_t v)
{
	return pwrite(fd, &v, size, off) == (ssize_t)size ? 0 : -1;
}

static unsigned find_cap(int fd, unsigned id)
{
	unsigned ptr = cfg_rd(fd, PCI_CAP_POINTER, 1) & 0xfc, hops;

	for (hops = 0; ptr >= 0x40 && hops < 48; hops++) {
		if (cfg_rd(fd, ptr, 1) == id)
			return ptr;
		ptr = cfg_rd(fd, ptr + 1, 1) & 0xfc;
	}
	return 0;
}

static void add_counts(struct line *l, const char *key, const uint64_t a[MSI_TARGETS],
		       const uint64_t b[MSI_TARGETS])
{
	unsigned t;

	add(l, ",\"%s\":[", key);
	for (t = 0; t < MSI_TARGETS; t++)
		add(l, "%s%" PRIu64, t ? "," : "", b[t] - a[t]);
	add(l, "]");
}

/* MSI, then MSI-X, end to end with the guest's kernel as the receiver: MSI aimed at the first
 * target, `irqs` doorbells each awaited in /proc/interrupts; then MSI-X with entry v aimed at
 * target v and rung v+1 times; then entry 1 masked and rung once: held (not counted, its PBA
 * bit set) until unmasked, then delivered once. Every target must end with exactly its
 * interrupts, and BAR2's INTERRUPTS must have counted all of them. Restores the command
 * register and leaves MSI and MSI-X off. */
static int test_msi(void)
{
	uint64_t base[MSI_TARGETS], mid[MSI_TARGETS], now[MSI_TARGETS], fin[MSI_TARGETS];
	uint64_t want[MSI_TARGETS] = {0}, before, after, r, msi_got = 0, pba_masked = 0, pba_after;
	unsigned msi, msix, v, k, cmd, ctl, xctl, data_off, table, toff, pba, nvec, rung = 0, got = 0;
	struct timespec settle = {0, 100000000};
	int cfg, held = 0, delivered = 0, exact = 1, ok;
	char path[400];
	struct line l;

	if (!dev.found)
		return fail_line("msi", "no PCI function %04x:%04x", opt.vendor, opt.device);
	if (!dev.bar2)
		return fail_line("msi", "cannot map BAR2 of %s", dev.name);
	snprintf(path, sizeof(path), "%s/config", dev.path);
	cfg = open(path, O_RDWR | O_CLOEXEC);
	if (cfg < 0)
		return fail_line("msi", "cannot open %s: %s", path, strerror(errno));
	msi = find_cap(cfg, CAP_ID_MSI);
	msix = find_cap(cfg, CAP_ID_MSIX);
	table = msix ? cfg_rd(cfg, msix + 4, 4) : 0;
	nvec = msix ? (cfg_rd(cfg, msix + 2, 2) & 0x7ff) + 1 : 0;
	pba = msix ? cfg_rd(cfg, msix + 8, 4) : 0;
	toff = table & ~7u;
	if (!msi || !msix || (table & 7) != 2 || (pba & 7) != 2 || nvec < MSI_TARGETS ||
	    toff + nvec * MSIX_ENTRY > dev.bar2_size || (pba & ~7u) + 8 > dev.bar2_size) {
		close(cfg);
		return fail_line("msi", "want MSI and an MSI-X table of >= %d entries and its PBA in "
				 "BAR2: MSI cap 0x%x, MSI-X cap 0x%x, table 0x%x, PBA 0x%x, %u "
				 "entries", MSI_TARGETS, msi, msix, table, pba, nvec);
	}
	if (msi_counts(base)) {
		close(cfg);
		return fail_line("msi", "/proc/interrupts lacks PIN, PIW, NPI or ERR (a kernel "
				 "without CONFIG_KVM?)");
	}
	cmd = cfg_rd(cfg, PCI_COMMAND, 2);
	cfg_wr(cfg, PCI_COMMAND, 2, cmd | CMD_MEMORY_BUS_MASTER);
	before = rd(dev.bar2, INTERRUPTS_REG, 8);

	/* MSI: one message (multiple message enable 0), fixed delivery, edge. */
	ctl = cfg_rd(cfg, msi + 2, 2);
	data_off = ctl & MSI_CTL_64BIT ? msi + 12 : msi + 8;
	cfg_wr(cfg, msi + 4, 4, MSI_ADDRESS);
	if (ctl & MSI_CTL_64BIT)
		cfg_wr(cfg, msi + 8, 4, 0);
	cfg_wr(cfg, data_off, 2, msi_targets[0].vector);
	cfg_wr(cfg, msi + 2, 2, (ctl & ~MSI_CTL_MME) | MSI_CTL_ENABLE);
	for (r = 0; r < opt.irqs; r++) {
		wr(dev.bar2, DOORBELL_REG, 4, 0);
		if (!msi_wait(0, base[0] + r + 1, now))
			break;
		msi_got++;
	}
	want[0] += opt.irqs;
	cfg_wr(cfg, msi + 2, 2, ctl & ~(MSI_CTL_MME | MSI_CTL_ENABLE));
	nanosleep(&settle, NULL);
	msi_counts(mid);

	/* MSI-X: entry v aimed at target v, unmasked, then the function enabled. */
	for (v = 0; v < MSI_TARGETS; v++) {
		wr(dev.bar2, toff + v * MSIX_ENTRY, 4, MSI_ADDRESS);
		wr(dev.bar2, toff + v * MSIX_ENTRY + 4, 4, 0);
		wr(dev.bar2, toff + v * MSIX_ENTRY + 8, 4, msi_targets[v].vector);
		wr(dev.bar2, toff + v * MSIX_ENTRY + 12, 4, 0);
	}
	xctl = cfg_rd(cfg, msix + 2, 2);
	cfg_wr(cfg, msix + 2, 2, (xctl | MSIX_CTL_ENABLE) & ~MSIX_CTL_FMASK);
	for (v = 0; v < MSI_TARGETS; v++) {
		for (k = 0; k <= v; k++) {
			wr(dev.bar2, DOORBELL_REG, 4, v);
			rung++;
			if (!msi_wait(v, mid[v] + k + 1, now))
				break;
			got++;
		}
		want[v] += v + 1;
	}
	/* Entry 1 masked, then rung: held, not delivered, until unmasked. The PBA bit is
	 * reported, not required: on Xen it is devmodel's PBA, which must show it; over
	 * vfio-user QEMU emulates the PBA, and while a vector is masked it detaches that
	 * vector's eventfd, so devmodel holds the interrupt pending where QEMU's PBA does not
	 * show it (the hosts' tests check each). A late delivery while masked, had there been
	 * one, would still show below as a count one too many. */
	wr(dev.bar2, toff + MSIX_ENTRY + 12, 4, MSIX_CTRL_MASKBIT);
	msi_counts(now);
	k = (unsigned)now[1];
	wr(dev.bar2, DOORBELL_REG, 4, 1);
	rd(dev.bar2, INTERRUPTS_REG, 4); /* the doorbell has reached the device */
	pba_masked = rd(dev.bar2, pba & ~7u, 8);
	nanosleep(&settle, NULL);
	msi_counts(now);
	held = now[1] == k;
	wr(dev.bar2, toff + MSIX_ENTRY + 12, 4, 0);
	delivered = msi_wait(1, (uint64_t)k + 1, now);
	pba_after = rd(dev.bar2, pba & ~7u, 8);
	want[1] += 1;
	/* Off again: the function disabled, every entry masked, the command register back. */
	cfg_wr(cfg, msix + 2, 2, xctl & ~MSIX_CTL_ENABLE);
	for (v = 0; v < MSI_TARGETS; v++)
		wr(dev.bar2, toff + v * MSIX_ENTRY + 12, 4, MSIX_CTRL_MASKBIT);
	after = rd(dev.bar2, INTERRUPTS_REG, 8);
	cfg_wr(cfg, PCI_COMMAND, 2, cmd);
	close(cfg);
	nanosleep(&settle, NULL);
	msi_counts(fin);
	for (v = 0; v < MSI_TARGETS; v++)
		if (fin[v] - base[v] != want[v])
			exact = 0;
	ok = msi_got == opt.irqs && got == rung && held && delivered && !(pba_after & 2) && exact &&
	     after - before == opt.irqs + rung + 1;
	begin(&l, "msi");
	add(&l, ",\"address\":\"0x%x\",\"targets\":[", MSI_ADDRESS);
	for (v = 0; v < MSI_TARGETS; v++)
		add(&l, "%s{\"vector\":\"0x%x\",\"counter\":\"%s\"}", v ? "," : "",
		    msi_targets[v].vector, msi_targets[v].label);
	add(&l, "],\"msi_cap\":\"0x%x\",\"msi_rounds\":%" PRIu64 ",\"msi_received\":%" PRIu64,
	    msi, opt.irqs, msi_got);
	add_counts(&l, "msi_counts", base, mid);
	add(&l, ",\"msix_cap\":\"0x%x\",\"msix_table\":\"0x%x\",\"msix_entries\":%u"
		",\"msix_rung\":%u,\"msix_received\":%u", msix, table, nvec, rung, got);
	add_counts(&l, "msix_counts", mid, fin);
	add(&l, ",\"masked_vector\":1,\"masked_held\":%s,\"masked_pba\":\"0x%" PRIx64 "\""
		",\"masked_delivered\":%s,\"pba_after\":\"0x%" PRIx64 "\"",
	    held ? "true" : "false", pba_masked, delivered ? "true" : "false", pba_after);
	add_counts(&l, "counts", base, fin);
	add(&l, ",\"expected\":[");
	for (v = 0; v < MSI_TARGETS; v++)
		add(&l, "%s%" PRIu64, v ? "," : "", want[v]);
	add(&l, "],\"interrupts_before\":%" PRIu64 ",\"interrupts_after\":%" PRIu64 ",\"ok\":%s",
	    before, after, ok ? "true" : "false");
	emit(&l);
	return !ok;
}

static const struct {
	const char *name;
	int (*run)(void);
} tests[] = {
	{"enumerate", test_enumerate}, {"pattern", test_pattern}, {"boundary", test_boundary},
	{"regs", test_regs},           {"timing", test_timing},   {"smp", test_smp},
	{"watch", test_watch},         {"stall", test_stall},     {"demo", test_demo},
	{"bench", test_bench},         {"evict", test_evict},     {"churn", test_churn},
	{"xbench", test_xbench},       {"xfault", test_xfault},     {"soak", test_soak},
	{"irq", test_irq},           {"msi", test_msi},
};

int main(int argc, char **argv)
{
	struct line l;
	int i, j, failed = 0, known;
	uint64_t t0;

	parse_cmdline();
	if (argc > 1) {
		opt.ntests = 0;
		for (i = 1; i < argc && opt.ntests < MAX_TESTS; i++)
			opt.tests[opt.ntests++] = argv[i];
	}
	find_device(&dev, opt.vendor, opt.device);
	begin_event(&l, "start");
	add(&l, ",\"pciid\":\"%04x:%04x\",\"slot\":\"%s\",\"bytes\":%" PRIu64
		",\"iters\":%" PRIu64 ",\"cpus\":%d",
	    opt.vendor, opt.device, dev.found ? dev.name : "", opt.bytes, opt.iters, get_nprocs());
	emit(&l);
	for (i = 0; i < opt.ntests; i++) {
		if (!strcmp(opt.tests[i], "done") || !opt.tests[i][0])
			continue; /* init's business: power off after the tests */
		known = 0;
		for (j = 0; j < (int)(sizeof(tests) / sizeof(tests[0])); j++) {
			if (strcmp(opt.tests[i], tests[j].name))
				continue;
			known = 1;
			t0 = now_ns();
			if (tests[j].run())
				failed++;
			fprintf(stderr, "bartest: %s took %" PRIu64 " ms\n", tests[j].name,
				(now_ns() - t0) / 1000000);
		}
		if (!known)
			failed += fail_line(opt.tests[i], "unknown test");
	}
	return failed > 100 ? 100 : failed;
}

/*
 * xen_ioreq_peer: the smallest alternate ioreq server that serves a PCI function, in C.
 *
 * It is the peer devmodel's Xen figures are measured against (tests/xen_guest/dom0-bench):
 * started in dom0 for the same paused guest as devmodel, it serves its own function beside
 * devmodel's, so the guest can time a trapped read of either in the same run and the ratio
 * says what devmodel's Python path costs over the floor of Xen's own round trip (under TCG the
 * absolute numbers are TCG's). It does as little as a server can: no buffered ring, no guest
 * memory mapped, one thread that waits on the event channel fd (no busy polling).
 *
 * usage: xen_ioreq_peer [-s SBDF] [-i VENDOR:DEVICE] [-r READY_FILE] DOMID
 *   -s  the function to claim (default 0000:00:1d.0; devmodel's default is 00:1e.0)
 *   -i  its vendor:device in hex (default 1234:10f0)
 *   -r  created once the server serves (after enable and bind), for a script to wait on
 *
 * The function: a type-0 header, class 0x058000 (other memory controller), no interrupt, one
 * 4 KiB 32-bit memory BAR0 holding 512 qwords the guest may read and write (qword 0 reads
 * "PEER" in its low half until written). Facts used, from Xen's public headers and
 * common/ioreq.c: the ioreq page is frame 1 of the server's resource when mapped as
 * XENMEM_resource_ioreq_server; Xen writes each vCPU's vp_eport into its slot only when the
 * server is enabled, so binding comes after enabling; the first request a new server sees is
 * an INVALIDATE, which must be answered like any other.
 *
 * Stops on SIGTERM or SIGINT: disables and destroys the server (after `xl destroy` Xen has
 * already done so, and those calls fail with ENOENT: said once, not an error) and prints what
 * it served. Exit 0 after a clean stop, 1 when it could not set up, 2 on usage errors.
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <poll.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

/* The tools' view of Xen's headers: it has HVM_IOREQSRV_BUFIOREQ_OFF. */
#define __XEN_TOOLS__ 1
#include <xendevicemodel.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>

#define SLOTS (4096 / sizeof(ioreq_t))
#define BAR_SIZE 0x1000u
#define BAR_MASK (~(uint32_t)(BAR_SIZE - 1))
#define NO_BAR UINT64_MAX

static volatile sig_atomic_t stopping;

static struct {
	xendevicemodel_handle *dm;
	xenforeignmemory_handle *fm;
	xenevtchn_handle *ev;
	xenforeignmemory_resource_handle *res;
	shared_iopage_t *page;
	domid_t domid;
	ioservid_t id;
	int have_server, enabled, claimed;
	unsigned vcpus;
	evtchn_port_t local[SLOTS]; /* local port bound to slot i's vp_eport; 0: none */
	uint16_t seg;
	uint8_t bus, devfn;
	uint8_t cfg[256];
	uint64_t bar_mapped; /* guest address of the claimed BAR0 range, NO_BAR if none */
	uint64_t regs[BAR_SIZE / 8];
	uint64_t by_type[16], mmio_reads, mmio_writes, cfg_reads, cfg_writes, unhandled;
} s = {.bar_mapped = NO_BAR};

/* Which config bits the guest may change: command (I/O, memory, bus master; INTx disable),
 * BAR0's address bits (so sizing reads back the size) and the interrupt line. */
static uint8_t cfg_writable(unsigned off)
{
	switch (off) {
	case 0x04: return 0x07;
	case 0x05: return 0x04;
	case 0x11: return 0xf0; /* BAR0 bits 15:12; bits 11:0 hardwired (4 KiB, 32-bit, mem) */
	case 0x12: case 0x13: return 0xff;
	case 0x3c: return 0xff;
	default: return 0;
	}
}

static void put16(unsigned off, uint16_t v) { memcpy(s.cfg + off, &v, 2); }

static void init_config(unsigned vendor, unsigned device)
{
	put16(0x00, (uint16_t)vendor);
	put16(0x02, (uint16_t)device);
	s.cfg[0x0b] = 0x05; /* class: memory controller, */
	s.cfg[0x0a] = 0x80; /* subclass: other */
	put16(0x2c, (uint16_t)vendor);
	put16(0x2e, (uint16_t)device);
	memcpy(&s.regs[0], "PEER", 4);
}

/* Claim BAR0's range from Xen while memory decoding is on and the BAR holds an address (not
 * while the guest sizes it), release it otherwise, as a device's decoders would. */
static void follow_decoding(void)
{
	uint32_t bar;
	uint64_t want = NO_BAR;

	memcpy(&bar, s.cfg + 0x10, 4);
	bar &= BAR_MASK;
	if ((s.cfg[0x04] & 0x02) && bar && bar != BAR_MASK)
		want = bar;
	if (want == s.bar_mapped)
		return;
	if (s.bar_mapped != NO_BAR &&
	    xendevicemodel_unmap_io_range_from_ioreq_server(s.dm, s.domid, s.id, 1, s.bar_mapped,
							    s.bar_mapped + BAR_SIZE - 1))
		fprintf(stderr, "xen_ioreq_peer: unmap BAR0 0x%" PRIx64 ": %s\n", s.bar_mapped,
			strerror(errno));
	s.bar_mapped = NO_BAR;
	if (want == NO_BAR)
		return;
	if (xendevicemodel_map_io_range_to_ioreq_server(s.dm, s.domid, s.id, 1, want,
							want + BAR_SIZE - 1)) {
		fprintf(stderr, "xen_ioreq_peer: map BAR0 0x%" PRIx64 ": %s\n", want,
			strerror(errno));
		return;
	}
	s.bar_mapped = want;
	printf("xen_ioreq_peer: BAR0 at 0x%" PRIx64 "\n", want);
	fflush(stdout);
}

static void pci_config(ioreq_t *req)
{
	/* addr: SEG[63:48] BUS[47:40] DEV[39:35] FN[34:32] OFFSET[31:0] */
	unsigned off = (uint32_t)req->addr, i, size = req->size;
	uint16_t seg = (uint16_t)(req->addr >> 48);
	uint8_t bus = (uint8_t)(req->addr >> 40), devfn = (uint8_t)(req->addr >> 32);
	uint64_t v = 0;

	if (seg != s.seg || bus != s.bus || devfn != s.devfn || req->count != 1 || size > 4 ||
	    off + size > sizeof(s.cfg)) {
		s.unhandled++;
		if (req->dir == IOREQ_READ)
			req->data = ~0ull;
		return;
	}
	if (req->dir == IOREQ_READ) {
		for (i = 0; i < size; i++)
			v |= (uint64_t)s.cfg[off + i] << (8 * i);
		req->data = v;
		s.cfg_reads++;
		return;
	}
	for (i = 0; i < size; i++) {
		uint8_t m = cfg_writable(off + i), b = (uint8_t)(req->data >> (8 * i));

		s.cfg[off + i] = (uint8_t)((s.cfg[off + i] & ~m) | (b & m));
	}
	s.cfg_writes++;
	follow_decoding();
}

/* A plain load or store of 1, 2, 4 or 8 bytes inside BAR0; anything else (a rep, a pointer
 * into guest memory, outside the BAR) reads all-ones and is dropped: bartest makes none. */
static void mmio(ioreq_t *req)
{
	uint64_t off = req->addr - s.bar_mapped, mask;
	unsigned size = req->size;

	if (s.bar_mapped == NO_BAR || req->addr < s.bar_mapped || off + size > BAR_SIZE ||
	    req->count != 1 || req->data_is_ptr || !size || size > 8 || (size & (size - 1)) ||
	    (off & (size - 1))) {
		s.unhandled++;
		if (req->dir == IOREQ_READ && !req->data_is_ptr)
			req->data = ~0ull;
		return;
	}
	mask = size == 8 ? ~0ull : (1ull << (8 * size)) - 1;
	if (req->dir == IOREQ_READ) {
		/* Little-endian guest and host: a qword's bytes at off & 7 onwards. */
		req->data = (s.regs[off / 8] >> (8 * (off & 7))) & mask;
		s.mmio_reads++;
	} else {
		uint64_t *q = &s.regs[off / 8];
		unsigned shift = 8 * (unsigned)(off & 7);

		*q = (*q & ~(mask << shift)) | ((req->data & mask) << shift);
		s.mmio_writes++;
	}
}

static void handle(ioreq_t *req)
{
	s.by_type[req->type & 15]++;
	switch (req->type) {
	case IOREQ_TYPE_PCI_CONFIG: pci_config(req); break;
	case IOREQ_TYPE_COPY: mmio(req); break;
	case IOREQ_TYPE_INVALIDATE: /* no map cache to drop */
	case IOREQ_TYPE_TIMEOFFSET: break;
	default: /* PIO: none claimed */
		s.unhandled++;
		if (req->dir == IOREQ_READ && !req->data_is_ptr)
			req->data = ~0ull;
	}
}

/* One slot, as Xen's protocol wants it: see READY, then (after a read barrier) the request;
 * INPROCESS while handling; the answer's data before IORESP_READY (write barrier); notify. */
static void serve_slot(unsigned v)
{
	ioreq_t *req = &s.page->vcpu_ioreq[v];

	if (req->state != STATE_IOREQ_READY)
		return;
	__atomic_thread_fence(__ATOMIC_ACQUIRE);
	req->state = STATE_IOREQ_INPROCESS;
	handle(req);
	__atomic_thread_fence(__ATOMIC_RELEASE);
	req->state = STATE_IORESP_READY;
	xenevtchn_notify(s.ev, s.local[v]);
}

static int serve(void)
{
	struct pollfd pfd = {.fd = xenevtchn_fd(s.ev), .events = POLLIN};
	sigset_t none;
	xenevtchn_port_or_error_t port;
	unsigned v;

	sigemptyset(&none);
	while (!stopping) {
		/* SIGTERM is blocked everywhere but here: it cannot slip in before the wait. */
		if (ppoll(&pfd, 1, NULL, &none) < 0) {
			if (errno == EINTR)
				continue;
			perror("xen_ioreq_peer: ppoll");
			return 1;
		}
		while ((port = xenevtchn_pending(s.ev)) >= 0) {
			xenevtchn_unmask(s.ev, (evtchn_port_t)port);
			for (v = 0; v < s.vcpus; v++)
				if (s.local[v] == (evtchn_port_t)port)
					serve_slot(v);
		}
	}
	return 0;
}

static int fail(const char *what)
{
	fprintf(stderr, "xen_ioreq_peer: domain %u: %s: %s\n", s.domid, what, strerror(errno));
	return 1;
}

static int setup(const char *ready)
{
	void *addr = NULL;
	unsigned v;
	int fd;

	s.dm = xendevicemodel_open(NULL, 0);
	s.fm = xenforeignmemory_open(NULL, 0);
	s.ev = xenevtchn_open(NULL, 0);
	if (!s.dm || !s.fm || !s.ev)
		return fail("open the Xen libraries");
	/* xenevtchn_pending reads the fd: non-blocking, so the loop can drain it and then wait. */
	fd = xenevtchn_fd(s.ev);
	if (fcntl(fd, F_SETFL, fcntl(fd, F_GETFL) | O_NONBLOCK))
		return fail("O_NONBLOCK on the event channel fd");
	if (xendevicemodel_nr_vcpus(s.dm, s.domid, &s.vcpus))
		return fail("xendevicemodel_nr_vcpus");
	if (s.vcpus > SLOTS) {
		errno = ERANGE;
		return fail("more vCPUs than one ioreq page has slots");
	}
	if (xendevicemodel_create_ioreq_server(s.dm, s.domid, HVM_IOREQSRV_BUFIOREQ_OFF, &s.id))
		return fail("xendevicemodel_create_ioreq_server");
	s.have_server = 1;
	s.res = xenforeignmemory_map_resource(s.fm, s.domid, XENMEM_resource_ioreq_server, s.id,
					      XENMEM_resource_ioreq_server_frame_ioreq(0), 1,
					      &addr, PROT_READ | PROT_WRITE, 0);
	if (!s.res)
		return fail("xenforeignmemory_map_resource (the ioreq page)");
	s.page = addr;
	if (xendevicemodel_map_pcidev_to_ioreq_server(s.dm, s.domid, s.id, s.seg, s.bus,
						      s.devfn >> 3, s.devfn & 7))
		return fail("xendevicemodel_map_pcidev_to_ioreq_server");
	s.claimed = 1;
	if (xendevicemodel_set_ioreq_server_state(s.dm, s.domid, s.id, 1))
		return fail("enable the server");
	s.enabled = 1;
	for (v = 0; v < s.vcpus; v++) {
		xenevtchn_port_or_error_t p =
			xenevtchn_bind_interdomain(s.ev, s.domid, s.page->vcpu_ioreq[v].vp_eport);

		if (p < 0)
			return fail("xenevtchn_bind_interdomain");
		s.local[v] = (evtchn_port_t)p;
	}
	printf("xen_ioreq_peer: ioreq server %u for domain %u: %u vCPU(s), PCI "
	       "%04x:%02x:%02x.%u %04x:%04x, serving\n", s.id, s.domid, s.vcpus, s.seg, s.bus,
	       s.devfn >> 3, s.devfn & 7, s.cfg[0] | s.cfg[1] << 8, s.cfg[2] | s.cfg[3] << 8);
	fflush(stdout);
	if (ready) {
		fd = open(ready, O_WRONLY | O_CREAT | O_TRUNC, 0644);
		if (fd < 0)
			return fail(ready);
		close(fd);
	}
	return 0;
}

/* Undo what setup did, each step on its own. */
static void teardown(void)
{
	int gone = 0;
	unsigned v;

	if (s.enabled && xendevicemodel_set_ioreq_server_state(s.dm, s.domid, s.id, 0))
		gone = errno == ENOENT;
	for (v = 0; v < s.vcpus; v++)
		if (s.local[v])
			xenevtchn_unbind(s.ev, s.local[v]);
	if (!gone && s.bar_mapped != NO_BAR)
		xendevicemodel_unmap_io_range_from_ioreq_server(s.dm, s.domid, s.id, 1,
								s.bar_mapped,
								s.bar_mapped + BAR_SIZE - 1);
	if (!gone && s.claimed)
		xendevicemodel_unmap_pcidev_from_ioreq_server(s.dm, s.domid, s.id, s.seg, s.bus,
							      s.devfn >> 3, s.devfn & 7);
	if (!gone && s.have_server && xendevicemodel_destroy_ioreq_server(s.dm, s.domid, s.id))
		gone = errno == ENOENT;
	if (gone)
		printf("xen_ioreq_peer: the ioreq server was already gone (domain destroyed)\n");
	if (s.res)
		xenforeignmemory_unmap_resource(s.fm, s.res);
	if (s.ev)
		xenevtchn_close(s.ev);
	if (s.fm)
		xenforeignmemory_close(s.fm);
	if (s.dm)
		xendevicemodel_close(s.dm);
}

static void on_signal(int sig)
{
	(void)sig;
	stopping = 1;
}

static int usage(void)
{
	fprintf(stderr, "usage: xen_ioreq_peer [-s SEG:BUS:DEV.FN] [-i VENDOR:DEVICE] "
			"[-r READY_FILE] DOMID\n");
	return 2;
}

int main(int argc, char **argv)
{
	unsigned seg = 0, bus = 0, dev = 0x1d, fn = 0, vendor = 0x1234, device = 0x10f0, domid;
	const char *ready = NULL;
	struct sigaction sa;
	sigset_t block;
	char *end;
	int c, rc;

	while ((c = getopt(argc, argv, "s:i:r:")) != -1) {
		switch (c) {
		case 's':
			if (sscanf(optarg, "%x:%x:%x.%x", &seg, &bus, &dev, &fn) != 4 ||
			    seg > 0xffff || bus > 0xff || dev > 0x1f || fn > 7)
				return usage();
			break;
		case 'i':
			if (sscanf(optarg, "%x:%x", &vendor, &device) != 2 || vendor > 0xffff ||
			    device > 0xffff)
				return usage();
			break;
		case 'r': ready = optarg; break;
		default: return usage();
		}
	}
	if (optind != argc - 1)
		return usage();
	domid = (unsigned)strtoul(argv[optind], &end, 10);
	if (*end || !*argv[optind] || domid >= 0x7ff0)
		return usage();
	s.domid = (domid_t)domid;
	s.seg = (uint16_t)seg;
	s.bus = (uint8_t)bus;
	s.devfn = (uint8_t)(dev << 3 | fn);
	init_config(vendor, device);

	sigemptyset(&block);
	sigaddset(&block, SIGTERM);
	sigaddset(&block, SIGINT);
	sigprocmask(SIG_BLOCK, &block, NULL);
	memset(&sa, 0, sizeof(sa));
	sa.sa_handler = on_signal;
	sigaction(SIGTERM, &sa, NULL);
	sigaction(SIGINT, &sa, NULL);

	rc = setup(ready);
	if (!rc)
		rc = serve();
	teardown();
	printf("xen_ioreq_peer: stopped; served mmio_reads=%" PRIu64 " mmio_writes=%" PRIu64
	       " config_reads=%" PRIu64 " config_writes=%" PRIu64 " invalidate=%" PRIu64
	       " timeoffset=%" PRIu64 " unhandled=%" PRIu64 "\n",
	       s.mmio_reads, s.mmio_writes, s.cfg_reads, s.cfg_writes,
	       s.by_type[IOREQ_TYPE_INVALIDATE], s.by_type[IOREQ_TYPE_TIMEOFFSET], s.unhandled);
	return rc;
}

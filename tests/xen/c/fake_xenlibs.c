/*
 * A stand-in for Xen's tool libraries, built as one shared object by
 * tests/xen/test_xen_host_libs.py so that devmodel.xen.host.XenHost can run end to end on a
 * machine without a hypervisor. Including the real headers makes GCC hold every definition
 * here to the real prototype.
 *
 * Every call is appended to $FAKE_XEN_LOG as "name arg arg ...". A call named in
 * $FAKE_XEN_FAIL (a comma-separated list) fails (-1 or NULL) with errno $FAKE_XEN_ERRNO
 * (default EPERM).
 * Foreign memory is anonymous memory: each resource page starts with its frame number plus
 * 0xa0 in its first byte, each mapped guest page with its gfn (8 bytes); gfn 0xbad fails
 * with EFAULT in err[]. Event channels loop back: notify(port) makes port pending.
 * Xenstore is a small in-memory table; a watch's events go through a pipe, as libxenstore's
 * do, and fake_xen_release_domain(domid) releases a domain (@releaseDomain fires).
 */
#define _GNU_SOURCE
#define __XEN_TOOLS__ 1
#include <errno.h>
#include <fcntl.h>
#include <stdarg.h>
#include <stdbool.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <xendevicemodel.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <xenstore.h>

#define PAGE 4096UL

struct xendevicemodel_handle { int unused; };
struct xenforeignmemory_handle { int unused; };
struct xenforeignmemory_resource_handle { void *addr; size_t size; };
struct xenevtchn_handle { int pipe[2]; };
struct xs_handle { int watch[2]; };

static void record(const char *fmt, ...)
{
    const char *path = getenv("FAKE_XEN_LOG");
    if (!path)
        return;
    FILE *f = fopen(path, "a");
    if (!f)
        return;
    va_list ap;
    va_start(ap, fmt);
    vfprintf(f, fmt, ap);
    va_end(ap);
    fputc('\n', f);
    fclose(f);
}

static int fails(const char *name)
{
    const char *which = getenv("FAKE_XEN_FAIL");
    size_t n = strlen(name);
    for (; which && *which; which += strcspn(which, ",") + (which[strcspn(which, ",")] != 0))
        if (strncmp(which, name, n) == 0 && (which[n] == ',' || which[n] == '\0'))
            break;
    if (!which || !*which)
        return 0;
    const char *e = getenv("FAKE_XEN_ERRNO");
    errno = e ? atoi(e) : EPERM;
    return 1;
}

#define FAIL_INT(name) do { if (fails(name)) return -1; } while (0)
#define FAIL_PTR(name) do { if (fails(name)) return NULL; } while (0)

/* ------------------------------------------------------------------- devicemodel */

xendevicemodel_handle *xendevicemodel_open(struct xentoollog_logger *logger, unsigned int flags)
{
    record("xendevicemodel_open %d %u", logger != NULL, flags);
    FAIL_PTR("xendevicemodel_open");
    return calloc(1, sizeof(xendevicemodel_handle));
}

int xendevicemodel_close(xendevicemodel_handle *h)
{
    record("xendevicemodel_close");
    free(h);
    return 0;
}

int xendevicemodel_restrict(xendevicemodel_handle *h, domid_t domid)
{
    (void)h;
    record("xendevicemodel_restrict %u", domid);
    FAIL_INT("xendevicemodel_restrict");
    return 0;
}

int xendevicemodel_create_ioreq_server(xendevicemodel_handle *h, domid_t domid,
                                       int handle_bufioreq, ioservid_t *id)
{
    (void)h;
    record("xendevicemodel_create_ioreq_server %u %d", domid, handle_bufioreq);
    FAIL_INT("xendevicemodel_create_ioreq_server");
    *id = 7;
    return 0;
}

int xendevicemodel_destroy_ioreq_server(xendevicemodel_handle *h, domid_t domid, ioservid_t id)
{
    (void)h;
    record("xendevicemodel_destroy_ioreq_server %u %u", domid, id);
    FAIL_INT("xendevicemodel_destroy_ioreq_server");
    return 0;
}

int xendevicemodel_set_ioreq_server_state(xendevicemodel_handle *h, domid_t domid,
                                          ioservid_t id, int enabled)
{
    (void)h;
    record("xendevicemodel_set_ioreq_server_state %u %u %d", domid, id, enabled);
    FAIL_INT("xendevicemodel_set_ioreq_server_state");
    return 0;
}

int xendevicemodel_get_ioreq_server_info(xendevicemodel_handle *h, domid_t domid, ioservid_t id,
                                         xen_pfn_t *ioreq_gfn, xen_pfn_t *bufioreq_gfn,
                                         evtchn_port_t *bufioreq_port)
{
    (void)h;
    record("xendevicemodel_get_ioreq_server_info %u %u %d %d %d", domid, id, ioreq_gfn != NULL,
           bufioreq_gfn != NULL, bufioreq_port != NULL);
    FAIL_INT("xendevicemodel_get_ioreq_server_info");
    if (bufioreq_port)
        *bufioreq_port = 33;
    return 0;
}

int xendevicemodel_map_io_range_to_ioreq_server(xendevicemodel_handle *h, domid_t domid,
                                                ioservid_t id, int is_mmio, uint64_t start,
                                                uint64_t end)
{
    (void)h;
    record("xendevicemodel_map_io_range_to_ioreq_server %u %u %d %#lx %#lx", domid, id, is_mmio,
           (unsigned long)start, (unsigned long)end);
    FAIL_INT("xendevicemodel_map_io_range_to_ioreq_server");
    return 0;
}

int xendevicemodel_unmap_io_range_from_ioreq_server(xendevicemodel_handle *h, domid_t domid,
                                                    ioservid_t id, int is_mmio, uint64_t start,
                                                    uint64_t end)
{
    (void)h;
    record("xendevicemodel_unmap_io_range_from_ioreq_server %u %u %d %#lx %#lx", domid, id,
           is_mmio, (unsigned long)start, (unsigned long)end);
    FAIL_INT("xendevicemodel_unmap_io_range_from_ioreq_server");
    return 0;
}

int xendevicemodel_map_pcidev_to_ioreq_server(xendevicemodel_handle *h, domid_t domid,
                                              ioservid_t id, uint16_t segment, uint8_t bus,
                                              uint8_t device, uint8_t function)
{
    (void)h;
    record("xendevicemodel_map_pcidev_to_ioreq_server %u %u %u %u %u %u", domid, id, segment, bus,
           device, function);
    FAIL_INT("xendevicemodel_map_pcidev_to_ioreq_server");
    return 0;
}

int xendevicemodel_unmap_pcidev_from_ioreq_server(xendevicemodel_handle *h, domid_t domid,
                                                  ioservid_t id, uint16_t segment, uint8_t bus,
                                                  uint8_t device, uint8_t function)
{
    (void)h;
    record("xendevicemodel_unmap_pcidev_from_ioreq_server %u %u %u %u %u %u", domid, id, segment,
           bus, device, function);
    FAIL_INT("xendevicemodel_unmap_pcidev_from_ioreq_server");
    return 0;
}

int xendevicemodel_inject_msi(xendevicemodel_handle *h, domid_t domid, uint64_t msi_addr,
                              uint32_t msi_data)
{
    (void)h;
    record("xendevicemodel_inject_msi %u %#lx %#x", domid, (unsigned long)msi_addr, msi_data);
    FAIL_INT("xendevicemodel_inject_msi");
    return 0;
}

int xendevicemodel_set_pci_intx_level(xendevicemodel_handle *h, domid_t domid, uint16_t segment,
                                      uint8_t bus, uint8_t device, uint8_t intx,
                                      unsigned int level)
{
    (void)h;
    record("xendevicemodel_set_pci_intx_level %u %u %u %u %u %u", domid, segment, bus, device,
           intx, level);
    FAIL_INT("xendevicemodel_set_pci_intx_level");
    return 0;
}

int xendevicemodel_nr_vcpus(xendevicemodel_handle *h, domid_t domid, unsigned int *vcpus)
{
    (void)h;
    record("xendevicemodel_nr_vcpus %u", domid);
    FAIL_INT("xendevicemodel_nr_vcpus");
    *vcpus = 3;
    return 0;
}

/* ----------------------------------------------------------------- foreignmemory */

xenforeignmemory_handle *xenforeignmemory_open(struct xentoollog_logger *logger, unsigned flags)
{
    record("xenforeignmemory_open %d %u", logger != NULL, flags);
    FAIL_PTR("xenforeignmemory_open");
    return calloc(1, sizeof(xenforeignmemory_handle));
}

int xenforeignmemory_close(xenforeignmemory_handle *h)
{
    record("xenforeignmemory_close");
    free(h);
    return 0;
}

int xenforeignmemory_restrict(xenforeignmemory_handle *h, domid_t domid)
{
    (void)h;
    record("xenforeignmemory_restrict %u", domid);
    FAIL_INT("xenforeignmemory_restrict");
    return 0;
}

xenforeignmemory_resource_handle *xenforeignmemory_map_resource(
    xenforeignmemory_handle *h, domid_t domid, unsigned int type, unsigned int id,
    unsigned long frame, unsigned long nr_frames, void **paddr, int prot, int flags)
{
    (void)h;
    record("xenforeignmemory_map_resource %u %u %u %lu %lu %d %d %d", domid, type, id, frame,
           nr_frames, *paddr != NULL, prot, flags);
    FAIL_PTR("xenforeignmemory_map_resource");
    void *addr = mmap(NULL, nr_frames * PAGE, prot, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (addr == MAP_FAILED)
        return NULL;
    if (prot & PROT_WRITE)
        for (unsigned long i = 0; i < nr_frames; i++)
            ((unsigned char *)addr)[i * PAGE] = (unsigned char)(0xa0 + frame + i);
    xenforeignmemory_resource_handle *r = calloc(1, sizeof(*r));
    r->addr = addr;
    r->size = nr_frames * PAGE;
    *paddr = addr;
    return r;
}

int xenforeignmemory_unmap_resource(xenforeignmemory_handle *h,
                                    xenforeignmemory_resource_handle *r)
{
    (void)h;
    record("xenforeignmemory_unmap_resource %lu", (unsigned long)(r->size / PAGE));
    munmap(r->addr, r->size);
    free(r);
    return 0;
}

void *xenforeignmemory_map(xenforeignmemory_handle *h, uint32_t dom, int prot, size_t pages,
                           const xen_pfn_t arr[], int err[])
{
    (void)h;
    record("xenforeignmemory_map %u %d %zu %#lx", dom, prot, pages, pages ? arr[0] : 0UL);
    FAIL_PTR("xenforeignmemory_map");
    void *addr = mmap(NULL, pages * PAGE, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS,
                      -1, 0);
    if (addr == MAP_FAILED)
        return NULL;
    for (size_t i = 0; i < pages; i++) {
        memcpy((char *)addr + i * PAGE, &arr[i], sizeof(arr[i]));
        err[i] = arr[i] == 0xbad ? -EFAULT : 0;
    }
    if (!(prot & PROT_WRITE))
        mprotect(addr, pages * PAGE, PROT_READ);
    return addr;
}

int xenforeignmemory_unmap(xenforeignmemory_handle *h, void *addr, size_t pages)
{
    (void)h;
    record("xenforeignmemory_unmap %zu", pages);
    return munmap(addr, pages * PAGE);
}

/* ------------------------------------------------------------------------ evtchn */

xenevtchn_handle *xenevtchn_open(struct xentoollog_logger *logger, unsigned int flags)
{
    record("xenevtchn_open %d %u", logger != NULL, flags);
    FAIL_PTR("xenevtchn_open");
    xenevtchn_handle *x = calloc(1, sizeof(*x));
    if (pipe(x->pipe) != 0) {
        free(x);
        return NULL;
    }
    return x;
}

int xenevtchn_close(xenevtchn_handle *x)
{
    record("xenevtchn_close");
    close(x->pipe[0]);
    close(x->pipe[1]);
    free(x);
    return 0;
}

int xenevtchn_fd(xenevtchn_handle *x)
{
    return x->pipe[0];
}

int xenevtchn_restrict(xenevtchn_handle *x, domid_t domid)
{
    (void)x;
    record("xenevtchn_restrict %u", domid);
    FAIL_INT("xenevtchn_restrict");
    return 0;
}

xenevtchn_port_or_error_t xenevtchn_bind_interdomain(xenevtchn_handle *x, uint32_t domid,
                                                     evtchn_port_t remote_port)
{
    (void)x;
    record("xenevtchn_bind_interdomain %u %u", domid, remote_port);
    FAIL_INT("xenevtchn_bind_interdomain");
    return (int)remote_port + 100;
}

int xenevtchn_unbind(xenevtchn_handle *x, evtchn_port_t port)
{
    (void)x;
    record("xenevtchn_unbind %u", port);
    FAIL_INT("xenevtchn_unbind");
    return 0;
}

xenevtchn_port_or_error_t xenevtchn_pending(xenevtchn_handle *x)
{
    evtchn_port_t port;
    if (read(x->pipe[0], &port, sizeof(port)) != sizeof(port))
        return -1; /* errno is EAGAIN once the fd is non-blocking and empty */
    return (int)port;
}

int xenevtchn_unmask(xenevtchn_handle *x, evtchn_port_t port)
{
    (void)x;
    record("xenevtchn_unmask %u", port);
    return 0;
}

int xenevtchn_notify(xenevtchn_handle *x, evtchn_port_t port)
{
    record("xenevtchn_notify %u", port);
    FAIL_INT("xenevtchn_notify");
    return write(x->pipe[1], &port, sizeof(port)) == sizeof(port) ? 0 : -1;
}

/* ---------------------------------------------------------------------- xenstore */

#define XS_MAX 64
static char *xs_keys[XS_MAX], *xs_values[XS_MAX];

static int xs_find(const char *path)
{
    for (int i = 0; i < XS_MAX; i++)
        if (xs_keys[i] && strcmp(xs_keys[i], path) == 0)
            return i;
    return -1;
}

/* The handle watching @releaseDomain (one per process here), and the released domains. */
static struct xs_handle *xs_watcher;
static unsigned int xs_released[XS_MAX], xs_nreleased;

struct xs_handle *xs_open(unsigned long flags)
{
    record("xs_open %lu", flags);
    FAIL_PTR("xs_open");
    struct xs_handle *h = calloc(1, sizeof(struct xs_handle));
    h->watch[0] = h->watch[1] = -1;
    return h;
}

void xs_close(struct xs_handle *h)
{
    record("xs_close");
    if (h->watch[0] >= 0) {
        close(h->watch[0]);
        close(h->watch[1]);
    }
    if (xs_watcher == h)
        xs_watcher = NULL;
    free(h);
}

static void xs_fire(struct xs_handle *h)
{
    char c = 0;
    if (h && h->watch[1] >= 0 && write(h->watch[1], &c, 1) != 1)
        abort();
}

bool xs_watch(struct xs_handle *h, const char *path, const char *token)
{
    record("xs_watch %s %s", path, token);
    if (fails("xs_watch"))
        return false;
    if (strcmp(path, "@releaseDomain") != 0) {
        errno = ENOSYS; /* the only watch this fake knows */
        return false;
    }
    if (h->watch[0] < 0 && pipe2(h->watch, O_NONBLOCK | O_CLOEXEC) < 0)
        return false;
    xs_watcher = h;
    xs_fire(h); /* xenstored fires a new watch once at once */
    return true;
}

int xs_fileno(struct xs_handle *h)
{
    record("xs_fileno");
    FAIL_INT("xs_fileno");
    if (h->watch[0] < 0) {
        errno = EINVAL;
        return -1;
    }
    return h->watch[0];
}

char **xs_check_watch(struct xs_handle *h)
{
    record("xs_check_watch");
    FAIL_PTR("xs_check_watch");
    char c;
    if (h->watch[0] < 0 || read(h->watch[0], &c, 1) != 1) {
        errno = EAGAIN;
        return NULL;
    }
    /* One block, as libxenstore returns it: XS_WATCH_PATH, XS_WATCH_TOKEN, then the strings. */
    static const char path[] = "@releaseDomain", token[] = "devmodel";
    char **vec = malloc(2 * sizeof(char *) + sizeof(path) + sizeof(token));
    vec[XS_WATCH_PATH] = memcpy((char *)(vec + 2), path, sizeof(path));
    vec[XS_WATCH_TOKEN] = memcpy(vec[XS_WATCH_PATH] + sizeof(path), token, sizeof(token));
    return vec;
}

bool xs_is_domain_introduced(struct xs_handle *h, unsigned int domid)
{
    (void)h;
    record("xs_is_domain_introduced %u", domid);
    if (fails("xs_is_domain_introduced"))
        return false;
    for (unsigned int i = 0; i < xs_nreleased; i++)
        if (xs_released[i] == domid)
            return false;
    return true;
}

/* Not libxenstore's: the tests' way to end a domain. */
void fake_xen_release_domain(unsigned int domid);
void fake_xen_release_domain(unsigned int domid)
{
    if (xs_nreleased < XS_MAX)
        xs_released[xs_nreleased++] = domid;
    xs_fire(xs_watcher);
}

bool xs_write(struct xs_handle *h, xs_transaction_t t, const char *path, const void *data,
              unsigned int len)
{
    (void)h;
    record("xs_write %u %s %.*s", t, path, (int)len, (const char *)data);
    if (fails("xs_write"))
        return false;
    int i = xs_find(path);
    if (i < 0)
        for (i = 0; i < XS_MAX && xs_keys[i]; i++)
            ;
    if (i == XS_MAX) {
        errno = ENOSPC;
        return false;
    }
    free(xs_keys[i]);
    free(xs_values[i]);
    xs_keys[i] = strdup(path);
    xs_values[i] = strndup(data, len);
    return true;
}

void *xs_read(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *len)
{
    (void)h;
    record("xs_read %u %s", t, path);
    FAIL_PTR("xs_read");
    int i = xs_find(path);
    if (i < 0) {
        errno = ENOENT;
        return NULL;
    }
    *len = (unsigned int)strlen(xs_values[i]);
    return strdup(xs_values[i]);
}

bool xs_rm(struct xs_handle *h, xs_transaction_t t, const char *path)
{
    (void)h;
    record("xs_rm %u %s", t, path);
    if (fails("xs_rm"))
        return false;
    size_t n = strlen(path);
    bool found = false;
    for (int i = 0; i < XS_MAX; i++)
        if (xs_keys[i] && strncmp(xs_keys[i], path, n) == 0 &&
            (xs_keys[i][n] == '\0' || xs_keys[i][n] == '/')) {
            free(xs_keys[i]);
            free(xs_values[i]);
            xs_keys[i] = xs_values[i] = NULL;
            found = true;
        }
    if (!found)
        errno = ENOENT;
    return found;
}

char **xs_directory(struct xs_handle *h, xs_transaction_t t, const char *path, unsigned int *num)
{
    (void)h;
    record("xs_directory %u %s", t, path);
    FAIL_PTR("xs_directory");
    /* One block, as libxenstore returns it: the pointers, then the strings. */
    size_t n = strlen(path), count = 0, bytes = 0;
    const char *names[XS_MAX];
    size_t lens[XS_MAX];
    for (int i = 0; i < XS_MAX; i++) {
        if (!xs_keys[i] || strncmp(xs_keys[i], path, n) != 0 || xs_keys[i][n] != '/')
            continue;
        const char *child = xs_keys[i] + n + 1;
        size_t len = strcspn(child, "/");
        int seen = 0;
        for (size_t j = 0; j < count; j++)
            if (lens[j] == len && strncmp(names[j], child, len) == 0)
                seen = 1;
        if (!seen) {
            names[count] = child;
            lens[count++] = len;
            bytes += len + 1;
        }
    }
    if (count == 0) {
        errno = ENOENT;
        return NULL;
    }
    char **out = malloc(count * sizeof(char *) + bytes);
    char *s = (char *)(out + count);
    for (size_t j = 0; j < count; j++) {
        out[j] = s;
        memcpy(s, names[j], lens[j]);
        s[lens[j]] = '\0';
        s += lens[j] + 1;
    }
    *num = (unsigned int)count;
    return out;
}

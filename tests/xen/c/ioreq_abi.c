/*
 * What GCC makes of Xen's public ioreq headers, for tests/xen/test_abi_headers.py.
 *
 * With no arguments: "name value" lines for sizes, offsets and constants.
 * With "encode": reads requests from stdin, one per line, and prints the bytes the C struct
 * holds once its fields (bitfields included) are assigned:
 *     ioreq ADDR DATA COUNT SIZE PORT STATE PTR DIR DF TYPE   -> 64 hex digits
 *     buf TYPE DIR SIZECODE ADDR DATA                          -> 16 hex digits
 *     sbdf SEGMENT BUS DEVICE FUNCTION                         -> XEN_DMOP_PCI_SBDF, decimal
 * With "decode": reads "ioreq HEX" / "buf HEX" lines and prints the fields C reads back, in
 * the order above.
 */
#define __XEN_TOOLS__ 1
#include <inttypes.h>
#include <stddef.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <xenctrl.h>
#include <xen/hvm/dm_op.h>
#include <xen/hvm/hvm_op.h>
#include <xen/hvm/ioreq.h>
#include <xen/memory.h>

#define SHOW(name, value) printf("%s %llu\n", name, (unsigned long long)(value))
#define OFF(type, field) SHOW(#type "." #field, offsetof(type, field))

static void hex(const void *p, size_t n)
{
    const unsigned char *b = p;
    for (size_t i = 0; i < n; i++)
        printf("%02x", b[i]);
    printf("\n");
}

static int unhex(const char *s, void *out, size_t n)
{
    unsigned char *b = out;
    if (strlen(s) != 2 * n)
        return -1;
    for (size_t i = 0; i < n; i++) {
        unsigned int v;
        if (sscanf(s + 2 * i, "%2x", &v) != 1)
            return -1;
        b[i] = (unsigned char)v;
    }
    return 0;
}

static void layout(void)
{
    SHOW("sizeof.ioreq_t", sizeof(ioreq_t));
    OFF(ioreq_t, addr);
    OFF(ioreq_t, data);
    OFF(ioreq_t, count);
    OFF(ioreq_t, size);
    OFF(ioreq_t, vp_eport);
    OFF(ioreq_t, _pad0);
    OFF(ioreq_t, type);
    SHOW("sizeof.shared_iopage_t", sizeof(shared_iopage_t));
    OFF(shared_iopage_t, vcpu_ioreq);
    SHOW("stride.shared_iopage_t.vcpu_ioreq",
         (char *)&((shared_iopage_t *)0)->vcpu_ioreq[1] -
             (char *)&((shared_iopage_t *)0)->vcpu_ioreq[0]);
    SHOW("sizeof.buf_ioreq_t", sizeof(buf_ioreq_t));
    OFF(buf_ioreq_t, type);
    OFF(buf_ioreq_t, data);
    SHOW("sizeof.buffered_iopage_t", sizeof(buffered_iopage_t));
    OFF(buffered_iopage_t, read_pointer);
    OFF(buffered_iopage_t, write_pointer);
    OFF(buffered_iopage_t, buf_ioreq);
    SHOW("IOREQ_READ", IOREQ_READ);
    SHOW("IOREQ_WRITE", IOREQ_WRITE);
    SHOW("STATE_IOREQ_NONE", STATE_IOREQ_NONE);
    SHOW("STATE_IOREQ_READY", STATE_IOREQ_READY);
    SHOW("STATE_IOREQ_INPROCESS", STATE_IOREQ_INPROCESS);
    SHOW("STATE_IORESP_READY", STATE_IORESP_READY);
    SHOW("IOREQ_TYPE_PIO", IOREQ_TYPE_PIO);
    SHOW("IOREQ_TYPE_COPY", IOREQ_TYPE_COPY);
    SHOW("IOREQ_TYPE_PCI_CONFIG", IOREQ_TYPE_PCI_CONFIG);
    SHOW("IOREQ_TYPE_TIMEOFFSET", IOREQ_TYPE_TIMEOFFSET);
    SHOW("IOREQ_TYPE_INVALIDATE", IOREQ_TYPE_INVALIDATE);
    SHOW("IOREQ_BUFFER_SLOT_NUM", IOREQ_BUFFER_SLOT_NUM);
    SHOW("HVM_IOREQSRV_BUFIOREQ_OFF", HVM_IOREQSRV_BUFIOREQ_OFF);
    SHOW("HVM_IOREQSRV_BUFIOREQ_LEGACY", HVM_IOREQSRV_BUFIOREQ_LEGACY);
    SHOW("HVM_IOREQSRV_BUFIOREQ_ATOMIC", HVM_IOREQSRV_BUFIOREQ_ATOMIC);
    SHOW("XENMEM_resource_ioreq_server", XENMEM_resource_ioreq_server);
    SHOW("XENMEM_resource_ioreq_server_frame_bufioreq",
         XENMEM_resource_ioreq_server_frame_bufioreq);
    for (int n = 0; n < 4; n++) {
        char name[64];
        snprintf(name, sizeof(name), "XENMEM_resource_ioreq_server_frame_ioreq(%d)", n);
        SHOW(name, XENMEM_resource_ioreq_server_frame_ioreq(n));
    }
    SHOW("XC_PAGE_SIZE", XC_PAGE_SIZE);
    SHOW("XEN_DMOP_IO_RANGE_PORT", XEN_DMOP_IO_RANGE_PORT);
    SHOW("XEN_DMOP_IO_RANGE_MEMORY", XEN_DMOP_IO_RANGE_MEMORY);
    SHOW("XEN_DMOP_IO_RANGE_PCI", XEN_DMOP_IO_RANGE_PCI);
}

static int encode(void)
{
    char kind[16];
    while (scanf("%15s", kind) == 1) {
        if (strcmp(kind, "ioreq") == 0) {
            unsigned long long a, d, c, s, p, st, ptr, dir, df, t;
            if (scanf("%llu %llu %llu %llu %llu %llu %llu %llu %llu %llu", &a, &d, &c, &s, &p,
                      &st, &ptr, &dir, &df, &t) != 10)
                return 2;
            ioreq_t r;
            memset(&r, 0, sizeof(r));
            r.addr = a;
            r.data = d;
            r.count = (uint32_t)c;
            r.size = (uint32_t)s;
            r.vp_eport = (uint32_t)p;
            r.state = st & 0xf;
            r.data_is_ptr = ptr & 1;
            r.dir = dir & 1;
            r.df = df & 1;
            r.type = (uint8_t)t;
            hex(&r, sizeof(r));
        } else if (strcmp(kind, "buf") == 0) {
            unsigned long long t, dir, sz, a, d;
            if (scanf("%llu %llu %llu %llu %llu", &t, &dir, &sz, &a, &d) != 5)
                return 2;
            buf_ioreq_t b;
            memset(&b, 0, sizeof(b));
            b.type = (uint8_t)t;
            b.dir = dir & 1;
            b.size = sz & 3;
            b.addr = a & 0xfffff;
            b.data = (uint32_t)d;
            hex(&b, sizeof(b));
        } else if (strcmp(kind, "sbdf") == 0) {
            unsigned long long sg, bus, dev, fn;
            if (scanf("%llu %llu %llu %llu", &sg, &bus, &dev, &fn) != 4)
                return 2;
            printf("%llu\n", (unsigned long long)XEN_DMOP_PCI_SBDF(sg, bus, dev, fn));
        } else {
            return 2;
        }
    }
    return 0;
}

static int decode(void)
{
    char kind[16], text[80];
    while (scanf("%15s %79s", kind, text) == 2) {
        if (strcmp(kind, "ioreq") == 0) {
            ioreq_t r;
            if (unhex(text, &r, sizeof(r)))
                return 2;
            printf("%" PRIu64 " %" PRIu64 " %u %u %u %u %u %u %u %u\n", r.addr, r.data,
                   r.count, r.size, r.vp_eport, (unsigned)r.state, (unsigned)r.data_is_ptr,
                   (unsigned)r.dir, (unsigned)r.df, (unsigned)r.type);
        } else if (strcmp(kind, "buf") == 0) {
            buf_ioreq_t b;
            if (unhex(text, &b, sizeof(b)))
                return 2;
            printf("%u %u %u %u %u\n", (unsigned)b.type, (unsigned)b.dir, (unsigned)b.size,
                   (unsigned)b.addr, b.data);
        } else {
            return 2;
        }
    }
    return 0;
}

int main(int argc, char **argv)
{
    if (argc == 1) {
        layout();
        return 0;
    }
    if (argc == 2 && strcmp(argv[1], "encode") == 0)
        return encode();
    if (argc == 2 && strcmp(argv[1], "decode") == 0)
        return decode();
    fprintf(stderr, "usage: %s [encode|decode]\n", argv[0]);
    return 2;
}

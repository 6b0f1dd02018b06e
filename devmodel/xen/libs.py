"""ctypes bindings to the Xen tool libraries an ioreq server needs.

Every function is declared once, in `LIBRARIES`, with its ctypes signature and how it reports
failure; tests/xen/test_binding_signatures.py turns those declarations back into C function
pointer types and has GCC check them against Debian's libxen-dev 4.17 headers, so a wrong
argument count or width here fails a test instead of corrupting a call.

Loading is lazy: importing this module never touches a shared library, so the simulated
platform and every other test run where Xen's libraries are not installed. A call whose
library reports failure raises `XenError` with the errno the library left (use_errno=True:
ctypes captures errno right after the call, before Python can clobber it).

Opaque handles are typed pointers to distinct empty structures, not `c_void_p`: passing a
foreign-memory handle to an event-channel function is then a ctypes TypeError, and the
signature test can spell each handle's C type.
"""

from __future__ import annotations

import ctypes
import errno
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Final

from devmodel.xen.platform import XenError

# --------------------------------------------------------------------- C types


class _Opaque(ctypes.Structure):
    """An incomplete C struct; `c_name` is how the headers spell it."""

    c_name: str = ""


class DevicemodelHandle(_Opaque):
    c_name = "xendevicemodel_handle"


class ForeignmemoryHandle(_Opaque):
    c_name = "xenforeignmemory_handle"


class ForeignmemoryResourceHandle(_Opaque):
    c_name = "xenforeignmemory_resource_handle"


class EvtchnHandle(_Opaque):
    c_name = "xenevtchn_handle"


class XsHandle(_Opaque):
    c_name = "struct xs_handle"


class Logger(_Opaque):
    c_name = "struct xentoollog_logger"


DmodP: Final = ctypes.POINTER(DevicemodelHandle)
FmemP: Final = ctypes.POINTER(ForeignmemoryHandle)
FresP: Final = ctypes.POINTER(ForeignmemoryResourceHandle)
XceP: Final = ctypes.POINTER(EvtchnHandle)
XsP: Final = ctypes.POINTER(XsHandle)
LoggerP: Final = ctypes.POINTER(Logger)

# The headers' typedefs, as widths (x86-64, LP64).
domid_t: Final = ctypes.c_uint16
ioservid_t: Final = ctypes.c_uint16
evtchn_port_t: Final = ctypes.c_uint32
xen_pfn_t: Final = ctypes.c_ulong
xs_transaction_t: Final = ctypes.c_uint32
XBT_NULL: Final = 0

u8: Final = ctypes.c_uint8
u16: Final = ctypes.c_uint16
u32: Final = ctypes.c_uint32
u64: Final = ctypes.c_uint64
c_int: Final = ctypes.c_int
c_uint: Final = ctypes.c_uint
c_ulong: Final = ctypes.c_ulong
c_size_t: Final = ctypes.c_size_t
c_bool: Final = ctypes.c_bool
c_void_p: Final = ctypes.c_void_p
c_char_p: Final = ctypes.c_char_p
POINTER: Final = ctypes.POINTER

# --------------------------------------------------------------------- declarations


class Fails(Enum):
    """How a function reports failure (errno says why)."""

    NEGATIVE = "negative"  # int: -1 (or any negative) on failure, else a value or 0
    NULL = "null"  # pointer: NULL on failure
    FALSE = "false"  # bool: false on failure
    NEVER = "never"  # void, or cannot fail


@dataclass(frozen=True)
class Fn:
    """One C function: `restype`, `argtypes`, how it fails.

    `const` lists the parameters that are pointers to const in C. ctypes has no const (it
    changes nothing in the calling convention), but C function pointer types differ by it, so
    the signature test needs to know.
    """

    restype: Any
    argtypes: tuple[Any, ...]
    fails: Fails
    const: frozenset[int] = frozenset()


_logger_open = (LoggerP, c_uint)


@dataclass
class Library:
    """One shared library: loaded on first use, with every declared function configured."""

    soname: str
    header: str
    functions: Mapping[str, Fn]
    _cdll: ctypes.CDLL | None = field(default=None, repr=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def load(self) -> ctypes.CDLL:
        """The library, configured; XenError(ENOENT) if it is not installed."""
        with self._lock:
            if self._cdll is None:
                try:
                    cdll = ctypes.CDLL(self.soname, use_errno=True)
                except OSError as exc:
                    raise XenError(
                        errno.ENOENT,
                        f"cannot load {self.soname} (are Xen's tool libraries installed?): {exc}",
                    ) from None
                for name, fn in self.functions.items():
                    func = getattr(cdll, name)
                    func.restype = fn.restype
                    func.argtypes = fn.argtypes
                    func.errcheck = _ERRCHECK[fn.fails]
                self._cdll = cdll
            return self._cdll

    def fn(self, name: str) -> Callable[..., Any]:
        """The configured function `name` (loading the library on first use)."""
        if name not in self.functions:
            raise KeyError(f"{name} is not declared for {self.soname}")
        func: Callable[..., Any] = getattr(self.load(), name)
        return func


def _raise(func: Any) -> XenError:
    err = ctypes.get_errno() or errno.EIO
    return XenError(err, f"{func.__name__}: {os.strerror(err)}")


def _check_negative(result: int, func: Any, _args: tuple[Any, ...]) -> int:
    if result < 0:
        raise _raise(func)
    return result


def _check_null(result: Any, func: Any, _args: tuple[Any, ...]) -> Any:
    if not result:  # None for c_void_p, a NULL pointer object is falsy
        raise _raise(func)
    return result


def _check_false(result: bool, func: Any, _args: tuple[Any, ...]) -> bool:
    if not result:
        raise _raise(func)
    return result


def _check_never(result: Any, _func: Any, _args: tuple[Any, ...]) -> Any:
    return result


_ERRCHECK: Final[dict[Fails, Callable[[Any, Any, tuple[Any, ...]], Any]]] = {
    Fails.NEGATIVE: _check_negative,
    Fails.NULL: _check_null,
    Fails.FALSE: _check_false,
    Fails.NEVER: _check_never,
}

NEG, NUL, FALSE, NEVER = Fails.NEGATIVE, Fails.NULL, Fails.FALSE, Fails.NEVER

DEVICEMODEL: Final = Library(
    "libxendevicemodel.so.1",
    "xendevicemodel.h",
    {
        "xendevicemodel_open": Fn(DmodP, _logger_open, NUL),
        "xendevicemodel_close": Fn(c_int, (DmodP,), NEG),
        "xendevicemodel_restrict": Fn(c_int, (DmodP, domid_t), NEG),
        "xendevicemodel_create_ioreq_server": Fn(
            c_int, (DmodP, domid_t, c_int, POINTER(ioservid_t)), NEG
        ),
        "xendevicemodel_destroy_ioreq_server": Fn(c_int, (DmodP, domid_t, ioservid_t), NEG),
        "xendevicemodel_set_ioreq_server_state": Fn(
            c_int, (DmodP, domid_t, ioservid_t, c_int), NEG
        ),
        "xendevicemodel_get_ioreq_server_info": Fn(
            c_int,
            (
                DmodP,
                domid_t,
                ioservid_t,
                POINTER(xen_pfn_t),
                POINTER(xen_pfn_t),
                POINTER(evtchn_port_t),
            ),
            NEG,
        ),
        "xendevicemodel_map_io_range_to_ioreq_server": Fn(
            c_int, (DmodP, domid_t, ioservid_t, c_int, u64, u64), NEG
        ),
        "xendevicemodel_unmap_io_range_from_ioreq_server": Fn(
            c_int, (DmodP, domid_t, ioservid_t, c_int, u64, u64), NEG
        ),
        "xendevicemodel_map_pcidev_to_ioreq_server": Fn(
            c_int, (DmodP, domid_t, ioservid_t, u16, u8, u8, u8), NEG
        ),
        "xendevicemodel_unmap_pcidev_from_ioreq_server": Fn(
            c_int, (DmodP, domid_t, ioservid_t, u16, u8, u8, u8), NEG
        ),
        "xendevicemodel_inject_msi": Fn(c_int, (DmodP, domid_t, u64, u32), NEG),
        "xendevicemodel_set_pci_intx_level": Fn(
            c_int, (DmodP, domid_t, u16, u8, u8, u8, c_uint), NEG
        ),
        "xendevicemodel_nr_vcpus": Fn(c_int, (DmodP, domid_t, POINTER(c_uint)), NEG),
    },
)

FOREIGNMEMORY: Final = Library(
    "libxenforeignmemory.so.1",
    "xenforeignmemory.h",
    {
        "xenforeignmemory_open": Fn(FmemP, _logger_open, NUL),
        "xenforeignmemory_close": Fn(c_int, (FmemP,), NEG),
        "xenforeignmemory_restrict": Fn(c_int, (FmemP, domid_t), NEG),
        "xenforeignmemory_map": Fn(
            c_void_p,
            (FmemP, u32, c_int, c_size_t, POINTER(xen_pfn_t), POINTER(c_int)),
            NUL,
            const=frozenset({4}),
        ),
        "xenforeignmemory_unmap": Fn(c_int, (FmemP, c_void_p, c_size_t), NEG),
        "xenforeignmemory_map_resource": Fn(
            FresP,
            (FmemP, domid_t, c_uint, c_uint, c_ulong, c_ulong, POINTER(c_void_p), c_int, c_int),
            NUL,
        ),
        "xenforeignmemory_unmap_resource": Fn(c_int, (FmemP, FresP), NEG),
    },
)

EVTCHN: Final = Library(
    "libxenevtchn.so.1",
    "xenevtchn.h",
    {
        "xenevtchn_open": Fn(XceP, _logger_open, NUL),
        "xenevtchn_close": Fn(c_int, (XceP,), NEG),
        "xenevtchn_fd": Fn(c_int, (XceP,), NEG),
        "xenevtchn_restrict": Fn(c_int, (XceP, domid_t), NEG),
        "xenevtchn_bind_interdomain": Fn(c_int, (XceP, u32, evtchn_port_t), NEG),
        "xenevtchn_unbind": Fn(c_int, (XceP, evtchn_port_t), NEG),
        "xenevtchn_pending": Fn(c_int, (XceP,), NEG),
        "xenevtchn_unmask": Fn(c_int, (XceP, evtchn_port_t), NEG),
        "xenevtchn_notify": Fn(c_int, (XceP, evtchn_port_t), NEG),
    },
)

XENSTORE: Final = Library(
    "libxenstore.so.4",
    "xenstore.h",
    {
        "xs_open": Fn(XsP, (c_ulong,), NUL),
        "xs_close": Fn(None, (XsP,), NEVER),
        "xs_read": Fn(
            c_void_p, (XsP, xs_transaction_t, c_char_p, POINTER(c_uint)), NUL, frozenset({2})
        ),
        "xs_write": Fn(
            c_bool, (XsP, xs_transaction_t, c_char_p, c_void_p, c_uint), FALSE, frozenset({2, 3})
        ),
        "xs_rm": Fn(c_bool, (XsP, xs_transaction_t, c_char_p), FALSE, frozenset({2})),
        "xs_directory": Fn(
            POINTER(c_char_p),
            (XsP, xs_transaction_t, c_char_p, POINTER(c_uint)),
            NUL,
            frozenset({2}),
        ),
        "xs_watch": Fn(c_bool, (XsP, c_char_p, c_char_p), FALSE, frozenset({1, 2})),
        "xs_fileno": Fn(c_int, (XsP,), NEG),
        # NULL with errno EAGAIN when no event is pending: the caller tells that from a failure.
        "xs_check_watch": Fn(POINTER(c_char_p), (XsP,), NEVER),
        # false both for "not introduced" and for a failed request (libxenstore says no more).
        "xs_is_domain_introduced": Fn(c_bool, (XsP, c_uint), NEVER),
    },
)

LIBC: Final = Library(
    "libc.so.6",
    "stdlib.h",
    {"free": Fn(None, (c_void_p,), NEVER)},
)
"""For what libxenstore returns: xs_read and xs_directory results are malloc'd by it."""

LIBRARIES: Final = (DEVICEMODEL, FOREIGNMEMORY, EVTCHN, XENSTORE, LIBC)

# xenforeignmemory_map / map_resource `prot` values (sys/mman.h).
PROT_READ: Final = 0x1
PROT_WRITE: Final = 0x2

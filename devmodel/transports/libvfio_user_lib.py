"""ctypes bindings to libvfio-user (the C library QEMU's and SPDK's vfio-user servers use).

Only what devmodel's libvfio-user transport calls. Every function is declared once in
`FUNCTIONS` with its C spelling next to its ctypes types, and every constant once in
`CONSTANTS`, so that tests/unit/test_libvfio_user_binding.py can compile the declarations
against the library's own header: GCC refuses any function whose prototype differs, and the
sizes, signedness and enum values are compared by a compiled probe. A binding that drifted from
the header would otherwise corrupt the stack silently.

The library comes from scripts/build-libvfio-user (Debian trixie's QEMU source bundles it; it
is not packaged), which installs lib/libvfio-user.so and include/ into the cache;
DEVMODEL_LIBVFIO_USER names another copy of the .so.

Threads: the library is not thread-safe. Its user must make every call on one context from
one thread at a time (devmodel/transports/libvfio_user.py hands the context to one worker
thread at a time); ctypes releases the GIL during each call.
"""

from __future__ import annotations

import ctypes
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Final

__all__ = [
    "CONSTANTS",
    "FUNCTIONS",
    "LIBRARY_ENV",
    "IrqStateCallback",
    "LibVfioUser",
    "LibVfioUserMissing",
    "LogCallback",
    "RegionAccessCallback",
    "ResetCallback",
    "default_library_path",
    "load",
]

LIBRARY_ENV: Final = "DEVMODEL_LIBVFIO_USER"
"""A path to libvfio-user.so to load instead of the cached build's."""

# --- constants (libvfio-user.h; checked by the probe) -----------------------------------------

LIBVFIO_USER_FLAG_ATTACH_NB: Final = 1 << 0
VFU_TRANS_SOCK: Final = 0
VFU_DEV_TYPE_PCI: Final = 0
VFU_PCI_TYPE_CONVENTIONAL: Final = 0
VFU_PCI_TYPE_EXPRESS: Final = 3
VFU_REGION_FLAG_READ: Final = 1 << 0
VFU_REGION_FLAG_WRITE: Final = 1 << 1
VFU_REGION_FLAG_RW: Final = VFU_REGION_FLAG_READ | VFU_REGION_FLAG_WRITE
VFU_REGION_FLAG_MEM: Final = 1 << 2
VFU_REGION_FLAG_ALWAYS_CB: Final = 1 << 3
VFU_PCI_DEV_BAR0_REGION_IDX: Final = 0
VFU_PCI_DEV_CFG_REGION_IDX: Final = 7
VFU_PCI_DEV_NUM_REGIONS: Final = 10
VFU_DEV_INTX_IRQ: Final = 0
VFU_DEV_MSI_IRQ: Final = 1
VFU_DEV_MSIX_IRQ: Final = 2
VFU_DEV_ERR_IRQ: Final = 3
VFU_DEV_REQ_IRQ: Final = 4
VFU_DEV_NUM_IRQS: Final = 5
VFU_RESET_DEVICE: Final = 0
VFU_RESET_LOST_CONN: Final = 1
VFU_RESET_PCI_FLR: Final = 2
PCI_HEADER_TYPE_NORMAL: Final = 0

CONSTANTS: Final[dict[str, int]] = {
    name: value
    for name, value in globals().items()
    if name.startswith(("LIBVFIO_USER_FLAG_", "VFU_", "PCI_HEADER_TYPE_"))
}
"""Every constant above by its C name: the probe prints the header's value of each."""

# --- types ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CType:
    """A ctypes type and how the header spells it (the probe checks they agree)."""

    ctype: Any
    c: str


CTX = CType(ctypes.c_void_p, "vfu_ctx_t *")
INT = CType(ctypes.c_int, "int")
UINT32 = CType(ctypes.c_uint32, "uint32_t")
UINT16 = CType(ctypes.c_uint16, "uint16_t")
UINT8 = CType(ctypes.c_uint8, "uint8_t")
UINT64 = CType(ctypes.c_uint64, "uint64_t")
SIZE = CType(ctypes.c_size_t, "size_t")
SSIZE = CType(ctypes.c_ssize_t, "ssize_t")
LOFF = CType(ctypes.c_int64, "loff_t")
BOOL = CType(ctypes.c_bool, "bool")
VOIDP = CType(ctypes.c_void_p, "void *")
CHARP = CType(ctypes.c_void_p, "char *")  # a buffer: read and written with ctypes.memmove
CSTR = CType(ctypes.c_char_p, "const char *")
IOVECP = CType(ctypes.c_void_p, "struct iovec *")  # always NULL here (no mmap areas)
TRANS = CType(ctypes.c_int, "vfu_trans_t")
DEV_TYPE = CType(ctypes.c_int, "vfu_dev_type_t")
PCI_TYPE = CType(ctypes.c_int, "vfu_pci_type_t")
IRQ_TYPE = CType(ctypes.c_int, "enum vfu_dev_irq_type")
RESET_TYPE = CType(ctypes.c_int, "vfu_reset_type_t")

RegionAccessCallback = ctypes.CFUNCTYPE(
    SSIZE.ctype, CTX.ctype, CHARP.ctype, SIZE.ctype, LOFF.ctype, BOOL.ctype
)
LogCallback = ctypes.CFUNCTYPE(None, CTX.ctype, INT.ctype, ctypes.c_char_p)
ResetCallback = ctypes.CFUNCTYPE(INT.ctype, CTX.ctype, RESET_TYPE.ctype)
IrqStateCallback = ctypes.CFUNCTYPE(None, CTX.ctype, UINT32.ctype, UINT32.ctype, BOOL.ctype)

CALLBACKS: Final[dict[str, tuple[CType | None, tuple[CType, ...]]]] = {
    # typedef name: (return, arguments), as the header declares them
    "vfu_region_access_cb_t": (SSIZE, (CTX, CHARP, SIZE, LOFF, BOOL)),
    "vfu_log_fn_t": (None, (CTX, INT, CType(ctypes.c_char_p, "const char *"))),
    "vfu_reset_cb_t": (INT, (CTX, RESET_TYPE)),
    "vfu_dev_irq_state_cb_t": (None, (CTX, UINT32, UINT32, BOOL)),
}
REGION_CB = CType(RegionAccessCallback, "vfu_region_access_cb_t *")
LOG_CB = CType(LogCallback, "vfu_log_fn_t *")
RESET_CB = CType(ResetCallback, "vfu_reset_cb_t *")
IRQ_STATE_CB = CType(IrqStateCallback, "vfu_dev_irq_state_cb_t *")
DMA_CB = CType(ctypes.c_void_p, "vfu_dma_register_cb_t *")
DMA_UNREG_CB = CType(ctypes.c_void_p, "vfu_dma_unregister_cb_t *")

FUNCTIONS: Final[dict[str, tuple[CType | None, tuple[CType, ...]]]] = {
    "vfu_create_ctx": (CTX, (TRANS, CSTR, INT, VOIDP, DEV_TYPE)),
    "vfu_setup_log": (INT, (CTX, LOG_CB, INT)),
    "vfu_pci_init": (INT, (CTX, PCI_TYPE, INT, INT)),
    "vfu_pci_set_id": (None, (CTX, UINT16, UINT16, UINT16, UINT16)),
    "vfu_pci_set_class": (None, (CTX, UINT8, UINT8, UINT8)),
    "vfu_setup_region": (INT, (CTX, INT, SIZE, REGION_CB, INT, IOVECP, UINT32, INT, UINT64)),
    "vfu_setup_device_reset_cb": (INT, (CTX, RESET_CB)),
    "vfu_setup_device_dma": (INT, (CTX, DMA_CB, DMA_UNREG_CB)),
    "vfu_setup_device_nr_irqs": (INT, (CTX, IRQ_TYPE, UINT32)),
    "vfu_setup_irq_state_callback": (INT, (CTX, IRQ_TYPE, IRQ_STATE_CB)),
    "vfu_realize_ctx": (INT, (CTX,)),
    "vfu_attach_ctx": (INT, (CTX,)),
    "vfu_get_poll_fd": (INT, (CTX,)),
    "vfu_run_ctx": (INT, (CTX,)),
    "vfu_irq_trigger": (INT, (CTX, UINT32)),
    "vfu_destroy_ctx": (None, (CTX,)),
}
"""Every function the transport calls: (return type, argument types) as in the header."""


class LibVfioUserMissing(RuntimeError):
    """The shared library cannot be loaded; the message names the missing piece."""


def default_library_path() -> Path:
    """Where scripts/build-libvfio-user installs the shared library."""
    cache = os.environ.get("DEVMODEL_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "devmodel"
    )
    return Path(cache) / "libvfio-user" / "lib" / "libvfio-user.so"


class LibVfioUser:
    """The loaded library: each function of FUNCTIONS as an attribute, errno kept per call."""

    def __init__(self, path: Path) -> None:
        try:
            self.dll = ctypes.CDLL(str(path), use_errno=True)
        except OSError as exc:
            raise LibVfioUserMissing(
                f"cannot load libvfio-user from {path} ({exc}); scripts/build-libvfio-user "
                f"builds it (or set {LIBRARY_ENV})"
            ) from None
        self.path = path
        for name, (restype, argtypes) in FUNCTIONS.items():
            fn = getattr(self.dll, name)
            fn.restype = None if restype is None else restype.ctype
            fn.argtypes = [a.ctype for a in argtypes]
            setattr(self, name, fn)

    def __getattr__(self, name: str) -> Any:
        # Only reached for names not set in __init__: a function outside FUNCTIONS.
        raise AttributeError(f"libvfio-user binding declares no {name}")


_loaded: dict[Path, LibVfioUser] = {}


def load(path: Path | None = None) -> LibVfioUser:
    """The library at `path` (default: DEVMODEL_LIBVFIO_USER, else the cached build), once."""
    if path is None:
        env = os.environ.get(LIBRARY_ENV)
        path = Path(env) if env else default_library_path()
    if not path.is_file():
        raise LibVfioUserMissing(
            f"libvfio-user is not built: no {path}; scripts/build-libvfio-user builds it"
        )
    lib = _loaded.get(path)
    if lib is None:
        lib = _loaded[path] = LibVfioUser(path)
    return lib

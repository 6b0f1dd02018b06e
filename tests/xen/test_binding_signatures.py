"""devmodel.xen.libs against the real prototypes in Debian's libxen-dev headers.

From each ctypes declaration a C function-pointer variable of the matching type is generated
and initialised with the header's function; GCC refuses (-Werror=incompatible-pointer-types)
any difference in argument count, width, signedness, constness or handle type. The libraries
installed here are also loaded to prove they export every declared symbol.
"""

from __future__ import annotations

import ctypes
import dataclasses
import re
import subprocess
from pathlib import Path

import pytest

from devmodel.xen import libs
from devmodel.xen.platform import XenError
from tests.xen.xen_cc import CFLAGS, require_toolchain

PRELUDE = """\
#define __XEN_TOOLS__ 1
#include <stdbool.h>
#include <stdlib.h>
#include <xendevicemodel.h>
#include <xenevtchn.h>
#include <xenforeignmemory.h>
#include <xenstore.h>
"""
HEADERS = ("xendevicemodel.h", "xenforeignmemory.h", "xenevtchn.h", "xenstore.h", "stdlib.h")

SIMPLE: dict[object, str] = {
    ctypes.c_int: "int",
    ctypes.c_uint: "unsigned int",
    ctypes.c_ushort: "unsigned short",
    ctypes.c_ubyte: "unsigned char",
    ctypes.c_ulong: "unsigned long",
    ctypes.c_bool: "_Bool",
    ctypes.c_void_p: "void *",
    ctypes.c_char_p: "char *",
}


def c_type(t: object, *, const: bool = False) -> str:
    """How C spells the type a ctypes declaration stands for (LP64)."""
    if t is None:
        return "void"
    if t in SIMPLE:
        spelled = SIMPLE[t]
    elif isinstance(t, type) and issubclass(t, ctypes._Pointer):
        target = t._type_
        if isinstance(target, type) and issubclass(target, libs._Opaque):
            spelled = f"{target.c_name} *"
        else:
            spelled = f"{c_type(target)} *"
    else:
        raise AssertionError(f"no C spelling for ctypes type {t!r}")
    if const:
        assert spelled.endswith("*"), f"const on a non-pointer {spelled}"
        spelled = f"const {spelled}"
    return spelled


def declaration(name: str, fn: libs.Fn) -> str:
    args = ", ".join(c_type(t, const=i in fn.const) for i, t in enumerate(fn.argtypes))
    return f"{c_type(fn.restype)} (*check_{name})({args or 'void'}) = {name};\n"


def generate(functions: dict[str, libs.Fn]) -> str:
    return PRELUDE + "".join(declaration(n, f) for n, f in functions.items())


def all_functions() -> dict[str, libs.Fn]:
    out: dict[str, libs.Fn] = {}
    for lib in libs.LIBRARIES:
        out.update(lib.functions)
    return out


def gcc_check(source: str, tmp_path: Path, name: str) -> subprocess.CompletedProcess[str]:
    gcc = require_toolchain(*HEADERS)
    path = tmp_path / f"{name}.c"
    path.write_text(source)
    cmd = [gcc, *CFLAGS, "-Werror=incompatible-pointer-types", "-c", "-o"]
    cmd += [str(tmp_path / f"{name}.o"), str(path)]
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


def test_bindings_match_headers(tmp_path: Path) -> None:
    functions = all_functions()
    done = gcc_check(generate(functions), tmp_path, "bindings")
    assert done.returncode == 0, f"bindings differ from the headers:\n{done.stderr}"
    # The brief's list, so a binding cannot silently disappear.
    for needed in [
        "xendevicemodel_open",
        "xendevicemodel_close",
        "xendevicemodel_restrict",
        "xendevicemodel_create_ioreq_server",
        "xendevicemodel_destroy_ioreq_server",
        "xendevicemodel_set_ioreq_server_state",
        "xendevicemodel_get_ioreq_server_info",
        "xendevicemodel_map_io_range_to_ioreq_server",
        "xendevicemodel_unmap_io_range_from_ioreq_server",
        "xendevicemodel_map_pcidev_to_ioreq_server",
        "xendevicemodel_unmap_pcidev_from_ioreq_server",
        "xendevicemodel_inject_msi",
        "xendevicemodel_set_pci_intx_level",
        "xenforeignmemory_open",
        "xenforeignmemory_close",
        "xenforeignmemory_map_resource",
        "xenforeignmemory_unmap_resource",
        "xenforeignmemory_map",
        "xenforeignmemory_unmap",
        "xenforeignmemory_restrict",
        "xenevtchn_open",
        "xenevtchn_close",
        "xenevtchn_fd",
        "xenevtchn_bind_interdomain",
        "xenevtchn_unbind",
        "xenevtchn_pending",
        "xenevtchn_unmask",
        "xenevtchn_notify",
        "xenevtchn_restrict",
        "xs_open",
        "xs_close",
        "xs_write",
        "xs_read",
        "xs_rm",
        "free",
    ]:
        assert needed in functions, needed


def mutations() -> list[object]:
    """Deliberately wrong declarations: each must be refused."""
    table = all_functions()
    create = table["xendevicemodel_create_ioreq_server"]
    fmap = table["xenforeignmemory_map"]
    pcidev = table["xendevicemodel_map_pcidev_to_ioreq_server"]
    notify = table["xenevtchn_notify"]
    xs_write = table["xs_write"]
    cases = [
        (
            "one argument missing",
            "xendevicemodel_create_ioreq_server",
            dataclasses.replace(create, argtypes=create.argtypes[:-1]),
        ),
        (
            "a u8 declared as u16",
            "xendevicemodel_map_pcidev_to_ioreq_server",
            dataclasses.replace(pcidev, argtypes=(*pcidev.argtypes[:-1], ctypes.c_uint16)),
        ),
        (
            "signedness",
            "xenevtchn_notify",
            dataclasses.replace(notify, argtypes=(notify.argtypes[0], ctypes.c_int)),
        ),
        ("a lost const", "xenforeignmemory_map", dataclasses.replace(fmap, const=frozenset())),
        (
            "the wrong handle",
            "xenevtchn_notify",
            dataclasses.replace(notify, argtypes=(libs.FmemP, notify.argtypes[1])),
        ),
        ("the wrong return type", "xs_write", dataclasses.replace(xs_write, restype=ctypes.c_int)),
    ]
    return [pytest.param(*case, id=str(case[0])) for case in cases]


@pytest.mark.parametrize(("why", "name", "wrong"), mutations())
def test_a_wrong_binding_is_refused(tmp_path: Path, why: str, name: str, wrong: libs.Fn) -> None:
    """The check above can fail: each mutation of a real binding breaks the compile."""
    functions = all_functions() | {name: wrong}
    done = gcc_check(generate(functions), tmp_path, "wrong")
    assert done.returncode != 0, f"{why} in {name} was accepted"
    assert re.search(rf"check_{name}\b", done.stderr), done.stderr


def test_libraries_export_every_symbol() -> None:
    for lib in libs.LIBRARIES:
        cdll = lib.load()
        for name in lib.functions:
            assert hasattr(cdll, name), f"{lib.soname} does not export {name}"
            func = getattr(cdll, name)
            assert func.argtypes == lib.functions[name].argtypes
            assert func.restype == lib.functions[name].restype
            assert lib.fn(name) is func


def test_sonames_are_the_installed_ones() -> None:
    libdir = Path("/usr/lib/x86_64-linux-gnu")
    for lib in libs.LIBRARIES:
        if lib is libs.LIBC:
            continue
        assert (libdir / lib.soname).exists(), f"{lib.soname} is not in {libdir}"


def test_loading_is_lazy_and_failure_is_a_xen_error() -> None:
    missing = libs.Library(
        "libxen-does-not-exist.so.9",
        "none.h",
        {"f": libs.DEVICEMODEL.functions["xendevicemodel_close"]},
    )
    with pytest.raises(XenError, match=r"cannot load libxen-does-not-exist\.so\.9") as info:
        missing.fn("f")
    assert info.value.errno == 2
    with pytest.raises(KeyError, match="not declared"):
        libs.DEVICEMODEL.fn("xendevicemodel_shutdown")


def test_a_failing_call_raises_with_errno() -> None:
    """Without /dev/xen the libraries' open calls fail; the binding turns NULL into XenError."""
    for lib, opener, args in [
        (libs.DEVICEMODEL, "xendevicemodel_open", (None, 0)),
        (libs.FOREIGNMEMORY, "xenforeignmemory_open", (None, 0)),
        (libs.EVTCHN, "xenevtchn_open", (None, 0)),
    ]:
        if Path("/dev/xen").exists():
            pytest.fail("this test assumes a machine without Xen (/dev/xen exists here)")
        with pytest.raises(XenError, match=opener) as info:
            lib.fn(opener)(*args)
        assert info.value.errno != 0, lib.soname

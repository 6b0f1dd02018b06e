"""devmodel.transports.libvfio_user_lib against libvfio-user's own header, compiled by GCC.

From each declaration in FUNCTIONS a function-pointer variable of the declared type is
initialised with the header's function: GCC (-Werror) refuses any difference in argument count,
type, signedness or constness. The callback typedefs are checked the same way, every spelling's
size and signedness against its ctypes type by _Static_assert, and every constant's value is
printed by the compiled probe and compared. The probe links the built library, and the library
is loaded with ctypes, so every declared symbol is proven exported.
"""

from __future__ import annotations

import ctypes
import shutil
import subprocess
from pathlib import Path

import pytest

from devmodel.transports import libvfio_user_lib as lvu
from tests.libvfio_user import include_dir, library_path

INTEGERS = {"int", "uint32_t", "uint16_t", "uint8_t", "uint64_t", "size_t", "ssize_t", "loff_t"}


def _proto(ret: lvu.CType | None, args: tuple[lvu.CType, ...], name: str) -> str:
    r = "void" if ret is None else ret.c
    return f"{r} (*{name})({', '.join(a.c for a in args)})"


def probe_source() -> str:
    lines = [
        "#define _GNU_SOURCE",
        "#include <stdbool.h>",
        "#include <stdio.h>",
        "#include <sys/types.h>",
        "#include <sys/uio.h>",
        "#include <libvfio-user.h>",
        "",
    ]
    for name, (ret, args) in lvu.FUNCTIONS.items():
        lines.append(f"{_proto(ret, args, 'p_' + name)} = {name};")
    for typedef, (ret, args) in lvu.CALLBACKS.items():
        cast = _proto(ret, args, "")
        lines.append(f"{typedef} *c_{typedef} = ({cast})0;")
    spellings: dict[str, lvu.CType] = {}
    for ret, args in [*lvu.FUNCTIONS.values(), *lvu.CALLBACKS.values()]:
        for t in (ret, *args):
            if t is not None:
                spellings.setdefault(t.c, t)
    for i, (c, t) in enumerate(sorted(spellings.items())):
        size = ctypes.sizeof(t.ctype)
        lines.append(f'_Static_assert(sizeof({c}) == {size}, "size of {c}");  /* {i} */')
        if c in INTEGERS:
            signed = t.ctype(-1).value < 0
            lines.append(f'_Static_assert((({c})-1 < ({c})0) == {int(signed)}, "sign of {c}");')
    lines += ["", "int main(void) {"]
    for name in lvu.CONSTANTS:
        lines.append(f'    printf("%s %lld\\n", "{name}", (long long)({name}));')
    lines += ["    return 0;", "}", ""]
    return "\n".join(lines)


def test_declarations_match_the_header(tmp_path: Path) -> None:
    gcc = shutil.which("gcc")
    if gcc is None:
        pytest.fail("gcc is not installed: scripts/setup-env installs it", pytrace=False)
    include = include_dir()
    lib = library_path()
    src = tmp_path / "probe.c"
    src.write_text(probe_source())
    exe = tmp_path / "probe"
    cmd = [
        gcc, "-std=gnu11", "-Wall", "-Wextra", "-Werror", "-Wno-type-limits",
        f"-I{include}", "-o", str(exe), str(src), str(lib), f"-Wl,-rpath,{lib.parent}",
    ]  # fmt: skip
    done = subprocess.run(cmd, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(cmd)}:\n{done.stderr}\n{src.read_text()}"
    out = subprocess.run([str(exe)], capture_output=True, text=True, check=True, timeout=30)
    got = {name: int(value) for name, value in (line.split() for line in out.stdout.splitlines())}
    assert got == lvu.CONSTANTS


def test_a_wrong_declaration_is_refused(tmp_path: Path) -> None:
    """The probe can fail: one argument's width changed makes GCC refuse it."""
    gcc = shutil.which("gcc")
    assert gcc is not None
    include = include_dir()
    src = tmp_path / "wrong.c"
    src.write_text(
        "#define _GNU_SOURCE\n#include <stdbool.h>\n#include <sys/types.h>\n"
        "#include <sys/uio.h>\n#include <libvfio-user.h>\n"
        "int (*p)(vfu_ctx_t *, uint16_t) = vfu_irq_trigger;\n"
    )
    done = subprocess.run(
        [gcc, "-std=gnu11", "-Werror", "-c", f"-I{include}", "-o", "/dev/null", str(src)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode != 0 and "incompatible" in done.stderr


def test_every_declared_function_is_exported() -> None:
    lib = lvu.load(library_path())
    for name in lvu.FUNCTIONS:
        assert getattr(lib.dll, name) is not None
    with pytest.raises(AttributeError):
        _ = lib.vfu_not_declared_here

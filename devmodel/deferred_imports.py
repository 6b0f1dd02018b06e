"""Standard modules that trio imports for features devmodel never uses, executed on first use.

A host runs one `devmodel run` per guest, so what an idle instance holds counts once per guest
(docs/performance.md, "Footprint of an idle instance"). `import trio` loads, at its own import
and whatever the program uses, modules for its TLS streams and DTLS (`ssl`, and with it
libcrypto, 3.5 MB of resident memory; `hmac`, hence `hashlib`), for TCP host names (`idna` and
its tables) and, through `ctypes.util` (thread names), `tempfile` and shutil's optional
archive formats (`bz2`, `lzma` and their libraries). devmodel uses none of them: it serves
unix sockets and event channels. Together they are ~6 MB of an idle instance's VmRSS.

`defer()` puts each of them in `sys.modules` as an empty module that executes its real code,
in place, at the first attribute access: `import ssl` then binds the module without running it
(the import system only reads `__spec__`, which is let through), and any use of it (`ssl.X`,
`from ssl import X`, `hasattr`) loads it fully first, so whoever uses it gets the real module,
and the same object. This is the stdlib's `importlib.util.LazyLoader` idea; that one cannot be
used here because on Python 3.11 any attribute read, `__spec__` included, loads the module,
and every later `import` statement reads `__spec__`.

Only `devmodel/__main__.py` (`python -m devmodel` and the `devmodel` command) calls it, before
trio is imported; a program that imports devmodel as a library is not affected. A module that
is already imported is left alone, and so is one that cannot be found.
"""

from __future__ import annotations

import importlib.util
import sys
import threading
import types
from typing import Final

DEFERRED: Final = ("ssl", "hmac", "idna", "bz2", "lzma", "tempfile")
"""What trio imports and devmodel never runs (tests/integration/test_startup_footprint.py
checks that a served instance leaves them unexecuted)."""

_PASS_THROUGH: Final = frozenset({"__spec__", "__class__"})
# One lock for every deferred module: another thread that uses a module while it runs waits for
# it to finish (as an import in progress makes it wait). Re-entrant, so that the module's own
# code may look itself up (it then sees itself partly run, as in a circular import).
_lock = threading.RLock()
_running: set[int] = set()
_module_getattr = types.ModuleType.__getattribute__


class DeferredModule(types.ModuleType):
    """A module whose code has not run yet; any attribute but `__spec__` runs it first."""

    def __getattribute__(self, attr: str) -> object:
        if attr in _PASS_THROUGH:
            return _module_getattr(self, attr)
        with _lock:
            if type(self) is DeferredModule and id(self) not in _running:
                spec = _module_getattr(self, "__spec__")
                assert spec.loader is not None
                _running.add(id(self))
                try:
                    spec.loader.exec_module(self)
                except BaseException:
                    # As a failed import does: out of sys.modules, the error to the caller.
                    if sys.modules.get(spec.name) is self:
                        del sys.modules[spec.name]
                    raise
                finally:
                    _running.discard(id(self))
                object.__setattr__(self, "__class__", types.ModuleType)  # a plain module now
        return _module_getattr(self, attr)


def defer(names: tuple[str, ...] = DEFERRED) -> list[str]:
    """Put each module of `names` not imported yet in sys.modules, unexecuted; the deferred.

    Top-level modules only: a submodule would be missing as its package's attribute.
    """
    done = []
    for name in names:
        if "." in name:
            raise ValueError(f"{name}: only top-level modules can be deferred")
        if name in sys.modules:
            continue
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            continue
        module = importlib.util.module_from_spec(spec)
        module.__class__ = DeferredModule
        sys.modules[name] = module
        done.append(name)
    return done


def executed(name: str) -> bool:
    """Whether the module `name` is imported and its code has run (not still deferred)."""
    module = sys.modules.get(name)
    return module is not None and type(module) is not DeferredModule

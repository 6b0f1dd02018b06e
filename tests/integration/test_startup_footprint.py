"""What `devmodel run` loads to serve: nothing it only needs on request (docs/performance.md,
"Footprint"). Modules are listed by the interpreter itself (PYTHONPROFILEIMPORTTIME), shared
libraries by /proc/PID/maps."""

from __future__ import annotations

from pathlib import Path

from devmodel.testing import VfioUserClient
from tests.integration.launching import launched

# Loaded only when asked for: prometheus_client at the first scrape or query-metrics,
# construct by tools and tests that read the protocol declarations, the REPL by `attach`;
# test tools never.
NOT_AT_STARTUP = ("prometheus_client", "construct", "hypothesis", "pytest", "devmodel.repl")

# devmodel's own modules an instance loads only when its settings or a request need them: the
# control commands (and what only they use) at the first command, `ls`'s listing never in
# `run`, the lease protocol's connection and events only with a lender socket (this instance
# has the built-in lender), the Xen transport only with --transport xen.
NOT_LOADED = (
    "devmodel.control.commands",
    "devmodel.control.console",
    "devmodel.control.listing",
    "devmodel.leases.lender_link",
    "devmodel.xen",
    "devmodel_wire.aperture_map",
    "devmodel_wire.lease.connection",
    "devmodel_wire.lease.events",
    "devmodel_wire.lease.wire",
    "devmodel_wire.xen",
)

# What trio imports for features devmodel never uses, deferred by devmodel/deferred_imports.py
# (a deferred module's code, when it runs, imports these: so none may be listed), and devmodel's
# own imports for rare paths (difflib for a config file's typo, datetime for JSON logs).
NOT_RUN = ("_ssl", "_hashlib", "hashlib", "_bz2", "_lzma", "idna", "difflib", "datetime")
# ... and the shared libraries those would map (libcrypto alone is 3.5 MB of resident memory).
NOT_MAPPED = ("libcrypto.so", "libssl.so", "libbz2.so", "liblzma.so")


def imported(stderr: str) -> set[str]:
    names = set()
    for line in stderr.splitlines():
        if line.startswith("import time:") and line.count("|") == 2:
            names.add(line.rsplit("|", 1)[1].strip())
    return names


def test_an_idle_served_instance_loads_nothing_it_does_not_need(tmp_path: Path) -> None:
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    with launched(tmp_path, env=env) as dm:
        with VfioUserClient(dm.socket_path) as client:
            client.attach()
            assert len(client.read(0, 0, 8)) == 8
            maps = Path(f"/proc/{dm.proc.pid}/maps").read_text()
        assert dm.stop() == 0
        names = imported(dm.stderr())
    assert "devmodel.app" in names and "trio" in names  # the listing works
    assert "libpython" in maps or "/python" in maps  # the maps too
    loaded = sorted(n for n in names if n.split(".")[0] in NOT_AT_STARTUP or n in NOT_AT_STARTUP)
    assert loaded == []
    own = sorted(n for n in names if any(n == m or n.startswith(f"{m}.") for m in NOT_LOADED))
    assert own == []
    ran = sorted(n for n in names if n.split(".")[0] in NOT_RUN)
    assert ran == []
    mapped = sorted({lib for lib in NOT_MAPPED if f"/{lib}" in maps})
    assert mapped == []


def test_the_control_commands_load_at_the_first_command(tmp_path: Path) -> None:
    """The other side of NOT_LOADED: the deferred commands do load, and serve, when asked."""
    env = {"PYTHONPROFILEIMPORTTIME": "1"}
    with launched(tmp_path, env=env) as dm:
        with dm.control() as ctl:
            status = ctl.execute("query-status")
        assert isinstance(status, dict) and status["status"] == "running"
        assert dm.stop() == 0
        names = imported(dm.stderr())
    assert "devmodel.control.commands" in names

"""What `devmodel run` loads to serve: nothing it only needs on request (docs/performance.md,
"Footprint"). Modules are listed by the interpreter itself (PYTHONPROFILEIMPORTTIME)."""

from __future__ import annotations

from pathlib import Path

from devmodel.testing import VfioUserClient
from tests.integration.launching import launched

# Loaded only when asked for: prometheus_client at the first scrape or query-metrics,
# construct by tools and tests that read the protocol declarations, the REPL by `attach`;
# test tools never.
NOT_AT_STARTUP = ("prometheus_client", "construct", "hypothesis", "pytest", "devmodel.repl")


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
        assert dm.stop() == 0
        names = imported(dm.stderr())
    assert "devmodel.app" in names and "trio" in names  # the listing works
    loaded = sorted(n for n in names if n.split(".")[0] in NOT_AT_STARTUP or n in NOT_AT_STARTUP)
    assert loaded == []

"""dom0 on the Xen test bed, in both profiles of the Xen suite (dom0-ci and dom0-suite run
these steps first): the toolstack answers and devmodel's Xen bindings open real handles.
"""

from __future__ import annotations

import re

import pytest

from .bed import Dom0Run

pytestmark = pytest.mark.xen_guest


def test_dom0_toolstack_is_up(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: in dom0, `xl info` answers and Xen offers HVM (with HAP,
    which TCG's emulated SVM gives it) and `xl list` shows Domain-0."""
    rc, info = dom0_suite.step("xl-info")
    assert rc == 0, info
    fields = dict(re.findall(r"^(\w+)\s*: (.*)$", info, re.MULTILINE))
    assert fields["xen_version"].startswith("4.20."), info
    assert {"hvm", "hap", "pv"} <= set(fields["virt_caps"].split()), info
    assert int(fields["nr_cpus"]) == 2, info
    rc, listing = dom0_suite.step("xl-list")
    assert rc == 0 and re.search(r"^Domain-0\s+0\s", listing, re.MULTILINE), listing


def test_devmodel_opens_xen_handles_in_dom0(dom0_suite: Dom0Run) -> None:
    """Runs on the real hypervisor: devmodel, imported in dom0 from the read-only checkout with
    Debian's python3-trio, -construct and -sortedcontainers, loads Xen's tool libraries and
    opens its devicemodel, foreignmemory, evtchn and xenstore handles."""
    rc, output = dom0_suite.step("devmodel-handles")
    assert rc == 0, output
    assert "devmodel opened and closed its Xen handles" in output

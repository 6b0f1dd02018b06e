"""devmodel.xen.host.XenHost without a hypervisor.

On this machine (no /dev/xen) the real libraries refuse to open: XenHost must raise XenError
with a clear message and leave nothing open. Everything else runs against a fake build of the
four libraries (c/fake_xenlibs.c, compiled against the real headers), which logs each call,
so the arguments XenHost passes (domid, frames, protections, modes) are checked one by one.
"""

from __future__ import annotations

import ctypes
import errno
import os
import select
import struct
from collections.abc import Iterator
from pathlib import Path

import pytest

from devmodel.xen import libs
from devmodel.xen.host import GuestFrames, ResourcePages, XenHost
from devmodel.xen.platform import GuestMapping, IoreqPages, XenError, XenPlatform
from devmodel_wire.xen import BufioreqMode
from tests.xen.xen_cc import C_DIR, compile_c


def _is_a_platform(host: XenHost) -> XenPlatform:
    """mypy checks that XenHost satisfies the contract (and its mappings theirs)."""
    return host


def _pages_are_pages(pages: ResourcePages) -> IoreqPages:
    return pages


def _frames_are_a_mapping(frames: GuestFrames) -> GuestMapping:
    return frames


def test_without_xen_opening_fails_cleanly() -> None:
    if Path("/dev/xen").exists():
        pytest.fail("this test needs a machine without Xen, and /dev/xen exists")
    with pytest.raises(XenError) as info:
        XenHost(1)
    assert info.value.errno in (errno.ENOENT, errno.EACCES, errno.EPERM, errno.ENXIO)
    assert "cannot open a libxendevicemodel.so.1 handle" in str(info.value)
    assert "no /dev/xen" in str(info.value)


def test_domid_is_checked() -> None:
    with pytest.raises(ValueError, match="domid"):
        XenHost(0x7FF0)


# ------------------------------------------------------------------ against the fake


@pytest.fixture(scope="module")
def fake_so(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("fakexen")
    exe = compile_c(
        C_DIR / "fake_xenlibs.c",
        out,
        headers=("xendevicemodel.h", "xenforeignmemory.h", "xenevtchn.h", "xenstore.h"),
        flags=("-shared", "-fPIC"),
    )
    so = exe.with_name("libfakexen.so")
    exe.rename(so)
    return so


@pytest.fixture
def log(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    path = tmp_path / "calls.log"
    monkeypatch.setenv("FAKE_XEN_LOG", str(path))
    monkeypatch.delenv("FAKE_XEN_FAIL", raising=False)
    yield path


def calls(log: Path) -> list[str]:
    lines = log.read_text().splitlines() if log.exists() else []
    log.write_text("")
    return lines


def fake_host(so: Path, domid: int = 5) -> XenHost:
    def fake(real: libs.Library) -> libs.Library:
        return libs.Library(str(so), real.header, real.functions)

    return XenHost(
        domid,
        devicemodel=fake(libs.DEVICEMODEL),
        foreignmemory=fake(libs.FOREIGNMEMORY),
        evtchn=fake(libs.EVTCHN),
        xenstore=fake(libs.XENSTORE),
    )


def test_a_whole_session(fake_so: Path, log: Path) -> None:
    host = fake_host(fake_so)
    assert calls(log) == [
        "xendevicemodel_open 0 0",
        "xenforeignmemory_open 0 0",
        "xenevtchn_open 0 0",
        "xs_open 0",
    ]
    assert os.get_blocking(host.evtchn_fd()) is False

    host.restrict()
    server = host.create_ioreq_server(BufioreqMode.LEGACY)
    assert server == 7
    assert host.bufioreq_port(server) == 33
    host.set_ioreq_server_state(server, True)
    host.map_io_range(server, True, 0xF000_0000, 0xF7FF_FFFF)
    host.unmap_io_range(server, False, 0xCF8, 0xCFF)
    host.map_pcidev(server, 0, 0, 4, 0)
    host.unmap_pcidev(server, 1, 2, 31, 7)
    host.inject_msi(0xFEE0_0000, 0x4041)
    host.set_pci_intx_level(0, 0, 4, 0, 1)
    assert host.vcpu_count() == 3
    assert calls(log) == [
        "xendevicemodel_restrict 5",
        "xenforeignmemory_restrict 5",
        "xenevtchn_restrict 5",
        "xendevicemodel_create_ioreq_server 5 1",
        "xendevicemodel_get_ioreq_server_info 5 7 0 0 1",
        "xendevicemodel_set_ioreq_server_state 5 7 1",
        "xendevicemodel_map_io_range_to_ioreq_server 5 7 1 0xf0000000 0xf7ffffff",
        "xendevicemodel_unmap_io_range_from_ioreq_server 5 7 0 0xcf8 0xcff",
        "xendevicemodel_map_pcidev_to_ioreq_server 5 7 0 0 4 0",
        "xendevicemodel_unmap_pcidev_from_ioreq_server 5 7 1 2 31 7",
        "xendevicemodel_inject_msi 5 0xfee00000 0x4041",
        "xendevicemodel_set_pci_intx_level 5 0 0 4 0 1",
        "xendevicemodel_nr_vcpus 5",
    ]

    # Buffered page = frame 0, then the synchronous page(s), in one mapping.
    pages = host.map_ioreq_pages(server, 3)
    assert calls(log) == ["xenforeignmemory_map_resource 5 0 7 0 2 0 3 0"]
    assert pages.bufioreq is not None
    assert len(pages.bufioreq) == 4096
    assert len(pages.ioreq) == 4096
    assert pages.bufioreq[0] == 0xA0
    assert pages.ioreq[0] == 0xA1
    pages.ioreq[30] = 0x31  # writable
    pages.close()
    pages.close()
    assert calls(log) == ["xenforeignmemory_unmap_resource 2"]
    big = host.map_ioreq_pages(server, 200)  # more than 128 slots: two synchronous pages
    assert len(big.ioreq) == 8192
    assert big.ioreq[4096] == 0xA2
    big.close()
    assert calls(log)[0] == "xenforeignmemory_map_resource 5 0 7 0 3 0 3 0"

    guest = host.map_guest([0x10, 0x11], writable=True)
    assert struct.unpack_from("<Q", guest.view, 0) == (0x10,)
    assert struct.unpack_from("<Q", guest.view, 4096) == (0x11,)
    guest.view[100] = 1
    guest.close()
    readonly = host.map_guest([0x12], writable=False)
    assert readonly.view.readonly
    readonly.close()
    assert calls(log) == [
        "xenforeignmemory_map 5 3 2 0x10",
        "xenforeignmemory_unmap 2",
        "xenforeignmemory_map 5 1 1 0x12",
        "xenforeignmemory_unmap 1",
    ]
    with pytest.raises(XenError, match="guest frame 0xbad of domain 5") as info:
        host.map_guest([0x10, 0xBAD], writable=True)
    assert info.value.errno == errno.EFAULT
    assert calls(log) == ["xenforeignmemory_map 5 3 2 0x10", "xenforeignmemory_unmap 2"]

    assert host.evtchn_bind(3) == 103
    assert host.evtchn_pending() is None
    host.evtchn_notify(103)
    assert host.evtchn_pending() == 103
    assert host.evtchn_pending() is None
    host.evtchn_unmask(103)
    host.evtchn_unbind(103)
    assert calls(log) == [
        "xenevtchn_bind_interdomain 5 3",
        "xenevtchn_notify 103",
        "xenevtchn_unmask 103",
        "xenevtchn_unbind 103",
    ]

    base = "/local/domain/0/device-model/5"
    assert host.xenstore_read(f"{base}/state") is None
    host.xenstore_write(f"{base}/state", "running")
    assert host.xenstore_read(f"{base}/state") == "running"
    assert host.xenstore_directory("/local/domain/0/device-model") == ["5"]
    host.xenstore_remove(base)
    host.xenstore_remove(base)  # already gone: fine
    assert host.xenstore_read(f"{base}/state") is None
    assert host.xenstore_directory(base) == []

    host.destroy_ioreq_server(server)
    calls(log)
    host.close()
    host.close()
    assert calls(log) == [
        "xs_close",
        "xenevtchn_close",
        "xenforeignmemory_close",
        "xendevicemodel_close",
    ]
    with pytest.raises(XenError, match="closed") as closed:
        host.vcpu_count()
    assert closed.value.errno == errno.EBADF


def test_without_a_buffered_page(fake_so: Path, log: Path) -> None:
    host = fake_host(fake_so)
    server = host.create_ioreq_server(BufioreqMode.OFF)
    assert host.bufioreq_port(server) is None
    pages = host.map_ioreq_pages(server, 1)
    assert pages.bufioreq is None
    assert pages.ioreq[0] == 0xA1  # frame 1: the first synchronous page
    pages.close()
    host.close()
    assert "xenforeignmemory_map_resource 5 0 7 1 1 0 3 0" in calls(log)


def test_a_failing_call_raises_its_errno(
    fake_so: Path, log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fake_host(fake_so)
    monkeypatch.setenv("FAKE_XEN_FAIL", "xendevicemodel_create_ioreq_server")
    monkeypatch.setenv("FAKE_XEN_ERRNO", str(errno.ENOSPC))
    with pytest.raises(XenError, match="xendevicemodel_create_ioreq_server") as info:
        host.create_ioreq_server(BufioreqMode.LEGACY)
    assert info.value.errno == errno.ENOSPC
    monkeypatch.setenv("FAKE_XEN_FAIL", "xenforeignmemory_restrict")
    with pytest.raises(XenError, match="xenforeignmemory_restrict"):
        host.restrict()
    host.close()


def test_a_failed_open_closes_what_was_opened(
    fake_so: Path, log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("FAKE_XEN_FAIL", "xenevtchn_open")
    monkeypatch.setenv("FAKE_XEN_ERRNO", str(errno.EACCES))
    with pytest.raises(XenError, match=r"cannot open a libxenevtchn\.so\.1 handle") as info:
        fake_host(fake_so)
    assert info.value.errno == errno.EACCES
    assert calls(log) == [
        "xendevicemodel_open 0 0",
        "xenforeignmemory_open 0 0",
        "xenevtchn_open 0 0",
        "xenforeignmemory_close",
        "xendevicemodel_close",
    ]


def test_vcpu_count_falls_back_to_xenstore(
    fake_so: Path, log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    host = fake_host(fake_so, domid=9)
    for n in range(4):
        host.xenstore_write(f"/local/domain/9/cpu/{n}/availability", "online")
    monkeypatch.setenv("FAKE_XEN_FAIL", "xendevicemodel_nr_vcpus")
    assert host.vcpu_count() == 4
    host.xenstore_remove("/local/domain/9/cpu")
    with pytest.raises(XenError, match="xendevicemodel_nr_vcpus"):
        host.vcpu_count()
    host.xenstore_write("/local/domain/9/cpu/0/availability", "online")
    # Both fail: the dm_op's error is the one reported.
    monkeypatch.setenv("FAKE_XEN_FAIL", "xendevicemodel_nr_vcpus,xs_directory")
    with pytest.raises(XenError, match="xendevicemodel_nr_vcpus"):
        host.vcpu_count()
    host.close()


def test_context_manager_closes(fake_so: Path, log: Path) -> None:
    with fake_host(fake_so) as host:
        calls(log)
    assert calls(log)[-1] == "xendevicemodel_close"
    with pytest.raises(XenError, match="closed"):
        host.evtchn_fd()


def test_arguments_that_ctypes_would_truncate_are_refused(fake_so: Path, log: Path) -> None:
    host = fake_host(fake_so)
    with pytest.raises(ValueError, match="PCI"):
        host.map_pcidev(7, 0, 256, 0, 0)
    with pytest.raises(ValueError, match="function"):
        host.unmap_pcidev(7, 0, 0, 0, 8)
    with pytest.raises(ValueError, match="range"):
        host.map_io_range(7, True, 0x2000, 0x1000)
    with pytest.raises(ValueError, match="MSI"):
        host.inject_msi(0xFEE0_0000, 1 << 32)
    with pytest.raises(ValueError, match="INTx"):
        host.set_pci_intx_level(0, 0, 0, 4, 1)
    with pytest.raises(ValueError, match="frame"):
        host.map_guest([1 << 64], writable=False)
    with pytest.raises(ValueError, match="port"):
        host.evtchn_bind(-1)
    host.close()
    assert not any("ioreq_server" in line or "msi" in line for line in calls(log))


def _readable(fd: int) -> bool:
    return bool(select.select([fd], [], [], 0)[0])


def test_the_domain_end_watch(fake_so: Path, log: Path) -> None:
    """xs_watch on @releaseDomain, its fd (xs_fileno), its events drained with xs_check_watch
    until EAGAIN (and each vector freed), then xs_is_domain_introduced for the guest."""
    host = fake_host(fake_so, domid=11)
    calls(log)
    fd = host.watch_domain_end()
    assert calls(log) == ["xs_watch @releaseDomain devmodel", "xs_fileno"]
    assert _readable(fd)  # xenstored fires a new watch at once
    assert not host.domain_ended()
    assert calls(log) == ["xs_check_watch", "xs_check_watch", "xs_is_domain_introduced 11"]
    assert not _readable(fd)
    ctypes.CDLL(str(fake_so)).fake_xen_release_domain(12)  # another domain
    assert _readable(fd) and not host.domain_ended()
    ctypes.CDLL(str(fake_so)).fake_xen_release_domain(11)
    assert _readable(fd) and host.domain_ended()
    host.close()


def test_a_failed_introduced_query_alone_does_not_end_the_domain(
    fake_so: Path, log: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """xs_is_domain_introduced says false when its request fails: then the guest's xenstore
    directory decides (libxl removes it when it destroys the domain)."""
    host = fake_host(fake_so, domid=13)
    host.xenstore_write("/local/domain/13/name", "guest")
    host.watch_domain_end()
    monkeypatch.setenv("FAKE_XEN_FAIL", "xs_is_domain_introduced")
    monkeypatch.setenv("FAKE_XEN_ERRNO", str(errno.EIO))
    assert not host.domain_ended()
    host.xenstore_remove("/local/domain/13")
    assert host.domain_ended()
    monkeypatch.setenv("FAKE_XEN_FAIL", "xs_check_watch")
    with pytest.raises(XenError, match="xs_check_watch"):
        host.domain_ended()
    host.close()

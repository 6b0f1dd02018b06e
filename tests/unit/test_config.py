"""devmodel/config.py: one option table, the command line over the TOML file, one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from devmodel.config import (
    GRANULE_PICKED,
    MAX_LENDER_TIMEOUT,
    OPTIONS,
    ConfigError,
    Settings,
    build_settings,
    default_granule,
    describe_options,
    load_file,
)
from devmodel.leases.policy import FailurePolicy
from devmodel.polling import DEFAULT_PAGE_IN_POLL_MAX_US, DEFAULT_POLL_MAX_US

LENDER_TIMEOUTS = ("lender-hello-timeout", "lender-ping-timeout", "lender-write-timeout")
LENDER_RANGE = "lender link timeouts must be above 0 and at most 60 s"


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "dm.toml"
    path.write_text(text)
    return str(path)


def test_defaults_match_the_option_table() -> None:
    s = build_settings({"socket-path": "/run/x.sock"})
    defaults = Settings()
    for opt in OPTIONS:
        if opt.name != "socket-path":
            assert getattr(s, opt.attr) == opt.default == getattr(defaults, opt.attr), opt.name


def test_file_values_and_command_line_override(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        """
domid = 7
socket-path = "/run/dm/7.sock"
aperture-size = "64M"
granule = 4096
pci-id = "abcd:0123"
page-in-timeout = 1
failure-policy = "zeros"
log-format = "json"
debug-console = true
metrics-listen = "127.0.0.1:9464"
""",
    )
    s = build_settings({"aperture-size": "128M", "domid": "9"}, load_file(path), path)
    assert s.domid == 9 and s.aperture_size == 128 << 20
    assert s.granule == 4096 and s.pci_id == (0xABCD, 0x0123)
    assert s.page_in_timeout == 1.0 and s.failure_policy is FailurePolicy.ZEROS
    assert s.log_format == "json" and s.debug_console is True
    assert s.metrics_listen == ("127.0.0.1", 9464)
    assert s.sources["aperture-size"] == "command line" and s.sources["granule"] == path
    assert s.as_dict()["pci-id"] == "abcd:0123"


def test_an_fd_on_the_command_line_replaces_the_files_socket_path(tmp_path: Path) -> None:
    path = write(tmp_path, 'socket-path = "/run/dm.sock"\n')
    s = build_settings({"fd": "3"}, load_file(path), path)
    assert s.fd == 3 and s.socket_path is None


@pytest.mark.parametrize(
    ("cli", "words"),
    [
        ({}, "one of --socket-path or --fd is required"),
        ({"socket-path": "/a", "fd": "3"}, "cannot both be given"),
        ({"socket-path": "/a", "aperture-size": "3M"}, "argument --aperture-size: aperture size"),
        ({"socket-path": "/a", "aperture-size": "lots"}, "is not a size"),
        ({"socket-path": "/a", "granule": "8K"}, "granule must be one of 4K, 2M, 1G"),
        (
            {"socket-path": "/a", "aperture-size": "1M", "granule": "2M"},
            "--granule must not be larger",
        ),
        ({"socket-path": "/a", "pci-id": "12345"}, "--pci-id"),
        ({"socket-path": "/a", "page-in-timeout": "5"}, "below 4.5 s"),
        ({"socket-path": "/a", "revoke-timeout": "20"}, "below 4.5 s"),
        ({"transport": "libvfio-user", "socket-path": "/a", "page-in-timeout": "20"}, "4.5 s"),
        ({"transport": "xen", "domid": "3", "page-in-timeout": "60"}, "60 s with --transport xen"),
        ({"socket-path": "/a", "page-in-timeout": "soon"}, "not a number of seconds"),
        ({"socket-path": "/a", "domid": "-1"}, "a guest id is from 0"),
        ({"socket-path": "/a", "domid": "32752"}, "a guest id is from 0"),
        ({"socket-path": "/a", "fd": "x"}, "--fd"),
        ({"socket-path": "/" + "a" * 120}, "at most 107"),
        ({"socket-path": "/a", "failure-policy": "maybe"}, "all-ones, zeros, error"),
        ({"socket-path": "/a", "log-format": "xml"}, "text, json"),
        ({"socket-path": "/a", "metrics-listen": "0.0.0.0:9"}, "--metrics-allow-remote"),
        ({"socket-path": "/a", "metrics-listen": "nohost"}, "HOST:PORT"),
        ({"socket-path": "/a", "metrics-listen": "127.0.0.1:99999"}, "out of range"),
        ({"socket-path": "/a", "control-socket": "/a"}, "name the same file"),
        ({"transport": "xen"}, "needs --domid"),
        ({"transport": "xen", "domid": "3", "socket-path": "/a"}, "belong to the vfio-user"),
        ({"transport": "tcp", "socket-path": "/a"}, "vfio-user, libvfio-user, xen"),
        ({"transport": "libvfio-user", "fd": "3"}, "takes --socket-path, not --fd"),
        ({"transport": "libvfio-user"}, "--socket-path is required"),
        # The library's region size is 32-bit: a 64 GiB (or any > 2 GiB) BAR0 is refused.
        ({"transport": "libvfio-user", "socket-path": "/a", "aperture-size": "64G"}, "up to 2G"),
        ({"transport": "libvfio-user", "socket-path": "/a", "aperture-size": "4G"}, "up to 2G"),
        ({"transport": "libvfio-user", "socket-path": "/a", "pvh-acpi-root": "on"}, "xen"),
        ({"socket-path": "/a", "pvh-acpi-root": "on"}, "belongs to the xen transport"),
        ({"transport": "xen", "domid": "3", "pvh-acpi-root": "yes"}, "auto, on, off"),
        ({"socket-path": "/a", "poll-max-us": "-1"}, "from 0 (off) to 1000 microseconds"),
        ({"socket-path": "/a", "poll-max-us": "5000"}, "from 0 (off) to 1000 microseconds"),
        ({"socket-path": "/a", "poll-max-us": "fast"}, "a number of microseconds"),
        ({"socket-path": "/a", "page-in-poll-max-us": "1001"}, "from 0 (off) to 1000"),
        ({"socket-path": "/a", "page-in-poll-max-us": "-5"}, "from 0 (off) to 1000"),
        # The lender link's deadlines: positive, finite, at most a minute; the option named.
        *(
            ({"socket-path": "/a", name: bad}, f"argument --{name}: {LENDER_RANGE}, not {bad}")
            for name in LENDER_TIMEOUTS
            for bad in ("0", "-1", "60.5", "3600", "nan", "inf", "-inf")
        ),
        ({"socket-path": "/a", "lender-ping-timeout": "soon"}, "'soon' is not a number of seconds"),
        ({"socket-path": "/a", "lender-write-timeout": "2s"}, "'2s' is not a number of seconds"),
        ({"socket-path": "/a", "lender-hello-timeout": ""}, "'' is not a number of seconds"),
    ],
)
def test_bad_values_are_one_line_errors(cli: dict[str, object], words: str) -> None:
    with pytest.raises(ConfigError) as err:
        build_settings(cli)
    message = str(err.value)
    assert words in message, message
    assert "\n" not in message


def test_xen_allows_long_page_in_deadlines() -> None:
    """A Xen vCPU has no reply timeout: the Xen test bed's churn steps give page-ins 20 s."""
    s = build_settings({"transport": "xen", "domid": "3", "page-in-timeout": "20"})
    assert s.page_in_timeout == 20.0


def test_pvh_acpi_root_is_a_xen_choice() -> None:
    assert build_settings({"transport": "xen", "domid": "3"}).pvh_acpi_root == "auto"
    s = build_settings({"transport": "xen", "domid": "3", "pvh-acpi-root": "off"})
    assert s.pvh_acpi_root == "off"


def test_remote_metrics_need_the_explicit_flag() -> None:
    s = build_settings(
        {"socket-path": "/a", "metrics-listen": "[::]:9464", "metrics-allow-remote": True}
    )
    assert s.metrics_listen == ("::", 9464)


@pytest.mark.parametrize(
    ("text", "words"),
    [
        ("aperture-sise = 1\n", "unknown setting 'aperture-sise' (did you mean 'aperture-size'?)"),
        ("fd = 3\n", "'fd' can only be given on the command line"),
        ("granule = [1]\n", "expects a single value"),
        ("domid = \n", "not valid TOML"),
        ('aperture-size = "3M"\nsocket-path = "/a"\n', "dm.toml: aperture-size: aperture size"),
        ("socket-path = '/a'\ndebug-console = 'perhaps'\n", "debug-console: expects true"),
        ("socket-path = '/a'\ndomid = true\n", "domid: expects a guest"),
        (
            "socket-path = '/a'\nlender-ping-timeout = true\n",
            "dm.toml: lender-ping-timeout: expects a number of seconds",
        ),
        (
            "socket-path = '/a'\nlender-ping-timeout = 0\n",
            f"dm.toml: lender-ping-timeout: {LENDER_RANGE}, not 0",
        ),
        (
            "socket-path = '/a'\nlender-write-timeout = 120\n",
            f"dm.toml: lender-write-timeout: {LENDER_RANGE}, not 120",
        ),
        ("socket-path = '/a'\nlender-write-timeout = inf\n", "lender-write-timeout: lender link"),
        ("socket-path = '/a'\nlender-hello-timeout = nan\n", "lender-hello-timeout: lender link"),
        ("socket-path = '/a'\nlender-hello-timeout = '1m'\n", "'1m' is not a number of seconds"),
        ("socket-path = '/a'\nlender-ping-timeout = [5]\n", "expects a single value"),
        ("lender-ping-timeout = 2000-01-01\n", "lender-ping-timeout: expects a number of seconds"),
        ("lender-ping-timout = 5\n", "(did you mean 'lender-ping-timeout'?)"),
    ],
)
def test_bad_files_are_one_line_errors(tmp_path: Path, text: str, words: str) -> None:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as err:
        build_settings({}, load_file(path), path)
    assert words in str(err.value)
    assert "\n" not in str(err.value)


def test_a_missing_file_is_an_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="No such file"):
        load_file(str(tmp_path / "absent.toml"))


def test_every_option_is_described() -> None:
    described = {d["name"]: d for d in describe_options()}
    assert set(described) == {o.name for o in OPTIONS}
    assert described["pci-id"]["default"] == "1234:10e5"
    assert described["failure-policy"]["default"] == "all-ones"
    assert described["fd"]["config_file"] is False


def test_the_example_config_file_loads() -> None:
    path = str(Path(__file__).resolve().parents[2] / "examples" / "launch" / "devmodel.toml")
    s = build_settings({"socket-path": "/run/x.sock"}, load_file(path), path)
    assert s.lender_socket == "/run/gpu-lender/lender.sock" and s.aperture_size == 256 << 20


def test_polling_is_an_option_on_the_command_line_and_in_the_file(tmp_path: Path) -> None:
    assert build_settings({"socket-path": "/a"}).poll_max_us == DEFAULT_POLL_MAX_US
    assert build_settings({"socket-path": "/a", "poll-max-us": "0"}).poll_max_us == 0
    path = write(tmp_path, "poll-max-us = 20\n")
    s = build_settings({"socket-path": "/a"}, load_file(path), path)
    assert s.poll_max_us == 20 and s.as_dict()["poll-max-us"] == 20


def test_the_page_in_poll_is_an_option_on_the_command_line_and_in_the_file(
    tmp_path: Path,
) -> None:
    default = build_settings({"socket-path": "/a"}).page_in_poll_max_us
    assert default == DEFAULT_PAGE_IN_POLL_MAX_US > 0
    off = build_settings({"socket-path": "/a", "page-in-poll-max-us": "0"})
    assert off.page_in_poll_max_us == 0
    path = write(tmp_path, "page-in-poll-max-us = 250\n")
    s = build_settings({"socket-path": "/a"}, load_file(path), path)
    assert s.page_in_poll_max_us == 250 and s.as_dict()["page-in-poll-max-us"] == 250


def test_the_lender_link_timeouts_are_options_on_the_command_line_and_in_the_file(
    tmp_path: Path,
) -> None:
    default = build_settings({"socket-path": "/a"})
    for name in LENDER_TIMEOUTS:
        assert default.as_dict()[name] == 2.0 and name not in default.sources
    # Not bounded by QEMU's 5 s (no guest access waits on them), with any transport.
    s = build_settings(
        {"socket-path": "/a", "lender-ping-timeout": "30", "lender-hello-timeout": "0.5"}
    )
    assert (s.lender_ping_timeout, s.lender_hello_timeout, s.lender_write_timeout) == (
        30.0,
        0.5,
        2.0,
    )
    xen = build_settings({"transport": "xen", "domid": "3", "lender-write-timeout": "60"})
    assert xen.lender_write_timeout == 60.0
    path = write(
        tmp_path,
        "lender-ping-timeout = 10\nlender-write-timeout = 7.5\nlender-hello-timeout = 3\n",
    )
    s = build_settings({"socket-path": "/a", "lender-hello-timeout": "4"}, load_file(path), path)
    assert (s.lender_ping_timeout, s.lender_write_timeout, s.lender_hello_timeout) == (
        10.0,
        7.5,
        4.0,
    )
    assert isinstance(s.lender_ping_timeout, float)  # an integer in the file: seconds anyway
    assert s.sources["lender-ping-timeout"] == path
    assert s.sources["lender-hello-timeout"] == "command line"
    assert s.as_dict()["lender-write-timeout"] == 7.5


@given(
    st.sampled_from(LENDER_TIMEOUTS),
    st.floats(allow_nan=True, allow_infinity=True) | st.integers(-(10**6), 10**6),
    st.booleans(),
)
def test_a_lender_timeout_is_taken_exactly_when_it_is_positive_and_at_most_a_minute(
    name: str, value: float, as_text: bool
) -> None:
    raw: object = repr(value) if as_text else value
    ok = 0 < value <= MAX_LENDER_TIMEOUT
    try:
        s = build_settings({"socket-path": "/a", name: raw})
    except ConfigError as exc:
        assert not ok, exc
        assert f"argument --{name}: " in str(exc) and "\n" not in str(exc)
    else:
        assert ok
        assert s.as_dict()[name] == float(value)


# ---------------------------------------------------------------------------- default granule


@pytest.mark.parametrize("shift", range(21))  # every documented size, 1M to 1T
def test_every_aperture_size_starts_without_a_granule(shift: int) -> None:
    """Issue 14: `--aperture-size 1M` alone exited 2 because the default granule is 2M."""
    size = (1 << 20) << shift
    s = build_settings({"socket-path": "/a", "aperture-size": str(size)})
    assert s.granule == default_granule(size) <= size
    assert s.granule == (4096 if size < 2 << 20 else 2 << 20)
    if s.granule == 2 << 20:
        assert "granule" not in s.sources  # the plain default
    else:
        assert s.sources["granule"] == GRANULE_PICKED
        assert s.as_dict()["granule"] == 4096


def test_default_granule_is_the_largest_that_fits_up_to_2m() -> None:
    assert [default_granule(1 << n) for n in (12, 20, 21, 22, 30, 36, 40)] == [
        4096,
        4096,
        2 << 20,
        2 << 20,
        2 << 20,
        2 << 20,
        2 << 20,
    ]


def test_a_granule_from_the_file_is_not_replaced(tmp_path: Path) -> None:
    path = write(tmp_path, 'granule = "4K"\n')
    s = build_settings({"socket-path": "/a", "aperture-size": "64M"}, load_file(path), path)
    assert s.granule == 4096 and s.sources["granule"] == path
    path = write(tmp_path, 'aperture-size = "1M"\n')
    s = build_settings({"socket-path": "/a"}, load_file(path), path)
    assert (s.aperture_size, s.granule, s.sources["granule"]) == (1 << 20, 4096, GRANULE_PICKED)


def test_libvfio_user_takes_bar0_up_to_2g() -> None:
    s = build_settings({"transport": "libvfio-user", "socket-path": "/a", "aperture-size": "2G"})
    assert (s.transport, s.aperture_size) == ("libvfio-user", 2 << 30)

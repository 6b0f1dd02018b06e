"""`devmodel run`'s settings: one table of options, read from the command line and a TOML file.

Every option exists once, in `OPTIONS`: the command line (`--aperture-size 64M`), the
configuration file (`aperture-size = "64M"`, same name without the dashes) and
`--print-capabilities` are all generated from it, so they cannot drift apart. Values from the
command line override the file's; both go through the same converter, so a bad value is
refused with the same words wherever it came from, in one line (exit status 2).

A toolstack usually writes the per-guest file (or passes options); the file is convenient for
systemd units and for options shared by every guest.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Final

from devmodel.aperture import (
    DEFAULT_GRANULE,
    GRANULES,
    MAX_APERTURE,
    MIN_APERTURE,
    check_aperture_size,
)
from devmodel.leases.policy import FailurePolicy
from devmodel.pci.identity import parse_pci_id
from devmodel.polling import DEFAULT_PAGE_IN_POLL_MAX_US, DEFAULT_POLL_MAX_US, MAX_POLL_MAX_US
from devmodel.sizes import format_size, parse_size

# QEMU's vfio-user client gives up on a reply after 5 s; every wait must end before that.
MAX_TIMEOUT: Final = 4.5
# A Xen vCPU waits on its ioreq slot as long as it takes (no reply timeout), so the xen
# transport may wait longer: under a loaded host the lender can take more than a few seconds
# to answer a page-in. This bound only catches a mistyped value.
MAX_XEN_TIMEOUT: Final = 60.0
# The lender link's own deadlines (HELLO, PING, a write) bound no guest access, so QEMU's 5 s
# does not apply: a very loaded host may need more than the 2 s default. A minute is more than
# any live lender needs; the bound only catches a mistyped value (milliseconds, say).
MAX_LENDER_TIMEOUT: Final = 60.0
DEFAULT_LENDER_TIMEOUT: Final = 2.0
# Xen: domids from DOMID_FIRST_RESERVED (0x7FF0) on are special (DOMID_SELF, DOMID_IO...).
MAX_DOMID: Final = 0x7FEF
# sockaddr_un.sun_path is 108 bytes including the terminating NUL.
MAX_SOCKET_PATH: Final = 107
LIBVFIO_USER_MAX_APERTURE: Final = 2 << 30
"""libvfio-user describes a region's size in a uint32_t, and a BAR is a power of two."""
TRANSPORTS: Final = ("vfio-user", "libvfio-user", "xen")
PCI_CONFIG_PORTS: Final = ("auto", "on", "off")
PVH_ACPI_ROOT: Final = ("auto", "on", "off")
LOG_FORMATS: Final = ("text", "json")
LOG_LEVELS: Final = ("debug", "info", "warning", "error")


class ConfigError(Exception):
    """A bad option or configuration value: one line for the operator, exit status 2."""


# ---------------------------------------------------------------------------- converters
# Each takes what the command line (always a str) or TOML (str, int, float, bool) gave and
# returns the value, or raises ValueError with the reason.


def _size(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError("expects a size such as 256M, not a boolean")
    if isinstance(value, int):
        if value <= 0:
            raise ValueError(f"a size must be positive, not {value}")
        return value
    if isinstance(value, str):
        return parse_size(value)
    raise ValueError(f"expects a size such as 256M, not {type(value).__name__}")


def _aperture(value: object) -> int:
    size = _size(value)
    check_aperture_size(size)
    return size


def _granule(value: object) -> int:
    size = _size(value)
    if size not in GRANULES:
        raise ValueError(
            f"granule must be one of {', '.join(format_size(g) for g in GRANULES)}, not {value}"
        )
    return size


def _pci_id(value: object) -> tuple[int, int]:
    if not isinstance(value, str):
        raise ValueError("expects VVVV:DDDD in hex, as a string")
    return parse_pci_id(value)


def _as_seconds(value: object) -> float:
    """A number of seconds as a config file or the command line gives it (a number or its
    text); a boolean is refused, though Python counts it as an int."""
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise ValueError("expects a number of seconds")
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            raise ValueError(f"{value!r} is not a number of seconds") from None
    return float(value)


def _seconds(value: object) -> float:
    seconds = _as_seconds(value)
    if not 0 < seconds < MAX_XEN_TIMEOUT:
        raise ValueError(
            f"timeouts must be above 0 and below {MAX_TIMEOUT} s "
            f"(QEMU gives up on a reply after 5 s; {MAX_XEN_TIMEOUT:g} s with --transport xen)"
        )
    return seconds


def _lender_seconds(value: object) -> float:
    """A lender link deadline: any positive number of seconds up to MAX_LENDER_TIMEOUT."""
    seconds = _as_seconds(value)
    # Written so that NaN fails it too (every comparison with NaN is false).
    if not 0 < seconds <= MAX_LENDER_TIMEOUT:
        raise ValueError(
            f"lender link timeouts must be above 0 and at most {MAX_LENDER_TIMEOUT:g} s, "
            f"not {value}"
        )
    return seconds


def _integer(value: object, what: str) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expects {what}, not a boolean")
    if isinstance(value, int):
        return value
    if isinstance(value, str):
        try:
            return int(value, 0)
        except ValueError:
            raise ValueError(f"expects {what}, not {value!r}") from None
    raise ValueError(f"expects {what}")


def _fd(value: object) -> int:
    fd = _integer(value, "a file descriptor number")
    if fd < 0:
        raise ValueError("a file descriptor must not be negative")
    return fd


def _domid(value: object) -> int:
    domid = _integer(value, "a guest (domain) id")
    if not 0 <= domid <= MAX_DOMID:
        raise ValueError(f"a guest id is from 0 to {MAX_DOMID} ({MAX_DOMID:#x}), not {domid}")
    return domid


def _poll_us(value: object) -> int:
    us = _integer(value, "a number of microseconds")
    if not 0 <= us <= MAX_POLL_MAX_US:
        raise ValueError(
            f"the polling budget is from 0 (off) to {MAX_POLL_MAX_US} microseconds, not {us}"
        )
    return us


def _path(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError("expects a non-empty path")
    if "\0" in value:
        raise ValueError("a path cannot contain NUL")
    return value


def _socket_path(value: object) -> str:
    path = _path(value)
    if len(path.encode()) > MAX_SOCKET_PATH:
        raise ValueError(
            f"{path} is {len(path.encode())} bytes long; a unix socket path has at most "
            f"{MAX_SOCKET_PATH}"
        )
    return path


def _choice(*choices: str) -> Callable[[object], str]:
    def convert(value: object) -> str:
        if not isinstance(value, str) or value not in choices:
            raise ValueError(f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    return convert


def _policy(value: object) -> FailurePolicy:
    return FailurePolicy(_choice(*(p.value for p in FailurePolicy))(value))


def _bool(value: object) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.lower() in ("true", "yes", "on", "1"):
        return True
    if isinstance(value, str) and value.lower() in ("false", "no", "off", "0"):
        return False
    raise ValueError("expects true or false")


def _listen(value: object) -> tuple[str, int]:
    if not isinstance(value, str):
        raise ValueError("expects HOST:PORT, e.g. 127.0.0.1:9464")
    host, sep, port_text = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"expects HOST:PORT, e.g. 127.0.0.1:9464, not {value!r}")
    host = host.removeprefix("[").removesuffix("]")
    try:
        ipaddress.ip_address(host)
    except ValueError:
        if host != "localhost":
            raise ValueError(f"{host!r} is not an IP address") from None
    try:
        port = int(port_text)
    except ValueError:
        raise ValueError(f"{port_text!r} is not a port number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} is out of range")
    return host, port


def is_loopback(host: str) -> bool:
    return host == "localhost" or ipaddress.ip_address(host).is_loopback


# ---------------------------------------------------------------------------- the table


@dataclass(frozen=True, slots=True)
class Option:
    """One setting: `--NAME` on the command line, `NAME = ...` in the file."""

    name: str
    convert: Callable[[object], object]
    default: object
    help: str
    metavar: str | None = None
    kind: str = "string"  # what --print-capabilities reports: string, size, int, seconds, ...
    flag: bool = False  # store_true on the command line, a boolean in the file
    in_file: bool = True  # may be set in the configuration file

    @property
    def attr(self) -> str:
        return self.name.replace("-", "_")


OPTIONS: Final[tuple[Option, ...]] = (
    Option(
        "domid",
        _domid,
        0,
        "the guest's id: on every log line, sent to the lender in "
        "HELLO, and the Xen domain to serve with --transport xen (default 0)",
        "N",
        "int",
    ),
    Option(
        "transport",
        _choice(*TRANSPORTS),
        "vfio-user",
        "how guest accesses arrive: "
        "vfio-user (default; QEMU's vfio-user-pci, devmodel's own server), libvfio-user "
        "(the same over the libvfio-user C library; BAR0 at most 2 GiB) or xen (an ioreq server)",
        "{vfio-user,libvfio-user,xen}",
        "choice",
    ),
    Option(
        "pci-config-ports",
        _choice(*PCI_CONFIG_PORTS),
        "auto",
        "xen: answer the PCI configuration ports 0xcf8-0xcff and present a host bridge "
        "at 00:00.0, so that a guest with no device model of its own (PVH) enumerates the "
        "function: on, off, or auto (default: on when the guest has no device model)",
        "{auto,on,off}",
        "choice",
    ),
    Option(
        "pvh-acpi-root",
        _choice(*PVH_ACPI_ROOT),
        "auto",
        "xen: add a PCI root (PNP0A03 with its windows) to a PVH guest's ACPI tables while it "
        "is paused, so that its Linux scans bus 0 without pci=noacpi: on, off, or auto "
        "(default: on whenever the configuration ports are served)",
        "{auto,on,off}",
        "choice",
    ),
    Option(
        "socket-path",
        _socket_path,
        None,
        "vfio-user: listen for the client (QEMU's "
        "vfio-user-pci) on this unix socket; a stale socket file from a dead instance is "
        "replaced",
        "PATH",
        "path",
    ),
    Option(
        "fd",
        _fd,
        None,
        "vfio-user: serve on an inherited, already listening unix stream "
        "socket instead of --socket-path",
        "N",
        "int",
        in_file=False,
    ),
    Option(
        "lender-socket",
        _socket_path,
        None,
        "borrow BAR0's memory from the lender "
        "listening on this unix socket (docs/lease-protocol.md); without it devmodel lends "
        "itself private memory",
        "PATH",
        "path",
    ),
    Option(
        "aperture-size",
        _aperture,
        256 << 20,
        "size of BAR0, the lent-memory aperture: a "
        "power of two from 1M (K/M/G/T suffixes; default 256M)",
        "SIZE",
        "size",
    ),
    Option(
        "granule",
        _granule,
        DEFAULT_GRANULE,
        "lease granule: 4K, 2M or 1G (default 2M, or the largest that fits a smaller "
        "aperture: 4K for 1M)",
        "SIZE",
        "size",
    ),
    Option(
        "pci-id",
        _pci_id,
        (0x1234, 0x10E5),
        "PCI vendor and device id in hex (default 1234:10e5)",
        "VVVV:DDDD",
        "pci-id",
    ),
    Option(
        "page-in-timeout",
        _seconds,
        2.0,
        "how long an access waits for a page-in before "
        "the failure policy applies (default 2; below 4.5, under QEMU's 5 s reply timeout; "
        "with --transport xen, whose vCPUs wait as long as it takes, up to 60)",
        "SECONDS",
        "seconds",
    ),
    Option(
        "revoke-timeout",
        _seconds,
        2.0,
        "how long a revoke waits for transports to unmap "
        "the window before it is reported late (default 2)",
        "SECONDS",
        "seconds",
    ),
    Option(
        "failure-policy",
        _policy,
        FailurePolicy.ALL_ONES,
        "what an access gets when its "
        "memory cannot be had: all-ones reads and dropped writes (default, like a PCI "
        "master abort), zeros, or an error reply",
        "{all-ones,zeros,error}",
        "choice",
    ),
    Option(
        "poll-max-us",
        _poll_us,
        DEFAULT_POLL_MAX_US,
        "vfio-user: before waiting for the client's next message, poll "
        "its socket for up to this many microseconds (self-tuned below it, like QEMU's "
        f"poll-max-ns); 0 turns polling off (default {DEFAULT_POLL_MAX_US})",
        "N",
        "int",
    ),
    Option(
        "page-in-poll-max-us",
        _poll_us,
        DEFAULT_PAGE_IN_POLL_MAX_US,
        "with --lender-socket: an access that asked the lender for a page-in polls the "
        "lender's socket for the GRANT for up to this many microseconds (self-tuned below it) "
        "before it sleeps; 0 turns this off "
        f"(default {DEFAULT_PAGE_IN_POLL_MAX_US})",
        "N",
        "int",
    ),
    Option(
        "lender-hello-timeout",
        _lender_seconds,
        DEFAULT_LENDER_TIMEOUT,
        "with --lender-socket: how long the lender has to answer devmodel's HELLO once "
        "connected; a handshake that takes longer is abandoned and retried with backoff "
        f"(default {DEFAULT_LENDER_TIMEOUT:g}; at most {MAX_LENDER_TIMEOUT:g})",
        "SECONDS",
        "seconds",
    ),
    Option(
        "lender-ping-timeout",
        _lender_seconds,
        DEFAULT_LENDER_TIMEOUT,
        "with --lender-socket: how long the lender has to answer the PING devmodel sends "
        "after 5 s of silence; no answer within it ends the session (its leases are dropped) "
        "and devmodel reconnects. Raise it on a very loaded host "
        f"(default {DEFAULT_LENDER_TIMEOUT:g}; at most {MAX_LENDER_TIMEOUT:g})",
        "SECONDS",
        "seconds",
    ),
    Option(
        "lender-write-timeout",
        _lender_seconds,
        DEFAULT_LENDER_TIMEOUT,
        "with --lender-socket: how long a message to the lender may wait for the lender to "
        "read its socket; a lender that reads nothing for longer ends the session "
        f"(default {DEFAULT_LENDER_TIMEOUT:g}; at most {MAX_LENDER_TIMEOUT:g})",
        "SECONDS",
        "seconds",
    ),
    Option(
        "control-socket",
        _socket_path,
        None,
        "serve the control protocol (QMP) on this unix socket; its directory is created 0700 "
        "if missing and must not be accessible to others",
        "PATH",
        "path",
    ),
    Option(
        "log-format",
        _choice(*LOG_FORMATS),
        "text",
        "stderr log format: text (default) or json (one object per line)",
        "{text,json}",
        "choice",
    ),
    Option(
        "log-level",
        _choice(*LOG_LEVELS),
        "info",
        "log verbosity on stderr: debug, info (default), warning, error",
        "{debug,info,warning,error}",
        "choice",
    ),
    Option(
        "pidfile",
        _path,
        None,
        "write the pid here, hold it locked (flock) while running, "
        "remove it on exit; a second instance with the same pidfile refuses to start",
        "PATH",
        "path",
    ),
    Option(
        "ready-fd",
        _fd,
        None,
        "once the device can serve, write READY=1 and a newline to "
        "this inherited fd and close it (sd_notify is used too when NOTIFY_SOCKET is set)",
        "N",
        "int",
        in_file=False,
    ),
    Option(
        "debug-console",
        _bool,
        False,
        "allow the control socket's `python` command: "
        "Python evaluated inside the device model (every statement is logged)",
        None,
        "bool",
        flag=True,
    ),
    Option(
        "metrics-listen",
        _listen,
        None,
        "serve Prometheus metrics over HTTP on "
        "HOST:PORT (/metrics); loopback addresses only unless --metrics-allow-remote",
        "HOST:PORT",
        "listen",
    ),
    Option(
        "metrics-allow-remote",
        _bool,
        False,
        "let --metrics-listen use a non-loopback address",
        None,
        "bool",
        flag=True,
    ),
)

BY_NAME: Final[Mapping[str, Option]] = {o.name: o for o in OPTIONS}


@dataclass(slots=True)
class Settings:
    """Everything `devmodel run` needs, validated. Field names are the options' with `_`."""

    domid: int = 0
    transport: str = "vfio-user"
    pci_config_ports: str = "auto"
    pvh_acpi_root: str = "auto"
    socket_path: str | None = None
    fd: int | None = None
    lender_socket: str | None = None
    aperture_size: int = 256 << 20
    granule: int = DEFAULT_GRANULE
    pci_id: tuple[int, int] = (0x1234, 0x10E5)
    page_in_timeout: float = 2.0
    revoke_timeout: float = 2.0
    failure_policy: FailurePolicy = FailurePolicy.ALL_ONES
    poll_max_us: int = DEFAULT_POLL_MAX_US
    page_in_poll_max_us: int = DEFAULT_PAGE_IN_POLL_MAX_US
    lender_hello_timeout: float = DEFAULT_LENDER_TIMEOUT
    lender_ping_timeout: float = DEFAULT_LENDER_TIMEOUT
    lender_write_timeout: float = DEFAULT_LENDER_TIMEOUT
    control_socket: str | None = None
    log_format: str = "text"
    log_level: str = "info"
    pidfile: str | None = None
    ready_fd: int | None = None
    debug_console: bool = False
    metrics_listen: tuple[str, int] | None = None
    metrics_allow_remote: bool = False
    # Where each non-default value came from ("command line" or the file's path): for
    # query-config, so an operator can tell why a value is what it is.
    sources: dict[str, str] = field(default_factory=dict)
    config_file: str | None = None

    def as_dict(self) -> dict[str, object]:
        """The effective settings as JSON-friendly values, under their option names."""
        out: dict[str, object] = {}
        for opt in OPTIONS:
            value = getattr(self, opt.attr)
            if isinstance(value, FailurePolicy):
                value = value.value
            elif opt.name == "pci-id":
                value = f"{value[0]:04x}:{value[1]:04x}"
            elif opt.name == "metrics-listen" and value is not None:
                value = f"{value[0]}:{value[1]}"
            out[opt.name] = value
        return out


# ---------------------------------------------------------------------------- loading


def load_file(path: str) -> dict[str, object]:
    """The raw key/values of a TOML configuration file; ConfigError on any problem."""
    import tomllib  # noqa: PLC0415 (only with --config: not loaded by every instance)

    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"--config {path}: {exc.strerror}") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not valid TOML: not UTF-8") from None
    for key, value in data.items():
        opt = BY_NAME.get(key)
        if opt is None:
            import difflib  # noqa: PLC0415 (only for this message: kept out of start-up)

            close = difflib.get_close_matches(key, [o.name for o in OPTIONS if o.in_file], 1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigError(f"{path}: unknown setting {key!r}{hint}")
        if not opt.in_file:
            raise ConfigError(f"{path}: {key!r} can only be given on the command line")
        if isinstance(value, dict | list):
            raise ConfigError(f"{path}: {key}: expects a single value, not a table or array")
    return data


def build_settings(
    cli: Mapping[str, object],
    file_values: Mapping[str, object] | None = None,
    file_path: str | None = None,
) -> Settings:
    """Settings from option-name -> raw value maps; the command line wins over the file.

    `--socket-path` and `--fd` are one choice: naming either on the command line discards
    both from the file, so a file's socket path never conflicts with an inherited fd.
    """
    merged: dict[str, tuple[object, str]] = {}
    if file_values:
        where = file_path or "config file"
        for key, value in file_values.items():
            merged[key] = (value, where)
    if "socket-path" in cli or "fd" in cli:
        merged.pop("socket-path", None)
        merged.pop("fd", None)
    for key, value in cli.items():
        merged[key] = (value, "command line")
    settings = Settings(config_file=file_path)
    for key, (raw, where) in merged.items():
        opt = BY_NAME[key]
        try:
            value = opt.convert(raw)
        except ValueError as exc:
            label = f"argument --{key}" if where == "command line" else f"{where}: {key}"
            raise ConfigError(f"{label}: {exc}") from None
        setattr(settings, opt.attr, value)
        settings.sources[key] = where
    if "granule" not in merged:
        settings.granule = default_granule(settings.aperture_size)
        if settings.granule != DEFAULT_GRANULE:
            settings.sources["granule"] = GRANULE_PICKED
    check(settings)
    return settings


# Where a granule came from when nobody gave one and the default did not fit (`sources`).
GRANULE_PICKED: Final = "picked: the largest granule that fits the aperture"


def default_granule(aperture_size: int) -> int:
    """The granule when none is given: 2M, or the largest supported one a smaller aperture
    can hold (4K for the 1M minimum), so that every documented aperture size starts with
    default options. Never 1G by default, however large the aperture: a granule is also the
    unit of a page-in, and a guest should not stall while a gigabyte is paged in."""
    fitting = [g for g in GRANULES if g <= min(aperture_size, DEFAULT_GRANULE)]
    return fitting[-1] if fitting else GRANULES[0]


def check(s: Settings) -> None:
    """Rules that involve more than one option."""
    if s.transport == "libvfio-user":
        # The library binds its socket itself, and describes a region's size in 32 bits.
        if s.fd is not None:
            raise ConfigError("--transport libvfio-user takes --socket-path, not --fd")
        if s.socket_path is None:
            raise ConfigError("--socket-path is required (libvfio-user transport)")
        if s.aperture_size > LIBVFIO_USER_MAX_APERTURE:
            raise ConfigError(
                "--transport libvfio-user serves BAR0 up to 2G (libvfio-user's region size is "
                "32-bit); use --transport vfio-user for a larger --aperture-size"
            )
        if s.pci_config_ports != "auto":
            raise ConfigError("--pci-config-ports belongs to the xen transport")
        if s.pvh_acpi_root != "auto":
            raise ConfigError("--pvh-acpi-root belongs to the xen transport")
    elif s.transport == "vfio-user":
        if s.socket_path is None and s.fd is None:
            raise ConfigError("one of --socket-path or --fd is required (vfio-user transport)")
        if s.socket_path is not None and s.fd is not None:
            raise ConfigError("--socket-path and --fd cannot both be given")
        if s.pci_config_ports != "auto":
            raise ConfigError("--pci-config-ports belongs to the xen transport")
        if s.pvh_acpi_root != "auto":
            raise ConfigError("--pvh-acpi-root belongs to the xen transport")
    else:
        if s.socket_path is not None or s.fd is not None:
            raise ConfigError("--socket-path and --fd belong to the vfio-user transports")
        if s.domid == 0:
            raise ConfigError("--transport xen needs --domid of the guest (not 0)")
    if s.transport != "xen":
        for name, seconds in (
            ("page-in-timeout", s.page_in_timeout),
            ("revoke-timeout", s.revoke_timeout),
        ):
            if seconds >= MAX_TIMEOUT:
                raise ConfigError(
                    f"argument --{name}: timeouts must be above 0 and below {MAX_TIMEOUT} s "
                    f"with --transport {s.transport} (QEMU gives up on a reply after 5 s; "
                    f"{MAX_XEN_TIMEOUT:g} s with --transport xen)"
                )
    if s.granule > s.aperture_size:
        raise ConfigError("--granule must not be larger than --aperture-size")
    if s.metrics_listen is not None and not s.metrics_allow_remote:
        host = s.metrics_listen[0]
        if not is_loopback(host):
            raise ConfigError(
                f"--metrics-listen {host} is not a loopback address; "
                "add --metrics-allow-remote to expose metrics beyond this host"
            )
    paths = [
        ("--socket-path", s.socket_path),
        ("--control-socket", s.control_socket),
        ("--lender-socket", s.lender_socket),
        ("--pidfile", s.pidfile),
    ]
    seen: dict[str, str] = {}
    for name, path in paths:
        if path is None:
            continue
        if path in seen:
            raise ConfigError(f"{seen[path]} and {name} name the same file {path}")
        seen[path] = name


def limits() -> dict[str, object]:
    return {
        "aperture_min": MIN_APERTURE,
        "aperture_max": MAX_APERTURE,
        "granules": list(GRANULES),
        "timeout_max_seconds": MAX_TIMEOUT,
        "timeout_max_seconds_xen": MAX_XEN_TIMEOUT,
        "lender_timeout_max_seconds": MAX_LENDER_TIMEOUT,
        "domid_max": MAX_DOMID,
        "socket_path_max_bytes": MAX_SOCKET_PATH,
        "poll_max_us_max": MAX_POLL_MAX_US,
    }


def describe_options() -> list[dict[str, object]]:
    """The option table for --print-capabilities."""
    out: list[dict[str, object]] = []
    for o in OPTIONS:
        default = o.default
        if isinstance(default, FailurePolicy):
            default = default.value
        elif o.name == "pci-id":
            default = "1234:10e5"
        out.append(
            {
                "name": o.name,
                "option": f"--{o.name}",
                "type": o.kind,
                "default": default,
                "config_file": o.in_file,
                "help": o.help,
            }
        )
    return out

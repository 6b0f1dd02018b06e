"""What a toolstack (libxl, libvirt, systemd, a script) relies on when it runs a device model.

- A pidfile held with `flock` for the whole run: a second instance for the same guest fails at
  once instead of fighting over sockets, and a stale file (its holder dead) is simply reused.
- Readiness, announced only once the sockets exist and the device can serve: `READY=1` over
  the `NOTIFY_SOCKET` datagram socket (systemd `Type=notify`; abstract addresses start with
  `@`), and/or `READY=1\\n` written to an inherited `--ready-fd`, which is then closed (a pipe
  a shell script or a toolstack can block on).
- Socket files: a stale one left by a dead instance is replaced, a live one is never stolen,
  and a private socket (the control socket) lives in a directory only its owner can enter.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import socket
import stat

__all__ = [
    "PidFile",
    "StartupError",
    "bind_unix",
    "check_ready_fd",
    "private_directory",
    "remove_stale_socket",
    "sd_notify",
    "unlink_quietly",
    "write_ready_fd",
]

log = logging.getLogger("devmodel")


class StartupError(Exception):
    """The service could not start (exit status 1): a message for the operator."""


class PidFile:
    """A locked pidfile; `release()` removes it (only if it is still ours) and unlocks."""

    def __init__(self, path: str) -> None:
        self.path = path
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        except OSError as exc:
            raise StartupError(f"cannot open the pidfile {path}: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip()
            os.close(fd)
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise StartupError(
                    f"the pidfile {path} is locked by a running instance (pid {holder or '?'})"
                ) from None
            raise StartupError(f"cannot lock the pidfile {path}: {exc.strerror}") from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self._fd = fd
        self._ino = os.fstat(fd).st_ino

    def release(self) -> None:
        if self._fd < 0:
            return
        # Unlink while still holding the lock, so no other instance can take it in between
        # and lose its fresh file to us; and only our file (not one a successor recreated).
        with contextlib.suppress(OSError):
            if os.stat(self.path).st_ino == self._ino:
                os.unlink(self.path)
        os.close(self._fd)
        self._fd = -1


def sd_notify(state: str, environ: dict[str, str] | None = None) -> bool:
    """Send `state` (e.g. "READY=1") to the service manager if NOTIFY_SOCKET is set.

    The protocol is one datagram on a unix socket; an address starting with '@' is in the
    abstract namespace. Implemented here rather than through libsystemd, which devmodel does
    not otherwise need. Failures are logged, never fatal: readiness is a courtesy.
    """
    env = os.environ if environ is None else environ
    address = env.get("NOTIFY_SOCKET")
    if not address:
        return False
    if address.startswith("@"):
        address = "\0" + address[1:]
    elif not address.startswith("/"):
        log.warning("NOTIFY_SOCKET=%r is neither a path nor an abstract address", address)
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as sock:
            sock.sendto(state.encode(), address)
    except OSError as exc:
        log.warning("cannot notify the service manager (%s): %s", address, exc.strerror)
        return False
    return True


def check_ready_fd(fd: int) -> None:
    """Fail at startup, not at readiness, when --ready-fd is not an open, writable fd."""
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError:
        raise StartupError(f"--ready-fd {fd}: not an open file descriptor") from None
    if flags & os.O_ACCMODE == os.O_RDONLY:
        raise StartupError(f"--ready-fd {fd}: not open for writing")
    # Not inherited further (nothing is spawned today, but a pipe held open by a child would
    # keep a waiting toolstack from ever seeing it close).
    os.set_inheritable(fd, False)


def write_ready_fd(fd: int) -> None:
    try:
        os.write(fd, b"READY=1\n")
    except OSError as exc:
        log.warning("cannot write to --ready-fd %d: %s", fd, exc.strerror)
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)


def remove_stale_socket(path: str) -> None:
    """Remove a socket file left by a dead instance; refuse to steal a live one's."""
    try:
        mode = os.lstat(path).st_mode
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(mode):
        raise StartupError(f"{path} exists and is not a socket; not touching it")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError as exc:
        if exc.errno in (errno.ECONNREFUSED, errno.ENOENT):
            os.unlink(path)
            return
        raise StartupError(f"cannot check the existing socket {path}: {exc.strerror}") from None
    finally:
        probe.close()
    raise StartupError(f"another process is serving on {path}")


def private_directory(path: str) -> bool:
    """Make sure the directory that will hold `path` is private; True if it was created.

    A missing directory is created 0700. An existing one must belong to this user (or root)
    and give nothing to group or others: the socket's own mode is not enough on every system,
    and a directory others can write to would let them swap the socket file.
    """
    directory = os.path.dirname(os.path.abspath(path))
    created = False
    try:
        os.mkdir(directory, 0o700)
        created = True
    except FileExistsError:
        pass
    except FileNotFoundError:
        try:
            os.makedirs(os.path.dirname(directory), 0o755, exist_ok=True)
            os.mkdir(directory, 0o700)
            created = True
        except OSError as exc:
            raise StartupError(f"cannot create {directory}: {exc.strerror}") from None
    except OSError as exc:
        raise StartupError(f"cannot create {directory}: {exc.strerror}") from None
    st = os.stat(directory)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{directory} is not a directory")
    if st.st_uid not in (os.geteuid(), 0):
        raise StartupError(f"{directory} belongs to uid {st.st_uid}, not to this user")
    if st.st_mode & 0o077:
        raise StartupError(
            f"{directory} is accessible to group or others (mode {stat.S_IMODE(st.st_mode):04o});"
            " the control socket needs a private (0700) directory"
        )
    return created


def bind_unix(path: str, mode: int | None = None, backlog: int = 4) -> socket.socket:
    """A listening unix stream socket at `path` (stale file replaced), chmod-ed to `mode`."""
    remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
    try:
        sock.bind(path)
        if mode is not None:
            os.chmod(path, mode)
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot listen on {path}: {exc.strerror}") from None
    return sock


def unlink_quietly(path: str | None) -> None:
    if path is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)

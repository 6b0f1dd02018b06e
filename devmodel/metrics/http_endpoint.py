"""`--metrics-listen`: a tiny HTTP endpoint serving `/metrics` to a Prometheus scraper.

Deliberately minimal, in trio like the rest of the process, instead of prometheus_client's
threaded WSGI server: one request per connection, a deadline on each, a cap on concurrent
connections, so that nothing a peer does costs the device more than a bounded amount of work.
The address is loopback unless the settings explicitly allow otherwise (devmodel.config).
The body is whatever `render()` returns (devmodel.metrics.exposition renders it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Final

import trio

from devmodel.metrics.exposition import CONTENT_TYPE

__all__ = [
    "HTTP_MAX_CONNECTIONS",
    "HTTP_MAX_REQUEST",
    "HTTP_TIMEOUT",
    "bound_address",
    "open_metrics",
    "serve_metrics",
]

HTTP_MAX_REQUEST: Final = 8 << 10
HTTP_TIMEOUT: Final = 5.0
HTTP_MAX_CONNECTIONS: Final = 8

Render = Callable[[], bytes]


async def open_metrics(host: str, port: int) -> list[trio.SocketListener]:
    """Bind the metrics endpoint (before the service starts, so a busy port fails startup)."""
    return await trio.open_tcp_listeners(port, host=host)


def bound_address(listeners: list[trio.SocketListener]) -> tuple[str, int]:
    name = listeners[0].socket.getsockname()
    return str(name[0]), int(name[1])


async def serve_metrics(
    listeners: list[trio.SocketListener],
    render: Render,
    task_status: trio.TaskStatus[list[trio.SocketListener]] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve `render()` at GET /metrics over HTTP/1.0 until cancelled."""
    limiter = trio.CapacityLimiter(HTTP_MAX_CONNECTIONS)

    async def handle(stream: trio.SocketStream) -> None:
        async with stream:
            try:
                limiter.acquire_nowait()
            except trio.WouldBlock:
                return
            try:
                with trio.move_on_after(HTTP_TIMEOUT):
                    await _http_exchange(stream, render)
            except (trio.BrokenResourceError, trio.ClosedResourceError, OSError):
                pass
            finally:
                limiter.release()

    await trio.serve_listeners(handle, listeners, task_status=task_status)


async def _http_exchange(stream: trio.SocketStream, render: Render) -> None:
    request = bytearray()
    while b"\r\n\r\n" not in request and b"\n\n" not in request:
        chunk = await stream.receive_some(4096)
        if not chunk:
            return
        request += chunk
        if len(request) > HTTP_MAX_REQUEST:
            await stream.send_all(_http(431, "text/plain", b"request too large\n"))
            return
    first = bytes(request).split(b"\n", 1)[0].decode("latin-1").strip().split()
    if len(first) < 2 or first[0] not in ("GET", "HEAD"):
        await stream.send_all(_http(405, "text/plain", b"only GET /metrics\n"))
        return
    path = first[1].split("?", 1)[0]
    if path not in ("/metrics", "/"):
        await stream.send_all(_http(404, "text/plain", b"see /metrics\n"))
        return
    reply = _http(200, CONTENT_TYPE, render())
    if first[0] == "HEAD":
        reply = reply[: reply.index(b"\r\n\r\n") + 4]
    await stream.send_all(reply)


_REASONS: Final = {200: "OK", 404: "Not Found", 405: "Method Not Allowed", 431: "Too Large"}


def _http(status: int, ctype: str, body: bytes) -> bytes:
    head = (
        f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {ctype}\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    )
    return head.encode() + body

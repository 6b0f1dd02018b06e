"""devmodel/metrics/http_endpoint.py: GET /metrics and HEAD, the refusals, and the limits
(request size, deadline, connection cap) that keep a scraper's cost bounded."""

from __future__ import annotations

import trio
import trio.testing

from devmodel.metrics import http_endpoint
from devmodel.metrics.http_endpoint import bound_address, open_metrics, serve_metrics

BODY = b"devmodel_leases 1.0\n"


async def exchange(port: int, request: bytes) -> bytes:
    stream = await trio.open_tcp_stream("127.0.0.1", port)
    async with stream:
        await stream.send_all(request)
        reply = b""
        while chunk := await stream.receive_some(65536):
            reply += chunk
    return reply


async def test_get_head_and_refusals() -> None:
    listeners = await open_metrics("127.0.0.1", 0)
    host, port = bound_address(listeners)
    assert host == "127.0.0.1" and port > 0
    renders: list[int] = []

    def render() -> bytes:
        renders.append(1)
        return BODY

    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, listeners, render)
        ok = await exchange(port, b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n")
        head, _, body = ok.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.0 200 OK")
        assert b"Content-Type: text/plain; version=0.0.4; charset=utf-8" in head
        assert body == BODY and f"Content-Length: {len(BODY)}".encode() in head
        only_head = await exchange(port, b"HEAD /metrics HTTP/1.0\r\n\r\n")
        assert only_head.startswith(b"HTTP/1.0 200") and only_head.endswith(b"\r\n\r\n")
        assert (await exchange(port, b"GET /other HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 404")
        assert (await exchange(port, b"POST /metrics HTTP/1.0\r\n\r\n")).startswith(b"HTTP/1.0 405")
        # Past the limit the endpoint answers without reading on. (Sized so that it has read
        # everything by then: closing on unread bytes would reset the connection instead.)
        huge = b"GET /metrics HTTP/1.0\r\nX: " + b"y" * (http_endpoint.HTTP_MAX_REQUEST + 100)
        assert len(huge) % 4096 and len(huge) < http_endpoint.HTTP_MAX_REQUEST + 4096
        assert (await exchange(port, huge)).startswith(b"HTTP/1.0 431")
        assert len(renders) == 2  # only GET and HEAD of /metrics render
        nursery.cancel_scope.cancel()


async def test_silent_peers_are_cut_off_and_capped(autojump_clock: trio.testing.MockClock) -> None:
    listeners = await open_metrics("127.0.0.1", 0)
    _, port = bound_address(listeners)
    async with trio.open_nursery() as nursery:
        await nursery.start(serve_metrics, listeners, lambda: BODY)
        silent = [
            await trio.open_tcp_stream("127.0.0.1", port)
            for _ in range(http_endpoint.HTTP_MAX_CONNECTIONS)
        ]
        await trio.testing.wait_all_tasks_blocked()
        # One more than the cap is closed at once, unanswered.
        assert await exchange(port, b"GET /metrics HTTP/1.0\r\n\r\n") == b""
        # The silent ones are closed at the deadline, and the endpoint serves again.
        await trio.sleep(http_endpoint.HTTP_TIMEOUT + 0.1)
        for stream in silent:
            assert await stream.receive_some(10) == b""
            await stream.aclose()
        reply = await exchange(port, b"GET / HTTP/1.0\r\n\r\n")
        assert reply.startswith(b"HTTP/1.0 200") and reply.endswith(BODY)
        nursery.cancel_scope.cancel()

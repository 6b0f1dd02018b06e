"""Fuzz target: the control protocol (devmodel_wire.control), server and client side.

Variants: a server with a small command limit (so that the limit is reached), a server in
negotiation mode with the default limit, the same already negotiated, and a client. Every
command the server hands out is answered, and every refusal's error encoded, as
devmodel/control/server.py does. Invariants (the module docstring is the specification):

- the server raises nothing but ControlProtocolError, only fatal, and only once a command
  outgrows the limit; the client raises nothing but ControlProtocolError;
- each server event is a Command (a string name, object arguments) or a BadCommand whose
  error class is GenericError or CommandNotFound; before `qmp_capabilities` every other
  command is refused CommandNotFound, and `events_enabled` changes only with that command;
- every answer can be written: the Return of any Command and the error of any BadCommand
  encode as JSON, echoing their id;
- the stream resynchronises: when the server is not inside an object, a newline and a command
  appended to the stream come out as that command (or its CommandNotFound refusal);
- chunking does not matter: the chunked stream gives what the whole stream gives.
"""

from __future__ import annotations

from typing import Any

from devmodel_wire import control as ctl
from pyvfio_user.sansio import CLOSED, NEED_DATA
from tests.fuzz.common import Plan, parse_plan

SMALL_LIMIT = 512
SYNC = b'{"execute":"fuzz-sync","id":"sync"}'


def _server(variant: int) -> ctl.ServerConnection:
    conn = ctl.ServerConnection(SMALL_LIMIT if variant == 0 else ctl.MAX_COMMAND_LINE)
    if variant == 2:
        conn.receive_data(ctl.encode_command(ctl.CAPABILITIES_COMMAND))
        assert isinstance(conn.next_event(), ctl.Command)
    return conn


def _check_server_event(conn: ctl.ServerConnection, event: Any, negotiated: bool) -> None:
    if isinstance(event, ctl.Command):
        assert isinstance(event.name, str) and isinstance(event.arguments, dict), event
        if not negotiated:
            assert event.name == ctl.CAPABILITIES_COMMAND, f"{event} before negotiation"
            assert conn.events_enabled
        ctl.encode_return({}, event.id)  # the reply echoes the id: it must encode
        return
    assert isinstance(event, ctl.BadCommand), event
    assert event.error.error_class in (ctl.GENERIC_ERROR, ctl.COMMAND_NOT_FOUND), event
    assert conn.events_enabled == negotiated, "a refused command changed negotiation"
    ctl.encode_error(event.error)


def drive_server(conn: ctl.ServerConnection, chunks: list[bytes]) -> list[Any]:
    outcomes: list[Any] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            negotiated = conn.events_enabled
            try:
                event = conn.next_event()
            except ctl.ControlProtocolError as exc:
                assert exc.fatal and "longer than" in str(exc), exc
                outcomes.append(f"fatal: {exc}")
                return outcomes
            if event is NEED_DATA or event is CLOSED:
                break
            _check_server_event(conn, event, negotiated)
            outcomes.append(event)
    return outcomes


def _check_resync(conn: ctl.ServerConnection, outcomes: list[Any]) -> None:
    if outcomes and isinstance(outcomes[-1], str):
        return  # fatal: nothing more is read
    stream = conn._stream
    if stream._depth:
        return  # inside an object, where a newline is only whitespace
    if len(stream._buf) + len(SYNC) + 2 > stream.max_line:
        return  # what is buffered and the command would outgrow the limit: fatal, rightly
    more = drive_server(conn, [b"\n" + SYNC + b"\n"])
    assert more, "the command after a newline was lost"
    last = more[-1]
    if isinstance(last, ctl.BadCommand):
        assert last.error.error_class == ctl.COMMAND_NOT_FOUND and last.error.id == "sync", last
    else:
        assert isinstance(last, ctl.Command) and last.name == "fuzz-sync", last


def drive_client(conn: ctl.ClientConnection, chunks: list[bytes]) -> list[Any]:
    outcomes: list[Any] = []
    for chunk in chunks:
        conn.receive_data(chunk)
        while True:
            try:
                event = conn.next_event()
            except ctl.ControlProtocolError as exc:
                outcomes.append(f"error: {exc}")
                return outcomes
            if event is NEED_DATA or event is CLOSED:
                break
            assert isinstance(
                event, ctl.Greeting | ctl.Return | ctl.ErrorReply | ctl.EventMessage
            ), event
            if isinstance(event, ctl.ErrorReply):
                assert isinstance(event.error_class, str) and isinstance(event.desc, str)
            if isinstance(event, ctl.EventMessage):
                assert isinstance(event.seconds, int) and isinstance(event.microseconds, int)
            outcomes.append(event)
    return outcomes


def _drive(variant: int, plan: Plan, chunks: list[bytes]) -> tuple[list[Any], Any]:
    feeds = [*chunks, b""] if plan.eof else chunks
    if variant == 3:
        client = ctl.ClientConnection(SMALL_LIMIT)
        return drive_client(client, feeds), client
    server = _server(variant)
    return drive_server(server, feeds), server


def one_input(data: bytes) -> None:
    plan = parse_plan(data)
    variant = plan.variant % 4
    outcomes, conn = _drive(variant, plan, plan.chunks)
    if isinstance(conn, ctl.ServerConnection) and not plan.eof:
        _check_resync(conn, outcomes)
    if len(plan.chunks) <= 1:
        return  # the whole stream is what was fed
    whole, _ = _drive(variant, plan, [plan.stream])
    assert outcomes == whole, f"chunking changed the outcome: {outcomes} {whole}"

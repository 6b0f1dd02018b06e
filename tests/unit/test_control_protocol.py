"""protocol/devmodel_wire/control.py: the QMP-style control protocol, sans-IO, both ends."""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from devmodel_wire.control import (
    COMMAND_NOT_FOUND,
    GENERIC_ERROR,
    Arg,
    BadCommand,
    ClientConnection,
    Command,
    CommandFailed,
    ControlProtocolError,
    ErrorReply,
    EventMessage,
    Greeting,
    LineBuffer,
    Return,
    ServerConnection,
    check_arguments,
    encode_command,
    encode_error,
    encode_event,
    encode_greeting,
    encode_return,
    timestamp,
)
from pyvfio_user.sansio import CLOSED, NEED_DATA, Sentinel


def events(conn: ServerConnection) -> list[Command | BadCommand]:
    out: list[Command | BadCommand] = []
    while True:
        e = conn.next_event()
        if isinstance(e, Sentinel):
            return out
        out.append(e)


def negotiated() -> ServerConnection:
    conn = ServerConnection()
    conn.receive_data(b'{"execute":"qmp_capabilities"}\n')
    [cmd] = events(conn)
    assert isinstance(cmd, Command) and conn.events_enabled
    return conn


def test_negotiation_mode_refuses_everything_but_qmp_capabilities() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"execute":"query-status","id":1}\n')
    [bad] = events(conn)
    assert isinstance(bad, BadCommand)
    assert bad.error.error_class == COMMAND_NOT_FOUND and bad.error.id == 1
    assert not conn.events_enabled
    conn.receive_data(b'{"execute":"qmp_capabilities"}\n{"execute":"qmp_capabilities"}\n')
    ok, again = events(conn)
    assert isinstance(ok, Command) and ok.name == "qmp_capabilities"
    assert isinstance(again, BadCommand) and again.error.error_class == COMMAND_NOT_FOUND


def test_unknown_capabilities_are_refused() -> None:
    conn = ServerConnection()
    conn.receive_data(b'{"execute":"qmp_capabilities","arguments":{"enable":["oob"]}}\n')
    [bad] = events(conn)
    assert isinstance(bad, BadCommand) and not conn.events_enabled


def test_commands_with_ids_arguments_and_crlf() -> None:
    conn = negotiated()
    conn.receive_data(b'{"execute":"a","arguments":{"x":1},"id":{"k":[1]}}\r\n\n  \n')
    conn.receive_data(b'{"execute":"b"}')
    a, b = events(conn)
    assert isinstance(a, Command) and a.arguments == {"x": 1} and a.id == {"k": [1]}
    # The object's end ends the command: no newline needed (stock QMP clients send none).
    assert isinstance(b, Command) and not b.has_id and b.arguments == {}
    conn.receive_data(b"\n")
    assert events(conn) == []


def test_commands_are_a_json_stream_as_in_qmp() -> None:
    """qemu.qmp sends objects back to back without newlines; a command may span lines."""
    conn = negotiated()
    conn.receive_data(b'{"execute":"a","id":"__qmp#00001"}{"execute":"b","arguments":{"s":"}{"}}')
    conn.receive_data(b'  {"execute":\n "c",\r\n "arguments": {"s": "\\"\\n]"}}')
    a, b, c = events(conn)
    assert isinstance(a, Command) and a.id == "__qmp#00001"
    assert isinstance(b, Command) and b.arguments == {"s": "}{"}
    assert isinstance(c, Command) and c.name == "c" and c.arguments == {"s": '"\n]'}


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b'{"execute":"x","arguments":{"s":"unterminated\n', "newline inside a string"),
        (b"[" * 2000 + b"]" * 2000 + b"\n", "nested too deeply"),
        (b'}{"execute":"not-this"}\n', "JSON parse error"),
        (b'"just a string" {"execute":"nor-this"}\n', "JSON parse error"),
        (b'"just a string"\n', "must be a JSON object"),
    ],
)
def test_bad_input_costs_the_rest_of_its_line(data: bytes, words: str) -> None:
    conn = negotiated()
    conn.receive_data(data + b'{"execute":"next"}')
    bad, good = events(conn)
    assert isinstance(bad, BadCommand) and words in bad.error.desc
    assert isinstance(good, Command) and good.name == "next"


@pytest.mark.parametrize(
    ("line", "words"),
    [
        (b"not json", "JSON parse error"),
        (b"[1,2]", "must be a JSON object"),
        (b'{"execute":1}', "'execute' must be a string"),
        (b'{"execute":"x","arguments":[]}', "'arguments' must be an object"),
        (b'{"execute":"x","bogus":1,"id":5}', "'bogus' is unexpected"),
        (b'{"execute":"x","arguments":{"v":NaN}}', "NaN is not valid JSON"),
        (b"\xff\xfe", "not UTF-8"),
        (b"[" * 100000 + b"]" * 100000, "nested too deeply"),
    ],
)
def test_malformed_lines_become_errors_and_the_stream_goes_on(line: bytes, words: str) -> None:
    conn = negotiated()
    conn.receive_data(line[:60000] + b"\n" if len(line) > 60000 else line + b"\n")
    conn.receive_data(b'{"execute":"next"}\n')
    bad, good = events(conn)
    assert isinstance(bad, BadCommand) and bad.error.error_class == GENERIC_ERROR
    if len(line) <= 60000:
        assert words in bad.error.desc
    assert isinstance(good, Command) and good.name == "next"


@pytest.mark.parametrize("number", [b"1e999", b"-1E400", b"2e308"])
def test_a_number_beyond_a_float_is_refused_so_every_reply_can_echo_the_id(number: bytes) -> None:
    """Found by the control fuzz target's "every answer encodes" invariant: json.loads reads
    1e999 as inf, and a reply echoing an id of inf cannot be encoded (allow_nan=False), so a
    client's command made the server's reply raise instead of answering it."""
    conn = negotiated()
    conn.receive_data(b'{"execute":"x","id":' + number + b"}\n")
    conn.receive_data(b'{"execute":"y","arguments":{"n":' + number + b'},"id":1.5e300}\n')
    bad, also_bad = events(conn)
    for refused in (bad, also_bad):
        assert isinstance(refused, BadCommand) and "out of range" in refused.error.desc
        assert json.loads(encode_error(refused.error))["error"]["class"] == GENERIC_ERROR
    client = ClientConnection()
    client.receive_data(b'{"return":' + number + b"}\n")
    with pytest.raises(ControlProtocolError, match="out of range"):
        client.next_event()


def test_the_id_is_kept_when_it_can_be() -> None:
    conn = negotiated()
    conn.receive_data(b'{"execute":"x","bogus":1,"id":"me"}\n')
    [bad] = events(conn)
    assert isinstance(bad, BadCommand) and bad.error.id == "me"
    assert json.loads(encode_error(bad.error))["id"] == "me"


def test_oversized_line_is_fatal_even_without_newline() -> None:
    conn = ServerConnection(max_line=1000)
    conn.receive_data(b"x" * 1001)
    with pytest.raises(ControlProtocolError) as err:
        conn.next_event()
    assert err.value.fatal
    conn = ServerConnection(max_line=1000)
    conn.receive_data(b'{"execute":"' + b"y" * 2000 + b'"}\n')
    with pytest.raises(ControlProtocolError):
        conn.next_event()


def test_end_of_stream() -> None:
    conn = negotiated()
    conn.receive_data(b'{"execute":"last"}')
    conn.receive_data(b"")
    assert [e.name for e in events(conn) if isinstance(e, Command)] == ["last"]
    assert conn.next_event() is CLOSED


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=3000), st.integers(1, 64))
def test_any_bytes_give_events_or_the_one_fatal_error(data: bytes, chunk: int) -> None:
    conn = ServerConnection(max_line=1024)
    try:
        for i in range(0, len(data), chunk):
            conn.receive_data(data[i : i + chunk])
            events(conn)
        conn.receive_data(b"")
        events(conn)
    except ControlProtocolError:
        pass


@settings(max_examples=100, deadline=None)
@given(
    st.lists(st.sampled_from([b'{"execute":"a"}', b"junk", b"", b'{"execute":"b","id":2}'])),
    st.integers(1, 17),
)
def test_chunking_does_not_change_what_is_parsed(lines: list[bytes], chunk: int) -> None:
    data = b"".join(line + b"\n" for line in lines)
    whole = negotiated()
    whole.receive_data(data)
    expected = events(whole)
    split = negotiated()
    got: list[Command | BadCommand] = []
    for i in range(0, len(data), chunk):
        split.receive_data(data[i : i + chunk])
        got += events(split)
    assert got == expected


def test_client_reads_what_the_server_writes() -> None:
    client = ClientConnection()
    client.receive_data(encode_greeting({"package": "devmodel"}, []))
    client.receive_data(encode_return({"a": 1}, 7) + encode_return([]))
    client.receive_data(encode_error(ErrorReply(GENERIC_ERROR, "no", "x")))
    client.receive_data(encode_event("LEASE_GRANTED", {"lease": 3}, now=12.5))
    g = client.next_event()
    assert isinstance(g, Greeting) and g.version == {"package": "devmodel"}
    r = client.next_event()
    assert isinstance(r, Return) and r.value == {"a": 1} and r.id == 7
    r2 = client.next_event()
    assert isinstance(r2, Return) and not r2.has_id
    e = client.next_event()
    assert isinstance(e, ErrorReply) and e.desc == "no" and e.id == "x"
    ev = client.next_event()
    assert isinstance(ev, EventMessage) and ev.name == "LEASE_GRANTED"
    assert (ev.seconds, ev.microseconds) == (12, 500000) and ev.data == {"lease": 3}
    assert client.next_event() is NEED_DATA


def test_client_refuses_garbage_from_the_server() -> None:
    for line in (b"nope\n", b"[]\n", b'{"what":1}\n', b'{"error":3}\n'):
        client = ClientConnection()
        client.receive_data(line)
        with pytest.raises(ControlProtocolError):
            client.next_event()


def test_encodings_are_one_ascii_line() -> None:
    for data in (
        encode_command("x", {"s": "é\n"}, 1),
        encode_return("\x1b[2J"),
        encode_event("E", {"t": "\u2028"}, 0.0),
    ):
        assert data.endswith(b"\n") and data.count(b"\n") == 1
        assert data.isascii()
    with pytest.raises(ValueError):
        encode_return(float("nan"))


def test_timestamps() -> None:
    assert timestamp(1.9999999) == (1, 999999)
    assert timestamp(5.0) == (5, 0)


def test_line_buffer_last_line_without_newline() -> None:
    lines = LineBuffer(100)
    lines.feed(b"a\r\nb")
    assert lines.next_line() == b"a"
    assert lines.next_line() is NEED_DATA
    lines.feed(b"")
    assert lines.next_line() == b"b"
    assert lines.next_line() is CLOSED


SPEC = {
    "n": Arg("int", minimum=0),
    "s": Arg("str", choices=("a", "b")),
    "flag": Arg("bool"),
    "x": Arg("number"),
    "many": Arg("str-list", choices=("p", "q")),
    "must": Arg("str", required=True),
}


def test_arguments_are_checked() -> None:
    ok = check_arguments({"must": "m", "n": 3, "flag": False, "x": 1.5, "many": "p"}, SPEC)
    assert ok == {"must": "m", "n": 3, "flag": False, "x": 1.5, "many": ["p"]}
    cases: list[tuple[dict[str, object], str]] = [
        ({}, "'must' is missing"),
        ({"must": "m", "zzz": 1}, "'zzz' is unexpected"),
        ({"must": "m", "n": True}, "'n' expects an integer"),
        ({"must": "m", "n": -1}, "at least 0"),
        ({"must": "m", "s": "c"}, "must be one of a, b"),
        ({"must": "m", "flag": 1}, "expects a boolean"),
        ({"must": "m", "x": "1"}, "expects a number"),
        ({"must": "m", "many": ["p", 3]}, "list of strings"),
        ({"must": "m", "many": ["r"]}, "among p, q"),
        ({"must": 5}, "expects a string"),
    ]
    for bad, words in cases:
        with pytest.raises(CommandFailed) as err:
            check_arguments(bad, SPEC)
        assert words in err.value.desc

"""`--lender-ping-timeout`, `--lender-write-timeout`, `--lender-hello-timeout`: from the command
line (or the config file) to the LenderLink that `devmodel run` builds, and the configured
deadline, not the 2 s default, is what ends a session with a lender that stops answering.

The behaviour runs in virtual time (autojumping MockClock) against the real LenderLink on a
real unix socket, the lender scripted step by step: the deadlines cost nothing, and nothing
depends on how fast the machine is.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from pathlib import Path

import pytest
import trio
import trio.testing

import devmodel_wire.lease as lp
from devmodel import app, cli
from devmodel.config import DEFAULT_LENDER_TIMEOUT, MAX_LENDER_TIMEOUT, Settings, build_settings
from devmodel.counters import DeviceCounters
from devmodel.leases.engine import LeaseEngine
from devmodel.leases.lender_link import LenderLink
from devmodel.testing import LINK_GUEST, lender_link_rig

TIMEOUTS = {
    "lender-hello-timeout": "hello_timeout",
    "lender-ping-timeout": "ping_timeout",
    "lender-write-timeout": "write_timeout",
}
LINK_DEFAULTS = {
    name: param.default for name, param in inspect.signature(LenderLink).parameters.items()
}


def _settings(argv: list[str]) -> Settings:
    """`devmodel run ARGV`'s settings, exactly as `devmodel run` reads them."""
    args = cli.build_parser().parse_args(["run", *argv])
    return cli.run_settings(args)


def _link(settings: Settings) -> LenderLink:
    engine = LeaseEngine(4 << 20, 4 << 10, DeviceCounters())
    try:
        return app.lender_link(settings, engine, engine.counters)
    finally:
        engine.close()


def test_the_command_line_reaches_the_lender_link() -> None:
    link = _link(
        _settings(
            [
                "--socket-path=/run/dm.sock",
                "--lender-socket=/run/lender.sock",
                "--lender-ping-timeout=7.5",
                "--lender-write-timeout",
                "12",
                "--lender-hello-timeout=0.25",
            ]
        )
    )
    assert (link.ping_timeout, link.write_timeout, link.hello_timeout) == (7.5, 12.0, 0.25)
    assert link.path == "/run/lender.sock"


def test_the_config_file_reaches_the_lender_link_and_the_command_line_wins(
    tmp_path: Path,
) -> None:
    config = tmp_path / "dm.toml"
    config.write_text(
        'lender-socket = "/run/lender.sock"\nlender-ping-timeout = 20\nlender-write-timeout = 9\n'
    )
    argv = ["--socket-path=/run/dm.sock", f"--config={config}", "--lender-write-timeout=3"]
    link = _link(_settings(argv))
    assert (link.ping_timeout, link.write_timeout, link.hello_timeout) == (20.0, 3.0, 2.0)


def test_without_the_options_the_link_keeps_its_own_defaults() -> None:
    """The options change nothing for whoever does not give them: 2 s, as before."""
    link = _link(_settings(["--socket-path=/a", "--lender-socket=/b"]))
    for option, attr in TIMEOUTS.items():
        assert getattr(link, attr) == LINK_DEFAULTS[attr] == DEFAULT_LENDER_TIMEOUT, option


def test_run_help_documents_the_options_and_the_ping_interval_it_names() -> None:
    run_parser = cli.build_parser().run_parser
    assert run_parser is not None
    text = " ".join(run_parser.format_help().split())
    for option in TIMEOUTS:
        assert f"--{option} SECONDS" in text
    assert f"at most {MAX_LENDER_TIMEOUT:g}" in text
    # The help says when a PING goes out; that must be the link's interval.
    assert f"after {LINK_DEFAULTS['ping_interval']:g} s of silence" in text


def test_print_capabilities_lists_them_with_their_limit() -> None:
    caps = cli.capabilities()
    options = caps["options"]
    assert isinstance(options, list)
    described = {o["name"]: o for o in options}
    for option in TIMEOUTS:
        assert described[option]["type"] == "seconds"
        assert described[option]["default"] == DEFAULT_LENDER_TIMEOUT
        assert described[option]["config_file"] is True
    limits = caps["limits"]
    assert isinstance(limits, dict)
    assert limits["lender_timeout_max_seconds"] == MAX_LENDER_TIMEOUT


def _configured(options: dict[str, str]) -> Callable[[LeaseEngine, str], LenderLink]:
    """A `make_link` for lender_link_rig: the link `devmodel run` builds from these options."""

    def make(engine: LeaseEngine, path: str) -> LenderLink:
        cli_options = {"socket-path": "/a", "lender-socket": path, "domid": str(LINK_GUEST)}
        settings = build_settings({**cli_options, **options})
        return app.lender_link(settings, engine, engine.counters)

    return make


@pytest.mark.parametrize(
    ("options", "deadline"),
    [({}, 2.0), ({"lender-ping-timeout": "5"}, 5.0), ({"lender-ping-timeout": "45"}, 45.0)],
)
async def test_the_configured_ping_timeout_is_what_ends_a_silent_lenders_session(
    tmp_path: Path,
    autojump_clock: trio.testing.MockClock,
    options: dict[str, str],
    deadline: float,
) -> None:
    async with lender_link_rig(tmp_path, make_link=_configured(options)) as r:
        assert r.link.ping_timeout == deadline
        peer = await r.lender.session()
        await r.connected()
        # The lender says nothing more: after the ping interval, the link pings it.
        ping = await peer.event(timeout=r.link.ping_interval + 1)
        assert isinstance(ping, lp.Ping)
        pinged = trio.current_time()
        # Silent for 60% of the deadline (3 s of 5; more than the 2 s default with 5 and 45):
        # the link sends nothing and the session holds.
        with pytest.raises(trio.TooSlowError):
            got = await peer.event(timeout=0.6 * deadline)
            raise AssertionError(f"unexpected message from the device model: {got}")
        assert r.link.connected and r.counters.lender_losses == 0
        # At the deadline, and not before: BYE TIMEOUT, the connection closed, one loss.
        bye = await peer.event(timeout=deadline)
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.TIMEOUT, bye
        assert trio.current_time() - pinged == pytest.approx(deadline)
        assert await peer.event() is None
        assert not r.link.connected and r.counters.lender_losses == 1
        assert r.link.last_end_reason == (f"the lender did not answer a PING within {deadline:g} s")
        # The link reconnects, and a lender that answers keeps the new session.
        again = await r.lender.session()
        await r.connected()
        ping = await again.event(timeout=r.link.ping_interval + 1)
        assert isinstance(ping, lp.Ping)
        await trio.sleep(0.9 * deadline)
        await again.send(lp.Pong(ping.token))
        # Answered: what comes next is the next PING, a full interval later, not a BYE.
        answered = trio.current_time()
        ping = await again.event(timeout=r.link.ping_interval + 1)
        assert isinstance(ping, lp.Ping), ping
        assert trio.current_time() - answered == pytest.approx(r.link.ping_interval)
        assert r.link.connected and r.link.sessions == 2


async def test_the_configured_hello_timeout_is_what_abandons_a_silent_handshake(
    tmp_path: Path, autojump_clock: trio.testing.MockClock
) -> None:
    make = _configured({"lender-hello-timeout": "10"})
    async with lender_link_rig(tmp_path, make_link=make) as r:
        silent = await r.lender.accept()
        assert isinstance(await silent.event(), lp.Hello)
        offered = trio.current_time()
        bye = await silent.event(timeout=15)
        assert isinstance(bye, lp.Bye) and bye.reason == lp.ByeReason.TIMEOUT, bye
        assert trio.current_time() - offered == pytest.approx(10.0)
        assert r.link.sessions == 0 and r.counters.lender_losses == 0

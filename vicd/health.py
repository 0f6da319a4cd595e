"""Healthchecks: the image's HEALTHCHECK or --health-*, run as execs in the guest.

The engine calls ``start`` when a container's VM runs and ``stop`` when it
ends. Each probe is an exec of the test (``CMD`` args, or ``CMD-SHELL`` via
``/bin/sh -c``) in the container's env, cwd and user; dockerd's rules:
exit 0 is healthy; a failure, or a probe that outlives Timeout (then
killed, exit -1), adds to FailingStreak; Retries failures in a row make the
container unhealthy, except that failures within StartPeriod do not count.
The last 5 results are kept in ``State.Health.Log`` (output up to 4 KiB).
Every change of status publishes ``health_status: <status>``. A daemon that
finds the container's VM still running (restart, kill -9) carries on from
the stored State.Health, and the start period counts from StartedAt.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
import time
from typing import TYPE_CHECKING, Any

from vicd.backend import ProcessSpec, StartError
from vicd.container import Container
from vicd.names import new_id
from vicd.timefmt import parse_rfc3339, rfc3339_now

if TYPE_CHECKING:
    from vicd.engine import Engine

log = logging.getLogger(__name__)

STARTING, HEALTHY, UNHEALTHY = "starting", "healthy", "unhealthy"
DEFAULT_INTERVAL = 30.0
DEFAULT_TIMEOUT = 30.0
DEFAULT_RETRIES = 3
MAX_LOG = 5
MAX_OUTPUT = 4096

_tasks: dict[str, asyncio.Task[None]] = {}


def healthcheck(c: Container) -> dict[str, Any] | None:
    """The container's effective healthcheck, or None (none, or NONE)."""
    hc = c.config.get("Healthcheck") or None
    if not hc:
        return None
    test = hc.get("Test") or []
    if not test or test[0] == "NONE":
        return None
    return hc


def _argv(test: list[str]) -> list[str]:
    if test[0] == "CMD-SHELL":
        return ["/bin/sh", "-c", " ".join(test[1:])]
    if test[0] == "CMD":
        return list(test[1:])
    return list(test)  # docker treats other forms as CMD


def _seconds(ns: Any, default: float) -> float:
    return int(ns) / 1e9 if ns else default


def start(engine: Engine, c: Container, reattached: bool = False) -> None:
    """Begin probing a container whose VM runs: from "starting" after a start,
    from the last stored status when a new daemon reattaches to it."""
    stop(c)
    hc = healthcheck(c)
    if hc is None:
        c.state.health = None
        return
    running_for = 0.0
    if reattached and c.state.health:
        with contextlib.suppress(ValueError):
            running_for = time.time() - parse_rfc3339(c.state.started_at).timestamp()
    else:
        c.state.health = {"Status": STARTING, "FailingStreak": 0, "Log": []}
    _tasks[c.id] = asyncio.create_task(_loop(engine, c, hc, max(running_for, 0.0)))


def stop(c: Container) -> None:
    t = _tasks.pop(c.id, None)
    if t is not None and t is not asyncio.current_task():
        t.cancel()


def status(c: Container) -> str:
    """For ps: "healthy", "unhealthy", "starting", or "none"."""
    h = getattr(c.state, "health", None)
    return h["Status"] if h else "none"


async def _loop(engine: Engine, c: Container, hc: dict[str, Any], running_for: float) -> None:
    interval = _seconds(hc.get("Interval"), DEFAULT_INTERVAL)
    timeout = _seconds(hc.get("Timeout"), DEFAULT_TIMEOUT)
    start_period = _seconds(hc.get("StartPeriod"), 0.0)
    start_interval = _seconds(hc.get("StartInterval"), interval)
    retries = int(hc.get("Retries") or DEFAULT_RETRIES)
    loop = asyncio.get_running_loop()
    started = loop.time() - running_for
    try:
        while True:
            in_start = loop.time() - started < start_period
            health = c.state.health
            wait = start_interval if in_start and health and health["Status"] == STARTING \
                else interval
            await asyncio.sleep(wait)
            if c.state.status != "running":
                continue  # paused: dockerd skips probes too
            vm = engine.rt(c).vm
            if vm is None:
                return
            result = await _probe(engine, vm, c, hc, timeout)
            _record(engine, c, result, retries, loop.time() - started < start_period)
    except asyncio.CancelledError:
        raise
    except Exception:
        log.exception("container %s: health monitor failed", c.short_id)


async def _probe(engine: Engine, vm: Any, c: Container, hc: dict[str, Any], timeout: float
                 ) -> dict[str, Any]:
    out = bytearray()

    def sink(_stream: int, data: bytes) -> None:
        if len(out) < MAX_OUTPUT:
            out.extend(data[: MAX_OUTPUT - len(out)])

    begin = rfc3339_now()
    argv = _argv(hc["Test"])
    spec = ProcessSpec(args=argv, env=list(c.config.get("Env") or []),
                       cwd=c.config.get("WorkingDir") or "/", user=c.config.get("User") or "")
    # dockerd runs probes as execs and reports them as such.
    exec_id, cmd, attrs = new_id(), " ".join(argv), engine._attrs(c)
    engine.events.publish("container", f"exec_create: {cmd}", c.id, execID=exec_id, **attrs)
    try:
        proc = await vm.exec(spec, sink)
    except StartError as e:
        return {"Start": begin, "End": rfc3339_now(), "ExitCode": e.exit_code,
                "Output": e.message}
    engine.events.publish("container", f"exec_start: {cmd}", c.id, execID=exec_id, **attrs)
    try:
        code = await asyncio.wait_for(proc.wait(), timeout)
    except TimeoutError:
        with contextlib.suppress(Exception):
            await proc.signal(signal.SIGKILL)
        return {"Start": begin, "End": rfc3339_now(), "ExitCode": -1,
                "Output": f"Health check exceeded timeout ({_fmt(timeout)})"}
    engine.events.publish("container", "exec_die", c.id, execID=exec_id, exitCode=str(code),
                          **attrs)
    return {"Start": begin, "End": rfc3339_now(), "ExitCode": code,
            "Output": out.decode(errors="replace")}


def _fmt(seconds: float) -> str:
    return f"{seconds:g}s"


def _record(engine: Engine, c: Container, result: dict[str, Any], retries: int,
            in_start_period: bool) -> None:
    h = c.state.health
    if h is None:
        return
    before = h["Status"]
    h["Log"] = [*h["Log"], result][-MAX_LOG:]
    if result["ExitCode"] == 0:
        h["FailingStreak"] = 0
        h["Status"] = HEALTHY
    elif not (in_start_period and before == STARTING):
        h["FailingStreak"] += 1
        if h["FailingStreak"] >= retries:
            h["Status"] = UNHEALTHY
    engine.store.save(c)
    if h["Status"] != before:
        engine.events.publish("container", f"health_status: {h['Status']}", c.id,
                              **engine._attrs(c))

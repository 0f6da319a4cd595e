"""docker update and docker top's ps arguments.

update: the restart policy changes live (the engine reads it at each exit).
Resources size the VM when it boots: a stopped container keeps the new
values for its next start. A running one's memory changes through the VM's
balloon (down, and up again to the boot size; a VM without one refuses);
its CPU limit (--cpus, --cpu-quota, --cpu-period) through the CPU quota in
the guest, within the vCPUs the VM booted with (vicd/cpus.py); a cpuset
cannot change live. What cannot change is refused with a message saying why.

top: the guest's process table (tether ``ps``, read from /proc) formatted
on the host like procps' ``ps`` for the usual argument sets: none / ``-ef``
(dockerd's default columns), ``aux``, and ``-o``/``o`` with a field list.
The container's own ``ps`` binary is not needed (busybox's lacks most
options).
"""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Any

from vicd.container import Container
from vicd.cpus import DEFAULT_PERIOD_US, cpu_max, vcpus_needed
from vicd.errors import Conflict, InvalidParameter

if TYPE_CHECKING:
    from vicd.engine import Engine

# HostConfig resources docker update may carry; only these are stored.
RESOURCE_KEYS = (
    "Memory", "MemorySwap", "MemoryReservation", "KernelMemory", "NanoCpus", "CpuShares",
    "CpuPeriod", "CpuQuota", "CpuRealtimePeriod", "CpuRealtimeRuntime", "CpusetCpus",
    "CpusetMems", "BlkioWeight", "PidsLimit",
)
# What sizes the VM: fixed while it runs.
VM_SHAPE = {"Memory": "memory", "MemorySwap": "memory", "NanoCpus": "cpus",
            "CpusetCpus": "cpus", "CpuQuota": "cpus", "CpuPeriod": "cpus"}
# What the CPU quota in the guest covers.
CPU_LIMIT = ("NanoCpus", "CpuQuota", "CpuPeriod")


async def update(engine: Engine, ref: str, body: dict[str, Any]) -> list[str]:
    from vicd.engine import _validate_host_config

    c = engine.get(ref)
    warnings: list[str] = []
    hc = dict(c.host_config)
    rp = body.get("RestartPolicy")
    if rp and (rp.get("Name") or rp.get("MaximumRetryCount")):
        if c.host_config.get("AutoRemove") and (rp.get("Name") or "no") != "no":
            raise InvalidParameter("Cannot update container " + c.id + ": Restart policy "
                                   "cannot be updated because AutoRemove is enabled for the "
                                   "container")
        hc["RestartPolicy"] = {"Name": rp.get("Name") or "no",
                               "MaximumRetryCount": int(rp.get("MaximumRetryCount") or 0)}
    changed = {k: body[k] for k in RESOURCE_KEYS if body.get(k) not in (None, 0, "")}
    live = c.state.running
    vm = engine.rt(c).vm
    set_memory = getattr(vm, "set_memory", None) if live else None
    # the CPU limit changes live through a quota in the guest where it has vCPUs to fit
    set_cpu = getattr(vm, "set_cpu_max", None) if live and getattr(vm, "cpus", 0) else None
    _check_cpu_conflict(c.host_config, changed)
    refused = sorted({VM_SHAPE[k] for k, v in changed.items()
                      if k in VM_SHAPE and v != c.host_config.get(k)
                      # memory changes live through the VM's balloon where it has one
                      and not (k == "Memory" and set_memory is not None)
                      and not (k in CPU_LIMIT and set_cpu is not None)
                      and k != "MemorySwap"})
    if live and refused:
        raise InvalidParameter(
            f"Cannot update container {c.id}: {' and '.join(refused)} of a running container "
            "cannot change: its VM was sized at boot (stop the container, update it, start "
            "it again)")
    hc.update(changed)
    _validate_host_config(hc)
    if set_memory is not None and "Memory" in changed and changed["Memory"] != \
            c.host_config.get("Memory"):
        mb = max(-(-int(changed["Memory"]) // (1 << 20)), engine.config.vm_min_memory_mb)
        await set_memory(mb)
    if set_cpu is not None and any(changed.get(k) != c.host_config.get(k)
                                   for k in CPU_LIMIT if k in changed):
        await _set_cpu_limit(c, hc, vm.cpus, set_cpu)
    unused = [k for k in changed if k not in VM_SHAPE]
    if unused:
        warnings.append(f"{', '.join(sorted(unused))} stored but not enforced inside the VM")
    c.host_config = hc
    engine.store.save(c)
    engine.events.publish("container", "update", c.id, **engine._attrs(c))
    return warnings


def _check_cpu_conflict(current: dict[str, Any], changed: dict[str, Any]) -> None:
    """dockerd's rule: --cpus and --cpu-quota exclude each other, also across updates."""
    if changed.get("NanoCpus") and changed.get("CpuQuota"):
        raise InvalidParameter("Conflicting options: Nano CPUs and CPU Quota cannot both be set")
    if changed.get("NanoCpus") and current.get("CpuQuota"):
        raise Conflict("Conflicting options: Nano CPUs cannot be updated as CPU Quota has "
                       "already been set")
    if changed.get("CpuQuota") and current.get("NanoCpus"):
        raise Conflict("Conflicting options: CPU Quota cannot be updated as NanoCPUs has "
                       "already been set")
    if changed.get("CpuPeriod") and current.get("NanoCpus"):
        raise Conflict("Conflicting options: CPU Period cannot be updated as NanoCPUs has "
                       "already been set")


async def _set_cpu_limit(c: Container, hc: dict[str, Any], vcpus: int, set_cpu: Any) -> None:
    need = vcpus_needed(hc)
    if need > vcpus:
        quota, period = cpu_max(hc) or (0, DEFAULT_PERIOD_US)
        raise InvalidParameter(
            f"Cannot update container {c.id}: a CPU limit of {quota / period:g} CPUs is more "
            f"than the {vcpus} vCPU(s) its VM booted with (stop the container, update it, "
            "start it again)")
    await set_cpu(*(cpu_max(hc) or (0, DEFAULT_PERIOD_US)))


# --- top -------------------------------------------------------------------------------

def _hms(ticks: int) -> str:
    s = ticks // 100
    return f"{s // 3600:02d}:{s // 60 % 60:02d}:{s % 60:02d}"


def _mmss(ticks: int) -> str:
    s = ticks // 100
    return f"{s // 60}:{s % 60:02d}"


def _field(p: dict[str, Any], name: str, boot: float, mem_total: int) -> str:
    start = boot + int(p.get("start_ticks", 0)) / 100
    up = int(p.get("uptime_ticks", 0))
    elapsed = max(up - int(p.get("start_ticks", 0)), 1)
    cmd = str(p.get("cmd", ""))
    values = {
        "pid": str(p.get("pid", "")),
        "ppid": str(p.get("ppid", "")),
        "uid": str(p.get("uid", "")),
        "user": str(p.get("user") or p.get("uid", "")),
        "comm": cmd.split(" ", 1)[0].rsplit("/", 1)[-1],
        "args": cmd, "cmd": cmd, "command": cmd,
        "vsz": str(p.get("vsz", 0)),
        "rss": str(p.get("rss", 0)),
        "stat": str(p.get("state", "")), "s": str(p.get("state", "")),
        "time": _hms(int(p.get("time_ticks", 0))),
        "etime": _mmss(elapsed),
        "stime": time.strftime("%H:%M", time.localtime(start)),
        "start": time.strftime("%H:%M", time.localtime(start)),
        "tty": "?",
        "c": str(int(p.get("time_ticks", 0)) * 100 // elapsed),
        "%cpu": f"{int(p.get('time_ticks', 0)) * 100 / elapsed:.1f}",
        "%mem": f"{int(p.get('rss', 0)) * 1024 * 100 / mem_total:.1f}" if mem_total else "0.0",
    }
    if name not in values:
        raise InvalidParameter(f"Error running ps: unknown user-defined format specifier "
                               f'"{name}"')
    return values[name]


TITLES = {"pid": "PID", "ppid": "PPID", "uid": "UID", "user": "USER", "comm": "COMMAND",
          "args": "COMMAND", "cmd": "CMD", "command": "COMMAND", "vsz": "VSZ", "rss": "RSS",
          "stat": "STAT", "s": "S", "time": "TIME", "etime": "ELAPSED", "stime": "STIME",
          "start": "START", "tty": "TTY", "c": "C", "%cpu": "%CPU", "%mem": "%MEM"}
EF = ["user", "pid", "ppid", "c", "stime", "tty", "time", "cmd"]
EF_TITLES = ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
AUX = ["user", "pid", "%cpu", "%mem", "vsz", "rss", "tty", "stat", "start", "time", "command"]


def ps_columns(ps_args: str) -> list[str]:
    words = shlex.split(ps_args or "")
    if not words:
        return EF
    cols: list[str] = []
    i = 0
    while i < len(words):
        w = words[i]
        if w in ("-o", "o", "-O", "--format") and i + 1 < len(words):
            cols += [c.strip().split("=")[0].lower() for c in words[i + 1].split(",") if c]
            i += 2
            continue
        if w.startswith("-o") and len(w) > 2:
            cols += [c.strip().split("=")[0].lower() for c in w[2:].split(",") if c]
        elif w.lstrip("-") in ("ef", "e", "f", "A", "eF", "eo"):
            pass
        elif w.lstrip("-") in ("aux", "ax", "au", "axu", "uax", "u", "a", "x"):
            cols = cols or AUX
        else:
            raise InvalidParameter(f"Error running ps: unsupported ps option {w!r} (vicd "
                                   "formats -ef, aux and -o FIELDS from the guest's /proc)")
        i += 1
    return cols or EF


def top_view(c: Container, procs: list[dict[str, Any]], ps_args: str, boot: float,
             mem_total: int) -> dict[str, Any]:
    cols = ps_columns(ps_args)
    titles = EF_TITLES if cols == EF else [TITLES.get(col, col.upper()) for col in cols]
    rows = [[_field(p, col, boot, mem_total) for col in cols] for p in procs]
    return {"Titles": titles, "Processes": rows}


async def top_with_args(engine: Engine, ref: str, procs: list[dict[str, Any]], ps_args: str,
                        boot: float) -> dict[str, Any]:
    c = engine.get(ref)
    ps_columns(ps_args)  # a bad option fails before sampling
    sample = await engine.stats_sample(c)
    return top_view(c, procs, ps_args, boot, sample.mem_total if sample else 0)

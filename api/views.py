"""Engine objects in Docker's wire shapes (inspect, ps rows, exec inspect, stats)."""

from __future__ import annotations

import shlex
import time
from typing import TYPE_CHECKING, Any

from vicd.backend import GuestStats
from vicd.container import PAUSED, RESTARTING, RUNNING, Container
from vicd.mounts import mount_view
from vicd.ports import ports_view
from vicd.timefmt import ZERO_TIME, created_seconds, human_duration, parse_rfc3339

if TYPE_CHECKING:
    from vicd.engine import Engine, Exec

# Config keys dockerd always reports, with their empty values.
CONFIG_DEFAULTS: dict[str, Any] = {
    "Hostname": "", "Domainname": "", "User": "", "AttachStdin": False,
    "AttachStdout": False, "AttachStderr": False, "Tty": False, "OpenStdin": False,
    "StdinOnce": False, "Env": None, "Cmd": None, "Image": "", "Volumes": None,
    "WorkingDir": "", "Entrypoint": None, "OnBuild": None, "Labels": {},
}
HOST_CONFIG_DEFAULTS: dict[str, Any] = {
    "Binds": None, "ContainerIDFile": "", "LogConfig": {"Type": "json-file", "Config": {}},
    "NetworkMode": "default", "PortBindings": {}, "RestartPolicy": {"Name": "no",
    "MaximumRetryCount": 0}, "AutoRemove": False, "VolumeDriver": "", "VolumesFrom": None,
    "ConsoleSize": [0, 0], "CapAdd": None, "CapDrop": None, "CgroupnsMode": "private",
    "Dns": [], "DnsOptions": [], "DnsSearch": [], "ExtraHosts": None, "GroupAdd": None,
    "IpcMode": "private", "Cgroup": "", "Links": None, "OomScoreAdj": 0, "PidMode": "",
    "Privileged": False, "PublishAllPorts": False, "ReadonlyRootfs": False,
    "SecurityOpt": None, "UTSMode": "", "UsernsMode": "", "ShmSize": 67108864,
    "Runtime": "vicd", "Isolation": "", "CpuShares": 0, "Memory": 0, "NanoCpus": 0,
    "CgroupParent": "", "BlkioWeight": 0, "BlkioWeightDevice": [], "BlkioDeviceReadBps": [],
    "BlkioDeviceWriteBps": [], "BlkioDeviceReadIOps": [], "BlkioDeviceWriteIOps": [],
    "CpuPeriod": 0, "CpuQuota": 0, "CpuRealtimePeriod": 0, "CpuRealtimeRuntime": 0,
    "CpusetCpus": "", "CpusetMems": "", "Devices": [], "DeviceCgroupRules": None,
    "DeviceRequests": None, "MemoryReservation": 0, "MemorySwap": 0,
    "MemorySwappiness": None, "OomKillDisable": None, "PidsLimit": None, "Ulimits": None,
    "CpuCount": 0, "CpuPercent": 0, "IOMaximumIOps": 0, "IOMaximumBandwidth": 0,
    "MaskedPaths": None, "ReadonlyPaths": None,
}


def container_config(c: Container) -> dict[str, Any]:
    cfg = {**CONFIG_DEFAULTS, **c.config}
    cfg["Image"] = c.image_ref
    return cfg


def host_config(c: Container) -> dict[str, Any]:
    hc = {**HOST_CONFIG_DEFAULTS, **c.host_config}
    if not (hc.get("LogConfig") or {}).get("Type"):
        hc["LogConfig"] = {"Type": "json-file", "Config": {}}
    if hc.get("MemorySwappiness") == -1:
        hc["MemorySwappiness"] = None  # -1 is the CLI's "unset", dockerd answers null
    if not (hc.get("RestartPolicy") or {}).get("Name"):
        hc["RestartPolicy"] = {"Name": "no", "MaximumRetryCount": 0}
    return hc


def network_settings(engine: Engine, c: Container) -> dict[str, Any]:
    nic = c.nic
    networks = engine.nets.settings_view(c)
    # The top-level fields are the default bridge's, empty on other networks.
    net = networks.get("bridge") or {"EndpointID": "", "Gateway": "", "IPAddress": "",
                                     "IPPrefixLen": 0, "MacAddress": ""}
    return {
        "Bridge": "", "SandboxID": c.id if nic else "", "HairpinMode": False,
        "LinkLocalIPv6Address": "", "LinkLocalIPv6PrefixLen": 0,
        "Ports": ports_view((nic or {}).get("ports") or [], c.config.get("ExposedPorts")),
        "SandboxKey": "", "SecondaryIPAddresses": None, "SecondaryIPv6Addresses": None,
        "EndpointID": net["EndpointID"], "Gateway": net["Gateway"], "GlobalIPv6Address": "",
        "GlobalIPv6PrefixLen": 0, "IPAddress": net["IPAddress"],
        "IPPrefixLen": net["IPPrefixLen"], "IPv6Gateway": "", "MacAddress": net["MacAddress"],
        "Networks": networks,
    }


def ps_ports(c: Container) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for m in (c.nic or {}).get("ports") or []:
        out.append({"IP": m["host_ip"], "PrivatePort": m["container_port"],
                    "PublicPort": m["host_port"], "Type": m["proto"]})
    published = {(p["PrivatePort"], p["Type"]) for p in out}
    for key in c.config.get("ExposedPorts") or {}:
        port, _, proto = key.partition("/")
        if port.isdigit() and (int(port), proto or "tcp") not in published:
            out.append({"PrivatePort": int(port), "Type": proto or "tcp"})
    return out


def inspect_container(engine: Engine, c: Container) -> dict[str, Any]:
    st = c.state
    cdir = engine.store.dir_for(c.id)
    return {
        "Id": c.id,
        "Created": c.created,
        "Path": c.path,
        "Args": c.args,
        "State": {
            "Status": st.status,
            "Running": st.status in (RUNNING, PAUSED),
            "Paused": st.status == PAUSED,
            "Restarting": st.status == RESTARTING,
            "OOMKilled": st.oom_killed,
            "Dead": st.status == "dead",
            "Pid": st.pid,
            "ExitCode": st.exit_code,
            "Error": st.error,
            "StartedAt": st.started_at,
            "FinishedAt": st.finished_at,
            **({"Health": st.health} if st.health is not None else {}),
        },
        "Image": c.image_id,
        "ResolvConfPath": "",
        "HostnamePath": "",
        "HostsPath": "",
        "LogPath": str(engine.log_path(c)),
        "Name": "/" + c.name,
        "RestartCount": c.restart_count,
        "Driver": "vicd-qcow2",
        "Platform": "linux",
        "MountLabel": "",
        "ProcessLabel": "",
        "AppArmorProfile": "",
        "ExecIDs": [e for e in c.exec_ids if e in engine.execs] or None,
        "HostConfig": host_config(c),
        "GraphDriver": {"Name": "vicd-qcow2", "Data": {"Dir": str(cdir)}},
        "Mounts": [mount_view(m) for m in c.mounts],
        "Config": container_config(c),
        "NetworkSettings": network_settings(engine, c),
    }


def status_text(c: Container) -> str:
    st = c.state
    if st.status in (RUNNING, PAUSED):
        up = human_duration(time.time() - parse_rfc3339(st.started_at).timestamp())
        if st.status == PAUSED:
            return f"Up {up} (Paused)"
        health = (st.health or {}).get("Status")
        if health == "starting":
            return f"Up {up} (health: starting)"
        return f"Up {up}" + (f" ({health})" if health else "")
    if st.status == RESTARTING:
        ago = human_duration(time.time() - parse_rfc3339(st.finished_at).timestamp())
        return f"Restarting ({st.exit_code}) {ago} ago"
    if st.status == "exited":
        if st.finished_at == ZERO_TIME:
            return "Created"
        ago = human_duration(time.time() - parse_rfc3339(st.finished_at).timestamp())
        return f"Exited ({st.exit_code}) {ago} ago"
    if st.status == "removing":
        return "Removal In Progress"
    return "Created"


def container_summary(engine: Engine, c: Container) -> dict[str, Any]:
    command = " ".join(shlex.quote(a) if " " in a else a for a in [c.path, *c.args])
    return {
        "Id": c.id,
        "Names": ["/" + c.name],
        "Image": c.image_ref,
        "ImageID": c.image_id,
        "Command": command,
        "Created": created_seconds(c.created),
        "Ports": ps_ports(c),
        "Labels": c.config.get("Labels") or {},
        "State": c.state.status,
        "Status": status_text(c),
        "HostConfig": {"NetworkMode": c.host_config.get("NetworkMode") or "default"},
        "NetworkSettings": {"Networks": engine.nets.settings_view(c)},
        "Mounts": [mount_view(m) for m in c.mounts],
    }


def inspect_exec(e: Exec) -> dict[str, Any]:
    cfg = e.config
    cmd = cfg.get("Cmd") or [""]
    return {
        "ID": e.id,
        "Running": e.running,
        "ExitCode": e.exit_code,
        "ProcessConfig": {
            "tty": bool(cfg.get("Tty")),
            "entrypoint": cmd[0],
            "arguments": cmd[1:],
            "privileged": bool(cfg.get("Privileged")),
            "user": cfg.get("User") or "",
        },
        "OpenStdin": bool(cfg.get("AttachStdin")),
        "OpenStderr": bool(cfg.get("AttachStderr")),
        "OpenStdout": bool(cfg.get("AttachStdout")),
        "CanRemove": False,
        "ContainerID": e.container_id,
        "DetachKeys": cfg.get("DetachKeys") or "",
        "Pid": e.pid,
    }


def top_view(procs: list[dict[str, Any]], boot_time: float) -> dict[str, Any]:
    titles = ["UID", "PID", "PPID", "C", "STIME", "TTY", "TIME", "CMD"]
    rows = []
    for p in procs:
        ticks = int(p.get("time_ticks", 0)) // 100
        rows.append([
            str(p.get("user") or p.get("uid", 0)),
            str(p.get("pid", "")),
            str(p.get("ppid", "")),
            "0",
            time.strftime("%H:%M", time.localtime(boot_time + int(p.get("start_ticks", 0)) / 100)),
            "?",
            f"{ticks // 3600:02d}:{ticks // 60 % 60:02d}:{ticks % 60:02d}",
            str(p.get("cmd", "")),
        ])
    return {"Titles": titles, "Processes": rows}


def stats_view(c: Container, cur: GuestStats | None, pre: GuestStats | None,
               read: str, preread: str) -> dict[str, Any]:
    def cpu(s: GuestStats | None) -> dict[str, Any]:
        if s is None:
            return {"cpu_usage": {"total_usage": 0, "usage_in_kernelmode": 0,
                                  "usage_in_usermode": 0}, "throttling_data": {
                                  "periods": 0, "throttled_periods": 0, "throttled_time": 0}}
        return {
            "cpu_usage": {"total_usage": s.cpu_ns, "usage_in_kernelmode": 0,
                          "usage_in_usermode": s.cpu_ns},
            "system_cpu_usage": s.system_ns,
            "online_cpus": s.online_cpus,
            "throttling_data": {"periods": 0, "throttled_periods": 0, "throttled_time": 0},
        }

    mem: dict[str, Any] = {}
    if cur is not None:
        mem = {
            "usage": cur.mem_used,
            "limit": cur.mem_total,
            "stats": {"cache": cur.mem_cache, "total_inactive_file": 0, "inactive_file": 0},
        }
    return {
        "read": read,
        "preread": preread,
        "pids_stats": {"current": cur.pids} if cur else {},
        "blkio_stats": {"io_service_bytes_recursive": None, "io_serviced_recursive": None,
                        "io_queue_recursive": None, "io_service_time_recursive": None,
                        "io_wait_time_recursive": None, "io_merged_recursive": None,
                        "io_time_recursive": None, "sectors_recursive": None},
        "num_procs": 0,
        "storage_stats": {},
        "cpu_stats": cpu(cur),
        "precpu_stats": cpu(pre),
        "memory_stats": mem,
        "name": "/" + c.name,
        "id": c.id,
    }

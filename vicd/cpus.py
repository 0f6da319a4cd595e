"""A container's CPU limit (--cpus, --cpu-quota, --cpu-period) as its VM applies it.

The VM gets whole vCPUs (enough for the limit); a fractional limit becomes
a cgroup v2 ``cpu.max`` quota inside the guest, set at start and changed
live by ``docker update`` as long as it fits the vCPUs the VM booted with.
"""

from __future__ import annotations

import math
from typing import Any

DEFAULT_PERIOD_US = 100_000  # the kernel's and dockerd's default CFS period


def cpu_max(hc: dict[str, Any]) -> tuple[int, int] | None:
    """(quota µs, period µs) per the host config; None: no limit."""
    nano = int(hc.get("NanoCpus") or 0)
    if nano > 0:
        return nano * DEFAULT_PERIOD_US // 1_000_000_000, DEFAULT_PERIOD_US
    quota = int(hc.get("CpuQuota") or 0)
    period = int(hc.get("CpuPeriod") or 0) or DEFAULT_PERIOD_US
    if quota > 0:
        return quota, period
    return None


def vcpus_needed(hc: dict[str, Any]) -> int:
    """The vCPUs a VM needs for the limit (1 without one)."""
    m = cpu_max(hc)
    return max(1, math.ceil(m[0] / m[1])) if m else 1

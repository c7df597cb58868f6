"""Names and addresses of a simulated cluster, all derived from one prefix.

A cluster's prefix is ``rgc`` + 4 hex digits (``rgc1a2b``). Everything it makes is named from
it: network namespaces ``rgc1a2b-sw`` (the switch), ``rgc1a2b-h01`` (hosts), ``rgc1a2b-e1``
(etcd members), ``rgc1a2b-r01`` (routers), ``rgc1a2b-ops``; the bridge ``rgc1a2b-br`` and the
switch-side veth ends ``rgc1a2b-h01``...; cgroups ``rgc1a2b-h01``; the state directory
``{state_root}/rgc1a2b``; and the owner record ``/run/rgc/rgc1a2b.json``, which says which
process owns the cluster, so that a cleanup of leftovers never touches a live one.

Addresses (10.231.0.0/16) exist only inside the cluster's namespaces: the root namespace has
no address in that range, and nothing in it dials them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import secrets
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

BASE = "rgc"
PREFIX_RE = re.compile(r"^rgc[0-9a-f]{4}$")
# a name made from a prefix: "rgc1a2b-h01"
NAMED_RE = re.compile(r"^(rgc[0-9a-f]{4})-")
# a path inside a state dir, anywhere in a command line: ".../rgc1a2b/..."
PATH_RE = re.compile(r"/(rgc[0-9a-f]{4})(?:/|$)")

REGISTRY_DIR = Path("/run/rgc")
DEFAULT_STATE_ROOT = Path("/tmp")

SUBNET_PREFIXLEN = 16
NETWORK = "10.231.0.0/16"
OPS_IP = "10.231.3.1"
# each host engine's own docker bridge (inside the host's namespace only)
DOCKER_BRIDGE_CIDR = "172.30.0.1/20"
MAX_HOSTS = 254
MAX_ROUTERS = 254
MAX_ETCD = 9


def new_prefix() -> str:
    """A prefix not used by any namespace or owner record on this machine."""
    from .netns import netns_list  # local: netns imports nothing from here at import time

    taken = {m.group(1) for n in netns_list() if (m := NAMED_RE.match(n))}
    for _ in range(100):
        prefix = f"{BASE}{secrets.token_hex(2)}"
        if prefix not in taken and not (REGISTRY_DIR / f"{prefix}.json").exists():
            return prefix
    raise RuntimeError("no free cluster prefix")


def check_prefix(prefix: str) -> str:
    if not PREFIX_RE.match(prefix):
        raise ValueError(f"not a cluster prefix: {prefix!r} (want rgc + 4 hex digits)")
    return prefix


def host_name(i: int) -> str:
    """Name of host ``i`` (0-based): h01, h02, ..."""
    return f"h{i + 1:02d}"


def router_name(i: int) -> str:
    return f"r{i + 1:02d}"


def etcd_name(i: int) -> str:
    return f"e{i + 1}"


def host_ip(i: int) -> str:
    return f"10.231.1.{i + 1}"


def router_ip(i: int) -> str:
    return f"10.231.2.{i + 1}"


def etcd_ip(i: int) -> str:
    return f"10.231.0.{11 + i}"


# --- owner records --------------------------------------------------------------------------
def pid_start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot (field 22 of /proc/PID/stat), or
    None when there is no such process or it is a zombie (dead, not yet reaped)."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # the command name (field 2) may contain spaces and parentheses: split after the last ')'
    fields = raw[raw.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


@dataclass(frozen=True)
class OwnerRecord:
    prefix: str
    state_dir: str
    pid: int
    pid_start: int | None
    created: float

    @property
    def alive(self) -> bool:
        """The owning process still runs (the same process: pid and start time match)."""
        start = pid_start_time(self.pid)
        return start is not None and (self.pid_start is None or start == self.pid_start)


def registry_path(prefix: str) -> Path:
    return REGISTRY_DIR / f"{prefix}.json"


def write_owner(prefix: str, state_dir: Path) -> OwnerRecord:
    """Record this process as the cluster's owner (first thing, before anything is made)."""
    REGISTRY_DIR.mkdir(parents=True, exist_ok=True)
    rec = OwnerRecord(prefix, str(state_dir), os.getpid(), pid_start_time(os.getpid()), time.time())
    path = registry_path(prefix)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(rec.__dict__))
    os.replace(tmp, path)
    return rec


def read_owner(prefix: str) -> OwnerRecord | None:
    try:
        data: dict[str, Any] = json.loads(registry_path(prefix).read_text())
        return OwnerRecord(
            prefix=str(data["prefix"]),
            state_dir=str(data["state_dir"]),
            pid=int(data["pid"]),
            pid_start=None if data.get("pid_start") is None else int(data["pid_start"]),
            created=float(data.get("created", 0.0)),
        )
    except (OSError, ValueError, KeyError, TypeError):
        return None


def remove_owner(prefix: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        registry_path(prefix).unlink()


def registered_prefixes() -> set[str]:
    try:
        names = os.listdir(REGISTRY_DIR)
    except FileNotFoundError:
        return set()
    return {n[: -len(".json")] for n in names if n.endswith(".json") and PREFIX_RE.match(n[:-5])}

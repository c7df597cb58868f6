"""Finding and removing everything a cluster made, by its prefix.

What a cluster with prefix P (state dir S = ``{state_root}/P``) may leave:

- processes: any whose network namespace is one of P's, whose command line or cwd names a
  path under ``.../P/``, or whose cgroup is one of P's; and all their descendants (the
  processes inside containers live in netns of their own, under the shims);
- network namespaces ``P-*`` and root-namespace links ``P-*`` (none is ever made there, but a
  crash between two ``ip`` calls could leave one);
- cgroups named ``P-*`` (each engine's ``--cgroup-parent``), in every hierarchy;
- mounts under S or ``/run/netns/P-*`` in the root mount namespace (engines mount in private
  mount namespaces, which vanish with their last process);
- containerd shim sockets ``/run/containerd/s/<sha256>`` (a SIGKILLed shim cannot remove its
  own; the name is sha256 of ``ADDRESS/NAMESPACE/ID``, computed from the shims' command lines
  and from S/*/data/containers/);
- the state dir S and the owner record ``/run/rgc/P.json``.

``cleanup_leftovers()`` does this for every prefix whose owner process is gone (a crashed or
SIGKILLed run); a cluster whose owner still runs is never touched.
``python -m tests.cluster.leftovers [--list]`` runs it from a shell.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import os
import shutil
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from . import names
from .netns import IP, netns_delete, netns_inode, netns_list
from .procs import ProcInfo, ancestors, kill_pids, role_of, scan_processes, with_descendants

CGROUP_ROOT = Path("/sys/fs/cgroup")
SHIM_SOCKET_DIR = Path("/run/containerd/s")

Progress = Callable[[str], None]


@dataclass
class Resources:
    """What exists of one cluster (found by its prefix)."""

    prefix: str
    state_dir: str | None = None
    netns: list[str] = field(default_factory=list)
    links: list[str] = field(default_factory=list)
    processes: list[ProcInfo] = field(default_factory=list)
    cgroups: list[str] = field(default_factory=list)
    mounts: list[str] = field(default_factory=list)
    shim_sockets: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)

    @property
    def empty(self) -> bool:
        return not (
            self.netns
            or self.links
            or self.processes
            or self.cgroups
            or self.mounts
            or self.shim_sockets
            or self.paths
        )

    def summary(self) -> str:
        if self.empty:
            return f"{self.prefix}: nothing"
        roles = Counter(role_of(p) for p in self.processes)
        parts = [
            f"{len(self.processes)} processes"
            + (f" ({', '.join(f'{r} x{n}' for r, n in sorted(roles.items()))})" if roles else ""),
            f"{len(self.netns)} netns",
            f"{len(self.links)} root links",
            f"{len(self.cgroups)} cgroups",
            f"{len(self.mounts)} mounts",
            f"{len(self.shim_sockets)} shim sockets",
            f"{len(self.paths)} paths",
        ]
        return f"{self.prefix}: " + ", ".join(parts)


# --- finding ---------------------------------------------------------------------------------
def _mine(arg: str, prefix: str) -> bool:
    """``arg`` names a path inside the prefix's state dir (``.../P/...`` or ends in ``/P``)."""
    return f"/{prefix}/" in f"{arg}/"


def find_processes(prefix: str, procs: Mapping[int, ProcInfo] | None = None) -> list[ProcInfo]:
    """Every live process of the cluster, descendants included (never this process or its
    ancestors)."""
    procs = procs if procs is not None else scan_processes()
    inodes = {i for n in netns_list() if n.startswith(f"{prefix}-") if (i := netns_inode(n))}
    marker = f"/{prefix}-"
    roots = [
        p.pid
        for p in procs.values()
        if (p.netns is not None and p.netns in inodes)
        or any(_mine(a, prefix) for a in p.cmdline)
        or _mine(p.cwd.removesuffix(" (deleted)"), prefix)
        or marker in p.cgroup
    ]
    spared = ancestors(os.getpid(), procs)
    return sorted(
        (
            procs[pid]
            for pid in with_descendants(roots, procs)
            if pid in procs and pid not in spared and procs[pid].alive
        ),
        key=lambda p: p.pid,
    )


def _cgroup_controllers() -> list[Path]:
    try:
        return [p for p in CGROUP_ROOT.iterdir() if p.is_dir() and not p.is_symlink()]
    except OSError:
        return []


def find_cgroups(match: Callable[[str], bool]) -> list[Path]:
    """Cgroup directories whose name matches (not descending into a match)."""
    found: list[Path] = []
    roots = _cgroup_controllers() or [CGROUP_ROOT]
    for root in roots:
        for dirpath, dirnames, _ in os.walk(root):
            depth = len(Path(dirpath).relative_to(root).parts)
            keep = []
            for d in dirnames:
                if match(d):
                    found.append(Path(dirpath) / d)
                elif depth < 5:
                    keep.append(d)
            dirnames[:] = keep
    return found


def _mount_points() -> list[str]:
    out = []
    try:
        text = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) > 4:
            out.append(parts[4].replace("\\040", " "))
    return out


def find_mounts(prefix: str) -> list[str]:
    return [
        mp for mp in _mount_points() if _mine(mp, prefix) or mp.startswith(f"/run/netns/{prefix}-")
    ]


def _shim_socket(address: str, namespace: str, cid: str) -> Path:
    digest = hashlib.sha256(f"{address}/{namespace}/{cid}".encode()).hexdigest()
    return SHIM_SOCKET_DIR / digest


def find_shim_sockets(
    prefix: str, state_dir: str | None, processes: Iterable[ProcInfo]
) -> list[str]:
    candidates: set[Path] = set()
    for p in processes:
        if p.comm.startswith("containerd-shim"):
            args = list(p.cmdline)
            opts = {args[i]: args[i + 1] for i in range(len(args) - 1) if args[i].startswith("-")}
            if "-id" in opts and "-address" in opts:
                candidates.add(
                    _shim_socket(opts["-address"], opts.get("-namespace", "moby"), opts["-id"])
                )
    if state_dir and os.path.isdir(state_dir):
        for node in Path(state_dir).iterdir():
            containers = node / "data" / "containers"
            address = str(node / "exec" / "containerd" / "containerd.sock")
            with contextlib.suppress(OSError):
                for cid in os.listdir(containers):
                    candidates.add(_shim_socket(address, "moby", cid))
    return sorted(str(c) for c in candidates if c.exists())


def root_links(prefix: str) -> list[str]:
    out = subprocess.run(
        [IP, "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    links = []
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2:
            name = parts[1].strip().split("@")[0]
            if name.startswith(f"{prefix}-"):
                links.append(name)
    return links


def guess_state_dir(prefix: str, state_roots: Iterable[str | Path] = ()) -> str | None:
    owner = names.read_owner(prefix)
    if owner is not None:
        return owner.state_dir
    for root in [*state_roots, names.DEFAULT_STATE_ROOT]:
        candidate = Path(root) / prefix
        if candidate.is_dir():
            return str(candidate)
    return None


def find_resources(
    prefix: str, state_dir: str | Path | None = None, procs: Mapping[int, ProcInfo] | None = None
) -> Resources:
    names.check_prefix(prefix)
    sd = str(state_dir) if state_dir is not None else guess_state_dir(prefix)
    processes = find_processes(prefix, procs)
    paths = [p for p in (sd, str(names.registry_path(prefix))) if p and os.path.lexists(p)]
    return Resources(
        prefix=prefix,
        state_dir=sd,
        netns=[n for n in netns_list() if n.startswith(f"{prefix}-")],
        links=root_links(prefix),
        processes=processes,
        cgroups=[str(c) for c in find_cgroups(lambda d: d.startswith(f"{prefix}-"))],
        mounts=find_mounts(prefix),
        shim_sockets=find_shim_sockets(prefix, sd, processes),
        paths=paths,
    )


# --- removing --------------------------------------------------------------------------------
def _cgroup_pids(cg: Path) -> set[int]:
    pids: set[int] = set()
    for dirpath, _, files in os.walk(cg):
        for fname in ("cgroup.procs", "tasks"):
            if fname in files:
                with contextlib.suppress(OSError, ValueError):
                    pids.update(int(x) for x in (Path(dirpath) / fname).read_text().split())
    return pids


def _rmdir_tree(cg: Path) -> None:
    for dirpath, _, _ in sorted(os.walk(cg), key=lambda t: -len(t[0])):
        with contextlib.suppress(FileNotFoundError):
            os.rmdir(dirpath)


def kill_processes(prefix: str, timeout: float = 20.0) -> int:
    """SIGKILL every process of the cluster, again and again until none is left; how many
    were found in the first round."""
    deadline = time.monotonic() + timeout
    first = -1
    cgroups = find_cgroups(lambda d: d.startswith(f"{prefix}-"))
    while True:
        procs = scan_processes()
        victims = {p.pid for p in find_processes(prefix, procs)}
        spared = ancestors(os.getpid(), procs)
        for cg in cgroups:
            victims |= _cgroup_pids(cg) - spared
        victims = {v for v in victims if v in procs and procs[v].alive}
        if first < 0:
            first = len(victims)
        if not victims:
            return first
        if time.monotonic() > deadline:
            left = ", ".join(f"{procs[v].pid}:{procs[v].comm}" for v in sorted(victims)[:10])
            raise RuntimeError(f"{prefix}: processes survive SIGKILL: {left}")
        kill_pids(victims, signal.SIGKILL)
        time.sleep(0.1)


def remove_resources(
    prefix: str,
    state_dir: str | Path | None = None,
    *,
    timeout: float = 30.0,
    progress: Progress | None = None,
) -> Resources:
    """Remove everything of the cluster; what is still there afterwards (empty when all went).

    Order matters: processes first (found by their namespaces, which must still exist), then
    namespaces, links, mounts, cgroups, shim sockets, the state dir, the owner record."""
    names.check_prefix(prefix)
    say = progress or (lambda _msg: None)
    sd = str(state_dir) if state_dir is not None else guess_state_dir(prefix)
    before = find_resources(prefix, sd)
    if before.empty:
        return before
    say(f"removing {before.summary()}")
    shim_sockets = before.shim_sockets
    kill_processes(prefix, timeout=timeout)
    for ns in before.netns + [n for n in netns_list() if n.startswith(f"{prefix}-")]:
        netns_delete(ns)
    for link in root_links(prefix):
        subprocess.run([IP, "link", "del", link], capture_output=True, check=False)
    for mp in sorted(find_mounts(prefix), key=len, reverse=True):
        subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
    deadline = time.monotonic() + 10
    while True:
        cgroups = find_cgroups(lambda d: d.startswith(f"{prefix}-"))
        for cg in cgroups:
            _rmdir_tree(cg)
        if not find_cgroups(lambda d: d.startswith(f"{prefix}-")) or time.monotonic() > deadline:
            break
        kill_pids(set().union(*(_cgroup_pids(c) for c in cgroups)))
        time.sleep(0.1)
    for sock in shim_sockets + find_shim_sockets(prefix, sd, []):
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock)
    if sd and os.path.isdir(sd):
        shutil.rmtree(sd, ignore_errors=True)
        if os.path.isdir(sd):  # something still mounted below: detach and retry
            for mp in sorted(find_mounts(prefix), key=len, reverse=True):
                subprocess.run(["umount", "-l", mp], capture_output=True, check=False)
            shutil.rmtree(sd, ignore_errors=True)
    names.remove_owner(prefix)
    return find_resources(prefix, sd)


# --- leftovers of earlier runs ---------------------------------------------------------------
def known_prefixes(state_roots: Iterable[str | Path] = ()) -> set[str]:
    """Every prefix that something on this machine is named after."""
    found: set[str] = set(names.registered_prefixes())
    for n in netns_list():
        if m := names.NAMED_RE.match(n):
            found.add(m.group(1))
    out = subprocess.run(
        [IP, "-o", "link", "show"], capture_output=True, text=True, check=False
    ).stdout
    for line in out.splitlines():
        parts = line.split(":", 2)
        if len(parts) >= 2 and (m := names.NAMED_RE.match(parts[1].strip())):
            found.add(m.group(1))
    for cg in find_cgroups(lambda d: names.NAMED_RE.match(d) is not None):
        if m := names.NAMED_RE.match(cg.name):
            found.add(m.group(1))
    me = ancestors(os.getpid(), {})
    for p in scan_processes().values():
        if p.pid in me:
            continue
        for a in (*p.cmdline, p.cwd):
            if m := names.PATH_RE.search(a):
                found.add(m.group(1))
    for root in [*state_roots, names.DEFAULT_STATE_ROOT]:
        with contextlib.suppress(OSError):
            found.update(n for n in os.listdir(root) if names.PREFIX_RE.match(n))
    return found


def leftover_prefixes(state_roots: Iterable[str | Path] = ()) -> list[str]:
    """Prefixes whose owner process is gone (or unknown)."""
    out = []
    for prefix in sorted(known_prefixes(state_roots)):
        owner = names.read_owner(prefix)
        if owner is None or not owner.alive:
            out.append(prefix)
    return out


def cleanup_leftovers(
    state_roots: Iterable[str | Path] = (), *, progress: Progress | None = None
) -> list[Resources]:
    """Remove what crashed runs left (clusters whose owner process is gone). Returns what
    was found for each such prefix (before removal); raises if something could not go."""
    roots = list(state_roots)
    found = []
    failures = []
    for prefix in leftover_prefixes(roots):
        sd = guess_state_dir(prefix, roots)
        before = find_resources(prefix, sd)
        if before.empty:
            continue
        found.append(before)
        left = remove_resources(prefix, sd, progress=progress)
        if not left.empty:
            failures.append(left.summary())
    if failures:
        raise RuntimeError("leftovers that could not be removed: " + "; ".join(failures))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m tests.cluster.leftovers",
        description="Remove what crashed simulated-cluster runs left behind (found by name).",
    )
    parser.add_argument("--list", action="store_true", help="only list, remove nothing")
    parser.add_argument("--state-root", action="append", default=[], help="extra state roots")
    parser.add_argument(
        "--prefix", help="remove this cluster even if its owner still runs (careful)"
    )
    args = parser.parse_args(argv)
    if args.prefix:
        left = remove_resources(args.prefix, progress=print)
        print(left.summary() if not left.empty else f"{args.prefix}: removed")
        return 0 if left.empty else 1
    if args.list:
        for prefix in sorted(known_prefixes(args.state_root)):
            owner = names.read_owner(prefix)
            state = "live" if owner is not None and owner.alive else "leftover"
            print(f"{state}: {find_resources(prefix, guess_state_dir(prefix)).summary()}")
        return 0
    removed = cleanup_leftovers(args.state_root, progress=print)
    print(f"removed leftovers of {len(removed)} cluster(s)" if removed else "no leftovers")
    return 0

"""Run programs inside a topology's network namespaces.

Children enter the namespace between fork and exec (pyroute2's ``netns.setns``
in ``preexec_fn``), so nothing shells out to ``ip netns exec`` and the pid we
hold is the program's own: tests and benchmarks end exactly what they started.
"""
from __future__ import annotations

import os
import signal
import subprocess

from pyroute2 import netns


# Namespaces of rootless runs: name -> (daemon pid, its netns directory). Entering
# one takes joining the daemon's user and mount namespaces first (hvnet.rootless).
_rootless: dict[str, tuple[int, str]] = {}


def adopt(info: dict) -> None:
    """Learn a run's machines from its daemon.json (needed for rootless runs)."""
    if info.get("rootless"):
        for full in info.get("machines", {}).values():
            _rootless[full] = (info["pid"], info["netns_dir"])


def enter(ns: str) -> None:
    """Move this (single-threaded) process into network namespace ``ns``."""
    if ns in _rootless:
        from .rootless import join
        join(*_rootless[ns])
    netns.setns(ns)


def _enter(ns: str):
    def pre():
        enter(ns)
    return pre


def popen(ns: str | None, argv: list[str], **kw) -> subprocess.Popen:
    """Start ``argv`` in network namespace ``ns`` (None: this one)."""
    if ns is not None:
        kw["preexec_fn"] = _enter(ns)
    return subprocess.Popen(argv, **kw)


def run(ns: str | None, argv: list[str], timeout: float = 60, check: bool = False,
        **kw) -> subprocess.CompletedProcess:
    """Run ``argv`` in ``ns`` to completion, capturing text output; on timeout the
    child is killed (by its pid) and TimeoutExpired is raised."""
    kw.setdefault("stdout", subprocess.PIPE)
    kw.setdefault("stderr", subprocess.PIPE)
    kw.setdefault("text", True)
    p = popen(ns, argv, **kw)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop(p)
        raise
    cp = subprocess.CompletedProcess(argv, p.returncode, out, err)
    if check:
        cp.check_returncode()
    return cp


def stop(p: subprocess.Popen, grace: float = 3.0) -> None:
    """End a child we started: SIGTERM, then SIGKILL after ``grace`` seconds."""
    if p.poll() is not None:
        return
    try:
        p.send_signal(signal.SIGTERM)
        p.wait(grace)
    except subprocess.TimeoutExpired:
        p.kill()
        p.wait(5)
    except ProcessLookupError:
        pass


def exec_in(ns: str, argv: list[str]) -> None:
    """Replace this process by ``argv`` running in ``ns`` (``hvnet exec``)."""
    enter(ns)
    os.execvp(argv[0], argv)

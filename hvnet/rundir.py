"""Where a running topology keeps its state, and how a dead one is found and removed.

``<root>/<name>/`` per topology (root: ``$HVNET_STATE_DIR``, else ``/run/hvnet`` for
root, else ``$XDG_RUNTIME_DIR/hvnet`` or ``/tmp/hvnet-<uid>``) holds:

- ``daemon.json``: the daemon's pid and start time, the topology file, its machines
  and their namespaces;
- ``processes.json``: every other process the run started (pid and start time);
- ``netns.json``: every namespace and link, written as each is created (hvnet.netns);
- ``control.sock``: the daemon's control socket; ``daemon.log``: its log.

A pid alone can be reused after a crash; a pid with the start time the kernel
gave it (``/proc/<pid>/stat`` field 22) cannot, so clean-up only ever signals
processes that are provably the ones the run recorded.
"""
from __future__ import annotations

import json
import os
import shutil
import signal
import time
from pathlib import Path

from .netns import clean_recorded


def state_root() -> Path:
    env = os.environ.get("HVNET_STATE_DIR")
    if env:
        return Path(env)
    if os.geteuid() == 0:
        return Path("/run/hvnet")
    xdg = os.environ.get("XDG_RUNTIME_DIR")
    return Path(xdg) / "hvnet" if xdg else Path(f"/tmp/hvnet-{os.getuid()}")


def start_time(pid: int) -> int | None:
    """The process's start time in clock ticks since boot, or None if it is gone
    (a zombie, dead but not yet reaped by its parent, counts as gone)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces and parentheses: split after its ')'.
    fields = stat[stat.rindex(")") + 2:].split()
    if fields[0] in ("Z", "X"):
        return None
    return int(fields[19])


def alive(pid: int, started: int | None) -> bool:
    return started is not None and start_time(pid) == started


class RunDir:
    def __init__(self, name: str, root: Path | None = None):
        self.name = name
        self.path = (root or state_root()) / name
        self.socket = self.path / "control.sock"
        self.log = self.path / "daemon.log"
        self.netns_record = self.path / "netns.json"

    def create(self) -> None:
        """Claim the directory; refuse if a run of this name exists (alive or not)."""
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        try:
            self.path.mkdir(mode=0o700)
        except FileExistsError:
            if self.daemon_alive():
                raise FileExistsError(f"topology {self.name!r} is already up (daemon pid "
                                      f"{self.info()['pid']}); 'hvnet down {self.name}' "
                                      "first") from None
            raise FileExistsError(f"topology {self.name!r} left state behind in {self.path} "
                                  f"(a crashed run?); 'hvnet clean {self.name}' removes it") \
                from None

    def exists(self) -> bool:
        return self.path.is_dir()

    def _read(self, fname: str, default):
        try:
            return json.loads((self.path / fname).read_text())
        except (OSError, ValueError):
            return default

    def _write(self, fname: str, data) -> None:
        tmp = self.path / (fname + ".tmp")
        tmp.write_text(json.dumps(data))
        os.replace(tmp, self.path / fname)

    def info(self) -> dict:
        return self._read("daemon.json", {})

    def write_info(self, **fields) -> None:
        d = self.info()
        d.update(fields)
        self._write("daemon.json", d)

    def record_process(self, pid: int, what: str) -> None:
        procs = self._read("processes.json", [])
        procs.append({"pid": pid, "start": start_time(pid), "what": what})
        self._write("processes.json", procs)

    def processes(self) -> list[dict]:
        return self._read("processes.json", [])

    def daemon_alive(self) -> bool:
        d = self.info()
        return bool(d) and alive(d.get("pid", -1), d.get("start"))

    def clean(self, kill_daemon: bool = False) -> list[str]:
        """Remove what the run left: its processes (only those recorded, verified by
        start time), namespaces and links (only those recorded), then the directory."""
        done = []
        d = self.info()
        if d and alive(d.get("pid", -1), d.get("start")):
            if not kill_daemon:
                raise RuntimeError(f"topology {self.name!r} is running (daemon pid "
                                   f"{d['pid']}); use 'hvnet down {self.name}', or "
                                   "'hvnet clean --force' to kill it")
            os.kill(d["pid"], signal.SIGKILL)
            done.append(f"killed daemon {d['pid']}")
            for _ in range(100):
                if not alive(d["pid"], d.get("start")):
                    break
                time.sleep(0.05)
        for p in self.processes():
            if alive(p["pid"], p.get("start")):
                os.kill(p["pid"], signal.SIGKILL)
                done.append(f"killed {p.get('what', 'process')} {p['pid']}")
        if self.netns_record.exists():
            done += clean_recorded(self.netns_record)
        if self.socket.exists() or self.socket.is_symlink():
            self.socket.unlink()
            done.append(f"socket {self.socket}")
        shutil.rmtree(self.path, ignore_errors=True)
        done.append(f"state {self.path}")
        return done


def all_runs(root: Path | None = None) -> list[RunDir]:
    root = root or state_root()
    if not root.is_dir():
        return []
    return [RunDir(p.name, root) for p in sorted(root.iterdir()) if p.is_dir()]

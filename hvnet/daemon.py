"""The host daemon: one process per running topology.

It holds the switches and the VSPs of one topology, runs their data paths, and
answers the control socket (hvnet.control) until asked to go down or signalled
(SIGTERM, SIGINT); then it removes everything it made. ``hvnet up`` starts it
detached (``python -m hvnet.daemon``) or runs ``serve`` in the foreground.
"""
from __future__ import annotations

import argparse
import logging
import os
import shutil
import signal
import sys
import threading
import time
from pathlib import Path

# numpy's OpenBLAS starts a thread pool on import, and a process with threads
# cannot unshare a user namespace (rootless mode). hvnet does no linear algebra.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

from .control import ControlServer  # noqa: E402 (after the environment above)
from .rootless import enter_own, wanted
from .rundir import RunDir, start_time
from .runtime import Runtime
from .topology import TopologyError, load, parse_port_setting, parse_vm

log = logging.getLogger("hvnet.daemon")


def handlers(rt: Runtime, stop: threading.Event) -> dict:
    def set_(port: str, key: str, value: str):
        return rt.set_property(port, key, parse_port_setting(key, value, f"hvnet set {port}"))

    def link(port: str, state: str):
        if state not in ("up", "down"):
            raise ValueError(f"hvnet link {port}: state must be up or down, not {state!r}")
        return rt.set_link(port, state == "up")

    def add_vm(vm: str, spec: str):
        nics = parse_vm(rt.topo, vm, spec, f"vm {vm}")
        return {"ports": rt.add_vm(vm, nics), "namespace": rt.nn.name(vm)}

    def down():
        stop.set()
        return "going down"

    return {
        "status": rt.status,
        "stats": lambda port=None: rt.stats(port),
        "set": set_,
        "link": link,
        "vf": lambda port, action: rt.vf(port, action),
        "set_indirection": lambda port, table: {"table": rt.set_indirection(port, list(table))},
        "add_vm": add_vm,
        "remove_vm": lambda vm: rt.remove_vm(vm),
        "capture_start": lambda port, path: {"id": rt.capture_start(port, path)},
        "capture_status": lambda id: rt.capture_status(int(id)),
        "capture_stop": lambda id: rt.capture_stop(int(id)),
        "down": down,
    }


def serve(topology_path: str, run: RunDir, on_ready=None) -> int:
    """Bring the topology up, serve until stopped, take it down. The run directory
    must exist (claimed by the caller). Returns the exit status."""
    if wanted():
        netns_dir = run.path / "netns"
        enter_own(netns_dir)           # before any thread: unshare needs one
        run.write_info(rootless=True, netns_dir=str(netns_dir))
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        topo = load(topology_path)
        if wanted():
            for spec in topo.switches.values():
                if spec.uplink and "interface" in spec.uplink:
                    raise TopologyError(topo.source, f"switches.{spec.name}.uplink.interface",
                                        "a real interface needs root: a rootless run "
                                        "lives in a user namespace with no rights on "
                                        "the host's interfaces")
    except TopologyError as e:
        log.error("%s", e)
        return 2
    rt = Runtime(topo, run.path)
    run.write_info(pid=os.getpid(), start=start_time(os.getpid()),
                   source=str(Path(topology_path).resolve()), started=time.time(),
                   prefix=topo.name,
                   machines={m: rt.nn.name(m) for m in topo.namespaces()})
    server = None
    try:
        rt.up()
        run.write_info(machines={m: rt.nn.name(m) for m in topo.namespaces()})
        rt.start()
        server = ControlServer(run.socket, handlers(rt, stop))
        log.info("topology %s up: %d ports on %d switches", topo.name, len(rt.port_switch),
                 len(rt.switches))
        if on_ready:
            on_ready(rt)
        server.serve(stop)
        return 0
    except TopologyError as e:              # found only while building: still the file's fault
        log.error("%s", e)
        return 2
    except Exception as e:
        log.error("%s", e, exc_info=not isinstance(e, (TopologyError, OSError,
                                                       RuntimeError)))
        return 1
    finally:
        if server:
            server.close()
        removed = rt.teardown()
        log.info("topology %s down (%d objects removed)", topo.name, len(removed))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m hvnet.daemon")
    ap.add_argument("topology")
    ap.add_argument("--run-dir", required=True, help="the run directory the caller claimed")
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(message)s")
    run_dir = Path(a.run_dir)
    run = RunDir(run_dir.name, run_dir.parent)
    rc = serve(a.topology, run)
    if rc == 0:
        shutil.rmtree(run.path, ignore_errors=True)   # gone cleanly: nothing to keep
    # On failure the log stays for 'hvnet up' to show; it removes the directory.
    return rc


if __name__ == "__main__":
    sys.exit(main())

"""Open vSwitch's userspace datapath as a peer of ``hvnet bench e2e``.

Built as ``baseline.md`` ("Topologies": ovs-system-txoff and ovs-afxdp-txoff,
and the OVS paragraph after it): a bridge ``br0`` with ``datapath_type=netdev``
in namespace ``sw``, the switch-side veths ``sa`` and ``sb`` as its ports, either
plain (``system``: the netdev datapath opens them with AF_PACKET sockets, on its
main thread) or ``type=afxdp`` in native XDP mode (a PMD thread busy-polls them).
Flows are the default NORMAL action (MAC learning).

OVS runs from its own scratch folder: a fresh ``conf.db`` made by
``ovsdb-tool create``, its sockets, pid files and logs. ``ovsdb-server`` and
``ovs-vswitchd`` are started by this module (in ``sw``, so the netdev datapath
sees ``sa`` and ``sb``), run in the foreground as its children and are ended by
their pids. Debian's own OVS service is never used or started.

The endpoints' transmit checksum offload (and with it TSO) is off: OVS's
AF_PACKET and AF_XDP ports carry no checksum metadata, so with Linux's veth
defaults a TCP connection through them cannot even be set up (baseline.md,
"What did not work": TcpInCsumErrors in ns-b).
"""
from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import tempfile
import time
from typing import Iterator

from . import e2e, nsexec

PACKAGE = "openvswitch-switch"
SCHEMA = "/usr/share/openvswitch/vswitch.ovsschema"
POLICY_RC = "/usr/sbin/policy-rc.d"
START_S = 20.0


def installed() -> bool:
    return all(shutil.which(c) for c in ("ovsdb-tool", "ovsdb-server", "ovs-vswitchd",
                                         "ovs-vsctl")) and os.path.exists(SCHEMA)


def ensure_installed(say=lambda s: None) -> None:
    """Install Debian's openvswitch-switch if it is missing (root and apt-get needed),
    without letting its service start: a policy-rc.d that refuses every start is put
    in place for the install, unless the machine already has one."""
    if installed():
        return
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        raise RuntimeError(f"Open vSwitch is not installed, and installing it needs root "
                           f"and apt-get: apt-get install {PACKAGE}")
    say(f"installing {PACKAGE} (apt-get)")
    ours = not os.path.exists(POLICY_RC)
    if ours:
        with open(POLICY_RC, "w") as f:
            f.write("#!/bin/sh\n# hvnet bench: no service starts while it installs OVS\n"
                    "exit 101\n")
        os.chmod(POLICY_RC, 0o755)
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    try:
        argv = ["apt-get", "install", "-y", "-qq", "--no-install-recommends", PACKAGE]
        r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:            # a stale package list: update once and retry
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True, env=env,
                           timeout=600)
            r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=600)
        if r.returncode != 0:
            raise RuntimeError(f"apt-get install {PACKAGE} failed: "
                               f"{(r.stderr or r.stdout).strip()[-500:]}")
    finally:
        if ours:
            os.unlink(POLICY_RC)
    if not installed():
        raise RuntimeError(f"{PACKAGE} installed, but its commands or {SCHEMA} are missing")


class _Ovs:
    """ovsdb-server and ovs-vswitchd of one scratch folder, in namespace ``ns``."""

    def __init__(self, ns: str, folder: str):
        self.ns, self.dir = ns, folder
        self.db = f"unix:{folder}/db.sock"
        self.env = {**os.environ, "OVS_RUNDIR": folder, "OVS_DBDIR": folder,
                    "OVS_LOGDIR": folder, "OVS_SYSCONFDIR": folder}
        self.procs: list[subprocess.Popen] = []

    def _start(self, argv: list[str], ready: str) -> None:
        log = open(os.path.join(self.dir, os.path.basename(argv[0]) + ".out"), "w")
        with log:
            p = nsexec.popen(self.ns, argv, env=self.env, stdout=log, stderr=subprocess.STDOUT)
        self.procs.append(p)
        deadline = time.monotonic() + START_S
        while not os.path.exists(ready):
            if p.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"{argv[0]} did not start: {self.log_tail(argv[0])}")
            time.sleep(0.02)

    def log_tail(self, prog: str) -> str:
        name = os.path.basename(prog)
        for f in (f"{name}.log", f"{name}.out"):
            try:
                with open(os.path.join(self.dir, f)) as fh:
                    text = fh.read().strip()
                if text:
                    return text[-600:]
            except OSError:
                pass
        return "no log"

    def vsctl(self, *args: str) -> str:
        argv = ["ovs-vsctl", f"--db={self.db}", "--timeout=30", *args]
        r = nsexec.run(self.ns, argv, timeout=40, env=self.env)
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}; ovs-vswitchd: "
                               f"{self.log_tail('ovs-vswitchd')}")
        return r.stdout

    def start(self) -> None:
        db = os.path.join(self.dir, "conf.db")
        r = subprocess.run(["ovsdb-tool", "create", db, SCHEMA], capture_output=True,
                           text=True, timeout=30)
        if r.returncode != 0:
            raise RuntimeError(f"ovsdb-tool create: {r.stderr.strip()}")
        self._start(["ovsdb-server", db, f"--remote=punix:{self.dir}/db.sock",
                     f"--unixctl={self.dir}/ovsdb.ctl", f"--pidfile={self.dir}/ovsdb.pid",
                     f"--log-file={self.dir}/ovsdb-server.log"], f"{self.dir}/db.sock")
        self.vsctl("--no-wait", "init")
        self._start(["ovs-vswitchd", self.db, f"--unixctl={self.dir}/vswitchd.ctl",
                     f"--pidfile={self.dir}/vswitchd.pid",
                     f"--log-file={self.dir}/ovs-vswitchd.log", "-vconsole:off"],
                    f"{self.dir}/vswitchd.ctl")

    def stop(self) -> None:
        for p in reversed(self.procs):        # vswitchd first, then its database
            nsexec.stop(p)
        self.procs.clear()


def _peer(kind: str):
    name = {"system": "ovs-afpacket", "afxdp": "ovs-afxdp"}[kind]

    @contextlib.contextmanager
    def factory(prefix: str | None = None) -> Iterator[e2e.Path]:
        ensure_installed()
        with e2e.recorded(prefix or e2e.default_prefix()) as nn, \
                tempfile.TemporaryDirectory(prefix="hvnet-ovs-") as tmp:
            a, b, sw = nn.add_namespace("a"), nn.add_namespace("b"), nn.add_namespace("sw")
            nn.add_veth((a, "va"), (sw, "sa"))
            nn.add_veth((b, "vb"), (sw, "sb"))
            for ns, ifname in ((a, "va"), (b, "vb")):
                nn.set_tx_checksum(ns, ifname, False)
            for port in ("sa", "sb"):
                nn.set_up(sw, port)
            ovs = _Ovs(sw, tmp)
            try:
                ovs.start()
                ovs.vsctl("add-br", "br0", "--", "set", "bridge", "br0",
                          "datapath_type=netdev")
                for port in ("sa", "sb"):
                    extra = (["--", "set", "interface", port, "type=afxdp",
                              "options:xdp-mode=native"] if kind == "afxdp" else [])
                    ovs.vsctl("add-port", "br0", port, *extra)
                    # ovs-vsctl succeeds once the database has the port; whether
                    # ovs-vswitchd could open it is in the interface's error column.
                    error = ovs.vsctl("--if-exists", "get", "interface", port,
                                      "error").strip()
                    if error not in ("", "[]"):
                        raise RuntimeError(f"OVS could not open port {port}: {error}")
                e2e.endpoints(nn, a, b)
                e2e.wait_reachable(a, e2e.B_IP)
                yield e2e.Path(name, a, b, e2e.B_IP)
            finally:
                try:
                    if ovs.procs:
                        ovs.vsctl("--if-exists", "del-br", "br0")
                except RuntimeError:
                    pass                      # its processes are ended just below anyway
                ovs.stop()
    factory.__name__ = name
    return factory


afpacket_peer = _peer("system")
afxdp_peer = _peer("afxdp")

"""``hvnet demo``: the demo topology brought up in namespaces, real traffic, a report.

It runs ``hvnet up`` on topologies/demo.yaml (the daemon, detached, as a user
would), then from inside the machines: pings that must pass (same VLAN across
the switch, the host vNIC to the physical network through the uplink, a VM to a
router on a tagged VLAN) and must not (the same subnet on another VLAN), a TCP
connection the port ACL refuses, and short iperf3 runs over each kind of path;
then the switch's own counters, and ``hvnet down``. Exit status 0 only if every
check gave the expected result.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

from rich.console import Console
from rich.table import Table

from . import nsexec
from .rundir import RunDir

DEMO = Path(__file__).resolve().parent.parent / "topologies" / "demo.yaml"

# (from, to address, expect reachable, what it shows)
PINGS = [
    ("vm1", "10.0.10.2", True, "vm1 -> vm2: VLAN 10 across the switch"),
    ("vm1", "fd00:10::2", True, "vm1 -> vm2 over IPv6 (neighbour discovery)"),
    ("vm1", "10.0.10.254", True, "vm1 -> router: VLAN 10 tagged on the uplink"),
    ("host", "10.0.0.2", True, "host vNIC -> nas: internal port to the uplink"),
    ("vm3", "10.0.10.1", False, "vm3 (VLAN 20) -> vm1: same subnet, other VLAN"),
]
# (client, server, server address, what)
IPERFS = [
    ("vm1", "vm2", "10.0.10.2", "VM to VM (synthetic NIC to a tap port)"),
    ("host", "nas", "10.0.0.2", "host vNIC to the physical network (uplink)"),
    ("router", "vm1", "10.0.10.1", "physical router to a synthetic VM, VLAN 10 tagged"),
]
ACL_PROBE = ("import socket,sys\ns=socket.socket();s.settimeout(1.5)\n"
             "try:\n s.connect((sys.argv[1],23));print('connected')\n"
             "except socket.timeout:print('timed out')\n"
             "except OSError as e:print(e.strerror)\n")


def _hvnet(*args, timeout=400):
    return subprocess.run([sys.executable, "-m", "hvnet.cli", *args], capture_output=True,
                          text=True, timeout=timeout)


def _iperf(client: str, server: str, addr: str, seconds: float) -> float:
    srv = nsexec.popen(server, ["iperf3", "-s", "-1", "-B", addr, "-p", "5211"],
                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for _ in range(50):                 # wait for the server's socket
            r = nsexec.run(client, ["iperf3", "-c", addr, "-p", "5211", "-t", str(seconds),
                                    "-J"], timeout=seconds + 30)
            if r.returncode == 0:
                d = json.loads(r.stdout)
                return d["end"]["sum_received"]["bits_per_second"] / 1e9
            if "Connection refused" not in r.stdout + r.stderr:
                raise RuntimeError(f"iperf3 {client} -> {addr}: {r.stdout[-300:]}")
            import time
            time.sleep(0.1)
        raise RuntimeError(f"iperf3 server in {server} never listened")
    finally:
        nsexec.stop(srv)


def run(console: Console, topology: str | None = None, iperf_seconds: float = 3.0,
        as_json: bool = False) -> int:
    topo = topology or str(DEMO)
    r = _hvnet("up", topo, "--json")
    if r.returncode != 0:
        console.print(f"[red]hvnet up failed:[/red] {r.stderr.strip()}")
        return 1
    st = json.loads(r.stdout)
    name = st["name"]
    info = RunDir(name).info()
    machines = info["machines"]
    nsexec.adopt(info)
    results = []
    ok = True
    try:
        if not as_json:
            console.print(f"[green]{name} is up[/green]: {len(st['ports'])} ports; "
                          f"machines {', '.join(sorted(machines))}")
        for src, dst, expect, what in PINGS:
            p = nsexec.run(machines[src], ["ping", "-c", "3", "-i", "0.2", "-W", "1", dst],
                           timeout=20)
            reached = p.returncode == 0
            rtt = ""
            for line in p.stdout.splitlines():
                if "min/avg/max" in line:
                    rtt = f"{float(line.split('=')[1].split('/')[1]) * 1000:.0f} us avg"
            results.append({"test": "ping", "what": what, "expected": expect,
                            "got": reached, "figure": rtt or "-"})
        probe = nsexec.run(machines["vm1"], [sys.executable, "-c", ACL_PROBE, "10.0.10.2"],
                           timeout=20)
        ans = probe.stdout.strip()
        results.append({"test": "tcp :23", "what": "vm1 -> vm2 TCP port 23: vm2's port ACL "
                        "denies it", "expected": False, "got": ans == "connected",
                        "figure": ans})
        for c, s, addr, what in IPERFS:
            try:
                g = _iperf(machines[c], machines[s], addr, iperf_seconds)
                results.append({"test": "iperf3", "what": what, "expected": True,
                                "got": True, "figure": f"{g:.2f} Gbit/s"})
            except (RuntimeError, subprocess.TimeoutExpired) as e:
                results.append({"test": "iperf3", "what": what, "expected": True,
                                "got": False, "figure": str(e)[:60]})
        stats = json.loads(_hvnet("stats", "-t", name, "--json").stdout or "{}")
    finally:
        d = _hvnet("down", name)
        if d.returncode != 0:
            console.print(f"[red]hvnet down failed:[/red] {d.stderr.strip()}")
            ok = False
    ok = ok and all(x["expected"] == x["got"] for x in results)
    if as_json:
        print(json.dumps({"ok": ok, "results": results, "stats": stats}))
        return 0 if ok else 1
    t = Table(title=f"hvnet demo: {topo}")
    for c in ("test", "what", "expected", "result", "figure"):
        t.add_column(c)
    for x in results:
        good = x["expected"] == x["got"]
        t.add_row(x["test"], x["what"], "reach" if x["expected"] else "blocked",
                  ("[green]" if good else "[red]") + ("reached" if x["got"] else "blocked")
                  + ("" if good else " (WRONG)") + ("[/green]" if good else "[/red]"),
                  x["figure"])
    console.print(t)
    for sname, s in stats.items():
        ct = Table(title=f"switch {sname} counters")
        for c in ("port", "rx pkts", "tx pkts", "dropped in", "dropped out", "why"):
            ct.add_column(c)
        for pname, p in s["ports"].items():
            why = "; ".join(f"{n} x {r}" for r, n in {**p["drops_in"],
                                                      **p["drops_out"]}.items())
            ct.add_row(pname, str(p["rx_packets"]), str(p["tx_packets"]),
                       str(p["dropped_in"]), str(p["dropped_out"]), why or "-")
        console.print(ct)
    console.print("[green]all checks as expected; topology down[/green]" if ok else
                  "[red]some checks were not as expected[/red]")
    return 0 if ok else 1

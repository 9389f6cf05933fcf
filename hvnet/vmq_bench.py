"""``hvnet bench vmq``: receive from the uplink into two VMs, one queue against two.

Three topologies are up side by side, the same but for the uplink: ``1 queue``
has no VMQ (every received frame goes through the default queue, switched by
the data-path thread), ``2 queues`` gives each VM its own VMQ queue with its own
worker thread delivering into the VM's rings (switch/vmq_workers.py; forced on,
as ``auto`` leaves them off on a machine this small), and ``2 queues, no
workers`` sorts into the same queues but delivers all in the data-path thread. A physical host behind the uplink sends
one iperf3 TCP stream to each VM at once; the figure is the sum the VMs receive.
Rounds alternate between the two so both see the same machine; each cell is
"median (min-max)" and the ratio is 2 queues over 1 queue of the medians.

Per-queue CPU use is read from ``hvnet stats`` in the middle of each 2-queue
round (the balancer's last one-second interval), with the whole machine's busy
share over the round.
"""
from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time

from . import e2e

TOPOLOGY = """
name: {name}
switches:
  sw0: {{uplink: {{mtu: 1500{vmq}}}}}
vms:
  a: {{nics: [{{switch: sw0, kind: synthetic, mac: "02:00:00:00:0a:01", addresses: [10.7.0.1/24]}}]}}
  b: {{nics: [{{switch: sw0, kind: synthetic, mac: "02:00:00:00:0b:01", addresses: [10.7.0.2/24]}}]}}
physical:
  p: {{switch: sw0, mac: "02:00:00:00:0c:01", addresses: [10.7.0.9/24]}}
"""
VMS = (("a", "10.7.0.1"), ("b", "10.7.0.2"))
CONFIGS = (("1 queue", ""), ("2 queues", ", vmq: {queues: 2, workers: true}"),
           ("2 queues, no workers", ", vmq: {queues: 2, workers: false}"))


def _hvnet(env, *args, timeout=120):
    return subprocess.run([sys.executable, "-m", "hvnet.cli", *args], capture_output=True,
                          text=True, timeout=timeout, env=env)


def _round(name: str, env, seconds: float, with_queues: bool) -> dict:
    servers = [e2e.start_iperf_server(f"{name}-{vm}", ip) for vm, ip in VMS]
    got: dict[str, float] = {}
    errors: list[str] = []

    def client(vm, ip, port):
        try:
            d = e2e.run_iperf_client(f"{name}-p", ["iperf3", "-c", ip, "-p", str(port), "-J",
                                          "--connect-timeout", "3000", "-t", f"{seconds:g}"],
                            seconds)
            got[vm] = d["end"]["sum_received"]["bits_per_second"] / 1e9
        except Exception as e:          # reported with the round
            errors.append(f"{vm}: {e}")
    try:
        before = e2e.cpu_times()
        ts = [threading.Thread(target=client, args=(vm, ip, port))
              for (vm, ip), (_, port) in zip(VMS, servers)]
        for t in ts:
            t.start()
        queues = None
        if with_queues:
            time.sleep(seconds * 0.6)
            r = _hvnet(env, "stats", "-t", name, "--json")
            if r.returncode == 0:
                queues = [{k: q[k] for k in ("queue", "port", "cpu", "load", "full_drops")
                           if k in q} for q in json.loads(r.stdout)["sw0"].get("vmq", [])]
        for t in ts:
            t.join()
        busy = e2e.busy_pct(before, e2e.cpu_times())
    finally:
        for p, _ in servers:
            e2e.nsexec.stop(p)
    if errors:
        raise RuntimeError("; ".join(errors))
    return {"gbit_s": sum(got.values()), "per_vm": got, "cpu_busy_pct": busy,
            "queues": queues}


def run(seconds: float = 5.0, repeats: int = 3, progress=lambda s: None) -> dict:
    """Bring both topologies up, run ``repeats`` alternating rounds, take them down."""
    tmp = tempfile.mkdtemp(prefix="hvnet-bench-vmq-")
    env = {**os.environ, "HVNET_STATE_DIR": os.path.join(tmp, "state")}
    names = {}
    rounds: dict[str, list[dict]] = {label: [] for label, _ in CONFIGS}
    errors: list[str] = []
    try:
        for k, (label, vmq) in enumerate(CONFIGS):
            name = f"bvq{k + 1}"
            f = os.path.join(tmp, f"{name}.yaml")
            with open(f, "w") as fh:
                fh.write(TOPOLOGY.format(name=name, vmq=vmq))
            progress(f"bringing up {label} ({name})")
            r = _hvnet(env, "up", f, "--json", timeout=400)
            if r.returncode != 0:
                raise RuntimeError(f"hvnet up ({label}): {r.stderr.strip()}")
            names[label] = name
            for vm, ip in VMS:
                e2e.wait_reachable(f"{name}-p", ip)
        for i in range(repeats):
            for label, _ in CONFIGS:
                progress(f"round {i + 1}/{repeats}: {label}")
                try:
                    rounds[label].append(_round(names[label], env, seconds,
                                                label == CONFIGS[1][0]))
                except RuntimeError as e:
                    errors.append(f"{label}, round {i + 1}: {e}")
    finally:
        for name in names.values():
            if _hvnet(env, "down", name).returncode != 0:
                _hvnet(env, "clean", "--force")
    out = {"machine": e2e.machine(), "seconds": seconds, "repeats": repeats,
           "when": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()),
           "results": {}, "errors": errors}
    for label, rs in rounds.items():
        if not rs:
            continue
        g = [r["gbit_s"] for r in rs]
        out["results"][label] = {
            "gbit_s": statistics.median(g), "min": min(g), "max": max(g),
            "rounds": rs}
    one, two = (out["results"].get(label) for label, _ in CONFIGS[:2])
    if one and two and one["gbit_s"] > 0:
        out["ratio"] = two["gbit_s"] / one["gbit_s"]
    return out


def table(result: dict):
    from rich.table import Table
    t = Table(title=f"hvnet bench vmq: uplink -> two synthetic VMs, TCP, one stream each "
              f"({result['seconds']:g} s x {result['repeats']})")
    for c in ("queues", "received (sum)", "per VM (last round)", "CPU busy", "queue CPU use"):
        t.add_column(c)
    for label, r in result["results"].items():
        last = r["rounds"][-1]
        qs = last.get("queues") or []
        t.add_row(label, f"{r['gbit_s']:.2f} ({r['min']:.2f}-{r['max']:.2f}) Gbit/s",
                  ", ".join(f"{vm} {g:.2f}" for vm, g in sorted(last["per_vm"].items())),
                  " / ".join(f"{x:.0f}%" for x in last["cpu_busy_pct"]),
                  ", ".join(f"q{q['queue']} cpu{q['cpu']} {q['load']:.0%}" for q in qs) or "-")
    if "ratio" in result:
        t.caption = f"2 queues / 1 queue: x{result['ratio']:.2f}"
    return t

"""``hvnet bench e2e``: every hvnet path beside the peers a user would pick instead,
on the same two-namespace topology (baseline.md: 10.9.0.1 -> 10.9.0.2, fixed MACs),
in one run.

Peers: a direct veth pair (the reference of every ratio), a Linux bridge, and Open
vSwitch's userspace datapath with AF_PACKET ports and with AF_XDP ports (hvnet/ovs.py,
which installs Debian's openvswitch-switch when it is missing). hvnet paths, each
brought up by the real daemon (hvnet/switch_bench.py has the topologies): the host
vNIC to a host behind the uplink, synthetic to synthetic, e1000 to synthetic, and
VMQ receive (a host behind the uplink to a synthetic VM whose NIC owns a VMQ queue).
SR-IOV VF to VF joins when the SR-IOV NIC exists (issue 7); it does not yet.

Tests per path, every round: iperf3 TCP with 1 and 4 streams; 64-byte frames
from the packet generator as fast as one core sends them; RFC 2544 zero-loss
rates at 64, 512 and 1518 bytes by binary search; one-way latency percentiles at
10, 50 and 90 % of each size's zero-loss rate (hvnet/pktgen.py). ``--quick`` is
one round of short trials with latency at 64 bytes only.
"""
from __future__ import annotations

import json
import os
import time

from . import e2e, e2e_report, ovs, switch_bench

PEERS = {"veth": e2e.veth_peer, "bridge": e2e.bridge_peer,
         "ovs-afpacket": ovs.afpacket_peer, "ovs-afxdp": ovs.afxdp_peer}
HVNET = {"internal-uplink": switch_bench.PATHS["internal-uplink"],
         "synthetic": switch_bench.PATHS["synthetic"],
         "e1000-synthetic": switch_bench.PATHS["e1000-synthetic"],
         "vmq": switch_bench.PATHS["vmq"],
         "sriov": switch_bench.PATHS["sriov"],
         "tap-tap": switch_bench.PATHS["tap-tap"]}
DEFAULT_HVNET = ("internal-uplink", "synthetic", "e1000-synthetic", "vmq", "sriov")
SIZES = (64, 512, 1518)
LOADS = (10, 50, 90)


def tests(quick: bool) -> tuple[str, ...]:
    lat_sizes = SIZES[:1] if quick else SIZES
    return (("tcp1", "tcp4", "pps64") + tuple(f"zl{s}" for s in SIZES)
            + tuple(f"lat{s}@{p}" for s in lat_sizes for p in LOADS))


def _pick(arg: str | None, table: dict, default, what: str) -> list[str]:
    names = [n.strip() for n in arg.split(",") if n.strip()] if arg is not None else list(default)
    bad = [n for n in names if n not in table]
    if bad:
        raise ValueError(f"unknown {what} {', '.join(bad)}; {what}s are {', '.join(table)}")
    return names


def main(a, out, err) -> int:
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, \
        TimeElapsedColumn
    try:
        peers = _pick(a.peers, PEERS, PEERS, "peer")
        paths = _pick(a.paths, HVNET, DEFAULT_HVNET, "path")
    except ValueError as e:
        err.print(f"hvnet bench e2e: {e}")
        return 2
    if not peers and not paths:
        err.print("hvnet bench e2e: nothing to measure (--peers and --paths both empty)")
        return 2
    if "veth" not in peers:
        err.print("[yellow]no veth peer: the table will have no ratios[/yellow]")
    quick = a.quick
    seconds = a.seconds or (1.0 if quick else 5.0)
    repeats = a.repeats or (1 if quick else 3)
    trial_s = 0.25 if quick else 1.0
    steps = 3 if quick else 6
    names = tests(quick)
    if any(p.startswith("ovs") for p in peers):
        try:
            ovs.ensure_installed(lambda s: err.print(s))
        except RuntimeError as e:       # the OVS rows say why; the rest still runs
            err.print(f"[red]{e}[/red]")
    factories = [PEERS[p] for p in peers] + [HVNET[p] for p in paths]
    started = time.monotonic()
    with Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                  TimeElapsedColumn(), console=err, transient=True) as prog:
        task = prog.add_task("starting", total=repeats * len(factories) * len(names))
        result = e2e.compare(factories, tests=names, seconds=seconds, repeats=repeats,
                             trial_s=trial_s, steps=steps,
                             progress=lambda s: prog.update(task, description=s[:90]),
                             step=lambda: prog.advance(task))
    result["settings"]["quick"] = quick
    result["settings"]["wall_s"] = round(time.monotonic() - started, 1)
    files = e2e_report.write(result, a.out)
    if a.json:
        print(json.dumps(result))
    else:
        from rich.markdown import Markdown
        out.print(Markdown(open(files["markdown"]).read().split("## Plots")[0]))
        out.print(f"written: {files['markdown']}, {files['json']}, "
                  f"{', '.join(files['plots'])} ({result['settings']['wall_s']:.0f} s)")
    return 0 if not any(r.get("errors") for r in result["results"].values()) else 1

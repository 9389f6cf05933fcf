"""The ``hvnet`` command line.

Topologies: ``up``, ``down``, ``ps``, ``exec``, ``stats``, ``capture``, ``graph``,
``set`` (a port property at run time), ``vm add`` / ``vm rm``, ``clean``. Also
``demo`` and ``bench``. Commands that talk to a running topology take ``-t NAME``;
it may be left out when exactly one topology is up. Every command that prints a
table takes ``--json`` for scripts. Errors go to stderr with exit status 1 (2 for
bad arguments or an invalid topology file).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

out = Console()
err = Console(stderr=True)


class CliError(Exception):
    def __init__(self, msg: str, code: int = 1):
        super().__init__(msg)
        self.code = code


# ----------------------------------------------------------------------- helpers
def _run_of(name: str | None):
    """The run directory of topology ``name`` (or of the only one up)."""
    from .rundir import RunDir, all_runs
    if name:
        run = RunDir(name)
        if not run.exists():
            raise CliError(f"topology {name!r} is not up (hvnet ps lists what is)")
        return run
    runs = [r for r in all_runs() if r.daemon_alive()]
    if not runs:
        raise CliError("no topology is up ('hvnet up FILE' starts one)")
    if len(runs) > 1:
        raise CliError(f"several topologies are up ({', '.join(r.name for r in runs)}): "
                       "choose one with -t NAME")
    return runs[0]


def _call(run, op, timeout: float = 30.0, **args):
    from .control import ControlError, call
    try:
        return call(run.socket, op, timeout=timeout, **args)
    except ControlError as e:
        raise CliError(f"{run.name}: {e}") from None


def _status_table(st: dict, addresses: dict | None = None) -> Table:
    t = Table(title=f"topology {st['name']} ({st['source']})")
    for c in ("port", "switch", "type", "namespace", "interface", "MAC"):
        t.add_column(c)
    if addresses is not None:
        t.add_column("addresses")
    for p in st["ports"]:
        row = [p["port"], p["switch"], p["type"], p["namespace"], p["interface"], p["mac"]]
        if addresses is not None:
            row.append(", ".join(addresses.get(p["port"].split(".")[0], [])))
        t.add_row(*row)
    return t


# ----------------------------------------------------------------------- topologies
def cmd_up(a) -> int:
    from .rundir import RunDir
    from .topology import load
    topo = load(a.file)                 # TopologyError: exit 2, nothing created
    _need_root_or_userns()
    run = RunDir(topo.name)
    try:
        run.create()
    except FileExistsError as e:
        raise CliError(str(e)) from None
    if a.fg:
        import logging
        from .daemon import serve
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")

        def ready(rt):
            st = rt.status()
            out.print(_status_table(st, _addresses(topo)))
            out.print(_machines_table(topo, st))
            out.print("[dim]running in the foreground; Ctrl-C takes it down[/dim]")
        try:
            return serve(a.file, run, on_ready=ready)
        finally:
            shutil.rmtree(run.path, ignore_errors=True)
    with open(run.log, "ab") as logf:
        p = subprocess.Popen([sys.executable, "-m", "hvnet.daemon", str(Path(a.file).resolve()),
                              "--run-dir", str(run.path)], stdin=subprocess.DEVNULL,
                             stdout=logf, stderr=logf, start_new_session=True, cwd="/")
    deadline = time.monotonic() + a.timeout
    from .control import ControlError, call
    while True:
        rc = p.poll()
        if rc is not None:
            msg = run.log.read_text().strip().splitlines() if run.log.exists() else []
            errors = [m.split(" ERROR ", 1)[1] for m in msg if " ERROR " in m]
            shutil.rmtree(run.path, ignore_errors=True)
            raise CliError("the daemon could not bring the topology up: "
                           + ("; ".join(errors) or f"exit status {rc}"), 2 if rc == 2 else 1)
        if run.socket.exists():
            try:
                st = call(run.socket, "status", timeout=5)
                break
            except ControlError:
                pass
        if time.monotonic() > deadline:
            p.kill()
            p.wait()
            run.clean()
            raise CliError(f"the daemon did not come up within {a.timeout:g} s; "
                           f"removed what it made")
        time.sleep(0.05)
    if a.json:
        print(json.dumps(st))
    else:
        out.print(_status_table(st, _addresses(topo)))
        out.print(_machines_table(topo, st))
        out.print(f"[green]up[/green]: daemon pid {p.pid}; 'hvnet exec VM -- CMD' runs "
                  f"commands in a machine, 'hvnet down {topo.name}' takes it down")
    return 0


def _machines_table(topo, st: dict) -> Table:
    t = Table(title="machines ('hvnet exec NAME -- CMD')")
    for c in ("name", "what", "namespace", "addresses"):
        t.add_column(c)
    addrs = _addresses(topo)
    for vm, nics in topo.vms.items():
        t.add_row(vm, "VM: " + ", ".join(f"{n.kind} NIC on {n.switch}" for n in nics),
                  st["machines"][vm], ", ".join(addrs.get(vm, [])))
    for ns in sorted({h.namespace for h in topo.host}):
        t.add_row(ns, "host vNIC(s) on " + ", ".join(h.switch for h in topo.host
                                                     if h.namespace == ns),
                  st["machines"][ns], ", ".join(addrs.get(ns, [])))
    for p in topo.physical.values():
        t.add_row(p.name, f"physical, behind {p.switch}'s uplink"
                  + (f", VLAN {p.vlan} tagged" if p.vlan else ""),
                  st["machines"][p.name], ", ".join(p.addresses))
    return t


def _addresses(topo) -> dict:
    d = {vm: [a for n in nics for a in n.port.addresses] for vm, nics in topo.vms.items()}
    for h in topo.host:
        d.setdefault(h.namespace, []).extend(h.port.addresses)
    return d


def _need_root_or_userns() -> None:
    from .rootless import explain, userns_blockers, wanted
    if wanted() and userns_blockers():
        raise CliError(explain())


def cmd_down(a) -> int:
    from .rundir import RunDir, alive
    run = RunDir(a.name)
    if not run.exists():
        raise CliError(f"topology {a.name!r} is not up")
    info = run.info()
    if not run.daemon_alive():
        done = run.clean()
        out.print(f"{a.name}: the daemon was gone; removed what it left ({len(done)} items)")
        return 0
    _call(run, "down")
    deadline = time.monotonic() + a.timeout
    while alive(info["pid"], info.get("start")):
        if time.monotonic() > deadline:
            raise CliError(f"{a.name}: the daemon (pid {info['pid']}) did not stop within "
                           f"{a.timeout:g} s; 'hvnet clean --force {a.name}' kills it")
        time.sleep(0.05)
    if run.exists():
        run.clean()
    out.print(f"{a.name}: down")
    return 0


def cmd_ps(a) -> int:
    from .rundir import all_runs
    rows = []
    for run in all_runs():
        info = run.info()
        up = run.daemon_alive()
        st = None
        if up:
            try:
                st = _call(run, "status")
            except CliError:
                st = None
        rows.append({"name": run.name, "pid": info.get("pid"),
                     "state": ("running" if st else "not answering") if up else "dead",
                     "uptime_s": round(time.time() - info["started"]) if up and
                     info.get("started") else None,
                     "ports": len(st["ports"]) if st else None,
                     "machines": sorted(info.get("machines", {})),
                     "source": info.get("source"),
                     "errors": st["errors"] if st else []})
    if a.json:
        print(json.dumps(rows))
        return 0
    t = Table(title="hvnet topologies")
    for c in ("name", "state", "pid", "uptime", "ports", "machines", "file"):
        t.add_column(c)
    for r in rows:
        t.add_row(r["name"], r["state"], str(r["pid"]),
                  f"{r['uptime_s']} s" if r["uptime_s"] is not None else "-",
                  str(r["ports"] if r["ports"] is not None else "-"),
                  " ".join(r["machines"]), r["source"] or "-")
    out.print(t)
    for r in rows:
        for e in r["errors"]:
            err.print(f"[red]{r['name']}: {e}[/red]")
        if r["state"] == "dead":
            err.print(f"{r['name']}: its daemon is gone; 'hvnet clean {r['name']}' removes "
                      "what it left")
    return 0


def cmd_exec(a) -> int:
    run = _run_of(a.topology)
    machines = run.info().get("machines", {})
    if a.vm not in machines:
        raise CliError(f"{run.name}: no machine {a.vm!r}; machines are {sorted(machines)}")
    cmd = a.command[1:] if a.command and a.command[0] == "--" else a.command
    if not cmd:
        raise CliError("nothing to run: hvnet exec VM -- COMMAND [ARGS...]", 2)
    from .nsexec import adopt, exec_in
    adopt(run.info())
    try:
        exec_in(machines[a.vm], cmd)
    except FileNotFoundError:
        raise CliError(f"{cmd[0]}: command not found", 127) from None
    except OSError as e:
        raise CliError(f"cannot run {cmd[0]!r} in {a.vm}: {e}") from None
    return 0          # not reached: exec replaced this process


def cmd_stats(a) -> int:
    run = _run_of(a.topology)
    st = _call(run, "stats", port=a.port)
    if a.json:
        print(json.dumps(st))
        return 0
    for sname, s in st.items():
        t = Table(title=f"switch {sname}: {s['fdb_entries']} MACs learned, "
                  f"extensions: {', '.join(e['name'] for e in s['extensions']) or 'none'}")
        for c in ("port", "type", "rx pkts", "rx bytes", "tx pkts", "tx bytes",
                  "dropped in", "dropped out"):
            t.add_column(c, justify="right" if c not in ("port", "type") else "left")
        for name, p in s["ports"].items():
            t.add_row(name, p["type"], str(p["rx_packets"]), str(p["rx_bytes"]),
                      str(p["tx_packets"]), str(p["tx_bytes"]), str(p["dropped_in"]),
                      str(p["dropped_out"]))
        out.print(t)
        for name, p in s["ports"].items():
            for side in ("drops_in", "drops_out"):
                for reason, n in p[side].items():
                    out.print(f"  {name} {side.replace('_', ' ')}: {n} x {reason}")
            nic = p.get("nic")
            if nic and nic.get("kind") == "netvsp":
                out.print(f"  {name} NIC: channel {nic['channel']}, NVSP {nic['nvsp'] or '-'}, "
                          f"RNDIS {nic['rndis'] or '-'}, link {nic['link']}"
                          + (f", last closed: {nic['last_close']}" if nic["last_close"] else ""))
                for what in ("dropped", "violations"):
                    for reason, n in nic[what].items():
                        out.print(f"  {name} NIC {what}: {n} x {reason}")
            elif nic and nic.get("kind") == "e1000":
                out.print(f"  {name} NIC: e1000, link {nic['link']}, {nic['exits']} exits "
                          f"({nic['accesses']} register accesses), {nic['interrupts']} "
                          f"interrupts, {nic['refused']} accesses refused")
                for what in ("tx", "rx"):
                    for k, n in nic[what].items():
                        out.print(f"  {name} NIC {what} {k}: {n}")
        if s.get("vmq"):
            from switch.port import mac_to_str
            t = Table(title=f"switch {sname}: VMQ on the uplink, {s['vmq_moves']} queue moves")
            for c in ("queue", "port", "state", "cpu", "load", "packets", "bytes", "filters"):
                t.add_column(c, justify="right" if c in ("queue", "cpu", "load", "packets",
                                                         "bytes") else "left")
            for q in s["vmq"]:
                f = ", ".join(mac_to_str(x["mac"]) + ({-1: "", -2: " any VLAN"}.get(
                    x["vlan"], f" VLAN {x['vlan']}")) for x in q["filters"])
                t.add_row(str(q["queue"]), q["port"], q["state"].lower(),
                          "-" if q["cpu"] < 0 else str(q["cpu"]), f"{q['load']:.0%}",
                          str(q["packets"]), str(q["bytes"]), f + (" (RSS)" if q["rss"] else ""))
            out.print(t)
        for k, note in s.get("vmq_notes", {}).items():
            out.print(f"  {k}: {note}")
    return 0


def cmd_vmq(a) -> int:
    run = _run_of(a.topology)
    try:
        table = [int(x) for x in a.table.split(",")]
    except ValueError:
        raise CliError(f"table {a.table!r}: comma-separated queue indexes, like 0,1,0,1", 2) \
            from None
    got = _call(run, "set_indirection", port=a.port, table=table)
    out.print(f"{a.port}: indirection table of {len(got['table'])} entries set")
    return 0


def cmd_capture(a) -> int:
    run = _run_of(a.topology)
    path = str(Path(a.write).resolve())
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    cid = _call(run, "capture_start", port=a.port, path=path)["id"]
    err.print(f"capturing {a.port} to {path}"
              + (f" for {a.seconds:g} s" if a.seconds else "")
              + (f", up to {a.count} frames" if a.count else "") + "; Ctrl-C stops")
    t0 = time.monotonic()
    try:
        while True:
            time.sleep(0.1)
            st = _call(run, "capture_status", id=cid)
            if a.count and st["frames"] >= a.count:
                break
            if a.seconds and time.monotonic() - t0 >= a.seconds:
                break
    except KeyboardInterrupt:
        pass
    st = _call(run, "capture_stop", id=cid)
    err.print(f"{st['frames']} frames written to {st['path']}")
    return 0


def cmd_graph(a) -> int:
    from .graph import render
    from .topology import load
    if a.file:
        topo, running = load(a.file), None
    else:
        run = _run_of(a.topology)
        topo = load(run.info()["source"])
        stats = _call(run, "stats")
        running = {n: {"rx_packets": p["rx_packets"], "tx_packets": p["tx_packets"]}
                   for s in stats.values() for n, p in s["ports"].items()}
    try:
        render(topo, a.output, running)
    except ValueError as e:
        raise CliError(str(e), 2) from None
    err.print(f"wrote {a.output}")
    return 0


def cmd_set(a) -> int:
    run = _run_of(a.topology)
    key, eq, value = a.setting.partition("=")
    if not eq:
        raise CliError(f"expected KEY=VALUE (vlan=..., acl=..., security=...), got "
                       f"{a.setting!r}", 2)
    print(_call(run, "set", port=a.port, key=key.strip(), value=value))
    return 0


def cmd_link(a) -> int:
    print(_call(_run_of(a.topology), "link", port=a.port, state=a.state))
    return 0


def cmd_vf(a) -> int:
    """A VF hot-removed and re-added (vswitch_vmq_sriov.md 4.3): once, or with
    ``chaos`` again and again at random times, the way host servicing does it."""
    run = _run_of(a.topology)
    if a.action != "chaos":
        print(_call(run, "vf", timeout=180, port=a.port, action=a.action))
        return 0
    import random
    import time
    if a.times < 1 or not 0 < a.min_s <= a.max_s:
        raise CliError("chaos needs --times >= 1 and 0 < --min <= --max", 2)
    rng = random.Random(a.seed)
    from rich.progress import Progress
    with Progress(transient=not sys.stdout.isatty()) as prog:
        task = prog.add_task(f"VF chaos on {a.port}", total=a.times)
        for _ in range(a.times):
            time.sleep(rng.uniform(a.min_s, a.max_s))
            prog.console.print(_call(run, "vf", timeout=180, port=a.port, action="remove"))
            time.sleep(rng.uniform(a.min_s, a.max_s))
            prog.console.print(_call(run, "vf", timeout=180, port=a.port, action="add"))
            prog.advance(task)
    return 0


def cmd_vm(a) -> int:
    run = _run_of(a.topology)
    if a.action == "add":
        if bool(a.file) == bool(a.spec):
            raise CliError("give the VM's NICs with -f FILE or --spec YAML (one of them)", 2)
        spec = Path(a.file).read_text() if a.file else a.spec
        r = _call(run, "add_vm", vm=a.vm, spec=spec)
        # the machine list is what 'hvnet exec' reads
        info = run.info()
        info.setdefault("machines", {})[a.vm] = r["namespace"]
        run.write_info(machines=info["machines"])
        print(f"{a.vm}: up, ports {', '.join(r['ports'])}")
    else:
        r = _call(run, "remove_vm", vm=a.vm)
        info = run.info()
        info.get("machines", {}).pop(a.vm, None)
        run.write_info(machines=info.get("machines", {}))
        print(f"{a.vm}: removed (ports {', '.join(r)})")
    return 0


def cmd_clean(a) -> int:
    from .rundir import RunDir, all_runs
    runs = [RunDir(a.name)] if a.name else all_runs()
    total = 0
    for run in runs:
        if not run.exists():
            raise CliError(f"nothing recorded for topology {a.name!r}")
        if run.daemon_alive() and not a.force:
            err.print(f"{run.name}: running; left alone ('hvnet down {run.name}', or "
                      "--force to kill it)")
            continue
        done = run.clean(kill_daemon=a.force)
        total += 1
        for d in done:
            out.print(f"{run.name}: removed {d}")
    if not runs:
        out.print("nothing to clean")
    return 0


# ----------------------------------------------------------------------- demo, bench
def cmd_demo(a) -> int:
    if a.in_memory:
        from . import demo_memory
        demo_memory.run(Console(), pcap_path=a.pcap)
        return 0
    _need_root_or_userns()
    from . import demo
    return demo.run(out, a.topology, iperf_seconds=a.seconds, as_json=a.json)


def cmd_bench(a) -> int:
    if a.what == "fastpath":
        from . import fastpath_bench
        if not a.json:
            err.print(f"[dim]running the in-memory fast path for {a.seconds:g} s on one "
                      "core...[/dim]")
        r = fastpath_bench.run(seconds=a.seconds, batch=a.batch, peer=not a.no_peer)
        if a.json:
            print(json.dumps(r))
            return 0
        t = Table(title="hvnet bench fastpath (in-memory pipeline, one core)")
        t.add_column("metric")
        t.add_column("value", justify="right")
        t.add_row("Mpps per core (CPU time)", f"{r['mpps_per_core']:.2f}")
        t.add_row("Mpps (wall time)", f"{r['mpps_wall']:.2f}")
        t.add_row("ns per packet", f"{r['ns_per_packet']:.0f}")
        if "python_mpps_per_core" in r:
            t.add_row("plain-Python switch, same run (Mpps per core)",
                      f"{r['python_mpps_per_core']:.2f}")
            t.add_row("ratio", f"x{r['ratio_vs_python']:.1f}")
        t.add_row("packets / delivered / dropped",
                  f"{r['packets']} / {r['delivered']} / {r['dropped']}")
        t.add_row("setup", f"{r['ports']} ports, {r['macs']} MACs, {r['frame_bytes']}-byte "
                  f"frames, batches of {r['batch_size']}, CPU {r['cpu']}")
        out.print(t)
        return 0
    if a.what == "ring":
        from . import ring_bench
        if not a.json:
            err.print(f"[dim]NetVSC -> NetVSP through the VMBus ring, two processes, "
                      f"{a.seconds:g} s per run...[/dim]")
        r = ring_bench.run(seconds=a.seconds)
        if a.json:
            print(json.dumps(r))
            return 0
        t = Table(title="hvnet bench ring (guest process -> host process, shared-memory "
                  "VMBus ring, polling)")
        t.add_column("frames")
        t.add_column("rate", justify="right")
        t.add_row("64 bytes, through send-buffer sections", f"{r['mpps_64']:.2f} Mpps")
        t.add_row("64 KiB LSO, GPA-direct", f"{r['gbps_lso']:.1f} Gbit/s")
        out.print(t)
        return 0
    if a.what == "switch":
        if os.geteuid() != 0:
            raise CliError("bench switch builds its peers (a veth pair, a Linux bridge) in "
                           "the host's namespaces: it needs root")
        from . import switch_bench
        return switch_bench.main(a, out, err)
    if a.what == "vmq":
        if os.geteuid() != 0:
            raise CliError("bench vmq builds its topologies in network namespaces: run it "
                           "as root", 2)
        from . import vmq_bench
        with err.status("starting") as status:
            r = vmq_bench.run(seconds=a.seconds, repeats=a.repeats,
                              progress=lambda s: status.update(s))
        if a.json:
            print(json.dumps(r))
        else:
            out.print(vmq_bench.table(r))
            for e in r["errors"]:
                err.print(f"[red]{e}[/red]")
        return 1 if r["errors"] else 0
    if a.what == "feed":
        if os.geteuid() != 0:
            raise CliError("bench feed builds a veth pair in a network namespace: run it "
                           "as root", 2)
        from . import vmq_feed_bench
        with err.status("starting") as status:
            r = vmq_feed_bench.run(frames=100_000 if a.quick else 400_000,
                                   repeats=a.repeats or 3,
                                   progress=lambda s: status.update(s))
        if a.json:
            print(json.dumps(r))
        else:
            out.print(vmq_feed_bench.table(r))
        return 0
    if a.what == "e2e":
        if os.geteuid() != 0:
            raise CliError("bench e2e builds its peers and topologies in network namespaces "
                           "(and may install Open vSwitch): run it as root", 2)
        from . import e2e_bench
        return e2e_bench.main(a, out, err)
    raise CliError(f"unknown benchmark {a.what!r}", 2)


# ----------------------------------------------------------------------- parser
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="hvnet", description="Hyper-V's network dataplane on Linux")
    sub = p.add_subparsers(dest="cmd", required=True, metavar="COMMAND")

    def topo_opt(sp):
        sp.add_argument("-t", "--topology", metavar="NAME",
                        help="the running topology (default: the only one up)")

    s = sub.add_parser("up", help="bring a topology file up (detached)")
    s.add_argument("file", help="topology file (YAML)")
    s.add_argument("--fg", action="store_true", help="stay in the foreground")
    s.add_argument("--json", action="store_true", help="print the status as JSON")
    s.add_argument("--timeout", type=float, default=300.0,
                   help="seconds to wait for the daemon (default 300: a first run "
                   "compiles the kernels)")
    s.set_defaults(func=cmd_up)

    s = sub.add_parser("down", help="take a running topology down")
    s.add_argument("name")
    s.add_argument("--timeout", type=float, default=30.0)
    s.set_defaults(func=cmd_down)

    s = sub.add_parser("ps", help="list topologies")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_ps)

    s = sub.add_parser("exec", help="run a command in a machine: hvnet exec VM -- CMD...")
    topo_opt(s)
    s.add_argument("vm")
    s.add_argument("command", nargs=argparse.REMAINDER)
    s.set_defaults(func=cmd_exec)

    s = sub.add_parser("stats", help="port counters and drop reasons")
    topo_opt(s)
    s.add_argument("port", nargs="?")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=cmd_stats)
    s = sub.add_parser("vmq", help="change a VM NIC's VMMQ indirection table while it runs")
    s.add_argument("port", help="VM NIC port name, as 'hvnet stats' shows it")
    s.add_argument("table", help="queue indexes of the port, comma-separated; "
                   "a power of two of them, e.g. 0,1,1,1")
    topo_opt(s)
    s.set_defaults(func=cmd_vmq)

    s = sub.add_parser("capture", help="capture a port's frames to a pcap file")
    topo_opt(s)
    s.add_argument("port")
    s.add_argument("-w", "--write", required=True, metavar="FILE")
    s.add_argument("-c", "--count", type=int, default=0, help="stop after this many frames")
    s.add_argument("--seconds", type=float, default=0, help="stop after this long")
    s.set_defaults(func=cmd_capture)

    s = sub.add_parser("graph", help="draw a topology (PNG or SVG)")
    topo_opt(s)
    s.add_argument("file", nargs="?", help="a topology file (default: the running one)")
    s.add_argument("-o", "--output", required=True, help="OUT.png or OUT.svg")
    s.set_defaults(func=cmd_graph)

    s = sub.add_parser("set", help="change a port property at run time")
    topo_opt(s)
    s.add_argument("port", help="port name, as 'hvnet stats' shows it")
    s.add_argument("setting", help="vlan=YAML | acl=YAML | security=YAML; =none deletes; "
                   "e.g. 'vlan={mode: access, id: 20}'")
    s.set_defaults(func=cmd_set)

    s = sub.add_parser("link", help="connect or disconnect a NIC's link (the guest sees "
                       "a media indication, its carrier follows)")
    topo_opt(s)
    s.add_argument("port", help="port name, as 'hvnet stats' shows it (a VM NIC or host vNIC)")
    s.add_argument("state", choices=["up", "down"])
    s.set_defaults(func=cmd_link)

    s = sub.add_parser("vf", help="hot-remove or re-add the VF of a NIC of kind sriov "
                       "(its traffic fails over to the synthetic path and back)")
    topo_opt(s)
    s.add_argument("port", help="the sriov NIC's port, e.g. vm1.eth0")
    s.add_argument("action", choices=["remove", "add", "chaos"],
                   help="chaos: remove and re-add at random times, --times over")
    s.add_argument("--times", type=int, default=5, help="(chaos) removals")
    s.add_argument("--min", dest="min_s", type=float, default=0.5,
                   help="(chaos) shortest wait in seconds")
    s.add_argument("--max", dest="max_s", type=float, default=3.0,
                   help="(chaos) longest wait in seconds")
    s.add_argument("--seed", type=int, default=None, help="(chaos) random seed")
    s.set_defaults(func=cmd_vf)

    s = sub.add_parser("vm", help="add or remove a VM at run time")
    topo_opt(s)
    s.add_argument("action", choices=["add", "rm"])
    s.add_argument("vm")
    s.add_argument("-f", "--file", help="YAML file with the VM's mapping (nics: [...])")
    s.add_argument("--spec", help="the VM's mapping as YAML text")
    s.set_defaults(func=cmd_vm)

    s = sub.add_parser("clean", help="remove what crashed runs left behind")
    s.add_argument("name", nargs="?")
    s.add_argument("--force", action="store_true", help="also kill a live daemon")
    s.set_defaults(func=cmd_clean)

    s = sub.add_parser("demo", help="the demo topology in namespaces: ping, iperf3, a report")
    s.add_argument("--topology", default=None, help="topology file (default: the demo's)")
    s.add_argument("--seconds", type=float, default=3.0, help="iperf3 time per test")
    s.add_argument("--json", action="store_true")
    s.add_argument("--in-memory", action="store_true",
                   help="the switch alone in memory, no namespaces (no root needed)")
    s.add_argument("--pcap", help="(--in-memory) where the capture extension writes")
    s.set_defaults(func=cmd_demo)

    s = sub.add_parser("bench", help="benchmarks")
    s.add_argument("what", choices=["fastpath", "switch", "ring", "vmq", "feed", "e2e"],
                   help="fastpath: in-memory pipeline; switch: two namespaces through the "
                   "switch beside a veth pair and a Linux bridge; ring: NetVSC to NetVSP "
                   "through the VMBus ring across two processes; vmq: uplink to two VMs, "
                   "one receive queue against two; feed: VMQ's queues fed from one ring "
                   "by the compiled demultiplexer against AF_PACKET fanout; e2e: every "
                   "hvnet path beside veth, "
                   "bridge and Open vSwitch (TCP, packet rate, RFC 2544 zero loss, "
                   "latency), written as Markdown, JSON and PNG")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.add_argument("--seconds", type=float, help="measuring time (default 5; e2e: per TCP "
                   "test, 5, or 1 with --quick)")
    s.add_argument("--batch", type=int, default=256, help="(fastpath) batch size")
    s.add_argument("--no-peer", action="store_true",
                   help="(fastpath) skip the plain-Python peer measured beside it")
    s.add_argument("--repeats", type=int, help="(switch, vmq, feed, e2e) rounds (default 1; "
                   "feed: 3; e2e: 3, or 1 with --quick)")
    s.add_argument("--paths", help="(switch) comma-separated: veth, bridge, tap-tap, "
                   "synthetic, e1000-synthetic, synthetic-e1000, internal-uplink, "
                   "internal-uplink-v3, vmq, sriov (default: veth, bridge, tap-tap, "
                   "synthetic, internal-uplink); (e2e) the hvnet paths: internal-uplink, "
                   "synthetic, e1000-synthetic, vmq, sriov, tap-tap (default: all but "
                   "tap-tap)")
    s.add_argument("--peers", help="(e2e) comma-separated: veth, bridge, ovs-afpacket, "
                   "ovs-afxdp (default: all; an empty list for none)")
    s.add_argument("--quick", action="store_true",
                   help="(e2e) one round of short trials, latency at 64 bytes only; "
                   "(feed) 100000 frames a round")
    s.add_argument("--out", default="e2e-results",
                   help="(e2e) folder for e2e.md, e2e.json and the plots "
                   "(default ./e2e-results)")
    s.set_defaults(func=cmd_bench)
    return p


def _check(a) -> None:
    if a.cmd == "bench":
        if a.what not in ("e2e", "feed"):
            a.seconds = 5.0 if a.seconds is None else a.seconds
            a.repeats = 1 if a.repeats is None else a.repeats
        if a.seconds is not None and a.seconds <= 0:
            raise CliError("--seconds must be positive", 2)
        if not 1 <= a.batch <= 4096:
            raise CliError(f"--batch {a.batch} out of range 1..4096", 2)
        if a.repeats is not None and not 1 <= a.repeats <= 20:
            raise CliError(f"--repeats {a.repeats} out of range 1..20", 2)
    if a.cmd == "capture" and (a.count < 0 or a.seconds < 0):
        raise CliError("--count and --seconds cannot be negative", 2)


def main(argv=None) -> int:
    # Before numpy is imported: no OpenBLAS thread pool, so 'up --fg' can unshare a
    # user namespace (hvnet.rootless); hvnet does no linear algebra.
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")
    a = build_parser().parse_args(argv)
    from .topology import TopologyError
    try:
        _check(a)
        return a.func(a)
    except CliError as e:
        print(f"hvnet {a.cmd}: {e}", file=sys.stderr)
        return e.code
    except TopologyError as e:
        print(f"hvnet {a.cmd}: {e}", file=sys.stderr)
        return 2
    except PermissionError as e:
        print(f"hvnet {a.cmd}: {e} (hvnet needs root, or a user namespace)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())

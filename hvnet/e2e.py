"""End-to-end benchmarks between two namespaces: the measurements and the peers.

This is the measuring side of the comparison in /work/shared/reference/baseline.md:

- the peers are that file's "Topologies" ``veth`` (a veth pair straight between
  ns-a and ns-b, fixed endpoint MACs) and ``bridge`` (a Linux bridge ``br0`` in
  namespace ``sw``, veth pairs va<->sa and vb<->sb), with the default offloads;
- the tests are those of its "Tests" section: ``ping`` after 3 warm-up pings,
  ``tcp1``/``tcp4`` (the receiver's bit rate from ``iperf3 -J``) and ``udp64``
  (``iperf3 -u -b 0 -l 64``; received pps = (packets - lost) / seconds, taken
  from the server side);
- ``compare`` runs them in interleaved rounds and reports each cell as
  "median (min-max) xRATIO", as in its "Shared machine" and "Results" sections.

Differences from that setup: IPv6 stays on in the namespaces, nothing waits for
the machine to be idle (the figures are only as quiet as the machine), and the
ratio is the path's median over the veth path's median (baseline.md takes the
median of per-round ratios; with one repeat the two are the same).

Every measurement starts only its own processes, inside the namespaces it is
given, and ends them by pid; every peer deletes only the namespaces it recorded.
"""
from __future__ import annotations

import contextlib
import datetime
import itertools
import json
import os
import random
import re
import statistics
import subprocess
import tempfile
import time
from dataclasses import dataclass
from typing import Callable, ContextManager, Iterator

from . import nsexec
from .netns import Netns

# Server ports: a per-process walk from a random start, so that two processes
# (or two calls) rarely pick the same port; a clash is retried anyway.
PORT_LO, PORT_HI = 5201, 5999
_PORT_TRIES = 20
_port_seq = itertools.count(random.SystemRandom().randrange(PORT_HI - PORT_LO + 1))

SERVER_START_S = 5.0   # how long an iperf3 server may take to listen
SLACK_S = 20.0         # beyond the test's own duration, before a run counts as hung

A_IP, B_IP = "10.9.0.1", "10.9.0.2"
A_MAC, B_MAC = "02:00:0a:09:00:01", "02:00:0a:09:00:02"


# ---- measurements ----------------------------------------------------------------------------

def _next_port() -> int:
    return PORT_LO + next(_port_seq) % (PORT_HI - PORT_LO + 1)


def _listening(pid: int, port: int) -> bool:
    """Whether process ``pid``'s namespace has a TCP socket listening on ``port``.
    /proc/PID/net is the view of that process's namespace, so no netlink or ``ss``."""
    for name in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{name}") as f:
                next(f)
                for line in f:
                    fields = line.split()
                    # fields[1] is "ADDR:PORT" in hex, fields[3] the state; 0A = LISTEN.
                    if fields[3] == "0A" and int(fields[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (FileNotFoundError, ProcessLookupError):
            continue       # no IPv6 in that namespace, or the process is gone
    return False


def _iperf3_error(out: str, err: str) -> str:
    """The reason an iperf3 run failed: its JSON "error" field, else its raw output."""
    try:
        msg = json.loads(out).get("error")
    except (ValueError, AttributeError):
        msg = None
    parts = [p for p in (msg, err.strip(), None if msg else out.strip()[-500:]) if p]
    return "; ".join(parts) or "no output"


def start_iperf_server(ns: str, ip: str) -> tuple[subprocess.Popen, int]:
    """A one-off iperf3 server bound to ``ip`` in ``ns``, listening when this returns."""
    for _ in range(_PORT_TRIES):
        port = _next_port()
        p = nsexec.popen(ns, ["iperf3", "-s", "-1", "-J", "-B", ip, "-p", str(port)],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + SERVER_START_S
            while p.poll() is None and not _listening(p.pid, port):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"iperf3 server in {ns} did not listen on "
                                       f"{ip}:{port} within {SERVER_START_S:g} s")
                time.sleep(0.01)
        except BaseException:
            nsexec.stop(p)
            raise
        if p.poll() is None:
            return p, port
        out, err = p.communicate()
        msg = _iperf3_error(out, err)
        if "in use" not in msg:
            raise RuntimeError(f"iperf3 server in {ns} on {ip}:{port} failed: {msg}")
    raise RuntimeError(f"iperf3 server in {ns}: no free port in {PORT_LO}-{PORT_HI} after "
                       f"{_PORT_TRIES} tries")


def _server_json(p: subprocess.Popen, ns: str) -> dict:
    """The one-off server's report, once the client is done (it exits by itself)."""
    try:
        out, err = p.communicate(timeout=SLACK_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"iperf3 server in {ns} did not finish after its client") from None
    try:
        data = json.loads(out)
    except ValueError:
        data = None
    if not isinstance(data, dict) or "error" in data:
        raise RuntimeError(f"iperf3 server in {ns} failed: {_iperf3_error(out, err)}")
    return data


def run_iperf_client(ns: str, argv: list[str], seconds: float) -> dict:
    try:
        cp = nsexec.run(ns, argv, timeout=seconds + SLACK_S)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)} in {ns} hung (killed after "
                           f"{seconds + SLACK_S:g} s)") from None
    try:
        data = json.loads(cp.stdout)
    except ValueError:
        data = None
    # iperf3 3.12 can exit 0 with an "error" in its JSON, so both are checked.
    if cp.returncode != 0 or not isinstance(data, dict) or "error" in data:
        raise RuntimeError(f"{' '.join(argv)} in {ns} failed (exit {cp.returncode}): "
                           f"{_iperf3_error(cp.stdout, cp.stderr)}")
    return data


def tcp(client_ns: str, server_ns: str, server_ip: str, streams: int = 1,
        seconds: float = 5) -> dict:
    """TCP bulk transfer client -> server: the receiver's bit rate and the sender's
    retransmits."""
    p, port = start_iperf_server(server_ns, server_ip)
    try:
        data = run_iperf_client(client_ns, ["iperf3", "-c", server_ip, "-p", str(port), "-J",
                                   "--connect-timeout", "3000", "-t", f"{seconds:g}",
                                   "-P", str(streams)], seconds)
        try:
            end = data["end"]
            return {"gbit_s": end["sum_received"]["bits_per_second"] / 1e9,
                    "retransmits": int(end["sum_sent"].get("retransmits", 0))}
        except (KeyError, TypeError) as e:
            raise RuntimeError(f"iperf3 TCP report without {e}: {json.dumps(data)[-500:]}")
    finally:
        nsexec.stop(p)


def udp_pps(client_ns: str, server_ns: str, server_ip: str, seconds: float = 5,
            size: int = 64) -> dict:
    """UDP datagrams of ``size`` payload bytes as fast as the client can send them:
    packets per second received, as the server counts them, and the loss."""
    p, port = start_iperf_server(server_ns, server_ip)
    try:
        run_iperf_client(client_ns, ["iperf3", "-c", server_ip, "-p", str(port), "-J",
                            "--connect-timeout", "3000", "-t", f"{seconds:g}",
                            "-u", "-b", "0", "-l", str(size)], seconds)
        data = _server_json(p, server_ns)
        try:
            end = data["end"]
            s = end.get("sum_received") or end["sum"]
            received = s["packets"] - s["lost_packets"]
            return {"pps": received / s["seconds"], "loss_pct": float(s["lost_percent"])}
        except (KeyError, TypeError, ZeroDivisionError) as e:
            raise RuntimeError(f"iperf3 UDP server report without {e}: "
                               f"{json.dumps(data)[-500:]}")
    finally:
        nsexec.stop(p)


_RTT = re.compile(r"= ([\d.]+)/([\d.]+)/([\d.]+)/([\d.]+) ms")


def _ping(ns: str, ip: str, count: int, interval: float) -> float:
    argv = ["ping", "-q", "-n", "-c", str(count), "-i", f"{interval:g}", "-W", "2", ip]
    timeout = count * interval + 2 + SLACK_S
    try:
        cp = nsexec.run(ns, argv, timeout=timeout)
    except subprocess.TimeoutExpired:
        raise RuntimeError(f"{' '.join(argv)} in {ns} hung") from None
    m = _RTT.search(cp.stdout)
    if cp.returncode != 0 or not m:
        raise RuntimeError(f"{' '.join(argv)} in {ns} failed (exit {cp.returncode}): "
                           f"{(cp.stdout + cp.stderr).strip()[-500:]}")
    return float(m.group(2))


def ping(client_ns: str, ip: str, count: int = 50, interval: float = 0.01) -> dict:
    """Average round-trip time to ``ip``, after 3 warm-up pings (ARP, route caches)."""
    _ping(client_ns, ip, 3, interval)
    return {"rtt_avg_us": _ping(client_ns, ip, count, interval) * 1000}


# ---- peers -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Path:
    """Where to measure: traffic goes from ``client_ns`` to ``server_ip`` in ``server_ns``."""
    name: str
    client_ns: str
    server_ns: str
    server_ip: str
    client_ip: str = A_IP


def default_prefix() -> str:
    return f"e{os.getpid() % 10000}"


@contextlib.contextmanager
def recorded(prefix: str) -> Iterator[Netns]:
    """A Netns whose record lives in a temp dir, torn down however the block ends."""
    with tempfile.TemporaryDirectory(prefix="hvnet-e2e-") as tmp:
        nn = Netns(prefix, os.path.join(tmp, "record.json"))
        try:
            yield nn
        finally:
            nn.teardown()


def endpoints(nn: Netns, a: str, b: str) -> None:
    """ns-a's va and ns-b's vb as in baseline.md: fixed MACs, 10.9.0.1-2/24."""
    for ns, ifname, mac, ip in ((a, "va", A_MAC, A_IP), (b, "vb", B_MAC, B_IP)):
        nn.set_mac(ns, ifname, mac)
        nn.add_address(ns, ifname, f"{ip}/24")
        nn.set_up(ns, ifname)


def wait_reachable(ns: str, ip: str, tries: int = 10) -> None:
    """Do not hand out a path before it carries a ping (bridge ports, ARP)."""
    last = ""
    for _ in range(tries):
        cp = nsexec.run(ns, ["ping", "-q", "-n", "-c", "1", "-W", "1", ip], timeout=5)
        if cp.returncode == 0:
            return
        last = (cp.stdout + cp.stderr).strip()[-300:]
    raise RuntimeError(f"{ip} not reachable from {ns} after {tries} pings: {last}")


@contextlib.contextmanager
def veth_peer(prefix: str | None = None) -> Iterator[Path]:
    """A veth pair straight between ``PREFIX-a`` (va) and ``PREFIX-b`` (vb)."""
    with recorded(prefix or default_prefix()) as nn:
        a, b = nn.add_namespace("a"), nn.add_namespace("b")
        nn.add_veth((a, "va"), (b, "vb"))
        endpoints(nn, a, b)
        wait_reachable(a, B_IP)
        yield Path("veth", a, b, B_IP)


@contextlib.contextmanager
def bridge_peer(prefix: str | None = None) -> Iterator[Path]:
    """``PREFIX-a`` and ``PREFIX-b`` joined through Linux bridge br0 in ``PREFIX-sw``."""
    with recorded(prefix or default_prefix()) as nn:
        a, b, sw = nn.add_namespace("a"), nn.add_namespace("b"), nn.add_namespace("sw")
        nn.add_bridge(sw, "br0")
        nn.add_veth((a, "va"), (sw, "sa"))
        nn.add_veth((b, "vb"), (sw, "sb"))
        for port in ("sa", "sb"):
            nn.set_master(sw, port, "br0")
            nn.set_up(sw, port)
        nn.set_up(sw, "br0")
        endpoints(nn, a, b)
        wait_reachable(a, B_IP)
        yield Path("bridge", a, b, B_IP)


# ---- comparison ------------------------------------------------------------------------------

@dataclass(frozen=True)
class _Test:
    metric: str          # the key of the measurement's dict that the table shows
    unit: str
    run: Callable[[Path, float, "Session"], dict]


class Session:
    """What the tests of one built path share: the packet generator's two processes
    (started at the first test that needs them, ended before the path goes) and the
    zero-loss rates found so far, which the latency tests load the path at."""

    def __init__(self, path: Path, trial_s: float = 2.0, steps: int = 6):
        self.path, self.trial_s, self.steps = path, trial_s, steps
        self.zero_loss: dict[int, float] = {}
        self._pair = None

    def pair(self):
        from . import pktgen
        if self._pair is None:
            p = pktgen.Pair(self.path.client_ns, self.path.server_ns,
                            self.path.client_ip, self.path.server_ip)
            self._pair = p.__enter__()
        return self._pair

    def close(self) -> None:
        if self._pair is not None:
            self._pair.__exit__(None, None, None)
            self._pair = None


def _pps(size: int) -> Callable[[Path, float, Session], dict]:
    def run(path: Path, seconds: float, sess: Session) -> dict:
        t = sess.pair().trial(size, 0, seconds)
        return {"pps": t["rx_fps"], "offered_pps": t["offered_fps"],
                "loss_pct": t["loss_pct"], "p50_us": t.get("p50_us")}
    return run


def _zero_loss(size: int) -> Callable[[Path, float, Session], dict]:
    def run(path: Path, seconds: float, sess: Session) -> dict:
        from . import pktgen
        z = pktgen.zero_loss(sess.pair(), size, sess.trial_s, sess.steps)
        sess.zero_loss[size] = z["fps"]
        return {"pps": z["fps"], "gbit_s": z["gbit_s"], "bound": z["bound"],
                "top_offered_pps": z["top_offered_fps"], "top_rx_pps": z["top_rx_fps"],
                "trials": [{k: t[k] for k in ("rate", "offered_fps", "sent", "received",
                                              "lost")} for t in z["trials"]]}
    return run


def _latency(size: int, pct: int) -> Callable[[Path, float, Session], dict]:
    def run(path: Path, seconds: float, sess: Session) -> dict:
        fps = sess.zero_loss.get(size)
        if not fps:
            raise RuntimeError(f"no zero-loss rate at {size} bytes in this round "
                               f"(zl{size} failed, found 0 or did not run first)")
        t = sess.pair().trial(size, fps * pct / 100, sess.trial_s)
        if not t.get("samples"):
            raise RuntimeError(f"no frame arrived at {pct}% of {fps:.0f} frames/s")
        return {k: t[k] for k in ("p50_us", "p99_us", "p999_us", "max_us", "mean_us",
                                  "loss_pct", "offered_fps")}
    return run


def _test(name: str) -> _Test:
    """``tcpN`` (N streams), ``udpN`` (iperf3, N-byte datagrams), ``ping``, and with
    the packet generator (hvnet/pktgen.py): ``ppsN`` (N-byte frames as fast as one
    sender goes, received per second), ``zlN`` (RFC 2544 zero-loss rate at N-byte
    frames) and ``latN@P`` (one-way latency percentiles at P% of that rate; runs
    after ``zlN`` in the same round)."""
    # Module globals are looked up at call time, so tests can stand in for them.
    if m := re.fullmatch(r"tcp(\d+)", name):
        n = int(m.group(1))
        return _Test("gbit_s", "Gbit/s", lambda p, s, x: tcp(p.client_ns, p.server_ns,
                                                              p.server_ip, streams=n,
                                                              seconds=s))
    if m := re.fullmatch(r"udp(\d+)", name):
        n = int(m.group(1))
        return _Test("pps", "pps", lambda p, s, x: udp_pps(p.client_ns, p.server_ns,
                                                           p.server_ip, seconds=s, size=n))
    if name == "ping":
        return _Test("rtt_avg_us", "us", lambda p, s, x: ping(p.client_ns, p.server_ip))
    from .pktgen import MAX_SIZE, MIN_SIZE
    if (m := re.fullmatch(r"(pps|zl)(\d+)", name)) and MIN_SIZE <= int(m[2]) <= MAX_SIZE:
        return _Test("pps", "pps", (_pps if m[1] == "pps" else _zero_loss)(int(m[2])))
    if ((m := re.fullmatch(r"lat(\d+)@(\d+)", name)) and MIN_SIZE <= int(m[1]) <= MAX_SIZE
            and 0 < int(m[2]) <= 100):
        return _Test("p99_us", "us", _latency(int(m[1]), int(m[2])))
    raise ValueError(f"unknown test {name!r}: tcpN, udpN, ping, ppsN, zlN or latN@P "
                     f"(N-byte frames, {MIN_SIZE}..{MAX_SIZE}; P% of zlN's rate)")


def cpu_times() -> list[tuple[int, int]]:
    """(total, idle) jiffies of each CPU, from /proc/stat."""
    out = []
    with open("/proc/stat") as f:
        for line in f:
            if line.startswith("cpu") and line[3].isdigit():
                v = [int(x) for x in line.split()[1:9]]
                out.append((sum(v), v[3] + v[4]))
    return out


def busy_pct(before: list[tuple[int, int]], after: list[tuple[int, int]]) -> list[float]:
    return [round(100 * (1 - (i1 - i0) / (t1 - t0)), 1) if t1 > t0 else 0.0
            for (t0, i0), (t1, i1) in zip(before, after)]


def machine() -> dict:
    """What the figures were measured on."""
    cpu = "unknown"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() in ("model name", "Hardware", "cpu model"):
                    cpu = value.strip()
                    break
    except OSError:
        pass
    try:
        iperf = nsexec.run(None, ["iperf3", "--version"], timeout=10).stdout.split("\n")[0]
    except (OSError, subprocess.TimeoutExpired):
        iperf = "unknown"
    return {"cpu_model": cpu, "nproc": len(os.sched_getaffinity(0)),
            "kernel": os.uname().release,
            "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "loadavg_at_start": list(os.getloadavg()), "iperf3": iperf.strip()}


def _one(r, repeats, path, t, spec, seconds, sess, runs, errors, say) -> None:
    try:
        cpu0 = cpu_times()
        res = spec.run(path, seconds, sess)
        # Busy share of each CPU, whoever used it: on a shared
        # machine this is how to tell a slow path from a busy one.
        res["cpu_busy_pct"] = busy_pct(cpu0, cpu_times())
    except (RuntimeError, OSError) as e:
        errors.append(f"round {r + 1} {t}: {e}")
        say(f"round {r + 1}/{repeats}: {path.name} {t}: FAILED: {e}")
        return
    runs[t].append({"round": r + 1, **res})
    say(f"round {r + 1}/{repeats}: {path.name} {t}: {res[spec.metric]:.4g} {spec.unit}")


def compare(paths: list[Callable[[str], ContextManager[Path]]],
            tests: tuple[str, ...] = ("tcp1", "tcp4", "udp64"), seconds: float = 5,
            repeats: int = 1, progress: Callable[[str], None] | None = None,
            prefix: str | None = None, trial_s: float = 2.0, steps: int = 6,
            step: Callable[[], None] | None = None) -> dict:
    """Run every test on every path, ``repeats`` rounds, each round building every path
    in turn (called as ``factory(prefix)``) and tearing it down again. ``trial_s`` and
    ``steps`` are the packet generator's trial length and binary-search steps;
    ``step`` is called after each test (a progress bar's advance).

    A failed build or test is recorded (``errors``) and the comparison goes on, so
    one broken path does not lose the others' figures."""
    specs = {t: _test(t) for t in tests}     # unknown names fail before anything is built
    prefix = prefix or default_prefix()
    say = progress or (lambda s: None)
    info = machine()
    names: list[str | None] = [None] * len(paths)
    runs: list[dict[str, list[dict]]] = [{t: [] for t in tests} for _ in paths]
    errors: list[list[str]] = [[] for _ in paths]

    for r in range(repeats):
        for i, factory in enumerate(paths):
            label = names[i] or getattr(factory, "__name__", f"path{i}")
            say(f"round {r + 1}/{repeats}: building {label}")
            try:
                with factory(prefix) as path:
                    names[i] = names[i] or path.name
                    sess = Session(path, trial_s=trial_s, steps=steps)
                    try:
                        for t, spec in specs.items():
                            _one(r, repeats, path, t, spec, seconds, sess, runs[i], errors[i],
                                 say)
                            if step:
                                step()
                    finally:
                        sess.close()
            except (RuntimeError, OSError) as e:
                errors[i].append(f"round {r + 1} build/teardown: {e}")
                say(f"round {r + 1}/{repeats}: {label}: FAILED: {e}")

    # Two factories naming their path alike must not overwrite each other.
    keys, seen = [], {}
    for i, factory in enumerate(paths):
        base = names[i] or getattr(factory, "__name__", f"path{i}")
        seen[base] = seen.get(base, 0) + 1
        keys.append(base if seen[base] == 1 else f"{base}#{seen[base]}")

    results: dict[str, dict] = {}
    for i, key in enumerate(keys):
        results[key] = {}
        for t, spec in specs.items():
            values = [run[spec.metric] for run in runs[i][t]]
            cell = {"metric": spec.metric, "unit": spec.unit, "values": values,
                    "runs": runs[i][t], "median": None, "min": None, "max": None,
                    "ratio": None}
            if values:
                cell.update(median=statistics.median(values), min=min(values), max=max(values))
            # The median of every other figure the runs report (latency percentiles...).
            numeric = {k for run in runs[i][t] for k, v in run.items()
                       if isinstance(v, (int, float)) and not isinstance(v, bool)
                       and k != "round"}
            cell["medians"] = {k: statistics.median(vs) for k in sorted(numeric)
                               if (vs := [run[k] for run in runs[i][t]
                                          if isinstance(run.get(k), (int, float))])}
            results[key][t] = cell
        results[key]["errors"] = errors[i]

    ref = next((i for i, n in enumerate(names) if n == "veth"), None)
    if ref is not None:
        for key in keys:
            for t in tests:
                base, cell = results[keys[ref]][t]["median"], results[key][t]
                if base and cell["median"] is not None:
                    cell["ratio"] = cell["median"] / base

    return {"machine": info,
            "settings": {"tests": list(tests), "seconds": seconds, "repeats": repeats,
                         "prefix": prefix, "trial_s": trial_s, "steps": steps,
                         "ratio": "median / median of the veth path" if ref is not None
                         else None},
            "paths": keys, "results": results}


# ---- presentation ----------------------------------------------------------------------------

def _fmt(value: float, unit: str) -> str:
    if unit == "pps":
        return f"{value / 1e3:.0f}"
    if unit == "Gbit/s":
        return f"{value:.2f}"
    return f"{value:.0f}"


def _header(test: str, unit: str) -> str:
    return f"{test}\n{'kpps' if unit == 'pps' else unit}"


def table(result: dict):
    """Paths as rows, tests as columns, each cell "median (min-max) xRATIO"."""
    from rich.table import Table

    m, s = result["machine"], result["settings"]
    t = Table(title=f"End to end, {s['seconds']:g} s per test, {s['repeats']} round(s)",
              caption=(f"{m['cpu_model']}, {m['nproc']} CPUs, kernel {m['kernel']}, "
                       f"{m['date']}. Shared machine: figures are noisy. Ratio = median / "
                       f"veth median; for ping, higher is worse."))
    t.add_column("path")
    first = result["results"][result["paths"][0]] if result["paths"] else {}
    for test in s["tests"]:
        unit = first.get(test, {}).get("unit", "")
        t.add_column(_header(test, unit), justify="right")
    for key in result["paths"]:
        row = [key]
        for test in s["tests"]:
            c = result["results"][key][test]
            if c["median"] is None:
                row.append("failed")
                continue
            cell = (f"{_fmt(c['median'], c['unit'])} "
                    f"({_fmt(c['min'], c['unit'])}-{_fmt(c['max'], c['unit'])})")
            if c["ratio"] is not None:
                cell += f" ×{c['ratio']:.2f}"
            row.append(cell)
        t.add_row(*row)
    return t

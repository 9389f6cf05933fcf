"""End-to-end measurements on the veth and bridge peers, in namespaces the tests create
and remove; and compare/table on stand-in measurements (no root needed)."""
from __future__ import annotations

import contextlib
import json
import os

import pytest
from pyroute2 import netns
from rich.console import Console

from hvnet import e2e

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"e{os.getpid() % 10000}"


def leftovers() -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(PREFIX + "-")]


@root_only
@pytest.mark.netns
@pytest.mark.parametrize("peer", [e2e.veth_peer, e2e.bridge_peer])
def test_peer_carries_ping_tcp_and_udp_then_is_gone(peer):
    assert not leftovers()
    with peer(PREFIX) as p:
        assert p.client_ns.startswith(PREFIX + "-") and p.server_ip == "10.9.0.2"
        assert 0 < e2e.ping(p.client_ns, p.server_ip, count=10)["rtt_avg_us"] < 100_000
        r = e2e.tcp(p.client_ns, p.server_ns, p.server_ip, seconds=1)
        assert r["gbit_s"] > 0.1 and isinstance(r["retransmits"], int)
        u = e2e.udp_pps(p.client_ns, p.server_ns, p.server_ip, seconds=1)
        assert u["pps"] > 1000 and 0 <= u["loss_pct"] <= 100
        # A server that cannot bind says why instead of hanging the client.
        with pytest.raises(RuntimeError, match="Cannot assign requested address"):
            e2e.tcp(p.client_ns, p.server_ns, "10.9.0.99", seconds=1)
    assert not leftovers()


@root_only
@pytest.mark.netns
def test_namespaces_are_removed_when_the_block_fails():
    with pytest.raises(ZeroDivisionError):
        with e2e.bridge_peer(PREFIX):
            assert len(leftovers()) == 3
            1 / 0
    assert not leftovers()


def test_compare_interleaves_rounds_and_takes_medians_and_ratios(monkeypatch):
    order = []
    fake = {"veth": {"tcp1": [10.0, 20.0, 30.0], "udp64": [100e3, 300e3, 200e3]},
            "bridge": {"tcp1": [9.0, 18.0, 27.0], "udp64": [50e3, 150e3, 100e3]}}
    rounds = {"veth": -1, "bridge": -1}

    def factory(name):
        @contextlib.contextmanager
        def cm(prefix):
            order.append(name)
            rounds[name] += 1
            yield e2e.Path(name, f"{prefix}-a", f"{prefix}-b", name)   # server_ip: its name
        cm.__name__ = f"{name}_peer"
        return cm

    def fake_tcp(client_ns, server_ns, ip, streams=1, seconds=5):
        return {"gbit_s": fake[ip]["tcp1"][rounds[ip]], "retransmits": 0}

    def fake_udp(client_ns, server_ns, ip, seconds=5, size=64):
        if ip == "bridge" and rounds[ip] == 2:
            raise RuntimeError("iperf3 said no")
        return {"pps": fake[ip]["udp64"][rounds[ip]], "loss_pct": 1.0}

    monkeypatch.setattr(e2e, "tcp", fake_tcp)
    monkeypatch.setattr(e2e, "udp_pps", fake_udp)
    monkeypatch.setattr(e2e, "machine", lambda: {"cpu_model": "test", "nproc": 2,
                                                 "kernel": "k", "date": "d"})
    lines = []
    res = e2e.compare([factory("veth"), factory("bridge")], tests=("tcp1", "udp64"),
                      repeats=3, progress=lines.append, prefix="zz")
    json.dumps(res)
    assert order == ["veth", "bridge"] * 3
    assert res["paths"] == ["veth", "bridge"]
    v, b = res["results"]["veth"], res["results"]["bridge"]
    assert (v["tcp1"]["median"], v["tcp1"]["min"], v["tcp1"]["max"]) == (20.0, 10.0, 30.0)
    assert b["tcp1"]["ratio"] == pytest.approx(0.9) and v["tcp1"]["ratio"] == 1.0
    # The failed third bridge round is recorded, and the others still count.
    assert b["udp64"]["values"] == [50e3, 150e3] and b["udp64"]["median"] == 100e3
    assert b["udp64"]["ratio"] == pytest.approx(0.5)
    assert any("iperf3 said no" in e for e in b["errors"]) and not v["errors"]
    assert any("FAILED" in line for line in lines)

    console = Console(width=200, record=True)
    console.print(e2e.table(res))
    text = console.export_text()
    assert "20.00 (10.00-30.00) ×1.00" in text and "100 (50-150) ×0.50" in text


def test_unknown_test_name_fails_before_building_anything():
    def never(prefix):
        raise AssertionError("built")
    with pytest.raises(ValueError, match="unknown test"):
        e2e.compare([never], tests=("tcp1", "bogus"))


class _StandInPair:
    """What a path looks like to the packet-generator tests: no loss up to ``limit``."""

    def __init__(self, limit):
        self.limit = limit

    def trial(self, size, rate, seconds):
        offered = 200_000.0 if rate == 0 else rate
        lost = 0 if offered <= self.limit else 10
        return {"offered_fps": offered, "rx_fps": offered - lost, "lost": lost,
                "loss_pct": 0.0, "sent": 1, "received": 1, "rate": rate, "samples": 5,
                "p50_us": 1e6 / self.limit, "p99_us": 2e6 / self.limit,
                "p999_us": 3e6 / self.limit, "max_us": 4e6 / self.limit,
                "mean_us": 1e6 / self.limit}


def test_generator_tests_report_zero_loss_and_latency_as_markdown_and_plots(
        monkeypatch, tmp_path):
    from hvnet import e2e_report

    limits = {"veth": 150_000.0, "bridge": 50_000.0}
    monkeypatch.setattr(e2e.Session, "pair", lambda self: _StandInPair(limits[self.path.name]))
    monkeypatch.setattr(e2e, "tcp", lambda *a, **k: {"gbit_s": 5.0, "retransmits": 0})
    monkeypatch.setattr(e2e, "machine", lambda: {"cpu_model": "test", "nproc": 2,
                                                 "kernel": "k", "date": "2026-12-02T00:00"})

    def factory(name):
        @contextlib.contextmanager
        def cm(prefix):
            yield e2e.Path(name, "a", "b", "10.9.0.2")
        return cm
    # Latency before its zero-loss search in the same round cannot run: said so.
    res = e2e.compare([factory("veth"), factory("bridge")],
                      tests=("tcp1", "pps64", "lat64@50", "zl64", "lat64@10", "lat64@90"),
                      repeats=2, trial_s=0.1, steps=10)
    v, b = res["results"]["veth"], res["results"]["bridge"]
    assert v["zl64"]["median"] <= 150_000 and v["zl64"]["median"] > 150_000 * 0.99
    assert b["zl64"]["ratio"] == pytest.approx(1 / 3, rel=0.02)
    assert b["lat64@10"]["medians"]["p99_us"] == pytest.approx(40.0)
    assert any("no zero-loss rate at 64 bytes" in e for e in v["errors"])

    files = e2e_report.write(res, str(tmp_path / "out"))
    md = open(files["markdown"]).read()
    assert "| veth | 5.00 (5.00-5.00) ×1.00 |" in md
    assert "| bridge | 20.0 / 40.0 / 60.0 |" in md.replace(" | failed", "")
    assert "## Failures" in md and "![latency.png](latency.png)" in md
    assert json.load(open(files["json"]))["paths"] == ["veth", "bridge"]
    assert sorted(os.path.basename(p) for p in files["plots"]) == [
        "latency.png", "throughput.png", "zero_loss.png"]
    for p in files["plots"]:
        assert open(p, "rb").read(8) == b"\x89PNG\r\n\x1a\n"


@pytest.mark.parametrize("args,msg", [(["--peers", "veth,nope"], "unknown peer nope"),
                                      (["--paths", "sriov9"], "unknown path sriov9"),
                                      (["--peers", "", "--paths", ""], "nothing to measure")])
def test_bench_e2e_refuses_what_it_cannot_measure(args, msg, tmp_path):
    import subprocess
    import sys
    if os.geteuid() != 0:
        pytest.skip("bench e2e checks root first")
    r = subprocess.run([sys.executable, "-m", "hvnet.cli", "bench", "e2e", "--quick",
                        "--out", str(tmp_path), *args], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 2 and msg in r.stderr


@root_only
@pytest.mark.netns
def test_bench_e2e_quick_on_the_veth_peer_writes_table_json_and_plots(tmp_path):
    import subprocess
    import sys
    out = tmp_path / "res"
    before = set(netns.listnetns())
    r = subprocess.run([sys.executable, "-m", "hvnet.cli", "bench", "e2e", "--quick",
                        "--peers", "veth", "--paths", "", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    res = json.load(open(out / "e2e.json"))
    assert res["paths"] == ["veth"] and res["settings"]["quick"]
    v = res["results"]["veth"]
    assert v["tcp1"]["median"] > 0.1 and v["pps64"]["median"] > 1000
    assert v["zl64"]["median"] > 1000 and v["zl1518"]["median"] > 1000
    for load in (10, 50, 90):
        assert 0 < v[f"lat64@{load}"]["medians"]["p50_us"] < 100_000
    assert "| veth |" in open(out / "e2e.md").read()
    assert {p.name for p in out.glob("*.png")} == {"throughput.png", "zero_loss.png",
                                                   "latency.png"}
    assert set(netns.listnetns()) == before

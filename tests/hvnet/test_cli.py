"""The hvnet command line, run as a user runs it."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
from pyroute2 import netns
from scapy.all import rdpcap


def hvnet(*args, timeout=300):
    return subprocess.run([sys.executable, "-m", "hvnet.cli", *args], capture_output=True,
                          text=True, timeout=timeout,
                          env={**os.environ, "COLUMNS": "200"})


def test_demo_runs_and_reports(tmp_path):
    pcap = tmp_path / "demo.pcap"
    r = hvnet("demo", "--in-memory", "--pcap", str(pcap))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert "5-tuple ACL deny" in out and "MAC spoofing" in out and "DHCP guard" in out
    assert "contract violations 0" in out
    assert len(rdpcap(str(pcap))) == 12


def test_bench_fastpath_json():
    r = hvnet("bench", "fastpath", "--json", "--seconds", "0.3")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mpps_per_core"] > 0 and d["packets"] > 0
    assert d["delivered"] == d["packets"] and d["dropped"] == 0
    assert d["python_mpps_per_core"] > 0 and d["ratio_vs_python"] > 0


def test_bad_arguments_say_what_is_wrong():
    r = hvnet("bench", "nosuch")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    r = hvnet("bench", "fastpath", "--seconds", "-1")
    assert r.returncode == 2 and "--seconds must be positive" in r.stderr
    r = hvnet("bench", "fastpath", "--batch", "0")
    assert r.returncode == 2 and "--batch 0 out of range" in r.stderr


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_demo_in_namespaces(tmp_path):
    """The demo topology up for real: every check as the demo expects, then down."""
    env = {**os.environ, "HVNET_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([sys.executable, "-m", "hvnet.cli", "demo", "--json", "--seconds", "1"],
                       capture_output=True, text=True, timeout=300, env=env)
    try:
        assert r.returncode == 0, r.stdout[-2000:] + r.stderr
        d = json.loads(r.stdout)
        assert d["ok"] and len(d["results"]) == 9
        assert all(x["expected"] == x["got"] for x in d["results"])
        sw0 = d["stats"]["sw0"]["ports"]
        assert sw0["vm2.eth0"]["drops_out"]["port ACL denied (inbound to the port)"] > 0
        assert not [n for n in netns.listnetns() if n.startswith("demo-")]
    finally:
        subprocess.run([sys.executable, "-m", "hvnet.cli", "clean", "--force"], env=env,
                       capture_output=True, timeout=60)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
def test_bench_switch_measures_hvnet_beside_a_veth_pair(tmp_path):
    env = {**os.environ, "HVNET_STATE_DIR": str(tmp_path / "state")}
    r = subprocess.run([sys.executable, "-m", "hvnet.cli", "bench", "switch", "--json",
                        "--seconds", "1", "--paths", "veth,internal-uplink"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    d = json.loads(r.stdout)
    assert d["paths"] == ["veth", "hvnet internal-uplink"]
    up = d["results"]["hvnet internal-uplink"]
    assert up["tcp1"]["median"] > 0.1 and up["udp64"]["median"] > 1000
    assert up["tcp1"]["ratio"] is not None and up["errors"] == []
    r = hvnet("bench", "switch", "--paths", "veth,nosuch")
    assert r.returncode == 2 and "unknown path nosuch" in r.stderr


def test_bench_ring_json():
    r = hvnet("bench", "ring", "--json", "--seconds", "0.5")
    assert r.returncode == 0, r.stderr
    d = json.loads(r.stdout)
    assert d["mpps_64"] > 0.1 and d["gbps_lso"] > 1 and d["frames_64"] > 0

"""The emulated e1000 NIC end to end, in namespaces, through the ``hvnet`` command line.

A VM with an e1000 NIC (the 82540EM device model on the host, reached by
intercepts; the e1000 guest driver process in the VM's namespace bringing it up
as Linux's e1000 does) and a VM with a synthetic NIC on one switch (issue 5's
tests): ping both ways, TCP transfers with their data checked, iperf3, the link.
"""
from __future__ import annotations

import json
import os

import pytest

from . import nsutil
from .nsutil import hvnet

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")

NAME = f"e{os.getpid() % 10000}"
TOPO = f"""
name: {NAME}
switches: {{sw0: {{}}}}
vms:
  ve: {{nics: [{{switch: sw0, kind: e1000, mac: "02:00:00:e1:00:01",
                addresses: [10.98.0.1/24, "fd98::1/64"]}}]}}
  vs: {{nics: [{{switch: sw0, kind: synthetic, mac: "02:00:00:e1:00:02",
                addresses: [10.98.0.2/24, "fd98::2/64"]}}]}}
"""


def ns(vm):
    return f"{NAME}-{vm}"


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    yield from nsutil.running(tmp_path_factory.mktemp("emu"), NAME, TOPO)


def stats(env):
    return nsutil.port_stats(env)


def test_the_e1000_comes_up_through_intercepts(emu):
    env, run = emu
    procs = json.loads((run / "processes.json").read_text())
    assert sorted(p["what"] for p in procs) == ["NetVSC driver of vs.eth0",
                                               "e1000 driver of ve.eth0"]
    nic = stats(env)["ve.eth0"]["nic"]
    assert nic["kind"] == "e1000" and nic["link"] == "up" and nic["bus_master"]
    assert nic["exits"] > 1000 and nic["refused"] == 0 and nic["unknown_registers"] == 0
    assert stats(env)["ve.eth0"]["type"] == "emulated"
    table = hvnet(env, "stats", check=True).stdout           # the human form too
    assert "ve.eth0 NIC: e1000, link up" in table and "vs.eth0 NIC: channel ready" in table


def test_ping_ipv4_ipv6_and_tcp_both_ways(emu):
    env, _ = emu
    for src, dst in (("ve", "10.98.0.2"), ("vs", "10.98.0.1"), ("ve", "fd98::2")):
        assert nsutil.ping(ns(src), dst), f"{src} -> {dst}"
    nsutil.Tcp(ns("ve"), ns("vs"), "10.98.0.2", 5421, 24).finish()
    nsutil.Tcp(ns("vs"), ns("ve"), "10.98.0.1", 5422, 24).finish()
    st = stats(env)["ve.eth0"]
    # TSO from the e1000 guest: super-packets entered the switch
    assert st["rx_bytes"] / st["rx_packets"] > 3000, st
    assert st["nic"]["interrupts"] > 0 and st["nic"]["rx"]["frames"] > 1000


def test_iperf3_e1000_to_synthetic(emu):
    end = nsutil.iperf3(ns("ve"), ns("vs"), "10.98.0.2", 5403)
    assert end["sum_received"]["bytes"] > 0


def test_link_down_and_up_reach_the_e1000_guest(emu):
    env, _ = emu
    try:
        hvnet(env, "link", "ve.eth0", "down", check=True)
        assert nsutil.until(lambda: nsutil.carrier(ns("ve")) == 0)
        assert stats(env)["ve.eth0"]["nic"]["link"] == "down"
        assert not nsutil.ping(ns("ve"), "10.98.0.2", count=2, wait=1)
    finally:
        hvnet(env, "link", "ve.eth0", "up", check=True)
    assert nsutil.until(lambda: nsutil.carrier(ns("ve")) == 1)
    assert nsutil.ping(ns("ve"), "10.98.0.2")

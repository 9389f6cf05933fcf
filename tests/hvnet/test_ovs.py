"""Open vSwitch's userspace datapath as a benchmark peer: built from its own scratch
folder in namespaces the test creates, carrying ping and TCP, and gone afterwards:
its two daemons ended by pid, its namespaces and folder removed."""
from __future__ import annotations

import os
import subprocess

import pytest
from pyroute2 import netns

from hvnet import e2e, ovs

PREFIX = f"o{os.getpid() % 10000}"
pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for namespaces"),
              pytest.mark.skipif(not ovs.installed(), reason="Open vSwitch is not installed "
                                 "(make test's set-up installs it)")]


def leftovers() -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(PREFIX + "-")]


def _ovs_pids() -> set[int]:
    out = subprocess.run(["pgrep", "-x", "ovs-vswitchd|ovsdb-server"], capture_output=True,
                         text=True).stdout
    return {int(x) for x in out.split()}


@pytest.mark.parametrize("peer", [ovs.afpacket_peer, ovs.afxdp_peer])
def test_ovs_peer_switches_ping_and_tcp_then_is_gone(peer):
    before = _ovs_pids()
    with peer(PREFIX) as p:
        ours = _ovs_pids() - before
        assert len(ours) == 2                          # its ovsdb-server and ovs-vswitchd
        assert p.name in ("ovs-afpacket", "ovs-afxdp")
        assert 0 < e2e.ping(p.client_ns, p.server_ip, count=5)["rtt_avg_us"] < 100_000
        # Offloads off at the endpoints (the module's docstring): TCP connects.
        assert e2e.tcp(p.client_ns, p.server_ns, p.server_ip, seconds=1)["gbit_s"] > 0.01
    assert not (_ovs_pids() - before) and not leftovers()


def test_ovs_peer_fails_cleanly_when_a_port_cannot_be_added(monkeypatch):
    """A bad port type: ovs-vsctl's error is the message, and nothing is left."""
    before = _ovs_pids()
    real = ovs._Ovs.vsctl

    def vsctl(self, *args):
        if args[:1] == ("add-port",):
            args = (*args, "--", "set", "interface", args[2], "type=no-such-type")
        return real(self, *args)
    monkeypatch.setattr(ovs._Ovs, "vsctl", vsctl)
    with pytest.raises(RuntimeError, match="no-such-type|could not open|ovs-vsctl"):
        with ovs.afpacket_peer(PREFIX):
            pass
    assert not (_ovs_pids() - before) and not leftovers()

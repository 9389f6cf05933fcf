"""Namespaces and links through netlink, in real namespaces this test creates and removes."""
from __future__ import annotations

import os
import subprocess

import pytest
from pyroute2 import IPRoute, netns

from hvnet.netns import Netns, NetnsError, clean_recorded

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")


@pytest.fixture
def nn(tmp_path):
    n = Netns(f"t{os.getpid() % 10000}", tmp_path / "state.json")
    yield n
    n.teardown()
    assert not [x for x in netns.listnetns() if n.owns(x)]


def run_in(ns, *cmd, timeout=20):
    return subprocess.run(["ip", "netns", "exec", ns, *cmd], capture_output=True, text=True,
                          timeout=timeout)


def test_two_namespaces_joined_by_a_veth_ping_both_ways(nn):
    a, b = nn.add_namespace("a"), nn.add_namespace("b")
    nn.add_veth((a, "eth0"), (b, "eth0"))
    for ns, cidr in ((a, "10.77.0.1/24"), (b, "10.77.0.2/24")):
        nn.add_address(ns, "eth0", cidr)
        nn.add_address(ns, "eth0", cidr.replace("10.77.0.", "fd77::") .replace("/24", "/64"))
        nn.set_mtu(ns, "eth0", 1400)
        nn.set_up(ns, "eth0")
    assert run_in(a, "ping", "-c", "1", "-W", "2", "10.77.0.2").returncode == 0
    assert run_in(b, "ping", "-c", "1", "-W", "2", "10.77.0.1").returncode == 0
    assert run_in(a, "ping", "-6", "-c", "1", "-W", "3", "fd77::2").returncode == 0
    assert "mtu 1400" in run_in(a, "ip", "link", "show", "eth0").stdout


def test_routes_and_taps(nn):
    a = nn.add_namespace("r")
    nn.add_tap(a, "tap0")
    nn.set_up(a, "tap0")
    nn.add_address(a, "tap0", "10.78.0.1/24")
    nn.add_route(a, "10.79.0.0/16", "10.78.0.254")
    nn.add_route(a, "default", "10.78.0.254")
    assert "tap0" in nn.links(a)
    routes = run_in(a, "ip", "route").stdout
    assert "10.79.0.0/16 via 10.78.0.254" in routes and "default via 10.78.0.254" in routes


def test_crash_leftovers_are_cleaned_from_the_record_only(tmp_path):
    rec = tmp_path / "state.json"
    n = Netns(f"c{os.getpid() % 10000}", rec)
    a = n.add_namespace("x")
    n.add_veth((None, n.name("up")), (a, "eth0"))
    other = f"keep{os.getpid() % 10000}"
    netns.create(other)              # not the topology's: must survive the clean-up
    try:
        del n                        # "crash": only the record is left
        removed = clean_recorded(rec)
        assert f"netns {a}" in removed
        assert a not in netns.listnetns() and other in netns.listnetns()
        with IPRoute() as ip:                       # the root end is gone too
            assert not ip.link_lookup(ifname=f"c{os.getpid() % 10000}-up")
        assert not rec.exists()
        assert clean_recorded(rec) == []
    finally:
        netns.remove(other)


def test_names_are_checked_before_anything_is_created(nn):
    with pytest.raises(NetnsError, match="15"):
        nn.add_veth((None, nn.name("a-very-long-name")), (None, nn.name("b")))
    with pytest.raises(NetnsError, match="outside the topology"):
        nn.add_veth((None, "eth9"), (None, nn.name("b")))
    with pytest.raises(NetnsError, match="prefix"):
        Netns("this-prefix-is-too-long")
    a = nn.add_namespace("d")
    with pytest.raises(NetnsError, match="already exists"):
        nn.add_namespace("d")
    with pytest.raises(NetnsError, match="no interface"):
        nn.set_up(a, "nosuch0")
    with pytest.raises(NetnsError, match="MTU"):
        nn.set_mtu(a, "lo", 20)

"""The example extensions do what their docs say."""
from __future__ import annotations

from scapy.all import Dot1Q, Ether

from examples.acl_filter import AclFilter, five_tuple
from examples.flow_forwarder import FlowForwarder
from switch.properties import VlanProperty
from tests.conftest import Rig, mac, udp

BCAST = "ff:ff:ff:ff:ff:ff"


def test_flow_forwarder_forwards_by_table_and_drops_the_rest():
    r = Rig(4)
    fw = r.sw.install(FlowForwarder({mac(2): ["p2"], BCAST: ["p2", "p3", "p4"]}))
    assert set(r.send(1, udp(1, 2))) == {2}
    assert set(r.send(1, udp(1, BCAST))) == {2, 3, 4}
    assert set(r.send(2, udp(2, BCAST))) == {3, 4}          # never back to the source
    assert r.send(1, udp(1, 3)) == {}                        # no flow
    assert r.drops(1) == {f"{fw.name}: no flow for destination": 1}
    assert not r.sw.violations


def test_flow_forwarder_preserves_vlan_tags_and_follows_disconnects():
    r = Rig(3)
    r.sw.install(FlowForwarder({mac(2): ["p2", "p3"]}))
    out = r.send(1, udp(1, 2, vid=42, prio=2))
    assert Ether(out[2][0])[Dot1Q].vlan == 42 and Ether(out[3][0])[Dot1Q].prio == 2
    r.sw.disconnect_nic(r.ports[2])
    assert set(r.send(1, udp(1, 2))) == {2}                  # p3 gone: not a destination
    assert not r.sw.violations
    r.sw.connect_nic(r.ports[2])
    assert set(r.send(1, udp(1, 2))) == {2, 3}


def test_acl_filter_denies_matching_five_tuples_only():
    r = Rig(3)
    acl = r.sw.install(AclFilter([
        five_tuple("deny", dst="10.0.0.0/24", proto="udp", dport=53, weight=10),
        five_tuple("allow", src="10.0.0.1", dst="10.0.0.2", proto="udp", dport=53, weight=20),
    ]))
    assert set(r.send(1, udp(1, BCAST, dport=53))) == {2, 3}   # the allow weighs more
    assert r.send(1, udp(1, BCAST, dport=53, ipsrc="10.0.0.9")) == {}
    assert set(r.send(1, udp(1, BCAST, dport=54, ipsrc="10.0.0.9"))) == {2, 3}
    assert r.drops(1) == {f"{acl.name}: 5-tuple ACL deny": 1}


def test_acl_filter_sees_vlan_traffic_too():
    r = Rig(3)
    for p in r.ports[:2]:
        r.sw.add_port_property(p, VlanProperty("trunk", allowed=(5,)))
    r.sw.install(AclFilter([five_tuple("deny", proto="udp", dport=9)]))
    assert r.send(1, udp(1, BCAST, vid=5, dport=9)) == {}
    assert set(r.send(1, udp(1, BCAST, vid=5, dport=8))) == {2}

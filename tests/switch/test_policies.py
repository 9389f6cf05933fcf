"""Built-in port policies and forwarding details (vswitch_vmq_sriov.md 2.2, 2.3, 2.6, 2.7)."""
from __future__ import annotations

import pytest
from scapy.all import ICMP, IP, TCP, UDP, Dot1Q, Ether, ICMPv6ND_RA, IPv6, raw

from switch import counters as R
from switch.properties import AclProperty, AclRule, SecurityProperty, VlanProperty
from tests.conftest import Rig, mac, udp

BCAST = "ff:ff:ff:ff:ff:ff"
REASON = R.BUILTIN_REASONS


def test_learning_then_unicast_and_never_back_to_source():
    r = Rig(4)
    assert set(r.send(1, udp(1, 2))) == {2, 3, 4}      # unknown: flooded
    assert set(r.send(2, udp(2, 1))) == {1}            # learned from the first frame
    assert set(r.send(1, udp(1, 2))) == {2}
    assert r.sw.stats()["counters"]["learned_macs"] == 2
    # a frame for a MAC that lives on its own source port is dropped, not reflected
    assert r.send(1, udp(1, 1)) == {}
    assert r.drops(1) == {REASON[R.NO_DEST]: 1}


def test_mac_move_and_ageing():
    now = [10**12]
    r = Rig(3, spoof=True, clock=lambda: now[0], mac_age_s=5)
    r.send(1, udp(9, BCAST))                 # MAC 9 behind p1
    assert set(r.send(2, udp(2, 9))) == {1}
    r.send(3, udp(9, BCAST))                 # MAC 9 moves to p3
    assert r.sw.stats()["counters"]["mac_moves"] == 1
    assert set(r.send(2, udp(2, 9))) == {3}
    now[0] += 6 * 10**9                       # past the ageing time
    assert set(r.send(2, udp(2, 9))) == {1, 3}   # unknown again: flooded
    assert r.sw.stats()["counters"]["purged_macs"] >= 1


def test_multicast_source_is_dropped_and_not_learned():
    r = Rig(3, spoof=True)
    f = raw(Ether(src="01:00:5e:00:00:01", dst=BCAST) / IP() / UDP())
    assert r.send(1, f) == {}
    assert r.drops(1) == {REASON[R.BAD_SOURCE_MAC]: 1}
    assert r.sw.fdb.entries() == []


def test_access_ports_are_separated_by_vlan():
    r = Rig(4)
    for k, v in ((1, 10), (2, 10), (3, 20)):
        r.sw.add_port_property(r.ports[k - 1], VlanProperty("access", access_vlan=v))
    assert set(r.send(1, udp(1, BCAST))) == {2}        # p4 is untagged (VLAN 0)
    assert r.send(3, udp(3, BCAST)) == {}
    assert r.drops(3) == {REASON[R.NO_DEST]: 1}
    out = r.send(1, udp(1, BCAST, vid=10))             # access ports send untagged only
    assert out == {} and r.drops(1) == {REASON[R.VLAN_INGRESS]: 1}


def test_trunk_tags_allowed_untags_native_and_prune_wins():
    r = Rig(4)
    r.sw.add_port_property(r.ports[0], VlanProperty("access", access_vlan=10))
    r.sw.add_port_property(r.ports[1], VlanProperty("access", access_vlan=30))
    r.sw.add_port_property(r.ports[2], VlanProperty("trunk", native_vlan=30,
                                                    allowed=(10, 20, 40), pruned=(20,)))
    r.sw.add_port_property(r.ports[3], VlanProperty("access", access_vlan=20))
    out = r.send(1, udp(1, BCAST, payload=b"a" * 18))
    assert set(out) == {3}
    [f] = out[3]
    assert Ether(f)[Dot1Q].vlan == 10                  # tagged on the trunk
    out = r.send(2, udp(2, BCAST))
    assert set(out) == {3} and Dot1Q not in Ether(out[3][0])   # native leaves untagged
    assert r.send(4, udp(4, BCAST)) == {}              # VLAN 20 pruned on the trunk
    # from the trunk: tagged 10 reaches the access port untagged, with the bytes intact
    sent = udp(3, BCAST, vid=10, prio=5)
    out = r.send(3, sent)
    assert set(out) == {1}
    exp = Ether(sent)
    exp = Ether(src=exp.src, dst=exp.dst, type=0x0800) / exp[IP]
    assert out[1][0] == raw(exp)
    assert r.send(3, udp(3, BCAST, vid=20)) == {}      # pruned: not accepted from it either
    assert r.drops(3) == {REASON[R.VLAN_INGRESS]: 1}


def test_trunk_keeps_priority_bits():
    r = Rig(3)
    for k in (0, 1):
        r.sw.add_port_property(r.ports[k], VlanProperty("trunk", allowed=(10,)))
    out = r.send(1, udp(1, BCAST, vid=10, prio=6))
    assert Ether(out[2][0])[Dot1Q].prio == 6 and Ether(out[2][0])[Dot1Q].vlan == 10


def test_mac_spoofing_guard_and_allowance():
    r = Rig(3)
    assert r.send(1, udp(5, BCAST)) == {}
    assert r.drops(1) == {REASON[R.MAC_SPOOF]: 1}
    r.sw.add_port_property(r.ports[0], SecurityProperty(allow_mac_spoofing=True))
    assert set(r.send(1, udp(5, BCAST))) == {2, 3}


def test_dhcp_guard_and_router_guard():
    r = Rig(3)
    r.sw.add_port_property(r.ports[0], SecurityProperty(dhcp_guard=True, router_guard=True))
    offer = udp(1, BCAST, sport=67, dport=68)
    ra = raw(Ether(src=mac(1), dst="33:33:00:00:00:01") / IPv6(dst="ff02::1") / ICMPv6ND_RA())
    redirect = raw(Ether(src=mac(1), dst=mac(2)) / IP() / ICMP(type=5))
    request = udp(1, BCAST, sport=68, dport=67)
    assert r.send(1, offer) == {} and r.send(1, ra) == {} and r.send(1, redirect) == {}
    assert set(r.send(1, request)) == {2, 3}
    assert r.drops(1) == {REASON[R.DHCP_GUARD]: 1, REASON[R.ROUTER_GUARD]: 2}
    assert set(r.send(2, offer.replace(bytes.fromhex(mac(1).replace(":", "")),
                                       bytes.fromhex(mac(2).replace(":", ""))))) == {1, 3}


def test_port_acl_weight_order_first_match_both_directions():
    r = Rig(3)
    rules = (AclRule("out", "deny", 1),                            # deny everything out...
             AclRule("out", "allow", 10, "udp", remote="10.0.0.0/24", remote_port="53"),
             AclRule("in", "deny", 5, "tcp", local_port="22"))
    r.sw.add_port_property(r.ports[0], AclProperty(rules))
    assert set(r.send(1, udp(1, BCAST, dport=53))) == {2, 3}       # ...but DNS to 10.0.0/24
    assert r.send(1, udp(1, BCAST, dport=54)) == {}
    assert r.send(1, udp(1, BCAST, dport=53, ipdst="10.0.1.2")) == {}
    assert r.drops(1) == {REASON[R.ACL_OUTBOUND]: 2}
    ssh = raw(Ether(src=mac(2), dst=BCAST) / IP(src="10.0.0.2", dst="10.0.0.1") / TCP(dport=22))
    assert set(r.send(2, ssh)) == {3}                              # excluded toward p1 only
    assert r.drops_out(1) == {REASON[R.ACL_INBOUND]: 1}
    # ARP is not IP: extended ACLs do not judge it
    arp = bytes.fromhex("ffffffffffff" + mac(1).replace(":", "") + "0806") + bytes(28)
    assert set(r.send(1, arp)) == {2, 3}


def test_acl_ipv6_prefixes():
    r = Rig(3)
    r.sw.add_port_property(r.ports[0], AclProperty((AclRule("out", "deny", 1, "any",
                                                            remote="2001:db8::/32"),)))
    v6 = lambda d: raw(Ether(src=mac(1), dst=BCAST) / IPv6(src="2001:db8::1", dst=d) / UDP())  # noqa
    assert r.send(1, v6("2001:db8:ffff::1")) == {}
    assert set(r.send(1, v6("2001:db9::1"))) == {2, 3}


def test_storm_limit_per_second():
    now = [5 * 10**9]
    r = Rig(3, clock=lambda: now[0])
    r.sw.add_port_property(r.ports[0], SecurityProperty(storm_limit=3))
    out = r.send(1, *[udp(1, BCAST, sport=k) for k in range(5)])
    assert len(out[2]) == 3
    assert r.drops(1) == {REASON[R.STORM]: 2}
    assert len(r.send(1, udp(1, 2))[2]) == 1            # unicast is not counted
    now[0] += 10**9
    assert len(r.send(1, udp(1, BCAST))[2]) == 1


def test_property_update_and_delete_take_effect_on_next_packets():
    r = Rig(3)
    r.sw.add_port_property(r.ports[0], VlanProperty("access", access_vlan=10))
    assert r.send(1, udp(1, BCAST)) == {}
    r.sw.update_port_property(r.ports[1], VlanProperty("access", access_vlan=10))
    assert set(r.send(1, udp(1, BCAST))) == {2}
    r.sw.delete_port_property(r.ports[0], VlanProperty())
    assert set(r.send(1, udp(1, BCAST))) == {3}


@pytest.mark.parametrize("bad, msg", [
    (lambda: VlanProperty("private"), "private"),
    (lambda: VlanProperty("access", access_vlan=4095), "4095"),
    (lambda: VlanProperty("trunk", allowed=(0,)), "allowed"),
    (lambda: AclRule("sideways", "allow"), "direction"),
    (lambda: AclRule("in", "allow", remote="10.0.0.300/8"), "10.0.0.300"),
    (lambda: AclRule("in", "allow", local_port="9-3"), "port range"),
    (lambda: AclRule("in", "allow", local="10.0.0.0/8", remote="::/0"), "mixes"),
])
def test_bad_properties_are_refused_with_a_message(bad, msg):
    with pytest.raises(ValueError, match=msg):
        bad()


def test_counters_per_port():
    r = Rig(3)
    r.send(1, udp(1, BCAST), udp(1, BCAST))
    d1 = r.sw.counters.port_dict(r.ports[0].port_id)
    d2 = r.sw.counters.port_dict(r.ports[1].port_id)
    assert d1["rx_packets"] == 2 and d1["rx_broadcast"] == 2 and d1["tx_packets"] == 0
    assert d2["tx_packets"] == 2 and d2["tx_bytes"] == 2 * len(udp(1, BCAST))
    assert r.sw.stats()["counters"]["flooded_packets"] == 2

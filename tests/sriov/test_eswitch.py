"""The embedded switch of the software SR-IOV NIC: VPort rules (checklist 38),
steering by NDIS's receive-filter rules from the wire, the PF and the VFs, flooding,
spoof checking, and filters moved to a VF's VPort and back (checklist 39); a VF
neither sends nor receives outside its filters."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import Dot1Q, Ether, IP, UDP, raw

from sriov.eswitch import (C_SPOOF, DEFAULT_VPORT, PF, WIRE, EmbeddedSwitch, EswitchError,
                           vf_function)
from switch.batch import PacketBatch
from switch.parse import parse_batch
from switch.port import mac_to_int

VM0, VM1, HOST, OTHER = ("02:00:00:00:00:a0", "02:00:00:00:00:a1", "02:00:00:00:00:f0",
                         "02:00:00:00:00:99")


def frames(*specs):
    """specs: (src, dst, vlan or None) -> a parsed batch."""
    b = PacketBatch(64)
    fs = []
    for src, dst, vlan in specs:
        p = Ether(src=src, dst=dst)
        if vlan is not None:
            p = p / Dot1Q(vlan=vlan)
        fs.append(raw(p / IP() / UDP()))
    b.append_frames(fs, src_port=1)
    parse_batch(b.meta, b.data, 0, b.n)
    return b


def steer(es, src, *specs):
    b = frames(*specs)
    dest = np.zeros(b.n, np.int64)
    es.steer(b, src, dest)
    return [int(x) for x in dest]


def bit(*fns):
    return sum(1 << f for f in fns)


@pytest.fixture
def es():
    e = EmbeddedSwitch(num_vfs=2)
    v0, v1 = e.create_vport(vf=0), e.create_vport(vf=1)
    e.set_filter(v0, mac_to_int(VM0))                      # MAC-only: untagged or VLAN 0
    e.set_filter(v1, mac_to_int(VM1), vlan=5)              # MAC+VLAN 5
    e.set_filter(DEFAULT_VPORT, mac_to_int(HOST))
    return e


def test_vport_rules():
    e = EmbeddedSwitch(num_vfs=2)
    v = e.create_vport(vf=1)
    with pytest.raises(EswitchError, match="already has a VPort"):
        e.create_vport(vf=1)
    with pytest.raises(EswitchError, match="the PF has 2"):
        e.create_vport(vf=2)
    with pytest.raises(EswitchError, match="default VPort goes only with the switch"):
        e.delete_vport(DEFAULT_VPORT)
    f = e.set_filter(v, mac_to_int(VM1))
    with pytest.raises(EswitchError, match="still has filters"):
        e.delete_vport(v)
    with pytest.raises(EswitchError, match="already filtered"):
        e.set_filter(DEFAULT_VPORT, mac_to_int(VM1))
    with pytest.raises(EswitchError, match="unicast"):
        e.set_filter(v, mac_to_int("01:00:5e:00:00:01"))
    e.clear_filter(f)
    e.delete_vport(v)
    assert e.vport_of(1) is None and e.create_vport(vf=1) == v


def test_from_the_wire_by_the_filter_rules(es):
    vf0, vf1 = vf_function(0), vf_function(1)
    assert steer(es, WIRE, (OTHER, VM0, None), (OTHER, VM0, 0), (OTHER, VM0, 7),
                 (OTHER, VM1, 5), (OTHER, VM1, None), (OTHER, HOST, None),
                 (OTHER, OTHER, None)) == [
        bit(vf0), bit(vf0),        # MAC-only takes untagged and VLAN 0 ...
        bit(PF),                   # ... not VLAN 7: the default VPort has it
        bit(vf1), bit(PF),         # MAC+VLAN never takes an untagged frame
        bit(PF), bit(PF)]          # the PF's own, and what no filter claims


def test_flooding_and_the_hairpin(es):
    vf0, vf1 = vf_function(0), vf_function(1)
    bcast = "ff:ff:ff:ff:ff:ff"
    # Flooding respects VLANs: VF 1 takes VLAN 5 only, VF 0 untagged only.
    assert steer(es, WIRE, (OTHER, bcast, None), (OTHER, bcast, 5)) == \
        [bit(PF, vf0), bit(PF, vf1)]
    assert steer(es, vf0, (VM0, bcast, None), (VM0, "33:33:00:00:00:01", None)) == \
        [bit(WIRE, PF)] * 2
    assert steer(es, vf0, (VM0, HOST, None), (VM0, OTHER, None)) == [bit(PF), bit(WIRE)]
    # VF 1 is on VLAN 5 only: an untagged frame to it goes out, not across.
    assert steer(es, vf0, (VM0, VM1, None)) == [bit(WIRE)]
    es.set_filter(es.vport_of(0), mac_to_int(VM0), vlan=5)
    assert steer(es, vf0, (VM0, VM1, 5)) == [bit(vf1)]       # VF to VF inside the NIC
    assert steer(es, PF, (HOST, VM0, None), (HOST, OTHER, None)) == [bit(vf0), bit(WIRE)]


def test_a_vf_sends_only_with_its_own_mac_and_vlan(es):
    vf0 = vf_function(0)
    got = steer(es, vf0, (VM0, HOST, None), (OTHER, HOST, None), (VM0, HOST, 9),
                (VM1, HOST, None))
    assert got == [bit(PF), 0, 0, 0]
    assert es.counters[vf0, C_SPOOF] == 3
    es.set_spoofchk(0, False)
    assert steer(es, vf0, (OTHER, HOST, None)) == [bit(PF)]


def test_a_vf_receives_nothing_outside_its_filters(es):
    vf0 = vf_function(0)
    rng = np.random.default_rng(7)
    specs = []
    for _ in range(60):
        dst = ":".join(f"{x:02x}" for x in [2, *rng.integers(0, 256, 5)])
        vlan = [None, 0, 5, 7][int(rng.integers(0, 4))]
        specs.append((OTHER, dst, vlan))
    specs += [(OTHER, VM1, 5), (OTHER, VM0, 7), (OTHER, HOST, None)]
    for src in (WIRE, PF, vf_function(1)):
        for d in steer(es, src, *specs):
            assert not d >> vf0 & 1


def test_assigning_a_vf_moves_the_vnics_filters_and_removal_moves_them_back():
    """Checklist 39: the vNIC starts on the default VPort (synthetic path); assignment
    moves its MAC/VLAN filters to the VF's VPort; removal moves them back first."""
    e = EmbeddedSwitch(num_vfs=1)
    mac = mac_to_int(VM0)
    e.set_filter(DEFAULT_VPORT, mac)
    e.set_filter(DEFAULT_VPORT, mac, vlan=12)
    assert steer(e, WIRE, (OTHER, VM0, None), (OTHER, VM0, 12)) == [bit(PF)] * 2
    v = e.create_vport(vf=0)
    assert e.move_filters(mac, DEFAULT_VPORT, v) == 2
    assert steer(e, WIRE, (OTHER, VM0, None), (OTHER, VM0, 12)) == [bit(vf_function(0))] * 2
    assert e.move_filters(mac, v, DEFAULT_VPORT) == 2
    e.delete_vport(v)
    assert steer(e, WIRE, (OTHER, VM0, None)) == [bit(PF)]

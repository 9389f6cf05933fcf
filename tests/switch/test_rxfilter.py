"""NDIS receive-filter VLAN rules shared by VMQ and the SR-IOV embedded switch
(switch/rxfilter.py; vswitch_vmq_sriov.md 3.1, 4.1)."""
from __future__ import annotations

import pytest

from switch.properties import VlanProperty
from switch.rxfilter import VLAN_ANY, VLAN_UNTAGGED_OR_ZERO, filter_vlan, vlan_matches


@pytest.mark.parametrize("fv,tagged,vid,ok", [
    (VLAN_UNTAGGED_OR_ZERO, False, 0, True), (VLAN_UNTAGGED_OR_ZERO, True, 0, True),
    (VLAN_UNTAGGED_OR_ZERO, True, 10, False),
    (VLAN_ANY, False, 0, True), (VLAN_ANY, True, 10, True),
    (10, True, 10, True), (10, True, 11, False), (10, False, 0, False), (10, True, 0, False)])
def test_vlan_matches(fv, tagged, vid, ok):
    assert vlan_matches(fv, tagged, vid) is ok


def test_the_filter_vlan_of_a_vnic():
    assert filter_vlan(None) == VLAN_UNTAGGED_OR_ZERO
    assert filter_vlan(VlanProperty("untagged")) == VLAN_UNTAGGED_OR_ZERO
    assert filter_vlan(VlanProperty("access", access_vlan=20)) == 20
    assert filter_vlan(VlanProperty("trunk", native_vlan=1, allowed=(10, 20))) == VLAN_ANY

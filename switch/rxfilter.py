"""NDIS receive filters: a destination MAC, and optionally a VLAN, tested by
equality (vswitch_vmq_sriov.md 3.1 and 4.1; checklist 32-33). They steer frames
to VMQ queues (switch/vmq.py) and to the VPorts of an SR-IOV NIC's embedded
switch (sriov/eswitch.py), with one rule for both:

- a MAC-only filter as the switch sets it (VLAN_UNTAGGED_OR_ZERO) matches
  untagged and VLAN-0 frames only;
- a MAC-only filter without that flag (VLAN_ANY) matches any VLAN;
- a MAC+VLAN filter matches frames tagged with that VLAN, never untagged ones.
"""
from __future__ import annotations

from .kernel import helper

VLAN_UNTAGGED_OR_ZERO = -1
VLAN_ANY = -2


@helper
def vlan_matches(fv, tagged, vid):
    """Whether a filter's VLAN ``fv`` takes a frame (``vid`` 0 when untagged)."""
    if fv == VLAN_UNTAGGED_OR_ZERO:
        return vid == 0
    if fv == VLAN_ANY:
        return True
    return tagged and vid != 0 and vid == fv


def filter_vlan(vlan) -> int:
    """The VLAN of the filter the switch sets for a vNIC whose VLAN property is
    ``vlan`` (a switch.properties.VlanProperty, or None): its access VLAN, any
    VLAN on a trunk, else MAC-only for untagged and VLAN-0 frames."""
    if vlan is not None and vlan.mode == "access":
        return vlan.access_vlan
    if vlan is not None and vlan.mode == "trunk":
        return VLAN_ANY
    return VLAN_UNTAGGED_OR_ZERO

"""Built-in forwarding: what the switch does when no forwarding extension is enabled.

MAC learning with ageing (the FDB), flooding of broadcast, multicast and unknown
unicast to every other port of the frame's VLAN, VLAN access and trunk ports, and
never back out of the source port. Destinations get the egress tagging their
port needs. vswitch_vmq_sriov.md 1.4 (miniport edge), 2.3, 2.7; checklist A.13.

``builtin_stage`` fuses built-in ingress policies, forwarding and egress policies
into one kernel call per batch: with no forwarding extension nothing can run
between them.
"""
from __future__ import annotations


from . import counters as R
from .batch import DMAC, DROP, DST0, F_MCAST, FLAGS, NDST, QPORT, SMAC, SRC_NIC, SRC_PORT, VLAN
from .counters import SW_FLOODED, SW_LEARNED, SW_MOVED, SW_PURGED
from .fdb import fdb_learn, fdb_lookup
from .policy import (NOT_MEMBER, UNTAGGED, all_excluded, egress_policies, ingress_policies,
                     tag_word, vlan_egress)
from .properties import C_NIC_PRESENT
from .kernel import kernel, helper


@helper
def _add_dest(meta, i, q, how, maxd):
    k = meta[NDST, i]
    if k >= maxd:
        return False
    d = q
    if how != UNTAGGED:
        d |= tag_word(meta, i, how)
    meta[DST0 + k, i] = d
    meta[NDST, i] = k + 1
    return True


@helper
def forward_one(meta, cfg, fdb, swc, i, now):
    """Compute packet ``i``'s destinations. Returns a drop reason or 0."""
    p = meta[SRC_PORT, i]
    vlan = meta[VLAN, i]
    maxd = meta.shape[0] - DST0
    meta[NDST, i] = 0
    smac = meta[SMAC, i]
    if (smac >> 40) & 1:
        return R.BAD_SOURCE_MAC                 # group bit set in a source address
    if p != 0 and smac != 0:
        r = fdb_learn(fdb, ((smac << 12) | vlan) + 1, p | (meta[SRC_NIC, i] << 16), now)
        if r == 1:
            swc[SW_LEARNED] += 1
        elif r == 2:
            swc[SW_MOVED] += 1
    q = meta[QPORT, i]
    if q > 0 and q != p and q < cfg.shape[0] and cfg[q, C_NIC_PRESENT] != 0:
        # Sorted into a VM port's VMQ queue by its MAC (and VLAN): no lookup.
        how = vlan_egress(cfg, q, vlan)
        if how == NOT_MEMBER:
            return R.VLAN_EGRESS
        _add_dest(meta, i, q, how, maxd)
        return 0
    if (meta[FLAGS, i] & F_MCAST) == 0:
        val, purged = fdb_lookup(fdb, ((meta[DMAC, i] << 12) | vlan) + 1, now)
        swc[SW_PURGED] += purged
        if val >= 0:
            q = val & 0xFFFF
            if q == p:
                return R.NO_DEST                # never back out of the source port
            if cfg[q, C_NIC_PRESENT] != 0:
                how = vlan_egress(cfg, q, vlan)
                if how == NOT_MEMBER:
                    return R.VLAN_EGRESS
                _add_dest(meta, i, q, how, maxd)
                return 0
    # Flood: broadcast, multicast, unknown or stale unicast.
    swc[SW_FLOODED] += 1
    for q in range(1, cfg.shape[0]):
        if q == p or cfg[q, C_NIC_PRESENT] == 0:
            continue
        how = vlan_egress(cfg, q, vlan)
        if how == NOT_MEMBER:
            continue
        if not _add_dest(meta, i, q, how, maxd):
            break
    if meta[NDST, i] == 0:
        return R.NO_DEST                        # nobody else on this VLAN
    return 0


@kernel
def builtin_stage(meta, cfg, acl, fdb, swc, n, now):
    """Ingress policies -> built-in forwarding -> egress policies, for the whole batch."""
    now_s = now // 1000000000
    has_acl = acl.shape[0] > 0
    for i in range(n):
        if meta[DROP, i] != 0:
            continue
        r = ingress_policies(meta, cfg, acl, i, now_s, True)
        if r == 0:
            r = forward_one(meta, cfg, fdb, swc, i, now)
        if r != 0:
            meta[DROP, i] = r
            continue
        if has_acl:      # without ACLs built-in forwarding excludes nothing on egress
            egress_policies(meta, cfg, acl, i, True)
            if all_excluded(meta, i):
                meta[DROP, i] = R.NO_DEST


"""Built-in port policies, as kernel pieces the switch's stages are made of.

Ingress policies run after the filter extensions and before the forwarder:
port ACL (outbound from the port), DHCP guard, router guard; with built-in
forwarding also the standard properties the switch then enforces itself: VLAN
membership, MAC spoofing, storm limit. Egress policies run after the forwarder
and before the filters: port ACL (inbound to the port) and VLAN tagging.
Packets sourced from the default port (extension-originated) are trusted and
bypass them. vswitch_vmq_sriov.md 1.4, 1.6, 2.2, 2.3, 2.6; checklist A.9, A.13,
A.15, A.27-A.30.
"""
from __future__ import annotations


from . import counters as R
from .acl import acl_decide
from .batch import (D_EXCLUDED, D_PORT_MASK, D_PRESERVE_PRIO, D_PRESERVE_VLAN,
                    D_REASON_SHIFT, D_TAG_SHIFT, D_TAGGED, DROP, DST0, F_BCAST,
                    F_ICMP, F_ICMP6, F_MCAST, F_QINQ, F_UDP, F_VLAN, FLAGS, ICMP_TYPE, NDST,
                    SMAC, SPORT, SRC_PORT, TCI, VLAN)
from .properties import (ACL_DENY, C_ACL_END, C_ACL_START, C_EXISTS, C_GUARDS, C_SPOOF_MAC,
                         C_STORM, C_STORM_COUNT, C_STORM_WINDOW, C_TRUNK, C_UNTAG_VLAN,
                         C_VBITS, DIR_INBOUND, DIR_OUTBOUND, G_DHCP, G_ROUTER, G_STORM)
from .kernel import kernel, helper

NOT_MEMBER = -2
UNTAGGED = -1


@helper
def _carried_tagged(cfg, port, vid):
    return ((cfg[port, C_VBITS + (vid >> 6)] >> (vid & 63)) & 1) == 1


@helper
def vlan_classify(cfg, meta, i, port):
    """VLAN a frame from ``port`` belongs to, or -1 if the port may not send it.

    Untagged and priority-tagged frames belong to the port's untagged VLAN (the
    access VLAN, a trunk's native VLAN, or 0). Tagged frames only come in on
    trunks, for the native VLAN or a VLAN the trunk carries (prune beats allow)."""
    vid = meta[TCI, i] & 0xFFF if meta[FLAGS, i] & F_VLAN else 0
    untag = cfg[port, C_UNTAG_VLAN]
    if vid == 0:
        return untag
    if cfg[port, C_TRUNK] == 1 and (vid == untag or _carried_tagged(cfg, port, vid)):
        return vid
    return -1


@helper
def vlan_egress(cfg, port, vlan):
    """How ``port`` receives VLAN ``vlan``: NOT_MEMBER, UNTAGGED, or the VID to tag with
    (A.27: the native VLAN leaves a trunk untagged, access ports get frames untagged)."""
    if vlan == cfg[port, C_UNTAG_VLAN]:
        return UNTAGGED
    if vlan != 0 and _carried_tagged(cfg, port, vlan):
        return vlan
    return NOT_MEMBER


@helper
def tag_word(meta, i, vid):
    """Destination flag bits that put VID ``vid`` on the wire, keeping the priority and
    DEI bits the frame arrived with."""
    pri = meta[TCI, i] & 0xF000 if meta[FLAGS, i] & F_VLAN else 0
    return D_TAGGED | ((pri | vid) << D_TAG_SHIFT)


@helper
def ingress_policies(meta, cfg, acl, i, now_s, standard):
    """Built-in ingress policies for packet ``i``; returns a drop reason or 0.

    ``standard``: also enforce the standard properties (VLAN, MAC spoofing, storm
    limit), i.e. no forwarding extension is enabled. Sets meta[VLAN]."""
    p = meta[SRC_PORT, i]
    fl = meta[FLAGS, i]
    if p == 0:
        # Extension-originated and not re-sourced: trusted, bypasses port policies.
        meta[VLAN, i] = meta[TCI, i] & 0xFFF if fl & F_VLAN else 0
        return 0
    if cfg[p, C_EXISTS] == 0:
        return R.SOURCE_NOT_CONNECTED
    if standard:
        if fl & F_QINQ:
            return R.QINQ
        v = vlan_classify(cfg, meta, i, p)
        if v < 0:
            return R.VLAN_INGRESS
        meta[VLAN, i] = v
        m = cfg[p, C_SPOOF_MAC]
        if m >= 0 and meta[SMAC, i] != m:
            return R.MAC_SPOOF
    else:
        meta[VLAN, i] = meta[TCI, i] & 0xFFF if fl & F_VLAN else 0
    g = cfg[p, C_GUARDS]
    if g != 0:
        if standard and g & G_STORM and fl & (F_BCAST | F_MCAST):
            if cfg[p, C_STORM_WINDOW] != now_s:
                cfg[p, C_STORM_WINDOW] = now_s
                cfg[p, C_STORM_COUNT] = 0
            cfg[p, C_STORM_COUNT] += 1
            if cfg[p, C_STORM_COUNT] > cfg[p, C_STORM]:
                return R.STORM
        if g & G_DHCP and fl & F_UDP and (meta[SPORT, i] == 67 or meta[SPORT, i] == 547):
            return R.DHCP_GUARD
        if g & G_ROUTER:
            t = meta[ICMP_TYPE, i]
            if fl & F_ICMP6 and (t == 134 or t == 137):       # RA, redirect
                return R.ROUTER_GUARD
            if fl & F_ICMP and (t == 5 or t == 9):            # redirect, router advertisement
                return R.ROUTER_GUARD
    s, e = cfg[p, C_ACL_START], cfg[p, C_ACL_END]
    if e > s and acl_decide(acl, s, e, DIR_OUTBOUND, meta, i) == ACL_DENY:
        return R.ACL_OUTBOUND
    return 0


@helper
def egress_policies(meta, cfg, acl, i, standard):
    """Built-in egress policies over packet ``i``'s destinations: ACL exclusions, and
    (with a forwarding extension) tagging by PreserveVLAN."""
    trusted = meta[SRC_PORT, i] == 0
    for k in range(meta[NDST, i]):
        d = meta[DST0 + k, i]
        if d & D_EXCLUDED:
            continue
        q = d & D_PORT_MASK
        if not standard:
            d &= ~(D_TAGGED | (0xFFFF << D_TAG_SHIFT))
            if d & D_PRESERVE_VLAN and meta[FLAGS, i] & F_VLAN:
                tci = meta[TCI, i]
                if (d & D_PRESERVE_PRIO) == 0:
                    tci &= 0xFFF
                d |= D_TAGGED | (tci << D_TAG_SHIFT)
        if not trusted:
            s, e = cfg[q, C_ACL_START], cfg[q, C_ACL_END]
            if e > s and acl_decide(acl, s, e, DIR_INBOUND, meta, i) == ACL_DENY:
                d |= D_EXCLUDED | (R.ACL_INBOUND << D_REASON_SHIFT)
        meta[DST0 + k, i] = d


@helper
def all_excluded(meta, i):
    for k in range(meta[NDST, i]):
        if (meta[DST0 + k, i] & D_EXCLUDED) == 0:
            return False
    return True


@kernel
def ingress_stage(meta, cfg, acl, n, now_s, standard):
    for i in range(n):
        if meta[DROP, i] == 0:
            meta[DROP, i] = ingress_policies(meta, cfg, acl, i, now_s, standard)


@kernel
def egress_stage(meta, cfg, acl, n, standard):
    for i in range(n):
        if meta[DROP, i] == 0:
            egress_policies(meta, cfg, acl, i, standard)
            if all_excluded(meta, i):
                meta[DROP, i] = R.NO_DEST

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

from numba import njit

from . import counters as R
from .acl import acl_decide
from .batch import (D_EXCLUDED, D_PORT_MASK, D_PRESERVE_PRIO, D_PRESERVE_VLAN,
                    D_REASON_SHIFT, D_TAG_SHIFT, D_TAGGED, DPORT, DROP, DST0, F_BCAST,
                    F_ICMP, F_ICMP6, F_MCAST, F_QINQ, F_UDP, F_VLAN, FLAGS, ICMP_TYPE, NDST,
                    SMAC, SPORT, SRC_PORT, TCI, VLAN)
from .properties import (ACL_DENY, C_ACL_END, C_ACL_START, C_ALLOW_SPOOF, C_DHCP_GUARD,
                         C_EXISTS, C_MAC, C_NATIVE_VLAN, C_ROUTER_GUARD, C_STORM,
                         C_STORM_COUNT, C_STORM_WINDOW, C_VBITS, C_VLAN_MODE,
                         C_ACCESS_VLAN, DIR_INBOUND, DIR_OUTBOUND, VLAN_ACCESS, VLAN_TRUNK)

NOT_MEMBER = -2
UNTAGGED = -1


@njit(inline="always", cache=True)
def _trunk_allows(cfg, port, vid):
    w = vid >> 6
    b = vid & 63
    allowed = (cfg[port, C_VBITS + w] >> b) & 1
    pruned = (cfg[port, C_VBITS + 64 + w] >> b) & 1
    return allowed == 1 and pruned == 0     # prune beats allow (A.27)


@njit(inline="always", cache=True)
def vlan_classify(cfg, meta, i, port):
    """VLAN a frame from ``port`` belongs to, or -1 if the port may not send it."""
    vid = meta[TCI, i] & 0xFFF if meta[FLAGS, i] & F_VLAN else 0
    mode = cfg[port, C_VLAN_MODE]
    if mode == VLAN_TRUNK:
        if vid == 0:
            return cfg[port, C_NATIVE_VLAN]        # untagged from a trunk = native VLAN
        if vid == cfg[port, C_NATIVE_VLAN] or _trunk_allows(cfg, port, vid):
            return vid
        return -1
    if vid != 0:
        return -1                                  # access/untagged ports send untagged only
    if mode == VLAN_ACCESS:
        return cfg[port, C_ACCESS_VLAN]
    return 0


@njit(inline="always", cache=True)
def vlan_egress(cfg, port, vlan):
    """How ``port`` receives VLAN ``vlan``: NOT_MEMBER, UNTAGGED, or the VID to tag with."""
    mode = cfg[port, C_VLAN_MODE]
    if mode == VLAN_TRUNK:
        if vlan == cfg[port, C_NATIVE_VLAN]:
            return UNTAGGED                        # native VLAN leaves untagged (A.27)
        if vlan != 0 and _trunk_allows(cfg, port, vlan):
            return vlan
        return NOT_MEMBER
    if mode == VLAN_ACCESS:
        return UNTAGGED if vlan == cfg[port, C_ACCESS_VLAN] else NOT_MEMBER
    return UNTAGGED if vlan == 0 else NOT_MEMBER


@njit(inline="always", cache=True)
def tag_word(meta, i, vid):
    """Destination flag bits that put VID ``vid`` (with the frame's priority) on the wire."""
    pcp = (meta[TCI, i] >> 13) & 7 if meta[FLAGS, i] & F_VLAN else 0
    return D_TAGGED | (((pcp << 13) | vid) << D_TAG_SHIFT)


@njit(inline="always", cache=True)
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
        if cfg[p, C_ALLOW_SPOOF] == 0 and cfg[p, C_MAC] != 0 and meta[SMAC, i] != cfg[p, C_MAC]:
            return R.MAC_SPOOF
        if cfg[p, C_STORM] > 0 and fl & (F_BCAST | F_MCAST):
            if cfg[p, C_STORM_WINDOW] != now_s:
                cfg[p, C_STORM_WINDOW] = now_s
                cfg[p, C_STORM_COUNT] = 0
            cfg[p, C_STORM_COUNT] += 1
            if cfg[p, C_STORM_COUNT] > cfg[p, C_STORM]:
                return R.STORM
    else:
        meta[VLAN, i] = meta[TCI, i] & 0xFFF if fl & F_VLAN else 0
    if cfg[p, C_DHCP_GUARD] and fl & F_UDP and (meta[SPORT, i] == 67 or meta[SPORT, i] == 547):
        return R.DHCP_GUARD
    if cfg[p, C_ROUTER_GUARD]:
        t = meta[ICMP_TYPE, i]
        if fl & F_ICMP6 and (t == 134 or t == 137):       # RA, redirect
            return R.ROUTER_GUARD
        if fl & F_ICMP and (t == 5 or t == 9):            # redirect, router advertisement
            return R.ROUTER_GUARD
    s, e = cfg[p, C_ACL_START], cfg[p, C_ACL_END]
    if e > s and acl_decide(acl, s, e, DIR_OUTBOUND, meta, i) == ACL_DENY:
        return R.ACL_OUTBOUND
    return 0


@njit(inline="always", cache=True)
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


@njit(inline="always", cache=True)
def all_excluded(meta, i):
    for k in range(meta[NDST, i]):
        if (meta[DST0 + k, i] & D_EXCLUDED) == 0:
            return False
    return True


@njit(nogil=True, cache=True)
def ingress_stage(meta, cfg, acl, n, now_s, standard):
    for i in range(n):
        if meta[DROP, i] == 0:
            meta[DROP, i] = ingress_policies(meta, cfg, acl, i, now_s, standard)


@njit(nogil=True, cache=True)
def egress_stage(meta, cfg, acl, n, standard):
    for i in range(n):
        if meta[DROP, i] == 0:
            egress_policies(meta, cfg, acl, i, standard)
            if all_excluded(meta, i):
                meta[DROP, i] = R.NO_DEST

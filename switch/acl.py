"""Extended port ACL matching (vswitch_vmq_sriov.md 2.2, checklist A.25).

Rules of one port and direction are sorted by descending weight; the first rule
that matches decides. Matchers default to "any". ACLs judge IP traffic; frames
that are not IPv4/IPv6 (ARP, for one) pass, since every matcher is an IP field.
Stateful rules are not implemented yet: a rule is allow or deny.
"""
from __future__ import annotations


from .batch import (DPORT, DST_HI, DST_LO, F_FRAG_LATER, F_IPV4, F_IPV6, F_TCP, F_UDP,
                    FLAGS, PROTO, SPORT, SRC_HI, SRC_LO)
from .properties import (A_ACTION, A_DIR, A_FAMILY, A_LHI, A_LLO, A_LPLEN, A_LPORT_HI,
                         A_LPORT_LO, A_PROTO, A_RHI, A_RLO, A_RPLEN, A_RPORT_HI,
                         A_RPORT_LO, DIR_INBOUND)
from .kernel import helper

NO_MATCH = 0


@helper
def _prefix_match(fam, hi, lo, nhi, nlo, plen):
    if plen == 0:
        return True
    if fam == 4:
        s = 32 - plen
        return (lo >> s) == (nlo >> s)
    if plen <= 64:
        s = 64 - plen
        return (hi >> s) == (nhi >> s)      # equal shifts keep the test exact for int64
    if hi != nhi:
        return False
    s = 128 - plen
    if s == 0:
        return lo == nlo
    return (lo >> s) == (nlo >> s)


@helper
def acl_decide(acl, start, end, direction, meta, i):
    """First matching rule's action for packet ``i`` in ``acl[start:end]``, or NO_MATCH."""
    fl = meta[FLAGS, i]
    if (fl & (F_IPV4 | F_IPV6)) == 0:
        return NO_MATCH
    fam = 4 if fl & F_IPV4 else 6
    has_ports = (fl & (F_TCP | F_UDP)) != 0 and (fl & F_FRAG_LATER) == 0
    if direction == DIR_INBOUND:
        lhi, llo, rhi, rlo = meta[DST_HI, i], meta[DST_LO, i], meta[SRC_HI, i], meta[SRC_LO, i]
        lport, rport = meta[DPORT, i], meta[SPORT, i]
    else:
        lhi, llo, rhi, rlo = meta[SRC_HI, i], meta[SRC_LO, i], meta[DST_HI, i], meta[DST_LO, i]
        lport, rport = meta[SPORT, i], meta[DPORT, i]
    proto = meta[PROTO, i]
    for r in range(start, end):
        if acl[r, A_DIR] != direction:
            continue
        rf = acl[r, A_FAMILY]
        if rf != 0 and rf != fam:
            continue
        rp = acl[r, A_PROTO]
        if rp >= 0 and rp != proto:
            continue
        if rf != 0:
            if not _prefix_match(fam, lhi, llo, acl[r, A_LHI], acl[r, A_LLO], acl[r, A_LPLEN]):
                continue
            if not _prefix_match(fam, rhi, rlo, acl[r, A_RHI], acl[r, A_RLO], acl[r, A_RPLEN]):
                continue
        plo, phi = acl[r, A_LPORT_LO], acl[r, A_LPORT_HI]
        qlo, qhi = acl[r, A_RPORT_LO], acl[r, A_RPORT_HI]
        if plo != 0 or phi != 65535 or qlo != 0 or qhi != 65535:
            if not has_ports:
                continue
            if lport < plo or lport > phi or rport < qlo or rport > qhi:
                continue
        return acl[r, A_ACTION]
    return NO_MATCH

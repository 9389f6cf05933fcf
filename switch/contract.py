"""The Hyper-V extension contract, enforced at run time.

Extensions never get write access to a packet or its forwarding context. Each
hook receives read-only arrays plus the writable action arrays its kind may use:
a capture none, a filter drop verdicts and (egress) exclusions, the forwarder
destinations (ingress) and exclusions (egress). Verdict and destination arrays
start zeroed (the merge kernels leave them so); the exclusion array starts with
the exclusions as they stand, so clearing one can be seen. After the hook, a merge kernel
applies the actions and checks them against the rules below; a write to a
read-only array fails in numpy or numba and is reported as a violation too.
A violation is recorded as a ``ContractViolation`` naming the extension and the
rule, the offending packets are dropped with reason CONTRACT, and the switch
goes on.

Rules are numbered as in vswitch_vmq_sriov.md checklist (A).
"""
from __future__ import annotations


from . import counters as R
from .batch import (D_EXCLUDED, D_NIC_SHIFT, D_PORT_MASK, D_PRESERVE_PRIO,
                    D_PRESERVE_VLAN, D_REASON_SHIFT, D_TAG_SHIFT, D_TAGGED, DROP, DST0, LEN,
                    NDST, OFF, SRC_NIC, SRC_PORT)
from .policy import all_excluded
from .port import PortType
from .properties import C_NIC_CONNECTED, C_TYPE
from .kernel import helper, kernel

_EXTERNAL = int(PortType.EXTERNAL)

RULES = {
    1: "stack order is fixed per class: captures above filters above the one forwarder",
    2: "at most one forwarding extension may be enabled on a switch",
    3: "a capture extension may not drop, modify, exclude, add destinations or veto",
    4: "a filter extension may not add destinations or modify packets in place "
       "(clone and inject instead)",
    5: "destinations are added only on ingress by the forwarder; on egress only "
       "IsExcluded may change, and committed destinations are never removed",
    6: "an exclusion set by a lower extension cannot be cleared above it",
    7: "drops and exclusions need a registered reason; a packet with no live "
       "destination is dropped",
    8: "ingress packets carry no destinations; egress packets always do",
    9: "extension-originated packets are injected on ingress only",
    10: "a clone injected on ingress loses its destinations; one injected on egress keeps them",
    13: "standard port properties go to the forwarding extension when one is enabled",
    15: "built-in ingress policies run after filters and before the forwarder; "
        "egress policies after the forwarder and before filters",
    16: "lifecycle order: port create, NIC create, connect; disconnect, delete, "
        "port teardown, port delete",
    17: "only create and property add/update/delete requests may be vetoed",
    18: "an extension may not complete a create request with success",
    19: "extensions may not send packets or NIC requests to a NIC that is not connected",
    20: "ports may be referenced from create until teardown, NICs only while connected; "
        "a referenced object is not deleted",
}


class ContractViolation(Exception):
    """An extension broke a rule of the Hyper-V extension contract."""

    def __init__(self, extension: str, rule: int, detail: str, packets: int = 0):
        self.extension = extension
        self.rule = rule
        self.detail = detail
        self.packets = packets
        msg = f"extension {extension!r} broke rule A.{rule} ({RULES.get(rule, '?')}): {detail}"
        if packets:
            msg += f"; {packets} packet(s) dropped"
        super().__init__(msg)


# Bits the merge kernels return, one per kind of violation found.
V_BAD_REASON = 2     # a drop/exclusion code that is not an extension's registered reason
V_CLEARED = 4        # an exclusion was cleared (A.6)
V_BAD_DEST = 8       # destination port absent, NIC not connected, bad NIC index, duplicate
V_TOO_MANY = 16      # more destinations than slots
V_BAD_FLAGS = 32     # destination flags other than PreserveVLAN/PreservePriority
V_BAD_SOURCE = 64    # injected packet from a port/NIC that is not connected, or out of range
V_BAD_FRAME = 128    # injected packet whose OFF/LEN lie outside its batch's arena


@kernel
def merge_drop(meta, drop, n, code_lo, code_hi):
    """Apply a hook's drop verdicts (0 = none) and leave ``drop`` zeroed for the next
    stage. A verdict on a packet dropped above is moot: that packet is gone. Returns
    the V_* bits of what was wrong."""
    bad = 0
    for i in range(n):
        new = drop[i]
        if new == 0:
            continue
        drop[i] = 0
        if meta[DROP, i] != 0:
            continue
        if new < code_lo or new >= code_hi:
            bad |= V_BAD_REASON
            new = R.CONTRACT
        meta[DROP, i] = new
    return bad


@kernel
def prefill_exclude(meta, excl, n):
    """Per-destination exclusion reasons as they stand (0 = not excluded)."""
    for i in range(n):
        for k in range(meta[NDST, i]):
            d = meta[DST0 + k, i]
            excl[k, i] = (d >> D_REASON_SHIFT) & 0xFFFF if d & D_EXCLUDED else 0


@kernel
def merge_exclude(meta, drop, excl, n, code_lo, code_hi):
    """Apply egress drops and exclusions; enforce A.6 and A.7."""
    bad = merge_drop(meta, drop, n, code_lo, code_hi)
    for i in range(n):
        if meta[DROP, i] != 0:
            continue
        for k in range(meta[NDST, i]):
            d = meta[DST0 + k, i]
            new = excl[k, i]
            if d & D_EXCLUDED:
                if new != (d >> D_REASON_SHIFT) & 0xFFFF:
                    bad |= V_CLEARED         # kept excluded with its first reason
                continue
            if new == 0:
                continue
            if new < code_lo or new >= code_hi:
                bad |= V_BAD_REASON
                new = R.CONTRACT
            meta[DST0 + k, i] = d | D_EXCLUDED | (new << D_REASON_SHIFT)
        if all_excluded(meta, i):
            meta[DROP, i] = R.NO_DEST
    return bad


@helper
def _dest_bad(cfg, dests, k, i):
    """V_* bits wrong with destination ``k`` of packet ``i`` (0 if it is fine)."""
    d = dests[k, i]
    q = d & D_PORT_MASK
    nic = (d >> D_NIC_SHIFT) & 0xFF
    if d & ~(D_PORT_MASK | (0xFF << D_NIC_SHIFT) | D_PRESERVE_VLAN | D_PRESERVE_PRIO):
        return V_BAD_FLAGS
    if q == 0 or q >= cfg.shape[0] or nic > 32 or ((cfg[q, C_NIC_CONNECTED] >> nic) & 1) == 0:
        return V_BAD_DEST
    if nic != 0 and cfg[q, C_TYPE] != _EXTERNAL:
        return V_BAD_DEST
    key = d & (D_PORT_MASK | (0xFF << D_NIC_SHIFT))
    for j in range(k):
        if (dests[j, i] & (D_PORT_MASK | (0xFF << D_NIC_SHIFT))) == key:
            return V_BAD_DEST
    return 0


@kernel
def merge_forward(meta, cfg, drop, dests, ndst, n, code_lo, code_hi):
    """Commit the forwarder's destinations after checking each one (1.5, A.5, A.19).
    Leaves ``ndst`` zeroed for the next batch."""
    bad = merge_drop(meta, drop, n, code_lo, code_hi)
    maxd = meta.shape[0] - DST0
    for i in range(n):
        c = ndst[i]
        ndst[i] = 0
        if meta[DROP, i] != 0:
            continue
        if c < 0 or c > maxd:
            bad |= V_TOO_MANY
            meta[DROP, i] = R.CONTRACT
            continue
        wrong = 0
        for k in range(c):
            wrong = _dest_bad(cfg, dests, k, i)
            if wrong:
                break
        if wrong:
            bad |= wrong
            meta[DROP, i] = R.CONTRACT
            continue
        if c == 0:
            meta[DROP, i] = R.NO_DEST      # A.7: zero destinations is a drop
            continue
        for k in range(c):
            meta[DST0 + k, i] = dests[k, i]
        meta[NDST, i] = c
    return bad


@kernel
def check_injected(meta, arena, cfg, n, egress):
    """Everything an extension could have written into a batch it injects, checked
    before the switch indexes anything with it. Offending packets are dropped."""
    bad = 0
    maxd = meta.shape[0] - DST0
    size = arena.shape[0]
    for i in range(n):
        p = meta[SRC_PORT, i]
        nic = meta[SRC_NIC, i]
        off = meta[OFF, i]
        ln = meta[LEN, i]
        wrong = 0
        if p < 0 or p >= cfg.shape[0] or nic < 0 or nic > 32 or \
                (p != 0 and ((cfg[p, C_NIC_CONNECTED] >> nic) & 1) == 0):
            wrong = V_BAD_SOURCE
            meta[SRC_PORT, i] = 0          # count the drop on the default port
        elif off < 0 or ln < 0 or off > size or ln > size - off:
            wrong = V_BAD_FRAME
        elif egress:
            c = meta[NDST, i]
            if c <= 0 or c > maxd:
                wrong = V_TOO_MANY
            else:
                for k in range(c):
                    meta[DST0 + k, i] &= ~(D_EXCLUDED | D_TAGGED | (0xFFFF << D_REASON_SHIFT)
                                           | (0xFFFF << D_TAG_SHIFT))
                    wrong = _dest_bad(cfg, meta[DST0:], k, i)
                    if wrong:
                        break
        if wrong:
            bad |= wrong
            meta[NDST, i] = 0
            meta[DROP, i] = R.CONTRACT
    return bad


@kernel
def drop_live(meta, n, reason):
    """Drop every packet still alive (a hook failed for the whole batch)."""
    c = 0
    for i in range(n):
        if meta[DROP, i] == 0:
            meta[DROP, i] = reason
            c += 1
    return c


def describe(bits: int) -> list[tuple[int, str]]:
    """V_* bits -> (rule, what happened)."""
    out = []
    if bits & V_BAD_REASON:
        out.append((7, "dropped or excluded with a reason code it never registered"))
    if bits & V_CLEARED:
        out.append((6, "tried to clear or change an existing exclusion"))
    if bits & V_BAD_DEST:
        out.append((19, "added a destination that is not a connected NIC of an existing "
                        "port (or a non-zero NIC index on a non-external port, or a duplicate)"))
    if bits & V_TOO_MANY:
        out.append((5, "set a destination count outside 0..the array's capacity"))
    if bits & V_BAD_FLAGS:
        out.append((5, "set destination flags other than PreserveVLAN/PreservePriority"))
    if bits & V_BAD_SOURCE:
        out.append((19, "injected packets whose source is not a connected NIC "
                        "(use act.set_source)"))
    if bits & V_BAD_FRAME:
        out.append((9, "injected packets whose offset/length lie outside their batch"))
    return out

"""Example filter extension: drop packets by a 5-tuple ACL, in an njit kernel.

A filter may drop (and, on egress, exclude destinations) but may not add
destinations or change packets in place (vswitch_vmq_sriov.md 1.2, checklist
A.4). Here the ingress hook writes a registered reason into ``act.drop`` for
every packet a deny rule matches; the switch merges the verdicts.

Rules reuse the switch's ACL rule type and matcher (switch/acl.py), read as
5-tuples: ``local`` = source address, ``remote`` = destination address,
``local_port`` = source port, ``remote_port`` = destination port. Highest weight
first, first match wins, no match passes.
"""
from __future__ import annotations

import numpy as np

from switch.acl import acl_decide
from switch.batch import DROP
from switch.extension import FilterExtension
from switch.properties import ACL_DENY, DIR_OUTBOUND, A_NCOLS, AclRule
from switch.kernel import kernel


@kernel
def acl_filter_kernel(meta, drop, n, table, reason):
    for i in range(n):
        if meta[DROP, i] != 0:
            continue
        if acl_decide(table, 0, table.shape[0], DIR_OUTBOUND, meta, i) == ACL_DENY:
            drop[i] = reason


def five_tuple(action: str, src="any", dst="any", proto="any", sport="any", dport="any",
               weight: int = 1) -> AclRule:
    return AclRule("out", action, weight, proto, src, dst, sport, dport)


class AclFilter(FilterExtension):
    def __init__(self, rules=(), name: str = "acl-filter"):
        super().__init__(name)
        self.set_rules(rules)
        self.deny_reason = 0

    def set_rules(self, rules) -> None:
        ordered = sorted(rules, key=lambda r: -int(r.weight))
        self.table = (np.stack([r.row() for r in ordered]) if ordered
                      else np.zeros((0, A_NCOLS), dtype=np.int64))

    def attach(self, handle):
        self.deny_reason = handle.reason("5-tuple ACL deny")

    def ingress(self, pkts, act):
        if self.table.shape[0]:
            acl_filter_kernel(pkts.meta, act.drop, pkts.n, self.table, self.deny_reason)

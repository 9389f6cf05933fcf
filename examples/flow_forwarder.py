"""Example forwarding extension: a static flow table from destination MAC to ports.

The forwarder is the only extension that adds destinations, and only on ingress
(vswitch_vmq_sriov.md 1.2, 1.5, checklist A.5). With it enabled, the switch's
built-in forwarding is off and the standard port properties (VLAN, security)
are the forwarder's to enforce (A.13). This one forwards by a fixed table, keeps
VLAN tags and their priority (PreserveVLAN, PreservePriority) and drops what no flow matches.

The table is two sorted arrays (MACs, and a row of output port IDs each); the
njit kernel finds a packet's flow by binary search and writes destination words
into ``act.dests``/``act.ndst``.
"""
from __future__ import annotations

import numpy as np

from switch.batch import D_PRESERVE_PRIO, D_PRESERVE_VLAN, DMAC, DROP, SRC_PORT, dest_make
from switch.extension import ForwardingExtension
from switch.port import NicState, mac_to_int
from switch.kernel import kernel


@kernel
def flow_kernel(meta, drop, dests, ndst, n, macs, outs, nouts, connected, reason):
    for i in range(n):
        if meta[DROP, i] != 0:
            continue
        j = np.searchsorted(macs, meta[DMAC, i])
        if j >= macs.shape[0] or macs[j] != meta[DMAC, i]:
            drop[i] = reason
            continue
        c = 0
        src = meta[SRC_PORT, i]
        for k in range(nouts[j]):
            q = outs[j, k]
            # only connected NICs (A.19) and never back to the source
            if q != src and q < connected.shape[0] and connected[q]:
                dests[c, i] = dest_make(q, 0, D_PRESERVE_VLAN | D_PRESERVE_PRIO)
                c += 1
        ndst[i] = c
        if c == 0:
            drop[i] = reason


class FlowForwarder(ForwardingExtension):
    """``flows``: {mac: [port name or id, ...]}. Ports are resolved on each change."""

    def __init__(self, flows: dict, name: str = "flow-forwarder"):
        super().__init__(name)
        self.flows = {mac_to_int(m): list(v) for m, v in flows.items()}
        self.reason = 0
        self.connected = np.zeros(1, dtype=np.uint8)
        self._compile()

    def attach(self, handle):
        self.reason = handle.reason("no flow for destination")
        self._compile()

    def _port_id(self, ref):
        if isinstance(ref, int):
            return ref
        if self.switch is not None:
            for p in self.switch.ports():
                if p.name == ref:
                    return p.port_id
        return -1

    def _compile(self) -> None:
        macs = sorted(self.flows)
        width = max([len(v) for v in self.flows.values()] + [1])
        self.macs = np.array(macs, dtype=np.int64)
        self.outs = np.full((len(macs), width), -1, dtype=np.int64)
        self.nouts = np.zeros(len(macs), dtype=np.int64)
        for j, m in enumerate(macs):
            ids = [self._port_id(r) for r in self.flows[m]]
            ids = [q for q in ids if q > 0]
            self.outs[j, :len(ids)] = ids
            self.nouts[j] = len(ids)
        conn = np.zeros(max([p.port_id for p in self.switch.ports()] + [0]) + 1
                        if self.switch else 1, dtype=np.uint8)
        if self.switch:
            for p in self.switch.ports():
                n0 = p.nics.get(0)
                conn[p.port_id] = 1 if n0 is not None and n0.state == NicState.CONNECTED else 0
        self.connected = conn

    # The forwarder tracks connections through the control path (1.7).
    def oid_complete(self, oid, status, *args):
        self._compile()

    def nic_disconnect(self, port, nic):
        # After passing NIC_DISCONNECT down it must not add that port (1.5).
        if port.port_id < self.connected.shape[0]:
            self.connected[port.port_id] = 0

    def ingress(self, pkts, act):
        flow_kernel(pkts.meta, act.drop, act.dests, act.ndst, pkts.n, self.macs,
                    self.outs, self.nouts, self.connected, self.reason)

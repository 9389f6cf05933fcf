"""What an extension may do from a data-path hook: the ``act`` argument.

One ``Actions`` object exists per (extension, direction) and is reused for every
batch. Its arrays are the switch's scratch arrays for that stage; the switch
fills them before the hook and merges them after (see contract.py). Clone,
originate and inject are checked against the extension's kind and the path
(vswitch_vmq_sriov.md 1.2, 1.6; checklist A.3, A.4, A.9, A.10, A.19).
"""
from __future__ import annotations

import numpy as np

from .batch import DST0, F_CLONE, F_INJECTED, F_SAFE, FLAGS, NDST, SRC_NIC, SRC_PORT, PacketBatch
from .clone import clone_into
from .contract import ContractViolation
from .port import DEFAULT_PORT_ID, NicState


class Actions:
    __slots__ = ("_switch", "_ext", "_direction", "drop", "exclude", "dests",
                 "ndst", "ctx", "_batch")

    def __init__(self, switch, ext, direction: str, drop=None, exclude=None,
                 dests=None, ndst=None, ctx=None):
        self._switch = switch
        self._ext = ext
        self._direction = direction
        self.drop = drop          # int64[cap], zeroed: a registered reason drops packet i
        self.exclude = exclude    # int64[max_dest, cap]: exclusion reason per destination,
        #                           filled with the current ones; set one to exclude
        self.dests = dests        # int64[max_dest, cap]: forwarder's destination words (ingress)
        self.ndst = ndst          # int64[cap], zeroed: how many of them
        self.ctx = ctx            # int64[cap]: this extension's per-packet context
        self._batch = None

    # ---- making packets --------------------------------------------------------------
    def clone(self, indices, keep_destinations: bool = False) -> PacketBatch:
        """Copies of packets ``indices`` of the current batch in a writable batch.

        ``keep_destinations`` (the forwarder, on ingress): the clones carry the
        destinations assigned so far in ``act.dests``/``act.ndst``, ready to be
        injected on egress (1.6)."""
        kind = self._ext.kind
        if kind == "capture":
            raise ContractViolation(self._ext.name, 3, "capture extensions may not clone packets")
        if keep_destinations and (kind != "forwarding" or self._direction != "ingress"):
            raise ContractViolation(self._ext.name, 10,
                                    "only the forwarder, on ingress, may clone with destinations")
        idx = np.asarray(indices, dtype=np.int64)
        src = self._batch
        if idx.size and (idx.min() < 0 or idx.max() >= src.n):
            raise IndexError(f"clone indices must be in 0..{src.n - 1}")
        out = self._switch.borrow_batch()
        out.n, out.cursor = clone_into(src.meta, src.data, out.meta, out.data, idx, False)
        if keep_destinations and out.n:
            taken = idx[:out.n]
            c = np.clip(self.ndst[taken], 0, out.max_dest)
            out.meta[NDST, :out.n] = c
            out.meta[DST0:DST0 + out.max_dest, :out.n] = self.dests[:out.max_dest, taken]
        return out

    def originate(self) -> PacketBatch:
        """An empty writable batch for new packets; their source is the default port."""
        return self._switch.borrow_batch()

    def set_source(self, batch: PacketBatch, port_id: int, nic_index: int = 0) -> None:
        """Re-source packets so that port's policies apply (1.6)."""
        port = self._switch.ports.get(port_id)
        if port_id != DEFAULT_PORT_ID and (port is None or nic_index not in port.nics
                                           or port.nics[nic_index].state != NicState.CONNECTED):
            raise ContractViolation(self._ext.name, 19,
                                    f"set_source to port {port_id} NIC {nic_index}, "
                                    "which is not a connected NIC")
        batch.meta[SRC_PORT, :batch.n] = port_id
        batch.meta[SRC_NIC, :batch.n] = nic_index

    def inject(self, batch: PacketBatch, path: str = "ingress") -> None:
        """Send packets into the switch below this extension."""
        if path not in ("ingress", "egress"):
            raise ValueError(f"inject path {path!r}: expected ingress or egress")
        name, kind = self._ext.name, self._ext.kind
        if path == "egress":
            if kind != "forwarding":
                raise ContractViolation(name, 9, f"a {kind} extension injected on egress")
            m = batch.meta
            if batch.n and not np.all(m[FLAGS, :batch.n] & F_CLONE):
                raise ContractViolation(name, 9, "only clones (with destinations) may be "
                                        "injected on egress; originate on ingress")
            if batch.n and (m[NDST, :batch.n] <= 0).any():
                raise ContractViolation(name, 8, "egress packets must carry destinations")
        else:
            batch.meta[NDST, :batch.n] = 0      # A.10: recomputed below
        batch.meta[FLAGS, :batch.n] |= F_INJECTED | F_SAFE
        self._switch.queue_injection(self._ext, batch, path)

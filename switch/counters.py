"""Drop reasons and counters: per port, per reason, and per switch.

Every drop and every exclusion is reported with a reason, and counted on the
port it concerns: the source port for a drop ("incoming"), the intended
destination for an exclusion (vswitch_vmq_sriov.md 1.5,
ReportFilteredNetBufferLists; checklist A.7). Drops caused by extensions are
also summed as "extension dropped", as the switch's performance counters do
(2.7).
"""
from __future__ import annotations

import threading

import numpy as np

MAX_REASONS = 256
EXT_REASON_BASE = 64     # codes from here up belong to extensions

# Built-in reasons (code -> text). Code 0 means "not dropped".
RUNT = 1
NO_DEST = 2
VLAN_INGRESS = 3
VLAN_EGRESS = 4
SOURCE_NOT_CONNECTED = 5
MAC_SPOOF = 6
DHCP_GUARD = 7
ROUTER_GUARD = 8
ACL_OUTBOUND = 9
ACL_INBOUND = 10
QINQ = 11
CONTRACT = 12
EXT_FAULT = 13
INJECT_LOOP = 14
TX_FULL = 15
BAD_SOURCE_MAC = 16
DEST_NOT_CONNECTED = 17
MTU = 18
STORM = 19
GSO_FAILED = 20
NIC_FILTER = 21
VMQ_FULL = 22

BUILTIN_REASONS = {
    RUNT: "malformed: shorter than an Ethernet header or truncated tag",
    NO_DEST: "no destinations (none added, or all excluded)",
    VLAN_INGRESS: "VLAN not allowed on the source port",
    VLAN_EGRESS: "VLAN not allowed on the destination port",
    SOURCE_NOT_CONNECTED: "source NIC is not connected",
    MAC_SPOOF: "MAC spoofing: source MAC is not the port's MAC",
    DHCP_GUARD: "DHCP guard: DHCP server message from the port",
    ROUTER_GUARD: "router guard: router advertisement or redirect from the port",
    ACL_OUTBOUND: "port ACL denied (outbound from the port)",
    ACL_INBOUND: "port ACL denied (inbound to the port)",
    QINQ: "802.1ad (QinQ) frame: not switched by built-in forwarding",
    CONTRACT: "extension contract violation",
    EXT_FAULT: "extension hook raised an error",
    INJECT_LOOP: "injection depth exceeded (extension loop)",
    TX_FULL: "destination port could not take the frame (queue full)",
    BAD_SOURCE_MAC: "source MAC is multicast",
    DEST_NOT_CONNECTED: "destination NIC is not connected",
    MTU: "frame exceeds the destination port's MTU",
    STORM: "storm limit: broadcast/multicast over the per-second cap",
    GSO_FAILED: "could not segment for a port without offloads (bad GSO state)",
    NIC_FILTER: "the destination NIC's packet filter takes nothing",
    VMQ_FULL: "the VMQ receive queue's worker had no free buffer (queue full)",
}

# Per-port counter columns
RX_PKTS = 0      # frames the port sent into the switch
RX_BYTES = 1
TX_PKTS = 2      # frames the switch delivered to the port
TX_BYTES = 3
DROP_IN = 4      # dropped with this port as source
DROP_OUT = 5     # excluded/dropped with this port as destination
EXT_DROP_IN = 6  # ... of which by an extension
EXT_DROP_OUT = 7
RX_BCAST = 8
RX_MCAST = 9
TX_BCAST = 10
TX_MCAST = 11
NPORTCOUNTERS = 12
# One row per port: the counters above, then drops in by reason, then drops out by
# reason; kernels take the whole table (one array argument, not three).
DROP_IN_BASE = NPORTCOUNTERS
DROP_OUT_BASE = NPORTCOUNTERS + MAX_REASONS
NCOLS = NPORTCOUNTERS + 2 * MAX_REASONS
PORT_COUNTER_NAMES = ("rx_packets", "rx_bytes", "tx_packets", "tx_bytes", "dropped_in",
                      "dropped_out", "ext_dropped_in", "ext_dropped_out", "rx_broadcast",
                      "rx_multicast", "tx_broadcast", "tx_multicast")

# Switch-wide counters
SW_LEARNED = 0
SW_PURGED = 1
SW_FLOODED = 2
SW_MOVED = 3     # a known MAC seen on another port
SW_INJECTED = 4
SW_VIOLATIONS = 5
NSWCOUNTERS = 6
SWITCH_COUNTER_NAMES = ("learned_macs", "purged_macs", "flooded_packets", "mac_moves",
                        "injected_packets", "contract_violations")


class Counters:
    """All counters of one switch, as arrays the kernels update in place.

    A thread that counts beside the data-path thread (a VMQ queue's worker) counts
    in a table of its own (``use_private``), as NDIS keeps counters per processor:
    two threads adding to one cell can lose a count. Readers sum the tables."""

    def __init__(self, max_ports: int):
        self.table = np.zeros((max_ports + 1, NCOLS), dtype=np.int64)
        self.private: list[np.ndarray] = []
        self._here = threading.local()
        # views of the data-path thread's table only (its own kernels and benches)
        self.port = self.table[:, :NPORTCOUNTERS]
        self.drop_in = self.table[:, DROP_IN_BASE:DROP_OUT_BASE]
        self.drop_out = self.table[:, DROP_OUT_BASE:]
        self.switch = np.zeros(NSWCOUNTERS, dtype=np.int64)
        self.reasons: dict[int, str] = dict(BUILTIN_REASONS)
        self.reason_owner: dict[int, str] = {}
        self._next_ext = EXT_REASON_BASE

    def register_reason(self, owner: str, text: str) -> int:
        for code, t in self.reasons.items():
            if t == text and self.reason_owner.get(code) == owner:
                return code
        if self._next_ext >= MAX_REASONS:
            raise RuntimeError(f"no drop-reason codes left for {owner!r} ({MAX_REASONS} in all)")
        code = self._next_ext
        self._next_ext += 1
        self.reasons[code] = text
        self.reason_owner[code] = owner
        return code

    def reason_text(self, code: int) -> str:
        text = self.reasons.get(code, f"unknown reason {code}")
        owner = self.reason_owner.get(code)
        return f"{owner}: {text}" if owner else text

    def use_private(self) -> np.ndarray:
        """Give the calling thread a table of its own; ``here`` returns it there."""
        t = np.zeros_like(self.table)
        self.private.append(t)
        self._here.table = t
        return t

    def here(self) -> np.ndarray:
        """The table the calling thread counts in."""
        return getattr(self._here, "table", self.table)

    def row(self, port_id: int) -> np.ndarray:
        """One port's counters, every thread's table summed."""
        r = self.table[port_id].copy()
        for t in self.private:
            r += t[port_id]
        return r

    def port_dict(self, port_id: int) -> dict:
        row = self.row(port_id)
        out = {name: int(row[k]) for k, name in enumerate(PORT_COUNTER_NAMES)}
        out["drops_in"] = {self.reason_text(c): int(v) for c, v in
                           enumerate(row[DROP_IN_BASE:DROP_OUT_BASE]) if v}
        out["drops_out"] = {self.reason_text(c): int(v) for c, v in
                            enumerate(row[DROP_OUT_BASE:]) if v}
        return out

    def switch_dict(self) -> dict:
        return {name: int(self.switch[k]) for k, name in enumerate(SWITCH_COUNTER_NAMES)}

    def clear_port(self, port_id: int) -> None:
        self.table[port_id] = 0
        for t in self.private:
            t[port_id] = 0

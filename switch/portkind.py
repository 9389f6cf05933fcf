"""The port interface: how a kind of port (in-memory, tap, uplink, NetVSP...) moves
frames in and out of the switch.

A port kind owns any number of the switch's ports and moves their frames in
batches: ``receive`` fills a batch from all of its ports at once, ``transmit``
sends everything the switch planned for its ports in one call (one compiled
loop per kind per batch, not one call per port). The switch knows nothing else
about NICs (DESIGN.md: ``switch`` knows nothing of NICs).
"""
from __future__ import annotations

import numpy as np


class PortKind:
    name = "port kind"

    def __init__(self):
        self.switch = None
        self.port_ids = np.zeros(0, dtype=np.int64)

    def bind(self, switch) -> None:
        self.switch = switch

    def port_added(self, port) -> None:
        self.port_ids = np.array(sorted(set(self.port_ids.tolist()) | {port.port_id}),
                                 dtype=np.int64)

    def port_removed(self, port) -> None:
        self.port_ids = np.array([p for p in self.port_ids.tolist() if p != port.port_id],
                                 dtype=np.int64)

    def fds(self) -> list[int]:
        """File descriptors that become readable when this kind has frames to receive;
        empty if it cannot be waited on (then the switch polls it)."""
        return []

    def port_info(self, port_id: int) -> dict | None:
        """What the kind knows of one port beyond the switch's counters (the NIC's
        state and its own drop reasons), for ``Switch.stats``; None if nothing."""
        return None

    def deadline(self) -> float | None:
        """When (time.monotonic()) the kind next needs a poll although no descriptor
        of it becomes readable (a device timer); None if never. The switch's idle
        wait ends by then."""
        return None

    def warm(self) -> None:
        """Compile (or load) kernels the kind runs only once traffic flows, so the
        first packets do not wait for numba (Switch.warm calls it)."""

    def receive(self, batch) -> int:
        """Fill ``batch`` (from 0) with frames from this kind's ports; return the count."""
        return 0

    # Sorts a received batch into receive queues once it is parsed (VMQ on an
    # external port, switch/vmq.py), or None.
    steer = None

    # True when ``transmit`` may be called outside the switch's data-path lock, from
    # a VMQ queue's worker beside the data-path thread (switch/vmq_workers.py): the
    # kind then serialises each port's transmit against its own receive and control
    # path, and against the port's removal, itself.
    concurrent = False

    def transmit(self, batch, plan, span) -> None:
        """Send ``plan[:, span[q,0]:span[q,1]]`` for each of this kind's ports q."""

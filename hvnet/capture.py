"""``hvnet capture``: one port's traffic, both directions, to a pcap file.

A capture extension (it only looks: vswitch_vmq_sriov.md 1.2, checklist A.3)
installed on the port's switch for as long as the capture runs. Ingress keeps
what the port sent into the switch; egress keeps what the switch delivered to
it, after forwarding and policies, so dropped frames show only on the side they
reached. Frames are written by the compiled ``pcap_records`` loop, one write
per batch; tags held out of band are put back as they are on the wire.
"""
from __future__ import annotations

import itertools
import time

from switch.extension import CaptureExtension
from switch.pcap import PcapWriter

_ids = itertools.count(1)


class PortCapture(CaptureExtension):
    def __init__(self, path: str, port_id: int, port_name: str):
        super().__init__(f"hvnet-capture-{next(_ids)}")
        self.path, self.port_id, self.port_name = str(path), port_id, port_name
        self.writer = PcapWriter(self.path)

    @property
    def frames(self) -> int:
        return self.writer.records

    def ingress(self, pkts, act):
        self.writer.write_batch(pkts.meta, pkts.data, pkts.n, time.time_ns(),
                                port=self.port_id)

    def egress(self, pkts, act):
        self.writer.write_batch(pkts.meta, pkts.data, pkts.n, time.time_ns(),
                                port=self.port_id, egress=True)

    def close(self) -> None:
        self.writer.close()

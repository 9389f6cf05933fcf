"""Example capture extension: write every packet entering the switch to a pcap file.

A capture extension only looks (vswitch_vmq_sriov.md 1.2, checklist A.3): its
hook gets read-only arrays and no action arrays. The per-packet loop is the njit
kernel ``pcap_records`` behind ``PcapWriter``; Python runs once per batch.
"""
from __future__ import annotations

import time

from switch.extension import CaptureExtension
from switch.pcap import PcapWriter


class PcapCapture(CaptureExtension):
    """``direction``: "ingress" (what ports send into the switch) or "egress" (what the
    switch delivers, once per packet; dropped packets are left out)."""

    def __init__(self, path, direction: str = "ingress", name: str = "pcap-capture"):
        super().__init__(name)
        if direction not in ("ingress", "egress"):
            raise ValueError("direction must be ingress or egress")
        self.writer = PcapWriter(path)
        if direction == "ingress":
            self.ingress = self._hook
        else:
            self.egress = self._hook

    def _hook(self, pkts, act):
        self.writer.write_batch(pkts.meta, pkts.data, pkts.n, time.time_ns())

    def detach(self):
        self.writer.close()

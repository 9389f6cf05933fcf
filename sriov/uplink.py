"""An SR-IOV NIC as a switch's uplink: the external port is the NIC's PF, and the
NIC's embedded switch sits between the wire (the uplink's AF_PACKET rings), the PF
and the VFs (vswitch_vmq_sriov.md 4.1).

- From the wire: each received batch is steered by the embedded switch; frames for
  VFs go into their receive rings, and the batch keeps only the PF's, which the
  virtual switch then takes as the external port's.
- From the VFs: their transmit rings are run on every receive; a frame for the wire
  leaves on the ring at once, a frame for the PF joins the batch as the external
  port's (the virtual switch switches it to the synthetic VMs, as frames between a
  VF and a VM with no VF go in Hyper-V), a frame for another VF stays in the NIC.
- From the switch: what the switch delivers to the external port is the PF sending;
  it is steered again, to VFs or out to the wire.

VF traffic never passes the switch's extensions or policies (4.3).
"""
from __future__ import annotations

import os

import numpy as np

from switch.afpacket import PacketRingPorts, ring_transmit
from switch.batch import (ALIGN, CSUM_OFF, CSUM_START, D_TAG_SHIFT, D_TAGGED, F_CSUM_PARTIAL,
                          F_CSUM_VALID, F_VLAN,
                          FLAGS, GSO_SIZE, GSO_TYPE, LEN, NFIELDS, OFF, ROW_PAD, TCI,
                          PacketBatch, copy_bytes, init_packet)
from switch.kernel import kernel

from .eswitch import PF
from .nic import SriovNic


@kernel
def keep_marked(meta, n, dest, bit):
    """Keep the frames whose ``dest`` has ``bit``, in order, in the first rows."""
    k = 0
    for i in range(n):
        if (dest[i] >> bit) & 1:
            if k != i:
                for f in range(NFIELDS):
                    meta[f, k] = meta[f, i]
            k += 1
    return k


@kernel
def egress_tags(meta, n, plan, j0):
    """Frames ``0..n`` of a batch, copied from the deliveries ``plan[:, j0:]``:
    their 802.1Q tag becomes the one the switch decided on (D_TAGGED in the
    delivery word: the VLAN modes, vswitch_vmq_sriov.md 2.3), else none; out of
    band, as the embedded switch and the wire take it."""
    for i in range(n):
        d = plan[1, j0 + i]
        if d & D_TAGGED:
            meta[FLAGS, i] |= F_VLAN
            meta[TCI, i] = (d >> D_TAG_SHIFT) & 0xFFFF
        else:
            meta[FLAGS, i] &= ~F_VLAN
            meta[TCI, i] = 0


@kernel
def append_frames(meta, data, n, cursor, src_meta, src_data, idx, port_id):
    """Copy frames ``idx`` of another batch behind ``n`` frames, received as
    ``port_id``'s, each with the 802.1Q tag it carried out of band and its
    pending offloads (partial checksum, segmentation). Returns (n, cursor); stops
    where the batch is full."""
    cap = meta.shape[1] - ROW_PAD
    for j in range(idx.shape[0]):
        i = idx[j]
        ln = src_meta[LEN, i]
        off = src_meta[OFF, i]
        if n >= cap or ln < 0 or off < 0 or off > src_data.shape[0] - ln or \
                cursor > data.shape[0] - ln:
            break
        copy_bytes(data, cursor, src_data, off, ln)
        init_packet(meta, n, cursor, ln, port_id, 0)
        fl = src_meta[FLAGS, i]
        if fl & F_VLAN:
            meta[FLAGS, n] |= F_VLAN
            meta[TCI, n] = src_meta[TCI, i]
        meta[FLAGS, n] |= fl & (F_CSUM_PARTIAL | F_CSUM_VALID)
        meta[CSUM_START, n] = src_meta[CSUM_START, i]
        meta[CSUM_OFF, n] = src_meta[CSUM_OFF, i]
        meta[GSO_TYPE, n] = src_meta[GSO_TYPE, i]
        meta[GSO_SIZE, n] = src_meta[GSO_SIZE, i]
        cursor = (cursor + ln + ALIGN - 1) & ~(ALIGN - 1)
        n += 1
    return n, cursor


class SriovUplinkPorts(PacketRingPorts):
    """The external port of a switch whose uplink is ``nic``."""
    name = "sriov_uplink"

    def __init__(self, nic: SriovNic):
        super().__init__()
        self.nic = nic
        nic.to_wire = self._to_wire
        nic.to_pf = self._to_pf
        self._rx: PacketBatch | None = None      # the switch's batch being filled
        self._side = PacketBatch(256, 1 << 22)

    def fds(self) -> list[int]:
        return super().fds() + self.nic.doorbells()

    def _port(self) -> int:
        return int(self.port_ids[0]) if self.port_ids.size else -1

    # ---- receive: the wire and the VFs into the switch ---------------------------------
    def receive(self, batch) -> int:
        n = super().receive(batch)
        batch.n = n
        if n:
            # VF frames go into their rings; the batch keeps what the PF takes
            dest = self.nic.from_wire(batch, outside=False)
            batch.n = keep_marked(batch.meta, n, dest, PF)
        self._rx = batch
        ready = self.switch.ready_fds if self.switch is not None else None
        for fd in self.nic.doorbells():           # the VFs' TDT ioeventfds, emptied when
            if ready is None or fd in ready:      # epoll saw them (no syscall otherwise)
                try:
                    os.eventfd_read(fd)
                except BlockingIOError:
                    pass
        self.nic.poll()                           # VF frames: _to_wire / _to_pf
        self._rx = None
        return batch.n

    def _to_pf(self, b, idx) -> None:
        rx = self._rx
        if rx is None or self._port() < 0:
            return
        rx.n, rx.cursor = append_frames(rx.meta, rx.data, rx.n, rx.cursor, b.meta, b.data,
                                        np.asarray(idx, np.int64), self._port())

    def _to_wire(self, b, idx) -> None:
        q = self._port()
        if q < 0 or not self.socks:
            return
        k = len(idx)
        plan = np.zeros((2, k), np.int64)
        plan[0] = idx
        # a tag carried out of band goes back on the wire (the ring writes it)
        tagged = (b.meta[FLAGS, idx] & F_VLAN) != 0
        plan[1] = q | np.where(tagged, D_TAGGED | ((b.meta[TCI, idx] & 0xFFFF) << D_TAG_SHIFT),
                               0)
        span = np.zeros((int(self.port_ids.max()) + 1, 2), np.int64)   # every id it reads
        span[q] = (0, k)
        ring_transmit(b.meta, b.data, plan, span, self.port_ids, self.fd_array, self.rings,
                      self.tx_bases, self.frame_size, self.frame_nr, self.layout, self.states,
                      self.vnets, self.scratch, self.seglens, self.switch.counters.table,
                      self.bad)

    # ---- transmit: the PF sending ---------------------------------------------------
    def transmit(self, batch, plan, span) -> None:
        q = self._port()
        if q < 0 or span[q, 1] <= span[q, 0]:
            return
        side = self._side
        side.reset()
        idx = plan[0, span[q, 0]:span[q, 1]]
        side.n, side.cursor = append_frames(side.meta, side.data, 0, 0, batch.meta,
                                            batch.data, idx, q)
        egress_tags(side.meta, side.n, plan, span[q, 0])
        if side.n:
            self.nic.from_pf(side)                 # VFs get theirs, the wire the rest

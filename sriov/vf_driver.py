"""The VF driver on the guest side: ixgbevf's bring-up and its ring work, over any
vfio device (kernel vfio, or the software NIC through vfio-user) whose DMA reaches
the guest's RAM (e1000_vfio.md B.10 bring-up; B.3 for the vfio side).

Bring-up, as ixgbevf: interrupts masked, VFCTRL.RST and RSTD, VF_RESET (the MAC),
API negotiation, then queue pair 0: receive buffers of SRRCTL's size with DROP_EN,
RDT one behind, transmit ring, both enabled; MSI-X vector 0 on an eventfd,
unmasked. The rings and buffers live in guest RAM, DMA-mapped whole at IOVA 0
(the guest's physical addresses).

The ring work is two compiled loops over batch arrays: ``guest_tx`` puts frames into
transmit slots and descriptors (RS on each, reclaimed by DD) and moves TDT;
``guest_rx`` takes frames whose descriptors have DD, re-arms them and moves RDT.
The tails are written straight into the mapped queue-register page; TDT's
ioeventfd tells the device, as KVM would on the MMIO write.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from switch.batch import ALIGN, LEN, OFF, ROW_PAD, copy_bytes, init_packet
from switch.byteorder import le32, put_le, put_le32
from switch.kernel import kernel

from . import ixgbevf as X
from . import ixgbevf_rings as R
from .vfio import lib

NDESC = 256
BUF = 2048                         # receive buffer (SRRCTL.BSIZEPKT = 2 KiB)
SLOT = 2048                        # transmit slot: frames up to a standard MTU here
MAX_TX = SLOT
# st[]: next to use / clean (tx), next to clean (rx)
S_TX_USE, S_TX_CLEAN, S_RX_CLEAN = 0, 1, 2


@kernel
def guest_tx(mem, q, ring, nd, st, slots, meta, data, n):
    """Frames 0..n of the batch into transmit descriptors; returns how many went
    (the rest wait for room)."""
    use, clean = st[S_TX_USE], st[S_TX_CLEAN]
    while clean != use and le32(mem, ring + clean * 16 + 12) & R.TXD_STAT_DD:
        clean = (clean + 1) % nd                       # done by the device: reclaimed
    sent = 0
    for i in range(n):
        if (use + 1) % nd == clean:
            break
        ln = meta[LEN, i]
        off = meta[OFF, i]
        if ln < 14 or ln > MAX_TX or off < 0 or off > data.shape[0] - ln:
            sent += 1                                  # not sendable: dropped here
            continue
        slot = slots + use * SLOT
        copy_bytes(mem, slot, data, off, ln)
        d = ring + use * 16
        put_le(mem, d, slot, 8)                        # IOVA = GPA
        put_le32(mem, d + 8, ln | (R.TXD_DTYP_DATA << R.TXD_DTYP_SHIFT) | R.TXD_CMD_DEXT
                 | R.TXD_CMD_EOP | R.TXD_CMD_IFCS | R.TXD_CMD_RS)
        put_le32(mem, d + 12, ln << 14)                # PAYLEN; DD clear
        use = (use + 1) % nd
        sent += 1
    st[S_TX_USE] = use
    st[S_TX_CLEAN] = clean
    q[(R.TX_BASE + R.R_TAIL) >> 2] = use
    return sent


@kernel
def guest_rx(mem, q, ring, nd, st, bufs, meta, data, src_port):
    """Frames the device wrote (DD) into the batch, their descriptors re-armed."""
    cap = meta.shape[1] - ROW_PAD
    clean = st[S_RX_CLEAN]
    n = 0
    cursor = 0
    moved = False
    while n < cap:
        d = ring + clean * 16
        status = le32(mem, d + 8)
        if status & R.RXD_STAT_DD == 0:
            break
        ln = le32(mem, d + 12) & 0xFFFF
        buf = bufs + clean * BUF
        if status & R.RXD_STAT_EOP and 14 <= ln <= BUF and cursor <= data.shape[0] - ln:
            copy_bytes(data, cursor, mem, buf, ln)
            init_packet(meta, n, cursor, ln, src_port, 0)
            n += 1
            cursor = (cursor + ln + ALIGN - 1) & ~(ALIGN - 1)
        put_le(mem, d, buf, 8)                          # re-armed: read format again
        put_le(mem, d + 8, 0, 8)
        clean = (clean + 1) % nd
        moved = True
    st[S_RX_CLEAN] = clean
    if moved:
        q[(R.RX_BASE + R.R_TAIL) >> 2] = (clean - 1) % nd
    return n


class VfDriver:
    """ixgbevf for one VF: ``dev`` a vfio device (``sriov.vfio.Device`` or a
    ``vfio_user.Client``), ``ram`` the guest's memory (a GuestMemory), ``pages`` the
    guest's page allocator."""

    def __init__(self, dev, ram, pages):
        self.dev, self.ram, self.pages = dev, ram, pages
        self.mb = X.Mailbox(dev)
        self.st = np.zeros(3, np.int64)
        self.irq = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.doorbell = -1
        self.mac: bytes | None = None

    def _wr(self, off: int, v: int) -> None:
        self.dev.region_write(lib.VFIO_PCI_BAR0_REGION_INDEX, off, struct.pack("<I", v))

    def _rd(self, off: int) -> int:
        return struct.unpack("<I", self.dev.region_read(lib.VFIO_PCI_BAR0_REGION_INDEX,
                                                        off, 4))[0]

    def bring_up(self, own_mac: bytes | None = None) -> bytes:
        dev = self.dev
        if hasattr(dev, "dma_map"):                    # vfio-user: grant the RAM
            dev.dma_map(self.ram.fd, 0, 0, self.ram.size)
        dev.enable_bus_master()
        self._wr(X.VTEIMC, 7)                          # interrupts masked
        self._rd(X.VTEICR)
        mac = self.mb.reset_vf()
        if mac is None:                                # NACK: pick one, ask for it
            mac = own_mac or bytes([0x02]) + os.urandom(5)
            r = self.mb.request([X.SET_MAC_ADDR, *X.mac_words(mac)])
            if not r[0] & X.MSG_ACK:
                raise OSError("the PF refused the VF's MAC")
        self.mac = mac
        self.api = self.mb.negotiate()
        bar = dev.region(lib.VFIO_PCI_BAR0_REGION_INDEX)
        self.qmap = dev.map_region(bar)
        self.q = np.frombuffer(self.qmap, np.uint32)
        for (off, _, fd) in getattr(dev, "region_io_fds", lambda i: [])(
                lib.VFIO_PCI_BAR0_REGION_INDEX):
            if off == R.QREGS + R.TX_BASE + R.R_TAIL:
                self.doorbell = fd
        mem = self.ram.mem
        self.rx_ring = self.pages.alloc(NDESC * 16)
        self.tx_ring = self.pages.alloc(NDESC * 16)
        self.rx_bufs = self.pages.alloc(NDESC * BUF)
        self.tx_slots = self.pages.alloc(NDESC * SLOT)
        for k in range(NDESC):                         # every buffer to the device
            d = self.rx_ring + 16 * k
            mem[d:d + 16] = np.frombuffer(struct.pack("<QQ", self.rx_bufs + k * BUF, 0),
                                          np.uint8)
        mem[self.tx_ring:self.tx_ring + NDESC * 16] = 0
        q = self.q
        for base, ring in ((R.RX_BASE, self.rx_ring), (R.TX_BASE, self.tx_ring)):
            q[(base + R.R_BAL) >> 2] = ring & 0xFFFFFFFF
            q[(base + R.R_BAH) >> 2] = ring >> 32
            q[(base + R.R_LEN) >> 2] = NDESC * 16
            q[(base + R.R_HEAD) >> 2] = 0
            q[(base + R.R_TAIL) >> 2] = 0
        q[(R.RX_BASE + R.R_SRRCTL) >> 2] = (BUF // 1024) | R.SRRCTL_DROP_EN
        q[(R.RX_BASE + R.R_DCTL) >> 2] = R.DCTL_ENABLE
        q[(R.RX_BASE + R.R_TAIL) >> 2] = NDESC - 1     # one kept back, as ixgbevf
        q[(R.TX_BASE + R.R_DCTL) >> 2] = R.DCTL_ENABLE
        dev.set_irq_eventfds(lib.VFIO_PCI_MSIX_IRQ_INDEX, [self.irq])
        self._wr(X.VTEIMS, 1)
        if not self._rd(X.VFLINKS) & X.LINKS_UP:
            raise OSError("the VF's link is down")
        return mac

    def send(self, batch) -> int:
        n = guest_tx(self.ram.mem, self.q, self.tx_ring, NDESC, self.st, self.tx_slots,
                     batch.meta, batch.data, batch.n)
        if n and self.doorbell >= 0:
            os.eventfd_write(self.doorbell, 1)
        return n

    def receive(self, batch, src_port: int = 0) -> int:
        batch.reset()
        batch.n = guest_rx(self.ram.mem, self.q, self.rx_ring, NDESC, self.st, self.rx_bufs,
                           batch.meta, batch.data, src_port)
        return batch.n

    def close(self) -> None:
        self.q = None
        os.close(self.irq)
        if self.doorbell >= 0:
            os.close(self.doorbell)

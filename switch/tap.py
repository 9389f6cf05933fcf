"""Tap ports: Linux tap devices with virtio-net headers, moved in compiled loops.

A tap opened with IFF_VNET_HDR and offloads enabled (TUNSETOFFLOAD) hands over
whole GSO super-packets with their checksum state in a 10-byte virtio_net_hdr,
and takes them back the same way, so a 64 KiB TCP segment crosses the switch as
one packet and nobody computes a checksum on the way (DESIGN.md, "Offloads end
to end"). Receive reads every ready tap into the batch arena, one read() per
frame, header included; transmit writes header and frame with one writev() per
delivery. Both run as one kernel per batch for all taps of the kind.

virtio_net_hdr (little endian): flags u8 (1 = NEEDS_CSUM, 2 = DATA_VALID),
gso_type u8 (0 none, 1 TCPv4, 3 UDP, 4 TCPv6, 0x80 ECN), hdr_len u16,
gso_size u16, csum_start u16, csum_offset u16 — linux/virtio_net.h.
"""
from __future__ import annotations

import fcntl
import os
import struct

import numpy as np

from . import counters as R
from .byteorder import le16
from .batch import (ALIGN, CSUM_OFF, CSUM_START, D_TAGGED, F_CSUM_PARTIAL, F_CSUM_VALID, FLAGS,
                    GSO_SIZE, GSO_TYPE, LEN, OFF, ROW_PAD, init_packet)
from .delivery import tx_failed
from .kernel import kernel
from .portkind import PortKind
from .syscalls import read, writev

TUNSETIFF = 0x400454CA
TUNSETOFFLOAD = 0x400454D0
TUNSETVNETHDRSZ = 0x400454D8
TUNSETCARRIER = 0x400454E2          # _IOW('T', 226, int), Linux 4.19+
IFF_TAP = 0x0002
IFF_NO_PI = 0x1000
IFF_VNET_HDR = 0x4000
IFF_MULTI_QUEUE = 0x0100
TUN_F_CSUM, TUN_F_TSO4, TUN_F_TSO6, TUN_F_TSO_ECN = 0x01, 0x02, 0x04, 0x08
VNET_HDR = 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
MAX_FRAME = 65536 + 64          # a GSO super-packet, an 802.1Q tag and a little slack


def open_tap(ifname: str, offloads: bool = True, multi_queue: bool = False) -> int:
    """Attach to the tap ``ifname`` in this process's current network namespace.
    ``multi_queue``: attach one more queue of a tap made with IFF_MULTI_QUEUE
    (each open is a queue; the kernel spreads the flows it sends over them)."""
    fd = os.open("/dev/net/tun", os.O_RDWR | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        flags = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR | (IFF_MULTI_QUEUE if multi_queue else 0)
        ifr = struct.pack("16sH22x", ifname.encode(), flags)
        fcntl.ioctl(fd, TUNSETIFF, ifr)
        fcntl.ioctl(fd, TUNSETVNETHDRSZ, struct.pack("i", VNET_HDR))
        flags = (TUN_F_CSUM | TUN_F_TSO4 | TUN_F_TSO6 | TUN_F_TSO_ECN) if offloads else 0
        fcntl.ioctl(fd, TUNSETOFFLOAD, flags)
    except OSError as e:
        os.close(fd)
        raise OSError(e.errno, f"cannot attach to tap {ifname!r}: {e.strerror}") from None
    return fd


def set_carrier(fd: int, up: bool) -> None:
    """Turn the tap's carrier on or off (what a NIC driver's netif_carrier_on/off
    does): with it off the guest's stack marks the link NO-CARRIER and stops sending."""
    fcntl.ioctl(fd, TUNSETCARRIER, struct.pack("i", 1 if up else 0))


@kernel
def tap_receive(fds, port_ids, meta, data, budget):
    """Read ready frames from each tap (round robin) into the batch. Returns (n, cursor)."""
    cap = meta.shape[1] - ROW_PAD
    n = 0
    cursor = 0
    ntaps = fds.shape[0]
    idle = 0
    t = 0
    while n < cap and idle < ntaps and n < budget:
        if cursor + VNET_HDR + MAX_FRAME > data.shape[0]:
            break
        got = read(fds[t], data.ctypes.data + cursor, VNET_HDR + MAX_FRAME)
        if got <= VNET_HDR:
            idle += 1                      # EAGAIN, or nothing usable: next tap
        else:
            idle = 0
            h = cursor
            init_packet(meta, n, cursor + VNET_HDR, got - VNET_HDR, port_ids[t], 0)
            fl = data[h]
            if fl & VNET_F_NEEDS_CSUM:
                meta[FLAGS, n] |= F_CSUM_PARTIAL
                meta[CSUM_START, n] = le16(data, h + 6)
                meta[CSUM_OFF, n] = le16(data, h + 8)
            elif fl & VNET_F_DATA_VALID:
                meta[FLAGS, n] |= F_CSUM_VALID
            meta[GSO_TYPE, n] = data[h + 1]
            meta[GSO_SIZE, n] = le16(data, h + 4)
            cursor = (cursor + got + ALIGN - 1) & ~(ALIGN - 1)
            n += 1
        t += 1
        if t == ntaps:
            t = 0
    return n, cursor


@kernel
def tap_transmit(meta, data, plan, span, port_ids, fds, hdr, iov, ctr):
    """Write each planned frame to its tap, virtio header first (its offload state):
    one writev() per delivery, the frame taken from the arena where it lies (a tag
    the switch puts on goes in as a third piece), so no byte of it is copied here."""
    base = data.ctypes.data
    hbase = hdr.ctypes.data
    for pi in range(port_ids.shape[0]):
        q = port_ids[pi]
        fd = fds[pi]
        for j in range(span[q, 0], span[q, 1]):
            i = plan[0, j]
            d = plan[1, j]
            ln = meta[LEN, i]
            off = meta[OFF, i]
            if off < 0 or ln < 0 or off > data.shape[0] or ln > data.shape[0] - off:
                tx_failed(ctr, q, ln, d, R.TX_FULL)
                continue
            for b in range(VNET_HDR):
                hdr[b] = 0
            fl = meta[FLAGS, i]
            tagged = (d & D_TAGGED) != 0 and ln >= 12
            shift = 4 if tagged else 0          # a tag put on moves the offsets by 4
            if fl & F_CSUM_PARTIAL:
                hdr[0] = VNET_F_NEEDS_CSUM
                cs = meta[CSUM_START, i] + shift
                hdr[6] = cs & 0xFF
                hdr[7] = (cs >> 8) & 0xFF
                hdr[8] = meta[CSUM_OFF, i] & 0xFF
                hdr[9] = (meta[CSUM_OFF, i] >> 8) & 0xFF
            elif fl & F_CSUM_VALID:
                hdr[0] = VNET_F_DATA_VALID
            hdr[1] = meta[GSO_TYPE, i]
            gs = meta[GSO_SIZE, i]
            hdr[4] = gs & 0xFF
            hdr[5] = (gs >> 8) & 0xFF
            iov[0] = hbase
            iov[1] = VNET_HDR
            if tagged:
                tci = (d >> 48) & 0xFFFF
                hdr[16] = 0x81
                hdr[17] = 0x00
                hdr[18] = (tci >> 8) & 0xFF
                hdr[19] = tci & 0xFF
                iov[2] = base + off
                iov[3] = 12
                iov[4] = hbase + 16
                iov[5] = 4
                iov[6] = base + off + 12
                iov[7] = ln - 12
                cnt = 4
            else:
                iov[2] = base + off
                iov[3] = ln
                cnt = 2
            if writev(fd, iov.ctypes.data, cnt) < 0:
                tx_failed(ctr, q, ln, d, R.TX_FULL)


class TapPorts(PortKind):
    """The switch side of tap devices: one fd per port, opened with ``open_tap``."""
    name = "tap"

    def __init__(self):
        super().__init__()
        self.fd_array = np.zeros(0, dtype=np.int64)
        self._fd_of: dict[int, int] = {}
        self.hdr = np.zeros(32, dtype=np.uint8)        # virtio header, then a tag
        self.iov = np.zeros(8, dtype=np.int64)         # up to 4 struct iovec

    def attach(self, port, fd: int) -> None:
        """Serve ``port`` with the tap open on ``fd`` (this object closes it on removal)."""
        self._fd_of[port.port_id] = fd
        self.port_added(port)

    def port_added(self, port) -> None:
        super().port_added(port)
        self._sync()

    def port_removed(self, port) -> None:
        super().port_removed(port)
        fd = self._fd_of.pop(port.port_id, None)
        if fd is not None:
            os.close(fd)
        self._sync()

    def _sync(self) -> None:
        ids = [p for p in self.port_ids.tolist() if p in self._fd_of]
        self.port_ids = np.array(ids, dtype=np.int64)
        self.fd_array = np.array([self._fd_of[p] for p in ids], dtype=np.int64)

    def fds(self) -> list[int]:
        return list(self._fd_of.values())

    def receive(self, batch) -> int:
        if not self.fd_array.shape[0]:
            return 0
        n, batch.cursor = tap_receive(self.fd_array, self.port_ids, batch.meta, batch.data,
                                      batch.capacity)
        return n

    def transmit(self, batch, plan, span) -> None:
        if self.fd_array.shape[0]:
            tap_transmit(batch.meta, batch.data, plan, span, self.port_ids, self.fd_array,
                         self.hdr, self.iov, self.switch.counters.table)

    def close(self) -> None:
        for fd in self._fd_of.values():
            os.close(fd)
        self._fd_of.clear()
        self.port_ids = np.zeros(0, dtype=np.int64)
        self._sync()

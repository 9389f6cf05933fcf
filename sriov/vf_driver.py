"""The VF driver on the guest side: ixgbevf's bring-up and its ring work, over any
vfio device (kernel vfio, or the software NIC through vfio-user) whose DMA reaches
the guest's RAM (e1000_vfio.md B.10 bring-up; B.3 for the vfio side).

Bring-up, as ixgbevf: interrupts masked, VFCTRL.RST and RSTD, VF_RESET (the MAC),
API negotiation, then queue pair 0: receive buffers of SRRCTL's size with DROP_EN,
RDT one behind, transmit ring, both enabled; MSI-X vector 0 on an eventfd,
unmasked. The rings and buffers live in guest RAM, DMA-mapped whole at IOVA 0
(the guest's physical addresses).

The ring work is compiled loops. Over batch arrays (tests, tools): ``guest_tx``
puts frames into transmit slots and descriptors (RS on each, reclaimed by DD)
and moves TDT; ``guest_rx`` takes frames whose descriptors have DD, re-arms them
and moves RDT. Between the VF and a tap (the guest's netdev, sriov.netvsc_vf):
``tap_tx`` reads frames from the tap straight into a transmit arena in guest RAM
and posts them with their offloads as ixgbe does (a context descriptor, then
data descriptors of at most 16 KiB with POPTS and TSE; RS on the last, reclaimed
by its DD); ``rx_tap`` writes each received frame from its receive buffers to
the tap with one writev(). The two APIs are not mixed on one ring.
The tails are written straight into the mapped queue-register page; TDT's
ioeventfd tells the device, as KVM would on the MMIO write.
"""
from __future__ import annotations

import os
import struct

import numpy as np

from netvsp.netvsc_datapath import _to_tap, rx_scratch
from switch.batch import ALIGN, F_CSUM_VALID, LEN, OFF, ROW_PAD, copy_bytes, init_packet
from switch.byteorder import be16, le16, le32, put_be16, put_le, put_le32
from switch.checksum import fold, sum16
from switch.kernel import helper, kernel
from switch.syscalls import read, write

from . import ixgbevf as X
from . import ixgbevf_rings as R
from .vfio import lib

NDESC = 256
BUF = 2048                         # receive buffer (SRRCTL.BSIZEPKT = 2 KiB)
SLOT = 2048                        # transmit slot: frames up to a standard MTU here
MAX_TX = SLOT
# st[]: next to use / clean (tx), next to clean (rx); the tap path's arena FIFO
S_TX_USE, S_TX_CLEAN, S_RX_CLEAN, S_SLOT_HEAD, S_SLOT_N, S_NEXT_FD = range(6)
NST = 6
# the tap path
TAP_BUF = 16384                    # receive buffers: a 64 KiB super-packet in 5
TAP_DESC = 1024                    # ~200 super-packets in flight each way: fewer drops
                                   # (and TCP retransmits) while the guest catches up
TX_ARENA_SLOTS = 64
VNET = 10                          # virtio_net_hdr before each frame read from the tap
HEADROOM = 64
TAP_SLOT = 65536 + 2 * HEADROOM    # a super-packet and its virtio header
MAX_PER_DESC = 16384               # IXGBE_MAX_DATA_PER_TXD
DESC_PER_FRAME = 1 + (TAP_SLOT - HEADROOM + MAX_PER_DESC - 1) // MAX_PER_DESC  # context + data
GSO_TCPV4, GSO_TCPV6 = 1, 4        # virtio_net_hdr gso types

def tap_footprint(ndesc: int = TAP_DESC, rx_buf: int = TAP_BUF) -> int:
    """Guest RAM one VfDriver in tap mode takes: both rings, the receive buffers and
    the transmit arena (page-rounded), so a guest can set it aside once and give
    every VF it is handed the same pages."""
    def pg(n):
        return -(-n // 4096) * 4096
    return 2 * pg(ndesc * 16) + pg(ndesc * rx_buf) + pg(TX_ARENA_SLOTS * TAP_SLOT)


# tap_tx's answers
TX_IDLE, TX_FULL = 0, 1
# the tap path's counters
V_TX, V_TX_RUNT, V_TX_BAD_OFFLOAD, V_TX_TSO, V_RX_BAD, V_RX_TAP_DROP, V_RX = range(7)
NV = 7


@helper
def _post(mem, ring, nd, use, at, ln, stats):
    """The frame at guest address ``at`` (its virtio header before it) as ixgbe posts
    an skb: offloads in a context descriptor, data in descriptors of at most 16 KiB,
    EOP and RS on the last. Returns (next free descriptor, the EOP's), or (use, -1)
    when the frame is dropped (an offload the VF cannot do and software cannot)."""
    h = at - VNET
    flags = mem[h]
    gso = mem[h + 1] & 0x7F
    mss = le16(mem, h + 4)
    cs = le16(mem, h + 6)
    co = le16(mem, h + 8)
    et = be16(mem, at + 12)
    maclen = 18 if et == 0x8100 else 14
    if maclen == 18:
        et = be16(mem, at + 16)
    v4 = et == 0x0800
    ctx = False
    tucmd = 0
    popts = 0
    cmd = R.TXD_CMD_DEXT | R.TXD_CMD_IFCS | (R.TXD_DTYP_DATA << R.TXD_DTYP_SHIFT)
    paylen = ln
    l4len = 0
    if flags & 1 and (cs < maclen or cs + co + 2 > ln):
        stats[V_TX_BAD_OFFLOAD] += 1
        return use, -1
    if gso != 0:
        if (gso != GSO_TCPV4 and gso != GSO_TCPV6) or not flags & 1 or co != 16 \
                or cs + 20 > ln or mss == 0:
            stats[V_TX_BAD_OFFLOAD] += 1                              # no USO/UFO on the 82599's VF
            return use, -1
        l4len = (mem[at + cs + 12] >> 4) * 4
        if l4len < 20 or cs + l4len >= ln:
            stats[V_TX_BAD_OFFLOAD] += 1
            return use, -1
        # ixgbe_tso: the TCP checksum field holds the pseudo-header sum without the
        # length (the hardware adds each segment's); the stack's includes it
        c = at + cs + co
        put_be16(mem, c, fold(be16(mem, c) + 0xFFFF - (ln - cs)))
        tucmd = R.TXD_TUCMD_L4T_TCP | (R.TXD_TUCMD_IPV4 if gso == GSO_TCPV4 else 0)
        popts = R.TXD_POPTS_TXSM | (R.TXD_POPTS_IXSM if gso == GSO_TCPV4 else 0)
        cmd |= R.TXD_CMD_TSE
        paylen = ln - cs - l4len
        ctx = True
    elif flags & 1:
        if (co == 16 or co == 6) and (et == 0x0800 or et == 0x86DD):
            tucmd = (R.TXD_TUCMD_L4T_TCP if co == 16 else 0) | \
                (R.TXD_TUCMD_IPV4 if v4 else 0)
            popts = R.TXD_POPTS_TXSM
            ctx = True
        else:                                          # not the VF's: finished here
            put_be16(mem, at + cs + co, (~fold(sum16(mem, at + cs, ln - cs))) & 0xFFFF)
    if ctx:
        d = ring + use * 16
        put_le32(mem, d, (cs - maclen) | (maclen << R.TXD_MACLEN_SHIFT))
        put_le32(mem, d + 4, 0)
        put_le32(mem, d + 8, tucmd | (R.TXD_DTYP_CTXT << R.TXD_DTYP_SHIFT) | R.TXD_CMD_DEXT)
        put_le32(mem, d + 12, (l4len << R.TXD_L4LEN_SHIFT) | (mss << R.TXD_MSS_SHIFT))
        use = (use + 1) % nd
        popts |= R.TXD_CC
    done = 0
    eop = use
    while done < ln:
        chunk = min(MAX_PER_DESC, ln - done)
        d = ring + use * 16
        put_le(mem, d, at + done, 8)                   # IOVA = GPA
        last = done + chunk >= ln
        put_le32(mem, d + 8, cmd | chunk | ((R.TXD_CMD_EOP | R.TXD_CMD_RS) if last else 0))
        put_le32(mem, d + 12, (paylen << R.TXD_PAYLEN_SHIFT) | popts)   # DD clear
        eop = use
        use = (use + 1) % nd
        done += chunk
    if ctx and cmd & R.TXD_CMD_TSE:
        stats[V_TX_TSO] += 1
    return use, eop


@kernel
def tap_tx(mem, q, ring, nd, st, eops, arena, tapfds, doorbell, one, stats):
    """Frames from the tap queues ``tapfds`` into the transmit ring, read straight
    into the arena's slots; slots and descriptors come back when the device
    wrote DD into a frame's last descriptor. Returns (frames, TX_IDLE or TX_FULL)."""
    nslots = eops.shape[0]
    use, clean = st[S_TX_USE], st[S_TX_CLEAN]
    while st[S_SLOT_N] > 0:                            # reclaimed in order
        k = st[S_SLOT_HEAD]
        e = eops[k]
        if le32(mem, ring + e * 16 + 12) & R.TXD_STAT_DD == 0:
            break
        st[S_SLOT_HEAD] = (k + 1) % nslots
        st[S_SLOT_N] -= 1
        clean = (e + 1) % nd
    sent = 0
    why = TX_IDLE
    nf = tapfds.shape[0]
    base = mem.ctypes.data
    for t in range(nf):
        fd = tapfds[(st[S_NEXT_FD] + t) % nf]
        while True:
            if st[S_SLOT_N] >= nslots or (clean - use - 1) % nd < DESC_PER_FRAME:
                why = TX_FULL
                break
            k = (st[S_SLOT_HEAD] + st[S_SLOT_N]) % nslots
            at = arena + k * TAP_SLOT + HEADROOM
            got = read(fd, base + at - VNET, TAP_SLOT - HEADROOM + VNET)
            if got <= VNET:
                break
            ln = got - VNET
            if ln < 14:
                stats[V_TX_RUNT] += 1
                continue
            nxt, eop = _post(mem, ring, nd, use, at, ln, stats)
            if eop < 0:
                continue
            use = nxt
            eops[k] = eop
            st[S_SLOT_N] += 1
            sent += 1
        if why == TX_FULL:
            break
    st[S_NEXT_FD] = (st[S_NEXT_FD] + 1) % nf
    st[S_TX_USE] = use
    st[S_TX_CLEAN] = clean
    if sent:
        q[(R.TX_BASE + R.R_TAIL) >> 2] = use
        if doorbell >= 0:
            write(doorbell, one.ctypes.data, 8)
        stats[V_TX] += sent
    return sent, why


@kernel
def rx_tap(mem, q, ring, nd, st, bufs, bsize, tapfd, pieces, iov, hdr, stats):
    """Frames the device wrote (DD up to an EOP) to the tap, each with one writev()
    from its receive buffers (a checksum the device found good made partial for the
    stack, see netvsc_datapath._to_tap); descriptors re-armed, RDT moved."""
    clean = st[S_RX_CLEAN]
    n = 0
    moved = False
    most = min(pieces.shape[0], nd - 1)
    while True:
        k = 0
        e = clean
        found = False
        while k < most:
            status = le32(mem, ring + e * 16 + 8)
            if status & R.RXD_STAT_DD == 0:
                break
            if status & R.RXD_STAT_EOP:
                found = True
                break
            e = (e + 1) % nd
            k += 1
        if not found and k < most:
            break                                      # the rest is not written yet
        flen = 0
        idx = clean
        ok = found
        for j in range(k + 1):
            ln = le16(mem, ring + idx * 16 + 12)
            if ln > bsize:
                ok = False
            pieces[j, 0] = bufs + idx * bsize
            pieces[j, 1] = ln
            flen += ln
            idx = (idx + 1) % nd
        status = le32(mem, ring + e * 16 + 8)
        if ok and flen >= 14 and pieces[0, 1] >= 14:
            fl = F_CSUM_VALID if status & R.RXD_STAT_L4CS else 0
            if _to_tap(mem, pieces, k + 1, flen, fl, 0, tapfd, iov, hdr):
                n += 1
            else:
                stats[V_RX_TAP_DROP] += 1
        else:
            stats[V_RX_BAD] += 1
        idx = clean
        for j in range(k + 1):                         # back to the device, read format
            d = ring + idx * 16
            put_le(mem, d, bufs + idx * bsize, 8)
            put_le(mem, d + 8, 0, 8)
            idx = (idx + 1) % nd
        clean = idx
        moved = True
    st[S_RX_CLEAN] = clean
    if moved:
        q[(R.RX_BASE + R.R_TAIL) >> 2] = (clean - 1) % nd
    stats[V_RX] += n
    return n


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

    def __init__(self, dev, ram, pages, rx_buf: int = BUF, ndesc: int = NDESC):
        if rx_buf % 1024 or not 1024 <= rx_buf <= 16384:
            raise ValueError(f"receive buffers of {rx_buf} bytes: 1-16 KiB in whole KiB")
        if ndesc % 8 or not 8 <= ndesc <= 65536:
            raise ValueError(f"{ndesc} descriptors: a multiple of 8 up to 65536")
        self.dev, self.ram, self.pages, self.rx_buf = dev, ram, pages, rx_buf
        self.nd = ndesc
        self.mb = X.Mailbox(dev)
        self.st = np.zeros(NST, np.int64)
        self.stats = np.zeros(NV, np.int64)
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
        self.rx_ring = self.pages.alloc(self.nd * 16)
        self.tx_ring = self.pages.alloc(self.nd * 16)
        self.rx_bufs = self.pages.alloc(self.nd * self.rx_buf)
        self.tx_slots = -1                             # the batch API's, on first use
        for k in range(self.nd):                         # every buffer to the device
            d = self.rx_ring + 16 * k
            mem[d:d + 16] = np.frombuffer(struct.pack("<QQ", self.rx_bufs + k * self.rx_buf,
                                                      0), np.uint8)
        mem[self.tx_ring:self.tx_ring + self.nd * 16] = 0
        q = self.q
        for base, ring in ((R.RX_BASE, self.rx_ring), (R.TX_BASE, self.tx_ring)):
            q[(base + R.R_BAL) >> 2] = ring & 0xFFFFFFFF
            q[(base + R.R_BAH) >> 2] = ring >> 32
            q[(base + R.R_LEN) >> 2] = self.nd * 16
            q[(base + R.R_HEAD) >> 2] = 0
            q[(base + R.R_TAIL) >> 2] = 0
        q[(R.RX_BASE + R.R_SRRCTL) >> 2] = (self.rx_buf // 1024) | R.SRRCTL_DROP_EN
        q[(R.RX_BASE + R.R_DCTL) >> 2] = R.DCTL_ENABLE
        q[(R.RX_BASE + R.R_TAIL) >> 2] = self.nd - 1     # one kept back, as ixgbevf
        q[(R.TX_BASE + R.R_DCTL) >> 2] = R.DCTL_ENABLE
        dev.set_irq_eventfds(lib.VFIO_PCI_MSIX_IRQ_INDEX, [self.irq])
        self._wr(X.VTEIMS, 1)
        if not self._rd(X.VFLINKS) & X.LINKS_UP:
            raise OSError("the VF's link is down")
        return mac

    def send(self, batch) -> int:
        if self.tx_slots < 0:
            self.tx_slots = self.pages.alloc(self.nd * SLOT)
        n = guest_tx(self.ram.mem, self.q, self.tx_ring, self.nd, self.st, self.tx_slots,
                     batch.meta, batch.data, batch.n)
        if n and self.doorbell >= 0:
            os.eventfd_write(self.doorbell, 1)
        return n

    def receive(self, batch, src_port: int = 0) -> int:
        if self.rx_buf != BUF:
            raise ValueError("the batch API takes 2 KiB receive buffers")
        batch.reset()
        batch.n = guest_rx(self.ram.mem, self.q, self.rx_ring, self.nd, self.st, self.rx_bufs,
                           batch.meta, batch.data, src_port)
        return batch.n

    # ---- the tap path ----------------------------------------------------------------
    def attach_tap(self, tapfds: list[int]) -> None:
        """Move frames between the VF and these tap queues (``tap_io``); the receive
        side writes to the first."""
        self.tapfds = np.asarray(tapfds, np.int64)
        self.arena = self.pages.alloc(TX_ARENA_SLOTS * TAP_SLOT)
        self.eops = np.zeros(TX_ARENA_SLOTS, np.int64)
        self.scratch = rx_scratch()
        self.one = np.array([1], dtype=np.uint64).view(np.uint8)

    def tap_io(self, transmit: bool) -> tuple[int, int, int]:
        """Received frames to the tap, then (``transmit``) the tap's frames to the VF:
        (received, sent, TX_IDLE or TX_FULL)."""
        mem = self.ram.mem
        got = rx_tap(mem, self.q, self.rx_ring, self.nd, self.st, self.rx_bufs, self.rx_buf,
                     int(self.tapfds[0]), *self.scratch, self.stats)
        if not transmit:
            return got, 0, TX_IDLE
        sent, why = tap_tx(mem, self.q, self.tx_ring, self.nd, self.st, self.eops, self.arena,
                           self.tapfds, self.doorbell, self.one, self.stats)
        return got, sent, why

    def tx_pending(self) -> int:
        """Frames posted that the device has not finished."""
        return int(self.st[S_SLOT_N])

    def close(self) -> None:
        self.q = None
        self.qmap = None
        os.close(self.irq)
        if self.doorbell >= 0:
            os.close(self.doorbell)

"""The e1000 guest driver: an emulated NIC's guest side, in the VM's namespace.

It reaches the device only as a guest kernel would: register accesses through
intercepts (VM exits), descriptors and buffers in guest RAM, an interrupt
eventfd. It brings the NIC up the way Linux's e1000 does on an 82540EM
(e1000_vfio.md A.12: reset through the I/O window, the EEPROM read by Microwire
bit-banging and its checksum checked, the PHY found at MDIC address 1, rings,
RCTL/TCTL, interrupts), owns the VM's tap (IFF_VNET_HDR, offloads on) and moves
frames in compiled loops:

- tap -> device: each frame read into a slot of guest RAM; a context
  descriptor then a data descriptor as e1000_tx_csum / e1000_tso write them
  (TSO with the IP length and TCP sum prepared as Linux prepares them); one TDT
  write (an exit) per batch; slots come back when the device sets DD.
- device -> tap: on an interrupt, Linux's ISR and NAPI poll: ICR read, IMC,
  the receive ring cleaned from next_to_clean (DD, EOP, length less the FCS),
  in-order TCP segments coalesced as napi_gro_receive would (one writev() of a
  GSO packet to the tap), buffers handed back by RDT, IMS again.
  The link status change interrupt turns the tap's carrier on and off.

    python -m netvsp.e1000.driver --ctl FD --ifname eth0
"""
from __future__ import annotations

import argparse
import logging
import os
import select
import socket
import sys
import time

import numpy as np

from hypervisor.intercept import CONFIG, IO, MMIO, InterceptClient
from hypervisor.partition import ControlChannel, GuestMemory, GuestPages
from hypervisor.pci import CMD_BUS_MASTER, CMD_IO, CMD_MEMORY, COMMAND
from switch.byteorder import be16, put_be16, put_le
from switch.checksum import fold
from switch.kernel import helper, kernel
from switch.syscalls import read, writev
from switch.tap import VNET_HDR, open_tap, set_carrier

from . import descriptors as DS
from . import eeprom as EE
from . import phy as PHY
from . import regs as E

# How long the guest waits for the host: the host's first answers may wait for
# numba to compile its kernels on a cold cache (the runtime waits as long for us).
HOST_START_S = 300
log = logging.getLogger("hvnet.e1000")
TX_DESCS = 256                 # Linux's default transmit ring (A.12)
RX_DESCS = 4096                # as after ``ethtool -G eth0 rx 4096`` (the e1000 maximum):
                               # each interrupt costs five synchronous exits (A.14)
RX_BUF = 2048
TX_SLOTS = 64
TX_SLOT = 65536 + 256
NAPI_ROUNDS = 8
# the registers whose writes wait for the device (R1's synchronous set)
SYNC = {MMIO: {E.CTRL, E.EECD, E.MDIC, E.ICR, E.ICS, E.IMS, E.IMC, E.RCTL, E.TCTL, E.TDT,
               E.RDT}, IO: {E.IODATA}, CONFIG: {COMMAND}}

_R = np.int64


class DriverError(RuntimeError):
    pass


# ------------------------------------------------------------------ compiled loops
@kernel
def guest_tx(fd, mem, ring, ndesc, st, slot_desc, slots_gpa, slot_size):
    """Read ready frames from the tap into free slots and write their descriptors
    from the tail st[0]. Returns how many frames were queued (the caller writes
    TDT = st[0] once). slot_desc[s] holds the index of slot s's last descriptor
    while the device owns it, -1 when free."""
    queued = 0
    nslots = slot_desc.shape[0]
    while True:
        # two descriptors per frame; keep one free so TDT never reaches TDH
        used = (st[0] - st[1]) % ndesc
        if used + 3 > ndesc:
            break
        s = -1
        for k in range(nslots):
            if slot_desc[(st[2] + k) % nslots] < 0:
                s = (st[2] + k) % nslots
                break
        if s < 0:
            break
        at = slots_gpa + s * slot_size
        got = read(fd, mem.ctypes.data + at, slot_size)
        if got <= VNET_HDR + 14:
            break
        st[2] = (s + 1) % nslots
        h = at
        f = at + VNET_HDR
        ln = got - VNET_HDR
        flags = _R(mem[h])
        gso = _R(mem[h + 1]) & 0x7F
        gso_size = _R(mem[h + 4]) | (_R(mem[h + 5]) << 8)
        cs = _R(mem[h + 6]) | (_R(mem[h + 7]) << 8)
        co = _R(mem[h + 8]) | (_R(mem[h + 9]) << 8)
        l3 = 18 if be16(mem, f + 12) == 0x8100 else 14
        v4 = be16(mem, f + l3 - 2) == 0x0800
        popts = 0
        cmd = DS.TXD_CMD_EOP | DS.TXD_CMD_IFCS | DS.TXD_CMD_RS
        tse = (gso == 1 or gso == 4) and (flags & 1) != 0 and cs + 20 <= ln
        if (flags & 1) != 0 and cs + co + 2 <= ln:
            # context descriptor (e1000_tx_csum / e1000_tso)
            d = ring + st[0] * 16
            tucmd = DS.TXD_CMD_DEXT | (DS.TXD_CMD_TCP if co == 16 else 0) | \
                (DS.TXD_CMD_IP if v4 else 0)
            hdr_len = 0
            if tse:
                thl = (_R(mem[f + cs + 12]) >> 4) * 4
                hdr_len = cs + thl
                tucmd |= DS.TXD_CMD_TSE | (ln - hdr_len)
                # what Linux leaves the hardware: IP length 0, the TCP sum of the
                # pseudo-header without the length
                if v4:
                    put_be16(mem, f + l3 + 2, 0)
                    put_be16(mem, f + l3 + 10, 0)
                    ps = be16(mem, f + l3 + 12) + be16(mem, f + l3 + 14) + \
                        be16(mem, f + l3 + 16) + be16(mem, f + l3 + 18) + 6
                else:
                    put_be16(mem, f + l3 + 4, 0)
                    ps = 6
                    for k in range(16):
                        ps += be16(mem, f + l3 + 8 + 2 * k)
                put_be16(mem, f + cs + 16, fold(ps))
                popts = DS.TXD_POPTS_TXSM | (DS.TXD_POPTS_IXSM if v4 else 0)
                cmd |= DS.TXD_CMD_TSE
            else:
                popts = DS.TXD_POPTS_TXSM
            mem[d] = l3 if tse else 0
            mem[d + 1] = (l3 + 10) if (tse and v4) else 0
            put_le(mem, d + 2, (cs - 1) if (tse and v4) else 0, 2)
            mem[d + 4] = cs
            mem[d + 5] = cs + co
            put_le(mem, d + 6, 0, 2)
            put_le(mem, d + 8, tucmd, 4)
            mem[d + 12] = 0
            mem[d + 13] = hdr_len
            put_le(mem, d + 14, gso_size if tse else 0, 2)
            st[0] = (st[0] + 1) % ndesc
        d = ring + st[0] * 16
        put_le(mem, d, f, 8)
        put_le(mem, d + 8, ln | DS.TXD_DTYP_D | DS.TXD_CMD_DEXT | cmd, 4)
        mem[d + 12] = 0
        mem[d + 13] = popts
        put_le(mem, d + 14, 0, 2)
        slot_desc[s] = st[0]
        st[0] = (st[0] + 1) % ndesc
        queued += 1
    return queued


@kernel
def guest_reclaim(mem, ring, ndesc, st, slot_desc):
    """Slots whose last descriptor the device marked done (DD) are free again;
    st[1] (the oldest descriptor not known done) moves up. Returns slots freed."""
    freed = 0
    for s in range(slot_desc.shape[0]):
        k = slot_desc[s]
        if k >= 0 and mem[ring + k * 16 + 12] & DS.TXD_STAT_DD:
            slot_desc[s] = -1
            freed += 1
    # the device consumes in order: advance past done descriptors
    while st[1] != st[0]:
        d = ring + st[1] * 16
        lower = _R(mem[d + 8]) | (_R(mem[d + 9]) << 8) | (_R(mem[d + 10]) << 16) | \
            (_R(mem[d + 11]) << 24)
        ctx = (lower & (DS.TXD_CMD_DEXT | DS.TXD_DTYP_D)) == DS.TXD_CMD_DEXT
        if not ctx and not mem[d + 12] & DS.TXD_STAT_DD:
            break
        st[1] = (st[1] + 1) % ndesc
    return freed


# gs[] slots: the segment being coalesced (GRO) in ``gro``
G_LEN, G_SEGS, G_MSS, G_NEXT_SEQ, G_HLEN, G_PSH = range(6)
NGS = 6
GRO_MAX = 65535 - 14          # an IPv4 length must describe the coalesced packet


@helper
def _write(fd, src, off, n, hdr, iov):
    iov[0] = hdr.ctypes.data
    iov[1] = VNET_HDR
    iov[2] = src.ctypes.data + off
    iov[3] = n
    return writev(fd, iov.ctypes.data, 2) >= 0


@helper
def _gro_flush(fd, gro, gs, hdr, iov, stats):
    """Hand the coalesced packet to the tap: one segment as it came; several as
    one TCPv4 GSO packet (IP length and checksum of the whole, the TCP sum left
    partial with the pseudo-header), as GRO hands the stack one big skb."""
    n = gs[G_LEN]
    if n == 0:
        return
    for k in range(VNET_HDR):
        hdr[k] = 0
    if gs[G_SEGS] > 1:
        put_be16(gro, 16, n - 14)
        put_be16(gro, 24, 0)
        s = _R(0)
        for k in range(0, 20, 2):
            s += be16(gro, 14 + k)
        put_be16(gro, 24, (~fold(s)) & 0xFFFF)
        if gs[G_PSH]:
            gro[47] |= 0x08
        ps = be16(gro, 26) + be16(gro, 28) + be16(gro, 30) + be16(gro, 32) + 6 + n - 34
        put_be16(gro, 50, fold(ps))
        hdr[0] = 1                                 # NEEDS_CSUM
        hdr[1] = 1                                 # GSO TCPv4
        put_le(hdr, 2, gs[G_HLEN], 2)
        put_le(hdr, 4, gs[G_MSS], 2)
        put_le(hdr, 6, 34, 2)
        put_le(hdr, 8, 16, 2)
    if _write(fd, gro, 0, n, hdr, iov):
        stats[0] += gs[G_SEGS]
        stats[3] += 1
    else:
        stats[1] += gs[G_SEGS]
    gs[G_LEN] = 0
    gs[G_SEGS] = 0


@helper
def _gro_receive(fd, mem, f, ln, gro, gs, hdr, iov, stats):
    """One received frame: added to the packet being coalesced when it is the
    next in-order segment of the same TCPv4 flow with the same headers (as
    tcp_gro_receive asks), else what was coalesced goes first and the frame
    starts anew, or goes alone when it cannot be coalesced."""
    ok = ln >= 54 and be16(mem, f + 12) == 0x0800 and mem[f + 14] == 0x45 and \
        mem[f + 23] == 6 and (be16(mem, f + 20) & 0x3FFF) == 0
    thl = 0
    pay = 0
    if ok:
        tot = be16(mem, f + 16)
        thl = (_R(mem[f + 46]) >> 4) * 4
        pay = tot - 20 - thl
        flags = mem[f + 47]
        ok = thl >= 20 and 14 + tot <= ln and pay > 0 and (flags & 0xF7) == 0x10
    if not ok:
        _gro_flush(fd, gro, gs, hdr, iov, stats)
        for k in range(VNET_HDR):
            hdr[k] = 0
        if _write(fd, mem, f, ln, hdr, iov):
            stats[0] += 1
        else:
            stats[1] += 1
        return
    hlen = 34 + thl
    seq = (be16(mem, f + 38) << 16) | be16(mem, f + 40)
    same = gs[G_LEN] > 0 and gs[G_HLEN] == hlen and gs[G_PSH] == 0 and \
        seq == gs[G_NEXT_SEQ] and pay <= gs[G_MSS] and gs[G_LEN] + pay <= GRO_MAX and \
        (gs[G_LEN] - hlen) % gs[G_MSS] == 0
    if same:
        # addresses, ports, ack and window, the options; TOS and TTL
        for k in range(26, 38):
            if gro[k] != mem[f + k]:
                same = False
        for k in range(42, 46):
            if gro[k] != mem[f + k]:
                same = False
        for k in range(48, hlen):            # window, urgent pointer, options
            if (k < 50 or k >= 52) and gro[k] != mem[f + k]:
                same = False
        if gro[15] != mem[f + 15] or gro[22] != mem[f + 22]:
            same = False
    if not same:
        _gro_flush(fd, gro, gs, hdr, iov, stats)
        for k in range(14 + 20 + thl + pay):
            gro[k] = mem[f + k]
        gs[G_LEN] = hlen + pay
        gs[G_SEGS] = 1
        gs[G_MSS] = pay
        gs[G_HLEN] = hlen
    else:
        for k in range(pay):
            gro[gs[G_LEN] + k] = mem[f + hlen + k]
        gs[G_LEN] += pay
        gs[G_SEGS] += 1
    gs[G_NEXT_SEQ] = (seq + pay) & 0xFFFFFFFF
    gs[G_PSH] = 1 if mem[f + 47] & 0x08 else 0
    if gs[G_PSH]:
        _gro_flush(fd, gro, gs, hdr, iov, stats)


@kernel
def guest_rx(fd, mem, ring, ndesc, st, buf_gpa, buf_size, hdr, iov, stats, gro, gs):
    """Linux's e1000_clean_rx_irq with napi_gro_receive: from next_to_clean
    (st[0]) while DD, each frame (EOP in one buffer; others dropped, as Linux
    drops them) less its 4 FCS bytes, in-order TCP segments coalesced (GRO)
    before they go to the tap; the descriptor's status cleared. Returns how many
    descriptors were cleaned (st[1] counts them for the next RDT write)."""
    cleaned = 0
    while cleaned < ndesc:
        d = ring + st[0] * 16
        status = mem[d + 12]
        if not status & DS.RXD_STAT_DD:
            break
        ln = _R(mem[d + 8]) | (_R(mem[d + 9]) << 8)
        addr = buf_gpa + st[0] * buf_size
        if status & DS.RXD_STAT_EOP and 18 <= ln <= buf_size:
            _gro_receive(fd, mem, addr, ln - 4, gro, gs, hdr, iov, stats)   # less the FCS
        else:
            stats[2] += 1
        mem[d + 12] = 0
        st[0] = (st[0] + 1) % ndesc
        st[1] += 1
        cleaned += 1
    _gro_flush(fd, gro, gs, hdr, iov, stats)     # the end of the poll, as napi_complete
    return cleaned


# ------------------------------------------------------------------ the driver
class E1000Guest:
    def __init__(self, ram: GuestMemory, mmio: InterceptClient, irq_fd: int, tapfd: int):
        self.ram, self.io, self.irq_fd, self.tapfd = ram, mmio, irq_fd, tapfd
        self.mem = ram.mem
        self.pages = GuestPages(ram.size)
        self.mac = b""
        self.tx_st = np.zeros(3, dtype=np.int64)        # tail, oldest not done, next slot
        self.slot_desc = np.full(TX_SLOTS, -1, dtype=np.int64)
        self.rx_st = np.zeros(2, dtype=np.int64)        # next_to_clean, cleaned since RDT
        self.hdr = np.zeros(16, dtype=np.uint8)
        self.iov = np.zeros(8, dtype=np.int64)
        self.rx_stats = np.zeros(4, dtype=np.int64)     # frames, refused, dropped, writes
        self.gro = np.zeros(65536 + 256, dtype=np.uint8)
        self.gs = np.zeros(NGS, dtype=np.int64)
        self.link = False

    # register access helpers
    def r(self, off: int) -> int:
        return self.io.read(MMIO, off)

    def w(self, off: int, v: int) -> None:
        self.io.write(MMIO, off, v)

    def flush(self) -> None:
        self.r(E.STATUS)                     # Linux's E1000_WRITE_FLUSH

    # A.12 1: e1000_reset_hw on an 82540
    def reset(self) -> None:
        self.io.write(CONFIG, COMMAND, CMD_IO | CMD_MEMORY | CMD_BUS_MASTER, 2)
        if self.io.read(CONFIG, 0, 4) != (E.DEVICE_ID << 16 | E.VENDOR_ID):
            raise DriverError("no 8086:100E behind this function")
        self.w(E.IMC, 0xFFFFFFFF)
        self.w(E.RCTL, 0)
        self.w(E.TCTL, E.TCTL_PSP)
        self.flush()
        time.sleep(0.01)
        ctrl = self.r(E.CTRL)
        self.io.write(IO, E.IOADDR, E.CTRL)              # the 82540 resets through I/O
        self.io.write(IO, E.IODATA, ctrl | E.CTRL_RST)
        time.sleep(0.005)
        self.w(E.MANC, self.r(E.MANC) & ~E.MANC_ARP_EN)
        self.w(E.IMC, 0xFFFFFFFF)
        self.r(E.ICR)

    # A.12 2: the EEPROM by Microwire, as e1000_read_eeprom on the 82540
    def eeprom_word(self, addr: int) -> int:
        eecd = self.r(E.EECD)
        self.w(E.EECD, eecd | E.EECD_REQ)
        for _ in range(1000):
            if self.r(E.EECD) & E.EECD_GNT:
                break
        else:
            raise DriverError("EEPROM access not granted")
        eecd = (self.r(E.EECD) | E.EECD_CS) & ~(E.EECD_DI | E.EECD_SK)
        self.w(E.EECD, eecd)
        bits = (EE.READ_OPCODE << 6) | addr
        for k in range(8, -1, -1):
            di = E.EECD_DI if bits >> k & 1 else 0
            self.w(E.EECD, eecd | di)
            self.w(E.EECD, eecd | di | E.EECD_SK)
            self.w(E.EECD, eecd | di)
        word = 0
        for _ in range(16):
            self.w(E.EECD, eecd | E.EECD_SK)
            word = word << 1 | (1 if self.r(E.EECD) & E.EECD_DO else 0)
            self.w(E.EECD, eecd)
        self.w(E.EECD, eecd & ~(E.EECD_CS | E.EECD_REQ))
        return word

    def read_mac(self) -> bytes:
        words = [self.eeprom_word(a) for a in range(EE.WORDS)]
        if not EE.checksum_ok(words):
            raise DriverError("The EEPROM Checksum Is Not Valid")
        return bytes([words[0] & 0xFF, words[0] >> 8, words[1] & 0xFF, words[1] >> 8,
                      words[2] & 0xFF, words[2] >> 8])

    # A.12 3: the PHY at MDIC address 1
    def mdic(self, reg: int, value: int | None = None) -> int:
        op = E.MDIC_OP_READ if value is None else E.MDIC_OP_WRITE | value
        self.w(E.MDIC, op | reg << E.MDIC_REG_SHIFT | PHY.ADDRESS << E.MDIC_PHY_SHIFT)
        for _ in range(64):
            v = self.r(E.MDIC)
            if v & E.MDIC_READY:
                if v & E.MDIC_ERROR:
                    raise DriverError(f"MDI Error (PHY register {reg:#x})")
                return v & 0xFFFF
        raise DriverError("MDI Read did not complete")

    def init_hw(self) -> None:
        self.w(E.VET, 0)
        for k in range(E.VFTA_COUNT):
            self.w(E.VFTA + 4 * k, 0)
        m = self.mac
        self.w(E.RAL(0), m[0] | m[1] << 8 | m[2] << 16 | m[3] << 24)
        self.w(E.RAH(0), m[4] | m[5] << 8 | E.RAH_AV)
        for k in range(1, E.RA_COUNT):
            self.w(E.RAL(k), 0)
            self.w(E.RAH(k), 0)
        for k in range(E.MTA_COUNT):
            self.w(E.MTA + 4 * k, 0)
        ctrl = self.r(E.CTRL)
        self.w(E.CTRL, (ctrl | E.CTRL_SLU) & ~(E.CTRL_FRCSPD | E.CTRL_FRCDPX))
        phy_id = self.mdic(PHY.PHYID1) << 16 | self.mdic(PHY.PHYID2)
        if phy_id & 0xFFFFFFF0 != 0x01410C20:
            raise DriverError(f"did not detect valid phy ({phy_id:#x})")
        self.mdic(PHY.M88_SPEC_CTRL, 0x0360)
        self.mdic(PHY.M88_EXT_SPEC_CTRL, 0x0D60)
        self.mdic(PHY.ANAR, 0x0DE1)
        self.mdic(PHY.CTRL1000, 0x0E00)
        self.mdic(PHY.BMCR, PHY.BMCR_ANENABLE | PHY.BMCR_ANRESTART | 0x0140)
        for _ in range(200):                     # Linux polls PHY_STATUS (read twice)
            self.mdic(PHY.BMSR)
            if self.mdic(PHY.BMSR) & PHY.BMSR_LINK:
                break
            time.sleep(0.01)
        for name in E.STATS:                     # clear the statistics by reading them
            self.r(E.STATS[name])

    # A.12 4: open
    def open(self) -> None:
        mem = self.mem
        self.tx_ring = self.pages.alloc(TX_DESCS * 16)
        self.tx_slots = self.pages.alloc(TX_SLOTS * TX_SLOT)
        self.rx_ring = self.pages.alloc(RX_DESCS * 16)
        self.rx_bufs = self.pages.alloc(RX_DESCS * RX_BUF)
        mem[self.tx_ring:self.tx_ring + TX_DESCS * 16] = 0
        self.w(E.TDLEN, TX_DESCS * 16)
        self.w(E.TDBAH, self.tx_ring >> 32)
        self.w(E.TDBAL, self.tx_ring & 0xFFFFFFFF)
        self.w(E.TDT, 0)
        self.w(E.TDH, 0)
        self.w(E.TIPG, 8 | 8 << 10 | 6 << 20)
        self.w(E.TIDV, 8)
        self.w(E.TADV, 32)
        self.w(E.TCTL, E.TCTL_PSP | 0x01000000 | 0x0F << 4 | 0x40 << 12 | E.TCTL_EN)
        self.w(E.RCTL, 0)
        self.w(E.RDTR, 0)
        self.w(E.RADV, 8)
        self.w(E.ITR, 1_000_000_000 // (20000 * 256))   # 20000 interrupts/s to start
        for k in range(RX_DESCS):
            d = self.rx_ring + 16 * k
            mem[d:d + 16] = np.frombuffer((self.rx_bufs + k * RX_BUF).to_bytes(8, "little")
                                          + bytes(8), np.uint8)
        self.w(E.RDLEN, RX_DESCS * 16)
        self.w(E.RDBAH, self.rx_ring >> 32)
        self.w(E.RDBAL, self.rx_ring & 0xFFFFFFFF)
        self.w(E.RDT, 0)
        self.w(E.RDH, 0)
        self.w(E.RXCSUM, E.RXCSUM_TUOFLD)
        self.w(E.RCTL, E.RCTL_EN | E.RCTL_BAM | (0 << E.RCTL_RDMTS_SHIFT))
        self.w(E.RDT, RX_DESCS - 1)
        self.w(E.IMS, E.IMS_ENABLE_MASK)
        self.w(E.ICS, E.ICR_LSC)                 # the watchdog looks at the link

    def bring_up(self) -> bytes:
        self.reset()
        self.mac = self.read_mac()
        self.init_hw()
        self.open()
        self.link = bool(self.r(E.STATUS) & E.STATUS_LU)
        return self.mac

    # the data path
    def transmit(self) -> int:
        guest_reclaim(self.mem, self.tx_ring, TX_DESCS, self.tx_st, self.slot_desc)
        n = guest_tx(self.tapfd, self.mem, self.tx_ring, TX_DESCS, self.tx_st, self.slot_desc,
                     self.tx_slots, TX_SLOT)
        if n:
            self.w(E.TDT, int(self.tx_st[0]))    # one exit per batch
        return n

    def interrupt(self) -> int:
        """Linux's e1000_intr then e1000_clean (NAPI): ICR, mask, clean, unmask."""
        icr = self.r(E.ICR)
        if not icr:
            return 0
        self.w(E.IMC, 0xFFFFFFFF)
        self.flush()
        if icr & E.ICR_LSC:
            up = bool(self.r(E.STATUS) & E.STATUS_LU)
            if up != self.link:
                self.link = up
                set_carrier(self.tapfd, up)
                log.info("link %s", "up" if up else "down")
        guest_reclaim(self.mem, self.tx_ring, TX_DESCS, self.tx_st, self.slot_desc)
        n = 0
        for _ in range(NAPI_ROUNDS):         # NAPI: poll again while there is work
            got = guest_rx(self.tapfd, self.mem, self.rx_ring, RX_DESCS, self.rx_st,
                           self.rx_bufs, RX_BUF, self.hdr, self.iov, self.rx_stats, self.gro,
                           self.gs)
            if self.rx_st[1]:
                # hand the cleaned buffers back: RDT is the last one given
                self.w(E.RDT, int((self.rx_st[0] - 1) % RX_DESCS))
                self.rx_st[1] = 0
            n += got
            if not got:
                break
        self.w(E.IMS, E.IMS_ENABLE_MASK)
        return n

    def warm(self) -> None:
        mem = np.zeros(1 << 16, dtype=np.uint8)
        st = np.zeros(3, dtype=np.int64)
        guest_reclaim(mem, 0, 8, st, np.full(2, -1, np.int64))
        guest_tx(-1, mem, 0, 8, st, np.full(2, -1, np.int64), 4096, 4096)
        guest_rx(-1, mem, 0, 8, np.zeros(2, np.int64), 4096, 2048, self.hdr, self.iov,
                 np.zeros(4, np.int64), self.gro, np.zeros(NGS, np.int64))

    def run(self) -> None:
        ep = select.epoll()
        ep.register(self.tapfd, select.EPOLLIN)
        ep.register(self.irq_fd, select.EPOLLIN)
        while True:
            events = ep.poll(1.0)
            for fd, _ in events:
                if fd == self.irq_fd:
                    try:
                        os.eventfd_read(fd)
                    except BlockingIOError:
                        pass
                    self.interrupt()
            while self.transmit():
                pass
            if not events and self.slot_desc.max() >= 0:
                self.interrupt()                  # slots held long: look for DD


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(prog="python -m netvsp.e1000.driver")
    ap.add_argument("--ctl", type=int, required=True)
    ap.add_argument("--ifname", required=True)
    a = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="e1000 %(levelname)s %(message)s")
    ctl = ControlChannel(socket.socket(fileno=a.ctl))
    got = ctl.recv(max_fds=3)
    if got is None or got[0].get("type") != "attach" or len(got[1]) != 3:
        log.error("expected an attach message with guest RAM, intercepts and the interrupt")
        return 2
    msg, (memfd, mmiofd, irqfd) = got
    ram = GuestMemory(int(msg["ram"]), fd=memfd)
    io = InterceptClient(socket.socket(fileno=mmiofd), SYNC, timeout=HOST_START_S)
    tapfd = open_tap(a.ifname)
    g = E1000Guest(ram, io, irqfd, tapfd)
    g.warm()
    mac = g.bring_up()
    set_carrier(tapfd, g.link)
    ctl.send({"type": "up", "mac": mac.hex(), "link": g.link})
    g.run()
    return 0


if __name__ == "__main__":
    sys.exit(main())

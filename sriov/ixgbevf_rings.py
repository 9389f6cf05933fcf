"""The 82599 VF's queue pair 0: advanced descriptors in guest memory, reached
through the one IOMMU mapping the driver made (vfio DMA_MAP of its RAM), frames to
and from switch batches (e1000_vfio.md B.10 for the registers; the layouts are
Linux's ixgbe_type.h, union ixgbe_adv_rx_desc / ixgbe_adv_tx_desc).

- Transmit: data descriptors (DTYP 3, DEXT) from TDH to TDT; their buffers are
  gathered into one frame until EOP; RS gets DD written back into the
  descriptor's status word. A context descriptor (DTYP 2) sets the offload
  context (MACLEN, IPLEN, L4LEN, MSS, TUCMD) that data descriptors use with
  POPTS.TXSM/IXSM and DCMD.TSE, as ixgbe_tx_csum / ixgbe_tso program it.
- Offloads stay whole: a TSE frame is not cut into segments here but leaves as
  one super-packet with its segmentation pending (GSO_TYPE, GSO_SIZE) and its
  checksum partial, which is what every port of the switch carries (virtio
  headers, RNDIS LSO). What the hardware would write into each segment is made
  true of the super-packet: the IP length fields, the IPv4 header checksum, and
  the TCP checksum field moved from ixgbe's pseudo-header sum without length to
  the sum with it (Linux's GSO convention). TXSM alone leaves a partial checksum
  (CSUM_START/CSUM_OFF) for the port that delivers it.
- Receive: each frame takes descriptors from RDH up to RDT (the tail the driver
  gave back), one buffer of SRRCTL.BSIZEPKT KiB each; the write-back puts the
  length and DD (EOP on the last) where the buffer address was, as the hardware
  does, with IPCS/L4CS when the frame's checksums are known good (finished by
  the sender's offload, or verified). A frame finding too few descriptors is
  dropped and counted (SRRCTL.DROP_EN is the only mode here). Super-packets
  arrive whole, spread over as many buffers as they need, as the 82599's RSC
  delivers a coalesced frame (a real VF takes at most 9728-byte frames; Linux's
  ixgbevf never enables RSC, this project's VF driver takes them). L4CS on a
  frame whose checksum is still partial means "the sender's offload owns it":
  the VF driver hands it to the stack as NEEDS_CSUM, so a forwarding guest
  finishes it; a stock ixgbevf would take it as verified.

The guest is hostile: a ring whose length, position or head/tail make no sense is
not run (counted, until the driver fixes it); a buffer outside the mapping drops
that frame, counted; nothing is read or written outside ``mem``.
"""
from __future__ import annotations

import numpy as np

from switch.batch import (ALIGN, CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_CSUM_VALID, FLAGS,
                          GSO_SIZE, GSO_TCPV4, GSO_TCPV6, GSO_TYPE, LEN, OFF, ROW_PAD,
                          copy_bytes, init_packet)
from switch.byteorder import be16, le32, put_be16, put_le, put_le32
from switch.checksum import fold, sum16
from switch.kernel import helper, kernel

QREGS = 0x1000                                       # BAR0's queue-register pages ...
QREGS_SIZE = 0x2000                                  # ... which the driver maps and writes
RX_BASE, TX_BASE = 0x0000, 0x1000                    # queue 0, from QREGS
R_BAL, R_BAH, R_LEN, R_HEAD, R_SRRCTL, R_TAIL, R_DCTL = 0x00, 0x04, 0x08, 0x10, 0x14, 0x18, 0x28
DCTL_ENABLE = 0x02000000
SRRCTL_BSIZEPKT = 0x1F                               # KiB units
SRRCTL_DROP_EN = 0x10000000
RXD_STAT_DD, RXD_STAT_EOP, RXD_STAT_L4CS, RXD_STAT_IPCS = 0x01, 0x02, 0x20, 0x40
TXD_DTYP_SHIFT, TXD_DTYP_DATA, TXD_DTYP_CTXT = 20, 3, 2
TXD_CMD_EOP, TXD_CMD_IFCS, TXD_CMD_RS, TXD_CMD_DEXT = 0x01000000, 0x02000000, 0x08000000, \
    0x20000000
TXD_CMD_TSE = 0x80000000
TXD_STAT_DD = 0x01
# ixgbe_type.h: the advanced context descriptor's fields, and a data descriptor's
# olinfo_status (CC: use the context; POPTS: which checksums to insert)
TXD_MACLEN_SHIFT, TXD_L4LEN_SHIFT, TXD_MSS_SHIFT, TXD_PAYLEN_SHIFT = 9, 8, 16, 14
TXD_TUCMD_IPV4, TXD_TUCMD_L4T_TCP, TXD_TUCMD_L4T_MASK = 0x400, 0x800, 0x1800
TXD_CC, TXD_POPTS_IXSM, TXD_POPTS_TXSM = 0x80, 0x100, 0x200
EICR_RTX_Q0 = 0x01                                   # queue 0's cause (VTIVAR default)
MAX_FRAME = 9728                                     # jumbo, as ixgbevf's max_mtu allows
MAX_TSO_FRAME = 65536 + 64                           # a TSE frame: Linux's GSO maximum
MAX_RX_FRAME = MAX_TSO_FRAME                         # what the VEB hands a VF, whole
MAX_RING_BYTES = 1 << 20                             # TDLEN/RDLEN are 20 bits wide
MAX_FRAME_DESC = 64                                  # descriptors one frame may span
MAX_DESC_PER_CALL = 4096                             # one VF's share of one poll
# stats[]
S_TX_FRAMES, S_TX_DESC, S_TX_BAD_DMA, S_TX_CTXT, S_TX_RUNT, S_RING_ERROR, \
    S_RX_FRAMES, S_RX_NO_DESC, S_RX_BAD_DMA, S_RX_TOO_BIG, S_TX_BAD_OFFLOAD, S_TX_TSO = range(12)
NSTATS = 12
# txs[]: a frame being gathered, and the offload context (the last context descriptor)
T_SIZE, T_BAD, T_OPTS, T_CTX_LENS, T_CTX_CMD, T_CTX_MSS = range(6)
NTXS = 6


@helper
def _le64(a, p):
    return le32(a, p) | (le32(a, p + 4) << 32)


@helper
def _ring(regs, base, mem_size, iova, iova_size):
    """(offset in mem, descriptors, head, tail) of a queue's ring, or ndesc -1 when
    the driver's registers make no sense."""
    ln = np.int64(regs[(base + R_LEN) >> 2])
    addr = np.int64(regs[(base + R_BAL) >> 2]) | (np.int64(regs[(base + R_BAH) >> 2]) << 32)
    nd = ln // 16
    off = addr - iova
    head = np.int64(regs[(base + R_HEAD) >> 2])
    tail = np.int64(regs[(base + R_TAIL) >> 2])
    if (ln <= 0 or ln % 128 != 0 or ln > MAX_RING_BYTES or addr % 128 != 0 or off < 0
            or off > iova_size - ln
            or off > mem_size - ln or head >= nd or tail >= nd):
        return off, np.int64(-1), head, tail
    return off, nd, head, tail


CTX_VALID = 1 << 32                                  # txs[T_CTX_CMD]: a context was given
OPT_FIRST, OPT_TSE = 1 << 16, 1 << 17                # txs[T_OPTS] besides the POPTS bits


@helper
def _offload(meta, data, i, txs, stats):
    """Apply the frame's offloads as described by its first data descriptor and the
    context; False when they make no sense for the frame (it is dropped)."""
    opts = txs[T_OPTS]
    if opts & (TXD_POPTS_IXSM | TXD_POPTS_TXSM | OPT_TSE) == 0:
        return True
    if txs[T_CTX_CMD] & CTX_VALID == 0:
        return False                                 # offloads without a context
    lens = txs[T_CTX_LENS]
    cmd = txs[T_CTX_CMD]
    maclen = (lens >> TXD_MACLEN_SHIFT) & 0x7F
    iplen = lens & 0x1FF
    l4len = (txs[T_CTX_MSS] >> TXD_L4LEN_SHIFT) & 0xFF
    mss = (txs[T_CTX_MSS] >> TXD_MSS_SHIFT) & 0xFFFF
    size = meta[LEN, i]
    f = meta[OFF, i]
    l3 = maclen
    l4 = maclen + iplen
    v4 = cmd & TXD_TUCMD_IPV4 != 0
    tcp = cmd & TXD_TUCMD_L4T_MASK == TXD_TUCMD_L4T_TCP
    udp = cmd & TXD_TUCMD_L4T_MASK == 0
    if maclen < 14 or iplen < (20 if v4 else 40) or l4 + (20 if tcp else 8) > size:
        return False
    if (data[f + l3] >> 4) != (4 if v4 else 6):
        return False
    if opts & OPT_TSE:
        if not tcp or l4len < 20 or l4 + l4len >= size or mss < 1:
            return False
        if size - l3 - (0 if v4 else 40) > 0xFFFF:
            return False                             # its IP length would not fit
        # what the hardware writes into every segment, written once into the whole
        if v4:
            put_be16(data, f + l3 + 2, size - l3)
        else:
            put_be16(data, f + l3 + 4, size - l3 - 40)
        c = f + l4 + 16
        put_be16(data, c, fold(be16(data, c) + (size - l4)))
        meta[GSO_TYPE, i] = GSO_TCPV4 if v4 else GSO_TCPV6
        meta[GSO_SIZE, i] = mss
        stats[S_TX_TSO] += 1
    if v4 and opts & (TXD_POPTS_IXSM | OPT_TSE):
        put_be16(data, f + l3 + 10, 0)
        put_be16(data, f + l3 + 10, (~fold(sum16(data, f + l3, iplen))) & 0xFFFF)
    if opts & (TXD_POPTS_TXSM | OPT_TSE):
        if not (tcp or udp):
            return False
        meta[FLAGS, i] |= F_CSUM_PARTIAL
        meta[CSUM_START, i] = l4
        meta[CSUM_OFF, i] = 16 if tcp else 6
    return True


@kernel
def vf_transmit(mem, iova, iova_size, regs, icr, txs, meta, data, n, cursor, src_port,
                stats):
    """Descriptors from TDH to TDT into the batch from slot ``n``. ``regs`` are the
    queue-register pages (the guest writes them: every value is checked), ``icr``
    the VF's VTEICR. Returns (n, cursor, interrupt causes)."""
    if np.int64(regs[(TX_BASE + R_DCTL) >> 2]) & DCTL_ENABLE == 0 or txs.shape[0] < NTXS:
        return n, cursor, 0
    off, nd, h, t = _ring(regs, TX_BASE, mem.shape[0], iova, iova_size)
    if nd < 0:
        stats[S_RING_ERROR] += 1
        return n, cursor, 0
    cap = meta.shape[1] - ROW_PAD
    cause = 0
    budget = MAX_DESC_PER_CALL
    while h != t:
        if txs[T_SIZE] == 0:
            if n >= cap:
                break                                # a new frame needs a row: next call
            # Start a frame only when its EOP is already in [TDH, TDT): a frame is
            # gathered in one call, into this batch, never continued in another.
            e = h
            whole = False
            total = 0
            for _ in range(MAX_FRAME_DESC):
                if e == t:
                    break
                ce = le32(mem, off + e * 16 + 8)
                if (ce >> TXD_DTYP_SHIFT) & 0xF == TXD_DTYP_DATA and ce & TXD_CMD_DEXT:
                    total += ce & 0xFFFF
                    if ce & TXD_CMD_EOP:
                        whole = True
                        break
                e = (e + 1) % nd
            if whole and cursor > 0 and cursor > data.shape[0] - min(total, MAX_TSO_FRAME):
                break                                # no room left for it: next call
            if not whole:
                if (t - h) % nd < MAX_FRAME_DESC:
                    break                            # its EOP is not posted yet
                stats[S_TX_BAD_DMA] += 1             # no EOP within 64: not a frame,
                for _ in range(MAX_FRAME_DESC):      # its descriptors are skipped
                    d = off + h * 16
                    if le32(mem, d + 8) & TXD_CMD_RS:
                        put_le32(mem, d + 12, le32(mem, d + 12) | TXD_STAT_DD)
                    h = (h + 1) % nd
                budget -= MAX_FRAME_DESC
                if budget <= 0:
                    break
                continue
            if budget <= 0:
                break                                # the other VFs' turn: next call
        d = off + h * 16
        addr = _le64(mem, d)
        ctl = le32(mem, d + 8)
        stats[S_TX_DESC] += 1
        dtyp = (ctl >> TXD_DTYP_SHIFT) & 0xF
        if ctl & TXD_CMD_DEXT and dtyp == TXD_DTYP_CTXT:
            # the offload context: vlan_macip_lens, type_tucmd_mlhl, mss_l4len_idx
            txs[T_CTX_LENS] = le32(mem, d)
            txs[T_CTX_CMD] = (ctl & 0xFFFFF) | CTX_VALID
            txs[T_CTX_MSS] = le32(mem, d + 12)
            stats[S_TX_CTXT] += 1
        elif ctl & TXD_CMD_DEXT == 0 or dtyp != TXD_DTYP_DATA:
            stats[S_TX_BAD_DMA] += 1                 # neither: skipped
        else:
            ln = ctl & 0xFFFF
            b = addr - iova
            size = txs[T_SIZE]
            if size == 0 and txs[T_BAD] == 0 and txs[T_OPTS] == 0:
                # POPTS and TSE count as the first descriptor of the frame gives them
                txs[T_OPTS] = OPT_FIRST | (le32(mem, d + 12) & (TXD_CC | TXD_POPTS_IXSM
                                                                 | TXD_POPTS_TXSM)) \
                    | (OPT_TSE if ctl & TXD_CMD_TSE else 0)
            limit = MAX_TSO_FRAME if txs[T_OPTS] & OPT_TSE else MAX_FRAME
            if (txs[T_BAD] == 0 and ln >= 0 and b >= 0 and b <= iova_size - ln
                    and b <= mem.shape[0] - ln and size + ln <= limit
                    and cursor + size + ln <= data.shape[0]):
                copy_bytes(data, cursor + size, mem, b, ln)
                txs[T_SIZE] = size + ln
            elif txs[T_BAD] == 0:
                txs[T_BAD] = 1
                stats[S_TX_BAD_DMA] += 1
            if ctl & TXD_CMD_EOP:
                size = txs[T_SIZE]
                if txs[T_BAD] == 0 and size >= 14:
                    init_packet(meta, n, cursor, size, src_port, 0)
                    if _offload(meta, data, n, txs, stats):
                        n += 1
                        cursor = (cursor + size + ALIGN - 1) & ~(ALIGN - 1)
                        stats[S_TX_FRAMES] += 1
                    else:
                        stats[S_TX_BAD_OFFLOAD] += 1
                elif txs[T_BAD] == 0:
                    stats[S_TX_RUNT] += 1
                txs[T_SIZE] = 0
                txs[T_BAD] = 0
                txs[T_OPTS] = 0
        if ctl & TXD_CMD_RS:
            put_le32(mem, d + 12, le32(mem, d + 12) | TXD_STAT_DD)
            cause = EICR_RTX_Q0
        h = (h + 1) % nd
        budget -= 1
    regs[(TX_BASE + R_HEAD) >> 2] = h
    icr[0] |= cause
    return n, cursor, cause


@kernel
def vf_receive(mem, iova, iova_size, regs, icr, meta, data, plan, j0, j1, stats):
    """The frames ``plan[0, j0:j1]`` of the batch into the receive ring. Returns
    (frames delivered, interrupt causes)."""
    if np.int64(regs[(RX_BASE + R_DCTL) >> 2]) & DCTL_ENABLE == 0:
        stats[S_RX_NO_DESC] += j1 - j0
        return 0, 0
    off, nd, h, t = _ring(regs, RX_BASE, mem.shape[0], iova, iova_size)
    if nd < 0:
        stats[S_RING_ERROR] += 1
        stats[S_RX_NO_DESC] += j1 - j0
        return 0, 0
    bsize = (np.int64(regs[(RX_BASE + R_SRRCTL) >> 2]) & SRRCTL_BSIZEPKT) * 1024
    if bsize == 0:
        bsize = 2048
    done = 0
    for j in range(j0, j1):
        i = plan[0, j]
        ln = meta[LEN, i]
        src = meta[OFF, i]
        if ln <= 0 or ln > MAX_RX_FRAME or src < 0 or src > data.shape[0] - ln:
            stats[S_RX_TOO_BIG] += 1
            continue
        good = RXD_STAT_L4CS | RXD_STAT_IPCS if meta[FLAGS, i] & (F_CSUM_PARTIAL
                                                                  | F_CSUM_VALID) else 0
        need = (ln + bsize - 1) // bsize
        free = (t - h) % nd                      # [RDH, RDT) belongs to the device
        if need > free:
            stats[S_RX_NO_DESC] += 1
            continue
        ok = True                                # every buffer inside the mapping?
        for k in range(need):
            b = _le64(mem, off + ((h + k) % nd) * 16) - iova
            chunk = min(bsize, ln - k * bsize)
            if b < 0 or b > iova_size - chunk or b > mem.shape[0] - chunk:
                ok = False
        if not ok:
            stats[S_RX_BAD_DMA] += 1             # the descriptors stay the driver's
            continue
        for k in range(need):
            d = off + h * 16
            b = _le64(mem, d) - iova
            chunk = min(bsize, ln - k * bsize)
            # Checked again: an earlier chunk may have landed on this descriptor.
            if b >= 0 and b <= iova_size - chunk and b <= mem.shape[0] - chunk:
                copy_bytes(mem, b, data, src + k * bsize, chunk)
            else:
                stats[S_RX_BAD_DMA] += 1
                chunk = 0
            put_le(mem, d, 0, 8)                  # write-back: no RSS, no packet type
            status = RXD_STAT_DD | (RXD_STAT_EOP | good if k == need - 1 else 0)
            put_le32(mem, d + 8, status)
            put_le(mem, d + 12, chunk, 2)
            put_le(mem, d + 14, 0, 2)
            h = (h + 1) % nd
        done += 1
        stats[S_RX_FRAMES] += 1
    regs[(RX_BASE + R_HEAD) >> 2] = h
    cause = EICR_RTX_Q0 if done else 0
    icr[0] |= cause
    return done, cause


def warm() -> None:
    """Compile both engines before traffic."""
    from switch.batch import PacketBatch
    b = PacketBatch(4, 1 << 16)
    mem = np.zeros(4096, np.uint8)
    regs = np.zeros(QREGS_SIZE // 4, np.uint32)
    icr = np.zeros(1, np.int64)
    stats = np.zeros(NSTATS, np.int64)
    vf_transmit(mem, 0, 4096, regs, icr, np.zeros(NTXS, np.int64), b.meta, b.data, 0, 0, 1,
                stats)
    vf_receive(mem, 0, 4096, regs, icr, b.meta, b.data, np.zeros((2, 1), np.int64), 0, 0,
               stats)


"""The 82540EM's transmit engine: descriptors from TDH to TDT in guest RAM, frames
into a switch batch, offloads carried as the batch's own.

Reference: e1000_vfio.md A.7 (descriptor formats, how QEMU tells them apart,
how Linux fills them), A.8 (ring mechanics), A.10 (transmit semantics), A.4
(TDT/TCTL run the ring; causes TXDW/TXQE).

- A context descriptor latches the offload parameters (IP and TCP/UDP checksum
  start/offset/end, TUCMD, MSS, header length) for the data descriptors after it.
- Data and legacy descriptors add their buffer to the frame being assembled
  (kept across calls, as hardware keeps its FIFO); EOP ends it.
- A TSO frame (TSE) stays one super-packet: GSO TCPv4/v6 with its MSS and a
  partial checksum, its IP length and TCP pseudo-header sum rewritten to Linux's
  GSO convention (the e1000 driver leaves both without the length, since the
  hardware adds it per segment). TXSM alone becomes a partial checksum; IXSM's
  IPv4 header checksum is computed here (20-60 bytes). VLE with CTRL.VME puts the
  descriptor's tag out of band, as NDIS carries it.
- Descriptors with RS get DD written back; TXDW is raised if any did, TXQE always.

The guest is hostile: a ring whose TDLEN, TDH or TDT make no sense, or whose
descriptors lie outside guest RAM, is not run (TX_STOPPED, counted, until the
guest fixes the registers); a buffer outside guest RAM or
a frame over TX_MAX drops that frame, counted; nothing is read or written
outside guest RAM.
"""
from __future__ import annotations

import numpy as np

from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_VLAN, FLAGS, GSO_SIZE,
                          GSO_TCPV4, GSO_TCPV6, GSO_TYPE, ROW_PAD, TCI, copy_bytes, init_packet)
from switch.byteorder import be16, le16, le32, put_be16
from switch.checksum import fold, sum16
from switch.kernel import helper, kernel

from . import descriptors as DS
from . import regs as E

TX_MAX = 65536 + 256        # the largest frame assembled (QEMU: a 64 KiB buffer)
# txs[] slots: the engine's state between calls
T_SIZE, T_BAD, T_POPTS, T_TSE, T_VLAN, T_IPCSS, T_IPCSO, T_IPCSE, T_TUCSS, T_TUCSO, \
    T_TUCSE, T_TUCMD, T_MSS, T_HDRLEN, T_LEGACY_CSO, T_LEGACY_CSS = range(16)
NTXS = 16
# stats[] slots (the model's own, beside the guest-visible registers)
X_FRAMES, X_DESC, X_BAD_DMA, X_TOO_BIG, X_RING_ERROR, X_RUNT, X_IDE = range(7)
NXSTATS = 7                 # X_IDE: descriptors with IDE (interrupt delay) seen
# why() codes
TX_DONE, TX_BATCH_FULL, TX_STOPPED = 0, 1, 2

_R = np.int64
_CTRL, _VET, _TDBAL, _TDBAH, _TDLEN, _TDH, _TDT = (
    E.CTRL >> 2, E.VET >> 2, E.TDBAL >> 2, E.TDBAH >> 2, E.TDLEN >> 2, E.TDH >> 2, E.TDT >> 2)
_GPTC, _TPT, _GOTCL, _GOTCH, _TOTL, _TOTH, _BPTC, _MPTC = (
    E.STATS["GPTC"] >> 2, E.STATS["TPT"] >> 2, E.STATS["GOTCL"] >> 2, E.STATS["GOTCH"] >> 2,
    E.STATS["TOTL"] >> 2, E.STATS["TOTH"] >> 2, E.STATS["BPTC"] >> 2, E.STATS["MPTC"] >> 2)


@helper
def sat_add(reg, i, n):
    """Add to a statistics register, saturating at 2^32 - 1 (A.4)."""
    v = _R(reg[i]) + n
    reg[i] = v if v < 0xFFFFFFFF else 0xFFFFFFFF


@helper
def add64(reg, lo, hi, n):
    """Add to a 64-bit counter kept as a low/high register pair."""
    v = (_R(reg[hi]) << 32) + _R(reg[lo]) + n
    reg[lo] = v & 0xFFFFFFFF
    reg[hi] = (v >> 32) & 0xFFFFFFFF


@helper
def _tso_headers(buf, size, txs):
    """Make a TSO frame's headers Linux's GSO convention: IP length of the whole
    super-packet (IPv4 header checksum redone), TCP checksum field the
    pseudo-header sum with the TCP length. False if the headers do not fit."""
    ipcss = txs[T_IPCSS]
    tucss = txs[T_TUCSS]
    if tucss + 20 > size or ipcss + 20 > tucss:
        return False
    tcplen = size - tucss
    if txs[T_TUCMD] & (DS.TXD_CMD_IP >> 24):                 # IPv4
        ihl = _R(buf[ipcss] & 15) * 4
        if ihl < 20 or ipcss + ihl > tucss:
            return False
        put_be16(buf, ipcss + 2, size - ipcss)
        put_be16(buf, ipcss + 10, 0)
        put_be16(buf, ipcss + 10, (~fold(sum16(buf, ipcss, ihl))) & 0xFFFF)
        s = sum16(buf, ipcss + 12, 8) + 6 + tcplen
    else:                                                    # IPv6
        if ipcss + 40 > tucss:
            return False
        put_be16(buf, ipcss + 4, size - ipcss - 40)
        s = sum16(buf, ipcss + 8, 32) + 6 + tcplen
    put_be16(buf, tucss + 16, fold(s))
    return True


@helper
def _ip_checksum(buf, size, txs):
    """IXSM without TSO: the IPv4 header checksum at IPCSO over IPCSS..IPCSE."""
    css = txs[T_IPCSS]
    cso = txs[T_IPCSO]
    cse = txs[T_IPCSE]
    end = size if cse == 0 else min(cse + 1, size)
    if css >= end or cso + 2 > size:
        return
    put_be16(buf, cso, 0)
    put_be16(buf, cso, (~fold(sum16(buf, css, end - css))) & 0xFFFF)


@helper
def _emit(buf, size, txs, meta, data, n, cursor, port_id, reg, stats):
    """The assembled frame into batch slot n with its offloads. Returns the next
    cursor, or -1 if the frame was dropped."""
    if size < 14:
        stats[X_RUNT] += 1
        return -1
    popts = txs[T_POPTS]
    if txs[T_TSE]:
        if not _tso_headers(buf, size, txs) or txs[T_MSS] < 1:
            stats[X_TOO_BIG] += 1
            return -1
    elif popts & DS.TXD_POPTS_IXSM:
        _ip_checksum(buf, size, txs)
    copy_bytes(data, cursor, buf, 0, size)
    init_packet(meta, n, cursor, size, port_id, 0)
    fl = 0
    if txs[T_TSE] or popts & DS.TXD_POPTS_TXSM:
        cs = txs[T_TUCSS]
        co = txs[T_TUCSO] - cs
        if cs + co + 2 <= size and co >= 0:
            fl |= F_CSUM_PARTIAL
            meta[CSUM_START, n] = cs
            meta[CSUM_OFF, n] = co
    elif txs[T_LEGACY_CSO] > txs[T_LEGACY_CSS] >= 14 and txs[T_LEGACY_CSO] + 2 <= size:
        fl |= F_CSUM_PARTIAL                       # a legacy descriptor's IC (A.7)
        meta[CSUM_START, n] = txs[T_LEGACY_CSS]
        meta[CSUM_OFF, n] = txs[T_LEGACY_CSO] - txs[T_LEGACY_CSS]
    if txs[T_TSE]:
        meta[GSO_TYPE, n] = GSO_TCPV4 if txs[T_TUCMD] & (DS.TXD_CMD_IP >> 24) else GSO_TCPV6
        meta[GSO_SIZE, n] = txs[T_MSS]
    if txs[T_VLAN] >= 0:
        fl |= F_VLAN
        meta[TCI, n] = txs[T_VLAN]
    meta[FLAGS, n] |= fl
    # A.10 statistics (frame + 4 for the FCS the hardware would add)
    sat_add(reg, _GPTC, 1)
    sat_add(reg, _TPT, 1)
    add64(reg, _GOTCL, _GOTCH, size + 4)
    add64(reg, _TOTL, _TOTH, size + 4)
    if buf[0] & 1:
        if buf[0] == 0xFF and buf[1] == 0xFF and buf[2] == 0xFF:
            sat_add(reg, _BPTC, 1)
        else:
            sat_add(reg, _MPTC, 1)
    stats[X_FRAMES] += 1
    return (cursor + size + 63) & ~63


@kernel
def e1000_transmit(mem, reg, txs, buf, meta, data, n, cursor, port_id, stats):
    """Run the transmit ring from TDH to TDT (A.8) into batch slots from n.
    Returns (n, cursor, interrupt causes, why)."""
    ndesc = _R(reg[_TDLEN]) // DS.SIZE
    tdh = _R(reg[_TDH])
    tdt = _R(reg[_TDT])
    if tdh == tdt:
        return n, cursor, E.ICR_TXQE, TX_DONE
    base = (_R(reg[_TDBAH]) << 32) | (_R(reg[_TDBAL]) & ~0xF)
    if ndesc == 0 or tdh >= ndesc or tdt >= ndesc or base < 0 or \
            base + ndesc * DS.SIZE > mem.shape[0]:
        stats[X_RING_ERROR] += 1
        return n, cursor, 0, TX_STOPPED
    cap = meta.shape[1] - ROW_PAD
    vme = (_R(reg[_CTRL]) & E.CTRL_VME) != 0
    wrote = False
    why = TX_DONE
    while tdh != tdt:
        if n >= cap or cursor + TX_MAX > data.shape[0]:
            why = TX_BATCH_FULL
            break
        da = base + tdh * DS.SIZE
        lower = le32(mem, da + 8)
        stats[X_DESC] += 1
        if (lower & (DS.TXD_CMD_DEXT | DS.TXD_DTYP_D)) == DS.TXD_CMD_DEXT:
            # a context descriptor (A.7): latch the offload parameters
            txs[T_IPCSS] = mem[da]
            txs[T_IPCSO] = mem[da + 1]
            txs[T_IPCSE] = le16(mem, da + 2)
            txs[T_TUCSS] = mem[da + 4]
            txs[T_TUCSO] = mem[da + 5]
            txs[T_TUCSE] = le16(mem, da + 6)
            txs[T_TUCMD] = (lower >> 24) & 0xFF
            txs[T_HDRLEN] = mem[da + 13]
            txs[T_MSS] = le16(mem, da + 14)
            if txs[T_TUCSO] == 0:          # as QEMU: TCP's field at 16, UDP's at 6
                txs[T_TUCSO] = txs[T_TUCSS] + (16 if txs[T_TUCMD] & 1 else 6)
        else:
            if lower & DS.TXD_CMD_DEXT:
                ln = lower & DS.TXD_LEN_MASK
                if txs[T_SIZE] == 0 and txs[T_BAD] == 0:
                    txs[T_POPTS] = mem[da + 13]
                    txs[T_TSE] = 1 if lower & DS.TXD_CMD_TSE else 0
                    txs[T_LEGACY_CSO] = 0
                    txs[T_LEGACY_CSS] = 0
            else:
                ln = lower & 0xFFFF
                if txs[T_SIZE] == 0 and txs[T_BAD] == 0:
                    txs[T_POPTS] = 0
                    txs[T_TSE] = 0
                    txs[T_LEGACY_CSO] = mem[da + 10] if lower & DS.TXD_CMD_IC else 0
                    txs[T_LEGACY_CSS] = mem[da + 13]
            if txs[T_SIZE] == 0 and txs[T_BAD] == 0:
                txs[T_VLAN] = le16(mem, da + 14) if (lower & DS.TXD_CMD_VLE and vme) else -1
            if ln > 0 and txs[T_BAD] == 0:
                addr = le32(mem, da) | (le32(mem, da + 4) << 32)
                if addr < 0 or addr > mem.shape[0] - ln:
                    txs[T_BAD] = 1
                    stats[X_BAD_DMA] += 1
                elif txs[T_SIZE] + ln > buf.shape[0]:
                    txs[T_BAD] = 1
                    stats[X_TOO_BIG] += 1
                else:
                    copy_bytes(buf, txs[T_SIZE], mem, addr, ln)
                    txs[T_SIZE] += ln
            if lower & DS.TXD_CMD_EOP:
                if txs[T_BAD] == 0:
                    nxt = _emit(buf, txs[T_SIZE], txs, meta, data, n, cursor, port_id, reg,
                                stats)
                    if nxt >= 0:
                        n += 1
                        cursor = nxt
                txs[T_SIZE] = 0
                txs[T_BAD] = 0
        if lower & (DS.TXD_CMD_RS | DS.TXD_CMD_RPS):
            mem[da + 12] |= DS.TXD_STAT_DD
            wrote = True
        if lower & DS.TXD_CMD_IDE:
            stats[X_IDE] += 1
        tdh += 1
        if tdh >= ndesc:
            tdh = 0
    reg[_TDH] = tdh
    causes = E.ICR_TXQE if tdh == tdt else 0
    if wrote:
        causes |= E.ICR_TXDW
    return n, cursor, causes, why

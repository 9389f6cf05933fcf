"""The 82540EM's receive engine: frames the switch delivers to the port, through
the receive filters, into the guest's buffers by the descriptors from RDH.

Reference: e1000_vfio.md A.9 (receive semantics as QEMU implements them), A.8
(ring mechanics, RXO/RXDMT0), A.3 (RCTL bits, buffer sizes, multicast hash,
VLAN filter), A.7 (descriptor status).

- Nothing is received unless STATUS.LU and RCTL.EN (and, for the caller, Bus
  Master); short frames are padded to 60 bytes; over 1518 bytes (16 KiB - 4
  with RCTL.LPE) a frame is dropped (ROC) unless RCTL.SBP.
- The filter: broadcast with BAM, multicast with MPE, unicast with UPE, an exact
  RAL/RAH (AV) match, else the MTA hash of the MO-selected 12 bits; a tagged
  frame (EtherType = VET) must also find its VID in VFTA when RCTL.VFE.
- CTRL.VME strips the tag into the descriptor's special field with status VP.
- A frame fills buffers of the RCTL size from RDH, EOP on the last; descriptors
  whose buffer address is 0 are skipped; status DD|EOP|IXSM (the checksum bits
  are not claimed, as QEMU); the length counts the 4 FCS bytes unless SECRC.
- No free descriptor (RDH = RDT): RNBC and MPC count it and RXO is raised;
  otherwise RXT0, and RXDMT0 when the free descriptors fall to the RDMTS share.
- The e1000 has no receive offloads: a GSO super-packet is segmented and a
  partial checksum finished first (switch.gso.segment), the tag a delivery puts
  on goes in inline, where the VLAN logic above meets it.

Guest memory is written only inside guest RAM: a ring or a buffer outside it
stops the engine for this call (the frame is counted dropped) and is flagged.
"""
from __future__ import annotations

import numpy as np

from switch.batch import copy_bytes
from switch.gso import segment
from switch.kernel import helper, kernel

from . import descriptors as DS
from . import regs as E
from .tx import add64, sat_add

_R = np.int64
_CTRL, _STATUS, _RCTL, _VET, _RDBAL, _RDBAH, _RDLEN, _RDH, _RDT = (
    E.CTRL >> 2, E.STATUS >> 2, E.RCTL >> 2, E.VET >> 2, E.RDBAL >> 2, E.RDBAH >> 2,
    E.RDLEN >> 2, E.RDH >> 2, E.RDT >> 2)
_RA, _MTA, _VFTA = E.RA >> 2, E.MTA >> 2, E.VFTA >> 2
_S = {k: v >> 2 for k, v in E.STATS.items()}
_GPRC, _TPR, _GORCL, _GORCH, _TORL, _TORH, _BPRC, _MPRC, _ROC, _RNBC, _MPC, _RUC = (
    _S["GPRC"], _S["TPR"], _S["GORCL"], _S["GORCH"], _S["TORL"], _S["TORH"], _S["BPRC"],
    _S["MPRC"], _S["ROC"], _S["RNBC"], _S["MPC"], _S["RUC"])
_PRC = (_S["PRC64"], _S["PRC127"], _S["PRC255"], _S["PRC511"], _S["PRC1023"], _S["PRC1522"])
# stats[] slots, the model's own
RX_FRAMES, RX_NOT_READY, RX_FILTERED, RX_OVERSIZE, RX_NO_BUFFER, RX_BAD_DMA, RX_MALFORMED = \
    range(7)
NRXSTATS = 7
MAX_SEGMENTS = 64


@helper
def _accept(reg, f, p, ln):
    """A.9's group filter and VLAN filter for the frame f[p:p+ln]."""
    rctl = _R(reg[_RCTL])
    et = (_R(f[p + 12]) << 8) | _R(f[p + 13])
    if rctl & E.RCTL_VFE and et == _R(reg[_VET]) and ln >= 18:
        vid = ((_R(f[p + 14]) << 8) | _R(f[p + 15])) & 0xFFF
        if not (_R(reg[_VFTA + ((vid >> 5) & 0x7F)]) >> (vid & 31)) & 1:
            return False
    mc = (f[p] & 1) != 0
    if mc:
        bc = True
        for k in range(6):
            if f[p + k] != 0xFF:
                bc = False
        if bc and rctl & E.RCTL_BAM:
            return True
        if rctl & E.RCTL_MPE:
            return True
    elif rctl & E.RCTL_UPE:
        return True
    lo = _R(f[p]) | (_R(f[p + 1]) << 8) | (_R(f[p + 2]) << 16) | (_R(f[p + 3]) << 24)
    hi = _R(f[p + 4]) | (_R(f[p + 5]) << 8)
    for k in range(E.RA_COUNT):
        rah = _R(reg[_RA + 2 * k + 1])
        if rah & E.RAH_AV and _R(reg[_RA + 2 * k]) == lo and (rah & 0xFFFF) == hi:
            return True
    shift = (4, 3, 2, 0)[(rctl >> E.RCTL_MO_SHIFT) & 3]
    v = ((((_R(f[p + 5]) << 8) | _R(f[p + 4])) >> shift) & 0xFFF)
    return ((_R(reg[_MTA + (v >> 5)]) >> (v & 31)) & 1) == 1


@helper
def _free_descs(rdh, rdt, ndesc):
    return (rdt - rdh) if rdt >= rdh else (ndesc - rdh + rdt)


@helper
def rx_buffer_size(rctl):
    """RCTL.BSIZE/BSEX decoded (A.3); the reserved BSEX|00 reads as 2048, as QEMU."""
    b = (rctl >> E.RCTL_BSIZE_SHIFT) & 3
    if rctl & E.RCTL_BSEX:
        return 2048 if b == 0 else 16384 if b == 1 else 8192 if b == 2 else 4096
    return 2048 if b == 0 else 1024 if b == 1 else 512 if b == 2 else 256


@helper
def _desc_addr(mem, da):
    a = _R(0)
    for k in range(8):
        a |= _R(mem[da + k]) << (8 * k)
    return a


NO_BUFFER, BAD_DMA = -1, -2


@helper
def _place(mem, reg, f, p, ln, status_extra, special, stats):
    """Write one accepted frame into the ring from RDH. Returns interrupt causes,
    NO_BUFFER (counted; nothing written) or BAD_DMA (flagged)."""
    ndesc = _R(reg[_RDLEN]) // DS.SIZE
    rdh = _R(reg[_RDH])
    rdt = _R(reg[_RDT])
    base = (_R(reg[_RDBAH]) << 32) | (_R(reg[_RDBAL]) & ~0xF)
    if ndesc == 0 or rdh >= ndesc or rdt >= ndesc or base < 0 or \
            base > mem.shape[0] - ndesc * DS.SIZE:
        stats[RX_BAD_DMA] += 1
        return BAD_DMA
    rctl = _R(reg[_RCTL])
    bsize = rx_buffer_size(rctl)
    total = ln + (0 if rctl & E.RCTL_SECRC else 4)
    # First the room (as QEMU checks before writing): buffers from RDH up to RDT,
    # zero-address descriptors skipped, every buffer inside guest RAM.
    room = 0
    cur = rdh
    while room < total:
        if cur == rdt:
            sat_add(reg, _RNBC, 1)
            sat_add(reg, _MPC, 1)
            stats[RX_NO_BUFFER] += 1
            return NO_BUFFER
        addr = _desc_addr(mem, base + cur * DS.SIZE)
        if addr != 0:
            if addr < 0 or addr > mem.shape[0] - bsize:
                stats[RX_BAD_DMA] += 1
                return BAD_DMA
            room += bsize
        cur += 1
        if cur >= ndesc:
            cur = 0
    done = 0
    cur = rdh
    while done < total:
        da = base + cur * DS.SIZE
        addr = _desc_addr(mem, da)
        if addr != 0:
            chunk = min(bsize, total - done)
            data_n = max(0, min(chunk, ln - done))          # the FCS bytes stay unwritten
            copy_bytes(mem, addr, f, p + done, data_n)
            done += chunk
            st = DS.RXD_STAT_DD
            sp = 0
            if done >= total:
                st |= DS.RXD_STAT_EOP | DS.RXD_STAT_IXSM | status_extra
                sp = special
            mem[da + 8] = chunk & 0xFF
            mem[da + 9] = (chunk >> 8) & 0xFF
            mem[da + 10] = 0
            mem[da + 11] = 0
            mem[da + 13] = 0
            mem[da + 14] = sp & 0xFF
            mem[da + 15] = (sp >> 8) & 0xFF
            mem[da + 12] = st
        cur += 1
        if cur >= ndesc:
            cur = 0
    reg[_RDH] = cur
    causes = E.ICR_RXT0
    rdmts = (rctl >> E.RCTL_RDMTS_SHIFT) & 3
    if _free_descs(cur, rdt, ndesc) * DS.SIZE <= _R(reg[_RDLEN]) >> (rdmts + 1):
        causes |= E.ICR_RXDMT0
    return causes


@helper
def _one(mem, reg, f, p, ln, small, stats):
    """A.9 for one frame at f[p:p+ln] (which may be modified: the tag stripped);
    a short one is padded to 60 bytes in ``small``."""
    rctl = _R(reg[_RCTL])
    if ln < 14:
        stats[RX_MALFORMED] += 1
        return 0
    if ln < 60:
        copy_bytes(small, 0, f, p, ln)
        for k in range(ln, 60):
            small[k] = 0
        f = small
        p = 0
        ln = 60
    limit = (16384 - 4) if rctl & E.RCTL_LPE else 1518
    if ln > limit and not rctl & E.RCTL_SBP:
        sat_add(reg, _ROC, 1)
        stats[RX_OVERSIZE] += 1
        return 0
    if not _accept(reg, f, p, ln):
        stats[RX_FILTERED] += 1
        return 0
    status = 0
    special = 0
    et = (_R(f[p + 12]) << 8) | _R(f[p + 13])
    if _R(reg[_CTRL]) & E.CTRL_VME and et == _R(reg[_VET]) and ln >= 18:
        special = (_R(f[p + 14]) << 8) | _R(f[p + 15])
        for k in range(11, -1, -1):            # drop the 4 tag bytes after the MACs
            f[p + 4 + k] = f[p + k]
        p += 4
        ln -= 4
        status = DS.RXD_STAT_VP
    causes = _place(mem, reg, f, p, ln, status, special, stats)
    if causes == NO_BUFFER:
        return E.ICR_RXO
    if causes < 0:
        return 0
    # A.9 statistics (+4 for the FCS)
    sat_add(reg, _GPRC, 1)
    sat_add(reg, _TPR, 1)
    add64(reg, _GORCL, _GORCH, ln + 4)
    add64(reg, _TORL, _TORH, ln + 4)
    size = ln + 4
    b = 0 if size <= 64 else 1 if size <= 127 else 2 if size <= 255 else 3 if size <= 511 \
        else 4 if size <= 1023 else 5
    if size <= 1522:
        sat_add(reg, _PRC[b], 1)
    if f[p] & 1:
        if f[p] == 0xFF and f[p + 1] == 0xFF and f[p + 2] == 0xFF:
            sat_add(reg, _BPRC, 1)
        else:
            sat_add(reg, _MPRC, 1)
    stats[RX_FRAMES] += 1
    return causes


@kernel
def e1000_receive(mem, reg, meta, data, plan, j0, j1, scratch, seglens, small, stats):
    """Receive the deliveries plan[:, j0:j1] (A.9). ``scratch`` takes a segmented
    super-packet, ``small`` (64 bytes) a padded runt. Returns the interrupt causes."""
    causes = 0
    if not (_R(reg[_STATUS]) & E.STATUS_LU) or not (_R(reg[_RCTL]) & E.RCTL_EN):
        stats[RX_NOT_READY] += j1 - j0
        return 0
    for j in range(j0, j1):
        i = plan[0, j]
        d = plan[1, j]
        # every frame goes through scratch (segmented, checksum finished, tag inline)
        k = segment(meta, data, i, d, scratch, seglens, MAX_SEGMENTS)
        if k == 0:
            stats[RX_MALFORMED] += 1
            continue
        at = 0
        for s in range(k):
            ln = seglens[s]
            if ln < 0 or at + ln > scratch.shape[0]:
                stats[RX_MALFORMED] += 1
                break
            causes |= _one(mem, reg, scratch, at, ln, small, stats)
            at += ln
    return causes

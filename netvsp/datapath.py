"""NetVSP's compiled data path: what the guest sends, into the switch's batch.

``netvsp_ingress`` drains the guest-to-host ring of one channel. For each data
packet (NVSP SEND_RNDIS_PKT, channel type 0, in-band with a send-buffer section
or GPA-direct, vmbus_netvsp.md d.4, e.2, f.2, f.3) it gathers the RNDIS bytes —
the section's bytes, then the GPA ranges' — into the batch arena once, walks the
RNDIS_PACKET_MSGs in them (several when the guest batched into one section), and
makes each frame a batch slot in place, with the offload state of its per-packet
info (e.5): TX checksum info -> partial checksum at the TCP/UDP header, LSO v2 ->
a TCPv4/TCPv6 GSO super-packet with its MSS, 802.1Q info -> the tag out of band.
The guest's completion is queued (``comp``); the caller writes them back.

Anything else on the ring (a control message, a completion for a receive) stops
the walk at that packet and is left to the control path: the return value says so.

Every number here was written by the guest: section indices and sizes, RNDIS
lengths and offsets, PPI sizes and offsets are checked before use; a bad RNDIS
message is counted (``bad``) and its packet completed with
NVSP_STAT_INVALID_RNDIS_PKT, as Linux would be answered; a corrupt ring stops the
walk with the ring's error code, and the channel is the control path's to close.
"""
from __future__ import annotations

import numpy as np

from switch.byteorder import le32, put_le32
from switch.batch import (ALIGN, CSUM_OFF, CSUM_START, D_TAG_SHIFT, D_TAGGED, F_CSUM_PARTIAL,
                          F_CSUM_VALID, F_VLAN, FLAGS, GSO_SIZE, GSO_TCPV4, GSO_TCPV6, GSO_TYPE,
                          L3OFF, L4OFF, LEN, OFF, ROW_PAD, TCI, copy_bytes, init_packet)
from switch.gso import segment
from switch.kernel import helper, kernel

from . import nvsp as N
from . import rndis as R
from .vmbus import packet as P
from .vmbus import ring as RG

# Why ingress stopped (non-negative; ring errors are the ring's negative codes).
DRAINED, BATCH_FULL, CONTROL = 0, 1, 2
# bad[] slots
BAD_SECTION, BAD_GPA, BAD_RNDIS, BAD_PPI = 0, 1, 2, 3
NBAD = 4
MAX_PIECES = 64            # GPA pieces of one packet (Linux: 32 page buffers, f.3)
# comp[] columns: transaction id, NVSP status
C_ID, C_STATUS = 0, 1

_T_INBAND = P.VM_PKT_DATA_INBAND
_T_GPA = P.VM_PKT_DATA_USING_GPA_DIRECT
_MSG_RNDIS = N.MSG_SEND_RNDIS_PKT
_NONE = N.SECTION_INDEX_NONE
_RNDIS_PACKET = R.MSG_PACKET
_PKT_HDR = R.PACKET.itemsize          # 44: header and body of RNDIS_PACKET_MSG
_BASE = R.OFFSET_BASE                  # 8: body-relative offsets count from here
_OFF_DATA = R.OFF_PKT_DATA_OFFSET
_OFF_DLEN = R.OFF_PKT_DATA_LEN
_OFF_PPI = R.OFF_PKT_PPI_OFFSET
_OFF_PPI_LEN = R.OFF_PKT_PPI_LEN
_PPI_HDR = R.PPI_HEADER_SIZE
_CSUM, _LSO, _VLAN = R.PPI_TCPIP_CHKSUM, R.PPI_TCP_LARGESEND, R.PPI_IEEE_8021Q
_TX_V4, _TX_V6, _TX_TCP, _TX_UDP = (R.CSUM_TX_IS_IPV4, R.CSUM_TX_IS_IPV6, R.CSUM_TX_TCP,
                                    R.CSUM_TX_UDP)
_TX_TCP_OFF_SHIFT, _TX_TCP_OFF_MASK = R.CSUM_TX_TCP_HEADER_OFFSET_SHIFT, \
    R.CSUM_TX_TCP_HEADER_OFFSET_MASK
_LSO_MAX = R.LSO_MAX_SIZE
_LSO_MSS, _LSO_OFF_SHIFT, _LSO_OFF_MASK, _LSO_V6 = (R.LSO_MSS_MASK, R.LSO_TCP_HEADER_OFFSET_SHIFT,
                                                    R.LSO_TCP_HEADER_OFFSET_MASK, R.LSO_IPV6)


FRAMES_OK, FRAMES_BAD, FRAMES_FULL = 0, 1, 2


@helper
def _rndis_frames(data, s, L, meta, n, cap, port_id, bad):
    """The RNDIS_PACKET_MSGs of the stream data[s:s+L] as batch slots from n.
    Returns (n, status): FRAMES_BAD if a message was malformed (the rest of the
    stream is then skipped, as its lengths cannot be trusted), FRAMES_FULL if the
    batch filled before the stream ended (the caller takes the packet again)."""
    o = 0
    while o < L:
        if n >= cap:
            return n, FRAMES_FULL
        if L - o < _PKT_HDR:
            bad[BAD_RNDIS] += 1
            return n, FRAMES_BAD
        m = s + o
        mlen = le32(data, m + 4)
        if le32(data, m) != _RNDIS_PACKET or mlen < _PKT_HDR or mlen > L - o:
            bad[BAD_RNDIS] += 1
            return n, FRAMES_BAD
        doff = le32(data, m + _OFF_DATA)
        dlen = le32(data, m + _OFF_DLEN)
        poff = le32(data, m + _OFF_PPI)
        plen = le32(data, m + _OFF_PPI_LEN)
        body = mlen - _BASE
        # data and PPI areas inside the message, after the fixed body (e.4)
        if doff < _PKT_HDR - _BASE or dlen < 14 or doff > body or dlen > body - doff:
            bad[BAD_RNDIS] += 1
            return n, FRAMES_BAD
        fl = 0
        tci = 0
        cs_start = 0
        cs_off = 0
        gso_type = 0
        gso_size = 0
        if plen > 0:
            if poff < _PKT_HDR - _BASE or poff > body or plen > body - poff:
                bad[BAD_PPI] += 1
                return n, FRAMES_BAD
            q = 0
            while q < plen:
                e = m + _BASE + poff + q
                if plen - q < _PPI_HDR:
                    bad[BAD_PPI] += 1
                    return n, FRAMES_BAD
                size = le32(data, e)
                ptype = le32(data, e + 4)
                pofs = le32(data, e + 8)
                if size < _PPI_HDR or size > plen - q or pofs < _PPI_HDR or pofs > size - 4:
                    bad[BAD_PPI] += 1
                    return n, FRAMES_BAD
                v = le32(data, e + pofs)
                if ptype == _CSUM:
                    tcp_off = (v >> _TX_TCP_OFF_SHIFT) & _TX_TCP_OFF_MASK
                    if v & (_TX_TCP | _TX_UDP) and v & (_TX_V4 | _TX_V6) and tcp_off >= 14:
                        fl |= F_CSUM_PARTIAL
                        cs_start = tcp_off
                        cs_off = 16 if v & _TX_TCP else 6
                elif ptype == _LSO:
                    mss = v & _LSO_MSS
                    tcp_off = (v >> _LSO_OFF_SHIFT) & _LSO_OFF_MASK
                    if dlen > _LSO_MAX:
                        bad[BAD_PPI] += 1      # over what the host advertised (e.5, e.6)
                        return n, FRAMES_BAD
                    if mss > 0 and tcp_off >= 14:
                        gso_type = GSO_TCPV6 if v & _LSO_V6 else GSO_TCPV4
                        gso_size = mss
                        fl |= F_CSUM_PARTIAL
                        cs_start = tcp_off
                        cs_off = 16
                elif ptype == _VLAN:
                    vid = (v >> R.VLAN_ID_SHIFT) & R.VLAN_ID_MASK
                    prio = v & R.VLAN_PRIORITY_MASK
                    cfi = 1 if v & R.VLAN_CFI else 0
                    tci = (prio << 13) | (cfi << 12) | vid
                    fl |= F_VLAN
                q += size
        if cs_start and cs_start + cs_off + 2 > dlen:
            bad[BAD_PPI] += 1                 # a checksum place outside the frame
            return n, FRAMES_BAD
        init_packet(meta, n, m + _BASE + doff, dlen, port_id, 0)
        meta[FLAGS, n] |= fl
        meta[TCI, n] = tci
        meta[CSUM_START, n] = cs_start
        meta[CSUM_OFF, n] = cs_off
        meta[GSO_TYPE, n] = gso_type
        meta[GSO_SIZE, n] = gso_size
        n += 1
        o += mlen
    return n, FRAMES_OK


@kernel
def netvsp_ingress(mem, rbase, rds, rstate, desc, pieces, nvsp,
                   sbuf_gpa, sbuf_size, section_size,
                   meta, data, n, cursor, port_id, comp, ncomp, bad,
                   rx_free, rx_nfree, rx_chain, rx_head):
    """Drain data packets of one channel into the batch from slot ``n``.

    ``rstate[0]`` is the private read position (start it with ring_read_pos);
    ``rstate[1]`` the read index at the last commit. Returns (n, cursor, ncomp,
    why): DRAINED, BATCH_FULL, CONTROL (a control packet is next; not consumed),
    or a negative ring error. The caller commits the read index."""
    cap = meta.shape[1] - ROW_PAD
    if not RG.geometry_ok(mem, rbase, rds):
        return n, cursor, ncomp, RG.E_GEOMETRY
    nsec = sbuf_size // section_size if section_size > 0 else 0
    data_start = rbase + RG.CONTROL
    while n < cap and ncomp < comp.shape[0]:
        rc = RG.read_packet(mem, rbase, rds, rstate[0], desc)
        if rc == RG.E_EMPTY:
            return n, cursor, ncomp, DRAINED
        if rc < 0:
            return n, cursor, ncomp, rc
        ptype = desc[RG.D_TYPE]
        plen = desc[RG.D_PAYLOAD_LEN]
        if ptype == P.VM_PKT_COMP:
            # The guest is done with a receive: its sub-allocations are free again.
            # Completions of anything else (control replies) are the control path's.
            if not receive_completed(desc[RG.D_TRANS_ID], rx_free, rx_nfree, rx_chain,
                                     rx_head):
                return n, cursor, ncomp, CONTROL
            rstate[0] = desc[RG.D_NEXT]
            continue
        if (ptype != _T_INBAND and ptype != _T_GPA) or plen < 16:
            return n, cursor, ncomp, CONTROL
        RG.get_bytes(mem, data_start, rds, desc[RG.D_PAYLOAD], nvsp, 0, 16)
        if le32(nvsp, 0) != _MSG_RNDIS or le32(nvsp, 4) != 0:
            return n, cursor, ncomp, CONTROL      # not data: the control path's
        idx = le32(nvsp, 8)
        ssz = le32(nvsp, 12)
        status = N.STATUS_SUCCESS
        total = 0
        npieces = 0
        if idx != _NONE and (idx >= nsec or ssz > section_size or
                             sbuf_gpa + idx * section_size + ssz > mem.shape[0]):
            bad[BAD_SECTION] += 1
            status = N.STATUS_INVALID_RNDIS_PKT
        else:
            if idx != _NONE:
                total = ssz
            if ptype == _T_GPA:
                npieces = P.parse_gpa_direct(mem, rbase, rds, desc, MAX_PIECES, pieces)
                if npieces < 0:
                    bad[BAD_GPA] += 1
                    status = N.STATUS_INVALID_RNDIS_PKT
                    npieces = 0
                for k in range(npieces):
                    total += pieces[k, P.P_LEN]
        if status == N.STATUS_SUCCESS:
            if total == 0 or total > data.shape[0]:
                bad[BAD_RNDIS] += 1
                status = N.STATUS_INVALID_RNDIS_PKT
            elif cursor + total > data.shape[0]:
                return n, cursor, ncomp, BATCH_FULL    # not consumed: next batch
        if status == N.STATUS_SUCCESS:
            # One copy: section bytes then GPA bytes, the RNDIS stream (e.2).
            at = cursor
            if idx != _NONE:
                copy_bytes(data, at, mem, sbuf_gpa + idx * section_size, ssz)
                at += ssz
            for k in range(npieces):
                ln = pieces[k, P.P_LEN]
                copy_bytes(data, at, mem, pieces[k, P.P_GPA], ln)
                at += ln
            n2, fst = _rndis_frames(data, cursor, total, meta, n, cap, port_id, bad)
            if fst == FRAMES_FULL:
                if n > 0:
                    return n, cursor, ncomp, BATCH_FULL    # not consumed: next batch
                bad[BAD_RNDIS] += 1        # more messages than an empty batch holds
                status = N.STATUS_INVALID_RNDIS_PKT
                n2 = 0
            elif fst == FRAMES_BAD:
                status = N.STATUS_INVALID_RNDIS_PKT
            if n2 > n:
                cursor = (cursor + total + ALIGN - 1) & ~(ALIGN - 1)
            n = n2
        if desc[RG.D_FLAGS] & P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED:
            comp[ncomp, C_ID] = desc[RG.D_TRANS_ID]
            comp[ncomp, C_STATUS] = status
            ncomp += 1
        rstate[0] = desc[RG.D_NEXT]
    return n, cursor, ncomp, BATCH_FULL


@kernel
def write_completions(mem, wbase, wds, comp, start, ncomp, msg):
    """Complete guest packets comp[start:ncomp] on the host-to-guest ring (b.4: the
    payload is NVSP SEND_RNDIS_PKT_COMPLETE {108, status}). Returns (written,
    signal): written stops early when the ring is full (the rest wait)."""
    done = start
    begin = -1
    pos = 0
    while done < ncomp:
        need = P.inband_footprint(8)
        p = RG.ring_write_begin(mem, wbase, wds, need) if begin < 0 else pos
        if p < 0:
            break
        if begin >= 0:
            # Later packets of one batch: the write index is published only at the
            # commit, so room is checked here against our own position.
            r = RG.load32(mem, wbase + RG.READ_INDEX)
            if not RG.index_ok(r, wds) or RG.to_write(pos, r, wds) <= need:
                break
        st = comp[done, C_STATUS]
        msg[0] = _MSG_RNDIS + 1
        msg[1] = 0
        msg[2] = 0
        msg[3] = 0
        msg[4] = st & 0xFF
        msg[5] = (st >> 8) & 0xFF
        msg[6] = 0
        msg[7] = 0
        if begin < 0:
            begin = p
        pos = P.put_inband(mem, wbase, wds, p, P.VM_PKT_COMP, 0, comp[done, C_ID], msg, 0, 8)
        if pos < 0:
            break
        done += 1
    if begin < 0:
        return done - start, 0
    sig = RG.ring_write_commit(mem, wbase, wds, begin, pos)
    return done - start, 1 if sig == 1 else 0


# ---------------------------------------------------------------- host -> guest
MAX_RANGES = 375           # frames per transfer-page packet, as OpenVMM (f.1)
_PPI_U32 = R.PPI_U32_SIZE
_VLAN_SHIFT, _VLAN_CFI = R.VLAN_ID_SHIFT, R.VLAN_CFI
_OFF_VC, _OFF_RES = R.OFF_PKT_VC_HANDLE, R.OFF_PKT_RESERVED
_RX_CSUM_OK = R.CSUM_RX_TCP_SUCCEEDED | R.CSUM_RX_UDP_SUCCEEDED | R.CSUM_RX_IP_SUCCEEDED
_RXBUF_ID = N.RECEIVE_BUFFER_ID
RX_HDR = _PKT_HDR + 2 * _PPI_U32      # header, checksum info, 802.1Q
_PKTINFO = R.PPI_RNDIS_PKTINFO_ID
_PKTINFO_VER = R.PKTINFO_ID_VERSION
_SUBALLOC, _FIRST, _LAST = R.PKTINFO_SUBALLOC, R.PKTINFO_1ST_FRAG, R.PKTINFO_LAST_FRAG
RSC_ROOM_LESS = RX_HDR + _PPI_U32     # a fragment's header with its RNDIS_PKTINFO_ID
# stats[] slots for egress
S_DELIVERED, S_NO_BUFFER, S_RING_FULL, S_TOO_BIG, S_SEGMENTED, S_COALESCED = 0, 1, 2, 3, 4, 5
NSTATS = 6


@helper
def _rx_message(mem, at, meta, i, d, src, soff, ln, csum_ok, pflag, pid):
    """An RNDIS_PACKET_MSG at mem[at:] holding the frame src[soff:soff+ln], with the
    receive checksum info and, for a tagged delivery, the tag as 802.1Q info (the
    synthetic NIC gets tags out of band, e.5). Returns its length."""
    q = at + _PKT_HDR
    if csum_ok:
        v = _RX_CSUM_OK
        put_le32(mem, q, _PPI_U32)
        put_le32(mem, q + 4, _CSUM)
        put_le32(mem, q + 8, _PPI_HDR)
        put_le32(mem, q + 12, v)
        q += _PPI_U32
    if pflag:
        # RSC: one fragment of a coalesced packet (RNDIS_PKTINFO_ID, e.5)
        put_le32(mem, q, _PPI_U32)
        put_le32(mem, q + 4, _PKTINFO)
        put_le32(mem, q + 8, _PPI_HDR)
        put_le32(mem, q + 12, _PKTINFO_VER | (pflag << 8) | ((pid & 0xFFFF) << 16))
        q += _PPI_U32
    if d & D_TAGGED:
        tci = (d >> D_TAG_SHIFT) & 0xFFFF
        put_le32(mem, q, _PPI_U32)
        put_le32(mem, q + 4, _VLAN)
        put_le32(mem, q + 8, _PPI_HDR)
        put_le32(mem, q + 12, ((tci & 0xFFF) << _VLAN_SHIFT) | ((tci >> 13) & 7)
               | (_VLAN_CFI if tci & 0x1000 else 0))
        q += _PPI_U32
    h = q - at
    put_le32(mem, at, _RNDIS_PACKET)
    put_le32(mem, at + 4, h + ln)
    put_le32(mem, at + _OFF_DATA, h - _BASE)
    put_le32(mem, at + _OFF_DLEN, ln)
    for k in range(_OFF_DLEN + 4, _OFF_PPI):
        mem[at + k] = 0
    put_le32(mem, at + _OFF_PPI, (_PKT_HDR - _BASE) if h > _PKT_HDR else 0)
    put_le32(mem, at + _OFF_PPI_LEN, h - _PKT_HDR)
    put_le32(mem, at + _OFF_VC, 0)
    put_le32(mem, at + _OFF_RES, 0)
    copy_bytes(mem, at + h, src, soff, ln)
    return h + ln


@helper
def _flush(mem, wbase, wds, ranges, nr, chain, head, first, nvsp, stats):
    """One transfer-page packet for the nr ranges gathered; its transaction id is
    the first sub-allocation, whose chain frees them all on completion (as
    OpenVMM). If the ring has no room, the sub-allocations go back and the
    frames count as dropped. Returns (written, signal)."""
    need = P.xfer_footprint(nr, 16)
    p = RG.ring_write_begin(mem, wbase, wds, need)
    if p < 0:
        stats[S_RING_FULL] += nr
        return False, 0
    end = P.put_xfer_page(mem, wbase, wds, p, _RXBUF_ID,
                          P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, first, ranges, nr,
                          nvsp, 0, 16)
    if end < 0:
        stats[S_RING_FULL] += nr
        return False, 0
    head[first] = 1
    stats[S_DELIVERED] += nr
    return True, RG.ring_write_commit(mem, wbase, wds, p, end)


@helper
def _lend(mem, rbuf_gpa, sub_size, meta, i, d, src, soff, sl, csum_ok, pflag, pid,
          free_subs, nfree, chain, ranges, nr, first, last):
    """One RNDIS message in the next free sub-allocation, added to the transfer-page
    packet being built (its range, and its link in the packet's chain). The
    caller checked there is a free one. Returns (nr, first, last)."""
    nfree[0] -= 1
    sub = free_subs[nfree[0]]
    ranges[nr, 0] = _rx_message(mem, rbuf_gpa + sub * sub_size, meta, i, d, src, soff, sl,
                                csum_ok, pflag, pid)
    ranges[nr, 1] = sub * sub_size
    chain[sub] = -1
    if last >= 0:
        chain[last] = sub
    else:
        first = sub
    return nr + 1, first, sub


@helper
def _send(mem, wbase, wds, ranges, nr, chain, head, first, nvsp, stats, free_subs, nfree):
    """Send the transfer-page packet built so far; if it cannot go, its
    sub-allocations return to the free stack. Returns whether to interrupt."""
    ok, sg = _flush(mem, wbase, wds, ranges, nr, chain, head, first, nvsp, stats)
    if not ok:
        _release(first, free_subs, nfree, chain)
    return sg


@kernel
def netvsp_egress(meta, data, plan, j0, j1, mem, wbase, wds, rbuf_gpa, sub_size,
                  free_subs, nfree, chain, head, ranges, nvsp, scratch, seglens, stats,
                  rsc, smeta, pkt_id):
    """Deliver plan[:, j0:j1] (one synthetic port's share of a batch) into the guest's
    receive buffer: each frame an RNDIS_PACKET_MSG in a free sub-allocation, up to
    MAX_RANGES of them per transfer-page packet on the host-to-guest ring. A
    super-packet that does not fit a sub-allocation is segmented first (gso.py),
    unless ``rsc`` (the guest negotiated receive coalescing, NVSP 6.1): then a TCP
    super-packet goes whole, cut across consecutive sub-allocations as RSC
    fragments of one transfer-page packet (RNDIS_PKTINFO_ID, e.5) straight from
    the batch; one without checksum offload or behind an inline tag is first
    made one big segment with finished checksums (segment() with the whole
    payload as its MSS, into ``smeta``'s one column). Returns whether to interrupt
    the guest."""
    put_le32(nvsp, 0, _MSG_RNDIS)
    put_le32(nvsp, 4, 0)
    put_le32(nvsp, 8, _NONE)
    put_le32(nvsp, 12, 0)
    nr = 0
    first = -1
    last = -1
    sig = 0
    lim = min(MAX_RANGES, ranges.shape[0])      # ranges of one transfer-page packet
    for j in range(j0, j1):
        i = plan[0, j]
        d = plan[1, j]
        ln = meta[LEN, i]
        fl = meta[FLAGS, i]
        csum_ok = (fl & (F_CSUM_PARTIAL | F_CSUM_VALID)) != 0
        nseg = 1
        src = data
        soff = meta[OFF, i]
        segmented = False
        gt = meta[GSO_TYPE, i] & 0x7F
        if rsc and RX_HDR + ln > sub_size and (gt == GSO_TCPV4 or gt == GSO_TCPV6):
            if csum_ok and meta[L3OFF, i] == 14 and (gt == GSO_TCPV4 or meta[L4OFF, i] == 54):
                # A super-packet from a Linux stack already is one big segment: its
                # IP length covers it all and its TCP checksum field holds the
                # pseudo-header sum (CHECKSUM_PARTIAL) or the full sum. It goes
                # as it lies, told "checksum succeeded" as Linux's veth would
                # hand a local receiver such a packet unverified; the guest's
                # stack checks the IP lengths itself. (An IPv6 one with extension
                # headers is made one segment below: the guest side places
                # checksums only right after the fixed header.)
                src = data
                soff = meta[OFF, i]
                total = ln
            else:
                for f in range(smeta.shape[0]):
                    smeta[f, 0] = meta[f, i]
                smeta[GSO_SIZE, 0] = 65535
                if segment(smeta, data, 0, d & ~D_TAGGED, scratch, seglens, 1) != 1:
                    stats[S_TOO_BIG] += 1
                    continue
                src = scratch
                soff = 0
                total = seglens[0]
            room = sub_size - RSC_ROOM_LESS
            nfrag = (total + room - 1) // room
            if nfrag > lim or nfrag > nfree[0]:
                stats[S_NO_BUFFER] += 1
                continue
            if nr + nfrag > lim:
                # the fragments of one packet travel in one transfer-page packet
                sig |= _send(mem, wbase, wds, ranges, nr, chain, head, first, nvsp, stats,
                             free_subs, nfree)
                nr = 0
                first = -1
                last = -1
            pid = pkt_id[0]
            pkt_id[0] = (pid + 1) & 0xFFFF
            off = 0
            for k in range(nfrag):
                sl = min(room, total - off)
                pflag = _SUBALLOC | (_FIRST if k == 0 else 0) | (_LAST if k == nfrag - 1 else 0)
                nr, first, last = _lend(mem, rbuf_gpa, sub_size, meta, i, d, src, soff + off,
                                        sl, True, pflag, pid, free_subs, nfree, chain, ranges,
                                        nr, first, last)
                off += sl
            stats[S_COALESCED] += 1
            continue
        # A partial checksum is finished here (segment() does it for one frame too):
        # Linux's netvsc can only be told "checksum good" (e.5), and its stack
        # would otherwise see the unfinished sum the sender's stack left.
        if RX_HDR + ln > sub_size or fl & F_CSUM_PARTIAL:
            nseg = segment(meta, data, i, d & ~D_TAGGED, scratch, seglens, seglens.shape[0])
            if nseg == 0 or RX_HDR + seglens[0] > sub_size:
                stats[S_TOO_BIG] += 1
                continue
            src = scratch
            soff = 0
            segmented = True
            csum_ok = True                 # segment() finished every checksum
            if nseg > 1:
                stats[S_SEGMENTED] += 1
        for k in range(nseg):
            sl = seglens[k] if segmented else ln
            if nfree[0] == 0:
                stats[S_NO_BUFFER] += nseg - k
                break
            if nr >= lim:
                # full (whatever filled it: coalesced fragments too): send it first
                sig |= _send(mem, wbase, wds, ranges, nr, chain, head, first, nvsp, stats,
                             free_subs, nfree)
                nr = 0
                first = -1
                last = -1
            nr, first, last = _lend(mem, rbuf_gpa, sub_size, meta, i, d, src, soff, sl,
                                    csum_ok, 0, 0, free_subs, nfree, chain, ranges, nr,
                                    first, last)
            soff += sl
    if nr:
        sig |= _send(mem, wbase, wds, ranges, nr, chain, head, first, nvsp, stats,
                     free_subs, nfree)
    return sig


@helper
def _release(s, free_subs, nfree, chain):
    n = 0
    while s >= 0 and n < chain.shape[0]:
        nxt = chain[s]
        chain[s] = -1
        free_subs[nfree[0]] = s
        nfree[0] += 1
        s = nxt
        n += 1


@helper
def receive_completed(tid, free_subs, nfree, chain, head):
    """The guest completed the transfer-page packet ``tid``: free its chain. False
    when tid is not a packet in flight (a protocol violation by the guest)."""
    if tid < 0 or tid >= head.shape[0] or head[tid] == 0:
        return False
    head[tid] = 0
    _release(tid, free_subs, nfree, chain)
    return True


class ReceiveBuffer:
    """The host's bookkeeping of a guest's receive buffer (f.1): ``count``
    sub-allocations of ``sub_size`` bytes from GPA ``gpa``, a stack of the free
    ones, and the chains of those lent to the guest in transfer-page packets.
    The first ``reserved`` sub-allocations are left to the control path (replies
    and indications), as OpenVMM reserves 16 (f.1)."""

    def __init__(self, gpa: int, size: int, sub_size: int, reserved: int = 0):
        self.gpa, self.sub_size = gpa, sub_size
        self.count = size // sub_size
        self.free = np.arange(self.count - 1, reserved - 1, -1, dtype=np.int64)
        self.nfree = np.array([self.count - reserved], dtype=np.int64)
        self.chain = np.full(self.count, -1, dtype=np.int64)
        self.head = np.zeros(self.count, dtype=np.uint8)

    def arrays(self):
        """The four arrays netvsp_ingress takes, in its order."""
        return self.free, self.nfree, self.chain, self.head

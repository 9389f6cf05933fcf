"""NetVSC's compiled data path, guest to host: frames into RNDIS packets on the ring.

As Linux's netvsc_send chooses (vmbus_netvsp.md f.3): a frame whose RNDIS message
(header, per-packet info, frame) fits a send-buffer section is copied there and
announced by an in-band SEND_RNDIS_PKT naming the section; a bigger one (a GSO
super-packet) gets its RNDIS header written in the headroom just before it, and
the header and frame go as one GPA-direct range. Frames must therefore lie in
guest RAM (the batch arena is a window of it) with ``HEADROOM`` bytes free before
each. Per-packet info as Linux emits it (e.5): 802.1Q, then LSO v2 or checksum.

Transaction ids say what to release when the host completes: ``section + 1`` for
a send section, ``GPA_ID + slot`` for a GPA-direct frame (its batch slot).
"""
from __future__ import annotations

import numpy as np

from switch.byteorder import le32, put_le32
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_CSUM_VALID, F_VLAN, FLAGS,
                          GSO_SIZE, GSO_TCPV6, GSO_TYPE, LEN, OFF, ROW_PAD, TCI, copy_bytes,
                          init_packet)
from switch.kernel import helper, kernel

from . import nvsp as N
from . import rndis as R
from .vmbus import packet as P
from .vmbus import ring as RG

HEADROOM = 128            # RNDIS header + three PPIs (44 + 48 = 92), rounded up
GPA_ID = 1 << 32          # transaction ids of GPA-direct frames start here
_HDR = R.PACKET.itemsize
_PPI = R.PPI_U32_SIZE


@helper
def _ppi(a, p, ptype, v):
    put_le32(a, p, _PPI)
    put_le32(a, p + 4, ptype)
    put_le32(a, p + 8, R.PPI_HEADER_SIZE)
    put_le32(a, p + 12, v)
    return p + _PPI


@helper
def _header(meta, i, out, p, v6):
    """The RNDIS_PACKET_MSG header and PPIs of frame i at out[p:]; returns its size.
    ``v6``: the frame is IPv6 (the checksum info says which IP version it is)."""
    fl = meta[FLAGS, i]
    q = p + _HDR
    if fl & F_VLAN:
        tci = meta[TCI, i]
        q = _ppi(out, q, R.PPI_IEEE_8021Q, ((tci & 0xFFF) << R.VLAN_ID_SHIFT)
                 | ((tci >> 13) & 7) | (R.VLAN_CFI if tci & 0x1000 else 0))
    if meta[GSO_TYPE, i] & 0x7F:
        v = (meta[GSO_SIZE, i] & R.LSO_MSS_MASK) | \
            ((meta[CSUM_START, i] & R.LSO_TCP_HEADER_OFFSET_MASK) << R.LSO_TCP_HEADER_OFFSET_SHIFT) \
            | R.LSO_TYPE_V2
        if (meta[GSO_TYPE, i] & 0x7F) == GSO_TCPV6:
            v |= R.LSO_IPV6
        q = _ppi(out, q, R.PPI_TCP_LARGESEND, v)
    elif fl & F_CSUM_PARTIAL:
        v = (meta[CSUM_START, i] & R.CSUM_TX_TCP_HEADER_OFFSET_MASK) << \
            R.CSUM_TX_TCP_HEADER_OFFSET_SHIFT
        v |= R.CSUM_TX_TCP if meta[CSUM_OFF, i] == 16 else R.CSUM_TX_UDP
        v |= R.CSUM_TX_IS_IPV6 if v6 else R.CSUM_TX_IS_IPV4
        q = _ppi(out, q, R.PPI_TCPIP_CHKSUM, v)
    hsize = q - p
    ppi_len = hsize - _HDR
    put_le32(out, p, R.MSG_PACKET)
    put_le32(out, p + 4, hsize + meta[LEN, i])
    put_le32(out, p + R.OFF_PKT_DATA_OFFSET, hsize - R.OFFSET_BASE)
    put_le32(out, p + R.OFF_PKT_DATA_LEN, meta[LEN, i])
    for k in range(R.OFF_PKT_DATA_LEN + 4, R.OFF_PKT_PPI_OFFSET):
        out[p + k] = 0
    put_le32(out, p + R.OFF_PKT_PPI_OFFSET, (_HDR - R.OFFSET_BASE) if ppi_len else 0)
    put_le32(out, p + R.OFF_PKT_PPI_LEN, ppi_len)
    put_le32(out, p + R.OFF_PKT_VC_HANDLE, 0)
    put_le32(out, p + R.OFF_PKT_RESERVED, 0)
    return hsize


@kernel
def netvsc_transmit(mem, wbase, wds, meta, data, data_gpa, n, start,
                    sbuf_gpa, section_size, free_secs, nfree, busy, bufs, nvsp, stats):
    """Send frames start..n-1 of the batch (its arena is guest RAM at ``data_gpa``).
    ``free_secs[:nfree[0]]`` is the stack of free send sections, ``busy`` marks the
    sections in flight (a uint8 per section). Returns
    (next frame not sent, signal the host): stops early when the ring is full."""
    i = start
    begin = -1
    pos = 0
    while i < n:
        ln = meta[LEN, i]
        off = meta[OFF, i]
        if off < 0 or ln < 14 or off > data.shape[0] or ln > data.shape[0] - off:
            stats[2] += 1                  # not a frame of this arena: dropped
            i += 1
            continue
        v6 = data[off + 12] == 0x86 and data[off + 13] == 0xDD
        small = _HDR + 3 * _PPI + ln <= section_size and nfree[0] > 0
        if small:
            need = P.inband_footprint(16)
        else:
            # the largest header the range can start with: its footprint bounds the real one
            bufs[0, 0] = data_gpa + off - (_HDR + 3 * _PPI)
            bufs[0, 1] = _HDR + 3 * _PPI + ln
            need = P.gpa_direct_footprint(bufs, 1, 16)
        if begin < 0:
            p = RG.ring_write_begin(mem, wbase, wds, need)
            if p < 0:
                break
            begin = p
            pos = p
        else:
            r = RG.load32(mem, wbase + RG.READ_INDEX)
            if not RG.index_ok(r, wds) or RG.to_write(pos, r, wds) <= need:
                break
        if small:
            nfree[0] -= 1
            s = free_secs[nfree[0]]
            busy[s] = 1
            at = sbuf_gpa + s * section_size
            h = _header(meta, i, mem, at, v6)
            copy_bytes(mem, at + h, data, off, ln)
            put_le32(nvsp, 0, N.MSG_SEND_RNDIS_PKT)
            put_le32(nvsp, 4, N.CHANNEL_TYPE_DATA)
            put_le32(nvsp, 8, s)
            put_le32(nvsp, 12, h + ln)
            pos = P.put_inband(mem, wbase, wds, pos, P.VM_PKT_DATA_INBAND,
                               P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, s + 1, nvsp, 0, 16)
            stats[0] += 1
        else:
            if off < HEADROOM:
                stats[2] += 1              # no headroom: the frame cannot go (dropped)
                i += 1
                continue
            h = _header(meta, i, data, off - HEADROOM, v6)
            # Slide the header to sit right before the frame, as in skb headroom.
            hstart = off - h
            if hstart != off - HEADROOM:
                for k in range(h):
                    data[hstart + k] = data[off - HEADROOM + k]
            bufs[0, 0] = data_gpa + hstart
            bufs[0, 1] = h + ln
            put_le32(nvsp, 0, N.MSG_SEND_RNDIS_PKT)
            put_le32(nvsp, 4, N.CHANNEL_TYPE_DATA)
            put_le32(nvsp, 8, N.SECTION_INDEX_NONE)
            put_le32(nvsp, 12, 0)
            pos = P.build_gpa_direct(mem, wbase, wds, pos,
                                     P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED, GPA_ID + i,
                                     bufs, 1, nvsp, 0, 16)
            stats[1] += 1
        if pos < 0:
            stats[3] += 1
            break
        i += 1
    if begin < 0:
        return i, 0
    return i, 1 if RG.ring_write_commit(mem, wbase, wds, begin, pos) == 1 else 0


@kernel
def netvsc_reclaim(mem, rbase, rds, rstate, desc, free_secs, nfree, busy, gpa_done):
    """Read the host's completions of our sends from the host-to-guest ring: a send
    section goes back on the free stack, a GPA-direct frame counts in
    ``gpa_done[0]``. Stops at anything else (a receive: the receive path's).
    ``rstate[0]`` is the private read position. Returns the packets consumed, or a
    negative ring error. The caller commits the read index."""
    got = 0
    while True:
        rc = RG.read_packet(mem, rbase, rds, rstate[0], desc)
        if rc == RG.E_EMPTY:
            return got
        if rc < 0:
            return rc
        if desc[RG.D_TYPE] != P.VM_PKT_COMP:
            return got
        tid = desc[RG.D_TRANS_ID]
        if 1 <= tid <= busy.shape[0]:
            if busy[tid - 1]:                      # a host completing twice is ignored
                busy[tid - 1] = 0
                free_secs[nfree[0]] = tid - 1
                nfree[0] += 1
        elif tid >= GPA_ID:
            gpa_done[0] += 1
        rstate[0] = desc[RG.D_NEXT]
        got += 1


# ---------------------------------------------------------------- host -> guest
RX_OK, RX_CONTROL, RX_COMPLETION = 0, 1, 2
_PKTINFO = R.PPI_RNDIS_PKTINFO_ID
_SUBALLOC, _FIRST, _LAST = R.PKTINFO_SUBALLOC, R.PKTINFO_1ST_FRAG, R.PKTINFO_LAST_FRAG


@kernel
def netvsc_receive(mem, rbase, rds, rstate, desc, ranges, rbuf_gpa, rbuf_size,
                   meta, data, n, cursor, comp, ncomp, stats, nvsp8):
    """Frames the host put in the receive buffer, into a batch (what the guest's
    stack gets: copied out of the buffer, so the sub-allocations go back at once).

    For each transfer-page packet: its ranges checked as Linux's netvsc_receive
    checks them (parse_xfer_page), each range one RNDIS_PACKET_MSG validated like
    on the host side (lengths, offsets, per-packet info), the frame copied, the
    802.1Q info back as the out-of-band tag, the receive checksum info as
    F_CSUM_VALID; then the packet's completion is queued (``comp``, NVSP status
    SUCCESS or FAIL if any message was bad, e.2). A completion of our sends stops
    the walk with RX_COMPLETION (netvsc_reclaim takes it), anything else with
    RX_CONTROL (the control path's). Returns (n, cursor, ncomp, why) or a
    negative ring error as why. ``nvsp8``: 8 bytes of scratch."""
    cap = meta.shape[1] - ROW_PAD
    while n < cap and ncomp < comp.shape[0]:
        rc = RG.read_packet(mem, rbase, rds, rstate[0], desc)
        if rc == RG.E_EMPTY:
            return n, cursor, ncomp, RX_OK
        if rc < 0:
            return n, cursor, ncomp, rc
        if desc[RG.D_TYPE] == P.VM_PKT_COMP:
            return n, cursor, ncomp, RX_COMPLETION      # netvsc_reclaim's
        if desc[RG.D_TYPE] != P.VM_PKT_DATA_USING_XFER_PAGES:
            return n, cursor, ncomp, RX_CONTROL
        # RNDIS control replies and indications come the same way, channel type 1
        # in the NVSP message after the ranges (e.2): the control path's.
        if desc[RG.D_PAYLOAD_LEN] < 8:
            return n, cursor, ncomp, RX_CONTROL
        RG.get_bytes(mem, rbase + RG.CONTROL, rds, desc[RG.D_PAYLOAD], nvsp8, 0, 8)
        if le32(nvsp8, 0) != N.MSG_SEND_RNDIS_PKT or le32(nvsp8, 4) != N.CHANNEL_TYPE_DATA:
            return n, cursor, ncomp, RX_CONTROL
        nr = P.parse_xfer_page(mem, rbase, rds, desc, N.RECEIVE_BUFFER_ID, rbuf_size,
                               ranges.shape[0], ranges)
        status = N.STATUS_SUCCESS
        if nr < 0:
            stats[4] += 1
            status = N.STATUS_FAIL
            nr = 0
        need = 0
        for k in range(nr):
            need += ranges[k, 0] + 64
        if n > 0 and (nr > cap - n or cursor + need > data.shape[0]):
            return n, cursor, ncomp, RX_OK         # next batch, empty
        if cursor + need > data.shape[0]:
            stats[5] += 1              # never fits an empty batch: complete it as failed
            status = N.STATUS_FAIL
            nr = 0
        frag = False              # inside an RSC chain (e.5): its data goes on at flen
        flen = 0
        ffl = 0
        ftci = 0
        for k in range(nr):
            ok, ds, dl, fl, tci, pflag = _rx_parse(mem, rbuf_gpa + ranges[k, 1], ranges[k, 0])
            if not ok or (not (pflag & _SUBALLOC) and dl < 14):
                stats[6] += 1
                status = N.STATUS_FAIL
                frag = False
                continue
            if pflag & _SUBALLOC and not (pflag & _FIRST):
                if not frag or cursor + flen + dl > data.shape[0]:
                    stats[6] += 1             # a fragment out of its chain
                    status = N.STATUS_FAIL
                    frag = False
                    continue
                copy_bytes(data, cursor + flen, mem, ds, dl)
                flen += dl
            else:
                if frag:
                    stats[6] += 1             # a chain left without its last fragment
                    status = N.STATUS_FAIL
                copy_bytes(data, cursor, mem, ds, dl)
                flen = dl
                ffl = fl
                ftci = tci
                frag = (pflag & _SUBALLOC) != 0
            if frag and not (pflag & _LAST):
                continue
            frag = False
            if flen < 14:
                stats[6] += 1
                status = N.STATUS_FAIL
                continue
            if n >= cap:
                stats[7] += 1                 # more frames than the batch has slots
                status = N.STATUS_FAIL
                continue
            init_packet(meta, n, cursor, flen, 0, 0)
            meta[FLAGS, n] |= ffl
            meta[TCI, n] = ftci
            if ffl & F_CSUM_VALID:
                _verified_to_partial(meta, data, n)
            n += 1
            cursor = (cursor + flen + 63) & ~63
        if frag:
            stats[6] += 1                     # RSC fragments straddling packets: dropped
            status = N.STATUS_FAIL
        if desc[RG.D_FLAGS] & P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED:
            comp[ncomp, 0] = desc[RG.D_TRANS_ID]
            comp[ncomp, 1] = status
            ncomp += 1
        rstate[0] = desc[RG.D_NEXT]
    return n, cursor, ncomp, RX_OK


@helper
def _sum_be16(buf, p, n):
    s = 0
    for k in range(0, n, 2):
        s += (np.int64(buf[p + k]) << 8) | np.int64(buf[p + k + 1])
    return s


@helper
def _verified_to_partial(meta, data, i):
    """The host said "checksum succeeded" (e.5), which Linux's netvsc turns into
    CHECKSUM_UNNECESSARY; a tap cannot be told that (tun ignores
    VIRTIO_NET_HDR_F_DATA_VALID on writes), so the frame goes to the tap as a
    partial checksum instead: the field gets the pseudo-header sum and the
    virtio header says where the sum goes. Linux's stack takes a partial
    checksum on receive unverified, like CHECKSUM_UNNECESSARY, and finishes it
    right if the guest forwards the frame. Frames it cannot place (no plain
    IPv4/IPv6 TCP or UDP right after the Ethernet header) stay as they are."""
    off = meta[OFF, i]
    ln = meta[LEN, i]
    if ln < 42:
        return
    et = (np.int64(data[off + 12]) << 8) | np.int64(data[off + 13])
    if et == 0x0800:
        ihl = np.int64(data[off + 14] & 15) * 4
        tot = (np.int64(data[off + 16]) << 8) | np.int64(data[off + 17])
        frag = ((np.int64(data[off + 20]) << 8) | np.int64(data[off + 21])) & 0x3FFF
        if ihl < 20 or frag != 0 or tot < ihl or 14 + tot > ln:
            return
        proto = np.int64(data[off + 23])
        l4 = 14 + ihl
        l4len = tot - ihl
        s = _sum_be16(data, off + 26, 8)
    elif et == 0x86DD:
        if ln < 54:
            return
        proto = np.int64(data[off + 20])
        l4 = 54
        l4len = (np.int64(data[off + 18]) << 8) | np.int64(data[off + 19])
        if 54 + l4len > ln:
            return
        s = _sum_be16(data, off + 22, 32)
    else:
        return
    if proto == 6:
        co = 16
        if l4len < 20:
            return
    elif proto == 17:
        co = 6
        if l4len < 8 or (et == 0x0800 and data[off + l4 + 6] == 0 and data[off + l4 + 7] == 0):
            return                 # an IPv4 UDP datagram without checksum: nothing to do
    else:
        return
    s += proto + l4len
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    data[off + l4 + co] = (s >> 8) & 0xFF
    data[off + l4 + co + 1] = s & 0xFF
    meta[FLAGS, i] = (meta[FLAGS, i] & ~F_CSUM_VALID) | F_CSUM_PARTIAL
    meta[CSUM_START, i] = l4
    meta[CSUM_OFF, i] = co


@helper
def _rx_parse(mem, s, L):
    """One RNDIS_PACKET_MSG from the host at mem[s:s+L], validated in place.
    Returns (ok, data start, data length, flags, tci, RSC fragment flags)."""
    if L < _HDR or s < 0 or s > mem.shape[0] - L:
        return False, 0, 0, 0, 0, 0
    mlen = le32(mem, s + 4)
    if le32(mem, s) != R.MSG_PACKET or mlen < _HDR or mlen > L:
        return False, 0, 0, 0, 0, 0
    doff = le32(mem, s + R.OFF_PKT_DATA_OFFSET)
    dlen = le32(mem, s + R.OFF_PKT_DATA_LEN)
    poff = le32(mem, s + R.OFF_PKT_PPI_OFFSET)
    plen = le32(mem, s + R.OFF_PKT_PPI_LEN)
    body = mlen - R.OFFSET_BASE
    if doff < _HDR - R.OFFSET_BASE or dlen < 1 or doff > body or dlen > body - doff:
        return False, 0, 0, 0, 0, 0
    fl = 0
    tci = 0
    pflag = 0
    if plen > 0:
        if poff < _HDR - R.OFFSET_BASE or poff > body or plen > body - poff:
            return False, 0, 0, 0, 0, 0
        q = 0
        while q < plen:
            e = s + R.OFFSET_BASE + poff + q
            if plen - q < R.PPI_HEADER_SIZE:
                return False, 0, 0, 0, 0, 0
            size = le32(mem, e)
            ptype = le32(mem, e + 4)
            pofs = le32(mem, e + 8)
            if size < R.PPI_HEADER_SIZE or size > plen - q or pofs < R.PPI_HEADER_SIZE \
                    or pofs > size - 4:
                return False, 0, 0, 0, 0, 0
            v = le32(mem, e + pofs)
            if ptype == R.PPI_TCPIP_CHKSUM:
                if v & (R.CSUM_RX_TCP_SUCCEEDED | R.CSUM_RX_UDP_SUCCEEDED):
                    fl |= F_CSUM_VALID
            elif ptype == R.PPI_IEEE_8021Q:
                vid = (v >> R.VLAN_ID_SHIFT) & R.VLAN_ID_MASK
                tci = ((v & R.VLAN_PRIORITY_MASK) << 13) | \
                    ((1 if v & R.VLAN_CFI else 0) << 12) | vid
                fl |= F_VLAN
            elif ptype == _PKTINFO:
                pflag = (v >> 8) & 0xFF
            q += size
    return True, s + R.OFFSET_BASE + doff, dlen, fl, tci, pflag

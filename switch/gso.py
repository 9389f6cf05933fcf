"""Software segmentation and checksum completion, for ports without offloads.

A packet from a tap may be a GSO super-packet (up to 64 KiB of TCP payload in one
frame) and may carry a partial checksum: the state a virtio_net_hdr describes
(linux/virtio_net.h: gso_type 1 TCPv4, 4 TCPv6, 3 UDP, 0x80 ECN; gso_size;
csum_start/csum_offset under VIRTIO_NET_HDR_F_NEEDS_CSUM). A destination that
cannot take that state gets what Linux's software GSO would have sent:

* ``segment`` cuts a super-packet into frames the way skb_segment does with
  tcp_gso_segment / inet_gso_segment / ipv6_gso_segment: every frame has a copy
  of the headers, the IPv4 total length, id (incremented per segment from the
  original) and header checksum, or the IPv6 payload length; the TCP sequence
  advanced by the bytes before it; FIN and PSH only on the last segment, CWR only
  on the first; a complete TCP checksum. UDP GSO is segmented like
  __udp_gso_segment (UDP_SEGMENT / SKB_GSO_UDP_L4): each frame is a whole
  datagram with its own length and checksum. A packet without GSO but with a
  partial checksum is finished the way skb_checksum_help does.
* ``finish_checksum`` completes a partial checksum in place in the arena.

Linux seeds the segment checksums from the pseudo-header sum the sender left in
the checksum field; here the pseudo-header is built from the IP header instead
(for IPv6 the final destination of a routing header, RFC 8200 8.1), so a packet
whose field was not prepared that way still leaves with correct checksums.

As in skb_segment, the payload runs to the end of the frame (skb->len); the IP
and UDP length fields of the super-packet are rewritten, not trusted.

Every offset the kernels use is checked against the frame and the output
buffers first (numba does not bounds-check); anything inconsistent makes
``segment`` return 0 and the caller drops the packet.
"""
from __future__ import annotations

from .batch import (copy_bytes, CSUM_OFF, CSUM_START, D_TAG_SHIFT, D_TAGGED, F_CSUM_PARTIAL,
                    F_CSUM_VALID, F_FRAG, F_IPV4, F_IPV6, F_TCP, F_UDP, FLAGS, GSO_SIZE,
                    GSO_TCPV4, GSO_TCPV6, GSO_TYPE, GSO_UDP, L3OFF, L4OFF, LEN, OFF, PAYOFF,
                    PROTO)
from .byteorder import be16 as _be16, put_be16 as _put16
from .checksum import fold as _fold, sum16 as _sum16
from .kernel import helper, kernel

GSO_ECN = 0x80          # virtio: the super-packet carries ECN (CWR) state
GSO_UDP_L4 = 5          # VIRTIO_NET_HDR_GSO_UDP_L4: same segmentation as GSO_UDP here

TCP_FIN = 0x01
TCP_PSH = 0x08
TCP_CWR = 0x80

_IPPROTO_TCP = 6
_IPPROTO_UDP = 17


@helper
def _frame_ok(meta, data, i):
    # Written so that no sum can overflow on a corrupt OFF/LEN.
    off = meta[OFF, i]
    ln = meta[LEN, i]
    return off >= 0 and ln >= 14 and off <= data.shape[0] and ln <= data.shape[0] - off


@helper
def _csum_ok(cs, co, ln):
    # skb_checksum_help: start inside the frame, the 2-byte field inside too.
    return cs >= 0 and co >= 0 and cs < ln and co <= ln and cs + co + 2 <= ln


@kernel
def finish_checksum(meta, data, i):
    """Complete packet ``i``'s partial checksum in the arena (CHECKSUM_PARTIAL
    convention: the field already holds the pseudo-header sum). Clears
    F_CSUM_PARTIAL and sets F_CSUM_VALID. True when there was nothing to do;
    False, packet untouched, when CSUM_START/CSUM_OFF lie outside the frame."""
    fl = meta[FLAGS, i]
    if not fl & F_CSUM_PARTIAL:
        return True
    if not _frame_ok(meta, data, i):
        return False
    off = meta[OFF, i]
    ln = meta[LEN, i]
    cs = meta[CSUM_START, i]
    co = meta[CSUM_OFF, i]
    if not _csum_ok(cs, co, ln):
        return False
    c = (~_fold(_sum16(data, off + cs, ln - cs))) & 0xFFFF
    # 0 means "no checksum" to UDP: send the other zero (CSUM_MANGLED_0).
    _put16(data, off + cs + co, c if c != 0 else 0xFFFF)
    meta[FLAGS, i] = (fl & ~F_CSUM_PARTIAL) | F_CSUM_VALID
    return True


@helper
def _emit(out, pos, data, off, ln, tagged, tci):
    """Frame to ``out[pos:]``, 802.1Q tag inserted after the MACs when tagged."""
    if tagged:
        copy_bytes(out, pos, data, off, 12)
        out[pos + 12] = 0x81
        out[pos + 13] = 0x00
        _put16(out, pos + 14, tci)
        copy_bytes(out, pos + 16, data, off + 12, ln - 12)
        return ln + 4
    copy_bytes(out, pos, data, off, ln)
    return ln


@helper
def _v6_dst_sum(data, base, l3, l4):
    """Pseudo-header sum of the IPv6 destination: the final one when a routing
    header still has segments left (RFC 8200 8.1). -1 if the extension headers
    between l3+40 and l4 do not chain up or the routing type is unknown."""
    dst = base + l3 + 24
    nh = int(data[base + l3 + 6])
    q = l3 + 40
    while q < l4:
        if q + 8 > l4:
            return -1
        if nh == 0 or nh == 43 or nh == 60 or nh == 135:
            hl = (int(data[base + q + 1]) + 1) * 8
        elif nh == 51:
            hl = (int(data[base + q + 1]) + 2) * 4
        else:
            return -1                   # fragments were refused before; others unknown
        if q + hl > l4:
            return -1
        if nh == 43 and data[base + q + 3] != 0:
            rtype = int(data[base + q + 2])
            naddr = int(data[base + q + 1]) >> 1
            if naddr < 1:
                return -1
            if rtype == 0 or rtype == 2:
                dst = base + q + 8 + 16 * (naddr - 1)   # last address listed
            elif rtype == 4:
                dst = base + q + 8                      # SRH: segment list[0]
            else:
                return -1
        nh = int(data[base + q])
        q += hl
    if q != l4:
        return -1
    return _sum16(data, dst, 16)


@kernel
def segment(meta, data, i, d, out, lens, max_frames):
    """Write packet ``i`` as destination word ``d`` receives it into ``out`` as
    back-to-back frames without GSO or partial checksums; ``lens[k]`` is the
    length of frame k. Returns the frame count, 0 when the packet is malformed
    for its GSO state or ``out``/``lens``/``max_frames`` are too small. The
    arena is not modified (other destinations may still want the offloads)."""
    if not _frame_ok(meta, data, i):
        return 0
    nmax = min(max_frames, lens.shape[0])
    if nmax < 1:
        return 0
    off = meta[OFF, i]
    ln = meta[LEN, i]
    fl = meta[FLAGS, i]
    tagged = (d & D_TAGGED) != 0
    shift = 4 if tagged else 0
    tci = (d >> D_TAG_SHIFT) & 0xFFFF
    gt = meta[GSO_TYPE, i] & 0x7F

    if gt == 0:
        if ln + shift > out.shape[0]:
            return 0
        if fl & F_CSUM_PARTIAL:
            cs = meta[CSUM_START, i]
            co = meta[CSUM_OFF, i]
            # A tag goes in at byte 12; a summed area starting before it would move.
            if not _csum_ok(cs, co, ln) or (tagged and cs < 12):
                return 0
            _emit(out, 0, data, off, ln, tagged, tci)
            c = (~_fold(_sum16(data, off + cs, ln - cs))) & 0xFFFF
            _put16(out, cs + co + shift, c if c != 0 else 0xFFFF)
        else:
            _emit(out, 0, data, off, ln, tagged, tci)
        lens[0] = ln + shift
        return 1

    # ---- GSO: check the headers the parser found against the frame and the type
    mss = meta[GSO_SIZE, i]
    if mss < 1 or mss > 0xFFFF:
        return 0
    tcp = gt == GSO_TCPV4 or gt == GSO_TCPV6
    if not tcp and gt != GSO_UDP and gt != GSO_UDP_L4:
        return 0
    if fl & F_FRAG:
        return 0
    v4 = (fl & F_IPV4) != 0
    v6 = (fl & F_IPV6) != 0
    if v4 == v6 or (gt == GSO_TCPV4 and not v4) or (gt == GSO_TCPV6 and not v6):
        return 0
    if tcp and not fl & F_TCP:
        return 0
    if not tcp and not fl & F_UDP:
        return 0
    l3 = meta[L3OFF, i]
    l4 = meta[L4OFF, i]
    hdr = meta[PAYOFF, i]
    # Chained so every difference is of bounded values (no int64 wrap on garbage).
    if l3 < 14 or l4 < l3 or hdr < l4 or hdr > ln:
        return 0
    if l4 - l3 < (20 if v4 else 40) or hdr - l4 < (20 if tcp else 8):
        return 0
    proto = _IPPROTO_TCP if tcp else _IPPROTO_UDP
    if meta[PROTO, i] != proto:
        return 0
    if v4:
        vihl = int(data[off + l3])
        if vihl >> 4 != 4 or (vihl & 0x0F) * 4 != l4 - l3 or int(data[off + l3 + 9]) != proto:
            return 0
    elif int(data[off + l3]) >> 4 != 6:
        return 0
    if tcp:
        doff = (int(data[off + l4 + 12]) >> 4) * 4
        if doff < 20 or l4 + doff != hdr:
            return 0
    elif hdr != l4 + 8:
        return 0

    paylen = ln - hdr
    nseg = (paylen + mss - 1) // mss
    if nseg == 0:
        nseg = 1                        # headers only: one frame, as Linux sends it unsplit
    if nseg > nmax:
        return 0
    ohdr = hdr + shift
    if nseg * ohdr + paylen > out.shape[0]:
        return 0
    first = mss if paylen > mss else paylen       # the largest segment
    if hdr - l3 - (0 if v4 else 40) + first > 0xFFFF:   # IPv4 total / IPv6 payload length
        return 0

    # Pseudo-header: addresses once; protocol and length per segment.
    if v4:
        addr = _sum16(data, off + l3 + 12, 8)
    else:
        dsum = _v6_dst_sum(data, off, l3, l4)
        if dsum < 0:
            return 0
        addr = _sum16(data, off + l3 + 8, 16) + dsum
    ipid = _be16(data, off + l3 + 4)
    seq = (_be16(data, off + l4 + 4) << 16) | _be16(data, off + l4 + 6)
    tflags = int(data[off + l4 + 13])
    nocsum = v4 and not tcp and _be16(data, off + l4 + 6) == 0   # IPv4 UDP without checksum

    # ---- one frame per segment: headers, payload piece, fixed-up fields
    o3 = l3 + shift
    o4 = l4 + shift
    thl = hdr - l4
    pos = 0
    for k in range(nseg):
        start = k * mss
        seg = paylen - start
        if seg > mss:
            seg = mss
        _emit(out, pos, data, off, hdr, tagged, tci)
        copy_bytes(out, pos + ohdr, data, off + hdr + start, seg)
        b3 = pos + o3
        b4 = pos + o4
        if v4:
            _put16(out, b3 + 2, hdr - l3 + seg)
            _put16(out, b3 + 4, (ipid + k) & 0xFFFF)
            out[b3 + 10] = 0
            out[b3 + 11] = 0
            _put16(out, b3 + 10, (~_fold(_sum16(out, b3, l4 - l3))) & 0xFFFF)
        else:
            _put16(out, b3 + 4, hdr - l3 - 40 + seg)
        ulen = thl + seg
        if tcp:
            s = (seq + start) & 0xFFFFFFFF
            _put16(out, b4 + 4, s >> 16)
            _put16(out, b4 + 6, s & 0xFFFF)
            f = tflags
            if k != nseg - 1:
                f &= ~(TCP_FIN | TCP_PSH)
            if k != 0:
                f &= ~TCP_CWR
            out[b4 + 13] = f
            out[b4 + 16] = 0
            out[b4 + 17] = 0
            c = addr + proto + ulen + _sum16(out, b4, ulen)
            _put16(out, b4 + 16, (~_fold(c)) & 0xFFFF)
        else:
            _put16(out, b4 + 4, ulen)
            out[b4 + 6] = 0
            out[b4 + 7] = 0
            if not nocsum:
                c = (~_fold(addr + proto + ulen + _sum16(out, b4, ulen))) & 0xFFFF
                _put16(out, b4 + 6, c if c != 0 else 0xFFFF)
        lens[k] = ohdr + seg
        pos += ohdr + seg
    return nseg

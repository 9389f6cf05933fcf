"""The uplink's packet I/O: AF_PACKET sockets with TPACKET_V3 mmap rings.

The external port reaches the physical network through one AF_PACKET socket
per interface (a veth standing for the wire, or a real NIC), bound with
ETH_P_ALL, promiscuous, blind to its own transmissions (PACKET_IGNORE_OUTGOING)
and bypassing the qdisc. Both directions go through memory shared with the
kernel (packet_mmap.rst):

- receive: a TPACKET_V3 ring of blocks. The kernel fills a block with frames and
  hands it over whole (block_status & TP_STATUS_USER) when it is full or after
  ``retire_ms``; one compiled loop walks the blocks into the batch arena and
  gives each block back (TP_STATUS_KERNEL) once read.
- transmit: a ring of fixed frames. The compiled loop writes each delivery into
  the next free frame (tp_status TP_STATUS_AVAILABLE), marks it
  TP_STATUS_SEND_REQUEST, and one ``send()`` per batch makes the kernel send them all.

With ``offloads`` (the default) the socket has PACKET_VNET_HDR: each frame in
either ring is preceded by a virtio_net_hdr, so GSO super-packets and partial
checksums cross the uplink as they do a tap (DESIGN.md, "Offloads end to end").
Without it, the switch segments super-packets and finishes checksums itself
(switch/gso.py) before they reach the wire.

An 802.1Q tag that the kernel took out of the frame (veth and most NICs strip
it: TP_STATUS_VLAN_VALID with tp_vlan_tci) is handed to the switch out of band,
as an NDIS miniport does (vswitch_vmq_sriov.md 1.4); any other TPID is put back
inline so the parser sees the frame as it was on the wire.

Layouts, linux/if_packet.h:
  tpacket_block_desc: version u32, offset_to_priv u32, then tpacket_hdr_v1:
    block_status u32 @8, num_pkts u32 @12, offset_to_first_pkt u32 @16, blk_len u32 @20
  tpacket3_hdr: tp_next_offset u32 @0, tp_sec @4, tp_nsec @8, tp_snaplen @12, tp_len @16,
    tp_status @20, tp_mac u16 @24, tp_net u16 @26, tp_rxhash u32 @28, tp_vlan_tci u32 @32,
    tp_vlan_tpid u16 @36; transmit data starts at TPACKET_ALIGN(sizeof) = 48.
"""
from __future__ import annotations

import mmap
import socket
import struct

import numpy as np

from . import counters as R
from .byteorder import le16, le32, put_le32
from .batch import (ALIGN, CSUM_OFF, CSUM_START, D_TAGGED, F_CSUM_PARTIAL, F_CSUM_VALID,
                    F_VLAN, FLAGS, GSO_SIZE, GSO_TYPE, LEN, OFF, ROW_PAD, TCI, copy_bytes,
                    init_packet)
from .delivery import emit_frame, tx_failed
from .gso import segment
from .kernel import helper, kernel
from .portkind import PortKind
from .syscalls import send

SOL_PACKET = 263
PACKET_ADD_MEMBERSHIP = 1
PACKET_RX_RING = 5
PACKET_VERSION = 10
PACKET_TX_RING = 13
PACKET_VNET_HDR = 15
PACKET_QDISC_BYPASS = 20
PACKET_IGNORE_OUTGOING = 23
PACKET_MR_PROMISC = 1
TPACKET_V2 = 1
TPACKET_V3 = 2
ETH_P_ALL = 0x0003
MSG_DONTWAIT = 0x40

TP_STATUS_KERNEL = 0
TP_STATUS_USER = 1
TP_STATUS_SEND_REQUEST = 1
TP_STATUS_SENDING = 2
TP_STATUS_WRONG_FORMAT = 4
TP_STATUS_VLAN_VALID = 0x10
TP_STATUS_VLAN_TPID_VALID = 0x40
VNET_HDR = 10
VNET_F_NEEDS_CSUM = 1
VNET_F_DATA_VALID = 2
MAX_FRAME = 65536 + 64            # a GSO super-packet and a tag
MAX_SEGMENTS = 128                # 64 KiB cut at IPv4's smallest MSS, 536 (RFC 879)

# Receive-state slots: current block, next packet in it, its offset in the block.
S_BLOCK, S_PKT, S_OFF = 0, 1, 2
# Transmit-state slot: next frame to fill (the kernel sends in ring order).
S_TX = 0


@helper
def _take(ring, src, snap, st, tci, tpid, vnet, port_id, meta, data, n, cursor):
    """Copy one received frame (at ``src`` in the ring, its virtio header just before
    it) into batch slot ``n``. Returns (n, cursor, 0), or 1 as the last value when
    the arena is full (try again with the next batch)."""
    reinsert = (st & TP_STATUS_VLAN_VALID) != 0 and \
        (st & TP_STATUS_VLAN_TPID_VALID) != 0 and tpid != 0x8100
    need = snap + (4 if reinsert else 0)
    if cursor + need > data.shape[0]:
        # 1: the arena is full, go on with the next batch; 2: not even an empty
        # arena holds it (a batch configured too small): drop it, or the ring stalls.
        return n, cursor, 1 if cursor > 0 else 2
    if reinsert:
        copy_bytes(data, cursor, ring, src, 12)
        data[cursor + 12] = tpid >> 8
        data[cursor + 13] = tpid & 0xFF
        data[cursor + 14] = (tci >> 8) & 0xFF
        data[cursor + 15] = tci & 0xFF
        copy_bytes(data, cursor + 16, ring, src + 12, snap - 12)
    else:
        copy_bytes(data, cursor, ring, src, snap)
    init_packet(meta, n, cursor, need, port_id, 0)
    if st & TP_STATUS_VLAN_VALID and not reinsert:
        meta[TCI, n] = tci & 0xFFFF
        meta[FLAGS, n] |= F_VLAN
    if vnet:
        v = src - VNET_HDR
        fl = ring[v]
        if fl & VNET_F_NEEDS_CSUM:
            meta[FLAGS, n] |= F_CSUM_PARTIAL
            meta[CSUM_START, n] = le16(ring, v + 6) + (4 if reinsert else 0)
            meta[CSUM_OFF, n] = le16(ring, v + 8)
        elif fl & VNET_F_DATA_VALID:
            meta[FLAGS, n] |= F_CSUM_VALID
        meta[GSO_TYPE, n] = ring[v + 1]
        meta[GSO_SIZE, n] = le16(ring, v + 4)
    return n + 1, (cursor + need + ALIGN - 1) & ~(ALIGN - 1), 0


@helper
def _frame_ok(mac, snap, length, vnet, room, hdr_size):
    """A header the kernel wrote still gets checked: the frame lies in its slot, after
    the packet header (``hdr_size``: 32 for tpacket2_hdr, 48 for tpacket3_hdr) and
    the virtio header, and is whole (a truncated super-packet would be wrong data,
    not a short frame)."""
    hdr = VNET_HDR if vnet else 0
    return (mac >= hdr_size + hdr and snap >= 14 and snap == length and snap <= MAX_FRAME
            and mac + snap <= room)


@kernel
def ring_receive_v3(ring, block_size, block_nr, state, port_id, vnet, meta, data, n, cursor,
                    bad):
    """Move frames from a TPACKET_V3 ring (blocks) into the batch from slot ``n``.

    Returns (n, cursor). A block is given back once every frame in it is copied;
    if the batch fills up mid-block, ``state`` remembers where to go on. A bad
    header costs a counted drop (``bad[0]``), never a read outside the ring."""
    cap = meta.shape[1] - ROW_PAD
    while n < cap:
        b = state[S_BLOCK]
        base = b * block_size
        if le32(ring, base + 8) & TP_STATUS_USER == 0:
            break                                   # the kernel still owns it
        npk = le32(ring, base + 12)
        k = state[S_PKT]
        p = state[S_OFF]
        if k == 0:
            p = le32(ring, base + 16)
        while k < npk and n < cap:
            if p < 48 or p + 40 > block_size:
                bad[0] += npk - k                    # a header outside the block
                k = npk
                break
            h = base + p
            snap = le32(ring, h + 12)
            mac = le16(ring, h + 24)
            if not _frame_ok(mac, snap, le32(ring, h + 16), vnet, block_size - p, 48):
                bad[0] += 1
            else:
                n, cursor, full = _take(ring, h + mac, snap, le32(ring, h + 20),
                                        le32(ring, h + 32), le16(ring, h + 36), vnet,
                                        port_id, meta, data, n, cursor)
                if full == 1:
                    break
                if full == 2:
                    bad[0] += 1
            k += 1
            nxt = le32(ring, h)
            p += nxt
            if nxt == 0 and k < npk:
                bad[0] += npk - k                    # a chain that goes nowhere
                k = npk
        if k < npk:
            state[S_PKT] = k                         # batch or arena full mid-block
            state[S_OFF] = p
            break
        put_le32(ring, base + 8, TP_STATUS_KERNEL)      # give the block back
        state[S_BLOCK] = (b + 1) % block_nr
        state[S_PKT] = 0
        state[S_OFF] = 0
    return n, cursor


@kernel
def ring_receive_v2(ring, frame_size, frame_nr, state, port_id, vnet, meta, data, n, cursor,
                    bad):
    """Move frames from a TPACKET_V2 ring (one frame per slot, each handed over as
    soon as it is written) into the batch from slot ``n``. Returns (n, cursor)."""
    cap = meta.shape[1] - ROW_PAD
    while n < cap:
        h = state[S_BLOCK] * frame_size
        st = le32(ring, h)
        if st & TP_STATUS_USER == 0:
            break
        snap = le32(ring, h + 8)
        mac = le16(ring, h + 12)
        if not _frame_ok(mac, snap, le32(ring, h + 4), vnet, frame_size, 32):
            bad[0] += 1
        else:
            n, cursor, full = _take(ring, h + mac, snap, st, le16(ring, h + 24),
                                    le16(ring, h + 26), vnet, port_id, meta, data, n, cursor)
            if full == 1:
                break
            if full == 2:
                bad[0] += 1
        put_le32(ring, h, TP_STATUS_KERNEL)
        state[S_BLOCK] = (state[S_BLOCK] + 1) % frame_nr
    return n, cursor


# Transmit frame header layouts: (tp_status, tp_len, data) offsets.
TX_V2 = np.array([0, 4, 32], dtype=np.int64)     # tpacket2_hdr, TPACKET_ALIGN(32)
TX_V3 = np.array([20, 16, 48], dtype=np.int64)   # tpacket3_hdr, TPACKET_ALIGN(48)


@helper
def _tx_slot(ring, tx_base, frame_size, lay, state, bad):
    """The next free transmit frame's offset, or -1 if the kernel still holds it."""
    f = tx_base + state[S_TX] * frame_size
    st = le32(ring, f + lay[0])
    if st == TP_STATUS_WRONG_FORMAT:
        bad[1] += 1                                  # the kernel refused what we wrote
        st = TP_STATUS_KERNEL
    if st != TP_STATUS_KERNEL:
        return -1
    return f


@helper
def _tx_commit(ring, f, length, state, frame_nr, lay):
    if lay[0] == 20:
        put_le32(ring, f + 0, 0)                       # V3: tp_next_offset must be 0
    put_le32(ring, f + lay[1], length)
    put_le32(ring, f + lay[0], TP_STATUS_SEND_REQUEST)
    state[S_TX] = (state[S_TX] + 1) % frame_nr


@helper
def _flush_and_retry(fd, ring, tx_base, frame_size, lay, state, bad):
    """The ring is full of frames not yet sent: have the kernel send them now (on a
    veth it is done, and the frames free, when send() returns) and look again."""
    send(fd, ring.ctypes.data, 0, MSG_DONTWAIT)
    return _tx_slot(ring, tx_base, frame_size, lay, state, bad)


@kernel
def ring_transmit(meta, data, plan, span, port_ids, fds, rings, tx_bases, frame_size,
                  frame_nr, lay, states, vnets, scratch, seglens, ctr, bad):
    """Queue every planned delivery in its port's transmit ring, then kick each ring
    once. A port without the virtio header gets super-packets segmented and
    checksums finished here."""
    for pi in range(port_ids.shape[0]):
        q = port_ids[pi]
        ring = rings[pi]
        state = states[pi]
        queued = 0
        for j in range(span[q, 0], span[q, 1]):
            i = plan[0, j]
            d = plan[1, j]
            ln = meta[LEN, i]
            fl = meta[FLAGS, i]
            if vnets[pi]:
                f = _tx_slot(ring, tx_bases[pi], frame_size, lay, state, bad)
                if f < 0 and queued:
                    f = _flush_and_retry(fds[pi], ring, tx_bases[pi], frame_size, lay, state,
                                         bad)
                    queued = 0
                if f < 0 or lay[2] + VNET_HDR + ln + 4 > frame_size:
                    tx_failed(ctr, q, ln, d, R.TX_FULL)
                    continue
                v = f + lay[2]
                for b in range(VNET_HDR):
                    ring[v + b] = 0
                shift = 4 if d & D_TAGGED else 0
                if fl & F_CSUM_PARTIAL:
                    ring[v] = VNET_F_NEEDS_CSUM
                    cs = meta[CSUM_START, i] + shift
                    ring[v + 6] = cs & 0xFF
                    ring[v + 7] = (cs >> 8) & 0xFF
                    ring[v + 8] = meta[CSUM_OFF, i] & 0xFF
                    ring[v + 9] = (meta[CSUM_OFF, i] >> 8) & 0xFF
                elif fl & F_CSUM_VALID:
                    ring[v] = VNET_F_DATA_VALID
                ring[v + 1] = meta[GSO_TYPE, i]
                gs = meta[GSO_SIZE, i]
                ring[v + 4] = gs & 0xFF
                ring[v + 5] = (gs >> 8) & 0xFF
                w = emit_frame(ring, v + VNET_HDR, data, meta[OFF, i], ln, d)
                _tx_commit(ring, f, VNET_HDR + w, state, frame_nr, lay)
                queued += 1
            else:
                nseg = segment(meta, data, i, d, scratch, seglens, seglens.shape[0])
                if nseg == 0:
                    tx_failed(ctr, q, ln, d, R.GSO_FAILED)
                    continue
                pos = 0
                for s in range(nseg):
                    sl = seglens[s]
                    f = _tx_slot(ring, tx_bases[pi], frame_size, lay, state, bad)
                    if f < 0 and queued:
                        f = _flush_and_retry(fds[pi], ring, tx_bases[pi], frame_size, lay,
                                             state, bad)
                        queued = 0
                    if f < 0 or lay[2] + sl > frame_size:
                        tx_failed(ctr, q, ln, d, R.TX_FULL)
                        break
                    copy_bytes(ring, f + lay[2], scratch, pos, sl)
                    _tx_commit(ring, f, sl, state, frame_nr, lay)
                    pos += sl
                    queued += 1
        if queued:
            send(fds[pi], ring.ctypes.data, 0, MSG_DONTWAIT)


class RingSocket:
    """One AF_PACKET socket with its two rings, bound to ``ifname`` in the network
    namespace this process is in when it is created.

    ``version`` 2: fixed receive frames, each handed over (and the reader woken) as
    soon as it is written; ``rx_nr`` frames of ``frame_size``. ``version`` 3: blocks
    of ``block_size`` packed with frames of any size, handed over when full or after
    ``retire_ms``, which is latency a lone frame pays (measured in the note of the
    issue that chose the default). Transmit rings are ``tx_nr`` frames either way."""

    def __init__(self, ifname: str, offloads: bool = True, version: int = 2,
                 frame_size: int = 1 << 17, rx_nr: int = 256, tx_nr: int = 128,
                 block_size: int = 1 << 20, block_nr: int = 16, retire_ms: int = 1):
        if version not in (2, 3):
            raise ValueError(f"TPACKET version {version}: 2 or 3")
        if frame_size % mmap.PAGESIZE or frame_size < 32 + 80 + MAX_FRAME:
            raise ValueError(f"frame_size {frame_size}: a multiple of the page size that "
                             f"holds a {MAX_FRAME}-byte frame and its headers")
        if version == 3 and (block_size % mmap.PAGESIZE or block_size < frame_size):
            raise ValueError(f"block_size {block_size}: a page multiple of at least "
                             f"{frame_size}")
        self.ifname, self.offloads, self.version = ifname, offloads, version
        self.frame_size, self.frame_nr = frame_size, tx_nr
        if version == 3:
            self.rx_unit, self.rx_nr = block_size, block_nr
            rx = (block_size, block_nr, frame_size, block_size * block_nr // frame_size,
                  retire_ms, 0, 0)
        else:
            self.rx_unit, self.rx_nr = frame_size, rx_nr
            rx = (frame_size, rx_nr, frame_size, rx_nr, 0, 0, 0)
        self.layout = TX_V3 if version == 3 else TX_V2
        s = socket.socket(socket.AF_PACKET, socket.SOCK_RAW, socket.htons(ETH_P_ALL))
        try:
            s.setblocking(False)
            if offloads:
                s.setsockopt(SOL_PACKET, PACKET_VNET_HDR, 1)
            s.setsockopt(SOL_PACKET, PACKET_VERSION, TPACKET_V3 if version == 3 else TPACKET_V2)
            s.setsockopt(SOL_PACKET, PACKET_IGNORE_OUTGOING, 1)
            s.setsockopt(SOL_PACKET, PACKET_QDISC_BYPASS, 1)
            s.setsockopt(SOL_PACKET, PACKET_RX_RING, struct.pack("7I", *rx))
            s.setsockopt(SOL_PACKET, PACKET_TX_RING, struct.pack(
                "7I", frame_size, tx_nr, frame_size, tx_nr, 0, 0, 0))
            s.bind((ifname, ETH_P_ALL))
            ifindex = socket.if_nametoindex(ifname)
            s.setsockopt(SOL_PACKET, PACKET_ADD_MEMBERSHIP,
                         struct.pack("iHH8s", ifindex, PACKET_MR_PROMISC, 0, b""))
            self.tx_base = self.rx_unit * self.rx_nr
            self.map = mmap.mmap(s.fileno(), self.tx_base + frame_size * tx_nr)
        except OSError as e:
            s.close()
            raise OSError(e.errno, f"cannot open AF_PACKET rings on {ifname!r}: "
                          f"{e.strerror}") from None
        self.sock = s
        self.ring = np.frombuffer(self.map, dtype=np.uint8)
        self.rx_state = np.zeros(3, dtype=np.int64)
        self.tx_state = np.zeros(1, dtype=np.int64)

    def receive(self, port_id, meta, data, n, cursor, bad):
        fn = ring_receive_v3 if self.version == 3 else ring_receive_v2
        return fn(self.ring, self.rx_unit, self.rx_nr, self.rx_state, port_id, self.offloads,
                  meta, data, n, cursor, bad)

    def fileno(self) -> int:
        return self.sock.fileno()

    def close(self) -> None:
        if self.sock is None:
            return
        self.ring = None
        try:
            self.map.close()
        except BufferError:
            pass                 # a view is still alive; the socket close frees the rings
        self.sock.close()
        self.sock = None


class PacketRingPorts(PortKind):
    """Switch ports served by AF_PACKET ring sockets (the external port's kind)."""
    name = "af_packet"

    def __init__(self):
        super().__init__()
        self._sock_of: dict[int, RingSocket] = {}
        self.bad = np.zeros(2, dtype=np.int64)   # [bad receive headers, refused transmits]
        self._rr = 0
        self._sync()

    def attach(self, port, sock: RingSocket) -> None:
        """Serve ``port`` with ``sock`` (this object closes it when the port goes)."""
        self._sock_of[port.port_id] = sock
        self.port_added(port)

    def port_added(self, port) -> None:
        super().port_added(port)
        self._sync()

    def port_removed(self, port) -> None:
        super().port_removed(port)
        s = self._sock_of.pop(port.port_id, None)
        if s is not None:
            s.close()
        self._sync()

    def _sync(self) -> None:
        ids = [p for p in self.port_ids.tolist() if p in self._sock_of]
        socks = [self._sock_of[p] for p in ids]
        self.port_ids = np.array(ids, dtype=np.int64)
        self.socks = socks
        self.fd_array = np.array([s.fileno() for s in socks], dtype=np.int64)
        self.rings = tuple(s.ring for s in socks)
        self.tx_bases = np.array([s.tx_base for s in socks], dtype=np.int64)
        self.states = tuple(s.tx_state for s in socks)
        self.vnets = np.array([s.offloads for s in socks], dtype=np.bool_)
        if socks:
            self.frame_size = socks[0].frame_size
            self.frame_nr = socks[0].frame_nr
            self.layout = socks[0].layout
            if any((s.frame_size, s.frame_nr, s.version) != (self.frame_size, self.frame_nr,
                                                             socks[0].version) for s in socks):
                raise ValueError("all ring sockets of one kind need the same transmit ring")
        # Segments of one super-packet, for ports without the virtio header.
        self.scratch = np.zeros(MAX_FRAME + MAX_SEGMENTS * 256, dtype=np.uint8)  # + headers
        self.seglens = np.zeros(MAX_SEGMENTS, dtype=np.int64)

    def fds(self) -> list[int]:
        return [s.fileno() for s in self.socks]

    def receive(self, batch) -> int:
        n, cursor = 0, 0
        k = len(self.socks)
        for j in range(k):                       # round robin over uplinks
            s = self.socks[(self._rr + j) % k]
            port_id = int(self.port_ids[(self._rr + j) % k])
            n, cursor = s.receive(port_id, batch.meta, batch.data, n, cursor, self.bad)
        if k:
            self._rr = (self._rr + 1) % k
        batch.cursor = cursor
        return n

    def transmit(self, batch, plan, span) -> None:
        if self.socks:
            ring_transmit(batch.meta, batch.data, plan, span, self.port_ids, self.fd_array,
                          self.rings, self.tx_bases, self.frame_size, self.frame_nr,
                          self.layout, self.states, self.vnets, self.scratch, self.seglens,
                          self.switch.counters.table, self.bad)

    def close(self) -> None:
        for s in self._sock_of.values():
            s.close()
        self._sock_of.clear()
        self.port_ids = np.zeros(0, dtype=np.int64)
        self._sync()

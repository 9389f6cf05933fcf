"""NetVSP's compiled ingress: RNDIS data packets from a guest ring into a batch."""
from __future__ import annotations

import struct

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

from netvsp import nvsp as N
from netvsp import rndis as R
from netvsp.datapath import (BAD_GPA, BAD_PPI, BAD_RNDIS, BAD_SECTION,
                             BATCH_FULL, C_ID, C_STATUS, CONTROL, DRAINED, NBAD, NSTATS,
                             S_DELIVERED, S_SEGMENTED, ReceiveBuffer, netvsp_egress,
                             netvsp_ingress, write_completions)
from netvsp.vmbus import packet as P
from netvsp.vmbus import ring as RG
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, F_VLAN, FLAGS, GSO_SIZE,
                          GSO_TCPV4, GSO_TCPV6, GSO_TYPE, LEN, OFF, SRC_PORT, TCI, PacketBatch)

RAM = 4 << 20
RING = 0x10000            # guest -> host ring, 64 KiB of data
OUT = 0x30000             # host -> guest ring
SBUF = 0x100000           # send buffer: 16 sections of 6144
SEC = 6144
DATA = 0x200000           # where GPA-direct frames live


class Setup:
    def __init__(self):
        self.mem = np.zeros(RAM, dtype=np.uint8)
        self.g2h = RG.Ring(self.mem, RING, 64 * 1024)
        self.h2g = RG.Ring(self.mem, OUT, 64 * 1024)
        self.g2h.init()
        self.h2g.init()
        self.tid = 0
        self.rstate = np.zeros(2, dtype=np.int64)
        self.desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
        self.pieces = np.zeros((64, 3), dtype=np.int64)
        self.nvsp = np.zeros(16, dtype=np.uint8)
        self.comp = np.zeros((256, 2), dtype=np.int64)
        self.bad = np.zeros(NBAD, dtype=np.int64)
        self.rxbuf = ReceiveBuffer(0x300000, 64 * 1806, 1806)

    def section(self, idx, msgs: bytes, size=None):
        self.mem[SBUF + idx * SEC:SBUF + idx * SEC + len(msgs)] = np.frombuffer(msgs, np.uint8)
        self.tid += 1
        ok, _ = self.g2h.write_packet(P.VM_PKT_DATA_INBAND, N.nvsp_send_rndis_packet(
            N.CHANNEL_TYPE_DATA, idx, len(msgs) if size is None else size), self.tid,
            P.VMBUS_DATA_PACKET_FLAG_COMPLETION_REQUESTED)
        assert ok

    def gpa(self, msg: bytes, gpa=DATA, bufs=None):
        self.mem[gpa:gpa + len(msg)] = np.frombuffer(msg, np.uint8)
        self.tid += 1
        b = np.array(bufs or [[gpa, len(msg)]], dtype=np.int64)
        src = np.frombuffer(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA), np.uint8)
        start = RG.ring_write_begin(self.mem, RING, 64 * 1024,
                                    P.gpa_direct_footprint(b, len(b), len(src)))
        end = P.build_gpa_direct(self.mem, RING, 64 * 1024, start, 1, self.tid, b, len(b),
                                 src, 0, len(src))
        assert end >= 0
        RG.ring_write_commit(self.mem, RING, 64 * 1024, start, end)

    def ingress(self, batch=None, cap=64):
        b = batch or PacketBatch(cap)
        if self.rstate[0] == 0 and self.rstate[1] == 0:
            self.rstate[0] = RG.ring_read_pos(self.mem, RING, 64 * 1024)
        n, cursor, ncomp, why = netvsp_ingress(
            self.mem, RING, 64 * 1024, self.rstate, self.desc, self.pieces, self.nvsp,
            SBUF, 16 * SEC, SEC, b.meta, b.data, 0, 0, 7, self.comp, 0, self.bad,
            *self.rxbuf.arrays())
        return b, n, ncomp, why


def frame(size=200, proto="tcp"):
    l4 = TCP(sport=1, dport=2) if proto == "tcp" else UDP(sport=1, dport=2)
    f = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
            / IP(src="10.0.0.1", dst="10.0.0.2") / l4)
    return f + bytes((k * 7) & 0xFF for k in range(max(0, size - len(f))))


def test_section_batch_of_three_frames_with_offloads():
    s = Setup()
    f1, f2, f3 = frame(100), frame(300, proto="udp"), frame(1400)
    msgs = (R.rndis_packet(f1, csum=R.csum_tx_info(ipv4=True, tcp=True, tcp_header_offset=34),
                           align=8)
            + R.rndis_packet(f2, vlan=R.vlan_info(42, priority=5), align=8)
            + R.rndis_packet(f3, csum=R.csum_tx_info(ipv4=True, udp=True,
                                                     tcp_header_offset=34)))
    s.section(3, msgs)
    b, n, ncomp, why = s.ingress()
    assert (n, ncomp, why) == (3, 1, DRAINED) and not s.bad.any()
    got = [bytes(b.data[b.meta[OFF, i]:b.meta[OFF, i] + b.meta[LEN, i]]) for i in range(3)]
    assert got == [f1, f2, f3]
    assert b.meta[FLAGS, 0] & F_CSUM_PARTIAL and b.meta[CSUM_START, 0] == 34 \
        and b.meta[CSUM_OFF, 0] == 16
    assert b.meta[FLAGS, 1] & F_VLAN and b.meta[TCI, 1] == (5 << 13) | 42
    assert b.meta[CSUM_OFF, 2] == 6 and (b.meta[SRC_PORT, :3] == 7).all()
    assert s.comp[0, C_ID] == 1 and s.comp[0, C_STATUS] == N.STATUS_SUCCESS


def test_lso_super_packet_by_gpa_direct_across_pages():
    s = Setup()
    big = frame(60000)
    msg = R.rndis_packet(big, lso=R.lso_v2_info(1448, 34))
    # the RNDIS message starts 100 bytes before a page end: the ranges split it
    s.gpa(msg, gpa=DATA + 4096 - 100)
    b, n, ncomp, why = s.ingress()
    assert (n, why) == (1, DRAINED) and not s.bad.any()
    assert bytes(b.data[b.meta[OFF, 0]:b.meta[OFF, 0] + b.meta[LEN, 0]]) == big
    assert b.meta[GSO_TYPE, 0] == GSO_TCPV4 and b.meta[GSO_SIZE, 0] == 1448
    msg6 = R.rndis_packet(big, lso=R.lso_v2_info(1428, 54, ipv6=True))
    s.gpa(msg6)
    b, n, _, _ = s.ingress()
    assert b.meta[GSO_TYPE, 0] == GSO_TCPV6 and b.meta[CSUM_START, 0] == 54


def test_control_packet_stops_the_walk_unconsumed():
    s = Setup()
    s.section(0, R.rndis_packet(frame()))
    s.g2h.write_packet(P.VM_PKT_DATA_INBAND, N.nvsp_ndis_version(6, 30))
    s.section(1, R.rndis_packet(frame()))
    b, n, ncomp, why = s.ingress()
    assert (n, why) == (1, CONTROL)
    pos = s.rstate[0]
    b, n, _, why = s.ingress()                       # still there
    assert (n, why) == (0, CONTROL) and s.rstate[0] == pos


def test_batch_full_leaves_the_packet_for_the_next_batch():
    s = Setup()
    for k in range(5):
        s.section(k, R.rndis_packet(frame(1000)))
    b, n, ncomp, why = s.ingress(cap=3)
    assert (n, ncomp, why) == (3, 3, BATCH_FULL)
    b, n, ncomp, why = s.ingress(cap=3)
    assert (n, ncomp, why) == (2, 2, DRAINED)


HOSTILE = {
    "section index past the buffer": (lambda s: s.section(16, R.rndis_packet(frame())),
                                      BAD_SECTION),
    "section size past the section": (lambda s: s.section(2, R.rndis_packet(frame()),
                                                          size=SEC + 8), BAD_SECTION),
    "msg_len past the stream": (lambda s: s.section(
        1, R.rndis_packet(frame())[:4] + struct.pack("<I", 9999) + R.rndis_packet(frame())[8:]),
        BAD_RNDIS),
    "data past the message": (lambda s: s.section(1, _patch(R.rndis_packet(frame()),
                                                          R.OFF_PKT_DATA_LEN, 5000)),
                              BAD_RNDIS),
    "data offset inside the header": (lambda s: s.section(1, _patch(
        R.rndis_packet(frame()), R.OFF_PKT_DATA_OFFSET, 4)), BAD_RNDIS),
    "wrong message type": (lambda s: s.section(1, _patch(R.rndis_packet(frame()), 0, 2)),
                           BAD_RNDIS),
    "PPI size zero": (lambda s: s.section(1, _patch(R.rndis_packet(
        frame(), vlan=1 << 4), R.PACKET.itemsize, 0)), BAD_PPI),
    "PPI payload offset past it": (lambda s: s.section(1, _patch(R.rndis_packet(
        frame(), vlan=1 << 4), R.PACKET.itemsize + 8, 200)), BAD_PPI),
    "checksum place past the frame": (lambda s: s.section(1, R.rndis_packet(
        frame(60), csum=R.csum_tx_info(ipv4=True, tcp=True, tcp_header_offset=1000))),
        BAD_PPI),
    "GPA past guest RAM": (lambda s: s.gpa(R.rndis_packet(frame()),
                                           bufs=[[RAM - 100, 200]]), BAD_GPA),
}


def _patch(b: bytes, off: int, v: int) -> bytes:
    return b[:off] + struct.pack("<I", v) + b[off + 4:]


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_data_packets_are_counted_and_completed_as_invalid(case):
    s = Setup()
    make, slot = HOSTILE[case]
    good = frame(120)
    make(s)
    s.section(5, R.rndis_packet(good))            # a good one after it still arrives
    b, n, ncomp, why = s.ingress()
    assert s.bad[slot] == 1 and why == DRAINED
    assert s.comp[0, C_STATUS] == N.STATUS_INVALID_RNDIS_PKT
    assert s.comp[1, C_STATUS] == N.STATUS_SUCCESS
    assert n == 1 and bytes(b.data[b.meta[OFF, 0]:b.meta[OFF, 0] + b.meta[LEN, 0]]) == good


def test_completions_written_back_and_read_by_the_guest():
    s = Setup()
    for k in range(4):
        s.section(k, R.rndis_packet(frame()))
    b, n, ncomp, why = s.ingress()
    msg = np.zeros(8, dtype=np.uint8)
    written, sig = write_completions(s.mem, OUT, 64 * 1024, s.comp, 0, ncomp, msg)
    assert written == 4 and sig == 1                  # the ring went non-empty
    got = []
    while (p := s.h2g.read_packet()) is not None:
        got.append((p.type, p.trans_id, N.decode_message(p.payload, completion=True)[0]))
    assert got == [(P.VM_PKT_COMP, k + 1, N.MSG_SEND_RNDIS_PKT_COMPLETE) for k in range(4)]


def test_fuzzed_data_packets_never_escape():
    rng = np.random.default_rng(11)
    for _ in range(150):
        s = Setup()
        msg = bytearray(R.rndis_packet(frame(int(rng.integers(60, 3000))),
                                       vlan=1 << 4, csum=R.csum_tx_info(ipv4=True, tcp=True,
                                                                         tcp_header_offset=34)))
        for _ in range(int(rng.integers(1, 5))):
            msg[int(rng.integers(min(len(msg), 120)))] = int(rng.integers(256))
        if rng.random() < 0.5:
            s.section(int(rng.integers(0, 16)), bytes(msg[:SEC]))
        else:
            s.gpa(bytes(msg))
        b, n, ncomp, why = s.ingress()
        assert why == DRAINED and ncomp == 1
        for i in range(n):
            assert 0 <= b.meta[OFF, i] and b.meta[OFF, i] + b.meta[LEN, i] <= b.data.shape[0]


# ---------------------------------------------------------------- host -> guest
def test_egress_into_the_receive_buffer_and_back_by_completion():
    from switch.batch import D_TAGGED, GSO_TCPV4, init_packet
    from switch.parse import parse_batch
    s = Setup()
    rb = ReceiveBuffer(0x300000, 200 * 1806, 1806)
    b = PacketBatch(8, arena=1 << 18)
    small, big = frame(300), frame(20000)
    for i, (f, at) in enumerate(((small, 0), (big, 4096))):
        b.data[at:at + len(f)] = np.frombuffer(f, np.uint8)
        init_packet(b.meta, i, at, len(f), 1, 0)
    b.meta[FLAGS, 1] |= F_CSUM_PARTIAL
    b.meta[CSUM_START, 1], b.meta[CSUM_OFF, 1] = 34, 16
    b.meta[GSO_TYPE, 1], b.meta[GSO_SIZE, 1] = GSO_TCPV4, 1000
    parse_batch(b.meta, b.data, 0, 2)           # as the switch's protocol edge does
    plan = np.array([[0, 1], [2 | D_TAGGED | ((2 << 13 | 77) << 48), 2]], dtype=np.int64)
    stats = np.zeros(NSTATS, dtype=np.int64)
    sig = netvsp_egress(b.meta, b.data, plan, 0, 2, s.mem, OUT, 64 * 1024, rb.gpa, rb.sub_size,
                        rb.free, rb.nfree, rb.chain, rb.head, np.zeros((375, 2), np.int64),
                        np.zeros(16, np.uint8), np.zeros(1 << 17, np.uint8),
                        np.zeros(128, np.int64), stats, False,
                        np.zeros((b.meta.shape[0], 9), np.int64), np.zeros(1, np.int64))
    nseg = -(-(len(big) - 54) // 1000)
    assert sig == 1 and stats[S_DELIVERED] == 1 + nseg and stats[S_SEGMENTED] == 1
    assert rb.nfree[0] == 200 - 1 - nseg
    # the guest's view: one transfer-page packet, one RNDIS message per range
    p = s.h2g.read_packet()
    ranges = np.zeros((400, 2), dtype=np.int64)
    nr = P.parse_xfer_page(s.mem, OUT, 64 * 1024, p.desc, N.RECEIVE_BUFFER_ID, 200 * 1806,
                           400, ranges)
    assert nr == 1 + nseg
    msgs = [R.decode(bytes(s.mem[rb.gpa + o:rb.gpa + o + c])) for c, o in ranges[:nr]]
    first = msgs[0]
    raw0 = bytes(s.mem[rb.gpa + ranges[0, 1]:rb.gpa + ranges[0, 1] + ranges[0, 0]])
    assert raw0[first.data_start:first.data_start + first.data_len] == small
    assert R.vlan_fields(first.ppi_u32(raw0, R.PPI_IEEE_8021Q)) == {"vid": 77, "priority": 2,
                                                                   "cfi": False}
    # the segments reassemble to the super-packet's payload
    payload = b""
    for (c, o), m in zip(ranges[1:nr], msgs[1:]):
        rawk = bytes(s.mem[rb.gpa + o:rb.gpa + o + c])
        seg = rawk[m.data_start:m.data_start + m.data_len]
        assert len(seg) <= 1514
        payload += seg[54:]
    assert payload == big[54:]
    # the guest completes it; the host's ingress frees the whole chain
    s.g2h.write_packet(P.VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(), p.trans_id)
    s.g2h.write_packet(P.VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(), 12345)  # unknown
    s.rxbuf = rb
    _, n, _, why = s.ingress()
    # the data chain is freed; a completion the data path did not lend goes to the
    # control path (which judges whether it is a violation)
    assert why == CONTROL and rb.nfree[0] == 200

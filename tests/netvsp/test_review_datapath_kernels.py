"""Review of NetVSP's compiled data path (netvsp/datapath.py) by direct kernel calls.

Written in a hostile-input review. Tests whose docstring cites file:line
were its findings, fixed in the same change: the docstring tells what went
wrong before; the test asserts what must hold. The others pin hostile cases
the review found handled but untested. Guest RAM is a plain
uint8 array (GPA = offset), as in test_datapath.py.
"""
from __future__ import annotations

import struct

import numpy as np
from scapy.all import IP, TCP, UDP, Ether, raw

from netvsp import nvsp as N
from netvsp import rndis as R
from netvsp.datapath import (BAD_GPA, BAD_PPI, BAD_RNDIS, BAD_SECTION, C_STATUS, CONTROL,
                             DRAINED, MAX_RANGES, NBAD, NSTATS, RSC_ROOM_LESS, S_DELIVERED,
                             S_NO_BUFFER, S_RING_FULL, ReceiveBuffer, netvsp_egress,
                             netvsp_ingress)
from netvsp.vmbus import packet as P
from netvsp.vmbus import ring as RG
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, FLAGS, GSO_SIZE, GSO_TCPV4,
                          GSO_TYPE, LEN, OFF, PacketBatch, init_packet)
from switch.parse import parse_batch

RAM = 4 << 20
RING, RDS = 0x10000, 64 * 1024          # guest -> host ring
OUT = 0x30000                           # host -> guest ring
SBUF, SEC, NSEC = 0x100000, 6144, 16    # send buffer
DATA = 0x200000                         # GPA-direct frames
RXBUF = 0x300000                        # receive buffer (egress tests use their own RAM)


def frame(size=200, proto="udp", src="02:00:00:00:00:01", dst="02:00:00:00:00:02"):
    l4 = TCP(sport=1, dport=2) if proto == "tcp" else UDP(sport=1, dport=2)
    f = raw(Ether(src=src, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") / l4)
    return f + bytes((k * 7) & 0xFF for k in range(max(0, size - len(f))))


class Ingress:
    """A guest-to-host ring, a send buffer and the ingress kernel's arrays."""

    def __init__(self):
        self.mem = np.zeros(RAM, dtype=np.uint8)
        self.g2h = RG.Ring(self.mem, RING, RDS)
        self.g2h.init()
        self.tid = 0
        self.rstate = np.zeros(2, dtype=np.int64)
        self.desc = np.zeros(RG.DESC_FIELDS, dtype=np.int64)
        self.pieces = np.zeros((64, 3), dtype=np.int64)
        self.nvsp = np.zeros(16, dtype=np.uint8)
        self.comp = np.zeros((256, 2), dtype=np.int64)
        self.bad = np.zeros(NBAD, dtype=np.int64)
        self.rx = ReceiveBuffer(RXBUF, 64 * 1806, 1806, reserved=16)

    def section(self, idx, msgs: bytes, size=None, flags=1):
        self.mem[SBUF + idx * SEC:SBUF + idx * SEC + len(msgs)] = np.frombuffer(msgs, np.uint8)
        self.tid += 1
        ok, _ = self.g2h.write_packet(P.VM_PKT_DATA_INBAND, N.nvsp_send_rndis_packet(
            N.CHANNEL_TYPE_DATA, idx, len(msgs) if size is None else size), self.tid, flags)
        assert ok

    def raw(self, body: bytes):
        ok, _ = self.g2h.write_raw(body)
        assert ok

    def run(self, cap=64, arena=None):
        b = PacketBatch(cap, arena=arena)
        self.rstate[0] = RG.ring_read_pos(self.mem, RING, RDS)
        n, cursor, ncomp, why = netvsp_ingress(
            self.mem, RING, RDS, self.rstate, self.desc, self.pieces, self.nvsp,
            SBUF, NSEC * SEC, SEC, b.meta, b.data, 0, 0, 7, self.comp, 0, self.bad,
            *self.rx.arrays())
        RG.ring_read_commit(self.mem, RING, RDS, int(self.rstate[0]),
                            RG.ring_read_pos(self.mem, RING, RDS))
        frames = [bytes(b.data[b.meta[OFF, i]:b.meta[OFF, i] + b.meta[LEN, i]])
                  for i in range(n)]
        return frames, ncomp, why


def gpa_body(ranges, payload, tid=77, flags=1):
    """b.6 by hand: ranges = [(byte_count, byte_offset, [pfn, ...])]."""
    rb = b"".join(struct.pack("<II", c, o) + struct.pack(f"<{len(p)}Q", *p) for c, o, p in ranges)
    hdr = struct.pack("<II", 0, len(ranges)) + rb
    pl = payload + bytes(-len(payload) % 8)
    return struct.pack("<HHHHQ", 9, (16 + len(hdr)) // 8, (16 + len(hdr) + len(pl)) // 8, flags,
                       tid) + hdr + pl


# =============================================================================== findings

def test_egress_after_coalesced_fragments_fill_a_packet_never_writes_past_its_ranges():
    """datapath.py:449-470 then 485-499. The RSC branch lets ``nr`` reach exactly
    MAX_RANGES (its check is ``nr + nfrag > MAX_RANGES``) and ``continue``s without
    sending; the plain branch then calls _lend with nr == MAX_RANGES, so
    ``ranges[375]`` is written past the (375, 2) array (numba does not
    bounds-check: host heap corruption), nr runs on to 376, 377, ..., the
    ``nr == MAX_RANGES`` flush never fires, and the final put_xfer_page refuses
    nranges > ranges.shape[0]: every frame of the run is lost, counted 'ring full'.

    Trigger: a Linux guest at NVSP 6.1 (RSC on), a batch to it holding 33 small
    frames, 9 TCP super-packets of 64000 bytes (38 fragments each: 33 + 342 = 375)
    and one more small frame - any peer can send that burst."""
    mem = np.zeros(8 << 20, dtype=np.uint8)
    RG.Ring(mem, OUT, RDS).init()
    h2g = RG.Ring(mem, OUT, RDS)
    sub = 1806
    rb = ReceiveBuffer(0x400000, 500 * sub, sub)
    b = PacketBatch(64, arena=1 << 20)
    small = frame(100)
    big = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02")
              / IP(src="10.0.0.1", dst="10.0.0.2") / TCP(sport=1, dport=2)) + bytes(64000 - 54)
    room = sub - RSC_ROOM_LESS
    nfrag = -(-len(big) // room)
    nbig = 9
    nsmall = MAX_RANGES - nbig * nfrag
    assert nfrag == 38 and nsmall == 33
    at, i = 0, 0
    for k in range(nsmall + nbig + 1):
        f = big if nsmall <= k < nsmall + nbig else small
        b.data[at:at + len(f)] = np.frombuffer(f, np.uint8)
        init_packet(b.meta, i, at, len(f), 1, 0)
        if f is big:
            b.meta[FLAGS, i] |= F_CSUM_PARTIAL
            b.meta[CSUM_START, i], b.meta[CSUM_OFF, i] = 34, 16
            b.meta[GSO_TYPE, i], b.meta[GSO_SIZE, i] = GSO_TCPV4, 1448
        at = (at + len(f) + 63) & ~63
        i += 1
    parse_batch(b.meta, b.data, 0, i)
    plan = np.zeros((2, i), dtype=np.int64)
    plan[0] = np.arange(i)
    plan[1] = 2
    guard = np.full((MAX_RANGES + 8, 2), -7, dtype=np.int64)
    ranges = guard[:MAX_RANGES]                      # what the port passes: (375, 2)
    stats = np.zeros(NSTATS, dtype=np.int64)
    netvsp_egress(b.meta, b.data, plan, 0, i, mem, OUT, RDS, rb.gpa, rb.sub_size, rb.free,
                  rb.nfree, rb.chain, rb.head, ranges, np.zeros(16, np.uint8),
                  np.zeros(65536 + 128 * 256, np.uint8), np.zeros(128, np.int64), stats, True,
                  np.zeros((b.meta.shape[0], 9), np.int64), np.zeros(1, np.int64))
    # nothing may be written past the ranges array the kernel was given
    assert (guard[MAX_RANGES:] == -7).all(), "ranges[375:] written: out-of-bounds write"
    # and every range lent must reach the guest
    assert stats[S_RING_FULL] == 0, stats
    assert stats[S_DELIVERED] == MAX_RANGES + 1
    assert h2g.read_packet() is not None


def test_ingress_takes_a_batched_section_again_when_the_batch_fills_in_it():
    """datapath.py:74 (``while o < L and n < cap``) and 225-234: when the batch
    fills in the middle of a send section holding several RNDIS_PACKET_MSGs
    (Linux batches up to max_pkt_per_msg, f.3), the rest of the section is
    skipped with ok=True: the packet is consumed, completed SUCCESS, and the
    frames after the cut are lost without any counter."""
    s = Ingress()
    frames = [frame(100 + k) for k in range(4)]
    s.section(0, R.rndis_packet(frames[0]))
    s.section(1, R.rndis_packet(frames[1]))
    s.section(2, b"".join(R.rndis_packet(f, align=8) for f in frames[2:]))   # 2 batched
    got, ncomp, why = s.run(cap=3)
    got2, ncomp2, why2 = s.run(cap=3)
    counted = int(s.bad.sum())
    assert got + got2 == frames or counted or \
        any(s.comp[k, C_STATUS] != N.STATUS_SUCCESS for k in range(ncomp)), \
        f"{len(got) + len(got2)} of 4 frames arrived, none counted, all completed SUCCESS"


# ======================================================================= hostile, handled

def test_ingress_corrupt_ring_index_is_reported_not_read():
    s = Ingress()
    s.section(0, R.rndis_packet(frame()))
    s.g2h.write_index = RDS + 64                     # past the data area (a.2)
    got, ncomp, why = s.run()
    assert got == [] and ncomp == 0 and why == RG.E_INDEX


def test_ingress_truncated_descriptor_is_corrupt():
    s = Ingress()
    # len8 claims far more than was published (a.5.2)
    s.raw(struct.pack("<HHHHQ", 6, 2, 0x400, 1, 5) + N.nvsp_send_rndis_packet(0, 0, 60))
    got, ncomp, why = s.run()
    assert why == RG.E_TRUNCATED and got == [] and ncomp == 0


def test_ingress_completion_for_a_tid_outside_the_receive_buffer_goes_to_control():
    s = Ingress()
    for tid in (-1, 2**62, 64, 63, 0):               # negative, huge, == count, never lent
        s.g2h.write_packet(P.VM_PKT_COMP, N.nvsp_send_rndis_packet_complete(), tid)
        got, ncomp, why = s.run()
        assert why == CONTROL and int(s.rx.nfree[0]) == 64 - 16
        s.g2h.read_packet()                          # the control path would take it
        s.g2h.commit_read()


def test_ingress_gpa_range_count_and_pfn_array_overruns_are_counted():
    s = Ingress()
    msg = R.rndis_packet(frame())
    s.mem[DATA:DATA + len(msg)] = np.frombuffer(msg, np.uint8)
    pl = N.nvsp_send_rndis_packet(0)
    # range_cnt far above what the header holds
    body = bytearray(gpa_body([(len(msg), 0, [DATA // 4096])], pl, tid=1))
    struct.pack_into("<I", body, 20, 0xFFFFFFFF)
    s.raw(bytes(body))
    # byte_count needing 2**20 PFNs where one is listed
    s.raw(gpa_body([(0xFFFFFFFF, 0, [DATA // 4096])], pl, tid=2))
    # byte_offset >= 4096
    s.raw(gpa_body([(len(msg), 4096, [DATA // 4096, DATA // 4096 + 1])], pl, tid=3))
    # a PFN with the top bit set (negative as int64)
    s.raw(gpa_body([(len(msg), 0, [2**63 + DATA // 4096])], pl, tid=4))
    # range_cnt 0 (OpenVMM rejects it, b.6)
    s.raw(gpa_body([], pl, tid=5))
    s.section(3, msg)                                # a good one after them
    got, ncomp, why = s.run()
    assert why == DRAINED and got == [frame()] and s.bad[BAD_GPA] == 5
    assert [int(s.comp[k, C_STATUS]) for k in range(6)] == \
        [N.STATUS_INVALID_RNDIS_PKT] * 5 + [N.STATUS_SUCCESS]


def test_ingress_section_index_overflow_values_are_refused():
    s = Ingress()
    msg = R.rndis_packet(frame())
    s.mem[SBUF:SBUF + len(msg)] = np.frombuffer(msg, np.uint8)
    for idx in (0xFFFFFFFE, 0x80000000, NSEC):
        s.tid += 1
        s.g2h.write_packet(P.VM_PKT_DATA_INBAND, N.nvsp_send_rndis_packet(0, idx, len(msg)),
                           s.tid, 1)
    s.section(0, msg, size=0)                        # a section with zero bytes
    got, ncomp, why = s.run()
    assert why == DRAINED and got == [] and ncomp == 4
    assert s.bad[BAD_SECTION] == 3 and s.bad[BAD_RNDIS] == 1


def test_ingress_ppi_walk_with_wrapping_sizes_stays_in_the_message():
    s = Ingress()
    base = bytearray(R.rndis_packet(frame(), vlan=R.vlan_info(5),
                                    csum=R.csum_tx_info(ipv4=True, tcp=True,
                                                        tcp_header_offset=34)))
    cases = []
    for size in (0xFFFFFFFF, 0x80000000, 11):        # PPI size wrapping / too small
        m = bytearray(base)
        struct.pack_into("<I", m, R.PACKET.itemsize, size)
        cases.append(bytes(m))
    m = bytearray(base)                              # per_pkt_info_len huge
    struct.pack_into("<I", m, R.OFF_PKT_PPI_LEN, 0xFFFFFFF0)
    cases.append(bytes(m))
    m = bytearray(base)                              # ppi_offset 0xFFFFFFFF
    struct.pack_into("<I", m, R.PACKET.itemsize + 8, 0xFFFFFFFF)
    cases.append(bytes(m))
    m = bytearray(base)                              # data_offset + data_len wraps u32
    struct.pack_into("<II", m, R.OFF_PKT_DATA_OFFSET, 0xFFFFFFF0, 0x20)
    cases.append(bytes(m))
    for k, c in enumerate(cases):
        s.section(k, c)
    got, ncomp, why = s.run()
    assert why == DRAINED and got == [] and ncomp == len(cases)
    assert s.bad[BAD_PPI] == 5 and s.bad[BAD_RNDIS] == 1


def test_ingress_zero_length_and_msg_len_zero_messages_do_not_loop():
    s = Ingress()
    m = bytearray(R.rndis_packet(frame()))
    struct.pack_into("<I", m, 4, 0)                  # msg_len 0: must not spin on o += 0
    s.section(0, bytes(m))
    got, ncomp, why = s.run()
    assert why == DRAINED and got == [] and s.bad[BAD_RNDIS] == 1


def test_egress_with_no_free_suballocation_counts_and_writes_nothing():
    mem = np.zeros(RAM, dtype=np.uint8)
    RG.Ring(mem, OUT, RDS).init()
    rb = ReceiveBuffer(RXBUF, 20 * 1806, 1806, reserved=20)    # all reserved: none free
    b = PacketBatch(8, arena=1 << 16)
    f = frame(300)
    b.data[:len(f)] = np.frombuffer(f, np.uint8)
    init_packet(b.meta, 0, 0, len(f), 1, 0)
    parse_batch(b.meta, b.data, 0, 1)
    stats = np.zeros(NSTATS, dtype=np.int64)
    before = mem.copy()
    sig = netvsp_egress(b.meta, b.data, np.array([[0], [2]], np.int64), 0, 1, mem, OUT, RDS,
                        rb.gpa, rb.sub_size, *rb.arrays(), np.zeros((MAX_RANGES, 2), np.int64),
                        np.zeros(16, np.uint8), np.zeros(1 << 17, np.uint8),
                        np.zeros(128, np.int64), stats, True,
                        np.zeros((b.meta.shape[0], 9), np.int64), np.zeros(1, np.int64))
    assert sig == 0 and stats[S_NO_BUFFER] == 1 and (mem == before).all()


def test_egress_into_a_corrupt_guest_ring_releases_its_suballocations():
    mem = np.zeros(RAM, dtype=np.uint8)
    RG.Ring(mem, OUT, RDS).init()
    h2g = RG.Ring(mem, OUT, RDS)
    h2g.read_index = 12                               # not a multiple of 8 (a.2)
    rb = ReceiveBuffer(RXBUF, 40 * 1806, 1806, reserved=16)
    b = PacketBatch(8, arena=1 << 16)
    f = frame(300)
    b.data[:len(f)] = np.frombuffer(f, np.uint8)
    init_packet(b.meta, 0, 0, len(f), 1, 0)
    parse_batch(b.meta, b.data, 0, 1)
    stats = np.zeros(NSTATS, dtype=np.int64)
    netvsp_egress(b.meta, b.data, np.array([[0], [2]], np.int64), 0, 1, mem, OUT, RDS,
                  rb.gpa, rb.sub_size, *rb.arrays(), np.zeros((MAX_RANGES, 2), np.int64),
                  np.zeros(16, np.uint8), np.zeros(1 << 17, np.uint8), np.zeros(128, np.int64),
                  stats, False, np.zeros((b.meta.shape[0], 9), np.int64), np.zeros(1, np.int64))
    assert stats[S_RING_FULL] == 1 and int(rb.nfree[0]) == 24 and not rb.head.any()
    assert h2g.write_index == 0

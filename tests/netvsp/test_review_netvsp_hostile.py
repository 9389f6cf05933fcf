"""Review of NetVSP's control path (netvsp/netvsp.py) against a hostile guest.

Uses the in-process host and scripted guest of test_netvsp.py (Env, Guest and
its ``two`` fixture: NIC A under test, NIC B that must keep working). 
Written in a hostile-input review. Tests whose docstring cites file:line
were its findings, fixed in the same change: the docstring tells what went
wrong before; the test asserts what must hold. The others pin hostile cases
the review found handled but untested.
"""
from __future__ import annotations

import struct

import numpy as np
from scapy.all import IP, TCP, Ether, raw

from netvsp.netvsp import MAX_QUEUES
from netvsp import nvsp as N
from netvsp import rndis as R
from netvsp.datapath import BAD_PPI, BAD_RNDIS, NBAD, ReceiveBuffer, netvsp_ingress
from netvsp.netvsp import MAX_BACKLOG
from netvsp.vmbus import packet as P
from netvsp.vmbus import ring as RG
from switch.batch import PacketBatch
from tests.netvsp.test_netvsp import (Guest, env, two, u32, wait_until)  # noqa: F401 (fixtures)

PAGE = 4096


def send_control(g, msg: bytes) -> int:
    """An RNDIS control message by GPA (e.2), as Linux sends it; returns the tid."""
    g.env.ram.write(g.scratch, msg)
    return g.send_direct(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL),
                         [(g.scratch, len(msg))])


# =============================================================================== findings

def test_config_parameter_value_with_a_non_ascii_digit_is_refused(two):
    """netvsp.py:989: ``value.isdigit()`` accepts characters int() refuses ('²',
    U+00B2, is a digit but not decimal), so int(value) raises ValueError out of
    _set_config_parameter. poll() catches it as 'internal error' and closes the
    channel: no SET_CMPLT (INVALID_DATA, e.7) and no completion of the guest's
    SEND_RNDIS_PKT. Not a crash, but a host bug reachable by any guest."""
    env, a, g, b, gb = two
    g.bring_up()
    tid = send_control(g, R.rndis_set(g.req(), R.OID_GEN_RNDIS_CONFIG_PARAMETER,
                                      R.config_parameter_string("*LsoV2IPv4", "\u00b2")))
    g.sync()
    assert "internal error" not in a.violations and not g.closed(), dict(a.violations)
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert int(f["status"]) == N.STATUS_SUCCESS


def test_lso_frame_above_the_advertised_maximum_is_dropped():
    """datapath.py:121-129: the LSO PPI is honoured whatever the frame's size.
    The host advertises lsov2 ip4/ip6 maxsz 0xF53B (netvsp.py:120, e.6) and
    OpenVMM counts LSO frames >= 0xF53C invalid (e.5); here a 100 000-byte LSO
    frame becomes one GSO super-packet (the RSC egress then hands it to another
    guest as one coalesced packet bigger than an IP length can describe)."""
    mem = np.zeros(4 << 20, dtype=np.uint8)
    ring, rds, gpa = 0x10000, 64 * 1024, 0x100000
    g2h = RG.Ring(mem, ring, rds)
    g2h.init()
    big = raw(Ether(src="02:00:00:00:00:01", dst="02:00:00:00:00:02") / IP() / TCP()) \
        + bytes(100_000)
    msg = R.rndis_packet(big, lso=R.lso_v2_info(1448, 34))
    mem[gpa:gpa + len(msg)] = np.frombuffer(msg, np.uint8)
    bufs = np.array([[gpa, len(msg)]], dtype=np.int64)
    src = np.frombuffer(N.nvsp_send_rndis_packet(0), np.uint8)
    start = RG.ring_write_begin(mem, ring, rds, P.gpa_direct_footprint(bufs, 1, len(src)))
    end = P.build_gpa_direct(mem, ring, rds, start, 1, 1, bufs, 1, src, 0, len(src))
    RG.ring_write_commit(mem, ring, rds, start, end)
    b = PacketBatch(16, arena=1 << 20)
    bad = np.zeros(NBAD, dtype=np.int64)
    comp = np.zeros((16, 2), dtype=np.int64)
    rstate = np.array([RG.ring_read_pos(mem, ring, rds), 0], dtype=np.int64)
    n, _, ncomp, _ = netvsp_ingress(mem, ring, rds, rstate, np.zeros(RG.DESC_FIELDS, np.int64),
                                    np.zeros((64, 3), np.int64), np.zeros(16, np.uint8),
                                    0, 0, 0, b.meta, b.data, 0, 0, 3, comp, 0, bad,
                                    *ReceiveBuffer(0x300000, 8 * 1806, 1806).arrays())
    assert n == 0 and (bad[BAD_PPI] + bad[BAD_RNDIS]) == 1 and \
        comp[0, 1] == N.STATUS_INVALID_RNDIS_PKT, (n, bad.tolist())


# ======================================================================= hostile, handled

def test_buffer_gpadls_that_are_not_the_channels_own_are_refused(two):
    """_buffer_gpadl (netvsp.py:627): the ring GPADL, another channel's GPADL, the
    other buffer's GPADL and a GPADL too small are refused with FAIL and counted,
    not a violation; the guest can then offer a good one."""
    env, a, g, b, gb = two
    g.init()
    g.send(N.nvsp_ndis_config(1514, 0), completion=False)
    g.send(N.nvsp_ndis_version(6, 30), completion=False)

    def recv_buf(handle):
        t, f = N.decode_message(g.completion(g.send(N.nvsp_send_receive_buffer(handle))),
                                completion=True)
        return int(f["status"])
    assert recv_buf(g.ring_handle) == N.STATUS_FAIL
    assert recv_buf(gb.recv_handle) == N.STATUS_FAIL            # NIC B's receive buffer
    assert recv_buf(0xDEAD) == N.STATUS_FAIL                    # no such GPADL
    tiny_gpa = env.pages.alloc(PAGE)
    tiny = env.client.create_gpadl(g.relid, tiny_gpa, 1000)      # < one sub-allocation
    assert recv_buf(tiny) == N.STATUS_FAIL
    assert a.dropped["receive buffer GPADL refused"] == 3
    assert a.dropped["receive buffer smaller than a sub-allocation"] == 1
    g.recv_gpa = env.pages.alloc(g.recv_size)
    g.recv_handle = env.client.create_gpadl(g.relid, g.recv_gpa, g.recv_size)
    assert recv_buf(g.recv_handle) == N.STATUS_SUCCESS
    # the send buffer may not be the receive buffer's GPADL, nor smaller than a section
    t, f = N.decode_message(g.completion(g.send(N.nvsp_send_send_buffer(g.recv_handle))),
                            completion=True)
    assert int(f["status"]) == N.STATUS_FAIL and int(f["section_size"]) == 0
    t, f = N.decode_message(g.completion(g.send(N.nvsp_send_send_buffer(tiny))),
                            completion=True)
    assert int(f["status"]) == N.STATUS_FAIL
    assert a.dropped["send buffer GPADL refused"] == 1
    assert a.dropped["send buffer smaller than a section"] == 1
    assert not a.violations and not g.closed()
    g.rndis(R.rndis_initialize(g.req()))                         # ready without a send buffer
    g.keepalive()
    assert not b.violations


def test_completing_a_control_reply_twice_is_a_violation(two):
    env, a, g, b, gb = two
    g.bring_up()
    m = g.rndis(R.rndis_keepalive(g.req()), hold=True).m
    g.complete_rx(m)
    g.complete_rx(m)                                  # its sub-allocation is free already
    wait_until(g.closed, "the channel to close")
    assert a.violations["completion for an unknown transaction id"] == 1
    gb.keepalive()


def test_replies_a_guest_never_completes_are_bounded(two):
    """One control SEND_RNDIS_PKT carrying hundreds of QUERYs (decode_batch takes
    them all) while the guest holds every reply: the 16 control sub-allocations
    fill, then the backlog stops at MAX_BACKLOG and the rest is counted."""
    env, a, g, b, gb = two
    g.bring_up()
    q = R.rndis_query(1, R.OID_GEN_FRIENDLY_NAME)           # 536-byte reply each
    n = 0x4000 // len(q)
    msg = b"".join(R.rndis_query(10_000 + k, R.OID_GEN_FRIENDLY_NAME) for k in range(n))
    env.ram.write(g.scratch, msg[:4 * PAGE])
    tid = g.send_direct(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL),
                        [(g.scratch, len(msg))])
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert int(f["status"]) == N.STATUS_SUCCESS
    ch = a.channel
    assert ch._backlog_bytes <= MAX_BACKLOG
    assert a.dropped["control reply backlog full"] == n - 16 - MAX_BACKLOG // 536
    assert len(ch._inflight) == 16
    gb.keepalive()


def test_rndis_batch_with_one_bad_message_answers_none_of_them(two):
    env, a, g, b, gb = two
    g.bring_up()
    ka = R.rndis_keepalive(500)
    bad = bytearray(R.rndis_keepalive(501))
    struct.pack_into("<I", bad, 4, 11)                       # msg_len below the message
    tid = send_control(g, ka + bytes(bad))
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert int(f["status"]) == N.STATUS_INVALID_RNDIS_PKT
    assert a.dropped["malformed RNDIS control message"] == 1
    g.keepalive()
    g.drain()
    assert not [m for m in g.inbox if m.type == P.VM_PKT_DATA_USING_XFER_PAGES]


def test_rss_and_offload_sets_with_hostile_fields_are_refused(two):
    env, a, g, b, gb = two
    g.bring_up()
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, R.rss_parameters([MAX_QUEUES] * 128)) == \
        R.STATUS_INVALID_DATA                                # past the NIC's queues (g.3)
    p = bytearray(R.rss_parameters([0] * 128))
    struct.pack_into("<I", p, 16, 0xFFFFFFF0)               # table offset wraps
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, bytes(p)) == R.STATUS_INVALID_DATA
    p = bytearray(R.rss_parameters([0] * 128))
    struct.pack_into("<H", p, 20, 0xFFFF)                   # key size past the buffer
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, bytes(p)) == R.STATUS_INVALID_DATA
    o = bytearray(R.offload_parameters(tcp_ip_v4_csum=4))
    struct.pack_into("<H", o, 2, 0xFFFF)                    # header size past the buffer
    assert g.set(R.OID_TCP_OFFLOAD_PARAMETERS, bytes(o)) == R.STATUS_INVALID_DATA
    assert g.set(R.OID_TCP_OFFLOAD_PARAMETERS, R.offload_parameters(tcp_ip_v4_csum=9)) == \
        R.STATUS_INVALID_DATA
    c = bytearray(R.config_parameter_string("NetworkAddress", "00155d000001"))
    struct.pack_into("<I", c, 0, 0xFFFFFFFC)                # name offset wraps
    assert g.set(R.OID_GEN_RNDIS_CONFIG_PARAMETER, bytes(c)) == R.STATUS_INVALID_DATA
    odd = R.config_parameter_string("NetworkAddress", "00155d000001")[:-1]
    assert g.set(R.OID_GEN_RNDIS_CONFIG_PARAMETER, odd) == R.STATUS_INVALID_DATA
    assert g.set(R.OID_802_3_MULTICAST_LIST, bytes(7)) == R.STATUS_INVALID_DATA
    assert g.set(R.OID_802_3_MULTICAST_LIST, bytes(6 * 33)) == R.STATUS_MULTICAST_FULL
    assert not a.violations and not g.closed()
    assert u32(g.query_ok(R.OID_GEN_MAXIMUM_FRAME_SIZE)) == 1500


def test_data_after_halt_on_the_control_path_is_dropped_and_completed(two):
    env, a, g, b, gb = two
    g.bring_up()
    send_control(g, R.rndis_halt(g.req()))
    g.sync()
    assert a.channel.rndis_state == "halted"
    frame = raw(Ether() / IP() / TCP()) + bytes(20)
    env.ram.write(g.send_gpa, R.rndis_packet(frame))
    tid = g.send(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_DATA, 0, 44 + len(frame)))
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert int(f["status"]) == N.STATUS_SUCCESS
    assert a.dropped["data while RNDIS is halted"] == 1
    # INITIALIZE again re-initializes (netvsp.py docstring)
    c = g.rndis(R.rndis_initialize(g.req()))
    assert int(c.fields["status"]) == R.STATUS_SUCCESS and a.channel.rndis_state == "initialized"


def test_gpa_direct_range_on_the_last_page_of_ram_is_read_not_past_it(two):
    """A control message that ends exactly at the end of guest RAM is read; one
    byte more names a PFN past RAM and is dropped (b.6, parse_gpa_direct)."""
    env, a, g, b, gb = two
    g.bring_up()
    ka = R.rndis_keepalive(77)
    end = env.ram.size
    env.ram.write(end - len(ka), ka)
    tid = g.send_direct(N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL),
                        [(end - len(ka), len(ka))])
    t, f = N.decode_message(g.completion(tid), completion=True)
    assert int(f["status"]) == N.STATUS_SUCCESS
    assert g.reply(77).msg_type == R.MSG_KEEPALIVE_C
    last = end // PAGE - 1
    body = (struct.pack("<II", 0, 1) + struct.pack("<II", len(ka) + 1, PAGE - len(ka))
            + struct.pack("<QQ", last, last + 1))
    pl = N.nvsp_send_rndis_packet(N.CHANNEL_TYPE_CONTROL)
    pl += bytes(-len(pl) % 8)
    g.send_raw(struct.pack("<HHHHQ", 9, (16 + len(body)) // 8, (16 + len(body) + len(pl)) // 8,
                           1, 901) + body + pl)
    t, f = N.decode_message(g.completion(901), completion=True)
    assert int(f["status"]) == N.STATUS_INVALID_RNDIS_PKT
    assert a.dropped["bad GPA-direct ranges"] == 1 and not a.violations

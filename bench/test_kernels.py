"""Micro benchmarks of the fast-path kernels (pytest-benchmark). Run: make bench.

Each benchmark times one kernel over one full batch of 256 64-byte frames from
the fastpath benchmark's traffic; divide by 256 for ns per packet.
"""
from __future__ import annotations

import time

import numpy as np
import pytest
from scapy.all import IP, TCP, Ether, raw

from examples.acl_filter import acl_filter_kernel
from hvnet.fastpath_bench import build
from switch.batch import GSO_SIZE, GSO_TCPV4, GSO_TYPE, PacketBatch
from switch.contract import merge_drop
from switch.delivery import edge_ingress, finalize
from switch.forwarding import builtin_stage
from switch.gso import segment
from switch.parse import parse_batch


@pytest.fixture(scope="module")
def rig():
    sw, mem = build()
    for _ in range(50):
        sw.poll()
    b = sw._rx
    b.reset()
    b.n = mem.receive(b)
    edge_ingress(b.meta, b.data, sw.counters.table, 0, b.n)
    return sw, mem, b


def test_parse(benchmark, rig):
    sw, mem, b = rig
    pristine = b.meta.copy()
    # parse is idempotent on an already popped frame except for the tag; reparse same rows
    benchmark(parse_batch, b.meta, b.data, 0, b.n)
    b.meta[:] = pristine


def test_builtin_forwarding(benchmark, rig):
    sw, mem, b = rig
    m = b.meta
    keep = m.copy()

    def run():
        m[5, :b.n] = 0
        builtin_stage(m, sw.port_table.cfg, sw.port_table.acl, sw.fdb.table, sw.counters.switch,
                      b.n, time.monotonic_ns())
    benchmark(run)
    m[:] = keep


def test_acl_filter(benchmark, rig):
    sw, mem, b = rig
    acl = sw.enabled_extensions()[0]
    drop = np.zeros(b.capacity, dtype=np.int64)
    benchmark(acl_filter_kernel, b.view.meta, drop, b.n, acl.table, acl.deny_reason)


def test_filter_merge(benchmark, rig):
    sw, mem, b = rig
    drop = np.zeros(b.capacity, dtype=np.int64)

    def run():
        drop[::7] = 64
        merge_drop(b.meta, drop, b.n, 64, 65)
    benchmark(run)


def test_finalize(benchmark, rig):
    sw, mem, b = rig
    c, p = sw.counters, sw._plan
    benchmark(finalize, b.meta, c.table, p.plan, p.span, b.n)


def test_pipeline_one_batch(benchmark, rig):
    sw, mem, b = rig
    benchmark(sw.poll)


def test_gso_segment_64k(benchmark):
    """Software GSO of one 64 KiB TCPv4 super-packet (timestamps, MSS 1448) into 46
    frames with every checksum computed: the time is per super-packet, not per batch."""
    opts = [("NOP", None), ("NOP", None), ("Timestamp", (1, 2))]
    payload = bytes((k * 7 + 1) & 0xFF for k in range(65535 - 20 - 32))
    frame = raw(Ether(dst="02:00:00:00:00:02", src="02:00:00:00:00:01")
                / IP(src="10.0.0.1", dst="10.0.0.2")
                / TCP(sport=40000, dport=5201, flags="PA", options=opts) / payload)
    b = PacketBatch(capacity=1, arena=1 << 17, max_dest=1)
    b.append_frames([frame])
    b.meta[GSO_TYPE, 0] = GSO_TCPV4
    b.meta[GSO_SIZE, 0] = 1448
    parse_batch(b.meta, b.data, 0, 1)
    out = np.zeros(1 << 17, dtype=np.uint8)
    lens = np.zeros(64, dtype=np.int64)
    assert segment(b.meta, b.data, 0, 0, out, lens, 64) == 46
    benchmark(segment, b.meta, b.data, 0, 0, out, lens, 64)


# ---- VMBus ring (netvsp/vmbus): 256 64-byte in-band packets through a 512 KiB ring ----

from netvsp.vmbus.packet import inband_footprint, put_inband  # noqa: E402
from netvsp.vmbus.ring import (D_NEXT, D_PAYLOAD, D_PAYLOAD_LEN, DESC_FIELDS,  # noqa: E402
                               get_bytes, read_packet, ring_init, ring_read_commit,
                               ring_read_pos, ring_write_begin, ring_write_commit)
from switch.kernel import kernel  # noqa: E402

RING_DATA = 512 * 1024              # Linux netvsc's default ring (vmbus_netvsp.md a.1)


@kernel
def _ring_send_inband(mem, base, ds, frames, n, size):
    """Writer: one batch of n in-band packets, one commit (a.4.6 once per batch)."""
    start = ring_write_begin(mem, base, ds, inband_footprint(size))
    if start < 0:
        return start
    pos = start
    for i in range(n):
        pos = put_inband(mem, base, ds, pos, 6, 1, i + 1, frames, i * size, size)
    return ring_write_commit(mem, base, ds, start, pos)


@kernel
def _ring_drain(mem, base, ds, desc, out):
    """Reader: validate and copy out every packet, one commit."""
    start = ring_read_pos(mem, base, ds)
    pos = start
    got = 0
    while read_packet(mem, base, ds, pos, desc) == 0:
        get_bytes(mem, base + 4096, ds, desc[D_PAYLOAD], out, got * 64, desc[D_PAYLOAD_LEN])
        pos = desc[D_NEXT]
        got += 1
    ring_read_commit(mem, base, ds, pos, start)
    return got


def test_vmbus_ring_inband_256(benchmark):
    """Write 256 in-band packets with 64-byte payloads and read them back (one batch
    each way, positions wrapping around the ring over the rounds); the time is per
    256 packets: divide by 256 for ns per packet (extra_info ns_per_packet)."""
    mem = np.zeros(4096 + RING_DATA, dtype=np.uint8)
    assert ring_init(mem, 0, RING_DATA) == 0
    frames = np.arange(256 * 64, dtype=np.uint8)
    out = np.zeros(256 * 64, dtype=np.uint8)
    desc = np.zeros(DESC_FIELDS, dtype=np.int64)

    def run():
        _ring_send_inband(mem, 0, RING_DATA, frames, 256, 64)
        return _ring_drain(mem, 0, RING_DATA, desc, out)

    assert run() == 256 and (out == frames).all()
    benchmark(run)
    if benchmark.stats is not None:
        benchmark.extra_info["ns_per_packet"] = round(benchmark.stats.stats.mean * 1e9 / 256, 1)


def _tcp_batch(n=256):
    b = PacketBatch()
    b.append_frames([raw(Ether(dst="02:00:00:00:0a:01", src="02:00:00:00:00:99")
                         / IP(src=f"10.0.{k // 250}.{k % 250 + 1}", dst="10.0.9.1")
                         / TCP(sport=1024 + k, dport=5201)) for k in range(n)], src_port=1)
    parse_batch(b.meta, b.data, 0, b.n)
    return b


def test_toeplitz_hash_batch(benchmark):
    """RSS hash (TCP/IPv4 4-tuple) of a parsed batch of 256 frames."""
    from switch.toeplitz import DEFAULT_KEY, LINUX_HASHINFO, hash_batch, key_table
    b = _tcp_batch()
    t = key_table(DEFAULT_KEY)
    benchmark(hash_batch, b.meta, b.n, t, LINUX_HASHINFO)


def test_vmq_steer_vmmq(benchmark):
    """VMQ steering of 256 frames to a VMMQ port: filter match, Toeplitz, table."""
    from switch.port import mac_to_int
    from switch.vmq import Vmq
    v = Vmq(4, port_id=1, cpus=[0])
    q1 = v.allocate(5)
    v.set_filter(q1, mac_to_int("02:00:00:00:0a:01"))
    v.complete(q1)
    q2 = v.allocate(5)
    v.complete(q2)
    v.enable_rss(5)
    b = _tcp_batch()
    benchmark(v.steer, b)

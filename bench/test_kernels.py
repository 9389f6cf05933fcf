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

"""Adversarial review of VMQ steering and its queue workers (switch/vmq.py,
switch/vmq_workers.py): frame order inside a queue when a lane's arena fills,
corrupt offsets in the demultiplexer, and VMMQ when a port's queue count shrinks
(vswitch_vmq_sriov.md 3.1, 3.4, checklist 32-36)."""
from __future__ import annotations

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, Raw, raw

from switch.batch import DROP, LEN, OFF, QUEUE, PacketBatch
from switch.memport import MemoryPorts
from switch.parse import parse_batch
from switch.port import mac_to_int
from switch.switch import Switch
from switch.vmq import Vmq, VmqError
from switch.vmq_workers import LANE_ARENA, QueueWorkers, take_queue

MAC_A = "02:00:00:00:0a:01"
UPLINK = 1


def _rig():
    sw = Switch("rvq", max_ports=8)
    mem = MemoryPorts(in_frames=256, in_bytes=1 << 22, out_frames=256, out_bytes=1 << 22)
    up = sw.add_port("uplink", "external", kind=mem)
    vm = sw.add_port("vm0", "synthetic", mac=MAC_A, kind=mem)
    vmq = Vmq(2, port_id=up.port_id, cpus=[0])
    w = QueueWorkers(vmq, sw, depth=4)
    q = vmq.allocate(vm.port_id, cpu=0)
    vmq.set_filter(q, mac_to_int(MAC_A))
    vmq.complete(q)
    return sw, up, vm, vmq, w, q


def _frame(k: int, size: int) -> bytes:
    head = Ether(dst=MAC_A, src="02:00:00:00:00:99") / IP(src="10.0.0.9", dst="10.0.0.1") \
        / UDP(sport=4000, dport=7)
    pad = size - len(raw(head)) - 4
    return raw(head / Raw(k.to_bytes(4, "big") + b"q" * pad))


def test_a_full_lane_arena_keeps_the_queues_order():
    sw, up, vm, vmq, w, q = _rig()
    big = 60000
    frames = [_frame(k, big) for k in range(9)] + [_frame(9, 100)]
    assert 8 * ((big + 63) & ~63) + big > LANE_ARENA       # the 9th does not fit
    b = PacketBatch(16, arena=1 << 20)
    assert b.append_frames(frames, src_port=up.port_id) == 10
    with sw._dp_lock:
        left = w.dispatch(b)
    assert left == 0
    lane = w.lanes[q]
    order = []
    while not lane.ready.empty():
        lb = lane.ready.get_nowait()
        order += [int.from_bytes(f[42:46], "big") for f in lb.frames()]
    assert order == list(range(10))


def test_take_queue_leaves_frames_whose_offset_or_length_lie_outside_the_arena():
    b = PacketBatch(8, arena=4096)
    b.append_frames([_frame(k, 200) for k in range(4)], src_port=UPLINK)
    parse_batch(b.meta, b.data, 0, b.n)
    b.meta[QUEUE, :4] = 1
    b.meta[DROP, :4] = 0
    b.meta[OFF, 1] = b.data.shape[0] - 10           # runs off the end
    b.meta[LEN, 2] = -5
    b.meta[OFF, 3] = -64
    out = PacketBatch(4, arena=1024)
    m, cur, k = take_queue(b.meta, b.data, b.n, 1, out.meta, out.data)
    assert (m, k) == (1, 3)                          # only frame 0 moved, three left
    assert cur <= out.data.shape[0]
    out.n = m
    assert out.frames()[0] == _frame(0, 200)


def _tcp_flows(n):
    return [raw(Ether(dst=MAC_A, src="02:00:00:00:00:99")
                / IP(src=f"10.0.{k // 200}.{k % 200 + 1}", dst="10.0.9.1")
                / TCP(sport=1024 + 7 * k, dport=5201) / Raw(b"y" * 10)) for k in range(n)]


def _steer(v, frames):
    b = PacketBatch()
    b.append_frames(frames, src_port=UPLINK)
    parse_batch(b.meta, b.data, 0, b.n)
    v.steer(b)
    return [int(b.meta[QUEUE, i]) for i in range(b.n)]


def test_shrinking_a_vmmq_port_by_one_queue_keeps_its_rss():
    v = Vmq(4, port_id=UPLINK)
    q1 = v.allocate(5)
    v.set_filter(q1, mac_to_int(MAC_A))
    v.complete(q1)
    q2, q3 = v.allocate(5), v.allocate(5)
    v.complete(q2)
    v.complete(q3)
    v.enable_rss(5)
    v.set_indirection(5, [q1, q2])                   # shrink the table first (3.4) ...
    v.free(q3)                                       # ... then the queue count
    qs = _steer(v, _tcp_flows(200))
    assert set(qs) == {q1, q2}                       # still spread over the two left
    q4 = v.allocate(5)
    v.complete(q4)
    with pytest.raises(VmqError, match="fixed"):
        v.enable_rss(5, key=bytes(range(40)))

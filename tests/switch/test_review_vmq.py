"""Adversarial review of VMQ steering (switch/vmq.py): VMMQ when a port's queue
count shrinks (vswitch_vmq_sriov.md 3.1, 3.4, checklist 32-36). The workers'
hand-over (switch/vmq_workers.py) is tested in test_vmq_workers.py: it moves
delivery plans, not frames, so the arena and offset cases of its first design
are gone with it."""
from __future__ import annotations

import pytest
from scapy.all import IP, TCP, Ether, Raw, raw

from switch.batch import QUEUE, PacketBatch
from switch.parse import parse_batch
from switch.port import mac_to_int
from switch.vmq import Vmq, VmqError

MAC_A = "02:00:00:00:0a:01"
UPLINK = 1


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

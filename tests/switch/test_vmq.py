"""VMQ on the external port: filters and their match rules, the queue state machine,
VMMQ spreading by Toeplitz, dynamic VMQ, and steering inside a switch
(vswitch_vmq_sriov.md 3.1-3.4, checklist 32-34, 36)."""
from __future__ import annotations

import threading

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Dot1Q, Ether, Raw, raw

from switch.batch import HASH, QPORT, QUEUE, PacketBatch
from switch.memport import MemoryPorts
from switch.parse import parse_batch
from switch.port import mac_to_int
from switch.switch import Switch
from switch.toeplitz import DEFAULT_KEY, LINUX_HASHINFO, hash_batch, key_table
from switch.vmq import VLAN_ANY, QueueState, Vmq, VmqError

MAC_A, MAC_B, MAC_C = "02:00:00:00:0a:01", "02:00:00:00:0b:01", "02:00:00:00:0c:01"
UPLINK = 1          # the external port's id in the steering tests


def _steer(vmq, frames, src=UPLINK):
    b = PacketBatch()
    b.append_frames([raw(f) for f in frames], src_port=src)
    parse_batch(b.meta, b.data, 0, b.n)
    vmq.steer(b)
    return [int(b.meta[QUEUE, i]) for i in range(b.n)], [int(b.meta[QPORT, i]) for i in range(b.n)]


def _queue(vmq, port, mac, vlan=None, complete=True):
    q = vmq.allocate(port)
    if vlan is None:
        vmq.set_filter(q, mac_to_int(mac))
    else:
        vmq.set_filter(q, mac_to_int(mac), vlan)
    if complete:
        vmq.complete(q)
    return q


def _frame(mac, vlan=None, sport=1000):
    e = Ether(dst=mac, src="02:00:00:00:00:99")
    if vlan is not None:
        e = e / Dot1Q(vlan=vlan)
    return e / IP(src="10.0.0.9", dst="10.0.0.1") / UDP(sport=sport, dport=7) / Raw(b"x" * 30)


def test_mac_only_filter_matches_untagged_and_vlan0_only():
    v = Vmq(4, port_id=UPLINK)
    q = _queue(v, 5, MAC_A)
    qs, ports = _steer(v, [_frame(MAC_A), _frame(MAC_A, 0), _frame(MAC_A, 7), _frame(MAC_B)])
    assert qs == [q, q, 0, 0]
    assert ports == [5, 5, 0, 0]


def test_mac_vlan_filter_never_matches_untagged():
    v = Vmq(4, port_id=UPLINK)
    q = _queue(v, 5, MAC_A, vlan=7)
    assert _steer(v, [_frame(MAC_A), _frame(MAC_A, 0), _frame(MAC_A, 7),
                      _frame(MAC_A, 8)])[0] == [0, 0, q, 0]


def test_filter_without_the_untagged_flag_matches_any_vlan():
    v = Vmq(4, port_id=UPLINK)
    q = _queue(v, 5, MAC_A, vlan=VLAN_ANY)
    assert _steer(v, [_frame(MAC_A), _frame(MAC_A, 7), _frame(MAC_A, 4000)])[0] == [q, q, q]


def test_filters_of_a_queue_or_and_queues_are_tried_in_order():
    v = Vmq(4, port_id=UPLINK)
    q1 = v.allocate(5)
    v.set_filter(q1, mac_to_int(MAC_A))
    v.set_filter(q1, mac_to_int(MAC_B), 9)
    v.complete(q1)
    q2 = v.allocate(6)
    v.set_filter(q2, mac_to_int(MAC_B), 9)          # the same test on a later queue
    v.set_filter(q2, mac_to_int(MAC_C))
    v.complete(q2)
    qs, _ = _steer(v, [_frame(MAC_A), _frame(MAC_B, 9), _frame(MAC_C), _frame(MAC_B)])
    assert qs == [q1, q1, q2, 0]


def test_only_running_queues_receive_and_the_state_machine():
    v = Vmq(2, port_id=UPLINK)
    q = v.allocate(5)
    assert v.q_state[q] == QueueState.ALLOCATED
    f = v.set_filter(q, mac_to_int(MAC_A))
    assert v.q_state[q] == QueueState.SET
    assert _steer(v, [_frame(MAC_A)])[0] == [0]              # not complete yet
    v.complete(q)
    assert v.q_state[q] == QueueState.RUNNING
    assert _steer(v, [_frame(MAC_A)])[0] == [q]
    v.clear_filter(f)                                         # last filter: Paused
    assert v.q_state[q] == QueueState.PAUSED
    assert _steer(v, [_frame(MAC_A)])[0] == [0]
    v.set_filter(q, mac_to_int(MAC_A))
    assert v.q_state[q] == QueueState.RUNNING
    drained = []
    v.free(q, drained=lambda: drained.append(QueueState(int(v.q_state[q])).name))
    assert drained == ["FREEING"]
    assert v.q_state[q] == QueueState.UNDEFINED
    assert _steer(v, [_frame(MAC_A)])[0] == [0]
    states = [s for qq, s in v.history if qq == q]
    assert states == ["ALLOCATED", "SET", "RUNNING", "PAUSED", "RUNNING", "DMA_STOPPED",
                      "FREEING", "UNDEFINED"]


def test_complete_without_filters_is_paused_and_queue0_cannot_be_freed():
    v = Vmq(2, port_id=UPLINK)
    q = v.allocate(5)
    v.complete(q)
    assert v.q_state[q] == QueueState.PAUSED
    with pytest.raises(VmqError, match="default queue"):
        v.free(0)
    with pytest.raises(VmqError, match="already complete"):
        v.complete(q)


def test_queues_and_filters_run_out_with_clear_errors():
    v = Vmq(1, max_filters=2, port_id=UPLINK)
    q = v.allocate(5)
    with pytest.raises(VmqError, match="no free VMQ queue"):
        v.allocate(6)
    v.set_filter(q, mac_to_int(MAC_A))
    v.set_filter(q, mac_to_int(MAC_B))
    with pytest.raises(VmqError, match="no free VMQ filter"):
        v.set_filter(q, mac_to_int(MAC_C))
    with pytest.raises(VmqError, match="unicast"):
        v.set_filter(q, mac_to_int("01:00:5e:00:00:01"))
    with pytest.raises(VmqError, match="1..4094"):
        v.set_filter(q, mac_to_int(MAC_C), 4095)
    with pytest.raises(VmqError, match="not allocated|not a queue"):
        v.set_filter(3, mac_to_int(MAC_C))


def test_a_stale_queue_id_on_a_frame_is_queue_0():
    """A queue freed between classification and use: its id is not Running (34)."""
    v = Vmq(2, port_id=UPLINK)
    q = _queue(v, 5, MAC_A)
    v.free(q)
    assert _steer(v, [_frame(MAC_A)]) == ([0], [0])


def test_frames_from_other_ports_are_not_sorted():
    v = Vmq(2, port_id=UPLINK)
    _queue(v, 5, MAC_A)
    assert _steer(v, [_frame(MAC_A)], src=3) == ([0], [0])


def _tcp_flows(mac, n):
    return [Ether(dst=mac, src="02:00:00:00:00:99")
            / IP(src=f"10.0.{k // 200}.{k % 200 + 1}", dst="10.0.9.1")
            / TCP(sport=1024 + 7 * k, dport=5201) / Raw(b"y" * 10) for k in range(n)]


def test_vmmq_spreads_by_toeplitz_and_the_table():
    v = Vmq(4, port_id=UPLINK)
    q1 = _queue(v, 5, MAC_A)
    q2 = v.allocate(5)
    v.complete(q2)                   # a VMMQ queue of the port: no filter of its own
    v.enable_rss(5)
    flows = _tcp_flows(MAC_A, 200)
    qs, ports = _steer(v, flows)
    # the expected queue from the hash alone
    b = PacketBatch()
    b.append_frames([raw(f) for f in flows])
    parse_batch(b.meta, b.data, 0, b.n)
    hash_batch(b.meta, b.n, key_table(DEFAULT_KEY), LINUX_HASHINFO)
    table = v.indirection(5)
    assert len(table) == 128 and set(table) == {q1, q2}
    want = [table[int(b.meta[HASH, i]) & 127] for i in range(b.n)]
    assert qs == want
    assert set(ports) == {5}
    assert 60 < qs.count(q2) < 140                              # spread, not all on one
    v.set_indirection(5, [q2] * 16)                             # while "traffic flows"
    assert _steer(v, flows)[0] == [q2] * 200


def test_vmmq_key_and_types_are_fixed_and_tables_checked():
    v = Vmq(4, port_id=UPLINK)
    q1 = _queue(v, 5, MAC_A)
    with pytest.raises(VmqError, match="needs two"):
        v.enable_rss(5)
    q2 = v.allocate(5)
    v.complete(q2)
    v.enable_rss(5)
    with pytest.raises(VmqError, match="fixed"):
        v.enable_rss(5, key=bytes(40))
    with pytest.raises(VmqError, match="power of two"):
        v.set_indirection(5, [q1, q2, q1])
    q3 = _queue(v, 6, MAC_B)
    with pytest.raises(VmqError, match="not this port's queues"):
        v.set_indirection(5, [q1, q3])
    # frames the types do not cover stay on the port's first queue
    arp = Ether(dst=MAC_A, src="02:00:00:00:00:99", type=0x88B5) / Raw(b"z" * 40)
    assert _steer(v, [arp])[0] == [q1]


def test_table_changes_while_steering_runs_never_leave_the_port():
    v = Vmq(4, port_id=UPLINK)
    q1 = _queue(v, 5, MAC_A)
    q2 = v.allocate(5)
    v.complete(q2)
    q3 = _queue(v, 6, MAC_B)
    v.enable_rss(5)
    stop = threading.Event()

    def churn():
        k = 0
        while not stop.is_set():
            size = 1 << (k % 8)
            v.set_indirection(5, [(q1, q2)[(j + k) % 2] for j in range(size)])
            k += 1

    t = threading.Thread(target=churn)
    t.start()
    try:
        flows = _tcp_flows(MAC_A, 250)
        for _ in range(200):
            qs, ports = _steer(v, flows)
            assert set(qs) <= {q1, q2} and set(ports) == {5}
    finally:
        stop.set()
        t.join()
    assert _steer(v, [_frame(MAC_B)])[0] == [q3]


def test_dynamic_vmq_moves_with_hysteresis():
    v = Vmq(3, cpus=[0, 1], port_id=UPLINK)
    qa = v.allocate(5, cpu=0)
    qb = v.allocate(6, cpu=0)
    v.q_load[0], v.q_load[qa], v.q_load[qb] = 0.1, 0.6, 0.3
    assert v.rebalance(high=0.85, low=0.5) == [(qb, 0, 1)]       # 1.0 on CPU 0: move one
    assert v.moves == 1
    assert v.rebalance(high=0.85, low=0.5) == []                 # 0.7 / 0.3: stays
    v.q_load[qa] = 0.8                                           # 0.9 on CPU 0 again
    v.q_load[qb] = 0.45                                          # but CPU 1 would pass 0.5
    assert v.rebalance(high=0.85, low=0.5) == []
    assert v.q_cpu[qa] == 0 and v.q_cpu[qb] == 1


def test_switch_delivers_a_queued_frame_to_its_port_without_flooding():
    """With an empty FDB an unknown unicast floods; sorted into a VM's queue it goes
    to that VM alone (the lookup is skipped, VLAN policy still applies)."""
    from switch.properties import VlanProperty
    sw = Switch("vmq", max_ports=8)
    mem = MemoryPorts(in_frames=256, in_bytes=1 << 16, out_frames=256, out_bytes=1 << 18)
    up = sw.add_port("uplink", "external", kind=mem)
    a = sw.add_port("a", "synthetic", mac=MAC_A, kind=mem)
    b = sw.add_port("b", "synthetic", mac=MAC_B, kind=mem)
    c = sw.add_port("c", "synthetic", mac=MAC_C, kind=mem,
                    properties=[VlanProperty("access", access_vlan=30)])
    v = Vmq(2, port_id=up.port_id)
    mem.steer = v.steer
    _queue(v, a.port_id, MAC_A)
    _queue(v, c.port_id, MAC_C)
    mem.inject(up, [raw(_frame(MAC_A)), raw(_frame(MAC_B)), raw(_frame(MAC_C))])
    while mem.pending():
        sw.poll()
    got = {p: sorted(Ether(f).dst for f in fs) for p, fs in mem.collect_by_port().items()}
    # MAC_A was queued: a alone. MAC_B is unknown unicast: flooded to a and b, never c
    # (VLAN 30). MAC_C was queued to c, whose VLAN policy still refuses it.
    assert got == {a.port_id: [MAC_A, MAC_B], b.port_id: [MAC_B]}
    info = {q["queue"]: q for q in v.info()}
    assert info[0]["packets"] == 1 and info[1]["packets"] == 1 and info[2]["packets"] == 1

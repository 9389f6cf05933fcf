"""VMQ queue workers: frames of a queue are switched by its worker thread and reach
the queue's VM port only; a full lane drops and counts; freeing a queue while its
frames are in flight sends them the default way; loads are measured per thread."""
from __future__ import annotations

import os
import threading
import time

import numpy as np

from scapy.all import IP, UDP, Ether, Raw, raw

from switch import counters as R
from switch.memport import MemoryPorts
from switch.port import mac_to_int
from switch.switch import Switch
from switch.vmq import Vmq
from switch.vmq_workers import QueueWorkers

MACS = ["02:00:00:00:0a:01", "02:00:00:00:0b:01", "02:00:00:00:0c:01"]


def _rig(queues=2, depth=4):
    sw = Switch("vmqw", max_ports=8)
    mem = MemoryPorts(in_frames=8192, in_bytes=1 << 22, out_frames=16384, out_bytes=1 << 23)
    up = sw.add_port("uplink", "external", kind=mem)
    vms = [sw.add_port(f"vm{k}", "synthetic", mac=m, kind=mem) for k, m in enumerate(MACS)]
    vmq = Vmq(queues, port_id=up.port_id, cpus=[0])
    w = QueueWorkers(vmq, sw, depth=depth, interval=0.2)
    mem.steer, mem.dispatch = vmq.steer, w.dispatch
    qs = []
    for p, m in zip(vms[:queues], MACS):
        q = vmq.allocate(p.port_id, cpu=0)
        vmq.set_filter(q, mac_to_int(m))
        vmq.complete(q)
        qs.append(q)
    return sw, mem, up, vms, vmq, w, qs


def _frames(mac, n, tag):
    return [raw(Ether(dst=mac, src="02:00:00:00:00:99") / IP(src="10.0.0.9", dst="10.0.0.1")
                / UDP(sport=1000 + k, dport=7) / Raw(tag + k.to_bytes(4, "big") + b"p" * 40))
            for k in range(n)]


def _drain(sw, mem, w, depth, timeout=30):
    """Poll until the input is empty and every lane's batches are back; everything
    delivered meanwhile, by port."""
    out: dict[int, list[bytes]] = {}
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        sw.poll()
        with sw._dp_lock:
            for p, fs in mem.collect_by_port().items():
                out.setdefault(p, []).extend(fs)
        if not mem.pending() and all(len(lane.free) == depth for lane in w.lanes.values()):
            break
        time.sleep(0.001)
    with sw._dp_lock:
        for p, fs in mem.collect_by_port().items():
            out.setdefault(p, []).extend(fs)
    return out


def test_each_queue_is_switched_by_its_worker_to_its_port_only():
    # Lanes deep enough for all of it (4 receives of up to 86 frames per queue, two
    # lane batches each): nothing may depend on when the workers get to run.
    sw, mem, up, vms, vmq, w, qs = _rig(depth=16)
    seen = {}
    orig = sw.process

    def spy(b, steer=None):
        seen.setdefault(threading.current_thread().name, 0)
        seen[threading.current_thread().name] += b.n
        return orig(b, steer)
    sw.process = spy
    w.start()
    try:
        frames = []
        for k in range(300):
            frames += [_frames(MACS[0], 1, b"A")[0], _frames(MACS[1], 1, b"B")[0],
                       _frames(MACS[2], 1, b"C")[0]]
        mem.inject(up, frames)
        got = _drain(sw, mem, w, 16)
    finally:
        w.stop()
    assert all(lane.full_drops == 0 for lane in w.lanes.values())
    dst = {p.port_id: [Ether(f).dst for f in got.get(p.port_id, [])] for p in vms}
    # C is unknown unicast: flooded to every VM port; A and B reach their owners only
    assert sorted(dst[vms[0].port_id]) == sorted([MACS[0]] * 300 + [MACS[2]] * 300)
    assert sorted(dst[vms[1].port_id]) == sorted([MACS[1]] * 300 + [MACS[2]] * 300)
    assert dst[vms[2].port_id] == [MACS[2]] * 300          # flooded, unqueued
    assert seen.get("vmq-vmqw-q1", 0) == 300 and seen.get("vmq-vmqw-q2", 0) == 300
    info = {q["queue"]: q for q in vmq.info()}
    assert info[qs[0]]["packets"] == 300 and info[qs[1]]["packets"] == 300
    assert info[0]["packets"] == 300


def test_a_full_lane_drops_and_counts():
    sw, mem, up, vms, vmq, w, qs = _rig(depth=1)
    # workers not started: the one lane batch is taken and never comes back
    mem.inject(up, _frames(MACS[0], 10, b"A"))
    sw.poll()
    mem.inject(up, _frames(MACS[0], 10, b"A"))
    sw.poll()
    st = sw.stats()["ports"]["uplink"]
    assert st["drops_in"].get(R.BUILTIN_REASONS[R.VMQ_FULL]) == 10
    assert w.info()[qs[0]] == 10
    assert w.lanes[qs[0]].ready.qsize() == 1


def test_freeing_a_queue_with_frames_in_flight_sends_them_the_default_way():
    sw, mem, up, vms, vmq, w, qs = _rig()
    mem.inject(up, _frames(MACS[0], 20, b"A"))
    sw.poll()                                  # handed to q1's lane, not yet switched
    assert w.lanes[qs[0]].ready.qsize() == 1
    vmq.free(qs[0])
    w.start()
    try:
        got = _drain(sw, mem, w, 4)
    finally:
        w.stop()
    # unknown unicast now (no queue, empty FDB): flooded, never lost
    assert len(got.get(vms[0].port_id, [])) == 20
    assert len(got.get(vms[1].port_id, [])) == 20
    assert len(got.get(vms[2].port_id, [])) == 20


def test_loads_are_measured_for_the_dispatcher_and_the_workers():
    sw, mem, up, vms, vmq, w, qs = _rig()
    w.start()

    peak = np.zeros(3)

    def datapath():
        t0 = time.monotonic()
        while time.monotonic() - t0 < 1.5:
            sw.poll()
            if not mem.pending():
                mem.rewind()
            np.maximum(peak, vmq.q_load, out=peak)
    try:
        mem.inject(up, _frames(MACS[0], 2000, b"A") + _frames(MACS[1], 2000, b"B"))
        sw.poll()                      # from the main thread (as warm() does): not the dispatcher
        assert w.dispatcher is None
        t = threading.Thread(target=datapath, name="datapath-vmqw")
        t.start()
        t.join()
    finally:
        w.stop()
    assert w.dispatcher == t.ident
    assert peak[0] > 0.05                      # the loads of one balancer interval
    assert peak[qs[0]] > 0.0 and peak[qs[1]] > 0.0


def test_a_queue_moved_to_another_cpu_while_frames_flow_loses_nothing():
    """Dynamic VMQ moves a queue (rebalance) while its worker switches frames: the
    worker re-pins itself and every frame still reaches the queue's port."""
    cpus = sorted(os.sched_getaffinity(0))
    sw = Switch("vmqm", max_ports=8)
    mem = MemoryPorts(in_frames=8192, in_bytes=1 << 22, out_frames=16384, out_bytes=1 << 23)
    up = sw.add_port("uplink", "external", kind=mem)
    vm = sw.add_port("vm0", "synthetic", mac=MACS[0], kind=mem)
    vmq = Vmq(1, port_id=up.port_id, cpus=cpus)
    w = QueueWorkers(vmq, sw, depth=8, interval=0.05)
    vmq.dynamic = False                          # the test moves it by hand
    mem.steer, mem.dispatch = vmq.steer, w.dispatch
    q = vmq.allocate(vm.port_id, cpu=cpus[0])
    vmq.set_filter(q, mac_to_int(MACS[0]))
    vmq.complete(q)
    w.start()
    got = 0
    try:
        for k in range(6):
            mem.inject(up, _frames(MACS[0], 500, bytes([65 + k])))
            if k == 3:
                vmq.q_load[0], vmq.q_load[q] = 0.1, 0.9
                moves = vmq.rebalance(high=0.85, low=0.95)
                assert moves == ([(q, cpus[0], cpus[1])] if len(cpus) > 1 else [])
            out = _drain(sw, mem, w, 8)
            got += len(out.get(vm.port_id, []))
    finally:
        w.stop()
    assert got == 3000
    assert w.lanes[q].cpu == (cpus[1] if len(cpus) > 1 else cpus[0])


def test_append_batch_keeps_order_offsets_and_refuses_what_does_not_fit():
    from switch.batch import LEN, OFF, PacketBatch
    from switch.vmq_workers import append_batch
    a, b = PacketBatch(8, 4096), PacketBatch(8, 4096)
    a.append_frames([bytes([1]) * 100, bytes([2]) * 60], src_port=1)
    b.append_frames([bytes([3]) * 70, bytes([4]) * 1000], src_port=2)
    n, cur = append_batch(a.meta, a.data, a.n, a.cursor, b.meta, b.data, b.n, b.cursor)
    assert n == 4 and cur >= a.cursor + b.cursor
    a.n, a.cursor = n, cur
    assert [f[0] for f in a.frames()] == [1, 2, 3, 4]
    assert [len(f) for f in a.frames()] == [100, 60, 70, 1000]
    assert a.frames()[3] == bytes([4]) * 1000 and int(a.meta[OFF, 2]) >= 160
    # Too many frames, or too many bytes: nothing moves.
    big = PacketBatch(8, 4096)
    big.append_frames([bytes([5]) * 60] * 5, src_port=2)
    assert append_batch(a.meta, a.data, a.n, a.cursor, big.meta, big.data, big.n,
                        big.cursor) == (a.n, a.cursor)
    wide = PacketBatch(8, 8192)
    wide.append_frames([bytes([6]) * 3000], src_port=2)
    assert append_batch(a.meta, a.data, a.n, a.cursor, wide.meta, wide.data, wide.n,
                        wide.cursor) == (a.n, a.cursor)
    assert int(a.meta[LEN, 3]) == 1000


def test_the_data_path_lock_is_handed_to_a_waiting_thread():
    """The data-path thread retakes the lock right after each batch; a thread waiting
    for it (a queue's worker) gets in at the next hand-over, not whenever the
    unfair lock happens to let it."""
    from switch.switch import DataPathLock
    lock = DataPathLock()
    rounds, got_in = [0], []
    started = threading.Event()

    def data_path():
        for k in range(300):
            with lock:
                started.set()
                t = time.perf_counter()
                while time.perf_counter() - t < 0.0005:
                    pass                   # a batch being switched, the GIL held
                rounds[0] = k
            lock.hand_over(limit_s=0.01)

    def waiter():
        started.wait()
        with lock:
            got_in.append(rounds[0])
    t1, t2 = threading.Thread(target=data_path), threading.Thread(target=waiter)
    t1.start()
    t2.start()
    t2.join(10)
    t1.join(10)
    # The waiter first needs the GIL (up to 10 rounds: Python's 5 ms switch interval);
    # without the hand-over it was seen kept out for all 300 rounds.
    assert got_in and got_in[0] < 40 and lock.waiting == 0

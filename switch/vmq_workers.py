"""The workers of VMQ queues: one thread per queue, pinned to the queue's CPU.

What a VMQ NIC does in hardware (vswitch_vmq_sriov.md 3.1: one receive queue
per filter set, each indicated on its own processor) is done here by the
external port's data path as a compiled demultiplexer of its one receive ring:
the batch just read is parsed and classified (``Vmq.classify``); the frames of
each queue that has a worker are moved into a batch of that worker's lane, and
what is left (queue 0, the default queue) is switched by the data-path thread
itself. A worker switches its batches (``Switch.process``) with the queue's
steering, so the frames go to the queue's VM port without a lookup, and a frame
whose queue went away meanwhile is queue 0's (checklist 34).

A lane holds ``depth`` batches. When all are in the worker's hands, a queue is
full: its frames are dropped and counted (VMQ_FULL), as a NIC drops on a full
ring; waiting would deadlock (the worker needs the data-path lock the
dispatcher holds), and switching them here would reorder the queue's flows.

Load (3.2) is each thread's CPU time per interval, read from its CPU clock; the
balancer calls ``Vmq.rebalance`` every ``interval`` seconds when the VMQ is
dynamic, and a worker re-pins itself when its queue's CPU changes.
"""
from __future__ import annotations

import collections
import logging
import os
import queue
import threading
import time

import numpy as np

from . import counters as R
from .batch import ALIGN, DROP, LEN, NFIELDS, OFF, QUEUE, ROW_PAD, PacketBatch, copy_bytes
from .kernel import kernel
from .parse import parse_batch

log = logging.getLogger("hvnet.vmq")
LANE_CAPACITY = 64
LANE_ARENA = 1 << 19


@kernel
def take_queue(meta, data, n, q, out_meta, out_data):
    """Move queue ``q``'s frames into ``out`` (from slot 0) and close the gaps they
    leave. Returns (moved, out cursor, left)."""
    cap = out_meta.shape[1] - ROW_PAD
    cursor = 0
    m = 0
    k = 0
    full = False          # once a frame of q stays behind, all later ones do: in order
    for i in range(n):
        ln = meta[LEN, i]
        off = meta[OFF, i]
        mine = meta[QUEUE, i] == q and meta[DROP, i] == 0
        if mine and not full and (m >= cap or cursor > out_data.shape[0] - ln):
            full = True
        if (mine and not full and off >= 0 and ln >= 0
                and off <= data.shape[0] - ln):
            copy_bytes(out_data, cursor, data, off, ln)
            for f in range(NFIELDS):
                out_meta[f, m] = meta[f, i]
            out_meta[OFF, m] = cursor
            cursor = (cursor + ln + ALIGN - 1) & ~(ALIGN - 1)
            m += 1
            continue
        if k != i:                             # left: other queues', or no room here
            for f in range(NFIELDS):
                meta[f, k] = meta[f, i]
        k += 1
    return m, cursor, k


@kernel
def append_batch(meta, data, n, cursor, src_meta, src_data, src_n, src_cursor):
    """Append a whole lane batch (its arena in one copy) behind ``n`` frames, if it
    fits; else nothing. Returns (n, cursor)."""
    cap = meta.shape[1] - ROW_PAD
    if (n + src_n > cap or src_cursor < 0 or src_cursor > src_data.shape[0]
            or cursor + src_cursor > data.shape[0]):
        return n, cursor
    copy_bytes(data, cursor, src_data, 0, src_cursor)
    for i in range(src_n):
        for f in range(NFIELDS):
            meta[f, n + i] = src_meta[f, i]
        meta[OFF, n + i] += cursor
    return n + src_n, (cursor + src_cursor + ALIGN - 1) & ~(ALIGN - 1)


@kernel
def drop_queue(meta, n, q, reason):
    for i in range(n):
        if meta[QUEUE, i] == q and meta[DROP, i] == 0:
            meta[DROP, i] = reason


class _Lane:
    def __init__(self, q: int, batches):
        self.q = q
        self.free = collections.deque(batches)      # batches the dispatcher may fill
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.full_drops = 0
        self.cpu = -1


class QueueWorkers:
    """Workers for queues 1..N of ``vmq`` on ``switch``."""

    def __init__(self, vmq, switch, depth: int = 32, interval: float = 1.0):
        self.vmq, self.switch, self.interval = vmq, switch, interval
        # Lane batches are smaller than the switch's: a queue's share of one receive.
        self.lanes = {q: _Lane(q, [PacketBatch(LANE_CAPACITY, LANE_ARENA,
                                               max_dest=switch.max_dest)
                                   for _ in range(depth)])
                      for q in range(1, vmq.num_queues + 1)}
        self.per_queue = np.zeros(vmq.num_queues + 1, dtype=np.int64)
        a = self.lanes[1].free[0] if self.lanes else PacketBatch(LANE_CAPACITY, 4096)
        append_batch(a.meta, a.data, 0, 0, a.meta, a.data, 0, 0)   # compiled before traffic
        self.stop_event = threading.Event()
        self.dispatcher: int | None = None          # the data-path thread's ident
        self._balancer: threading.Thread | None = None
        self._pinned_dispatcher = -1

    # ---- the data-path thread ----------------------------------------------------------
    def dispatch(self, batch) -> int:
        """Hand each queue's frames to its worker; returns the frames left in ``batch``."""
        me = threading.get_ident()
        if me != self.dispatcher and threading.current_thread() is not threading.main_thread():
            self.dispatcher = me              # the data-path thread (not warm()'s caller)
            self._pinned_dispatcher = -1
        if me == self.dispatcher:
            self._pin_dispatcher()
        n = batch.n
        if not n:
            return 0
        parse_batch(batch.meta, batch.data, 0, n)
        self.vmq.classify(batch, self.per_queue)
        for q in np.flatnonzero(self.per_queue[1:]).tolist():
            q += 1
            lane = self.lanes[q]
            left = int(self.per_queue[q])
            while left:
                try:
                    b = lane.free.popleft()
                except IndexError:             # the worker holds them all: queue full
                    drop_queue(batch.meta, batch.n, q, R.VMQ_FULL)
                    lane.full_drops += left
                    break
                b.reset()
                m, cur, batch.n = take_queue(batch.meta, batch.data, batch.n, q, b.meta,
                                             b.data)
                if not m:                      # a frame larger than a lane's arena
                    lane.free.append(b)
                    drop_queue(batch.meta, batch.n, q, R.VMQ_FULL)
                    lane.full_drops += left
                    break
                b.n, b.cursor = m, cur
                lane.ready.put(b)
                left -= m
        return batch.n

    def _pin_dispatcher(self) -> None:
        cpu = int(self.vmq.q_cpu[0])
        if cpu != self._pinned_dispatcher:
            _pin(cpu)
            self._pinned_dispatcher = cpu

    # ---- workers ---------------------------------------------------------------------
    def start(self) -> None:
        for lane in self.lanes.values():
            lane.thread = threading.Thread(target=self._work, args=(lane,),
                                           name=f"vmq-{self.switch.name}-q{lane.q}", daemon=True)
            lane.thread.start()
        self._balancer = threading.Thread(target=self._balance, daemon=True,
                                          name=f"vmq-{self.switch.name}-balance")
        self._balancer.start()

    def stop(self) -> None:
        self.stop_event.set()
        for lane in self.lanes.values():
            lane.ready.put(None)
        for t in [lane.thread for lane in self.lanes.values()] + [self._balancer]:
            if t is not None:
                t.join(5)

    def _work(self, lane: _Lane) -> None:
        steer = self.vmq.steer
        process = self.switch.process
        q_cpu = self.vmq.q_cpu
        carry = None
        while not self.stop_event.is_set():
            b = carry if carry is not None else lane.ready.get()
            carry = None
            if b is None:
                break
            cpu = int(q_cpu[lane.q])
            if cpu != lane.cpu:
                _pin(cpu)
                lane.cpu = cpu
            # A worker behind its queue switches what waits as one batch: the cost
            # of a batch is mostly per batch, and the dispatcher hands over one per
            # receive, however few frames it had.
            while b.n < b.capacity:
                try:
                    nxt = lane.ready.get_nowait()
                except queue.Empty:
                    break
                if nxt is None:
                    carry = None
                    self.stop_event.set()
                    break
                n, b.cursor = append_batch(b.meta, b.data, b.n, b.cursor, nxt.meta, nxt.data,
                                           nxt.n, nxt.cursor)
                if n == b.n:
                    carry = nxt               # does not fit: it goes next, in order
                    break
                b.n = n
                lane.free.append(nxt)
            try:
                process(b, steer)
            except Exception:                 # reported, and the queue keeps running
                log.exception("VMQ queue %d: switching a batch failed", lane.q)
            finally:
                lane.free.append(b)

    # ---- dynamic VMQ ---------------------------------------------------------------
    def _cpu_time(self, ident) -> float | None:
        try:
            return time.clock_gettime(time.pthread_getcpuclockid(ident))
        except (OSError, TypeError):
            return None

    def _balance(self) -> None:
        last: dict[int, float] = {}
        t0 = time.monotonic()
        while not self.stop_event.wait(self.interval):
            now = time.monotonic()
            dt = max(now - t0, 1e-3)
            t0 = now
            threads = {q: lane.thread.ident for q, lane in self.lanes.items() if lane.thread}
            if self.dispatcher is not None:
                threads[0] = self.dispatcher
            for q, ident in threads.items():
                c = self._cpu_time(ident)
                if c is None:
                    continue
                if q in last:
                    self.vmq.q_load[q] = max(0.0, (c - last[q]) / dt)
                last[q] = c
            if getattr(self.vmq, "dynamic", True):
                for q, a, b in self.vmq.rebalance():
                    log.info("VMQ queue %d moves from CPU %d to CPU %d", q, a, b)

    def info(self) -> dict[int, int]:
        return {q: lane.full_drops for q, lane in self.lanes.items()}


def _pin(cpu: int) -> None:
    """Pin the calling thread (Linux: pid 0 is the calling thread) to ``cpu``."""
    if cpu >= 0:
        try:
            os.sched_setaffinity(0, {cpu})
        except OSError as e:
            log.warning("cannot pin a VMQ thread to CPU %d: %s", cpu, e)

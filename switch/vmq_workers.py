"""The workers of VMQ queues: one thread per queue, pinned to the queue's CPU.

What a VMQ NIC does in hardware (vswitch_vmq_sriov.md 3.1: one receive queue
per filter set, each indicated on its own processor) is split here at the
switch's delivery. The data-path thread receives the external port's ring,
steers each frame to its queue (``Vmq.steer``: the queue's VM port without a
lookup, checklist 33) and runs the whole pipeline (port policies, extensions)
over the batch as for any other; then, instead of copying a queue's frames into
its VM port itself, it hands that port's share of the delivery plan to the
queue's worker (``offload``), which copies them into the VM's rings on the
queue's CPU. That copy, with the guest's interrupt, is most of what a received
frame costs the host, and a worker does it without the switch's data-path lock
(``PortKind.concurrent``: the kind serialises each port itself).

Shares are handed over four at a time, or as soon as a receive brings the queue
nothing more (an empty one when the uplink's ring runs dry included): a worker
is woken once per burst rather than once per batch, and no share waits on other
queues' traffic.

Nothing is copied to hand it over: the data-path thread receives into one of
``batches`` batches of its own, and a batch goes back to the free ones when
every worker that had a share of it is done. While the workers hold them all
(``held_back``), the data-path thread leaves the uplink's frames in its ring and
goes on with the switch's other ports; its idle wait watches ``wake_fd``, which a
worker rings as it gives a batch back, instead of the uplink. After ``wait_s``
with none free, the next batch is received into the switch's own: a queue whose
worker still has work drops its frames in it and counts them (VMQ_FULL), as a
NIC drops on a full queue (delivering them from here would reorder its flows);
a queue whose worker has nothing left gets them from the data-path thread, in
order. A frame whose queue went away before it was steered is queue 0's
(checklist 34).
Deleting a port (``port_gone``) waits for a share being sent to it; shares for it
not yet started are dropped and counted when their worker reaches them, so none
reaches the port that reuses the id (A.16).

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
from .batch import QPORT, QUEUE
from .delivery import tx_failed_span
from .kernel import kernel

log = logging.getLogger("hvnet.vmq")
# Shares handed to a worker at once: each hand-over wakes a thread (a futex, a
# context switch, the GIL); the rest go with the first receive that brings their
# queue nothing (put_batch). 4 measured best of 1, 2, 4, 8 and 16.
HAND_OVER_AT = 4


@kernel
def split_deliveries(meta, plan, j0, j1, pid, live, out, counts):
    """Move port ``pid``'s deliveries in ``plan[:, j0:j1]`` whose frame was steered
    to a queue of that port with ``live[q]`` set into ``out[q]`` (in order,
    ``counts[q]`` each); the rest close up from ``j0``. Returns the span's new end."""
    nq = out.shape[0]
    cap = out.shape[2]
    counts[:] = 0
    k = j0
    for j in range(j0, j1):
        i = plan[0, j]
        q = 0
        if 0 <= i < meta.shape[1] and meta[QPORT, i] == pid:
            q = meta[QUEUE, i]
        if 0 < q < nq and live[q] != 0 and counts[q] < cap:
            m = counts[q]
            out[q, 0, m] = i
            out[q, 1, m] = plan[1, j]
            counts[q] = m + 1
            continue
        if k != j:
            plan[0, k] = plan[0, j]
            plan[1, k] = plan[1, j]
        k += 1
    return k


class _Lane:
    def __init__(self, q: int, max_ports: int):
        self.q = q
        self.ready: queue.SimpleQueue = queue.SimpleQueue()
        self.thread: threading.Thread | None = None
        self.full_drops = 0
        self.cpu = -1
        self.span = np.zeros((max_ports + 1, 2), dtype=np.int64)   # the worker's, one row set
        self.pending: list = []           # shares not yet handed over (HAND_OVER_AT)
        # Shares handed over (changed under the data-path lock) and finished (the
        # worker's alone): each has one writer at a time, so no lock; equal when idle.
        self.handed = 0
        self.done = 0
        # Held while the worker checks and sends one share: port_gone() takes it, so
        # a share is never sent to a port deleted after the check.
        self.busy = threading.Lock()


class QueueWorkers:
    """Workers for queues 1..N of ``vmq`` on ``switch``; installs itself as the
    switch's delivery offload (``Switch.offload``)."""

    def __init__(self, vmq, switch, batches: int = 8, interval: float = 1.0,
                 wait_s: float = 0.02):
        self.vmq, self.switch, self.interval, self.wait_s = vmq, switch, interval, wait_s
        self.lanes = {q: _Lane(q, switch.max_ports) for q in range(1, vmq.num_queues + 1)}
        self.pool = [switch.new_batch() for _ in range(batches)]
        self.free = collections.deque(self.pool)
        self.holds: dict[int, int] = {}              # id(batch) -> workers holding it
        self.returns: queue.SimpleQueue = queue.SimpleQueue()
        # Rung by a worker giving a batch back while the data-path thread sleeps
        # held back (``sleeping``): its idle wait watches this, not the uplink.
        self.wake_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)
        self.sleeping = False
        self.dry_since: float | None = None     # since when none was free
        self._out = np.zeros((vmq.num_queues + 1, 2, switch.batch_capacity), dtype=np.int64)
        self._counts = np.zeros(vmq.num_queues + 1, dtype=np.int64)
        self._live = np.zeros(vmq.num_queues + 1, dtype=np.int64)
        split_deliveries(self.pool[0].meta, switch._plan.plan, 0, 0, 0, self._live, self._out,
                         self._counts)                                  # compiled now
        self.epoch = 0                              # port_gone() calls so far
        self.gone: dict[int, int] = {}              # port id -> epoch it was deleted in
        self._touched: set[int] = set()             # queues given shares of this batch
        self.stop_event = threading.Event()
        self.dispatcher: int | None = None          # the data-path thread's ident
        self._dispatcher_thread: threading.Thread | None = None
        self._balancer: threading.Thread | None = None
        self._pinned_dispatcher = -1
        switch.offload = self

    # ---- the data-path thread ----------------------------------------------------------
    def _settle(self) -> None:
        """Batches the workers are done with go back to the free ones."""
        while not self.returns.empty():       # the data-path thread alone takes them
            self._release(self.returns.get_nowait())

    def _release(self, b) -> None:
        left = self.holds.get(id(b), 0) - 1
        if left > 0:
            self.holds[id(b)] = left
        else:
            self.holds.pop(id(b), None)
            self.free.append(b)

    def dry(self) -> bool:
        """The workers hold every batch, those they gave back counted (the data-path
        thread, which alone takes and frees batches: no lock needed)."""
        if not self.free:                     # else nothing to settle before take_batch
            self._settle()
        if self.free or not self.lanes or self.stop_event.is_set():
            self.dry_since = None
            return False
        if self.dry_since is None:
            self.dry_since = time.monotonic()
        return True

    def held_back(self) -> bool:
        """After ``dry``: the uplink's frames stay in its ring this pass (less than
        ``wait_s`` since none was free)."""
        return self.dry_since is not None and time.monotonic() - self.dry_since < self.wait_s

    def idle_wait(self) -> tuple[list[int], float | None]:
        """For Switch.run's idle wait while held back: the descriptor to watch
        instead of the uplink's, and when to stop waiting (``wait_s`` is over)."""
        self.sleeping = True
        if not self.returns.empty():          # given back before the flag was seen
            self._ring()
        return [self.wake_fd], (None if self.dry_since is None
                                else self.dry_since + self.wait_s)

    def fds(self) -> list[int]:
        return [self.wake_fd] if self.wake_fd >= 0 else []

    def awake(self) -> None:
        self.sleeping = False
        try:
            os.eventfd_read(self.wake_fd)
        except OSError:                       # not rung (EAGAIN), or closed at stop
            pass

    def take_batch(self):
        """A batch to receive into, or None when the workers have held them all
        for ``wait_s`` (the queues are full)."""
        me = threading.get_ident()
        if me != self.dispatcher and threading.current_thread() is not threading.main_thread():
            self.dispatcher = me              # the data-path thread (not warm()'s caller)
            self._dispatcher_thread = threading.current_thread()
            self._pinned_dispatcher = -1
        if me == self.dispatcher:
            self._pin_dispatcher()
        self._settle()
        if not self.free:
            return None
        b = self.free.popleft()
        self.dry_since = None                  # a dry spell is over, even one dry() saw
        self.holds[id(b)] = 1                  # the data-path thread's own hold
        return b

    def put_batch(self, b) -> None:
        """The data-path thread is done with ``b``; it is free once the workers are.
        A lane that got nothing from it hands over what it has: shares wait only
        while more of their queue's keep coming."""
        if id(b) in self.holds:
            self._release(b)
        for q, lane in self.lanes.items():
            if lane.pending and q not in self._touched:
                self._hand_over(lane)
        self._touched.clear()

    def offload(self, batch, plan, span) -> None:
        """Hand each queue's share of its port's deliveries to the queue's worker
        (the data-path thread, under the data-path lock, after ``finalize``). In a
        batch not from ``take_batch`` (the queues were full) the shares are dropped."""
        vmq = self.vmq
        live = self._live
        live[:] = 0
        stopping = self.stop_event.is_set()
        owned = id(batch) in self.holds
        for q, lane in self.lanes.items():
            # In the switch's own batch (queues full) an idle queue's frames stay
            # in the plan: sent by the data-path thread, after all its earlier ones.
            live[q] = (not stopping and lane.thread is not None and lane.thread.is_alive()
                       and (owned or not self._idle(lane)))
        if not live.any():
            return                                # no workers: the data path sends all
        ports = {int(vmq.q_port[q]) for q in self.lanes if live[q]}
        ctr = self.switch.counters.table
        for pid in ports:
            j0, j1 = int(span[pid, 0]), int(span[pid, 1])
            if j0 == j1:
                continue
            port = self.switch.ports.get(pid)
            kind = port.provider if port is not None else None
            if kind is None or not kind.concurrent:
                continue                          # sent by the data-path thread itself
            span[pid, 1] = split_deliveries(batch.meta, plan, j0, j1, pid, live, self._out,
                                            self._counts)
            for q in np.flatnonzero(self._counts).tolist():
                m = int(self._counts[q])
                lane = self.lanes[q]
                sub = self._out[q, :, :m].copy()
                if not owned:
                    tx_failed_span(ctr, pid, batch.meta, sub, 0, m, R.VMQ_FULL)
                    lane.full_drops += m
                    continue
                self.holds[id(batch)] += 1
                lane.pending.append((batch, sub, pid, kind, self.epoch))
                self._touched.add(q)
                if len(lane.pending) >= HAND_OVER_AT:
                    self._hand_over(lane)

    def _hand_over(self, lane: _Lane) -> None:
        lane.handed += len(lane.pending)
        lane.ready.put(lane.pending)
        lane.pending = []

    def _idle(self, lane: _Lane) -> bool:
        """The lane's worker has no share left to send (the data-path thread)."""
        return not lane.pending and lane.handed == lane.done

    def flush(self) -> None:
        """Hand over what waits for more (a batch is needed back, or a port goes)."""
        for lane in self.lanes.values():
            if lane.pending:
                self._hand_over(lane)

    def port_gone(self, pid: int) -> None:
        """Port ``pid`` is being deleted (under the data-path lock): a share for it
        that a worker is sending now finishes first, and none handed over before
        is sent after, whenever its worker gets to it; they are dropped and counted
        instead. Port ids are reused, so without this a late share could reach the
        VM that gets the id next (A.16: no packets for a deleted port)."""
        self.flush()
        busy = [lane.busy for lane in self.lanes.values()]
        for lk in busy:
            lk.acquire()
        try:
            self.gone[pid] = self.epoch
            self.epoch += 1
        finally:
            for lk in busy:
                lk.release()

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
        threads = [lane.thread for lane in self.lanes.values()] + [self._balancer]
        for t in threads:
            if t is not None:
                t.join(5)
        # Closed only when no worker can ring it: a later write could hit a reused number.
        if self.wake_fd >= 0 and not any(t is not None and t.is_alive() for t in threads):
            fd, self.wake_fd = self.wake_fd, -1
            os.close(fd)

    def _work(self, lane: _Lane) -> None:
        q_cpu = self.vmq.q_cpu
        span = lane.span
        ctr = self.switch.counters.use_private()  # counted beside the data-path thread
        while True:
            item = lane.ready.get()
            if item is None:
                break
            cpu = int(q_cpu[lane.q])
            if cpu != lane.cpu:
                _pin(cpu)
                lane.cpu = cpu
            for batch, sub, pid, kind, epoch in item:
                span[pid, 0], span[pid, 1] = 0, sub.shape[1]
                try:
                    with lane.busy:
                        if epoch <= self.gone.get(pid, -1):     # deleted since: not its
                            tx_failed_span(ctr, pid, batch.meta, sub, 0, sub.shape[1],
                                           R.DEST_NOT_CONNECTED)
                        else:
                            kind.transmit(batch, sub, span)
                except Exception:             # reported, and the queue keeps running
                    log.exception("VMQ queue %d: delivering a batch failed", lane.q)
                finally:
                    span[pid, 1] = 0
                    lane.done += 1
                    self.returns.put(batch)
                    if self.sleeping:
                        self._ring()

    def _ring(self) -> None:
        try:
            os.eventfd_write(self.wake_fd, 1)
        except OSError:
            pass                              # closed at stop

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
            # Only threads alive now: the CPU clock of an ended thread's id is undefined.
            threads = {q: lane.thread.ident for q, lane in self.lanes.items()
                       if lane.thread is not None and lane.thread.is_alive()}
            d = self._dispatcher_thread
            if d is not None and d.is_alive():
                threads[0] = d.ident
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

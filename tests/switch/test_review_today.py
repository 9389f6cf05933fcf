"""A review of 059c4fd..c9d70c5 (the VMQ wait outside the data-path lock, Switch.run's
epoll re-registration, ``hvnet bench feed``), by a helper session. Each test failed
on the code it read:

1. While a queue was behind, the one data-path thread sat in ``wait_free`` for
   ``wait_s`` on every pass, so every other port of the switch waited too (the
   docstrings said otherwise). And the pool is shared by all queues: one stalled
   queue dropped another, idle, queue's frames as VMQ_FULL. Now the uplink's
   frames stay in its ring while the workers hold every batch and the other ports
   go on; after ``wait_s`` only a queue whose worker still has work drops.
2. Switch.run assumed epoll drops a registration when its descriptor closes. It
   does so only when the last descriptor of the file goes (epoll(7), Q6). A
   channel's doorbell eventfd is also the guest's (VmbusServer hands
   ``ch.signal.fd`` to the driver process with OPENCHANNEL_RESULT): after the host
   closed its copy, a guest ringing the old doorbell woke the loop for ever. The
   loop now starts a new epoll set when a descriptor leaves or a number changes file.
3. (``hvnet bench feed`` compared counts, not frames, for misrouting: the test is
   tests/hvnet/test_vmq_feed.py's, on a real veth with a swapped fanout program.)"""
from __future__ import annotations

import os
import threading
import time

from switch import counters as R
from switch.memport import MemoryPorts
from switch.portkind import PortKind
from switch.switch import Switch
from tests.switch.test_vmq_workers import MACS, _frames, _rig, count_polls

OTHER = ["02:00:00:00:1a:01", "02:00:00:00:1b:01"]


class _Timed(MemoryPorts):
    """Memory ports that note when their receive first brings a frame in."""
    got_at: float | None = None

    def receive(self, batch) -> int:
        n = super().receive(batch)
        if n and self.got_at is None:
            self.got_at = time.monotonic()
        return n


def test_a_queue_that_is_behind_holds_up_the_other_ports_of_the_switch():
    """VM A sends to VM B (ports of another kind, no VMQ) while a VMQ queue's worker
    is stalled with every pool batch: the frame should go through (the docstring:
    "a queue that is behind delays no other port"); it waits for ``wait_s`` as the
    data-path thread sits in wait_free, and so on for every pass."""
    sw, mem, rec, up, vms, vmq, w, qs = _rig(batches=2, wait_s=3.0, name="rvhold")
    other = _Timed(in_frames=64, in_bytes=1 << 16, out_frames=64, out_bytes=1 << 16)
    a = sw.add_port("a", "synthetic", mac=OTHER[0], kind=other)
    b = sw.add_port("b", "synthetic", mac=OTHER[1], kind=other)
    rec.gate.clear()
    w.start()
    stop = threading.Event()

    def data_path():
        while not stop.is_set():
            sw.poll()
    t = threading.Thread(target=data_path, name="datapath-rvhold")
    try:
        for k in range(2):
            mem.inject(up, _frames(MACS[0], 10, bytes([65 + k])))
            sw.poll()                       # both pool batches held for queue 1
        t.start()
        assert rec.entered.wait(10)         # the worker is stalled, the data path waits
        time.sleep(0.2)
        t0 = time.monotonic()
        other.inject(a, _frames(OTHER[1], 1, b"O"))
        for _ in range(1000):
            if other.got_at is not None:
                break
            time.sleep(0.01)
        assert other.got_at is not None
        late = other.got_at - t0
    finally:
        stop.set()
        rec.gate.set()
        t.join(20) if t.ident else None
        w.stop()
    assert late < 0.5, (
        f"VM A's frame to VM B (no VMQ queue involved) was received {late:.2f} s after "
        f"it was sent: the data-path thread was in wait_free (wait_s={w.wait_s}) for "
        f"another port's queue")


def test_a_stalled_queue_drops_the_frames_of_another_idle_queue():
    """Queue 1's worker is stalled (a slow VM) with both pool batches; queue 2's
    worker is idle. A batch with frames for queue 2 only: its deliveries are dropped
    and counted VMQ_FULL against queue 2, whose queue is empty (a NIC drops on the
    full queue, not on its neighbours)."""
    sw, mem, rec, up, vms, vmq, w, qs = _rig(queues=2, batches=2, wait_s=0.05,
                                             name="rvidle")
    rec.gated = {vms[0].port_id}            # vm0's worker is slow, vm1's is not
    rec.gate.clear()
    w.start()
    try:
        for k in range(2):
            mem.inject(up, _frames(MACS[0], 10, bytes([65 + k])))
            sw.poll()
        mem.inject(up, _frames(MACS[1], 10, b"Z"))
        sw.poll()                           # frames for queue 2 alone: left in the ring
        time.sleep(0.1)                     # wait_s is over: the queues are full
        sw.poll()
        drops = sw.stats()["ports"]["vm1"]["drops_out"]
        full = w.info()[qs[1]]
        got = [(thread, held) for pid, thread, held, _ in rec.seen
               if pid == vms[1].port_id]
    finally:
        rec.gate.set()
        time.sleep(0.2)
        w.stop()
    assert drops.get(R.BUILTIN_REASONS[R.VMQ_FULL]) is None and full == 0, (
        f"queue 2 (idle worker) had {full} frames dropped as VMQ_FULL because queue 1's "
        f"worker held the shared pool: {drops}")
    # ...and its frames came from the data-path thread, after nothing of its own
    assert len(got) == 10 and all(held and not t.startswith("vmq-") for t, held in got)


class _Doorbells(PortKind):
    """A kind waiting on one port's doorbell eventfd (a VMBus channel's signal)."""

    def __init__(self):
        super().__init__()
        self.doorbells = [os.eventfd(0, os.EFD_NONBLOCK)]

    def fds(self):
        return list(self.doorbells)

    def receive(self, batch):
        for fd in self.doorbells:
            try:
                os.eventfd_read(fd)
            except BlockingIOError:
                pass
        return 0


def _passes(sw, seconds):
    n = count_polls(sw)
    time.sleep(seconds)
    del sw.poll
    return n[0]


def _idle_loop_after_the_guest_rings_its_old_doorbell(reopen: bool) -> int:
    sw = Switch("rvstale" + "r" * reopen, max_ports=4)
    k = sw.add_kind(_Doorbells())
    sw.add_port("p", "synthetic", mac=MACS[0], kind=k)
    host = k.doorbells[0]
    guest = os.dup(host)                  # the guest's copy (SCM_RIGHTS: the same file)
    stop = threading.Event()
    t = threading.Thread(target=sw.run, args=(stop,), kwargs={"idle_wait_s": 60.0})
    t.start()
    try:
        time.sleep(0.3)                   # asleep in epoll on the doorbell
        assert _passes(sw, 0.3) < 5
        k.doorbells = []                  # CLOSECHANNEL: the host's copy goes
        os.close(host)
        if reopen:                        # OPENCHANNEL: a new doorbell, the same number
            new = os.eventfd(0, os.EFD_NONBLOCK)
            assert new == host
            k.doorbells = [new]
        kick = os.eventfd(0, os.EFD_NONBLOCK)
        k.doorbells.append(kick)          # a pass of the loop sees the new set
        os.eventfd_write(kick, 1)
        time.sleep(0.3)
        os.eventfd_write(guest, 1)        # the guest rings the doorbell it still has
        return _passes(sw, 0.5)
    finally:
        stop.set()
        for _ in range(100):
            t.join(0.1)
            if not t.is_alive():
                break
            if k.doorbells:
                os.eventfd_write(k.doorbells[-1], 1)
        for fd in k.doorbells + [guest]:
            os.close(fd)


def test_the_idle_loop_sleeps_after_a_closed_doorbell_the_guest_still_holds_rings():
    n = _idle_loop_after_the_guest_rings_its_old_doorbell(reopen=False)
    assert n < 50, (f"{n} passes of the data-path loop in 0.5 s with nothing to do: epoll "
                    f"still watches the guest's copy of the closed doorbell")


def test_the_idle_loop_sleeps_after_a_reused_doorbell_numbers_old_file_rings():
    n = _idle_loop_after_the_guest_rings_its_old_doorbell(reopen=True)
    assert n < 50, (f"{n} passes of the data-path loop in 0.5 s with nothing to do: epoll "
                    f"still watches the old file of the reused descriptor number")

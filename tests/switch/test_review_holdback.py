"""A review of f279642 (VMQ: full queues leave the uplink's frames in its ring), by a
helper session. The test failed on the code it read (0a271bf); take_batch now ends
the dry spell.

``QueueWorkers.dry_since`` (when the pool last ran out) is cleared only by ``dry()``
seeing a free batch. Switch.poll calls ``dry()``, then takes the data-path lock to
``flush()``, then ``take_batch()``, which settles the workers' returns again. A batch
given back in between (while a control operation holds the lock: ``delete_port``'s
``port_gone`` holds it *waiting for a worker's transmit to end*, and a waiting
control operation gets the lock at ``DataPathLock.hand_over`` right after the kind
polled before the uplink, i.e. just before its ``dry()``) is taken by
``take_batch`` and ``dry_since`` keeps the time the *previous* episode began. The
next time the pool runs dry, ``held_back()`` measures from that old time: wait_s is
"over" at once, the uplink's frames are received into the switch's own batch and a
busy queue's are dropped as VMQ_FULL instead of staying in the ring for wait_s."""
from __future__ import annotations

import threading
import time

from switch import counters as R
from tests.switch.test_vmq_workers import MACS, _frames, _rig


def test_a_new_dry_spell_after_a_batch_came_back_under_the_lock_holds_back_for_wait_s():
    sw, mem, rec, up, vms, vmq, w, qs = _rig(batches=1, wait_s=0.5, name="rvhb")
    rec.gate.clear()                          # queue 1's worker stalls in its transmit
    w.start()
    try:
        mem.inject(up, _frames(MACS[0], 10, b"A"))
        sw.poll()                             # the one pool batch: A, a share pending
        sw.poll()                             # dry: A's share handed over, held back
        assert rec.entered.wait(10)
        time.sleep(0.6)                       # this dry spell outlasts wait_s

        # A control operation holds the data-path lock while the worker finishes A
        # (port_gone does exactly this: it waits under the lock for the transmit).
        locked, done = threading.Event(), threading.Event()

        def control():
            with sw._dp_lock:
                locked.set()
                time.sleep(0.3)               # the data path: past dry(), at the lock
                rec.gate.set()
                while w.returns.empty():      # A's batch given back
                    time.sleep(0.001)
                rec.gate.clear()              # the worker's next transmit stalls again
                rec.entered.clear()
            done.set()
        t = threading.Thread(target=control)
        t.start()
        assert locked.wait(10)
        mem.inject(up, _frames(MACS[0], 10, b"B"))
        # (The uplink's kind alone: in the rig the VM kind comes first and would wait at
        # the lock before dry(); in the data-path loop a control operation waiting for
        # the lock takes it at the hand-over after the kind before the uplink.)
        assert sw.poll(mem) == 10             # B received into the batch that came back
        t.join(10)
        assert done.is_set() and sw.held_back == []

        # A new dry spell begins now: B's batch is with the (stalled) worker again.
        mem.inject(up, _frames(MACS[0], 10, b"C"))
        sw.poll()
        assert rec.entered.wait(10)           # B's share is with the worker
        pending, held = mem.pending(), list(sw.held_back)
        drops = dict(sw.stats()["ports"]["vm0"]["drops_out"])
        since = time.monotonic() - w.dry_since if w.dry_since is not None else None
    finally:
        rec.gate.set()
        time.sleep(0.2)
        w.stop()
    assert pending == 10 and held == [mem] and not drops, (
        f"the pool ran dry {0 if since is None else since:.2f} s ago by dry_since, which "
        f"kept the start of the previous dry spell: C was not held back for wait_s "
        f"({w.wait_s}) but received at once and dropped (ring: {pending} left, "
        f"held back: {held}, vm0 drops: {drops})")
    assert R.BUILTIN_REASONS[R.VMQ_FULL] not in drops

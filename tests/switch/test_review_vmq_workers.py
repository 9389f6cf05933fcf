"""A hostile second read of the VMQ workers' delivery hand-over (switch/vmq_workers.py,
Switch.poll/_deliver/delete_port, netvsp/synthetic_port.py as a concurrent kind),
by a helper session. Each test failed on the code it read (4f60729):

1. a queue's lone share waited in its lane for as long as the uplink stayed busy;
2. the data path's idle wait iterated SyntheticPorts.devices while blocked on a
   device's lock a worker held, and died when a VM was added meanwhile; the same
   window let a descriptor close before Switch.run registered it (last test).

Its second finding (a port deleted after drain() timed out, its id reused) is
tested in test_vmq_workers.py: deletion now waits for the share in progress and
drops the ones not started, so there is no timeout left to test."""
from __future__ import annotations

import threading
import time

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp.netvsp import NetvspDevice
from netvsp.synthetic_port import SyntheticPorts
from netvsp.vmbus.server import VmbusServer
from switch.memport import MemoryPorts
from switch.port import mac_to_int
from switch.portkind import PortKind
from switch.switch import Switch
from switch.vmq import Vmq
from switch.vmq_workers import QueueWorkers
from tests.switch.test_vmq_workers import MACS, _frames, _Recording


def _queue(vmq, port, mac):
    q = vmq.allocate(port.port_id, cpu=vmq.cpus[0])
    vmq.set_filter(q, mac_to_int(mac))
    vmq.complete(q)
    return q


# ---------------------------------------------------------------------------------------
# 1. A share waits in lane.pending for as long as the uplink's ring never runs dry and
#    the pool never empties: no time bound on the hand-over.

def test_a_lone_share_is_not_held_back_for_as_long_as_the_uplink_stays_busy():
    """VM A's queue gets a steady stream, VM B's queue one frame (a SYN-ACK, an ARP
    reply to its MAC...). B's share sits in ``lane.pending`` until HAND_OVER_AT (4)
    shares of B's queue gather, the uplink's ring runs dry, or no pool batch is free.
    While A's worker keeps up (it returns batches between receives) none of these
    happen: B's frame is not delivered for as long as the stream lasts."""
    sw = Switch("rvstarve", max_ports=8)
    mem = MemoryPorts(in_frames=32768, in_bytes=1 << 23, out_frames=1024, out_bytes=1 << 20)
    rec = sw.add_kind(_Recording())
    up = sw.add_port("uplink", "external", kind=mem)
    vms = [sw.add_port(f"vm{k}", "synthetic", mac=m, kind=rec) for k, m in enumerate(MACS[:2])]
    vmq = Vmq(2, port_id=up.port_id, cpus=[0])
    w = QueueWorkers(vmq, sw, batches=8, interval=0.2, wait_s=0.05)
    mem.steer = vmq.steer
    for p, m in zip(vms, MACS):
        _queue(vmq, p, m)
    a = _frames(MACS[0], 256, b"A")
    assert mem.inject(up, _frames(MACS[1], 1, b"B") + a * 60) == 1 + 256 * 60
    w.start()
    polls = 0
    t0 = time.monotonic()
    try:
        while polls < 50 and not rec.frames(vms[1]):
            sw.poll()                        # one 256-frame receive of the busy uplink
            polls += 1
            time.sleep(0.005)                # A's worker keeps up with the data path
        busy = mem.pending()
        waited = time.monotonic() - t0
    finally:
        w.stop()
    assert busy > 0                          # the uplink's ring never ran dry meanwhile
    assert polls <= 3, polls                 # B's share went with the next batch
    assert rec.frames(vms[1]), (
        f"VM B's frame (received in the first batch) was not delivered after {polls} "
        f"receives / {waited:.2f} s: its share waits in lane.pending until the ring "
        f"runs dry (pending={[len(l.pending) for l in w.lanes.values()]}, "
        f"free={len(w.free)}/{len(w.pool)})")


def _device(mac: str, name: str):
    ram = GuestMemory(1 << 20)
    host_port, guest_port = MessagePort.pair()
    server = VmbusServer(host_port, ram)
    dev = NetvspDevice(ram, server, mac_to_int(mac))
    dev.test_name = name
    dev._keep = (ram, host_port, guest_port)
    return dev


# ---------------------------------------------------------------------------------------
# 2. SyntheticPorts.fds() iterates self.devices outside the data-path lock and blocks
#    inside it on a device's lock, which a queue worker now holds for every transmit.

def test_the_data_paths_idle_wait_survives_a_vm_added_while_a_worker_sends():
    """Switch.run, after a pass that moved nothing (right after a flush handed
    shares to the workers), calls every kind's fds() without the data-path lock.
    SyntheticPorts.fds iterates ``self.devices`` and calls NetvspDevice.fds, which
    takes the device's lock, held by a queue worker copying into that VM. Meanwhile
    the control path (Runtime.add_vm, under the data-path lock) attaches a new
    device: the iteration resumes over a dict that changed size and raises
    RuntimeError, which ends the data-path thread (Runtime._loop records 'data path
    stopped')."""
    sw = Switch("rvfds", max_ports=8)
    syn = sw.add_kind(SyntheticPorts())
    dev_a, dev_b = _device(MACS[0], "A"), _device(MACS[1], "B")
    vm_a = sw.add_port("a.eth0", "synthetic", mac=MACS[0], kind=syn)
    syn.attach(vm_a, dev_a)
    in_transmit, release = threading.Event(), threading.Event()

    def worker():                        # a queue worker inside SyntheticPorts.transmit
        with dev_a.lock:
            in_transmit.set()
            release.wait(10)
    tw = threading.Thread(target=worker, name="vmq-rvfds-q1")
    tw.start()
    assert in_transmit.wait(5)
    result: dict = {}

    def idle_wait():                     # Switch.run: per_kind = [k.fds() for k in kinds]
        try:
            result["fds"] = [k.fds() for k in sw.kinds]
        except Exception as e:           # noqa: BLE001
            result["error"] = e
    td = threading.Thread(target=idle_wait, name="datapath-rvfds")
    td.start()
    time.sleep(0.2)
    assert td.is_alive()                 # waiting for A's lock, inside the iteration
    with sw._dp_lock:                    # Runtime.add_vm -> PartitionNic.attach
        vm_b = sw.add_port("b.eth0", "synthetic", mac=MACS[1], kind=syn)
        syn.attach(vm_b, dev_b)
    release.set()
    td.join(5)
    tw.join(5)
    assert "error" not in result, f"the data path's idle wait raised {result['error']!r}"


def test_the_data_path_loop_survives_a_descriptor_closed_before_it_is_waited_on():
    """Switch.run lists every kind's descriptors outside the data-path lock, so one
    may be closed (a VM removed) before the loop registers it with epoll; that
    descriptor is left for the next pass instead of ending the data path."""
    class _Closed(PortKind):
        def fds(self):
            return [999_999, -1]               # EBADF, and a negative number
    sw = Switch("rvrun", max_ports=4)
    k = sw.add_kind(_Closed())
    sw.add_port("p", "synthetic", mac=MACS[0], kind=k)
    stop, errors = threading.Event(), []

    def run():
        try:
            sw.run(stop, idle_wait_s=0.01)
        except Exception as e:                 # noqa: BLE001
            errors.append(e)
    t = threading.Thread(target=run)
    t.start()
    time.sleep(0.2)
    stop.set()
    t.join(5)
    assert not t.is_alive() and not errors, errors

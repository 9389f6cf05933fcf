"""The software SR-IOV NIC end to end in one process: two guests' VF drivers
(ixgbevf's bring-up and compiled ring loops) drive two VFs served over vfio-user on
real socket pairs; frames cross from one VF to the other inside the NIC, with the
receiver's interrupt; spoofed ones do not; unknown and broadcast destinations reach
the wire and the PF; a guest that unmaps its memory is not read any more."""
from __future__ import annotations

import os
import select

import numpy as np
import pytest
from scapy.all import IP, UDP, Ether, raw

from sriov.eswitch import C_SPOOF, vf_function
from sriov.ixgbevf import VfPolicy
from sriov.ixgbevf_rings import S_RX_NO_DESC
from sriov.nic import SriovNic
from switch.batch import PacketBatch

from .vfguest import vf_guest

MAC0, MAC1 = bytes.fromhex("02000000a000"), bytes.fromhex("02000000a001")


def frame(src, dst, k, size=200):
    f = raw(Ether(src=src, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") /
            UDP(sport=k, dport=9))
    return f + bytes(size - len(f))


@pytest.fixture
def nic():
    n = SriovNic(2, [VfPolicy(MAC0), VfPolicy(MAC1)])
    for k, mac in enumerate((MAC0, MAC1)):
        v = n.eswitch.create_vport(vf=k)
        n.eswitch.set_filter(v, int.from_bytes(mac, "big"))
    guests = [vf_guest(n, k) for k in range(2)]
    wire, pf = [], []
    n.to_wire = lambda b, idx: wire.extend(b.frame(int(i)) for i in idx)
    n.to_pf = lambda b, idx: pf.extend(b.frame(int(i)) for i in idx)
    yield n, guests, wire, pf
    for cl, ram, drv in guests:
        drv.close()
        cl.close()
    n.close()
    for cl, ram, drv in guests:
        ram.close()


def _batch(frames):
    b = PacketBatch(256, 1 << 20)
    b.append_frames(frames, src_port=0)
    return b


def test_two_guests_talk_through_their_vfs_inside_the_nic(nic):
    n, guests, wire, pf = nic
    d0, d1 = guests[0][2], guests[1][2]
    assert d0.bring_up() == MAC0 and d1.bring_up() == MAC1
    src, dst = MAC0.hex(":"), MAC1.hex(":")
    frames = [frame(src, dst, k, 60 + k * 7) for k in range(200)]
    assert d0.send(_batch(frames)) == 200
    assert os.eventfd_read(n.vfs[0].doorbell) == 1              # TDT's ioeventfd rang
    assert n.poll() == 200
    assert select.select([d1.irq], [], [], 5)[0]                # VF 1's MSI-X
    got = PacketBatch(256, 1 << 20)
    assert d1.receive(got) == 200 and got.frames() == frames
    assert wire == [] and pf == []
    # Descriptors go round: more than the ring holds, in several goes.
    more = [frame(src, dst, k) for k in range(600)]
    sent, recv = 0, []
    while len(recv) < 600:
        if sent < 600:
            sent += d0.send(_batch(more[sent:sent + 100]))
        n.poll()
        d1.receive(got)
        recv += got.frames()
    assert recv == more


def test_spoofed_unknown_and_broadcast_frames(nic):
    n, guests, wire, pf = nic
    d0, d1 = guests[0][2], guests[1][2]
    d0.bring_up()
    d1.bring_up()
    src, other = MAC0.hex(":"), "02:00:00:00:00:99"
    spoof = frame(other, MAC1.hex(":"), 1)
    unknown = frame(src, other, 2)
    bcast = frame(src, "ff:ff:ff:ff:ff:ff", 3)
    d0.send(_batch([spoof, unknown, bcast]))
    n.poll()
    got = PacketBatch(256, 1 << 20)
    d1.receive(got)
    assert got.frames() == [bcast]
    assert wire == [unknown, bcast] and pf == [bcast]
    assert n.eswitch.counters[vf_function(0), C_SPOOF] == 1      # VF 0's spoof drop


def test_from_the_wire_by_filter_and_a_guest_that_unmapped_its_memory(nic):
    n, guests, wire, pf = nic
    cl0, ram0, d0 = guests[0]
    d0.bring_up()
    f = frame("02:00:00:00:00:99", MAC0.hex(":"), 5)
    n.from_wire(_batch([f, frame("02:00:00:00:00:99", "02:00:00:00:00:98", 6)]))
    got = PacketBatch(256, 1 << 20)
    assert d0.receive(got) == 1 and got.frames() == [f]
    assert len(pf) == 1                                          # the default VPort's
    cl0.dma_unmap(0, ram0.size)
    d0.send(_batch([frame(MAC0.hex(":"), MAC1.hex(":"), 7)]))
    assert n.poll() == 0                                         # nothing read any more
    n.from_wire(_batch([f]))
    assert n.stats[0, S_RX_NO_DESC] >= 1                         # not written either


def test_a_removed_guest_keeps_no_hold_on_the_vf_it_had(nic):
    """A guest may keep its mapping of the queue registers (or a copy of the fd)
    past the VF's removal; once the VF is freed (and may go to another VM) what it
    writes there reaches no engine, and the old doorbell is not the new one."""
    n, guests, wire, pf = nic
    cl, ram, drv = guests[0]
    assert drv.bring_up() == MAC0
    old_q, old_bell = drv.q, n.vfs[0].doorbell
    n.unserve(0)
    old_q[:] = 0xFFFFFFFF                     # the old owner scribbles on every register
    assert not n.vfs[0].q.any(), "the freed VF's registers changed under the old mapping"
    assert n.vfs[0].doorbell != old_bell
    # a new owner brings it up and uses it as usual
    cl2, ram2, drv2 = vf_guest(n, 0)
    try:
        assert drv2.bring_up() == MAC0 and guests[1][2].bring_up() == MAC1
        old_q[:] = 0xFFFFFFFF                 # and again while it runs
        frames = [frame(MAC0.hex(":"), MAC1.hex(":"), k) for k in range(10)]
        assert drv2.send(_batch(frames)) == 10
        assert n.poll() == 10
        got = PacketBatch(256, 1 << 20)
        assert guests[1][2].receive(got) == 10 and got.frames() == frames
    finally:
        drv2.close()
        cl2.close()
        ram2.close()

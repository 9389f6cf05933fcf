"""An SR-IOV NIC as a switch's uplink, on a real veth in a namespace the test makes:
the NIC's embedded switch between the wire, the PF (the switch's external port) and
a VF driven by a guest's VF driver over vfio-user. Frames for the VF never enter
the switch; frames between the VF and a synthetic VM go through the PF and the
switch, as in Hyper-V; the VF reaches the wire directly."""
from __future__ import annotations

import os
import socket
import time

import pytest
from scapy.all import IP, UDP, Dot1Q, Ether, raw

from sriov.eswitch import DEFAULT_VPORT
from sriov.ixgbevf import VfPolicy
from sriov.nic import SriovNic
from sriov.uplink import SriovUplinkPorts
from switch.afpacket import RingSocket
from switch.batch import PacketBatch
from switch.memport import MemoryPorts
from switch.switch import Switch
from tests.hvnet.nsutil import in_ns

from .vfguest import vf_guest

pytestmark = [pytest.mark.netns,
              pytest.mark.skipif(os.geteuid() != 0, reason="needs root for a namespace")]

VF_MAC, VM_MAC, HOST_MAC = (bytes.fromhex("02000000aa01"), "02:00:00:00:bb:01",
                            "02:00:00:00:cc:01")


def frame(src, dst, k):
    f = raw(Ether(src=src, dst=dst) / IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=k))
    return f + bytes(120 - len(f))


@pytest.fixture
def rig(tmp_path):
    from hvnet.netns import Netns
    nn = Netns(f"s{os.getpid() % 10000}", tmp_path / "netns.json")
    guest = None
    try:
        ns = nn.add_namespace("t")
        nn.add_veth((ns, "up"), (ns, "wire"))
        for i in ("up", "wire"):
            nn.set_up(ns, i)
        nic = SriovNic(1, [VfPolicy(VF_MAC)])
        v = nic.eswitch.create_vport(vf=0)
        nic.eswitch.set_filter(v, int.from_bytes(VF_MAC, "big"))
        nic.eswitch.set_filter(DEFAULT_VPORT, int(VM_MAC.replace(":", ""), 16))
        sw = Switch("sriov")
        kind = sw.add_kind(SriovUplinkPorts(nic))
        mem = sw.add_kind(MemoryPorts())
        up = sw.add_port("uplink", "external", kind=kind)
        kind.attach(up, in_ns(ns, lambda: RingSocket("up", offloads=False)))
        vm = sw.add_port("vm", "synthetic", mac=VM_MAC, kind=mem)
        peer = in_ns(ns, lambda: socket.socket(socket.AF_PACKET, socket.SOCK_RAW,
                                               socket.htons(3)))
        peer.bind(("wire", 3))
        peer.settimeout(0.05)
        guest = vf_guest(nic, 0)
        cl, ram, drv = guest
        drv.bring_up()
        yield sw, mem, vm, drv, peer
    finally:
        if guest:
            guest[2].close()
            guest[0].close()
        try:
            sw.close()
        except Exception:
            pass
        nic.close()
        if guest:
            guest[1].close()
        nn.teardown()


def _poll_until(sw, pred, what, timeout=5.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        sw.poll()
        if pred():
            return
        time.sleep(0.001)
    raise AssertionError(f"timed out: {what}")


def _vf_frames(drv, got, seen) -> int:
    """The VF's unicast frames (the veth peer's stack multicasts too, which a VF
    receives by flooding)."""
    drv.receive(got)
    seen.extend(f for f in got.frames() if f[:6] == VF_MAC)
    return len(seen)


def _vm_frames(mem, vm, out) -> int:
    """The VM's unicast frames (the peer's stack multicasts, which the switch floods)."""
    out.extend(f for f in mem.collect(vm) if f[:6] == bytes.fromhex(VM_MAC.replace(":", "")))
    return len(out)


def _peer_frames(peer, tag):
    out = []
    while True:
        try:
            f = peer.recv(2048)
        except socket.timeout:
            return out
        if tag in f:
            out.append(f)


def test_the_nic_switches_between_wire_vf_and_pf(rig):
    sw, mem, vm, drv, peer = rig
    got = PacketBatch(256, 1 << 20)
    # wire -> VF: straight into the VF's ring, never through the switch
    to_vf = [frame(HOST_MAC, VF_MAC.hex(":"), k) for k in range(20)]
    for f in to_vf:
        peer.send(f)
    seen = []
    _poll_until(sw, lambda: _vf_frames(drv, got, seen) >= 20, "frames for the VF")
    assert seen == to_vf
    assert not [f for f in mem.collect(vm) if f[:6] == VF_MAC]   # none through the switch
    # wire -> synthetic VM: the default VPort, the PF, the switch
    to_vm = frame(HOST_MAC, VM_MAC, 99)
    peer.send(to_vm)
    out = []
    _poll_until(sw, lambda: _vm_frames(mem, vm, out) >= 1, "the VM's frame")
    assert out == [to_vm]
    # VF -> wire, directly
    b = PacketBatch(8, 1 << 16)
    b.append_frames([frame(VF_MAC.hex(":"), HOST_MAC, 7)], src_port=0)
    drv.send(b)
    sw.poll()
    assert frame(VF_MAC.hex(":"), HOST_MAC, 7) in _peer_frames(peer, VF_MAC)
    # VF -> synthetic VM: through the PF into the switch
    b.reset()
    b.append_frames([frame(VF_MAC.hex(":"), VM_MAC, 8)], src_port=0)
    drv.send(b)
    out = []
    _poll_until(sw, lambda: _vm_frames(mem, vm, out) >= 1, "VF to VM")
    assert out == [frame(VF_MAC.hex(":"), VM_MAC, 8)]
    # synthetic VM -> VF: the switch delivers to the external port, the PF sends,
    # the embedded switch hands it to the VF
    back = frame(VM_MAC, VF_MAC.hex(":"), 9)
    mem.inject(vm, [back])
    seen = []
    _poll_until(sw, lambda: _vf_frames(drv, got, seen) >= 1, "VM to VF")
    assert seen == [back]


def test_a_tag_the_switch_puts_on_a_frame_for_the_wire_reaches_the_wire(rig):
    """The switch tags a frame from an access-VLAN port on the way to a trunk uplink
    (D_TAGGED in its delivery): through the PF and the embedded switch the frame
    reaches the wire with that tag; a frame of the trunk's native VLAN untagged."""
    from switch.properties import VlanProperty
    from tests.switch.test_afpacket import PACKET_AUXDATA, SOL_PACKET, peer_receive
    sw, mem, vm, drv, peer = rig
    up = sw._port("uplink")
    peer.setsockopt(SOL_PACKET, PACKET_AUXDATA, 1)
    sw.add_port_property(up, VlanProperty("trunk", native_vlan=0, allowed=(10,)))
    sw.add_port_property(vm, VlanProperty("access", access_vlan=10))
    vm_mac = bytes.fromhex(VM_MAC.replace(":", ""))
    sent = [frame(VM_MAC, HOST_MAC, 200 + k) for k in range(3)]
    mem.inject(vm, sent)
    for _ in range(20):
        sw.poll()
    got = peer_receive(peer, 3, keep=lambda f: f[6:12] == vm_mac)
    assert len(got) == 3
    for f, s in zip(got, sent):
        assert Ether(f)[Dot1Q].vlan == 10
        assert f[:12] + f[16:] == s                  # the tag inserted, the rest intact
    sw.update_port_property(vm, VlanProperty("access", access_vlan=0))
    mem.inject(vm, sent[:1])
    for _ in range(20):
        sw.poll()
    [f] = peer_receive(peer, 1, keep=lambda f: f[6:12] == vm_mac)
    assert f == sent[0]                              # the native VLAN: untagged

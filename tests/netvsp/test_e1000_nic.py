"""The emulated e1000 NIC whole, in one process: the guest driver (Linux's e1000
bring-up and data path, through intercepts, guest RAM and an interrupt eventfd)
against the device model as a switch port, a memory port as its peer. A datagram
socket stands in for the guest's tap (one frame per read or write, the virtio
header first), so no namespace is needed."""
from __future__ import annotations

import socket
import threading
import time

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

from hypervisor import intercept as I
from hypervisor.partition import Doorbell, GuestMemory
from netvsp.e1000 import regs as E
from netvsp.e1000.driver import RX_DESCS, SYNC, E1000Guest
from netvsp.e1000.port import E1000Nic, EmulatedPorts
from switch.memport import MemoryPorts
from switch.switch import Switch

VM_MAC, PEER_MAC = "02:00:00:e1:00:01", "02:00:00:e1:00:02"


class Rig:
    def __init__(self):
        self.ram = GuestMemory(32 << 20)
        host_io, guest_io = I.pair()
        self.irq = Doorbell()
        self.nic = E1000Nic(self.ram.mem, bytes.fromhex(VM_MAC.replace(":", "")), host_io,
                            self.irq)
        self.sw = Switch("e1k")
        self.kind = self.sw.add_kind(EmulatedPorts())
        self.mem = self.sw.add_kind(MemoryPorts())
        self.vm_port = self.sw.add_port("vm.eth0", "emulated", mac=VM_MAC, kind=self.kind)
        self.kind.attach(self.vm_port, self.nic)
        self.peer = self.sw.add_port("peer", "synthetic", mac=PEER_MAC, kind=self.mem)
        self.got = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()
        self.tap, self.tap_guest = socket.socketpair(socket.AF_UNIX, socket.SOCK_DGRAM)
        for s in (self.tap, self.tap_guest):
            s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.tap_guest.setblocking(False)
        self.guest = E1000Guest(self.ram, I.InterceptClient(guest_io, SYNC, timeout=20),
                                self.irq.fd, self.tap_guest.fileno())
        self.guest.warm()

    def loop(self):
        while not self.stop.is_set():
            with self.lock:
                self.sw.poll()
                self.got += self.mem.collect(self.peer)
            time.sleep(0.0002)

    def close(self):
        self.stop.set()
        self.t.join(5)
        for s in (self.tap, self.tap_guest, self.guest.io.sock):
            s.close()


@pytest.fixture
def rig():
    r = Rig()
    try:
        yield r
    finally:
        r.close()


def vnet(flags=0, gso=0, hdr_len=0, gso_size=0, cs=0, co=0) -> bytes:
    return bytes([flags, gso]) + b"".join(v.to_bytes(2, "little")
                                          for v in (hdr_len, gso_size, cs, co))


def wait(pred, what, t=20):
    end = time.monotonic() + t
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_bring_up_as_linux_e1000_does(rig):
    mac = rig.guest.bring_up()
    assert mac == bytes.fromhex(VM_MAC.replace(":", "")) and rig.guest.link
    d = rig.nic.dev
    assert d.resets == 2                                   # power-on, then CTRL.RST by I/O
    assert rig.nic.pci.bus_master()
    assert d[E.RCTL] & E.RCTL_EN and d[E.TCTL] & E.TCTL_EN
    assert d[E.IMS] == E.IMS_ENABLE_MASK and d[E.RDT] == RX_DESCS - 1
    assert rig.nic.server.malformed == 0 and d.bad_accesses == 0
    # EECD writes are synchronous (R1), so the Microwire read of 64 words costs
    # thousands of exits; the table clears (VFTA, RA, MTA) go posted, in batches
    assert rig.nic.server.accesses > rig.nic.server.exits + 250


def test_frames_both_ways_with_checksum_offload_and_tso(rig):
    g = rig.guest
    g.bring_up()
    # guest -> peer: a plain frame, a partial checksum, a TSO super-packet
    plain = raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP(src="10.0.0.1", dst="10.0.0.2")
                / UDP(sport=1, dport=2) / bytes(200))
    part = bytearray(raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP(src="10.0.0.1", dst="10.0.0.2")
                         / TCP(sport=3, dport=4) / bytes(300)))
    ps = sum(int.from_bytes(part[k:k + 2], "big") for k in range(26, 34, 2)) + 6 + len(part) - 34
    while ps > 0xFFFF:
        ps = (ps & 0xFFFF) + (ps >> 16)
    part[50:52] = ps.to_bytes(2, "big")
    payload = bytes((k * 5) & 0xFF for k in range(9000))
    big = bytearray(raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP(src="10.0.0.1", dst="10.0.0.2")
                        / TCP(sport=5, dport=6, flags="PA") / payload))
    ps = sum(int.from_bytes(big[k:k + 2], "big") for k in range(26, 34, 2)) + 6 + len(big) - 34
    while ps > 0xFFFF:
        ps = (ps & 0xFFFF) + (ps >> 16)
    big[50:52] = ps.to_bytes(2, "big")
    rig.tap.send(vnet() + plain)
    rig.tap.send(vnet(1, 0, 0, 0, 34, 16) + bytes(part))
    rig.tap.send(vnet(1, 1, 54, 1448, 34, 16) + bytes(big))
    while g.transmit():
        pass
    wait(lambda: len(rig.got) >= 3, "three frames at the peer")
    assert rig.got[0] == plain
    # a memory port takes frames as they lie: the partial checksum and the
    # super-packet cross whole, for the destination's port kind to finish or cut
    assert rig.got[1] == bytes(part) and rig.got[2] == bytes(big)
    # peer -> guest: frames in the receive ring, out through the guest's "tap"
    frames = [raw(Ether(src=PEER_MAC, dst=VM_MAC) / IP(src="10.0.0.2", dst="10.0.0.1")
                  / UDP(sport=7, dport=8) / bytes(k * 100)) for k in range(1, 6)]
    with rig.lock:
        rig.mem.inject(rig.peer, frames)
    out = []

    def guest_side():
        import select
        if select.select([rig.irq.fd], [], [], 0.05)[0]:
            import os
            os.eventfd_read(rig.irq.fd)
            g.interrupt()
        while True:
            try:
                out.append(rig.tap.recv(1 << 17))
            except BlockingIOError:
                break
        return len(out) >= 5
    rig.tap.setblocking(False)
    wait(guest_side, "five frames at the guest")
    assert [o[10:] for o in out] == [f if len(f) >= 60 else f + bytes(60 - len(f))
                                     for f in frames]
    info = rig.nic.info()
    assert info["interrupts"] >= 1 and info["rx"]["frames"] == 5 and info["tx"]["frames"] == 3


def test_a_hostile_guest_register_storm_leaves_the_host_serving(rig):
    """Random register accesses (and writes to every ring register) from the guest:
    the model refuses what is not a register, the engines refuse what lies
    outside guest RAM, and the switch keeps serving the other port."""
    g = rig.guest
    g.bring_up()
    rng = np.random.default_rng(3)
    for _ in range(3000):
        off = int(rng.integers(0, E.MMIO_SIZE + 64)) & ~3
        g.io.write(I.MMIO, off, int(rng.integers(0, 1 << 32)))
    for reg in (E.TDBAL, E.TDBAH, E.TDLEN, E.TDH, E.TDT, E.RDBAL, E.RDBAH, E.RDLEN, E.RDH,
                E.RDT):
        g.io.write(I.MMIO, reg, int(rng.integers(0, 1 << 32)))
    g.io.flush()
    with rig.lock:
        rig.mem.inject(rig.peer, [raw(Ether(src=PEER_MAC, dst="ff:ff:ff:ff:ff:ff") / IP()
                                      / UDP() / bytes(100))] * 20)
    time.sleep(0.3)
    with rig.lock:
        st = rig.sw.stats()
    assert st["ports"]["peer"]["rx_packets"] == 20        # the switch kept serving
    assert rig.nic.server.malformed == 0


def _to_guest(rig, frames, want):
    """Frames from the peer through the device to the guest's 'tap'; the writes."""
    import os
    import select
    with rig.lock:
        rig.mem.inject(rig.peer, frames)
    out = []
    rig.tap.setblocking(False)

    def guest_side():
        if select.select([rig.irq.fd], [], [], 0.05)[0]:
            os.eventfd_read(rig.irq.fd)
            rig.guest.interrupt()
        while True:
            try:
                out.append(rig.tap.recv(1 << 17))
            except BlockingIOError:
                break
        return len(out) >= want
    wait(guest_side, f"{want} writes at the guest's tap")
    return out


def segs(seqs, payload=1000, sport=80):
    return [raw(Ether(src=PEER_MAC, dst=VM_MAC) / IP(src="10.0.0.2", dst="10.0.0.1")
                / TCP(sport=sport, dport=5000, seq=s, ack=1, flags="A", window=500)
                / (bytes([s & 0xFF]) * payload)) for s in seqs]


def test_in_order_tcp_segments_reach_the_tap_coalesced(rig):
    """napi_gro_receive's effect: eight in-order segments of one flow become one
    GSO TCPv4 packet (IP length and checksum of the whole, the TCP sum partial
    over the pseudo-header); a segment out of order, or of another flow, is not
    joined to it."""
    rig.guest.bring_up()
    seqs = [1000 + 1000 * k for k in range(8)]
    out = _to_guest(rig, segs(seqs), 1)
    assert len(out) == 1
    h, f = out[0][:10], out[0][10:]
    assert h[0] == 1 and h[1] == 1                             # NEEDS_CSUM, GSO TCPv4
    assert int.from_bytes(h[4:6], "little") == 1000             # gso_size: the MSS seen
    assert (int.from_bytes(h[6:8], "little"), int.from_bytes(h[8:10], "little")) == (34, 16)
    p = Ether(f)
    assert p[IP].len == len(f) - 14 and p[TCP].seq == 1000
    assert bytes(p[TCP].payload) == b"".join(bytes([s & 0xFF]) * 1000 for s in seqs)
    ipc = p[IP].chksum
    del p[IP].chksum
    assert Ether(raw(p))[IP].chksum == ipc
    # a gap and a different flow: written apart
    out = _to_guest(rig, segs([20000, 22000]) + segs([21000], sport=81), 3)
    assert len(out) == 3 and all(o[1] == 0 for o in out)


@pytest.mark.parametrize("regs,causes,want", [
    ({}, E.ICR_RXT0, 0.0),                                  # nothing set: no mitigation
    ({E.ITR: 195}, E.ICR_RXT0, 500 * 256e-9),               # ITR under the floor
    ({E.ITR: 4000}, E.ICR_RXT0, 4000 * 256e-9),
    ({E.ITR: 4000, E.RDTR: 1, E.RADV: 200}, E.ICR_RXT0, 800 * 256e-9),
    ({E.ITR: 4000, E.RADV: 200}, E.ICR_RXT0, 4000 * 256e-9),   # RADV needs RDTR
])
def test_mitigation_delay_as_qemu_computes_it(rig, regs, causes, want):
    for r, v in regs.items():
        rig.nic.dev[r] = v
    rig.nic.dev[E.ICR] = causes
    assert rig.nic._interval() == pytest.approx(want)


def test_a_second_interrupt_waits_for_the_mitigation_delay(rig):
    nic = rig.nic
    t = [10.0]
    nic.clock = lambda: t[0]
    nic.dev[E.ITR] = 4000                                   # ~1 ms
    nic.dev.mmio_write(E.IMS, E.ICR_RXT0)
    with rig.lock:
        nic.dev.set_cause(E.ICR_RXT0)
        assert nic.interrupts == 1
        nic.dev.mmio_read(E.ICR)                            # the guest takes it
        nic.dev.set_cause(E.ICR_RXT0)                       # too soon: deferred
        assert nic.interrupts == 1 and nic.deadline() == pytest.approx(10.0 + 4000 * 256e-9)
        t[0] += 0.002
        nic.timers()
        assert nic.interrupts == 2

"""A synthetic NIC on the real switch: the guest's NetVSC (Linux's bring-up and the
compiled data path) and the host's NetVSP (control path and compiled data path)
in one process, frames both ways between the guest and a memory port."""
from __future__ import annotations

import threading
import time

import numpy as np
import pytest
from scapy.all import IP, TCP, UDP, Ether, raw

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp.netvsc import Netvsc
from netvsp.netvsc_datapath import HEADROOM, netvsc_receive, netvsc_transmit, rx_scratch
from netvsp.netvsp import NetvspDevice
from netvsp.synthetic_port import SyntheticPorts
from netvsp.vmbus import ring as RG
from netvsp.vmbus.client import GuestPages, VmbusClient
from netvsp.vmbus.server import VmbusServer
from switch.batch import (CSUM_OFF, CSUM_START, F_CSUM_PARTIAL, FLAGS, GSO_SIZE, GSO_TCPV4,
                          GSO_TYPE, LEN, OFF, PacketBatch, init_packet)
from switch.memport import MemoryPorts
from switch.switch import Switch

VM_MAC, PEER_MAC = "02:00:00:00:0a:01", "02:00:00:00:0a:02"


class Host:
    def __init__(self, ram):
        self.port, self.guest_port = MessagePort.pair()
        self.server = VmbusServer(self.port, ram)
        self.dev = NetvspDevice(ram, self.server, int(VM_MAC.replace(":", ""), 16))
        self.sw = Switch("syn")
        self.syn = self.sw.add_kind(SyntheticPorts())
        self.mem = self.sw.add_kind(MemoryPorts())
        self.vm_port = self.sw.add_port("vm.eth0", "synthetic", mac=VM_MAC, kind=self.syn)
        self.syn.attach(self.vm_port, self.dev)
        self.peer = self.sw.add_port("peer", "synthetic", mac=PEER_MAC, kind=self.mem)
        self.got = []
        self.lock = threading.Lock()
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stop.is_set():
            with self.lock:
                self.server.pump()
                self.sw.poll()
                self.got += self.mem.collect(self.peer)
            time.sleep(0.0005)

    def close(self):
        self.stop.set()
        self.t.join(5)
        self.guest_port.close()


@pytest.fixture
def vm():
    ram = GuestMemory(64 << 20)
    host = Host(ram)
    client = VmbusClient(host.guest_port, timeout=30)
    client.connect()
    client.request_offers()
    pages = GuestPages(ram.size)
    nic = Netvsc(ram, client, pages, timeout=30)
    nic.bring_up()
    try:
        yield host, nic, ram, pages
    finally:
        host.close()
        ram.close()


def guest_send(nic, ram, pages, frames, gso=None):
    """The guest's transmit: frames in guest RAM with headroom, the compiled kernel."""
    slot = 70000
    tx = pages.alloc(slot * len(frames))
    b = PacketBatch(len(frames), arena=slot * len(frames))
    b.data = ram.mem[tx:tx + slot * len(frames)]
    for i, f in enumerate(frames):
        at = i * slot + HEADROOM
        b.data[at:at + len(f)] = np.frombuffer(f, np.uint8)
        init_packet(b.meta, i, at, len(f), 0, 0)
        if gso:
            b.meta[FLAGS, i] |= F_CSUM_PARTIAL
            b.meta[CSUM_START, i], b.meta[CSUM_OFF, i] = 34, 16
            b.meta[GSO_TYPE, i], b.meta[GSO_SIZE, i] = GSO_TCPV4, gso
    count = nic.send_section_count
    free = np.arange(count, dtype=np.int64)
    nfree = np.array([count], dtype=np.int64)
    busy = np.zeros(count, dtype=np.uint8)
    out = nic.out
    nxt, sig = netvsc_transmit(ram.mem, out.base, out.datasize, b.meta, b.data, tx,
                               len(frames), 0, nic.send_gpa, nic.send_section_size, free, nfree,
                               busy, np.zeros((1, 2), np.int64), np.zeros(16, np.uint8),
                               np.zeros(4, np.int64))
    assert nxt == len(frames)
    import os
    os.eventfd_write(nic.signal, 1)


def wait(pred, what, t=20):
    end = time.monotonic() + t
    while time.monotonic() < end:
        if pred():
            return
        time.sleep(0.01)
    raise AssertionError(f"timed out waiting for {what}")


def test_guest_frames_reach_the_switch_and_the_peer(vm):
    host, nic, ram, pages = vm
    frames = [raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP() / UDP() / bytes(k * 50))
              for k in range(1, 9)]
    guest_send(nic, ram, pages, frames)
    wait(lambda: len(host.got) >= 8, "frames at the peer")
    assert host.got == frames
    st = host.sw.stats()["ports"]["vm.eth0"]
    assert st["rx_packets"] == 8 and st["dropped_in"] == 0


def test_lso_super_packet_from_the_guest_crosses_as_one(vm):
    host, nic, ram, pages = vm
    big = raw(Ether(src=VM_MAC, dst=PEER_MAC) / IP(src="10.0.0.1", dst="10.0.0.2")
              / TCP(sport=5, dport=6) / (bytes(range(256)) * 200))
    guest_send(nic, ram, pages, [big], gso=1448)
    wait(lambda: len(host.got) >= 1, "the super-packet at the peer")
    assert host.got[0] == big                   # a memory port takes it whole


def test_peer_frames_reach_the_guest_receive_buffer(vm):
    host, nic, ram, pages = vm
    frames = [raw(Ether(src=PEER_MAC, dst=VM_MAC) / IP() / UDP() / bytes(k * 100))
              for k in range(1, 6)]
    with host.lock:
        host.mem.inject(host.peer, frames)
    g = PacketBatch(64, arena=1 << 20)
    rs = np.array([RG.ring_read_pos(ram.mem, nic.inr.base, nic.inr.datasize), 0], np.int64)
    comp = np.zeros((16, 2), np.int64)
    got = []

    def receive():
        n, _, _, why = netvsc_receive(ram.mem, nic.inr.base, nic.inr.datasize, rs,
                                      np.zeros(RG.DESC_FIELDS, np.int64),
                                      np.zeros((562, 2), np.int64), nic.recv_gpa, nic.recv_size,
                                      g.meta, g.data, 0, 0, comp, 0, np.zeros(8, np.int64),
                                      np.zeros(8, np.uint8), -1, *rx_scratch())
        got.extend(bytes(g.data[g.meta[OFF, i]:g.meta[OFF, i] + g.meta[LEN, i]])
                   for i in range(n))
        return len(got) >= 5
    wait(receive, "frames in the guest")
    assert got == frames

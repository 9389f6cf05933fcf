"""NetVSC (the guest's driver, Linux's bring-up) against NetVSP (the host): two
independent implementations of the two ends of the protocol, meeting in shared
guest RAM with the host served by a thread, as the daemon will serve it."""
from __future__ import annotations

import select
import threading

import pytest

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp import nvsp as N
from netvsp.netvsc import Netvsc
from netvsp.netvsp import NetvspDevice
from netvsp.vmbus.client import GuestPages, VmbusClient
from netvsp.vmbus.server import VmbusServer

MAC = 0x020000AB0001


class Host:
    def __init__(self, ram, mtu=1500):
        self.port, self.guest_port = MessagePort.pair()
        self.server = VmbusServer(self.port, ram)
        self.dev = NetvspDevice(ram, self.server, MAC, mtu=mtu)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)
        self.t.start()

    def loop(self):
        while not self.stop.is_set():
            fds = [self.port.fileno()] + list(self.dev.fds())
            r = select.select(fds, [], [], 0.02)[0]
            if self.port.fileno() in r:
                self.server.pump()
            self.dev.poll()

    def close(self):
        self.stop.set()
        self.t.join(5)
        self.guest_port.close()


@pytest.fixture
def pair():
    ram = GuestMemory(64 << 20)
    host = Host(ram)
    client = VmbusClient(host.guest_port, timeout=30)
    client.connect()
    client.request_offers()
    nic = Netvsc(ram, client, GuestPages(ram.size), timeout=30)
    try:
        yield host, nic
    finally:
        host.close()
        ram.close()


def test_linux_bring_up_against_the_host(pair):
    host, nic = pair
    link = nic.bring_up()
    assert nic.version == N.VERSION_61
    assert link.mac == MAC.to_bytes(6, "big") and link.connected and link.mtu == 1500
    assert link.max_pkt_per_msg >= 1 and link.pkt_align >= 8
    assert link.friendly_name and link.speed_mbps > 0 and len(link.offload_caps) >= 112
    assert nic.recv_sub_alloc >= 1514 and nic.send_section_size == 6144
    ch = host.dev.channel
    assert ch is not None and ch.packet_filter == 0x0D
    assert not host.dev.violations and not host.server.violations


def test_link_indications_reach_the_guest(pair):
    host, nic = pair
    nic.bring_up()
    host.dev.indicate_link(False)
    nic._until(lambda: True if not nic.link.connected else None, "link down")
    host.dev.indicate_link(True)
    nic._until(lambda: True if nic.link.connected else None, "link up")

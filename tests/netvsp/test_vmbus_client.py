"""The guest's VMBus driver against the host's server, each on its own end of the
message port (the server pumped by a thread, as the daemon's loop would)."""
from __future__ import annotations

import os
import select
import threading
import uuid

import pytest

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp.vmbus import channel_msg as M
from hypervisor.partition import GuestMemoryError
from netvsp.vmbus.client import GuestPages, VmbusClient, VmbusClientError
from netvsp.vmbus.server import VmbusServer

INSTANCE = uuid.UUID("0f0e0d0c-0b0a-0908-0706-050403020100")


class Host:
    def __init__(self, ram):
        self.port, guest_port = MessagePort.pair()
        self.guest_port = guest_port
        self.server = VmbusServer(self.port, ram)
        self.stop = threading.Event()
        self.t = threading.Thread(target=self.loop, daemon=True)

    def loop(self):
        while not self.stop.is_set():
            if select.select([self.port], [], [], 0.05)[0]:
                self.server.pump()


class Dev:
    opened = closed = 0

    def channel_opened(self, ch):
        self.opened += 1

    def channel_closed(self, ch):
        self.closed += 1


@pytest.fixture
def pair():
    ram = GuestMemory(16 << 20)
    host = Host(ram)
    dev = Dev()
    host.server.offer(M.NETVSC_GUID, INSTANCE, dev)
    host.t.start()
    try:
        yield host, VmbusClient(host.guest_port, timeout=30), ram, dev
    finally:
        host.stop.set()
        host.t.join(5)
        host.guest_port.close()
        ram.close()


def test_guest_brings_a_channel_up_and_down(pair):
    host, client, ram, dev = pair
    assert client.connect() == M.V_WIN10_V5_3
    client.request_offers()
    relid = client.find(M.NETVSC_GUID)
    pages = GuestPages(ram.size)
    ring = pages.alloc(2 * (4096 + 128 * 4096))     # Linux netvsc's default: 128 pages a way
    handle = client.create_gpadl(relid, ring, 2 * (4096 + 128 * 4096))
    assert handle == 0xE1E10
    sig, irq = client.open(relid, handle, 129)
    ch = host.server.channels[relid]
    assert dev.opened == 1 and ch.in_ring == (ring, 128 * 4096)
    assert ch.out_ring == (ring + 129 * 4096, 128 * 4096)
    os.eventfd_write(sig, 1)
    assert ch.signal.take() == 1
    client.close(relid)
    client.teardown_gpadl(relid, handle)
    assert dev.closed == 1 and not host.server.violations
    for fd in (sig, irq):
        os.close(fd)


def test_refusals_reach_the_guest_as_errors(pair):
    host, client, ram, dev = pair
    client.connect()
    client.request_offers()
    relid = client.find(M.NETVSC_GUID)
    with pytest.raises(VmbusClientError, match="refused"):
        client.create_gpadl(relid, ram.size - 4096, 8192)      # runs past guest RAM
    with pytest.raises(VmbusClientError, match="did not open"):
        client.open(relid, 0x1234, 2)
    with pytest.raises(VmbusClientError, match="no offer"):
        client.find(uuid.uuid4())
    with pytest.raises(GuestMemoryError, match="exhausted"):
        GuestPages(ram.size).alloc(ram.size)          # the guest's own memory map

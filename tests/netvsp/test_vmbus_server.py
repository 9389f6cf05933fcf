"""The host's VMBus control plane against a guest that speaks Linux's sequence, and
against one that does not (vmbus_netvsp.md c)."""
from __future__ import annotations

import os
import uuid

import numpy as np
import pytest

from hypervisor.partition import GuestMemory
from hypervisor.synic import MessagePort
from netvsp.layout import offsets
from netvsp.vmbus import channel_msg as M
from netvsp.vmbus.server import VmbusServer

INSTANCE = uuid.UUID("12345678-1234-5678-9abc-def012345678")


class Device:
    def __init__(self):
        self.opened, self.closed = [], []

    def channel_opened(self, ch):
        self.opened.append(ch)

    def channel_closed(self, ch):
        self.closed.append(ch)


class Guest:
    """The guest side, message by message, as Linux's vmbus driver sends them."""

    def __init__(self, ram_mib=8):
        self.port, host = MessagePort.pair()
        self.ram = GuestMemory(ram_mib << 20)
        self.server = VmbusServer(host, self.ram)
        self.dev = Device()

    def send(self, data: bytes):
        self.port.post(data)
        self.server.pump()

    def replies(self, max_fds=2):
        out = []
        self.port.sock.setblocking(False)
        while True:
            try:
                got = self.port.receive(max_fds=max_fds)
            except BlockingIOError:
                return out
            data, fds = got
            out.append((M.parse(data), fds))

    def connect(self):
        for v in M.LINUX_VERSIONS:            # newest first, as Linux does (c.4)
            self.send(M.message(M.INITIATE_CONTACT, vmbus_version_requested=v,
                                interrupt_page=2))
            (t, m), _ = self.replies()[0]
            assert t == M.VERSION_RESPONSE
            if m["version_supported"]:
                return v

    def gpadl(self, relid, handle, first_page, pages):
        for msg in M.gpadl_messages(relid, handle, list(range(first_page, first_page + pages)),
                                    pages * 4096):
            self.send(msg)
        return self.replies()

    def open(self, relid, handle, split):
        self.send(M.message(M.OPENCHANNEL, child_relid=relid, openid=relid,
                            ringbuffer_gpadlhandle=handle, downstream_ringbuffer_pageoffset=split))
        return self.replies()


@pytest.fixture
def guest():
    g = Guest()
    yield g
    g.port.close()
    g.ram.close()


def test_linux_sequence_from_contact_to_close(guest):
    ch = guest.server.offer(M.NETVSC_GUID, INSTANCE, guest.dev)
    assert guest.connect() == M.V_WIN10_V5_3              # 6.0 refused, 5.3 taken
    guest.send(M.message(M.REQUESTOFFERS))
    got = guest.replies()
    assert [t for (t, _), _ in got] == [M.OFFERCHANNEL, M.ALLOFFERS_DELIVERED]
    offer = got[0][0][1]
    assert bytes(offer["if_type"]) == bytes.fromhex("635161f83edfc546913ff2d2f965ed0e")
    assert bytes(offer["if_instance"]) == INSTANCE.bytes_le
    assert offer["child_relid"] == ch.relid and offer["sub_channel_index"] == 0
    # a 40-page ring GPADL: 26 PFNs in the header, 14 in one body (c.6)
    (t, created), _ = guest.gpadl(ch.relid, 0xE1E10, 16, 40)[0]
    assert t == M.GPADL_CREATED and created["creation_status"] == 0
    (t, res), fds = guest.open(ch.relid, 0xE1E10, 20)[0]
    assert t == M.OPENCHANNEL_RESULT and res["status"] == 0 and len(fds) == 2
    assert guest.dev.opened == [ch]
    assert ch.in_ring == (16 * 4096, 19 * 4096) and ch.out_ring == (36 * 4096, 19 * 4096)
    os.eventfd_write(fds[0], 1)                           # the guest signals the host
    assert ch.signal.take() == 1
    ch.interrupt.ring()                                   # the host interrupts the guest
    assert os.eventfd_read(fds[1]) == 1
    for fd in fds:
        os.close(fd)
    guest.send(M.message(M.CLOSECHANNEL, child_relid=ch.relid))
    assert guest.dev.closed == [ch] and ch.state == "closed"
    guest.send(M.message(M.GPADL_TEARDOWN, child_relid=ch.relid, gpadl=0xE1E10))
    (t, m), _ = guest.replies()[0]
    assert t == M.GPADL_TORNDOWN and m["gpadl"] == 0xE1E10
    assert not guest.server.violations


def test_rescind_and_release_then_the_relid_is_free(guest):
    ch = guest.server.offer(M.NETVSC_GUID, INSTANCE, guest.dev)
    guest.connect()
    guest.server.rescind(ch.relid)
    (t, m), _ = guest.replies()[0]
    assert t == M.RESCIND_CHANNELOFFER and m["child_relid"] == ch.relid
    guest.send(M.message(M.RELID_RELEASED, child_relid=ch.relid))
    assert ch.relid not in guest.server.channels
    sub = guest.server.offer(M.NETVSC_GUID, INSTANCE, guest.dev, sub_index=1)
    (t, m), _ = guest.replies()[0]                          # offered at once: connected
    assert t == M.OFFERCHANNEL and m["sub_channel_index"] == 1 and sub.relid == ch.relid


HOSTILE = {
    "before contact": lambda g, ch: [M.message(M.REQUESTOFFERS)],
    "truncated": lambda g, ch: [M.message(M.OPENCHANNEL, child_relid=ch.relid)[:20]],
    "unknown type": lambda g, ch: [(99).to_bytes(4, "little") + bytes(12)],
    "host-only message": lambda g, ch: [M.message(M.OFFERCHANNEL)],
    "open of unknown relid": lambda g, ch: [M.message(M.OPENCHANNEL, child_relid=77)],
    "open without GPADL": lambda g, ch: [M.message(M.OPENCHANNEL, child_relid=ch.relid,
                                                   ringbuffer_gpadlhandle=5,
                                                   downstream_ringbuffer_pageoffset=2)],
    "GPADL past guest RAM": lambda g, ch: M.gpadl_messages(ch.relid, 9, [0, 1, 2, 10**9],
                                                          4 * 4096),
    "GPADL body for nothing": lambda g, ch: [M.gpadl_messages(ch.relid, 9,
                                                             list(range(40)), 40 * 4096)[1]],
    "GPADL too many PFNs": lambda g, ch: M.gpadl_messages(ch.relid, 9, list(range(30)),
                                                         30 * 4096)[:1] + [
        M.encode(M.GPADL_BODY_FIXED, msgtype=M.GPADL_BODY, gpadl=9) + bytes(8 * 5)],
    "GPADL bytes past pages": lambda g, ch: M.gpadl_messages(ch.relid, 9, [1, 2], 3 * 4096),
    "teardown of unknown GPADL": lambda g, ch: [M.message(M.GPADL_TEARDOWN, gpadl=3)],
    "release without rescind": lambda g, ch: [M.message(M.RELID_RELEASED,
                                                        child_relid=ch.relid)],
}


@pytest.mark.parametrize("case", sorted(HOSTILE))
def test_hostile_messages_are_counted_and_the_server_goes_on(guest, case):
    ch = guest.server.offer(M.NETVSC_GUID, INSTANCE, guest.dev)
    if case != "before contact":
        guest.connect()
    for msg in HOSTILE[case](guest, ch):
        guest.send(msg)
    assert sum(guest.server.violations.values()) >= 1
    for (t, m), fds in guest.replies():
        assert not fds
        if t == M.GPADL_CREATED:
            assert m["creation_status"] == M.GPADL_FAILURE
    # and the same channel still opens properly afterwards
    guest.connect()
    (t, created), _ = guest.gpadl(ch.relid, 0xE1E10, 100, 8)[0]
    assert created["creation_status"] == 0
    (t, res), fds = guest.open(ch.relid, 0xE1E10, 4)[0]
    assert res["status"] == 0 and len(fds) == 2
    for fd in fds:
        os.close(fd)


def test_ring_that_is_not_contiguous_fails_the_open(guest):
    ch = guest.server.offer(M.NETVSC_GUID, INSTANCE, guest.dev)
    guest.connect()
    pfns = [10, 11, 12, 30, 31, 32]
    for msg in M.gpadl_messages(ch.relid, 7, pfns, len(pfns) * 4096):
        guest.send(msg)
    guest.replies()
    (t, res), fds = guest.open(ch.relid, 7, 3)[0]
    assert res["status"] != 0 and not fds and ch.state == "offered"
    assert any("contiguous" in k for k in guest.server.violations)


def test_fuzzed_messages_never_raise(guest):
    rng = np.random.default_rng(5)
    ch = guest.server.offer(M.NETVSC_GUID, INSTANCE, guest.dev)
    guest.connect()
    good = [M.message(t) for t in M.BY_TYPE] + M.gpadl_messages(ch.relid, 1, list(range(30)),
                                                                30 * 4096)
    for _ in range(400):
        b = bytearray(good[rng.integers(len(good))])
        for _ in range(rng.integers(1, 6)):
            b[rng.integers(len(b))] = rng.integers(256)
        if rng.random() < 0.2:
            b = b[:rng.integers(len(b) + 1)]
        guest.send(bytes(b))
        for _, fds in guest.replies():
            for fd in fds:
                os.close(fd)


def test_message_layouts_match_the_reference():
    """Sizes from the c.2 table, OFFERCHANNEL offsets from c.3."""
    sizes = {M.OFFERCHANNEL: 196, M.RESCIND_CHANNELOFFER: 12, M.REQUESTOFFERS: 8,
             M.ALLOFFERS_DELIVERED: 8, M.OPENCHANNEL: 148, M.OPENCHANNEL_RESULT: 20,
             M.CLOSECHANNEL: 12, M.GPADL_HEADER: 20, M.GPADL_BODY: 16, M.GPADL_CREATED: 20,
             M.GPADL_TEARDOWN: 16, M.GPADL_TORNDOWN: 12, M.RELID_RELEASED: 12,
             M.INITIATE_CONTACT: 40, M.VERSION_RESPONSE: 16, M.UNLOAD: 8,
             M.UNLOAD_RESPONSE: 8}
    assert {t: M.BY_TYPE[t].itemsize for t in sizes} == sizes
    off = offsets(M.OFFER_CHANNEL)
    assert off == {"msgtype": 0, "padding": 4, "if_type": 8, "if_instance": 24,
                   "reserved1": 40, "reserved2": 48, "chn_flags": 56, "mmio_megabytes": 58,
                   "user_def": 60, "sub_channel_index": 180, "reserved3": 182,
                   "child_relid": 184, "monitorid": 188, "monitor_allocated": 189,
                   "is_dedicated_interrupt": 190, "connection_id": 192}
    assert offsets(M.OPEN_CHANNEL)["downstream_ringbuffer_pageoffset"] == 24
    assert offsets(M.OPEN_CHANNEL)["userdata"] == 28
    assert offsets(M.GPADL_HEADER_FIXED) == {"msgtype": 0, "padding": 4, "child_relid": 8,
                                             "gpadl": 12, "range_buflen": 16,
                                             "rangecount": 18}
    assert offsets(M.VERSION_RESPONSE_MSG)["msg_conn_id"] == 12
    assert (M.GPADL_HEADER_PFNS, M.GPADL_BODY_PFNS) == (26, 28)          # c.6
    assert M.guid_bytes(M.NETVSC_GUID).tobytes().hex() == "635161f83edfc546913ff2d2f965ed0e"
    assert M.LINUX_VERSIONS[:2] == (0x00060000, 0x00050003) and M.LINUX_VERSIONS[-1] == 0x20004

"""The guest's VMBus driver: what Linux's drivers/hv does to bring a channel up.

Used by the guest-side NetVSC process (vmbus_netvsp.md c): INITIATE_CONTACT with
versions newest first until one is accepted (c.4), REQUESTOFFERS until
ALLOFFERS_DELIVERED (c.5), GPADLs in a header and body messages with handles
counted from 0xE1E10 as Linux does (c.6), OPENCHANNEL with the send ring's page
count as the split (c.7), CLOSECHANNEL and GPADL_TEARDOWN, RELID_RELEASED after a
rescind (c.8). Replies are awaited with a timeout; messages that arrive out of
turn (an offer during an open, a rescind) are kept for whoever asks next.

``GuestPages`` hands out page-aligned, physically contiguous guest RAM, as the
guest kernel's alloc_pages() would for rings and buffers.
"""
from __future__ import annotations

import select
import time
import uuid

from hypervisor.partition import GuestPages  # noqa: F401 - the guest's allocator, used with the client
from hypervisor.synic import MessagePort

from . import channel_msg as M

PAGE = 4096
FIRST_GPADL = 0xE1E10


class VmbusClientError(RuntimeError):
    pass


class VmbusClient:
    def __init__(self, port: MessagePort, timeout: float = 10.0):
        self.port, self.timeout = port, timeout
        self.version = None
        self.offers: dict[int, dict] = {}
        self.rescinded: set[int] = set()
        self._pending: list[tuple[int, object, list[int]]] = []
        self._next_gpadl = FIRST_GPADL

    def _wait(self, want: int, match=lambda m: True, max_fds: int = 0):
        """The next message of type ``want`` (that ``match`` accepts), keeping others."""
        for k, (t, m, fds) in enumerate(self._pending):
            if t == want and match(m):
                del self._pending[k]
                return m, fds
        deadline = time.monotonic() + self.timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.port], [], [], left)[0]:
                raise VmbusClientError(f"no reply of type {want} within {self.timeout:g} s")
            got = self.port.receive(max_fds=max_fds)
            if got is None:
                raise VmbusClientError("the host closed the message port")
            t, m = M.parse(got[0])
            if t == M.OFFERCHANNEL:
                self.offers[int(m["child_relid"])] = m
            elif t == M.RESCIND_CHANNELOFFER:
                self.rescinded.add(int(m["child_relid"]))
            if t == want and match(m):
                return m, got[1]
            self._pending.append((t, m, got[1]))

    def connect(self, versions=M.LINUX_VERSIONS) -> int:
        for v in versions:
            self.port.post(M.message(M.INITIATE_CONTACT, vmbus_version_requested=v,
                                     interrupt_page=2))   # msg_sint 2 (c.4)
            m, _ = self._wait(M.VERSION_RESPONSE)
            if m["version_supported"]:
                self.version = v
                return v
        raise VmbusClientError("the host accepted none of the VMBus versions offered")

    def request_offers(self) -> dict[int, dict]:
        self.port.post(M.message(M.REQUESTOFFERS))
        self._wait(M.ALLOFFERS_DELIVERED)
        return self.offers

    def find(self, if_type: uuid.UUID, sub_index: int = 0) -> int:
        want = M.guid_bytes(if_type).tobytes()
        for relid, m in self.offers.items():
            if bytes(m["if_type"]) == want and int(m["sub_channel_index"]) == sub_index \
                    and relid not in self.rescinded:
                return relid
        raise VmbusClientError(f"no offer of {if_type} (subchannel {sub_index})")

    def wait_offer(self, if_type: uuid.UUID, sub_index: int) -> int:
        """The relid of an offer that may come later (a subchannel, c.9)."""
        try:
            return self.find(if_type, sub_index)
        except VmbusClientError:
            pass
        want = M.guid_bytes(if_type).tobytes()
        m, _ = self._wait(M.OFFERCHANNEL, lambda m: bytes(m["if_type"]) == want
                          and int(m["sub_channel_index"]) == sub_index)
        return int(m["child_relid"])

    def create_gpadl(self, relid: int, gpa: int, nbytes: int) -> int:
        if gpa % PAGE:
            raise VmbusClientError("a GPADL starts on a page")
        handle = self._next_gpadl
        self._next_gpadl += 1
        pages = -(-nbytes // PAGE)
        for msg in M.gpadl_messages(relid, handle, list(range(gpa // PAGE, gpa // PAGE + pages)),
                                    nbytes):
            self.port.post(msg)
        m, _ = self._wait(M.GPADL_CREATED, lambda m: int(m["gpadl"]) == handle)
        if m["creation_status"]:
            raise VmbusClientError(f"GPADL {handle:#x} refused: status "
                                   f"{int(m['creation_status']):#x}")
        return handle

    def teardown_gpadl(self, relid: int, handle: int) -> None:
        self.port.post(M.message(M.GPADL_TEARDOWN, child_relid=relid, gpadl=handle))
        self._wait(M.GPADL_TORNDOWN, lambda m: int(m["gpadl"]) == handle)

    def open(self, relid: int, ring_handle: int, send_pages: int) -> tuple[int, int]:
        """Open a channel whose ring GPADL is ``ring_handle`` (send ring first,
        ``send_pages`` pages including its control page). Returns the eventfds
        (signal the host, interrupt from the host)."""
        self.port.post(M.message(M.OPENCHANNEL, child_relid=relid, openid=relid,
                                 ringbuffer_gpadlhandle=ring_handle,
                                 downstream_ringbuffer_pageoffset=send_pages))
        m, fds = self._wait(M.OPENCHANNEL_RESULT, lambda m: int(m["child_relid"]) == relid,
                            max_fds=2)
        if m["status"] or len(fds) != 2:
            raise VmbusClientError(f"channel {relid} did not open: status "
                                   f"{int(m['status']):#x}")
        return fds[0], fds[1]

    def close(self, relid: int) -> None:
        self.port.post(M.message(M.CLOSECHANNEL, child_relid=relid))

    def release(self, relid: int) -> None:
        self.port.post(M.message(M.RELID_RELEASED, child_relid=relid))
        self.rescinded.discard(relid)
        self.offers.pop(relid, None)

"""vRSS on the host (vmbus_netvsp.md g.1-g.3, c.9): NVSP SUBCHANNEL allocation as
OpenVMM takes it, subchannel offers and opens, the send indirection table once all
are open, RSS parameters against the NIC's queues, a subchannel that breaks the
rules closing alone, and the primary taking its subchannels with it."""
from __future__ import annotations

import os
import struct

import numpy as np
import pytest

from netvsp import nvsp as N
from netvsp import rndis as R
from netvsp.netvsp import MAX_QUEUES, NetvspSubchannel
from netvsp.vmbus import channel_msg as M
from netvsp.vmbus import packet as P
from netvsp.vmbus.ring import Ring

from .test_netvsp import MAC_A, MAC_B, PAGE, Guest, env, two, wait_until  # noqa: F401


class Sub:
    """A subchannel opened by the guest as Linux opens one (netvsc_sc_open): the
    primary's ring size, its own GPADL."""

    def __init__(self, g: Guest, index: int):
        e = g.env
        self.g, self.index = g, index
        self.relid = e.client.wait_offer(M.NETVSC_GUID, index)
        nbytes = 2 * (1 + g.ring_pages) * PAGE
        gpa = e.pages.alloc(nbytes)
        handle = e.client.create_gpadl(self.relid, gpa, nbytes)
        ds = g.ring_pages * PAGE
        self.out = Ring(g.mem, gpa, ds)
        self.inr = Ring(g.mem, gpa + (1 + g.ring_pages) * PAGE, ds)
        self.out.init()
        self.inr.init()
        self.sig, self.irq = e.client.open(self.relid, handle, 1 + g.ring_pages)

    def send(self, payload: bytes) -> None:
        ok, sig = self.out.write_packet(P.VM_PKT_DATA_INBAND, payload, 99, 1)
        assert ok
        if sig:
            os.eventfd_write(self.sig, 1)

    def closed(self) -> bool:
        return self.g.env.server.channels[self.relid].state != "open"


def allocate(g: Guest, n: int) -> tuple[int, int]:
    m = g.completion(g.send(N.nvsp_subchannel_request(n)))
    t, f = N.decode_message(m, completion=True)
    assert t == N.MSG_SUBCHANNEL
    return int(f["status"]), int(f["num_subchannels"])


def send_table(g: Guest) -> list[int]:
    m = g.wait(lambda m: m.type == P.VM_PKT_DATA_INBAND and len(m.payload) >= 4 and
               struct.unpack_from("<I", m.payload)[0] == N.MSG_SEND_INDIRECTION_TABLE,
               "SEND_INDIRECTION_TABLE")
    return N.decode_indirection_table(m.payload, g.version)


def test_subchannels_offered_opened_and_the_send_table(two):
    env, a, g, b, gb = two
    g.bring_up()
    caps = np.frombuffer(g.query_ok(R.OID_GEN_RECEIVE_SCALE_CAPABILITIES,
                                    R.linux_rss_capabilities_query_input()),
                         dtype=R.RSS_CAPABILITIES)[0]
    assert int(caps["num_recv_que"]) == MAX_QUEUES >= 2
    assert allocate(g, 2) == (N.STATUS_SUCCESS, 2)
    subs = [Sub(g, 1), Sub(g, 2)]
    offers = {r: m for r, m in env.client.offers.items() if r in (subs[0].relid, subs[1].relid)}
    for m in offers.values():              # c.9: the primary's type and instance
        assert bytes(m["if_instance"]) == M.guid_bytes(a.instance).tobytes()
    wait_until(lambda: len(a.subs) == 2, "both subchannels to open")
    assert all(isinstance(s, NetvspSubchannel) for s in a.subs.values())
    # g.1/g.2: once all are open, 16 entries i % 3, which Linux's checks accept
    assert send_table(g) == [i % 3 for i in range(16)]
    # the subchannel shares the primary's state
    sc = a.subs[1]
    assert sc.state == g.channel.state == "ready" and sc.recv_buf is g.channel.recv_buf
    # g.3: RSS over three channels is taken now; entries past the NIC's queues not
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                 R.rss_parameters([i % 3 for i in range(128)])) == 0
    assert g.channel.rss["itab"].tolist() == [i % 3 for i in range(128)]
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                 R.rss_parameters([MAX_QUEUES] * 128)) == R.STATUS_INVALID_DATA
    # a short table is repeated to 128 entries (OpenVMM)
    assert g.set(R.OID_GEN_RECEIVE_SCALE_PARAMETERS, R.rss_parameters([2, 1])) == 0
    assert g.channel.rss["itab"].tolist() == [2, 1] * 64
    assert not a.violations and not b.violations


@pytest.mark.parametrize("n", [0, MAX_QUEUES, MAX_QUEUES + 5])
def test_allocations_outside_the_queues_fail(two, n):
    env, a, g, b, gb = two
    g.bring_up()
    assert allocate(g, n) == (N.STATUS_FAIL, 0)
    assert not a.sub_offers


def test_a_second_allocation_fails(two):
    env, a, g, b, gb = two
    g.bring_up()
    assert allocate(g, 1) == (N.STATUS_SUCCESS, 1)
    assert allocate(g, 1) == (N.STATUS_FAIL, 0)
    assert len(a.sub_offers) == 1


def test_allocation_before_the_buffers_fails(env):
    a = env.add(MAC_A)
    env.start()
    g = Guest(env, a)
    g.init()
    assert allocate(g, 1) == (N.STATUS_FAIL, 0)


def test_a_control_message_on_a_subchannel_closes_it_alone(two):
    env, a, g, b, gb = two
    g.bring_up()
    allocate(g, 1)
    sub = Sub(g, 1)
    wait_until(lambda: 1 in a.subs, "the subchannel to open")
    sub.send(N.nvsp_send_receive_buffer(g.recv_handle))
    wait_until(sub.closed, "the subchannel to be closed")
    assert a.violations["NVSP control message on a subchannel"] == 1
    assert 1 not in a.subs
    assert not g.closed()
    g.keepalive()                          # the primary still answers
    gb.keepalive()


def test_closing_the_primary_rescinds_its_subchannels(two):
    env, a, g, b, gb = two
    g.bring_up()
    allocate(g, 1)
    sub = Sub(g, 1)
    wait_until(lambda: 1 in a.subs, "the subchannel to open")
    env.client.close(g.relid)
    wait_until(lambda: not a.subs and not a.sub_offers, "the subchannels to go")
    wait_until(lambda: env.server.channels[sub.relid].state == "rescinded",
               "the subchannel to be rescinded")
    gb.keepalive()

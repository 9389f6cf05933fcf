"""The packet generator: its frames, its ring reader on hand-built TPACKET_V3
blocks, the RFC 2544 search, and both ends over a real veth pair in namespaces
the tests create and remove."""
from __future__ import annotations

import os
import socket
import struct

import numpy as np
import pytest
from pyroute2 import netns
from scapy.layers.inet import IP, UDP
from scapy.layers.l2 import Ether

from hvnet import e2e, pktgen

root_only = pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces")
PREFIX = f"g{os.getpid() % 10000}"


def leftovers() -> list[str]:
    return [n for n in netns.listnetns() if n.startswith(PREFIX + "-")]


# ---- frames ----------------------------------------------------------------------------------

@pytest.mark.parametrize("size", [64, 512, 1518])
def test_frame_is_valid_udp_of_the_rfc2544_size(size):
    f = pktgen.build_frame(size, "02:00:00:00:00:01", "02:00:00:00:00:02", "10.9.0.1",
                           "10.9.0.2", 7357, 9)
    assert len(f) == size - 4                      # the FCS is the NIC's
    p = Ether(f.tobytes())
    assert p[Ether].src == "02:00:00:00:00:01" and p[Ether].dst == "02:00:00:00:00:02"
    assert p[IP].src == "10.9.0.1" and p[IP].len == size - 4 - 14 and p[IP].flags == "DF"
    assert p[UDP].sport == 7357 and p[UDP].dport == 9 and p[UDP].len == size - 4 - 34
    assert p[UDP].chksum == 0                      # "no checksum", RFC 768
    check = IP(bytes(p[IP]))
    del check.chksum
    assert IP(bytes(check)).chksum == p[IP].chksum


@pytest.mark.parametrize("size", [63, 1519, 0])
def test_frame_sizes_outside_rfc2544_are_refused(size):
    with pytest.raises(ValueError, match="64..1518"):
        pktgen.build_frame(size, "02:00:00:00:00:01", "02:00:00:00:00:02", "10.0.0.1",
                           "10.0.0.2", 1, 1)


# ---- the ring reader on hand-built blocks ----------------------------------------------------

BLOCK = 4096


def _block(ring, b, frames, status=1):
    """Block ``b`` of ``ring`` with ``frames`` = [(rx_ns, frame bytes)], chained as the
    kernel does (48-byte tpacket3_hdr, frame at tp_mac 66)."""
    base = b * BLOCK
    p = 48
    struct.pack_into("<III", ring, base + 8, status, len(frames), p)
    for k, (rx, data) in enumerate(frames):
        mac = 66
        step = (mac + len(data) + 15) & ~15
        nxt = step if k + 1 < len(frames) else 0
        struct.pack_into("<IIIII", ring, base + p, nxt, rx // 10**9, rx % 10**9, len(data),
                         len(data))
        struct.pack_into("<H", ring, base + p + 24, mac)
        ring[base + p + mac: base + p + mac + len(data)] = np.frombuffer(data, np.uint8)
        p += step


def _ours(seq, tx_ns, trial, port=7357, size=64):
    f = pktgen.build_frame(size, "02:00:00:00:00:01", "02:00:00:00:00:02", "10.9.0.1",
                           "10.9.0.2", port, port)
    struct.pack_into("<IQH", f, pktgen.OFF_SEQ, seq, tx_ns, trial)
    return f.tobytes()


def test_drain_counts_this_trials_frames_with_their_latency_and_gives_blocks_back():
    ring = np.zeros(3 * BLOCK, np.uint8)
    t = 1_700_000_000 * 10**9
    _block(ring, 0, [(t + 5_000, _ours(0, t, 3)), (t + 9_000, _ours(1, t + 1_000, 3)),
                     (t + 9_500, _ours(2, t, 2)),                  # an earlier trial's
                     (t + 9_600, _ours(3, t, 3, port=80))])        # another port
    _block(ring, 1, [(t + 100, _ours(4, t + 200, 3))])              # a clock step back
    _block(ring, 2, [(t, _ours(5, t, 3))], status=0)                # still the kernel's
    state, stats = np.zeros(1, np.int64), np.zeros(5, np.int64)
    lat = np.zeros(8, np.int64)
    pktgen.drain(ring, BLOCK, 3, state, 7357, 3, lat, stats)
    assert stats.tolist() == [3, 2, 0, 2, 1]
    assert lat[:2].tolist() == [5_000, 8_000]
    assert state[0] == 2                                           # stopped at block 2
    assert struct.unpack_from("<I", ring, 8)[0] == 0 and struct.unpack_from("<I", ring,
                                                                            BLOCK + 8)[0] == 0


def test_drain_keeps_inside_a_block_whatever_its_offsets_say():
    ring = np.zeros(2 * BLOCK, np.uint8)
    t = 10**18
    _block(ring, 0, [(t, _ours(0, t, 1)), (t, _ours(1, t, 1))])
    struct.pack_into("<I", ring, 48, BLOCK * 5)        # next_offset far outside the block
    _block(ring, 1, [(t, _ours(2, t, 1))])
    struct.pack_into("<I", ring, BLOCK + 48 + 12, 60_000)   # snaplen past the block end
    state, stats, lat = np.zeros(1, np.int64), np.zeros(5, np.int64), np.zeros(4, np.int64)
    pktgen.drain(ring, BLOCK, 2, state, 7357, 1, lat, stats)
    assert stats[0] == 1 and stats[2] == 2             # the first frame, two bad entries
    assert state[0] == 0                               # both blocks went back


# ---- the RFC 2544 search ---------------------------------------------------------------------

class _StandIn:
    """A path that loses frames above ``limit`` frames/s, with a sender topping out at
    ``top``: what ``zero_loss`` sees of a real Pair."""

    def __init__(self, limit, top):
        self.limit, self.top, self.rates = limit, top, []

    def trial(self, size, rate, seconds):
        offered = self.top if rate == 0 else min(rate, self.top)
        self.rates.append(rate)
        lost = 0 if offered <= self.limit else 1
        return {"offered_fps": offered, "rx_fps": offered - lost, "lost": lost}


@pytest.mark.parametrize("limit", [1000.0, 52_345.0, 99_000.0])
def test_zero_loss_bisects_to_the_highest_lossless_rate(limit):
    s = _StandIn(limit, 100_000.0)
    z = pktgen.zero_loss(s, 64, 1.0, steps=8)
    assert z["bound"] == "path" and z["fps"] <= limit
    assert z["fps"] >= limit - 100_000 / 2 ** 8 - 1       # within the bisection's step
    assert s.rates[0] == 0                                # the sender's top rate first


def test_zero_loss_past_the_sender_and_below_the_floor():
    assert pktgen.zero_loss(_StandIn(1e9, 80_000.0), 64, 1.0, 6)["bound"] == "sender"
    z = pktgen.zero_loss(_StandIn(10.0, 80_000.0), 64, 1.0, 6, floor=100.0)
    assert z["fps"] == 0 and len(z["trials"]) < 12        # stops halving at the floor


# ---- both ends over a real veth pair ---------------------------------------------------------

@root_only
@pytest.mark.netns
def test_a_paced_trial_arrives_whole_with_one_way_latencies_then_all_is_gone():
    with e2e.veth_peer(PREFIX) as path:
        with pktgen.Pair(path.client_ns, path.server_ns, e2e.A_IP, path.server_ip) as pair:
            procs = list(pair.procs.values())
            t = pair.trial(512, 2000, 0.5)
            assert t["sent"] == 1000 and t["received"] == 1000 and t["lost"] == 0
            assert t["samples"] == 1000 and t["negative_latency"] == 0
            assert 0 < t["p50_us"] <= t["p99_us"] <= t["p999_us"] <= t["max_us"]
            assert t["ring_drops"] == 0 and t["malformed"] == 0
            # Frames bigger than the receiving veth's MTU are dropped by veth itself:
            # real loss, which the count and the search both see.
            from hvnet.netns import Netns
            Netns(PREFIX).set_mtu(path.server_ns, "vb", 1000)
            lost = pair.trial(1518, 2000, 0.3)
            assert lost["sent"] > 0 and lost["received"] == 0 and lost["loss_pct"] == 100
            assert pair.trial(512, 2000, 0.3)["lost"] == 0        # small ones still pass
            z = pktgen.zero_loss(pair, 1518, 0.2, steps=2, floor=20_000)
            assert z["fps"] == 0 and z["bound"] == "path"
        assert all(p.poll() is not None for p in procs)           # ended by the block
    assert not leftovers()


@root_only
@pytest.mark.netns
def test_a_generator_on_a_missing_address_says_so():
    with e2e.veth_peer(PREFIX) as path:
        with pytest.raises(RuntimeError, match="no interface holds 10.9.0.77"):
            with pktgen.Pair(path.client_ns, path.server_ns, "10.9.0.77", path.server_ip):
                pass
    assert not leftovers()

"""Built-in forwarding against an independent, pure-Python reference model.

Random topologies (3-8 synthetic ports with untagged / access / trunk VLAN modes
drawn from a small VID set so that they overlap, some ports with the MAC spoof
guard on) and random traffic (batches of Ethernet frames, some 802.1Q tagged
with random priority and VID, source MACs from a small pool so that MACs move
between ports, destinations from the pool plus broadcast / multicast / unknown
unicast), interleaved with clock advances (FDB ageing) and VLAN
reconfigurations (which flush the port's FDB entries).

The model below is written from the forwarding semantics only: it does not call
any of the switch's code. Per batch we compare, port by port, the exact bytes
each port received (with the 802.1Q tag the switch put on the wire) and, after
every batch, every per-port counter (including drops per reason) and the
switch-wide learning / flooding counters; at the end, the FDB contents.
"""
from __future__ import annotations

import collections
import functools
from dataclasses import dataclass, field

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st
from scapy.all import IP, UDP, Dot1Q, Ether, IPv6, Raw, raw

from switch import counters as R
from switch.memport import MemoryPorts
from switch.properties import SecurityProperty, VlanProperty
from switch.switch import Switch

# --------------------------------------------------------------------------- constants
AGE_S = 4.5                       # clock advances are whole seconds: never exactly the age
AGE_NS = int(AGE_S * 1e9)
T0 = 10**12
SEC = 10**9

BCAST = 0xFFFFFFFFFFFF
STATIONS = [0x020000000001 + k for k in range(5)]      # the unicast MAC pool
MCAST_SRC = 0x01005E000001                              # group bit set: must be dropped
ZERO = 0                                                # forwarded, never learned (see model)
UNKNOWN = 0x020000000099                                # unicast that never sends
DSTS = STATIONS * 3 + [UNKNOWN, BCAST, 0x01005E000001, 0x333300000001]
SRCS = STATIONS * 6 + [MCAST_SRC, BCAST, ZERO]          # mostly valid stations

VIDS = (0, 10, 20, 30)            # access VLANs / trunk natives (0: untagged spelling)
TRUNK_VIDS = (10, 20, 30, 40)     # allowed / pruned sets
FRAME_VIDS = (0, 10, 20, 30, 40, 50)   # VIDs on the wire (0: priority-tagged)

REASON = R.BUILTIN_REASONS
TEXT_NO_DEST = REASON[R.NO_DEST]
TEXT_VLAN_IN = REASON[R.VLAN_INGRESS]
TEXT_VLAN_OUT = REASON[R.VLAN_EGRESS]
TEXT_SPOOF = REASON[R.MAC_SPOOF]
TEXT_BAD_SRC = REASON[R.BAD_SOURCE_MAC]


def mac_str(m: int) -> str:
    return ":".join(f"{(m >> s) & 0xFF:02x}" for s in range(40, -1, -8))


def is_group(m: int) -> bool:
    return bool((m >> 40) & 1)


# --------------------------------------------------------------------------- scenario
@dataclass(frozen=True)
class Vlan:
    mode: str                      # "untagged" | "access" | "trunk"
    vid: int = 0                   # access VLAN, or trunk native VLAN
    allowed: frozenset = frozenset()
    pruned: frozenset = frozenset()
    spelling: str = "prop"         # untagged only: "none" (no property), "prop", "access0"

    def prop(self) -> VlanProperty | None:
        if self.mode == "trunk":
            return VlanProperty("trunk", native_vlan=self.vid, allowed=tuple(sorted(self.allowed)),
                                pruned=tuple(sorted(self.pruned)))
        if self.mode == "access":
            return VlanProperty("access", access_vlan=self.vid)
        if self.spelling == "none":
            return None
        if self.spelling == "access0":
            return VlanProperty("access", access_vlan=0)     # same as untagged
        return VlanProperty("untagged")


@dataclass(frozen=True)
class PortSpec:
    vlan: Vlan
    mac: int                       # NIC MAC (0: none configured, so no spoof guard)
    allow_spoof: bool
    explicit_security: bool        # give a SecurityProperty even when spoofing is not allowed

    def __repr__(self):
        return (f"PortSpec(vlan={self.vlan!r}, mac={self.mac:#014x}, "
                f"allow_spoof={self.allow_spoof}, explicit_security={self.explicit_security})")


@dataclass(frozen=True)
class Frame:
    port: int                      # index into the port list
    src: int
    dst: int
    tag: tuple[int, int] | None    # (PCP, VID) of an 802.1Q tag on the wire, or untagged
    l3: str                        # "v4" | "v6"
    seq: int = 0                   # makes every frame's bytes unique

    def __repr__(self):            # MACs in hex, so falsifying examples read well
        return (f"Frame(port={self.port}, src={self.src:#014x}, dst={self.dst:#014x}, "
                f"tag={self.tag}, l3={self.l3!r}, seq={self.seq})")


@dataclass(frozen=True)
class Batch:
    frames: tuple[Frame, ...]


@dataclass(frozen=True)
class Advance:
    seconds: int


@dataclass(frozen=True)
class Reconfigure:
    port: int
    vlan: Vlan


@dataclass(frozen=True)
class Scenario:
    ports: tuple[PortSpec, ...]
    steps: tuple


# --------------------------------------------------------------------------- frames
@functools.lru_cache(maxsize=None)
def l3_bytes(l3: str, seq: int) -> bytes:
    payload = b"seq%06d" % seq + b"." * (seq % 23)
    if l3 == "v6":
        return raw(IPv6(src="fd00::1", dst="fd00::2") / UDP(sport=1000 + seq % 50, dport=2000)
                   / payload)
    return raw(IP(src="10.0.0.1", dst="10.0.0.2") / UDP(sport=1000 + seq % 50, dport=2000)
               / payload)


@functools.lru_cache(maxsize=None)
def wire(src: int, dst: int, tag: tuple[int, int] | None, l3: str, seq: int) -> bytes:
    """The frame with the given 802.1Q tag (PCP, VID) or untagged, built with scapy."""
    etype = 0x86DD if l3 == "v6" else 0x0800
    body = Raw(l3_bytes(l3, seq))
    if tag is None:
        return raw(Ether(src=mac_str(src), dst=mac_str(dst), type=etype) / body)
    prio, vid = tag
    return raw(Ether(src=mac_str(src), dst=mac_str(dst), type=0x8100)
               / Dot1Q(prio=prio, dei=0, vlan=vid, type=etype) / body)


def frame_bytes(f: Frame, tag=None, keep=True) -> bytes:
    return wire(f.src, f.dst, f.tag if keep else tag, f.l3, f.seq)


# --------------------------------------------------------------------------- the model
NOT_MEMBER = object()
UNTAGGED = object()


def ingress_vlan(v: Vlan, tag) -> int | None:
    """The VLAN a frame arriving on a port with mode ``v`` belongs to, or None (refused)."""
    vid = tag[1] if tag is not None else 0
    if v.mode == "trunk":
        if vid == 0:
            return v.vid                                   # untagged / priority-tagged: native
        if vid == v.vid or (vid in v.allowed and vid not in v.pruned):
            return vid
        return None
    if vid != 0:
        return None                                        # access/untagged: untagged only
    return v.vid if v.mode == "access" else 0


def egress(v: Vlan, vlan: int):
    """How a port with mode ``v`` receives VLAN ``vlan``: NOT_MEMBER, UNTAGGED, or a VID."""
    if v.mode == "trunk":
        if vlan == v.vid:
            return UNTAGGED
        if vlan != 0 and vlan in v.allowed and vlan not in v.pruned:
            return vlan
        return NOT_MEMBER
    if v.mode == "access":
        return UNTAGGED if vlan == v.vid else NOT_MEMBER
    return UNTAGGED if vlan == 0 else NOT_MEMBER


def port_counters():
    return {"rx_packets": 0, "rx_bytes": 0, "tx_packets": 0, "tx_bytes": 0, "dropped_in": 0,
            "dropped_out": 0, "ext_dropped_in": 0, "ext_dropped_out": 0, "rx_broadcast": 0,
            "rx_multicast": 0, "tx_broadcast": 0, "tx_multicast": 0,
            "drops_in": collections.Counter(), "drops_out": collections.Counter()}


@dataclass
class Model:
    ports: list[PortSpec]
    fdb: dict = field(default_factory=dict)            # (mac, vlan) -> [port index, last seen]
    ctr: list = field(default_factory=list)
    learned: int = 0
    moved: int = 0
    purged: int = 0
    flooded: int = 0

    def __post_init__(self):
        self.ctr = [port_counters() for _ in self.ports]

    def reconfigure(self, k: int, vlan: Vlan) -> None:
        p = self.ports[k]
        self.ports[k] = PortSpec(vlan, p.mac, p.allow_spoof, p.explicit_security)
        # A VLAN change forgets what was learned behind the port.
        for key in [key for key, (q, _) in self.fdb.items() if q == k]:
            del self.fdb[key]

    def switch_frame(self, f: Frame, now: int) -> dict[int, bytes]:
        """One frame, in order: returns {port index: delivered bytes}; updates counters."""
        k = f.port
        c = self.ctr[k]
        sent = frame_bytes(f)
        c["rx_packets"] += 1
        c["rx_bytes"] += len(sent)
        if f.dst == BCAST:
            c["rx_broadcast"] += 1
        elif is_group(f.dst):
            c["rx_multicast"] += 1
        out, reason = self._forward(f, now)
        if reason is not None:
            c["dropped_in"] += 1
            c["drops_in"][reason] += 1
            return {}
        for q, b in out.items():
            d = self.ctr[q]
            d["tx_packets"] += 1
            d["tx_bytes"] += len(b)
            if f.dst == BCAST:
                d["tx_broadcast"] += 1
            elif is_group(f.dst):
                d["tx_multicast"] += 1
        return out

    def _deliver(self, f: Frame, q: int, vlan: int) -> bytes:
        how = egress(self.ports[q].vlan, vlan)
        if how is UNTAGGED:
            return frame_bytes(f, None, keep=False)
        pcp = f.tag[0] if f.tag is not None else 0          # priority survives re-tagging
        return frame_bytes(f, (pcp, how), keep=False)

    def _forward(self, f: Frame, now: int):
        k = f.port
        me = self.ports[k]
        vlan = ingress_vlan(me.vlan, f.tag)
        if vlan is None:
            return {}, TEXT_VLAN_IN
        if not me.allow_spoof and me.mac != 0 and f.src != me.mac:
            return {}, TEXT_SPOOF
        if is_group(f.src):
            return {}, TEXT_BAD_SRC
        if f.src != 0:                                      # an all-zero source is not learned
            key = (f.src, vlan)
            if key in self.fdb:
                if self.fdb[key][0] != k:
                    self.moved += 1
                self.fdb[key] = [k, now]
            else:
                self.learned += 1
                self.fdb[key] = [k, now]
        if not is_group(f.dst):
            key = (f.dst, vlan)
            ent = self.fdb.get(key)
            if ent is not None and now - ent[1] > AGE_NS:    # aged out: forgotten
                del self.fdb[key]
                self.purged += 1
                ent = None
            if ent is not None:
                q = ent[0]
                if q == k:
                    return {}, TEXT_NO_DEST                  # never back out of the source
                if egress(self.ports[q].vlan, vlan) is NOT_MEMBER:
                    return {}, TEXT_VLAN_OUT
                return {q: self._deliver(f, q, vlan)}, None
        # broadcast, multicast, unknown unicast: every other member of the VLAN
        self.flooded += 1
        out = {q: self._deliver(f, q, vlan) for q in range(len(self.ports))
               if q != k and egress(self.ports[q].vlan, vlan) is not NOT_MEMBER}
        if not out:
            return {}, TEXT_NO_DEST
        return out, None


# --------------------------------------------------------------------------- the switch
class Harness:
    def __init__(self, specs, age_s: float = AGE_S):
        self.now = T0
        self.sw = Switch("model", max_ports=8, mac_age_s=age_s, clock=lambda: self.now)
        self.mem = MemoryPorts(in_frames=1024, in_bytes=1 << 18, out_frames=4096,
                               out_bytes=1 << 20)
        self.ports = []
        for k, s in enumerate(specs):
            props = []
            vp = s.vlan.prop()
            if vp is not None:
                props.append(vp)
            if s.allow_spoof or s.explicit_security:
                props.append(SecurityProperty(allow_mac_spoofing=s.allow_spoof))
            p = self.sw.add_port(f"p{k}", "synthetic", mac=s.mac, kind=self.mem,
                                 properties=props)
            assert p is not None
            self.ports.append(p)

    def send(self, frames) -> dict[int, list[bytes]]:
        for f in frames:
            assert self.mem.inject(self.ports[f.port], [frame_bytes(f)]) == 1
        while self.mem.pending():
            self.sw.poll()
        byid = self.mem.collect_by_port()
        idx = {p.port_id: k for k, p in enumerate(self.ports)}
        return {idx[pid]: fs for pid, fs in byid.items()}


def describe(frames, model_out, got):
    lines = []
    for f, exp in zip(frames, model_out):
        lines.append(f"  {f}: model -> {sorted(exp)}")
    lines.append(f"  switch delivered to: { {k: len(v) for k, v in sorted(got.items())} }")
    return "\n".join(lines)


def check_counters(h: Harness, m: Model):
    st_ = h.sw.stats()
    for k, p in enumerate(h.ports):
        got = dict(st_["ports"][p.name])
        exp = dict(m.ctr[k])
        exp["drops_in"] = dict(exp["drops_in"])
        exp["drops_out"] = dict(exp["drops_out"])
        got = {key: got[key] for key in exp}
        assert got == exp, f"port p{k} counters"
    sc = st_["counters"]
    assert (sc["flooded_packets"], sc["learned_macs"], sc["mac_moves"], sc["purged_macs"]) == \
        (m.flooded, m.learned, m.moved, m.purged), "switch counters (flooded, learned, moved, purged)"
    assert sc["contract_violations"] == 0 and sc["injected_packets"] == 0
    assert st_["fdb_entries"] == len(m.fdb)


def check_fdb(h: Harness, m: Model):
    idx = {p.port_id: k for k, p in enumerate(h.ports)}
    got = {(int(e["mac"].replace(":", ""), 16), e["vlan"]): idx[e["port"]]
           for e in h.sw.fdb.entries()}
    assert got == {key: q for key, (q, _) in m.fdb.items()}


def run(scn: Scenario) -> tuple[Harness, list[dict[int, list[bytes]]]]:
    """Play the scenario on the switch and the model, comparing after every batch."""
    h = Harness(scn.ports)
    m = Model(list(scn.ports))
    delivered = []
    for step in scn.steps:
        if isinstance(step, Advance):
            h.now += step.seconds * SEC
        elif isinstance(step, Reconfigure):
            h.sw.update_port_property(h.ports[step.port], step.vlan.prop()
                                      or VlanProperty("untagged"))
            m.reconfigure(step.port, step.vlan)
        else:
            outs = [m.switch_frame(f, h.now) for f in step.frames]
            exp: dict[int, list[bytes]] = {}
            for o in outs:
                for q, b in o.items():
                    exp.setdefault(q, []).append(b)
            got = h.send(step.frames)
            assert got == exp, "deliveries differ:\n" + describe(step.frames, outs, got)
            check_counters(h, m)
            delivered.append(got)
    check_fdb(h, m)
    return h, delivered


# --------------------------------------------------------------------------- strategies
vlans = st.one_of(
    st.builds(Vlan, st.just("untagged"), spelling=st.sampled_from(["none", "prop", "access0"])),
    st.builds(Vlan, st.just("access"), st.sampled_from(VIDS[1:])),
    st.builds(Vlan, st.just("trunk"), st.sampled_from(VIDS),
              st.frozensets(st.sampled_from(TRUNK_VIDS)),
              st.frozensets(st.sampled_from(TRUNK_VIDS), max_size=2)),
)

port_specs = st.builds(
    PortSpec, vlan=vlans,
    mac=st.sampled_from(STATIONS + [0]),
    allow_spoof=st.sampled_from([True, True, False]),
    explicit_security=st.booleans())


def accepted_vids(v: Vlan) -> list[int]:
    """VIDs a port with mode ``v`` takes tagged (to bias traffic towards accepted frames)."""
    if v.mode != "trunk":
        return [0]
    return [0, v.vid] + sorted(v.allowed - v.pruned)


@st.composite
def scenarios(draw):
    specs = draw(st.lists(port_specs, min_size=3, max_size=8))
    n = len(specs)

    def frame_from(k: int, s: PortSpec):
        # Half the tagged frames carry a VID the port takes, the rest any VID; a guarded
        # port mostly sends from its own MAC. Everything else stays possible.
        tags = st.one_of(st.none(), st.none(),
                         st.tuples(st.integers(0, 7), st.sampled_from(FRAME_VIDS)),
                         st.tuples(st.integers(0, 7), st.sampled_from(accepted_vids(s.vlan))))
        guarded = not s.allow_spoof and s.mac != 0
        srcs = st.sampled_from(SRCS + [s.mac] * 60) if guarded else st.sampled_from(SRCS)
        return st.builds(Frame, st.just(k), srcs, st.sampled_from(DSTS), tags,
                         st.sampled_from(["v4", "v4", "v6"]))

    frames = st.one_of(*[frame_from(k, s) for k, s in enumerate(specs)])
    batch = st.builds(Batch, st.lists(frames, min_size=1, max_size=16).map(tuple))
    step = st.one_of(batch, batch, batch, batch,
                     st.builds(Advance, st.sampled_from([1, 2, 3, 6])),
                     st.builds(Reconfigure, st.integers(0, n - 1), vlans))
    steps = draw(st.lists(step, min_size=2, max_size=16))
    # Number the frames (unique payloads), rebuilding the steps as plain values.
    seq = 0
    numbered = []
    for stp in steps:
        if isinstance(stp, Batch):
            fs = []
            for f in stp.frames:
                fs.append(Frame(f.port, f.src, f.dst, f.tag, f.l3, seq))
                seq += 1
            stp = Batch(tuple(fs))
        numbered.append(stp)
    return Scenario(tuple(specs), tuple(numbered))


# --------------------------------------------------------------------------- tests
@pytest.fixture(scope="module")
def warm():
    """Compile (or load from the numba cache) every kernel once, outside the examples."""
    specs = (PortSpec(Vlan("trunk", 0, frozenset({10})), 0, True, False),
             PortSpec(Vlan("access", 10), 0, True, False),
             PortSpec(Vlan("untagged"), 0, True, False))
    run(Scenario(specs, (Batch((Frame(0, STATIONS[0], BCAST, (3, 10), "v4", 0),
                                Frame(1, STATIONS[1], STATIONS[0], None, "v4", 1))),)))
    return True


@settings(max_examples=150, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(scn=scenarios())
def test_builtin_forwarding_matches_model(warm, scn):
    run(scn)


def test_model_harness_sees_tags_priority_and_learning(warm):
    """Hand-picked scenario: trunk tagging with priority, native untagging, learning,
    a MAC move, multicast source, spoof guard and the never-back-to-source rule."""
    A, B, C = STATIONS[:3]
    specs = (PortSpec(Vlan("trunk", 20, frozenset({10, 30}), frozenset({30})), 0, True, False),
             PortSpec(Vlan("access", 10), A, False, True),
             PortSpec(Vlan("access", 20), 0, True, False),
             PortSpec(Vlan("untagged"), C, False, False))
    steps = (
        Batch((Frame(1, A, BCAST, None, "v4", 1),           # VLAN 10: flood -> p0 tagged 10, PCP 0
               Frame(0, B, A, (5, 10), "v6", 2),            # A known on p1: untagged there
               Frame(1, A, B, (0, 0), "v4", 3),             # priority-tagged in; B known on p0
               Frame(2, B, A, None, "v4", 4),               # VLAN 20: A unknown -> p0 native
               Frame(0, B, BCAST, (6, 30), "v4", 5),        # VID 30 allowed but pruned: refused
               Frame(1, B, BCAST, None, "v4", 6),           # p1 guards MAC A: spoof drop
               Frame(3, MCAST_SRC, BCAST, None, "v4", 7),   # p3 guards MAC C: spoof check first
               Frame(3, C, C, None, "v4", 8),               # own MAC on own port: dropped
               Frame(0, A, BCAST, (2, 10), "v4", 9),        # A moves to p0 (VLAN 10)
               Frame(1, A, B, (4, 0), "v4", 10),            # ...and back; B on p0: tagged PCP 4
               Frame(2, ZERO, BCAST, None, "v4", 11),       # zero source: flooded, not learned
               Frame(2, B, B, None, "v4", 12))),            # B is behind p2 in VLAN 20: dropped
        Advance(6),
        Batch((Frame(0, C, A, (7, 10), "v4", 13),)),          # aged out: flood (p1 only), untagged
    )
    h, got = run(Scenario(specs, steps))
    # The same expectations written out by hand, so the model is pinned too.
    fr = {f.seq: f for f in steps[0].frames + steps[2].frames}

    def w(n, tag=None):
        return wire(fr[n].src, fr[n].dst, tag, fr[n].l3, n)
    assert got == [{0: [w(1, (0, 10)), w(3, (0, 10)), w(4), w(10, (4, 10)), w(11)],
                    1: [w(2), w(9)]},
                   {1: [w(13)]}]
    drops = {p.name: h.sw.stats()["ports"][p.name]["drops_in"] for p in h.ports}
    assert drops == {"p0": {TEXT_VLAN_IN: 1}, "p1": {TEXT_SPOOF: 1},
                     "p2": {TEXT_NO_DEST: 1}, "p3": {TEXT_SPOOF: 1, TEXT_NO_DEST: 1}}


def test_ageing_resumes_unknown_unicast_flooding(warm):
    A, B = STATIONS[:2]
    specs = tuple(PortSpec(Vlan("access", 10), 0, True, False) for _ in range(4))
    h = Harness(specs)
    f = functools.partial(Frame, l3="v4", tag=None)
    h.send([f(0, A, BCAST, seq=1)])                                  # learn A on p0
    assert set(h.send([f(1, B, A, seq=2)])) == {0}                   # known unicast
    h.now += 4 * SEC
    h.send([f(0, A, BCAST, seq=3)])                                  # refresh A
    h.now += 4 * SEC                                                 # 8 s after first sight
    assert set(h.send([f(1, B, A, seq=4)])) == {0}                   # still known (refreshed)
    h.now += AGE_NS + 1
    assert set(h.send([f(1, B, A, seq=5)])) == {0, 2, 3}             # aged out: flooded again
    assert h.sw.stats()["counters"]["purged_macs"] == 1
    assert set(h.send([f(2, B, A, seq=6)])) == {0, 1, 3}             # and stays unknown


def test_ageing_counts_from_the_last_frame_seen(warm):
    A, B = STATIONS[:2]
    specs = tuple(PortSpec(Vlan("untagged"), 0, True, False) for _ in range(3))
    h = Harness(specs, age_s=0.08)
    f = functools.partial(Frame, l3="v4", tag=None)
    h.send([f(0, A, BCAST, seq=1)])                                  # t = 0: A behind p0
    h.now += 100_000_000
    h.send([f(0, A, BCAST, seq=2)])                                  # t = 0.1 s: A again
    # A was seen 0 s ago, well within the 0.08 s ageing time: known unicast to p0 only.
    assert set(h.send([f(1, B, A, seq=3)])) == {0}

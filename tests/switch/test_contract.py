"""The Hyper-V extension contract, rule by rule (vswitch_vmq_sriov.md checklist A).

Each test sets up extensions that follow or break one rule and checks what the
switch does: the violation it records (naming the extension and the rule), the
packets it drops and why, and that it keeps switching afterwards.
"""
from __future__ import annotations

import numpy as np
import pytest

from switch import counters as R
from switch.batch import (D_EXCLUDED, D_PRESERVE_VLAN, DROP, DST0, LEN, NDST, OFF, SRC_NIC,
                          SRC_PORT, dest_make, dest_port)
from switch.contract import ContractViolation
from switch.extension import (CaptureExtension, FilterExtension, ForwardingExtension,
                              NdisStatus, Oid, Veto)
from switch.port import LifecycleError, ObjectReferenced
from switch.properties import AclProperty, AclRule, CustomProperty, VlanProperty
from switch.switch import ExtensionError
from tests.conftest import Rig, mac, udp

BCAST = "ff:ff:ff:ff:ff:ff"


def last_violation(sw) -> ContractViolation:
    v = [x for x in sw.violations if isinstance(x, ContractViolation)]
    assert v, "expected a contract violation"
    return v[-1]


def still_switches(r: Rig) -> None:
    out = r.send(1, udp(1, BCAST))
    assert set(out) == {2, 3}


class Recorder(FilterExtension):
    """Records hook order and what it saw."""
    log: list

    def __init__(self, name, log, kind="filter"):
        super().__init__(name)
        self.log = log
        type(self).kind = kind

    def ingress(self, pkts, act):
        self.log.append((self.name, "in", pkts.meta[NDST, :pkts.n].copy(),
                         pkts.meta[DROP, :pkts.n].copy()))

    def egress(self, pkts, act):
        self.log.append((self.name, "out", pkts.meta[NDST, :pkts.n].copy(),
                         pkts.meta[DROP, :pkts.n].copy()))


def recorder(kind, name, log):
    base = {"capture": CaptureExtension, "filter": FilterExtension,
            "forwarding": ForwardingExtension}[kind]

    class Rec(base):
        def ingress(self, pkts, act):
            log.append((self.name, "in", pkts.meta[NDST, :pkts.n].copy(),
                        pkts.meta[DROP, :pkts.n].copy()))

        def egress(self, pkts, act):
            log.append((self.name, "out", pkts.meta[NDST, :pkts.n].copy(),
                        pkts.meta[DROP, :pkts.n].copy(),
                        pkts.meta[DST0, :pkts.n].copy()))
    return Rec(name)


# ---------------------------------------------------------------- A.1 stack order
def test_a1_order_by_class_newest_on_top_and_egress_mirrors_ingress():
    r = Rig()
    log: list = []
    r.sw.install(recorder("filter", "f-old", log))
    r.sw.install(recorder("capture", "c-old", log))
    r.sw.install(recorder("filter", "f-new", log))
    r.sw.install(recorder("capture", "c-new", log))
    assert r.sw.extension_order() == ["c-new", "c-old", "f-new", "f-old"]
    r.send(1, udp(1, BCAST))
    seen = [(n, d) for n, d, *_ in log]
    assert seen == [("c-new", "in"), ("c-old", "in"), ("f-new", "in"), ("f-old", "in"),
                    ("f-old", "out"), ("f-new", "out"), ("c-old", "out"), ("c-new", "out")]


def test_a1_reorder_only_within_a_class():
    r = Rig()
    for kind, name in (("filter", "f1"), ("filter", "f2"), ("capture", "c1")):
        r.sw.install(recorder(kind, name, []))
    r.sw.set_extension_order(["c1", "f1", "f2"])
    assert r.sw.extension_order() == ["c1", "f1", "f2"]
    with pytest.raises(ExtensionError, match="A.1"):
        r.sw.set_extension_order(["f1", "c1", "f2"])
    assert r.sw.extension_order() == ["c1", "f1", "f2"]


# ---------------------------------------------------------------- A.2 one forwarder
def test_a2_second_forwarder_cannot_be_enabled():
    r = Rig()
    r.sw.install(recorder("forwarding", "fw1", []))
    with pytest.raises(ExtensionError, match=r"A\.2.*fw1|fw1.*A\.2"):
        r.sw.install(recorder("forwarding", "fw2", []))
    r.sw.install(recorder("forwarding", "fw3", []), enabled=False)
    with pytest.raises(ExtensionError, match="A.2"):
        r.sw.enable("fw3")
    r.sw.disable("fw1")
    r.sw.enable("fw3")
    assert r.sw.forwarder.name == "fw3"


# ---------------------------------------------------------------- A.3 capture only looks
class CaptureThatWrites(CaptureExtension):
    def ingress(self, pkts, act):
        pkts.data[0] = 0xFF


class CaptureThatDrops(CaptureExtension):
    def ingress(self, pkts, act):
        pkts.meta[DROP, 0] = 99


class CaptureThatVetoes(CaptureExtension):
    def port_create(self, port):
        raise Veto("no")


class CaptureThatClones(CaptureExtension):
    def ingress(self, pkts, act):
        act.clone([0])


@pytest.mark.parametrize("ext", [CaptureThatWrites("cap-w"), CaptureThatDrops("cap-d"),
                                 CaptureThatClones("cap-c")])
def test_a3_capture_cannot_modify_drop_or_clone(ext):
    r = Rig()
    r.sw.install(ext)
    out = r.send(1, udp(1, BCAST))
    assert out == {}
    v = last_violation(r.sw)
    assert v.extension == ext.name and v.rule == 3
    assert "A.3" in str(v) and ext.name in str(v)
    assert r.drops(1) == {R.BUILTIN_REASONS[R.CONTRACT]: 1}
    r.sw.uninstall(ext.name)
    still_switches(r)


def test_a3_capture_veto_is_ignored():
    r = Rig()
    r.sw.install(CaptureThatVetoes("cap-v"))
    p = r.sw.add_port("p9", "synthetic", mac=mac(9), kind=r.mem)
    assert p is not None and p.connected
    v = last_violation(r.sw)
    assert v.rule == 3 and "PORT_CREATE" in str(v)


def test_a3_capture_sees_read_only_arrays_in_numba_too():
    from numba import njit

    @njit
    def poke(meta):
        meta[0, 0] = 1

    class NumbaCapture(CaptureExtension):
        def ingress(self, pkts, act):
            poke(pkts.meta)

    r = Rig()
    r.sw.install(NumbaCapture("cap-nb"))
    assert r.send(1, udp(1, BCAST)) == {}
    assert last_violation(r.sw).rule == 3


# ---------------------------------------------------------------- A.4 filters
class FilterAddsDest(FilterExtension):
    def ingress(self, pkts, act):
        pkts.meta[DST0, 0] = 2


class FilterDropsUdp2000(FilterExtension):
    def attach(self, h):
        self.code = h.reason("no port 2000")

    def ingress(self, pkts, act):
        act.drop[:pkts.n] = np.where(pkts.meta[25, :pkts.n] == 2000, self.code, act.drop[:pkts.n])


def test_a4_filter_cannot_add_destinations_or_write_packets():
    r = Rig()
    r.sw.install(FilterAddsDest("f-add"))
    assert r.send(1, udp(1, BCAST)) == {}
    v = last_violation(r.sw)
    assert v.rule == 4 and v.extension == "f-add" and v.packets == 1
    r.sw.uninstall("f-add")
    still_switches(r)


def test_a4_filter_may_drop_with_its_reason():
    r = Rig()
    r.sw.install(FilterDropsUdp2000("f-drop"))
    assert r.send(1, udp(1, BCAST, dport=2000)) == {}
    assert set(r.send(1, udp(1, BCAST, dport=2001))) == {2, 3}
    d = r.sw.counters.port_dict(r.ports[0].port_id)
    assert d["drops_in"] == {"f-drop: no port 2000": 1}
    assert d["ext_dropped_in"] == 1
    assert not r.sw.violations


# ---------------------------------------------------------------- A.5 destinations
class StaticFwd(ForwardingExtension):
    """Sends everything to the given port IDs."""

    def __init__(self, name, targets, flags=0, count=None):
        super().__init__(name)
        self.targets, self.flags, self.count = targets, flags, count

    def ingress(self, pkts, act):
        for k, q in enumerate(self.targets):
            act.dests[k, :pkts.n] = dest_make(q, 0, self.flags)
        act.ndst[:pkts.n] = len(self.targets) if self.count is None else self.count


class FwdWritesOnEgress(StaticFwd):
    def egress(self, pkts, act):
        pkts.meta[NDST, 0] = 0


def test_a5_forwarder_adds_destinations_on_ingress():
    r = Rig()
    r.sw.install(StaticFwd("fw", [r.ports[2].port_id]))
    assert set(r.send(1, udp(1, 2))) == {3}
    assert not r.sw.violations


def test_a5_destinations_cannot_change_on_egress():
    r = Rig()
    r.sw.install(FwdWritesOnEgress("fw", [r.ports[2].port_id]))
    assert r.send(1, udp(1, 2)) == {}
    v = last_violation(r.sw)
    assert v.rule == 5 and "egress" in str(v)


@pytest.mark.parametrize("kw, what", [({"count": 65}, "destination count"),
                                      ({"flags": D_EXCLUDED}, "flags")])
def test_a5_bad_destination_arrays_are_violations(kw, what):
    r = Rig()
    r.sw.install(StaticFwd("fw", [r.ports[1].port_id], **kw))
    assert r.send(1, udp(1, 2)) == {}
    v = last_violation(r.sw)
    assert v.rule == 5 and what in str(v)
    assert r.drops(1) == {R.BUILTIN_REASONS[R.CONTRACT]: 1}


# ---------------------------------------------------------------- A.6 exclusions stick
def excluder(name, target_pos, clear=False):
    class Ex(FilterExtension):
        def attach(self, h):
            self.code = h.reason(f"excluded by {name}")

        def egress(self, pkts, act):
            if clear:
                act.exclude[:, :pkts.n] = 0
            else:
                act.exclude[target_pos, :pkts.n] = self.code
    return Ex(name)


def test_a6_upper_extension_cannot_clear_an_exclusion():
    r = Rig()
    r.sw.install(excluder("lower", 0))           # installed first: lower in the stack,
    r.sw.install(excluder("upper", 0, clear=True))  # so it runs first on egress
    out = r.send(1, udp(1, BCAST))
    assert set(out) == {3}                     # p2 (first destination) stays excluded
    v = last_violation(r.sw)
    assert v.extension == "upper" and v.rule == 6
    assert r.drops_out(2) == {"lower: excluded by lower": 1}


# ---------------------------------------------------------------- A.7 drops need reasons
def test_a7_all_excluded_is_a_drop_and_every_exclusion_is_counted():
    class ExAll(FilterExtension):
        def attach(self, h):
            self.code = h.reason("quarantine")

        def egress(self, pkts, act):
            act.exclude[:, :pkts.n] = self.code

    r = Rig()
    r.sw.install(ExAll("ex"))
    assert r.send(1, udp(1, BCAST)) == {}
    assert r.drops(1) == {R.BUILTIN_REASONS[R.NO_DEST]: 1}
    assert r.drops_out(2) == {"ex: quarantine": 1} == r.drops_out(3)
    assert r.sw.counters.port_dict(r.ports[1].port_id)["ext_dropped_out"] == 1


def test_a7_unregistered_reason_is_a_violation():
    class BadCode(FilterExtension):
        def ingress(self, pkts, act):
            act.drop[:pkts.n] = R.MAC_SPOOF     # a built-in code it does not own

    r = Rig()
    r.sw.install(BadCode("bad"))
    assert r.send(1, udp(1, BCAST)) == {}
    v = last_violation(r.sw)
    assert v.rule == 7
    assert r.drops(1) == {R.BUILTIN_REASONS[R.CONTRACT]: 1}


def test_a7_forwarder_with_zero_destinations_drops():
    r = Rig()
    r.sw.install(StaticFwd("fw", []))
    assert r.send(1, udp(1, 2)) == {}
    assert r.drops(1) == {R.BUILTIN_REASONS[R.NO_DEST]: 1}


# ---------------------------------------------------------------- A.8 ingress/egress shape
def test_a8_no_destinations_on_ingress_always_some_on_egress():
    r = Rig()
    log: list = []
    r.sw.install(recorder("filter", "rec", log))
    r.send(1, udp(1, BCAST), udp(1, 2), udp(1, 77))
    (_, _, ndst_in, _), (_, _, ndst_out, drop_out, _) = log
    assert (ndst_in == 0).all()
    assert ((ndst_out > 0) | (drop_out != 0)).all()


# ---------------------------------------------------------------- A.9 origination
class Originator(FilterExtension):
    def __init__(self, name, frame, path="ingress", source=None):
        super().__init__(name)
        self.frame, self.path, self.source, self.done = frame, path, source, False

    def ingress(self, pkts, act):
        if self.done:
            return
        self.done = True
        b = act.originate()
        b.append_frames([self.frame])
        if self.source is not None:
            act.set_source(b, self.source)
        act.inject(b, self.path)


def acl_deny_all_out():
    return AclProperty((AclRule("out", "deny", 1),))


def test_a9_originated_packets_come_from_the_default_port_and_bypass_port_acls():
    r = Rig()
    r.sw.add_port_property(r.ports[0], acl_deny_all_out())
    r.sw.install(Originator("orig", udp(1, BCAST, dport=7)))
    out = r.send(1, udp(1, BCAST))          # the port's own frame hits its ACL...
    assert r.drops(1) == {R.BUILTIN_REASONS[R.ACL_OUTBOUND]: 1}
    assert set(out) == {1, 2, 3}              # ...the originated one is trusted
    assert r.sw.counters.port[0, R.RX_PKTS] == 1   # counted on the default port
    assert r.sw.counters.switch[R.SW_INJECTED] == 1


def test_a9_resourced_packets_get_the_port_policies():
    r = Rig()
    r.sw.add_port_property(r.ports[0], acl_deny_all_out())
    r.sw.install(Originator("orig", udp(1, BCAST, dport=7), source=r.ports[0].port_id))
    assert r.send(2, udp(2, BCAST)) .keys() == {1, 3}
    assert r.drops(1) == {R.BUILTIN_REASONS[R.ACL_OUTBOUND]: 1}


def test_a9_filters_cannot_inject_on_egress():
    r = Rig()
    r.sw.install(Originator("orig", udp(1, BCAST), path="egress"))
    assert r.send(1, udp(1, BCAST)) == {}
    v = last_violation(r.sw)
    assert v.rule == 9 and v.extension == "orig"


# ---------------------------------------------------------------- A.10 clones
def test_a10_clone_injected_on_ingress_gets_destinations_recomputed_and_no_context():
    seen = []

    class Cloner(FilterExtension):
        uses_context = True

        def __init__(self):
            super().__init__("cloner")
            self.done = False

        def ingress(self, pkts, act):
            act.ctx[:pkts.n] = 42

        def egress(self, pkts, act):
            seen.append(act.ctx[:pkts.n].copy())
            if not self.done:
                self.done = True
                c = act.clone([0])
                assert c.meta[NDST, 0] == 0       # destinations dropped by the clone
                act.inject(c, "ingress")

    r = Rig()
    r.sw.install(Cloner())
    out = r.send(1, udp(1, BCAST))
    assert {k: len(v) for k, v in out.items()} == {2: 2, 3: 2}
    # original: the context it set on ingress; the clone: none (it never had ingress here)
    assert list(seen[0]) == [42] and list(seen[1]) == [0]


def test_a10_forwarder_clone_on_egress_keeps_destinations():
    class CloneFwd(StaticFwd):
        def ingress(self, pkts, act):
            super().ingress(pkts, act)
            if pkts.meta[SRC_PORT, 0] != 0:
                # destinations of the clone: the static target only
                act.dests[0, 0] = dest_make(self.targets[0], 0, 0)
                act.ndst[0] = 1

        def egress(self, pkts, act):
            if not getattr(self, "done", False):
                self.done = True
                act.clone([0], keep_destinations=True)

    r = Rig()
    fw = CloneFwd("fw", [r.ports[2].port_id])
    r.sw.install(fw)
    # keep_destinations is only for the forwarder on ingress: on egress it is a violation
    assert r.send(1, udp(1, 2)) == {}
    assert last_violation(r.sw).rule == 10


def test_a10_forwarder_clone_with_destinations_injected_on_egress():
    class Mirror(StaticFwd):
        def ingress(self, pkts, act):
            super().ingress(pkts, act)
            if pkts.meta[SRC_PORT, 0] == 0:
                return
            c = act.clone(list(range(pkts.n)), keep_destinations=True)
            # the clone carries the destinations assigned so far...
            assert c.meta[NDST, 0] == 1 and dest_port(c.meta[DST0, 0]) == self.targets[0]
            # ...and goes to p2 instead (destinations set before injecting, 1.6)
            c.meta[DST0, :c.n] = dest_make(self.mirror, 0, 0)
            c.meta[NDST, :c.n] = 1
            act.inject(c, "egress")

    r = Rig()
    fw = Mirror("fw", [r.ports[2].port_id])
    fw.mirror = r.ports[1].port_id
    r.sw.install(fw)
    out = r.send(1, udp(1, 5))
    assert {k: len(v) for k, v in out.items()} == {2: 1, 3: 1}
    assert not r.sw.violations


# ---------------------------------------------------------------- A.13 standard properties
def test_a13_standard_properties_go_to_the_forwarder():
    r = Rig()
    r.sw.add_port_property(r.ports[0], VlanProperty("access", access_vlan=10))
    tagged = udp(1, BCAST, vid=20)
    assert r.send(1, tagged) == {}               # built-in: access port may not send VID 20
    assert r.drops(1) == {R.BUILTIN_REASONS[R.VLAN_INGRESS]: 1}
    r.sw.install(StaticFwd("fw", [r.ports[1].port_id], flags=D_PRESERVE_VLAN))
    out = r.send(1, tagged)                      # forwarder enforces (here: it does not)
    assert out == {2: [tagged]}


# ---------------------------------------------------------------- A.15 built-in policy order
def test_a15_builtin_policies_sit_between_filters_and_forwarder():
    r = Rig()
    log: list = []
    r.sw.install(recorder("filter", "filt", log))
    r.sw.install(recorder("forwarding", "fw-rec", log))
    fw = r.sw._find("fw-rec").ext
    fw.ingress = lambda pkts, act: (log.append(("fw", "in", None, pkts.meta[DROP, :pkts.n].copy())),
                                    act.dests.__setitem__((0, slice(0, pkts.n)),
                                                          dest_make(r.ports[1].port_id, 0, 0)),
                                    act.ndst.__setitem__(slice(0, pkts.n), 1))
    r.sw._rebuild()
    r.sw.add_port_property(r.ports[0], AclProperty((AclRule("out", "deny", 1, "udp",
                                                            remote_port=9),)))
    r.sw.add_port_property(r.ports[1], AclProperty((AclRule("in", "deny", 1, "udp",
                                                            local_port=8),)))
    r.send(1, udp(1, 2, dport=9), udp(1, 2, dport=8))
    by = {(n, d): rest for n, d, *rest in log}
    # ingress: the filter sees both alive; the port ACL (outbound) then drops dport 9
    assert list(by[("filt", "in")][1]) == [0, 0]
    assert list(by[("fw", "in")][1]) == [R.ACL_OUTBOUND, 0]
    # egress: the forwarder sees p2 not excluded; the filter sees the inbound ACL's exclusion
    fw_out = by[("fw-rec", "out")]
    filt_out = by[("filt", "out")]
    assert not (fw_out[2][1] & D_EXCLUDED)
    assert filt_out[2][1] & D_EXCLUDED or filt_out[1][1] == R.NO_DEST
    assert r.drops_out(2) == {R.BUILTIN_REASONS[R.ACL_INBOUND]: 1}


# ---------------------------------------------------------------- A.16 lifecycle
def test_a16_lifecycle_order_is_enforced_and_seen_by_extensions():
    seen = []

    class Watch(FilterExtension):
        def __getattr__(self, name):
            if name in {o.hook for o in Oid}:
                return lambda *a: seen.append(name)
            raise AttributeError(name)

    r = Rig()
    r.sw.install(Watch("watch"))
    p = r.sw.create_port("vm", "synthetic")
    with pytest.raises(LifecycleError):
        r.sw.connect_nic(p)                    # no NIC yet
    r.sw.create_nic(p, mac=mac(7))
    with pytest.raises(LifecycleError, match="A.16"):
        r.sw.teardown_port(p)                  # NIC still there
    r.sw.connect_nic(p)
    with pytest.raises(LifecycleError, match="A.16"):
        r.sw.delete_nic(p)                     # still connected
    r.sw.disconnect_nic(p)
    r.sw.delete_nic(p)
    with pytest.raises(LifecycleError, match="A.16"):
        r.sw.delete_port(p)                    # not torn down
    r.sw.teardown_port(p)
    r.sw.delete_port(p)
    assert seen == ["port_create", "nic_create", "nic_connect", "nic_disconnect",
                    "nic_delete", "port_teardown", "port_delete"]


# ---------------------------------------------------------------- A.17 veto rules
class Vetoer(FilterExtension):
    def __init__(self, name, hooks, status=NdisStatus.DATA_NOT_ACCEPTED):
        super().__init__(name)
        self.calls = 0
        for h in hooks:
            setattr(self, h, self._veto)
        self.status = status

    def _veto(self, *a):
        self.calls += 1
        raise Veto("policy says no", self.status)


class Completions(FilterExtension):
    def __init__(self):
        super().__init__("watch")
        self.done = []

    def oid_complete(self, oid, status, *args):
        self.done.append((oid, status))


def test_a17_vetoable_requests_fail_and_upper_extensions_see_it():
    r = Rig()
    r.sw.install(Vetoer("vetoer", ["port_create", "port_property_add", "switch_property_add"]))
    watch = r.sw.install(Completions())        # newest: above the vetoer
    assert r.sw.create_port("vm", "synthetic") is None
    assert "vm" not in {p.name for p in r.sw.ports.values()}
    assert (Oid.PORT_CREATE, NdisStatus.DATA_NOT_ACCEPTED) in watch.done
    assert r.sw.add_port_property(r.ports[0], VlanProperty("access", access_vlan=5)) \
        == NdisStatus.DATA_NOT_ACCEPTED
    assert ("VlanProperty", None) not in r.ports[0].properties
    assert r.sw.set_switch_property(CustomProperty("x")) == NdisStatus.DATA_NOT_ACCEPTED
    assert not r.sw.violations


def test_a17_must_not_fail_requests_cannot_be_vetoed():
    r = Rig()
    r.sw.install(Vetoer("vetoer", ["nic_connect", "nic_disconnect"]))
    p = r.sw.add_port("vm", "synthetic", mac=mac(9), kind=r.mem)
    assert p.connected
    v = last_violation(r.sw)
    assert v.rule == 17 and "NIC_CONNECT" in str(v)
    r.sw.remove_port(p)
    assert "vm" not in {q.name for q in r.sw.ports.values()}


def test_a17_resources_is_retried():
    r = Rig()
    veto = r.sw.install(Vetoer("busy", ["port_create"], NdisStatus.RESOURCES))
    assert r.sw.create_port("vm", "synthetic") is None
    assert veto.calls == 4                     # first try and three retries


def test_a17_nic_create_veto_only_for_index_0():
    r = Rig()
    r.sw.install(Vetoer("vetoer", ["nic_create"]))
    up = r.sw.create_port("uplink", "external")
    assert r.sw.create_nic(up, 0) is None
    assert r.sw.create_nic(up, 1) is not None
    assert last_violation(r.sw).rule == 17


# ---------------------------------------------------------------- A.18 create success
def test_a18_completing_a_create_with_success_is_a_violation():
    class Eager(FilterExtension):
        def port_create(self, port):
            return NdisStatus.SUCCESS

    r = Rig()
    r.sw.install(Eager("eager"))
    assert r.sw.create_port("vm", "synthetic") is not None
    v = last_violation(r.sw)
    assert v.rule == 18 and v.extension == "eager"


# ---------------------------------------------------------------- A.19 connected NICs only
def test_a19_forwarder_cannot_target_a_nic_that_is_not_connected():
    r = Rig()
    p = r.sw.create_port("vm", "synthetic", kind=r.mem)
    r.sw.create_nic(p, mac=mac(9))             # created, not connected
    r.sw.install(StaticFwd("fw", [p.port_id]))
    assert r.send(1, udp(1, 9)) == {}
    v = last_violation(r.sw)
    assert v.rule == 19
    assert r.drops(1) == {R.BUILTIN_REASONS[R.CONTRACT]: 1}


def test_a19_no_requests_or_resourcing_to_unconnected_nics():
    class Asker(FilterExtension):
        pass

    r = Rig()
    ext = r.sw.install(Asker("asker"))
    p = r.sw.create_port("vm", "synthetic", kind=r.mem)
    r.sw.create_nic(p, mac=mac(9))
    assert ext.switch.nic_request(p.port_id, 0, "OID_GEN_STATISTICS") == NdisStatus.FAILURE
    assert last_violation(r.sw).rule == 19
    r.sw.install(Originator("orig", udp(9, BCAST), source=p.port_id))
    assert r.send(1, udp(1, BCAST)) == {}       # the hook failed: its batch is dropped
    v = last_violation(r.sw)
    assert v.rule == 19 and v.extension == "orig" and v.packets == 1
    assert r.send(1, udp(1, BCAST)).keys() == {2, 3}   # and the switch goes on


def test_switch_itself_may_send_to_a_created_nic():
    r = Rig()
    p = r.sw.create_port("vm", "synthetic", kind=r.mem)
    r.sw.create_nic(p, mac=mac(9))
    assert set(r.send(1, udp(1, BCAST))) == {2, 3}
    byid = r.sw.counters.port_dict(p.port_id)
    assert byid["tx_packets"] == 1


# ---------------------------------------------------------------- A.20 references
def test_a20_references_block_deletion():
    r = Rig()
    ext = r.sw.install(FilterExtension("holder"))
    p = r.ports[2]
    ext.switch.reference_port(p.port_id)
    ext.switch.reference_nic(p.port_id, 0)
    r.sw.disconnect_nic(p)
    with pytest.raises(ObjectReferenced, match="A.20"):
        r.sw.delete_nic(p)
    ext.switch.dereference_nic(p.port_id, 0)
    r.sw.delete_nic(p)
    r.sw.teardown_port(p)
    with pytest.raises(ObjectReferenced):
        r.sw.delete_port(p)
    ext.switch.dereference_port(p.port_id)
    r.sw.delete_port(p)
    assert p.port_id not in r.sw.ports


def test_a20_nic_reference_only_while_connected():
    r = Rig()
    ext = r.sw.install(FilterExtension("holder"))
    p = r.sw.create_port("vm", "synthetic")
    r.sw.create_nic(p, mac=mac(9))
    ext.switch.reference_nic(p.port_id, 0)
    assert last_violation(r.sw).rule == 20
    assert p.nics[0].refs == 0


# ---------------------------------------------------------------- strict mode
def test_strict_mode_raises_after_the_batch_is_accounted():
    r = Rig(strict=True)
    r.sw.install(FilterAddsDest("f-add"))
    r.mem.inject(r.ports[0], [udp(1, BCAST)])
    with pytest.raises(ContractViolation, match="f-add"):
        r.sw.poll()
    assert r.drops(1) == {R.BUILTIN_REASONS[R.CONTRACT]: 1}


def test_a_failing_hook_is_contained():
    class Boom(FilterExtension):
        def ingress(self, pkts, act):
            raise RuntimeError("bug in extension")

    r = Rig()
    r.sw.install(Boom("boom"))
    assert r.send(1, udp(1, BCAST)) == {}
    assert "bug in extension" in str(r.sw.violations[-1])
    assert r.drops(1) == {R.BUILTIN_REASONS[R.EXT_FAULT]: 1}
    r.sw.uninstall("boom")
    still_switches(r)


def test_destination_helpers_roundtrip():
    from switch.batch import D_TAGGED, dest_excluded, dest_nic, dest_reason, dest_tag
    d = dest_make(513, 3, D_PRESERVE_VLAN)
    assert dest_port(d) == 513 and dest_nic(d) == 3 and d & D_PRESERVE_VLAN
    assert not dest_excluded(d) and dest_tag(d) == -1
    e = d | D_EXCLUDED | (77 << 32) | D_TAGGED | (0xA00A << 48)
    e -= 1 << 64                                 # as the int64 row holds it: priority 5
    #                                              sets the sign bit, which must not leak
    assert dest_excluded(e) and dest_reason(e) == 77 and dest_tag(e) == 0xA00A
    assert dest_port(e) == 513


# ---------------------------------------------------------------- hostile injections
class Forger(FilterExtension):
    """Originates a packet, then scribbles on the batch it injects."""

    def __init__(self, name, field, value, path="ingress", n=None):
        super().__init__(name)
        self.field, self.value, self.path, self.n, self.done = field, value, path, n, False

    def ingress(self, pkts, act):
        if self.done:
            return
        self.done = True
        b = act.originate()
        b.append_frames([udp(1, BCAST)])
        b.meta[self.field, 0] = self.value
        if self.n is not None:
            b.n = self.n
        act.inject(b, self.path)


@pytest.mark.parametrize("field, value, rule", [
    (SRC_PORT, 60000, 19), (SRC_PORT, -5, 19), (SRC_NIC, 200, 19),
    (OFF, 2**62, 9), (LEN, 2**63 - 1, 9), (OFF, -1, 9)])
def test_forged_injected_packets_are_dropped_not_followed(field, value, rule):
    r = Rig()
    r.sw.install(Forger("forger", field, value))
    out = r.send(1, udp(1, BCAST))
    assert set(out) == {2, 3}                       # the port's own frame; not the forgery
    assert all(len(v) == 1 for v in out.values())
    v = last_violation(r.sw)
    assert v.extension == "forger" and v.rule == rule
    assert r.sw.counters.port_dict(0)["drops_in"] == {R.BUILTIN_REASONS[R.CONTRACT]: 1}
    still_switches(r)


def test_injected_batch_count_beyond_capacity_is_refused():
    r = Rig()
    r.sw.install(Forger("forger", DROP, 0, n=10**6))
    assert set(r.send(1, udp(1, BCAST))) == {2, 3}
    assert "claiming 1000000 packets" in str(last_violation(r.sw))


def test_forged_egress_clone_destinations_are_checked():
    class BadMirror(StaticFwd):
        def ingress(self, pkts, act):
            super().ingress(pkts, act)
            if pkts.meta[SRC_PORT, 0] == 0:
                return
            c = act.clone([0], keep_destinations=True)
            c.meta[DST0, 0] = 0xFFFF            # a port that does not exist
            c.meta[NDST, 0] = 1
            act.inject(c, "egress")

    r = Rig()
    r.sw.install(BadMirror("fw", [r.ports[2].port_id]))
    out = r.send(1, udp(1, 2))
    assert set(out) == {3}
    assert last_violation(r.sw).rule == 19

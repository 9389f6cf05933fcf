"""Topology files: the examples load, and every kind of mistake is named with its place."""
from __future__ import annotations

from pathlib import Path

import pytest

from hvnet.topology import TopologyError, load, parse
from switch.properties import VlanProperty

ROOT = Path(__file__).resolve().parents[2]

GOOD = """
name: t1
switches:
  sw0:
    uplink: {}
vms:
  vm1:
    nics:
      - {switch: sw0, kind: synthetic, mac: "02:00:00:00:00:01", addresses: [10.0.0.1/24],
         vlan: {mode: trunk, native: 5, allowed: "10,20-22", pruned: [21]}}
physical:
  peer: {switch: sw0, addresses: [10.0.0.9/24]}
"""


@pytest.mark.parametrize("path", sorted((ROOT / "topologies").glob("*.yaml")))
def test_shipped_topologies_load(path):
    t = load(path)
    assert t.switches and (t.vms or t.host)


def test_good_file_becomes_switch_properties():
    t = parse(GOOD, "good.yaml")
    [nic] = t.vms["vm1"]
    assert nic.port.mac == 0x020000000001
    assert nic.port.vlan == VlanProperty("trunk", native_vlan=5, allowed=(10, 20, 21, 22),
                                         pruned=(21,))
    assert t.physical["peer"].switch == "sw0"


@pytest.mark.parametrize("edit, where, what", [
    (("name: t1", "name: Toolong1"), "name", "not a valid name"),
    (("  sw0:\n    uplink: {}", "  sw0:\n    uplink: {}\n    colour: red"), "switches.sw0.colour",
     "unknown key"),
    (("kind: synthetic", "kind: virtio"), "vms.vm1.nics[0].kind", "'virtio'"),
    (("switch: sw0, kind", "switch: sw9, kind"), "vms.vm1.nics[0].switch", "no switch named 'sw9'"),
    (('mac: "02:00:00:00:00:01"', 'mac: "02:00:00:00:01"'), "vms.vm1.nics[0].mac",
     "not a MAC address"),
    (('mac: "02:00:00:00:00:01"', 'mac: "03:00:00:00:00:01"'), "vms.vm1.nics[0].mac", "multicast"),
    (("addresses: [10.0.0.1/24]", "addresses: [10.0.0.300/24]"), "vms.vm1.nics[0].addresses[0]",
     "10.0.0.300"),
    (("addresses: [10.0.0.1/24]", "addresses: [10.0.0.1]"), "vms.vm1.nics[0].addresses[0]",
     "prefix length"),
    (("native: 5", "native: 5000"), "vms.vm1.nics[0].vlan.native", "0..4094"),
    (('allowed: "10,20-22"', 'allowed: "10,22-20"'), "vms.vm1.nics[0].vlan.allowed", "backwards"),
    (("mode: trunk", "mode: private"), "vms.vm1.nics[0].vlan.mode", "'private'"),
    (("    uplink: {}\n", "\n"), "physical.peer.switch", "no uplink"),
    (("physical:\n  peer", "physical:\n  vm1"), "", "names used twice"),
])
def test_each_mistake_is_reported_with_file_and_field(edit, where, what):
    bad = GOOD.replace(*edit)
    assert bad != GOOD
    with pytest.raises(TopologyError) as e:
        parse(bad, "bad.yaml")
    assert e.value.source == "bad.yaml"
    assert e.value.where == where, str(e.value)
    assert what in str(e.value)


def test_acl_and_security_mistakes():
    base = GOOD.replace('addresses: [10.0.0.1/24],',
                        'addresses: [10.0.0.1/24], security: {dhcp_guard: yes-please},')
    with pytest.raises(TopologyError, match=r"security.dhcp_guard: expected true or false"):
        parse(base, "x.yaml")
    acl = GOOD.replace('addresses: [10.0.0.1/24],',
                       'addresses: [10.0.0.1/24], acl: [{direction: up, action: deny}],')
    with pytest.raises(TopologyError, match=r"acl\[0\]: ACL direction 'up'"):
        parse(acl, "x.yaml")


def test_not_yaml_and_missing_files(tmp_path):
    with pytest.raises(TopologyError, match=r"x.yaml: line 2, column \d+: not valid YAML"):
        parse("name: a\n  - : [\n", "x.yaml")
    with pytest.raises(TopologyError, match="missing required key 'switches'"):
        parse("name: a\n", "x.yaml")
    with pytest.raises(TopologyError, match="cannot read"):
        load(tmp_path / "nope.yaml")


def test_duplicate_macs():
    dup = GOOD + '  peer2: {switch: sw0, mac: "02:00:00:00:00:01"}\n'
    with pytest.raises(TopologyError, match=r"physical.peer2.mac: MAC 02:00:00:00:00:01 is "
                                            r"already used by vms.vm1.nics\[0\].mac"):
        parse(dup, "x.yaml")


VMQ = GOOD.replace("    uplink: {}", "    uplink: {vmq: {queues: 2}}").replace(
    "pruned: [21]}}", "pruned: [21]}, vmq: {queues: 2, table: [0, 1, 1, 1]}}")


def test_vmq_settings_load():
    t = parse(VMQ, "vmq.yaml")
    assert t.switches["sw0"].uplink["vmq"] == {"queues": 2}
    n = t.vms["vm1"][0]
    assert (n.vmq.weight, n.vmq.queues, n.vmq.table) == (100, 2, [0, 1, 1, 1])
    assert parse(GOOD, "g.yaml").vms["vm1"][0].vmq.queues == 1


@pytest.mark.parametrize("edit, where, what", [
    (("vmq: {queues: 2}}", "vmq: {queues: 0}}"), "switches.sw0.uplink.vmq.queues", "1..64"),
    (("vmq: {queues: 2}}", "vmq: {queues: 2, colour: red}}"), "switches.sw0.uplink.vmq.colour",
     "unknown key"),
    (("vmq: {queues: 2}}", "vmq: {queues: 2, workers: 1}}"), "switches.sw0.uplink.vmq.workers",
     "true, false or auto"),
    (("vmq: {queues: 2}}", "vmq: {queues: 2, workers: sometimes}}"),
     "switches.sw0.uplink.vmq.workers", "got 'sometimes'"),
    (("queues: 2, table", "queues: 3, table"), "vms.vm1.nics[0].vmq.queues", "only 2 VMQ"),
    (("table: [0, 1, 1, 1]", "table: [0, 1, 1]"), "vms.vm1.nics[0].vmq.table", "power of two"),
    (("table: [0, 1, 1, 1]", "table: [0, 1, 2, 1]"), "vms.vm1.nics[0].vmq.table[2]", "0..1"),
    (("queues: 2, table", "weight: 101, queues: 2, table"), "vms.vm1.nics[0].vmq.weight",
     "0..100"),
    (("    uplink: {vmq: {queues: 2}}", "    uplink: {}"), "vms.vm1.nics[0].vmq.queues",
     "no VMQ"),
])
def test_vmq_mistakes(edit, where, what):
    bad = VMQ.replace(*edit)
    assert bad != VMQ
    with pytest.raises(TopologyError) as e:
        parse(bad, "bad.yaml")
    assert e.value.where == where, str(e.value)
    assert what in str(e.value)

"""Topology files: the YAML a user writes, validated into plain objects.

Schema (every key not listed is an error; errors name the file, the field and
what is wrong, and nothing is created from an invalid file)::

    name: demo                      # 1-6 lowercase letters/digits: prefixes every object
    switches:
      sw0:
        extensions:                 # optional, in install order
          - type: acl-filter        # acl-filter | pcap-capture | flow-forwarder | module:Class
            args: {...}             # keyword arguments of the extension's constructor
        uplink:                     # optional: the external port (AF_PACKET rings)
          mtu: 1500                 #   of the simulated wire
          interface: eth1           #   optional: a real interface instead of the simulated
                                    #   wire (then no `physical` hosts on this switch)
          offloads: true            #   virtio-net headers on the rings (default true);
                                    #   false: the switch segments and checksums itself
          tpacket: 2                #   AF_PACKET ring version, 2 or 3 (default 2)
          vmq:                      #   optional: receive queues sorted by MAC/VLAN (VMQ)
            queues: 4               #     queues besides the default queue (1-64)
            min_link_mbps: 10000    #     no VMQ on a slower link (Hyper-V's rule)
            dynamic: true           #     queues move between CPUs by load (default)
            workers: auto           #     a thread per queue sending its deliveries: true,
                                    #     false (the data-path thread sends all), or
                                    #     auto (default): true with CPUs for the data
                                    #     path, each queue and one more
          sriov:                    #   optional: the uplink is an SR-IOV NIC (PF, VFs and
            vfs: 4                  #     its embedded switch); VFs for NICs of kind sriov
    vms:
      vm1:
        nics:
          - switch: sw0
            kind: tap               # tap | synthetic | e1000 | sriov (see below)
            <port settings>
    host:                           # host vNICs: internal ports, a tap in a namespace
      - switch: sw0
        namespace: host             # default "host"
        <port settings>
    physical:                       # machines on the network behind a switch's uplink
      router:
        switch: sw0
        mac: ..., addresses: [...], gateway: ..., vlan: 10   # vlan: tagged on the wire

    VM NICs may also have vmq: {weight: 0-100 (default 100; 0: no queue),
      queues: N (VMMQ: N queues spread by RSS, default 1), table: [...] (indirection
      table of queue indexes 0..N-1, a power of two, default round robin)}.

    <port settings>: mac (required for VM NICs), addresses: [CIDR, ...], gateway,
      mtu (68-65535, default 1500), vlan: {mode: access, id: N} |
      {mode: trunk, native: N, allowed: "10,20-30", pruned: [...]} | untagged,
      security: {mac_spoofing, dhcp_guard, router_guard, storm_limit},
      acl: [{direction: in|out, action: allow|deny, weight, protocol, local, remote,
             local_port, remote_port}]

NIC kinds: ``tap`` wires the VM's tap device straight to a switch port (no guest
driver, no VMBus: the baseline the emulated NICs are measured against);
``synthetic`` (NetVSC/NetVSP over VMBus), ``e1000`` and ``sriov`` are the NIC
kinds of Hyper-V. ``sriov`` is a synthetic NIC that also gets a VF of its
switch's SR-IOV uplink (``uplink: {sriov: {vfs: N}}``) when one is free; its VF
traffic bypasses the switch's extensions and port policies, as in Hyper-V.

Port settings become the switch's own property objects (switch/properties.py),
so a value the switch would refuse is refused here, with its place in the file.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from switch.port import mac_to_int, mac_to_str
from switch.properties import AclProperty, AclRule, SecurityProperty, VlanProperty, vlan_range

NIC_KINDS = ("tap", "synthetic", "e1000", "sriov")
E1000_MAX_MTU = 1500           # 1518-byte frames without RCTL.LPE (e1000_vfio.md A.9)
SRIOV_MAX_MTU = 9710           # the 82599 VF's 9728-byte frames, less header and tag
MAX_VFS = 62                   # sriov.eswitch.MAX_VFS: functions in one int64 mask
BUILTIN_EXTENSIONS = {
    "acl-filter": "examples.acl_filter:AclFilter",
    "pcap-capture": "examples.pcap_capture:PcapCapture",
    "flow-forwarder": "examples.flow_forwarder:FlowForwarder",
}
_NAME = re.compile(r"^[a-z][a-z0-9]{0,5}$")
_OBJ = re.compile(r"^[a-z][a-z0-9]{0,7}$")


class TopologyError(ValueError):
    """An invalid topology file: ``str()`` is 'FILE: field.path: what is wrong'."""

    def __init__(self, source: str, where: str, what: str):
        self.source, self.where, self.what = source, where, what
        super().__init__(f"{source}: {where}: {what}" if where else f"{source}: {what}")


@dataclass
class PortSettings:
    mac: int | None = None
    addresses: list[str] = field(default_factory=list)
    gateway: str | None = None
    mtu: int = 1500
    vlan: VlanProperty | None = None
    security: SecurityProperty | None = None
    acl: AclProperty | None = None

    def properties(self) -> list:
        return [p for p in (self.vlan, self.security, self.acl) if p is not None]


@dataclass
class VmqSettings:
    weight: int = 100
    queues: int = 1
    table: list[int] | None = None


@dataclass
class Nic:
    vm: str
    index: int
    switch: str
    kind: str
    port: PortSettings
    vmq: VmqSettings = field(default_factory=VmqSettings)


@dataclass
class HostNic:
    switch: str
    namespace: str
    port: PortSettings


@dataclass
class Physical:
    name: str
    switch: str
    mac: int | None
    addresses: list[str]
    gateway: str | None
    vlan: int | None


@dataclass
class Extension:
    type: str
    target: str          # "module:Class"
    args: dict


@dataclass
class SwitchSpec:
    name: str
    extensions: list[Extension]
    uplink: dict | None


@dataclass
class Topology:
    name: str
    source: str
    switches: dict[str, SwitchSpec]
    vms: dict[str, list[Nic]]
    host: list[HostNic]
    physical: dict[str, Physical]

    def namespaces(self) -> list[str]:
        """The short names of every machine (each one network namespace)."""
        return list(self.vms) + sorted({h.namespace for h in self.host}) + list(self.physical)

    def macs(self) -> dict[int, str]:
        out = {}
        for vm, nics in self.vms.items():
            for n in nics:
                out[n.port.mac] = f"vms.{vm}.nics[{n.index}]"
        for k, h in enumerate(self.host):
            if h.port.mac is not None:
                out[h.port.mac] = f"host[{k}]"
        for p in self.physical.values():
            if p.mac is not None:
                out[p.mac] = f"physical.{p.name}"
        return out


class _V:
    """Walks the parsed YAML with a path, so every error says where it is."""

    def __init__(self, source: str):
        self.source = source

    def fail(self, where: str, what: str):
        raise TopologyError(self.source, where, what)

    def mapping(self, v, where: str, required=(), optional=()) -> dict:
        if not isinstance(v, dict):
            self.fail(where, f"expected a mapping, got {type(v).__name__}")
        allowed = set(required) | set(optional)
        for k in v:
            if k not in allowed:
                self.fail(f"{where}.{k}" if where else str(k),
                          f"unknown key; expected one of {sorted(allowed)}")
        for k in required:
            if k not in v:
                self.fail(where or "top level", f"missing required key {k!r}")
        return v

    def listof(self, v, where: str) -> list:
        if not isinstance(v, list):
            self.fail(where, f"expected a list, got {type(v).__name__}")
        return v

    def integer(self, v, where: str, lo: int, hi: int) -> int:
        if isinstance(v, bool) or not isinstance(v, int) or not lo <= v <= hi:
            self.fail(where, f"expected an integer in {lo}..{hi}, got {v!r}")
        return v

    def boolean(self, v, where: str) -> bool:
        if not isinstance(v, bool):
            self.fail(where, f"expected true or false, got {v!r}")
        return v

    def name(self, v, where: str, longest: int = 8) -> str:
        # Short, because names end up in 15-character interface names.
        pattern = _NAME if longest == 6 else _OBJ
        if not isinstance(v, str) or not pattern.match(v):
            self.fail(where, f"{v!r} is not a valid name: lowercase letters and digits, "
                      f"starting with a letter, at most {longest} characters")
        return v

    def guard(self, where: str, fn, *a, **kw):
        """Run a switch-side validator; its ValueError becomes an error at ``where``."""
        try:
            return fn(*a, **kw)
        except (ValueError, TypeError) as e:
            self.fail(where, str(e))


PORT_KEYS = ("mac", "addresses", "gateway", "mtu", "vlan", "security", "acl")


def _port_settings(v: _V, d: dict, where: str, need_mac: bool, required=()) -> PortSettings:
    v.mapping(d, where, required=required, optional=PORT_KEYS)
    ps = PortSettings()
    if "mac" in d:
        mac = v.guard(f"{where}.mac", mac_to_int, str(d["mac"]))
        if mac >> 40 & 1:
            v.fail(f"{where}.mac", f"{d['mac']} is a multicast address")
        ps.mac = mac
    elif need_mac:
        v.fail(where, "missing required key 'mac'")
    for k, a in enumerate(v.listof(d.get("addresses", []), f"{where}.addresses")):
        v.guard(f"{where}.addresses[{k}]", ipaddress.ip_interface, str(a))
        if "/" not in str(a):
            v.fail(f"{where}.addresses[{k}]", f"{a!r} needs a prefix length, like 10.0.0.1/24")
        ps.addresses.append(str(a))
    if "gateway" in d:
        v.guard(f"{where}.gateway", ipaddress.ip_address, str(d["gateway"]))
        ps.gateway = str(d["gateway"])
    if "mtu" in d:
        ps.mtu = v.integer(d["mtu"], f"{where}.mtu", 68, 65535)
    if "vlan" in d:
        ps.vlan = _vlan(v, d["vlan"], f"{where}.vlan")
    if "security" in d:
        s = v.mapping(d["security"], f"{where}.security",
                      optional=("mac_spoofing", "dhcp_guard", "router_guard", "storm_limit"))
        ps.security = SecurityProperty(
            allow_mac_spoofing=v.boolean(s.get("mac_spoofing", False),
                                         f"{where}.security.mac_spoofing"),
            dhcp_guard=v.boolean(s.get("dhcp_guard", False), f"{where}.security.dhcp_guard"),
            router_guard=v.boolean(s.get("router_guard", False), f"{where}.security.router_guard"),
            storm_limit=v.integer(s.get("storm_limit", 0), f"{where}.security.storm_limit",
                                  0, 10**9))
    if "acl" in d:
        rules = []
        for k, r in enumerate(v.listof(d["acl"], f"{where}.acl")):
            w = f"{where}.acl[{k}]"
            r = v.mapping(r, w, required=("direction", "action"),
                          optional=("weight", "protocol", "local", "remote", "local_port",
                                    "remote_port"))
            rules.append(v.guard(w, AclRule, str(r["direction"]), str(r["action"]),
                                 r.get("weight", 1), r.get("protocol", "any"),
                                 str(r.get("local", "any")), str(r.get("remote", "any")),
                                 r.get("local_port", "any"), r.get("remote_port", "any")))
        ps.acl = AclProperty(tuple(rules))
    return ps


def _vlan(v: _V, d, where: str) -> VlanProperty:
    if d == "untagged":
        return VlanProperty("untagged")
    d = v.mapping(d, where, required=("mode",), optional=("id", "native", "allowed", "pruned"))
    mode = d["mode"]
    if mode == "access":
        if "id" not in d:
            v.fail(where, "access mode needs 'id'")
        return v.guard(where, VlanProperty, "access", access_vlan=v.integer(d["id"], f"{where}.id", 1, 4094))
    if mode == "trunk":
        allowed = v.guard(f"{where}.allowed", vlan_range, d.get("allowed", []))
        pruned = v.guard(f"{where}.pruned", vlan_range, d.get("pruned", []))
        return v.guard(where, VlanProperty, "trunk",
                       native_vlan=v.integer(d.get("native", 0), f"{where}.native", 0, 4094),
                       allowed=allowed, pruned=pruned)
    v.fail(f"{where}.mode", f"{mode!r}: expected access or trunk (or vlan: untagged)")


def _vm(v: _V, vm, vd, switches: dict, unique_mac) -> list[Nic]:
    w = f"vms.{vm}"
    v.name(vm, w)
    vd = v.mapping(vd, w, required=("nics",))
    nics = []
    for k, nd in enumerate(v.listof(vd["nics"], f"{w}.nics")):
        nw = f"{w}.nics[{k}]"
        ps = _port_settings(v, {k: x for k, x in nd.items() if k != "vmq"}, nw, need_mac=True,
                            required=("switch", "kind"))
        kind = nd["kind"]
        if kind not in NIC_KINDS:
            v.fail(f"{nw}.kind", f"{kind!r}: expected one of {list(NIC_KINDS)}")
        if kind == "sriov":
            sw = switches.get(nd["switch"])
            if sw is not None and not (sw.uplink or {}).get("sriov"):
                v.fail(f"{nw}.kind", f"an sriov NIC needs an SR-IOV uplink on switch "
                       f"{sw.name!r} (uplink: {{sriov: {{vfs: N}}}})")
            if ps.vlan is not None:
                v.fail(f"{nw}.vlan", "VLANs on sriov NICs are not supported yet (the VF "
                       "would need the PF's port VLAN insertion)")
            if ps.mtu > SRIOV_MAX_MTU:
                v.fail(f"{nw}.mtu", f"{ps.mtu}: a VF takes frames up to 9728 bytes, so "
                       f"at most {SRIOV_MAX_MTU}")
        if kind == "e1000" and ps.mtu > E1000_MAX_MTU:
            v.fail(f"{nw}.mtu", f"{ps.mtu}: the e1000 driver here uses 2048-byte receive "
                   f"buffers, so at most {E1000_MAX_MTU}")
        unique_mac(ps.mac, f"{nw}.mac")
        if nd["switch"] not in switches:
            v.fail(f"{nw}.switch", f"no switch named {nd['switch']!r}; switches are "
                   f"{sorted(switches)}")
        nics.append(Nic(vm, k, nd["switch"], kind, ps,
                        _nic_vmq(v, nd.get("vmq"), f"{nw}.vmq", switches.get(nd["switch"]))))
    if not nics:
        v.fail(f"{w}.nics", "a VM needs at least one NIC")
    return nics


def _nic_vmq(v: _V, d, where: str, sw) -> VmqSettings:
    if d is None:
        return VmqSettings()
    d = v.mapping(d, where, optional=("weight", "queues", "table"))
    vs = VmqSettings(v.integer(d.get("weight", 100), f"{where}.weight", 0, 100),
                     v.integer(d.get("queues", 1), f"{where}.queues", 1, 64))
    have = ((sw.uplink or {}).get("vmq") or {}).get("queues", 0) if sw else 0
    if vs.weight and vs.queues > have:
        v.fail(f"{where}.queues", f"{vs.queues} queue(s) asked for, but switch "
               f"{sw.name if sw else '?'!r}'s uplink has "
               + (f"only {have} VMQ queue(s)" if have else "no VMQ (uplink: {vmq: ...})"))
    if "table" in d:
        t = [v.integer(x, f"{where}.table[{k}]", 0, vs.queues - 1)
             for k, x in enumerate(v.listof(d["table"], f"{where}.table"))]
        if not t or len(t) > 128 or len(t) & (len(t) - 1):
            v.fail(f"{where}.table", f"{len(t)} entries: a power of two up to 128")
        if vs.queues < 2:
            v.fail(f"{where}.table", "an indirection table needs queues: 2 or more")
        vs.table = t
    return vs


def parse_vm(topo: Topology, vm: str, text: str, source: str = "<vm>") -> list[Nic]:
    """Validate a VM added to a running topology: ``text`` is the YAML mapping that
    would sit under ``vms.<vm>`` in its file. Names and MACs must be new."""
    v = _V(source)
    try:
        vd = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(source, "", f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if vm in topo.namespaces():
        v.fail(f"vms.{vm}", f"{vm!r} is already a machine of topology {topo.name!r}")
    macs = topo.macs()

    def unique_mac(mac, where):
        if mac in macs:
            v.fail(where, f"MAC {mac_to_str(mac)} is already used by {macs[mac]}")
        macs[mac] = where
    return _vm(v, vm, vd, topo.switches, unique_mac)


def parse_port_setting(key: str, text: str, source: str = "<setting>"):
    """One port property from the command line: ``key`` is vlan, security or acl and
    ``text`` its YAML value as in a topology file; "none" means delete. Returns the
    switch property object, or None to delete."""
    v = _V(source)
    if key not in ("vlan", "security", "acl"):
        v.fail(key, "expected vlan, security or acl")
    try:
        value = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise TopologyError(source, key, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    if value in (None, "none"):
        return None
    return getattr(_port_settings(v, {key: value}, "port", need_mac=False), key)


def load(path: str | Path) -> Topology:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TopologyError(str(path), "", f"cannot read: {e.strerror}") from None
    return parse(text, str(path))


def parse(text: str, source: str = "<topology>") -> Topology:
    v = _V(source)
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        at = f"line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        raise TopologyError(source, at, f"not valid YAML: {getattr(e, 'problem', e)}") from None
    doc = v.mapping(doc, "", required=("name", "switches"), optional=("vms", "host", "physical"))
    name = v.name(doc["name"], "name", 6)

    switches: dict[str, SwitchSpec] = {}
    for sname, sd in v.mapping(doc["switches"], "switches", optional=doc["switches"] or ()).items():
        w = f"switches.{sname}"
        v.name(sname, w)
        sd = v.mapping(sd or {}, w, optional=("extensions", "uplink"))
        exts = []
        for k, e in enumerate(v.listof(sd.get("extensions", []), f"{w}.extensions")):
            ew = f"{w}.extensions[{k}]"
            e = v.mapping(e, ew, required=("type",), optional=("args",))
            t = str(e["type"])
            target = BUILTIN_EXTENSIONS.get(t, t)
            if ":" not in target:
                v.fail(f"{ew}.type", f"{t!r}: expected one of {sorted(BUILTIN_EXTENSIONS)} "
                       "or module:Class")
            exts.append(Extension(t, target, dict(v.mapping(e.get("args", {}), f"{ew}.args",
                                                            optional=e.get("args") or ()))))
        uplink = None
        if "uplink" in sd:
            uplink = dict(v.mapping(sd["uplink"] or {}, f"{w}.uplink",
                                    optional=("mtu", "interface", "offloads", "tpacket",
                                              "vmq", "sriov")))
            if "sriov" in uplink:
                q = dict(v.mapping(uplink["sriov"], f"{w}.uplink.sriov", required=("vfs",)))
                v.integer(q["vfs"], f"{w}.uplink.sriov.vfs", 1, MAX_VFS)
                if "vmq" in uplink:
                    v.fail(f"{w}.uplink.sriov", "an SR-IOV uplink here has no VMQ: "
                           "use one of vmq and sriov")
                uplink["sriov"] = q
            if "tpacket" in uplink:
                v.integer(uplink["tpacket"], f"{w}.uplink.tpacket", 2, 3)
            if "mtu" in uplink:
                v.integer(uplink["mtu"], f"{w}.uplink.mtu", 68, 65535)
            if "offloads" in uplink:
                v.boolean(uplink["offloads"], f"{w}.uplink.offloads")
            if "vmq" in uplink:
                q = dict(v.mapping(uplink["vmq"], f"{w}.uplink.vmq", required=("queues",),
                                   optional=("min_link_mbps", "dynamic", "workers")))
                v.integer(q["queues"], f"{w}.uplink.vmq.queues", 1, 64)
                v.integer(q.get("min_link_mbps", 10000), f"{w}.uplink.vmq.min_link_mbps",
                          0, 10**7)
                v.boolean(q.get("dynamic", True), f"{w}.uplink.vmq.dynamic")
                wk = q.get("workers", "auto")
                if not (wk == "auto" or isinstance(wk, bool)):
                    v.fail(f"{w}.uplink.vmq.workers", f"expected true, false or auto, got {wk!r}")
                uplink["vmq"] = q
            if "interface" in uplink:
                i = uplink["interface"]
                if not isinstance(i, str) or not 0 < len(i) <= 15 or "/" in i or " " in i:
                    v.fail(f"{w}.uplink.interface", f"{i!r} is not an interface name")
        switches[sname] = SwitchSpec(sname, exts, uplink)
    if not switches:
        v.fail("switches", "at least one switch is needed")

    def switch_ref(s, where):
        if s not in switches:
            v.fail(where, f"no switch named {s!r}; switches are {sorted(switches)}")
        return s

    macs: dict[int, str] = {}

    def unique_mac(mac, where):
        if mac is None:
            return
        if mac in macs:
            v.fail(where, f"MAC {mac_to_str(mac)} is already used by {macs[mac]}")
        macs[mac] = where

    vms: dict[str, list[Nic]] = {}
    for vm, vd in v.mapping(doc.get("vms") or {}, "vms", optional=doc.get("vms") or ()).items():
        vms[vm] = _vm(v, vm, vd, switches, unique_mac)
    host = []
    for k, hd in enumerate(v.listof(doc.get("host") or [], "host")):
        w = f"host[{k}]"
        v.mapping(hd, w, required=("switch",), optional=PORT_KEYS + ("namespace",))
        ps = _port_settings(v, {k: x for k, x in hd.items() if k != "namespace"}, w,
                            need_mac=False, required=("switch",))
        unique_mac(ps.mac, f"{w}.mac")
        ns = v.name(hd.get("namespace", "host"), f"{w}.namespace")
        host.append(HostNic(switch_ref(hd["switch"], f"{w}.switch"), ns, ps))

    physical = {}
    for pn, pd in v.mapping(doc.get("physical") or {}, "physical",
                            optional=doc.get("physical") or ()).items():
        w = f"physical.{pn}"
        v.name(pn, w)
        pd = v.mapping(pd, w, required=("switch",),
                       optional=("mac", "addresses", "gateway", "vlan"))
        sw = switch_ref(pd["switch"], f"{w}.switch")
        if switches[sw].uplink is None:
            v.fail(f"{w}.switch", f"switch {sw!r} has no uplink for {pn!r} to sit behind")
        if "interface" in switches[sw].uplink:
            v.fail(f"{w}.switch", f"switch {sw!r}'s uplink is the real interface "
                   f"{switches[sw].uplink['interface']!r}: physical hosts are only simulated "
                   "behind a simulated uplink")
        ps = _port_settings(v, {k: pd[k] for k in pd if k not in ("vlan", "switch")}, w,
                            need_mac=False)
        unique_mac(ps.mac, f"{w}.mac")
        vid = v.integer(pd["vlan"], f"{w}.vlan", 1, 4094) if "vlan" in pd else None
        physical[pn] = Physical(pn, sw, ps.mac, ps.addresses, ps.gateway, vid)

    names = list(vms) + sorted({h.namespace for h in host}) + list(physical)
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        v.fail("", f"names used twice across vms, host namespaces and physical hosts: "
               f"{sorted(dup)} (each becomes a network namespace)")
    return Topology(name, source, switches, vms, host, physical)

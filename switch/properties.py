"""Port and switch properties (policies) and their compiled, kernel-side form.

Property types follow NDIS_SWITCH_PORT_PROPERTY_TYPE: VLAN, Security, Profile,
Custom (vswitch_vmq_sriov.md 1.10); the port ACL is the extended ACL of 2.2.
Standard properties are enforced by the switch when no forwarding extension is
enabled, else by the forwarder (1.10, checklist A.13). Every property is
validated when it is added, so a bad one is refused before it reaches a kernel.

``PortTable`` holds what the kernels read: one int64 row of settings per port
(``cfg``, ending with the 4096-bit trunk allow and prune bitmaps), and all ACL
rules of all ports in one table (``acl``) with each port's range in
``cfg``.
"""
from __future__ import annotations

import ipaddress
from dataclasses import dataclass

import numpy as np

# ---- VLAN (NDIS_SWITCH_PORT_PROPERTY_VLAN, 2.3) -----------------------------


@dataclass(frozen=True)
class VlanProperty:
    """Access: untagged to the port, VLAN ``access_vlan`` on the switch.
    Trunk: ``allowed`` VLANs pass tagged, ``native`` passes untagged, ``pruned``
    beats ``allowed``."""
    mode: str = "access"                 # "access" | "trunk" | "untagged"
    access_vlan: int = 0
    native_vlan: int = 0
    allowed: tuple[int, ...] = ()
    pruned: tuple[int, ...] = ()

    def __post_init__(self):
        if self.mode not in ("access", "trunk", "untagged"):
            raise ValueError(f"VLAN mode {self.mode!r}: expected access, trunk or untagged "
                             "(private VLANs are not supported)")
        for what, v in (("access_vlan", self.access_vlan), ("native_vlan", self.native_vlan)):
            if not 0 <= int(v) <= 4094:
                raise ValueError(f"{what} {v} out of range 0..4094")
        for what, vs in (("allowed", self.allowed), ("pruned", self.pruned)):
            for v in vs:
                if not 1 <= int(v) <= 4094:
                    raise ValueError(f"{what} VLAN {v} out of range 1..4094")
        if self.mode == "access" and self.access_vlan == 0:
            # VLAN 0 access is the same as untagged; keep one spelling.
            object.__setattr__(self, "mode", "untagged")


def vlan_range(spec) -> tuple[int, ...]:
    """'1-10,20' or [1, '5-7'] -> sorted VLAN IDs."""
    items = spec.split(",") if isinstance(spec, str) else list(spec)
    out: set[int] = set()
    for it in items:
        s = str(it).strip()
        if not s:
            continue
        if "-" in s:
            a, b = s.split("-", 1)
            lo, hi = int(a), int(b)
            if lo > hi:
                raise ValueError(f"VLAN range {s!r} runs backwards")
            out.update(range(lo, hi + 1))
        else:
            out.add(int(s))
    return tuple(sorted(out))


# ---- Security (NDIS_SWITCH_PORT_PROPERTY_SECURITY, 2.6) ----------------------
@dataclass(frozen=True)
class SecurityProperty:
    allow_mac_spoofing: bool = False
    dhcp_guard: bool = False
    router_guard: bool = False
    storm_limit: int = 0          # broadcast+multicast frames per second from the port; 0 = off


# ---- Extended port ACL (2.2) ------------------------------------------------
ACL_ALLOW = 1
ACL_DENY = 2
DIR_INBOUND = 1    # toward the port (the VM receives)
DIR_OUTBOUND = 2   # from the port (the VM sends)

# acl table columns
A_DIR, A_ACTION, A_WEIGHT, A_PROTO, A_FAMILY = 0, 1, 2, 3, 4
A_LHI, A_LLO, A_LPLEN, A_RHI, A_RLO, A_RPLEN = 5, 6, 7, 8, 9, 10
A_LPORT_LO, A_LPORT_HI, A_RPORT_LO, A_RPORT_HI = 11, 12, 13, 14
A_NCOLS = 15


def _prefix(spec) -> tuple[int, int, int, int]:
    """'any' or an address/prefix -> (family, hi64, lo64, plen); family 0 = any."""
    if spec is None or str(spec).lower() in ("any", "*"):
        return 0, 0, 0, 0
    net = ipaddress.ip_network(str(spec), strict=False)
    v = int(net.network_address)
    if net.version == 4:
        return 4, 0, v, net.prefixlen
    return 6, (v >> 64) & (2**64 - 1), v & (2**64 - 1), net.prefixlen


def _ports(spec) -> tuple[int, int]:
    if spec is None or str(spec).lower() in ("any", "*"):
        return 0, 65535
    s = str(spec)
    lo, _, hi = s.partition("-")
    lo_i, hi_i = int(lo), int(hi or lo)
    if not (0 <= lo_i <= hi_i <= 65535):
        raise ValueError(f"port range {spec!r} must be a-b with 0 <= a <= b <= 65535")
    return lo_i, hi_i


_PROTOS = {"any": -1, "tcp": 6, "udp": 17, "icmp": 1, "icmpv6": 58}


@dataclass(frozen=True)
class AclRule:
    """One extended ACL entry. Higher weight is evaluated first; first match wins."""
    direction: str          # "in" | "out"
    action: str             # "allow" | "deny"
    weight: int = 1
    protocol: str | int = "any"
    local: str = "any"      # address or prefix ("local" = the port's side)
    remote: str = "any"
    local_port: str | int = "any"
    remote_port: str | int = "any"

    def __post_init__(self):
        if self.direction not in ("in", "out"):
            raise ValueError(f"ACL direction {self.direction!r}: expected in or out")
        if self.action not in ("allow", "deny"):
            raise ValueError(f"ACL action {self.action!r}: expected allow or deny")
        if not 0 <= int(self.weight) <= 65535:
            raise ValueError(f"ACL weight {self.weight} out of range 0..65535")
        p = self.protocol
        if isinstance(p, str) and p.lower() not in _PROTOS and not (p.isascii() and p.isdigit()):
            raise ValueError(f"ACL protocol {p!r}: expected tcp, udp, icmp, icmpv6, any "
                             "or a number")
        self.row()  # validates addresses and ports

    def proto_number(self) -> int:
        p = self.protocol
        if isinstance(p, str):
            p = _PROTOS.get(p.lower(), p)
        p = int(p)
        if not -1 <= p <= 255:
            raise ValueError(f"ACL protocol number {p} out of range 0..255")
        return p

    def row(self) -> np.ndarray:
        r = np.zeros(A_NCOLS, dtype=np.int64)
        r[A_DIR] = DIR_INBOUND if self.direction == "in" else DIR_OUTBOUND
        r[A_ACTION] = ACL_ALLOW if self.action == "allow" else ACL_DENY
        r[A_WEIGHT] = int(self.weight)
        r[A_PROTO] = self.proto_number()
        lf, lhi, llo, lpl = _prefix(self.local)
        rf, rhi, rlo, rpl = _prefix(self.remote)
        if lf and rf and lf != rf:
            raise ValueError(f"ACL rule mixes IPv{lf} and IPv{rf} addresses")
        r[A_FAMILY] = lf or rf
        # uint64 halves stored bit-for-bit in int64 columns
        r[A_LHI], r[A_LLO], r[A_LPLEN] = _s64(lhi), _s64(llo), lpl
        r[A_RHI], r[A_RLO], r[A_RPLEN] = _s64(rhi), _s64(rlo), rpl
        r[A_LPORT_LO], r[A_LPORT_HI] = _ports(self.local_port)
        r[A_RPORT_LO], r[A_RPORT_HI] = _ports(self.remote_port)
        return r


def _s64(u: int) -> int:
    return u - (1 << 64) if u >= 1 << 63 else u


@dataclass(frozen=True)
class AclProperty:
    rules: tuple[AclRule, ...] = ()


@dataclass(frozen=True)
class CustomProperty:
    """An extension's own policy: opaque to the switch, keyed by a property ID."""
    property_id: str
    version: int = 0x0100
    data: object = None


STANDARD_PROPERTY_TYPES = (VlanProperty, SecurityProperty, AclProperty)


def property_key(prop) -> tuple[str, object]:
    if isinstance(prop, CustomProperty):
        return ("custom", prop.property_id)
    for t in STANDARD_PROPERTY_TYPES + (CustomProperty,):
        if isinstance(prop, t):
            return (t.__name__, None)
    raise TypeError(f"{type(prop).__name__} is not a switch property")


# ---- Kernel-side port table --------------------------------------------------
C_NIC_CONNECTED = 0   # bitmask of connected NIC indexes
C_NIC_PRESENT = 1     # bitmask of created-or-connected-or-disconnected NICs
C_TYPE = 2
C_MAC = 6
C_ALLOW_SPOOF = 7
C_DHCP_GUARD = 8
C_ROUTER_GUARD = 9
C_MTU = 10
C_ACL_START = 11
C_ACL_END = 12
C_STORM = 13
C_STORM_WINDOW = 14   # start (s) of the current one-second storm window
C_STORM_COUNT = 15
C_EXISTS = 16         # port created and not yet deleted
# Derived columns the kernels read, so each decision is one test, not a tree of
# mode checks (random traffic makes every branch a misprediction).
C_UNTAG_VLAN = 17     # VLAN of untagged frames in, and the VLAN that leaves untagged
C_TRUNK = 18          # 1: tagged frames accepted for C_UNTAG_VLAN and the VBITS set
C_SPOOF_MAC = 19      # source MAC a port must use, or -1 when any is allowed
C_GUARDS = 20         # G_* bits: which per-packet guards are on
C_VBITS = 32          # 64 words: VLANs carried tagged (allowed, not pruned, not native);
#                       then 64 words of the pruned VLANs as configured
NCFG = C_VBITS + 128

G_DHCP = 1
G_ROUTER = 2
G_STORM = 4


class PortTable:
    def __init__(self, max_ports: int):
        self.max_ports = max_ports
        self.cfg = np.zeros((max_ports + 1, NCFG), dtype=np.int64)
        self.acl = np.zeros((0, A_NCOLS), dtype=np.int64)
        self._acl_rows: dict[int, np.ndarray] = {}

    def set_vlan(self, port_id: int, prop: VlanProperty | None) -> None:
        c = self.cfg[port_id]
        u = np.zeros(128, dtype=np.uint64)
        c[C_TRUNK] = 0
        if prop is None or prop.mode == "untagged":
            c[C_UNTAG_VLAN] = 0
        elif prop.mode == "access":
            c[C_UNTAG_VLAN] = prop.access_vlan
        else:
            c[C_UNTAG_VLAN] = prop.native_vlan
            c[C_TRUNK] = 1
            pruned = set(prop.pruned)
            for v in prop.allowed:         # prune beats allow; native leaves untagged
                if v not in pruned and v != prop.native_vlan:
                    u[v >> 6] |= np.uint64(1) << np.uint64(v & 63)
            for v in pruned:
                u[64 + (v >> 6)] |= np.uint64(1) << np.uint64(v & 63)
        self.cfg[port_id, C_VBITS:] = u.view(np.int64)

    def set_security(self, port_id: int, prop: SecurityProperty | None) -> None:
        prop = prop or SecurityProperty()
        c = self.cfg[port_id]
        c[C_ALLOW_SPOOF] = int(prop.allow_mac_spoofing)
        c[C_DHCP_GUARD] = int(prop.dhcp_guard)
        c[C_ROUTER_GUARD] = int(prop.router_guard)
        c[C_STORM] = int(prop.storm_limit)
        self.derive(port_id)

    def set_mac(self, port_id: int, mac: int, allow_spoofing: bool | None = None) -> None:
        if allow_spoofing is not None:
            self.cfg[port_id, C_ALLOW_SPOOF] = int(allow_spoofing)
        self.cfg[port_id, C_MAC] = mac
        self.derive(port_id)

    def derive(self, port_id: int) -> None:
        c = self.cfg[port_id]
        c[C_SPOOF_MAC] = -1 if c[C_ALLOW_SPOOF] or c[C_MAC] == 0 else c[C_MAC]
        c[C_GUARDS] = ((G_DHCP if c[C_DHCP_GUARD] else 0) | (G_ROUTER if c[C_ROUTER_GUARD] else 0)
                       | (G_STORM if c[C_STORM] > 0 else 0))

    def set_acl(self, port_id: int, prop: AclProperty | None) -> None:
        rules = prop.rules if prop else ()
        # Higher weight first; the sort is stable so equal weights keep their order.
        ordered = sorted(rules, key=lambda r: -int(r.weight))
        self._acl_rows[port_id] = (np.stack([r.row() for r in ordered]) if ordered
                                   else np.zeros((0, A_NCOLS), dtype=np.int64))
        self._rebuild_acl()

    def _rebuild_acl(self) -> None:
        parts, start = [], 0
        for pid in range(self.max_ports + 1):
            rows = self._acl_rows.get(pid)
            n = 0 if rows is None else len(rows)
            self.cfg[pid, C_ACL_START] = start
            self.cfg[pid, C_ACL_END] = start + n
            if n:
                parts.append(rows)
            start += n
        # A new array, swapped in whole, so a kernel running now sees the old or the new table.
        self.acl = np.concatenate(parts) if parts else np.zeros((0, A_NCOLS), dtype=np.int64)

    def clear(self, port_id: int) -> None:
        self.cfg[port_id] = 0
        self.derive(port_id)
        if self._acl_rows.pop(port_id, None) is not None:
            self._rebuild_acl()

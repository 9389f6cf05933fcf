"""Switch ports and the NICs connected to them, with their lifecycle states.

Port types, NIC types and states follow NDIS_SWITCH_PORT_TYPE / _NIC_TYPE /
_PORT_STATE / _NIC_STATE; the lifecycle and what may happen in each state is
the table of vswitch_vmq_sriov.md 1.7; port IDs, NIC indexes and NIC parameters
follow 1.8.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

DEFAULT_PORT_ID = 0      # NDIS_SWITCH_DEFAULT_PORT_ID: extension-originated packets
DEFAULT_NIC_INDEX = 0    # NDIS_SWITCH_DEFAULT_NIC_INDEX
MAX_NIC_INDEX = 32       # physical NICs under the external adapter use 1..32


class PortType(enum.IntEnum):
    GENERIC = 0
    EXTERNAL = 1
    INTERNAL = 2
    SYNTHETIC = 3
    EMULATED = 4


class PortState(enum.IntEnum):
    NOT_CREATED = 0
    CREATED = 1
    TEARDOWN = 2
    DELETED = 3


class NicState(enum.IntEnum):
    NOT_CREATED = 0
    CREATED = 1
    CONNECTED = 2
    DISCONNECTED = 3
    DELETED = 4


class LifecycleError(RuntimeError):
    """A control-path operation asked for out of the order of 1.7's state machine."""


class ObjectReferenced(LifecycleError):
    """Delete asked for while an extension still holds a reference (1.7, R11)."""


@dataclass
class Nic:
    index: int
    state: NicState = NicState.NOT_CREATED
    permanent_mac: int = 0      # host-configured
    vm_mac: int = 0             # set inside the guest; 0 for non-VM NICs
    current_mac: int = 0
    mtu: int = 1500
    friendly_name: str = ""
    vf_assigned: bool = False
    refs: int = 0


@dataclass
class Port:
    port_id: int
    name: str
    type: PortType
    friendly_name: str = ""
    is_validation: bool = False
    state: PortState = PortState.NOT_CREATED
    nics: dict[int, Nic] = field(default_factory=dict)
    properties: dict[tuple[str, object], object] = field(default_factory=dict)
    refs: int = 0
    provider: object = None     # the port kind that moves this port's frames

    def nic(self, index: int) -> Nic:
        try:
            return self.nics[index]
        except KeyError:
            raise LifecycleError(f"port {self.name!r} has no NIC index {index}") from None

    @property
    def connected(self) -> bool:
        return any(n.state == NicState.CONNECTED for n in self.nics.values())


def mac_to_int(mac: str | int | bytes) -> int:
    """'02:00:00:00:00:01' (or bytes, or an int) -> 48-bit integer; ValueError if not a MAC."""
    if isinstance(mac, int):
        if not 0 <= mac < 1 << 48:
            raise ValueError(f"MAC {mac:#x} is not 48 bits")
        return mac
    if isinstance(mac, (bytes, bytearray)):
        if len(mac) != 6:
            raise ValueError(f"MAC must be 6 bytes, got {len(mac)}")
        return int.from_bytes(mac, "big")
    parts = str(mac).replace("-", ":").split(":")
    if len(parts) != 6 or not all(len(p) == 2 for p in parts):
        raise ValueError(f"{mac!r} is not a MAC address like 02:00:00:00:00:01")
    try:
        return int("".join(parts), 16)
    except ValueError:
        raise ValueError(f"{mac!r} is not a MAC address like 02:00:00:00:00:01") from None


def mac_to_str(mac: int) -> str:
    return ":".join(f"{(mac >> s) & 0xFF:02x}" for s in range(40, -1, -8))

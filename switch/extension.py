"""Switch extensions: the classes users subclass, and what each kind may do.

Three kinds, as in Hyper-V (vswitch_vmq_sriov.md 1.2): ``CaptureExtension``
(observe, originate), ``FilterExtension`` (also drop, exclude on egress, clone
and re-inject, veto), ``ForwardingExtension`` (also add destinations on
ingress, set PreserveVLAN/PreservePriority, inject clones on egress). At most one
forwarder is enabled per switch.

Data-path hooks run once per batch: ``ingress(pkts, act)`` and
``egress(pkts, act)``. ``pkts.meta`` and ``pkts.data`` are read-only; ``act``
carries the writable arrays the kind may use (``act.drop``, ``act.exclude``,
``act.dests``/``act.ndst``, ``act.ctx``) and the clone/originate/inject calls.
Loops over packets belong in njit kernels that take those arrays; skip packets
whose ``meta[DROP, i]`` is not 0.

Control-path hooks (``port_create``, ``nic_connect``, ``port_property_add``...)
get the object concerned and return None to pass the request down, or raise
``Veto`` (or return an ``NdisStatus``) to complete it with a failure where
Hyper-V allows a veto (1.7). ``oid_complete(oid, status, ...)`` tells an
extension how a request it passed down ended.
"""
from __future__ import annotations

import enum
from typing import ClassVar


class NdisStatus(enum.Enum):
    SUCCESS = "success"
    FAILURE = "failure"
    RESOURCES = "resources"                # transitory: the switch retries
    DATA_NOT_ACCEPTED = "data not accepted"  # the usual veto
    INVALID_PARAMETER = "invalid parameter"
    NOT_SUPPORTED = "not supported"


class Veto(Exception):
    """Raise from a control-path hook to fail (veto) the request."""

    def __init__(self, reason: str = "", status: NdisStatus = NdisStatus.DATA_NOT_ACCEPTED):
        super().__init__(reason or status.value)
        self.status = status
        self.reason = reason


class Oid(enum.Enum):
    # (hook name, vetoable)
    PORT_CREATE = ("port_create", True)
    PORT_UPDATED = ("port_updated", False)
    PORT_TEARDOWN = ("port_teardown", False)
    PORT_DELETE = ("port_delete", False)
    NIC_CREATE = ("nic_create", True)
    NIC_CONNECT = ("nic_connect", False)
    NIC_UPDATED = ("nic_updated", False)
    NIC_DISCONNECT = ("nic_disconnect", False)
    NIC_DELETE = ("nic_delete", False)
    PORT_PROPERTY_ADD = ("port_property_add", True)
    PORT_PROPERTY_UPDATE = ("port_property_update", True)
    PORT_PROPERTY_DELETE = ("port_property_delete", True)
    PROPERTY_ADD = ("switch_property_add", True)
    PROPERTY_UPDATE = ("switch_property_update", True)
    PROPERTY_DELETE = ("switch_property_delete", True)

    @property
    def hook(self) -> str:
        return self.value[0]

    @property
    def vetoable(self) -> bool:
        return self.value[1]

    @property
    def is_create(self) -> bool:
        return self in (Oid.PORT_CREATE, Oid.NIC_CREATE)


class Extension:
    """Base of all extensions. Subclass one of the three kinds below."""
    kind: ClassVar[str] = ""
    uses_context: ClassVar[bool] = False   # wants act.ctx, a per-packet int64 slot

    def __init__(self, name: str | None = None):
        self.name = name or type(self).__name__
        self.switch = None     # a SwitchHandle once installed

    # Called when installed; register drop reasons here with self.switch.reason(text).
    def attach(self, handle) -> None:
        pass

    def detach(self) -> None:
        pass

    def oid_complete(self, oid: Oid, status: NdisStatus, *args) -> None:
        pass

    def __repr__(self) -> str:
        return f"<{self.kind} extension {self.name!r}>"


class CaptureExtension(Extension):
    kind = "capture"


class FilterExtension(Extension):
    kind = "filter"


class ForwardingExtension(Extension):
    kind = "forwarding"


KIND_ORDER = {"capture": 0, "filter": 1, "forwarding": 2}

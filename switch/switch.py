"""The extensible switch: ports, the extension stack, the control path and the data path.

Control path (vswitch_vmq_sriov.md 1.7, 1.8, 1.10): every port/NIC lifecycle step
and every property change is a request (``Oid``) that travels down the enabled
extensions from the protocol edge (captures, filters, then the forwarder) and
completes back up; only create and property requests may be vetoed, and only by
filters and the forwarder (checklist A.16-A.20).

Data path (1.4): a batch enters at the protocol edge (parse, counters), runs the
ingress stages (captures, filters, built-in ingress policies, the forwarder or
built-in forwarding), the egress stages (forwarder, built-in egress policies,
filters, captures, bottom to top), and leaves through the port kinds that own
its destinations. Python runs once per stage per batch; the per-packet work is
in the kernels of parse.py, policy.py, forwarding.py, contract.py, delivery.py.
"""
from __future__ import annotations

import collections
import logging
import threading
import time

import numpy as np

from . import counters as R
from .actions import Actions
from .batch import CAPACITY, DROP, MAX_DEST, ROW_PAD, PacketBatch
from .contract import (ContractViolation, check_injected, describe, drop_live, merge_drop,
                       merge_exclude, merge_forward, prefill_exclude)
from .counters import Counters
from .delivery import DeliveryPlan, edge_ingress, finalize
from .extension import KIND_ORDER, Extension, NdisStatus, Oid, Veto
from .fdb import Fdb, fdb_age
from .forwarding import builtin_stage
from .policy import egress_stage, ingress_stage
from .port import (DEFAULT_PORT_ID, MAX_NIC_INDEX, LifecycleError, Nic, NicState,
                   ObjectReferenced, Port, PortState, PortType, mac_to_int)
from .portkind import PortKind
from .properties import (C_EXISTS, C_MTU, C_NIC_CONNECTED,
                         C_NIC_PRESENT, C_TYPE, AclProperty, CustomProperty, PortTable,
                         SecurityProperty, VlanProperty, property_key)

log = logging.getLogger("hvnet.switch")

MAX_INJECT_DEPTH = 4
RESOURCE_RETRIES = 3


class ExtensionError(ValueError):
    """A configuration of the extension stack that Hyper-V does not allow."""


class ExtensionFault(Exception):
    """An extension hook raised something other than a contract violation."""

    def __init__(self, extension: str, where: str, exc: BaseException, packets: int = 0):
        self.extension, self.where, self.exc, self.packets = extension, where, exc, packets
        super().__init__(f"extension {extension!r} failed in {where}: "
                         f"{type(exc).__name__}: {exc}; {packets} packet(s) dropped")


class DataPathLock:
    """The switch's data-path lock (re-entrant), which the data-path thread hands over.

    CPython's locks are not fair: the data-path thread releases and retakes this
    lock between every two batches, and a thread blocked on it (a VMQ queue's worker,
    a control operation) was seen waiting for as long as traffic flowed, its queue
    filling and dropping meanwhile. ``hand_over``, called by the data-path thread
    between batches, lets such a thread in first, waiting at most ``limit_s``."""

    def __init__(self):
        self._lock = threading.RLock()
        self._count = threading.Lock()
        self.waiting = 0

    def __enter__(self):
        if not self._lock.acquire(blocking=False):
            with self._count:
                self.waiting += 1
            try:
                self._lock.acquire()
            finally:
                with self._count:
                    self.waiting -= 1
        return self

    def __exit__(self, *exc) -> None:
        self._lock.release()

    def hand_over(self, limit_s: float = 0.001) -> None:
        if not self.waiting:
            return
        deadline = time.monotonic() + limit_s
        # sleep(0) lets go of the GIL, which the woken waiter needs to take the lock.
        while self.waiting and time.monotonic() < deadline:
            time.sleep(0)


class SwitchHandle:
    """What an installed extension sees of the switch."""

    def __init__(self, switch: "Switch", ext: Extension):
        self._sw = switch
        self._ext = ext
        self.name = switch.name

    def reason(self, text: str) -> int:
        """Register a drop/exclusion reason; returns the code to write in act arrays."""
        return self._sw.counters.register_reason(self._ext.name, text)

    def ports(self) -> list[Port]:
        return list(self._sw.ports.values())

    def port(self, port_id: int) -> Port | None:
        return self._sw.ports.get(port_id)

    def reference_port(self, port_id: int) -> None:
        p = self._sw.ports.get(port_id)
        if p is None or p.state != PortState.CREATED:
            self._sw.violation(self._ext, 20, f"referenced port {port_id}, which is not in "
                               "the created state")
            return
        p.refs += 1

    def dereference_port(self, port_id: int) -> None:
        p = self._sw.ports.get(port_id)
        if p is None or p.refs <= 0:
            self._sw.violation(self._ext, 20, f"dereferenced port {port_id} without a reference")
            return
        p.refs -= 1

    def reference_nic(self, port_id: int, nic_index: int = 0) -> None:
        p = self._sw.ports.get(port_id)
        nic = p.nics.get(nic_index) if p else None
        if nic is None or nic.state != NicState.CONNECTED:
            self._sw.violation(self._ext, 20, f"referenced NIC {port_id}/{nic_index}, which "
                               "is not connected")
            return
        nic.refs += 1

    def dereference_nic(self, port_id: int, nic_index: int = 0) -> None:
        p = self._sw.ports.get(port_id)
        nic = p.nics.get(nic_index) if p else None
        if nic is None or nic.refs <= 0:
            self._sw.violation(self._ext, 20, f"dereferenced NIC {port_id}/{nic_index} "
                               "without a reference")
            return
        nic.refs -= 1

    def nic_request(self, port_id: int, nic_index: int, request: str, payload=None):
        """Send a request to a NIC (OID_SWITCH_NIC_REQUEST); only to connected NICs (A.19)."""
        p = self._sw.ports.get(port_id)
        nic = p.nics.get(nic_index) if p else None
        if nic is None or nic.state != NicState.CONNECTED:
            self._sw.violation(self._ext, 19, f"sent {request!r} to NIC {port_id}/{nic_index}, "
                               "which is not connected")
            return NdisStatus.FAILURE
        handler = getattr(p.provider, "nic_request", None)
        if handler is None:
            return NdisStatus.NOT_SUPPORTED
        return handler(p, nic, request, payload)


class _Installed:
    __slots__ = ("ext", "enabled", "seq", "slot")

    def __init__(self, ext, enabled, seq, slot):
        self.ext, self.enabled, self.seq, self.slot = ext, enabled, seq, slot


_NO_FDS: frozenset[int] = frozenset()


class Switch:
    def __init__(self, name: str = "vswitch", max_ports: int = 64,
                 batch_capacity: int = CAPACITY, max_dest: int | None = None,
                 fdb_capacity: int = 8192, mac_age_s: float = 300.0, strict: bool = False,
                 clock=time.monotonic_ns):
        if not 1 <= max_ports <= 65534:
            raise ValueError(f"max_ports {max_ports} out of range 1..65534 (16-bit port IDs)")
        self.name = name
        self.max_ports = max_ports
        self.batch_capacity = batch_capacity
        self.max_dest = max_dest or min(MAX_DEST, max_ports)
        self.strict = strict
        self.clock = clock
        self.ports: dict[int, Port] = {}
        self.port_table = PortTable(max_ports)
        self.counters = Counters(max_ports)
        self.fdb = Fdb(fdb_capacity, mac_age_s)
        self.switch_properties: dict[tuple, object] = {}
        self.violations: collections.deque[Exception] = collections.deque(maxlen=1000)
        self.kinds: list[PortKind] = []
        self._installed: list[_Installed] = []
        self._seq = 0
        self._stages: list = []
        self._egress_inject_start = None
        self._inject_at: dict[int, int] = {}
        self._ctx_rows = 0
        cap, md = batch_capacity, self.max_dest
        self._scratch_drop = np.zeros(cap, dtype=np.int64)
        self._scratch_ndst = np.zeros(cap, dtype=np.int64)
        self._scratch_excl = np.zeros((md, cap + ROW_PAD), dtype=np.int64)
        self._scratch_dst = np.zeros((md, cap + ROW_PAD), dtype=np.int64)
        self._ctx = np.zeros((0, cap), dtype=np.int64)
        self._plan = DeliveryPlan(cap, md, max_ports)
        self._pool: list[PacketBatch] = []
        self._borrowed: list[PacketBatch] = []
        self._injected: collections.deque = collections.deque()
        self._depth = 0
        self._raise_later: list[Exception] = []
        self._dp_lock = DataPathLock()
        # Takes the deliveries of steered frames to send on other threads (VMQ queue
        # workers, switch/vmq_workers.py), or None: take_batch, put_batch, offload,
        # port_gone.
        self.offload = None
        # Inside ``Switch.run``: the descriptors its last epoll found readable, for
        # the poll right after it (empty for the polls after that), so a kind may
        # skip system calls on the others. None outside run: nothing is known.
        self.ready_fds: set[int] | None = None
        # The kinds the last poll left unread: VMQ's workers held every batch.
        self.held_back: list[PortKind] = []
        self._rx = self.new_batch()
        self._rebuild()

    # ================================================================ batches
    def new_batch(self) -> PacketBatch:
        return PacketBatch(self.batch_capacity, max_dest=self.max_dest)

    def borrow_batch(self) -> PacketBatch:
        b = self._pool.pop() if self._pool else self.new_batch()
        b.reset()
        self._borrowed.append(b)
        return b

    def _give_back(self, b: PacketBatch) -> None:
        if len(self._pool) < 16:
            self._pool.append(b)

    # ================================================================ port kinds
    def add_kind(self, kind: PortKind) -> PortKind:
        if kind not in self.kinds:
            self.kinds.append(kind)
            kind.bind(self)
        return kind

    # ================================================================ extensions
    def install(self, ext: Extension, enabled: bool = True) -> Extension:
        """Install an extension; the newest of a class sits highest in it (A.1)."""
        if ext.kind not in KIND_ORDER:
            raise ExtensionError(f"{ext!r}: kind must be capture, filter or forwarding")
        if any(i.ext.name == ext.name for i in self._installed):
            raise ExtensionError(f"an extension named {ext.name!r} is already installed")
        if enabled:
            self._check_forwarder(ext)
        self._seq += 1
        slot = -1
        if ext.uses_context:
            slot = self._ctx_rows
            self._ctx_rows += 1
            self._ctx = np.zeros((self._ctx_rows, self.batch_capacity), dtype=np.int64)
        inst = _Installed(ext, enabled, self._seq, slot)
        # Top of its class: before the first installed extension of the same class.
        pos = next((k for k, i in enumerate(self._installed)
                    if KIND_ORDER[i.ext.kind] >= KIND_ORDER[ext.kind]), len(self._installed))
        self._installed.insert(pos, inst)
        ext.switch = SwitchHandle(self, ext)
        ext.attach(ext.switch)
        self._rebuild()
        return ext

    def _check_forwarder(self, ext: Extension) -> None:
        if ext.kind != "forwarding":
            return
        other = next((i.ext for i in self._installed if i.enabled and i.ext.kind == "forwarding"
                      and i.ext is not ext), None)
        if other is not None:
            raise ExtensionError(f"cannot enable forwarding extension {ext.name!r}: "
                                 f"{other.name!r} is already enabled on switch {self.name!r} "
                                 "(rule A.2: at most one forwarding extension per switch)")

    def _find(self, name: str) -> _Installed:
        for i in self._installed:
            if i.ext.name == name:
                return i
        raise KeyError(f"no extension named {name!r} on switch {self.name!r}")

    def enable(self, name: str) -> None:
        inst = self._find(name)
        self._check_forwarder(inst.ext)
        inst.enabled = True
        self._rebuild()

    def disable(self, name: str) -> None:
        self._find(name).enabled = False
        self._rebuild()

    def uninstall(self, name: str) -> None:
        inst = self._find(name)
        self._installed.remove(inst)
        inst.ext.detach()
        self._rebuild()

    def extension_order(self) -> list[str]:
        return [i.ext.name for i in self._installed]

    def set_extension_order(self, names: list[str]) -> None:
        """Reorder (ExtensionOrder); only within a class (A.1)."""
        if sorted(names) != sorted(self.extension_order()):
            raise ExtensionError(f"extension order must name each installed extension once: "
                                 f"{self.extension_order()}")
        by = {i.ext.name: i for i in self._installed}
        new = [by[n] for n in names]
        ranks = [KIND_ORDER[i.ext.kind] for i in new]
        if ranks != sorted(ranks):
            raise ExtensionError("extensions can only be reordered within their class "
                                 "(rule A.1: captures above filters above the forwarder)")
        self._installed = new
        self._rebuild()

    def enabled_extensions(self) -> list[Extension]:
        return [i.ext for i in self._installed if i.enabled]

    @property
    def forwarder(self) -> Extension | None:
        return next((i.ext for i in self._installed if i.enabled and i.ext.kind == "forwarding"),
                    None)

    # ================================================================ violations
    def violation(self, ext: Extension, rule: int, detail: str, packets: int = 0):
        v = ContractViolation(ext.name, rule, detail, packets)
        self._record(v)
        return v

    def _record(self, exc: Exception) -> None:
        self.violations.append(exc)
        if isinstance(exc, ContractViolation):
            self.counters.switch[R.SW_VIOLATIONS] += 1
        log.error("%s", exc)
        if self.strict:
            self._raise_later.append(exc)

    def _raise_pending(self) -> None:
        if self._raise_later:
            exc = self._raise_later[0]
            self._raise_later.clear()
            raise exc

    # ================================================================ pipeline
    def _rebuild(self) -> None:
        """Lay out the stages for the enabled extensions (once per change, not per batch)."""
        enabled = [i for i in self._installed if i.enabled]
        caps = [i for i in enabled if i.ext.kind == "capture"]
        filters = [i for i in enabled if i.ext.kind == "filter"]
        fwd = next((i for i in enabled if i.ext.kind == "forwarding"), None)
        stages: list = []

        # Where a packet injected on ingress by an extension enters: right below it,
        # wherever the extension injects from (1.6: underlying extensions see it).
        inject_at: dict[int, int] = {}
        for inst in caps + filters:
            if hasattr(inst.ext, "ingress"):
                stages.append(self._make_stage(inst, "ingress"))
            inject_at[id(inst.ext)] = len(stages)
        if fwd is None:
            stages.append(self._builtin)
            self._egress_inject_start = None
        else:
            stages.append(self._builtin_ingress)
            # The forwarder's own originated packets come back to it for destinations.
            inject_at[id(fwd.ext)] = len(stages)
            if hasattr(fwd.ext, "ingress"):
                stages.append(self._make_stage(fwd, "ingress"))
            else:
                stages.append(self._no_forwarding)
            if hasattr(fwd.ext, "egress"):
                stages.append(self._make_stage(fwd, "egress"))
            self._egress_inject_start = len(stages)
            stages.append(self._builtin_egress)
        for inst in reversed(caps + filters):
            if hasattr(inst.ext, "egress"):
                stages.append(self._make_stage(inst, "egress"))
        self._stages = stages
        self._inject_at = inject_at

    def _make_stage(self, inst: _Installed, direction: str):
        """One stage: (prepare), call the hook, merge and check what it did (contract.py).

        Which action arrays the hook gets, and which merge kernel checks them, is
        what its kind may do on that path (1.2)."""
        ext = inst.ext
        hook = getattr(ext, direction)
        sd, sx, sdst, sn = (self._scratch_drop, self._scratch_excl, self._scratch_dst,
                            self._scratch_ndst)
        ctx = self._ctx[inst.slot] if inst.slot >= 0 else None
        counters, cfg = self.counters, self.port_table.cfg
        if ext.kind == "capture":
            act = Actions(self, ext, direction, ctx=ctx)
            prepare = merge = None
        elif direction == "egress":         # filter or forwarder: drop and exclude only
            act = Actions(self, ext, direction, drop=sd, exclude=sx, ctx=ctx)

            def prepare(m, n):
                prefill_exclude(m, sx, n)

            def merge(m, n):
                return merge_exclude(m, sd, sx, n, R.EXT_REASON_BASE, counters._next_ext)
        elif ext.kind == "filter":
            act = Actions(self, ext, direction, drop=sd, ctx=ctx)
            prepare = None

            def merge(m, n):
                return merge_drop(m, sd, n, R.EXT_REASON_BASE, counters._next_ext)
        else:                               # the forwarder on ingress
            act = Actions(self, ext, direction, drop=sd, dests=sdst, ndst=sn, ctx=ctx)
            prepare = None

            def merge(m, n):
                return merge_forward(m, cfg, sd, sdst, sn, n, R.EXT_REASON_BASE,
                                     counters._next_ext)

        def stage(batch, now):
            act._batch = batch
            m, n = batch.meta, batch.n
            if prepare is not None:
                prepare(m, n)
            v = batch.view
            v.n = n
            try:
                hook(v, act)
            except Exception as e:           # noqa: BLE001 - any hook failure is contained
                self._hook_failed(ext, direction, e, batch)
                return
            if merge is not None:
                bad = merge(m, n)
                if bad:
                    self._merge_violations(ext, bad, batch)
        return stage

    def _builtin(self, batch, now):
        builtin_stage(batch.meta, self.port_table.cfg, self.port_table.acl, self.fdb.table,
                      self.counters.switch, batch.n, now)

    def _builtin_ingress(self, batch, now):
        ingress_stage(batch.meta, self.port_table.cfg, self.port_table.acl, batch.n,
                      now // 1_000_000_000, False)

    def _builtin_egress(self, batch, now):
        egress_stage(batch.meta, self.port_table.cfg, self.port_table.acl, batch.n, False)

    def _no_forwarding(self, batch, now):
        # A forwarder with no ingress hook adds no destinations: every packet is a drop (A.7).
        drop_live(batch.meta, batch.n, R.NO_DEST)

    def _merge_violations(self, ext, bits, batch) -> None:
        for rule, what in describe(bits):
            self.violation(ext, rule, what)

    def _hook_failed(self, ext, direction, exc, batch) -> None:
        # The hook's half-written verdicts are void; the next stage starts clean.
        self._scratch_drop[:] = 0
        self._scratch_ndst[:] = 0
        readonly = isinstance(exc, (ValueError, TypeError)) or type(exc).__name__ == "TypingError"
        readonly = readonly and ("read-only" in str(exc) or "readonly" in str(exc))
        if isinstance(exc, ContractViolation):
            n = drop_live(batch.meta, batch.n, R.CONTRACT)
            exc.packets = n
            self._record(exc)
        elif readonly:
            n = drop_live(batch.meta, batch.n, R.CONTRACT)
            if ext.kind == "capture":
                rule, what = 3, "a capture extension wrote to a packet or its forwarding context"
            elif direction == "egress":
                rule, what = 5, ("wrote to a packet or its destinations on egress; only "
                                 "exclusions (act.exclude) may change")
            elif ext.kind == "filter":
                rule, what = 4, "wrote to a packet or its forwarding context; clone and inject"
            else:
                rule, what = 5, ("wrote to a packet or its forwarding context; add "
                                 "destinations through act.dests/act.ndst")
            self.violation(ext, rule, f"{direction} hook: {what}", n)
        else:
            n = drop_live(batch.meta, batch.n, R.EXT_FAULT)
            log.exception("extension %r %s hook failed", ext.name, direction, exc_info=exc)
            self._record(ExtensionFault(ext.name, f"{direction} hook", exc, n))

    def queue_injection(self, ext, batch, path) -> None:
        if batch in self._borrowed:
            self._borrowed.remove(batch)
        if path == "egress":
            if self._egress_inject_start is None:
                self.violation(ext, 9, "injected on egress, but no forwarder is enabled")
                return
            start = self._egress_inject_start
        else:
            start = self._inject_at.get(id(ext), 0)
        self._injected.append((ext, batch, start, path, self._depth + 1))

    def process(self, batch: PacketBatch, steer=None) -> int:
        """Switch one batch whose frames and sources are filled in. Returns deliveries.
        ``steer(batch)``, when given, sorts the parsed frames into receive queues
        (VMQ, switch/vmq.py) before anything else sees them, and the queues'
        deliveries are then handed to ``offload`` (their workers) to send."""
        with self._dp_lock:
            now = self.clock()
            edge_ingress(batch.meta, batch.data, self.counters.table, 0, batch.n)
            if steer is not None:
                steer(batch)
            total = self._run(batch, 0, now, steer is not None)
            while self._injected:
                ext, b, start, path, depth = self._injected.popleft()
                # The extension had the batch writable: check it before indexing with it.
                if not (isinstance(b.n, int) and 0 <= b.n <= b.capacity):
                    self.violation(ext, 9, f"injected a batch claiming {b.n!r} packets "
                                   f"(capacity {b.capacity})")
                    self._give_back(b)
                    continue
                bad = check_injected(b.meta, b.data, self.port_table.cfg, b.n, path == "egress")
                if bad:
                    self._merge_violations(ext, bad, b)
                if depth > MAX_INJECT_DEPTH:
                    b.meta[DROP, :b.n] = R.INJECT_LOOP
                    self._count_only(b)
                    self._give_back(b)
                    continue
                self.counters.switch[R.SW_INJECTED] += b.n
                if path == "ingress":
                    edge_ingress(b.meta, b.data, self.counters.table, 0, b.n)
                self._depth = depth
                total += self._run(b, start, now)
                self._depth = 0
                self._give_back(b)
            for b in self._borrowed:          # cloned or originated, never injected
                self._give_back(b)
            self._borrowed.clear()
        if self.strict:
            self._raise_pending()
        return total

    def _run(self, batch, start, now, steered: bool = False) -> int:
        if self._ctx_rows:
            self._ctx[:, :batch.n] = 0
        for st in self._stages[start:]:
            st(batch, now)
        return self._deliver(batch, steered)

    def _deliver(self, batch, steered: bool = False) -> int:
        c, p = self.counters, self._plan
        total = finalize(batch.meta, c.table, p.plan, p.span, batch.n)
        if total:
            if steered and self.offload is not None:
                self.offload.offload(batch, p.plan, p.span)
            for kind in self.kinds:
                kind.transmit(batch, p.plan, p.span)
        return total

    def _count_only(self, batch) -> None:
        c, p = self.counters, self._plan
        finalize(batch.meta, c.table, p.plan, p.span, batch.n)

    def poll(self, kind: PortKind | None = None) -> int:
        """Receive one batch from each port kind (or one) and switch it. Returns frames in.
        One thread at a time (the data-path thread's, or warm()'s before it starts):
        VMQ's batch pool is read and freed outside the data-path lock."""
        got = 0
        self.held_back.clear()
        for k in ([kind] if kind else self.kinds):
            # A steered kind's batch may stay with VMQ workers after this pass. While
            # they hold every batch its frames stay in its ring (for up to wait_s)
            # and the other kinds go on.
            off = self.offload if k.steer is not None else None
            if off is not None and off.dry():
                with self._dp_lock:
                    off.flush()               # what waits for more goes now
                if off.held_back():
                    self.held_back.append(k)
                    continue
            # Held from receive on: control operations change the kinds' port arrays.
            with self._dp_lock:
                b = off.take_batch() if off is not None else None
                if b is None:
                    b = self._rx
                b.reset()
                try:
                    b.n = k.receive(b)
                    got += b.n
                    if b.n:
                        self.process(b, k.steer)
                finally:
                    if off is not None:
                        off.put_batch(b)      # lanes it gave nothing hand over theirs
            self._dp_lock.hand_over()
        return got

    def warm(self) -> None:
        """Load (or compile) every kernel of the data path now, so the first packets
        do not wait for it: one empty batch through every stage and every port kind."""
        with self._dp_lock:
            self.poll()
            b = self._rx
            b.reset()
            self.process(b)
            span = np.zeros_like(self._plan.span)
            for k in self.kinds:
                k.transmit(b, self._plan.plan, span)
                k.warm()

    def run(self, stop, idle_wait_s: float = 0.05, age_every_s: float = 10.0) -> None:
        """The data-path loop: poll every port kind; when none had anything, sleep in
        epoll on their descriptors (kinds with ports but no descriptors are polled
        every millisecond; a kind held back by full VMQ queues is not watched, its
        workers' wake-up is).
        Returns when the ``stop`` event is set."""
        import select
        ep = select.epoll()
        waited: dict[int, int] = {}           # descriptor -> the events asked for
        last_age = time.monotonic()
        try:
            self.ready_fds = set()
            while not stop.is_set():
                moved = self.poll()
                self.ready_fds = _NO_FDS
                if moved:
                    continue
                want: dict[int, int] = {}
                due = [t for t in (k.deadline() for k in self.kinds) if t is not None]
                pollable = False
                off = self.offload
                if off is not None:
                    want.update((fd, 0) for fd in off.fds())   # watched when held back
                for k in self.kinds:
                    kfds = k.fds()
                    # a kind with ports but nothing to wait on is polled every millisecond
                    pollable |= not kfds and bool(k.port_ids.size)
                    held = off is not None and k in self.held_back
                    for fd in kfds:
                        want[fd] = 0 if held else select.EPOLLIN   # 0: kept, not reported
                    if held:
                        wake, until = off.idle_wait()
                        want.update((fd, select.EPOLLIN) for fd in wake)
                        if until is not None:
                            due.append(until)
                # Re-arm what is watched. A descriptor gone, or a number now naming
                # another file (MOD fails), means starting over: epoll keeps a file
                # registered under its old number for as long as any descriptor of it
                # lives (a doorbell the guest still holds), and a guest ringing it
                # would wake this loop for ever.
                stale = not waited.keys() <= want.keys()
                if not stale:
                    for fd in waited:
                        try:
                            ep.modify(fd, want[fd])
                        except (OSError, ValueError):
                            stale = True
                            break
                if stale:
                    ep.close()
                    ep = select.epoll()
                    waited = {}
                for fd in want.keys() - waited.keys():
                    try:
                        ep.register(fd, want[fd])
                        waited[fd] = want[fd]
                    except (OSError, ValueError):   # closed since the kind listed it
                        pass
                wait = 0.001 if pollable else idle_wait_s
                if due:
                    wait = max(0.0, min(wait, min(due) - time.monotonic()))
                self.ready_fds = {fd for fd, _ in ep.poll(wait)}
                if self.held_back and off is not None:
                    off.awake()
                if time.monotonic() - last_age > age_every_s:
                    self.age()
                    last_age = time.monotonic()
        finally:
            self.ready_fds = None
            ep.close()

    def age(self) -> int:
        """Purge aged MAC entries now (lookups also purge lazily)."""
        n = fdb_age(self.fdb.table, self.clock())
        self.counters.switch[R.SW_PURGED] += n
        return n

    # ================================================================ control path
    def _oid(self, oid: Oid, *args) -> NdisStatus:
        """Send a request down the enabled extensions and complete it back up."""
        for attempt in range(RESOURCE_RETRIES + 1):
            status, visited = self._oid_once(oid, args)
            if status != NdisStatus.RESOURCES:
                break
        for ext in reversed(visited):
            try:
                ext.oid_complete(oid, status, *args)
            except Exception as e:               # noqa: BLE001
                self._record(ExtensionFault(ext.name, f"oid_complete({oid.name})", e))
        if self.strict:
            self._raise_pending()
        return status

    def _oid_once(self, oid: Oid, args) -> tuple[NdisStatus, list[Extension]]:
        visited: list[Extension] = []
        for ext in self.enabled_extensions():
            hook = getattr(ext, oid.hook, None)
            visited.append(ext)
            if hook is None:
                continue
            try:
                r = hook(*args)
            except Veto as v:
                r = v.status
            except Exception as e:               # noqa: BLE001
                self._record(ExtensionFault(ext.name, f"{oid.hook} hook", e))
                r = NdisStatus.FAILURE if oid.vetoable else None
            if r is None:
                continue
            if not isinstance(r, NdisStatus):
                self.violation(ext, 17, f"{oid.hook} returned {r!r}; return None or an "
                               "NdisStatus")
                continue
            if r == NdisStatus.SUCCESS:
                if oid.is_create:
                    self.violation(ext, 18, f"completed {oid.name} with SUCCESS")
                    continue
                if ext.kind != "forwarding":
                    self.violation(ext, 17, f"a {ext.kind} extension completed {oid.name} "
                                   "instead of passing it down")
                    continue
                return NdisStatus.SUCCESS, visited
            # a failure status: a veto
            if ext.kind == "capture":
                self.violation(ext, 3, f"vetoed {oid.name}")
                continue
            if not oid.vetoable:
                self.violation(ext, 17, f"vetoed {oid.name}, which must not fail")
                continue
            if oid == Oid.NIC_CREATE and args[1].index != 0:
                self.violation(ext, 17, f"vetoed NIC_CREATE for NIC index {args[1].index}; "
                               "only index 0 may be vetoed")
                continue
            return r, visited
        return NdisStatus.SUCCESS, visited

    # -- ports
    def _port(self, port: Port | int | str) -> Port:
        if isinstance(port, Port):
            port = port.port_id
        if isinstance(port, str):
            for p in self.ports.values():
                if p.name == port:
                    return p
            raise LifecycleError(f"switch {self.name!r} has no port named {port!r}")
        try:
            return self.ports[port]
        except KeyError:
            raise LifecycleError(f"switch {self.name!r} has no port {port}") from None

    def create_port(self, name: str, type: PortType | str = PortType.SYNTHETIC, *,
                    friendly_name: str = "", validation: bool = False,
                    kind: PortKind | None = None) -> Port | None:
        """PORT_CREATE. Returns the port, or None if an extension vetoed it."""
        if isinstance(type, str):
            try:
                type = PortType[type.upper()]
            except KeyError:
                raise ValueError(f"port type {type!r}: expected one of "
                                 f"{[t.name.lower() for t in PortType]}") from None
        if any(p.name == name for p in self.ports.values()):
            raise LifecycleError(f"switch {self.name!r} already has a port named {name!r}")
        pid = next((k for k in range(1, self.max_ports + 1) if k not in self.ports), None)
        if pid is None:
            raise LifecycleError(f"switch {self.name!r} is full ({self.max_ports} ports)")
        port = Port(pid, name, type, friendly_name or name, validation, PortState.NOT_CREATED)
        port.provider = kind
        with self._dp_lock:
            status = self._oid(Oid.PORT_CREATE, port)
            if status != NdisStatus.SUCCESS:
                log.info("PORT_CREATE %s vetoed: %s", name, status.value)
                return None
            port.state = PortState.CREATED
            self.ports[pid] = port
            self.port_table.clear(pid)
            cfg = self.port_table.cfg[pid]
            cfg[C_EXISTS] = 1
            cfg[C_TYPE] = int(type)
            if type == PortType.EXTERNAL:
                # The uplink trunks every VLAN; untagged frames are VLAN 0.
                self.port_table.set_vlan(pid, VlanProperty("trunk", allowed=tuple(range(1, 4095))))
            # The host's own adapters are trusted with any source MAC.
            self.port_table.set_mac(pid, 0, type in (PortType.EXTERNAL, PortType.INTERNAL))
            self.counters.clear_port(pid)
            if kind is not None:
                self.add_kind(kind)
                kind.port_added(port)
        return port

    def update_port(self, port, friendly_name: str) -> None:
        """PORT_UPDATED: only the friendly name may change (1.7)."""
        p = self._port(port)
        if p.state != PortState.CREATED:
            raise LifecycleError(f"port {p.name!r} is {p.state.name}, cannot be updated")
        p.friendly_name = friendly_name
        self._oid(Oid.PORT_UPDATED, p)

    def teardown_port(self, port) -> None:
        p = self._port(port)
        if p.state != PortState.CREATED:
            raise LifecycleError(f"PORT_TEARDOWN of {p.name!r} in state {p.state.name}")
        live = [n.index for n in p.nics.values() if n.state != NicState.DELETED]
        if live:
            raise LifecycleError(f"PORT_TEARDOWN of {p.name!r} while NICs {live} are not deleted "
                                 "(A.16: disconnect and delete them first)")
        with self._dp_lock:
            self._oid(Oid.PORT_TEARDOWN, p)
            p.state = PortState.TEARDOWN
            self.port_table.cfg[p.port_id, C_EXISTS] = 0

    def delete_port(self, port) -> None:
        p = self._port(port)
        if p.state != PortState.TEARDOWN:
            raise LifecycleError(f"PORT_DELETE of {p.name!r} in state {p.state.name} "
                                 "(A.16: tear the port down first)")
        if p.refs:
            raise ObjectReferenced(f"port {p.name!r} is still referenced {p.refs} time(s) by "
                                   "an extension (A.20)")
        with self._dp_lock:          # waits for the batch in flight, if any
            if self.offload is not None:
                self.offload.port_gone(p.port_id)   # and VMQ workers' deliveries (A.16)
            self._oid(Oid.PORT_DELETE, p)
            p.state = PortState.DELETED
            del self.ports[p.port_id]
            self.fdb.flush_port(p.port_id)
            self.port_table.clear(p.port_id)
            if p.provider is not None:
                p.provider.port_removed(p)

    # -- NICs
    def create_nic(self, port, index: int = 0, *, mac=0, mtu: int = 1500,
                   friendly_name: str = "") -> Nic | None:
        p = self._port(port)
        if p.state != PortState.CREATED:
            raise LifecycleError(f"NIC_CREATE on port {p.name!r} in state {p.state.name} "
                                 "(A.16: create the port first)")
        if not 0 <= index <= MAX_NIC_INDEX:
            raise LifecycleError(f"NIC index {index} out of range 0..{MAX_NIC_INDEX}")
        if index != 0 and p.type != PortType.EXTERNAL:
            raise LifecycleError(f"NIC index {index} on {p.type.name} port {p.name!r}: only "
                                 "the external port has NICs other than index 0")
        old = p.nics.get(index)
        if old is not None and old.state not in (NicState.DELETED,):
            raise LifecycleError(f"port {p.name!r} already has NIC {index} ({old.state.name})")
        m = mac_to_int(mac)
        nic = Nic(index, NicState.NOT_CREATED, m, 0, m, mtu, friendly_name)
        status = self._oid(Oid.NIC_CREATE, p, nic)
        if status != NdisStatus.SUCCESS:
            return None
        with self._dp_lock:
            nic.state = NicState.CREATED
            p.nics[index] = nic
            cfg = self.port_table.cfg[p.port_id]
            cfg[C_NIC_PRESENT] |= 1 << index
            if index == 0:
                cfg[C_MTU] = mtu
                if p.type in (PortType.SYNTHETIC, PortType.EMULATED):
                    self.port_table.set_mac(p.port_id, m)
        return nic

    def connect_nic(self, port, index: int = 0) -> None:
        p = self._port(port)
        nic = p.nic(index)
        if nic.state not in (NicState.CREATED, NicState.DISCONNECTED):
            raise LifecycleError(f"NIC_CONNECT of {p.name!r}/{index} in state {nic.state.name}")
        with self._dp_lock:
            nic.state = NicState.CONNECTED
            cfg = self.port_table.cfg[p.port_id]
            cfg[C_NIC_CONNECTED] |= 1 << index
            cfg[C_NIC_PRESENT] |= 1 << index
        self._oid(Oid.NIC_CONNECT, p, nic)

    _NIC_FIELDS = ("friendly_name", "mtu", "permanent_mac", "vm_mac", "current_mac",
                   "vf_assigned")

    def update_nic(self, port, index: int = 0, **changes) -> None:
        """NIC_UPDATED: friendly name, MTU, MAC addresses, VFAssigned (1.7)."""
        p = self._port(port)
        nic = p.nic(index)
        bad = set(changes) - set(self._NIC_FIELDS)
        if bad:
            raise LifecycleError(f"NIC_UPDATED cannot change {sorted(bad)}; allowed: "
                                 f"{list(self._NIC_FIELDS)}")
        if nic.state in (NicState.NOT_CREATED, NicState.DELETED):
            raise LifecycleError(f"NIC_UPDATED of {p.name!r}/{index} in state {nic.state.name}")
        for k, v in changes.items():
            setattr(nic, k, mac_to_int(v) if k.endswith("_mac") else v)
        self._oid(Oid.NIC_UPDATED, p, nic)
        if index == 0:
            cfg = self.port_table.cfg[p.port_id]
            cfg[C_MTU] = nic.mtu
            if p.type in (PortType.SYNTHETIC, PortType.EMULATED):
                self.port_table.set_mac(p.port_id, nic.permanent_mac)

    def disconnect_nic(self, port, index: int = 0) -> None:
        p = self._port(port)
        nic = p.nic(index)
        if nic.state != NicState.CONNECTED:
            raise LifecycleError(f"NIC_DISCONNECT of {p.name!r}/{index} in state {nic.state.name}")
        with self._dp_lock:
            cfg = self.port_table.cfg[p.port_id]
            cfg[C_NIC_CONNECTED] &= ~(1 << index)
            cfg[C_NIC_PRESENT] &= ~(1 << index)
            nic.state = NicState.DISCONNECTED
        self._oid(Oid.NIC_DISCONNECT, p, nic)

    def delete_nic(self, port, index: int = 0) -> None:
        p = self._port(port)
        nic = p.nic(index)
        if nic.state not in (NicState.DISCONNECTED, NicState.CREATED):
            raise LifecycleError(f"NIC_DELETE of {p.name!r}/{index} in state {nic.state.name} "
                                 "(A.16: disconnect it first)")
        if nic.refs:
            raise ObjectReferenced(f"NIC {p.name!r}/{index} is still referenced {nic.refs} "
                                   "time(s) by an extension (A.20)")
        with self._dp_lock:          # DELETE only after in-flight packets drained (A.16)
            self._oid(Oid.NIC_DELETE, p, nic)
            nic.state = NicState.DELETED
            self.port_table.cfg[p.port_id, C_NIC_PRESENT] &= ~(1 << index)
            del p.nics[index]

    # -- the usual sequences
    def add_port(self, name: str, type: PortType | str = PortType.SYNTHETIC, *, mac=0,
                 mtu: int = 1500, kind: PortKind | None = None, nic_index: int = 0,
                 properties=()) -> Port | None:
        """PORT_CREATE, properties, NIC_CREATE, NIC_CONNECT (a VM start, 1.7)."""
        port = self.create_port(name, type, kind=kind)
        if port is None:
            return None
        for prop in properties:
            if self.add_port_property(port, prop) != NdisStatus.SUCCESS:
                self.teardown_port(port)
                self.delete_port(port)
                return None
        if self.create_nic(port, nic_index, mac=mac, mtu=mtu) is None:
            self.teardown_port(port)
            self.delete_port(port)
            return None
        self.connect_nic(port, nic_index)
        return port

    def remove_port(self, port) -> None:
        """NIC_DISCONNECT, NIC_DELETE for each NIC, PORT_TEARDOWN, PORT_DELETE (a VM stop)."""
        p = self._port(port)
        for idx, nic in list(p.nics.items()):
            if nic.state == NicState.CONNECTED:
                self.disconnect_nic(p, idx)
            self.delete_nic(p, idx)
        self.teardown_port(p)
        self.delete_port(p)

    # -- properties
    def _apply_property(self, p: Port, key, prop) -> None:
        pt = self.port_table
        if key[0] == "VlanProperty":
            pt.set_vlan(p.port_id, prop)
            self.fdb.flush_port(p.port_id)
        elif key[0] == "SecurityProperty":
            pt.set_security(p.port_id, prop)
            if prop is None and p.type in (PortType.EXTERNAL, PortType.INTERNAL):
                pt.set_mac(p.port_id, 0, True)
        elif key[0] == "AclProperty":
            pt.set_acl(p.port_id, prop)

    def add_port_property(self, port, prop) -> NdisStatus:
        p = self._port(port)
        key = property_key(prop)
        if key in p.properties:
            raise LifecycleError(f"port {p.name!r} already has a {key[0]} property; update it")
        status = self._oid(Oid.PORT_PROPERTY_ADD, p, prop)
        if status == NdisStatus.SUCCESS:
            with self._dp_lock:
                p.properties[key] = prop
                self._apply_property(p, key, prop)
        return status

    def update_port_property(self, port, prop) -> NdisStatus:
        p = self._port(port)
        key = property_key(prop)
        if key not in p.properties:
            return self.add_port_property(p, prop)
        status = self._oid(Oid.PORT_PROPERTY_UPDATE, p, prop)
        if status == NdisStatus.SUCCESS:
            with self._dp_lock:
                p.properties[key] = prop
                self._apply_property(p, key, prop)
        return status

    def delete_port_property(self, port, prop_or_key) -> NdisStatus:
        p = self._port(port)
        key = prop_or_key if isinstance(prop_or_key, tuple) else property_key(prop_or_key)
        prop = p.properties.get(key)
        if prop is None:
            raise LifecycleError(f"port {p.name!r} has no {key[0]} property")
        status = self._oid(Oid.PORT_PROPERTY_DELETE, p, prop)
        if status == NdisStatus.SUCCESS:
            with self._dp_lock:
                del p.properties[key]
                self._apply_property(p, key, None)
        return status

    def set_switch_property(self, prop: CustomProperty) -> NdisStatus:
        if not isinstance(prop, CustomProperty):
            raise TypeError("switch properties are custom properties (1.10)")
        key = property_key(prop)
        oid = Oid.PROPERTY_UPDATE if key in self.switch_properties else Oid.PROPERTY_ADD
        status = self._oid(oid, prop)
        if status == NdisStatus.SUCCESS:
            self.switch_properties[key] = prop
        return status

    def delete_switch_property(self, property_id: str) -> NdisStatus:
        key = ("custom", property_id)
        prop = self.switch_properties.get(key)
        if prop is None:
            raise LifecycleError(f"switch {self.name!r} has no property {property_id!r}")
        status = self._oid(Oid.PROPERTY_DELETE, prop)
        if status == NdisStatus.SUCCESS:
            del self.switch_properties[key]
        return status

    # ================================================================ state
    def stats(self) -> dict:
        ports = {}
        for p in sorted(self.ports.values(), key=lambda q: q.port_id):
            d = self.counters.port_dict(p.port_id)
            d.update(id=p.port_id, type=p.type.name.lower(), state=p.state.name.lower(),
                     nics={i: n.state.name.lower() for i, n in p.nics.items()})
            info = p.provider.port_info(p.port_id) if p.provider is not None else None
            if info:
                d["nic"] = info
            ports[p.name] = d
        default = self.counters.port_dict(DEFAULT_PORT_ID)
        return {"switch": self.name, "ports": ports, "default_port": default,
                "counters": self.counters.switch_dict(), "fdb_entries": int(self.fdb.info[0]),
                "extensions": [{"name": i.ext.name, "kind": i.ext.kind, "enabled": i.enabled}
                               for i in self._installed],
                "violations": [str(v) for v in list(self.violations)[-20:]]}


# Properties the switch understands, re-exported for convenience.
__all__ = ["Switch", "SwitchHandle", "ExtensionError", "ExtensionFault", "AclProperty",
           "SecurityProperty", "VlanProperty", "CustomProperty"]

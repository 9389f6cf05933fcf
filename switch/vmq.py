"""VMQ on the external port: receive queues sorted by MAC and VLAN, VMMQ and dynamic VMQ.

The NDIS VMQ model (vswitch_vmq_sriov.md 3.1, checklist 32-34, 36-37):

- queue 0 is the default queue: it always exists, cannot be freed, and takes
  every frame no other queue's filter matches;
- a filter tests the destination MAC and, optionally, the VLAN, by equality. A
  MAC-only filter set by the switch carries VLAN_UNTAGGED_OR_ZERO: it matches
  untagged and VLAN-0 frames only; a MAC+VLAN filter never matches an untagged
  frame; tests inside one filter are ANDed, a queue's filters ORed, queues
  tried in order;
- a queue goes Allocated -> Set (filters before ALLOCATION_COMPLETE) -> Running,
  Running <-> Paused (last filter cleared), and on FREE_QUEUE DMA Stopped ->
  Freeing -> gone. Only a Running queue receives; a frame carrying the id of a
  queue that is not Running any more is queue 0's (checklist 34).

VMMQ (3.4): a VM port may own several queues. It hashes with its own key and hash
types (fixed for its life, checklist 36: changing them means freeing and
allocating again) and picks the queue from a power-of-two indirection table that
may change while traffic flows. A frame the types do not cover goes to the
port's first queue (its default processor).

Dynamic VMQ (3.2): each queue has a home CPU; ``rebalance`` moves queues off a
CPU whose measured load is above a high-water mark onto the least loaded CPU,
only when that one is below a low-water mark (hysteresis), and counts the moves.

The switch calls ``steer`` once per batch received on the external port, after
parsing: one compiled loop sets each frame's QUEUE and, for a queue owned by a
VM port, QPORT (the forwarder then skips its lookup; port policies still run).
"""
from __future__ import annotations

import enum
import threading

import numpy as np

from .batch import DMAC, DROP, F_VLAN, FLAGS, HASH, HASH_TYPE, LEN, QPORT, QUEUE, SRC_PORT, TCI
from .kernel import kernel
from .rxfilter import VLAN_ANY, VLAN_UNTAGGED_OR_ZERO, vlan_matches
from .toeplitz import DEFAULT_KEY, LINUX_HASHINFO, check_hash_types, key_table, packet_hash

MAX_TABLE = 128           # indirection entries (NDIS's largest for a VPort)
_RUNNING = 3                # QueueState.RUNNING, as a plain int for the kernel


class QueueState(enum.IntEnum):
    UNDEFINED = 0
    ALLOCATED = 1
    SET = 2
    RUNNING = 3
    PAUSED = 4
    DMA_STOPPED = 5
    FREEING = 6


class VmqError(ValueError):
    pass


@kernel
def steer_batch(meta, n, port_id, f_mac, f_vlan, f_queue, q_state, q_port, q_rss, q_pkts, q_bytes,
                rss_keys, rss_info, rss_itab, rss_isize):
    """Sort a parsed batch into queues (VMQ filters, then VMMQ's table), counting
    each queue's frames and bytes."""
    nf = f_mac.shape[0]
    nq = q_state.shape[0]
    running = _RUNNING
    for i in range(n):
        q = 0
        if meta[DROP, i] == 0 and meta[SRC_PORT, i] == port_id:
            tagged = (meta[FLAGS, i] & F_VLAN) != 0
            vid = meta[TCI, i] & 0xFFF if tagged else 0
            dmac = meta[DMAC, i]
            for f in range(nf):
                fq = f_queue[f]
                if fq <= 0 or fq >= nq or (q != 0 and fq >= q) or f_mac[f] != dmac:
                    continue
                if vlan_matches(f_vlan[f], tagged, vid) and q_state[fq] == running:
                    q = fq                       # the lowest matching queue wins
            if q != 0:
                r = q_rss[q]
                if r >= 0:
                    h, t = packet_hash(meta, i, rss_keys[r], rss_info[r])
                    if t != 0:
                        meta[HASH, i] = np.int64(h)
                        meta[HASH_TYPE, i] = t
                        c = rss_itab[r, np.int64(h) & (rss_isize[r] - 1)]
                        if c > 0 and c < nq and q_rss[c] == r and q_state[c] == running:
                            q = c
        meta[QUEUE, i] = q
        meta[QPORT, i] = q_port[q] if q != 0 else 0
        q_pkts[q] += 1
        q_bytes[q] += meta[LEN, i]


class Vmq:
    """The VMQ side of one external port's NIC: ``queues`` queues besides queue 0,
    ``max_filters`` filters in all, ``cpus`` the processors queues may run on
    (default: this process's; empty: the queues have no threads of their own)."""

    def __init__(self, queues: int, max_filters: int | None = None, cpus=None,
                 max_rss: int | None = None, port_id: int = 0):
        if not 0 <= queues <= 64:
            raise VmqError(f"{queues} VMQ queues: 0 to 64")
        self.num_queues = queues
        self.port_id = port_id              # the external port whose frames are sorted
        max_filters = queues * 2 if max_filters is None else max_filters
        if max_filters < queues:
            raise VmqError(f"{max_filters} filters for {queues} queues: at least one each")
        self.cpus = sorted(cpus) if cpus is not None else sorted(_own_cpus())
        n = queues + 1
        # Control calls serialise on this lock. Steering reads the arrays without
        # it: an indirection table is written so a reader always sees a valid
        # one, but a filter slot may be reused at once, so filters must be set and
        # cleared with the data path stopped between batches (hvnet's runtime
        # holds the switch's data-path lock, which every steer runs under).
        self.lock = threading.Lock()
        self.f_mac = np.zeros(max_filters, dtype=np.int64)
        self.f_vlan = np.zeros(max_filters, dtype=np.int64)
        self.f_queue = np.full(max_filters, -1, dtype=np.int64)
        self.q_state = np.zeros(n, dtype=np.int64)
        self.q_state[0] = QueueState.RUNNING
        self.q_port = np.zeros(n, dtype=np.int64)
        self.q_rss = np.full(n, -1, dtype=np.int64)
        self.q_pkts = np.zeros(n, dtype=np.int64)
        self.q_bytes = np.zeros(n, dtype=np.int64)
        # no CPUs: the queues have no threads of their own (cpu -1, nothing moves)
        self.q_cpu = np.full(n, self.cpus[0] if self.cpus else -1, dtype=np.int64)
        self.q_complete = np.zeros(n, dtype=np.bool_)
        self.q_name = [""] * n
        self.q_load = np.zeros(n, dtype=np.float64)   # share of a CPU, last interval
        max_rss = queues if max_rss is None else max_rss
        self.rss_keys = np.zeros((max(max_rss, 1), 36, 256), dtype=np.uint32)
        self.rss_info = np.zeros(max(max_rss, 1), dtype=np.int64)
        self.rss_itab = np.zeros((max(max_rss, 1), MAX_TABLE), dtype=np.int64)
        self.rss_isize = np.ones(max(max_rss, 1), dtype=np.int64)
        self.rss_free = list(range(max_rss))
        self.rss_of_port: dict[int, int] = {}
        self.moves = 0
        self.history: list[tuple[int, str]] = []    # (queue, state) transitions

    # ---- the state machine (3.1) --------------------------------------------------
    def _to(self, q: int, st: QueueState) -> None:
        self.q_state[q] = st
        self.history.append((q, st.name))

    def _queue(self, q: int) -> int:
        if not (isinstance(q, (int, np.integer)) and 1 <= q <= self.num_queues):
            raise VmqError(f"queue {q!r}: not a queue that can be allocated "
                           f"(1..{self.num_queues}; 0 is the default queue)")
        if self.q_state[q] == QueueState.UNDEFINED:
            raise VmqError(f"queue {q} is not allocated")
        return int(q)

    def allocate(self, port_id: int, name: str = "", cpu: int | None = None) -> int:
        """ALLOCATE_QUEUE for ``port_id``: the lowest free queue id."""
        with self.lock:
            for q in range(1, self.num_queues + 1):
                if self.q_state[q] == QueueState.UNDEFINED:
                    break
            else:
                raise VmqError(f"no free VMQ queue ({self.num_queues} in use)")
            if not self.cpus:
                cpu = -1
            elif cpu is None:
                cpu = self._least_loaded_cpu()
            elif cpu not in self.cpus:
                raise VmqError(f"CPU {cpu} is not one of the queues' CPUs {self.cpus}")
            self.q_port[q] = port_id
            self.q_cpu[q] = cpu
            self.q_complete[q] = False
            self.q_name[q] = name
            self.q_pkts[q] = self.q_bytes[q] = 0
            self._to(q, QueueState.ALLOCATED)
            return q

    def set_filter(self, q: int, mac: int, vlan: int = VLAN_UNTAGGED_OR_ZERO) -> int:
        """SET_FILTER on queue ``q``: returns the filter id."""
        with self.lock:
            q = self._queue(q)
            if self.q_state[q] not in (QueueState.ALLOCATED, QueueState.SET,
                                       QueueState.RUNNING, QueueState.PAUSED):
                raise VmqError(f"queue {q} is {QueueState(self.q_state[q]).name}: "
                               f"no filters can be set")
            if not 0 <= mac < 1 << 48 or (mac >> 40) & 1:
                raise VmqError(f"filter MAC {mac:#x}: a unicast address")
            if vlan not in (VLAN_UNTAGGED_OR_ZERO, VLAN_ANY) and not 1 <= vlan <= 4094:
                raise VmqError(f"filter VLAN {vlan}: 1..4094")
            free = np.flatnonzero(self.f_queue < 0)
            if not free.size:
                raise VmqError(f"no free VMQ filter ({self.f_queue.size} in use)")
            f = int(free[0])
            self.f_mac[f], self.f_vlan[f] = mac, vlan
            self.f_queue[f] = q          # written last: the data path reads it first
            st = self.q_state[q]
            if st == QueueState.ALLOCATED:
                self._to(q, QueueState.SET)
            elif st == QueueState.PAUSED:
                self._to(q, QueueState.RUNNING)
            return f

    def complete(self, q: int) -> None:
        """ALLOCATION_COMPLETE: Running with filters, Paused without."""
        with self.lock:
            q = self._queue(q)
            st = self.q_state[q]
            if st not in (QueueState.ALLOCATED, QueueState.SET):
                raise VmqError(f"queue {q} is {QueueState(st).name}: already complete")
            self.q_complete[q] = True
            self._to(q, QueueState.RUNNING if st == QueueState.SET else QueueState.PAUSED)

    def clear_filter(self, f: int) -> None:
        with self.lock:
            if not (isinstance(f, (int, np.integer)) and 0 <= f < self.f_queue.size) \
                    or self.f_queue[f] < 0:
                raise VmqError(f"filter {f!r} is not set")
            q = int(self.f_queue[f])
            self.f_queue[f] = -1
            if not (self.f_queue == q).any():
                if self.q_state[q] == QueueState.RUNNING:
                    self._to(q, QueueState.PAUSED)     # no filters: nothing indicated
                elif self.q_state[q] == QueueState.SET:
                    self._to(q, QueueState.ALLOCATED)

    def filters(self, q: int) -> list[tuple[int, int, int]]:
        return [(int(f), int(self.f_mac[f]), int(self.f_vlan[f]))
                for f in np.flatnonzero(self.f_queue == q)]

    def free(self, q: int, drained=None) -> None:
        """FREE_QUEUE: clear its filters, stop DMA, wait for what is in flight
        (``drained()``, the data path's word that no batch holds the queue), forget it."""
        with self.lock:
            q = self._queue(q)
            self.f_queue[self.f_queue == q] = -1
            self._to(q, QueueState.DMA_STOPPED)
            self._to(q, QueueState.FREEING)
        if drained is not None:
            drained()
        with self.lock:
            r = int(self.q_rss[q])
            self.q_rss[q] = -1
            if r >= 0 and not (self.q_rss == r).any():
                # the port's last queue: its key and types go with it (checklist 36)
                self.rss_of_port = {p: x for p, x in self.rss_of_port.items() if x != r}
                self.rss_free.append(r)
            self.q_port[q] = 0
            self.q_name[q] = ""
            self._to(q, QueueState.UNDEFINED)

    def queues_of(self, port_id: int) -> list[int]:
        return [q for q in range(1, self.num_queues + 1)
                if self.q_state[q] != QueueState.UNDEFINED and self.q_port[q] == port_id]

    # ---- VMMQ (3.4) ---------------------------------------------------------------
    def enable_rss(self, port_id: int, key: bytes = DEFAULT_KEY,
                   hashinfo: int = LINUX_HASHINFO, table=None) -> None:
        """Spread ``port_id``'s frames over its queues; key and types are fixed from now on."""
        check_hash_types(hashinfo)
        kt = key_table(key)                 # checks the key's size
        with self.lock:
            qs = self.queues_of(port_id)
            if len(qs) < 2:
                raise VmqError(f"port {port_id} holds {len(qs)} queue(s): VMMQ needs two")
            if port_id in self.rss_of_port:
                raise VmqError(f"port {port_id}: the RSS key and hash types are fixed for "
                               f"the port's life; free its queues to change them")
            if not self.rss_free:
                raise VmqError("no RSS-capable VPort left")
            r = self.rss_free.pop(0)
            self.rss_keys[r] = kt
            self.rss_info[r] = hashinfo
            self._write_table(r, qs, table if table is not None
                              else [qs[i % len(qs)] for i in range(MAX_TABLE)])
            self.rss_of_port[port_id] = r
            for q in qs:
                self.q_rss[q] = r
                # The port's queues share its filters from now on: a completed
                # queue without filters of its own receives through them.
                if self.q_state[q] == QueueState.PAUSED:
                    self._to(q, QueueState.RUNNING)

    def set_indirection(self, port_id: int, table) -> None:
        """Change the port's indirection table while traffic flows."""
        with self.lock:
            r = self.rss_of_port.get(port_id)
            if r is None:
                raise VmqError(f"port {port_id} has no VMMQ")
            self._write_table(r, self.queues_of(port_id), table)

    def _write_table(self, r: int, qs: list[int], table) -> None:
        t = [int(x) for x in table]
        if not t or len(t) > MAX_TABLE or len(t) & (len(t) - 1):
            raise VmqError(f"an indirection table of {len(t)} entries: a power of two "
                           f"up to {MAX_TABLE}")
        bad = sorted(set(t) - set(qs))
        if bad:
            raise VmqError(f"indirection entries {bad} are not this port's queues {qs}")
        # Entries first, the size last: a frame in between indexes a valid prefix.
        if len(t) >= self.rss_isize[r]:
            self.rss_itab[r, :len(t)] = t
            self.rss_isize[r] = len(t)
        else:
            self.rss_isize[r] = len(t)
            self.rss_itab[r, :len(t)] = t

    def indirection(self, port_id: int) -> list[int]:
        r = self.rss_of_port[port_id]
        return self.rss_itab[r, :self.rss_isize[r]].tolist()

    # ---- the data path ------------------------------------------------------------
    def steer(self, batch) -> None:
        steer_batch(batch.meta, batch.n, self.port_id, self.f_mac, self.f_vlan, self.f_queue,
                    self.q_state, self.q_port, self.q_rss, self.q_pkts, self.q_bytes,
                    self.rss_keys, self.rss_info, self.rss_itab, self.rss_isize)

    # ---- dynamic VMQ (3.2) --------------------------------------------------------
    def _least_loaded_cpu(self) -> int:
        """Where a new queue starts: the least loaded CPU other than the default
        queue's while there is another (the default queue's is the base processor
        that Set-NetAdapterVmq's BaseProcessorNumber keeps the other queues off,
        3.2), so a queue's deliveries do not wait for the data-path thread's CPU.
        Dynamic VMQ may still move a queue there by measured load."""
        load = {c: 0.0 for c in self.cpus}
        for q in range(self.num_queues + 1):
            if q == 0 or self.q_state[q] != QueueState.UNDEFINED:
                load[int(self.q_cpu[q])] = load.get(int(self.q_cpu[q]), 0.0) \
                    + float(self.q_load[q]) + 1e-3      # ties: fewest queues
        pool = [c for c in self.cpus if c != int(self.q_cpu[0])] or self.cpus
        return min(pool, key=lambda c: (load[c], c))

    def rebalance(self, high: float = 0.85, low: float = 0.5) -> list[tuple[int, int, int]]:
        """Move queues off overloaded CPUs; returns the moves (queue, from, to).

        ``q_load`` holds each queue's measured share of a CPU. A CPU above ``high``
        gives its busiest movable queue to the least loaded CPU if that one stays
        below ``low`` after taking it: between the two marks nothing moves, so a
        queue does not bounce between CPUs."""
        moves = []
        if not self.cpus:
            return moves
        with self.lock:
            live = [q for q in range(self.num_queues + 1)
                    if q == 0 or self.q_state[q] != QueueState.UNDEFINED]
            for _ in range(len(live)):
                load = {c: 0.0 for c in self.cpus}
                for q in live:
                    load[int(self.q_cpu[q])] += float(self.q_load[q])
                hot = max(self.cpus, key=lambda c: load[c])
                cold = min(self.cpus, key=lambda c: load[c])
                if load[hot] <= high or hot == cold:
                    break
                cand = sorted((q for q in live if q != 0 and self.q_cpu[q] == hot),
                              key=lambda q: -self.q_load[q])
                # the busiest queue that fits under the low mark where it goes
                pick = next((q for q in cand if load[cold] + self.q_load[q] < low), None)
                if pick is None:
                    break
                self.q_cpu[pick] = cold
                self.moves += 1
                moves.append((pick, hot, cold))
        return moves

    def info(self) -> list[dict]:
        out = []
        for q in range(self.num_queues + 1):
            st = QueueState(int(self.q_state[q]))
            if q and st == QueueState.UNDEFINED:
                continue
            out.append({"queue": q, "state": st.name, "port": int(self.q_port[q]),
                        "name": self.q_name[q] or ("default" if q == 0 else ""),
                        "cpu": int(self.q_cpu[q]), "packets": int(self.q_pkts[q]),
                        "bytes": int(self.q_bytes[q]), "load": round(float(self.q_load[q]), 3),
                        "filters": [{"mac": m, "vlan": v} for _, m, v in self.filters(q)],
                        "rss": int(self.q_rss[q]) >= 0})
        return out


def _own_cpus() -> set[int]:
    import os
    return os.sched_getaffinity(0)

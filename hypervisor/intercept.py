"""Intercepts: a guest's accesses to an emulated device's registers, as VM exits.

A guest driver's MMIO, port I/O and PCI config accesses reach the device model
as messages on a SOCK_SEQPACKET socket (one per device), the way a VM exit
reaches a device model in a real hypervisor:

- a read is a synchronous round trip: the guest waits for the value;
- a write to a register with side effects that must happen now (the doorbells,
  interrupt registers, resets: ``sync`` offsets) is synchronous too;
- other writes are *posted*: buffered on the guest side and sent ahead of the
  next synchronous access in the same datagram, as QEMU coalesces MMIO writes
  to everything but a handful of registers (e1000_vfio.md A.14, R1). Order is
  kept: the device model applies a batch in the order it was written.

Each access is 16 bytes (``ACCESS``); a datagram holds at most MAX_BATCH. The
guest end is untrusted: a datagram that is not a whole number of accesses, too
long, or with an unknown operation, space or size is refused and counted
(``malformed``) and answered with an error, so a waiting guest does not hang;
the device model keeps running. ``exits`` counts datagrams (VM exits),
``accesses`` the register accesses they carried.
"""
from __future__ import annotations

import logging
import socket

import numpy as np

log = logging.getLogger("hvnet.intercept")

READ, WRITE = 1, 2
MMIO, IO, CONFIG = 0, 1, 2                # the BAR0 registers, the BAR1 window, config space
SPACES = (MMIO, IO, CONFIG)
ACCESS = np.dtype({"names": ["op", "space", "size", "flags", "offset", "value"],
                   "formats": ["u1", "u1", "u1", "u1", "<u4", "<u8"],
                   "offsets": [0, 1, 2, 3, 4, 8], "itemsize": 16})
F_REPLY = 1                               # the guest waits for this one
MAX_BATCH = 256
REPLY = np.dtype({"names": ["status", "value"], "formats": ["<i8", "<u8"],
                  "offsets": [0, 8], "itemsize": 16})
OK, REFUSED = 0, -1


class InterceptError(RuntimeError):
    """The device model refused an access (a malformed message)."""


class InterceptServer:
    """The device model's end. ``handlers[space] = (read(off, size), write(off,
    value, size))``; ``pump()`` applies every waiting batch."""

    def __init__(self, sock: socket.socket, handlers: dict):
        self.sock = sock
        self.sock.setblocking(False)
        self.handlers = handlers
        self.exits = 0
        self.accesses = 0
        self.malformed = 0
        self.closed = False

    def fileno(self) -> int:
        return self.sock.fileno()

    def pump(self, limit: int = 1 << 30) -> int:
        """Handle waiting datagrams (at most ``limit``). Returns how many."""
        done = 0
        while done < limit and not self.closed:
            try:
                data = self.sock.recv(MAX_BATCH * ACCESS.itemsize + 1)
            except BlockingIOError:
                break
            except OSError:
                self.closed = True
                break
            if not data:
                self.closed = True          # the guest went away
                break
            done += 1
            self.exits += 1
            self._batch(data)
        return done

    def _batch(self, data: bytes) -> None:
        n = len(data) // ACCESS.itemsize
        if len(data) % ACCESS.itemsize or not 0 < n <= MAX_BATCH:
            self.malformed += 1
            self._reply(REFUSED, 0)
            return
        acc = np.frombuffer(data, dtype=ACCESS)
        bad = ~np.isin(acc["op"], (READ, WRITE)) | ~np.isin(acc["size"], (1, 2, 4)) | \
            ~np.isin(acc["space"], [s for s in SPACES if s in self.handlers])
        if bad.any():
            self.malformed += 1
            self._reply(REFUSED, 0)
            return
        value = 0
        try:
            for op, space, size, _, off, val in acc.tolist():
                read, write = self.handlers[space]
                self.accesses += 1
                if op == READ:
                    value = read(off, size) & ((1 << (8 * size)) - 1)
                else:
                    write(off, val & ((1 << (8 * size)) - 1), size)
        except Exception:                        # a model bug must not end the host
            log.exception("intercept: the device model failed an access")
            self.malformed += 1
            self._reply(REFUSED, 0)
            return
        if acc["flags"][-1] & F_REPLY:
            self._reply(OK, value)

    def _reply(self, status: int, value: int) -> None:
        r = np.zeros(1, dtype=REPLY)
        r["status"] = status
        r["value"] = value
        try:
            self.sock.send(r.tobytes())
        except (BlockingIOError, OSError):
            self.closed = True              # a guest that does not read its replies


class InterceptClient:
    """The guest driver's end: register accesses as a CPU would make them.
    ``sync[space]`` holds the offsets whose writes are synchronous."""

    def __init__(self, sock: socket.socket, sync: dict | None = None, timeout: float = 10.0):
        self.sock = sock
        self.sock.settimeout(timeout)
        self.sync = sync or {}
        self.pending = np.zeros(MAX_BATCH, dtype=ACCESS)
        self.npending = 0
        self.exits = 0

    def _add(self, op: int, space: int, off: int, size: int, value: int, flags: int) -> None:
        a = self.pending[self.npending]
        a["op"], a["space"], a["size"], a["flags"] = op, space, size, flags
        a["offset"], a["value"] = off, value
        self.npending += 1

    def _send(self) -> int:
        wait = self.npending and self.pending[self.npending - 1]["flags"] & F_REPLY
        self.sock.send(self.pending[:self.npending].tobytes())
        self.npending = 0
        self.exits += 1
        if not wait:
            return 0
        r = np.frombuffer(self.sock.recv(REPLY.itemsize), dtype=REPLY)
        if len(r) != 1 or r["status"][0] != OK:
            raise InterceptError("the device model refused the access")
        return int(r["value"][0])

    def read(self, space: int, off: int, size: int = 4) -> int:
        if self.npending == MAX_BATCH:
            self.flush()
        self._add(READ, space, off, size, 0, F_REPLY)
        return self._send()

    def write(self, space: int, off: int, value: int, size: int = 4) -> None:
        if self.npending == MAX_BATCH:
            self.flush()
        if off in self.sync.get(space, ()):
            self._add(WRITE, space, off, size, value, F_REPLY)
            self._send()
        else:
            self._add(WRITE, space, off, size, value, 0)

    def flush(self) -> None:
        """Send the posted writes now (with a reply, so they are applied when this
        returns)."""
        if self.npending:
            self.pending[self.npending - 1]["flags"] |= F_REPLY
            self._send()


def pair() -> tuple[socket.socket, socket.socket]:
    """(device model end, guest end)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)

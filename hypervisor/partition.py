"""Child partitions: guest RAM, doorbells and interrupts, and the control channel.

What the seed calls the hypervisor, as far as a VM's network devices need it
(DESIGN.md, "Partitions, guest RAM and the guest side"):

- **Guest RAM** is a memfd the host creates and maps; a guest physical address
  (GPA) is an offset in it. The guest process maps the same memfd, received over
  the control channel, sealed against shrinking (a guest's ftruncate would
  otherwise turn the host's next access into a SIGBUS). The host reaches guest memory only through ``GuestMemory``
  and kernels that check every (GPA, length) with ``gpa_ok`` first.
- **Doorbells and interrupts** are eventfds: the guest rings a doorbell (a VM exit
  for "signal the host" in the real thing: HvSignalEvent, an MMIO write), the host
  raises an interrupt (a SynIC event, an MSI). Both sides may signal from
  compiled loops by writing 8 bytes to the fd.
- **The control channel** carries what a real VM sends through the hypervisor
  (VMBus offers and GPADLs, MMIO exits, vfio-user messages): one JSON message per
  SOCK_SEQPACKET datagram, with file descriptors passed by SCM_RIGHTS. Data never
  travels there. The guest end is untrusted: sizes, JSON and descriptor counts
  are checked, and descriptors nobody asked for are closed.
"""
from __future__ import annotations

import fcntl
import json
import mmap
import os
import socket

import numpy as np

from switch.kernel import helper

PAGE = 4096
MAX_MESSAGE = 64 * 1024
MAX_FDS = 16
EFD_NONBLOCK = 0o4000
EFD_CLOEXEC = 0o2000000


class GuestMemoryError(ValueError):
    """A (GPA, length) outside what the guest has."""


@helper
def gpa_ok(mem, gpa, n):
    """True when [gpa, gpa + n) lies inside guest RAM; written so no sum can
    overflow whatever the guest put in ``gpa`` and ``n``."""
    return gpa >= 0 and n >= 0 and gpa <= mem.shape[0] and n <= mem.shape[0] - gpa


class GuestMemory:
    """A partition's RAM: ``size`` bytes of a memfd, mapped shared; ``mem`` is the
    numpy uint8 view kernels take. ``fd`` given: attach to RAM made elsewhere (the
    guest side, with the fd it received)."""

    def __init__(self, size: int, fd: int | None = None, name: str = "guest-ram"):
        if size <= 0 or size % PAGE:
            raise ValueError(f"guest RAM of {size} bytes: a positive multiple of {PAGE}")
        if fd is None:
            fd = os.memfd_create(name, os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.ftruncate(fd, size)
            # The guest gets this fd: sealed so it cannot shrink the file under the
            # host's mapping (a SIGBUS in the host on its next access) nor unseal it.
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL)
        elif os.fstat(fd).st_size < size:
            raise GuestMemoryError(f"the memfd holds {os.fstat(fd).st_size} bytes, "
                                   f"not the {size} announced")
        self.fd, self.size = fd, size
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.mem = np.frombuffer(self.map, dtype=np.uint8)

    def check(self, gpa: int, n: int) -> None:
        if not (0 <= gpa and 0 <= n and gpa + n <= self.size):
            raise GuestMemoryError(f"GPA range [{gpa:#x}, +{n}) is outside the guest's "
                                   f"{self.size:#x} bytes")

    def view(self, gpa: int, n: int) -> np.ndarray:
        self.check(gpa, n)
        return self.mem[gpa:gpa + n]

    def read(self, gpa: int, n: int) -> bytes:
        return self.view(gpa, n).tobytes()

    def write(self, gpa: int, data: bytes) -> None:
        self.view(gpa, len(data))[:] = np.frombuffer(data, dtype=np.uint8)

    def close(self) -> None:
        if self.map is None:
            return
        self.mem = None
        try:
            self.map.close()
        except BufferError:
            pass                          # a view still exists; unmapped with it
        self.map = None
        os.close(self.fd)


class GuestPages:
    """The guest's own memory map: a bump allocator over guest RAM from ``start``
    (page 0 left unused, as a kernel leaves it), for rings and buffers."""

    def __init__(self, size: int, start: int = PAGE):
        self.size, self.next = size, start

    def alloc(self, nbytes: int) -> int:
        n = -(-nbytes // PAGE) * PAGE
        if self.next + n > self.size:
            raise GuestMemoryError(f"guest RAM exhausted: {nbytes} bytes wanted, "
                                   f"{self.size - self.next} left")
        gpa, self.next = self.next, self.next + n
        return gpa


class Doorbell:
    """An eventfd: ``ring()`` from one side, ``fd`` in the other side's epoll.
    ``take()`` returns how many rings arrived since the last take (0 if none)."""

    def __init__(self, fd: int | None = None):
        self.fd = fd if fd is not None else os.eventfd(0, EFD_NONBLOCK | EFD_CLOEXEC)

    def ring(self) -> None:
        os.eventfd_write(self.fd, 1)

    def take(self) -> int:
        try:
            return os.eventfd_read(self.fd)
        except BlockingIOError:
            return 0

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class ControlError(RuntimeError):
    """The other side sent something that is not a control message."""


class ControlChannel:
    """One end of a partition's control channel (AF_UNIX SOCK_SEQPACKET)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple["ControlChannel", "ControlChannel"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def send(self, msg: dict, fds: list[int] = ()) -> None:
        data = json.dumps(msg).encode()
        if len(data) > MAX_MESSAGE:
            raise ControlError(f"control message of {len(data)} bytes (at most {MAX_MESSAGE})")
        socket.send_fds(self.sock, [data], list(fds))

    def recv(self, max_fds: int = MAX_FDS) -> tuple[dict, list[int]] | None:
        """The next message and the descriptors that came with it; None when the
        other side has gone. A malformed message raises ControlError, with any
        descriptors it carried already closed."""
        data, fds, flags, _ = socket.recv_fds(self.sock, MAX_MESSAGE + 1, MAX_FDS)
        try:
            if not data and not fds:
                return None
            if flags & socket.MSG_CTRUNC or len(fds) > max_fds:
                raise ControlError(f"more than {max_fds} descriptors with one message")
            if len(data) > MAX_MESSAGE:
                raise ControlError(f"control message over {MAX_MESSAGE} bytes")
            try:
                msg = json.loads(data)
            except ValueError as e:
                raise ControlError(f"control message is not JSON: {e}") from None
            if not isinstance(msg, dict) or not isinstance(msg.get("type"), str):
                raise ControlError("control message without a 'type' string")
        except ControlError:
            for fd in fds:
                os.close(fd)
            raise
        return msg, fds

    def close(self) -> None:
        self.sock.close()

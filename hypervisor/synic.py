"""The synthetic interrupt controller's message path, as far as VMBus uses it.

A real guest posts VMBus control messages with HvPostMessage and receives them as
SynIC messages on SINT 2: 256-byte HV_MESSAGEs of a 16-byte header and up to 240
payload bytes (vmbus_netvsp.md c.1). Here a ``MessagePort`` carries exactly the
payload bytes, one per SOCK_SEQPACKET datagram, so the VMBus messages on it are
byte for byte the ones Hyper-V carries. What the hypervisor itself would wire up
for a channel (its signal and interrupt, which are eventfds here) travels with
the message that makes them needed, by SCM_RIGHTS.

The guest end is untrusted: longer payloads are refused, and descriptors the
host did not expect are closed.
"""
from __future__ import annotations

import os
import socket

HV_MESSAGE_PAYLOAD = 240
MAX_FDS = 8


class MessageError(RuntimeError):
    """The other side sent something that cannot be a SynIC message payload."""


class MessagePort:
    def __init__(self, sock: socket.socket):
        self.sock = sock

    @classmethod
    def pair(cls) -> tuple["MessagePort", "MessagePort"]:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        return cls(a), cls(b)

    def fileno(self) -> int:
        return self.sock.fileno()

    def post(self, payload: bytes, fds=()) -> None:
        if len(payload) > HV_MESSAGE_PAYLOAD:
            raise MessageError(f"{len(payload)}-byte message: a SynIC message carries at "
                               f"most {HV_MESSAGE_PAYLOAD}")
        socket.send_fds(self.sock, [payload], list(fds))

    def receive(self, max_fds: int = 0) -> tuple[bytes, list[int]] | None:
        """The next payload and any descriptors; None once the other end has gone.
        Raises MessageError (descriptors closed) for an oversized payload or more
        descriptors than ``max_fds``."""
        data, fds, flags, _ = socket.recv_fds(self.sock, HV_MESSAGE_PAYLOAD + 1, MAX_FDS)
        if not data and not fds:
            return None
        if len(data) > HV_MESSAGE_PAYLOAD or len(fds) > max_fds or \
                flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC):
            for fd in fds:
                os.close(fd)
            raise MessageError(f"refused a message of {len(data)} bytes with {len(fds)} "
                               f"descriptors (at most {HV_MESSAGE_PAYLOAD} and {max_fds})")
        return data, fds

    def close(self) -> None:
        self.sock.close()

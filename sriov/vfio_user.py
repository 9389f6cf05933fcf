"""vfio-user: a PCI device served by another process over a Unix socket (QEMU's
docs/interop/vfio-user.rst; e1000_vfio.md B.11).

Both ends are here: ``Server`` runs a device model (anything with the
``UserDevice`` methods) for one client; ``Client`` speaks to it with the same
methods as ``sriov.vfio.Device`` (info, region, config space, BAR mmap, IRQ
eventfds, reset), so a VF driver drives kernel vfio and this server alike.

Messages: a 16-byte header (msg_id u16, command u16, size u32 with the header,
flags u32: type in bits 0-3, NO_REPLY bit 4, ERROR bit 5; error u32), then the
command's payload, which re-uses the vfio structs' layouts (HEADER, DMA_MAP...
below). File descriptors (DMA memory, BAR memory, eventfds) travel as
SCM_RIGHTS. An error reply is the header alone, with ERROR and an errno.

The server does not trust its client: a size outside [16, MAX_MESSAGE], a payload
shorter than its command's, a command before VERSION, more descriptors than
announced, a region, offset or length outside the device, a DMA address outside
what the client mapped: each gets an error reply (or, for a header that cannot be
framed, the connection closes), never an access outside the granted memory.
Disconnect (spec, "Disconnect"): every DMA mapping is unmapped and every IRQ fd
closed; the device keeps its state.
"""
from __future__ import annotations

import errno
import fcntl
import json
import logging
import mmap
import os
import socket
import struct
import threading

from .vfio import Region, lib

log = logging.getLogger("hvnet.vfio_user")

# Commands (spec table "Commands").
VERSION, DMA_MAP, DMA_UNMAP, DEVICE_GET_INFO, DEVICE_GET_REGION_INFO = 1, 2, 3, 4, 5
DEVICE_GET_REGION_IO_FDS, DEVICE_GET_IRQ_INFO, DEVICE_SET_IRQS = 6, 7, 8
REGION_READ, REGION_WRITE, DMA_READ, DMA_WRITE, DEVICE_RESET = 9, 10, 11, 12, 13
REGION_WRITE_MULTI, DEVICE_FEATURE = 15, 16

T_COMMAND, T_REPLY = 0, 1
F_NO_REPLY, F_ERROR = 1 << 4, 1 << 5
MAJOR, MINOR = 0, 2                       # what libvfio-user implements (B.11)

# Layouts, little-endian as the host (spec: "the endianness of the host system").
HEADER = struct.Struct("<HHIII")          # 16
VERSION_HDR = struct.Struct("<HH")        # major, minor, then JSON with its NUL
DMA_MAP_S = struct.Struct("<IIQQQ")       # argsz, flags, offset, address, size: 32
DMA_UNMAP_S = struct.Struct("<IIQQ")      # argsz, flags, address, size: 24
DEVICE_INFO = struct.Struct("<IIII")      # argsz, flags, num_regions, num_irqs: 16
REGION_INFO = struct.Struct("<IIIIQQ")    # = struct vfio_region_info: 32
IRQ_INFO = struct.Struct("<IIII")         # = struct vfio_irq_info: 16
IRQ_SET = struct.Struct("<IIIII")         # = struct vfio_irq_set without data: 20
REGION_RW = struct.Struct("<QII")         # offset, region, count: 16
DMA_RW = struct.Struct("<QQ")             # address, count: 16
CAP_HEADER = struct.Struct("<HHI")        # = struct vfio_info_cap_header: 8
SPARSE_HEAD = struct.Struct("<II")        # nr_areas, reserved
SPARSE_AREA = struct.Struct("<QQ")        # offset, size
IO_FDS = struct.Struct("<IIII")           # argsz, flags, index, count
IO_FD_SUB = struct.Struct("<QQIIIIQ")     # offset, size, fd_index, type, flags, pad, datamatch
IO_FD_TYPE_IOEVENTFD = 0

MAX_DATA = 1 << 20                        # max_data_xfer_size's default
MAX_MESSAGE = HEADER.size + REGION_RW.size + MAX_DATA
MAX_FDS = 8                               # max_msg_fds we announce
DMA_READABLE, DMA_WRITEABLE = 1, 2


class ProtocolError(Exception):
    """The peer broke the framing: the connection cannot go on."""


class CommandError(OSError):
    """A command the peer answered (or must be answered) with an errno."""


class Connection:
    """One end of the socket: whole messages in, whole messages out."""

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.lock = threading.Lock()
        self.next_id = 0

    def send(self, msg_id: int, cmd: int, payload: bytes = b"", fds=(), reply: bool = False,
             error: int = 0, no_reply: bool = False) -> None:
        flags = (T_REPLY if reply else T_COMMAND) | (F_NO_REPLY if no_reply else 0)
        if error:
            flags |= F_ERROR
            payload = b""                 # an error reply is the header alone
        data = HEADER.pack(msg_id & 0xFFFF, cmd, HEADER.size + len(payload), flags, error)
        with self.lock:
            if fds:
                socket.send_fds(self.sock, [data + payload], list(fds))
            else:
                self.sock.sendall(data + payload)

    def _exact(self, n: int) -> bytes:
        out = bytearray()
        while len(out) < n:
            b = self.sock.recv(n - len(out))
            if not b:
                raise EOFError("peer closed the connection")
            out += b
        return bytes(out)

    def recv(self) -> tuple[int, int, int, int, bytes, list[int]]:
        """(msg_id, command, flags, error, payload, fds) of the next message."""
        data, fds, _, _ = socket.recv_fds(self.sock, HEADER.size, MAX_FDS + 1)
        if not data:
            raise EOFError("peer closed the connection")
        try:
            head = data + self._exact(HEADER.size - len(data)) if len(data) < HEADER.size \
                else data
            msg_id, cmd, size, flags, error = HEADER.unpack(head)
            if not HEADER.size <= size <= MAX_MESSAGE:
                raise ProtocolError(f"message size {size} outside {HEADER.size}.."
                                    f"{MAX_MESSAGE}")
            return msg_id, cmd, flags, error, self._exact(size - HEADER.size), fds
        except BaseException:
            for fd in fds:                # a message cut short keeps none of its fds
                os.close(fd)
            raise


# ---- the device side -------------------------------------------------------------------------

class UserDevice:
    """What a device model gives the server (override what the device has)."""

    def info(self) -> tuple[int, int, int]:
        """(flags, num_regions, num_irqs)"""
        raise NotImplementedError

    def region_info(self, index: int) -> tuple:
        """(flags, size, fd to mmap or None) and, optionally, the (offset, size) areas
        of the region that may be mapped (sparse mmap); size 0: no such region."""
        return 0, 0, None

    def region_io_fds(self, index: int) -> list[tuple[int, int, int]]:
        """(offset, size, eventfd) of the region's ioeventfds: the client signals the
        eventfd after writing there (as KVM would on the guest's write)."""
        return []

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        raise CommandError(errno.EINVAL, f"region {index} cannot be read")

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        raise CommandError(errno.EINVAL, f"region {index} cannot be written")

    def irq_info(self, index: int) -> tuple[int, int]:
        """(flags, count)"""
        return 0, 0

    def set_irqs(self, index: int, flags: int, start: int, count: int, fds: list[int]) -> None:
        raise CommandError(errno.EINVAL, f"IRQ index {index} has no interrupts")

    def reset(self) -> None:
        pass

    def attach(self, server: "Server") -> None:
        """Called once: the server, for DMA (``server.dma_read``/``dma_write``)."""

    def disconnected(self) -> None:
        """The client went: close its IRQ eventfds; keep the device's state."""


class _Mapping:
    def __init__(self, address, size, flags, fd, offset):
        self.address, self.size, self.flags = address, size, flags
        self.map = mmap.mmap(fd, size, mmap.MAP_SHARED,
                             mmap.PROT_READ | (mmap.PROT_WRITE if flags & DMA_WRITEABLE else 0),
                             offset=offset)


class Server:
    """Serves ``device`` to the client at the other end of ``sock``."""

    def __init__(self, sock: socket.socket, device: UserDevice, max_dma_maps: int = 1024):
        self.conn = Connection(sock)
        self.device = device
        self.max_dma_maps = max_dma_maps
        self.dma: list[_Mapping] = []
        # Held by whoever uses a mapping's memory (the NIC's data path), and while
        # mappings are made or dropped, so none goes away under a reader.
        self.dma_lock = threading.Lock()
        self.versioned = False
        self.errors: dict[str, int] = {}     # refused commands by reason, for stats
        device.attach(self)

    # DMA into the client's memory, only inside what it mapped.
    def _find(self, address: int, count: int, write: bool) -> tuple[_Mapping, int]:
        for m in self.dma:
            if m.address <= address and count >= 0 and address + count <= m.address + m.size:
                if write and not m.flags & DMA_WRITEABLE:
                    break
                return m, address - m.address
        raise CommandError(errno.EFAULT, f"DMA {'write' if write else 'read'} of {count} "
                           f"bytes at {address:#x}: not inside a mapping the client granted")

    def dma_read(self, address: int, count: int) -> bytes:
        m, off = self._find(address, count, False)
        return m.map[off:off + count]

    def dma_write(self, address: int, data: bytes) -> None:
        m, off = self._find(address, len(data), True)
        m.map[off:off + len(data)] = data

    def serve(self) -> None:
        """Until the client goes (or breaks the framing: then it is hung up on); then
        drop its mappings and IRQ fds (Disconnect)."""
        try:
            while self.serve_one():
                pass
        finally:
            self.disconnect()
            self.conn.sock.close()

    def disconnect(self) -> None:
        try:
            with self.dma_lock:
                maps, self.dma = self.dma, []
                for m in maps:
                    try:
                        m.map.close()
                    except BufferError:       # a view still open: freed with it
                        pass
        finally:
            self.device.disconnected()

    def serve_one(self) -> bool:
        try:
            msg_id, cmd, flags, _, payload, fds = self.conn.recv()
        except (EOFError, OSError):
            return False
        except ProtocolError as e:
            self._count(str(e))
            return False                                     # no framing: hang up
        try:
            return self._serve(msg_id, cmd, flags, payload, fds)
        except OSError:                       # the client went while we answered
            return False
        finally:
            for fd in fds:                    # what the command did not take
                os.close(fd)

    def _serve(self, msg_id, cmd, flags, payload, fds) -> bool:
        try:
            if flags & 0xF != T_COMMAND:
                raise CommandError(errno.EINVAL, "a reply where a command was due")
            if not self.versioned and cmd != VERSION:
                raise CommandError(errno.EINVAL, "a command before VERSION")
            if len(fds) > MAX_FDS:
                raise CommandError(errno.EINVAL, f"{len(fds)} descriptors, {MAX_FDS} announced")
            try:
                out, out_fds = self._handle(cmd, payload, fds)
            except CommandError:
                raise
            except Exception as e:            # a device model bug: this command fails
                log.exception("vfio-user command %d failed in the device model", cmd)
                raise CommandError(errno.EIO, f"device model error: {type(e).__name__}") \
                    from None
        except CommandError as e:
            self._count((e.strerror or "").split(":")[0])
            if not flags & F_NO_REPLY:
                self.conn.send(msg_id, cmd, reply=True, error=e.errno or errno.EINVAL)
            return True
        if not flags & F_NO_REPLY:
            self.conn.send(msg_id, cmd, out, out_fds, reply=True)
        return True

    def _count(self, why: str) -> None:
        self.errors[why] = self.errors.get(why, 0) + 1

    def _need(self, payload: bytes, s: struct.Struct, what: str):
        if len(payload) < s.size:
            raise CommandError(errno.EINVAL, f"{what}: payload of {len(payload)} bytes, "
                               f"{s.size} needed")
        return s.unpack_from(payload)

    def _handle(self, cmd: int, payload: bytes, fds: list[int]) -> tuple[bytes, list[int]]:
        d = self.device
        if cmd == VERSION:
            major, minor = self._need(payload, VERSION_HDR, "VERSION")
            if major != MAJOR:
                raise CommandError(errno.ENOTSUP, f"VERSION: major {major}, this server "
                                   f"speaks {MAJOR}")
            self.versioned = True
            caps = {"capabilities": {"max_msg_fds": MAX_FDS, "max_data_xfer_size": MAX_DATA,
                                     "max_dma_maps": self.max_dma_maps, "pgsizes": 4096}}
            return VERSION_HDR.pack(MAJOR, min(minor, MINOR)) + json.dumps(caps).encode() \
                + b"\0", []
        if cmd == DMA_MAP:
            argsz, flags, offset, address, size = self._need(payload, DMA_MAP_S, "DMA_MAP")
            if len(fds) != 1:
                raise CommandError(errno.EINVAL, "DMA_MAP: one memory fd expected (this "
                                   "server has no DMA_READ/WRITE fallback)")
            fd = fds.pop()                    # ours from here: closed below, once
            try:
                seals = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
            except OSError:
                seals = 0
            if not seals & fcntl.F_SEAL_SHRINK:
                os.close(fd)
                raise CommandError(errno.EPERM, "DMA_MAP: the memory must be a memfd "
                                   "sealed against shrinking (else the client could "
                                   "truncate it under the device: SIGBUS)")
            fds = [fd]
            if size == 0 or address + size > 1 << 63 or not flags & (DMA_READABLE | DMA_WRITEABLE):
                raise CommandError(errno.EINVAL, f"DMA_MAP: bad range {address:#x}+{size:#x} "
                                   f"or flags {flags:#x}")
            try:
                if any(m.address < address + size and address < m.address + m.size
                       for m in self.dma):
                    raise CommandError(errno.EEXIST, f"DMA_MAP: {address:#x}+{size:#x} "
                                       f"overlaps a mapping")
                if len(self.dma) >= self.max_dma_maps:
                    raise CommandError(errno.ENOSPC, "DMA_MAP: too many mappings")
                try:
                    mapping = _Mapping(address, size, flags, fd, offset)
                except (OSError, ValueError, OverflowError) as e:
                    raise CommandError(errno.EINVAL, f"DMA_MAP: cannot map the fd: {e}") \
                        from None
                with self.dma_lock:
                    self.dma.append(mapping)
            finally:
                os.close(fds.pop())
            return b"", []
        if cmd == DMA_UNMAP:
            argsz, flags, address, size = self._need(payload, DMA_UNMAP_S, "DMA_UNMAP")
            with self.dma_lock:
                for k, m in enumerate(self.dma):
                    if m.address == address and m.size == size:
                        del self.dma[k]
                        m.map.close()
                        return DMA_UNMAP_S.pack(DMA_UNMAP_S.size, 0, address, size), []
            raise CommandError(errno.EINVAL, f"DMA_UNMAP: no mapping is exactly "
                               f"{address:#x}+{size:#x}")
        if cmd == DEVICE_GET_INFO:
            self._need(payload, DEVICE_INFO, "DEVICE_GET_INFO")
            flags, nreg, nirq = d.info()
            return DEVICE_INFO.pack(DEVICE_INFO.size, flags, nreg, nirq), []
        if cmd == DEVICE_GET_REGION_INFO:
            index = self._need(payload, REGION_INFO, "DEVICE_GET_REGION_INFO")[2]
            flags, size, fd, *rest = self._region(index)
            sparse = rest[0] if rest else ()
            flags &= ~lib.VFIO_REGION_INFO_FLAG_CAPS
            if fd is None:
                flags &= ~lib.VFIO_REGION_INFO_FLAG_MMAP
            caps = b""
            if sparse and flags & lib.VFIO_REGION_INFO_FLAG_MMAP:
                # VFIO_REGION_INFO_CAP_SPARSE_MMAP, version 1, last in the chain
                caps = CAP_HEADER.pack(lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP, 1, 0) + \
                    SPARSE_HEAD.pack(len(sparse), 0) + \
                    b"".join(SPARSE_AREA.pack(o, n) for o, n in sparse)
                flags |= lib.VFIO_REGION_INFO_FLAG_CAPS
            return REGION_INFO.pack(REGION_INFO.size + len(caps), flags, index,
                                    REGION_INFO.size if caps else 0, size, 0) + caps, \
                [fd] if fd is not None and flags & lib.VFIO_REGION_INFO_FLAG_MMAP else []
        if cmd == DEVICE_GET_REGION_IO_FDS:
            _, _, index, _ = self._need(payload, IO_FDS, "DEVICE_GET_REGION_IO_FDS")
            self._region(index)
            subs = self.device.region_io_fds(index)
            body = b"".join(IO_FD_SUB.pack(off, size, k, IO_FD_TYPE_IOEVENTFD, 0, 0, 0)
                            for k, (off, size, _) in enumerate(subs))
            return IO_FDS.pack(IO_FDS.size + len(body), 0, index, len(subs)) + body, \
                [fd for _, _, fd in subs]
        if cmd == DEVICE_GET_IRQ_INFO:
            index = self._need(payload, IRQ_INFO, "DEVICE_GET_IRQ_INFO")[2]
            flags, count = d.irq_info(index)
            return IRQ_INFO.pack(IRQ_INFO.size, flags, index, count), []
        if cmd == DEVICE_SET_IRQS:
            argsz, flags, index, start, count = self._need(payload, IRQ_SET, "DEVICE_SET_IRQS")
            _, n = d.irq_info(index)
            if not (start <= n and count <= n - start):
                raise CommandError(errno.EINVAL, f"SET_IRQS: {start}+{count} outside the "
                                   f"{n} interrupts of index {index}")
            if flags & lib.VFIO_IRQ_SET_DATA_EVENTFD and fds and len(fds) != count:
                raise CommandError(errno.EINVAL, f"SET_IRQS: {len(fds)} eventfds for "
                                   f"{count} interrupts")
            taken = list(fds)
            fds.clear()                       # the device owns them once it took them
            try:
                d.set_irqs(index, flags, start, count, taken)
            except BaseException:
                for fd in taken:
                    os.close(fd)
                raise
            return b"", []
        if cmd in (REGION_READ, REGION_WRITE):
            offset, index, count = self._need(payload, REGION_RW, "REGION_READ/WRITE")
            size = self._region(index)[1]
            if count > MAX_DATA or offset > size or count > size - offset:
                raise CommandError(errno.EINVAL, f"region {index}: {count} bytes at "
                                   f"{offset:#x} outside its {size}")
            if cmd == REGION_READ:
                data = d.region_read(index, offset, count)
                return REGION_RW.pack(offset, index, len(data)) + data, []
            data = payload[REGION_RW.size:]
            if len(data) != count:
                raise CommandError(errno.EINVAL, f"REGION_WRITE: count {count}, "
                                   f"{len(data)} bytes sent")
            d.region_write(index, offset, data)
            return REGION_RW.pack(offset, index, count), []
        if cmd == DEVICE_RESET:
            d.reset()
            return b"", []
        raise CommandError(errno.ENOSYS, f"command {cmd} is not served")

    def _region(self, index: int):
        nreg = self.device.info()[1]
        if not 0 <= index < nreg:
            raise CommandError(errno.EINVAL, f"region {index}: the device has {nreg}")
        return self.device.region_info(index)


# ---- the driver side -------------------------------------------------------------------------

class Client:
    """A vfio-user device as ``sriov.vfio.Device`` presents a kernel one."""

    def __init__(self, sock: socket.socket, timeout: float = 10.0):
        sock.settimeout(timeout)
        self.conn = Connection(sock)
        self.maps: list[mmap.mmap] = []
        self.region_fds: dict[int, int] = {}
        self.server_caps: dict = {}

    def _call(self, cmd: int, payload: bytes = b"", fds=()) -> tuple[bytes, list[int]]:
        msg_id = self.conn.next_id = (self.conn.next_id + 1) & 0xFFFF
        self.conn.send(msg_id, cmd, payload, fds)
        rid, rcmd, flags, error, data, rfds = self.conn.recv()
        if rid != msg_id or rcmd != cmd or flags & 0xF != T_REPLY:
            for fd in rfds:
                os.close(fd)
            raise ProtocolError(f"reply {rid}/{rcmd} to message {msg_id}/{cmd}")
        if flags & F_ERROR:
            raise CommandError(error or errno.EIO, f"vfio-user command {cmd}: "
                               f"{os.strerror(error) if error else 'failed'}")
        return data, rfds

    def version(self, minor: int = MINOR) -> tuple[int, int]:
        caps = json.dumps({"capabilities": {"max_msg_fds": MAX_FDS,
                                            "max_data_xfer_size": MAX_DATA}}).encode() + b"\0"
        data, _ = self._call(VERSION, VERSION_HDR.pack(MAJOR, minor) + caps)
        major, got = VERSION_HDR.unpack_from(data)
        if major != MAJOR or got > minor:
            raise ProtocolError(f"server answered version {major}.{got} to {MAJOR}.{minor}")
        text = data[VERSION_HDR.size:].split(b"\0", 1)[0]
        self.server_caps = json.loads(text).get("capabilities", {}) if text else {}
        return major, got

    def dma_map(self, fd: int, offset: int, address: int, size: int,
                write: bool = True) -> None:
        flags = DMA_READABLE | (DMA_WRITEABLE if write else 0)
        self._call(DMA_MAP, DMA_MAP_S.pack(DMA_MAP_S.size, flags, offset, address, size), [fd])

    def dma_unmap(self, address: int, size: int) -> None:
        self._call(DMA_UNMAP, DMA_UNMAP_S.pack(DMA_UNMAP_S.size, 0, address, size))

    def info(self) -> dict:
        data, _ = self._call(DEVICE_GET_INFO, DEVICE_INFO.pack(DEVICE_INFO.size, 0, 0, 0))
        _, flags, nreg, nirq = DEVICE_INFO.unpack_from(data)
        return {"flags": flags, "num_regions": nreg, "num_irqs": nirq}

    def region(self, index: int) -> Region:
        data, fds = self._call(DEVICE_GET_REGION_INFO,
                               REGION_INFO.pack(REGION_INFO.size, 0, index, 0, 0, 0))
        _, flags, _, cap_off, size, offset = REGION_INFO.unpack_from(data)
        sparse = []
        if flags & lib.VFIO_REGION_INFO_FLAG_CAPS and cap_off:
            seen = set()
            while cap_off and cap_off not in seen and cap_off + CAP_HEADER.size <= len(data):
                seen.add(cap_off)
                cid, _, nxt = CAP_HEADER.unpack_from(data, cap_off)
                if cid == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP and \
                        cap_off + CAP_HEADER.size + SPARSE_HEAD.size <= len(data):
                    nr, _ = SPARSE_HEAD.unpack_from(data, cap_off + CAP_HEADER.size)
                    at = cap_off + CAP_HEADER.size + SPARSE_HEAD.size
                    for k in range(nr):
                        if at + SPARSE_AREA.size > len(data):
                            break
                        sparse.append(SPARSE_AREA.unpack_from(data, at))
                        at += SPARSE_AREA.size
                cap_off = nxt
        if fds:
            old = self.region_fds.pop(index, None)
            if old is not None:
                os.close(old)
            self.region_fds[index] = fds[0]
            for fd in fds[1:]:
                os.close(fd)
        return Region(index, flags, size, offset, tuple(sparse))

    def region_io_fds(self, index: int) -> list[tuple[int, int, int]]:
        """(offset, size, eventfd) of each ioeventfd the server gave for the region."""
        data, fds = self._call(DEVICE_GET_REGION_IO_FDS, IO_FDS.pack(IO_FDS.size, 0, index, 0))
        _, _, _, count = IO_FDS.unpack_from(data)
        out = []
        for k in range(count):
            at = IO_FDS.size + k * IO_FD_SUB.size
            if at + IO_FD_SUB.size > len(data):
                break
            off, size, fdi, typ, _, _, _ = IO_FD_SUB.unpack_from(data, at)
            if typ == IO_FD_TYPE_IOEVENTFD and fdi < len(fds):
                out.append((off, size, fds[fdi]))
        return out

    def irq_info(self, index: int) -> dict:
        data, _ = self._call(DEVICE_GET_IRQ_INFO, IRQ_INFO.pack(IRQ_INFO.size, 0, index, 0))
        _, flags, _, count = IRQ_INFO.unpack_from(data)
        return {"flags": flags, "count": count}

    def set_irq_eventfds(self, index: int, fds: list[int], start: int = 0) -> None:
        self._call(DEVICE_SET_IRQS, IRQ_SET.pack(
            IRQ_SET.size, lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
            index, start, len(fds)), fds)

    def disable_irqs(self, index: int) -> None:
        self._call(DEVICE_SET_IRQS, IRQ_SET.pack(
            IRQ_SET.size, lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
            index, 0, 0))

    def region_read(self, index: int, offset: int, count: int) -> bytes:
        data, _ = self._call(REGION_READ, REGION_RW.pack(offset, index, count))
        _, _, n = REGION_RW.unpack_from(data)
        return data[REGION_RW.size:REGION_RW.size + n]

    def region_write(self, index: int, offset: int, data: bytes) -> None:
        self._call(REGION_WRITE, REGION_RW.pack(offset, index, len(data)) + data)

    def config_read(self, offset: int, size: int) -> bytes:
        return self.region_read(lib.VFIO_PCI_CONFIG_REGION_INDEX, offset, size)

    def config_write(self, offset: int, data: bytes) -> None:
        self.region_write(lib.VFIO_PCI_CONFIG_REGION_INDEX, offset, data)

    def enable_bus_master(self) -> None:
        cmd = int.from_bytes(self.config_read(4, 2), "little")
        self.config_write(4, (cmd | 0x4).to_bytes(2, "little"))

    def map_region(self, r: Region) -> mmap.mmap:
        """The region mapped shared; with sparse areas, the first area only (mapped
        from its own offset: the rest of the region stays trapped)."""
        fd = self.region_fds.get(r.index)
        if fd is None or not r.mappable:
            raise OSError(errno.EINVAL, f"region {r.index} cannot be mapped")
        off, size = r.sparse[0] if r.sparse else (0, r.size)
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=r.offset + off)
        self.maps.append(m)
        return m

    def reset(self) -> None:
        self._call(DEVICE_RESET)

    def close(self) -> None:
        for m in self.maps:
            try:
                m.close()
            except BufferError:               # a view of it still open: freed with it
                pass
        self.maps.clear()
        for fd in self.region_fds.values():
            os.close(fd)
        self.region_fds.clear()
        self.conn.sock.close()

"""vfio-user both ways over a real socket pair: a small device model served by
``Server`` in a thread, driven by ``Client`` through the same calls a kernel vfio
device takes; DMA into memory the client granted (a memfd), a BAR the client
mmaps, config space by messages, an interrupt by eventfd; and a hostile client:
framing, order, sizes, ranges and descriptors it has no right to."""
from __future__ import annotations

import errno
import os
import select
import socket
import struct
import threading

import pytest

from sriov import vfio_user as U
from sriov.vfio import lib

BAR0, CONFIG = 0, 7


class Toy(U.UserDevice):
    """BAR0: 4 KiB of memfd (mappable); writing a DMA address to its doorbell
    (offset 0x100, via REGION_WRITE) copies 64 bytes there from 0x1000 of the
    client's memory, plus one; config space: 256 bytes; MSI-X: 2 vectors."""

    def __init__(self):
        self.bar = os.memfd_create("toy-bar0")
        os.ftruncate(self.bar, 4096)
        self.config = bytearray(256)
        self.config[0:4] = bytes.fromhex("8680ed10")          # 8086:10ed, an 82599 VF
        self.irqs: list[int] = []
        self.resets = 0

    def attach(self, server):
        self.server = server

    def info(self):
        return lib.VFIO_DEVICE_FLAGS_PCI | lib.VFIO_DEVICE_FLAGS_RESET, 9, 5

    def region_info(self, index):
        rw = lib.VFIO_REGION_INFO_FLAG_READ | lib.VFIO_REGION_INFO_FLAG_WRITE
        if index == BAR0:
            return rw | lib.VFIO_REGION_INFO_FLAG_MMAP, 4096, self.bar
        if index == CONFIG:
            return rw, 256, None
        return 0, 0, None

    def region_read(self, index, offset, count):
        if index == CONFIG:
            return bytes(self.config[offset:offset + count])
        return os.pread(self.bar, count, offset)

    def region_write(self, index, offset, data):
        if index == CONFIG:
            self.config[offset:offset + len(data)] = data
            return
        os.pwrite(self.bar, data, offset)
        if offset == 0x100 and len(data) == 8:
            dst = struct.unpack("<Q", data)[0]
            src = self.server.dma_read(0x1000, 64)
            self.server.dma_write(dst, bytes((b + 1) & 0xFF for b in src))
            if self.irqs:
                os.eventfd_write(self.irqs[0], 1)

    def irq_info(self, index):
        return (lib.VFIO_IRQ_INFO_EVENTFD | lib.VFIO_IRQ_INFO_NORESIZE, 2) \
            if index == lib.VFIO_PCI_MSIX_IRQ_INDEX else (0, 0)

    def set_irqs(self, index, flags, start, count, fds):
        if index != lib.VFIO_PCI_MSIX_IRQ_INDEX:
            raise U.CommandError(errno.EINVAL, "only MSI-X")
        self.disconnected()
        self.irqs = list(fds)

    def disconnected(self):
        for fd in self.irqs:
            os.close(fd)
        self.irqs = []

    def reset(self):
        self.resets += 1


def sealed_memfd(size: int) -> int:
    """Client memory as the server takes it: a memfd that cannot shrink."""
    import fcntl
    fd = os.memfd_create("client-ram", os.MFD_ALLOW_SEALING)
    os.ftruncate(fd, size)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
    return fd


@pytest.fixture
def pair():
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    dev = Toy()
    srv = U.Server(b, dev)
    t = threading.Thread(target=srv.serve, daemon=True)
    t.start()
    cl = U.Client(a)
    yield cl, srv, dev, a
    cl.close()
    t.join(5)
    assert not t.is_alive()
    b.close()
    os.close(dev.bar)


def test_a_driver_runs_the_device_through_the_vfio_calls(pair):
    cl, srv, dev, _ = pair
    assert cl.version(minor=5) == (0, 2)                    # minor clamped to the server's
    assert cl.server_caps["max_msg_fds"] == U.MAX_FDS
    assert cl.info() == {"flags": lib.VFIO_DEVICE_FLAGS_PCI | lib.VFIO_DEVICE_FLAGS_RESET,
                         "num_regions": 9, "num_irqs": 5}
    assert cl.config_read(0, 4) == bytes.fromhex("8680ed10")
    cl.enable_bus_master()
    assert dev.config[4] & 0x4
    bar = cl.region(BAR0)
    assert bar.mappable and bar.size == 4096
    m = cl.map_region(bar)
    m[0:4] = b"\xde\xad\xbe\xef"                             # straight into the device
    assert os.pread(dev.bar, 4, 0) == b"\xde\xad\xbe\xef"
    assert not cl.region(CONFIG).mappable
    # DMA: the client's memory as a memfd, mapped at 0x0 for 64 KiB.
    mem = sealed_memfd(1 << 16)
    os.pwrite(mem, bytes(range(64)), 0x1000)
    cl.dma_map(mem, 0, 0x0, 1 << 16)
    ev = os.eventfd(0, os.EFD_NONBLOCK)
    assert cl.irq_info(lib.VFIO_PCI_MSIX_IRQ_INDEX)["count"] == 2
    cl.set_irq_eventfds(lib.VFIO_PCI_MSIX_IRQ_INDEX, [ev, ev])
    cl.region_write(BAR0, 0x100, struct.pack("<Q", 0x2000))     # the doorbell
    assert os.pread(mem, 64, 0x2000) == bytes(range(1, 65))
    assert select.select([ev], [], [], 5)[0] and os.eventfd_read(ev) == 1
    cl.reset()
    assert dev.resets == 1
    cl.dma_unmap(0x0, 1 << 16)
    assert srv.dma == []
    os.close(mem)
    os.close(ev)


def test_the_device_reaches_only_what_the_client_mapped(pair):
    cl, srv, dev, _ = pair
    cl.version()
    loose = os.memfd_create("loose")                   # shrinkable: refused outright
    os.ftruncate(loose, 1 << 16)
    with pytest.raises(U.CommandError) as e:
        cl.dma_map(loose, 0, 0x40000, 0x1000)
    assert e.value.errno == errno.EPERM
    os.close(loose)
    mem = sealed_memfd(1 << 16)
    cl.dma_map(mem, 0, 0x10000, 0x1000, write=False)            # read-only, 4 KiB
    with pytest.raises(U.CommandError, match="EFAULT|Bad address") as e:
        cl.region_write(BAR0, 0x100, struct.pack("<Q", 0x10800))   # its source is unmapped
    assert e.value.errno == errno.EFAULT
    with pytest.raises(OSError, match="not inside a mapping"):
        srv.dma_write(0x10000, b"x")                              # read-only mapping
    with pytest.raises(OSError, match="not inside a mapping"):
        srv.dma_read(0x10ff0, 32)                                 # runs past its end
    with pytest.raises(U.CommandError) as e:
        cl.dma_map(mem, 0, 0x10800, 0x1000)                       # overlaps
    assert e.value.errno == errno.EEXIST
    with pytest.raises(U.CommandError) as e:
        cl.dma_unmap(0x10000, 0x800)                              # not exactly a mapping
    assert e.value.errno == errno.EINVAL
    os.close(mem)


def _raw(sock, msg_id, cmd, payload=b"", flags=0, size=None, fds=()):
    size = U.HEADER.size + len(payload) if size is None else size
    data = U.HEADER.pack(msg_id, cmd, size, flags, 0) + payload
    socket.send_fds(sock, [data], list(fds)) if fds else sock.sendall(data)
    return U.Connection(sock).recv()


def test_a_hostile_client_gets_errors_and_the_device_keeps_serving(pair):
    cl, srv, dev, sock = pair
    # Before VERSION nothing is served.
    _, _, flags, err, _, _ = _raw(sock, 1, U.DEVICE_GET_INFO, U.DEVICE_INFO.pack(16, 0, 0, 0))
    assert flags & U.F_ERROR and err == errno.EINVAL
    cl.version()
    for cmd, payload, want in [
            (U.DEVICE_GET_INFO, b"\0" * 4, errno.EINVAL),                  # short payload
            (U.DEVICE_GET_REGION_INFO, U.REGION_INFO.pack(32, 0, 99, 0, 0, 0), errno.EINVAL),
            (U.REGION_READ, U.REGION_RW.pack(250, CONFIG, 16), errno.EINVAL),  # past the end
            (U.REGION_READ, U.REGION_RW.pack(2**64 - 8, CONFIG, 16), errno.EINVAL),
            (U.REGION_WRITE, U.REGION_RW.pack(0, CONFIG, 8) + b"\0" * 4, errno.EINVAL),
            (U.DEVICE_SET_IRQS, U.IRQ_SET.pack(20, 0x24, lib.VFIO_PCI_MSIX_IRQ_INDEX, 1, 5),
             errno.EINVAL),                                                # past 2 vectors
            (U.DMA_MAP, U.DMA_MAP_S.pack(32, 3, 0, 0, 4096), errno.EINVAL),   # no fd
            (U.DMA_READ, U.DMA_RW.pack(0, 8), errno.ENOSYS),               # not the client's
            (77, b"", errno.ENOSYS)]:
        _, rcmd, flags, err, data, _ = _raw(sock, 9, cmd, payload)
        assert rcmd == cmd and flags & U.F_ERROR and err == want, (cmd, err)
        assert data == b""                                 # an error reply is the header
    # Nine descriptors where eight were announced: refused, and all of them closed.
    evs = [os.eventfd(0) for _ in range(9)]
    _, _, flags, err, _, _ = _raw(sock, 3, U.DEVICE_SET_IRQS,
                                  U.IRQ_SET.pack(20, 0x24, lib.VFIO_PCI_MSIX_IRQ_INDEX, 0, 2),
                                  fds=evs)
    assert flags & U.F_ERROR and err == errno.EINVAL
    for fd in evs:
        os.close(fd)
    assert cl.config_read(0, 2) == bytes.fromhex("8680")        # still serving
    assert sum(srv.errors.values()) >= 11


def test_a_message_that_cannot_be_framed_ends_the_connection(pair):
    cl, srv, dev, sock = pair
    cl.version()
    sock.sendall(U.HEADER.pack(1, U.DEVICE_GET_INFO, 8, 0, 0))   # size below the header
    with pytest.raises(EOFError):
        U.Connection(sock).recv()
    assert any("outside" in k for k in srv.errors)


def test_version_with_another_major_is_refused(pair):
    cl, srv, dev, sock = pair
    _, _, flags, err, _, _ = _raw(sock, 1, U.VERSION, U.VERSION_HDR.pack(1, 0))
    assert flags & U.F_ERROR and err == errno.ENOTSUP
    assert cl.version() == (0, 2)

"""The Linux vfio UAPI through cffi in API mode (e1000_vfio.md B.1-B.6).

The declarations below say only which names exist; cffi compiles them against
this system's ``<linux/vfio.h>``, so every ioctl number, struct size and field
offset is the kernel header's own (``...;`` lets the compiler place the fields).
The module is built on first use into a cache folder (``HVNET_CFFI_CACHE``, else
``~/.cache/hvnet``), keyed by a hash of its source, and needs gcc and the Python
headers (``make`` installs both).

The cdev + iommufd flow (B.1, B.3) came with Linux 6.6; on older headers (Debian
12 has 6.1's, without ``<linux/iommufd.h>`` or VFIO_DEVICE_BIND_IOMMUFD) its
numbers and structs are declared here from the reference, and ``FROM_HEADER``
says which names the header did not have.

The flows:

- group/container (B.3): ``Container`` (``/dev/vfio/vfio``: API version, IOMMU
  type, DMA map and unmap), ``Group`` (``/dev/vfio/N``: viability, container,
  device fds), ``Device`` (info, regions with their capability chains, config
  space, BAR mmap, IRQs by eventfd, reset);
- cdev/iommufd: ``Iommufd`` (``/dev/iommu``: IOAS alloc, map, unmap) and
  ``Device.bind_iommufd`` / ``attach_ioas``.

Every path is injectable, so the flows can run against another root; the tests
exercise them for real only where ``/dev/vfio`` exists, and otherwise check the
numbers and layouts against the reference's tables (B.2).
"""
from __future__ import annotations

import errno
import fcntl
import hashlib
import importlib.util
import mmap
import os
import sys
from dataclasses import dataclass

_CDEF = r"""
#define VFIO_API_VERSION ...
#define VFIO_TYPE1_IOMMU ...
#define VFIO_TYPE1v2_IOMMU ...
#define VFIO_NOIOMMU_IOMMU ...
#define VFIO_UNMAP_ALL ...

#define VFIO_GET_API_VERSION ...
#define VFIO_CHECK_EXTENSION ...
#define VFIO_SET_IOMMU ...
#define VFIO_GROUP_GET_STATUS ...
#define VFIO_GROUP_SET_CONTAINER ...
#define VFIO_GROUP_UNSET_CONTAINER ...
#define VFIO_GROUP_GET_DEVICE_FD ...
#define VFIO_DEVICE_GET_INFO ...
#define VFIO_DEVICE_GET_REGION_INFO ...
#define VFIO_DEVICE_GET_IRQ_INFO ...
#define VFIO_DEVICE_SET_IRQS ...
#define VFIO_DEVICE_RESET ...
#define VFIO_IOMMU_GET_INFO ...
#define VFIO_IOMMU_MAP_DMA ...
#define VFIO_IOMMU_UNMAP_DMA ...
#define VFIO_DEVICE_FEATURE ...
#define VFIO_DEVICE_BIND_IOMMUFD ...
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT ...
#define VFIO_DEVICE_DETACH_IOMMUFD_PT ...
#define IOMMU_IOAS_ALLOC ...
#define IOMMU_IOAS_MAP ...
#define IOMMU_IOAS_UNMAP ...
#define IOMMU_DESTROY ...

#define VFIO_GROUP_FLAGS_VIABLE ...
#define VFIO_GROUP_FLAGS_CONTAINER_SET ...
#define VFIO_DEVICE_FLAGS_RESET ...
#define VFIO_DEVICE_FLAGS_PCI ...
#define VFIO_DEVICE_FLAGS_CAPS ...
#define VFIO_REGION_INFO_FLAG_READ ...
#define VFIO_REGION_INFO_FLAG_WRITE ...
#define VFIO_REGION_INFO_FLAG_MMAP ...
#define VFIO_REGION_INFO_FLAG_CAPS ...
#define VFIO_REGION_INFO_CAP_SPARSE_MMAP ...
#define VFIO_IRQ_INFO_EVENTFD ...
#define VFIO_IRQ_INFO_MASKABLE ...
#define VFIO_IRQ_INFO_AUTOMASKED ...
#define VFIO_IRQ_INFO_NORESIZE ...
#define VFIO_IRQ_SET_DATA_NONE ...
#define VFIO_IRQ_SET_DATA_BOOL ...
#define VFIO_IRQ_SET_DATA_EVENTFD ...
#define VFIO_IRQ_SET_ACTION_MASK ...
#define VFIO_IRQ_SET_ACTION_UNMASK ...
#define VFIO_IRQ_SET_ACTION_TRIGGER ...
#define VFIO_DMA_MAP_FLAG_READ ...
#define VFIO_DMA_MAP_FLAG_WRITE ...
#define VFIO_DMA_UNMAP_FLAG_ALL ...
#define VFIO_IOMMU_INFO_PGSIZES ...
#define VFIO_IOMMU_INFO_CAPS ...
#define VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE ...
#define IOMMU_IOAS_MAP_FIXED_IOVA ...
#define IOMMU_IOAS_MAP_WRITEABLE ...
#define IOMMU_IOAS_MAP_READABLE ...

#define VFIO_PCI_BAR0_REGION_INDEX ...
#define VFIO_PCI_CONFIG_REGION_INDEX ...
#define VFIO_PCI_NUM_REGIONS ...
#define VFIO_PCI_INTX_IRQ_INDEX ...
#define VFIO_PCI_MSI_IRQ_INDEX ...
#define VFIO_PCI_MSIX_IRQ_INDEX ...
#define VFIO_PCI_NUM_IRQS ...

#define HVNET_IOMMUFD_FROM_HEADER ...

struct vfio_info_cap_header { uint16_t id; uint16_t version; uint32_t next; ...; };
struct vfio_group_status { uint32_t argsz; uint32_t flags; ...; };
struct vfio_device_info { uint32_t argsz; uint32_t flags; uint32_t num_regions;
                          uint32_t num_irqs; uint32_t cap_offset; ...; };
struct vfio_region_info { uint32_t argsz; uint32_t flags; uint32_t index;
                          uint32_t cap_offset; uint64_t size; uint64_t offset; ...; };
struct vfio_region_sparse_mmap_area { uint64_t offset; uint64_t size; ...; };
struct vfio_region_info_cap_sparse_mmap { struct vfio_info_cap_header header;
                                          uint32_t nr_areas; ...; };
struct vfio_irq_info { uint32_t argsz; uint32_t flags; uint32_t index; uint32_t count; ...; };
struct vfio_irq_set { uint32_t argsz; uint32_t flags; uint32_t index; uint32_t start;
                      uint32_t count; ...; };
struct vfio_iommu_type1_info { uint32_t argsz; uint32_t flags; uint64_t iova_pgsizes;
                               uint32_t cap_offset; ...; };
struct vfio_iova_range { uint64_t start; uint64_t end; ...; };
struct vfio_iommu_type1_info_cap_iova_range { struct vfio_info_cap_header header;
                                              uint32_t nr_iovas; ...; };
struct vfio_iommu_type1_dma_map { uint32_t argsz; uint32_t flags; uint64_t vaddr;
                                  uint64_t iova; uint64_t size; ...; };
struct vfio_iommu_type1_dma_unmap { uint32_t argsz; uint32_t flags; uint64_t iova;
                                    uint64_t size; ...; };
struct vfio_device_bind_iommufd { uint32_t argsz; uint32_t flags; int32_t iommufd;
                                  uint32_t out_devid; ...; };
struct vfio_device_attach_iommufd_pt { uint32_t argsz; uint32_t flags; uint32_t pt_id; ...; };
struct iommu_ioas_alloc { uint32_t size; uint32_t flags; uint32_t out_ioas_id; ...; };
struct iommu_ioas_map { uint32_t size; uint32_t flags; uint32_t ioas_id; uint64_t user_va;
                        uint64_t length; uint64_t iova; ...; };
struct iommu_ioas_unmap { uint32_t size; uint32_t ioas_id; uint64_t iova; uint64_t length; ...; };
struct iommu_destroy { uint32_t size; uint32_t id; ...; };
"""

# Declared from the reference (B.2, L-IOMMUFDH) where the header predates Linux 6.6.
_SOURCE = r"""
#include <linux/types.h>
#include <linux/ioctl.h>
#include <linux/vfio.h>
#if __has_include(<linux/iommufd.h>)
#include <linux/iommufd.h>
#endif

#ifdef VFIO_DEVICE_BIND_IOMMUFD
#define HVNET_IOMMUFD_FROM_HEADER 1
#else
#define HVNET_IOMMUFD_FROM_HEADER 0
struct vfio_device_bind_iommufd { __u32 argsz; __u32 flags; __s32 iommufd; __u32 out_devid; };
#define VFIO_DEVICE_BIND_IOMMUFD _IO(VFIO_TYPE, VFIO_BASE + 18)
struct vfio_device_attach_iommufd_pt { __u32 argsz; __u32 flags; __u32 pt_id; };
#define VFIO_DEVICE_ATTACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 19)
#define VFIO_DEVICE_DETACH_IOMMUFD_PT _IO(VFIO_TYPE, VFIO_BASE + 20)
#endif

#ifndef IOMMU_IOAS_ALLOC
#define IOMMUFD_TYPE (';')
struct iommu_destroy { __u32 size; __u32 id; };
#define IOMMU_DESTROY _IO(IOMMUFD_TYPE, 0x80)
struct iommu_ioas_alloc { __u32 size; __u32 flags; __u32 out_ioas_id; };
#define IOMMU_IOAS_ALLOC _IO(IOMMUFD_TYPE, 0x81)
struct iommu_ioas_map { __u32 size; __u32 flags; __u32 ioas_id; __u32 __reserved;
                        __aligned_u64 user_va; __aligned_u64 length; __aligned_u64 iova; };
#define IOMMU_IOAS_MAP _IO(IOMMUFD_TYPE, 0x85)
struct iommu_ioas_unmap { __u32 size; __u32 ioas_id; __aligned_u64 iova; __aligned_u64 length; };
#define IOMMU_IOAS_UNMAP _IO(IOMMUFD_TYPE, 0x86)
#define IOMMU_IOAS_MAP_FIXED_IOVA 1
#define IOMMU_IOAS_MAP_WRITEABLE 2
#define IOMMU_IOAS_MAP_READABLE 4
#endif
"""

_MODULE = "_hvnet_vfio_" + hashlib.sha256((_CDEF + _SOURCE).encode()).hexdigest()[:12]


def _cache_dir() -> str:
    d = os.environ.get("HVNET_CFFI_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "hvnet")
    os.makedirs(d, exist_ok=True)
    return d


def _build():
    """The compiled module: loaded from the cache, or built there first."""
    d = _cache_dir()
    for name in os.listdir(d):
        if name.startswith(_MODULE + ".") and name.endswith(".so"):
            spec = importlib.util.spec_from_file_location(_MODULE, os.path.join(d, name))
            mod = importlib.util.module_from_spec(spec)
            spec.loader.exec_module(mod)
            return mod
    import cffi
    ffi = cffi.FFI()
    ffi.cdef(_CDEF)
    ffi.set_source(_MODULE, _SOURCE)
    try:
        path = ffi.compile(tmpdir=d, verbose=False)
    except Exception as e:            # no compiler, no headers: say which
        raise RuntimeError(f"cannot build the vfio bindings against <linux/vfio.h> "
                           f"(needs gcc, linux-libc-dev and the Python headers): {e}") from e
    spec = importlib.util.spec_from_file_location(_MODULE, path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


_mod = _build()
ffi, lib = _mod.ffi, _mod.lib
FROM_HEADER = {"iommufd": bool(lib.HVNET_IOMMUFD_FROM_HEADER)}


def new(ctype: str, extra: int = 0, **fields):
    """A zeroed struct whose ``argsz`` (or iommufd ``size``) is its own size plus
    ``extra`` trailing bytes, as every vfio call wants (B.2 argsz convention)."""
    size = ffi.sizeof(ctype) + extra
    buf = ffi.new("char[]", size)
    p = ffi.cast(ctype + " *", buf)
    if hasattr(p, "argsz"):
        p.argsz = size
    else:
        p.size = ffi.sizeof(ctype)
    for k, v in fields.items():
        setattr(p, k, v)
    return p, buf


def _ioctl(fd: int, request: int, buf=None, value: int | None = None) -> int:
    """One ioctl: a struct (its buffer, filled in place) or an integer argument."""
    try:
        if buf is not None:
            return fcntl.ioctl(fd, request, ffi.buffer(buf), True)
        return fcntl.ioctl(fd, request, 0 if value is None else value)
    except OSError as e:
        raise OSError(e.errno, f"{_names.get(request, hex(request))}: "
                      f"{os.strerror(e.errno)}") from None


_names = {getattr(lib, n): n for n in dir(lib)
          if n.startswith(("VFIO_GET", "VFIO_CHECK", "VFIO_SET", "VFIO_GROUP_G",
                           "VFIO_GROUP_S", "VFIO_GROUP_U", "VFIO_DEVICE_", "VFIO_IOMMU_",
                           "IOMMU_IOAS", "IOMMU_DESTROY"))
          and isinstance(getattr(lib, n), int) and getattr(lib, n) > 0x3B00}


# ---- group / container -----------------------------------------------------------------------

class Container:
    """``/dev/vfio/vfio``: one IOMMU context for the groups put in it."""

    def __init__(self, path: str = "/dev/vfio/vfio"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
        try:
            v = _ioctl(self.fd, lib.VFIO_GET_API_VERSION)
            if v != lib.VFIO_API_VERSION:
                raise OSError(errno.EPROTO, f"vfio API version {v}, expected "
                              f"{lib.VFIO_API_VERSION}")
        except BaseException:
            os.close(self.fd)
            raise
        self.iommu_type: int | None = None

    def check_extension(self, ext: int) -> bool:
        return _ioctl(self.fd, lib.VFIO_CHECK_EXTENSION, value=ext) > 0

    def set_iommu(self, types=None) -> int:
        """The first IOMMU type the kernel takes, as DPDK probes (B.3): only legal
        once a group is in the container."""
        types = types or (lib.VFIO_TYPE1v2_IOMMU, lib.VFIO_TYPE1_IOMMU, lib.VFIO_NOIOMMU_IOMMU)
        last = None
        for t in types:
            if not self.check_extension(t):
                continue
            try:
                _ioctl(self.fd, lib.VFIO_SET_IOMMU, value=t)
                self.iommu_type = t
                return t
            except OSError as e:
                last = e
        raise last or OSError(errno.ENODEV, "no IOMMU type this container supports")

    def iommu_info(self) -> dict:
        """Page sizes and the IOVA ranges DMA may use (the IOVA_RANGE capability)."""
        p, buf = new("struct vfio_iommu_type1_info")
        _ioctl(self.fd, lib.VFIO_IOMMU_GET_INFO, buf)
        if p.argsz > ffi.sizeof("struct vfio_iommu_type1_info"):     # caps: ask again
            p, buf = new("struct vfio_iommu_type1_info",
                         p.argsz - ffi.sizeof("struct vfio_iommu_type1_info"))
            _ioctl(self.fd, lib.VFIO_IOMMU_GET_INFO, buf)
        ranges = []
        for cap_id, off in _caps(buf, p.cap_offset if p.flags & lib.VFIO_IOMMU_INFO_CAPS else 0):
            if cap_id == lib.VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE:
                c = ffi.cast("struct vfio_iommu_type1_info_cap_iova_range *", buf + off)
                first = ffi.cast("struct vfio_iova_range *",
                                 buf + off + ffi.sizeof(
                                     "struct vfio_iommu_type1_info_cap_iova_range"))
                ranges = [(first[k].start, first[k].end) for k in range(c.nr_iovas)]
        return {"flags": p.flags, "iova_pgsizes": p.iova_pgsizes, "iova_ranges": ranges}

    def map_dma(self, vaddr: int, iova: int, size: int, write: bool = True) -> None:
        flags = lib.VFIO_DMA_MAP_FLAG_READ | (lib.VFIO_DMA_MAP_FLAG_WRITE if write else 0)
        p, buf = new("struct vfio_iommu_type1_dma_map", flags=flags, vaddr=vaddr, iova=iova,
                     size=size)
        _ioctl(self.fd, lib.VFIO_IOMMU_MAP_DMA, buf)

    def unmap_dma(self, iova: int, size: int) -> int:
        """Unmap with no flags (the MAP flags mean other things here: B.5); returns
        the size the kernel unmapped, which must be the size asked."""
        p, buf = new("struct vfio_iommu_type1_dma_unmap", iova=iova, size=size)
        _ioctl(self.fd, lib.VFIO_IOMMU_UNMAP_DMA, buf)
        if p.size != size:
            raise OSError(errno.EIO, f"VFIO_IOMMU_UNMAP_DMA unmapped {p.size} of {size} bytes")
        return p.size

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Group:
    """``/dev/vfio/N``: the unit of ownership; viable only when every device in it
    is bound to vfio (or to nothing)."""

    def __init__(self, number: int | str, dev_root: str = "/dev/vfio"):
        self.path = os.path.join(dev_root, str(number))
        self.fd = os.open(self.path, os.O_RDWR | os.O_CLOEXEC)

    def status(self) -> int:
        p, buf = new("struct vfio_group_status")
        _ioctl(self.fd, lib.VFIO_GROUP_GET_STATUS, buf)
        return p.flags

    def set_container(self, c: Container) -> None:
        if not self.status() & lib.VFIO_GROUP_FLAGS_VIABLE:
            raise OSError(errno.EBUSY, f"{self.path} is not viable: a device of the "
                          f"group is bound to a host driver")
        fd = ffi.new("int *", c.fd)
        _ioctl(self.fd, lib.VFIO_GROUP_SET_CONTAINER, ffi.cast("char *", fd))

    def device(self, bdf: str) -> "Device":
        name = ffi.new("char[]", bdf.encode())
        fd = _ioctl(self.fd, lib.VFIO_GROUP_GET_DEVICE_FD, name)
        return Device(fd)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


# ---- devices -----------------------------------------------------------------------------

@dataclass(frozen=True)
class Region:
    index: int
    flags: int
    size: int
    offset: int
    sparse: tuple[tuple[int, int], ...] = ()     # (offset, size) areas mmap may take

    @property
    def mappable(self) -> bool:
        return bool(self.flags & lib.VFIO_REGION_INFO_FLAG_MMAP)


def _caps(buf, first: int, limit: int | None = None):
    """(id, offset) of each capability in an info buffer's chain, checked to stay in
    the buffer and not to loop: the chain comes from the kernel, but still."""
    size = limit if limit is not None else len(ffi.buffer(buf))
    seen = set()
    off = first
    hdr = ffi.sizeof("struct vfio_info_cap_header")
    while off and off not in seen and off + hdr <= size:
        seen.add(off)
        h = ffi.cast("struct vfio_info_cap_header *", buf + off)
        yield h.id, off
        off = h.next


class Device:
    """A device fd (from a group, or a cdev bound to iommufd)."""

    def __init__(self, fd: int):
        self.fd = fd
        self.maps: list[mmap.mmap] = []

    def info(self) -> dict:
        p, buf = new("struct vfio_device_info")
        _ioctl(self.fd, lib.VFIO_DEVICE_GET_INFO, buf)
        return {"flags": p.flags, "num_regions": p.num_regions, "num_irqs": p.num_irqs}

    def region(self, index: int) -> Region:
        base = ffi.sizeof("struct vfio_region_info")
        p, buf = new("struct vfio_region_info", index=index)
        _ioctl(self.fd, lib.VFIO_DEVICE_GET_REGION_INFO, buf)
        if p.argsz > base:            # a capability chain that did not fit: ask again
            p, buf = new("struct vfio_region_info", p.argsz - base, index=index)
            _ioctl(self.fd, lib.VFIO_DEVICE_GET_REGION_INFO, buf)
        sparse = []
        if p.flags & lib.VFIO_REGION_INFO_FLAG_CAPS:
            for cap_id, off in _caps(buf, p.cap_offset):
                if cap_id == lib.VFIO_REGION_INFO_CAP_SPARSE_MMAP:
                    c = ffi.cast("struct vfio_region_info_cap_sparse_mmap *", buf + off)
                    areas = ffi.cast("struct vfio_region_sparse_mmap_area *", buf + off
                                     + ffi.sizeof("struct vfio_region_info_cap_sparse_mmap"))
                    sparse = [(areas[k].offset, areas[k].size) for k in range(c.nr_areas)]
        return Region(index, p.flags, p.size, p.offset, tuple(sparse))

    def irq_info(self, index: int) -> dict:
        p, buf = new("struct vfio_irq_info", index=index)
        _ioctl(self.fd, lib.VFIO_DEVICE_GET_IRQ_INFO, buf)
        return {"flags": p.flags, "count": p.count}

    def set_irq_eventfds(self, index: int, fds: list[int], start: int = 0) -> None:
        """Each vector from ``start`` signals its eventfd (-1: none), B.4."""
        p, buf = new("struct vfio_irq_set", 4 * len(fds),
                     flags=lib.VFIO_IRQ_SET_DATA_EVENTFD | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
                     index=index, start=start, count=len(fds))
        data = ffi.cast("int32_t *", buf + ffi.sizeof("struct vfio_irq_set"))
        for k, fd in enumerate(fds):
            data[k] = fd
        _ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, buf)

    def disable_irqs(self, index: int) -> None:
        p, buf = new("struct vfio_irq_set",
                     flags=lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_TRIGGER,
                     index=index, start=0, count=0)
        _ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, buf)

    def unmask_intx(self) -> None:
        p, buf = new("struct vfio_irq_set",
                     flags=lib.VFIO_IRQ_SET_DATA_NONE | lib.VFIO_IRQ_SET_ACTION_UNMASK,
                     index=lib.VFIO_PCI_INTX_IRQ_INDEX, start=0, count=1)
        _ioctl(self.fd, lib.VFIO_DEVICE_SET_IRQS, buf)

    def reset(self) -> None:
        _ioctl(self.fd, lib.VFIO_DEVICE_RESET)

    def config_read(self, offset: int, size: int) -> bytes:
        r = self.region(lib.VFIO_PCI_CONFIG_REGION_INDEX)
        if not 0 <= offset <= r.size - size:
            raise ValueError(f"config offset {offset}+{size} outside {r.size} bytes")
        return os.pread(self.fd, size, r.offset + offset)

    def config_write(self, offset: int, data: bytes) -> None:
        r = self.region(lib.VFIO_PCI_CONFIG_REGION_INDEX)
        if not 0 <= offset <= r.size - len(data):
            raise ValueError(f"config offset {offset}+{len(data)} outside {r.size} bytes")
        os.pwrite(self.fd, data, r.offset + offset)

    def enable_bus_master(self) -> None:
        """PCI command register bit 2 (B.3 step 10), read-modify-write."""
        cmd = int.from_bytes(self.config_read(4, 2), "little")
        self.config_write(4, (cmd | 0x4).to_bytes(2, "little"))

    def map_region(self, r: Region) -> mmap.mmap:
        """A BAR mapped shared at the offset the kernel gave (never index << 40); with
        sparse areas, the first area only (the rest stays trapped)."""
        if not r.mappable or r.size == 0:
            raise OSError(errno.EINVAL, f"region {r.index} cannot be mapped")
        off, size = r.sparse[0] if r.sparse else (0, r.size)
        m = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE,
                      offset=r.offset + off)
        self.maps.append(m)
        return m

    # cdev + iommufd (B.3, second flow)
    def bind_iommufd(self, iommufd: "Iommufd") -> int:
        p, buf = new("struct vfio_device_bind_iommufd", iommufd=iommufd.fd)
        _ioctl(self.fd, lib.VFIO_DEVICE_BIND_IOMMUFD, buf)
        return p.out_devid

    def attach_ioas(self, ioas_id: int) -> None:
        p, buf = new("struct vfio_device_attach_iommufd_pt", pt_id=ioas_id)
        _ioctl(self.fd, lib.VFIO_DEVICE_ATTACH_IOMMUFD_PT, buf)

    def close(self) -> None:
        for m in self.maps:
            m.close()
        self.maps.clear()
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


class Iommufd:
    """``/dev/iommu``: I/O address spaces for cdev devices."""

    def __init__(self, path: str = "/dev/iommu"):
        self.fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)

    def ioas_alloc(self) -> int:
        p, buf = new("struct iommu_ioas_alloc")
        _ioctl(self.fd, lib.IOMMU_IOAS_ALLOC, buf)
        return p.out_ioas_id

    def ioas_map(self, ioas_id: int, vaddr: int, iova: int, length: int) -> None:
        flags = (lib.IOMMU_IOAS_MAP_FIXED_IOVA | lib.IOMMU_IOAS_MAP_READABLE
                 | lib.IOMMU_IOAS_MAP_WRITEABLE)
        p, buf = new("struct iommu_ioas_map", flags=flags, ioas_id=ioas_id, user_va=vaddr,
                     iova=iova, length=length)
        _ioctl(self.fd, lib.IOMMU_IOAS_MAP, buf)

    def ioas_unmap(self, ioas_id: int, iova: int, length: int) -> int:
        p, buf = new("struct iommu_ioas_unmap", ioas_id=ioas_id, iova=iova, length=length)
        _ioctl(self.fd, lib.IOMMU_IOAS_UNMAP, buf)
        return p.length

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def available(dev_root: str = "/dev") -> str | None:
    """None if this machine has kernel vfio, else why not (for tests to skip with)."""
    if not os.path.exists(os.path.join(dev_root, "vfio", "vfio")):
        return f"no {dev_root}/vfio/vfio: this kernel has no vfio (CONFIG_VFIO)"
    return None


if __name__ == "__main__":       # python -m sriov.vfio: what was compiled, from where
    print({"module": _MODULE, "iommufd_from_header": FROM_HEADER["iommufd"],
           "VFIO_GET_API_VERSION": hex(lib.VFIO_GET_API_VERSION)}, file=sys.stdout)

"""The vfio bindings: ioctl numbers, struct sizes and field offsets as compiled from
this system's <linux/vfio.h>, against the reference's tables (e1000_vfio.md B.2);
the capability-chain walk on hand-built buffers; errors named by their ioctl; and
the group/container flow for real where this machine has /dev/vfio."""
from __future__ import annotations

import os

import pytest

from sriov import vfio
from sriov.vfio import ffi, lib

# B.2's table: request = 0x3B00 + 100 + n.
IOCTLS = {"VFIO_GET_API_VERSION": 0x3B64, "VFIO_CHECK_EXTENSION": 0x3B65,
          "VFIO_SET_IOMMU": 0x3B66, "VFIO_GROUP_GET_STATUS": 0x3B67,
          "VFIO_GROUP_SET_CONTAINER": 0x3B68, "VFIO_GROUP_UNSET_CONTAINER": 0x3B69,
          "VFIO_GROUP_GET_DEVICE_FD": 0x3B6A, "VFIO_DEVICE_GET_INFO": 0x3B6B,
          "VFIO_DEVICE_GET_REGION_INFO": 0x3B6C, "VFIO_DEVICE_GET_IRQ_INFO": 0x3B6D,
          "VFIO_DEVICE_SET_IRQS": 0x3B6E, "VFIO_DEVICE_RESET": 0x3B6F,
          "VFIO_IOMMU_GET_INFO": 0x3B70, "VFIO_IOMMU_MAP_DMA": 0x3B71,
          "VFIO_IOMMU_UNMAP_DMA": 0x3B72, "VFIO_DEVICE_FEATURE": 0x3B75,
          "VFIO_DEVICE_BIND_IOMMUFD": 0x3B76, "VFIO_DEVICE_ATTACH_IOMMUFD_PT": 0x3B77,
          "VFIO_DEVICE_DETACH_IOMMUFD_PT": 0x3B78, "IOMMU_DESTROY": 0x3B80,
          "IOMMU_IOAS_ALLOC": 0x3B81, "IOMMU_IOAS_MAP": 0x3B85, "IOMMU_IOAS_UNMAP": 0x3B86}

CONSTANTS = {"VFIO_API_VERSION": 0, "VFIO_TYPE1_IOMMU": 1, "VFIO_TYPE1v2_IOMMU": 3,
             "VFIO_NOIOMMU_IOMMU": 8, "VFIO_UNMAP_ALL": 9,
             "VFIO_GROUP_FLAGS_VIABLE": 1, "VFIO_GROUP_FLAGS_CONTAINER_SET": 2,
             "VFIO_DEVICE_FLAGS_RESET": 1, "VFIO_DEVICE_FLAGS_PCI": 2,
             "VFIO_DEVICE_FLAGS_CAPS": 0x80, "VFIO_REGION_INFO_FLAG_READ": 1,
             "VFIO_REGION_INFO_FLAG_WRITE": 2, "VFIO_REGION_INFO_FLAG_MMAP": 4,
             "VFIO_REGION_INFO_FLAG_CAPS": 8, "VFIO_REGION_INFO_CAP_SPARSE_MMAP": 1,
             "VFIO_IRQ_INFO_EVENTFD": 1, "VFIO_IRQ_INFO_MASKABLE": 2,
             "VFIO_IRQ_INFO_AUTOMASKED": 4, "VFIO_IRQ_INFO_NORESIZE": 8,
             "VFIO_IRQ_SET_DATA_NONE": 1, "VFIO_IRQ_SET_DATA_BOOL": 2,
             "VFIO_IRQ_SET_DATA_EVENTFD": 4, "VFIO_IRQ_SET_ACTION_MASK": 8,
             "VFIO_IRQ_SET_ACTION_UNMASK": 0x10, "VFIO_IRQ_SET_ACTION_TRIGGER": 0x20,
             "VFIO_DMA_MAP_FLAG_READ": 1, "VFIO_DMA_MAP_FLAG_WRITE": 2,
             "VFIO_DMA_UNMAP_FLAG_ALL": 2, "VFIO_IOMMU_TYPE1_INFO_CAP_IOVA_RANGE": 1,
             "IOMMU_IOAS_MAP_FIXED_IOVA": 1, "IOMMU_IOAS_MAP_WRITEABLE": 2,
             "IOMMU_IOAS_MAP_READABLE": 4, "VFIO_PCI_BAR0_REGION_INDEX": 0,
             "VFIO_PCI_CONFIG_REGION_INDEX": 7, "VFIO_PCI_NUM_REGIONS": 9,
             "VFIO_PCI_INTX_IRQ_INDEX": 0, "VFIO_PCI_MSI_IRQ_INDEX": 1,
             "VFIO_PCI_MSIX_IRQ_INDEX": 2}

# (struct, {field: offset}, sizes the reference allows: its own and older kernels')
LAYOUTS = [
    ("vfio_group_status", {"argsz": 0, "flags": 4}, {8}),
    # 24 with a trailing pad in newer headers, 20 in 6.1's (no pad), 16 before cap_offset
    ("vfio_device_info", {"argsz": 0, "flags": 4, "num_regions": 8, "num_irqs": 12,
                          "cap_offset": 16}, {20, 24}),
    ("vfio_region_info", {"argsz": 0, "flags": 4, "index": 8, "cap_offset": 12, "size": 16,
                          "offset": 24}, {32}),
    ("vfio_irq_info", {"argsz": 0, "flags": 4, "index": 8, "count": 12}, {16}),
    ("vfio_irq_set", {"argsz": 0, "flags": 4, "index": 8, "start": 12, "count": 16}, {20}),
    ("vfio_iommu_type1_info", {"argsz": 0, "flags": 4, "iova_pgsizes": 8,
                               "cap_offset": 16}, {24}),
    ("vfio_iommu_type1_dma_map", {"argsz": 0, "flags": 4, "vaddr": 8, "iova": 16,
                                  "size": 24}, {32}),
    ("vfio_iommu_type1_dma_unmap", {"argsz": 0, "flags": 4, "iova": 8, "size": 16}, {24}),
    ("vfio_info_cap_header", {"id": 0, "version": 2, "next": 4}, {8}),
    ("vfio_region_info_cap_sparse_mmap", {"header": 0, "nr_areas": 8}, {16}),
    ("vfio_device_bind_iommufd", {"argsz": 0, "flags": 4, "iommufd": 8, "out_devid": 12},
     {16, 24}),
    ("vfio_device_attach_iommufd_pt", {"argsz": 0, "flags": 4, "pt_id": 8}, {12, 16}),
    ("iommu_ioas_alloc", {"size": 0, "flags": 4, "out_ioas_id": 8}, {12}),
    ("iommu_ioas_map", {"size": 0, "flags": 4, "ioas_id": 8, "user_va": 16, "length": 24,
                        "iova": 32}, {40}),
    ("iommu_ioas_unmap", {"size": 0, "ioas_id": 4, "iova": 8, "length": 16}, {24}),
]


@pytest.mark.parametrize("name,value", sorted(IOCTLS.items()))
def test_ioctl_numbers_are_the_references(name, value):
    assert getattr(lib, name) == value


@pytest.mark.parametrize("name,value", sorted(CONSTANTS.items()))
def test_constants_are_the_references(name, value):
    assert getattr(lib, name) == value


@pytest.mark.parametrize("struct,fields,sizes", LAYOUTS, ids=[x[0] for x in LAYOUTS])
def test_struct_layouts_are_the_references(struct, fields, sizes):
    assert ffi.sizeof(f"struct {struct}") in sizes
    for f, off in fields.items():
        assert ffi.offsetof(f"struct {struct}", f) == off, f


def test_new_sets_argsz_to_what_is_passed():
    p, buf = vfio.new("struct vfio_irq_set", 4 * 3, index=2, count=3)
    assert p.argsz == 20 + 12 and len(ffi.buffer(buf)) == 32 and p.index == 2
    q, _ = vfio.new("struct iommu_ioas_map", ioas_id=5)
    assert q.size == 40 and q.ioas_id == 5


def _chain(links, size=128):
    """A buffer with capability headers at the given offsets, each pointing on."""
    buf = ffi.new("char[]", size)
    for off, (cap_id, nxt) in links.items():
        h = ffi.cast("struct vfio_info_cap_header *", buf + off)
        h.id, h.version, h.next = cap_id, 1, nxt
    return buf


def test_capability_chain_walk_stops_at_loops_and_buffer_ends():
    assert list(vfio._caps(_chain({32: (1, 64), 64: (3, 0)}), 32)) == [(1, 32), (3, 64)]
    assert list(vfio._caps(_chain({32: (1, 64), 64: (2, 32)}), 32)) == [(1, 32), (2, 64)]
    assert list(vfio._caps(_chain({32: (1, 124)}), 32)) == [(1, 32)]      # 124+8 > 128
    assert list(vfio._caps(_chain({}), 0)) == []


def test_an_ioctl_a_file_does_not_know_is_named_in_the_error():
    with pytest.raises(OSError, match="VFIO_GET_API_VERSION: Inappropriate ioctl"):
        vfio.Container("/dev/null")


def test_missing_vfio_is_said_plainly(tmp_path):
    assert "no vfio" in vfio.available(str(tmp_path))


@pytest.mark.skipif(vfio.available() is not None, reason=str(vfio.available()))
def test_a_real_container_answers_version_and_extensions():
    c = vfio.Container()
    try:
        assert any(c.check_extension(t) for t in (lib.VFIO_TYPE1_IOMMU,
                                                  lib.VFIO_TYPE1v2_IOMMU,
                                                  lib.VFIO_NOIOMMU_IOMMU))
    finally:
        c.close()

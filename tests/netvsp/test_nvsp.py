"""NVSP declarations against vmbus_netvsp.md (d, f, g.2, h.1): sizes, offsets,
constants, byte-exact encodings of Linux's init handshake, hostile input."""
from __future__ import annotations

import random
import struct

import pytest

from netvsp import nvsp
from netvsp.layout import offsets

# --- sizes and offsets ----------------------------------------------------------------------

# vmbus_netvsp.md d.4: "@N field" per message; all u32 unless noted. The size is
# the end of the last field listed (the minimum a receiver accepts, d.1).
D4_LAYOUTS = {
    "INIT": (nvsp.INIT, 12, {"msg_type": 0, "min_protocol_ver": 4, "max_protocol_ver": 8}),
    "INIT_COMPLETE": (nvsp.INIT_COMPLETE, 16, {"msg_type": 0, "negotiated_protocol_ver": 4,
                                               "max_mdl_chain_len": 8, "status": 12}),
    "SEND_NDIS_VER": (nvsp.SEND_NDIS_VERSION, 12, {"msg_type": 0, "ndis_major_ver": 4,
                                                   "ndis_minor_ver": 8}),
    "SEND_RECV_BUF": (nvsp.SEND_RECV_BUF, 12, {"msg_type": 0, "gpadl_handle": 4, "id": 8,
                                               "reserved": 10}),
    "SEND_RECV_BUF_COMPLETE": (nvsp.SEND_RECV_BUF_COMPLETE, 28, {
        "msg_type": 0, "status": 4, "num_sections": 8, "section_offset": 12,
        "sub_alloc_size": 16, "num_sub_allocs": 20, "end_offset": 24}),
    "REVOKE_RECV_BUF": (nvsp.REVOKE_RECV_BUF, 6, {"msg_type": 0, "id": 4}),
    "SEND_SEND_BUF": (nvsp.SEND_SEND_BUF, 10, {"msg_type": 0, "gpadl_handle": 4, "id": 8}),
    "SEND_SEND_BUF_COMPLETE": (nvsp.SEND_SEND_BUF_COMPLETE, 12, {"msg_type": 0, "status": 4,
                                                                 "section_size": 8}),
    "REVOKE_SEND_BUF": (nvsp.REVOKE_SEND_BUF, 6, {"msg_type": 0, "id": 4}),
    "SEND_RNDIS_PKT": (nvsp.SEND_RNDIS_PKT, 16, {"msg_type": 0, "channel_type": 4,
                                                 "send_buf_section_index": 8,
                                                 "send_buf_section_size": 12}),
    "SEND_RNDIS_PKT_COMPLETE": (nvsp.SEND_RNDIS_PKT_COMPLETE, 8, {"msg_type": 0, "status": 4}),
    "SEND_NDIS_CONFIG": (nvsp.SEND_NDIS_CONFIG, 20, {"msg_type": 0, "mtu": 4, "reserved": 8,
                                                     "capability": 12}),
    "ALLOC_RXBUF": (nvsp.ALLOC_RXBUF, 12, {"msg_type": 0, "alloc_id": 4, "len": 8}),
    "ALLOC_RXBUF_COMP": (nvsp.ALLOC_RXBUF_COMPLETE, 24, {"msg_type": 0, "status": 4,
                                                         "alloc_id": 8, "gpadl_handle": 12,
                                                         "recv_buf_id": 16}),
    "FREE_RXBUF": (nvsp.FREE_RXBUF, 12, {"msg_type": 0, "recv_buf_id": 4}),
    "SEND_VF_ASSOCIATION": (nvsp.SEND_VF_ASSOCIATION, 12, {"msg_type": 0, "allocated": 4,
                                                           "serial": 8}),
    "SWITCH_DATA_PATH": (nvsp.SWITCH_DATA_PATH, 8, {"msg_type": 0, "active_datapath": 4}),
    "OID_QUERY_EX": (nvsp.OID_QUERY_EX, 12, {"msg_type": 0, "hdr_type": 4, "hdr_revision": 5,
                                             "hdr_size": 6, "oid": 8}),
    "OID_QUERY_EX_COMP": (nvsp.OID_QUERY_EX_COMPLETE, 12, {"msg_type": 0, "status": 4,
                                                           "bytes": 8}),
    "SUBCHANNEL request": (nvsp.SUBCHANNEL_REQUEST, 12, {"msg_type": 0, "op": 4,
                                                         "num_subchannels": 8}),
    "SUBCHANNEL completion": (nvsp.SUBCHANNEL_COMPLETE, 12, {"msg_type": 0, "status": 4,
                                                             "num_subchannels": 8}),
    "SEND_INDIRECTION_TABLE": (nvsp.SEND_INDIRECTION_TABLE, 12, {"msg_type": 0, "count": 4,
                                                                 "offset": 8}),
    "PD_API": (nvsp.PD_API, 8, {"msg_type": 0, "op": 4}),
    "PD_API completion": (nvsp.PD_API_COMPLETE, 12, {"msg_type": 0, "op": 4, "status": 8}),
    "PD_POST_BATCH": (nvsp.PD_POST_BATCH, 8, {"msg_type": 0, "count": 4, "flags": 6}),
    "PD_POST_BATCH entry": (nvsp.PD_BUF, 8, {"region_offset": 0, "region_id": 4, "flags": 6}),
    # d.4 SEND_RECV_BUF_COMPLETE: sections[] of 16 bytes {offset, sub_alloc_size,
    # num_sub_allocs, end_offset}
    "recv buffer section": (nvsp.RECV_BUF_SECTION, 16, {"offset": 0, "sub_alloc_size": 4,
                                                        "num_sub_allocs": 8, "end_offset": 12}),
}

# Field widths the table notes ("u16", "u64", the 4-byte NDIS header); the rest are u32.
D4_WIDTHS = {("SEND_RECV_BUF", "id"): 2, ("SEND_RECV_BUF", "reserved"): 2,
             ("REVOKE_RECV_BUF", "id"): 2, ("SEND_SEND_BUF", "id"): 2,
             ("REVOKE_SEND_BUF", "id"): 2, ("SEND_NDIS_CONFIG", "capability"): 8,
             ("ALLOC_RXBUF_COMP", "recv_buf_id"): 8, ("FREE_RXBUF", "recv_buf_id"): 8,
             ("OID_QUERY_EX", "hdr_type"): 1, ("OID_QUERY_EX", "hdr_revision"): 1,
             ("OID_QUERY_EX", "hdr_size"): 2, ("PD_POST_BATCH", "count"): 2,
             ("PD_POST_BATCH", "flags"): 2, ("PD_POST_BATCH entry", "region_id"): 2,
             ("PD_POST_BATCH entry", "flags"): 2}


@pytest.mark.parametrize("name", sorted(D4_LAYOUTS))
def test_layout_size_and_offsets(name):
    dt, size, fields = D4_LAYOUTS[name]
    assert dt.itemsize == size
    assert offsets(dt) == fields
    for f in fields:
        assert dt.fields[f][0].itemsize == D4_WIDTHS.get((name, f), 4), f
        assert dt.fields[f][0].byteorder in "<|="


def test_header_and_message_sizes():
    # d.1: type at 0; Linux sends 40 bytes; OpenVMM 28 (< 6.1) / 40 (6.1)
    assert offsets(nvsp.HEADER) == {"msg_type": 0}
    assert nvsp.NVSP_HEADER_SIZE == 4
    assert nvsp.NVSP_MESSAGE_SIZE == 40
    assert nvsp.NVSP_PACKET_SIZE_V1 == 28
    assert nvsp.NVSP_PACKET_SIZE_V61 == 40
    # every payload fits the Linux message
    for dt, _, _ in D4_LAYOUTS.values():
        assert dt.itemsize <= 40
    # j.4: sections at offset 12 with a 16-byte stride
    assert nvsp.RECV_BUF_SECTIONS_OFFSET == 12


def test_kernel_offsets():
    assert (nvsp.OFF_MSG_TYPE, nvsp.OFF_RNDIS_PKT_CHANNEL_TYPE, nvsp.OFF_RNDIS_PKT_SECTION_INDEX,
            nvsp.OFF_RNDIS_PKT_SECTION_SIZE, nvsp.OFF_RNDIS_PKT_COMPLETE_STATUS) == (0, 4, 8, 12, 4)


# --- constants -------------------------------------------------------------------------------

def test_message_type_numbers():
    # d.3 table
    expected = {
        "MSG_NONE": 0, "MSG_INIT": 1, "MSG_INIT_COMPLETE": 2, "MSG_SEND_NDIS_VERSION": 100,
        "MSG_SEND_RECV_BUF": 101, "MSG_SEND_RECV_BUF_COMPLETE": 102, "MSG_REVOKE_RECV_BUF": 103,
        "MSG_SEND_SEND_BUF": 104, "MSG_SEND_SEND_BUF_COMPLETE": 105, "MSG_REVOKE_SEND_BUF": 106,
        "MSG_SEND_RNDIS_PKT": 107, "MSG_SEND_RNDIS_PKT_COMPLETE": 108,
        "MSG_V2_CHIMNEY_FIRST": 109, "MSG_V2_CHIMNEY_LAST": 119,
        "MSG_ALLOC_RXBUF": 120, "MSG_ALLOC_RXBUF_COMPLETE": 121, "MSG_FREE_RXBUF": 122,
        "MSG_SEND_VMQ_RNDIS_PKT": 123, "MSG_SEND_VMQ_RNDIS_PKT_COMPLETE": 124,
        "MSG_SEND_NDIS_CONFIG": 125, "MSG_ALLOC_CHIMNEY_HANDLE": 126,
        "MSG_ALLOC_CHIMNEY_HANDLE_COMPLETE": 127, "MSG_SEND_VF_ASSOCIATION": 128,
        "MSG_SWITCH_DATA_PATH": 129, "MSG_UPLINK_CONNECT_STATE_DEPRECATED": 130,
        "MSG_OID_QUERY_EX": 131, "MSG_OID_QUERY_EX_COMPLETE": 132, "MSG_SUBCHANNEL": 133,
        "MSG_SEND_INDIRECTION_TABLE": 134, "MSG_PD_API": 135, "MSG_PD_POST_BATCH": 136,
    }
    for name, value in expected.items():
        assert getattr(nvsp, name) == value, name
    # d.3: version gating
    assert nvsp.MIN_VERSION_FOR_TYPE[125] == 0x00030002
    assert nvsp.MIN_VERSION_FOR_TYPE[129] == 0x00040000
    assert nvsp.MIN_VERSION_FOR_TYPE[131] == nvsp.MIN_VERSION_FOR_TYPE[133] == 0x00050000


def test_versions():
    # d.2 table
    assert nvsp.VERSION_1 == 0x00000002
    assert nvsp.VERSION_2 == 0x00030002
    assert nvsp.VERSION_4 == 0x00040000
    assert nvsp.VERSION_5 == 0x00050000
    assert nvsp.VERSION_6 == 0x00060000
    assert nvsp.VERSION_61 == 0x00060001
    assert nvsp.VERSION_INVALID == 0xFFFFFFFF
    # d.5 step 2: 6.1, 6, 5, 4, 2, 1
    assert nvsp.LINUX_VERSIONS == (0x00060001, 0x00060000, 0x00050000, 0x00040000,
                                   0x00030002, 0x00000002)
    # d.5 step 3
    assert nvsp.NDIS_VERSION_6_1 == 0x00060001 and nvsp.NDIS_VERSION_6_30 == 0x0006001E


def test_status_codes():
    # d.1
    assert [nvsp.STATUS_NONE, nvsp.STATUS_SUCCESS, nvsp.STATUS_FAIL,
            nvsp.STATUS_PROTOCOL_TOO_NEW, nvsp.STATUS_PROTOCOL_TOO_OLD,
            nvsp.STATUS_INVALID_RNDIS_PKT, nvsp.STATUS_BUSY,
            nvsp.STATUS_PROTOCOL_UNSUPPORTED] == [0, 1, 2, 3, 4, 5, 6, 7]


def test_capability_bits_and_field_values():
    # d.4 SEND_NDIS_CONFIG: bit0 vmq .. bit7 rsc
    assert [nvsp.CAP_VMQ, nvsp.CAP_CHIMNEY, nvsp.CAP_SRIOV, nvsp.CAP_IEEE8021Q,
            nvsp.CAP_CORRELATION_ID, nvsp.CAP_TEAMING, nvsp.CAP_VSUBNETID,
            nvsp.CAP_RSC] == [1, 2, 4, 8, 16, 32, 64, 128]
    # d.4 SEND_RNDIS_PKT, SUBCHANNEL, SWITCH_DATA_PATH, PD_API
    assert (nvsp.CHANNEL_TYPE_DATA, nvsp.CHANNEL_TYPE_CONTROL) == (0, 1)
    assert nvsp.SECTION_INDEX_NONE == 0xFFFFFFFF
    assert (nvsp.SUBCHANNEL_OP_NONE, nvsp.SUBCHANNEL_OP_ALLOCATE) == (0, 1)
    assert (nvsp.DATAPATH_SYNTHETIC, nvsp.DATAPATH_VF) == (0, 1)
    assert [nvsp.PD_API_OP_CONFIG, nvsp.PD_API_OP_SW_DATAPATH, nvsp.PD_API_OP_OPEN_PROVIDER,
            nvsp.PD_API_OP_CLOSE_PROVIDER, nvsp.PD_API_OP_CREATE_QUEUE,
            nvsp.PD_API_OP_FLUSH_QUEUE, nvsp.PD_API_OP_FREE_QUEUE,
            nvsp.PD_API_OP_ALLOC_COM_BUF, nvsp.PD_API_OP_FREE_COM_BUF] == list(range(1, 10))
    assert (nvsp.PD_BATCH_FLAG_GUEST2HOST, nvsp.PD_BATCH_FLAG_IS_RECV,
            nvsp.PD_BUF_FLAG_IS_PARTIAL) == (1, 2, 1)
    assert nvsp.OPENVMM_MAX_MDL_CHAIN_LEN == 34


def test_buffer_constants():
    # f.1, f.2, b.5, d.5, g.1, g.2, h.1
    assert nvsp.RECEIVE_BUFFER_ID == 0xCAFE
    assert nvsp.SEND_BUFFER_ID == 0
    assert nvsp.RECV_SECTION_SIZE == 1728
    assert nvsp.SEND_SECTION_SIZE == 6144
    assert nvsp.DEFAULT_RX == 9709
    assert nvsp.DEFAULT_RX * nvsp.RECV_SECTION_SIZE == 16_777_152
    assert nvsp.DEFAULT_TX == 170
    assert nvsp.DEFAULT_TX * nvsp.SEND_SECTION_SIZE == 1_044_480
    assert nvsp.MIN_SECTIONS == 10
    assert nvsp.RECEIVE_BUFFER_SIZE == 31 * 1024 * 1024
    assert nvsp.RECEIVE_BUFFER_SIZE_LEGACY == 15 * 1024 * 1024
    assert nvsp.SEND_BUFFER_SIZE == 15 * 1024 * 1024
    assert nvsp.ETH_MIN_MTU == 68
    assert nvsp.NVSP_RSC_MAX == 562
    assert nvsp.MAX_PACKETS_PER_RECEIVE == 375
    assert nvsp.RX_RESERVED_CONTROL_BUFFERS == 16
    assert nvsp.sub_allocation_size_for_mtu(1514) == 1806
    assert (16 * 1024 * 1024) // nvsp.sub_allocation_size_for_mtu(1514) == 9289
    assert (nvsp.MTU_DEFAULT, nvsp.MTU_MAX) == (1514, 9216)
    assert (nvsp.VRSS_SEND_TAB_SIZE, nvsp.VRSS_CHANNEL_MAX, nvsp.VRSS_CHANNEL_DEFAULT) == (16, 64, 8)
    assert (nvsp.SEND_TABLE_QUIRK_OFFSET, nvsp.SEND_TABLE_QUIRK_MIN_LEN) == (40, 104)
    assert nvsp.VF_ASSOCIATION_TRANS_ID == 0x8000000000000000
    assert nvsp.SWITCH_DATA_PATH_TRANS_ID == 0x8000000000000001


# --- byte-exact encodings of Linux's init handshake (d.5) ----------------------------------------

def pad40(b: bytes) -> bytes:
    # d.1: Linux sends every NVSP message as a zero-filled 40-byte buffer
    assert len(b) <= 40
    return b + bytes(40 - len(b))


@pytest.mark.parametrize("version", [0x00060001, 0x00060000, 0x00050000, 0x00040000,
                                     0x00030002, 0x00000002])
def test_init_bytes(version):
    # d.4 INIT: @4 min, @8 max; Linux sets min = max
    expected = pad40(struct.pack("<III", 1, version, version))
    assert nvsp.nvsp_init(version) == expected
    assert nvsp.nvsp_init(version, version) == expected


def test_init_61_matches_ring_example():
    # j.7: payload 01 00 00 00 01 00 06 00 01 00 06 00 + 28 zero bytes
    assert nvsp.nvsp_init(nvsp.VERSION_61) == bytes.fromhex("010000000100060001000600") + bytes(28)


def test_init_complete_openvmm_v5():
    # j.8: 02 00 00 00 ff ff ff ff 22 00 00 00 01 00 00 00 + 12 zeros (28 bytes)
    got = nvsp.nvsp_init_complete(nvsp.STATUS_SUCCESS, size=nvsp.NVSP_PACKET_SIZE_V1)
    assert got == bytes.fromhex("02000000ffffffff2200000001000000") + bytes(12)
    assert got == struct.pack("<IIII", 2, 0xFFFFFFFF, 34, 1) + bytes(12)


@pytest.mark.parametrize("version,caps", [
    # d.5 step 2: ieee8021q always; sriov + teaming from v5; rsc from 6.1
    (0x00060001, 0x08 | 0x04 | 0x20 | 0x80),
    (0x00060000, 0x08 | 0x04 | 0x20),
    (0x00050000, 0x08 | 0x04 | 0x20),
    (0x00040000, 0x08),
    (0x00030002, 0x08),
])
def test_ndis_config_bytes(version, caps):
    assert nvsp.linux_ndis_config_capabilities(version) == caps
    mtu = 1500 + 14
    # d.4 SEND_NDIS_CONFIG: @4 mtu, @8 reserved, @12 capability u64 (unaligned)
    expected = pad40(struct.pack("<III", 125, mtu, 0) + struct.pack("<Q", caps))
    assert nvsp.nvsp_ndis_config(mtu, caps) == expected


@pytest.mark.parametrize("version,major,minor", [
    # d.5 step 3: NDIS 6.1 if NVSP <= V4, else 6.30
    (0x00060001, 6, 30), (0x00050000, 6, 30), (0x00040000, 6, 1), (0x00000002, 6, 1)])
def test_ndis_version_bytes(version, major, minor):
    assert nvsp.linux_ndis_version(version) == (major, minor)
    assert nvsp.nvsp_ndis_version(major, minor) == pad40(struct.pack("<III", 100, major, minor))


def test_receive_and_send_buffer_bytes():
    # d.4 SEND_RECV_BUF: @4 gpadl, @8 id u16, @10 reserved u16; d.5 step 4: id 0xCAFE
    assert nvsp.nvsp_send_receive_buffer(0x1234) == pad40(struct.pack("<IIHH", 101, 0x1234, 0xCAFE, 0))
    # d.4 SEND_SEND_BUF: @4 gpadl, @8 id u16; d.5 step 5: id 0
    assert nvsp.nvsp_send_send_buffer(0x5678) == pad40(struct.pack("<IIH", 104, 0x5678, 0))
    # d.5 failure handling: revokes with the same ids, no completion
    assert nvsp.nvsp_revoke_receive_buffer() == pad40(struct.pack("<IH", 103, 0xCAFE))
    assert nvsp.nvsp_revoke_send_buffer() == pad40(struct.pack("<IH", 106, 0))


def test_buffer_completion_bytes():
    # d.4 SEND_RECV_BUF_COMPLETE: @4 status, @8 num_sections, @12 section {offset,
    # sub_alloc_size, num_sub_allocs, end_offset}; f.1 OpenVMM 1806 x 9289
    got = nvsp.nvsp_send_receive_buffer_complete(1, [(0, 1806, 9289, 1806 * 9289)])
    assert got == pad40(struct.pack("<IIIIIII", 102, 1, 1, 0, 1806, 9289, 1806 * 9289))
    assert nvsp.decode_recv_buf_sections(got) == [(0, 1806, 9289, 1806 * 9289)]
    # d.4 SEND_SEND_BUF_COMPLETE: @4 status, @8 section_size (OpenVMM 6144)
    assert nvsp.nvsp_send_send_buffer_complete(1) == pad40(struct.pack("<III", 105, 1, 6144))


def test_rndis_transport_bytes():
    # d.4 SEND_RNDIS_PKT: control message by GPA-direct (e.2)
    assert nvsp.nvsp_send_rndis_packet(1) == pad40(struct.pack("<IIII", 107, 1, 0xFFFFFFFF, 0))
    # data copied into send section 7, 1234 bytes used (f.3)
    assert nvsp.nvsp_send_rndis_packet(0, 7, 1234) == pad40(struct.pack("<IIII", 107, 0, 7, 1234))
    # d.4 SEND_RNDIS_PKT_COMPLETE: exactly 8 bytes from Linux
    assert nvsp.nvsp_send_rndis_packet_complete(1) == struct.pack("<II", 108, 1)
    assert nvsp.nvsp_send_rndis_packet_complete(2, size=40) == pad40(struct.pack("<II", 108, 2))


def test_subchannel_vf_and_table_bytes():
    # g.1 step 4: ALLOCATE num_chn - 1
    assert nvsp.nvsp_subchannel_request(7) == pad40(struct.pack("<III", 133, 1, 7))
    assert nvsp.nvsp_subchannel_complete(1, 3) == pad40(struct.pack("<III", 133, 1, 3))
    # h.1
    assert nvsp.nvsp_vf_association(True, 42) == pad40(struct.pack("<III", 128, 1, 42))
    assert nvsp.nvsp_vf_association(False, 42) == pad40(struct.pack("<III", 128, 0, 42))
    assert nvsp.nvsp_switch_data_path(1) == pad40(struct.pack("<II", 129, 1))
    # g.2: OpenVMM's 76-byte table message, table at 12
    entries = [i % 3 for i in range(16)]
    msg = nvsp.nvsp_send_indirection_table(entries)
    assert msg == struct.pack("<III", 134, 16, 12) + struct.pack("<16I", *entries)
    assert len(msg) == 76
    # d.4 OID_QUERY_EX_COMP as OpenVMM answers: NOT_SUPPORTED, 0 bytes
    assert nvsp.nvsp_oid_query_ex_complete(0xC00000BB) == pad40(struct.pack("<III", 132, 0xC00000BB, 0))


def test_openvmm_sizes():
    # d.1: OpenVMM < 6.1 uses 28-byte messages
    assert len(nvsp.nvsp_init(nvsp.VERSION_5, size=28)) == 28
    with pytest.raises(ValueError):
        nvsp.nvsp_ndis_config(1514, 8, size=16)    # shorter than the 20-byte message


# --- decoders ----------------------------------------------------------------------------------

def test_decode_roundtrip():
    t, rec = nvsp.decode_message(nvsp.nvsp_ndis_config(9014, 0xAC))
    assert t == 125 and int(rec["mtu"]) == 9014 and int(rec["capability"]) == 0xAC
    t, rec = nvsp.decode_message(nvsp.nvsp_subchannel_complete(1, 5), completion=True)
    assert t == 133 and int(rec["num_subchannels"]) == 5 and int(rec["status"]) == 1
    t, rec = nvsp.decode_message(nvsp.nvsp_subchannel_request(5))
    assert int(rec["op"]) == 1
    # OpenVMM's 28-byte replies decode (receivers check minimum lengths only)
    t, rec = nvsp.decode_message(nvsp.nvsp_init_complete(1, size=28))
    assert t == 2 and int(rec["status"]) == 1


def test_decode_copies_fields():
    # fields are read once: rewriting the shared memory afterwards changes nothing
    mem = bytearray(nvsp.nvsp_send_rndis_packet(0, 3, 100))
    _, rec = nvsp.decode_message(mem)
    mem[8:12] = b"\xff\xff\xff\xff"
    assert int(rec["send_buf_section_index"]) == 3


def test_decode_rejects_truncated_and_unknown():
    with pytest.raises(ValueError, match="msg_type"):
        nvsp.decode_message(b"\x01\x00")
    with pytest.raises(ValueError, match="msg_type 999"):
        nvsp.decode_message(struct.pack("<I", 999) + bytes(36))
    # SEND_RECV_BUF needs 12 bytes
    with pytest.raises(ValueError, match="msg_type 101"):
        nvsp.decode_message(struct.pack("<II", 101, 5))
    # capability u64 ends at 20
    with pytest.raises(ValueError, match="msg_type 125"):
        nvsp.decode_message(nvsp.nvsp_ndis_config(1514, 8)[:19])


def test_recv_buf_sections_hostile():
    good = nvsp.nvsp_send_receive_buffer_complete(1, [(0, 1806, 10, 18060)])
    # num_sections whose 16-byte stride wraps a 32-bit product to 0
    bad = bytearray(good)
    struct.pack_into("<I", bad, 8, 0x10000000)
    with pytest.raises(ValueError, match="num_sections"):
        nvsp.decode_recv_buf_sections(bad)
    struct.pack_into("<I", bad, 8, 2)     # 12 + 32 = 44 > 40
    with pytest.raises(ValueError, match="num_sections"):
        nvsp.decode_recv_buf_sections(bad)
    struct.pack_into("<I", bad, 8, 0)
    assert nvsp.decode_recv_buf_sections(bad) == []


def test_indirection_table_hostile():
    table = list(range(16))
    msg = nvsp.nvsp_send_indirection_table(table)
    assert nvsp.decode_indirection_table(msg) == table
    # offset outside the message
    bad = bytearray(msg)
    struct.pack_into("<I", bad, 8, 0xFFFFFFF0)
    with pytest.raises(ValueError, match="offset"):
        nvsp.decode_indirection_table(bad)
    # offset inside, table running past the end
    struct.pack_into("<I", bad, 8, 16)
    with pytest.raises(ValueError, match="count"):
        nvsp.decode_indirection_table(bad)
    # count != 16 (Linux requires 16)
    bad = bytearray(msg)
    struct.pack_into("<I", bad, 4, 15)
    with pytest.raises(ValueError, match="count"):
        nvsp.decode_indirection_table(bad)
    # count whose 4-byte stride overflows 32 bits (4 * 0x40000001 = 4 mod 2^32)
    struct.pack_into("<I", bad, 4, 0x40000001)
    with pytest.raises(ValueError, match="count"):
        nvsp.decode_indirection_table(bad, expected_count=None)
    # table overlapping its header
    bad = bytearray(msg)
    struct.pack_into("<I", bad, 8, 4)
    with pytest.raises(ValueError, match="offset"):
        nvsp.decode_indirection_table(bad)


def test_indirection_table_linux_quirk():
    # g.2: NVSP <= 6 and >= 104 bytes -> the table is at 40 whatever offset says
    entries = [(i * 5) % 7 for i in range(16)]
    msg = (struct.pack("<III", 134, 16, 12) + bytes(28) + struct.pack("<16I", *entries))
    assert len(msg) == 104
    assert nvsp.decode_indirection_table(msg, nvsp.VERSION_6) == entries
    # 6.1 honours the offset field (here: zeros followed by part of the table)
    assert nvsp.decode_indirection_table(msg, nvsp.VERSION_61)[:7] == [0] * 7
    # OpenVMM's 76-byte message is below the quirk threshold
    short = nvsp.nvsp_send_indirection_table(entries)
    assert nvsp.decode_indirection_table(short, nvsp.VERSION_5) == entries


def test_fuzz_decoders():
    rng = random.Random(0x4E565350)
    seeds = [nvsp.nvsp_send_receive_buffer_complete(1, [(0, 1806, 100, 180600)]),
             nvsp.nvsp_send_indirection_table(range(16)), nvsp.nvsp_init(nvsp.VERSION_61),
             nvsp.nvsp_ndis_config(1514, 0xAC), nvsp.nvsp_send_rndis_packet(0, 1, 2)]
    interesting = [0, 1, 4, 12, 16, 40, 76, 104, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
                   0x10000000, 0x40000001, 0xFFFFFFF0]
    for _ in range(300):
        b = bytearray(rng.choice(seeds))
        for _ in range(rng.randint(1, 3)):
            op = rng.randrange(3)
            if op == 0 and len(b) >= 4:
                struct.pack_into("<I", b, rng.randrange(len(b) - 3), rng.choice(interesting))
            elif op == 1 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            else:
                del b[rng.randrange(len(b) + 1):]
        for fn in (nvsp.decode_message, nvsp.decode_recv_buf_sections,
                   lambda x: nvsp.decode_indirection_table(x, nvsp.VERSION_6, None)):
            try:
                fn(bytes(b))
            except ValueError:
                pass

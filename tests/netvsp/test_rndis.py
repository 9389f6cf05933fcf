"""RNDIS declarations against vmbus_netvsp.md (e, g.3, j): sizes, offsets,
constants, byte-exact encodings of Linux's RNDIS init sequence, hostile input."""
from __future__ import annotations

import random
import struct

import pytest

from netvsp import nvsp, rndis
from netvsp.layout import offsets

# --- sizes and offsets ----------------------------------------------------------------------

# vmbus_netvsp.md e.1: body offsets (from message offset 8) and the Total column.
E1_BODIES = {
    "INITIALIZE_MSG": (rndis.INITIALIZE, 24, {"req_id": 0, "major_ver": 4, "minor_ver": 8,
                                              "max_xfer_size": 12}),
    "INITIALIZE_CMPLT": (rndis.INITIALIZE_CMPLT, 52, {
        "req_id": 0, "status": 4, "major_ver": 8, "minor_ver": 12, "dev_flags": 16, "medium": 20,
        "max_pkt_per_msg": 24, "max_xfer_size": 28, "pkt_alignment_factor": 32,
        "af_list_offset": 36, "af_list_size": 40}),
    "HALT_MSG": (rndis.HALT, 12, {"req_id": 0}),
    "QUERY_MSG": (rndis.QUERY, 28, {"req_id": 0, "oid": 4, "info_buflen": 8,
                                    "info_buf_offset": 12, "dev_vc_handle": 16}),
    "QUERY_CMPLT": (rndis.QUERY_CMPLT, 24, {"req_id": 0, "status": 4, "info_buflen": 8,
                                            "info_buf_offset": 12}),
    # SET_MSG: "req_id, oid, info_buflen, info_buf_offset, dev_vc_handle, info_buf @20"
    "SET_MSG": (rndis.SET, 28, {"req_id": 0, "oid": 4, "info_buflen": 8, "info_buf_offset": 12,
                                "dev_vc_handle": 16}),
    "SET_CMPLT": (rndis.SET_CMPLT, 16, {"req_id": 0, "status": 4}),
    "RESET_MSG": (rndis.RESET, 12, {"reserved": 0}),
    "RESET_CMPLT": (rndis.RESET_CMPLT, 16, {"status": 0, "addressing_reset": 4}),
    "INDICATE_STATUS_MSG": (rndis.INDICATE_STATUS, 20, {"status": 0, "status_buflen": 4,
                                                        "status_buf_offset": 8}),
    "KEEPALIVE_MSG": (rndis.KEEPALIVE, 12, {"req_id": 0}),
    "KEEPALIVE_CMPLT": (rndis.KEEPALIVE_CMPLT, 16, {"req_id": 0, "status": 4}),
    # e.4: RNDIS_PACKET_MSG body, 36 bytes; e.1 Total "44 + ppi + data"
    "PACKET_MSG": (rndis.PACKET, 44, {
        "data_offset": 0, "data_len": 4, "oob_data_offset": 8, "oob_data_len": 12,
        "num_oob_data_elements": 16, "per_pkt_info_offset": 20, "per_pkt_info_len": 24,
        "vc_handle": 28, "reserved": 32}),
}

# j.5: body sizes INIT 16, INIT_CMPLT 44, QUERY 20, QUERY_CMPLT 16, SET 20,
# SET_CMPLT 8, INDICATE 12, KEEPALIVE 4, PACKET 36
J5_BODY_SIZES = {"INITIALIZE_MSG": 16, "INITIALIZE_CMPLT": 44, "QUERY_MSG": 20,
                 "QUERY_CMPLT": 16, "SET_MSG": 20, "SET_CMPLT": 8, "INDICATE_STATUS_MSG": 12,
                 "KEEPALIVE_MSG": 4, "PACKET_MSG": 36}


@pytest.mark.parametrize("name", sorted(E1_BODIES))
def test_message_layouts(name):
    dt, total, body = E1_BODIES[name]
    assert dt.itemsize == total
    expected = {"msg_type": 0, "msg_len": 4}
    expected.update({f: 8 + off for f, off in body.items()})   # body starts at message offset 8
    assert offsets(dt) == expected
    assert all(dt.fields[f][0].itemsize == 4 for f in expected)
    if name in J5_BODY_SIZES:
        assert total - 8 == J5_BODY_SIZES[name]


def test_header_and_sizes():
    # e.1 header {type @0, len @4}, RNDIS_HEADER_SIZE 8
    assert offsets(rndis.HEADER) == {"msg_type": 0, "msg_len": 4}
    assert rndis.HEADER.itemsize == rndis.HEADER_SIZE == rndis.OFFSET_BASE == 8
    # j.5: sizeof(struct rndis_message) 52, RNDIS_AND_PPI_SIZE 116, PPI header 12
    assert rndis.RNDIS_MESSAGE_SIZE == 52
    assert rndis.RNDIS_AND_PPI_SIZE == 116 == 52 + 4 * rndis.PPI_U32_SIZE
    assert rndis.PACKET_BODY_SIZE == 36


def test_ppi_layouts():
    # e.5: size @0, type @4, ppi_offset @8; 12-byte header
    assert rndis.PPI.itemsize == 12
    assert offsets(rndis.PPI) == {"size": 0, "type": 4, "ppi_offset": 8}
    # e.5 RNDIS_PKTINFO_ID {ver u8, flag u8, pkt_id u16}
    assert rndis.PKTINFO_ID.itemsize == 4
    assert offsets(rndis.PKTINFO_ID) == {"ver": 0, "flag": 1, "pkt_id": 2}


def test_kernel_offsets():
    # e.4 body offsets + 8; e.5 PPI header
    assert (rndis.OFF_MSG_TYPE, rndis.OFF_MSG_LEN) == (0, 4)
    assert [rndis.OFF_PKT_DATA_OFFSET, rndis.OFF_PKT_DATA_LEN, rndis.OFF_PKT_OOB_DATA_OFFSET,
            rndis.OFF_PKT_OOB_DATA_LEN, rndis.OFF_PKT_NUM_OOB_DATA_ELEMENTS,
            rndis.OFF_PKT_PPI_OFFSET, rndis.OFF_PKT_PPI_LEN, rndis.OFF_PKT_VC_HANDLE,
            rndis.OFF_PKT_RESERVED] == [8, 12, 16, 20, 24, 28, 32, 36, 40]
    assert (rndis.OFF_PPI_SIZE, rndis.OFF_PPI_TYPE, rndis.OFF_PPI_OFFSET) == (0, 4, 8)


def test_ndis_object_layouts():
    # e.6 NDIS object header {type u8, revision u8, size u16}
    assert offsets(rndis.NDIS_OBJECT_HEADER) == {"type": 0, "revision": 1, "size": 2}
    # e.6 NDIS_OFFLOAD: header @0; checksum @4 (8 u32); lsov1 @36; ipsecv1 @52;
    # lsov2 @80 (7 u32); flags @108; ipsecv2 @112; rsc @144; encap_gre @148; 156 bytes
    off = offsets(rndis.NDIS_OFFLOAD)
    assert rndis.NDIS_OFFLOAD.itemsize == 156
    assert [off[f] for f in ("csum_ip4_txenc", "csum_ip4_txcsum", "csum_ip4_rxenc",
                             "csum_ip4_rxcsum", "csum_ip6_txenc", "csum_ip6_txcsum",
                             "csum_ip6_rxenc", "csum_ip6_rxcsum")] == [4, 8, 12, 16, 20, 24, 28, 32]
    assert (off["lsov1"], off["ipsecv1"], off["lsov2_ip4_encap"], off["flags"],
            off["ipsecv2"], off["rsc_ip4"], off["encap_gre_flags"]) == (36, 52, 80, 108, 112, 144, 148)
    assert [off[f] for f in ("lsov2_ip4_encap", "lsov2_ip4_maxsz", "lsov2_ip4_minsg",
                             "lsov2_ip6_encap", "lsov2_ip6_maxsz", "lsov2_ip6_minsg",
                             "lsov2_ip6_opts")] == [80, 84, 88, 92, 96, 100, 104]
    assert off["rsc_ip6"] == 145 and off["encap_gre_maxhdr"] == 152
    assert (rndis.NDIS_OFFLOAD_SIZE_6_0, rndis.NDIS_OFFLOAD_SIZE_6_1,
            rndis.NDIS_OFFLOAD_SIZE) == (112, 144, 156)
    # e.6 NDIS_OFFLOAD_PARAMETERS, 28 bytes
    assert rndis.NDIS_OFFLOAD_PARAMETERS.itemsize == 28
    assert offsets(rndis.NDIS_OFFLOAD_PARAMETERS) == {
        "hdr_type": 0, "hdr_revision": 1, "hdr_size": 2, "ip_v4_csum": 4, "tcp_ip_v4_csum": 5,
        "udp_ip_v4_csum": 6, "tcp_ip_v6_csum": 7, "udp_ip_v6_csum": 8, "lso_v1": 9,
        "ip_sec_v1": 10, "lso_v2_ipv4": 11, "lso_v2_ipv6": 12, "tcp_connection_ip_v4": 13,
        "tcp_connection_ip_v6": 14, "flags": 16, "ip_sec_v2": 20, "ip_sec_v2_ip_v4": 21,
        "rsc_ip_v4": 22, "rsc_ip_v6": 23, "encapsulated_packet_task_offload": 24,
        "encapsulation_types": 25}
    assert (rndis.NDIS_OFFLOAD_PARAMETERS_SIZE, rndis.NDIS_OFFLOAD_PARAMETERS_SIZE_V4,
            rndis.NDIS_OFFLOAD_PARAMETERS_SIZE_REV1) == (28, 22, 20)
    # e.6 RSS capabilities, 18 bytes packed
    assert rndis.RSS_CAPABILITIES.itemsize == 18
    assert offsets(rndis.RSS_CAPABILITIES) == {"hdr_type": 0, "hdr_revision": 1, "hdr_size": 2,
                                               "cap_flag": 4, "num_int_msg": 8,
                                               "num_recv_que": 12, "num_indirect_tabent": 16}
    # e.3 step 10: config parameter block {name_offset 20, name_length 28, type 2,
    # value_offset 48, value_length 24} -> five u32 fields, 20 bytes
    assert rndis.CONFIG_PARAMETER_INFO.itemsize == 20


def test_rss_parameters_layout():
    # g.3 table: offset / size / field
    g3 = [(0, 1, "hdr_type"), (1, 1, "hdr_revision"), (2, 2, "hdr_size"), (4, 2, "flags"),
          (6, 2, "base_cpu_number"), (8, 4, "hashinfo"), (12, 2, "indirect_tabsize"),
          (16, 4, "indirect_taboffset"), (20, 2, "hashkey_size"), (24, 4, "hashkey_offset"),
          (28, 4, "processor_masks_offset"), (32, 4, "num_processor_masks"),
          (36, 4, "processor_masks_entry_size")]
    dt = rndis.RSS_PARAMETERS
    assert dt.itemsize == 40
    assert offsets(dt) == {f: o for o, _, f in g3}
    for o, size, f in g3:
        assert dt.fields[f][0].itemsize == size, f
    # g.3: OpenVMM revision 3 = 44 bytes
    assert rndis.RSS_PARAMETERS_V3.itemsize == 44
    assert offsets(rndis.RSS_PARAMETERS_V3)["default_processor_number"] == 40


# --- constants -------------------------------------------------------------------------------

def test_message_types():
    # e.1 table
    assert [rndis.MSG_PACKET, rndis.MSG_INIT, rndis.MSG_INIT_C, rndis.MSG_HALT, rndis.MSG_QUERY,
            rndis.MSG_QUERY_C, rndis.MSG_SET, rndis.MSG_SET_C, rndis.MSG_RESET, rndis.MSG_RESET_C,
            rndis.MSG_INDICATE, rndis.MSG_KEEPALIVE, rndis.MSG_KEEPALIVE_C, rndis.MSG_SET_EX,
            rndis.MSG_SET_EX_C, rndis.MSG_BUS] == [
        0x00000001, 0x00000002, 0x80000002, 0x00000003, 0x00000004, 0x80000004, 0x00000005,
        0x80000005, 0x00000006, 0x80000006, 0x00000007, 0x00000008, 0x80000008, 0x00000009,
        0x80000009, 0xFF000001]


def test_status_codes():
    # e.1 status codes, e.8 indications
    assert rndis.STATUS_SUCCESS == 0x00000000
    assert rndis.STATUS_PENDING == 0x103
    assert rndis.STATUS_NOT_SUPPORTED == 0xC00000BB
    assert rndis.STATUS_FAILURE == 0xC0000001
    assert rndis.STATUS_INVALID_DATA == 0xC0010015
    assert rndis.STATUS_BAD_VERSION == 0xC0010004
    assert rndis.STATUS_BUFFER_OVERFLOW == 0x80000005
    assert rndis.STATUS_MEDIA_CONNECT == 0x4001000B
    assert rndis.STATUS_MEDIA_DISCONNECT == 0x4001000C
    assert rndis.STATUS_LINK_SPEED_CHANGE == 0x40010013
    assert rndis.STATUS_NETWORK_CHANGE == 0x40010018
    assert rndis.STATUS_TASK_OFFLOAD_CURRENT_CONFIG == 0x40020006


def test_oids():
    # e.7
    expected = {
        "OID_GEN_MAXIMUM_FRAME_SIZE": 0x00010106, "OID_GEN_LINK_SPEED": 0x00010107,
        "OID_GEN_CURRENT_PACKET_FILTER": 0x0001010E, "OID_GEN_MEDIA_CONNECT_STATUS": 0x00010114,
        "OID_GEN_RECEIVE_SCALE_CAPABILITIES": 0x00010203,
        "OID_GEN_RECEIVE_SCALE_PARAMETERS": 0x00010204,
        "OID_GEN_RNDIS_CONFIG_PARAMETER": 0x0001021B, "OID_GEN_FRIENDLY_NAME": 0x00020216,
        "OID_802_3_PERMANENT_ADDRESS": 0x01010101, "OID_TCP_OFFLOAD_PARAMETERS": 0xFC01020C,
        "OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES": 0xFC01020D, "OID_GEN_SUPPORTED_LIST": 0x00010101,
        "OID_GEN_LINK_PARAMETERS": 0x00010208, "OID_GEN_LINK_STATE": 0x00010207,
        "OID_GEN_MAX_LINK_SPEED": 0x00010206, "OID_GEN_BYTES_RCV": 0x00020219,
        "OID_GEN_BYTES_XMIT": 0x0002021A, "OID_OFFLOAD_ENCAPSULATION": 0x0101010A,
    }
    for name, value in expected.items():
        assert getattr(rndis, name) == value, name
    # e.3 step 9
    assert rndis.LINUX_OPEN_PACKET_FILTER == 0x0D
    assert rndis.PACKET_TYPE_PROMISCUOUS == 0x20
    # e.3 step 7: 0 connected, 1 disconnected
    assert (rndis.MEDIA_STATE_CONNECTED, rndis.MEDIA_STATE_DISCONNECTED) == (0, 1)


def test_ppi_types_and_bits():
    # e.5 type table
    assert [rndis.PPI_TCPIP_CHKSUM, rndis.PPI_IPSEC, rndis.PPI_TCP_LARGESEND,
            rndis.PPI_CLASSIFICATION_HANDLE, rndis.PPI_RESERVED, rndis.PPI_SG_LIST,
            rndis.PPI_IEEE_8021Q, rndis.PPI_ORIGINAL, rndis.PPI_PACKET_CANCEL_ID,
            rndis.PPI_ORIGINAL_NET_BUFLIST, rndis.PPI_CACHED_NET_BUFLIST,
            rndis.PPI_SHORT_PKT_PADINFO] == list(range(12))
    assert rndis.PPI_NBL_HASH_VALUE == 8 and rndis.PPI_NBL_HASH_INFO == 9
    assert rndis.PPI_INTERNAL == 0x80000000
    assert rndis.PPI_RNDIS_PKTINFO_ID == 0x80000001
    assert (rndis.PKTINFO_SUBALLOC, rndis.PKTINFO_1ST_FRAG, rndis.PKTINFO_LAST_FRAG) == (1, 2, 4)
    # e.5 TX checksum: bit0 ipv4, bit1 ipv6, bit2 tcp, bit3 udp, bit4 ip header, 16-25 offset
    assert rndis.csum_tx_info(ipv4=True, tcp=True, tcp_header_offset=34) == 0x1 | 0x4 | (34 << 16)
    assert rndis.csum_tx_info(ipv6=True, udp=True, ip_header=True,
                              tcp_header_offset=0x3FF) == 0x2 | 0x8 | 0x10 | (0x3FF << 16)
    assert rndis.csum_tx_fields(0x1 | 0x4 | (54 << 16)) == {
        "ipv4": True, "ipv6": False, "tcp": True, "udp": False, "ip_header": False,
        "tcp_header_offset": 54}
    # e.5 RX checksum bits 0..8
    assert [rndis.CSUM_RX_TCP_FAILED, rndis.CSUM_RX_UDP_FAILED, rndis.CSUM_RX_IP_FAILED,
            rndis.CSUM_RX_TCP_SUCCEEDED, rndis.CSUM_RX_UDP_SUCCEEDED, rndis.CSUM_RX_IP_SUCCEEDED,
            rndis.CSUM_RX_LOOPBACK, rndis.CSUM_RX_TCP_VALUE_INVALID,
            rndis.CSUM_RX_IP_VALUE_INVALID] == [1 << i for i in range(9)]
    # e.5 LSOv2: bits 0-19 mss, 20-29 tcp_header_offset, bit 30 type, bit 31 ip_version
    assert rndis.lso_v2_info(1448, 34) == 1448 | (34 << 20) | (1 << 30)
    assert rndis.lso_v2_info(1428, 54, ipv6=True) == 1428 | (54 << 20) | (1 << 30) | (1 << 31)
    assert rndis.lso_v2_fields(1448 | (34 << 20) | (1 << 30)) == {
        "mss": 1448, "tcp_header_offset": 34, "v2": True, "ipv6": False}
    # e.5 VLAN: bits 0-2 priority, bit 3 CFI, bits 4-15 VLAN id
    assert rndis.vlan_info(100, priority=5, cfi=True) == 5 | 8 | (100 << 4)
    assert rndis.vlan_fields(5 | (4095 << 4)) == {"vid": 4095, "priority": 5, "cfi": False}
    with pytest.raises(ValueError, match="vid"):
        rndis.vlan_info(4096)
    with pytest.raises(ValueError, match="mss"):
        rndis.lso_v2_info(1 << 20, 0)
    with pytest.raises(ValueError, match="tcp_header_offset"):
        rndis.csum_tx_info(tcp_header_offset=1024)


def test_ndis_object_constants():
    # e.6
    assert (rndis.OBJTYPE_DEFAULT, rndis.OBJTYPE_RSS_CAPABILITIES, rndis.OBJTYPE_RSS_PARAMETERS,
            rndis.OBJTYPE_OID_REQUEST, rndis.OBJTYPE_OFFLOAD,
            rndis.OBJTYPE_OFFLOAD_ENCAPSULATION) == (0x80, 0x88, 0x89, 0x96, 0xA7, 0xA8)
    assert (rndis.TXCSUM_CAP_IP4_OPTIONS, rndis.TXCSUM_CAP_TCP4_OPTIONS, rndis.TXCSUM_CAP_TCP4,
            rndis.TXCSUM_CAP_UDP4, rndis.TXCSUM_CAP_IP4) == (0x001, 0x004, 0x010, 0x040, 0x100)
    assert (rndis.TXCSUM_CAP_IP6_EXT, rndis.TXCSUM_CAP_TCP6_OPTIONS, rndis.TXCSUM_CAP_TCP6,
            rndis.TXCSUM_CAP_UDP6) == (0x001, 0x004, 0x010, 0x040)
    assert rndis.OFFLOAD_ENCAP_802_3 == 2
    assert rndis.LSOV2_IP6_EXT | rndis.LSOV2_IP6_TCP_OPTIONS == 0x005
    assert [rndis.OFFLOAD_PARAMETERS_NO_CHANGE, rndis.OFFLOAD_PARAMETERS_TX_RX_DISABLED,
            rndis.OFFLOAD_PARAMETERS_TX_ENABLED_RX_DISABLED,
            rndis.OFFLOAD_PARAMETERS_RX_ENABLED_TX_DISABLED,
            rndis.OFFLOAD_PARAMETERS_TX_RX_ENABLED] == [0, 1, 2, 3, 4]
    assert (rndis.OFFLOAD_PARAMETERS_LSO_DISABLED, rndis.OFFLOAD_PARAMETERS_LSO_ENABLED) == (1, 2)
    # g.3 flags and hash bits
    assert [rndis.RSS_FLAG_BASE_CPU_UNCHANGED, rndis.RSS_FLAG_HASH_INFO_UNCHANGED,
            rndis.RSS_FLAG_ITABLE_UNCHANGED, rndis.RSS_FLAG_HASH_KEY_UNCHANGED,
            rndis.RSS_FLAG_DISABLE_RSS, rndis.RSS_FLAG_DEFAULT_PROCESSOR_UNCHANGED] == [
        0x1, 0x2, 0x4, 0x8, 0x10, 0x20]
    assert rndis.LINUX_HASHINFO == 0x1701
    assert [rndis.HASH_FUNC_TOEPLITZ, rndis.HASH_IPV4, rndis.HASH_TCP_IPV4, rndis.HASH_IPV6,
            rndis.HASH_IPV6_EX, rndis.HASH_TCP_IPV6, rndis.HASH_TCP_IPV6_EX, rndis.HASH_UDP_IPV4,
            rndis.HASH_UDP_IPV6, rndis.HASH_UDP_IPV6_EX] == [
        0x1, 0x100, 0x200, 0x400, 0x800, 0x1000, 0x2000, 0x4000, 0x8000, 0x10000]
    assert rndis.HASH_FUNC_MASK == 0xFF
    assert [rndis.RSS_CAP_TCP_IPV4, rndis.RSS_CAP_TCP_IPV6, rndis.RSS_CAP_TCP_IPV6_EX,
            rndis.RSS_CAP_UDP_IPV4, rndis.RSS_CAP_UDP_IPV6, rndis.RSS_CAP_UDP_IPV6_EX,
            rndis.RSS_CAP_MSI] == [0x100, 0x200, 0x400, 0x800, 0x1000, 0x2000, 0x01000000]
    assert rndis.ITAB_NUM == 128 and rndis.HASH_KEYLEN == 40
    assert rndis.DEFAULT_HASH_KEY == bytes.fromhex(
        "6d 5a 56 da 25 5b 0e c2 41 67 25 3d 43 a3 8f b0 d0 ca 2b cb ae 7b 30 b4 77 cb 2d a3"
        "80 30 f2 0c 6a 42 b7 3b be ac 01 fa")


# --- byte-exact encodings of Linux's RNDIS init sequence (e.3) -----------------------------------

def query(req_id, oid, info=b""):
    # e.1 QUERY_MSG: Linux puts info_buf_offset = 20 (sizeof query body) always
    return struct.pack("<IIIIIII", 4, 28 + len(info), req_id, oid, len(info), 20, 0) + info


def set_(req_id, oid, info):
    return struct.pack("<IIIIIII", 5, 28 + len(info), req_id, oid, len(info), 20, 0) + info


def test_initialize_bytes():
    # j.9: Linux's first request
    expected = bytes.fromhex("0200000018000000010000000100000000000000" "00400000")
    assert rndis.rndis_initialize(1) == expected
    assert expected == struct.pack("<IIIIII", 2, 24, 1, 1, 0, 0x4000)


def test_initialize_complete_bytes():
    # j.10: OpenVMM: length 52, status 0, 1.0, flags 1, medium 0, 8 packets,
    # 0xEFFFFFFF, alignment factor 3, 0, 0
    assert rndis.rndis_initialize_complete(1) == struct.pack(
        "<13I", 0x80000002, 52, 1, 0, 1, 0, 1, 0, 8, 0xEFFFFFFF, 3, 0, 0)


@pytest.mark.parametrize("version,rev,size", [
    # e.3 step 5: NVSP >= 5: rev 3 / 156; NVSP 4: rev 2 / 144; else rev 1 / 112
    (0x00060001, 3, 156), (0x00050000, 3, 156), (0x00040000, 2, 144), (0x00030002, 1, 112)])
def test_offload_capabilities_query_bytes(version, rev, size):
    info = rndis.linux_offload_query_input(version)
    assert info == struct.pack("<BBH", 0xA7, rev, size) + bytes(size - 4)
    msg = rndis.rndis_query(5, rndis.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES, info)
    assert msg == query(5, 0xFC01020D, info)
    assert len(msg) == 28 + size


def test_linux_init_sequence_bytes():
    """The RNDIS messages of e.3 in order for NVSP 6.1, each against struct.pack."""
    seq = [
        (rndis.rndis_initialize(1), struct.pack("<IIIIII", 2, 24, 1, 1, 0, 0x4000)),
        (rndis.rndis_query(2, rndis.OID_GEN_MAXIMUM_FRAME_SIZE), query(2, 0x00010106)),
        (rndis.rndis_query(3, rndis.OID_802_3_PERMANENT_ADDRESS), query(3, 0x01010101)),
        (rndis.rndis_query(4, rndis.OID_GEN_FRIENDLY_NAME), query(4, 0x00020216)),
        (rndis.rndis_query(5, rndis.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                           rndis.linux_offload_query_input(nvsp.VERSION_61)),
         query(5, 0xFC01020D, struct.pack("<BBH", 0xA7, 3, 156) + bytes(152))),
        # e.3 step 6 / e.6: offload parameters {0x80, rev 3, size 28}, TX+RX csum (4), LSO on (2)
        (rndis.rndis_set(6, rndis.OID_TCP_OFFLOAD_PARAMETERS, rndis.offload_parameters(
            tcp_ip_v4_csum=4, udp_ip_v4_csum=4, tcp_ip_v6_csum=4, udp_ip_v6_csum=4,
            ip_v4_csum=1, lso_v2_ipv4=2, lso_v2_ipv6=2)),
         set_(6, 0xFC01020C, struct.pack("<BBH", 0x80, 3, 28) + bytes([1, 4, 4, 4, 4, 0, 0, 2, 2])
              + bytes(15))),
        (rndis.rndis_query(7, rndis.OID_GEN_MEDIA_CONNECT_STATUS), query(7, 0x00010114)),
        (rndis.rndis_query(8, rndis.OID_GEN_LINK_SPEED), query(8, 0x00010107)),
        # e.3 step 8: input header {0x88, rev 2, size 18}, whole object sent
        (rndis.rndis_query(9, rndis.OID_GEN_RECEIVE_SCALE_CAPABILITIES,
                           rndis.linux_rss_capabilities_query_input()),
         query(9, 0x00010203, struct.pack("<BBH", 0x88, 2, 18) + bytes(14))),
        # e.3 step 9: packet filter 0x0D, u32 at body offset 20
        (rndis.rndis_set(10, rndis.OID_GEN_CURRENT_PACKET_FILTER, struct.pack("<I", 0x0D)),
         struct.pack("<IIIIIIII", 5, 32, 10, 0x0001010E, 4, 20, 0, 0x0D)),
        # e.3 step 11
        (rndis.rndis_halt(11), struct.pack("<III", 3, 12, 11)),
    ]
    for got, expected in seq:
        assert got == expected


def test_offload_parameters_nvsp4():
    # e.3 step 6: size 22 for NVSP <= 4, header still revision 3
    info = rndis.offload_parameters(size=22, tcp_ip_v4_csum=4, lso_v2_ipv4=2)
    assert info == struct.pack("<BBH", 0x80, 3, 22) + bytes([0, 4, 0, 0, 0, 0, 0, 2]) + bytes(10)
    assert len(rndis.rndis_set(6, rndis.OID_TCP_OFFLOAD_PARAMETERS, info)) == 28 + 22


def test_rss_set_bytes():
    # g.3 / j.11: 620 bytes; block at message offset 28; hashinfo 0x1701; table at
    # body offset 60; key at body offset 572 = the default key
    table = [i % 4 for i in range(128)]
    msg = rndis.rndis_set(12, rndis.OID_GEN_RECEIVE_SCALE_PARAMETERS, rndis.rss_parameters(table))
    block = struct.pack("<BBHHHIHHIHHIIII", 0x89, 2, 40, 0, 0, 0x1701, 512, 0, 40, 40, 0,
                        552, 0, 0, 0)
    assert len(block) == 40
    expected = (struct.pack("<IIIIIII", 5, 620, 12, 0x00010204, 592, 20, 0) + block
                + struct.pack("<128I", *table) + rndis.DEFAULT_HASH_KEY)
    assert msg == expected
    assert len(msg) == 620
    assert msg[8 + 20 + 8:8 + 20 + 12] == b"\x01\x17\x00\x00"
    assert msg[8 + 572:8 + 612] == rndis.DEFAULT_HASH_KEY
    # g.1 step 7: the DISABLE_RSS variant first
    dis = rndis.rndis_set(12, rndis.OID_GEN_RECEIVE_SCALE_PARAMETERS,
                          rndis.rss_parameters(table, flags=rndis.RSS_FLAG_DISABLE_RSS))
    assert dis[32:34] == b"\x10\x00"
    rss = rndis.decode_rss_parameters(rndis.rss_parameters(table))
    assert rss.table == table and rss.key == rndis.DEFAULT_HASH_KEY


def test_mac_change_bytes():
    # e.3 step 10: {name_offset 20, name_length 28, type 2, value_offset 48,
    # value_length 24} + UTF-16 "NetworkAddress" + 12 lowercase hex digits
    info = rndis.mac_address_parameter(bytes.fromhex("00155D0A0B0C"))
    expected = (struct.pack("<IIIII", 20, 28, 2, 48, 24) + "NetworkAddress".encode("utf-16-le")
                + "00155d0a0b0c".encode("utf-16-le"))
    assert info == expected
    assert rndis.rndis_set(13, rndis.OID_GEN_RNDIS_CONFIG_PARAMETER, info) == set_(
        13, 0x0001021B, expected)


def test_host_replies_bytes():
    # e.1 QUERY_CMPLT: info at body offset 16 (OpenVMM)
    mac = bytes.fromhex("00155d000001")
    assert rndis.rndis_query_complete(3, 0, mac) == struct.pack(
        "<IIIIII", 0x80000004, 30, 3, 0, 6, 16) + mac
    assert rndis.rndis_query_complete(4, 0xC00000BB) == struct.pack(
        "<IIIIII", 0x80000004, 24, 4, 0xC00000BB, 0, 16)
    assert rndis.rndis_set_complete(6) == struct.pack("<IIII", 0x80000005, 16, 6, 0)
    # e.8: no-payload indications; link speed in 100 bps units at offset 12
    assert rndis.rndis_indicate_status(0x4001000B) == struct.pack("<IIIII", 7, 20, 0x4001000B, 0, 12)
    assert rndis.rndis_link_speed_change(10_000_000_000) == struct.pack(
        "<IIIIII", 7, 24, 0x40010013, 4, 12, 100_000_000)
    assert rndis.rndis_keepalive_complete(9) == struct.pack("<IIII", 0x80000008, 16, 9, 0)
    assert rndis.rndis_reset_complete(0, 1) == struct.pack("<IIII", 0x80000006, 16, 0, 1)
    assert rndis.rndis_keepalive(9) == struct.pack("<III", 8, 12, 9)
    assert rndis.rndis_reset() == struct.pack("<III", 6, 12, 0)


# --- RNDIS_PACKET_MSG (e.4, e.5) -------------------------------------------------------------------

def ppi_bytes(t, value):
    return struct.pack("<IIII", 16, t, 12, value)


def test_packet_bytes_no_ppi():
    # e.4: Linux TX: data_offset = 36 + ppi_len, msg_len = 44 + ppi_len + frame,
    # per_pkt_info_offset 36
    frame = bytes(range(60))
    assert rndis.rndis_packet(frame) == struct.pack(
        "<11I", 1, 44 + 60, 36, 60, 0, 0, 0, 36, 0, 0, 0) + frame


def test_packet_bytes_all_ppis():
    frame = bytes(range(256)) * 6
    h, vl = 0xDEADBEEF, rndis.vlan_info(42, priority=3)
    lso = rndis.lso_v2_info(1448, 34)
    got = rndis.rndis_packet(frame, hash_value=h, vlan=vl, lso=lso)
    # Linux order: hash (8), 802.1Q (6), LSO (2); each PPI 16 bytes
    ppis = ppi_bytes(8, h) + ppi_bytes(6, vl) + ppi_bytes(2, lso)
    expected = struct.pack("<11I", 1, 44 + 48 + len(frame), 36 + 48, len(frame), 0, 0, 0, 36, 48,
                           0, 0) + ppis + frame
    assert got == expected
    pkt = rndis.decode_packet(got)
    assert bytes(got[pkt.data_start:pkt.data_start + pkt.data_len]) == frame
    assert pkt.ppi_u32(got, rndis.PPI_NBL_HASH_VALUE) == h
    assert rndis.vlan_fields(pkt.ppi_u32(got, rndis.PPI_IEEE_8021Q))["vid"] == 42
    assert rndis.lso_v2_fields(pkt.ppi_u32(got, rndis.PPI_TCP_LARGESEND))["mss"] == 1448
    assert pkt.ppi_u32(got, rndis.PPI_TCPIP_CHKSUM) is None


def test_packet_checksum_ppi_and_padding():
    frame = b"\xaa" * 61
    cs = rndis.csum_tx_info(ipv4=True, udp=True, tcp_header_offset=34)
    got = rndis.rndis_packet(frame, csum=cs, align=8)
    # f.3: batched messages are padded to pkt_align; msg_len includes it, data_len not
    unpadded = 44 + 16 + 61
    pad = (-unpadded) % 8
    assert got == struct.pack("<11I", 1, unpadded + pad, 52, 61, 0, 0, 0, 36, 16, 0, 0) + \
        ppi_bytes(0, cs) + frame + bytes(pad)
    batch = got + rndis.rndis_packet(b"\xbb" * 100, align=8)
    msgs = rndis.decode_batch(batch, packets_only=True)
    assert [m.data_len for m in msgs] == [61, 100]
    assert msgs[1].offset == len(got)


def test_rsc_pktinfo_ppi():
    pid = struct.pack("<BBH", 1, rndis.PKTINFO_SUBALLOC | rndis.PKTINFO_1ST_FRAG, 7)
    got = rndis.rndis_packet(b"x" * 10, ppis=[(rndis.PPI_RNDIS_PKTINFO_ID, pid)])
    p = rndis.decode_packet(got).ppi(0x80000001)
    assert p is not None and bytes(got[p.start:p.start + p.length]) == pid


# --- hostile input ------------------------------------------------------------------------------

def mutate(msg: bytes, off: int, value: int) -> bytearray:
    b = bytearray(msg)
    struct.pack_into("<I", b, off, value)
    return b


GOOD = rndis.rndis_packet(b"\x11" * 64, hash_value=1, vlan=rndis.vlan_info(5),
                          csum=rndis.csum_tx_info(ipv4=True, tcp=True, tcp_header_offset=34))


def test_packet_good():
    p = rndis.decode_packet(GOOD)
    assert len(p.ppis) == 3 and p.data_len == 64 and p.msg_len == len(GOOD)


@pytest.mark.parametrize("off,value,field", [
    (4, len(GOOD) + 1, "msg_len"),          # larger than the buffer
    (4, 7, "msg_len"),                       # smaller than the header
    (4, 43, "msg_len"),                      # smaller than the packet header
    (8, len(GOOD), "data_offset"),           # data offset outside the message
    (8, 20, "data_offset"),                  # data overlapping the packet body
    (12, 65, "data_len"),                    # data running past msg_len
    (12, 0xFFFFFFFF, "data_len"),
    (28, len(GOOD), "per_pkt_info_offset"),  # PPI area outside
    (28, 4, "per_pkt_info_offset"),
    (32, 49, "per_pkt_info_len"),            # area ends mid-element: 1 trailing byte
    (32, 0xFFFFFFF0, "per_pkt_info_len"),
    (44, 0, "ppi size"),                     # PPI size 0
    (44, 11, "ppi size"),
    (44, 49, "ppi size"),                    # element runs past the PPI area
    (52, 16, "ppi_offset"),                  # payload offset >= size
    (52, 4, "ppi_offset"),                   # payload over the element header
    (20, 8, "oob_data_offset"),              # OOB length with offset 0 (inside the body)
])
def test_packet_hostile(off, value, field):
    with pytest.raises(ValueError, match=field):
        rndis.decode_packet(mutate(GOOD, off, value))


def test_packet_oob_range():
    # OOB at body offset 36 with a length past the message
    bad = mutate(mutate(GOOD, 16, 36), 20, len(GOOD))
    with pytest.raises(ValueError, match="oob_data_len"):
        rndis.decode_packet(bad)
    ok = rndis.decode_packet(mutate(mutate(GOOD, 16, 36), 20, 16))
    assert (ok.oob_start, ok.oob_len) == (44, 16)


def test_packet_offset_overflow_32bit():
    # data_offset + data_len wraps to a small value in u32 arithmetic
    bad = mutate(mutate(GOOD, 8, 0xFFFFFFF0), 12, 0x20)
    with pytest.raises(ValueError, match="data_offset"):
        rndis.decode_packet(bad)
    bad = mutate(mutate(GOOD, 8, 36), 12, 0xFFFFFFF0)   # 36 + len wraps to 20
    with pytest.raises(ValueError, match="data_len"):
        rndis.decode_packet(bad)
    # PPI offset + len wraps
    bad = mutate(mutate(GOOD, 28, 0x40), 32, 0xFFFFFFD0)
    with pytest.raises(ValueError, match="per_pkt_info_len"):
        rndis.decode_packet(bad)
    # PPI size that would wrap the cursor
    bad = mutate(GOOD, 44, 0xFFFFFFF0)
    with pytest.raises(ValueError, match="ppi size"):
        rndis.decode_packet(bad)


def test_packet_not_a_packet_and_truncated():
    with pytest.raises(ValueError, match="ndis_msg_type"):
        rndis.decode_packet(rndis.rndis_initialize(1))
    with pytest.raises(ValueError, match="msg_len"):
        rndis.decode_packet(GOOD[:7])
    with pytest.raises(ValueError, match="msg_len"):
        rndis.decode_packet(GOOD[:-1])
    # range limited by `end`: the message must fit within it
    with pytest.raises(ValueError, match="msg_len"):
        rndis.decode_packet(GOOD + bytes(8), 0, len(GOOD) - 4)


def test_packet_ppi_len_zero_ignores_offset():
    # Linux TX puts 36 with no PPIs; any offset with length 0 means "no PPIs"
    p = rndis.rndis_packet(b"z" * 20)
    assert rndis.decode_packet(mutate(p, 28, 0xFFFFFFFF)).ppis == ()


def test_ppi_u32_short_payload():
    pid = b"\x01\x02"
    got = rndis.rndis_packet(b"x", ppis=[(rndis.PPI_IEEE_8021Q, pid)])
    with pytest.raises(ValueError, match="ppi_offset"):
        rndis.decode_packet(got).ppi_u32(got, rndis.PPI_IEEE_8021Q)


def test_decode_copies_fields():
    mem = bytearray(GOOD)
    p = rndis.decode_packet(mem)
    mem[12:16] = b"\xff\xff\xff\xff"
    assert p.data_len == 64


def test_control_hostile():
    q = rndis.rndis_query(2, rndis.OID_GEN_RECEIVE_SCALE_CAPABILITIES,
                          rndis.linux_rss_capabilities_query_input())
    c = rndis.decode_control(q)
    assert (c.buf_start, c.buf_len) == (28, 18) and int(c.fields["oid"]) == 0x00010203
    with pytest.raises(ValueError, match="info_buf_offset"):
        rndis.decode_control(mutate(q, 20, 4))            # overlaps the query body
    with pytest.raises(ValueError, match="info_buf_offset"):
        rndis.decode_control(mutate(q, 20, 0x80000000))
    with pytest.raises(ValueError, match="info_buflen"):
        rndis.decode_control(mutate(q, 16, 19))
    with pytest.raises(ValueError, match="info_buflen"):
        rndis.decode_control(mutate(q, 16, 0xFFFFFFF0))   # 20 + len wraps to 4 in u32
    with pytest.raises(ValueError, match="msg_len"):      # shorter than INITIALIZE's 24
        rndis.decode_control(mutate(rndis.rndis_initialize(1), 4, 20))
    with pytest.raises(ValueError, match="msg_len"):
        rndis.decode_control(mutate(rndis.rndis_initialize_complete(1), 4, 48))
    with pytest.raises(ValueError, match="ndis_msg_type"):
        rndis.decode_control(mutate(rndis.rndis_halt(1), 0, 0x12345678))
    qc = rndis.rndis_query_complete(3, 0, b"\x00" * 6)
    with pytest.raises(ValueError, match="info_buf_offset"):
        rndis.decode_control(mutate(qc, 20, 8))           # below 16
    with pytest.raises(ValueError, match="info_buflen"):
        rndis.decode_control(mutate(qc, 16, 7))


def test_indicate_status_range_check():
    msg = rndis.rndis_link_speed_change(10_000_000_000)
    c = rndis.decode_control(msg)
    assert struct.unpack_from("<I", msg, c.buf_start)[0] == 100_000_000
    # e.8: a pre-"Fe" vSwitch leaves the status buffer out of msg_len; Linux
    # checks it against the range length instead
    old = mutate(msg, 4, 20)
    c = rndis.decode_control(old)
    assert c.msg_len == 20 and c.buf_len == 4
    with pytest.raises(ValueError, match="status_buflen"):
        rndis.decode_control(old, 0, 23)
    with pytest.raises(ValueError, match="status_buf_offset"):
        rndis.decode_control(mutate(msg, 16, 8))


def test_batch_hostile():
    one = rndis.rndis_packet(b"a" * 10, align=8)
    with pytest.raises(ValueError, match="msg_len"):
        rndis.decode_batch(one + b"\x01\x00\x00\x00")       # trailing partial header
    with pytest.raises(ValueError, match="msg_len"):
        rndis.decode_batch(one + struct.pack("<II", 1, 0))  # msg_len 0 cannot loop forever
    with pytest.raises(ValueError, match="ndis_msg_type"):
        rndis.decode_batch(one + rndis.rndis_halt(1), packets_only=True)


def test_rss_parameters_hostile():
    info = rndis.rss_parameters(range(16))
    with pytest.raises(ValueError, match="indirect_taboffset"):
        rndis.decode_rss_parameters(mutate(info, 16, len(info) + 4))
    with pytest.raises(ValueError, match="indirect_taboffset"):
        rndis.decode_rss_parameters(mutate(info, 16, 8))
    b = bytearray(info)
    struct.pack_into("<H", b, 12, 6)
    with pytest.raises(ValueError, match="indirect_tabsize"):
        rndis.decode_rss_parameters(b)
    with pytest.raises(ValueError, match="hashkey_offset"):
        rndis.decode_rss_parameters(mutate(info, 24, 0xFFFFFFF0))
    b = bytearray(info)
    struct.pack_into("<H", b, 20, 41)
    with pytest.raises(ValueError, match="hashkey_size"):
        rndis.decode_rss_parameters(b)
    with pytest.raises(ValueError, match="info_buflen"):
        rndis.decode_rss_parameters(info[:39])


# --- seeded fuzz ------------------------------------------------------------------------------------

SEEDS = [
    GOOD,
    rndis.rndis_packet(b"\x22" * 1500, lso=rndis.lso_v2_info(1448, 54, ipv6=True),
                       vlan=rndis.vlan_info(7), align=8),
    rndis.rndis_packet(b"\x33" * 3, ppis=[(rndis.PPI_RNDIS_PKTINFO_ID, b"\x01\x06\x09\x00")]),
    rndis.rndis_query(2, rndis.OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES,
                      rndis.linux_offload_query_input(nvsp.VERSION_61)),
    rndis.rndis_set(3, rndis.OID_GEN_RECEIVE_SCALE_PARAMETERS, rndis.rss_parameters(range(128))),
    rndis.rndis_query_complete(4, 0, b"\x00\x15\x5d\x00\x00\x01"),
    rndis.rndis_link_speed_change(10**10),
    rndis.rndis_initialize_complete(1),
    rndis.rndis_initialize(1),
    rndis.rndis_halt(5),
]
INTERESTING = [0, 1, 4, 7, 8, 11, 12, 16, 20, 28, 36, 44, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF,
               0xFFFFFFF0, 0xFFFFFFFC, 0x10000000]


def _check_inside(msg, n: int):
    """Every range a decoder returns lies within its message and the buffer."""
    end = msg.offset + msg.msg_len
    assert 0 <= msg.offset and end <= n
    if isinstance(msg, rndis.Packet):
        assert msg.offset + 44 <= msg.data_start and msg.data_start + msg.data_len <= end
        assert msg.oob_start + msg.oob_len <= end
        for p in msg.ppis:
            assert msg.offset + 44 <= p.start and p.length >= 1 and p.start + p.length <= end
    else:
        assert msg.offset <= msg.buf_start and msg.buf_start + msg.buf_len <= n
        if msg.msg_type != rndis.MSG_INDICATE:
            assert msg.buf_start + msg.buf_len <= end


def test_fuzz_mutations():
    rng = random.Random(20240521)
    outcomes = {"ok": 0, "rejected": 0}
    for _ in range(300):
        b = bytearray(rng.choice(SEEDS))
        for _ in range(rng.randint(1, 4)):
            op = rng.randrange(5)
            if op <= 1 and len(b) >= 4:
                # overwrite a header-ish u32 (first 64 bytes are where the offsets are)
                pos = rng.randrange(min(len(b) - 3, 64))
                struct.pack_into("<I", b, pos, rng.choice(INTERESTING + [rng.getrandbits(32),
                                                                         len(b), max(0, len(b) - 8)]))
            elif op == 2 and b:
                b[rng.randrange(len(b))] = rng.randrange(256)
            elif op == 3:
                del b[rng.randrange(len(b) + 1):]
            else:
                b += bytes(rng.randrange(1, 32))
        for fn in (rndis.decode, rndis.decode_batch):
            try:
                res = fn(bytes(b))
            except ValueError:
                outcomes["rejected"] += 1
                continue
            outcomes["ok"] += 1
            for m in (res if isinstance(res, list) else [res]):
                _check_inside(m, len(b))
                if isinstance(m, rndis.Packet):
                    for p in m.ppis:
                        try:
                            m.ppi_u32(bytes(b), p.type)
                        except ValueError:
                            pass
    # the mutations exercise both outcomes
    assert outcomes["ok"] > 20 and outcomes["rejected"] > 100

"""RNDIS over NVSP: messages, per-packet info, NDIS objects and OIDs (vmbus_netvsp.md e, g.3).

Every RNDIS message is an 8-byte header {ndis_msg_type u32 @0, msg_len u32 @4}
followed by a body (e.1). The layouts below describe whole messages, so each
field sits at 8 + the body offset the reference tables give. ``msg_len`` counts
from offset 0. All the ``*_offset`` fields inside a message (info_buf_offset,
status_buf_offset, data_offset, oob_data_offset, per_pkt_info_offset) count from
the body start, i.e. from message offset 8 (``OFFSET_BASE``), never from the
message start (e.1, e.4).

Decoders take untrusted bytes (guest-written memory on the host, host-written
receive buffers on the guest). They copy each fixed part once, compare every
offset and length as Python ints (no 32-bit wrap-around) and raise
``ValueError`` naming the field at fault. They return Python ints and absolute
(offset, length) ranges into the caller's buffer.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

import numpy as np

from netvsp.layout import U16, U32, U8, array, encode, layout, offsets
from netvsp.layout import decode as decode_struct
from netvsp.nvsp import VERSION_4, VERSION_5

# --- e.1 Message types, header, status codes ----------------------------------------------

MSG_PACKET = 0x00000001
MSG_INIT = 0x00000002
MSG_INIT_C = 0x80000002
MSG_HALT = 0x00000003
MSG_QUERY = 0x00000004
MSG_QUERY_C = 0x80000004
MSG_SET = 0x00000005
MSG_SET_C = 0x80000005
MSG_RESET = 0x00000006
MSG_RESET_C = 0x80000006
MSG_INDICATE = 0x00000007
MSG_KEEPALIVE = 0x00000008
MSG_KEEPALIVE_C = 0x80000008
MSG_SET_EX = 0x00000009
MSG_SET_EX_C = 0x80000009
MSG_BUS = 0xFF000001
MSG_COMPLETION = 0x80000000      # set in the type of every completion

HEADER_SIZE = 8                  # RNDIS_HEADER_SIZE
OFFSET_BASE = HEADER_SIZE        # body-relative offsets count from here
RNDIS_MESSAGE_SIZE = 52          # Linux sizeof(struct rndis_message): header + INIT_CMPLT body
PPI_HEADER_SIZE = 12
PPI_U32_SIZE = PPI_HEADER_SIZE + 4   # checksum, LSO, VLAN and hash PPIs are 16 bytes each
RNDIS_AND_PPI_SIZE = 116         # Linux TX headroom: 52 + 64 (f.3, j.5)

STATUS_SUCCESS = 0x00000000
STATUS_PENDING = 0x00000103
STATUS_NOT_SUPPORTED = 0xC00000BB
STATUS_FAILURE = 0xC0000001
STATUS_INVALID_DATA = 0xC0010015
STATUS_BAD_VERSION = 0xC0010004
STATUS_BUFFER_OVERFLOW = 0x80000005
STATUS_MULTICAST_FULL = 0xC0010009   # standard NDIS number (not in the reference)
# e.8 status indications
STATUS_MEDIA_CONNECT = 0x4001000B
STATUS_MEDIA_DISCONNECT = 0x4001000C
STATUS_LINK_SPEED_CHANGE = 0x40010013
STATUS_NETWORK_CHANGE = 0x40010018
STATUS_TASK_OFFLOAD_CURRENT_CONFIG = 0x40020006
LINK_SPEED_UNIT_BPS = 100        # LINK_SPEED_CHANGE payload and OID_GEN_LINK_SPEED unit

# --- e.3 INITIALIZE values ------------------------------------------------------------------

MAJOR_VERSION = 1
MINOR_VERSION = 0
LINUX_MAX_XFER_SIZE = 0x4000
DF_CONNECTIONLESS = 1            # INITIALIZE_CMPLT.dev_flags
MEDIUM_802_3 = 0
# What OpenVMM answers (e.3 step 1).
OPENVMM_MAX_PKT_PER_MSG = 8
OPENVMM_MAX_XFER_SIZE = 0xEFFFFFFF
OPENVMM_PKT_ALIGNMENT_FACTOR = 3
# Linux's batching limits before INITIALIZE_CMPLT arrives.
LINUX_DEFAULT_MAX_PKT = 8
LINUX_DEFAULT_PKT_ALIGN = 8

# --- e.1 Message layouts (offset = 8 + the table's body offset) -----------------------------

HEADER = layout("rndis_header", 8, [("msg_type", U32, 0), ("msg_len", U32, 4)])


def _msg(name: str, size: int, body: list[tuple[str, np.dtype, int]]) -> np.dtype:
    """A message layout from body-relative fields, as the reference tables list them."""
    return layout(name, size, [("msg_type", U32, 0), ("msg_len", U32, 4)]
                  + [(f, dt, HEADER_SIZE + off) for f, dt, off in body])


INITIALIZE = _msg("rndis_initialize", 24, [
    ("req_id", U32, 0), ("major_ver", U32, 4), ("minor_ver", U32, 8), ("max_xfer_size", U32, 12)])
INITIALIZE_CMPLT = _msg("rndis_initialize_cmplt", 52, [
    ("req_id", U32, 0), ("status", U32, 4), ("major_ver", U32, 8), ("minor_ver", U32, 12),
    ("dev_flags", U32, 16), ("medium", U32, 20), ("max_pkt_per_msg", U32, 24),
    ("max_xfer_size", U32, 28), ("pkt_alignment_factor", U32, 32),
    ("af_list_offset", U32, 36), ("af_list_size", U32, 40)])
HALT = _msg("rndis_halt", 12, [("req_id", U32, 0)])
QUERY = _msg("rndis_query", 28, [
    ("req_id", U32, 0), ("oid", U32, 4), ("info_buflen", U32, 8), ("info_buf_offset", U32, 12),
    ("dev_vc_handle", U32, 16)])
QUERY_CMPLT = _msg("rndis_query_cmplt", 24, [
    ("req_id", U32, 0), ("status", U32, 4), ("info_buflen", U32, 8), ("info_buf_offset", U32, 12)])
SET = _msg("rndis_set", 28, [
    ("req_id", U32, 0), ("oid", U32, 4), ("info_buflen", U32, 8), ("info_buf_offset", U32, 12),
    ("dev_vc_handle", U32, 16)])
SET_CMPLT = _msg("rndis_set_cmplt", 16, [("req_id", U32, 0), ("status", U32, 4)])
RESET = _msg("rndis_reset", 12, [("reserved", U32, 0)])
RESET_CMPLT = _msg("rndis_reset_cmplt", 16, [("status", U32, 0), ("addressing_reset", U32, 4)])
INDICATE_STATUS = _msg("rndis_indicate_status", 20, [
    ("status", U32, 0), ("status_buflen", U32, 4), ("status_buf_offset", U32, 8)])
KEEPALIVE = _msg("rndis_keepalive", 12, [("req_id", U32, 0)])
KEEPALIVE_CMPLT = _msg("rndis_keepalive_cmplt", 16, [("req_id", U32, 0), ("status", U32, 4)])
# SET_EX / SET_EX_CMPLT: the reference gives no layout (OpenVMM answers "not
# implemented"). Only the req_id every request/response body starts with (e.1)
# is declared, which is all a host needs to answer one.
SET_EX = _msg("rndis_set_ex", 12, [("req_id", U32, 0)])
SET_EX_CMPLT = _msg("rndis_set_ex_cmplt", 16, [("req_id", U32, 0), ("status", U32, 4)])

# e.4 RNDIS_PACKET_MSG: 36-byte body; data/OOB/PPI offsets count from the body
# start, i.e. from the data_offset field (message offset 8).
PACKET = _msg("rndis_packet", 44, [
    ("data_offset", U32, 0), ("data_len", U32, 4), ("oob_data_offset", U32, 8),
    ("oob_data_len", U32, 12), ("num_oob_data_elements", U32, 16),
    ("per_pkt_info_offset", U32, 20), ("per_pkt_info_len", U32, 24), ("vc_handle", U32, 28),
    ("reserved", U32, 32)])
PACKET_BODY_SIZE = PACKET.itemsize - HEADER_SIZE     # 36: Linux TX data/PPI offset start

# e.5 per-packet info element header; payload at ppi_offset from the element start.
PPI = layout("rndis_ppi", 12, [("size", U32, 0), ("type", U32, 4), ("ppi_offset", U32, 8)])

LAYOUTS = {
    MSG_PACKET: PACKET, MSG_INIT: INITIALIZE, MSG_INIT_C: INITIALIZE_CMPLT, MSG_HALT: HALT,
    MSG_QUERY: QUERY, MSG_QUERY_C: QUERY_CMPLT, MSG_SET: SET, MSG_SET_C: SET_CMPLT,
    MSG_RESET: RESET, MSG_RESET_C: RESET_CMPLT, MSG_INDICATE: INDICATE_STATUS,
    MSG_KEEPALIVE: KEEPALIVE, MSG_KEEPALIVE_C: KEEPALIVE_CMPLT, MSG_SET_EX: SET_EX,
    MSG_SET_EX_C: SET_EX_CMPLT,
}

# --- offsets for compiled kernels ------------------------------------------------------------

_P = offsets(PACKET)
OFF_MSG_TYPE = 0
OFF_MSG_LEN = 4
OFF_PKT_DATA_OFFSET = _P["data_offset"]
OFF_PKT_DATA_LEN = _P["data_len"]
OFF_PKT_OOB_DATA_OFFSET = _P["oob_data_offset"]
OFF_PKT_OOB_DATA_LEN = _P["oob_data_len"]
OFF_PKT_NUM_OOB_DATA_ELEMENTS = _P["num_oob_data_elements"]
OFF_PKT_PPI_OFFSET = _P["per_pkt_info_offset"]
OFF_PKT_PPI_LEN = _P["per_pkt_info_len"]
OFF_PKT_VC_HANDLE = _P["vc_handle"]
OFF_PKT_RESERVED = _P["reserved"]
_I = offsets(PPI)
OFF_PPI_SIZE = _I["size"]
OFF_PPI_TYPE = _I["type"]
OFF_PPI_OFFSET = _I["ppi_offset"]
del _P, _I

# --- e.5 Per-packet info types and payloads ---------------------------------------------------

PPI_TCPIP_CHKSUM = 0
PPI_IPSEC = 1
PPI_TCP_LARGESEND = 2
PPI_CLASSIFICATION_HANDLE = 3
PPI_RESERVED = 4
PPI_SG_LIST = 5
PPI_IEEE_8021Q = 6
PPI_ORIGINAL = 7
PPI_PACKET_CANCEL_ID = 8
PPI_NBL_HASH_VALUE = 8           # same number as PACKET_CANCEL_ID
PPI_ORIGINAL_NET_BUFLIST = 9
PPI_NBL_HASH_INFO = 9            # FreeBSD's name for 9: hash type/function (RX only)
PPI_CACHED_NET_BUFLIST = 10
PPI_SHORT_PKT_PADINFO = 11
PPI_INTERNAL = 0x80000000        # bit 31 of the type word
PPI_TYPE_MASK = 0x7FFFFFFF
PPI_RNDIS_PKTINFO_ID = PPI_INTERNAL | 1   # RSC fragment id

# RNDIS_PKTINFO_ID payload {ver u8, flag u8, pkt_id u16}
PKTINFO_ID = layout("rndis_pktinfo_id", 4, [("ver", U8, 0), ("flag", U8, 1), ("pkt_id", U16, 2)])
PKTINFO_ID_VERSION = 1
PKTINFO_SUBALLOC = 1 << 0
PKTINFO_1ST_FRAG = 1 << 1
PKTINFO_LAST_FRAG = 1 << 2

# Checksum info, transmit view (bitfields, LSB first).
CSUM_TX_IS_IPV4 = 1 << 0
CSUM_TX_IS_IPV6 = 1 << 1
CSUM_TX_TCP = 1 << 2
CSUM_TX_UDP = 1 << 3
CSUM_TX_IP_HEADER = 1 << 4
CSUM_TX_TCP_HEADER_OFFSET_SHIFT = 16
CSUM_TX_TCP_HEADER_OFFSET_MASK = 0x3FF    # bits 16-25
# Checksum info, receive view.
CSUM_RX_TCP_FAILED = 1 << 0
CSUM_RX_UDP_FAILED = 1 << 1
CSUM_RX_IP_FAILED = 1 << 2
CSUM_RX_TCP_SUCCEEDED = 1 << 3
CSUM_RX_UDP_SUCCEEDED = 1 << 4
CSUM_RX_IP_SUCCEEDED = 1 << 5
CSUM_RX_LOOPBACK = 1 << 6
CSUM_RX_TCP_VALUE_INVALID = 1 << 7
CSUM_RX_IP_VALUE_INVALID = 1 << 8

# LSO v2 transmit. The reference defines only the transmit view (LSO PPIs are
# TX only, e.5); there is no receive/"complete" layout to declare.
LSO_MSS_MASK = 0xFFFFF                    # bits 0-19
LSO_MAX_SIZE = 0xF53C - 1       # e.5, e.6: what NetVSP advertises; OpenVMM refuses >= 0xF53C
LSO_TCP_HEADER_OFFSET_SHIFT = 20
LSO_TCP_HEADER_OFFSET_MASK = 0x3FF        # bits 20-29
LSO_TYPE_V2 = 1 << 30
LSO_IPV6 = 1 << 31                        # ip_version: 0 IPv4, 1 IPv6

# 802.1Q info
VLAN_PRIORITY_MASK = 0x7                  # bits 0-2
VLAN_CFI = 1 << 3
VLAN_ID_SHIFT = 4
VLAN_ID_MASK = 0xFFF                      # bits 4-15


def _bits(name: str, value: int, mask: int) -> int:
    if not 0 <= value <= mask:
        raise ValueError(f"{name} {value} does not fit in its {mask.bit_length()}-bit field")
    return value


def csum_tx_info(*, ipv4: bool = False, ipv6: bool = False, tcp: bool = False,
                 udp: bool = False, ip_header: bool = False, tcp_header_offset: int = 0) -> int:
    """The u32 of a TX TCPIP_CHKSUM_PKTINFO (e.5)."""
    v = _bits("tcp_header_offset", tcp_header_offset, CSUM_TX_TCP_HEADER_OFFSET_MASK)
    return ((v << CSUM_TX_TCP_HEADER_OFFSET_SHIFT) | (CSUM_TX_IS_IPV4 if ipv4 else 0)
            | (CSUM_TX_IS_IPV6 if ipv6 else 0) | (CSUM_TX_TCP if tcp else 0)
            | (CSUM_TX_UDP if udp else 0) | (CSUM_TX_IP_HEADER if ip_header else 0))


def csum_tx_fields(value: int) -> dict:
    return {"ipv4": bool(value & CSUM_TX_IS_IPV4), "ipv6": bool(value & CSUM_TX_IS_IPV6),
            "tcp": bool(value & CSUM_TX_TCP), "udp": bool(value & CSUM_TX_UDP),
            "ip_header": bool(value & CSUM_TX_IP_HEADER),
            "tcp_header_offset": (value >> CSUM_TX_TCP_HEADER_OFFSET_SHIFT)
            & CSUM_TX_TCP_HEADER_OFFSET_MASK}


def lso_v2_info(mss: int, tcp_header_offset: int, ipv6: bool = False) -> int:
    """The u32 of a TX TCP_LARGESEND_PKTINFO, LSOv2 (e.5)."""
    _bits("mss", mss, LSO_MSS_MASK)
    _bits("tcp_header_offset", tcp_header_offset, LSO_TCP_HEADER_OFFSET_MASK)
    return (mss | (tcp_header_offset << LSO_TCP_HEADER_OFFSET_SHIFT) | LSO_TYPE_V2
            | (LSO_IPV6 if ipv6 else 0))


def lso_v2_fields(value: int) -> dict:
    return {"mss": value & LSO_MSS_MASK,
            "tcp_header_offset": (value >> LSO_TCP_HEADER_OFFSET_SHIFT) & LSO_TCP_HEADER_OFFSET_MASK,
            "v2": bool(value & LSO_TYPE_V2), "ipv6": bool(value & LSO_IPV6)}


def vlan_info(vid: int, priority: int = 0, cfi: bool = False) -> int:
    """The u32 of an IEEE_8021Q_INFO PPI; the frame itself carries no tag (e.5)."""
    _bits("vid", vid, VLAN_ID_MASK)
    _bits("priority", priority, VLAN_PRIORITY_MASK)
    return (vid << VLAN_ID_SHIFT) | priority | (VLAN_CFI if cfi else 0)


def vlan_fields(value: int) -> dict:
    return {"vid": (value >> VLAN_ID_SHIFT) & VLAN_ID_MASK,
            "priority": value & VLAN_PRIORITY_MASK, "cfi": bool(value & VLAN_CFI)}


# --- e.6 NDIS objects ------------------------------------------------------------------------

NDIS_OBJECT_HEADER = layout("ndis_object_header", 4, [
    ("type", U8, 0), ("revision", U8, 1), ("size", U16, 2)])
OBJTYPE_DEFAULT = 0x80
OBJTYPE_RSS_CAPABILITIES = 0x88
OBJTYPE_RSS_PARAMETERS = 0x89
OBJTYPE_OID_REQUEST = 0x96
OBJTYPE_OFFLOAD = 0xA7
OBJTYPE_OFFLOAD_ENCAPSULATION = 0xA8

_HDR = [("hdr_type", U8, 0), ("hdr_revision", U8, 1), ("hdr_size", U16, 2)]

# NDIS_OFFLOAD (hardware capabilities / current config), natural alignment.
# The reference names the LSOv1 (4 u32) and IPsecv1 (7 u32) / IPsecv2 (32 bytes)
# members only by size; they are declared as arrays.
NDIS_OFFLOAD = layout("ndis_offload", 156, _HDR + [
    ("csum_ip4_txenc", U32, 4), ("csum_ip4_txcsum", U32, 8),
    ("csum_ip4_rxenc", U32, 12), ("csum_ip4_rxcsum", U32, 16),
    ("csum_ip6_txenc", U32, 20), ("csum_ip6_txcsum", U32, 24),
    ("csum_ip6_rxenc", U32, 28), ("csum_ip6_rxcsum", U32, 32),
    ("lsov1", array(U32, 4), 36),
    ("ipsecv1", array(U32, 7), 52),
    ("lsov2_ip4_encap", U32, 80), ("lsov2_ip4_maxsz", U32, 84), ("lsov2_ip4_minsg", U32, 88),
    ("lsov2_ip6_encap", U32, 92), ("lsov2_ip6_maxsz", U32, 96), ("lsov2_ip6_minsg", U32, 100),
    ("lsov2_ip6_opts", U32, 104),
    ("flags", U32, 108),
    ("ipsecv2", array(U8, 32), 112),
    ("rsc_ip4", U8, 144), ("rsc_ip6", U8, 145),
    ("encap_gre_flags", U32, 148), ("encap_gre_maxhdr", U32, 152)])
NDIS_OFFLOAD_SIZE_6_0 = 112      # revision 1
NDIS_OFFLOAD_SIZE_6_1 = 144      # revision 2
NDIS_OFFLOAD_SIZE = 156          # revision 3
NDIS_OFFLOAD_REVISION_1 = 1
NDIS_OFFLOAD_REVISION_2 = 2
NDIS_OFFLOAD_REVISION_3 = 3

# Checksum capability bits (e.6)
TXCSUM_CAP_IP4_OPTIONS = 0x001
TXCSUM_CAP_TCP4_OPTIONS = 0x004
TXCSUM_CAP_TCP4 = 0x010
TXCSUM_CAP_UDP4 = 0x040
TXCSUM_CAP_IP4 = 0x100
TXCSUM_CAP_IP6_EXT = 0x001
TXCSUM_CAP_TCP6_OPTIONS = 0x004
TXCSUM_CAP_TCP6 = 0x010
TXCSUM_CAP_UDP6 = 0x040
OFFLOAD_ENCAP_802_3 = 2
LSOV2_IP6_EXT = 0x001
LSOV2_IP6_TCP_OPTIONS = 0x004

# NDIS_OFFLOAD_PARAMETERS (Linux ndis_offload_params), natural alignment: byte 15
# and bytes 26-27 are padding.
NDIS_OFFLOAD_PARAMETERS = layout("ndis_offload_parameters", 28, _HDR + [
    ("ip_v4_csum", U8, 4), ("tcp_ip_v4_csum", U8, 5), ("udp_ip_v4_csum", U8, 6),
    ("tcp_ip_v6_csum", U8, 7), ("udp_ip_v6_csum", U8, 8), ("lso_v1", U8, 9),
    ("ip_sec_v1", U8, 10), ("lso_v2_ipv4", U8, 11), ("lso_v2_ipv6", U8, 12),
    ("tcp_connection_ip_v4", U8, 13), ("tcp_connection_ip_v6", U8, 14), ("flags", U32, 16),
    ("ip_sec_v2", U8, 20), ("ip_sec_v2_ip_v4", U8, 21), ("rsc_ip_v4", U8, 22),
    ("rsc_ip_v6", U8, 23), ("encapsulated_packet_task_offload", U8, 24),
    ("encapsulation_types", U8, 25)])
NDIS_OFFLOAD_PARAMETERS_REVISION_1 = 1
NDIS_OFFLOAD_PARAMETERS_REVISION_3 = 3
NDIS_OFFLOAD_PARAMETERS_SIZE = 28
NDIS_OFFLOAD_PARAMETERS_SIZE_V4 = 22     # Linux for NVSP <= 4 (no UDP checksum fields used)
NDIS_OFFLOAD_PARAMETERS_SIZE_REV1 = 20   # the prefix OpenVMM parses
# checksum values
OFFLOAD_PARAMETERS_NO_CHANGE = 0
OFFLOAD_PARAMETERS_TX_RX_DISABLED = 1
OFFLOAD_PARAMETERS_TX_ENABLED_RX_DISABLED = 2
OFFLOAD_PARAMETERS_RX_ENABLED_TX_DISABLED = 3
OFFLOAD_PARAMETERS_TX_RX_ENABLED = 4
# LSO / RSC values
OFFLOAD_PARAMETERS_LSO_DISABLED = 1
OFFLOAD_PARAMETERS_LSO_ENABLED = 2
OFFLOAD_PARAMETERS_RSC_DISABLED = 1
OFFLOAD_PARAMETERS_RSC_ENABLED = 2

# OID_GEN_RECEIVE_SCALE_CAPABILITIES answer (18 bytes, packed).
RSS_CAPABILITIES = layout("ndis_recv_scale_cap", 18, _HDR + [
    ("cap_flag", U32, 4), ("num_int_msg", U32, 8), ("num_recv_que", U32, 12),
    ("num_indirect_tabent", U16, 16)])
RSS_CAPABILITIES_REVISION_2 = 2
RSS_CAP_TCP_IPV4 = 0x100
RSS_CAP_TCP_IPV6 = 0x200
RSS_CAP_TCP_IPV6_EX = 0x400
RSS_CAP_UDP_IPV4 = 0x800
RSS_CAP_UDP_IPV6 = 0x1000
RSS_CAP_UDP_IPV6_EX = 0x2000
RSS_CAP_MSI = 0x01000000

# g.3 OID_GEN_RECEIVE_SCALE_PARAMETERS (Linux ndis_recv_scale_param, 40 bytes;
# 14 and 22 are padding). OpenVMM's revision 3 adds default_processor_number; the
# reference gives only its size (44), so it is taken to be the u32 at 40.
RSS_PARAMETERS = layout("ndis_recv_scale_param", 40, _HDR + [
    ("flags", U16, 4), ("base_cpu_number", U16, 6), ("hashinfo", U32, 8),
    ("indirect_tabsize", U16, 12), ("indirect_taboffset", U32, 16), ("hashkey_size", U16, 20),
    ("hashkey_offset", U32, 24), ("processor_masks_offset", U32, 28),
    ("num_processor_masks", U32, 32), ("processor_masks_entry_size", U32, 36)])
RSS_PARAMETERS_V3 = layout("ndis_recv_scale_param_v3", 44,
                           [(n, RSS_PARAMETERS.fields[n][0], RSS_PARAMETERS.fields[n][1])
                            for n in RSS_PARAMETERS.names] + [("default_processor_number", U32, 40)])
RSS_PARAMETERS_REVISION_2 = 2
RSS_PARAMETERS_REVISION_3 = 3

RSS_FLAG_BASE_CPU_UNCHANGED = 0x0001
RSS_FLAG_HASH_INFO_UNCHANGED = 0x0002
RSS_FLAG_ITABLE_UNCHANGED = 0x0004
RSS_FLAG_HASH_KEY_UNCHANGED = 0x0008
RSS_FLAG_DISABLE_RSS = 0x0010
RSS_FLAG_DEFAULT_PROCESSOR_UNCHANGED = 0x0020

HASH_FUNC_TOEPLITZ = 0x00000001
HASH_FUNC_MASK = 0x000000FF
HASH_IPV4 = 0x00000100
HASH_TCP_IPV4 = 0x00000200
HASH_IPV6 = 0x00000400
HASH_IPV6_EX = 0x00000800
HASH_TCP_IPV6 = 0x00001000
HASH_TCP_IPV6_EX = 0x00002000
HASH_UDP_IPV4 = 0x00004000
HASH_UDP_IPV6 = 0x00008000
HASH_UDP_IPV6_EX = 0x00010000
LINUX_HASHINFO = HASH_FUNC_TOEPLITZ | HASH_IPV4 | HASH_TCP_IPV4 | HASH_IPV6 | HASH_TCP_IPV6

ITAB_NUM = 128                   # receive indirection table entries (g.1, g.2)
HASH_KEYLEN = 40                 # NETVSC_HASH_KEYLEN
DEFAULT_HASH_KEY = bytes.fromhex(
    "6d5a56da255b0ec24167253d43a38fb0d0ca2bcbae7b30b477cb2da38030f20c6a42b73bbeac01fa")

# e.3 step 10: RNDIS config parameter block (MAC change).
CONFIG_PARAMETER_INFO = layout("rndis_config_parameter_info", 20, [
    ("parameter_name_offset", U32, 0), ("parameter_name_length", U32, 4),
    ("parameter_type", U32, 8), ("parameter_value_offset", U32, 12),
    ("parameter_value_length", U32, 16)])
CONFIG_PARAM_TYPE_STRING = 2

# --- e.7 OIDs and packet filter ------------------------------------------------------------------

OID_GEN_SUPPORTED_LIST = 0x00010101
OID_GEN_MAXIMUM_FRAME_SIZE = 0x00010106
OID_GEN_LINK_SPEED = 0x00010107
OID_GEN_CURRENT_PACKET_FILTER = 0x0001010E
OID_GEN_MEDIA_CONNECT_STATUS = 0x00010114
OID_GEN_RECEIVE_SCALE_CAPABILITIES = 0x00010203
OID_GEN_RECEIVE_SCALE_PARAMETERS = 0x00010204
OID_GEN_MAX_LINK_SPEED = 0x00010206
OID_GEN_LINK_STATE = 0x00010207
OID_GEN_LINK_PARAMETERS = 0x00010208
OID_GEN_RNDIS_CONFIG_PARAMETER = 0x0001021B
OID_GEN_FRIENDLY_NAME = 0x00020216
OID_GEN_BYTES_RCV = 0x00020219
OID_GEN_BYTES_XMIT = 0x0002021A
OID_802_3_PERMANENT_ADDRESS = 0x01010101
OID_OFFLOAD_ENCAPSULATION = 0x0101010A
OID_TCP_OFFLOAD_PARAMETERS = 0xFC01020C
OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES = 0xFC01020D
# e.7 names these without numbers: the standard NDIS/RNDIS values.
OID_GEN_HARDWARE_STATUS = 0x00010102
OID_GEN_MEDIA_SUPPORTED = 0x00010103
OID_GEN_MEDIA_IN_USE = 0x00010104
OID_GEN_MAXIMUM_LOOKAHEAD = 0x00010105
OID_GEN_TRANSMIT_BUFFER_SPACE = 0x00010108
OID_GEN_RECEIVE_BUFFER_SPACE = 0x00010109
OID_GEN_TRANSMIT_BLOCK_SIZE = 0x0001010A
OID_GEN_RECEIVE_BLOCK_SIZE = 0x0001010B
OID_GEN_VENDOR_ID = 0x0001010C
OID_GEN_VENDOR_DESCRIPTION = 0x0001010D
OID_GEN_CURRENT_LOOKAHEAD = 0x0001010F
OID_GEN_DRIVER_VERSION = 0x00010110
OID_GEN_MAXIMUM_TOTAL_SIZE = 0x00010111
OID_GEN_MAC_OPTIONS = 0x00010113
OID_GEN_MAXIMUM_SEND_PACKETS = 0x00010115
OID_GEN_VENDOR_DRIVER_VERSION = 0x00010116
OID_GEN_NETWORK_LAYER_ADDRESSES = 0x00010118
OID_GEN_XMIT_ERROR = 0x00020103
OID_GEN_RCV_ERROR = 0x00020104
OID_GEN_RCV_NO_BUFFER = 0x00020105
OID_802_3_CURRENT_ADDRESS = 0x01010102
OID_802_3_MULTICAST_LIST = 0x01010103
OID_802_3_MAXIMUM_LIST_SIZE = 0x01010104
OID_802_3_RCV_ERROR_ALIGNMENT = 0x01020101
OID_802_3_XMIT_ONE_COLLISION = 0x01020102
OID_802_3_XMIT_MORE_COLLISIONS = 0x01020103
OID_TCP_OFFLOAD_CURRENT_CONFIG = 0xFC01020B

MEDIA_STATE_CONNECTED = 0        # OID_GEN_MEDIA_CONNECT_STATUS answer
MEDIA_STATE_DISCONNECTED = 1

# e.3 step 9 gives DIRECTED|ALL_MULTICAST|BROADCAST = 0x0D and PROMISCUOUS = 0x20;
# the split of 0x0D into 1/4/8 is NDIS's standard bit assignment.
PACKET_TYPE_DIRECTED = 0x01
PACKET_TYPE_ALL_MULTICAST = 0x04
PACKET_TYPE_BROADCAST = 0x08
PACKET_TYPE_PROMISCUOUS = 0x20
LINUX_OPEN_PACKET_FILTER = PACKET_TYPE_DIRECTED | PACKET_TYPE_ALL_MULTICAST | PACKET_TYPE_BROADCAST


# --- encoders ------------------------------------------------------------------------------------

def _with_buffer(dt: np.dtype, msg_type: int, buf: bytes, offset_field: str,
                 len_field: str, body_offset: int, **fields) -> bytes:
    """A message whose variable buffer follows the fixed part; its offset is
    body-relative (e.1) and msg_len covers everything."""
    buf = bytes(buf)
    head = encode(dt, msg_type=msg_type, msg_len=dt.itemsize + len(buf),
                  **{offset_field: body_offset, len_field: len(buf)}, **fields)
    return head + buf


def rndis_initialize(request_id: int, major: int = MAJOR_VERSION, minor: int = MINOR_VERSION,
                     max_transfer_size: int = LINUX_MAX_XFER_SIZE) -> bytes:
    return encode(INITIALIZE, msg_type=MSG_INIT, msg_len=INITIALIZE.itemsize, req_id=request_id,
                  major_ver=major, minor_ver=minor, max_xfer_size=max_transfer_size)


def rndis_initialize_complete(request_id: int, status: int = STATUS_SUCCESS,
                              major: int = MAJOR_VERSION, minor: int = MINOR_VERSION,
                              device_flags: int = DF_CONNECTIONLESS, medium: int = MEDIUM_802_3,
                              max_packets_per_message: int = OPENVMM_MAX_PKT_PER_MSG,
                              max_transfer_size: int = OPENVMM_MAX_XFER_SIZE,
                              packet_alignment_factor: int = OPENVMM_PKT_ALIGNMENT_FACTOR,
                              af_list_offset: int = 0, af_list_size: int = 0) -> bytes:
    """INITIALIZE_CMPLT; the defaults are OpenVMM's answer (e.3 step 1)."""
    return encode(INITIALIZE_CMPLT, msg_type=MSG_INIT_C, msg_len=INITIALIZE_CMPLT.itemsize,
                  req_id=request_id, status=status, major_ver=major, minor_ver=minor,
                  dev_flags=device_flags, medium=medium, max_pkt_per_msg=max_packets_per_message,
                  max_xfer_size=max_transfer_size, pkt_alignment_factor=packet_alignment_factor,
                  af_list_offset=af_list_offset, af_list_size=af_list_size)


def rndis_query(request_id: int, oid: int, info: bytes = b"") -> bytes:
    """QUERY as Linux builds it: info_buf_offset = 20 (the query body size) even
    when there is no input buffer (e.1, e.3)."""
    return _with_buffer(QUERY, MSG_QUERY, info, "info_buf_offset", "info_buflen",
                        QUERY.itemsize - HEADER_SIZE, req_id=request_id, oid=oid)


def rndis_query_complete(request_id: int, status: int, info: bytes = b"") -> bytes:
    """QUERY_CMPLT with info_buf_offset = 16 (the complete body size), as OpenVMM."""
    return _with_buffer(QUERY_CMPLT, MSG_QUERY_C, info, "info_buf_offset", "info_buflen",
                        QUERY_CMPLT.itemsize - HEADER_SIZE, req_id=request_id, status=status)


def rndis_set(request_id: int, oid: int, info: bytes) -> bytes:
    """SET with the info buffer at body offset 20 (Linux)."""
    return _with_buffer(SET, MSG_SET, info, "info_buf_offset", "info_buflen",
                        SET.itemsize - HEADER_SIZE, req_id=request_id, oid=oid)


def rndis_set_complete(request_id: int, status: int = STATUS_SUCCESS) -> bytes:
    return encode(SET_CMPLT, msg_type=MSG_SET_C, msg_len=SET_CMPLT.itemsize,
                  req_id=request_id, status=status)


def rndis_halt(request_id: int) -> bytes:
    return encode(HALT, msg_type=MSG_HALT, msg_len=HALT.itemsize, req_id=request_id)


def rndis_reset() -> bytes:
    return encode(RESET, msg_type=MSG_RESET, msg_len=RESET.itemsize)


def rndis_reset_complete(status: int = STATUS_SUCCESS, addressing_reset: int = 0) -> bytes:
    return encode(RESET_CMPLT, msg_type=MSG_RESET_C, msg_len=RESET_CMPLT.itemsize,
                  status=status, addressing_reset=addressing_reset)


def rndis_keepalive(request_id: int) -> bytes:
    return encode(KEEPALIVE, msg_type=MSG_KEEPALIVE, msg_len=KEEPALIVE.itemsize,
                  req_id=request_id)


def rndis_keepalive_complete(request_id: int, status: int = STATUS_SUCCESS) -> bytes:
    return encode(KEEPALIVE_CMPLT, msg_type=MSG_KEEPALIVE_C, msg_len=KEEPALIVE_CMPLT.itemsize,
                  req_id=request_id, status=status)


def rndis_indicate_status(status: int, payload: bytes = b"") -> bytes:
    """INDICATE_STATUS_MSG. status_buf_offset is 12 (the body size) as OpenVMM
    sends it; the reference does not say what goes there without a payload, so
    12 is used always (Linux checks the offset only for LINK_SPEED_CHANGE)."""
    return _with_buffer(INDICATE_STATUS, MSG_INDICATE, payload, "status_buf_offset",
                        "status_buflen", INDICATE_STATUS.itemsize - HEADER_SIZE, status=status)


def rndis_link_speed_change(speed_bps: int) -> bytes:
    """LINK_SPEED_CHANGE with its u32 payload in 100 bps units (e.8)."""
    return rndis_indicate_status(STATUS_LINK_SPEED_CHANGE,
                                 struct.pack("<I", speed_bps // LINK_SPEED_UNIT_BPS))


def ppi(ppi_type: int, payload: bytes) -> bytes:
    """One PPI element: 12-byte header, payload right after (ppi_offset 12)."""
    return encode(PPI, size=PPI_HEADER_SIZE + len(payload), type=ppi_type,
                  ppi_offset=PPI_HEADER_SIZE) + bytes(payload)


def rndis_packet(frame: bytes, *, hash_value: int | None = None, vlan: int | None = None,
                 lso: int | None = None, csum: int | None = None,
                 ppis: tuple = (), align: int = 0) -> bytes:
    """RNDIS_PACKET_MSG (e.4) laid out as Linux sends it: header, 36-byte body,
    PPIs from body offset 36, then the frame at data_offset = 36 + ppi_len.

    ``hash_value``/``vlan``/``lso``/``csum`` are the u32 payloads (see
    ``vlan_info``, ``lso_v2_info``, ``csum_tx_info``) and are emitted in Linux's
    netvsc_xmit order: hash, 802.1Q, then LSO or checksum. ``ppis`` adds
    (type, payload bytes) elements after them. ``align`` > 0 zero-pads msg_len
    to a multiple of it, as Linux does when batching into a send section (f.3);
    data_len never includes the padding."""
    elems = []
    for t, v in ((PPI_NBL_HASH_VALUE, hash_value), (PPI_IEEE_8021Q, vlan),
                 (PPI_TCP_LARGESEND, lso), (PPI_TCPIP_CHKSUM, csum)):
        if v is not None:
            elems.append(ppi(t, struct.pack("<I", v)))
    elems.extend(ppi(t, p) for t, p in ppis)
    area = b"".join(elems)
    frame = bytes(frame)
    msg_len = PACKET.itemsize + len(area) + len(frame)
    pad = (-msg_len) % align if align > 0 else 0
    head = encode(PACKET, msg_type=MSG_PACKET, msg_len=msg_len + pad,
                  data_offset=PACKET_BODY_SIZE + len(area), data_len=len(frame),
                  per_pkt_info_offset=PACKET_BODY_SIZE, per_pkt_info_len=len(area))
    return head + area + frame + bytes(pad)


# NDIS object payloads used in the init sequence -------------------------------------------------

def ndis_object(obj_type: int, revision: int, size: int) -> bytes:
    """A zero-filled object of ``size`` bytes with its NDIS header set. Linux sends
    such a buffer as the input of the hardware-capability and RSS-capability
    queries (e.3 steps 5 and 8: the whole object, not just its header)."""
    return encode(NDIS_OBJECT_HEADER, type=obj_type, revision=revision, size=size) + bytes(size - 4)


def linux_offload_query_input(nvsp_version: int) -> bytes:
    """The OID_TCP_OFFLOAD_HARDWARE_CAPABILITIES input Linux sends (e.3 step 5)."""
    if nvsp_version >= VERSION_5:
        return ndis_object(OBJTYPE_OFFLOAD, NDIS_OFFLOAD_REVISION_3, NDIS_OFFLOAD_SIZE)
    if nvsp_version >= VERSION_4:
        return ndis_object(OBJTYPE_OFFLOAD, NDIS_OFFLOAD_REVISION_2, NDIS_OFFLOAD_SIZE_6_1)
    return ndis_object(OBJTYPE_OFFLOAD, NDIS_OFFLOAD_REVISION_1, NDIS_OFFLOAD_SIZE_6_0)


def linux_rss_capabilities_query_input() -> bytes:
    return ndis_object(OBJTYPE_RSS_CAPABILITIES, RSS_CAPABILITIES_REVISION_2,
                       RSS_CAPABILITIES.itemsize)


def offload_parameters(size: int = NDIS_OFFLOAD_PARAMETERS_SIZE, **fields) -> bytes:
    """NDIS_OFFLOAD_PARAMETERS, header {0x80, rev 3, size}; ``size`` 22 cuts it
    as Linux does for NVSP <= 4 (e.3 step 6)."""
    if size not in (NDIS_OFFLOAD_PARAMETERS_SIZE, NDIS_OFFLOAD_PARAMETERS_SIZE_V4):
        raise ValueError(f"size {size}: Linux sends 28 or 22")
    return encode(NDIS_OFFLOAD_PARAMETERS, hdr_type=OBJTYPE_DEFAULT,
                  hdr_revision=NDIS_OFFLOAD_PARAMETERS_REVISION_3, hdr_size=size, **fields)[:size]


def rss_parameters(table, key: bytes = DEFAULT_HASH_KEY, flags: int = 0,
                   hashinfo: int = LINUX_HASHINFO) -> bytes:
    """OID_GEN_RECEIVE_SCALE_PARAMETERS info buffer as Linux builds it (g.3):
    the 40-byte header, the u32 table at 40, the key right after it."""
    tab = np.asarray([int(t) for t in table], dtype=U32).tobytes()
    key = bytes(key)
    head = encode(RSS_PARAMETERS, hdr_type=OBJTYPE_RSS_PARAMETERS,
                  hdr_revision=RSS_PARAMETERS_REVISION_2, hdr_size=RSS_PARAMETERS.itemsize,
                  flags=flags, hashinfo=hashinfo, indirect_tabsize=len(tab),
                  indirect_taboffset=RSS_PARAMETERS.itemsize, hashkey_size=len(key),
                  hashkey_offset=RSS_PARAMETERS.itemsize + len(tab))
    return head + tab + key


def config_parameter_string(name: str, value: str) -> bytes:
    """An RNDIS config parameter block with UTF-16LE name and string value."""
    n, v = name.encode("utf-16-le"), value.encode("utf-16-le")
    base = CONFIG_PARAMETER_INFO.itemsize
    return encode(CONFIG_PARAMETER_INFO, parameter_name_offset=base, parameter_name_length=len(n),
                  parameter_type=CONFIG_PARAM_TYPE_STRING, parameter_value_offset=base + len(n),
                  parameter_value_length=len(v)) + n + v


def mac_address_parameter(mac: bytes) -> bytes:
    """The SET OID_GEN_RNDIS_CONFIG_PARAMETER info Linux sends on a MAC change:
    "NetworkAddress" = 12 lowercase hex digits (e.3 step 10)."""
    if len(mac) != 6:
        raise ValueError(f"mac: 6 bytes expected, got {len(mac)}")
    return config_parameter_string("NetworkAddress", bytes(mac).hex())


# --- decoders (untrusted input) ----------------------------------------------------------------

class Ppi(NamedTuple):
    type: int          # full 32-bit type word, internal bit included
    start: int         # absolute offset of the payload in the buffer
    length: int        # payload bytes (size - ppi_offset)


class Packet(NamedTuple):
    """A validated RNDIS_PACKET_MSG; every range is absolute in the caller's buffer
    and lies inside the message."""
    offset: int
    msg_len: int
    data_start: int
    data_len: int
    oob_start: int
    oob_len: int
    num_oob_data_elements: int
    vc_handle: int
    ppis: tuple

    def ppi(self, ppi_type: int) -> Ppi | None:
        for p in self.ppis:
            if p.type == ppi_type:
                return p
        return None

    def ppi_u32(self, buf, ppi_type: int) -> int | None:
        """The u32 payload of the first PPI of that type (checksum, LSO, VLAN,
        hash), or None; a payload shorter than 4 bytes is an error."""
        p = self.ppi(ppi_type)
        if p is None:
            return None
        if p.length < 4:
            raise ValueError(f"ppi_offset: PPI type {ppi_type:#x} payload is {p.length} bytes, needs 4")
        return struct.unpack_from("<I", buf, p.start)[0]


class Control(NamedTuple):
    """A validated non-data RNDIS message: its fixed fields (a copy) and the range
    of its variable buffer (info / status buffer), absolute in the caller's buffer."""
    offset: int
    msg_type: int
    msg_len: int
    fields: np.void
    buf_start: int
    buf_len: int


def _span(buf, offset: int, end: int | None) -> int:
    """Bytes available from ``offset`` to ``end`` (default: the buffer end)."""
    n = len(buf)
    end = n if end is None else end
    if not 0 <= offset <= end <= n:
        raise ValueError(f"offset {offset}/end {end}: outside the {n}-byte buffer")
    return end - offset


def _copy(dt: np.dtype, buf, offset: int) -> np.void:
    # Copy before use: the peer may rewrite shared memory after the checks.
    return decode_struct(dt, bytes(memoryview(buf)[offset:offset + dt.itemsize]))


def read_header(buf, offset: int = 0, end: int | None = None) -> tuple[int, int]:
    """(msg_type, msg_len) of the message at ``offset``; msg_len must cover the
    header and stay within the available bytes (Linux rndis_filter_receive)."""
    avail = _span(buf, offset, end)
    if avail < HEADER_SIZE:
        raise ValueError(f"msg_len: only {avail} bytes, the RNDIS header needs {HEADER_SIZE}")
    h = _copy(HEADER, buf, offset)
    msg_type, msg_len = int(h["msg_type"]), int(h["msg_len"])
    if msg_len < HEADER_SIZE:
        raise ValueError(f"msg_len {msg_len}: smaller than the {HEADER_SIZE}-byte header")
    if msg_len > avail:
        raise ValueError(f"msg_len {msg_len}: past the {avail} bytes available")
    return msg_type, msg_len


def _check_range(what_off: str, what_len: str, off: int, length: int, lo: int, body_len: int):
    """A body-relative [off, off+length) must start at or after ``lo`` and end
    within the body. Python ints: no wrap-around."""
    if off < lo or off > body_len:
        raise ValueError(f"{what_off} {off}: outside the body [{lo}, {body_len}]")
    if length > body_len - off:
        raise ValueError(f"{what_len} {length}: at {what_off} {off} runs past the "
                         f"{body_len}-byte body")


def decode_packet(buf, offset: int = 0, end: int | None = None) -> Packet:
    """Validate and locate an RNDIS_PACKET_MSG (e.4).

    Checks, all against msg_len (which must fit the available bytes):
    data_offset >= 36 (data cannot overlap the packet body) and data within the
    message; OOB range likewise when oob_data_len != 0; the PPI area, when
    per_pkt_info_len != 0, starts at >= 36 and ends within the message, and its
    elements tile it exactly: each size >= 12 and <= the bytes left, and each
    12 <= ppi_offset < size. A zero per_pkt_info_len means no PPIs whatever the
    offset says (Linux TX puts 36 there with no PPIs)."""
    msg_type, msg_len = read_header(buf, offset, end)
    if msg_type != MSG_PACKET:
        raise ValueError(f"ndis_msg_type {msg_type:#x}: not PACKET_MSG")
    if msg_len < PACKET.itemsize:
        raise ValueError(f"msg_len {msg_len}: smaller than the {PACKET.itemsize}-byte packet header")
    p = _copy(PACKET, buf, offset)
    body_len = msg_len - HEADER_SIZE
    base = offset + OFFSET_BASE
    data_off, data_len = int(p["data_offset"]), int(p["data_len"])
    _check_range("data_offset", "data_len", data_off, data_len, PACKET_BODY_SIZE, body_len)
    oob_off, oob_len = int(p["oob_data_offset"]), int(p["oob_data_len"])
    if oob_len:
        _check_range("oob_data_offset", "oob_data_len", oob_off, oob_len, PACKET_BODY_SIZE, body_len)
    ppi_off, ppi_len = int(p["per_pkt_info_offset"]), int(p["per_pkt_info_len"])
    ppis = []
    if ppi_len:
        _check_range("per_pkt_info_offset", "per_pkt_info_len", ppi_off, ppi_len,
                     PACKET_BODY_SIZE, body_len)
        pos, left = base + ppi_off, ppi_len
        while left > 0:
            if left < PPI_HEADER_SIZE:
                raise ValueError(f"per_pkt_info_len {ppi_len}: {left} trailing bytes cannot "
                                 f"hold a {PPI_HEADER_SIZE}-byte PPI header")
            e = _copy(PPI, buf, pos)
            size, ptype, poff = int(e["size"]), int(e["type"]), int(e["ppi_offset"])
            if size < PPI_HEADER_SIZE:
                raise ValueError(f"ppi size {size}: smaller than the {PPI_HEADER_SIZE}-byte header")
            if size > left:
                raise ValueError(f"ppi size {size}: runs past the PPI area ({left} bytes left)")
            if poff < PPI_HEADER_SIZE or poff >= size:
                raise ValueError(f"ppi_offset {poff}: outside the element payload "
                                 f"[{PPI_HEADER_SIZE}, {size})")
            ppis.append(Ppi(ptype, pos + poff, size - poff))
            pos += size
            left -= size
    return Packet(offset, msg_len, base + data_off, data_len,
                  base + oob_off if oob_len else base, oob_len,
                  int(p["num_oob_data_elements"]), int(p["vc_handle"]), tuple(ppis))


# Variable buffers of control messages: (offset field, length field, minimum
# body offset = the body size, so the buffer cannot overlap the fixed fields).
_BUFFERS = {
    MSG_QUERY: ("info_buf_offset", "info_buflen", QUERY.itemsize - HEADER_SIZE),
    MSG_SET: ("info_buf_offset", "info_buflen", SET.itemsize - HEADER_SIZE),
    MSG_QUERY_C: ("info_buf_offset", "info_buflen", QUERY_CMPLT.itemsize - HEADER_SIZE),
    MSG_INDICATE: ("status_buf_offset", "status_buflen", INDICATE_STATUS.itemsize - HEADER_SIZE),
}


def decode_control(buf, offset: int = 0, end: int | None = None) -> Control:
    """Validate a non-data RNDIS message and locate its variable buffer.

    msg_len must cover the message's fixed part. A non-empty info/status buffer
    must start at or after the body's fixed fields and end within msg_len, with
    one exception kept from Linux (e.8): INDICATE_STATUS's status buffer is
    checked against the available bytes (``end``), because pre-"Fe" vSwitches
    left it out of msg_len. An empty buffer's offset is not checked (it points
    at nothing). Unknown types raise ValueError."""
    msg_type, msg_len = read_header(buf, offset, end)
    dt = LAYOUTS.get(msg_type)
    if dt is None or msg_type == MSG_PACKET:
        raise ValueError(f"ndis_msg_type {msg_type:#x}: not a known RNDIS control message")
    if msg_len < dt.itemsize:
        raise ValueError(f"msg_len {msg_len}: smaller than the {dt.itemsize}-byte "
                         f"message type {msg_type:#x}")
    rec = _copy(dt, buf, offset)
    buf_start, buf_len = offset + dt.itemsize, 0
    spec = _BUFFERS.get(msg_type)
    if spec is not None:
        off_f, len_f, lo = spec
        off, length = int(rec[off_f]), int(rec[len_f])
        if length:
            limit = (_span(buf, offset, end) if msg_type == MSG_INDICATE else msg_len) - HEADER_SIZE
            _check_range(off_f, len_f, off, length, lo, limit)
            buf_start, buf_len = offset + OFFSET_BASE + off, length
    return Control(offset, msg_type, msg_len, rec, buf_start, buf_len)


def decode(buf, offset: int = 0, end: int | None = None) -> Packet | Control:
    """One RNDIS message of any known type."""
    msg_type, _ = read_header(buf, offset, end)
    if msg_type == MSG_PACKET:
        return decode_packet(buf, offset, end)
    return decode_control(buf, offset, end)


def decode_batch(buf, offset: int = 0, end: int | None = None,
                 packets_only: bool = False) -> list:
    """Back-to-back RNDIS messages, as a guest batches them into one send section
    (f.3) and OpenVMM walks them by msg_len. All are validated before any is
    returned; the last must end exactly at ``end``. ``packets_only`` requires
    every one to be a PACKET_MSG (OpenVMM's rule for a data SEND_RNDIS_PKT)."""
    end = len(buf) if end is None else end
    _span(buf, offset, end)
    out = []
    while offset < end:
        msg = decode_packet(buf, offset, end) if packets_only else decode(buf, offset, end)
        out.append(msg)
        offset += msg.msg_len
    return out


class RssParameters(NamedTuple):
    fields: np.void
    table: list
    key: bytes


def decode_rss_parameters(info) -> RssParameters:
    """An OID_GEN_RECEIVE_SCALE_PARAMETERS info buffer (g.3) from the guest. The
    header is not validated (OpenVMM: vmswitch does not); the table and key
    ranges must lie within the buffer, past the 40-byte structure, and the table
    size must be a multiple of 4."""
    if len(info) < RSS_PARAMETERS.itemsize:
        raise ValueError(f"info_buflen {len(info)}: shorter than the "
                         f"{RSS_PARAMETERS.itemsize}-byte RSS parameters")
    rec = _copy(RSS_PARAMETERS, info, 0)
    n = len(info)
    t_off, t_size = int(rec["indirect_taboffset"]), int(rec["indirect_tabsize"])
    k_off, k_size = int(rec["hashkey_offset"]), int(rec["hashkey_size"])
    if t_size % 4:
        raise ValueError(f"indirect_tabsize {t_size}: not a multiple of 4")
    lo = RSS_PARAMETERS.itemsize
    table, key = [], b""
    if t_size:
        _check_range("indirect_taboffset", "indirect_tabsize", t_off, t_size, lo, n)
        raw = bytes(memoryview(info)[t_off:t_off + t_size])
        table = [int(x) for x in np.frombuffer(raw, dtype=U32)]
    if k_size:
        _check_range("hashkey_offset", "hashkey_size", k_off, k_size, lo, n)
        key = bytes(memoryview(info)[k_off:k_off + k_size])
    return RssParameters(rec, table, key)

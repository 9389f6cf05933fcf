"""NVSP: the Network VSP protocol carried in VMBus packet payloads (vmbus_netvsp.md d).

Every NVSP message starts with ``msg_type u32`` at offset 0 and its fields follow
at the offsets of vmbus_netvsp.md d.4 (Linux declares every sub-struct packed, so
the offsets are the table's, with no padding). Each message is one ``layout``
covering the type field and its payload; its size is the end of its last field,
which is also the minimum length a receiver accepts ("Receivers should only
check minimum lengths", d.1). Senders pad to a fixed message size: Linux always
sends 40 bytes, OpenVMM answers with 28 before version 6.1 (d.1).

Encoders return ``bytes``; decoders take untrusted bytes (the peer wrote them
into shared memory), copy the fixed part once, compare every length and offset
as Python ints and raise ``ValueError`` naming the offending field.
"""
from __future__ import annotations

import numpy as np

from netvsp.layout import U16, U32, U64, U8, decode, encode, layout, offsets

# --- d.1 Framing and sizes -------------------------------------------------------

NVSP_HEADER_SIZE = 4             # msg_type u32 at offset 0
NVSP_MESSAGE_SIZE = 40           # Linux sizeof(struct nvsp_message): every send is 40 bytes
NVSP_PACKET_SIZE_V1 = 0x1C       # OpenVMM replies for versions < 6.1 (28)
NVSP_PACKET_SIZE_V61 = 0x28      # OpenVMM replies for 6.1 (40)

# Status codes (d.1). SUCCESS is 1 here, unlike RNDIS where success is 0.
STATUS_NONE = 0
STATUS_SUCCESS = 1
STATUS_FAIL = 2
STATUS_PROTOCOL_TOO_NEW = 3
STATUS_PROTOCOL_TOO_OLD = 4
STATUS_INVALID_RNDIS_PKT = 5
STATUS_BUSY = 6
STATUS_PROTOCOL_UNSUPPORTED = 7

# --- d.2 Protocol versions -------------------------------------------------------

VERSION_1 = 0x00000002
VERSION_2 = 0x00030002
VERSION_4 = 0x00040000
VERSION_5 = 0x00050000
VERSION_6 = 0x00060000
VERSION_61 = 0x00060001
VERSION_INVALID = 0xFFFFFFFF

# The order Linux tries them in, highest first (d.5 step 2).
LINUX_VERSIONS = (VERSION_61, VERSION_6, VERSION_5, VERSION_4, VERSION_2, VERSION_1)
# NVSP version numbers as Linux's names say them (NVSP_PROTOCOL_VERSION_*).
VERSION_NAMES = {VERSION_61: "6.1", VERSION_6: "6", VERSION_5: "5", VERSION_4: "4",
                 VERSION_2: "2", VERSION_1: "1"}

# NDIS versions sent in SEND_NDIS_VER (d.5 step 3), as major << 16 | minor.
NDIS_VERSION_6_1 = 0x00060001
NDIS_VERSION_6_30 = 0x0006001E

# --- d.3 Message type numbers ----------------------------------------------------

MSG_NONE = 0
MSG_INIT = 1
MSG_INIT_COMPLETE = 2
MSG_SEND_NDIS_VERSION = 100
MSG_SEND_RECV_BUF = 101
MSG_SEND_RECV_BUF_COMPLETE = 102
MSG_REVOKE_RECV_BUF = 103
MSG_SEND_SEND_BUF = 104
MSG_SEND_SEND_BUF_COMPLETE = 105
MSG_REVOKE_SEND_BUF = 106
MSG_SEND_RNDIS_PKT = 107
MSG_SEND_RNDIS_PKT_COMPLETE = 108
# 109-119: v2 chimney messages; the reference gives them only as a range (unused).
MSG_V2_CHIMNEY_FIRST = 109
MSG_V2_CHIMNEY_LAST = 119
MSG_ALLOC_RXBUF = 120
MSG_ALLOC_RXBUF_COMPLETE = 121
MSG_FREE_RXBUF = 122
MSG_SEND_VMQ_RNDIS_PKT = 123
MSG_SEND_VMQ_RNDIS_PKT_COMPLETE = 124
MSG_SEND_NDIS_CONFIG = 125
MSG_ALLOC_CHIMNEY_HANDLE = 126
MSG_ALLOC_CHIMNEY_HANDLE_COMPLETE = 127
MSG_SEND_VF_ASSOCIATION = 128
MSG_SWITCH_DATA_PATH = 129
MSG_UPLINK_CONNECT_STATE_DEPRECATED = 130
MSG_OID_QUERY_EX = 131
MSG_OID_QUERY_EX_COMPLETE = 132
MSG_SUBCHANNEL = 133             # request and completion share the number
MSG_SEND_INDIRECTION_TABLE = 134
MSG_PD_API = 135
MSG_PD_POST_BATCH = 136

# Lowest version that may carry each message type (d.3, OpenVMM's parse gating).
MIN_VERSION_FOR_TYPE = {MSG_SEND_NDIS_CONFIG: VERSION_2, MSG_SWITCH_DATA_PATH: VERSION_4,
                        MSG_SEND_VF_ASSOCIATION: VERSION_4, MSG_OID_QUERY_EX: VERSION_5,
                        MSG_SUBCHANNEL: VERSION_5, MSG_SEND_INDIRECTION_TABLE: VERSION_5}

# --- d.4 field values --------------------------------------------------------------

# SEND_NDIS_CONFIG capability bits (u64 at offset 12).
CAP_VMQ = 1 << 0
CAP_CHIMNEY = 1 << 1
CAP_SRIOV = 1 << 2
CAP_IEEE8021Q = 1 << 3
CAP_CORRELATION_ID = 1 << 4
CAP_TEAMING = 1 << 5
CAP_VSUBNETID = 1 << 6
CAP_RSC = 1 << 7                 # OpenVMM rsc_over_vmbus

# SEND_RNDIS_PKT
CHANNEL_TYPE_DATA = 0            # RMC_DATA
CHANNEL_TYPE_CONTROL = 1         # RMC_CONTROL
SECTION_INDEX_NONE = 0xFFFFFFFF  # send buffer not used

SUBCHANNEL_OP_NONE = 0
SUBCHANNEL_OP_ALLOCATE = 1

DATAPATH_SYNTHETIC = 0
DATAPATH_VF = 1

PD_API_OP_CONFIG = 1
PD_API_OP_SW_DATAPATH = 2
PD_API_OP_OPEN_PROVIDER = 3
PD_API_OP_CLOSE_PROVIDER = 4
PD_API_OP_CREATE_QUEUE = 5
PD_API_OP_FLUSH_QUEUE = 6
PD_API_OP_FREE_QUEUE = 7
PD_API_OP_ALLOC_COM_BUF = 8
PD_API_OP_FREE_COM_BUF = 9
PD_BATCH_FLAG_GUEST2HOST = 1 << 0
PD_BATCH_FLAG_IS_RECV = 1 << 1
PD_BUF_FLAG_IS_PARTIAL = 1 << 0

# OpenVMM's INIT_COMPLETE.max_mdl_chain_len (d.4).
OPENVMM_MAX_MDL_CHAIN_LEN = 34

# --- f Receive and send buffers, b.5, g, h constants ----------------------------------

RECEIVE_BUFFER_ID = 0xCAFE       # NETVSC_RECEIVE_BUFFER_ID, also the xfer_pageset_id
SEND_BUFFER_ID = 0               # NETVSC_SEND_BUFFER_ID
RECV_SECTION_SIZE = 1728         # NETVSC_RECV_SECTION_SIZE (guest allocation input)
SEND_SECTION_SIZE = 6144         # NETVSC_SEND_SECTION_SIZE; OpenVMM always answers it
DEFAULT_RX = (16 << 20) // RECV_SECTION_SIZE   # NETVSC_DEFAULT_RX = 9709
DEFAULT_TX = (1 << 20) // SEND_SECTION_SIZE    # NETVSC_DEFAULT_TX = 170
MIN_SECTIONS = 10                # ethtool ring minimum for both buffers
RECEIVE_BUFFER_SIZE = 31 << 20   # NETVSC_RECEIVE_BUFFER_SIZE (max)
RECEIVE_BUFFER_SIZE_LEGACY = 15 << 20   # cap when NVSP <= 2
SEND_BUFFER_SIZE = 15 << 20      # NETVSC_SEND_BUFFER_SIZE (max)
ETH_MIN_MTU = 68                 # Linux's floor for sub_alloc_size and section_size
NVSP_RSC_MAX = 562               # Linux: max ranges / RSC fragments per transfer-page packet
MAX_PACKETS_PER_RECEIVE = 375    # OpenVMM RX_BATCH_SIZE
RX_RESERVED_CONTROL_BUFFERS = 16 # OpenVMM sub-allocations kept for RNDIS control
RX_HEADER_LEN = 256              # OpenVMM: RNDIS header space before the frame
RX_SUBALLOC_TAIL = 36            # OpenVMM: unusable tail of each sub-allocation
ETH_HLEN = 14
MTU_DEFAULT = 1514               # frame size fixed by NVSP v1; OpenVMM fallback
MTU_MAX = 9216                   # OpenVMM accepts NDIS_CONFIG.mtu in [1514, 9216]

VRSS_SEND_TAB_SIZE = 16          # send indirection table entries (g.2)
VRSS_CHANNEL_MAX = 64
VRSS_CHANNEL_DEFAULT = 8
# g.2: Linux reads the send table at offset 40 when NVSP <= 6 and the message is
# at least 104 bytes long, whatever the offset field says ("host bug").
SEND_TABLE_QUIRK_OFFSET = 40
SEND_TABLE_QUIRK_MIN_LEN = 104

# h.1: OpenVMM's fixed transaction ids for host-initiated VF messages.
VF_ASSOCIATION_TRANS_ID = 0x8000000000000000
SWITCH_DATA_PATH_TRANS_ID = 0x8000000000000001
# h.1 marks Linux's retry behaviour [unverified]; the constant is kept for the
# guest model and should not be relied on as a protocol fact.
RETRY_MAX = 2000


def sub_allocation_size_for_mtu(mtu: int) -> int:
    """OpenVMM's receive sub-allocation size (f.1): header room + MTU + bad tail."""
    return RX_HEADER_LEN + mtu + RX_SUBALLOC_TAIL


# --- d.4 Payload layouts (offsets from the start of the NVSP message) --------------

HEADER = layout("nvsp_header", 4, [("msg_type", U32, 0)])

INIT = layout("nvsp_init", 12, [
    ("msg_type", U32, 0), ("min_protocol_ver", U32, 4), ("max_protocol_ver", U32, 8)])

INIT_COMPLETE = layout("nvsp_init_complete", 16, [
    ("msg_type", U32, 0), ("negotiated_protocol_ver", U32, 4),
    ("max_mdl_chain_len", U32, 8), ("status", U32, 12)])

SEND_NDIS_VERSION = layout("nvsp_send_ndis_version", 12, [
    ("msg_type", U32, 0), ("ndis_major_ver", U32, 4), ("ndis_minor_ver", U32, 8)])

# capability is a u64 at an unaligned offset: Linux packs the struct.
SEND_NDIS_CONFIG = layout("nvsp_send_ndis_config", 20, [
    ("msg_type", U32, 0), ("mtu", U32, 4), ("reserved", U32, 8), ("capability", U64, 12)])

SEND_RECV_BUF = layout("nvsp_send_recv_buf", 12, [
    ("msg_type", U32, 0), ("gpadl_handle", U32, 4), ("id", U16, 8), ("reserved", U16, 10)])

# One receive-buffer section description; sections[] starts at offset 12 of the
# completion with a 16-byte stride.
RECV_BUF_SECTION = layout("nvsp_recv_buf_section", 16, [
    ("offset", U32, 0), ("sub_alloc_size", U32, 4), ("num_sub_allocs", U32, 8),
    ("end_offset", U32, 12)])
RECV_BUF_SECTIONS_OFFSET = 12

# sections[0] is flattened into the message (its fields at 12/16/20/24) because
# Linux accepts exactly one section; decode_recv_buf_sections reads any count.
SEND_RECV_BUF_COMPLETE = layout("nvsp_send_recv_buf_complete", 28, [
    ("msg_type", U32, 0), ("status", U32, 4), ("num_sections", U32, 8),
    ("section_offset", U32, 12), ("sub_alloc_size", U32, 16),
    ("num_sub_allocs", U32, 20), ("end_offset", U32, 24)])

REVOKE_RECV_BUF = layout("nvsp_revoke_recv_buf", 6, [("msg_type", U32, 0), ("id", U16, 4)])

# The reference lists no reserved field after id here (unlike SEND_RECV_BUF).
SEND_SEND_BUF = layout("nvsp_send_send_buf", 10, [
    ("msg_type", U32, 0), ("gpadl_handle", U32, 4), ("id", U16, 8)])

SEND_SEND_BUF_COMPLETE = layout("nvsp_send_send_buf_complete", 12, [
    ("msg_type", U32, 0), ("status", U32, 4), ("section_size", U32, 8)])

REVOKE_SEND_BUF = layout("nvsp_revoke_send_buf", 6, [("msg_type", U32, 0), ("id", U16, 4)])

SEND_RNDIS_PKT = layout("nvsp_send_rndis_pkt", 16, [
    ("msg_type", U32, 0), ("channel_type", U32, 4),
    ("send_buf_section_index", U32, 8), ("send_buf_section_size", U32, 12)])

# Linux's receive completion is exactly these 8 bytes (d.4).
SEND_RNDIS_PKT_COMPLETE = layout("nvsp_send_rndis_pkt_complete", 8, [
    ("msg_type", U32, 0), ("status", U32, 4)])

# 120-122 are defined in Linux and unused; offsets follow from the packed field
# lists of d.4 (the table gives the fields, not their offsets).
ALLOC_RXBUF = layout("nvsp_alloc_rxbuf", 12, [
    ("msg_type", U32, 0), ("alloc_id", U32, 4), ("len", U32, 8)])
ALLOC_RXBUF_COMPLETE = layout("nvsp_alloc_rxbuf_complete", 24, [
    ("msg_type", U32, 0), ("status", U32, 4), ("alloc_id", U32, 8),
    ("gpadl_handle", U32, 12), ("recv_buf_id", U64, 16)])
FREE_RXBUF = layout("nvsp_free_rxbuf", 12, [("msg_type", U32, 0), ("recv_buf_id", U64, 4)])

SEND_VF_ASSOCIATION = layout("nvsp_send_vf_association", 12, [
    ("msg_type", U32, 0), ("allocated", U32, 4), ("serial", U32, 8)])

SWITCH_DATA_PATH = layout("nvsp_switch_data_path", 8, [
    ("msg_type", U32, 0), ("active_datapath", U32, 4)])

# The NDIS object header {type u8, revision u8, size u16} (e.6) is flattened.
OID_QUERY_EX = layout("nvsp_oid_query_ex", 12, [
    ("msg_type", U32, 0), ("hdr_type", U8, 4), ("hdr_revision", U8, 5),
    ("hdr_size", U16, 6), ("oid", U32, 8)])
OID_QUERY_EX_COMPLETE = layout("nvsp_oid_query_ex_complete", 12, [
    ("msg_type", U32, 0), ("status", U32, 4), ("bytes", U32, 8)])

SUBCHANNEL_REQUEST = layout("nvsp_subchannel_request", 12, [
    ("msg_type", U32, 0), ("op", U32, 4), ("num_subchannels", U32, 8)])
SUBCHANNEL_COMPLETE = layout("nvsp_subchannel_complete", 12, [
    ("msg_type", U32, 0), ("status", U32, 4), ("num_subchannels", U32, 8)])

# Followed by `count` u32 channel indices at `offset` from the message start (g.2).
SEND_INDIRECTION_TABLE = layout("nvsp_send_indirection_table", 12, [
    ("msg_type", U32, 0), ("count", U32, 4), ("offset", U32, 8)])

# PD_API / PD_POST_BATCH (PacketDirect, v6): Linux never uses them and the
# reference gives only the leading fields; the op-specific unions are not declared.
PD_API = layout("nvsp_pd_api", 8, [("msg_type", U32, 0), ("op", U32, 4)])
PD_API_COMPLETE = layout("nvsp_pd_api_complete", 12, [
    ("msg_type", U32, 0), ("op", U32, 4), ("status", U32, 8)])
# "header + count u16 + flags u16 + entries[]": the header is taken to be the
# 4-byte msg_type, so count is at 4, flags at 6 and the entries start at 8.
PD_POST_BATCH = layout("nvsp_pd_post_batch", 8, [
    ("msg_type", U32, 0), ("count", U16, 4), ("flags", U16, 6)])
PD_BUF = layout("nvsp_pd_buf", 8, [
    ("region_offset", U32, 0), ("region_id", U16, 4), ("flags", U16, 6)])

# Layout by message type as received in an in-band packet; SUBCHANNEL's
# completion (same number) arrives in a completion packet, see decode_message.
LAYOUTS = {
    MSG_INIT: INIT, MSG_INIT_COMPLETE: INIT_COMPLETE,
    MSG_SEND_NDIS_VERSION: SEND_NDIS_VERSION, MSG_SEND_NDIS_CONFIG: SEND_NDIS_CONFIG,
    MSG_SEND_RECV_BUF: SEND_RECV_BUF, MSG_SEND_RECV_BUF_COMPLETE: SEND_RECV_BUF_COMPLETE,
    MSG_REVOKE_RECV_BUF: REVOKE_RECV_BUF, MSG_SEND_SEND_BUF: SEND_SEND_BUF,
    MSG_SEND_SEND_BUF_COMPLETE: SEND_SEND_BUF_COMPLETE, MSG_REVOKE_SEND_BUF: REVOKE_SEND_BUF,
    MSG_SEND_RNDIS_PKT: SEND_RNDIS_PKT, MSG_SEND_RNDIS_PKT_COMPLETE: SEND_RNDIS_PKT_COMPLETE,
    MSG_ALLOC_RXBUF: ALLOC_RXBUF, MSG_ALLOC_RXBUF_COMPLETE: ALLOC_RXBUF_COMPLETE,
    MSG_FREE_RXBUF: FREE_RXBUF, MSG_SEND_VF_ASSOCIATION: SEND_VF_ASSOCIATION,
    MSG_SWITCH_DATA_PATH: SWITCH_DATA_PATH, MSG_OID_QUERY_EX: OID_QUERY_EX,
    MSG_OID_QUERY_EX_COMPLETE: OID_QUERY_EX_COMPLETE, MSG_SUBCHANNEL: SUBCHANNEL_REQUEST,
    MSG_SEND_INDIRECTION_TABLE: SEND_INDIRECTION_TABLE, MSG_PD_API: PD_API,
    MSG_PD_POST_BATCH: PD_POST_BATCH,
}

# --- offsets for compiled kernels (data path) --------------------------------------

_RP = offsets(SEND_RNDIS_PKT)
OFF_MSG_TYPE = 0
OFF_RNDIS_PKT_CHANNEL_TYPE = _RP["channel_type"]
OFF_RNDIS_PKT_SECTION_INDEX = _RP["send_buf_section_index"]
OFF_RNDIS_PKT_SECTION_SIZE = _RP["send_buf_section_size"]
OFF_RNDIS_PKT_COMPLETE_STATUS = offsets(SEND_RNDIS_PKT_COMPLETE)["status"]
del _RP


# --- encoders ------------------------------------------------------------------------

def _message(dt: np.dtype, msg_type: int, size: int, **fields) -> bytes:
    """One message padded with zeros to ``size`` (Linux: 40, d.1)."""
    if size < dt.itemsize:
        raise ValueError(f"size {size} is shorter than the {dt.itemsize}-byte message")
    body = encode(dt, msg_type=msg_type, **fields)
    return body + bytes(size - len(body))


def nvsp_init(min_version: int, max_version: int | None = None,
              size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """INIT (d.4); Linux sets min = max = the version it is trying (d.5)."""
    if max_version is None:
        max_version = min_version
    return _message(INIT, MSG_INIT, size, min_protocol_ver=min_version,
                    max_protocol_ver=max_version)


def nvsp_init_complete(status: int, negotiated_version: int = VERSION_INVALID,
                       max_mdl_chain_len: int = OPENVMM_MAX_MDL_CHAIN_LEN,
                       size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """INIT_COMPLETE; OpenVMM puts 0xFFFFFFFF (or 2 for V1) in the deprecated field."""
    return _message(INIT_COMPLETE, MSG_INIT_COMPLETE, size,
                    negotiated_protocol_ver=negotiated_version,
                    max_mdl_chain_len=max_mdl_chain_len, status=status)


def nvsp_ndis_version(major: int, minor: int, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SEND_NDIS_VERSION, MSG_SEND_NDIS_VERSION, size,
                    ndis_major_ver=major, ndis_minor_ver=minor)


def nvsp_ndis_config(mtu: int, capabilities: int, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """SEND_NDIS_CONFIG; ``mtu`` is the field value (Linux: netdev MTU + 14)."""
    return _message(SEND_NDIS_CONFIG, MSG_SEND_NDIS_CONFIG, size, mtu=mtu,
                    capability=capabilities)


def nvsp_send_receive_buffer(gpadl_handle: int, id: int = RECEIVE_BUFFER_ID,
                             size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SEND_RECV_BUF, MSG_SEND_RECV_BUF, size, gpadl_handle=gpadl_handle, id=id)


def nvsp_send_receive_buffer_complete(status: int, sections=(),
                                      size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """SEND_RECV_BUF_COMPLETE with ``sections`` = [(offset, sub_alloc_size,
    num_sub_allocs, end_offset), ...] at offset 12, 16 bytes each."""
    sections = list(sections)
    head = encode(SEND_RECV_BUF_COMPLETE, msg_type=MSG_SEND_RECV_BUF_COMPLETE,
                  status=status, num_sections=len(sections))[:RECV_BUF_SECTIONS_OFFSET]
    tail = b"".join(encode(RECV_BUF_SECTION, offset=o, sub_alloc_size=s, num_sub_allocs=n,
                           end_offset=e) for o, s, n, e in sections)
    msg = head + tail
    return msg + bytes(max(0, size - len(msg)))


def nvsp_revoke_receive_buffer(id: int = RECEIVE_BUFFER_ID,
                               size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(REVOKE_RECV_BUF, MSG_REVOKE_RECV_BUF, size, id=id)


def nvsp_send_send_buffer(gpadl_handle: int, id: int = SEND_BUFFER_ID,
                          size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SEND_SEND_BUF, MSG_SEND_SEND_BUF, size, gpadl_handle=gpadl_handle, id=id)


def nvsp_send_send_buffer_complete(status: int, section_size: int = SEND_SECTION_SIZE,
                                   size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SEND_SEND_BUF_COMPLETE, MSG_SEND_SEND_BUF_COMPLETE, size,
                    status=status, section_size=section_size)


def nvsp_revoke_send_buffer(id: int = SEND_BUFFER_ID, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(REVOKE_SEND_BUF, MSG_REVOKE_SEND_BUF, size, id=id)


def nvsp_send_rndis_packet(channel_type: int, section_index: int = SECTION_INDEX_NONE,
                           section_size: int = 0, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    """SEND_RNDIS_PKT; without a send-buffer section, index 0xFFFFFFFF and size 0."""
    return _message(SEND_RNDIS_PKT, MSG_SEND_RNDIS_PKT, size, channel_type=channel_type,
                    send_buf_section_index=section_index, send_buf_section_size=section_size)


def nvsp_send_rndis_packet_complete(status: int = STATUS_SUCCESS, size: int | None = None) -> bytes:
    """SEND_RNDIS_PKT_COMPLETE; Linux's is exactly 8 bytes, hence the default."""
    return _message(SEND_RNDIS_PKT_COMPLETE, MSG_SEND_RNDIS_PKT_COMPLETE,
                    SEND_RNDIS_PKT_COMPLETE.itemsize if size is None else size, status=status)


def nvsp_subchannel_request(num_subchannels: int, op: int = SUBCHANNEL_OP_ALLOCATE,
                            size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SUBCHANNEL_REQUEST, MSG_SUBCHANNEL, size, op=op,
                    num_subchannels=num_subchannels)


def nvsp_subchannel_complete(status: int, num_subchannels: int,
                             size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SUBCHANNEL_COMPLETE, MSG_SUBCHANNEL, size, status=status,
                    num_subchannels=num_subchannels)


def nvsp_send_indirection_table(entries, offset: int = SEND_INDIRECTION_TABLE.itemsize) -> bytes:
    """SEND_INDIRECTION_TABLE as OpenVMM sends it (g.2): the table right after the
    12-byte header, so 16 entries make a 76-byte message (which Linux accepts
    because 76 < 104, below its offset quirk)."""
    entries = [int(e) for e in entries]
    if offset < SEND_INDIRECTION_TABLE.itemsize:
        raise ValueError(f"offset {offset} overlaps the 12-byte header")
    head = encode(SEND_INDIRECTION_TABLE, msg_type=MSG_SEND_INDIRECTION_TABLE,
                  count=len(entries), offset=offset)
    pad = bytes(offset - len(head))
    return head + pad + np.asarray(entries, dtype=U32).tobytes()


def nvsp_vf_association(allocated: bool, serial: int, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SEND_VF_ASSOCIATION, MSG_SEND_VF_ASSOCIATION, size,
                    allocated=int(bool(allocated)), serial=serial)


def nvsp_switch_data_path(datapath: int, size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(SWITCH_DATA_PATH, MSG_SWITCH_DATA_PATH, size, active_datapath=datapath)


def nvsp_oid_query_ex_complete(status: int, nbytes: int = 0,
                               size: int = NVSP_MESSAGE_SIZE) -> bytes:
    return _message(OID_QUERY_EX_COMPLETE, MSG_OID_QUERY_EX_COMPLETE, size,
                    status=status, bytes=nbytes)


# --- Linux's choices in the init handshake (d.5) ----------------------------------------

def linux_ndis_config_capabilities(version: int) -> int:
    """The capability bits Linux sends with SEND_NDIS_CONFIG at this NVSP version."""
    caps = CAP_IEEE8021Q
    if version >= VERSION_5:
        caps |= CAP_SRIOV | CAP_TEAMING   # teaming: needed for link-speed updates
    if version >= VERSION_61:
        caps |= CAP_RSC
    return caps


def linux_ndis_version(version: int) -> tuple[int, int]:
    """(major, minor) Linux announces: NDIS 6.1 up to NVSP 4, 6.30 from NVSP 5."""
    ndis = NDIS_VERSION_6_1 if version <= VERSION_4 else NDIS_VERSION_6_30
    return ndis >> 16, ndis & 0xFFFF


# --- decoders (untrusted input) ---------------------------------------------------------

def _fixed(dt: np.dtype, buf, what: str) -> np.void:
    """The fixed part of a message, copied out of ``buf`` first so a peer that
    rewrites shared memory cannot change a field between check and use."""
    if len(buf) < dt.itemsize:
        raise ValueError(f"{what}: message length {len(buf)} is shorter than "
                         f"the {dt.itemsize}-byte structure")
    return decode(dt, bytes(memoryview(buf)[:dt.itemsize]))


def message_type(buf) -> int:
    """msg_type of an NVSP message (needs the 4-byte header)."""
    return int(_fixed(HEADER, buf, "msg_type")["msg_type"])


def decode_message(buf, completion: bool = False) -> tuple[int, np.void]:
    """(msg_type, fields) of one NVSP message. ``completion`` says the bytes came
    in a completion packet, which selects SUBCHANNEL's completion layout.
    Unknown types and messages shorter than their layout raise ValueError."""
    msg_type = message_type(buf)
    dt = SUBCHANNEL_COMPLETE if (completion and msg_type == MSG_SUBCHANNEL) else LAYOUTS.get(msg_type)
    if dt is None:
        raise ValueError(f"msg_type {msg_type}: unknown NVSP message type")
    return msg_type, _fixed(dt, buf, f"msg_type {msg_type}")


def decode_recv_buf_sections(buf) -> list[tuple[int, int, int, int]]:
    """All sections of a SEND_RECV_BUF_COMPLETE as (offset, sub_alloc_size,
    num_sub_allocs, end_offset); num_sections must fit in the message."""
    rec = _fixed(SEND_RECV_BUF_COMPLETE, buf, "SEND_RECV_BUF_COMPLETE")
    if int(rec["msg_type"]) != MSG_SEND_RECV_BUF_COMPLETE:
        raise ValueError(f"msg_type {int(rec['msg_type'])}: not SEND_RECV_BUF_COMPLETE")
    n = int(rec["num_sections"])
    end = RECV_BUF_SECTIONS_OFFSET + n * RECV_BUF_SECTION.itemsize
    if end > len(buf):
        raise ValueError(f"num_sections {n}: {n} sections end at {end}, past the "
                         f"{len(buf)}-byte message")
    raw = bytes(memoryview(buf)[RECV_BUF_SECTIONS_OFFSET:end])
    arr = np.frombuffer(raw, dtype=RECV_BUF_SECTION, count=n)
    return [(int(s["offset"]), int(s["sub_alloc_size"]), int(s["num_sub_allocs"]),
             int(s["end_offset"])) for s in arr]


def decode_indirection_table(buf, version: int | None = None,
                             expected_count: int | None = VRSS_SEND_TAB_SIZE) -> list[int]:
    """Entries of a SEND_INDIRECTION_TABLE (g.2). ``buf`` is the whole VMBus
    payload. With ``version`` given, Linux's quirk applies: for NVSP <= 6 and a
    payload of >= 104 bytes the table is read at 40 whatever ``offset`` says.
    Linux requires count == 16; pass expected_count=None to accept any."""
    rec = _fixed(SEND_INDIRECTION_TABLE, buf, "SEND_INDIRECTION_TABLE")
    if int(rec["msg_type"]) != MSG_SEND_INDIRECTION_TABLE:
        raise ValueError(f"msg_type {int(rec['msg_type'])}: not SEND_INDIRECTION_TABLE")
    count, offset = int(rec["count"]), int(rec["offset"])
    if expected_count is not None and count != expected_count:
        raise ValueError(f"count {count}: the send table has {expected_count} entries")
    if version is not None and version <= VERSION_6 and len(buf) >= SEND_TABLE_QUIRK_MIN_LEN:
        offset = SEND_TABLE_QUIRK_OFFSET
    # The table may not overlap the header it is described by.
    if offset < SEND_INDIRECTION_TABLE.itemsize:
        raise ValueError(f"offset {offset}: the table overlaps the 12-byte header")
    if offset > len(buf):
        raise ValueError(f"offset {offset}: past the {len(buf)}-byte message")
    if count * 4 > len(buf) - offset:
        raise ValueError(f"count {count}: {count} entries at offset {offset} run past "
                         f"the {len(buf)}-byte message")
    raw = bytes(memoryview(buf)[offset:offset + 4 * count])
    return [int(x) for x in np.frombuffer(raw, dtype=U32, count=count)]

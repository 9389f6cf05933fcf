"""VMBus control-plane messages (vmbus_netvsp.md c.1-c.9), declared once.

Each message starts with ``{msgtype u32, padding u32}`` and is at most 240 bytes
(one SynIC message payload, c.1). Layouts and sizes are those of the c.2 table
and, for OFFERCHANNEL, c.3. GPADL_HEADER and GPADL_BODY end in variable arrays:
the fixed part is declared and the rest handled by ``gpadl_header``/``gpadl_body``.
"""
from __future__ import annotations

import uuid

import numpy as np

from ..layout import U8, U16, U32, U64, array, decode, encode, layout

MAX_MESSAGE = 240

# c.2 message types
OFFERCHANNEL = 1
RESCIND_CHANNELOFFER = 2
REQUESTOFFERS = 3
ALLOFFERS_DELIVERED = 4
OPENCHANNEL = 5
OPENCHANNEL_RESULT = 6
CLOSECHANNEL = 7
GPADL_HEADER = 8
GPADL_BODY = 9
GPADL_CREATED = 10
GPADL_TEARDOWN = 11
GPADL_TORNDOWN = 12
RELID_RELEASED = 13
INITIATE_CONTACT = 14
VERSION_RESPONSE = 15
UNLOAD = 16
UNLOAD_RESPONSE = 17
MODIFYCHANNEL = 22
MODIFYCHANNEL_RESPONSE = 24

# c.4 protocol versions, (major << 16) | minor, newest first as Linux proposes them.
V_WS2008 = 0x0000000D
V_WIN7 = 0x00010001
V_WIN8 = 0x00020004
V_WIN8_1 = 0x00030000
V_WIN10 = 0x00040000
V_WIN10_V4_1 = 0x00040001
V_WIN10_V5 = 0x00050000
V_WIN10_V5_1 = 0x00050001
V_WIN10_V5_2 = 0x00050002
V_WIN10_V5_3 = 0x00050003
V_WIN10_V6_0 = 0x00060000
LINUX_VERSIONS = (V_WIN10_V6_0, V_WIN10_V5_3, V_WIN10_V5_2, V_WIN10_V5_1, V_WIN10_V5,
                  V_WIN10_V4_1, V_WIN10, V_WIN8_1, V_WIN8)

# c.1 message connection ids
CONNECTION_ID = 1
CONNECTION_ID_4 = 4

# c.3 channel offer flags and the network device class
CHN_ENUMERATE_DEVICE_INTERFACE = 0x1
CHN_SERVER_SUPPORTS_TRANSFER_PAGES = 0x2
CHN_SERVER_SUPPORTS_GPADLS = 0x4
CHN_NAMED_PIPE_MODE = 0x10
CHN_REQUEST_MONITORED_NOTIFICATION = 0x400
NETVSC_GUID = uuid.UUID("f8615163-df3e-46c5-913f-f2d2f965ed0e")

# c.6 GPADL: how many PFNs fit in the header and in each body message
GPADL_HEADER_PFNS = (MAX_MESSAGE - 20 - 8) // 8      # 26
GPADL_BODY_PFNS = (MAX_MESSAGE - 16) // 8            # 28
GPADL_FAILURE = 0x8000FFFF                            # OpenVMM's failure status

HEADER = [("msgtype", U32, 0), ("padding", U32, 4)]

OFFER_CHANNEL = layout("vmbus_channel_offer_channel", 196, HEADER + [
    ("if_type", array(U8, 16), 8), ("if_instance", array(U8, 16), 24),
    ("reserved1", U64, 40), ("reserved2", U64, 48), ("chn_flags", U16, 56),
    ("mmio_megabytes", U16, 58), ("user_def", array(U8, 120), 60),
    ("sub_channel_index", U16, 180), ("reserved3", U16, 182), ("child_relid", U32, 184),
    ("monitorid", U8, 188), ("monitor_allocated", U8, 189),
    ("is_dedicated_interrupt", U16, 190), ("connection_id", U32, 192)])
RESCIND_OFFER = layout("vmbus_channel_rescind_offer", 12, HEADER + [("child_relid", U32, 8)])
MESSAGE_HEADER = layout("vmbus_channel_message_header", 8, HEADER)
OPEN_CHANNEL = layout("vmbus_channel_open_channel", 148, HEADER + [
    ("child_relid", U32, 8), ("openid", U32, 12), ("ringbuffer_gpadlhandle", U32, 16),
    ("target_vp", U32, 20), ("downstream_ringbuffer_pageoffset", U32, 24),
    ("userdata", array(U8, 120), 28)])
OPEN_RESULT = layout("vmbus_channel_open_result", 20, HEADER + [
    ("child_relid", U32, 8), ("openid", U32, 12), ("status", U32, 16)])
CLOSE_CHANNEL = layout("vmbus_channel_close_channel", 12, HEADER + [("child_relid", U32, 8)])
GPADL_HEADER_FIXED = layout("vmbus_channel_gpadl_header", 20, HEADER + [
    ("child_relid", U32, 8), ("gpadl", U32, 12), ("range_buflen", U16, 16),
    ("rangecount", U16, 18)])
GPADL_BODY_FIXED = layout("vmbus_channel_gpadl_body", 16, HEADER + [
    ("msgnumber", U32, 8), ("gpadl", U32, 12)])
GPADL_RANGE_HEADER = layout("gpa_range", 8, [("byte_count", U32, 0), ("byte_offset", U32, 4)])
GPADL_CREATED_MSG = layout("vmbus_channel_gpadl_created", 20, HEADER + [
    ("child_relid", U32, 8), ("gpadl", U32, 12), ("creation_status", U32, 16)])
GPADL_TEARDOWN_MSG = layout("vmbus_channel_gpadl_teardown", 16, HEADER + [
    ("child_relid", U32, 8), ("gpadl", U32, 12)])
GPADL_TORNDOWN_MSG = layout("vmbus_channel_gpadl_torndown", 12, HEADER + [("gpadl", U32, 8)])
RELID_RELEASED_MSG = layout("vmbus_channel_relid_released", 12, HEADER + [
    ("child_relid", U32, 8)])
INITIATE_CONTACT_MSG = layout("vmbus_channel_initiate_contact", 40, HEADER + [
    ("vmbus_version_requested", U32, 8), ("target_vcpu", U32, 12),
    ("interrupt_page", U64, 16), ("monitor_page1", U64, 24), ("monitor_page2", U64, 32)])
VERSION_RESPONSE_MSG = layout("vmbus_channel_version_response", 16, HEADER + [
    ("version_supported", U8, 8), ("connection_state", U8, 9), ("padding2", U16, 10),
    ("msg_conn_id", U32, 12)])

BY_TYPE = {OFFERCHANNEL: OFFER_CHANNEL, RESCIND_CHANNELOFFER: RESCIND_OFFER,
           REQUESTOFFERS: MESSAGE_HEADER, ALLOFFERS_DELIVERED: MESSAGE_HEADER,
           OPENCHANNEL: OPEN_CHANNEL, OPENCHANNEL_RESULT: OPEN_RESULT,
           CLOSECHANNEL: CLOSE_CHANNEL, GPADL_HEADER: GPADL_HEADER_FIXED,
           GPADL_BODY: GPADL_BODY_FIXED, GPADL_CREATED: GPADL_CREATED_MSG,
           GPADL_TEARDOWN: GPADL_TEARDOWN_MSG, GPADL_TORNDOWN: GPADL_TORNDOWN_MSG,
           RELID_RELEASED: RELID_RELEASED_MSG, INITIATE_CONTACT: INITIATE_CONTACT_MSG,
           VERSION_RESPONSE: VERSION_RESPONSE_MSG, UNLOAD: MESSAGE_HEADER,
           UNLOAD_RESPONSE: MESSAGE_HEADER}


class ChannelMessageError(ValueError):
    """A control message that does not parse: the text says what is wrong."""


def guid_bytes(g: uuid.UUID) -> np.ndarray:
    """guid_t's mixed-endian wire form (c.3): data1-3 little endian, data4 as is."""
    return np.frombuffer(g.bytes_le, dtype=np.uint8)


def message(msgtype: int, **fields) -> bytes:
    return encode(BY_TYPE[msgtype], msgtype=msgtype, **fields)


def parse(data: bytes):
    """(msgtype, fields) of a message the other side sent; its length is checked
    against the layout of its type (longer is allowed: newer protocol versions
    append fields, c.4 and c.7)."""
    if len(data) < 8:
        raise ChannelMessageError(f"{len(data)}-byte message: shorter than its header")
    if len(data) > MAX_MESSAGE:
        raise ChannelMessageError(f"{len(data)}-byte message: over {MAX_MESSAGE}")
    msgtype = int.from_bytes(data[:4], "little")
    dt = BY_TYPE.get(msgtype)
    if dt is None:
        raise ChannelMessageError(f"unknown message type {msgtype}")
    if len(data) < dt.itemsize:
        raise ChannelMessageError(f"message type {msgtype}: {len(data)} bytes, its layout "
                                  f"needs {dt.itemsize}")
    return msgtype, decode(dt, data)


def gpadl_messages(child_relid: int, gpadl: int, pfns: list[int], byte_count: int,
                   byte_offset: int = 0) -> list[bytes]:
    """The GPADL_HEADER and GPADL_BODY messages a guest sends for one range (c.6)."""
    head = encode(GPADL_HEADER_FIXED, msgtype=GPADL_HEADER, child_relid=child_relid,
                  gpadl=gpadl, range_buflen=8 + 8 * len(pfns), rangecount=1)
    first = pfns[:GPADL_HEADER_PFNS]
    out = [head + encode(GPADL_RANGE_HEADER, byte_count=byte_count, byte_offset=byte_offset)
           + np.array(first, dtype="<u8").tobytes()]
    rest = pfns[GPADL_HEADER_PFNS:]
    for k in range(0, len(rest), GPADL_BODY_PFNS):
        out.append(encode(GPADL_BODY_FIXED, msgtype=GPADL_BODY, msgnumber=k // GPADL_BODY_PFNS,
                          gpadl=gpadl)
                   + np.array(rest[k:k + GPADL_BODY_PFNS], dtype="<u8").tobytes())
    return out

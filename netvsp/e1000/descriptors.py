"""The 82540EM's 16-byte descriptors, declared once (e1000_vfio.md A.7).

Kernels address fields through the offsets exported here; the tests compare
every dtype with the reference's layout.
"""
from __future__ import annotations

from ..layout import U8, U16, U32, U64, layout, offsets

SIZE = 16

RX_DESC = layout("e1000_rx_desc", SIZE, [
    ("buffer_addr", U64, 0), ("length", U16, 8), ("csum", U16, 10), ("status", U8, 12),
    ("errors", U8, 13), ("special", U16, 14)])
TX_DESC = layout("e1000_tx_desc", SIZE, [
    ("buffer_addr", U64, 0), ("length", U16, 8), ("cso", U8, 10), ("cmd", U8, 11),
    ("sta", U8, 12), ("css", U8, 13), ("special", U16, 14)])
CONTEXT_DESC = layout("e1000_context_desc", SIZE, [
    ("ipcss", U8, 0), ("ipcso", U8, 1), ("ipcse", U16, 2), ("tucss", U8, 4),
    ("tucso", U8, 5), ("tucse", U16, 6), ("cmd_and_length", U32, 8), ("status", U8, 12),
    ("hdr_len", U8, 13), ("mss", U16, 14)])
DATA_DESC = layout("e1000_data_desc", SIZE, [
    ("buffer_addr", U64, 0), ("lower", U32, 8), ("status", U8, 12), ("popts", U8, 13),
    ("special", U16, 14)])

RX = offsets(RX_DESC)
TX = offsets(TX_DESC)
CTX = offsets(CONTEXT_DESC)
DATA = offsets(DATA_DESC)

# RX status and errors
RXD_STAT_DD, RXD_STAT_EOP, RXD_STAT_IXSM, RXD_STAT_VP = 0x01, 0x02, 0x04, 0x08
RXD_STAT_UDPCS, RXD_STAT_TCPCS, RXD_STAT_IPCS = 0x10, 0x20, 0x40
RXD_ERR_TCPE, RXD_ERR_IPE, RXD_ERR_RXE = 0x20, 0x40, 0x80
# TX: the command bits as the descriptor's dword 2 carries them (bits 31:24)
TXD_CMD_EOP, TXD_CMD_IFCS, TXD_CMD_IC, TXD_CMD_RS = 0x01000000, 0x02000000, 0x04000000, 0x08000000
TXD_CMD_RPS, TXD_CMD_DEXT, TXD_CMD_VLE, TXD_CMD_IDE = (
    0x10000000, 0x20000000, 0x40000000, 0x80000000)
TXD_CMD_TSE = 0x04000000            # in an extended descriptor, bit 26 is TSE (not IC)
TXD_DTYP_D = 0x00100000             # data descriptor type (context: 0)
TXD_CMD_TCP, TXD_CMD_IP = 0x01000000, 0x02000000     # a context descriptor's TUCMD
TXD_LEN_MASK = 0xFFFFF
TXD_POPTS_IXSM, TXD_POPTS_TXSM = 0x01, 0x02
TXD_STAT_DD = 0x01

"""The 82540EM's EEPROM: 64 words, read by Microwire bit-banging through EECD (as
Linux's e1000 does on this part) or through EERD.

Reference: e1000_vfio.md A.5 (contents, 0xBABA checksum, how Linux reads it) and
A.4 (EECD and EERD side effects). The word layout is QEMU's template (Intel's
8254x manual, tables 5-2 and 5-3): MAC in words 0-2, low byte first; device ID in
words 0x0B and 0x0D, vendor in 0x0C and 0x0E; word 0x3F makes the sum 0xBABA.
"""
from __future__ import annotations

from . import regs as E

WORDS = 64
CHECKSUM_WORD = 0x3F
SUM = 0xBABA
READ_OPCODE = 0b110                 # Microwire READ: start bit 1, opcode 10
ID_LED_SETTINGS, INIT_CONTROL2 = 0x04, 0x0F

_TEMPLATE = (
    0x0000, 0x0000, 0x0000, 0x0000, 0xFFFF, 0x0000, 0x0000, 0x0000,
    0x3000, 0x1000, 0x6403, E.DEVICE_ID, 0x8086, E.DEVICE_ID, 0x8086, 0x3040,
    0x0008, 0x2000, 0x7E14, 0x0048, 0x1000, 0x00D8, 0x0000, 0x2700,
    0x6CC9, 0x3150, 0x0722, 0x040B, 0x0984, 0x0000, 0xC000, 0x0706,
    0x1008, 0x0000, 0x0F04, 0x7FFF, 0x4D01, 0xFFFF, 0xFFFF, 0xFFFF,
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
    0x0100, 0x4000, 0x121C, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF,
    0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0xFFFF, 0x0000,
)


def image(mac: bytes) -> list[int]:
    """The EEPROM of a NIC with this MAC, its checksum word set."""
    if len(mac) != 6:
        raise ValueError(f"a MAC is 6 bytes, not {len(mac)}")
    w = list(_TEMPLATE)
    for k in range(3):
        w[k] = mac[2 * k] | (mac[2 * k + 1] << 8)
    w[CHECKSUM_WORD] = (SUM - sum(w[:CHECKSUM_WORD])) & 0xFFFF
    return w


def checksum_ok(words: list[int]) -> bool:
    return sum(words[:WORDS]) & 0xFFFF == SUM


class Microwire:
    """EECD's serial interface (A.4): chip select, clock, data in and out.

    A rising CS resets the state; data is clocked in on SK's rising edge; after
    9 bits (start, 2-bit opcode, 6-bit address) a READ shifts the words out
    MSB first on DO, one bit per falling edge of SK, running on into the next
    words. While nothing is being read DO reads 1. Reads always show PRES|GNT."""

    KEPT = E.EECD_SK | E.EECD_CS | E.EECD_DI | 0x30 | E.EECD_REQ     # 0x30: FWE

    def __init__(self, words: list[int]):
        self.words = words
        self.eecd = 0               # the bits the guest last wrote that EECD keeps
        self.val_in = 0
        self.bits_in = 0
        self.bit_out = 0
        self.reading = False

    def write(self, value: int) -> None:
        old = self.eecd
        self.eecd = value & self.KEPT
        if not value & E.EECD_CS:
            return                  # deselected: nothing moves
        if (value ^ old) & E.EECD_CS:
            self.val_in = self.bits_in = self.bit_out = 0
            self.reading = False
        if not (value ^ old) & E.EECD_SK:
            return                  # no clock edge
        if not value & E.EECD_SK:
            self.bit_out += 1       # falling edge: the next bit out
            return
        self.val_in = ((self.val_in << 1) | (1 if value & E.EECD_DI else 0)) & 0xFFFF
        self.bits_in += 1
        if self.bits_in == 9 and not self.reading:
            self.bit_out = ((self.val_in & 0x3F) << 4) - 1
            self.reading = (self.val_in >> 6) & 7 == READ_OPCODE

    def read(self) -> int:
        v = E.EECD_PRES | E.EECD_GNT | self.eecd
        if not self.reading:
            return v | E.EECD_DO
        word = self.words[(self.bit_out >> 4) & 0x3F]
        if (word >> ((self.bit_out & 0xF) ^ 0xF)) & 1:
            v |= E.EECD_DO
        return v


def eerd_read(words: list[int], value: int) -> int:
    """EERD as read back after the guest wrote ``value`` (A.4, as QEMU): without
    START, what was written; with it, START cleared, DONE set and the word at the
    address in bits 31:16 (no data for an address past word 0x3F)."""
    if not value & E.EERD_START:
        return value
    r = value & ~E.EERD_START
    addr = r >> E.EERD_ADDR_SHIFT
    if addr > CHECKSUM_WORD:
        return E.EERD_DONE | r
    return (words[addr] << E.EERD_DATA_SHIFT) | E.EERD_DONE | r

"""A PCI function's type-0 configuration space, as the hypervisor presents it.

256 bytes: identity (vendor, device, revision, class), the command register
(I/O and memory decode, Bus Master: a device may DMA only with it set), BARs
that answer the all-ones sizing write with their size mask, and the interrupt
pin. Used by the emulated e1000 (e1000_vfio.md A.1) and later the SR-IOV
functions. Accesses are checked: a config cycle outside the 256 bytes or not
naturally aligned reads all-ones and writes nothing, as on a real bus.
"""
from __future__ import annotations

import numpy as np

VENDOR, DEVICE, COMMAND, STATUS, REVISION, CLASS = 0x00, 0x02, 0x04, 0x06, 0x08, 0x09
CACHE_LINE, HEADER_TYPE, BAR0, SUBSYS_VENDOR, SUBSYS_ID = 0x0C, 0x0E, 0x10, 0x2C, 0x2E
INTERRUPT_LINE, INTERRUPT_PIN = 0x3C, 0x3D
CMD_IO, CMD_MEMORY, CMD_BUS_MASTER, CMD_INTX_DISABLE = 0x1, 0x2, 0x4, 0x400
BAR_IO = 0x1
SIZE = 256


class ConfigSpace:
    def __init__(self, vendor: int, device: int, revision: int, class_code: int,
                 bars: list[tuple[int, bool]], subsystem: tuple[int, int] = (0, 0),
                 cache_line: int = 0, pin: int = 1):
        """``bars``: (size, is_io) per BAR from BAR0; sizes are powers of two."""
        self.b = np.zeros(SIZE, dtype=np.uint8)
        self._put(VENDOR, vendor, 2)
        self._put(DEVICE, device, 2)
        self._put(REVISION, revision | (class_code << 8), 4)
        self.b[CACHE_LINE] = cache_line
        self._put(SUBSYS_VENDOR, subsystem[0], 2)
        self._put(SUBSYS_ID, subsystem[1], 2)
        self.b[INTERRUPT_PIN] = pin
        self.bars = []
        for size, io in bars:
            if size & (size - 1) or size < (4 if io else 16):
                raise ValueError(f"BAR size {size:#x} is not a power of two of the minimum")
            self.bars.append((size, io))
        for k, (_, io) in enumerate(self.bars):
            self._put(BAR0 + 4 * k, BAR_IO if io else 0, 4)
        self.writes_refused = 0

    def _put(self, off: int, v: int, n: int) -> None:
        for k in range(n):
            self.b[off + k] = (v >> (8 * k)) & 0xFF

    def _get(self, off: int, n: int) -> int:
        return sum(int(self.b[off + k]) << (8 * k) for k in range(n))

    @staticmethod
    def _ok(off: int, n: int) -> bool:
        return n in (1, 2, 4) and 0 <= off and off + n <= SIZE and off % n == 0

    def read(self, off: int, n: int = 4) -> int:
        if not self._ok(off, n):
            return (1 << (8 * n)) - 1 if n in (1, 2, 4) else 0xFFFFFFFF
        return self._get(off, n)

    def write(self, off: int, value: int, n: int = 4) -> None:
        if not self._ok(off, n):
            self.writes_refused += 1
            return
        for k in range(n):
            self._write_byte(off + k, (value >> (8 * k)) & 0xFF)

    def _write_byte(self, at: int, v: int) -> None:
        if at in (COMMAND, COMMAND + 1):
            self.b[at] = v & (0x07 if at == COMMAND else 0x04)  # IO, MEM, BM; INTx disable
        elif at in (STATUS, STATUS + 1):
            pass                                   # RW1C error bits: none are ever set
        elif BAR0 <= at < BAR0 + 4 * len(self.bars):
            k = (at - BAR0) // 4
            size, io = self.bars[k]
            byte = (at - BAR0) % 4
            mask = (~(size - 1)) & 0xFFFFFFFF      # the address bits the BAR decodes
            keep = (BAR_IO if io else 0) >> (8 * byte) & 0xFF
            self.b[at] = (v & (mask >> (8 * byte)) & 0xFF) | keep
        elif at in (CACHE_LINE, INTERRUPT_LINE):
            self.b[at] = v
        # everything else is read-only

    # what the device model asks
    def bar(self, k: int) -> int:
        size, io = self.bars[k]
        return self._get(BAR0 + 4 * k, 4) & ~(3 if io else 0xF)

    @property
    def command(self) -> int:
        return self._get(COMMAND, 2)

    def bus_master(self) -> bool:
        return bool(self.command & CMD_BUS_MASTER)

"""I/O-port bus, MMIO map and interrupt lines: the only interface between devices and the machine.

A port device implements ``io_read(port, size) -> int`` and ``io_write(port, size, value)``.
By default the bus hands devices byte accesses only: a 16/32-bit access to a byte-wide
device is split into byte cycles on consecutive ports (low byte first), as the ISA bus does.
A device that decodes wider accesses itself lists the sizes in ``io_sizes`` (e.g. ``(1, 2, 4)``).

Interrupts: a device gets an ``IRQLine`` (or anything with ``raise_()``/``lower()``/
``set_level(b)``) and drives it as its output pin; the interrupt controller behind it
implements ``raise_irq(n)`` / ``lower_irq(n)``.
"""
import bisect

SIZE_MASKS = {1: 0xFF, 2: 0xFFFF, 4: 0xFFFFFFFF}     # an access's size in bytes -> its value mask


class IOBus:
    """64 KiB x86 I/O space. Unclaimed ports read as all-ones; writes to them are dropped."""

    def __init__(self):
        self._ports = [None] * 0x10000
        self.unclaimed_reads = 0
        self.unclaimed_writes = 0

    def register(self, port_first, port_last, device):
        if not (0 <= port_first <= port_last <= 0xFFFF):
            raise ValueError(f"bad port range {port_first:#x}-{port_last:#x}")
        for p in range(port_first, port_last + 1):
            if self._ports[p] is not None:
                raise ValueError(f"port {p:#x} already claimed by {self._ports[p]!r}")
        for p in range(port_first, port_last + 1):
            self._ports[p] = device

    def unregister(self, port_first, port_last):
        for p in range(port_first, port_last + 1):
            self._ports[p] = None

    def device_at(self, port):
        return self._ports[port & 0xFFFF]

    def read(self, port, size=1):
        port &= 0xFFFF
        mask = SIZE_MASKS[size]
        dev = self._ports[port]
        if dev is not None and (size == 1 or size in getattr(dev, "io_sizes", (1,))):
            return dev.io_read(port, size) & mask
        if size == 1:
            self.unclaimed_reads += 1
            return 0xFF
        value = 0
        for i in range(size):
            value |= self.read((port + i) & 0xFFFF, 1) << (8 * i)
        return value

    def write(self, port, size, value):
        port &= 0xFFFF
        value &= SIZE_MASKS[size]
        dev = self._ports[port]
        if dev is not None and (size == 1 or size in getattr(dev, "io_sizes", (1,))):
            dev.io_write(port, size, value)
            return
        if size == 1:
            self.unclaimed_writes += 1
            return
        for i in range(size):
            self.write((port + i) & 0xFFFF, 1, (value >> (8 * i)) & 0xFF)

    # convenience for drivers written in Python (tests, firmware shims)
    def inb(self, port): return self.read(port, 1)
    def inw(self, port): return self.read(port, 2)
    def inl(self, port): return self.read(port, 4)
    def outb(self, port, value): self.write(port, 1, value)
    def outw(self, port, value): self.write(port, 2, value)
    def outl(self, port, value): self.write(port, 4, value)


class MMIOMap:
    """Physical-address ranges claimed by devices. Devices implement
    ``mmio_read(offset, size)`` / ``mmio_write(offset, size, value)`` (offset from the range base)."""

    def __init__(self):
        self._starts = []
        self._ranges = []          # (start, end_exclusive, device), sorted by start

    def register(self, addr, length, device):
        if length <= 0:
            raise ValueError("empty MMIO range")
        end = addr + length
        i = bisect.bisect_right(self._starts, addr)
        if i > 0 and self._ranges[i - 1][1] > addr:
            raise ValueError(f"MMIO range {addr:#x}+{length:#x} overlaps {self._ranges[i - 1][2]!r}")
        if i < len(self._ranges) and self._ranges[i][0] < end:
            raise ValueError(f"MMIO range {addr:#x}+{length:#x} overlaps {self._ranges[i][2]!r}")
        self._starts.insert(i, addr)
        self._ranges.insert(i, (addr, end, device))

    def find(self, addr):
        """(device, base, offset) for the range holding addr, or None."""
        i = bisect.bisect_right(self._starts, addr) - 1
        if i >= 0:
            start, end, dev = self._ranges[i]
            if addr < end:
                return dev, start, addr - start
        return None

    def ranges(self):
        return list(self._ranges)

    def read(self, addr, size):
        hit = self.find(addr)
        if hit is None:
            return SIZE_MASKS.get(size, (1 << (8 * size)) - 1)
        dev, _, off = hit
        return dev.mmio_read(off, size)

    def write(self, addr, size, value):
        hit = self.find(addr)
        if hit is not None:
            dev, _, off = hit
            dev.mmio_write(off, size, value)


class IRQLine:
    """One interrupt request wire from a device to input ``n`` of a controller."""

    __slots__ = ("controller", "n", "level")

    def __init__(self, controller, n):
        self.controller = controller
        self.n = n
        self.level = False

    def raise_(self):
        self.level = True
        self.controller.raise_irq(self.n)

    def lower(self):
        self.level = False
        self.controller.lower_irq(self.n)

    def set_level(self, level):
        if level:
            self.raise_()
        else:
            self.lower()

    def pulse(self):
        """A rising edge that leaves the line low (edge-triggered inputs latch it)."""
        self.raise_()
        self.lower()

    def __repr__(self):
        return f"IRQLine({self.n}, {'high' if self.level else 'low'})"


class NullIRQ:
    """An unconnected interrupt output (tests, devices with the interrupt disabled)."""
    level = False

    def raise_(self): self.level = True
    def lower(self): self.level = False
    def set_level(self, level): self.level = bool(level)
    def pulse(self): pass

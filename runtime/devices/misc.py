"""Small fixed-function ports: POST code (0x80), QEMU isa-debug-exit (0xF4), port 0x92."""


class PostCodePort:
    """Port 0x80: BIOS/kernel POST codes and I/O delays. Writes are swallowed (the last is
    kept in ``last``); reads return it, as on most chipsets."""

    def __init__(self):
        self.last = 0
        self.writes = 0

    def io_read(self, port, size):
        return self.last

    def io_write(self, port, size, value):
        self.last = value & 0xFF
        self.writes += 1

    def register(self, bus, port=0x80):
        bus.register(port, port, self)


class DebugExit:
    """QEMU's isa-debug-exit (iobase 0xF4, iosize 1): writing v calls exit((v << 1) | 1)."""

    io_sizes = (1, 2, 4)

    def __init__(self, on_exit):
        self.on_exit = on_exit

    def io_read(self, port, size):
        return (1 << (8 * size)) - 1

    def io_write(self, port, size, value):
        self.on_exit((value << 1) | 1)

    def register(self, bus, port=0xF4):
        bus.register(port, port, self)


class SystemControlPortA:
    """Port 0x92 (PS/2 system control port A): bit 0 fast reset (a 0 -> 1 write resets),
    bit 1 fast A20 gate. Reads return the stored value."""

    def __init__(self, reset=None, a20=None):
        self.on_reset = reset or (lambda: None)
        self.on_a20 = a20 or (lambda enabled: None)
        self.value = 0x02

    def io_read(self, port, size):
        return self.value

    def io_write(self, port, size, value):
        old, self.value = self.value, value & 0xFF
        if (old ^ value) & 0x02:
            self.on_a20(bool(value & 0x02))
        if value & 1 and not old & 1:
            self.value &= ~1
            self.on_reset()

    def register(self, bus, port=0x92):
        bus.register(port, port, self)

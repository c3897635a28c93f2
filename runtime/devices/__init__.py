"""Legacy PC devices for btvm's system mode, independent of the CPU and translator.

Everything talks through small interfaces (see bus.py and clock.py):

    from runtime.devices import IOBus, VirtualClock, build_pc
    bus = IOBus()
    clock = VirtualClock(icount=lambda: cpu.icount)      # or VirtualClock() for host time
    pc = build_pc(bus, clock, ram_mb=256, serial_sink=sys.stdout.buffer.write,
                  on_reset=machine.reboot, on_exit=machine.exit)
    # CPU IN/OUT callouts:      bus.read(port, size) / bus.write(port, size, value)
    # between code slices:      clock.run_due()
    # interrupt delivery:       if eflags.IF and pc.pic.pending(): vector = pc.pic.acknowledge()
    # HLT with nothing pending: clock.idle()        (sleeps, or warps icount time)
    # stdin:                    pc.uart.feed(data)
"""
from .bus import IOBus, MMIOMap, IRQLine, NullIRQ
from .clock import VirtualClock, Timer
from .pic8259 import PIC8259Pair
from .pit8254 import PIT8254, SystemControlPortB, PIT_FREQ
from .uart16550 import UART16550
from .cmos_rtc import CMOSRTC
from .i8042 import I8042
from .misc import PostCodePort, DebugExit, SystemControlPortA


class PC:
    """The wired set of devices: .pic .pit .port61 .uart .cmos .kbc .post .debug_exit .port92."""

    def irq(self, n):
        return IRQLine(self.pic, n)


def build_pc(bus, clock, ram_mb, serial_sink, on_reset, on_exit, rtc_start_time=None,
             on_intr=None, on_a20=None):
    """Create and register the standard PC devices: PIC pair (0x20, 0xA0, ELCR 0x4D0),
    PIT (0x40-0x43, IRQ0) + port 0x61, COM1 16550A (0x3F8, IRQ4), RTC/CMOS (0x70, IRQ8),
    i8042 (0x60/0x64, IRQ1/IRQ12), POST port 0x80, isa-debug-exit 0xF4, port 0x92.
    on_exit(status) is called by the debug-exit port; on_reset() by 8042/0x92 resets;
    on_intr(level) (optional) follows the PIC's INTR output."""
    pc = PC()
    pc.bus, pc.clock = bus, clock
    pc.pic = PIC8259Pair(on_intr)
    pc.pic.register(bus)
    pc.pit = PIT8254(clock, IRQLine(pc.pic, 0))
    pc.pit.register(bus)
    pc.port61 = SystemControlPortB(pc.pit)
    pc.port61.register(bus)
    pc.uart = UART16550(0x3F8, IRQLine(pc.pic, 4), serial_sink, clock)
    pc.uart.register(bus)
    pc.cmos = CMOSRTC(clock, ram_mb, IRQLine(pc.pic, 8), start_time=rtc_start_time)
    pc.cmos.register(bus)
    pc.kbc = I8042(IRQLine(pc.pic, 1), IRQLine(pc.pic, 12), reset=on_reset, a20=on_a20)
    pc.kbc.register(bus)
    pc.post = PostCodePort()
    pc.post.register(bus)
    pc.debug_exit = DebugExit(on_exit)
    pc.debug_exit.register(bus)
    pc.port92 = SystemControlPortA(reset=on_reset, a20=on_a20)
    pc.port92.register(bus)
    return pc


__all__ = ["IOBus", "MMIOMap", "IRQLine", "NullIRQ", "VirtualClock", "Timer", "PIC8259Pair",
           "PIT8254", "SystemControlPortB", "PIT_FREQ", "UART16550", "CMOSRTC", "I8042",
           "PostCodePort", "DebugExit", "SystemControlPortA", "PC", "build_pc"]

"""PC devices (runtime/devices) programmed through the I/O bus the way Linux drives them."""
import pytest

from runtime.devices import (IOBus, MMIOMap, IRQLine, VirtualClock, build_pc, PIC8259Pair,
                             PIT8254, UART16550, PIT_FREQ)
from runtime.devices.pit8254 import edge_time


class Counter:
    """Instruction counter behind an icount clock (1 ns per instruction)."""
    def __init__(self):
        self.n = 0

    def __call__(self):
        return self.n


class Machine:
    def __init__(self, ram_mb=128, rtc_start_time=1_700_000_000.0):
        self.icount = Counter()
        self.clock = VirtualClock(icount=self.icount, ns_per_insn=1)
        self.bus = IOBus()
        self.out = bytearray()
        self.resets = 0
        self.exits = []
        self.pc = build_pc(self.bus, self.clock, ram_mb, self.out.extend, self._reset,
                           self.exits.append, rtc_start_time=rtc_start_time)
        self.bus_in, self.bus_out = self.bus.inb, self.bus.outb

    def _reset(self):
        self.resets += 1

    def run(self, ns):
        """Let the 'CPU' run for ns of virtual time, polling timers like the run loop."""
        end = self.icount.n + ns
        while True:
            d = self.clock.next_deadline()
            if d is None or d > end:
                break
            self.icount.n = max(self.icount.n, d)
            self.clock.run_due()
        self.icount.n = end
        self.clock.run_due()

    def init_pic_linux(self):
        """init_8259A() from arch/x86/kernel/i8259.c."""
        o = self.bus.outb
        o(0x21, 0xFF); o(0xA1, 0xFF)
        o(0x20, 0x11); o(0x21, 0x30); o(0x21, 1 << 2); o(0x21, 0x01)      # vectors 0x30-0x37
        o(0xA0, 0x11); o(0xA1, 0x38); o(0xA1, 2); o(0xA1, 0x01)           # vectors 0x38-0x3F
        o(0x21, 0xFB); o(0xA1, 0xFF)                                       # all masked but cascade

    def eoi(self, irq):
        if irq >= 8:
            self.bus.outb(0xA0, 0x60 | (irq & 7))
            self.bus.outb(0x20, 0x60 | 2)
        else:
            self.bus.outb(0x20, 0x60 | irq)


# ---------------------------------------------------------------------------- bus, clock
def test_bus_unclaimed_and_split_accesses():
    bus = IOBus()

    class Regs:
        def __init__(self): self.mem = {}
        def io_read(self, port, size): return self.mem.get(port, 0)
        def io_write(self, port, size, value): self.mem[port] = value

    r = Regs()
    bus.register(0x100, 0x103, r)
    assert bus.read(0x200, 1) == 0xFF and bus.read(0x200, 2) == 0xFFFF and bus.read(0x200, 4) == 0xFFFFFFFF
    bus.write(0x200, 4, 0x12345678)                       # dropped
    bus.write(0x100, 4, 0x11223344)                       # split into byte cycles
    assert r.mem == {0x100: 0x44, 0x101: 0x33, 0x102: 0x22, 0x103: 0x11}
    assert bus.read(0x100, 4) == 0x11223344
    assert bus.read(0x102, 4) == 0xFFFF1122               # half claimed
    with pytest.raises(ValueError):
        bus.register(0x103, 0x104, r)
    m = MMIOMap()
    m.register(0xFEC00000, 0x1000, "ioapic")
    m.register(0xFEE00000, 0x1000, "lapic")
    assert m.find(0xFEE00020) == ("lapic", 0xFEE00000, 0x20)
    assert m.find(0xFEC01000) is None and m.find(0) is None
    with pytest.raises(ValueError):
        m.register(0xFEC00800, 0x1000, "x")


def test_clock_icount_timers_and_idle():
    c = Counter()
    clk = VirtualClock(icount=c, ns_per_insn=4)
    fired = []
    t1 = clk.timer(lambda d: fired.append(("a", d)))
    t2 = clk.timer(lambda d: fired.append(("b", d)))
    t1.mod(100); t2.mod(40)
    assert clk.next_deadline() == 40
    c.n = 10                                               # 40 ns
    assert clk.insns_until_deadline() == 1
    assert clk.run_due() == 1 and fired == [("b", 40)]
    t1.mod(200)                                            # re-arm replaces the old deadline
    assert clk.next_deadline() == 200
    t1.cancel()
    assert clk.next_deadline() is None
    t1.mod(1000)
    clk.idle()                                             # HLT: warp to the deadline
    assert clk.now_ns() == 1000 and fired[-1] == ("a", 1000)
    assert VirtualClock().now_ns() >= 0                    # host mode


def test_clock_reports_a_deadline_earlier_than_all_others():
    # The machine's time slice runs to the earliest deadline; arming one before it must end the slice.
    clk = VirtualClock(icount=Counter())
    calls = []
    clk.on_earlier = lambda: calls.append(clk.next_deadline())
    a, b = clk.timer(lambda d: None), clk.timer(lambda d: None)
    a.mod(500)
    b.mod(800)                                             # later than a: the slice is unaffected
    b.mod(300)                                             # re-armed before a
    a.mod(100)
    a.mod(200)                                             # later than its own old deadline only
    assert calls == [500, 300, 100]


# ---------------------------------------------------------------------------- PIC
def test_pic_linux_init_priorities_eoi():
    m = Machine()
    pic, b = m.pc.pic, m.bus
    m.init_pic_linux()
    assert b.inb(0x21) == 0xFB and b.inb(0xA1) == 0xFF
    assert not pic.pending()
    pic.raise_irq(3)                                       # masked: latched in IRR only
    assert not pic.pending()
    b.outb(0x20, 0x0A)                                     # OCW3: read IRR
    assert b.inb(0x20) & 0x08
    b.outb(0x21, 0x00); b.outb(0xA1, 0x00)                 # unmask all
    pic.raise_irq(4)
    assert pic.pending()
    assert pic.acknowledge() == 0x33                       # IRQ3 beats IRQ4
    b.outb(0x20, 0x0B)                                     # OCW3: read ISR
    assert b.inb(0x20) == 0x08
    assert not pic.pending()                               # IRQ4 lower priority than in-service 3
    pic.raise_irq(1)                                       # higher priority nests
    assert pic.pending() and pic.acknowledge() == 0x31
    assert b.inb(0x20) == 0x0A
    b.outb(0x20, 0x20)                                     # non-specific EOI clears IRQ1
    assert b.inb(0x20) == 0x08
    b.outb(0x20, 0x63)                                     # specific EOI IRQ3
    assert pic.acknowledge() == 0x34
    b.outb(0x20, 0x20)
    # edge triggering: a line held high does not request again
    pic.raise_irq(5); assert pic.acknowledge() == 0x35; b.outb(0x20, 0x20)
    pic.raise_irq(5); assert not pic.pending()
    pic.lower_irq(5); pic.raise_irq(5); assert pic.pending()
    assert pic.acknowledge() == 0x35; b.outb(0x20, 0x20)
    # slave through the cascade
    pic.raise_irq(12)
    assert pic.pending() and pic.acknowledge() == 0x3C
    b.outb(0xA0, 0x0B); b.outb(0x20, 0x0B)
    assert b.inb(0xA0) == 0x10 and b.inb(0x20) == 0x04
    m.eoi(12)
    assert b.inb(0xA0) == 0 and b.inb(0x20) == 0


def test_pic_spurious_and_rotation_and_poll():
    m = Machine()
    pic, b = m.pc.pic, m.bus
    m.init_pic_linux()
    b.outb(0x21, 0); b.outb(0xA1, 0)
    pic.raise_irq(6)
    assert pic.pending()
    b.outb(0x21, 0x40)                                     # masked between INTR and INTA
    assert pic.acknowledge() == 0x37                       # spurious IRQ7, ISR untouched
    b.outb(0x20, 0x0B); assert b.inb(0x20) == 0
    b.outb(0x21, 0)
    pic.acknowledge(); b.outb(0x20, 0x20)                  # IRQ6 is delivered when unmasked
    pic.raise_irq(10)
    assert pic.pending()
    b.outb(0xA1, 0x04)
    assert pic.acknowledge() == 0x3F                       # spurious IRQ15: master IS2 set
    b.outb(0x20, 0x0B); b.outb(0xA0, 0x0B)
    assert b.inb(0x20) == 0x04 and b.inb(0xA0) == 0x00
    b.outb(0x20, 0x20); b.outb(0xA1, 0)
    pic.acknowledge(); m.eoi(10)
    # rotate on non-specific EOI: IRQ0 becomes lowest
    pic.lower_irq(0); pic.lower_irq(1)
    pic.raise_irq(0); pic.raise_irq(1)
    assert pic.acknowledge() == 0x30
    b.outb(0x20, 0xA0)                                     # rotate on non-specific EOI
    pic.lower_irq(0); pic.raise_irq(0)
    assert pic.acknowledge() == 0x31                       # IRQ1 now beats IRQ0
    b.outb(0x20, 0x20)
    assert pic.acknowledge() == 0x30; b.outb(0x20, 0x20)
    b.outb(0x20, 0xC7)                                     # set priority: IRQ7 lowest again
    pic.lower_irq(3); pic.raise_irq(3)
    b.outb(0x20, 0x0C)                                     # poll command
    assert b.inb(0x20) == 0x83
    b.outb(0x20, 0x20)
    # ELCR: level-triggered IRQ9 stays requested while the line is high
    b.outb(0x4D1, 0x02 | 0x01)
    assert b.inb(0x4D1) == 0x02                            # IRQ8 cannot be level
    pic.raise_irq(9)
    assert pic.acknowledge() == 0x39; m.eoi(9)
    assert pic.pending()                                   # still high: requests again
    pic.lower_irq(9)
    # the master latched the cascade's second edge; with the slave request gone the INTA
    # cycle yields the slave's spurious IRQ15 (Linux then EOIs only the master)
    assert pic.pending() and pic.acknowledge() == 0x3F
    b.outb(0x20, 0x20)
    assert not pic.pending()


def test_pic_auto_eoi():
    pic = PIC8259Pair()
    w = lambda a, v: pic.io_write(a, 1, v)
    w(0x20, 0x11); w(0x21, 0x08); w(0x21, 0x04); w(0x21, 0x03)   # ICW4: AEOI
    w(0x21, 0)
    pic.raise_irq(1)
    assert pic.acknowledge() == 0x09
    w(0x20, 0x0B)
    assert pic.io_read(0x20, 1) == 0


# ---------------------------------------------------------------------------- PIT
def test_pit_mode2_1khz_drives_irq0():
    m = Machine()
    b, pic = m.bus, m.pc.pic
    m.init_pic_linux()
    b.outb(0x21, 0xFA)                                     # unmask IRQ0
    b.outb(0x43, 0x34)                                     # ch0, lobyte/hibyte, mode 2
    b.outb(0x40, 1193 & 0xFF); b.outb(0x40, 1193 >> 8)
    t0 = m.clock.now_ns()
    ticks = []
    for _ in range(100):
        m.run(100_000)
        while pic.pending():
            v = pic.acknowledge()
            assert v == 0x30
            ticks.append(m.clock.now_ns())
            b.outb(0x20, 0x20)
    assert len(ticks) == 10                                # 10 ms at 1000.15 Hz: last at 9.9994 ms
    period = 1193 * 1e9 / PIT_FREQ
    # each interrupt lands exactly on the CLK edge the datasheet predicts (next poll rounds up)
    exact = [edge_time(t0 * PIT_FREQ // 10**9 + 1 + 1193 * n) for n in range(1, 11)]
    assert all(abs(e - (t0 + n * period)) < 1000 for n, e in enumerate(exact, 1))
    assert all(0 <= t - e < 100_000 for t, e in zip(ticks, exact))   # seen at the next poll
    # latch command and counting down
    b.outb(0x43, 0x00)
    lo = b.inb(0x40); hi = b.inb(0x40)
    c1 = lo | hi << 8
    m.run(10_000)                                          # ~12 ticks
    b.outb(0x43, 0x00)
    c2 = b.inb(0x40) | b.inb(0x40) << 8
    assert 1 <= c1 <= 1193 and 1 <= c2 <= 1193
    assert (c1 - c2) % 1193 in (11, 12)
    # read-back: status of channel 0 (OUT high, rw=3, mode 2) then its count
    b.outb(0x43, 0xC2)
    st = b.inb(0x40)
    assert st & 0x3F == 0x34 and st & 0x80


def test_pit_mode0_oneshot_and_status():
    m = Machine()
    b, pic = m.bus, m.pc.pic
    m.init_pic_linux(); b.outb(0x21, 0xFA)
    b.outb(0x43, 0x30)                                     # ch0 mode 0 (Linux's oneshot)
    b.outb(0x43, 0xE2)                                     # read-back status: null count, OUT low
    assert b.inb(0x40) == 0x70
    b.outb(0x40, 100); b.outb(0x40, 0)
    t = m.clock.now_ns()
    k = t * PIT_FREQ // 10**9
    m.icount.n = edge_time(k + 101) - 1                    # N + 1 edges after the write
    m.clock.run_due()
    assert not pic.pending() and not m.pc.pit.out(0)
    b.outb(0x43, 0xE2)
    assert b.inb(0x40) == 0x30                             # count loaded, OUT still low
    m.icount.n += 1
    m.clock.run_due()
    assert m.pc.pit.out(0) and pic.pending() and pic.acknowledge() == 0x30
    b.outb(0x20, 0x20)
    m.run(1_000_000)
    assert not pic.pending()                               # one-shot


def test_pit_lobyte_hibyte_bcd_and_mode3():
    m = Machine()
    b = m.bus
    b.outb(0x43, 0xA0)                                     # ch2, MSB only, mode 0
    b.outb(0x61, 0x01)                                     # gate on
    b.outb(0x42, 0x10)                                     # count 0x1000
    m.run(10**9 * 0x100 // PIT_FREQ + 1000)
    assert b.inb(0x42) in (0x0F, 0x0E)                     # MSB only read
    b.outb(0x43, 0xB1)                                     # ch2, lohi, mode 0, BCD
    b.outb(0x42, 0x00); b.outb(0x42, 0x10)                 # 1000 decimal
    m.run(10**9 * 11 // PIT_FREQ + 1)
    b.outb(0x43, 0x80)
    v = b.inb(0x42) | b.inb(0x42) << 8
    assert v in (0x0990, 0x0991)
    b.outb(0x43, 0xB6)                                     # ch2 square wave (PC speaker)
    b.outb(0x42, 0x00); b.outb(0x42, 0x01)                 # N = 256: 128 high / 128 low
    start = m.clock.now_ns() * PIT_FREQ // 10**9 + 1
    outs = []
    for k in range(start, start + 512, 16):
        m.icount.n = edge_time(k)
        outs.append(b.inb(0x61) & 0x20)
    assert outs == ([0x20] * 8 + [0] * 8) * 2
    b.outb(0x61, 0x00)                                     # gate low: OUT high, counting stops
    assert b.inb(0x61) & 0x20


def test_port61_refresh_toggle_and_gate_bits():
    m = Machine()
    b = m.bus
    v1, v2 = b.inb(0x61), b.inb(0x61)
    assert (v1 ^ v2) == 0x10
    b.outb(0x61, 0x03)
    assert b.inb(0x61) & 0x0F == 0x03 and m.pc.port61.speaker_on


def _linux_pit_calibrate_tsc(m, loop_cost_insns):
    """pit_calibrate_tsc(latch=CLOCK_TICK_RATE/20, ms=50, loopmin) from tsc.c, TSC = icount."""
    b = m.bus
    rdtsc = lambda: m.icount.n
    b.outb(0x61, (b.inb(0x61) & ~0x02) | 0x01)
    b.outb(0x43, 0xB0)
    latch = PIT_FREQ // 20
    b.outb(0x42, latch & 0xFF); b.outb(0x42, latch >> 8)
    tsc = t1 = t2 = rdtsc()
    pitcnt, tscmin, tscmax = 0, 1 << 64, 0
    while (b.inb(0x61) & 0x20) == 0:
        m.icount.n += loop_cost_insns
        t2 = rdtsc()
        delta = t2 - tsc
        tsc = t2
        tscmin, tscmax = min(tscmin, delta), max(tscmax, delta)
        pitcnt += 1
    assert pitcnt >= 1000 and tscmax <= 10 * tscmin
    return (t2 - t1) // 50, t1, t2                         # kHz


def test_linux_pit_calibrate_tsc_icount():
    m = Machine()
    m.icount.n = 12345
    cost = 997                                             # ~1 us per loop (an ISA inb)
    khz, t1, t2 = _linux_pit_calibrate_tsc(m, loop_cost_insns=cost)
    # 1 insn = 1 ns -> a 1 GHz "TSC". OUT rises latch + 1 PIT clocks after the count write;
    # the loop sees it at the first poll at or after that edge
    edge = edge_time(t1 * PIT_FREQ // 10**9 + 1 + PIT_FREQ // 20)
    assert edge <= t2 < edge + cost
    assert abs(khz - 1_000_000) <= 1 + cost // 50 + 20    # latch/F = 49.9999 ms, +1 clock


def test_linux_quick_pit_calibrate_msb_reads():
    """quick_pit_calibrate(): mode 0 from 0xFFFF, watching the live (unlatched) MSB."""
    m = Machine()
    b = m.bus
    b.outb(0x61, (b.inb(0x61) & ~0x02) | 0x01)
    b.outb(0x43, 0xB0)
    b.outb(0x42, 0xFF); b.outb(0x42, 0xFF)

    def verify_msb(val):                                   # an ISA inb takes ~1 us
        b.inb(0x42); m.icount.n += 1000
        r = b.inb(0x42); m.icount.n += 1000
        return r == val

    def expect_msb(val):
        count, tsc = 0, 0
        while count < 50000 and verify_msb(val):
            tsc = m.icount.n
            count += 1
        return count > 5, tsc

    verify_msb(0)
    ok, tsc0 = expect_msb(0xFF)
    assert ok
    for i in range(1, 40):
        ok, tsc = expect_msb(0xFF - i)
        assert ok
    # 39 MSB steps = 39 * 256 PIT clocks, measured to within a loop iteration
    expect = 39 * 256 * 1e9 / PIT_FREQ
    assert abs((tsc - tsc0) - expect) <= 2000


# ---------------------------------------------------------------------------- UART
def _uart_init_linux_115200(b, base=0x3F8):
    b.outb(base + 1, 0x00)                                 # IER off
    b.outb(base + 3, 0x80)                                 # DLAB
    b.outb(base + 0, 0x01); b.outb(base + 1, 0x00)         # divisor 1: 115200
    b.outb(base + 3, 0x03)                                 # 8N1
    b.outb(base + 2, 0xC7)                                 # FIFO on, clear, trigger 14
    b.outb(base + 4, 0x0B)                                 # DTR | RTS | OUT2


def test_uart_probe_and_init():
    m = Machine()
    b, u = m.bus, m.pc.uart
    # autoconfig(): IER scratch test
    b.outb(0x3F9, 0); assert b.inb(0x3F9) & 0x0F == 0
    b.outb(0x3F9, 0x0F); assert b.inb(0x3F9) & 0x0F == 0x0F
    b.outb(0x3F9, 0)
    # loopback test: MCR = LOOP|OUT2|RTS -> MSR = DCD|CTS
    b.outb(0x3FC, 0x1A)
    assert b.inb(0x3FE) & 0xF0 == 0x90
    b.outb(0x3FC, 0x00)
    b.outb(0x3FA, 0x01)
    assert b.inb(0x3FA) >> 6 == 3                          # 16550A
    _uart_init_linux_115200(b)
    assert u.baud == 115200 and b.inb(0x3FB) == 0x03
    assert b.inb(0x3FD) == 0x60                            # THRE | TEMT
    b.outb(0x3FF, 0x5A); assert b.inb(0x3FF) == 0x5A       # scratch
    for ch in b"ok\n":
        while not b.inb(0x3FD) & 0x20:
            pass
        b.outb(0x3F8, ch)
    assert bytes(m.out) == b"ok\n"


def test_uart_fifo_size_with_loopback_overrun():
    m = Machine()
    b = m.bus
    b.outb(0x3FC, 0x10)                                    # loopback
    b.outb(0x3FA, 0x07)                                    # FIFO enable + clear
    for i in range(256):
        b.outb(0x3F8, i)
    assert b.inb(0x3FD) & 0x03 == 0x03                     # DR + OE (cleared by this read)
    n = 0
    while b.inb(0x3FD) & 0x01 and n < 256:
        assert b.inb(0x3F8) == n
        n += 1
    assert n == 16 and not m.out
    assert not b.inb(0x3FD) & 0x02


def test_uart_16450_mode_overrun_replaces_rbr():
    # PC16550D, LSR bit 1: without FIFOs the next character destroys the unread one.
    m = Machine()
    b = m.bus
    b.outb(0x3FC, 0x10)
    b.outb(0x3FA, 0x00)
    b.outb(0x3F8, 0x42)
    b.outb(0x3F8, 0x43)
    assert b.inb(0x3FD) & 0x03 == 0x03 and b.inb(0x3F8) == 0x43 and not b.inb(0x3FD) & 0x03


def test_uart_thre_interrupt_flow():
    m = Machine()
    b, pic = m.bus, m.pc.pic
    m.init_pic_linux(); b.outb(0x21, 0xEB)                 # unmask IRQ4
    _uart_init_linux_115200(b)
    # Linux's THRE re-assert test: enabling THRI with THR empty raises THRE each time
    b.outb(0x3F9, 0x02)
    iir1 = b.inb(0x3FA)
    b.outb(0x3F9, 0x00); b.outb(0x3F9, 0x02)
    iir = b.inb(0x3FA)
    assert iir1 & 0x0F == 0x02 and iir & 0x0F == 0x02
    b.outb(0x3F9, 0x00)
    assert b.inb(0x3FA) == 0xC1
    # interrupt-driven transmit: start_tx enables THRI, the handler fills the FIFO
    msg = b"Linux version 6.1.0-686 (debian-kernel@lists.debian.org)\n"
    pos = 0
    while pic.pending(): pic.acknowledge(); b.outb(0x20, 0x20)
    b.outb(0x3F9, 0x02)
    irqs = 0
    while True:
        if not pic.pending():
            break
        assert pic.acknowledge() == 0x34
        irqs += 1
        while True:
            iir = b.inb(0x3FA)
            if iir & 1:
                break
            assert iir & 0x0F == 0x02
            for _ in range(16):                            # tx_loadsz
                if pos == len(msg):
                    b.outb(0x3F9, 0x00)                    # stop_tx
                    break
                b.outb(0x3F8, msg[pos]); pos += 1
        b.outb(0x20, 0x20)
    assert bytes(m.out) == msg and irqs >= 1
    # OUT2 gates the interrupt line
    b.outb(0x3FC, 0x03); b.outb(0x3F9, 0x02)
    assert not pic.pending() and b.inb(0x3FA) & 0x0F == 0x02


def test_uart_receive_flow_trigger_and_timeout():
    m = Machine()
    b, pic, u = m.bus, m.pc.pic, m.pc.uart
    m.init_pic_linux(); b.outb(0x21, 0xEB)
    _uart_init_linux_115200(b)
    b.outb(0x3F9, 0x05)                                    # RDI | RLSI
    u.feed(b"abc")                                         # below trigger 14
    assert not pic.pending() and b.inb(0x3FA) == 0xC1
    m.run(4 * u.char_time_ns() + 1)                        # character timeout
    assert pic.pending() and pic.acknowledge() == 0x34
    assert b.inb(0x3FA) == 0xCC
    got = bytearray()
    while b.inb(0x3FD) & 0x01:
        got.append(b.inb(0x3F8))
    assert got == b"abc" and b.inb(0x3FA) == 0xC1
    b.outb(0x20, 0x20)
    data = bytes(range(40, 80))                            # 40 bytes: trigger level reached at once
    u.feed(data)
    assert pic.pending() and pic.acknowledge() == 0x34
    assert b.inb(0x3FA) == 0xC4
    got = bytearray()
    while b.inb(0x3FD) & 0x01:                             # backlog refills the FIFO losslessly
        got.append(b.inb(0x3F8))
    assert bytes(got) == data and not b.inb(0x3FD) & 0x02
    b.outb(0x20, 0x20)
    # non-FIFO (16450) mode: one holding register, data-available as soon as a byte lands
    b.outb(0x3FA, 0x00)
    u.feed(b"xy")
    assert b.inb(0x3FA) == 0x04 and b.inb(0x3F8) == ord("x") and b.inb(0x3F8) == ord("y")
    # overrun on the wire -> line status interrupt, highest priority, cleared by reading LSR
    u.receive(1); u.receive(2)
    assert b.inb(0x3FA) == 0x06
    assert b.inb(0x3FD) & 0x03 == 0x03
    assert b.inb(0x3FA) == 0x04


def test_uart_modem_status_interrupt():
    m = Machine()
    b, u = m.bus, m.pc.uart
    b.outb(0x3FC, 0x08)
    b.inb(0x3FE)
    b.outb(0x3F9, 0x08)
    u.set_modem_lines(cts=False)
    assert b.inb(0x3FA) == 0x00
    assert b.inb(0x3FE) == 0xA1                            # DCD|DSR, delta CTS
    assert b.inb(0x3FA) == 0x01


# ---------------------------------------------------------------------------- CMOS / RTC
def _cmos(b, idx):
    b.outb(0x70, 0x80 | idx)                               # NMI disabled as Linux does
    return b.inb(0x71)


def test_cmos_time_read_with_uip_linux_style():
    start = 1_700_000_000.9998                             # 2023-11-14 22:13:20.9998 UTC
    m = Machine(rtc_start_time=start)
    b = m.bus
    assert _cmos(b, 0x0A) & 0x80                           # within 244 us of the update
    assert _cmos(b, 0x0D) == 0x80
    spins = 0
    while _cmos(b, 0x0A) & 0x80:                           # mc146818_get_time: wait for !UIP
        m.icount.n += 100
        spins += 1
    # UIP from 244 us before the boundary until 1984 us after it
    assert abs(spins * 100 - (200_000 + 1_984_000)) <= 1000
    t = [_cmos(b, r) for r in (0, 2, 4, 7, 8, 9, 0x32, 6)]
    assert t == [0x21, 0x13, 0x22, 0x14, 0x11, 0x23, 0x20, 0x03]   # BCD; Tuesday = 3
    # binary + 12 h mode
    b.outb(0x70, 0x0B); b.outb(0x71, 0x04)                 # DM=1, 12 h
    assert _cmos(b, 4) == 0x80 | 10 and _cmos(b, 0) == 21
    m.icount.n += 10**9 * 100                              # 100 s later
    assert _cmos(b, 0) == (21 + 100) % 60 and _cmos(b, 2) == 15


def test_cmos_set_time_and_memory_sizes():
    m = Machine(ram_mb=256)
    b = m.bus
    assert _cmos(b, 0x15) | _cmos(b, 0x16) << 8 == 640
    assert _cmos(b, 0x17) | _cmos(b, 0x18) << 8 == 0xFFFF
    assert _cmos(b, 0x30) | _cmos(b, 0x31) << 8 == 0xFFFF
    assert _cmos(b, 0x34) | _cmos(b, 0x35) << 8 == (256 - 16) * 16
    csum = sum(_cmos(b, i) for i in range(0x10, 0x2E))
    assert _cmos(b, 0x2E) << 8 | _cmos(b, 0x2F) == csum
    small = Machine(ram_mb=8).bus
    assert _cmos(small, 0x17) | _cmos(small, 0x18) << 8 == 7 * 1024
    assert _cmos(small, 0x34) == 0 and _cmos(small, 0x35) == 0
    # set the clock the way rtc-cmos does: SET, write, clear SET
    b.outb(0x70, 0x0B); b.outb(0x71, 0x82)
    for reg, v in ((0, 0x56), (2, 0x34), (4, 0x12), (7, 0x01), (8, 0x01), (9, 0x00), (0x32, 0x20)):
        b.outb(0x70, reg); b.outb(0x71, v)
    m.icount.n += 5 * 10**9                                # frozen while SET
    assert _cmos(b, 0) == 0x56 and not _cmos(b, 0x0A) & 0x80
    b.outb(0x70, 0x0B); b.outb(0x71, 0x02)
    m.icount.n += 3 * 10**9 + 10**8
    assert [_cmos(b, r) for r in (0, 2, 4, 7, 8, 9, 6)] == [0x59, 0x34, 0x12, 0x01, 0x01, 0x00, 0x07]
    b.outb(0x70, 0x3F); b.outb(0x71, 0xA5)                 # plain CMOS byte
    assert _cmos(b, 0x3F) == 0xA5


def test_rtc_periodic_and_update_interrupts():
    m = Machine()
    b, pic = m.bus, m.pc.pic
    m.init_pic_linux(); b.outb(0xA1, 0xFE)                 # unmask IRQ8
    _cmos(b, 0x0C)
    b.outb(0x70, 0x0A); b.outb(0x71, 0x26)                 # 1024 Hz
    b.outb(0x70, 0x0B); b.outb(0x71, 0x42)                 # PIE
    n = 0
    for _ in range(1000):
        m.run(10_000)                                      # 10 ms total
        while pic.pending():
            assert pic.acknowledge() == 0x38
            c = _cmos(b, 0x0C)
            assert c & 0xC0 == 0xC0
            n += 1
            m.eoi(8)
    assert n in (10, 11)
    b.outb(0x70, 0x0B); b.outb(0x71, 0x12)                 # UIE only
    _cmos(b, 0x0C)
    m.run(1_000_000_000)
    assert pic.pending() and pic.acknowledge() == 0x38
    assert _cmos(b, 0x0C) & 0x90 == 0x90
    m.eoi(8)
    b.outb(0x70, 0x0B); b.outb(0x71, 0x02)
    m.run(1_100_000_000)
    assert not pic.pending() and _cmos(b, 0x0C) & 0x50 == 0x50   # flags set without interrupts


# ---------------------------------------------------------------------------- i8042
def _kbc_read(b, want_aux=None):
    st = b.inb(0x64)
    assert st & 0x01, "output buffer empty"
    if want_aux is not None:
        assert bool(st & 0x20) == want_aux
    return b.inb(0x60)


def test_i8042_linux_probe():
    m = Machine()
    b, pic = m.bus, m.pc.pic
    m.init_pic_linux(); b.outb(0x21, 0xF9); b.outb(0xA1, 0xEF)   # IRQ1, IRQ12
    while b.inb(0x64) & 0x01:
        b.inb(0x60)                                        # i8042_flush
    b.outb(0x64, 0x20)
    ctr = _kbc_read(b)
    assert ctr & 0x40                                      # translation on
    assert pic.pending() and pic.acknowledge() == 0x31; b.outb(0x20, 0x20)
    b.outb(0x64, 0x60); b.outb(0x60, ctr & ~0x03)         # interrupts off while probing
    b.outb(0x64, 0xAA); assert _kbc_read(b) == 0x55 and b.inb(0x64) & 0x04
    assert not pic.pending()
    b.outb(0x64, 0xAB); assert _kbc_read(b) == 0x00
    # aux: loopback, bit assignment test
    b.outb(0x64, 0xD3); b.outb(0x60, 0x5A)
    assert _kbc_read(b, want_aux=True) == 0x5A
    b.outb(0x64, 0xA7); b.outb(0x64, 0x20); assert _kbc_read(b) & 0x20
    b.outb(0x64, 0xA8); b.outb(0x64, 0x20); assert not _kbc_read(b) & 0x20
    # aux irq test
    b.outb(0x64, 0x60); b.outb(0x60, (ctr & ~0x01) | 0x02)
    b.outb(0x64, 0xD3); b.outb(0x60, 0xA5)
    assert pic.pending() and pic.acknowledge() == 0x3C
    assert _kbc_read(b, want_aux=True) == 0xA5
    m.eoi(12)
    # nothing behind the aux port: a write gets 0xFE with the timeout bit
    b.outb(0x64, 0xD4); b.outb(0x60, 0xF2)
    st = b.inb(0x64)
    assert st & 0x61 == 0x61 and b.inb(0x60) == 0xFE
    m.eoi(12) if pic.pending() and pic.acknowledge() else None
    # keyboard: reset and identify (translated)
    b.outb(0x64, 0x60); b.outb(0x60, ctr | 0x01)
    b.outb(0x60, 0xFF)
    assert pic.pending() and pic.acknowledge() == 0x31
    assert _kbc_read(b, False) == 0xFA
    b.outb(0x20, 0x20)
    assert pic.pending()                                  # next byte: a fresh edge
    pic.acknowledge(); assert _kbc_read(b) == 0xAA; b.outb(0x20, 0x20)
    b.outb(0x60, 0xF2)
    assert [_kbc_read(b) for _ in range(3)] == [0xFA, 0xAB, 0x41]
    assert not b.inb(0x64) & 0x01
    b.outb(0x60, 0xED); b.outb(0x60, 0x00)
    assert [_kbc_read(b), _kbc_read(b)] == [0xFA, 0xFA]
    # disabled keyboard: data stays queued
    b.outb(0x64, 0xAD); b.outb(0x64, 0x20); _kbc_read(b)
    m.pc.kbc.kbd.send(0x1C)
    assert not b.inb(0x64) & 0x01
    b.outb(0x64, 0xAE)
    assert _kbc_read(b) == 0x1C


def test_i8042_output_port_and_resets():
    m = Machine()
    b = m.bus
    b.outb(0x64, 0xD0)
    op = _kbc_read(b)
    assert op & 0x03 == 0x03
    b.outb(0x64, 0xD1); b.outb(0x60, op & ~0x02)          # A20 off
    b.outb(0x64, 0xD0); assert not _kbc_read(b) & 0x02
    assert m.resets == 0
    b.outb(0x64, 0xFE)
    assert m.resets == 1
    b.outb(0x64, 0xD1); b.outb(0x60, 0x02)                # reset bit low
    assert m.resets == 2
    b.outb(0x92, b.inb(0x92) | 0x01)                      # fast reset via port 0x92
    assert m.resets == 3 and not b.inb(0x92) & 1


def test_misc_ports_and_debug_exit():
    m = Machine()
    b = m.bus
    b.outb(0x80, 0x42); b.outb(0x80, 0x17)
    assert m.pc.post.last == 0x17 and b.inb(0x80) == 0x17
    b.outb(0xF4, 0x10)
    assert m.exits == [0x21]
    b.outl(0xF4, 0)
    assert m.exits == [0x21, 1]


def test_devices_without_a_machine():
    """Devices are usable alone with a fake interrupt controller."""
    class FakePIC:
        def __init__(self): self.events = []
        def raise_irq(self, n): self.events.append(("+", n))
        def lower_irq(self, n): self.events.append(("-", n))

    f = FakePIC()
    clk = VirtualClock(icount=Counter())
    u = UART16550(0x2F8, IRQLine(f, 3), sink=None, clock=clk)
    u.io_write(0x2FC, 1, 0x08)
    u.io_write(0x2F9, 1, 0x02)
    assert f.events == [("+", 3)]
    assert u.io_read(0x2FA, 1) == 0x02 and f.events[-1] == ("-", 3)
    p = PIT8254(clk, IRQLine(f, 0))
    assert p.out(0)


def test_pit_mode2_new_count_takes_effect_next_period_and_gate_pause():
    m = Machine()
    b = m.bus
    m.init_pic_linux(); b.outb(0x21, 0xFA)
    b.outb(0x43, 0x34); b.outb(0x40, 100); b.outb(0x40, 0)
    k0 = 1                                                 # written at t=0: loaded at edge 1
    m.icount.n = edge_time(k0 + 50)
    b.outb(0x40, 200); b.outb(0x40, 0)                     # no control word: reload at period end
    m.icount.n = edge_time(k0 + 99)
    b.outb(0x43, 0x00); assert b.inb(0x40) | b.inb(0x40) << 8 == 1
    m.icount.n = edge_time(k0 + 100)
    b.outb(0x43, 0x00); assert b.inb(0x40) | b.inb(0x40) << 8 == 200
    m.clock.run_due()
    assert m.pc.pic.pending()
    assert m.pc.pit._timer.expires == edge_time(k0 + 300)
    # channel 2, mode 0: GATE low suspends the countdown, high resumes it
    b.outb(0x61, 0x01)
    b.outb(0x43, 0xB0); b.outb(0x42, 0x00); b.outb(0x42, 0x10)   # 4096
    k = m.clock.now_ns() * PIT_FREQ // 10**9
    m.icount.n = edge_time(k + 1 + 96)
    b.outb(0x61, 0x00)
    b.outb(0x43, 0x80); assert b.inb(0x42) | b.inb(0x42) << 8 == 4000
    m.icount.n += 10**7                                    # 10 ms with the gate low
    b.outb(0x43, 0x80); assert b.inb(0x42) | b.inb(0x42) << 8 == 4000
    b.outb(0x61, 0x01)
    k = m.clock.now_ns() * PIT_FREQ // 10**9
    m.icount.n = edge_time(k + 3999)
    assert not b.inb(0x61) & 0x20
    m.icount.n = edge_time(k + 4000)
    assert b.inb(0x61) & 0x20


def test_hlt_idle_wakes_on_pit_tick():
    m = Machine()
    b, pic = m.bus, m.pc.pic
    m.init_pic_linux(); b.outb(0x21, 0xFA)
    b.outb(0x43, 0x34); b.outb(0x40, 1193 & 0xFF); b.outb(0x40, 1193 >> 8)
    wakeups = []
    for _ in range(5):                                     # HLT loop of an idle kernel
        while not pic.pending():
            m.clock.idle()
        wakeups.append(m.clock.now_ns())
        assert pic.acknowledge() == 0x30
        b.outb(0x20, 0x20)
    assert wakeups == [edge_time(1 + 1193 * n) for n in range(1, 6)]
    assert m.icount.n == 0                                 # time advanced by warping only


def test_host_clock_mode_runs_timers():
    clk = VirtualClock()
    hits = []
    t = clk.timer(hits.append)
    t.mod(clk.now_ns() + 2_000_000)
    clk.idle(max_ns=50_000_000)
    assert hits and clk.now_ns() >= hits[0]

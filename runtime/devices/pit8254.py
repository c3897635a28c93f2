"""Intel 8254 programmable interval timer (0x40-0x43) and PC system control port B (0x61).

The counters are not stepped: each channel keeps the tick at which its current count
segment started and derives count and OUT analytically from the virtual clock, so reads
are exact to the 1.193182 MHz input clock (tick k happens at virtual time ceil(k*1e9/F) ns).

Timing follows the datasheet: a count written at time t is loaded on the next CLK edge
(which does not decrement), so in mode 0 OUT rises N+1 edges after the write; mode 2 shows
N..1 and drops OUT for the one clock at count 1; mode 3 is a square wave (high for
ceil(N/2), low for floor(N/2) clocks; the count read back decrements by two, odd-count
subtleties approximated); modes 1 and 5 start on a GATE rising edge; mode 4 pulses OUT low
for one clock at terminal count. GATE low suspends modes 0/2/3/4 (OUT forced high in 2/3;
a rising GATE reloads in 2/3 and resumes in 0/4). A new count written while mode 2/3 runs
takes effect at the end of the current period. Latch command, read-back (count and/or
status, NULL COUNT), access modes LSB/MSB/LSB-then-MSB (unlatched 16-bit reads read each
byte live), BCD counting.

Channel 0 drives IRQ0 through clock timers: one rising edge per period in modes 2/3
(the line is pulsed low-high, leaving it high as OUT mostly is), a level rise at terminal
count in mode 0/1 (held until reprogrammed), the end of the strobe in modes 4/5. Ticks
missed while the machine did not poll are merged (an edge-triggered PIC would merge them).
Channel 2's GATE is port 0x61 bit 0 and its OUT is bit 5; bit 4 toggles on every read.
"""

PIT_FREQ = 1193182
_NS = 1_000_000_000


def tick_at(t_ns):
    """Number of CLK edges that have happened at virtual time t_ns."""
    return t_ns * PIT_FREQ // _NS


def edge_time(k):
    """Virtual time (ns) of CLK edge k."""
    return -(-k * _NS // PIT_FREQ)


def _from_bcd(v):
    return ((v >> 12) & 0xF) * 1000 + ((v >> 8) & 0xF) * 100 + ((v >> 4) & 0xF) * 10 + (v & 0xF)


def _to_bcd(v):
    v %= 10000
    return ((v // 1000) << 12) | (((v // 100) % 10) << 8) | (((v // 10) % 10) << 4) | (v % 10)


class PITChannel:
    def __init__(self, pit, index, gate):
        self.pit = pit
        self.index = index
        self.gate = gate
        self.mode = 3
        self.rw = 3
        self.bcd = False
        self.reload = 0x10000        # N, 1..0x10000 (binary) or 1..10000 (BCD)
        self.has_count = False
        self.write_lsb = None        # LSB waiting for its MSB (rw=3)
        self.read_msb_next = False   # unlatched rw=3 read toggle
        self.latched = []            # latched count bytes still to read
        self.status_latch = None
        self.null_count = True
        # running segment
        self.active = False
        self.base = 0                # tick B: count at edge B+j is derived from C and j
        self.count0 = 0              # C
        self.sticky = False          # mode 0/1: OUT already reached terminal count
        self.pending = None          # (E, N2): new mode-2/3 count from edge E
        # state while not counting
        self.idle_count = 0
        self.idle_out = True

    # ---- analytic model -------------------------------------------------------------
    def _sync(self, k):
        p = self.pending
        if p is not None and k >= p[0]:
            self.base, self.count0 = p
            self.reload = p[1]
            self.pending = None

    def _state(self, k):
        """(count, out) at tick k; count is the raw (unmasked) counter value."""
        self._sync(k)
        if not self.active:
            return self.idle_count, self.idle_out
        j = k - self.base
        if j < 0:
            return self.idle_count, self.idle_out
        C = self.count0
        m = self.mode
        if m in (0, 1):
            return C - j, self.sticky or j >= C
        if m in (4, 5):
            return C - j, j != C
        if m == 2:
            p = j % C
            return C - p, p != C - 1
        # mode 3
        p = j % C
        H = (C + 1) // 2
        if p < H:
            return C - 2 * p, True
        return C - 2 * (p - H), False

    def _null(self, k):
        return self.null_count and not (self.active and k >= self.base)

    def count_at(self, t_ns):
        c, _ = self._state(tick_at(t_ns))
        if self.bcd:
            return _to_bcd(c % 10000)
        return c & 0xFFFF

    def out_at(self, t_ns):
        return bool(self._state(tick_at(t_ns))[1])

    def next_rise(self, k):
        """First tick > k at which OUT rises (for the IRQ), or None."""
        self._sync(k)
        if not self.active:
            return None
        B, C, m = self.base, self.count0, self.mode
        if m in (0, 1):
            r = B + C
            return r if (r > k and not self.sticky) else None
        if m in (4, 5):
            r = B + C + 1
            return r if r > k else None
        # modes 2, 3: rising edge at every reload, j = n*C with n >= 1
        j = k - B
        n = max(1, j // C + 1)
        r = B + n * C
        if self.pending is not None and r > self.pending[0]:
            r = self.pending[0]
        return r

    # ---- control ---------------------------------------------------------------------
    def _freeze(self, k):
        c, o = self._state(k)
        if self.mode in (0, 1) and o:
            self.sticky = True
        self.active = False
        self.idle_count, self.idle_out = c, o

    def control(self, rw, mode, bcd, t):
        self.rw, self.mode, self.bcd = rw, mode, bcd
        self.write_lsb = None
        self.read_msb_next = False
        self.latched = []
        self.status_latch = None
        self.null_count = True
        c, _ = self._state(tick_at(t))
        self.active = False
        self.pending = None
        self.sticky = False
        self.has_count = False
        self.idle_count = c
        self.idle_out = mode != 0
        self.pit._channel_changed(self, t)

    def write_count(self, value, t):
        k = tick_at(t)
        if self.bcd:
            n = _from_bcd(value) or 10000
        else:
            n = value or 0x10000
        self.null_count = True
        m = self.mode
        first = not self.has_count
        self.has_count = True
        if m in (2, 3) and not first and self.active:
            c, _ = self._state(k)
            j = k - self.base
            if j < 0:                          # not loaded yet: just replace it
                self.count0 = self.reload = n
            else:
                C = self.count0
                self.pending = (self.base + (j // C + 1) * C, n)
            return
        self.reload = n
        if m in (1, 5):                        # wait for a GATE trigger
            return
        if not self.gate:
            self.active = False
            self.idle_count = n
            self.idle_out = m != 0
            self.pit._channel_changed(self, t)
            return
        self.active = True
        self.base, self.count0 = k + 1, n
        self.sticky = False
        self.pending = None
        self.pit._channel_changed(self, t)

    def set_gate(self, level, t):
        level = bool(level)
        if level == self.gate:
            return
        k = tick_at(t)
        self.gate = level
        m = self.mode
        if level:
            if m in (1, 5) or (m in (2, 3) and self.has_count):
                if self.has_count:
                    self.active = True
                    self.base, self.count0 = k + 1, self.reload
                    self.sticky = False
                    self.pending = None
                    if m == 1:
                        self.idle_out = False
            elif m in (0, 4) and self.has_count:
                self.active = True
                self.base, self.count0 = k, self.idle_count
        else:
            if m in (0, 4, 2, 3) and self.active:
                self._freeze(k)
                if m in (2, 3):
                    self.idle_out = True
        self.pit._channel_changed(self, t)

    def latch_count(self, t):
        if self.latched:
            return
        c = self.count_at(t)
        if self.rw == 1:
            self.latched = [c & 0xFF]
        elif self.rw == 2:
            self.latched = [c >> 8]
        else:
            self.latched = [c & 0xFF, c >> 8]

    def latch_status(self, t):
        if self.status_latch is not None:
            return
        k = tick_at(t)
        _, out = self._state(k)
        self.status_latch = ((0x80 if out else 0) | (0x40 if self._null(k) else 0) |
                             (self.rw << 4) | (self.mode << 1) | int(self.bcd))

    # ---- port access -----------------------------------------------------------------
    def read(self, t):
        if self.status_latch is not None:
            v, self.status_latch = self.status_latch, None
            return v
        if self.latched:
            return self.latched.pop(0)
        c = self.count_at(t)
        if self.rw == 1:
            return c & 0xFF
        if self.rw == 2:
            return c >> 8
        if self.read_msb_next:
            self.read_msb_next = False
            return c >> 8
        self.read_msb_next = True
        return c & 0xFF

    def write(self, value, t):
        if self.rw == 1:
            self.write_count(value, t)
        elif self.rw == 2:
            self.write_count(value << 8, t)
        elif self.write_lsb is None:
            self.write_lsb = value
            if self.mode == 0:                 # first byte stops the count, OUT low at once
                k = tick_at(t)
                if self.active:
                    self._freeze(k)
                self.sticky = False
                self.idle_out = False
                self.pit._channel_changed(self, t)
        else:
            lsb, self.write_lsb = self.write_lsb, None
            self.write_count(lsb | (value << 8), t)


class PIT8254:
    """Port device for 0x40-0x43. ``irq`` is channel 0's output line (IRQ0)."""

    def __init__(self, clock, irq=None):
        from .bus import NullIRQ
        self.clock = clock
        self.irq = irq or NullIRQ()
        self.channels = [PITChannel(self, 0, True), PITChannel(self, 1, True),
                         PITChannel(self, 2, False)]
        self._timer = clock.timer(self._on_timer, name="pit0")
        self._out0 = False
        t = clock.now_ns()
        for ch in self.channels:                 # BIOS-like state: mode 3, count 0x10000
            ch.control(3, 3, False, t)
            ch.write_count(0, t)

    def now(self):
        return self.clock.now_ns()

    # ---- channel 0 -> IRQ0 -----------------------------------------------------------
    def _channel_changed(self, ch, t):
        if ch.index != 0:
            return
        k = tick_at(t)
        _, out = ch._state(k)
        self._set_out0(bool(out))
        self._schedule(ch, k)

    def _set_out0(self, out):
        if out != self._out0:
            self._out0 = out
            self.irq.set_level(out)

    def _schedule(self, ch, k):
        r = ch.next_rise(k)
        if r is None:
            self._timer.cancel()
        else:
            self._timer.mod(edge_time(r))

    def _on_timer(self, deadline):
        ch = self.channels[0]
        k = max(tick_at(deadline), tick_at(self.clock.now_ns()))
        ch._sync(k)
        if ch.mode in (0, 1):
            ch.sticky = True
            self._set_out0(True)
        else:                                    # periodic / strobe: a fresh rising edge
            self._out0 = False
            self.irq.lower()
            self._set_out0(True)
        self._schedule(ch, k)

    # ---- ports -----------------------------------------------------------------------
    def io_read(self, port, size):
        if port == 0x43:
            return 0xFF                          # control word register is write-only
        return self.channels[port - 0x40].read(self.now())

    def io_write(self, port, size, value):
        value &= 0xFF
        t = self.now()
        if port != 0x43:
            self.channels[port - 0x40].write(value, t)
            return
        sc = value >> 6
        if sc == 3:                              # read-back
            for i in range(3):
                if value & (2 << i):
                    ch = self.channels[i]
                    if not value & 0x20:
                        ch.latch_count(t)
                    if not value & 0x10:
                        ch.latch_status(t)
            return
        ch = self.channels[sc]
        rw = (value >> 4) & 3
        if rw == 0:
            ch.latch_count(t)
            return
        mode = (value >> 1) & 7
        if mode > 5:
            mode -= 4                            # 6, 7 alias 2, 3
        ch.control(rw, mode, bool(value & 1), t)

    # ---- helpers for port 0x61 / machine -------------------------------------------
    def set_gate(self, index, level):
        self.channels[index].set_gate(level, self.now())

    def out(self, index):
        return self.channels[index].out_at(self.now())

    def register(self, bus):
        bus.register(0x40, 0x43, self)


class SystemControlPortB:
    """Port 0x61: bit 0 timer-2 gate, bit 1 speaker data enable, bits 2-3 parity/IOCHK enables
    (stored); reads add bit 4 (refresh toggle, flips on every read) and bit 5 (timer 2 OUT)."""

    def __init__(self, pit):
        self.pit = pit
        self.value = 0
        self.refresh = 0

    def io_read(self, port, size):
        self.refresh ^= 0x10
        out2 = 0x20 if self.pit.out(2) else 0
        return (self.value & 0x0F) | self.refresh | out2

    def io_write(self, port, size, value):
        self.value = value & 0x0F
        self.pit.set_gate(2, value & 1)

    @property
    def speaker_on(self):
        return (self.value & 3) == 3

    def register(self, bus):
        bus.register(0x61, 0x61, self)

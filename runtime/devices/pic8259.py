"""Intel 8259A programmable interrupt controllers: the PC's master/slave pair.

Master at 0x20-0x21 (IRQ0-7), slave at 0xA0-0xA1 (IRQ8-15) cascaded on master IR2, and the
edge/level control registers (ELCR) at 0x4D0/0x4D1. The CPU side is ``pending()`` (INTR pin)
and ``acknowledge()`` (the two INTA cycles: returns the vector, moves the IRQ to ISR).

Implemented: ICW1-ICW4 (single/cascade, ICW4 optional; vector base = ICW2 & 0xF8), OCW1 mask,
OCW2 (non-specific/specific EOI, rotate on non-specific/specific EOI, set priority, rotate in
automatic EOI), OCW3 (read IRR/ISR, poll command, special mask mode), auto-EOI,
special fully nested mode, fully nested priorities with rotation, edge triggering (a rising
edge latches IRR; the line must go low and high again for another request; initialization
resets the edge detector so a line already high does not request) and level triggering via
ELCR (IRR follows the line). Spurious interrupts: if no unmasked request survives to the INTA
cycle the 8259 answers with IR7 of that chip (vector base+7) without setting ISR; a spurious
request on the slave still sets the master's IS2 (the master saw a valid cascade request),
exactly what Linux's spurious-IRQ7/IRQ15 handling expects.
"""


class PIC8259Chip:
    def __init__(self, name, master, on_output):
        self.name = name
        self.master = master
        self.on_output = on_output       # called with the INT pin level when it changes
        self.output = False
        self.elcr = 0
        self.elcr_mask = 0xF8 if master else 0xDE
        self.lines = 0                   # current IR input levels
        self.reset()

    def reset(self):
        self.irr = 0
        self.imr = 0
        self.isr = 0
        self.priority_add = 0            # lowest-numbered = highest priority after rotation
        self.irq_base = 0
        self.read_isr = False
        self.poll = False
        self.special_mask = False
        self.init_state = 0
        self.init4 = False
        self.single = False
        self.auto_eoi = False
        self.rotate_on_auto_eoi = False
        self.sfnm = False
        self.icw3 = 0
        self._update()

    # ---- request inputs -----------------------------------------------------------------
    def set_irq(self, irq, level):
        mask = 1 << irq
        if self.elcr & mask:                        # level triggered
            if level:
                self.irr |= mask
                self.lines |= mask
            else:
                self.irr &= ~mask
                self.lines &= ~mask
        else:                                       # edge triggered
            if level:
                if not self.lines & mask:
                    self.irr |= mask
                self.lines |= mask
            else:
                self.lines &= ~mask
        self._update()

    # ---- priority logic ------------------------------------------------------------------
    def _priority(self, mask):
        """Priority (0 = highest) of the best bit in mask, 8 if none."""
        if not mask:
            return 8
        p = 0
        while not mask & (1 << ((p + self.priority_add) & 7)):
            p += 1
        return p

    def best_irq(self):
        """The IR this chip would present now, or -1."""
        req = self.irr & ~self.imr
        p = self._priority(req)
        if p == 8:
            return -1
        inserv = self.isr
        if self.special_mask:
            inserv &= ~self.imr
        if self.sfnm and self.master:
            inserv &= ~(1 << 2)    # slave IRQs may nest inside an in-service slave IRQ
        if p < self._priority(inserv):
            return (p + self.priority_add) & 7
        return -1

    def _update(self):
        out = self.best_irq() >= 0
        if out != self.output:
            self.output = out
            self.on_output(out)

    def intack(self, irq):
        if self.auto_eoi:
            if self.rotate_on_auto_eoi:
                self.priority_add = (irq + 1) & 7
        else:
            self.isr |= 1 << irq
        if not self.elcr & (1 << irq):
            self.irr &= ~(1 << irq)
        self._update()

    # ---- programming interface -----------------------------------------------------------
    def write(self, a0, val):
        if a0 == 0:
            if val & 0x10:                          # ICW1
                lines = self.lines
                self.reset()
                self.irr = self.elcr & lines        # level-triggered requests survive
                self.lines = lines                  # edge detector: high lines need a new edge
                self.init_state = 1
                self.init4 = bool(val & 1)
                self.single = bool(val & 2)
                self._update()
            elif val & 0x08:                        # OCW3
                if val & 0x04:
                    self.poll = True
                if val & 0x02:
                    self.read_isr = bool(val & 1)
                if val & 0x40:
                    self.special_mask = bool(val & 0x20)
                    self._update()
            else:                                   # OCW2
                cmd = val >> 5
                if cmd in (0, 4):                   # clear/set rotate in automatic EOI
                    self.rotate_on_auto_eoi = cmd == 4
                elif cmd in (1, 5):                 # non-specific EOI (5: and rotate)
                    inserv = self.isr
                    p = self._priority(inserv)
                    if p != 8:
                        irq = (p + self.priority_add) & 7
                        self.isr &= ~(1 << irq)
                        if cmd == 5:
                            self.priority_add = (irq + 1) & 7
                        self._update()
                elif cmd == 3:                      # specific EOI
                    self.isr &= ~(1 << (val & 7))
                    self._update()
                elif cmd == 6:                      # set priority: IRn becomes lowest
                    self.priority_add = ((val & 7) + 1) & 7
                    self._update()
                elif cmd == 7:                      # rotate on specific EOI
                    irq = val & 7
                    self.isr &= ~(1 << irq)
                    self.priority_add = (irq + 1) & 7
                    self._update()
                # cmd 2: no operation
        else:
            st = self.init_state
            if st == 0:                             # OCW1
                self.imr = val
                self._update()
            elif st == 1:                           # ICW2
                self.irq_base = val & 0xF8
                self.init_state = (3 if self.init4 else 0) if self.single else 2
            elif st == 2:                           # ICW3
                self.icw3 = val
                self.init_state = 3 if self.init4 else 0
            elif st == 3:                           # ICW4
                self.sfnm = bool(val & 0x10)
                self.auto_eoi = bool(val & 0x02)
                self.init_state = 0

    def read(self, a0):
        if self.poll:
            self.poll = False
            irq = self.best_irq()
            if irq >= 0:
                self.intack(irq)
                return 0x80 | irq
            return 0
        if a0 == 0:
            return self.isr if self.read_isr else self.irr
        return self.imr


class PIC8259Pair:
    """Both 8259As plus ELCR. Port device for 0x20-0x21, 0xA0-0xA1, 0x4D0-0x4D1."""

    MASTER_PORTS = (0x20, 0x21)
    SLAVE_PORTS = (0xA0, 0xA1)
    ELCR_PORTS = (0x4D0, 0x4D1)

    def __init__(self, on_intr=None):
        self.on_intr = on_intr or (lambda level: None)   # CPU INTR pin change notification
        self.master = PIC8259Chip("master", True, self._master_out)
        self.slave = PIC8259Chip("slave", False, self._slave_out)
        self.spurious = 0

    def _slave_out(self, level):
        self.master.set_irq(2, level)

    def _master_out(self, level):
        self.on_intr(level)

    # ---- device side --------------------------------------------------------------------
    def set_irq(self, n, level):
        if n < 8:
            self.master.set_irq(n, level)
        else:
            self.slave.set_irq(n - 8, level)

    def raise_irq(self, n):
        self.set_irq(n, True)

    def lower_irq(self, n):
        self.set_irq(n, False)

    # ---- CPU side -----------------------------------------------------------------------
    def pending(self):
        """The INTR pin: an unmasked request with higher priority than anything in service."""
        return self.master.output

    def acknowledge(self):
        """INTA cycle: the vector to deliver. Call only when pending() (and IF=1); if the request
        vanished meanwhile this returns the spurious vector (IR7 of the master)."""
        m = self.master
        irq = m.best_irq()
        if irq < 0:
            self.spurious += 1
            return m.irq_base + 7
        if irq == 2:
            irq2 = self.slave.best_irq()
            if irq2 >= 0:
                self.slave.intack(irq2)
            else:
                irq2 = 7
                self.spurious += 1
            vector = self.slave.irq_base + irq2
        else:
            vector = m.irq_base + irq
        m.intack(irq)
        return vector

    # ---- port interface -----------------------------------------------------------------
    def io_read(self, port, size):
        if port in (0x20, 0x21):
            return self.master.read(port & 1)
        if port in (0xA0, 0xA1):
            return self.slave.read(port & 1)
        if port == 0x4D0:
            return self.master.elcr
        if port == 0x4D1:
            return self.slave.elcr
        return 0xFF

    def io_write(self, port, size, value):
        value &= 0xFF
        if port in (0x20, 0x21):
            self.master.write(port & 1, value)
        elif port in (0xA0, 0xA1):
            self.slave.write(port & 1, value)
        elif port in (0x4D0, 0x4D1):
            chip = self.master if port == 0x4D0 else self.slave
            chip.elcr = value & chip.elcr_mask
            # re-evaluate the current line levels under the new trigger mode
            for i in range(8):
                if chip.elcr & (1 << i):
                    if chip.lines & (1 << i):
                        chip.irr |= 1 << i
                    else:
                        chip.irr &= ~(1 << i)
            chip._update()

    def register(self, bus):
        bus.register(0x20, 0x21, self)
        bus.register(0xA0, 0xA1, self)
        bus.register(0x4D0, 0x4D1, self)

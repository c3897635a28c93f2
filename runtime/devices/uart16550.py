"""National 16550A UART (COM1 = 0x3F8, IRQ4).

Registers: RBR/THR, IER (4 bits), IIR/FCR (FIFO enable, RX/TX clear, trigger 1/4/8/14,
IIR bits 7:6 = 11 with FIFOs on), LCR (DLAB), DLL/DLM, MCR (DTR, RTS, OUT1, OUT2, LOOP),
LSR (DR, OE, THRE, TEMT; PE/FE/BI never happen here), MSR (CTS/DSR/RI/DCD + deltas,
loopback-wired from MCR), SCR.

Transmission is instantaneous: a byte written to THR goes to ``sink(bytes)`` at once (or to
the receiver in loopback), THR/TEMT stay empty and the THRE interrupt is re-armed. Setting
IER.ETBEI while THR is empty raises THRE again (16550 behaviour Linux's THRE test checks).
Interrupt priorities in IIR: receiver line status > received data available (FIFO at the
trigger level) / character timeout > THR empty (cleared by reading IIR or writing THR) >
modem status. The character timeout fires 4 character times after the last byte moved in or
out of a below-trigger RX FIFO (with a clock; without one it is immediate).

Input: ``feed(data)`` is the host side (stdin): lossless, bytes wait in a backlog until the
RX FIFO has room. ``receive(byte)`` is the wire: a byte arriving with the FIFO full is lost
(in 16450 mode it replaces the unread RBR) and sets OE (loopback uses this, so Linux's FIFO sizing sees 16).
The INTR output reaches the PIC only while MCR.OUT2 is set and loopback is off, as the
OUT2-gated IRQ buffer on PC serial cards.
"""
from collections import deque

from .bus import NullIRQ

UART_CLOCK = 1843200

LSR_DR, LSR_OE, LSR_PE, LSR_FE, LSR_BI, LSR_THRE, LSR_TEMT, LSR_FIFOERR = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
IIR_NONE, IIR_MSI, IIR_THRI, IIR_RDI, IIR_RLSI, IIR_CTI = 0x01, 0x00, 0x02, 0x04, 0x06, 0x0C

_TRIGGER = (1, 4, 8, 14)


class UART16550:
    FIFO_SIZE = 16

    def __init__(self, base=0x3F8, irq=None, sink=None, clock=None):
        self.base = base
        self.irq = irq or NullIRQ()
        self.sink = sink or (lambda data: None)
        self.clock = clock
        self._timer = clock.timer(self._on_timeout, name="uart-timeout") if clock else None
        self.rx = deque()
        self.backlog = deque()
        self.reset()

    def reset(self):
        self.rx.clear()
        self.ier = 0
        self.lcr = 0
        self.mcr = 0
        self.lsr = LSR_THRE | LSR_TEMT
        self.msr_lines = 0xB0          # external DCD, DSR, CTS asserted (a connected terminal)
        self.msr_delta = 0
        self.scr = 0
        self.dll = 0x0C                # 9600 baud
        self.dlm = 0
        self.fcr = 0
        self.thr_ipending = False
        self.timeout_pending = False
        self._irq_out = False
        self._last_rx_activity = 0
        if self._timer:
            self._timer.cancel()
        self._update()

    # ---- derived state ----------------------------------------------------------------
    @property
    def fifo_enabled(self):
        return bool(self.fcr & 1)

    @property
    def divisor(self):
        return (self.dlm << 8) | self.dll

    @property
    def baud(self):
        return UART_CLOCK // (16 * self.divisor) if self.divisor else 0

    def char_time_ns(self):
        bits = 1 + 5 + (self.lcr & 3) + (1 if self.lcr & 8 else 0) + (2 if self.lcr & 4 else 1)
        return bits * 16 * max(self.divisor, 1) * 1_000_000_000 // UART_CLOCK

    def _loop(self):
        return bool(self.mcr & 0x10)

    def msr_value(self):
        if self._loop():
            m = self.mcr
            lines = (((m & 2) << 3) | ((m & 1) << 5) | ((m & 4) << 4) | ((m & 8) << 4))
        else:
            lines = self.msr_lines
        return lines | self.msr_delta

    def _set_lines(self, new):
        self._deltas(self.msr_value() & 0xF0, new)

    def _deltas(self, old, new):
        ch = old ^ new
        if ch & 0x10: self.msr_delta |= 0x01
        if ch & 0x20: self.msr_delta |= 0x02
        if (old & 0x40) and not (new & 0x40): self.msr_delta |= 0x04   # TERI: RI falling
        if ch & 0x80: self.msr_delta |= 0x08

    def set_modem_lines(self, cts=True, dsr=True, ri=False, dcd=True):
        new = (0x10 if cts else 0) | (0x20 if dsr else 0) | (0x40 if ri else 0) | (0x80 if dcd else 0)
        if not self._loop():
            self._set_lines(new)
        self.msr_lines = new
        self._update()

    def iir_id(self):
        ier = self.ier
        if ier & 0x04 and self.lsr & (LSR_OE | LSR_PE | LSR_FE | LSR_BI):
            return IIR_RLSI
        if ier & 0x01:
            if self.fifo_enabled:
                if len(self.rx) >= _TRIGGER[self.fcr >> 6]:
                    return IIR_RDI
                if self.timeout_pending and self.rx:
                    return IIR_CTI
            elif self.rx:
                return IIR_RDI
        if ier & 0x02 and self.thr_ipending:
            return IIR_THRI
        if ier & 0x08 and self.msr_delta:
            return IIR_MSI
        return IIR_NONE

    def _update(self):
        if self.rx:
            self.lsr |= LSR_DR
        else:
            self.lsr &= ~LSR_DR
        level = self.iir_id() != IIR_NONE and bool(self.mcr & 0x08) and not self._loop()
        if level != self._irq_out:
            self._irq_out = level
            self.irq.set_level(level)

    # ---- receive ----------------------------------------------------------------------
    def _capacity(self):
        return self.FIFO_SIZE if self.fifo_enabled else 1

    def _rx_activity(self):
        self.timeout_pending = False
        if not self.fifo_enabled:
            return
        if self._timer is None:
            self.timeout_pending = bool(self.rx)
        elif self.rx:
            self._timer.mod(self.clock.now_ns() + 4 * self.char_time_ns())
        else:
            self._timer.cancel()

    def _on_timeout(self, deadline):
        if self.rx and self.fifo_enabled:
            self.timeout_pending = True
            self._update()

    def receive(self, byte):
        """A character arriving on the wire; with no room it sets OE and (PC16550D datasheet, LSR
        bit 1) replaces the unread RBR in 16450 mode, or is lost with the FIFO full."""
        if len(self.rx) >= self._capacity():
            self.lsr |= LSR_OE
            if not self.fifo_enabled:
                self.rx[-1] = byte & 0xFF
        else:
            self.rx.append(byte & 0xFF)
            self._rx_activity()
        self._update()

    def feed(self, data):
        """Host input (stdin): lossless; waits in a backlog while the RX FIFO is full."""
        self.backlog.extend(data)
        self._drain_backlog()

    def _drain_backlog(self):
        moved = False
        cap = self._capacity()
        while self.backlog and len(self.rx) < cap and not self._loop():
            self.rx.append(self.backlog.popleft())
            moved = True
        if moved:
            self._rx_activity()
            self._update()

    # ---- transmit ---------------------------------------------------------------------
    def _transmit(self, byte):
        if self._loop():
            self.receive(byte)
        else:
            self.sink(bytes([byte]))
        self.lsr |= LSR_THRE | LSR_TEMT
        self.thr_ipending = True

    # ---- ports ------------------------------------------------------------------------
    def io_read(self, port, size):
        off = (port - self.base) & 7
        if off == 0:
            if self.lcr & 0x80:
                return self.dll
            v = self.rx.popleft() if self.rx else 0
            self._rx_activity()
            self._drain_backlog()
            self._update()
            return v
        if off == 1:
            return self.dlm if self.lcr & 0x80 else self.ier
        if off == 2:
            v = self.iir_id()
            if v == IIR_THRI:
                self.thr_ipending = False
                self._update()
            return v | (0xC0 if self.fifo_enabled else 0)
        if off == 3:
            return self.lcr
        if off == 4:
            return self.mcr
        if off == 5:
            v = self.lsr
            self.lsr &= ~(LSR_OE | LSR_PE | LSR_FE | LSR_BI)
            self._update()
            return v
        if off == 6:
            v = self.msr_value()
            self.msr_delta = 0
            self._update()
            return v
        return self.scr

    def io_write(self, port, size, value):
        off = (port - self.base) & 7
        value &= 0xFF
        if off == 0:
            if self.lcr & 0x80:
                self.dll = value
            else:
                self.thr_ipending = False
                self._transmit(value)
                self._update()
        elif off == 1:
            if self.lcr & 0x80:
                self.dlm = value
            else:
                changed = (self.ier ^ value) & 0x02
                self.ier = value & 0x0F
                if changed:
                    self.thr_ipending = bool(self.ier & 0x02 and self.lsr & LSR_THRE)
                self._update()
        elif off == 2:
            old = self.fcr
            if (value ^ old) & 1:
                self.rx.clear()
            if value & 0x02:
                self.rx.clear()
                self.lsr &= ~LSR_FIFOERR
            self.fcr = value & 0xC9 if value & 1 else 0
            self._rx_activity()
            self._drain_backlog()
            self._update()
        elif off == 3:
            self.lcr = value
        elif off == 4:
            old_msr = self.msr_value() & 0xF0
            was_loop = self._loop()
            self.mcr = value & 0x1F
            new_msr = self.msr_value() & 0xF0
            self._deltas(old_msr, new_msr)
            if was_loop and not self._loop():
                self._drain_backlog()
            self._update()
        elif off == 5:
            pass                                   # LSR: factory test only
        elif off == 6:
            pass
        else:
            self.scr = value

    def register(self, bus):
        bus.register(self.base, self.base + 7, self)

"""Intel 8042 keyboard controller (0x60 data, 0x64 status/command), IRQ1 (keyboard) and
IRQ12 (aux), with a minimal AT keyboard attached and no mouse on the aux port.

Status (0x64 read): OBF, IBF (always 0: commands complete instantly), SYS, A2 (last write
was a command), INH (1: not inhibited), AUXB (output byte is from aux), TIMEOUT.
Controller commands: 0x20 read command byte, 0x60 write it, 0xA7/0xA8 disable/enable aux,
0xA9 aux interface test (00), 0xAA self-test (55, sets SYS), 0xAB keyboard interface test
(00), 0xAD/0xAE disable/enable keyboard, 0xC0 read input port, 0xD0/0xD1 read/write
output port (bit 0 = 0 resets the machine, bit 1 = A20), 0xD2/0xD3 write keyboard/aux
output buffer (the loopback Linux uses to find the aux port), 0xD4 write to the aux
device (nobody there: answers 0xFE with TIMEOUT|AUXB, so psmouse gives up at once),
0xDD/0xDF A20 off/on, 0xF0-0xFF pulse output-port bits (0xFE: reset).
Keyboard commands (bytes written to 0x60): 0xFF reset (FA AA), 0xF2 identify (FA AB 83, or
AB 41 with translation on), 0xED/0xF3/0xF0 take an argument (FA FA; F0 00 reports set 2),
0xEE echo, 0xF4/0xF5/0xF6 enable/disable/defaults (FA), others FE.
The output buffer raises IRQ1 (command byte bit 0) or IRQ12 (bit 1) as a level line that
drops and rises again for every byte.
"""
from collections import deque

from .bus import NullIRQ

ST_OBF, ST_IBF, ST_SYS, ST_CMD, ST_UNLOCKED, ST_AUXB, ST_TIMEOUT, ST_PARITY = (
    0x01, 0x02, 0x04, 0x08, 0x10, 0x20, 0x40, 0x80)
CB_KBDINT, CB_AUXINT, CB_SYS, CB_KBDDIS, CB_AUXDIS, CB_XLATE = 0x01, 0x02, 0x04, 0x10, 0x20, 0x40


class PS2Keyboard:
    """Just enough of an AT keyboard to answer Linux's atkbd probe."""

    def __init__(self, send):
        self.send = send            # send(byte) into the controller
        self.expect_arg = None
        self.enabled = True
        self.scancode_set = 2

    def write(self, b, translate):
        if self.expect_arg is not None:
            cmd, self.expect_arg = self.expect_arg, None
            if cmd == 0xF0 and b == 0:
                self.send(0xFA)
                self.send({1: 0x43, 2: 0x41, 3: 0x3F}[self.scancode_set] if translate else self.scancode_set)
                return
            if cmd == 0xF0 and b in (1, 2, 3):
                self.scancode_set = b
            self.send(0xFA)
            return
        if b == 0xFF:
            self.enabled = True
            self.send(0xFA)
            self.send(0xAA)
        elif b == 0xF2:
            self.send(0xFA)
            self.send(0xAB)
            self.send(0x41 if translate else 0x83)
        elif b in (0xED, 0xF3, 0xF0):
            self.expect_arg = b
            self.send(0xFA)
        elif b == 0xEE:
            self.send(0xEE)
        elif b in (0xF4, 0xF5, 0xF6):
            self.enabled = b != 0xF5
            self.send(0xFA)
        else:
            self.send(0xFE)


class I8042:
    def __init__(self, irq_kbd=None, irq_aux=None, reset=None, a20=None):
        self.irq_kbd = irq_kbd or NullIRQ()
        self.irq_aux = irq_aux or NullIRQ()
        self.on_reset = reset or (lambda: None)
        self.on_a20 = a20 or (lambda enabled: None)
        self.kbd = PS2Keyboard(self._kbd_send)
        self.reset()

    def reset(self):
        self.cmd_byte = CB_KBDINT | CB_AUXINT | CB_SYS | CB_XLATE
        self.status = ST_UNLOCKED | ST_SYS
        self.outport = 0x03                     # reset line high (inactive), A20 enabled
        self.pending_cmd = None
        self.ctrl_q = deque()                   # (byte, aux, extra status)
        self.kbd_q = deque()
        self.aux_q = deque()
        self.obuf = None
        self._lines = (False, False)
        self._update()

    # ---- output buffer -----------------------------------------------------------------
    def _kbd_send(self, b):
        self.kbd_q.append(b & 0xFF)
        self._update()

    def _ctrl(self, b, aux=False, extra=0):
        self.ctrl_q.append((b & 0xFF, aux, extra))
        self._update()

    def _fill(self):
        if self.obuf is not None:
            return
        if self.ctrl_q:
            self.obuf = self.ctrl_q.popleft()
        elif self.kbd_q and not self.cmd_byte & CB_KBDDIS:
            self.obuf = (self.kbd_q.popleft(), False, 0)
        elif self.aux_q and not self.cmd_byte & CB_AUXDIS:
            self.obuf = (self.aux_q.popleft(), True, 0)

    def _update(self):
        self._fill()
        self.status &= ~(ST_OBF | ST_AUXB | ST_TIMEOUT)
        kbd = aux = False
        if self.obuf is not None:
            _, is_aux, extra = self.obuf
            self.status |= ST_OBF | (ST_AUXB if is_aux else 0) | extra
            if is_aux:
                aux = bool(self.cmd_byte & CB_AUXINT)
            else:
                kbd = bool(self.cmd_byte & CB_KBDINT)
        self._set_lines(kbd, aux)

    def _set_lines(self, kbd, aux):
        old_k, old_a = self._lines
        if kbd != old_k:
            self.irq_kbd.set_level(kbd)
        if aux != old_a:
            self.irq_aux.set_level(aux)
        self._lines = (kbd, aux)

    def _read_data(self):
        if self.obuf is None:
            return 0x00
        b = self.obuf[0]
        self.obuf = None
        self._set_lines(False, False)           # the next byte makes a fresh edge
        self._update()
        return b

    # ---- output port ----------------------------------------------------------------
    def _write_outport(self, v):
        old = self.outport
        self.outport = v | 0x01 if v & 1 else v
        if (old ^ v) & 0x02:
            self.on_a20(bool(v & 0x02))
        if not v & 1:
            self.outport |= 0x01                # the reset line is pulsed, not held
            self.on_reset()

    # ---- ports ------------------------------------------------------------------------
    def io_read(self, port, size):
        if port == 0x64:
            return self.status
        return self._read_data()

    def io_write(self, port, size, value):
        value &= 0xFF
        if port == 0x64:
            self.status |= ST_CMD
            self._command(value)
            return
        self.status &= ~ST_CMD
        cmd, self.pending_cmd = self.pending_cmd, None
        if cmd == 0x60:
            self.cmd_byte = value
            self.status = (self.status & ~ST_SYS) | (ST_SYS if value & CB_SYS else 0)
            self._update()
        elif cmd == 0xD1:
            self._write_outport(value)
        elif cmd == 0xD2:
            self._ctrl(value)
        elif cmd == 0xD3:
            self._ctrl(value, aux=True)
        elif cmd == 0xD4:
            self._ctrl(0xFE, aux=True, extra=ST_TIMEOUT)     # no aux device attached
        else:
            self.cmd_byte &= ~CB_KBDDIS          # talking to the keyboard re-enables it
            self.kbd.write(value, bool(self.cmd_byte & CB_XLATE))
            self._update()

    def _command(self, c):
        if c == 0x20:
            self._ctrl(self.cmd_byte)
        elif c in (0x60, 0xD1, 0xD2, 0xD3, 0xD4):
            self.pending_cmd = c
        elif c == 0xA7:
            self.cmd_byte |= CB_AUXDIS
        elif c == 0xA8:
            self.cmd_byte &= ~CB_AUXDIS
            self._update()
        elif c == 0xA9:
            self._ctrl(0x00)
        elif c == 0xAA:
            self.status |= ST_SYS
            self._ctrl(0x55)
        elif c == 0xAB:
            self._ctrl(0x00)
        elif c == 0xAD:
            self.cmd_byte |= CB_KBDDIS
        elif c == 0xAE:
            self.cmd_byte &= ~CB_KBDDIS
            self._update()
        elif c == 0xC0:
            self._ctrl(0xBF)
        elif c == 0xD0:
            v = self.outport & 0xCF
            if self.obuf is not None:
                v |= 0x20 if self.obuf[1] else 0x10
            self._ctrl(v)
        elif c == 0xDD:
            self._write_outport(self.outport & ~0x02)
        elif c == 0xDF:
            self._write_outport(self.outport | 0x02)
        elif c >= 0xF0:
            if not c & 1:
                self.on_reset()
        # anything else: ignored

    def register(self, bus):
        bus.register(0x60, 0x60, self)
        bus.register(0x64, 0x64, self)

"""The serial console on stdio: host stdin feeds COM1, COM1 output goes to stdout.

With a terminal, stdin is switched to raw mode (restored on exit) so keys reach the
guest's ttyS0 unchanged; Ctrl-A x quits and Ctrl-A Ctrl-A sends a Ctrl-A, as in
QEMU.  Without a terminal, stdin is read as it is until end of file.
"""
import os
import select
import sys

CTRL_A = 0x01


class QuitRequest(Exception):
    pass


class Console:
    def __init__(self, uart, stdin=None):
        self.uart = uart
        self.fd = (stdin or sys.stdin).fileno() if (stdin or sys.stdin) is not None else None
        self.tty = self.fd is not None and os.isatty(self.fd)
        self.saved = None
        self.escape = False
        self.eof = self.fd is None

    def __enter__(self):
        if self.tty:
            import termios
            import tty
            self.saved = termios.tcgetattr(self.fd)
            tty.setraw(self.fd)
        return self

    def __exit__(self, *exc):
        if self.saved is not None:
            import termios
            termios.tcsetattr(self.fd, termios.TCSADRAIN, self.saved)
            self.saved = None
        return False

    def poll(self, timeout=0.0):
        """Move pending stdin bytes into the UART; raises QuitRequest on Ctrl-A x."""
        if self.eof:
            return
        try:
            ready, _, _ = select.select([self.fd], [], [], timeout)
        except (OSError, ValueError):
            self.eof = True
            return
        if not ready:
            return
        data = os.read(self.fd, 4096)
        if not data:
            self.eof = True
            return
        if not self.tty:
            self.uart.feed(data)
            return
        out = bytearray()
        for b in data:
            if self.escape:
                self.escape = False
                if b in (ord("x"), ord("X")):
                    raise QuitRequest()
                if b == CTRL_A:
                    out.append(CTRL_A)
                continue
            if b == CTRL_A:
                self.escape = True
                continue
            out.append(b)
        if out:
            self.uart.feed(bytes(out))

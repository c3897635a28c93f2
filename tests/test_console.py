"""The serial console on stdio: raw terminal input reaches the UART; Ctrl-A x quits; Ctrl-A Ctrl-A
sends one Ctrl-A; without a terminal, stdin bytes pass through unchanged."""
import os
import pty

import pytest

from runtime.system.console import Console, QuitRequest


class FakeUART:
    def __init__(self):
        self.got = bytearray()

    def feed(self, data):
        self.got += data


class FD:
    def __init__(self, fd):
        self.fd = fd

    def fileno(self):
        return self.fd


def test_terminal_input_raw_mode_and_escape():
    master, slave = pty.openpty()
    uart = FakeUART()
    try:
        with Console(uart, FD(slave)) as con:
            assert con.tty
            os.write(master, b"ls\r\x01\x01q")
            for _ in range(20):
                con.poll(0.05)
            assert bytes(uart.got) == b"ls\r\x01q"          # raw: CR kept, no echo processing
            os.write(master, b"\x01x")
            with pytest.raises(QuitRequest):
                for _ in range(20):
                    con.poll(0.05)
    finally:
        os.close(master)
        os.close(slave)


def test_pipe_input_passes_through_until_eof():
    r, w = os.pipe()
    uart = FakeUART()
    os.write(w, b"echo hi\n\x01x")
    os.close(w)
    with Console(uart, FD(r)) as con:
        assert not con.tty
        for _ in range(5):
            con.poll(0.01)
        assert con.eof
    os.close(r)
    assert bytes(uart.got) == b"echo hi\n\x01x"

"""`btvm boot -timeout SECONDS`: a guest that never ends (spinning with interrupts off, or
halted with interrupts on and nothing to wake it) is stopped after SECONDS of wall clock with
status 124 and a one-line report naming the timeout and the guest's eip."""
import subprocess
import sys
import time

import pytest

from tests.test_system import build

SPIN = "    cli\nspin_here:\n    jmp spin_here\n"
# Mask both PICs first: the power-on PIC/PIT would otherwise wake the HLT.
HALT = "    mov al, 0xff\n    out 0x21, al\n    out 0xa1, al\n    sti\nidle_here:\n    hlt\n    jmp idle_here\n"
DONE = "    mov dx, 0x3f8\n    mov al, 0x6b\n    out dx, al\n    mov al, 2\n    out 0xf4, al\n"


def _boot(tmp_path, body, *args):
    path = tmp_path / "kernel"
    path.write_bytes(build(body))
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot", "-no-stdin", "-m", "8", "-kernel", str(path),
                          *args], capture_output=True, text=True, timeout=120)
    return out, time.monotonic() - t0


@pytest.mark.parametrize("body,clock", [(SPIN, "icount"), (HALT, "icount"), (HALT, "host")],
                         ids=["spin", "halt-icount", "halt-host"])
def test_endless_guest_is_stopped(tmp_path, body, clock):
    out, took = _boot(tmp_path, body, "-timeout", "2", "-clock", clock)
    assert out.returncode == 124, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "timeout after 2 s" in lines[0] and "eip=0x" in lines[0], out.stderr
    assert "Traceback" not in out.stderr
    assert 2 <= took < 2 + 15, took        # interpreter start-up and translation on a busy host


def test_guest_that_finishes_first_is_unaffected(tmp_path):
    out, _ = _boot(tmp_path, DONE, "-timeout", "60")
    assert out.returncode == 5 and out.stdout == "k" and out.stderr == "", out.stderr


def test_timeout_is_documented_and_checked():
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot", "--help"], capture_output=True, text=True)
    assert "-timeout" in out.stdout and "124" in out.stdout
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot", "-timeout", "0"], capture_output=True, text=True)
    assert out.returncode == 1 and "-timeout" in out.stderr

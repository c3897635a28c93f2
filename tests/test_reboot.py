"""`btvm boot` on a triple fault or a guest reset request: btvm exits (status 1 and a one-line
report for a triple fault, status 0 for a reset request), also with QEMU's -no-reboot; with
-reboot the machine resets and the kernel boots again, as QEMU's default."""
import os
import subprocess
import sys
import time

import pytest

from tests.test_system import build

BANNER = "    mov dx, 0x3f8\n" + "".join(f"    mov al, {ord(c)}\n    out dx, al\n" for c in "boot\n")
TRIPLE = "    lidt [0x300400]\n    int3\n"                 # an empty IDT: #GP, #DF, then shutdown
RESET = "    mov al, 0xfe\n    out 0x64, al\n    hlt\n"     # i8042: pulse the reset line


def _kernel(tmp_path, body):
    path = tmp_path / "kernel"
    path.write_bytes(build(BANNER + body))
    return str(path)


def _boot(*args):
    return [sys.executable, "-m", "runtime.cli", "boot", "-no-stdin", "-m", "8", *args]


@pytest.mark.parametrize("flags", [[], ["-no-reboot"]])
@pytest.mark.parametrize("body,status,message", [(TRIPLE, 1, "triple fault"), (RESET, 0, "reset")])
def test_default_exits(tmp_path, body, status, message, flags):
    out = subprocess.run(_boot("-kernel", _kernel(tmp_path, body), *flags),
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == status, out.stderr
    assert message in out.stderr and out.stdout.count("boot") == 1, (out.stdout, out.stderr)


@pytest.mark.parametrize("body", [TRIPLE, RESET])
def test_reboot_resets_and_boots_again(tmp_path, body):
    proc = subprocess.Popen(_boot("-kernel", _kernel(tmp_path, body), "-reboot"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    seen = b""
    deadline = time.monotonic() + 300
    os.set_blocking(proc.stdout.fileno(), False)
    try:
        while time.monotonic() < deadline and proc.poll() is None and seen.count(b"boot") < 3:
            seen += proc.stdout.read() or b""
            time.sleep(0.1)
        seen += proc.stdout.read() or b""
    finally:
        proc.kill()
        err = proc.communicate()[1]
    assert seen.count(b"boot") >= 3, (seen, err[-2000:])
    assert b"Traceback" not in err


def test_help_documents_no_reboot():
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot", "--help"], capture_output=True, text=True)
    assert "-reboot" in out.stdout and "-no-reboot" in out.stdout and "triple fault" in out.stdout

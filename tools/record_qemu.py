#!/usr/bin/env python3
"""Record the serial output and exit status of the project's reporting kernels
(tests/qemu_kernels.py) under qemu-system-i386 into tests/expected/qemu/NAME.txt, which
tests/test_qemu_recorded.py compares with btvm byte for byte.

    python tools/record_qemu.py [NAME...]      (default: all kernels)

QEMU boots the a.out-kludge Multiboot images directly (-kernel); its firmware prints to the same
serial port first, so the output is kept from the kernel's "@@ NAME" line on.  Lines QEMU gets
wrong (checked against the Intel SDM) are left out (tests/qemu_kernels.py EXCLUDE) and listed in
the file's "%%" header lines with the reason (also the lines QEMU fails to print, which only btvm's
output has).
"""
import os
import re
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from tests.qemu_kernels import EXCLUDE, KERNELS  # noqa: E402

OUT_DIR = os.path.join(ROOT, "tests", "expected", "qemu")
QEMU = "qemu-system-i386"
ARGS = ["-accel", "tcg", "-nographic", "-no-reboot", "-m", "16", "-monitor", "none",
        "-device", "isa-debug-exit,iobase=0xf4,iosize=0x04"]


def qemu_version():
    out = subprocess.run([QEMU, "--version"], capture_output=True, text=True, check=True).stdout
    return out.splitlines()[0].strip()


def run_qemu(image, timeout=60):
    """Serial output (from the kernel's first line on) and exit status of one boot."""
    with tempfile.TemporaryDirectory() as tmp:
        kernel, serial = os.path.join(tmp, "kernel"), os.path.join(tmp, "serial")
        with open(kernel, "wb") as f:
            f.write(image)
        proc = subprocess.run([QEMU, *ARGS, "-kernel", kernel, "-serial", f"file:{serial}"],
                              stdin=subprocess.DEVNULL, capture_output=True, timeout=timeout)
        with open(serial, "rb") as f:
            out = f.read()
    start = out.find(b"@@ ")
    return (out[start:] if start >= 0 else out), proc.returncode


def record(name):
    out, status = run_qemu(KERNELS[name]())
    lines = out.decode("latin-1").splitlines(keepends=True)
    header = [f"%% recorded from {qemu_version()} by tools/record_qemu.py; status {status}\n"]
    kept = []
    for ln in lines:
        rule = next(((p, why) for (k, p), (_, why) in EXCLUDE.items() if k == name and ln.startswith(p)), None)
        if rule is None:
            kept.append(ln)
        else:
            header.append(f"%% excluded: {ln.rstrip()}  -- {rule[1]}\n")
    for (k, p), (_, why) in EXCLUDE.items():
        if k == name and not any(ln.startswith(p) for ln in lines):
            header.append(f"%% btvm only: {p.strip()}  -- {why}\n")
    path = os.path.join(OUT_DIR, f"{name}.txt")
    os.makedirs(OUT_DIR, exist_ok=True)
    with open(path, "w", encoding="latin-1", newline="") as f:
        f.write("".join(header + kept))
    print(f"{path}: {len(kept)} lines, status {status}, {len(header) - 1} excluded")


def parse(path):
    """(expected output, exit status) of a recorded file."""
    with open(path, encoding="latin-1", newline="") as f:
        lines = f.read().splitlines(keepends=True)
    status = int(re.search(r"status (\d+)", lines[0]).group(1))
    return "".join(ln for ln in lines if not ln.startswith("%% ")), status


if __name__ == "__main__":
    for name in sys.argv[1:] or KERNELS:
        record(name)

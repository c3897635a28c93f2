"""Boot Debian's unmodified 686 kernel with a busybox initramfs under `btvm boot` (slow: minutes).

Run with `pytest -m slow`; .ci/run runs it after the default suite.  The guest images come from
tools/fetch_guests.sh all (Debian packages, cached); the test builds its own initramfs.
"""
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow
ROOT = Path(__file__).resolve().parent.parent

SCRIPT = """echo "== uname"; uname -a
echo "== cpuinfo"; cat /proc/cpuinfo
echo "== ls"; ls /
echo "== loop"; i=0; while [ $i -lt 5 ]; do i=$((i+1)); echo "iter $i"; done
echo "== bg"; (sleep 1; echo "background job done") & wait
echo "== pipe"; seq 1 10 | sort -rn | head -3
"""


def _guests():
    out = subprocess.run(["sh", str(ROOT / "tools/fetch_guests.sh"), "all"], capture_output=True, text=True)
    if out.returncode != 0:
        pytest.fail(f"tools/fetch_guests.sh all failed: {out.stderr.strip()[-500:]}")
    paths = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return paths


@pytest.fixture(scope="module")
def guests(tmp_path_factory):
    paths = _guests()
    d = tmp_path_factory.mktemp("initrd")
    script = d / "script.sh"
    script.write_text(SCRIPT)
    initrd = d / "initrd.cpio.gz"
    subprocess.run([sys.executable, str(ROOT / "tools/make_initramfs.py"), "--busybox", paths["busybox"],
                    "--script", str(script), "-o", str(initrd)], check=True, capture_output=True)
    paths["initrd"] = str(initrd)
    return paths


def test_debian_kernel_boots_to_shell_and_powers_off(guests):
    t0 = time.monotonic()
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot", "-kernel", guests["kernel"],
                          "-initrd", guests["initrd"], "-append", "console=ttyS0", "-m", "256", "-no-stdin"],
                         capture_output=True, timeout=3000, cwd=ROOT)
    text = out.stdout.decode(errors="replace")
    took = time.monotonic() - t0
    print(f"Linux boot under btvm: {took:.0f} s, exit {out.returncode}")
    assert out.returncode == 0, (out.stderr.decode()[-2000:], text[-3000:])
    assert "BTVM-INIT-OK" in text
    for marker in ("== uname", "6.1.0", "i686", "vendor_id\t: BTVMbtvmBTVM", "flags\t\t: fpu", "== ls",
                   "iter 5", "background job done", "10\n9\n8", "BTVM-SCRIPT-EXIT 0", "reboot: System halted"):
        assert marker.replace("\n", "\r\n") in text or marker in text, marker


def test_memtest86plus_prints_its_banner(guests):
    if "memtest" not in guests:
        pytest.skip("memtest86+ image not found by tools/fetch_guests.sh")
    proc = subprocess.Popen([sys.executable, "-m", "runtime.cli", "boot", "-kernel", guests["memtest"], "-m", "64",
                             "-append", "console=ttyS0,115200",
                             "-no-stdin"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    deadline = time.monotonic() + 900
    seen = b""
    os.set_blocking(proc.stdout.fileno(), False)
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            chunk = proc.stdout.read() or b""
            seen += chunk
            if b"Memtest86+" in seen or b"memtest86+" in seen.lower():
                break
            time.sleep(0.5)
        seen += proc.stdout.read() or b""
    finally:
        proc.kill()
        proc.wait()
    assert b"memtest86+" in seen.lower(), seen[-2000:]

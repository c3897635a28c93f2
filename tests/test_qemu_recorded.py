"""btvm against serial output recorded from qemu-system-i386 (tools/record_qemu.py re-records;
this test does not need QEMU): each kernel of tests/qemu_kernels.py prints what it observes
(exception frames, paging faults, ring transitions, PIC/PIT, RTC, UART registers), and btvm
must print the same bytes and exit with the same status.  Lines where QEMU deviates from the SDM
are not recorded; btvm's are checked for what the SDM says instead (EXCLUDE)."""
import os
import sys

import pytest

from runtime.system.machine import Machine
from tests.qemu_kernels import EXCLUDE, KERNELS

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
from record_qemu import OUT_DIR, parse  # noqa: E402


def _btvm(image):
    out = bytearray()
    m = Machine(ram_mb=16, serial_out=out.extend, icount=True)   # -m 16, as recorded
    try:
        m.load_multiboot(image)
        res = m.run(timeout=300)
    finally:
        m.close()
    return out.decode("latin-1"), res


@pytest.mark.parametrize("name", sorted(KERNELS))
def test_matches_qemu_recording(name):
    expected, status = parse(os.path.join(OUT_DIR, f"{name}.txt"))
    out, res = _btvm(KERNELS[name]())
    kept = []
    for line in out.splitlines(keepends=True):
        rule = next((must for (k, p), (must, _) in EXCLUDE.items() if k == name and line.startswith(p)), None)
        if rule is None:
            kept.append(line)
        else:
            assert rule in line, line
    assert "".join(kept) == expected
    assert res.status == status, res.message


def test_every_kernel_is_recorded():
    recorded = {f[:-4] for f in os.listdir(OUT_DIR) if f.endswith(".txt")}
    assert recorded == set(KERNELS)

"""The code cache's memory figure (runtime/memstat.py) counts what btvm allocates, not the
guest's RAM, and adds the tier-2 worker's memory."""
import subprocess
import sys
import time

import pytest

from runtime.memory import GuestMemory
from runtime.memstat import CacheMemory, anon_bytes

MiB = 1 << 20
pytestmark = pytest.mark.skipif(anon_bytes() is None, reason="needs /proc/self/status and pagemap (Linux)")


def test_host_allocations_count_and_guest_ram_does_not():
    mem = GuestMemory()
    try:
        m = CacheMemory(mem.base, 64 * MiB)
        mem.write(0, b"\x01" * (48 * MiB))           # the guest's RAM: not the code cache's
        mem.read(48 * MiB, 16 * MiB)                  # read, never written: the zero page
        guest_only = m.bytes()
        held = bytearray(b"\x02" * (32 * MiB))       # btvm's own: counted
        both = m.bytes()
        del held
    finally:
        mem.close()
    assert abs(guest_only) < 12 * MiB
    assert 28 * MiB < both - guest_only < 40 * MiB


def test_the_worker_process_counts():
    child = subprocess.Popen([sys.executable, "-c", "import sys; x = b'1' * (40 << 20); sys.stdin.read()"],
                             stdin=subprocess.PIPE)
    try:
        alone = CacheMemory(0, 0).bytes()
        m = CacheMemory(0, 0, worker_pid=lambda: child.pid)
        deadline = time.monotonic() + 20
        while m.bytes() - alone < 40 * MiB and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m.bytes() - alone >= 40 * MiB
    finally:
        child.stdin.close()
        child.wait()

"""What btvm's code cache costs in resident memory (for `-status` and bench_boot).

The figure is the growth of btvm's anonymous resident memory since the guest started,
without the guest's own RAM (only the pages the guest has written are resident), plus all
the anonymous memory of the tier-2 worker process (it exists only to compile regions).
Library pages are left out: they are the same whether or not anything was translated.
Anonymous, not "private": a library's clean file pages count as private only until another
process maps the same file (the tier-2 worker maps libllvmlite's ~90 MiB).
"""
import mmap


def anon_bytes(pid="self"):
    """Anonymous resident bytes of process pid (RssAnon: a counter, no page walk), or None if
    /proc cannot tell."""
    try:
        with open(f"/proc/{pid}/status", "rb") as f:
            for line in f:
                if line.startswith(b"RssAnon:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


# /proc/self/pagemap has a u64 per page; its top byte holds bit 63 (present) and bit 56 (mapped
# exclusively): a page the guest wrote.  A page it only read maps the shared zero page: present,
# not exclusive (mincore would count it).
_WRITTEN = bytes(1 if b & 0x81 == 0x81 else 0 for b in range(256))


def anon_bytes_in(addr, size):
    """Bytes of [addr, addr+size) (page-aligned) that this process has written: ~1.5 ms for a
    256 MiB guest.  0 if /proc/self/pagemap cannot be read."""
    page = mmap.PAGESIZE
    try:
        with open("/proc/self/pagemap", "rb") as f:
            f.seek(addr // page * 8)
            data = f.read((size + page - 1) // page * 8)
    except OSError:
        return 0
    return data[7::8].translate(_WRITTEN).count(1) * page


class CacheMemory:
    """The code cache's resident memory, measured against the moment this is made."""

    def __init__(self, guest_addr, guest_size, worker_pid=lambda: None):
        self.guest = (guest_addr, guest_size)
        self.worker_pid = worker_pid
        self.start = anon_bytes()
        self.guest_start = anon_bytes_in(*self.guest)

    def bytes(self):
        """Bytes now, or None where /proc cannot tell."""
        now = anon_bytes()
        if now is None or self.start is None:
            return None
        pid = self.worker_pid()
        worker = (anon_bytes(pid) or 0) if pid else 0
        return now - self.start - (anon_bytes_in(*self.guest) - self.guest_start) + worker

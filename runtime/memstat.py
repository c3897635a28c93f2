"""What btvm's code cache costs in resident memory (for `-status` and bench_boot).

The figure is the growth of btvm's anonymous resident memory since the guest started,
without the guest's own RAM (only the pages the guest has written are resident), plus all
the anonymous memory of the tier-2 worker process (it exists only to compile regions).
Library pages are left out: they are the same whether or not anything was translated.
Anonymous, not "private": a library's clean file pages count as private only until another
process maps the same file (the tier-2 worker maps libllvmlite's ~90 MiB).
"""
import time

GUEST_EVERY = 10.0      # seconds between walks of the guest's RAM (~15 ms each for a Linux guest)


def _anon(line):
    return int(line.split()[1]) * 1024 if line.startswith(b"Anonymous:") else 0


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


def anon_bytes_in(addr, size):
    """Anonymous resident bytes of this process's mappings that start in [addr, addr+size).
    (Not mincore: a guest's read of a page it never wrote maps the shared zero page, which
    mincore counts as resident.)"""
    total, inside = 0, False
    try:
        with open("/proc/self/smaps", "rb") as f:
            for line in f:
                if not line[:1].isupper():          # a mapping's first line: "lo-hi perms ..."
                    inside = addr <= int(line[:line.index(b"-")], 16) < addr + size
                elif inside:
                    total += _anon(line)
    except (OSError, ValueError):
        return 0
    return total


class CacheMemory:
    """The code cache's resident memory, measured against the moment this is made.  The guest's
    RAM is walked at most every GUEST_EVERY seconds: in between, what the guest wrote since
    counts as the code cache's (the figure is never below the truth)."""

    def __init__(self, guest_addr, guest_size, worker_pid=lambda: None):
        self.guest = (guest_addr, guest_size)
        self.worker_pid = worker_pid
        self.start = anon_bytes()
        self.guest_start = self.guest_now = anon_bytes_in(*self.guest)
        self.guest_at = time.monotonic()

    def bytes(self):
        """Bytes now, or None where /proc cannot tell."""
        now = anon_bytes()
        if now is None or self.start is None:
            return None
        if time.monotonic() - self.guest_at >= GUEST_EVERY:
            self.guest_now, self.guest_at = anon_bytes_in(*self.guest), time.monotonic()
        pid = self.worker_pid()
        worker = (anon_bytes(pid) or 0) if pid else 0
        return now - self.start - (self.guest_now - self.guest_start) + worker

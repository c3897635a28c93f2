"""Guest memory for flat (unpaged) machines: the 4 GiB linear space in one host reservation.

The whole 32-bit space is one MAP_NORESERVE mapping, so a guest address can
never reach host memory outside it, and only pages the guest touches cost RAM.
Guest-visible permissions are kept per page here and enforced by the soft-MMU
slow path, which is the only place that fills the TLB.
"""
import ctypes
import mmap
import os

PAGE = 0x1000
R, W, X = 1, 2, 4
RWX = R | W | X

_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
_libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
_libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
MAP_NORESERVE = getattr(mmap, "MAP_NORESERVE", 0x4000)
MADV_DONTNEED = 4
SPACE = 1 << 32


class GuestMemory:
    """The guest's 32-bit linear address space with per-page permissions."""

    def __init__(self, default_perm=0):
        addr = _libc.mmap(None, SPACE, mmap.PROT_READ | mmap.PROT_WRITE,
                          mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_NORESERVE, -1, 0)
        if addr in (None, ctypes.c_void_p(-1).value):
            raise OSError(ctypes.get_errno(), "cannot reserve 4 GiB of address space for the guest")
        self.base = addr
        self.perm = bytearray([default_perm]) * (SPACE // PAGE)

    def close(self):
        if self.base:
            _libc.munmap(self.base, SPACE)
            self.base = 0

    # ---- mapping ---------------------------------------------------------------
    def map(self, addr, size, perm):
        first, last = addr // PAGE, (addr + size + PAGE - 1) // PAGE
        self.perm[first:last] = bytes([perm]) * (last - first)

    def unmap(self, addr, size):
        """Forget pages: their contents read back as zero if mapped again."""
        first, last = addr // PAGE, (addr + size + PAGE - 1) // PAGE
        self.perm[first:last] = bytes(last - first)
        _libc.madvise(self.base + first * PAGE, (last - first) * PAGE, MADV_DONTNEED)

    def page_perm(self, addr):
        return self.perm[(addr & 0xFFFFFFFF) // PAGE]

    def check(self, addr, size, need):
        """First address in [addr, addr+size) lacking permission `need`, or None."""
        a = addr & 0xFFFFFFFF
        end = a + size
        while a < end:
            if not self.perm[(a & 0xFFFFFFFF) // PAGE] & need:
                return a & 0xFFFFFFFF
            a = (a & ~(PAGE - 1)) + PAGE
        return None

    # ---- host-side access (no guest permission checks) ----------------------------
    def read(self, addr, size):
        addr &= 0xFFFFFFFF
        if addr + size > SPACE:
            first = SPACE - addr
            return self.read(addr, first) + self.read(0, size - first)
        return ctypes.string_at(self.base + addr, size)

    def write(self, addr, data):
        addr &= 0xFFFFFFFF
        if addr + len(data) > SPACE:
            first = SPACE - addr
            self.write(addr, data[:first])
            self.write(0, data[first:])
            return
        ctypes.memmove(self.base + addr, bytes(data), len(data))

    def host_addr(self, addr):
        return self.base + (addr & 0xFFFFFFFF)


def page_size():
    return os.sysconf("SC_PAGE_SIZE")

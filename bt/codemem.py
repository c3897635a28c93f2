"""Memory for copy-and-patch code (bt.stencil): executable code and the cells it refers to.

Both live in the low 2 GiB of the address space (MAP_32BIT): stencils are compiled for the
small code model, where every symbol -- a chain slot, a counter cell, the next stencil --
must be reachable with a 32-bit displacement or absolute address.  Code and cells are in
separate mappings, so that the counters a block writes on every run never share a cache line
with instructions (a store near running code costs a pipeline flush on x86).

Nothing is ever freed, as with MCJIT's modules: a block that invalidated itself may still be
running to its exit.
"""
import ctypes
import mmap

MAP_32BIT = getattr(mmap, "MAP_32BIT", 0x40)
CHUNK = 16 << 20


class Arena:
    """A bump allocator over MAP_32BIT mappings of CHUNK bytes."""

    def __init__(self, exec_=False):
        self.prot = mmap.PROT_READ | mmap.PROT_WRITE | (mmap.PROT_EXEC if exec_ else 0)
        self.maps = []
        self.base = self.pos = self.end = 0
        self.used = 0

    def _grow(self, n):
        size = max(CHUNK, (n + 0xFFF) & ~0xFFF)
        m = mmap.mmap(-1, size, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS | MAP_32BIT, prot=self.prot)
        base = ctypes.addressof(ctypes.c_char.from_buffer(m))
        if base + size > 1 << 31:
            raise MemoryError("no memory left below 2 GiB for translated code")
        self.maps.append(m)
        self.base, self.pos, self.end = base, base, base + size
        self.view = m

    def alloc(self, n, align=16):
        """Address of n fresh bytes (zeroed) aligned to align."""
        pos = (self.pos + align - 1) & ~(align - 1)
        if pos + n > self.end:
            self._grow(n)
            pos = self.pos
        self.pos = pos + n
        self.used += n
        return pos

    def write(self, addr, data):
        """Copy bytes to addr (inside the current chunk, as returned by alloc)."""
        off = addr - self.base
        self.view[off:off + len(data)] = data

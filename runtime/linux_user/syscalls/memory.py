"""Memory syscalls: brk, mmap2/old_mmap, munmap, mprotect, mremap, madvise (private mappings only)."""
import errno as E
import os
import struct

from ...memory import PAGE, R, W, X
from .base import syscall, get

PROT_READ, PROT_WRITE, PROT_EXEC = 1, 2, 4
MAP_SHARED, MAP_PRIVATE, MAP_FIXED, MAP_ANONYMOUS = 1, 2, 0x10, 0x20
MAP_FIXED_NOREPLACE = 0x100000
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
MMAP_TOP = 0xB7F00000
MMAP_BOTTOM = 0x01000000


def _up(a):
    return (a + PAGE - 1) & ~(PAGE - 1)


def prot_perm(prot):
    perm = 0
    if prot & PROT_READ:
        perm |= R
    if prot & PROT_WRITE:
        perm |= R | W
    if prot & PROT_EXEC:
        perm |= R | X
    return perm


@syscall("brk", "p")
def sys_brk(m, new):
    cur = m.brk
    if new < m.brk_start:
        return cur
    old_end, new_end = _up(cur), _up(new)
    if new_end > old_end:
        if not m.range_free(old_end, new_end - old_end):
            return cur
        m.map_region(old_end, new_end - old_end, R | W)
    elif new_end < old_end:
        m.unmap_region(new_end, old_end - new_end)
    m.brk = new
    return new


def do_mmap(m, addr, length, prot, flags, fd, offset):
    if length == 0 or addr & (PAGE - 1):
        return -E.EINVAL
    size = _up(length)
    if size >= 1 << 32:
        return -E.ENOMEM
    if not flags & (MAP_SHARED | MAP_PRIVATE):
        return -E.EINVAL
    data = None
    if not flags & MAP_ANONYMOUS:
        try:
            st = os.fstat(fd)
        except OSError as exc:
            return -exc.errno
        import stat
        if stat.S_ISDIR(st.st_mode):
            return -E.ENODEV
        try:
            data = os.pread(fd, length, offset)
        except OSError as exc:
            return -exc.errno
        if flags & MAP_SHARED and prot & PROT_WRITE:
            m.warn_once("mmap-shared", "writable MAP_SHARED file mappings are copied (writes are not written back)")
    if flags & (MAP_FIXED | MAP_FIXED_NOREPLACE):
        if addr + size > 1 << 32:
            return -E.ENOMEM
        if flags & MAP_FIXED_NOREPLACE and not flags & MAP_FIXED and not m.range_free(addr, size):
            return -E.EEXIST
        m.unmap_region(addr, size)
        start = addr
    else:
        start = None
        if addr and addr + size <= 1 << 32 and m.range_free(addr, size):
            start = addr
        if start is None:
            start = m.find_free(size)
        if start is None:
            return -E.ENOMEM
    m.map_region(start, size, prot_perm(prot))
    if data:
        m.mem.write(start, data)
    return start


@syscall("mmap2", "pxxxfx")
def sys_mmap2(m, addr, length, prot, flags, fd, pgoff):
    return do_mmap(m, addr, length, prot, flags, fd, pgoff * PAGE)


@syscall("mmap", "p")
def sys_old_mmap(m, args):
    addr, length, prot, flags, fd, off = struct.unpack("<6I", get(m, args, 24))
    if off & (PAGE - 1):
        return -E.EINVAL
    return do_mmap(m, addr, length, prot, flags, fd, off)


@syscall("munmap", "px")
def sys_munmap(m, addr, length):
    if addr & (PAGE - 1) or length == 0 or addr + length > 1 << 32:
        return -E.EINVAL
    m.unmap_region(addr, _up(length))
    return 0


@syscall("mprotect", "pxx")
def sys_mprotect(m, addr, length, prot):
    if addr & (PAGE - 1):
        return -E.EINVAL
    size = _up(length)
    if not m.range_mapped(addr, size):
        return -E.ENOMEM
    m.protect_region(addr, size, prot_perm(prot))
    return 0


@syscall("mremap", "pxxxp")
def sys_mremap(m, old, old_size, new_size, flags, new_addr):
    if old & (PAGE - 1) or new_size == 0:
        return -E.EINVAL
    old_size, new_size = _up(old_size), _up(new_size)
    if not m.range_mapped(old, old_size):
        return -E.EFAULT
    if new_size <= old_size:
        if new_size < old_size:
            m.unmap_region(old + new_size, old_size - new_size)
        return old
    perm = m.mem.page_perm(old)
    if m.range_free(old + old_size, new_size - old_size):
        m.map_region(old + old_size, new_size - old_size, perm)
        return old
    if not flags & MREMAP_MAYMOVE:
        return -E.ENOMEM
    start = m.find_free(new_size)
    if start is None:
        return -E.ENOMEM
    data = m.mem.read(old, old_size)
    m.map_region(start, new_size, perm)
    m.mem.write(start, data)
    m.unmap_region(old, old_size)
    return start


@syscall("madvise", "pxd")
def sys_madvise(m, addr, length, advice):
    return 0


@syscall("mlock", "px")
def sys_mlock(m, addr, length):
    return 0


@syscall("munlock", "px")
def sys_munlock(m, addr, length):
    return 0

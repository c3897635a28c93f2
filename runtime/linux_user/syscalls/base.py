"""Shared pieces of the syscall layer: the registry, errno values, guest pointers, host pass-through."""
import ctypes
import errno as E
import struct

from ...memory import PAGE, R, W
from .numbers import HOST_X86_64

TABLE = {}          # i386 syscall name -> (fn(machine, *args), arg formats)

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long


class EFault(Exception):
    """A guest pointer argument is not accessible: the syscall returns -EFAULT."""


class SysError(Exception):
    """Return -errno from deep inside a syscall implementation."""

    def __init__(self, err):
        super().__init__(err)
        self.err = err


def syscall(name, fmt=""):
    """Register fn(machine, *args) as the i386 syscall `name`.

    fmt: one letter per argument for --strace: d signed, u unsigned, x hex, s string, p pointer, f fd."""
    def deco(fn):
        TABLE[name] = (fn, fmt)
        return fn
    return deco


def host(name, *args):
    """Call the host (x86-64) syscall `name`; returns the result or -errno."""
    r = _syscall(ctypes.c_long(HOST_X86_64[name]), *[ctypes.c_long(a) for a in args])
    if r == -1:
        return -ctypes.get_errno()
    return r


def s32(v):
    v &= 0xFFFFFFFF
    return v - (1 << 32) if v & 0x80000000 else v


def ptr(m, addr, size=1, write=False):
    """Host address of a guest buffer, checking guest permissions (NULL with size 0 -> 0)."""
    if size == 0:
        return m.mem.host_addr(addr) if addr else 0
    if addr + size > 1 << 32 or m.mem.check(addr, size, W if write else R) is not None:
        raise EFault()
    return m.mem.host_addr(addr)


def optr(m, addr, size, write=False):
    """Like ptr, but NULL stays NULL."""
    return 0 if addr == 0 else ptr(m, addr, size, write)


def cstr(m, addr, limit=4096 * 4):
    """Read a NUL-terminated guest string (bytes, without the NUL)."""
    if addr == 0:
        raise EFault()
    out = b""
    a = addr
    while len(out) < limit:
        if not m.mem.page_perm(a) & R:
            raise EFault()
        n = PAGE - (a & (PAGE - 1))
        chunk = m.mem.read(a, n)
        i = chunk.find(b"\0")
        if i >= 0:
            return out + chunk[:i]
        out += chunk
        a = (a + n) & 0xFFFFFFFF
    raise SysError(E.ENAMETOOLONG)


def sptr(m, addr):
    """Host pointer to a validated NUL-terminated guest string (for pass-through)."""
    cstr(m, addr)
    return m.mem.host_addr(addr)


def get(m, addr, n):
    if m.mem.check(addr, n, R) is not None:
        raise EFault()
    return m.mem.read(addr, n)


def put(m, addr, data):
    if m.mem.check(addr, len(data), W) is not None:
        raise EFault()
    m.mem.write(addr, data)
    m.wrote(addr, len(data))


def get_u32(m, addr):
    return struct.unpack("<I", get(m, addr, 4))[0]


def put_u32(m, addr, v):
    put(m, addr, struct.pack("<I", v & 0xFFFFFFFF))


def strvec(m, addr):
    """A NULL-terminated array of guest string pointers -> list of bytes."""
    out = []
    if addr == 0:
        return out
    while True:
        p = get_u32(m, addr)
        if p == 0:
            return out
        out.append(cstr(m, p))
        addr += 4
        if len(out) > 100000:
            raise SysError(E.E2BIG)


def hostbuf(n):
    return ctypes.create_string_buffer(n)


def addr_of(buf):
    return ctypes.addressof(buf)

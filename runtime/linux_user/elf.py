"""ELF32 i386 loader for static executables (ET_EXEC and static-PIE ET_DYN) and the initial stack."""
import os
import struct

from ..cpuid import cpuid
from ..memory import PAGE, R, W, X

STACK_TOP = 0xC0000000
STACK_SIZE = 8 << 20
PIE_BASE = 0x56555000

PT_LOAD, PT_INTERP, PT_PHDR = 1, 3, 6
PF_X, PF_W, PF_R = 1, 2, 4
ET_EXEC, ET_DYN = 2, 3
EM_386 = 3

AT_NULL, AT_PHDR, AT_PHENT, AT_PHNUM, AT_PAGESZ, AT_BASE, AT_FLAGS, AT_ENTRY = 0, 3, 4, 5, 6, 7, 8, 9
AT_UID, AT_EUID, AT_GID, AT_EGID, AT_PLATFORM, AT_HWCAP, AT_CLKTCK = 11, 12, 13, 14, 15, 16, 17
AT_SECURE, AT_RANDOM, AT_HWCAP2, AT_EXECFN = 23, 25, 26, 31


class ElfError(Exception):
    """The file cannot be run by btvm (one-line message)."""

    def __init__(self, message, status=1):
        super().__init__(message)
        self.status = status


def _page_down(a):
    return a & ~(PAGE - 1)


def _page_up(a):
    return (a + PAGE - 1) & ~(PAGE - 1)


class Image:
    """What the loader produced: entry point, program headers' address, brk start."""

    def __init__(self, **kw):
        self.__dict__.update(kw)


def read_elf(path):
    """Read and validate an executable; returns (bytes, header fields, program headers)."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        raise ElfError(f"{path}: no such file or directory", 127)
    except IsADirectoryError:
        raise ElfError(f"{path}: is a directory", 126)
    except PermissionError:
        raise ElfError(f"{path}: permission denied", 126)
    except OSError as exc:
        raise ElfError(f"{path}: {exc.strerror}", 126)
    if len(data) < 52 or data[:4] != b"\x7fELF":
        raise ElfError(f"{path}: not an ELF executable")
    if data[4] == 2:
        raise ElfError(f"{path}: 64-bit ELF is not supported (btvm runs 32-bit i386 programs)")
    if data[4] != 1 or data[5] != 1:
        raise ElfError(f"{path}: not a little-endian 32-bit ELF")
    (e_type, e_machine, _ver, e_entry, e_phoff, _shoff, _flags, _ehsize, e_phentsize,
     e_phnum) = struct.unpack_from("<HHIIIIIHHH", data, 16)
    if e_machine != EM_386:
        raise ElfError(f"{path}: ELF for machine {e_machine}, not i386")
    if e_type not in (ET_EXEC, ET_DYN):
        raise ElfError(f"{path}: not an executable ELF (type {e_type})")
    if e_phentsize != 32 or e_phoff + 32 * e_phnum > len(data) or e_phnum == 0:
        raise ElfError(f"{path}: malformed program headers")
    phdrs = [struct.unpack_from("<IIIIIIII", data, e_phoff + 32 * i) for i in range(e_phnum)]
    for ph in phdrs:
        if ph[0] == PT_INTERP:
            raise ElfError(f"{path}: dynamically linked executables are not supported (static i386 only)")
    if not any(ph[0] == PT_LOAD for ph in phdrs):
        raise ElfError(f"{path}: no loadable segments")
    if e_type == ET_DYN and e_entry == 0:
        raise ElfError(f"{path}: a shared library, not an executable")
    return data, dict(type=e_type, entry=e_entry, phoff=e_phoff, phnum=e_phnum), phdrs


def load(mem, path, mark_mapped):
    """Map the PT_LOAD segments into mem; returns an Image."""
    data, hdr, phdrs = read_elf(path)
    loads = [ph for ph in phdrs if ph[0] == PT_LOAD]
    lo = min(_page_down(ph[2]) for ph in loads)
    bias = PIE_BASE - lo if hdr["type"] == ET_DYN and lo < 0x1000000 else 0
    end = 0
    phdr_addr = None
    for p_type, p_offset, p_vaddr, _p_paddr, p_filesz, p_memsz, p_flags, _p_align in phdrs:
        if p_type == PT_PHDR:
            phdr_addr = p_vaddr + bias
        if p_type != PT_LOAD:
            continue
        if p_filesz > p_memsz or p_offset + p_filesz > len(data) or p_vaddr + p_memsz + bias > STACK_TOP - STACK_SIZE:
            raise ElfError(f"{path}: malformed PT_LOAD segment")
        va = p_vaddr + bias
        perm = (R if p_flags & PF_R else 0) | (W if p_flags & PF_W else 0) | (X if p_flags & PF_X else 0)
        first, last = _page_down(va), _page_up(va + p_memsz)
        for page in range(first, last, PAGE):
            mem.map(page, PAGE, mem.page_perm(page) | perm)
        mark_mapped(first, last - first)
        mem.write(va, data[p_offset:p_offset + p_filesz])
        if p_memsz > p_filesz:
            mem.write(va + p_filesz, bytes(p_memsz - p_filesz))
        if phdr_addr is None and p_offset <= hdr["phoff"] < p_offset + p_filesz:
            phdr_addr = va + hdr["phoff"] - p_offset
        end = max(end, last)
    return Image(entry=hdr["entry"] + bias, phdr=phdr_addr or 0, phnum=hdr["phnum"], brk=end, bias=bias,
                 path=path)


def setup_stack(mem, image, argv, envp, execfn, mark_mapped, ids=(0, 0, 0, 0)):
    """Map the stack and build argc/argv/envp/auxv on it; returns the initial esp."""
    mem.map(STACK_TOP - STACK_SIZE, STACK_SIZE, R | W)
    mark_mapped(STACK_TOP - STACK_SIZE, STACK_SIZE)
    sp = STACK_TOP - 4

    def push_bytes(b):
        nonlocal sp
        sp -= len(b)
        mem.write(sp, b)
        return sp

    execfn_addr = push_bytes(os.fsencode(execfn) + b"\0")
    env_addrs = [push_bytes(os.fsencode(e) + b"\0") for e in reversed(envp)][::-1]
    arg_addrs = [push_bytes(os.fsencode(a) + b"\0") for a in reversed(argv)][::-1]
    platform = push_bytes(b"i686\0")
    sp &= ~15
    rnd = push_bytes(os.urandom(16))
    uid, euid, gid, egid = ids
    hwcap = cpuid(1)[3]
    auxv = [(AT_PHDR, image.phdr), (AT_PHENT, 32), (AT_PHNUM, image.phnum), (AT_PAGESZ, PAGE),
            (AT_BASE, 0), (AT_FLAGS, 0), (AT_ENTRY, image.entry), (AT_UID, uid), (AT_EUID, euid),
            (AT_GID, gid), (AT_EGID, egid), (AT_SECURE, 0), (AT_RANDOM, rnd), (AT_HWCAP, hwcap),
            (AT_HWCAP2, 0), (AT_CLKTCK, 100), (AT_PLATFORM, platform), (AT_EXECFN, execfn_addr),
            (AT_NULL, 0)]
    words = [len(argv)] + arg_addrs + [0] + env_addrs + [0] + [v for pair in auxv for v in pair]
    sp = (sp - 4 * len(words)) & ~15
    mem.write(sp, struct.pack(f"<{len(words)}I", *words))
    return sp

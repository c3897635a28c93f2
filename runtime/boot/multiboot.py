"""Multiboot (v1) loader: ELF kernels and a.out-kludge images, with the boot information structure.

(Multiboot Specification 0.6.96, sections 3.1-3.3.)
"""
import struct

MAGIC = 0x1BADB002
BOOTLOADER_MAGIC = 0x2BADB002
F_PAGE_ALIGN, F_MEMINFO, F_VIDEO, F_AOUT = 1, 2, 4, 1 << 16
INFO_MEM, INFO_CMDLINE, INFO_MMAP, INFO_LOADER = 1, 4, 0x40, 0x200

INFO_ADDR = 0x9000
CMDLINE_ADDR = 0x9200
MMAP_ADDR = 0x9100
LOADER_NAME_ADDR = 0x9800


class BootError(Exception):
    """A kernel image that cannot be booted (reported as one line)."""


def find_header(image):
    for off in range(0, min(len(image), 8192) - 11, 4):
        magic, flags, checksum = struct.unpack_from("<III", image, off)
        if magic == MAGIC and (magic + flags + checksum) & 0xFFFFFFFF == 0:
            return off, flags
    return None


def _load_elf(image, write, ram_size):
    if len(image) < 52 or image[4] != 1 or image[5] != 1:
        raise BootError("multiboot kernel is not a 32-bit little-endian ELF file")
    (e_type, e_machine, _v, e_entry, e_phoff, _sh, _fl, _ehs, e_phentsize, e_phnum) = struct.unpack_from(
        "<HHIIIIIHHH", image, 16)
    if e_machine != 3:
        raise BootError("multiboot ELF kernel is not for i386")
    top = 0
    for i in range(e_phnum):
        off = e_phoff + i * e_phentsize
        if off + 32 > len(image):
            raise BootError("truncated ELF program header table")
        p_type, p_offset, _va, p_paddr, p_filesz, p_memsz, _f, _a = struct.unpack_from("<IIIIIIII", image, off)
        if p_type != 1:
            continue
        if p_offset + p_filesz > len(image):
            raise BootError("ELF segment extends past the end of the file")
        if p_paddr + p_memsz > ram_size:
            raise BootError(f"ELF segment at {p_paddr:#x} does not fit in guest RAM")
        write(p_paddr, image[p_offset:p_offset + p_filesz] + bytes(p_memsz - p_filesz))
        top = max(top, p_paddr + p_memsz)
    return e_entry, top


def _load_aout(image, hoff, write, ram_size):
    header_addr, load_addr, load_end, bss_end, entry = struct.unpack_from("<IIIII", image, hoff + 12)
    start = hoff - (header_addr - load_addr)
    if start < 0 or load_addr > header_addr:
        raise BootError("inconsistent multiboot a.out addresses")
    size = (load_end - load_addr) if load_end else len(image) - start
    data = image[start:start + size]
    end = max(load_addr + len(data), bss_end or 0)
    if end > ram_size:
        raise BootError("kernel does not fit in guest RAM")
    write(load_addr, data + bytes(max(0, (bss_end or 0) - load_addr - len(data))))
    return entry, end


def load(image, write, ram_size, cmdline=""):
    """Load a Multiboot kernel with write(phys, bytes); returns (entry, info_address)."""
    found = find_header(image)
    if found is None:
        raise BootError("not a Multiboot kernel (no Multiboot header in the first 8 KiB)")
    hoff, flags = found
    if flags & 0xFFFC & ~(F_MEMINFO | F_PAGE_ALIGN) and flags & F_VIDEO:
        raise BootError("Multiboot kernel requires video mode information (not supported)")
    if flags & F_AOUT:
        entry, _ = _load_aout(image, hoff, write, ram_size)
    elif image[:4] == b"\x7fELF":
        entry, _ = _load_elf(image, write, ram_size)
    else:
        raise BootError("Multiboot kernel is neither ELF nor uses the a.out kludge")
    cmd = cmdline.encode() + b"\0"
    name = b"btvm\0"
    mmap = struct.pack("<IQQI", 20, 0, 0x9F000, 1) + struct.pack("<IQQI", 20, 0x100000, ram_size - 0x100000, 1)
    info = struct.pack("<IIII", INFO_MEM | INFO_CMDLINE | INFO_MMAP | INFO_LOADER, 636, (ram_size - 0x100000) // 1024, 0)
    info += struct.pack("<I", CMDLINE_ADDR) + bytes(28) + struct.pack("<II", len(mmap), MMAP_ADDR)
    info += bytes(16) + struct.pack("<I", LOADER_NAME_ADDR)
    write(INFO_ADDR, info)
    write(CMDLINE_ADDR, cmd[:0x600])
    write(MMAP_ADDR, mmap)
    write(LOADER_NAME_ADDR, name)
    return entry, INFO_ADDR

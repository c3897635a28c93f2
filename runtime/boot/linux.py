"""The Linux/x86 32-bit boot protocol (Documentation/arch/x86/boot.rst).

btvm loads the protected-mode part of a bzImage at 1 MiB, builds the zero
page (boot_params) with an e820 map, the command line and the initrd, and
enters at code32_start in flat protected mode with paging off and ESI
pointing at boot_params - what a boot loader does after the real-mode setup
code would have run, so no BIOS is needed.
"""
import struct

from .multiboot import BootError

ZERO_PAGE = 0x7000
CMDLINE = 0x20000
GDT_ADDR = 0x6000
LOAD_ADDR = 0x100000
E820_RAM, E820_RESERVED = 1, 2
BOOT_CS, BOOT_DS = 0x10, 0x18
LOADED_HIGH, KEEP_SEGMENTS, CAN_USE_HEAP = 0x01, 0x40, 0x80


def is_bzimage(image):
    return len(image) > 0x264 and image[0x202:0x206] == b"HdrS" and image[0x1FE:0x200] == b"\x55\xaa"


class Header:
    def __init__(self, image):
        if not is_bzimage(image):
            raise BootError("not a Linux bzImage (no 'HdrS' setup header)")
        self.setup_sects = image[0x1F1] or 4
        self.version = struct.unpack_from("<H", image, 0x206)[0]
        self.loadflags = image[0x211]
        self.code32_start = struct.unpack_from("<I", image, 0x214)[0]
        self.initrd_addr_max = struct.unpack_from("<I", image, 0x22C)[0] if self.version >= 0x203 else 0x37FFFFFF
        self.cmdline_size = struct.unpack_from("<I", image, 0x238)[0] if self.version >= 0x206 else 255
        self.init_size = struct.unpack_from("<I", image, 0x260)[0] if self.version >= 0x20A else 0
        if self.version < 0x202:
            raise BootError(f"boot protocol {self.version >> 8}.{self.version & 0xFF} is too old (need 2.02+)")
        if not self.loadflags & LOADED_HIGH:
            raise BootError("zImage kernels (not loaded high) are not supported")
        self.pm_offset = (self.setup_sects + 1) * 512
        if self.pm_offset >= len(image):
            raise BootError("bzImage is truncated (no protected-mode kernel)")


def e820_map(ram_size):
    return [(0, 0x9F000, E820_RAM), (0x9F000, 0x1000, E820_RESERVED), (0xE0000, 0x20000, E820_RESERVED),
            (0x100000, ram_size - 0x100000, E820_RAM)]


def load(image, write, ram_size, cmdline="", initrd=None):
    """Load a bzImage with write(phys, bytes); returns the CPU entry state as a dict."""
    h = Header(image)
    pm = image[h.pm_offset:]
    need = LOAD_ADDR + max(len(pm), h.init_size)
    if need > ram_size:
        raise BootError(f"the kernel needs {need >> 20} MiB of RAM or more (use -m)")
    write(LOAD_ADDR, pm)
    # Zero page: the setup header copied from the image, then the loader's fields.
    zp = bytearray(4096)
    hdr_end = 0x202 + image[0x201]
    zp[0x1F1:hdr_end] = image[0x1F1:hdr_end]
    zp[0x210] = 0xFF                                  # type_of_loader: undefined boot loader
    zp[0x211] = (h.loadflags | CAN_USE_HEAP) & ~KEEP_SEGMENTS
    struct.pack_into("<H", zp, 0x224, 0xDE00)         # heap_end_ptr
    cmd = cmdline.encode()[:max(0, h.cmdline_size - 1)] + b"\0"
    write(CMDLINE, cmd)
    struct.pack_into("<I", zp, 0x228, CMDLINE)
    if initrd:
        top = min(ram_size, h.initrd_addr_max + 1)
        addr = (top - len(initrd)) & ~0xFFF
        if addr < need:
            raise BootError("the initrd does not fit in guest RAM above the kernel (use -m)")
        write(addr, initrd)
        struct.pack_into("<II", zp, 0x218, addr, len(initrd))
    entries = e820_map(ram_size)
    for i, (base, size, kind) in enumerate(entries):
        struct.pack_into("<QQI", zp, 0x2D0 + 20 * i, base, size, kind)
    zp[0x1E8] = len(entries)
    struct.pack_into("<I", zp, 0x1E0, (ram_size >> 10) - 1024)   # alt_mem_k
    struct.pack_into("<H", zp, 0x002, min(0xFFFF, (ram_size >> 10) - 1024))   # ext_mem_k
    write(ZERO_PAGE, bytes(zp))
    # A GDT with __BOOT_CS / __BOOT_DS flat 4 GiB segments, as the protocol requires.
    gdt = struct.pack("<QQQQ", 0, 0, 0x00CF9A000000FFFF, 0x00CF92000000FFFF)
    write(GDT_ADDR, gdt)
    return {"eip": h.code32_start or LOAD_ADDR, "esi": ZERO_PAGE, "gdt": (GDT_ADDR, len(gdt) - 1),
            "cs": BOOT_CS, "ds": BOOT_DS, "version": h.version}

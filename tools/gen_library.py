#!/usr/bin/env python3
"""Regenerate bt/library.txt: the instruction forms whose stencils `btvm prebuild` compiles.

    python tools/gen_library.py [--out FILE]

The forms come from code no guest of the benchmarks runs, by four rules:
  1. every instruction form of gcc's static C library for i386 (`gcc -m32 -O2 -static` of an
     empty program: compiler-generated code, ~126,000 instructions);
  2. every instruction without a ModRM operand in the one-byte and 0x0F maps, plain and with
     0x66, REP and REPNE (register-in-opcode forms, string instructions, branches, flags, I/O);
  3. the system instructions (0F 00, 0F 01, MOV CRn/DRn, MOV Sreg, x87 control) with a
     register or a [base] / [base+disp8] operand;
  4. rule 1's memory forms with an absolute [disp32] address instead: how code that is not
     position-independent reaches its globals (the C library reaches them through a base
     register).  A Linux boot: 1,220 more shapes, 63 more of its 1,344 met (the same with
     [index*4+disp32] or an FS override instead: ~1,300 shapes for ~16 each, not taken).
One instruction stands for each stencil shape (bt.stencil.InsnShape at level 0 with open
registers, in a mode without paging: the same instruction's page decisions are made by
bt.library).  Needs gcc with multilib (Debian: gcc-multilib) and binutils.
"""
import argparse
import os

import capstone
import struct
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from bt import decode, stencil, state as S  # noqa: E402
from bt.translate import TABLE  # noqa: E402

# Bytes after the candidate opcode and ModRM: whatever immediates or displacements it takes.
_TAIL = bytes(range(0x11, 0x21))
_SYSTEM = [b"\x0f\x00", b"\x0f\x01", b"\x0f\x20", b"\x0f\x21", b"\x0f\x22", b"\x0f\x23", b"\x8c", b"\x8e",
           b"\xd9", b"\xdb", b"\xdd", b"\xdf", b"\x0f\xae"]


def _one(code, at=0x1800):
    return next(decode.disasm(code + _TAIL, at, 1), None)


def _text_section(path):
    """(bytes, address) of an ELF32 file's .text section."""
    data = open(path, "rb").read()
    shoff, = struct.unpack_from("<I", data, 0x20)
    shentsize, shnum, shstrndx = struct.unpack_from("<HHH", data, 0x2E)
    sections = [struct.unpack_from("<IIIIII", data, shoff + i * shentsize) for i in range(shnum)]
    names = sections[shstrndx][4]
    for name, _, _, addr, off, size in sections:
        if data[names + name:data.index(b"\0", names + name)] == b".text":
            return data[off:off + size], addr
    raise SystemExit(f"{path}: no .text section")


def libc_forms():
    """Rule 1: a linear sweep of the static C library's code, page by page."""
    with tempfile.TemporaryDirectory() as tmp:
        src, exe = os.path.join(tmp, "empty.c"), os.path.join(tmp, "empty")
        with open(src, "w") as f:
            f.write("int main(void) { return 0; }\n")
        subprocess.run(["gcc", "-m32", "-O2", "-static", src, "-o", exe], check=True)
        code, base = _text_section(exe)
    pos = 0
    while pos < len(code):
        done = 0
        for insn in decode.disasm(code[pos:pos + 4096 + 16], base + pos, 1 << 20):
            if insn.addr - base - pos >= 4096:
                break
            yield insn
            done = insn.addr + insn.size - base - pos
        pos += max(done, 1)


def absolute_forms(forms):
    """Rule 4: each of forms (instruction bytes) that has a ModRM memory operand, with the
    operand made [disp32] (its prefixes, opcode, ModRM reg field and immediate kept)."""
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    cs.detail = True
    for raw in forms:
        i = next(cs.disasm(raw, 0x1800), None)
        if i is None or not i.modrm_offset or i.modrm >> 6 == 3:
            continue
        mo, mod, rm = i.modrm_offset, i.modrm >> 6, i.modrm & 7
        after = mo + 1 + (rm == 4) + i.disp_size
        if mod == 0 and (rm == 5 or rm == 4 and i.sib & 7 == 5):
            continue                        # already absolute
        insn = _one(raw[:mo] + bytes([i.modrm & 0x38 | 5]) + b"\x00\x10\x00\x00" + raw[after:])
        if insn is not None:
            yield insn


def no_modrm_forms():
    """Rule 2."""
    for prefix in (b"", b"\x66", b"\xf3", b"\xf2"):
        for o in range(256):
            for op in (bytes([o]), b"\x0f" + bytes([o])):
                a, b = _one(prefix + op + b"\x00"), _one(prefix + op + b"\xc0")
                if a is not None and b is not None and a.ops == b.ops:
                    yield a


def system_forms():
    """Rule 3."""
    for op in _SYSTEM:
        for r in range(8):
            for modrm in (0xC0 | r << 3, r << 3, r << 3 | 1, 0x40 | r << 3 | 5):
                insn = _one(op + bytes([modrm]))
                if insn is not None:
                    yield insn


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--out", default=os.path.join(ROOT, "bt", "library.txt"))
    args = ap.parse_args()
    key = S.make_key(cpl=0)
    seen, lines, libc = set(), [], []

    def libc_absolute_forms():
        return absolute_forms(libc)
    for source in (libc_forms, no_modrm_forms, system_forms, libc_absolute_forms):
        n = 0
        for insn in source():
            if insn.id not in TABLE:
                continue
            shape = stencil.InsnShape(insn, key, 0, insn.addr & ~0xFFF).key
            if shape in seen:
                continue
            seen.add(shape)
            if source is libc_forms:
                libc.append(insn.raw)
            n += 1
            lines.append(f"{insn.raw.hex():32} {insn.text()}")
        print(f"{source.__name__}: {n} forms", file=sys.stderr)
    with open(args.out, "w") as f:
        f.write("# Instruction forms of the prebuilt stencil library (bt/library.py): hex bytes, then the\n"
                "# instruction.  Generated by tools/gen_library.py, whose docstring gives the rules.\n")
        f.write("\n".join(lines) + "\n")
    print(f"{len(lines)} forms -> {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()

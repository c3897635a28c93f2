"""Capstone -> normalized instructions -> basic blocks.

Capstone with detail is slow from Python (~35k insns/s), so each block is
decoded once and the result kept by the code cache.  Everything the
semantics need is copied out of Capstone's objects into plain tuples here:
semantics never see Capstone types.
"""
from dataclasses import dataclass, field

import capstone
from capstone import x86 as X

from . import state as S

MAX_BLOCK_INSNS = 64
PAGE = 0x1000

_CS = {}


def _disassembler(bits):
    cs = _CS.get(bits)
    if cs is None:
        cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32 if bits == 32 else capstone.CS_MODE_16)
        cs.detail = True
        _CS[bits] = cs
    return cs


@dataclass(frozen=True)
class Reg:
    """A general register view: index in x86 order, width in bytes, high byte (AH..BH)."""
    index: int
    width: int
    hi: bool = False


@dataclass(frozen=True)
class Mem:
    seg: int            # segment index (state.ES..GS)
    base: object        # Reg or None
    index: object       # Reg or None
    scale: int
    disp: int
    addr16: bool        # 16-bit address size: effective address wraps at 64 KiB


@dataclass(frozen=True)
class Op:
    kind: str           # 'reg' | 'imm' | 'mem' | 'seg'
    size: int           # bytes
    reg: object = None  # Reg for 'reg', segment index for 'seg'
    imm: int = 0
    mem: object = None


@dataclass
class Insn:
    addr: int
    size: int
    raw: bytes
    id: int
    mnemonic: str
    op_str: str
    ops: tuple
    rep: int            # 0, 0xF3 (REP/REPE) or 0xF2 (REPNE)
    lock: bool
    opsize: int         # operand size in bytes implied by mode and 0x66
    addrsize: int       # 2 or 4
    seg_override: object  # segment index or None
    groups: tuple = ()

    @property
    def next(self):
        return (self.addr + self.size) & 0xFFFFFFFF

    def text(self):
        return f"{self.mnemonic} {self.op_str}".strip()


def _build_reg_map():
    cs = _disassembler(32)
    regs = {}
    names32 = S.REG_NAMES
    names16 = ("ax", "cx", "dx", "bx", "sp", "bp", "si", "di")
    names8 = ("al", "cl", "dl", "bl")
    names8h = ("ah", "ch", "dh", "bh")
    segs = {n: i for i, n in enumerate(S.SEG_NAMES)}
    for rid in range(1, X.X86_REG_ENDING):
        name = cs.reg_name(rid)
        if name in names32:
            regs[rid] = Reg(names32.index(name), 4)
        elif name in names16:
            regs[rid] = Reg(names16.index(name), 2)
        elif name in names8:
            regs[rid] = Reg(names8.index(name), 1)
        elif name in names8h:
            regs[rid] = Reg(names8h.index(name), 1, True)
        elif name in segs:
            regs[rid] = ("seg", segs[name])
        elif name is not None:
            regs[rid] = ("other", name)
    return regs


_REGS = _build_reg_map()
_SEG_PREFIX = {0x26: S.ES, 0x2E: S.CS, 0x36: S.SS, 0x3E: S.DS, 0x64: S.FS, 0x65: S.GS}


class DecodeError(Exception):
    """Guest bytes that do not form a valid instruction (the guest's #UD)."""


def _reg_operand(rid, size):
    r = _REGS.get(rid)
    if isinstance(r, Reg):
        return Op("reg", size, reg=r)
    if isinstance(r, tuple) and r[0] == "seg":
        return Op("seg", 2, reg=r[1])
    return Op("other", size, reg=r[1] if isinstance(r, tuple) else rid)


def _mem_operand(m, size, addrsize, seg_override):
    base = _REGS.get(m.base) if m.base else None
    index = _REGS.get(m.index) if m.index else None
    if base is not None and not isinstance(base, Reg):
        raise DecodeError("unsupported base register")
    if index is not None and not isinstance(index, Reg):
        raise DecodeError("unsupported index register")
    if m.segment:
        seg = _REGS[m.segment][1]
    elif seg_override is not None:
        seg = seg_override
    elif base is not None and base.index in (4, 5):   # ESP/EBP (and BP in 16-bit) default to SS
        seg = S.SS
    else:
        seg = S.DS
    return Mem(seg, base, index, m.scale, m.disp, addrsize == 2)


def normalize(ci, bits=32):
    """Turn one Capstone instruction into an Insn."""
    pfx = ci.prefix
    rep = pfx[0] if pfx[0] in (0xF2, 0xF3) else 0
    lock = pfx[0] == 0xF0
    seg_override = _SEG_PREFIX.get(pfx[1])
    default = 4 if bits == 32 else 2
    other = 2 if bits == 32 else 4
    opsize = other if pfx[2] == 0x66 else default
    addrsize = ci.addr_size
    ops = []
    for o in ci.operands:
        if o.type == X.X86_OP_REG:
            ops.append(_reg_operand(o.reg, o.size))
        elif o.type == X.X86_OP_IMM:
            # Capstone reports size 0 for the implicit count of the D0/D1 shift forms.
            ops.append(Op("imm", o.size or 1, imm=o.imm))
        elif o.type == X.X86_OP_MEM:
            ops.append(Op("mem", o.size, mem=_mem_operand(o.mem, o.size, addrsize, seg_override)))
        else:
            raise DecodeError("unknown operand type")
    return Insn(ci.address, ci.size, bytes(ci.bytes), ci.id, ci.mnemonic, ci.op_str, tuple(ops),
                rep, lock, opsize, addrsize, seg_override, tuple(ci.groups))


@dataclass
class Block:
    """A decoded basic block: the instructions and the guest bytes they came from."""
    eip: int
    key: int
    insns: list = field(default_factory=list)
    # Set when decoding stopped at bytes that are not an instruction (or not fetchable):
    # the block ends before them and executing past its end raises #UD / the fetch fault.
    stop_reason: str = ""

    @property
    def end(self):
        last = self.insns[-1]
        return last.addr + last.size

    @property
    def raw(self):
        return b"".join(i.raw for i in self.insns)

    def pages(self):
        """Guest pages the block's bytes lie on (an instruction may straddle two)."""
        first = self.eip & ~(PAGE - 1)
        last = (self.end - 1) & ~(PAGE - 1)
        return [first] if first == last else [first, last & 0xFFFFFFFF]


def decode_block(fetch, eip, key, ends_block, max_insns=MAX_BLOCK_INSNS):
    """Decode a basic block at eip.

    fetch(addr, n) returns up to n readable code bytes at addr (fewer at the end
    of executable memory).  ends_block(insn) says whether an instruction ends
    the block (control transfer, callout).  The block also ends at a page
    boundary, so that code-page tracking stays per page.
    """
    bits = 32 if key & S.KEY_CS32 else 16
    if key & S.KEY_STEP:
        max_insns = 1
    page_end = (eip & ~(PAGE - 1)) + PAGE
    code = fetch(eip, page_end - eip + 15)
    blk = Block(eip, key)
    cs = _disassembler(bits)
    pos = eip
    # count bounds the work: the binding decodes (with detail) everything it is given up front.
    for ci in cs.disasm(code, eip, max_insns):
        if ci.address != pos:
            break
        insn = normalize(ci, bits)
        blk.insns.append(insn)
        pos += ci.size
        if ends_block(insn) or len(blk.insns) >= max_insns or pos >= page_end:
            return blk
    # Capstone stopped: the bytes at pos do not decode, or were cut short by
    # memory that could not be fetched (the fetch fault is raised only if reached).
    truncated = len(code) < page_end - eip + 15
    left = len(code) - (pos - eip)
    blk.stop_reason = "fetch" if truncated and left < 15 else "undecodable"
    return blk

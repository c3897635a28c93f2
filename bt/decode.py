"""Capstone -> normalized instructions -> basic blocks.

Capstone with detail is slow from Python (~35k insns/s), so each block is
decoded once and the result kept by the code cache.  Everything the
semantics need is copied out of Capstone's objects into plain tuples here:
semantics never see Capstone types.
"""
import ctypes
import struct
import sys
import threading
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
    # A relative branch (jmp/jcc/call rel, loop, jecxz): its immediate is the absolute target,
    # so its fields depend on its address, not only on its bytes.
    relative: bool = False
    # Per operand (4): its immediate or displacement as 32 bits, else 0 (stencil holes' values).
    values: tuple = (0, 0, 0, 0)

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


def _mem_operand(segment, base, index, scale, disp, addrsize, seg_override):
    base = _REGS.get(base) if base else None
    index = _REGS.get(index) if index else None
    if base is not None and not isinstance(base, Reg):
        raise DecodeError("unsupported base register")
    if index is not None and not isinstance(index, Reg):
        raise DecodeError("unsupported index register")
    if segment:
        seg = _REGS[segment][1]
    elif seg_override is not None:
        seg = seg_override
    elif base is not None and base.index in (4, 5):   # ESP/EBP (and BP in 16-bit) default to SS
        seg = S.SS
    else:
        seg = S.DS
    return Mem(seg, base, index, scale, disp, addrsize == 2)


# Capstone's structures read with struct at their ctypes offsets: the binding's CsInsn copies
# each instruction's ~1.9 KB detail and builds Python objects for every field asked for, which
# made decoding ~20 us per instruction (a tenth of a cold Linux boot).
def _struct(fields):
    """A struct.Struct reading [(field offset, format)] in order (the gaps skipped)."""
    fmt, pos = "<", 0
    for off, f in fields:
        fmt += f"{off - pos}x{f}" if off > pos else f
        pos = off + struct.calcsize("<" + f)
    return struct.Struct(fmt)


_I, _D, _X, _XO = capstone._cs_insn, capstone._cs_detail, X.CsX86, X.X86Op
_ARCH = _D.arch.offset
_INSN = _struct([(_I.id.offset, "I"), (_I.address.offset, "Q"), (_I.size.offset, "H"), (_I.bytes.offset, "24s"),
                 (_I.mnemonic.offset, "32s"), (_I.op_str.offset, "160s"), (_I.detail.offset, "Q")])
_DETAIL = _struct([(_D.groups.offset, "8s"), (_D.groups_count.offset, "B"), (_ARCH + _X.prefix.offset, "4s"),
                   (_ARCH + _X.addr_size.offset, "B"), (_ARCH + _X.op_count.offset, "B")])
_OPS_AT = _ARCH + _X.operands.offset
_OP = _struct([(_XO.type.offset, "I"), (_XO.value.offset, "IIIiq"), (_XO.size.offset, "B")])
_OP_IMM = struct.Struct("<q")
_OP_SIZE = ctypes.sizeof(_XO)
_DETAIL_SIZE = _OPS_AT + 8 * _OP_SIZE
_INSN_SIZE = ctypes.sizeof(_I)
_REG_OPS = {}


def _cstr(b):
    return b[:b.index(0)].decode() if 0 in b else b.decode()


# cs_disasm_iter decodes one instruction into a buffer of the caller's: a block takes exactly
# the instructions it needs (cs_disasm decodes, with detail, as many as it is asked for, and most
# blocks end long before any fixed count).  One buffer per thread that decodes.
_ITER = capstone._cs["cs_disasm_iter"]          # a function object of our own: prototypes set here
_ITER.argtypes = [ctypes.c_size_t, ctypes.POINTER(ctypes.c_void_p), ctypes.POINTER(ctypes.c_size_t),
                  ctypes.POINTER(ctypes.c_uint64), ctypes.c_void_p]
_ITER.restype = ctypes.c_bool
_MALLOC = capstone._cs["cs_malloc"]
_MALLOC.argtypes = [ctypes.c_size_t]
_MALLOC.restype = ctypes.c_void_p
_BUFFERS = threading.local()


def _insn_buffer(bits):
    """This thread's cs_insn (with detail) for mode bits, allocated once and kept for good:
    (Capstone handle, the cs_insn's address, a view of its bytes), as _ITER takes them."""
    got = getattr(_BUFFERS, "m%d" % bits, None)
    if got is None:
        csh = _disassembler(bits).csh
        buf = _MALLOC(csh)
        if not buf:
            raise MemoryError("Capstone could not allocate an instruction")
        got = (csh, ctypes.c_void_p(buf), (ctypes.c_char * _INSN_SIZE).from_address(buf))
        setattr(_BUFFERS, "m%d" % bits, got)
    return got


def disasm(code, addr, count, bits=32):
    """Decode up to count instructions of code (bytes) at addr: a generator of Insns that stops
    at the first bytes that are not an instruction.  Each instruction is decoded only when
    asked for."""
    csh, insn, view = _insn_buffer(bits)
    keep = ctypes.c_char_p(code if type(code) is bytes else bytes(code))   # read in place
    ptr = ctypes.c_void_p(ctypes.cast(keep, ctypes.c_void_p).value)
    size = ctypes.c_size_t(len(code))
    address = ctypes.c_uint64(addr)
    refs = ctypes.byref(ptr), ctypes.byref(size), ctypes.byref(address)
    while count > 0 and _ITER(csh, *refs, insn):
        count -= 1
        yield _normalize(view, 0, bits)     # read before the next instruction overwrites it


# Instructions decoded before, by (mode bits, bytes): a block's instructions are mostly forms
# met before elsewhere (push ebp, mov eax, [ebp+8]...), and building an Insn from Capstone's
# detail is most of decoding's cost.  A relative branch (~57% of a Linux boot's first meetings:
# its bytes recur at other addresses) is kept with its displacement: Capstone's target is the
# next instruction's address plus it, modulo 2**32 (any operand size), and so is its text.
# Per mode bits, keyed by the bytes the memo keeps anyway (~80,000 entries for a Linux boot).
_SEEN = {}
_SEEN_MAX = 1 << 17
_HEAD = _struct([(_I.address.offset, "Q"), (_I.size.offset, "H"), (_I.bytes.offset, "16s")])


def _normalize(buf, at, bits, detail_at=None):
    """One Capstone cs_insn (at offset at of buf) as an Insn; its detail is where the cs_insn
    points, or at offset detail_at of buf (a copy)."""
    address, size, raw16 = _HEAD.unpack_from(buf, at)
    memo_of = _SEEN.get(bits)
    if memo_of is None:
        memo_of = _SEEN[bits] = {}
    seen = memo_of.get(raw16[:size])
    if seen is not None:
        if len(seen) == 14:
            return Insn(address, *seen)
        target = (address + size + seen[14]) & 0xFFFFFFFF
        return Insn(address, size, seen[1], seen[2], seen[3], _imm_text(target),
                    (Op("imm", seen[15], imm=target),), *seen[6:12], True, (target, 0, 0, 0))
    insn = _normalize_detail(buf, at, bits, detail_at)
    if len(memo_of) >= _SEEN_MAX:
        memo_of.clear()
    memo = (insn.size, insn.raw, insn.id, insn.mnemonic, insn.op_str, insn.ops, insn.rep, insn.lock, insn.opsize,
            insn.addrsize, insn.seg_override, insn.groups, False, insn.values)
    if not insn.relative:
        memo_of[insn.raw] = memo
    elif len(insn.ops) == 1 and insn.ops[0].kind == "imm" and insn.op_str == _imm_text(insn.ops[0].imm):
        # Without the text, operands and values a hit makes anew (~20 MB of a Linux boot's).
        memo_of[insn.raw] = memo[:4] + (None, None) + memo[6:13] + (
            None, (insn.ops[0].imm - insn.next) & 0xFFFFFFFF, insn.ops[0].size)
    return insn


def _imm_text(v):
    """Capstone's text of an immediate operand (decimal up to 9)."""
    return f"{v:#x}" if v > 9 else str(v)


_SHARED = {}
_NO_VALUES = (0, 0, 0, 0)


def _normalize_detail(buf, at, bits, detail_at=None):
    iid, address, size, raw, mnemonic, op_str, dptr = _INSN.unpack_from(buf, at)
    if detail_at is None:
        d = ctypes.string_at(dptr, _DETAIL_SIZE)
    else:
        d = bytes(buf[detail_at:detail_at + _DETAIL_SIZE])
    groups, ngroups, pfx, addrsize, nops = _DETAIL.unpack_from(d)
    rep = pfx[0] if pfx[0] in (0xF2, 0xF3) else 0
    lock = pfx[0] == 0xF0
    seg_override = _SEG_PREFIX.get(pfx[1])
    if bits == 32:
        opsize = 2 if pfx[2] == 0x66 else 4
    else:
        opsize = 4 if pfx[2] == 0x66 else 2
    ops = []
    for k in range(nops):
        pos = _OPS_AT + k * _OP_SIZE
        typ, v0, v1, v2, v3, v4, osize = _OP.unpack_from(d, pos)
        if typ == X.X86_OP_REG:
            op = _REG_OPS.get((v0, osize))
            if op is None:
                op = _REG_OPS[(v0, osize)] = _reg_operand(v0, osize)
            ops.append(op)
        elif typ == X.X86_OP_IMM:
            # Capstone reports size 0 for the implicit count of the D0/D1 shift forms.
            ops.append(Op("imm", osize or 1, imm=_OP_IMM.unpack_from(d, pos + _XO.value.offset)[0]))
        elif typ == X.X86_OP_MEM:
            ops.append(Op("mem", osize, mem=_mem_operand(v0, v1, v2, v3, v4, addrsize, seg_override)))
        else:
            raise DecodeError("unknown operand type")
    groups = tuple(groups[:ngroups])
    groups = _SHARED.setdefault(groups, groups)         # few distinct: one object each
    values = tuple([(o.imm if o.kind == "imm" else o.mem.disp if o.kind == "mem" else 0) & 0xFFFFFFFF
                    for o in ops[:4]] + [0] * (4 - min(4, len(ops))))
    if values == _NO_VALUES:
        values = _NO_VALUES
    return Insn(address, size, raw[:size], iid, sys.intern(_cstr(mnemonic)), _cstr(op_str), tuple(ops),
                rep, lock, opsize, addrsize, seg_override, groups, capstone.CS_GRP_BRANCH_RELATIVE in groups, values)


# ---- a block's instructions decoded in one native call -------------------------------------
# decode_block with rules (a BlockRules) calls btvm_decode once per block instead of Capstone
# once per instruction from Python: it loops over cs_disasm_iter (whose address it is handed:
# never part of IR that the disk cache keeps), applies the block rules from a table by
# instruction id, and copies each instruction and its detail out for _normalize.
RULE_ENDS, RULE_RESUMABLE = 1, 2
_SLOT = _INSN_SIZE + _DETAIL_SIZE
_STOP_MAX, _STOP_UNDECODED, _STOP_STARTS, _STOP_ENDS, _STOP_PAGE = range(1, 6)


class BlockRules:
    """Block rules as btvm_decode reads them: table, a byte per Capstone instruction id,
    RULE_ENDS if the instruction ends a block, RULE_RESUMABLE if it must begin one when it has a
    REP prefix (bt.semantics.block_rules makes it from the same rules as its functions)."""
    __slots__ = ("table", "addr")

    def __init__(self, table):
        self.table = bytes(table)
        self.addr = ctypes.cast(ctypes.c_char_p(self.table), ctypes.c_void_p).value


_NATIVE = None


def _native():
    global _NATIVE
    if _NATIVE is None:
        from .jit import ModuleText, shared_jit
        mt = ModuleText("btvm_decode")
        mt.functions.append(_DECODE_IR)
        fns, _ = shared_jit().compile_cached(mt, ["btvm_decode"])
        p = ctypes.c_void_p
        u32, u64 = ctypes.c_uint32, ctypes.c_uint64
        _NATIVE = (ctypes.CFUNCTYPE(u64, p, ctypes.c_size_t, p, ctypes.c_char_p, u64, u64, u64, u32, u64, p, u32,
                                    p, u32)(fns["btvm_decode"]),
                   ctypes.cast(_ITER, ctypes.c_void_p).value)
    return _NATIVE


def _out_buffer():
    """This thread's buffer for MAX_BLOCK_INSNS copied instructions: (ctypes buffer, view)."""
    got = getattr(_BUFFERS, "out", None)
    if got is None:
        buf = ctypes.create_string_buffer(MAX_BLOCK_INSNS * _SLOT)
        got = _BUFFERS.out = (buf, memoryview(buf).cast("B"))
    return got


def _decode_native(rules, code, start, pos, page_end, max_insns, bits, blk):
    """Decode from pos (code holds the bytes from start on) into blk, natively: the position
    reached and whether the block is complete (False: Capstone stopped at pos)."""
    fn, iter_addr = _NATIVE or _native()
    csh, insn, _ = _insn_buffer(bits)
    out, view = _out_buffer()
    got = fn(iter_addr, csh, insn, code, len(code), pos - start, pos,
             max_insns - len(blk.insns), page_end, rules.addr, len(rules.table), out, len(blk.insns) > 0)
    n, why = got & 0xFFFFFFFF, got >> 32
    insns = blk.insns
    for k in range(n):
        at = k * _SLOT
        insn = _normalize(view, at, bits, at + _INSN_SIZE)
        insns.append(insn)
        pos += insn.size
    return pos, why != _STOP_UNDECODED


_DECODE_IR = f'''
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)

define i64 @btvm_decode(ptr %iter, i64 %csh, ptr %insn, ptr %code, i64 %len, i64 %off, i64 %pos, i32 %max,
                        i64 %page_end, ptr %table, i32 %ntable, ptr %out, i32 %had) nounwind {{
entry:
  %cnt = alloca i32
  store i32 0, ptr %cnt
  %codep = alloca ptr
  %sizep = alloca i64
  %addrp = alloca i64
  %from = getelementptr i8, ptr %code, i64 %off
  store ptr %from, ptr %codep
  %left = sub i64 %len, %off
  store i64 %left, ptr %sizep
  store i64 %pos, ptr %addrp
  %dpp = getelementptr i8, ptr %insn, i64 {_I.detail.offset}
  %had1 = icmp ne i32 %had, 0
  br label %head
head:
  %c = load i32, ptr %cnt
  %full = icmp uge i32 %c, %max
  br i1 %full, label %done, label %dec
dec:
  %ok = call i1 %iter(i64 %csh, ptr %codep, ptr %sizep, ptr %addrp, ptr %insn)
  br i1 %ok, label %got, label %done
got:
  %id = load i32, ptr %insn
  %known = icmp ult i32 %id, %ntable
  br i1 %known, label %look, label %have
look:
  %id64 = zext i32 %id to i64
  %tp = getelementptr i8, ptr %table, i64 %id64
  %t = load i8, ptr %tp
  br label %have
have:
  %tv = phi i8 [ %t, %look ], [ {RULE_ENDS}, %got ]
  %dp = load ptr, ptr %dpp
  %pfxp = getelementptr i8, ptr %dp, i64 {_ARCH + _X.prefix.offset}
  %pfx = load i8, ptr %pfxp
  %isf2 = icmp eq i8 %pfx, -14
  %isf3 = icmp eq i8 %pfx, -13
  %rep = or i1 %isf2, %isf3
  %resv = and i8 %tv, {RULE_RESUMABLE}
  %res = icmp ne i8 %resv, 0
  %some0 = icmp ne i32 %c, 0
  %some = or i1 %some0, %had1
  %s1 = and i1 %rep, %res
  %starts = and i1 %s1, %some
  br i1 %starts, label %done, label %take
take:
  %c64 = zext i32 %c to i64
  %o = mul i64 %c64, {_SLOT}
  %dst = getelementptr i8, ptr %out, i64 %o
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %insn, i64 {_INSN_SIZE}, i1 false)
  %dst2 = getelementptr i8, ptr %dst, i64 {_INSN_SIZE}
  call void @llvm.memcpy.p0.p0.i64(ptr %dst2, ptr %dp, i64 {_DETAIL_SIZE}, i1 false)
  %c1 = add i32 %c, 1
  store i32 %c1, ptr %cnt
  %endv = and i8 %tv, {RULE_ENDS}
  %ends = icmp ne i8 %endv, 0
  br i1 %ends, label %done, label %next
next:
  %a = load i64, ptr %addrp
  %past = icmp uge i64 %a, %page_end
  br i1 %past, label %done, label %head
done:
  %taken = phi i32 [ %c, %head ], [ %c, %dec ], [ %c, %have ], [ %c1, %take ], [ %c1, %next ]
  %why = phi i64 [ {_STOP_MAX << 32}, %head ], [ {_STOP_UNDECODED << 32}, %dec ], [ {_STOP_STARTS << 32}, %have ],
                 [ {_STOP_ENDS << 32}, %take ], [ {_STOP_PAGE << 32}, %next ]
  %taken64 = zext i32 %taken to i64
  %r = or i64 %taken64, %why
  ret i64 %r
}}
'''


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

    # Asked for several times per block translated (decode_block has finished by then).
    _raw: bytes = field(default=None, repr=False, compare=False)

    @property
    def raw(self):
        raw = self._raw
        if raw is None:
            raw = self._raw = b"".join([i.raw for i in self.insns])
        return raw

    def pages(self):
        """Guest pages the block's bytes lie on (an instruction may straddle two)."""
        first = self.eip & ~(PAGE - 1)
        last = (self.end - 1) & ~(PAGE - 1)
        return (first,) if first == last else (first, last & 0xFFFFFFFF)


def decode_block(fetch, eip, key, ends_block, max_insns=MAX_BLOCK_INSNS, starts_block=None, rules=None):
    """Decode a basic block at eip.

    fetch(addr, n) returns up to n readable code bytes at addr (fewer at the end
    of executable memory).  ends_block(insn) says whether an instruction ends
    the block (control transfer, callout); starts_block(insn), whether the block
    must end before it.  The block also ends at a page boundary, so that
    code-page tracking stays per page.  rules (a BlockRules of the same two
    functions) decodes the block in one native call.
    """
    bits = 32 if key & S.KEY_CS32 else 16
    if key & S.KEY_STEP:
        max_insns = 1
    page_end = (eip & ~(PAGE - 1)) + PAGE
    # The block's page first (one translation, one read); the 15 bytes past it only if an
    # instruction may straddle the page end.
    want = page_end - eip
    code = fetch(eip, want)
    blk = Block(eip, key)
    pos = eip
    while True:
        if rules is not None and type(code) is bytes:
            pos, done = _decode_native(rules, code, eip, pos, page_end, max_insns, bits, blk)
            if done:
                return blk
        else:
            for insn in disasm(code[pos - eip:] if pos != eip else code, pos, max_insns - len(blk.insns), bits):
                if starts_block is not None and blk.insns and starts_block(insn):
                    return blk
                blk.insns.append(insn)
                pos += insn.size
                if ends_block(insn) or len(blk.insns) >= max_insns or pos >= page_end:
                    return blk
        if want != page_end - eip or len(code) < want or page_end - pos >= 15:
            break
        want += 15
        code = fetch(eip, want)
    # Capstone stopped: the bytes at pos do not decode, or were cut short by
    # memory that could not be fetched (the fetch fault is raised only if reached).
    truncated = len(code) < want
    left = len(code) - (pos - eip)
    blk.stop_reason = "fetch" if truncated and left < 15 else "undecodable"
    return blk

"""Tier 1 by copy-and-patch: blocks assembled from precompiled per-instruction stencils.

A stencil is the machine code of one guest instruction *shape*: the instruction with its
addresses, immediates and displacements left open as "holes" (bt.emit.Hole), emitted by the
same semantics table as every other translation and compiled once by LLVM (a short pipeline,
small code model, static relocations).  The holes are external symbols, so the object file's relocations
say where each one's value goes.  A block is instantiated by copying the stencils of its
instructions one after the other into executable memory (bt.codemem) and patching the holes:
the instruction's address and operands, the chain slots of its exits, and the address of the
next stencil (the final `jmp` to it is dropped: the next stencil follows directly).  Each
instruction form's stencil is kept as a Piece with what is the same for the whole form already
patched in; bt.assemble's native code places a block's pieces with their vars (addresses,
immediates, displacements) and installs the result.

Stencil state contract: between stencils every guest register and flag is in the CPU state
(each stencil loads what it reads and stores what it writes); the block-head stencil charges
the block's instructions to the budget, counts down to tier 2 and counts executions, and an
exit inside a stencil refunds the instructions from there to the block's end (holes h_left,
h_left1).  Everything else -- exits, chaining, precise faults, the soft-MMU -- is the
emitter's, unchanged.

Shapes whose semantics need a field's concrete value (a semantic that computes with it in
Python) raise HoleUse while being emitted; the shape is then emitted again with that kind of
field fixed (LEVELS), and a shape that cannot be made a stencil at all leaves its block to the
LLVM tier-1 path.  Stencils are kept in memory and on disk (bt.diskcache's folder), keyed by
a hash of the shape and the translator version, so each is compiled once per machine.
"""
import ctypes
import dataclasses
import hashlib
import os
import re
import struct
import time
import weakref

import llvmlite.binding as llvm

from . import assemble, diskcache, emit, state as S
from .codemem import Arena
from .decode import Block, Reg
from .emit import Emitter, Hole, HoleUse
from .jit import ModuleText, _init, host_target_machine
from .semantics import Unsupported, ends_block
from .translate import emit_insn

# LLVM's code generator level for stencils: 0 (fast instruction selection and register
# allocation) costs ~0.9 ms per stencil, 1-2 about 2.3 ms for code ~35% smaller (measured on the
# corpus's stencils).  Cold boots meet thousands of shapes, and hot code goes to tier 2 anyway.
CODEGEN_OPT = int(os.environ.get("BTVM_STENCIL_CG", "0"))

# What is left open, by level: 0 immediates, displacements and registers, 1 displacements and
# registers, 2 nothing (addresses and budget refunds are always holes).  A register hole holds
# the state offset of the register an operand names; the shape keeps which operands name the
# same register, so two holes never alias each other (and see InsnShape.aliases).
LEVELS = 3
MAX_OPS = 4
MAX_SLOTS = 4
MAX_VREGS = 4
VALUE_HOLES = (["h_eip", "h_next", "h_left", "h_left1", "h_n", "h_beip", "h_target", "h_key"]
               + [f"h_imm{i}" for i in range(MAX_OPS)] + [f"h_disp{i}" for i in range(MAX_OPS)]
               + [f"h_reg{j}" for j in range(MAX_VREGS)])
CELL_HOLES = [f"h_slot{i}" for i in range(MAX_SLOTS)] + ["h_hot", "h_cnt"]
CONT = "h_cont"
_HOLE_DECLS = ([f"@{h} = external dso_local global i8, !absolute_symbol !0" for h in VALUE_HOLES]
               + [f"@{h} = external dso_local global i8, !absolute_symbol !1" for h in CELL_HOLES]
               + [f"declare {emit.CC} i32 @{CONT}(ptr)",
                  "!0 = !{i64 0, i64 4294967296}",       # any 32-bit value (never sign-extended)
                  "!1 = !{i64 0, i64 2147483648}"])      # cells live below 2 GiB (bt.codemem)
_HOLES = frozenset(VALUE_HOLES + CELL_HOLES + [CONT])

# ELF x86-64 relocation types a stencil may use: size in bytes, pc-relative.
_RELOCS = {1: (8, False), 2: (4, True), 4: (4, True), 10: (4, False), 11: (4, False),
           12: (2, False), 14: (1, False)}


class Stencil:
    """Machine code with holes: code bytes and [(offset, size, pc-relative, hole, addend)];
    phys, a mask of the GPRs its semantics name directly (filled in by Library)."""
    __slots__ = ("code", "relocs", "slots", "falls_through", "phys", "vused", "plan")

    def __init__(self, code, relocs):
        # The jump to the next stencil at the very end is dropped: the next one is copied there.
        self.falls_through = False
        if relocs and relocs[-1][3] == CONT and relocs[-1][0] == len(code) - 4 and code[-5] == 0xE9:
            code = code[:-5]
            relocs = relocs[:-1]
            self.falls_through = True
        self.code = bytes(code)
        self.relocs = relocs
        self.phys = 0
        self._holes_used()
        if any(r[3] == CONT for r in relocs):
            self.falls_through = True

    def _holes_used(self):
        self.slots = sorted({r[3] for r in self.relocs if r[3].startswith("h_slot")})
        self.vused = sorted({int(r[3][5:]) for r in self.relocs if r[3].startswith("h_reg")})
        # _assemble's work per relocation, decided once: (kind, offset, size, pc-relative, hole
        # or slot number, addend, struct format, mask).
        plan = []
        for off, size, pcrel, sym, addend in self.relocs:
            if sym in self.slots:
                kind, sym = _R_SLOT, self.slots.index(sym)
            elif sym in ("h_hot", "h_cnt"):
                kind, sym = _R_CELL, _HOT if sym == "h_hot" else _CNT
            elif sym == CONT:
                kind = _R_CONT_PC if pcrel else _R_CONT
            else:
                kind = _R_VALUE_PC if pcrel else _R_VALUE
            plan.append((kind, off, size, pcrel, sym, addend, _PACK[size], _MASK[size]))
        self.plan = plan


# ---- shapes --------------------------------------------------------------------------------
def _plain_entry(e):
    """Stencil entry without a block prologue: the state is in memory, loaded where read."""
    e.lines.append("entry:")
    e.reload()


def _continue(e):
    """Go on to the next stencil (a jump that Stencil drops when the next one follows it)."""
    r = e.op(f"musttail call {emit.CC} i32 @{CONT}(ptr %st)", "i32")
    e.emit(f"ret i32 {r.s}")


class _HoledInsn:
    """A decode.Insn with holes for its address, length-derived next address and some operands."""
    __slots__ = ("addr", "size", "raw", "id", "mnemonic", "op_str", "ops", "rep", "lock", "opsize",
                 "addrsize", "seg_override", "groups", "next")

    def text(self):
        return f"{self.mnemonic} {self.op_str}".strip()


class _RawHole:
    """Instruction bytes that a semantic may not look at (they hold holed operands)."""

    def _used(self, *_):
        raise HoleUse("raw")

    __getitem__ = __len__ = __iter__ = __contains__ = hex = _used


_IMM_HOLES = [f"h_imm{i}" for i in range(MAX_OPS)]
_DISP_HOLES = [f"h_disp{i}" for i in range(MAX_OPS)]
_REGS_OFF = S.offset("regs")
_VREGS = {}


def _vreg(r, actual, vals):
    """The register hole standing for GPR view r in an instruction whose holes so far hold
    actual (a new hole is appended, its value set in vals); r itself past MAX_VREGS."""
    try:
        j = actual.index(r.index)
    except ValueError:
        j = len(actual)
        if j == MAX_VREGS:
            return r
        actual.append(r.index)
        vals[f"h_reg{j}"] = _REGS_OFF + 4 * r.index
    k = (j, r.width, r.hi)
    v = _VREGS.get(k)
    if v is None:
        v = _VREGS[k] = Reg(8 + j, r.width, r.hi)
    return v


_KEYS = {}              # shape key -> itself
_KINDS = {}             # KEY_CS32 bit -> {instruction bytes: (Capstone id, operand kinds)}: Library.level's key
_KIND_OF = {}           # (Capstone id, operand kinds) -> itself: ~2,000 distinct for ~120,000 byte strings
_SHAPES_MAX = 1 << 17


class InsnShape:
    """One instruction as a stencil at a level: its key and the values of its holes.
    open_regs=False keeps the registers fixed even at levels 0 and 1 (see aliases)."""

    def __init__(self, insn, key, level, block_eip, open_regs=True):
        # Called for every instruction the first time Builder meets its bytes in a mode (after
        # that its Piece is looked up): plain tuples, no dataclass copies.
        self.insn, self.tkey, self.level, self.block_eip = insn, key, level, block_eip
        self.open_regs = open_regs = open_regs and level < 2
        # Direct exits: whether each possible target leaves the block's page (only matters
        # with paging, where chains stay on their page; bt.emit.Emitter.exit_direct).
        cross = self.cross = {}
        if key & S.KEY_PG and ends_block(insn):
            if insn.relative:           # its immediate is a target
                for i, op in enumerate(insn.ops):
                    if op.kind == "imm":
                        cross[f"h_imm{i}"] = bool(((op.imm & 0xFFFFFFFF) ^ block_eip) & ~0xFFF)
            cross["h_next"] = bool((insn.next ^ block_eip) & ~0xFFF)
        vals = {"h_eip": insn.addr, "h_next": insn.next}
        actual = self.actual = []    # register hole j -> the GPR index it holds here
        kops = []
        for i, op in enumerate(insn.ops):
            kind = op.kind
            if kind == "reg":
                r = _vreg(op.reg, actual, vals) if open_regs else op.reg
                kops.append(("reg", op.size, r.index, r.width, r.hi))
            elif kind == "mem":
                m = op.mem
                b, x = m.base, m.index
                if open_regs:
                    b = b and _vreg(b, actual, vals)
                    x = x and _vreg(x, actual, vals)
                kop = ("mem", op.size, m.seg, b and (b.index, b.width), x and (x.index, x.width), m.scale, m.addr16)
                if level <= 1:
                    vals[_DISP_HOLES[i]] = m.disp & 0xFFFFFFFF
                else:
                    kop += (m.disp,)
                kops.append(kop)
            elif kind == "imm":
                if level == 0:
                    vals[_IMM_HOLES[i]] = op.imm & 0xFFFFFFFF
                    kops.append(("imm", op.size))
                else:
                    kops.append(("imm", op.size, op.imm))
            else:
                kops.append((kind, op.size, op.reg))
        self.vregs = len(actual)
        self.values = vals
        self.key = ("i", level, key & ~S.KEY_STEP, insn.id, insn.mnemonic, insn.opsize, insn.addrsize, insn.rep, insn.lock,
                    insn.seg_override, insn.groups, tuple(kops), insn.raw if level == 2 else None,
                    tuple(sorted(self.cross.items())))
        # Equal keys of different instructions share one tuple (a boot has ~40,000 distinct
        # instructions but ~1,400 shapes).
        if len(_KEYS) >= _SHAPES_MAX:
            _KEYS.clear()
        self.key = _KEYS.setdefault(self.key, self.key)

    def eip_holes(self):
        """The holes whose values are guest addresses relative to the instruction (its own, the
        next one's, a relative branch's target), or None if such an address is part of the
        stencil itself (a relative branch at a level that fixes immediates)."""
        insn = self.insn
        if not insn.relative:
            return _INSN_MOVES
        out = set(_INSN_MOVES)
        for i, op in enumerate(insn.ops):
            if op.kind == "imm":
                if f"h_imm{i}" not in self.values:
                    return None
                out.add(f"h_imm{i}")
        return out

    def aliases(self, st):
        """Whether st, this shape's stencil, names a GPR directly (an implicit operand) that one
        of the register holes it uses holds here: the stencil's register values would then not
        see each other's updates, so this instance takes a shape with fixed registers."""
        return any(st.phys >> self.actual[j] & 1 for j in st.vused)

    def _virtual(self, r):
        if r is None or r.index not in self.actual:
            return r
        return _vreg(r, self.actual, None)

    def fix_regs(self):
        self.__init__(self.insn, self.tkey, self.level, self.block_eip, open_regs=False)

    def holed(self):
        """The instruction as the semantics see it in the stencil."""
        i = self.insn
        ops = []
        for k, op in enumerate(i.ops):
            if self.open_regs:
                if op.kind == "reg":
                    op = dataclasses.replace(op, reg=self._virtual(op.reg))
                elif op.kind == "mem":
                    m = op.mem
                    op = dataclasses.replace(op, mem=dataclasses.replace(
                        m, base=self._virtual(m.base), index=self._virtual(m.index)))
            if f"h_imm{k}" in self.values:
                op = dataclasses.replace(op, imm=Hole(f"h_imm{k}"))
            elif f"h_disp{k}" in self.values:
                op = dataclasses.replace(op, mem=dataclasses.replace(op.mem, disp=Hole(f"h_disp{k}")))
            ops.append(op)
        h = _HoledInsn()
        h.addr, h.size, h.raw, h.id, h.mnemonic, h.op_str = Hole("h_eip"), i.size, \
            (i.raw if self.level == 2 else _RawHole()), i.id, i.mnemonic, i.op_str
        h.ops, h.rep, h.lock, h.opsize, h.addrsize = tuple(ops), i.rep, i.lock, i.opsize, i.addrsize
        h.seg_override, h.groups, h.next = i.seg_override, i.groups, Hole("h_next")
        return h

    def crosses_page(self, target):
        if not self.tkey & S.KEY_PG:
            return False
        if type(target) is Hole and target.name in self.cross:
            return self.cross[target.name]
        raise HoleUse("direct exit without a page decision")

    prologue = staticmethod(_plain_entry)

    def emit(self, e):
        emit_insn(e, 0, self.holed())
        if not e.terminated:
            e.flush()
            _continue(e)


class HeadShape:
    """The block head: tier-2 countdown, execution counter, budget."""

    def __init__(self, key, hot, count):
        self.hot, self.count = hot, count
        self.key = ("h", key & ~S.KEY_STEP, bool(hot), bool(count))

    def prologue(self, e):
        e._emit_prologue(Hole("h_beip"), Hole("h_n"), hot="h_hot" if self.hot else None,
                         counter="h_cnt" if self.count else None)

    emit = staticmethod(_continue)


class TailShape:
    """The exit of a block that ends without a control transfer (page end, length limit)."""

    def __init__(self, key, cross):
        self.cross = cross
        self.key = ("t", key & ~S.KEY_STEP, bool(cross) if key & S.KEY_PG else False)

    prologue = staticmethod(_plain_entry)

    def crosses_page(self, target):
        return self.cross

    def emit(self, e):
        e.exit_direct(Hole("h_target"))


def _name(key):
    return "s" + hashlib.blake2b(repr(key).encode(), digest_size=12).hexdigest()


def _kind(insn, key):
    """What a shape's level is chosen by: (Capstone id, operand kinds), remembered by bytes."""
    kinds = _KINDS.get(key & S.KEY_CS32)
    if kinds is None:
        kinds = _KINDS[key & S.KEY_CS32] = {}
    kind = kinds.get(insn.raw)
    if kind is None:
        if len(kinds) >= _SHAPES_MAX:
            kinds.clear()
        kind = (insn.id, tuple([o.kind for o in insn.ops]))
        kind = kinds[insn.raw] = _KIND_OF.setdefault(kind, kind)
    return kind


# ---- the library -------------------------------------------------------------------------
class Library:
    """Compiled stencils by shape key; compiles missing ones in batches."""

    def __init__(self, store=None):
        self.tm = host_target_machine(CODEGEN_OPT, reloc="static", codemodel="small")
        self.stencils = {}          # shape key -> Stencil, ESCALATE, or None: cannot be a stencil
        self.store = store
        self.loaded = 0             # stencils taken from the store
        self.level = {}             # (insn id, operand kinds) -> lowest level that may emit
        self.compiled = 0
        self.compile_seconds = 0.0
        self.modules = 0
        self.shared = 0             # shapes that took a stencil compiled for another shape
        self.by_ir = {}             # _ir_signature -> Stencil or None
        # Builder's Pieces: (instruction bytes, key, page crossing of a final exit) -> Piece, and
        # the block heads' and tails'.  A level that rises later for an instruction's kind does
        # not make its piece wrong: that stencil emitted with those holes open.
        self.pieces = {}
        self.forms = {}             # _form_key -> Piece

    def level_of(self, insn, key):
        """The level known to work for insn's kind (or the first)."""
        return self.level.get(_kind(insn, key), 0)

    def shape(self, insn, key, block_eip):
        """The InsnShape of insn at the level known to work for its kind."""
        return InsnShape(insn, key, self.level_of(insn, key), block_eip)

    def get(self, shapes):
        """The Stencil of each shape (None where one cannot exist), compiling the missing ones.
        A shape whose level turns out too open is raised (in place) until one emits: its
        values then match the stencil returned."""
        while True:
            todo = {}
            for sh in shapes:
                st = self._lookup(sh.key)
                while True:
                    if st is ESCALATE:
                        self._raise(sh)
                    elif type(st) is Stencil and type(sh) is InsnShape and sh.open_regs and sh.aliases(st):
                        sh.fix_regs()
                    else:
                        break
                    st = self._lookup(sh.key)
                if st is _MISSING and sh.key not in todo:
                    todo[sh.key] = sh
            if not todo:
                break
            self._compile(list(todo.values()))
        return [self.stencils[sh.key] for sh in shapes]

    def _lookup(self, key):
        st = self.stencils.get(key, _MISSING)
        if st is _MISSING and self.store is not None:
            rec = self.store.get(_digest(key))
            if rec is not None:
                st = self.stencils[key] = rec[1] if rec[0] == "s" else ESCALATE if rec[0] == "e" else None
                self.loaded += rec[0] == "s"
        return st

    def _raise(self, sh):
        """Emit sh one level less open from now on (for every instruction of its kind)."""
        kind = _kind(sh.insn, sh.tkey)
        self.level[kind] = max(self.level.get(kind, 0), sh.level + 1)
        sh.__init__(sh.insn, sh.tkey, sh.level + 1, sh.block_eip, sh.open_regs)

    def _optimize(self, mod):
        """A short pipeline: inline the soft-MMU helpers (and drop them: nothing else should
        spend time on them), fold the holes' arithmetic, merge the fault paths.  Measured on a
        Linux boot's 658 stencil modules: LLVM's -O2 pipeline costs 4x more for code 2% smaller,
        and GVN and DCE after these passes took optimizing+codegen 1.7 -> 1.3 s for code 2%
        smaller.  A fresh PassBuilder per module, as bt.jit explains."""
        pb = llvm.create_pass_builder(self.tm, llvm.create_pipeline_tuning_options(speed_level=0))
        mpm = llvm.create_new_module_pass_manager()
        mpm.add_always_inliner_pass()
        mpm.add_global_dead_code_eliminate_pass()
        mpm.add_instruction_combine_pass()
        mpm.add_simplify_cfg_pass()
        mpm.run(mod, pb)

    def _emit(self, sh, mt):
        """Append sh's function to mt; its mask of directly named GPRs (Stencil.phys), or None
        if the semantics cannot work with its holes."""
        name = _name(sh.key)
        blk = Block(0, sh.key[1] if sh.key[0] != "i" else sh.key[2], [])
        e = Emitter(name, blk, blk.key, mt, stencil=sh)
        mark = (len(mt.functions), dict(mt.helpers), set(mt.decls))
        try:
            sh.emit(e)
        except (HoleUse, TypeError, Unsupported):
            mt.functions[mark[0]:], mt.helpers, mt.decls = [], mark[1], mark[2]
            return None
        if len(e.slots) > MAX_SLOTS:
            return None
        # Its own section: a call from it to anything else in the module (a helper LLVM did not
        # inline) is then a relocation that parse_object sees and refuses, never a silent
        # pc-relative call resolved inside one .text that would dangle once the code is copied.
        head, rest = e.text().split("\n", 1)
        assert head.endswith(" {")
        mt.functions.append(f'{head[:-2]} section ".text.{name}" {{\n{rest}')
        return sum(1 << i for i in e.touched_regs)

    def _compile(self, shapes):
        """Emit and compile the stencils of shapes (one module).  A shape whose semantics use
        one of its holes as a number is marked ESCALATE: get() retries it one level up.  A shape
        whose IR is that of a stencil compiled before (the same instruction in another mode whose
        code does not depend on it, ~40% of a Linux boot's shapes) takes that stencil."""
        t0 = time.perf_counter()
        mt = ModuleText(f"stencils{self.modules}")
        for d in _HOLE_DECLS:
            mt.declare(d)
        names, phys, sigs, same = {}, {}, {}, []
        for sh in shapes:
            mask = self._emit(sh, mt)
            if mask is None:
                self.stencils[sh.key] = ESCALATE if isinstance(sh, InsnShape) and sh.level + 1 < LEVELS else None
                continue
            sig = _ir_signature(mt, _name(sh.key), mask)
            st = self._by_ir(sig)
            if st is not _MISSING or sig in sigs.values():
                mt.functions.pop()      # compiled before, or earlier in this module
                same.append((sh.key, sig))
                continue
            names[_name(sh.key)] = sh.key
            phys[sh.key] = mask
            sigs[sh.key] = sig
        if names:
            mod = llvm.parse_assembly(mt.text())
            self._optimize(mod)
            obj = self.tm.emit_object(mod)
            for name, st in parse_object(obj).items():
                if name in names and st is not None:
                    st.phys = phys[names[name]]
                    self.stencils[names[name]] = st
                elif name in names:
                    self.stencils[names[name]] = st
            for key in names.values():
                self.stencils.setdefault(key, None)
                self.by_ir[sigs[key]] = self.stencils[key]
            self.compiled += len(names)
            self.modules += 1
        for key, sig in same:
            self.stencils[key] = self.by_ir[sig]
        self.shared += len(same)
        if self.store is not None:
            new = {}
            for sh in shapes:
                new[_digest(sh.key)] = _record(self.stencils[sh.key])
            for key, sig in sigs.items():
                new[_digest(sig)] = _record(self.stencils[key])
            self.store.save(new)
        self.compile_seconds += time.perf_counter() - t0

    def _by_ir(self, sig):
        """The stencil compiled from IR signature sig (in this process or, through the store, an
        earlier one), None if that IR cannot be a stencil, or _MISSING."""
        st = self.by_ir.get(sig, _MISSING)
        if st is _MISSING and self.store is not None:
            rec = self.store.get(_digest(sig))
            if rec is not None and rec[0] in "sn":
                st = self.by_ir[sig] = rec[1] if rec[0] == "s" else None
        return st


def _record(st):
    """The store record of a library value (Stencil, ESCALATE or None)."""
    return ("n",) if st is None else ("e",) if st is ESCALATE else ("s", st)


def _ir_signature(mt, name, mask):
    """What the machine code of mt's last function depends on: its IR with its name taken out,
    the IR of the module's helpers it calls (transitively), and its mask of named GPRs.  The
    rest of a stencil module is fixed text (hole and intrinsic declarations)."""
    parts = [mt.functions[-1].replace(name, "@"), str(mask)]
    todo, seen = _HELPER_REF.findall(parts[0]), set()
    while todo:
        h = todo.pop()
        if h not in seen and h in mt.helpers:
            seen.add(h)
            parts.append(mt.helpers[h])
            todo += _HELPER_REF.findall(mt.helpers[h])
    return ("ir", hashlib.blake2b("\0".join(parts).encode(), digest_size=16).hexdigest())


_HELPER_REF = re.compile(r"@(btvm_\w+)")


ESCALATE = object()     # this shape's semantics need a field it holds open: take the next level
_MISSING = object()


# ---- on disk ----------------------------------------------------------------------------
_HOLE_NAMES = sorted(_HOLES)
_HOLE_INDEX = {h: i for i, h in enumerate(_HOLE_NAMES)}
_REL = struct.Struct("<IBBBq")           # offset, size, pc-relative, hole, addend
_STENCIL_HEAD = struct.Struct("<BBIH")   # falls through, named-GPR mask, code bytes, relocations


def _stencil_at(data, pos):
    """The Stencil of the record whose fields start at data[pos]."""
    ft, phys, ncode, nrel = _STENCIL_HEAD.unpack_from(data, pos)
    pos += _STENCIL_HEAD.size
    code = data[pos:pos + ncode]
    pos += ncode
    rel = []
    for _ in range(nrel):
        off, size, pcrel, h, add = _REL.unpack_from(data, pos)
        pos += _REL.size
        rel.append((off, size, bool(pcrel), _HOLE_NAMES[h], add))
    st = Stencil.__new__(Stencil)
    st.code, st.relocs, st.falls_through, st.phys = code, rel, bool(ft), phys
    st._holes_used()
    return st
_MAGIC = b"BTVMSTL3"
MERGE_AT = 64
# New records are written SAVE_BATCH at a time, or all pending ones by the first save at least
# SAVE_SECONDS after the last write, and at exit and before a fork (bt.cache.save_all): a file per
# compile was ~1,000 small writes, ~1 s of a cold Linux boot.  A run killed by a signal btvm does
# not handle loses the pending ones (they are compiled again next time).
SAVE_BATCH = 256
SAVE_SECONDS = 2.0
_STORES = weakref.WeakSet()


_DIGESTS = {}


def _digest(key):
    d = _DIGESTS.get(key)
    if d is None:
        d = _DIGESTS[key] = hashlib.blake2b(repr(key).encode(), digest_size=16).digest()
    return d


class Store:
    """Stencils on disk: a folder per translator version of files written whole (temporary file
    + rename, so concurrent processes are safe), each a checksummed list of records; a file
    that is truncated or corrupt is ignored.  Small: a Linux boot's ~8,000 stencils are ~3 MB,
    the prebuilt library (bt.library) ~11,000 records.  A record becomes a Stencil when it is
    first asked for: building all of them cost every run that met one new block ~0.1 s."""

    def __init__(self, root, version):
        self.dir = root / diskcache.STENCIL_DIR / version[:24]
        # key digest -> ("s", Stencil) | ("e",): escalate | ("n",): none | ("l", data, start, end):
        # a stencil record not built yet (its bytes data[start:end], digest and kind included)
        self.records = None
        self.pending = {}           # records not written yet
        self.errors = 0             # files that could not be written
        self._saved_at = time.monotonic()
        _STORES.add(self)

    def load(self):
        if self.records is None:
            self.records = {}
            try:
                files = sorted(self.dir.glob("*.stl"))
            except OSError:
                files = []
            for p in files:
                try:
                    self._parse(p.read_bytes())
                    os.utime(p)         # the cache folder's LRU bound (DiskCache.evict) sees the use
                except (OSError, ValueError, struct.error, IndexError):
                    continue
            if len(files) >= MERGE_AT:
                self._write(self.records, files)
        return self.records

    def get(self, digest):
        """The record of a key digest, or None."""
        rec = self.load().get(digest)
        if rec is not None and rec[0] == "l":
            try:
                rec = self.records[digest] = ("s", _stencil_at(rec[1], rec[2] + 17))
            except (struct.error, IndexError):      # checksummed, so only another writer's bug
                del self.records[digest]
                return None
        return rec

    def _parse(self, data):
        """Index a file's records (the file whole, or none of it if it is corrupt)."""
        if data[:8] != _MAGIC or hashlib.sha256(data[40:]).digest() != data[8:40]:
            raise ValueError("corrupt stencil file")
        pos, recs = 40, {}
        while pos < len(data):
            start, dg, kind = pos, data[pos:pos + 16], data[pos + 16:pos + 17]
            pos += 17
            if kind == b"s":
                _, _, ncode, nrel = _STENCIL_HEAD.unpack_from(data, pos)
                pos += _STENCIL_HEAD.size + ncode + nrel * _REL.size
                if pos > len(data):
                    raise ValueError("corrupt stencil file")
                recs[dg] = ("l", data, start, pos)
            elif kind == b"e":
                recs[dg] = ("e",)
            elif kind == b"n":
                recs[dg] = ("n",)
            else:
                raise ValueError("corrupt stencil file")
        self.records.update(recs)

    def save(self, new):
        """Add the records of {digest: record}; they are written with the next batch."""
        self.load().update(new)
        self.pending.update(new)
        if len(self.pending) >= SAVE_BATCH or time.monotonic() - self._saved_at > SAVE_SECONDS:
            self.flush()

    def flush(self):
        """Write the pending records as one new file."""
        new, self.pending = self.pending, {}
        self._saved_at = time.monotonic()
        if new:
            self._write(new, ())

    def _write(self, recs, replaces):
        out = bytearray()
        for dg, rec in recs.items():
            if rec[0] == "l":
                out += rec[1][rec[2]:rec[3]]
                continue
            out += dg + rec[0].encode()
            if rec[0] == "s":
                st = rec[1]
                out += _STENCIL_HEAD.pack(st.falls_through, st.phys, len(st.code), len(st.relocs)) + st.code
                for off, size, pcrel, h, add in st.relocs:
                    out += _REL.pack(off, size, pcrel, _HOLE_INDEX[h], add)
        data = _MAGIC + hashlib.sha256(out).digest() + bytes(out)
        try:
            self.dir.mkdir(parents=True, exist_ok=True)
            tmp = self.dir / f".{os.getpid()}-{os.urandom(4).hex()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, self.dir / f"{os.urandom(8).hex()}.stl")
            for p in replaces:          # merged into the new file
                p.unlink(missing_ok=True)
        except OSError:
            self.errors += 1            # a read-only or full cache folder: compile again next time


def flush_stores():
    """Write every store's pending records (bt.cache.save_all calls it at exit and before a fork:
    the child would write them again)."""
    for store in list(_STORES):
        try:
            store.flush()
        except Exception:
            pass


# ---- ELF relocatable objects -------------------------------------------------------------
def parse_object(obj):
    """{function name: Stencil} from an x86-64 ELF relocatable object; a function that refers
    to anything but holes (a constant pool, a library call) gets None."""
    sh_off, = struct.unpack_from("<Q", obj, 0x28)
    sh_entsize, sh_num, sh_strndx = struct.unpack_from("<HHH", obj, 0x3A)
    secs = [struct.unpack_from("<IIQQQQIIQQ", obj, sh_off + i * sh_entsize) for i in range(sh_num)]

    def sec_bytes(s):
        return obj[s[4]:s[4] + s[5]]

    symtab = next(s for s in secs if s[1] == 2)          # SHT_SYMTAB
    strtab = sec_bytes(secs[symtab[6]])

    def cstr(tab, off):
        return tab[off:tab.index(b"\0", off)].decode()

    syms = []
    for i in range(symtab[5] // 24):
        st_name, st_info, _, st_shndx, st_value, st_size = struct.unpack_from("<IBBHQQ", obj, symtab[4] + i * 24)
        syms.append((cstr(strtab, st_name), st_info & 0xF, st_shndx, st_value, st_size))
    funcs = {}
    for name, typ, shndx, value, size in syms:
        if typ == 2 and shndx:                            # STT_FUNC, defined
            funcs.setdefault(shndx, []).append((value, size, name))
    out = {}
    for shndx, fs in funcs.items():
        text = sec_bytes(secs[shndx])
        rel = [s for s in secs if s[1] == 4 and s[7] == shndx]      # SHT_RELA for this section
        relocs = []
        for r in rel:
            for j in range(r[5] // 24):
                off, info, addend = struct.unpack_from("<QQq", obj, r[4] + j * 24)
                relocs.append((off, info & 0xFFFFFFFF, syms[info >> 32][0], addend))
        relocs.sort()
        for value, size, name in fs:
            mine, ok = [], True
            for off, typ, sym, addend in relocs:
                if value <= off < value + size:
                    if sym not in _HOLES or typ not in _RELOCS:
                        ok = False
                        break
                    n, pcrel = _RELOCS[typ]
                    mine.append((off - value, n, pcrel, sym, addend))
            out[name] = Stencil(text[value:value + size], mine) if ok else None
    return out


# ---- instantiation -----------------------------------------------------------------------
_PACK = {1: "<B", 2: "<H", 4: "<I", 8: "<Q"}
_MASK = {n: (1 << (8 * n)) - 1 for n in _PACK}


class Builder:
    """Instantiates blocks from a Library into executable memory."""

    def __init__(self, library):
        self.lib = library
        self.code = Arena(exec_=True)
        self.cells = Arena()
        self.blocks = 0
        self.seconds = 0.0
        self._assembler = None
        self._installer = None

    def assemble(self, blobs, vals):
        """bt.assemble's recipe of the Pieces at blobs (their addresses) with vars vals (flat)."""
        if self._assembler is None:         # compiled (or loaded) once, when a block is first built
            self._assembler = assemble.Assembler()
        return self._assembler(blobs, vals)

    def build(self, block, hot=0):
        """Instantiate block: (code address, [slot cell addresses], hot cell, counter cell,
        recipe), or None when one of its instructions has no stencil (the caller translates
        it with LLVM).  The recipe (bytes) rebuilds the same code with rebuild(), without
        decoding: the disk cache stores it."""
        t0 = time.perf_counter()
        key, insns, lib = block.key, block.insns, self.lib
        n, eip = len(insns), block.eip
        pieces = lib.pieces
        # Most instructions were met before, in this mode (push ebp, mov eax, [ebp+8]...): their
        # piece is looked up by their bytes.  Relative branches hold their absolute target.
        parts = [None] * (n + 1)
        todo = []           # (index, piece key) of the instructions without one
        last = n - 1
        for j, insn in enumerate(insns):
            at = _piece_key(insn, key, eip, j == last)
            piece = pieces.get(at)
            if piece is None:
                todo.append((j, at))
            else:
                parts[j + 1] = piece
        head_at = ("h", key, bool(hot), emit.COUNT_EXECS)
        parts[0] = pieces.get(head_at)
        if todo or parts[0] is None:
            # Bytes met for the first time are mostly a form met before with other immediates
            # and displacements (a Linux boot: 62,000 distinct instructions, 5,800 forms).
            forms = lib.forms
            need = []           # (index, piece key) of the instructions that need a shape
            for j, at in todo:
                insn = insns[j]
                form = None
                if at is not None:
                    form = _form_key(insn, lib.level_of(insn, key), at)
                piece = forms.get(form) if form is not None else None
                if piece is None:
                    need.append((j, at))
                else:
                    parts[j + 1] = pieces[at] = piece
            shapes = [lib.shape(insns[j], key, eip) for j, _ in need]
            head = [HeadShape(key, hot, emit.COUNT_EXECS)] if parts[0] is None else []
            sts = lib.get(head + shapes)
            if any(st is None for st in sts):
                return None
            if head:
                parts[0] = pieces[head_at] = Piece(sts[0], {"h_key": key}, _HEAD_VARS, _HEAD_MOVES)
                sts = sts[1:]
            if len(pieces) >= _SHAPES_MAX:
                pieces.clear()
            if len(forms) >= _SHAPES_MAX:
                forms.clear()
            for (j, at), sh, st in zip(need, shapes, sts):
                insn = insns[j]
                fixed = {h: v for h, v in sh.values.items() if h not in _INSN_VARS}
                fixed["h_key"] = key    # shape keys leave KEY_STEP out (the jump-cache probe has it)
                parts[j + 1] = piece = Piece(st, fixed, _INSN_VARS, sh.eip_holes())
                if at is None or insn.relative and "h_imm0" not in sh.values:
                    continue            # its target is part of the stencil: the piece is its own
                pieces[at] = piece
                form = _form_key(insn, sh.level, at)        # the level it was made at
                if form is not None:
                    forms[form] = piece
        # The parts' vars, flat (_INSN_VARS).
        vals = [eip, n, *_NO_VARS[1:]]
        for j, i in enumerate(insns):
            vals += (i.addr, (i.addr + i.size) & 0xFFFFFFFF, n - j, n - j - 1, *i.values)
        # Stop after the first stencil that never falls through (the rest cannot run).
        for j, piece in enumerate(parts):
            if not piece.falls_through:
                del parts[j + 1:]
                break
        else:
            cross = (block.end ^ eip) & ~0xFFF
            tail_at = ("t", key, bool(cross))
            piece = pieces.get(tail_at)
            if piece is None:
                st = lib.get([TailShape(key, cross)])[0]
                if st is None:
                    return None
                piece = pieces[tail_at] = Piece(st, {"h_key": key}, _TAIL_VARS, _TAIL_MOVES)
            parts.append(piece)
            vals += (block.end & 0xFFFFFFFF, *_NO_VARS)
        recipe = self.assemble([p.addr for p in parts], vals)
        out = self._install(recipe, hot)
        self.seconds += time.perf_counter() - t0
        return out + (recipe,)

    def rebuild(self, recipe, hot=0, delta=0):
        """Like build() from a recipe (no stencil library needed), for the same guest bytes
        delta bytes further on (a multiple of the page size; see movable()); None if it is
        malformed or cannot move."""
        t0 = time.perf_counter()
        try:
            out = self._install(recipe, hot, delta)
        except (struct.error, ValueError, IndexError, KeyError):
            return None
        self.seconds += time.perf_counter() - t0
        return out

    def _install(self, recipe, hot, delta=0):
        """Copy a recipe's code into code memory with new cells for its chain slots and counters,
        and patch the references to them: (code address, [slot cells], hot cell, counter cell)."""
        if type(recipe) is not bytes:
            recipe = bytes(recipe)          # btvm_install reads it in place
        ncode, nrel, nslots, nmove = _RECIPE_HEAD.unpack_from(recipe)
        moves_at = _RECIPE_HEAD.size + nrel * _CELL_REL.size
        code_at = moves_at + (0 if nmove == _FIXED else nmove * _MOVE_REL.size)
        if len(recipe) != code_at + ncode or delta & 0xFFF or delta and nmove == _FIXED:
            raise ValueError("malformed recipe")
        addr = self.code.alloc(ncode)
        count = emit.COUNT_EXECS
        hot_cell = self.cells.alloc(4, 4) if hot else 0
        cnt_cell = self.cells.alloc(8, 8) if count else 0
        if hot:
            ctypes.c_int32.from_address(hot_cell).value = hot
        first = self.cells.alloc(8 * nslots, 8) if nslots else 0
        slots = range(first, first + 8 * nslots, 8)     # not a list of ints: kept by the TB
        inst = self._installer
        if inst is None:
            inst = self._installer = assemble.Installer()
        bases = inst.bases
        bases[:nslots] = slots
        bases[_HOT], bases[_CNT], bases[_CODE] = hot_cell, cnt_cell, addr
        if inst(recipe, code_at, ncode, addr, nslots, nrel, _RECIPE_HEAD.size, nmove if delta else 0, moves_at,
                delta):
            raise ValueError("malformed recipe")
        self.blocks += 1
        return addr, slots, hot_cell, cnt_cell


# A recipe: a block's code with every value hole patched (it does not depend on where the code
# goes: the only pc-relative references between its own stencils are the continuations), and the
# references to its cells, which a run allocates anew.  Rebuilding one is a copy and a few patches.
#
# A recipe can also move: its guest addresses relative to the block (the instructions' own, the
# next ones', relative branch targets) are listed, so the same guest bytes at another address
# -- a library or vDSO that ASLR placed elsewhere this time -- get the same code with those
# values moved; every other value comes from the instruction bytes, which are the same.
_RECIPE_HEAD = struct.Struct("<IHBH")           # code bytes, references, chain slots, moving values
_CELL_REL = struct.Struct("<IBBBq")             # offset, size, pc-relative, base, addend
_MOVE_REL = struct.Struct("<IBq")               # offset, size, addend of a guest-address value
_FIXED = 0xFFFF                                 # moving values: cannot move
_INSN_MOVES = frozenset(("h_eip", "h_next"))
_HEAD_MOVES = frozenset(("h_beip",))
_TAIL_MOVES = frozenset(("h_target",))
# Bases of a reference besides chain slot i (i itself): the hot and counter cells, the block's
# own code, and nothing (a constant that a pc-relative reference turns position-dependent).
_HOT, _CNT, _CODE, _ZERO = 252, 253, 254, 255
# Kinds of a stencil's relocations (Stencil.plan).
_R_VALUE, _R_VALUE_PC, _R_SLOT, _R_CELL, _R_CONT, _R_CONT_PC = range(6)


def movable(recipe):
    """Whether a recipe can be rebuilt at another address (Builder.rebuild's delta)."""
    return _RECIPE_HEAD.unpack_from(recipe)[3] != _FIXED


class Piece:
    """A stencil as one kind of instruction (or block head or tail) uses it: the values that are
    the same wherever it is (registers, displacements, immediates, the mode key) patched in and
    the continuation jumps resolved; what is left is the values that depend on where it is (its
    vars, e.g. its address), the references to cells and to the block's own code, and which
    values are guest addresses relative to the block (moves; None: it cannot move).  Held as a
    bt.assemble blob, which btvm_assemble places."""
    __slots__ = ("blob", "addr", "falls_through")

    def __init__(self, st, fixed, var, eip_holes):
        code = bytearray(st.code)
        end = len(code)
        patches, refs = [], []
        moves = [] if eip_holes is not None else None
        for kind, off, size, pcrel, sym, addend, fmt, mask in st.plan:
            if kind == _R_VALUE:
                if moves is not None and sym in eip_holes:
                    if size < 4:
                        moves = None        # not a plain 32/64-bit value: the recipe stays put
                    else:
                        moves.append((off, size, addend))
                if sym in fixed:
                    struct.pack_into(fmt, code, off, (fixed[sym] + addend) & mask)
                else:
                    patches.append((off, size, var[sym], addend))
            elif kind == _R_SLOT:
                refs.append((off, size, pcrel, sym, _BY_SLOT, addend))
            elif kind == _R_CELL:
                refs.append((off, size, pcrel, sym, _AS_IS, addend))
            elif kind == _R_CONT_PC:
                struct.pack_into(fmt, code, off, (end + addend - off) & mask)
            elif kind == _R_CONT:
                refs.append((off, size, False, _CODE, _BY_POS, end + addend))
            else:                           # a value a pc-relative reference turns position-dependent
                if moves is not None and sym in eip_holes:
                    moves = None
                if sym in fixed:
                    refs.append((off, size, True, _ZERO, _AS_IS, fixed[sym] + addend))
                else:
                    refs.append((off, size, True, _ZERO, _BY_VAR + var[sym], addend))
        self.blob = assemble.blob(bytes(code), patches, refs, moves, len(st.slots))
        self.addr = assemble.address(self.blob)
        self.falls_through = st.falls_through


# How a Piece's reference becomes the recipe's: as it is, by the chain slots before it, by its
# position in the block, or by one of its vars (_BY_VAR + the var's index).
_AS_IS, _BY_SLOT, _BY_POS, _BY_VAR = range(4)
# A part's vars (bt.assemble.NVARS of them) by hole: an instruction's (operand i's immediate or
# displacement is var 4 + i: Insn.values), a block head's, a tail's.
_INSN_VARS = {"h_eip": 0, "h_next": 1, "h_left": 2, "h_left1": 3,
              **{f"h_{f}{i}": 4 + i for i in range(MAX_OPS) for f in ("imm", "disp")}}
_HEAD_VARS = {"h_beip": 0, "h_n": 1}
_TAIL_VARS = {"h_target": 0}
_NO_VARS = (0,) * (assemble.NVARS - 1)


def _form_key(insn, level, at):
    """What an instruction's Piece depends on besides its vars, without its bytes: the
    instruction with its immediates and displacements left out where the shape's level keeps
    them holes (vars), and at's mode key and page decisions; None at level 2 (the bytes are
    part of the shape)."""
    if level >= 2:
        return None
    ops = []
    for o in insn.ops:
        kind = o.kind
        if kind == "imm":
            ops.append((kind, o.size, o.imm if level else None))
        elif kind == "mem":
            m = o.mem
            ops.append((kind, o.size, m.seg, m.base, m.index, m.scale, m.addr16))
        else:
            ops.append((kind, o.size, o.reg))
    return (insn.id, insn.mnemonic, insn.opsize, insn.addrsize, insn.rep, insn.lock, insn.seg_override,
            insn.groups, level, tuple(ops)) + at[1:]


def _piece_key(insn, key, block_eip, last):
    """What an instruction's Piece depends on besides its vars: its bytes, the mode key and,
    for the exits of a block's last instruction under paging, whether they leave its page (see
    InsnShape); None for a relative branch whose target is not operand 0."""
    if insn.relative:
        ops = insn.ops
        if len(ops) != 1 or ops[0].kind != "imm":
            return None
        if key & S.KEY_PG:      # a relative branch always ends its block
            return (insn.raw, key, bool((insn.next ^ block_eip) & ~0xFFF),
                    bool(((ops[0].imm & 0xFFFFFFFF) ^ block_eip) & ~0xFFF))
        return (insn.raw, key, None, None)
    if last and key & S.KEY_PG and ends_block(insn):
        return (insn.raw, key, bool((insn.next ^ block_eip) & ~0xFFF))
    return (insn.raw, key, None)


_shared = None


def version():
    """What stencils' machine code depends on: the translator's sources, LLVM, the host CPU."""
    import llvmlite
    from .diskcache import source_hash
    _init()
    return hashlib.sha256("|".join([source_hash(), llvmlite.__version__, llvm.get_host_cpu_name(),
                                    llvm.get_host_cpu_features().flatten(), str(CODEGEN_OPT)]).encode()).hexdigest()


def shared_builder():
    """The process's stencil library (stored under bt.diskcache's folder unless disabled), or
    None where executable memory below 2 GiB cannot be had (the LLVM tier 1 then does it all)."""
    global _shared, ENABLED
    if _shared is None:
        from .diskcache import default_dir
        root = default_dir()
        b = Builder(Library(Store(root, version()) if root is not None else None))
        try:
            b.code.alloc(16)
            b.cells.alloc(16)
        except (OSError, MemoryError, ValueError):
            ENABLED = False
            return None
        _shared = b
    return _shared


ENABLED = os.environ.get("BTVM_TIER1", "stencil") == "stencil"

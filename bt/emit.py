"""Block emitter: LLVM IR text for one translated basic block.

Guest registers and status flags live in SSA values while a block runs and
are written back to the CPU state only at exits (and around the few
instructions that loop in memory, e.g. REP string ops).  Every instruction
fetches its operands, computes, then commits, so a fault anywhere inside an
instruction can leave the state exactly as at that instruction's start: the
fault exit stores the snapshot taken when the instruction began.

IR is built as text (llvmlite's IR objects cost more and their opaque-pointer
support is incomplete); values are small `V` objects carrying their type.
"""
from . import lazyflags, state as S
from .state import offset

PTR = "ptr"
# Set (before any translation) by `btvm profile`: every block counts its executions in a
# global `@<name>_n` (part of the disk cache's version, see bt.cache.shared_disk).
COUNT_EXECS = False
ITY = {1: "i8", 2: "i16", 4: "i32", 8: "i64"}


class V:
    """An IR value: its text (register name or constant) and its type."""
    __slots__ = ("s", "t")

    def __init__(self, s, t):
        self.s, self.t = s, t

    def __repr__(self):
        return f"{self.t} {self.s}"


class Lin(V):
    """A linear address that remembers its segment and offset (an i32 V or Lazy), so that the
    access made through it can be checked against the segment (Emitter.seg_check)."""
    __slots__ = ("seg", "off", "window")

    def __init__(self, v, seg, off):
        super().__init__(v.s, v.t)
        self.seg, self.off = seg, off
        self.window = None          # (register, disp): [entry value + disp] (Emitter._base_windows)


class Lazy:
    """A value computed only when first read (a thunk): `fn()` emits its IR at the point of use.

    The result is cached with the scope it was forced in: a value forced on the
    main line dominates everything after it and is reused; one forced on a side
    path (an exit arm, a fault exit) is valid only on that path."""
    __slots__ = ("fn", "t", "v", "scope")

    def __init__(self, fn, t):
        self.fn, self.t, self.v, self.scope = fn, t, None, None

    def __repr__(self):
        return f"<lazy {self.t}>"


def bits_of(t):
    return int(t[1:])


def cval(v):
    """The integer value of a constant V (as emitted by const), else None."""
    s = v.s
    c = s[0]
    if c == "%":
        return None
    if c == "t" and s == "true":
        return 1
    if c == "f" and s == "false":
        return 0
    if c == "-" or c.isdigit():
        return int(s)
    return None


def _unsigned(x, t):
    return x & ((1 << bits_of(t)) - 1)


def _signed(x, t):
    n = bits_of(t)
    x &= (1 << n) - 1
    return x - (1 << n) if x >> (n - 1) else x


_FOLD = {
    "add": lambda a, b, t: a + b, "sub": lambda a, b, t: a - b, "mul": lambda a, b, t: a * b,
    "and": lambda a, b, t: a & b, "or": lambda a, b, t: a | b, "xor": lambda a, b, t: a ^ b,
    "shl": lambda a, b, t: _unsigned(a, t) << b if 0 <= b < bits_of(t) else None,
    "lshr": lambda a, b, t: _unsigned(a, t) >> b if 0 <= b < bits_of(t) else None,
    "ashr": lambda a, b, t: _signed(a, t) >> b if 0 <= b < bits_of(t) else None,
}
# x OP identity == x
_RIGHT_IDENTITY = {"add": 0, "sub": 0, "or": 0, "xor": 0, "shl": 0, "lshr": 0, "ashr": 0, "mul": 1}
_ICMP = {
    "eq": lambda a, b, t: a == b, "ne": lambda a, b, t: a != b,
    "ult": lambda a, b, t: _unsigned(a, t) < _unsigned(b, t), "ule": lambda a, b, t: _unsigned(a, t) <= _unsigned(b, t),
    "ugt": lambda a, b, t: _unsigned(a, t) > _unsigned(b, t), "uge": lambda a, b, t: _unsigned(a, t) >= _unsigned(b, t),
    "slt": lambda a, b, t: _signed(a, t) < _signed(b, t), "sle": lambda a, b, t: _signed(a, t) <= _signed(b, t),
    "sgt": lambda a, b, t: _signed(a, t) > _signed(b, t), "sge": lambda a, b, t: _signed(a, t) >= _signed(b, t),
}


# The calling convention of every translated block (LLVM tier 1, stencils, tier 2) and of the
# native entry's call into them: blocks only ever tail-call each other, so no register is worth
# preserving across them (preserve_none: no callee-saved registers to push and pop at each block
# transition; the C entry, btvm_enter, saves them once).
CC = "preserve_nonecc"


class Hole:
    """A numeric field of a guest instruction left open in a stencil (bt.stencil): the IR refers
    to the address of the external symbol @name, which is patched with the field's value when
    the stencil is copied into a block.  Any use of a hole as a Python number raises HoleUse, so
    a semantic that needs the concrete value makes bt.stencil fix the field instead."""
    __slots__ = ("name",)

    def __init__(self, name):
        self.name = name

    def _used(self, *_):
        raise HoleUse(self.name)

    __eq__ = __ne__ = __lt__ = __le__ = __gt__ = __ge__ = __bool__ = __index__ = __int__ = _used
    __and__ = __or__ = __xor__ = __add__ = __sub__ = __radd__ = __rsub__ = __format__ = __str__ = _used
    __hash__ = object.__hash__

    def __repr__(self):
        return f"<hole {self.name}>"


class HoleUse(TypeError):
    """A semantic used a stencil hole as a concrete number."""


class _StencilRegs(list):
    """A stencil's register file: GPRs 0-7 by their own index, then the register holes
    (bt.stencil: a register operand whose index is patched in).  Records which of 0-7 the
    semantics touch by name: a hole that names one of those at run time would alias it."""
    __slots__ = ("touched",)

    def __getitem__(self, i):
        if i < 8:
            self.touched.add(i)
        return list.__getitem__(self, i)

    def __setitem__(self, i, v):
        if i < 8:
            self.touched.add(i)
        list.__setitem__(self, i, v)


def reg_offset(i):
    """State offset of register i: 0-7 the GPRs, 8 and up the register holes of a stencil."""
    return offset("regs") + 4 * i if i < 8 else Hole(f"h_reg{i - 8}")


def const(value, t):
    if type(value) is Hole:
        return V(f"ptrtoint (ptr @{value.name} to {t})", t)
    if t == "i1":
        return V("true" if value & 1 else "false", "i1")
    n = bits_of(t)
    value &= (1 << n) - 1
    if value >> (n - 1):
        value -= 1 << n
    return V(str(value), t)


_SS, _GP, _AC = 12, 13, 17
# Branch weights of a soft-MMU hit (the TLB probe, a base-register window): the register allocator
# then keeps its spills and the slow path's call off the fast path.
_LIKELY = '!90 = !{!"branch_weights", i32 2000, i32 1}'
_LIKELY_PROF = ", !prof !90"
_FLAG_ORDER = tuple(S.FLAG_BIT.items())
_ALL_FLAGS_MASK = S.STATUS_MASK | (1 << S.DF)


class Emitter:
    """Builds one block function `i32 @name(ptr %st)` following the exit contract in bt.state."""

    def __init__(self, name, block, key, module, stencil=None):
        """stencil: a bt.stencil.Shape when emitting one instruction as a stencil (holes for
        its addresses and operands; no block prologue); None for a whole block."""
        self.name = name
        self.stencil = stencil
        self.block = block
        self.key = key
        self.module = module          # bt.jit.ModuleText: declarations, slot globals
        self.priv = 1 if S.key_cpl(key) == 3 else 0
        self.lines = []
        self.entry_lines = []         # hoisted state-field pointers (the entry block dominates all)
        self.fields = {}
        self.n = 0
        self.label = "entry"
        self.ninsns = len(block.insns)
        self.k = 0                    # index of the instruction being translated
        self.insn = None
        self.slots = []               # names of chain-slot globals of this block's direct exits
        self.terminated = False
        self.deferred = []            # out-of-line code (fault exits) appended after the body
        self.main_scope = self.scope = object()
        self.packs = {}
        self.touched_regs = set()     # stencil mode: GPRs the semantics named (see _StencilRegs)
        self.cc_ops = []              # flag-setting operations that can leave the flags lazy (note_cc)
        self.exit_targets = None      # guest addresses the exit being flushed jumps to directly
        self.windows = {}             # GPR index -> its window (see _base_windows)
        if stencil is None:
            self._emit_prologue(block.eip, self.ninsns)
            self._base_windows()
        else:
            stencil.prologue(self)

    # ---- lazy values ------------------------------------------------------------
    def lazy(self, fn, t="i1"):
        """A value of type t whose IR `fn()` emits only if (and where) it is first read."""
        return Lazy(fn, t)

    def force(self, x):
        if type(x) is not Lazy:
            return x
        if x.v is not None and (x.scope is self.main_scope or x.scope is self.scope):
            return x.v
        v = x.fn()
        if type(v) is Lazy:
            v = self.force(v)
        x.v, x.scope = v, self.scope
        return v

    f = force

    def _enter_side(self):
        """Start a side path (code that does not dominate what follows on the main line)."""
        saved = self.scope
        self.scope = object()
        return saved

    # ---- low-level IR text -------------------------------------------------
    def tmp(self):
        self.n += 1
        return f"%v{self.n}"

    def new_label(self, hint="l"):
        self.n += 1
        return f"{hint}{self.n}"

    def emit(self, line):
        self.lines.append("  " + line)

    def op(self, text, t):
        self.n += 1
        r = f"%v{self.n}"
        self.lines.append(f"  {r} = {text}")
        return V(r, t)

    def set_label(self, label):
        self.lines.append(f"{label}:")
        self.label = label
        self.terminated = False

    def br(self, label):
        self.emit(f"br label %{label}")
        self.terminated = True

    def cbr(self, cond, l_true, l_false, likely=False):
        """Branch on cond; likely: weight the true arm (a soft-MMU hit), so that LLVM keeps the
        other arm's calls and spills off it."""
        cond = self.f(cond)
        prof = ""
        if likely:
            self.module.declare(_LIKELY)
            prof = _LIKELY_PROF
        self.emit(f"br i1 {cond.s}, label %{l_true}, label %{l_false}{prof}")
        self.terminated = True

    def exit_if(self, cond, leave):
        """Leave the block through leave() (an exit, on a side path) when cond (i1) holds; else go
        on.  The exit's state is computed on the main line first, so code after reuses it."""
        self._exit_stores(*self._state())
        out, cont = self.new_label("out"), self.new_label("c")
        self.cbr(cond, out, cont)
        self.set_label(out)
        leave()
        self.set_label(cont)

    def phi(self, t, incoming):
        arms = ", ".join(f"[ {self.f(v).s}, %{lab} ]" for v, lab in incoming)
        return self.op(f"phi {t} {arms}", t)

    # ---- arithmetic helpers ------------------------------------------------
    def c(self, value, t="i32"):
        return const(value, t)

    def bin(self, opname, a, b):
        f = self.f
        a, b = f(a), f(b)
        assert a.t == b.t, (opname, a, b)
        cb = cval(b)
        if cb is not None:
            ca = cval(a)
            if ca is not None:
                fold = _FOLD.get(opname)
                if fold is not None:
                    r = fold(ca, cb, a.t)
                    if r is not None:
                        return const(r, a.t)
            elif _RIGHT_IDENTITY.get(opname) == cb or (opname == "and" and cb == -1):
                return a
        return self.op(f"{opname} {a.t} {a.s}, {b.s}", a.t)

    def add(self, a, b): return self.bin("add", a, b)
    def sub(self, a, b): return self.bin("sub", a, b)
    def and_(self, a, b): return self.bin("and", a, b)
    def or_(self, a, b): return self.bin("or", a, b)
    def xor(self, a, b): return self.bin("xor", a, b)
    def shl(self, a, b): return self.bin("shl", a, b)
    def lshr(self, a, b): return self.bin("lshr", a, b)
    def ashr(self, a, b): return self.bin("ashr", a, b)
    def mul(self, a, b): return self.bin("mul", a, b)

    def not_(self, a):
        a = self.f(a)
        return self.xor(a, const(-1, a.t))

    def icmp(self, pred, a, b):
        a, b = self.f(a), self.f(b)
        assert a.t == b.t, (pred, a, b)
        ca, cb = cval(a), cval(b)
        if ca is not None and cb is not None:
            return const(1 if _ICMP[pred](ca, cb, a.t) else 0, "i1")
        return self.op(f"icmp {pred} {a.t} {a.s}, {b.s}", "i1")

    def select(self, cond, a, b):
        cond = self.f(cond)
        cc = cval(cond)
        if cc is not None:
            r = self.f(a if cc else b)
            assert r.t == (b if cc else a).t
            return r
        a, b = self.f(a), self.f(b)
        assert a.t == b.t and cond.t == "i1"
        return self.op(f"select i1 {cond.s}, {a.t} {a.s}, {b.t} {b.s}", a.t)

    def cast(self, kind, v, t):
        v = self.f(v)
        if v.t == t:
            return v
        cv = cval(v)
        if cv is not None:
            if kind == "zext":
                return const(_unsigned(cv, v.t), t)
            if kind == "sext":
                return const(_signed(cv, v.t), t)
            if kind == "trunc":
                return const(cv, t)
        return self.op(f"{kind} {v.t} {v.s} to {t}", t)

    def zext(self, v, t): return self.cast("zext", v, t)
    def sext(self, v, t): return self.cast("sext", v, t)
    def trunc(self, v, t): return self.cast("trunc", v, t)

    def resize(self, v, t, signed=False):
        """Zero/sign-extend or truncate v to type t."""
        v = self.f(v)
        if bits_of(v.t) < bits_of(t):
            return self.sext(v, t) if signed else self.zext(v, t)
        return self.trunc(v, t)

    def bit(self, v, n):
        """Bit n of v as i1."""
        return self.trunc(self.lshr(v, const(n, v.t)), "i1") if n else self.trunc(v, "i1")

    def msb(self, v):
        return self.bit(v, bits_of(v.t) - 1)

    def intrinsic(self, name, ret, args):
        args = [self.f(a) for a in args]
        self.module.declare(f"declare {ret} @{name}({', '.join(a.t for a in args)})")
        return self.op(f"call {ret} @{name}({', '.join(repr(a) for a in args)})", ret)

    # ---- CPU state access ---------------------------------------------------
    def field(self, off):
        """Pointer to the state field at byte offset off, an int or a register Hole (computed
        once, in the entry block)."""
        name = off.name if type(off) is Hole else off
        p = self.fields.get(name)
        if p is None:
            p = self.fields[name] = V(f"%f{name}", PTR)
            self.entry_lines.append(f"  %f{name} = getelementptr i8, ptr %st, i64 {const(off, 'i64').s}")
        return p

    def load_field(self, off, t):
        p = self.field(off)
        return self.op(f"load {t}, ptr {p.s}", t)

    def store_field(self, off, v):
        v = self.f(v)
        p = self.field(off)
        self.emit(f"store {v.t} {v.s}, ptr {p.s}")

    def _emit_prologue(self, eip, ninsns, hot=None, counter=None):
        """Block entry: the tier-2 countdown, the execution counter, the instruction budget.
        eip, ninsns: ints, or holes in the block-head stencil, whose hot/counter name the
        external symbols of its counter cells."""
        self.lines.append("entry:")
        if self.module.hot or hot:
            # Count down to tier 2 (bt.tier2): at zero, leave before doing anything.
            g = hot or self.module.new_hot(self.name)
            n = self.sub(self.op(f"load i32, ptr @{g}", "i32"), self.c(1))
            self.emit(f"store i32 {n.s}, ptr @{g}")
            hot, cold = self.new_label("hot"), self.new_label("warm")
            self.cbr(self.icmp("eq", n, self.c(0)), hot, cold)
            self.set_label(hot)
            self._store_eip(self.c(eip))
            self.emit(f"ret i32 {S.EXIT_HOT}")
            self.set_label(cold)
        if COUNT_EXECS:
            g = counter or self.module.new_counter(self.name)
            n = self.op(f"load i64, ptr @{g}", "i64")
            self.emit(f"store i64 {self.add(n, const(1, 'i64')).s}, ptr @{g}")
        budget = self.load_field(offset("budget"), "i64")
        ok = self.icmp("sge", budget, const(ninsns, "i64"))
        go, out = self.new_label("go"), self.new_label("nobudget")
        self.cbr(ok, go, out)
        self.set_label(out)
        self.emit(f"ret i32 {S.EXIT_BUDGET}")
        self.set_label(go)
        self.store_field(offset("budget"), self.sub(budget, const(ninsns, "i64")))
        self.reload()

    def _lazy_load(self, off, t):
        return Lazy(lambda: self.load_field(off, t), t)

    def reload(self):
        """(Re)load every register and flag from the state: lazily, each at its first read."""
        self.main_scope = self.scope = object()     # values cached before do not dominate what follows
        regs = [self._lazy_load(reg_offset(i), "i32") for i in range(8 + getattr(self.stencil, "vregs", 0))]
        if self.stencil is not None:
            regs = _StencilRegs(regs)
            regs.touched = self.touched_regs
        self.regs = regs
        # ef: EFLAGS with the lazy status flags folded in (bt.lazyflags), for reading flags;
        # ef_raw: the stored word as is, whose bits other than the status flags are always current.
        ef = self.ef = Lazy(self._materialized_eflags, "i32")
        ef_raw = self.ef_raw = self._lazy_load(offset("eflags"), "i32")
        self.flags = {f: Lazy(lambda b=b: self.bit(ef, b), "i1") for f, b in _FLAG_ORDER}
        self.eflags_other = Lazy(lambda: self.and_(ef_raw, const(~_ALL_FLAGS_MASK, "i32")), "i32")
        self.dirty_regs = set()
        self.dirty_flags = set()
        self.dirty_other = False

    def _materialized_eflags(self):
        """EFLAGS with pending lazy status flags folded in first (by the runtime's native
        materializer, bt.lazyflags; only when a tier-2 region left them lazy)."""
        cc = self.load_field(offset("cc_op"), "i32")
        lazy, ok = self.new_label("cclazy"), self.new_label("ccok")
        self.cbr(self.icmp("ne", cc, self.c(0)), lazy, ok)
        self.set_label(lazy)
        fp = self.load_field(offset("materialize"), PTR)
        self.emit(f"call void {fp.s}(ptr %st)")
        self.br(ok)
        self.set_label(ok)
        return self.load_field(offset("eflags"), "i32")

    def note_cc(self, kind, a, b, res):
        """The six status flags were just set by operation `kind` (bt.lazyflags.KINDS) on a, b
        giving res: an exit that still has them all may store the operation instead."""
        code = lazyflags.code(kind, res.t)
        if code is not None:
            self.cc_ops.append((code, a, b, res, tuple(self.flags[f] for f in lazyflags.STATUS)))

    def _lazy_cc(self, flags, dirty_flags, dirty_other):
        """(code, a, b, res) if this exit may leave the status flags lazy: a tier-2 region's,
        with all six from one noted operation and no other flag changed; else None."""
        if not self.module.region or self.stencil is not None or dirty_other or "DF" in dirty_flags:
            return None
        if self.exit_targets and any(self.module.flags_live.get(t, True) for t in self.exit_targets):
            return None         # a successor would fold them in at once: pack them here
        now = tuple(flags[f] for f in lazyflags.STATUS)
        for code, a, b, res, lazies in reversed(self.cc_ops[-4:]):
            if all(x is y for x, y in zip(now, lazies)):
                return code, a, b, res
        return None

    def _packed_eflags(self, flags, other, dirty_flags, dirty_other, ef, ef_raw):
        """The EFLAGS image to store: the entry value with the modified flags replaced.
        Memoized: exits that see the same flag values share one (main-line) computation."""
        if dirty_other:
            base, packed = other, _FLAG_ORDER
        else:
            # When every status flag is replaced, the stored word's other bits suffice: pending
            # lazy flags need not be folded in first.
            whole = all(f in dirty_flags for f in lazyflags.STATUS)
            base, packed = ef_raw if whole else ef, [(f, b) for f, b in _FLAG_ORDER if f in dirty_flags]
        key = (base,) + tuple(flags[f] for f, _ in packed)
        hit = self.packs.get(key)
        if hit is not None and (hit[1] is self.main_scope or hit[1] is self.scope):
            return hit[0]
        if dirty_other:
            v = other
        else:
            mask = 0
            for f, b in packed:
                mask |= 1 << b
            v = self.and_(base, const(~mask, "i32"))
        for f, bitpos in packed:
            v = self.or_(v, self.shl(self.zext(flags[f], "i32"), const(bitpos, "i32")))
        self.packs[key] = (v, self.scope)
        return v

    def _exit_stores(self, regs, flags, other, dirty_regs, dirty_flags, dirty_other, ef, ef_raw):
        """[(state offset, value)] an exit with this state writes back (computed where called)."""
        out = [(reg_offset(i), self.f(regs[i])) for i in sorted(dirty_regs)]
        if dirty_flags or dirty_other:
            cc = self._lazy_cc(flags, dirty_flags, dirty_other)
            if cc is not None:
                code, a, b, res = cc
                out += [(offset("cc_op"), const(code, "i32")), (offset("cc_a"), self.resize(a, "i32")),
                        (offset("cc_b"), self.resize(b, "i32")), (offset("cc_res"), self.resize(res, "i32"))]
            else:
                out.append((offset("eflags"), self._packed_eflags(flags, other, dirty_flags, dirty_other,
                                                                  ef, ef_raw)))
                # Once EFLAGS was folded in on this path (ef forced), cc_op is 0 already.
                if not (type(ef) is Lazy and ef.v is not None and ef.scope in (self.main_scope, self.scope)):
                    out.append((offset("cc_op"), const(0, "i32")))
        return out

    def _store_values(self, *state):
        for off, v in self._exit_stores(*state):
            self.store_field(off, v)

    def _state(self):
        return (self.regs, self.flags, self.eflags_other,
                self.dirty_regs, self.dirty_flags, self.dirty_other, self.ef, self.ef_raw)

    def flush(self):
        """Write every modified register and flag back to the state.

        Exits on side paths flush too, so the dirty sets are kept: code after
        a side exit still owes the same stores.  Only reload() resets them."""
        self._store_values(*self._state())

    # ---- instruction bracketing -------------------------------------------
    def begin_insn(self, k, insn):
        self.k, self.insn = k, insn
        self.smc = None
        self.take_snapshot()

    def take_snapshot(self):
        """Record the values a fault exit restores (the current instruction's start)."""
        self.snapshot = (list(self.regs), dict(self.flags), self.eflags_other,
                         set(self.dirty_regs), set(self.dirty_flags), self.dirty_other, self.ef, self.ef_raw)
        self.fault_label = None
        self.fault_ready = False

    def _prepare_fault_exit(self):
        """Compute the fault exit's values on the main line (before the first branch to it), so
        the out-of-line exit only stores them and later code can reuse them."""
        if not self.fault_ready:
            self._exit_stores(*self.snapshot)
            self.fault_ready = True

    def end_insn(self):
        hit = self.stores_hit_code()
        if cval(hit) != 0 and not self.terminated:
            self.exit_if(hit, lambda: self.exit_code(S.EXIT_SMC, self.c(self.insn.next),
                                                     refund=self.left(after=True)))

    def stores_hit_code(self):
        """An i1: whether a store of this instruction so far invalidated translated code (then
        the block must leave after it: it may be running that code).  Only the runtime's slow
        path can (pages with code have no write TLB entries): the fast paths' false folds away.
        Resets the record."""
        hit, self.smc = self.smc, None
        return self.c(0, "i1") if hit is None else hit

    def left(self, after=False):
        """Instructions of the block from this one (after: from the next one) to its end: what
        an exit here refunds to the budget the block charged at entry.  A hole in a stencil."""
        if self.stencil is not None:
            return Hole("h_left1" if after else "h_left")
        return self.ninsns - self.k - (1 if after else 0)

    def refund(self, n):
        if type(n) is Hole or n:
            b = self.load_field(offset("budget"), "i64")
            self.store_field(offset("budget"), self.add(b, const(n, "i64")))

    def _fault_exit_label(self):
        """Label of this instruction's precise fault exit (state as at its start)."""
        if self.fault_label is None:
            self.fault_label = self.new_label("fault")
            saved = (self.lines, self.label, self.terminated, self._enter_side())
            self.lines = []
            self.set_label(self.fault_label)
            self._store_values(*self.snapshot)
            self.store_field(offset("eip"), self.c(self.insn.addr))
            self.refund(self.left())
            self.emit(f"ret i32 {S.EXIT_EXCEPTION}")
            self.deferred.extend(self.lines)
            self.lines, self.label, self.terminated, self.scope = saved
        return self.fault_label

    def raise_if(self, cond, vector, error=None):
        """Raise exception `vector` (precisely) when cond (i1) holds."""
        cond = self.f(cond)
        self._prepare_fault_exit()
        lab, cont = self.new_label("exc"), self.new_label("c")
        self.cbr(cond, lab, cont)
        self.set_label(lab)
        self.store_field(offset("exc_vector"), self.c(vector))
        self.store_field(offset("exc_error"), self.c(S.NO_ERROR_CODE if error is None else error))
        self.br(self._fault_exit_label())
        self.set_label(cont)

    def raise_now(self, vector, error=None):
        self._prepare_fault_exit()
        self.store_field(offset("exc_vector"), self.c(vector))
        self.store_field(offset("exc_error"), self.c(S.NO_ERROR_CODE if error is None else error))
        self.br(self._fault_exit_label())

    # ---- registers and flags ----------------------------------------------
    def reg(self, r):
        """Read a decode.Reg view."""
        v = self.f(self.regs[r.index])
        if r.width == 4:
            return v
        if r.width == 2:
            return self.trunc(v, "i16")
        if r.hi:
            return self.trunc(self.lshr(v, self.c(8)), "i8")
        return self.trunc(v, "i8")

    def set_reg(self, r, v):
        old = self.regs[r.index]
        if r.width == 4:
            new = self.f(v)
        elif r.width == 2:
            new = self.or_(self.and_(old, self.c(0xFFFF0000)), self.zext(v, "i32"))
        elif r.hi:
            new = self.or_(self.and_(old, self.c(0xFFFF00FF)), self.shl(self.zext(v, "i32"), self.c(8)))
        else:
            new = self.or_(self.and_(old, self.c(0xFFFFFF00)), self.zext(v, "i32"))
        self.regs[r.index] = new
        self.dirty_regs.add(r.index)

    def reg32(self, i):
        return self.f(self.regs[i])

    def set_reg32(self, i, v):
        self.regs[i] = self.f(v)
        self.dirty_regs.add(i)

    def flag(self, name):
        """The flag's value: a V or a Lazy (arithmetic helpers force it where it is used)."""
        return self.flags[name]

    def set_flag(self, name, v):
        """Set a flag to an i1 V or Lazy; a Lazy overwritten before it is read is never emitted."""
        assert v.t == "i1"
        self.flags[name] = v
        self.dirty_flags.add(name)

    def set_eflags_other(self, v):
        self.eflags_other = v
        self.dirty_other = True

    # ---- memory: the soft-MMU path ------------------------------------------
    def seg_base(self, seg):
        if self.key & S.KEY_FLAT and seg in (S.ES, S.CS, S.SS, S.DS):
            return None
        return self.load_field(offset("seg_base") + 4 * seg, "i32")

    def ea(self, m):
        """Effective (offset) address of a decode.Mem, before the segment base."""
        t = "i16" if m.addr16 else "i32"
        a = self.c(m.disp, t)
        if m.base is not None:
            a = self.add(a, self.resize(self.reg(m.base), t))
        if m.index is not None:
            idx = self.resize(self.reg(m.index), t)
            if m.scale != 1:
                idx = self.mul(idx, self.c(m.scale, t))
            a = self.add(a, idx)
        return self.zext(a, "i32")

    def linear(self, seg, off):
        """The linear address of offset off (i32) in segment seg: every guest data access goes
        through one (load, store and probe_write check it against the segment)."""
        off = self.f(off)
        base = self.seg_base(seg)
        return Lin(off if base is None else self.add(off, base), seg, off)

    def lin_add(self, addr, delta):
        """addr + delta (i32 V or int) as a Lin in the same segment: the offset moves with it."""
        delta = self.c(delta) if isinstance(delta, int) else self.f(delta)
        off = addr.off
        return Lin(self.add(addr, delta), addr.seg, Lazy(lambda: self.add(off, delta), "i32"))

    def seg_check(self, addr, size, write):
        """#GP(0) (#SS(0) through SS) unless the size-byte access at addr's offset lies in the
        segment's valid range for its kind (CPUState.seg_lo/seg_hi: limit, expand-down, type and
        null selector in one compare).  Skipped where the key says the range is all of 4 GiB:
        ES/SS/DS with KEY_FLAT, FS with KEY_FS_FULL; CS overrides and GS are always checked."""
        assert type(addr) is Lin, "guest memory is accessed through a segment (Emitter.linear)"
        seg = addr.seg
        if (seg in (S.ES, S.SS, S.DS) and self.key & S.KEY_FLAT) or (seg == S.FS and self.key & S.KEY_FS_FULL):
            return
        i = seg + (6 if write else 0)
        lo = self.load_field(offset("seg_lo") + 4 * i, "i32")
        hi = self.load_field(offset("seg_hi") + 4 * i, "i32")
        off = self.f(addr.off)
        end = self.add(self.zext(off, "i64"), const(size - 1, "i64"))
        bad = self.or_(self.icmp("ult", off, lo), self.icmp("ugt", end, self.zext(hi, "i64")))
        self.raise_if(bad, _SS if seg == S.SS else _GP, 0)

    def mem_addr(self, m):
        lin = self.linear(m.seg, self.ea(m))
        r = self._window_base(m)
        if r is not None and r in self.windows and self.regs[r] is self.windows[r]["entry"]:
            lin.window = (r, _signed(m.disp, "i32"))
        return lin

    @staticmethod
    def _window_base(m):
        """The GPR of a [reg + disp] operand (flat DS/SS/ES, 32-bit addressing), else None."""
        if m.base is None or m.base.width != 4 or m.index is not None or m.addr16 or m.seg not in (S.SS, S.DS, S.ES):
            return None
        return m.base.index

    def _base_windows(self):
        """Tier-2 regions: for each register that is the base of 3 or more [reg + disp] operands of
        the block, one TLB check at block entry: if the bytes those operands span (from the
        register's entry value) lie in one page whose read (write) TLB entry is present, each such
        access while the register is unchanged goes straight to host memory; else each takes the
        usual probe.  Compiled code addresses its stack frame and structures this way (busybox's
        SHA-256: ~25 [esp + disp] per round; gzip: [edi + disp]); a probe each cost ~8 host
        instructions.  Flat segments only (no base, no limit checks)."""
        if not self.module.region or not self.key & S.KEY_FLAT or self.key & S.KEY_AC:
            return
        spans = {}
        for insn in self.block.insns:
            for op in insn.ops:
                r = self._window_base(op.mem) if op.kind == "mem" else None
                if r is not None:
                    spans.setdefault(r, []).append((_signed(op.mem.disp, "i32"), op.size))
        for r, sp in sorted(spans.items()):
            lo_d, hi_d = min(d for d, _ in sp), max(d + n for d, n in sp) - 1
            if len(sp) < 3 or hi_d - lo_d >= 4096:
                continue
            entry = self.regs[r]
            base = self.f(entry)
            lo, hi = self.add(base, self.c(lo_d)), self.add(base, self.c(hi_d))
            one_page = self.icmp("ult", self.xor(lo, hi), self.c(4096))
            page = self.and_(lo, self.c(-4096))
            slot = self.zext(self.and_(self.lshr(lo, self.c(12)), self.c(S.TLB_SIZE - 1)), "i64")
            win = {"entry": entry, "lo": lo_d, "hi": hi_d}
            for kind in (S.TLB_READ, S.TLB_WRITE):
                eo = self.add(self.shl(slot, const(4, "i64")),
                              const(offset("tlb") + S.tlb_index(self.priv, kind) * 16, "i64"))
                ent = self.op(f"getelementptr i8, ptr %st, i64 {eo.s}", PTR)
                tag = self.op(f"load i32, ptr {ent.s}", "i32")
                ap = self.op(f"getelementptr i8, ptr {ent.s}, i64 8", PTR)
                win[kind] = (self.and_(one_page, self.icmp("eq", tag, page)), self.op(f"load i64, ptr {ap.s}", "i64"))
            self.windows[r] = win

    def _window_fast(self, addr, size, kind):
        """(ok i1, host addend i64) when addr is a [reg + disp] access inside its register's window."""
        w = getattr(addr, "window", None)
        if w is None:
            return None
        win = self.windows[w[0]]
        if w[1] < win["lo"] or w[1] + size - 1 > win["hi"]:
            return None
        return win[kind]

    def _direct_or_probe(self, addr, size, kind, t, direct, probe):
        """The access through its base-register window (_window_fast) when it has one: direct(host
        pointer) when the window's check holds, else probe(); the two values (of type t) are
        joined.  Without a window, just probe()."""
        fast = self._window_fast(addr, size, kind)
        if fast is None:
            return probe()
        ok, addend = fast
        lf, ls, lj = self.new_label("sfast"), self.new_label("sslow"), self.new_label("sjoin")
        self.cbr(ok, lf, ls, likely=True)
        saved = self._enter_side()
        self.set_label(lf)
        hp = self.op(f"inttoptr i64 {self.add(addend, self.zext(addr, 'i64')).s} to ptr", PTR)
        fast_v = direct(hp)
        self.br(lj)
        self.scope = object()
        self.set_label(ls)
        slow_v = probe()
        slow_end = self.label
        self.br(lj)
        self.scope = saved
        self.set_label(lj)
        return self.op(f"phi {t} [ {fast_v.s}, %{lf} ], [ {slow_v.s}, %{slow_end} ]", t)

    def _mem_helper(self, kind, size):
        """Name of the module's internal function for one soft-MMU access, defined on first use:
        the TLB probe (tag = page of the last byte, so page-crossing accesses miss), the host
        access, or the runtime's slow path.  It returns the value (loads) and whether st.fault
        was set.  The one definition serves both tiers: tier 1 calls it (a third of the IR per
        access, compiled that much faster), tier 2 (-O2) inlines it (alwaysinline), where the
        fault flag of the fast path folds to false.  kind "probe": a write-permission probe of
        `size` bytes (an argument) without an access."""
        tag = {S.TLB_READ: "ld", S.TLB_WRITE: "st", "probe": "pw"}[kind]
        name = f"btvm_{tag}{'' if kind == 'probe' else size}_p{self.priv}"
        if name in self.module.helpers:
            return name
        tlb_kind = S.TLB_WRITE if kind == "probe" else kind
        base = offset("tlb") + S.tlb_index(self.priv, tlb_kind) * 16
        last = "%size1 = sub i32 %size, 1\n  %last = add i32 %addr, %size1" if kind == "probe" else \
            f"%last = add i32 %addr, {size - 1}"
        probe = f"""  {last}
  %page = and i32 %last, -4096
  %i0 = lshr i32 %addr, 12
  %idx = and i32 %i0, {S.TLB_SIZE - 1}
  %i1 = zext i32 %idx to i64
  %i2 = shl i64 %i1, 4
  %eo = add i64 %i2, {base}
  %ent = getelementptr i8, ptr %st, i64 %eo
  %tag = load i32, ptr %ent
  %hit = icmp eq i32 %tag, %page
  br i1 %hit, label %fast, label %slow{_LIKELY_PROF}
fast:
  %ap = getelementptr i8, ptr %ent, i64 8
  %addend = load i64, ptr %ap
  %a64 = zext i32 %addr to i64
  %h = add i64 %a64, %addend
  %hp = inttoptr i64 %h to ptr
"""
        fault = f"""  %fa = getelementptr i8, ptr %st, i64 {offset("fault")}
  %f = load i32, ptr %fa
  %bad = icmp ne i32 %f, 0
"""
        attrs = "alwaysinline nounwind"
        t = ITY.get(size)
        if kind == "probe":
            text = f"""define internal i1 @{name}(ptr %st, i32 %addr, i32 %size) {attrs} {{
entry:
{probe}  ret i1 false
slow:
  %fpp = getelementptr i8, ptr %st, i64 {offset("load_slow")}
  %fp = load ptr, ptr %fpp
  %sz = or i32 %size, 256
  %s = call i64 %fp(ptr %st, i32 %addr, i32 %sz)
{fault}  ret i1 %bad
}}
"""
        elif kind == S.TLB_WRITE:
            # Returns bit 0: st.fault was set, bit 1: st.smc (the store invalidated code).
            v = "%v" if t == "i64" else "%vt"
            trunc = "" if t == "i64" else f"  %vt = trunc i64 %v to {t}\n"
            text = f"""define internal i32 @{name}(ptr %st, i32 %addr, i64 %v) {attrs} {{
entry:
{trunc}{probe}  store {t} {v}, ptr %hp, align 1
  ret i32 0
slow:
  %fpp = getelementptr i8, ptr %st, i64 {offset("store_slow")}
  %fp = load ptr, ptr %fpp
  call void %fp(ptr %st, i32 %addr, i64 %v, i32 {size})
{fault}  %sa = getelementptr i8, ptr %st, i64 {offset("smc")}
  %sm = load i32, ptr %sa
  %smb = icmp ne i32 %sm, 0
  %r0 = zext i1 %bad to i32
  %r1 = select i1 %smb, i32 2, i32 0
  %r = or i32 %r0, %r1
  ret i32 %r
}}
"""
        else:
            x = "%x" if t == "i64" else "%x64"
            ext = "" if t == "i64" else f"  %x64 = zext {t} %x to i64\n"
            text = f"""define internal {{i64, i1}} @{name}(ptr %st, i32 %addr) {attrs} {{
entry:
{probe}  %x = load {t}, ptr %hp, align 1
{ext}  %rf = insertvalue {{i64, i1}} undef, i64 {x}, 0
  %rf2 = insertvalue {{i64, i1}} %rf, i1 false, 1
  ret {{i64, i1}} %rf2
slow:
  %fpp = getelementptr i8, ptr %st, i64 {offset("load_slow")}
  %fp = load ptr, ptr %fpp
  %s = call i64 %fp(ptr %st, i32 %addr, i32 {size})
{fault}  %rs = insertvalue {{i64, i1}} undef, i64 %s, 0
  %rs2 = insertvalue {{i64, i1}} %rs, i1 %bad, 1
  ret {{i64, i1}} %rs2
}}
"""
        self.module.helpers[name] = text
        self.module.declare(_LIKELY)
        return name

    def _fault_if(self, bad):
        """Leave through the current instruction's fault exit if bad (an i1 from a helper)."""
        cont = self.new_label("c")
        self.cbr(bad, self._fault_exit_label(), cont)
        self.set_label(cont)

    def _ac_helper(self, write):
        """Name of the module's internal function that raises #AC for a misaligned access: it
        first probes the access through the slow path (load_slow with 0x100|size for a write,
        0x200|size for a read: no access), so that a #PF, which has priority (SDM Vol. 3A
        Table 6-2), is raised instead; then it records #AC(0).  Either way st.fault is set."""
        name = f"btvm_ac_{'w' if write else 'r'}"
        if name in self.module.helpers:
            return name
        flag = 0x100 if write else 0x200
        self.module.helpers[name] = f"""define internal void @{name}(ptr %st, i32 %addr, i32 %size) alwaysinline nounwind {{
entry:
  %fpp = getelementptr i8, ptr %st, i64 {offset("load_slow")}
  %fp = load ptr, ptr %fpp
  %sz = or i32 %size, {flag}
  %r = call i64 %fp(ptr %st, i32 %addr, i32 %sz)
  %fa = getelementptr i8, ptr %st, i64 {offset("fault")}
  %f = load i32, ptr %fa
  %pf = icmp ne i32 %f, 0
  br i1 %pf, label %done, label %ac
ac:
  %va = getelementptr i8, ptr %st, i64 {offset("exc_vector")}
  store i32 {_AC}, ptr %va
  %ea = getelementptr i8, ptr %st, i64 {offset("exc_error")}
  store i32 0, ptr %ea
  store i32 1, ptr %fa
  br label %done
done:
  ret void
}}
"""
        return name

    def align_check(self, addr, size, write, align=None):
        """#AC(0) (SDM Vol. 3A 6.15) if addr is not a multiple of align (default: size for
        2, 4 and 8 bytes).  Emitted only under KEY_AC (CR0.AM, EFLAGS.AC, CPL 3): other code
        is translated without it, so alignment checking costs nothing unless it is enabled."""
        if not self.key & S.KEY_AC:
            return
        if align is None:
            align = size if size in (2, 4, 8) else 1
        if align <= 1:
            return
        mis = self.icmp("ne", self.and_(addr, self.c(align - 1)), self.c(0))
        if cval(mis) == 0:
            return
        lab, cont = self.new_label("ac"), self.new_label("c")
        self.cbr(mis, lab, cont)
        self.set_label(lab)
        self.emit(f"call void @{self._ac_helper(write)}(ptr %st, i32 {addr.s}, i32 {size})")
        self.br(self._fault_exit_label())
        self.set_label(cont)

    def load(self, addr, size, align=None):
        """Load size bytes at linear address addr (i32); returns iN.  align: the alignment
        #AC requires (Emitter.align_check; default the natural one, 1 for none)."""
        t = ITY[size]
        addr = self.f(addr)
        self._prepare_fault_exit()
        self.seg_check(addr, size, False)
        self.align_check(addr, size, False, align)
        def probe():
            r = self.op(f"call {{i64, i1}} @{self._mem_helper(S.TLB_READ, size)}(ptr %st, i32 {addr.s})",
                        "{i64, i1}")
            v = self.op(f"extractvalue {{i64, i1}} {r.s}, 0", "i64")
            self._fault_if(self.op(f"extractvalue {{i64, i1}} {r.s}, 1", "i1"))
            return self.trunc(v, t) if t != "i64" else v
        return self._direct_or_probe(addr, size, S.TLB_READ, t,
                                     lambda hp: self.op(f"load {t}, ptr {hp.s}, align 1", t), probe)

    def store(self, addr, v, align=None):
        """Store v (iN) at linear address addr (i32); align as for load."""
        addr, v = self.f(addr), self.f(v)
        self._prepare_fault_exit()
        size = bits_of(v.t) // 8
        self.seg_check(addr, size, True)
        self.align_check(addr, size, True, align)
        def probe():
            wide = self.zext(v, "i64") if v.t != "i64" else v
            r = self.op(f"call i32 @{self._mem_helper(S.TLB_WRITE, size)}(ptr %st, i32 {addr.s}, i64 {wide.s})",
                        "i32")
            self._fault_if(self.icmp("ne", self.and_(r, self.c(1)), self.c(0)))
            return self.icmp("ne", self.and_(r, self.c(2)), self.c(0))
        def direct(hp):
            self.emit(f"store {v.t} {v.s}, ptr {hp.s}, align 1")
            return self.c(0, "i1")
        hit = self._direct_or_probe(addr, size, S.TLB_WRITE, "i1", direct, probe)
        self.smc = hit if self.smc is None else self.or_(self.smc, hit)

    def probe_write(self, addr, size, align=1):
        """Fault now (precisely) if a later store of size bytes at addr would fault.

        Used by instructions that store more than once, so that the first
        store cannot land when a later one faults.  align: the alignment #AC requires of
        the whole operand (default none: the stores check their own)."""
        addr = self.f(addr)
        self._prepare_fault_exit()
        self.seg_check(addr, size, True)
        self.align_check(addr, size, True, align)
        self._fault_if(self.op(f"call i1 @{self._mem_helper('probe', size)}(ptr %st, i32 {addr.s}, "
                               f"i32 {size})", "i1"))

    # ---- operands ----------------------------------------------------------
    def read(self, op, size=None):
        size = size or op.size
        t = ITY[size]
        if op.kind == "reg":
            return self.reg(op.reg)
        if op.kind == "imm":
            return self.c(op.imm, t)
        if op.kind == "mem":
            return self.load(self.mem_addr(op.mem), size)
        if op.kind == "seg":
            v = self.load_field(offset("seg_sel") + 2 * op.reg, "i16")
            return self.resize(v, t)
        raise NotImplementedError(op.kind)

    def write(self, op, v, addr=None):
        if op.kind == "reg":
            self.set_reg(op.reg, v)
        elif op.kind == "mem":
            self.store(addr if addr is not None else self.mem_addr(op.mem), v)
        else:
            raise NotImplementedError(op.kind)

    # ---- stack ---------------------------------------------------------------
    def stack32(self):
        """SS.B: 32-bit stack pointer (flat protected mode always has it)."""
        return True

    def push(self, v):
        """Push v (i16 or i32); commits ESP."""
        size = bits_of(v.t) // 8
        esp = self.sub(self.reg32(4), self.c(size))
        self.store(self.linear(S.SS, esp), v)
        self.set_reg32(4, esp)

    def pop(self, size):
        """Load the top of stack; returns (value, new esp). The caller commits ESP."""
        esp = self.reg32(4)
        v = self.load(self.linear(S.SS, esp), size)
        return v, self.add(esp, self.c(size))

    # ---- exits ----------------------------------------------------------------
    def _store_eip(self, eip):
        self.store_field(offset("eip"), eip)

    def exit_code(self, code, eip, refund=0):
        """Leave the block returning `code` with eip set (the path ends here: a side path)."""
        eip = self.f(eip)
        saved = self._enter_side()
        self.flush()
        self._store_eip(eip)
        self.refund(refund)
        self.emit(f"ret i32 {code}")
        self.terminated = True
        self.scope = saved

    def exit_direct(self, target, flushed=False):
        """Leave to a constant guest address through a patchable chain slot."""
        if self.key & S.KEY_PG and (self.stencil.crosses_page(target) if self.stencil is not None
                                    else (target ^ self.block.eip) & ~0xFFF):
            # With paging, a chain never leaves the block's page: the target page may map to
            # other code in another address space.  Cross-page exits probe the jump cache,
            # which the runtime clears on every address-space switch (as QEMU does).
            return self.exit_indirect(self.c(target))
        saved = self._enter_side()
        if not flushed:
            self.exit_targets = (target,)
            self.flush()
            self.exit_targets = None
        self._store_eip(self.c(target))
        inner = self.module.region.get(target)
        if inner is not None:
            # Both blocks are in this tier-2 region: a direct call that LLVM can inline (a loop
            # becomes a real loop with the guest registers in SSA).
            r = self.op(f"musttail call {CC} i32 @{inner}(ptr %st)", "i32")
            self.emit(f"ret i32 {r.s}")
            self.terminated = True
            self.scope = saved
            return
        slot = self.module.new_slot(self.name) if self.stencil is None else f"h_slot{len(self.slots)}"
        self.slots.append(slot)
        fp = self.op(f"load ptr, ptr @{slot}", PTR)
        null = self.op(f"icmp eq ptr {fp.s}, null", "i1")
        miss, go = self.new_label("miss"), self.new_label("chain")
        self.cbr(null, miss, go)
        self.set_label(go)
        r = self.op(f"musttail call {CC} i32 {fp.s}(ptr %st)", "i32")
        self.emit(f"ret i32 {r.s}")
        self.set_label(miss)
        addr = self.op(f"ptrtoint ptr @{slot} to i64", "i64")
        self.store_field(offset("chain_from"), addr)
        self.emit(f"ret i32 {S.EXIT_LOOKUP}")
        self.terminated = True
        self.scope = saved

    def exit_indirect(self, eip):
        """Leave to a computed guest address through the native jump cache."""
        eip = self.f(eip)
        saved = self._enter_side()
        self.flush()
        self._store_eip(eip)
        jc = self.load_field(offset("jmp_cache"), PTR)
        h = self.lshr(self.mul(eip, self.c(S.JMP_CACHE_MULT)), self.c(32 - S.JMP_CACHE_BITS))   # S.jc_hash
        eoff = self.shl(self.zext(h, "i64"), const(4, "i64"))
        ent = self.op(f"getelementptr i8, ptr {jc.s}, i64 {eoff.s}", PTR)
        tag = self.op(f"load i64, ptr {ent.s}", "i64")
        if self.stencil is not None:
            # The block's key is a hole: stencils are shared by keys that differ in KEY_STEP only.
            key = self.shl(self.zext(const(Hole("h_key"), "i32"), "i64"), const(32, "i64"))
        else:
            key = const(self.key << 32, "i64")
        want = self.or_(self.zext(eip, "i64"), key)
        hit = self.icmp("eq", tag, want)
        go, miss = self.new_label("jc"), self.new_label("jcmiss")
        self.cbr(hit, go, miss)
        self.set_label(go)
        fpp = self.op(f"getelementptr i8, ptr {ent.s}, i64 8", PTR)
        fp = self.op(f"load ptr, ptr {fpp.s}", PTR)
        r = self.op(f"musttail call {CC} i32 {fp.s}(ptr %st)", "i32")
        self.emit(f"ret i32 {r.s}")
        self.set_label(miss)
        self.store_field(offset("chain_from"), const(0, "i64"))
        self.emit(f"ret i32 {S.EXIT_LOOKUP}")
        self.terminated = True
        self.scope = saved

    def branch(self, cond, taken, fallthrough):
        """End the block with a conditional direct branch (the state is written back once,
        before the branch, for both arms)."""
        cond = self.f(cond)
        self.exit_targets = (taken, fallthrough)
        self.flush()
        self.exit_targets = None
        cc = cval(cond)
        if cc is not None:
            self.exit_direct(taken if cc else fallthrough, flushed=True)
            return
        t, f = self.new_label("taken"), self.new_label("nt")
        self.cbr(cond, t, f)
        self.set_label(t)
        self.exit_direct(taken, flushed=True)
        self.set_label(f)
        self.exit_direct(fallthrough, flushed=True)

    def callout(self, callout_id, arg=None):
        """End the block at this instruction, handing it to the VMM (bt.sensitive)."""
        self.store_field(offset("callout_id"), self.c(callout_id))
        self.store_field(offset("callout_arg"), arg if arg is not None else self.c(0))
        self.store_field(offset("next_eip"), self.c(self.insn.next))
        self.exit_code(S.EXIT_CALLOUT, self.c(self.insn.addr), refund=self.left())

    def text(self):
        body = "\n".join(self.lines[:1] + self.entry_lines + self.lines[1:] + self.deferred)
        # noalias: guest memory, the jump cache and chain slots never overlap the CPU state, which
        # lets an optimized region keep state fields in registers across its guest memory accesses.
        # nounwind: translated code never unwinds, so no .eh_frame: ~16% less memory per loaded
        # module (measured) and no unwind-table registration.
        attr = "noalias " if self.module.region or self.stencil is not None else ""
        first = next(iter(self.module.region.values()), None)
        fattr = " alwaysinline" if self.module.inline and self.name != first else ""
        return f"define {CC} i32 @{self.name}(ptr {attr}%st) nounwind{fattr} {{\n{body}\n}}\n"

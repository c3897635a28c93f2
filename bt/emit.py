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
from . import state as S
from .state import offset

PTR = "ptr"
ITY = {1: "i8", 2: "i16", 4: "i32", 8: "i64"}


class V:
    """An IR value: its text (register name or constant) and its type."""
    __slots__ = ("s", "t")

    def __init__(self, s, t):
        self.s, self.t = s, t

    def __repr__(self):
        return f"{self.t} {self.s}"


def bits_of(t):
    return int(t[1:])


def const(value, t):
    if t == "i1":
        return V("true" if value & 1 else "false", "i1")
    n = bits_of(t)
    value &= (1 << n) - 1
    if value >> (n - 1):
        value -= 1 << n
    return V(str(value), t)


class Emitter:
    """Builds one block function `i32 @name(ptr %st)` following the exit contract in bt.state."""

    def __init__(self, name, block, key, module):
        self.name = name
        self.block = block
        self.key = key
        self.module = module          # bt.jit.ModuleText: declarations, slot globals
        self.priv = 1 if S.key_cpl(key) == 3 else 0
        self.lines = []
        self.n = 0
        self.label = "entry"
        self.ninsns = len(block.insns)
        self.k = 0                    # index of the instruction being translated
        self.insn = None
        self.slots = []               # names of chain-slot globals of this block's direct exits
        self.terminated = False
        self.deferred = []            # out-of-line code (fault exits) appended after the body
        self._emit_prologue()

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
        r = self.tmp()
        self.emit(f"{r} = {text}")
        return V(r, t)

    def set_label(self, label):
        self.lines.append(f"{label}:")
        self.label = label
        self.terminated = False

    def br(self, label):
        self.emit(f"br label %{label}")
        self.terminated = True

    def cbr(self, cond, l_true, l_false):
        self.emit(f"br i1 {cond.s}, label %{l_true}, label %{l_false}")
        self.terminated = True

    def phi(self, t, incoming):
        arms = ", ".join(f"[ {v.s}, %{lab} ]" for v, lab in incoming)
        return self.op(f"phi {t} {arms}", t)

    # ---- arithmetic helpers ------------------------------------------------
    def c(self, value, t="i32"):
        return const(value, t)

    def bin(self, opname, a, b):
        assert a.t == b.t, (opname, a, b)
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
        return self.xor(a, const(-1, a.t))

    def icmp(self, pred, a, b):
        assert a.t == b.t, (pred, a, b)
        return self.op(f"icmp {pred} {a.t} {a.s}, {b.s}", "i1")

    def select(self, cond, a, b):
        assert a.t == b.t and cond.t == "i1"
        return self.op(f"select i1 {cond.s}, {a.t} {a.s}, {b.t} {b.s}", a.t)

    def cast(self, kind, v, t):
        if v.t == t:
            return v
        return self.op(f"{kind} {v.t} {v.s} to {t}", t)

    def zext(self, v, t): return self.cast("zext", v, t)
    def sext(self, v, t): return self.cast("sext", v, t)
    def trunc(self, v, t): return self.cast("trunc", v, t)

    def resize(self, v, t, signed=False):
        """Zero/sign-extend or truncate v to type t."""
        if bits_of(v.t) < bits_of(t):
            return self.sext(v, t) if signed else self.zext(v, t)
        return self.trunc(v, t)

    def bit(self, v, n):
        """Bit n of v as i1."""
        return self.trunc(self.lshr(v, const(n, v.t)), "i1") if n else self.trunc(v, "i1")

    def msb(self, v):
        return self.bit(v, bits_of(v.t) - 1)

    def intrinsic(self, name, ret, args):
        self.module.declare(f"declare {ret} @{name}({', '.join(a.t for a in args)})")
        return self.op(f"call {ret} @{name}({', '.join(repr(a) for a in args)})", ret)

    # ---- CPU state access ---------------------------------------------------
    def field(self, off):
        return self.op(f"getelementptr i8, ptr %st, i64 {off}", PTR)

    def load_field(self, off, t):
        p = self.field(off)
        return self.op(f"load {t}, ptr {p.s}", t)

    def store_field(self, off, v):
        p = self.field(off)
        self.emit(f"store {v.t} {v.s}, ptr {p.s}")

    def _emit_prologue(self):
        self.lines.append("entry:")
        budget = self.load_field(offset("budget"), "i64")
        ok = self.icmp("sge", budget, const(self.ninsns, "i64"))
        go, out = self.new_label("go"), self.new_label("nobudget")
        self.cbr(ok, go, out)
        self.set_label(out)
        self.emit(f"ret i32 {S.EXIT_BUDGET}")
        self.set_label(go)
        self.store_field(offset("budget"), self.sub(budget, const(self.ninsns, "i64")))
        self.reload()

    def reload(self):
        """(Re)load every register and flag from the state into fresh SSA values."""
        regs_off = offset("regs")
        self.regs = [self.load_field(regs_off + 4 * i, "i32") for i in range(8)]
        ef = self.load_field(offset("eflags"), "i32")
        self.flags = {f: self.bit(ef, S.FLAG_BIT[f]) for f in S.FLAG_BIT}
        mask = S.STATUS_MASK | (1 << S.DF)
        self.eflags_other = self.and_(ef, const(~mask, "i32"))
        self.dirty_regs = set()
        self.dirty_flags = set()
        self.dirty_other = False

    def _store_values(self, regs, flags, other, dirty_regs, dirty_flags, dirty_other):
        regs_off = offset("regs")
        for i in sorted(dirty_regs):
            self.store_field(regs_off + 4 * i, regs[i])
        if dirty_flags or dirty_other:
            ef = other
            for f, bitpos in S.FLAG_BIT.items():
                ef = self.or_(ef, self.shl(self.zext(flags[f], "i32"), const(bitpos, "i32")))
            self.store_field(offset("eflags"), ef)

    def flush(self):
        """Write every modified register and flag back to the state.

        Exits on side paths flush too, so the dirty sets are kept: code after
        a side exit still owes the same stores.  Only reload() resets them."""
        self._store_values(self.regs, self.flags, self.eflags_other,
                           self.dirty_regs, self.dirty_flags, self.dirty_other)

    # ---- instruction bracketing -------------------------------------------
    def begin_insn(self, k, insn):
        self.k, self.insn = k, insn
        self.smc_check = False
        self.take_snapshot()

    def take_snapshot(self):
        """Record the values a fault exit restores (the current instruction's start)."""
        self.snapshot = (list(self.regs), dict(self.flags), self.eflags_other,
                         set(self.dirty_regs), set(self.dirty_flags), self.dirty_other)
        self.fault_label = None

    def end_insn(self):
        if self.smc_check and not self.terminated:
            smc = self.load_field(offset("smc"), "i32")
            hit = self.icmp("ne", smc, const(0, "i32"))
            out, cont = self.new_label("smc"), self.new_label("c")
            self.cbr(hit, out, cont)
            self.set_label(out)
            self.exit_code(S.EXIT_SMC, self.c(self.insn.next), refund=self.ninsns - self.k - 1)
            self.set_label(cont)

    def refund(self, n):
        if n:
            b = self.load_field(offset("budget"), "i64")
            self.store_field(offset("budget"), self.add(b, const(n, "i64")))

    def _fault_exit_label(self):
        """Label of this instruction's precise fault exit (state as at its start)."""
        if self.fault_label is None:
            self.fault_label = self.new_label("fault")
            saved = (self.lines, self.label, self.terminated)
            self.lines = []
            self.set_label(self.fault_label)
            self._store_values(*self.snapshot)
            self.store_field(offset("eip"), self.c(self.insn.addr))
            self.refund(self.ninsns - self.k)
            self.emit(f"ret i32 {S.EXIT_EXCEPTION}")
            self.deferred.extend(self.lines)
            self.lines, self.label, self.terminated = saved
        return self.fault_label

    def raise_if(self, cond, vector, error=None):
        """Raise exception `vector` (precisely) when cond (i1) holds."""
        lab, cont = self.new_label("exc"), self.new_label("c")
        self.cbr(cond, lab, cont)
        self.set_label(lab)
        self.store_field(offset("exc_vector"), self.c(vector))
        self.store_field(offset("exc_error"), self.c(S.NO_ERROR_CODE if error is None else error))
        self.br(self._fault_exit_label())
        self.set_label(cont)

    def raise_now(self, vector, error=None):
        self.store_field(offset("exc_vector"), self.c(vector))
        self.store_field(offset("exc_error"), self.c(S.NO_ERROR_CODE if error is None else error))
        self.br(self._fault_exit_label())

    # ---- registers and flags ----------------------------------------------
    def reg(self, r):
        """Read a decode.Reg view."""
        v = self.regs[r.index if r.width != 1 or not r.hi else r.index]
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
            new = v
        elif r.width == 2:
            new = self.or_(self.and_(old, self.c(0xFFFF0000)), self.zext(v, "i32"))
        elif r.hi:
            new = self.or_(self.and_(old, self.c(0xFFFF00FF)), self.shl(self.zext(v, "i32"), self.c(8)))
        else:
            new = self.or_(self.and_(old, self.c(0xFFFFFF00)), self.zext(v, "i32"))
        self.regs[r.index] = new
        self.dirty_regs.add(r.index)

    def reg32(self, i):
        return self.regs[i]

    def set_reg32(self, i, v):
        self.regs[i] = v
        self.dirty_regs.add(i)

    def flag(self, name):
        return self.flags[name]

    def set_flag(self, name, v):
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
        base = self.seg_base(seg)
        return off if base is None else self.add(off, base)

    def mem_addr(self, m):
        return self.linear(m.seg, self.ea(m))

    def _tlb_probe(self, addr, size, kind):
        """Returns (hit i1, entry pointer)."""
        last = self.add(addr, self.c(size - 1)) if size > 1 else addr
        page = self.and_(last, self.c(0xFFFFF000))
        idx = self.and_(self.lshr(addr, self.c(12)), self.c(S.TLB_SIZE - 1))
        base = offset("tlb") + S.tlb_index(self.priv, kind) * 16
        eoff = self.add(self.shl(self.zext(idx, "i64"), const(4, "i64")), const(base, "i64"))
        ent = self.op(f"getelementptr i8, ptr %st, i64 {eoff.s}", PTR)
        tag = self.op(f"load i32, ptr {ent.s}", "i32")
        return self.icmp("eq", tag, page), ent

    def _host_ptr(self, ent, addr):
        ap = self.op(f"getelementptr i8, ptr {ent.s}, i64 8", PTR)
        addend = self.op(f"load i64, ptr {ap.s}", "i64")
        h = self.add(self.zext(addr, "i64"), addend)
        return self.op(f"inttoptr i64 {h.s} to ptr", PTR)

    def _check_fault(self):
        f = self.load_field(offset("fault"), "i32")
        bad = self.icmp("ne", f, self.c(0))
        cont = self.new_label("c")
        self.cbr(bad, self._fault_exit_label(), cont)
        self.set_label(cont)

    def load(self, addr, size):
        """Load size bytes at linear address addr (i32); returns iN."""
        t = ITY[size]
        hit, ent = self._tlb_probe(addr, size, S.TLB_READ)
        fast, slow, join = self.new_label("ld"), self.new_label("lds"), self.new_label("ldj")
        self.cbr(hit, fast, slow)
        self.set_label(fast)
        hp = self._host_ptr(ent, addr)
        v_fast = self.op(f"load {t}, ptr {hp.s}, align 1", t)
        fast_end = self.label
        self.br(join)
        self.set_label(slow)
        fp = self.load_field(offset("load_slow"), PTR)
        r = self.op(f"call i64 {fp.s}(ptr %st, i32 {addr.s}, i32 {size})", "i64")
        v_slow = self.trunc(r, t)
        self._check_fault()
        slow_end = self.label
        self.br(join)
        self.set_label(join)
        return self.phi(t, [(v_fast, fast_end), (v_slow, slow_end)])

    def store(self, addr, v):
        """Store v (iN) at linear address addr (i32)."""
        size = bits_of(v.t) // 8
        hit, ent = self._tlb_probe(addr, size, S.TLB_WRITE)
        fast, slow, join = self.new_label("st"), self.new_label("sts"), self.new_label("stj")
        self.cbr(hit, fast, slow)
        self.set_label(fast)
        hp = self._host_ptr(ent, addr)
        self.emit(f"store {v.t} {v.s}, ptr {hp.s}, align 1")
        self.br(join)
        self.set_label(slow)
        fp = self.load_field(offset("store_slow"), PTR)
        self.emit(f"call void {fp.s}(ptr %st, i32 {addr.s}, i64 {self.zext(v, 'i64').s}, i32 {size})")
        self._check_fault()
        self.br(join)
        self.set_label(join)
        self.smc_check = True

    def probe_write(self, addr, size):
        """Fault now (precisely) if a later store of size bytes at addr would fault.

        Used by instructions that store more than once, so that the first
        store cannot land when a later one faults."""
        hit, _ = self._tlb_probe(addr, size, S.TLB_WRITE)
        slow, join = self.new_label("pw"), self.new_label("pwj")
        self.cbr(hit, join, slow)
        self.set_label(slow)
        fp = self.load_field(offset("load_slow"), PTR)
        # size 0 asks the runtime for a write-permission probe without an access
        self.emit(f"call i64 {fp.s}(ptr %st, i32 {addr.s}, i32 {0x100 | size})")
        self._check_fault()
        self.br(join)
        self.set_label(join)

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
        """Leave the block returning `code` with eip set."""
        self.flush()
        self._store_eip(eip)
        self.refund(refund)
        self.emit(f"ret i32 {code}")
        self.terminated = True

    def exit_direct(self, target):
        """Leave to a constant guest address through a patchable chain slot."""
        self.flush()
        self._store_eip(self.c(target))
        slot = self.module.new_slot(self.name)
        self.slots.append(slot)
        fp = self.op(f"load ptr, ptr @{slot}", PTR)
        null = self.op(f"icmp eq ptr {fp.s}, null", "i1")
        miss, go = self.new_label("miss"), self.new_label("chain")
        self.cbr(null, miss, go)
        self.set_label(go)
        r = self.op(f"musttail call i32 {fp.s}(ptr %st)", "i32")
        self.emit(f"ret i32 {r.s}")
        self.set_label(miss)
        addr = self.op(f"ptrtoint ptr @{slot} to i64", "i64")
        self.store_field(offset("chain_from"), addr)
        self.emit(f"ret i32 {S.EXIT_LOOKUP}")
        self.terminated = True

    def exit_indirect(self, eip):
        """Leave to a computed guest address through the native jump cache."""
        self.flush()
        self._store_eip(eip)
        jc = self.load_field(offset("jmp_cache"), PTR)
        h = self.and_(self.xor(eip, self.lshr(eip, self.c(S.JMP_CACHE_BITS))), self.c(S.JMP_CACHE_SIZE - 1))
        eoff = self.shl(self.zext(h, "i64"), const(4, "i64"))
        ent = self.op(f"getelementptr i8, ptr {jc.s}, i64 {eoff.s}", PTR)
        tag = self.op(f"load i64, ptr {ent.s}", "i64")
        want = self.or_(self.zext(eip, "i64"), const(self.key << 32, "i64"))
        hit = self.icmp("eq", tag, want)
        go, miss = self.new_label("jc"), self.new_label("jcmiss")
        self.cbr(hit, go, miss)
        self.set_label(go)
        fpp = self.op(f"getelementptr i8, ptr {ent.s}, i64 8", PTR)
        fp = self.op(f"load ptr, ptr {fpp.s}", PTR)
        r = self.op(f"musttail call i32 {fp.s}(ptr %st)", "i32")
        self.emit(f"ret i32 {r.s}")
        self.set_label(miss)
        self.store_field(offset("chain_from"), const(0, "i64"))
        self.emit(f"ret i32 {S.EXIT_LOOKUP}")
        self.terminated = True

    def branch(self, cond, taken, fallthrough):
        """End the block with a conditional direct branch."""
        t, f = self.new_label("taken"), self.new_label("nt")
        self.cbr(cond, t, f)
        self.set_label(t)
        self.exit_direct(taken)
        self.set_label(f)
        self.exit_direct(fallthrough)

    def callout(self, callout_id, arg=None):
        """End the block at this instruction, handing it to the VMM (bt.sensitive)."""
        self.store_field(offset("callout_id"), self.c(callout_id))
        self.store_field(offset("callout_arg"), arg if arg is not None else self.c(0))
        self.store_field(offset("next_eip"), self.c(self.insn.next))
        self.exit_code(S.EXIT_CALLOUT, self.c(self.insn.addr), refund=self.ninsns - self.k)

    def text(self):
        body = "\n".join(self.lines + self.deferred)
        return f"define i32 @{self.name}(ptr %st) {{\n{body}\n}}\n"

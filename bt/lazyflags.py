"""Lazy status flags across tier-2 exits.

Packing CF PF AF ZF SF OF into EFLAGS at every exit of a hot region was ~40% of the
host instructions of small interpreter loops (tools/bench_prog.c), though the next block
almost always overwrites them before reading any.  So an exit of a tier-2 region whose six
status flags all come from one ADD, SUB (CMP, NEG...), logic op, INC or DEC stores that
operation instead: state.cc_op (its code below), cc_a, cc_b and cc_res.  While cc_op is
not 0 the status bits of state.eflags are stale (its other bits never are).

Whoever reads the flags folds them in first (materialize: the flags recomputed by the same
rules, bt.semantics.flagcalc, then cc_op = 0): translated code at its first read of EFLAGS
(bt.emit.Emitter._materialized_eflags), and btvm_enter before it returns to the runtime, so
Python only ever sees a plain EFLAGS.  Any exit that stores EFLAGS stores cc_op = 0 with it.
The runtime compiles materializer_ir() once per process and puts its address in
state.materialize.
"""
from . import state as S

STATUS = ("CF", "PF", "AF", "ZF", "SF", "OF")
KINDS = ("add", "sub", "logic", "inc", "dec")     # inc/dec: a +/- 1 with CF = cc_b (kept from before)
_TYPES = ("i8", "i16", "i32")


def code(kind, t):
    """The cc_op of operation kind on operands of IR type t (never 0), or None if not lazy-able."""
    if t not in _TYPES:
        return None
    return 1 + KINDS.index(kind) * len(_TYPES) + _TYPES.index(t)


def flags_live(insns, live_at=None):
    """Whether a block that starts with insns needs EFLAGS' status flags as it is entered: it
    reads one before it writes all six, or it ends with only some of them written (its exits
    then pack the rest with them).  Lazy flags left for such a block would be folded in by a
    call, which costs more than packing them at the exit before.  A write of some flags that a
    write of all six follows is not a use (only an exit between them, a fault say, folds them
    in).  A block that touches no flag and ends with a direct JMP (or runs on into the next
    block) needs them as its successor does: live_at(address), if given."""
    from .semantics import TABLE
    status, partial = set(STATUS), False
    for insn in insns:
        info = TABLE.get(insn.id)
        if info is None:
            return True
        read, written = set(info.flags_read.split()), set(info.flags_written.split())
        if read & status:
            return True
        if written >= status:
            return False
        partial = partial or bool(written & status)
        if info.ends_block:
            if live_at is None or partial or insn.mnemonic != "jmp" or not insn.relative:
                return True
            return live_at(insn.ops[0].imm & (0xFFFF if insn.opsize == 2 else 0xFFFFFFFF))
    if live_at is None or partial or not insns:
        return True
    last = insns[-1]
    return live_at((last.addr + last.size) & 0xFFFFFFFF)


def materializer_ir():
    """IR text of `void btvm_materialize(ptr %st)`: EFLAGS = its bits other than the status
    flags | the status flags of operation cc_op; cc_op = 0.  Emitted by the Emitter from the
    flag rules every translation uses."""
    from .decode import Block
    from .emit import Emitter
    from .jit import ModuleText
    from .semantics import flagcalc
    mt = ModuleText("lazyflags")
    key = S.make_key()
    e = Emitter("btvm_materialize", Block(0, key, []), key, mt)
    e.lines, e.entry_lines, e.fields, e.deferred = ["entry:"], [], {}, []     # no block prologue
    cases = []
    for kind in KINDS:
        for t in _TYPES:
            label = e.new_label(kind + t)
            cases.append(f"i32 {code(kind, t)}, label %{label}")
            e.set_label(label)
            e.reload()
            a, b, res = (e.trunc(e.load_field(S.offset(f), "i32"), t) for f in ("cc_a", "cc_b", "cc_res"))
            if kind == "logic":
                flagcalc.logic_flags(e, res)
            elif kind in ("add", "inc"):
                flagcalc.add_flags(e, a, e.c(1, t) if kind == "inc" else b, res)
            else:
                flagcalc.sub_flags(e, a, e.c(1, t) if kind == "dec" else b, res)
            if kind in ("inc", "dec"):
                e.set_flag("CF", e.trunc(b, "i1"))
            e.flush()               # all six status flags replaced: stores EFLAGS and cc_op = 0
            e.emit("ret void")
    body = (["entry:"] + e.entry_lines + [f"  switch i32 %cc, label %none [ {' '.join(cases)} ]"]
            + e.lines[1:] + ["none:", "  ret void"])
    cc = f"  %ccp = getelementptr i8, ptr %st, i64 {S.offset('cc_op')}\n  %cc = load i32, ptr %ccp"
    body.insert(1, cc)
    mt.functions.append("define void @btvm_materialize(ptr %st) nounwind {\n" + "\n".join(body) + "\n}\n")
    return mt

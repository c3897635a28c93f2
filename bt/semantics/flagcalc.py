"""Shared EFLAGS computations (Intel SDM Vol. 1, 3.4.3 and Appendix A).

Every family computes its status flags through these helpers: one place per rule.
The flags are lazy (`e.lazy`): their IR is emitted only where a flag is read or
stored at an exit, so a flag overwritten before it is read costs nothing.
"""


def parity(e, res):
    """PF: set when the low byte has an even number of 1 bits."""
    low = e.trunc(res, "i8") if res.t != "i8" else res
    cnt = e.intrinsic("llvm.ctpop.i8", "i8", [low])
    return e.icmp("eq", e.and_(cnt, e.c(1, "i8")), e.c(0, "i8"))


def set_szp(e, res):
    e.set_flag("ZF", e.lazy(lambda: e.icmp("eq", res, e.c(0, res.t))))
    e.set_flag("SF", e.lazy(lambda: e.msb(res)))
    e.set_flag("PF", e.lazy(lambda: parity(e, res)))


def aux(e, a, b, res):
    """AF: carry/borrow out of bit 3."""
    return e.bit(e.xor(e.xor(a, b), res), 4)


def add_flags(e, a, b, res, carry_in=None):
    """Flags of res = a + b (+ carry_in)."""
    def cf():
        cf = e.icmp("ult", res, a)
        if carry_in is not None:
            eq = e.icmp("eq", res, a)
            cf = e.or_(cf, e.and_(carry_in, eq))
        return cf
    e.set_flag("CF", e.lazy(cf))
    e.set_flag("OF", e.lazy(lambda: e.msb(e.and_(e.xor(a, res), e.xor(b, res)))))
    e.set_flag("AF", e.lazy(lambda: aux(e, a, b, res)))
    set_szp(e, res)
    if carry_in is None:
        e.note_cc("add", a, b, res)


def sub_flags(e, a, b, res, borrow_in=None):
    """Flags of res = a - b (- borrow_in)."""
    def cf():
        cf = e.icmp("ult", a, b)
        if borrow_in is not None:
            eq = e.icmp("eq", a, b)
            cf = e.or_(cf, e.and_(borrow_in, eq))
        return cf
    e.set_flag("CF", e.lazy(cf))
    e.set_flag("OF", e.lazy(lambda: e.msb(e.and_(e.xor(a, b), e.xor(a, res)))))
    e.set_flag("AF", e.lazy(lambda: aux(e, a, b, res)))
    set_szp(e, res)
    if borrow_in is None:
        e.note_cc("sub", a, b, res)


def logic_flags(e, res):
    """AND/OR/XOR/TEST: CF=OF=0, SZP from the result; AF is undefined (cleared, as hardware does)."""
    false = e.c(0, "i1")
    e.set_flag("CF", false)
    e.set_flag("OF", false)
    e.set_flag("AF", false)
    set_szp(e, res)
    e.note_cc("logic", res, res, res)


# Condition codes in the encoding order of Jcc/SETcc/CMOVcc low nibble.
CONDITIONS = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")


NEGATED = frozenset(("no", "ae", "ne", "a", "ns", "np", "ge", "g"))


def condition(e, cc):
    """Evaluate condition code cc ('e', 'ne', 'l', ...) as i1."""
    f = e.flag
    neg = cc in NEGATED
    base = {
        "o": lambda: f("OF"), "no": lambda: f("OF"),
        "b": lambda: f("CF"), "ae": lambda: f("CF"),
        "e": lambda: f("ZF"), "ne": lambda: f("ZF"),
        "be": lambda: e.or_(f("CF"), f("ZF")), "a": lambda: e.or_(f("CF"), f("ZF")),
        "s": lambda: f("SF"), "ns": lambda: f("SF"),
        "p": lambda: f("PF"), "np": lambda: f("PF"),
        "l": lambda: e.xor(f("SF"), f("OF")), "ge": lambda: e.xor(f("SF"), f("OF")),
        "le": lambda: e.or_(f("ZF"), e.xor(f("SF"), f("OF"))),
        "g": lambda: e.or_(f("ZF"), e.xor(f("SF"), f("OF"))),
    }[cc]()
    return e.xor(base, e.c(1, "i1")) if neg else base

"""Multiply and divide: MUL IMUL (1-, 2-, 3-operand) DIV IDIV (#DE on zero divisor and overflow)."""
from . import sem
from .flagcalc import set_szp
from ..decode import Reg

EAX, EDX = 0, 2
DE = 0


def _acc_pair(e, size):
    """The (low, high) registers of a widening multiply / the dividend, by operand size."""
    if size == 1:
        return Reg(EAX, 1), Reg(EAX, 1, True)
    return Reg(EAX, size), Reg(EDX, size)


def _mul_flags(e, low, overflow):
    e.set_flag("CF", overflow)
    e.set_flag("OF", overflow)
    # SF ZF AF PF are undefined after MUL/IMUL: computed from the low half, AF cleared.
    set_szp(e, low)
    e.set_flag("AF", e.c(0, "i1"))


def _widening(signed):
    def fn(e, insn):
        (src,) = insn.ops
        size = src.size
        t, wide = f"i{size * 8}", f"i{size * 16}"
        lo_r, hi_r = _acc_pair(e, size)
        a = e.resize(e.reg(lo_r), wide, signed)
        b = e.resize(e.read(src), wide, signed)
        p = e.mul(a, b)
        low = e.trunc(p, t)
        high = e.trunc(e.lshr(p, e.c(size * 8, wide)), t)
        if signed:
            overflow = e.lazy(lambda: e.icmp("ne", e.sext(low, wide), p))
        else:
            overflow = e.lazy(lambda: e.icmp("ne", high, e.c(0, t)))
        if size == 1:
            e.set_reg(Reg(EAX, 2), e.trunc(p, "i16"))
        else:
            e.set_reg(lo_r, low)
            e.set_reg(hi_r, high)
        _mul_flags(e, low, overflow)
    return fn


sem("mul", flags_written="CF OF", undefined_flags="SF ZF AF PF")(_widening(False))
_imul1 = _widening(True)


@sem("imul", flags_written="CF OF", undefined_flags="SF ZF AF PF")
def imul(e, insn):
    if len(insn.ops) == 1:
        return _imul1(e, insn)
    dst = insn.ops[0]
    a_op, b_op = insn.ops[-2], insn.ops[-1]
    t = f"i{dst.size * 8}"
    wide = f"i{dst.size * 16}"
    a = e.sext(e.read(a_op), wide)
    b = e.sext(e.read(b_op, dst.size) if b_op.kind == "imm" else e.read(b_op), wide)
    p = e.mul(a, b)
    low = e.trunc(p, t)
    e.write(dst, low)
    _mul_flags(e, low, e.lazy(lambda: e.icmp("ne", e.sext(low, wide), p)))


def _divide(signed):
    def fn(e, insn):
        (src,) = insn.ops
        size = src.size
        t = f"i{size * 8}"
        lo_r, hi_r = _acc_pair(e, size)
        if size == 1:
            dividend = e.reg(Reg(EAX, 2))
        else:
            dt = f"i{size * 16}"
            dividend = e.or_(e.shl(e.zext(e.reg(hi_r), dt), e.c(size * 8, dt)), e.zext(e.reg(lo_r), dt))
        divisor = e.read(src)
        # Work in i64: every 8/16-bit case fits without overflow; the 32-bit INT64_MIN / -1
        # case is excluded below before LLVM's sdiv could see it.
        n = e.resize(dividend, "i64", signed)
        d = e.resize(divisor, "i64", signed)
        bad = e.icmp("eq", divisor, e.c(0, t))
        if signed and size == 4:
            bad = e.or_(bad, e.and_(e.icmp("eq", d, e.c(-1, "i64")), e.icmp("eq", n, e.c(1 << 63, "i64"))))
        e.raise_if(bad, DE)
        q = e.bin("sdiv" if signed else "udiv", n, d)
        r = e.bin("srem" if signed else "urem", n, d)
        qt = e.trunc(q, t)
        if signed:
            overflow = e.icmp("ne", e.sext(qt, "i64"), q)
        else:
            overflow = e.icmp("ne", e.lshr(q, e.c(size * 8, "i64")), e.c(0, "i64"))
        e.raise_if(overflow, DE)
        e.set_reg(lo_r, qt)
        e.set_reg(hi_r, e.trunc(r, t))
    return fn


sem("div", undefined_flags="CF PF AF ZF SF OF")(_divide(False))
sem("idiv", undefined_flags="CF PF AF ZF SF OF")(_divide(True))

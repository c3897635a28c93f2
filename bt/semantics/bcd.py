"""Decimal adjust: DAA DAS AAA AAS AAM AAD (SDM Vol. 2A pseudocode)."""
from . import sem
from .flagcalc import set_szp
from ..decode import Reg

AL, AH, AX = Reg(0, 1), Reg(0, 1, True), Reg(0, 2)
DE = 0


def _decimal_adjust(sub):
    def fn(e, insn):
        al = e.reg(AL)
        cf, af = e.flag("CF"), e.flag("AF")
        low_adj = e.or_(e.icmp("ugt", e.and_(al, e.c(0xF, "i8")), e.c(9, "i8")), af)
        six = e.c(6, "i8")
        al1 = e.select(low_adj, (e.sub if sub else e.add)(al, six), al)
        carry1 = e.icmp("ult", al, six) if sub else e.icmp("ugt", al, e.c(0xF9, "i8"))
        cf1 = e.select(low_adj, e.or_(cf, carry1), e.c(0, "i1"))
        high_adj = e.or_(e.icmp("ugt", al, e.c(0x99, "i8")), cf)
        al2 = e.select(high_adj, (e.sub if sub else e.add)(al1, e.c(0x60, "i8")), al1)
        # DAA clears CF when no high adjustment is made; DAS keeps the low-digit borrow.
        cf2 = e.select(high_adj, e.c(1, "i1"), cf1 if sub else e.c(0, "i1"))
        e.set_reg(AL, al2)
        e.set_flag("CF", cf2)
        e.set_flag("AF", low_adj)
        set_szp(e, al2)
    return fn


sem("daa", flags_read="CF AF", flags_written="CF PF AF ZF SF", undefined_flags="OF")(_decimal_adjust(False))
sem("das", flags_read="CF AF", flags_written="CF PF AF ZF SF", undefined_flags="OF")(_decimal_adjust(True))


def _ascii_adjust(sub):
    def fn(e, insn):
        al = e.reg(AL)
        adj = e.or_(e.icmp("ugt", e.and_(al, e.c(0xF, "i8")), e.c(9, "i8")), e.flag("AF"))
        ax = e.reg(AX)
        ax1 = e.select(adj, (e.sub if sub else e.add)(ax, e.c(0x106, "i16")), ax)
        ax2 = e.and_(ax1, e.c(0xFF0F, "i16"))
        e.set_reg(AX, ax2)
        e.set_flag("AF", adj)
        e.set_flag("CF", adj)
    return fn


sem("aaa", flags_read="AF", flags_written="AF CF", undefined_flags="OF SF ZF PF")(_ascii_adjust(False))
sem("aas", flags_read="AF", flags_written="AF CF", undefined_flags="OF SF ZF PF")(_ascii_adjust(True))


@sem("aam", flags_written="SF ZF PF", undefined_flags="OF AF CF")
def aam(e, insn):
    base = e.c(insn.ops[0].imm if insn.ops else 10, "i8")
    if (insn.ops[0].imm if insn.ops else 10) & 0xFF == 0:
        return e.raise_now(DE)
    al = e.reg(AL)
    q, r = e.bin("udiv", al, base), e.bin("urem", al, base)
    e.set_reg(AX, e.or_(e.shl(e.zext(q, "i16"), e.c(8, "i16")), e.zext(r, "i16")))
    set_szp(e, r)


@sem("aad", flags_written="SF ZF PF", undefined_flags="OF AF CF")
def aad(e, insn):
    base = e.c(insn.ops[0].imm if insn.ops else 10, "i8")
    al = e.add(e.reg(AL), e.mul(e.reg(AH), base))
    e.set_reg(AX, e.zext(al, "i16"))
    set_szp(e, al)

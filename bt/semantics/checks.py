"""Checking instructions: BOUND (#BR when out of bounds) and ARPL (adjust a selector's RPL)."""
from . import sem

BR = 5


@sem("bound")
def bound(e, insn):
    idx, m = insn.ops
    if m.kind != "mem":
        return e.raise_now(6)
    size = idx.size
    t = f"i{size * 8}"
    addr = e.mem_addr(m.mem)
    lo = e.load(addr, size)
    hi = e.load(e.lin_add(addr, size), size)
    v = e.read(idx)
    e.raise_if(e.or_(e.icmp("slt", v, lo), e.icmp("sgt", v, hi)), BR)
    assert v.t == t


@sem("arpl", flags_written="ZF")
def arpl(e, insn):
    dst, src = insn.ops
    addr = e.mem_addr(dst.mem) if dst.kind == "mem" else None
    d = e.load(addr, 2) if addr is not None else e.read(dst)
    s = e.resize(e.read(src), "i16")
    lower = e.icmp("ult", e.and_(d, e.c(3, "i16")), e.and_(s, e.c(3, "i16")))
    new = e.select(lower, e.or_(e.and_(d, e.c(0xFFFC, "i16")), e.and_(s, e.c(3, "i16"))), d)
    e.write(dst, new, addr)
    e.set_flag("ZF", lower)

"""Shifts and rotates: SHL/SAL SHR SAR ROL ROR RCL RCR SHLD SHRD.

Counts are masked to 5 bits; a masked count of 0 changes neither the
destination nor any flag (SDM Vol. 2B, SAL/SAR/SHL/SHR and RCL/RCR/ROL/ROR).
The work is done in i64 so that no LLVM shift ever reaches its bit width.
"""
from . import sem
from .flagcalc import parity

FLAGS = "CF PF AF ZF SF OF"


def _setup(e, insn):
    dst = insn.ops[0]
    addr = e.mem_addr(dst.mem) if dst.kind == "mem" else None
    a = e.load(addr, dst.size) if addr is not None else e.read(dst)
    cop = insn.ops[-1] if len(insn.ops) > 1 else None
    cnt = e.c(1, "i8") if cop is None else e.resize(e.read(cop), "i8")
    cnt = e.and_(cnt, e.c(0x1F, "i8"))
    return dst, addr, a, cnt


def _commit(e, dst, addr, a, res, cnt, flags):
    """Write res and flags, or keep everything when the masked count is 0."""
    nz = e.icmp("ne", cnt, e.c(0, "i8"))
    e.write(dst, e.select(nz, res, a), addr)
    for name, v in flags.items():
        e.set_flag(name, e.lazy(lambda v=v, old=e.flag(name): e.select(nz, v, old)))


def _szp(e, res):
    return {"ZF": e.lazy(lambda: e.icmp("eq", res, e.c(0, res.t))), "SF": e.lazy(lambda: e.msb(res)),
            "PF": e.lazy(lambda: parity(e, res))}


def _shift(kind):
    def fn(e, insn):
        dst, addr, a, cnt = _setup(e, insn)
        n = dst.size * 8
        c64 = e.zext(cnt, "i64")
        if kind == "shl":
            w = e.shl(e.zext(a, "i64"), c64)
            res = e.trunc(w, a.t)
            cf = e.lazy(lambda: e.bit(w, n))
            of = e.lazy(lambda: e.xor(e.msb(res), cf))
        else:
            w = e.resize(a, "i64", signed=kind == "sar")
            shifted = (e.ashr if kind == "sar" else e.lshr)(w, c64)
            res = e.trunc(shifted, a.t)
            cf = e.lazy(lambda: e.trunc(e.lshr(w, e.and_(e.sub(c64, e.c(1, "i64")), e.c(63, "i64"))), "i1"))
            of = e.lazy(lambda: e.msb(a)) if kind == "shr" else e.c(0, "i1")
        flags = {"CF": cf, "OF": of, "AF": e.c(0, "i1")}
        flags.update(_szp(e, res))
        _commit(e, dst, addr, a, res, cnt, flags)
    return fn


for _m in ("shl", "sal"):
    sem(_m, flags_written=FLAGS, undefined_flags="AF")(_shift("shl"))
sem("shr", flags_written=FLAGS, undefined_flags="AF")(_shift("shr"))
sem("sar", flags_written=FLAGS, undefined_flags="AF")(_shift("sar"))


def _rotate(left):
    def fn(e, insn):
        dst, addr, a, cnt = _setup(e, insn)
        n = dst.size * 8
        r = e.zext(e.bin("urem", cnt, e.c(n, "i8")), "i64") if n < 32 else e.zext(cnt, "i64")
        w = e.zext(a, "i64")
        back = e.sub(e.c(n, "i64"), r)
        if left:
            v = e.or_(e.shl(w, r), e.lshr(w, back))
        else:
            v = e.or_(e.lshr(w, r), e.shl(w, back))
        res = e.trunc(v, a.t)
        if left:
            cf = e.trunc(res, "i1")
            of = e.xor(e.msb(res), cf)
        else:
            cf = e.msb(res)
            of = e.xor(e.msb(res), e.bit(res, n - 2))
        _commit(e, dst, addr, a, res, cnt, {"CF": cf, "OF": of})
    return fn


sem("rol", flags_written="CF OF")(_rotate(True))
sem("ror", flags_written="CF OF")(_rotate(False))


def _rotate_carry(left):
    def fn(e, insn):
        dst, addr, a, cnt = _setup(e, insn)
        n = dst.size * 8
        r = e.zext(e.bin("urem", cnt, e.c(n + 1, "i8")), "i64") if n < 32 else e.zext(cnt, "i64")
        cin = e.flag("CF")
        v = e.or_(e.zext(a, "i64"), e.shl(e.zext(cin, "i64"), e.c(n, "i64")))
        back = e.sub(e.c(n + 1, "i64"), r)
        if left:
            rot = e.or_(e.shl(v, r), e.lshr(v, back))
        else:
            rot = e.or_(e.lshr(v, r), e.shl(v, back))
        res = e.trunc(rot, a.t)
        cf = e.bit(rot, n)
        if left:
            of = e.xor(e.msb(res), cf)
        else:
            of = e.xor(e.msb(a), cin)
        _commit(e, dst, addr, a, res, cnt, {"CF": cf, "OF": of})
    return fn


sem("rcl", flags_read="CF", flags_written="CF OF")(_rotate_carry(True))
sem("rcr", flags_read="CF", flags_written="CF OF")(_rotate_carry(False))


def _double(left):
    def fn(e, insn):
        dst, addr, a, cnt = _setup(e, insn)
        n = dst.size * 8
        b = e.read(insn.ops[1])
        c64 = e.zext(cnt, "i64")
        if left:
            v = e.or_(e.shl(e.zext(a, "i64"), e.c(n, "i64")), e.zext(b, "i64"))
            res = e.trunc(e.lshr(e.shl(v, c64), e.c(n, "i64")), a.t)
            cf = e.trunc(e.lshr(v, e.and_(e.sub(e.c(2 * n, "i64"), c64), e.c(63, "i64"))), "i1")
        else:
            v = e.or_(e.shl(e.zext(b, "i64"), e.c(n, "i64")), e.zext(a, "i64"))
            res = e.trunc(e.lshr(v, c64), a.t)
            cf = e.trunc(e.lshr(v, e.and_(e.sub(c64, e.c(1, "i64")), e.c(63, "i64"))), "i1")
        flags = {"CF": cf, "OF": e.xor(e.msb(res), e.msb(a)), "AF": e.c(0, "i1")}
        flags.update(_szp(e, res))
        _commit(e, dst, addr, a, res, cnt, flags)
    return fn


sem("shld", flags_written=FLAGS, undefined_flags="AF")(_double(True))
sem("shrd", flags_written=FLAGS, undefined_flags="AF")(_double(False))

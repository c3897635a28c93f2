"""Bit tests and scans: BT BTS BTR BTC (register and memory bit-string forms), BSF BSR."""
from . import sem


def _bit_test(update):
    def fn(e, insn):
        dst, src = insn.ops
        n = dst.size * 8
        t = f"i{n}"
        if dst.kind == "mem" and src.kind != "imm":
            # Bit-string form: the signed offset selects an operand-sized word away from the base.
            off = e.sext(e.read(src), "i32")
            log = {16: 4, 32: 5}[n]
            word = e.ashr(off, e.c(log))
            addr = e.lin_add(e.mem_addr(dst.mem), e.mul(word, e.c(n // 8)))
            bitpos = e.and_(e.trunc(off, t), e.c(n - 1, t))
        else:
            addr = e.mem_addr(dst.mem) if dst.kind == "mem" else None
            bitpos = e.and_(e.resize(e.read(src), t), e.c(n - 1, t))
        v = e.load(addr, dst.size) if addr is not None else e.read(dst)
        mask = e.shl(e.c(1, t), bitpos)
        e.set_flag("CF", e.lazy(lambda: e.icmp("ne", e.and_(v, mask), e.c(0, t))))
        if update:
            e.write(dst, update(e, v, mask), addr)
    return fn


_BT_META = dict(flags_written="CF", undefined_flags="OF SF AF PF")
sem("bt", **_BT_META)(_bit_test(None))
sem("bts", lockable=True, **_BT_META)(_bit_test(lambda e, v, m: e.or_(v, m)))
sem("btr", lockable=True, **_BT_META)(_bit_test(lambda e, v, m: e.and_(v, e.not_(m))))
sem("btc", lockable=True, **_BT_META)(_bit_test(lambda e, v, m: e.xor(v, m)))


def _scan(reverse):
    def fn(e, insn):
        dst, src = insn.ops
        v = e.read(src)
        n = dst.size * 8
        zero = e.icmp("eq", v, e.c(0, v.t))
        if reverse:
            lz = e.intrinsic(f"llvm.ctlz.i{n}", v.t, [v, e.c(0, "i1")])
            idx = e.sub(e.c(n - 1, v.t), lz)
        else:
            idx = e.intrinsic(f"llvm.cttz.i{n}", v.t, [v, e.c(0, "i1")])
        # A zero source leaves the destination unchanged (what AMD documents and Intel CPUs do).
        e.write(dst, e.select(zero, e.read(dst), idx))
        e.set_flag("ZF", zero)
    return fn


_SCAN_META = dict(flags_written="ZF", undefined_flags="CF OF SF AF PF")
sem("bsf", **_SCAN_META)(_scan(False))
sem("bsr", **_SCAN_META)(_scan(True))


# TZCNT/LZCNT (F3 0F BC/BD) execute as BSF/BSR on a CPU without BMI1/LZCNT, which is
# the CPU btvm's CPUID reports: glibc's string functions rely on that.
sem("tzcnt", **_SCAN_META)(_scan(False))
sem("lzcnt", **_SCAN_META)(_scan(True))

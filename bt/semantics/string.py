"""String instructions: MOVS CMPS SCAS LODS STOS (byte/word/dword) with REP, REPE, REPNE and DF.

Without a REP prefix an instruction is one iteration in SSA like any other.
With one, the iteration runs in a loop whose registers live in the CPU state,
so that a fault, an exhausted budget or self-modifying code can leave between
any two iterations with ECX/ESI/EDI exact (REP is interruptible, SDM Vol. 2B REP).
"""
from . import sem
from .flagcalc import sub_flags
from .. import state as S
from ..decode import Reg

EAX, ECX, ESI, EDI = 0, 1, 6, 7


def _index(e, insn, i):
    return Reg(i, 2 if insn.addrsize == 2 else 4)


def _advance(e, insn, i, size):
    r = _index(e, insn, i)
    t = f"i{r.width * 8}"
    delta = e.select(e.flag("DF"), e.c(-size, t), e.c(size, t))
    e.set_reg(r, e.add(e.reg(r), delta))


def _addr(e, insn, i, seg):
    return e.linear(seg, e.zext(e.reg(_index(e, insn, i)), "i32"))


def _src(e, insn):
    seg = insn.seg_override if insn.seg_override is not None else S.DS
    return _addr(e, insn, ESI, seg)


def _dst(e, insn):
    return _addr(e, insn, EDI, S.ES)   # ES cannot be overridden


def _size(insn):
    return {"b": 1, "w": 2, "d": 4}[insn.mnemonic[-1]]


def movs(e, insn, size):
    e.store(_dst(e, insn), e.load(_src(e, insn), size))
    _advance(e, insn, ESI, size)
    _advance(e, insn, EDI, size)


def cmps(e, insn, size):
    a = e.load(_src(e, insn), size)
    b = e.load(_dst(e, insn), size)
    sub_flags(e, a, b, e.sub(a, b))
    _advance(e, insn, ESI, size)
    _advance(e, insn, EDI, size)


def scas(e, insn, size):
    a = e.reg(Reg(EAX, size))
    b = e.load(_dst(e, insn), size)
    sub_flags(e, a, b, e.sub(a, b))
    _advance(e, insn, EDI, size)


def lods(e, insn, size):
    e.set_reg(Reg(EAX, size), e.load(_src(e, insn), size))
    _advance(e, insn, ESI, size)


def stos(e, insn, size):
    e.store(_dst(e, insn), e.reg(Reg(EAX, size)))
    _advance(e, insn, EDI, size)


def _rep_loop(e, insn, body, size, tests_zf):
    k_left = e.left(after=True)
    e.flush()
    pre = e.label           # after the flush: folding in lazy flags may have started a new label
    header, done = e.new_label("rep"), e.new_label("repdone")
    e.br(header)
    e.set_label(header)
    back = e.new_label("repback")
    first = e.phi("i1", [(e.c(1, "i1"), pre), (e.c(0, "i1"), back)])
    e.reload()
    e.take_snapshot()
    r = _index(e, insn, ECX)
    cnt = e.reg(r)
    test_budget, body_l = e.new_label("repb"), e.new_label("repbody")
    e.cbr(e.icmp("eq", cnt, e.c(0, cnt.t)), done, test_budget)
    e.set_label(test_budget)
    budget = e.load_field(S.offset("budget"), "i64")
    out_of_budget = e.and_(e.xor(first, e.c(1, "i1")), e.icmp("sle", budget, e.c(0, "i64")))
    exhausted, charge = e.new_label("repx"), e.new_label("repc")
    e.cbr(out_of_budget, exhausted, charge)
    e.set_label(exhausted)
    e.exit_code(S.EXIT_BUDGET, e.c(insn.addr), refund=k_left)
    e.set_label(charge)
    e.store_field(S.offset("budget"), e.select(first, budget, e.sub(budget, e.c(1, "i64"))))
    e.br(body_l)
    e.set_label(body_l)
    body(e, insn, size)
    cnt = e.sub(e.reg(r), e.c(1, cnt.t))
    e.set_reg(r, cnt)
    cont = e.icmp("ne", cnt, e.c(0, cnt.t))
    if tests_zf:
        zf = e.flag("ZF")
        cont = e.and_(cont, zf if insn.rep == 0xF3 else e.xor(zf, e.c(1, "i1")))
    smc = e.stores_hit_code()
    e.flush()
    smc_l, go = e.new_label("repsmc"), e.new_label("repgo")
    e.cbr(smc, smc_l, go)
    e.set_label(smc_l)
    e.exit_code(S.EXIT_SMC, e.select(cont, e.c(insn.addr), e.c(insn.next)), refund=k_left)
    e.set_label(go)
    e.br(back)
    e.set_label(back)
    e.cbr(cont, header, done)
    e.set_label(done)
    e.reload()
    e.take_snapshot()
    e.smc = None


def _string(body, tests_zf=False):
    def fn(e, insn):
        if any(o.kind == "other" for o in insn.ops):
            from . import Unsupported
            raise Unsupported(f"'{insn.text()}' (SSE form) at {insn.addr:#x}")
        size = _size(insn)
        if insn.rep:
            _rep_loop(e, insn, body, size, tests_zf)
        else:
            body(e, insn, size)
    return fn


for _w in "bwd":
    sem("movs" + _w, resumable=True)(_string(movs))
    sem("cmps" + _w, resumable=True, flags_written="CF PF AF ZF SF OF")(_string(cmps, True))
    sem("scas" + _w, resumable=True, flags_written="CF PF AF ZF SF OF")(_string(scas, True))
    sem("lods" + _w, resumable=True)(_string(lods))
    sem("stos" + _w, resumable=True)(_string(stos))

"""Integer arithmetic and logic: ADD ADC SUB SBB CMP AND OR XOR TEST INC DEC NEG NOT."""
from . import sem
from .flagcalc import add_flags, sub_flags, logic_flags, set_szp, aux

ALL6 = "CF PF AF ZF SF OF"


def _operands(e, insn):
    """Read dst and src (src sign-extended immediates are already sized by Capstone)."""
    dst, src = insn.ops
    addr = e.mem_addr(dst.mem) if dst.kind == "mem" else None
    a = e.load(addr, dst.size) if addr is not None else e.read(dst)
    b = e.read(src, dst.size) if src.kind == "imm" else e.resize(e.read(src), a.t)
    return dst, addr, a, b


def _binary(compute, flags, writes=True):
    def fn(e, insn):
        dst, addr, a, b = _operands(e, insn)
        res = compute(e, a, b)
        if writes:
            e.write(dst, res, addr)
        flags(e, a, b, res)
    return fn


def _carry_in(e, t):
    return e.zext(e.flag("CF"), t)


sem("add", lockable=True, flags_written=ALL6)(
    _binary(lambda e, a, b: e.add(a, b), lambda e, a, b, r: add_flags(e, a, b, r)))
sem("sub", lockable=True, flags_written=ALL6)(
    _binary(lambda e, a, b: e.sub(a, b), lambda e, a, b, r: sub_flags(e, a, b, r)))
sem("cmp", flags_written=ALL6)(
    _binary(lambda e, a, b: e.sub(a, b), lambda e, a, b, r: sub_flags(e, a, b, r), writes=False))


@sem("adc", lockable=True, flags_read="CF", flags_written=ALL6)
def adc(e, insn):
    dst, addr, a, b = _operands(e, insn)
    cin = e.flag("CF")
    res = e.add(e.add(a, b), e.zext(cin, a.t))
    e.write(dst, res, addr)
    add_flags(e, a, b, res, cin)


@sem("sbb", lockable=True, flags_read="CF", flags_written=ALL6)
def sbb(e, insn):
    dst, addr, a, b = _operands(e, insn)
    cin = e.flag("CF")
    res = e.sub(e.sub(a, b), e.zext(cin, a.t))
    e.write(dst, res, addr)
    sub_flags(e, a, b, res, cin)


for _name, _op in (("and", "and_"), ("or", "or_"), ("xor", "xor")):
    sem(_name, lockable=True, flags_written=ALL6, undefined_flags="AF")(
        _binary(lambda e, a, b, _op=_op: getattr(e, _op)(a, b), lambda e, a, b, r: logic_flags(e, r)))
sem("test", flags_written=ALL6, undefined_flags="AF")(
    _binary(lambda e, a, b: e.and_(a, b), lambda e, a, b, r: logic_flags(e, r), writes=False))


def _unary(compute, flags):
    def fn(e, insn):
        (dst,) = insn.ops
        addr = e.mem_addr(dst.mem) if dst.kind == "mem" else None
        a = e.load(addr, dst.size) if addr is not None else e.read(dst)
        res = compute(e, a)
        e.write(dst, res, addr)
        if flags:
            flags(e, a, res)
    return fn


def _incdec_flags(sub):
    def flags(e, a, res):
        one = e.c(1, a.t)
        cf = e.flag("CF")       # INC/DEC leave CF alone
        (sub_flags if sub else add_flags)(e, a, one, res)
        e.set_flag("CF", cf)
        # Lazily: the operation's flags with CF from cc_b (bt.lazyflags).
        e.note_cc("dec" if sub else "inc", a, e.lazy(lambda: e.zext(cf, a.t), a.t), res)
    return flags


sem("inc", lockable=True, flags_written="PF AF ZF SF OF")(
    _unary(lambda e, a: e.add(a, e.c(1, a.t)), _incdec_flags(False)))
sem("dec", lockable=True, flags_written="PF AF ZF SF OF")(
    _unary(lambda e, a: e.sub(a, e.c(1, a.t)), _incdec_flags(True)))
sem("not", lockable=True)(_unary(lambda e, a: e.not_(a), None))


def _neg_flags(e, a, res):
    zero = e.c(0, a.t)
    sub_flags(e, zero, a, res)


sem("neg", lockable=True, flags_written=ALL6)(_unary(lambda e, a: e.sub(e.c(0, a.t), a), _neg_flags))

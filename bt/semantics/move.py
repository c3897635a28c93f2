"""Data movement: MOV MOVZX MOVSX LEA XCHG CMPXCHG CMPXCHG8B XADD BSWAP PUSH POP PUSHA POPA
ENTER LEAVE CBW CWDE CWD CDQ CMOVcc SETcc LAHF SAHF XLAT."""
from . import sem
from .flagcalc import CONDITIONS, condition, sub_flags, add_flags
from .. import state as S
from ..decode import Reg

EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI = range(8)


def _dst_addr(e, op):
    return e.mem_addr(op.mem) if op.kind == "mem" else None


@sem("mov")
def mov(e, insn):
    dst, src = insn.ops
    if dst.kind in ("seg", "other") or src.kind == "other":
        from .system import mov_special
        return mov_special(e, insn)
    e.write(dst, e.resize(e.read(src), f"i{dst.size * 8}"))


def _extend(signed):
    def fn(e, insn):
        dst, src = insn.ops
        e.write(dst, e.resize(e.read(src), f"i{dst.size * 8}", signed))
    return fn


sem("movzx")(_extend(False))
sem("movsx")(_extend(True))


@sem("lea")
def lea(e, insn):
    dst, src = insn.ops
    e.write(dst, e.resize(e.ea(src.mem), f"i{dst.size * 8}"))


@sem("xchg", lockable=True)
def xchg(e, insn):
    a, b = insn.ops
    if a.kind == "reg" and b.kind == "mem":
        a, b = b, a
    addr = _dst_addr(e, a)
    va = e.load(addr, a.size) if addr is not None else e.read(a)
    vb = e.read(b)
    e.write(a, vb, addr)
    e.write(b, va)


@sem("cmpxchg", lockable=True, flags_written="CF PF AF ZF SF OF")
def cmpxchg(e, insn):
    dst, src = insn.ops
    acc = Reg(EAX, dst.size)
    addr = _dst_addr(e, dst)
    old = e.load(addr, dst.size) if addr is not None else e.read(dst)
    a = e.reg(acc)
    new = e.read(src)
    eq = e.icmp("eq", a, old)
    # Memory is always written (the old value when the compare fails), as on hardware.
    # The accumulator is written only when the compare fails; DEST last, so that
    # CMPXCHG EAX, r with equal values leaves EAX = r (SDM CMPXCHG).
    e.set_reg(acc, e.select(eq, a, old))
    e.write(dst, e.select(eq, new, old), addr)
    sub_flags(e, a, old, e.sub(a, old))


@sem("cmpxchg8b", lockable=True, flags_written="ZF")
def cmpxchg8b(e, insn):
    (dst,) = insn.ops
    if dst.kind != "mem":
        return e.raise_now(6)
    addr = e.mem_addr(dst.mem)
    old = e.load(addr, 8)
    edx_eax = e.or_(e.shl(e.zext(e.reg32(EDX), "i64"), e.c(32, "i64")), e.zext(e.reg32(EAX), "i64"))
    ecx_ebx = e.or_(e.shl(e.zext(e.reg32(ECX), "i64"), e.c(32, "i64")), e.zext(e.reg32(EBX), "i64"))
    eq = e.icmp("eq", edx_eax, old)
    e.store(addr, e.select(eq, ecx_ebx, old))
    e.set_reg32(EAX, e.select(eq, e.reg32(EAX), e.trunc(old, "i32")))
    e.set_reg32(EDX, e.select(eq, e.reg32(EDX), e.trunc(e.lshr(old, e.c(32, "i64")), "i32")))
    e.set_flag("ZF", eq)


@sem("xadd", lockable=True, flags_written="CF PF AF ZF SF OF")
def xadd(e, insn):
    dst, src = insn.ops
    addr = _dst_addr(e, dst)
    d = e.load(addr, dst.size) if addr is not None else e.read(dst)
    s = e.read(src)
    res = e.add(d, s)
    e.write(src, d)
    e.write(dst, res, addr)
    add_flags(e, d, s, res)


@sem("bswap")
def bswap(e, insn):
    (r,) = insn.ops
    v = e.read(r)
    if v.t == "i32":
        v = e.intrinsic("llvm.bswap.i32", "i32", [v])
    else:
        v = e.c(0, v.t)   # BSWAP r16 is undefined; hardware (and QEMU) give 0
    e.write(r, v)


# ---- stack ----------------------------------------------------------------
@sem("push")
def push(e, insn):
    (src,) = insn.ops
    size = insn.opsize if src.kind in ("imm", "seg") else src.size
    e.push(e.resize(e.read(src), f"i{size * 8}", signed=src.kind == "imm"))


@sem("pop")
def pop(e, insn):
    (dst,) = insn.ops
    if dst.kind == "seg":
        from .system import pop_seg
        return pop_seg(e, insn)
    v, new_esp = e.pop(dst.size)
    if dst.kind == "mem":
        # The destination address is computed with ESP already incremented (SDM POP).
        saved = e.regs[ESP]
        e.regs[ESP] = new_esp
        addr = e.mem_addr(dst.mem)
        e.regs[ESP] = saved
        e.store(addr, v)
        e.set_reg32(ESP, new_esp)
    else:
        e.set_reg32(ESP, new_esp)
        e.write(dst, v)


def _pusha(size):
    def fn(e, insn):
        t = f"i{size * 8}"
        esp = e.reg32(ESP)
        e.probe_write(e.linear(S.SS, e.sub(esp, e.c(8 * size))), 8 * size)
        vals = [e.resize(e.reg32(i), t) for i in range(8)]
        for i, v in enumerate(vals):
            e.store(e.linear(S.SS, e.sub(esp, e.c((i + 1) * size))), v)
        e.set_reg32(ESP, e.sub(esp, e.c(8 * size)))
    return fn


def _popa(size):
    def fn(e, insn):
        esp = e.reg32(ESP)
        vals = [e.load(e.linear(S.SS, e.add(esp, e.c(i * size))), size) for i in range(8)]
        for i, v in zip((EDI, ESI, EBP, None, EBX, EDX, ECX, EAX), vals):
            if i is not None:
                e.set_reg(Reg(i, size), v)
        e.set_reg32(ESP, e.add(esp, e.c(8 * size)))
    return fn


sem("pushal")(_pusha(4))
sem("pushaw")(_pusha(2))
sem("popal")(_popa(4))
sem("popaw")(_popa(2))


@sem("enter")
def enter(e, insn):
    size_op, level_op = insn.ops
    size, level = size_op.imm & 0xFFFF, level_op.imm & 31
    w = insn.opsize
    t = f"i{w * 8}"
    ebp = e.reg32(EBP)
    e.push(e.resize(ebp, t))
    frame = e.reg32(ESP)
    for _ in range(1, level):
        ebp = e.sub(ebp, e.c(w))
        e.push(e.load(e.linear(S.SS, ebp), w))
    if level:
        e.push(e.resize(frame, t))
    e.set_reg(Reg(EBP, w), e.resize(frame, t))
    e.set_reg32(ESP, e.sub(e.reg32(ESP), e.c(size)))


@sem("leave")
def leave(e, insn):
    w = insn.opsize
    esp = e.reg32(EBP)
    v = e.load(e.linear(S.SS, esp), w)
    e.set_reg32(ESP, e.add(esp, e.c(w)))
    e.set_reg(Reg(EBP, w), v)


# ---- widening ---------------------------------------------------------------
@sem("cbw")
def cbw(e, insn):
    e.set_reg(Reg(EAX, 2), e.sext(e.reg(Reg(EAX, 1)), "i16"))


@sem("cwde")
def cwde(e, insn):
    e.set_reg32(EAX, e.sext(e.reg(Reg(EAX, 2)), "i32"))


@sem("cwd")
def cwd(e, insn):
    e.set_reg(Reg(EDX, 2), e.ashr(e.reg(Reg(EAX, 2)), e.c(15, "i16")))


@sem("cdq")
def cdq(e, insn):
    e.set_reg32(EDX, e.ashr(e.reg32(EAX), e.c(31)))


# ---- conditional moves and sets -----------------------------------------------
def _cmov(cc):
    def fn(e, insn):
        dst, src = insn.ops
        v = e.read(src)          # the source is read (and may fault) even when false
        e.write(dst, e.select(condition(e, cc), v, e.read(dst)))
    return fn


def _setcc(cc):
    def fn(e, insn):
        (dst,) = insn.ops
        e.write(dst, e.zext(condition(e, cc), "i8"))
    return fn


for _cc in CONDITIONS:
    _flags = "CF PF AF ZF SF OF"
    sem("cmov" + _cc, flags_read=_flags)(_cmov(_cc))
    sem("set" + _cc, flags_read=_flags)(_setcc(_cc))


# ---- flags to and from AH ------------------------------------------------------
_AH_FLAGS = (("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7))


@sem("lahf", flags_read="CF PF AF ZF SF")
def lahf(e, insn):
    v = e.c(2, "i8")
    for f, b in _AH_FLAGS:
        v = e.or_(v, e.shl(e.zext(e.flag(f), "i8"), e.c(b, "i8")))
    e.set_reg(Reg(EAX, 1, True), v)


@sem("sahf", flags_written="CF PF AF ZF SF")
def sahf(e, insn):
    ah = e.reg(Reg(EAX, 1, True))
    for f, b in _AH_FLAGS:
        e.set_flag(f, e.bit(ah, b))


@sem("xlatb")
def xlat(e, insn):
    al = e.reg(Reg(EAX, 1))
    seg = insn.seg_override if insn.seg_override is not None else S.DS
    if insn.addrsize == 2:
        off = e.zext(e.add(e.reg(Reg(EBX, 2)), e.zext(al, "i16")), "i32")
    else:
        off = e.add(e.reg32(EBX), e.zext(al, "i32"))
    e.set_reg(Reg(EAX, 1), e.load(e.linear(seg, off), 1))

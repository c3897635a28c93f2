"""Control transfer: JMP Jcc CALL RET LOOP/LOOPE/LOOPNE JECXZ/JCXZ (near forms).

Far transfers (ljmp, lcall, retf) are sensitive and live in system.py.
"""
from . import sem
from .flagcalc import CONDITIONS, condition
from ..decode import Reg
from ..emit import Hole

ESP, ECX = 4, 1


def _target_value(e, insn, op):
    """Destination of an indirect transfer, zero-extended to 32 bits."""
    return e.zext(e.read(op), "i32")


def _direct(insn, op):
    if type(op.imm) is Hole and insn.opsize == 4:
        return op.imm           # a stencil's target hole: bt.stencil patches it with the 32-bit target
    target = op.imm & 0xFFFFFFFF
    return target & 0xFFFF if insn.opsize == 2 else target


_PREFIXES = frozenset((0x66, 0x67, 0xF0, 0xF2, 0xF3, 0x26, 0x2E, 0x36, 0x3E, 0x64, 0x65))


def _modrm_reg(insn):
    """The ModRM reg field of an FF-group instruction (Capstone's operand size for the far
    forms is unreliable: 6 for JMP m16:32 but 4 for CALL m16:32)."""
    raw = insn.raw
    i = 0
    while i < len(raw) and raw[i] in _PREFIXES:
        i += 1
    if i + 1 < len(raw) and raw[i] == 0xFF:
        return (raw[i + 1] >> 3) & 7
    return None


def _far_indirect(e, insn, op):
    """JMP/CALL m16:32 (FF /5, FF /3): a far transfer, handled by the VMM."""
    if op.kind == "mem" and _modrm_reg(insn) in (3, 5):
        from ..sensitive import callout_id
        e.callout(callout_id("farjump"))
        return True
    return False


@sem("jmp", ends_block=True)
def jmp(e, insn):
    (op,) = insn.ops
    if _far_indirect(e, insn, op):
        return
    if op.kind == "imm":
        e.exit_direct(_direct(insn, op))
    else:
        e.exit_indirect(_target_value(e, insn, op))


def _jcc(cc):
    def fn(e, insn):
        e.branch(condition(e, cc), _direct(insn, insn.ops[0]), insn.next)
    return fn


for _cc in CONDITIONS:
    sem("j" + _cc, ends_block=True, flags_read="CF PF AF ZF SF OF")(_jcc(_cc))


@sem("call", ends_block=True)
def call(e, insn):
    (op,) = insn.ops
    if _far_indirect(e, insn, op):
        return
    ret = e.c(insn.next, f"i{insn.opsize * 8}")
    if op.kind == "imm":
        e.push(ret)
        e.exit_direct(_direct(insn, op))
    else:
        target = _target_value(e, insn, op)     # read (and fault) before the push
        e.push(ret)
        e.exit_indirect(target)


@sem("ret", ends_block=True)
def ret(e, insn):
    w = insn.opsize
    target, esp = e.pop(w)
    if insn.ops:
        esp = e.add(esp, e.c(insn.ops[0].imm & 0xFFFF))
    e.set_reg32(ESP, esp)
    e.exit_indirect(e.zext(target, "i32"))


def _counter(insn):
    return Reg(ECX, 2 if insn.addrsize == 2 else 4)


def _loop(extra):
    def fn(e, insn):
        r = _counter(insn)
        cnt = e.sub(e.reg(r), e.c(1, f"i{r.width * 8}"))
        e.set_reg(r, cnt)
        cond = e.icmp("ne", cnt, e.c(0, cnt.t))
        if extra == "e":
            cond = e.and_(cond, e.flag("ZF"))
        elif extra == "ne":
            cond = e.and_(cond, e.xor(e.flag("ZF"), e.c(1, "i1")))
        e.branch(cond, _direct(insn, insn.ops[0]), insn.next)
    return fn


sem("loop", ends_block=True)(_loop(""))
sem("loope", ends_block=True, flags_read="ZF")(_loop("e"))
sem("loopne", ends_block=True, flags_read="ZF")(_loop("ne"))


def _jcxz(e, insn):
    r = _counter(insn)
    v = e.reg(r)
    e.branch(e.icmp("eq", v, e.c(0, v.t)), _direct(insn, insn.ops[0]), insn.next)


sem("jecxz", ends_block=True)(_jcxz)
sem("jcxz", ends_block=True)(_jcxz)

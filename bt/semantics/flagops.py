"""Flag instructions: CLC STC CMC CLD STD, PUSHF/POPF, and the NOP forms."""
from . import sem
from .. import state as S

ESP = 4


def _set(flag, value):
    def fn(e, insn):
        e.set_flag(flag, e.c(value, "i1") if value is not None else e.xor(e.flag(flag), e.c(1, "i1")))
    return fn


sem("clc", flags_written="CF")(_set("CF", 0))
sem("stc", flags_written="CF")(_set("CF", 1))
sem("cmc", flags_read="CF", flags_written="CF")(_set("CF", None))
sem("cld", flags_written="DF")(_set("DF", 0))
sem("std", flags_written="DF")(_set("DF", 1))


@sem("nop")
def nop(e, insn):
    pass


sem("pause")(nop)
sem("endbr32")(nop)   # a hint NOP on CPUs without CET (Debian's glibc starts functions with it)
sem("rdsspd")(nop)    # also a NOP without CET (the register keeps 0): libgcc's unwinder probes the shadow stack


def eflags_value(e):
    """The architectural EFLAGS image of the current SSA flags."""
    v = e.eflags_other
    for f, b in S.FLAG_BIT.items():
        v = e.or_(v, e.shl(e.zext(e.flag(f), "i32"), e.c(b)))
    return v


def _pushf(e, insn):
    v = e.and_(eflags_value(e), e.c(~((1 << S.VM) | (1 << S.RF))))
    e.push(e.resize(v, f"i{insn.opsize * 8}"))


def popf_mask(key, opsize):
    """EFLAGS bits POPF may change at the key's CPL and IOPL (SDM Vol. 2B, POPF); IRET to the
    same or an outer ring loads the same ones (SDM IRET, protected mode, no VM86)."""
    mask = S.STATUS_MASK | (1 << S.DF) | (1 << S.TF) | (1 << S.NT) | (1 << S.AC) | (1 << S.ID)
    cpl, iopl = S.key_cpl(key), S.key_iopl(key)
    if cpl <= iopl:
        mask |= 1 << S.IF
    if cpl == 0:
        mask |= 3 << S.IOPL_SHIFT
    return mask & (0xFFFF if opsize == 2 else 0xFFFFFFFF)


def _popf(e, insn):
    w = insn.opsize
    v, esp = e.pop(w)
    v = e.zext(v, "i32")
    mask = popf_mask(e.key, w)
    old = eflags_value(e)
    new = e.or_(e.and_(v, e.c(mask)), e.and_(old, e.c(~mask)))
    e.set_reg32(ESP, esp)
    set_eflags_value(e, new)
    return new, old


def let_in(e, new, old):
    """Nonzero (i32) if EFLAGS going from old to new sets IF while the machine has an interrupt
    waiting (state.irq_pending is 1 << IF then): the block must leave for it to be taken."""
    return e.and_(e.and_(new, e.xor(old, e.c(0xFFFFFFFF))), e.load_field(S.offset("irq_pending"), "i32"))


def set_eflags_value(e, new):
    """Make the i32 new the architectural EFLAGS (RF cleared: POPF and IRET do not load it)."""
    for f, b in S.FLAG_BIT.items():
        e.set_flag(f, e.bit(new, b))
    keep = S.STATUS_MASK | (1 << S.DF)
    e.set_eflags_other(e.or_(e.and_(new, e.c(~keep & ~(1 << S.RF))), e.c(S.EFLAGS_FIXED1)))


def _system_mode(e):
    return bool(e.key & S.KEY_PE) and S.key_cpl(e.key) < 3


@sem("pushfd", callout="pushf", flags_read="CF PF AF ZF SF OF", why="reads IF/IOPL: sensitive when the VMM virtualizes them",
     does="translated inline from the virtual EFLAGS (no VMM round trip needed)")
def pushf(e, insn):
    _pushf(e, insn)


sem("pushf", flags_read="CF PF AF ZF SF OF")(pushf)


@sem("popfd", callout="popf", ends_block=True,
     why="may change IF/IOPL depending on CPL and IOPL (silently ignored otherwise), and TF",
     does="inline (IF/IOPL masked by CPL and IOPL); leaves the block if it sets TF (single-stepping), "
          "changes AC (alignment checking) or IOPL (part of the translation key)")
def popf(e, insn):
    new, old = _popf(e, insn)
    # A POPF that sets EFLAGS.TF leaves the block, so that the run loop single-steps from the
    # next instruction on (runtime/cpu.py CPU.run); so does one that changes EFLAGS.AC, so that
    # the run loop switches KEY_AC (alignment checking, CPU.sync_ac), or IOPL, which the mode key
    # holds (SystemCPU.update_key), from the next instruction on.  Otherwise this is one untaken
    # branch: a kernel's local_irq_restore() no longer returns to the runtime (the interrupts it
    # enables leave the block only while the machine has an interrupt waiting: st.irq_pending,
    # 1 << IF then, masks the IF that this POPF sets.)
    changes = (1 << S.AC) | ((3 << S.IOPL_SHIFT) if _system_mode(e) else 0)
    go = e.or_(e.and_(new, e.c(1 << S.TF)), e.and_(e.xor(new, old), e.c(changes)))
    if e.key & S.KEY_PE and popf_mask(e.key, insn.opsize) & (1 << S.IF):
        go = e.or_(go, let_in(e, new, old))
    e.exit_if(e.icmp("ne", go, e.c(0)),
              lambda: e.exit_code(S.EXIT_LOOKUP, e.c(insn.next), refund=e.left(after=True)))


sem("popf")(popf)

"""Sensitive and privileged instructions: translated into VMM callouts.

Each registration names the callout, why the instruction cannot run as is
(sensitive but unprivileged, or privileged) and what the VMM does with it.
The translated code ends the block at the instruction with EXIT_CALLOUT; the
runtime's handler (runtime/callouts.py) emulates it against the virtual CPU
and resumes at the next instruction (or delivers an exception).
"""
from . import sem, CALLOUT_INFO

SENSITIVE = "sensitive, unprivileged"
PRIVILEGED = "privileged (CPL 0)"


def _callout_fn(name):
    def fn(e, insn):
        from ..sensitive import callout_id
        arg = None
        if name == "int" and insn.ops:
            arg = e.c(insn.ops[0].imm & 0xFF)
        elif name == "int":
            arg = e.c(3 if insn.mnemonic == "int3" else 4)
        e.callout(callout_id(name), arg)
    return fn


def _ring0_with(e, bits):
    """Whether the block's key is protected mode at CPL 0 with the mode-key bits `bits` set: where
    IRET and INVLPG have an inline path."""
    from .. import state as S
    return e.key & (S.KEY_PE | bits) == S.KEY_PE | bits and S.key_cpl(e.key) == 0


def callout(name, *mnemonics, why, does, table_as=()):
    """Register mnemonics as the callout `name`; table_as lists forms of instructions
    registered elsewhere (e.g. MOV) that reach this callout."""
    CALLOUT_INFO[name] = dict(why=why, does=does, mnemonics=mnemonics + tuple(table_as))
    if mnemonics:
        sem(*mnemonics, ends_block=True, callout=name, why=why, does=does)(_callout_fn(name))


callout("hlt", "hlt", why=PRIVILEGED, does="halts until an interrupt (stops a snippet run); #GP at CPL>0")
callout("int", "int", "int3", "into", "int1", why=SENSITIVE + ": vectors through the guest IDT",
        does="delivers the software interrupt through the virtual IDT (user mode: a Linux syscall or signal)")
callout("iret", "iret", why=SENSITIVE + ": restores EFLAGS.IF/IOPL, CS and may change CPL",
        does="returns from an interrupt against the virtual CPU state", table_as=("iretd",))



@sem("iretd", ends_block=True, callout="iret", why=SENSITIVE + ": restores EFLAGS.IF/IOPL, CS and may change CPL",
     does="in ring 0 with flat segments, a return to the same CS whose GDT descriptor is the one CS "
          "holds, without a change of IOPL or TF set, runs inline; otherwise the runtime returns "
          "(other rings, task returns, another CS)")
def iretd(e, insn):
    # A Linux boot runs ~39,000 IRETs, nearly all from interrupts taken in the kernel (~11 us each
    # through the runtime).  The inline path makes the checks the runtime would pass the same way:
    # the popped CS is CS's selector and its GDT entry holds the very descriptor CS was loaded from
    # (state.cs_desc), so the code-segment checks and the descriptor cache come out unchanged.
    from .. import state as S
    from ..sensitive import callout_id
    from .flagops import eflags_value, let_in, popf_mask, set_eflags_value
    if not _ring0_with(e, S.KEY_FLAT):
        return e.callout(callout_id("iret"))
    out = lambda: e.callout(callout_id("iret"))
    old = eflags_value(e)
    esp = e.reg32(4)
    eip = e.load(e.linear(S.SS, esp), 4)
    cs = e.and_(e.load(e.linear(S.SS, e.add(esp, e.c(4))), 4), e.c(0xFFFF))
    fl = e.load(e.linear(S.SS, e.add(esp, e.c(8))), 4)
    index = e.and_(cs, e.c(0xFFF8))
    same = e.icmp("eq", cs, e.zext(e.load_field(S.offset("seg_sel") + 2 * S.CS, "i16"), "i32"))
    in_gdt = e.icmp("ule", e.add(index, e.c(7)), e.load_field(S.offset("gdt_limit"), "i32"))
    local = e.and_(cs, e.c(4))
    task = e.and_(old, e.c(1 << S.NT))
    ok = e.and_(e.and_(same, in_gdt), e.icmp("eq", e.or_(local, task), e.c(0)))
    e.exit_if(e.icmp("eq", e.zext(ok, "i32"), e.c(0)), out)
    at = e.add(e.load_field(S.offset("gdt_base"), "i32"), index)
    lo = e.load(e.linear(S.DS, at), 4)
    hi = e.load(e.linear(S.DS, e.add(at, e.c(4))), 4)
    # The accessed bit aside (a far JMP sets it in memory after loading CS; it changes nothing).
    # A present code segment (cs_desc is (0, 0) when the VMM made CS, as SYSENTER does).
    cached = e.and_(e.icmp("eq", lo, e.load_field(S.offset("cs_desc"), "i32")),
                    e.icmp("eq", e.and_(e.xor(hi, e.load_field(S.offset("cs_desc") + 4, "i32")), e.c(~0x100)),
                           e.c(0)))
    cached = e.and_(cached, e.icmp("eq", e.and_(hi, e.c(0x9800)), e.c(0x9800)))
    e.exit_if(e.icmp("eq", e.zext(cached, "i32"), e.c(0)), out)
    mask = popf_mask(e.key, 4)
    new = e.or_(e.and_(fl, e.c(mask)), e.and_(old, e.c(~mask)))
    # IOPL is in the mode key, and TF makes the run loop single-step: the runtime does those.
    e.exit_if(e.icmp("ne", e.or_(e.and_(e.xor(new, old), e.c(3 << 12)), e.and_(new, e.c(1 << S.TF))), e.c(0)), out)
    set_eflags_value(e, new)
    e.set_reg32(4, e.add(esp, e.c(12)))
    # An interrupt this IRET lets in is taken before the next instruction (state.irq_pending).
    e.exit_if(e.icmp("ne", let_in(e, new, old), e.c(0)), lambda: e.exit_code(S.EXIT_LOOKUP, eip))
    e.exit_indirect(eip)
callout("cpuid", "cpuid", why="sensitive: reveals the host CPU", does="reports btvm's virtual i686 CPU")
callout("rdtsc", why="sensitive: reads host time; #GP at CPL>0 with CR4.TSD",
        does="reads the virtual time-stamp counter (inline in ring 0, where TSD cannot fault: "
             "TSC = instructions executed + offset)", table_as=("rdtsc",))


@sem("rdtsc", ends_block=False, callout="rdtsc", why="sensitive: reads host time; #GP at CPL>0 with CR4.TSD",
     does="inline at CPL 0 from the state's TSC base and the instruction budget; a callout elsewhere")
def rdtsc(e, insn):
    from .. import state as S
    from ..sensitive import callout_id
    if S.key_cpl(e.key) != 0 or not e.key & S.KEY_PE:
        return e.callout(callout_id("rdtsc"))
    base = e.load_field(S.offset("tsc_base"), "i64")
    budget = e.load_field(S.offset("budget"), "i64")
    # The block charged all its instructions at entry: count only those before this one.
    tsc = e.sub(e.sub(base, budget), e.c(e.left(after=True), "i64"))
    e.set_reg32(0, e.trunc(tsc, "i32"))
    e.set_reg32(2, e.trunc(e.lshr(tsc, e.c(32, "i64")), "i32"))
callout("msr", "rdmsr", "wrmsr", "rdpmc", why=PRIVILEGED, does="reads or writes a virtual MSR (#GP if unknown)")
callout("intflag", why="IOPL-sensitive: changes EFLAGS.IF",
        does="inline where the key says CPL <= IOPL (CLI; STI unless its interrupt shadow matters); "
             "otherwise updates the virtual IF (STI: with the interrupt shadow) or raises #GP",
        table_as=("cli", "sti"))


@sem("cli", "sti", ends_block=False, callout="intflag", why="IOPL-sensitive: changes EFLAGS.IF",
     does="inline where the key says CPL <= IOPL: CLI clears the virtual IF, STI sets it, calling out "
          "when IF was clear and an interrupt is pending or STI ends its block (the interrupt shadow); "
          "a callout (#GP) otherwise")
def intflag(e, insn):
    # A kernel runs ~160,000 CLI/STI in a Linux boot: a runtime round trip each cost ~1 s.
    from .. import state as S
    from ..sensitive import callout_id
    if not e.key & S.KEY_PE or S.key_cpl(e.key) > S.key_iopl(e.key):
        return e.callout(callout_id("intflag"))
    other, IF = e.eflags_other, 1 << S.IF
    if insn.mnemonic == "cli":
        e.set_eflags_other(e.and_(other, e.c(~IF)))
        return
    # STI with IF clear starts a one-instruction interrupt shadow.  It only matters if an interrupt
    # is pending (state.irq_pending) or may become so before the next instruction runs, which is
    # only when STI ends the block (the time slice may end there): then the runtime sets IF and
    # holds the interrupt back (runtime/system/callouts.py intflag).  Otherwise IF is set here; an
    # interrupt that a callout right after makes pending is taken after that callout, as the
    # shadow allows.  A Linux boot runs ~38,000 such STIs.
    set_if = e.c(IF)
    was_clear = e.and_(e.xor(other, e.c(0xFFFFFFFF)), set_if)
    last = e.select(e.icmp("eq", e.c(e.left(after=True)), e.c(0)), set_if, e.c(0))
    shadow = e.and_(was_clear, e.or_(e.load_field(S.offset("irq_pending"), "i32"), last))
    e.exit_if(e.icmp("ne", shadow, e.c(0)), lambda: e.callout(callout_id("intflag")))
    e.set_eflags_other(e.or_(other, set_if))
callout("io", "in", "out", "insb", "insw", "insd", "outsb", "outsw", "outsd",
        why="IOPL/TSS-bitmap sensitive: touches I/O ports", does="reads or writes the virtual device on the port bus")
callout("segload", "lds", "les", "lfs", "lgs", "lss", why=SENSITIVE + ": loads a segment descriptor",
        does="loads the selector and its virtual descriptor cache with the protection checks")
callout("farjump", "ljmp", "lcall", "retf", why=SENSITIVE + ": loads CS, may change CPL",
        does="performs the far transfer against the virtual GDT/LDT")
callout("descriptor", "lgdt", "lidt", "lldt", "ltr", "sgdt", "sidt", "sldt", "str", "smsw", "lmsw",
        why="SGDT/SIDT/SLDT/SMSW/STR: sensitive (reveal host tables); the loads are privileged",
        does="reads or writes the virtual descriptor-table registers and MSW")
callout("segcheck", "lar", "lsl", "verr", "verw", why=SENSITIVE + ": inspect descriptors",
        does="checks the selector against the virtual descriptor tables")
callout("cache", "invd", "wbinvd", "clts", why=PRIVILEGED,
        does="flushes the virtual TLB page / no-op for caches / clears CR0.TS", table_as=("invlpg",))


@sem("invlpg", ends_block=True, callout="cache", why=PRIVILEGED,
     does="in ring 0 with paging, a native call drops the page's soft-TLB entries; the runtime is "
          "called out to only when it holds something of the page (translated blocks, global "
          "entries) or the page is in a 4 MiB region")
def invlpg(e, insn):
    # A Linux boot runs ~70,000 INVLPGs (kmap and fixmap slots), nearly all of pages without code.
    # The block still ends here: a tier-2 region's memory windows were checked at block entry.
    from .. import state as S
    from ..sensitive import callout_id
    if not _ring0_with(e, S.KEY_PG):
        return e.callout(callout_id("cache"))
    m = insn.ops[0].mem
    lin = e.f(e.linear(m.seg, e.ea(m)))
    fn = e.load_field(S.offset("invlpg"), "ptr")
    rc = e.op(f"call i32 {fn.s}(ptr %st, i32 {lin.s})", "i32")
    e.exit_if(e.icmp("ne", rc, e.c(0)), lambda: e.callout(callout_id("cache")))
callout("sysenter", "sysenter", "sysexit", why=SENSITIVE + ": fast system call, changes CPL",
        does="enters/leaves the kernel through the virtual SYSENTER MSRs")
callout("movspecial", why="MOV to a segment register is sensitive; MOV CRn/DRn is privileged",
        does="loads the segment or control/debug register of the virtual CPU (MOV from a segment "
             "register reads the virtual selector inline)", table_as=("mov sreg", "mov crN/drN"))


def mov_special(e, insn):
    """MOV to a segment register or from/to CRn/DRn (MOV from a segment register is inline)."""
    from ..sensitive import callout_id
    dst, src = insn.ops
    if src.kind == "seg" and dst.kind != "other":
        e.write(dst, e.resize(e.read(src), f"i{dst.size * 8}"))
        return
    e.callout(callout_id("movspecial"))


def pop_seg(e, insn):
    from ..sensitive import callout_id
    e.callout(callout_id("segload"))


@sem("ud2")
def ud2(e, insn):
    e.raise_now(6)

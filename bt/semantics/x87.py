"""The x87 FPU: every D8-DF instruction, WAIT/FWAIT.

Design: the guest FPU state is an FNSAVE image in the CPU state (bt.state,
fields `fpu`, `fpu_new`, `fpu_buf`).  The host is an x86-64 CPU, whose x87
unit is the very FPU being emulated, so each guest x87 instruction runs on the
host's x87 inside a tiny inline-assembly bracket:

    fnstcw  host_cw            ; keep the host's control word
    frstor  guest_image        ; guest registers, tags, TOP, FCW (RC, PC, masks), FSW
    sahf                       ; guest SF ZF AF PF CF (read by FCMOVcc)
    <the guest instruction's own opcode bytes, memory operand -> fpu_buf>
    lahf                       ; ZF PF CF written by FCOMI/FUCOMI(P)
    fnsave  new_image          ; the result state (and re-initializes the host FPU)
    fldcw   host_cw

so rounding control, precision control, 80-bit results, NaN propagation,
denormals, tags, TOP, C0-C3, stack overflow/underflow with the masked
response (QNaN indefinite), unmasked-exception behaviour (no write for #I #Z #D,
ES set), FPREM partial remainders and the transcendentals are the hardware's
own.  The guest's exception masks are loaded as they are: an unmasked
exception only sets ES/B in the host status word, and it can never be
delivered on the host because the next host x87 instruction is the
non-waiting FNSAVE (which re-initializes the unit).  A pending guest exception
(FSW.ES) is raised as #MF (vector 16, CR0.NE=1 style) by the next waiting
guest x87 instruction, before it runs.

What the translator does itself: moving the memory operand between guest
memory (through the soft-MMU, precise faults) and `fpu_buf`; the guest's
FIP/FCS/FOP/FDP/FDS (the host would record host addresses); FNSTSW AX;
the EFLAGS of FCOMI/FCMOVcc; #MF delivery.

Requires an x86-64 host (as LLVM's x86_fp80 would).
"""
from . import sem, Unsupported, SemInfo, TABLE, BY_NAME
from .. import state as S
from ..decode import Reg

# The inline assembly of _host_exec needs LLVM's x86 assembly parser in the JIT.
import llvmlite.binding as _llvm
_llvm.initialize_native_target()
_llvm.initialize_native_asmparser()

OFF = S.CPUState.fpu.offset
NEW = S.CPUState.fpu_new.offset - OFF
BUF = S.CPUState.fpu_buf.offset - OFF
HCW = S.CPUState.fpu_hostcw.offset - OFF
EFL = S.CPUState.fpu_eflags.offset - OFF
IMAGE = S.FPU_IMAGE
MF = 16     # #MF: x87 floating-point error
UD = 6
NM = 7      # #NM: device not available (CR0.EM / CR0.TS) -- system mode, not yet

_PREFIXES = {0xF0, 0xF2, 0xF3, 0x2E, 0x36, 0x3E, 0x26, 0x64, 0x65, 0x66, 0x67}

# Memory forms: (opcode, ModRM.reg) -> (size in bytes, 'r' read | 'w' write).  Missing: #UD.
MEM = {}
for _r in range(8):
    MEM[(0xD8, _r)] = (4, "r")      # FADD..FDIVR m32fp
    MEM[(0xDA, _r)] = (4, "r")      # FIADD..FIDIVR m32int
    MEM[(0xDC, _r)] = (8, "r")      # m64fp
    MEM[(0xDE, _r)] = (2, "r")      # m16int
MEM.update({
    (0xD9, 0): (4, "r"), (0xD9, 2): (4, "w"), (0xD9, 3): (4, "w"),
    (0xD9, 4): (28, "r"), (0xD9, 5): (2, "r"), (0xD9, 6): (28, "w"), (0xD9, 7): (2, "w"),
    (0xDB, 0): (4, "r"), (0xDB, 2): (4, "w"), (0xDB, 3): (4, "w"),
    (0xDB, 5): (10, "r"), (0xDB, 7): (10, "w"),
    (0xDD, 0): (8, "r"), (0xDD, 2): (8, "w"), (0xDD, 3): (8, "w"),
    (0xDD, 4): (108, "r"), (0xDD, 6): (108, "w"), (0xDD, 7): (2, "w"),
    (0xDF, 0): (2, "r"), (0xDF, 2): (2, "w"), (0xDF, 3): (2, "w"),
    (0xDF, 4): (10, "r"), (0xDF, 5): (8, "r"), (0xDF, 6): (10, "w"), (0xDF, 7): (8, "w"),
})
ENV_FORMS = {(0xD9, 4), (0xD9, 6), (0xDD, 4), (0xDD, 6)}
# FISTTP (SSE3) is not implemented: CPUID does not report SSE3, so it is #UD as on an i686.
FISTTP = {(0xDB, 1), (0xDD, 1), (0xDF, 1)}

# Control instructions do not update FIP/FCS/FOP/FDP/FDS.
CONTROL_MEM = {(0xD9, 4), (0xD9, 5), (0xD9, 6), (0xD9, 7), (0xDD, 4), (0xDD, 6), (0xDD, 7)}
FNCLEX, FNINIT = (0xDB, 0xE2), (0xDB, 0xE3)
# Non-waiting instructions: no check for a pending unmasked exception.
NOWAIT_MEM = {(0xD9, 6), (0xD9, 7), (0xDD, 6), (0xDD, 7)}
NOWAIT_REG = {FNCLEX, FNINIT, (0xDF, 0xE0)}


def _opcode(insn):
    raw = insn.raw
    i = 0
    while raw[i] in _PREFIXES:
        i += 1
    return raw[i], raw[i + 1], 0x66 in raw[:i]


NM = 7


def _device_check(e, wait_only=False):
    """#NM when CR0.EM or CR0.TS is set (SDM Vol. 3A, 2.5 and 13.4); CR0's FPU bits are in the
    translation key, so the check costs nothing when they are clear.  WAIT/FWAIT faults only
    when TS and MP are both set."""
    key = e.key
    if wait_only:
        if key & S.KEY_FPU_TS and key & S.KEY_FPU_MP:
            e.raise_now(NM)
            return True
        return False
    if key & (S.KEY_FPU_EM | S.KEY_FPU_TS):
        e.raise_now(NM)
        return True
    return False


def _img(e, off, t):
    return e.load_field(OFF + off, t)


def _pending_check(e):
    """A waiting instruction first delivers a pending unmasked exception (FSW.ES) as #MF."""
    sw = _img(e, S.FPU_SW, "i16")
    e.raise_if(e.icmp("ne", e.and_(sw, e.c(0x80, "i16")), e.c(0, "i16")), MF)


def _memcpy(e, dst_off, src_off, n):
    e.module.declare("declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)")
    d, s = e.field(OFF + dst_off), e.field(OFF + src_off)
    e.emit(f"call void @llvm.memcpy.p0.p0.i64(ptr {d.s}, ptr {s.s}, i64 {n}, i1 false)")


_AC_ALIGN = {10: 8, 28: 4, 108: 4}


def _pieces(n):
    k = 0
    while k < n:
        step = 8 if n - k >= 8 else 4 if n - k >= 4 else 2
        yield k, step
        k += step


def _eflags_byte(e):
    b = e.c(2, "i8")
    for name, bit in (("CF", 0), ("PF", 2), ("AF", 4), ("ZF", 6), ("SF", 7)):
        b = e.or_(b, e.shl(e.zext(e.flag(name), "i8"), e.c(bit, "i8")))
    return b


def _host_exec(e, code):
    lines = [f"fnstcw {HCW}(%rdi)", "frstor (%rdi)", f"movb {EFL}(%rdi), %ah", "sahf",
             ".byte " + ", ".join(f"0x{b:02x}" for b in code),
             "lahf", f"movb %ah, {EFL}(%rdi)", f"fnsave {NEW}(%rdi)", f"fldcw {HCW}(%rdi)"]
    text = "\\0A".join(lines)
    clob = ",".join(["{rdi}", "~{rax}", "~{memory}", "~{dirflag}", "~{fpsr}", "~{fpcr}", "~{flags}",
                     "~{st}"] + [f"~{{st({i})}}" for i in range(1, 8)])
    p = e.field(OFF)
    e.emit(f'call void asm sideeffect "{text}", "{clob}"(ptr {p.s})')


def x87(e, insn):
    opc, modrm, o16 = _opcode(insn)
    reg = (modrm >> 3) & 7
    is_mem = modrm < 0xC0
    key = (opc, reg) if is_mem else (opc, modrm)
    if is_mem and key in FISTTP:
        return e.raise_now(UD)
    if is_mem and key not in MEM:
        return e.raise_now(UD)
    if is_mem and key in ENV_FORMS and o16:
        raise Unsupported(f"16-bit FPU environment format: '{insn.text()}' at {insn.addr:#x}")
    if _device_check(e):
        return
    waiting = key not in (NOWAIT_MEM if is_mem else NOWAIT_REG)
    if waiting:
        _pending_check(e)
    if not is_mem and key == (0xDF, 0xE0):          # FNSTSW AX
        e.set_reg(Reg(0, 2), _img(e, S.FPU_SW, "i16"))
        return
    control = key in CONTROL_MEM if is_mem else key in (FNCLEX, FNINIT)
    size = kind = addr = None
    if is_mem:
        size, kind = MEM[key]
        mop = next(o for o in insn.ops if o.kind == "mem")
        addr = e.mem_addr(mop.mem)
        # #AC alignment of the whole operand (SDM Vol. 3A Table 6-7): m80 8, FSTENV/FSAVE images
        # 4 (32-bit operand size), else its size; checked once, on the first piece (or the probe).
        align = _AC_ALIGN.get(size, size)
        if kind == "r":
            for k, n in _pieces(size):
                a = addr if k == 0 else e.lin_add(addr, k)
                e.store_field(OFF + BUF + k, e.load(a, n, align if k == 0 else 1))
        elif size > 8:
            e.probe_write(addr, size, align)
        code = bytes([opc, 0x80 | (reg << 3) | 7]) + BUF.to_bytes(4, "little")
    else:
        code = bytes([opc, modrm])
    e.store_field(OFF + EFL, _eflags_byte(e))
    _host_exec(e, code)
    if kind == "w":
        if key in ((0xD9, 6), (0xDD, 6)):           # FNSTENV/FNSAVE: the guest's pointers
            _memcpy(e, BUF + S.FPU_FIP, S.FPU_FIP, 16)
        for k, n in _pieces(size):
            a = addr if k == 0 else e.lin_add(addr, k)
            e.store(a, e.load_field(OFF + BUF + k, f"i{8 * n}"), align if k == 0 and size <= 8 else 1)
    # The instruction and data pointers of the new state.
    if not control:
        _memcpy(e, NEW + S.FPU_FIP, S.FPU_FIP, 16)
        cs = e.load_field(S.offset("seg_sel") + 2 * S.CS, "i16")
        fop = ((opc & 7) << 8) | modrm
        e.store_field(OFF + NEW + S.FPU_FIP, e.c(insn.addr))
        e.store_field(OFF + NEW + S.FPU_FCS, e.or_(e.zext(cs, "i32"), e.c(fop << 16)))
        if is_mem:
            ds = e.load_field(S.offset("seg_sel") + 2 * mop.mem.seg, "i16")
            e.store_field(OFF + NEW + S.FPU_FDP, e.ea(mop.mem))
            e.store_field(OFF + NEW + S.FPU_FDS, ds)
    elif key in ((0xD9, 4), (0xDD, 4)):             # FLDENV/FRSTOR load them
        _memcpy(e, NEW + S.FPU_FIP, BUF + S.FPU_FIP, 16)
    elif key not in ((0xDD, 6), FNINIT):            # FNSAVE/FNINIT clear them (the host did)
        _memcpy(e, NEW + S.FPU_FIP, S.FPU_FIP, 16)
    _memcpy(e, 0, NEW, IMAGE)
    if insn.mnemonic in FCOMI:
        f = e.load_field(OFF + EFL, "i8")
        for name, bit in (("CF", 0), ("PF", 2), ("ZF", 6), ("AF", 4), ("SF", 7)):
            e.set_flag(name, e.bit(f, bit))
        e.set_flag("OF", e.c(0, "i1"))


FCOMI = {"fcomi", "fcomip", "fucomi", "fucompi", "fucomip", "fcompi"}
FCMOV = {"fcmovb", "fcmove", "fcmovbe", "fcmovu", "fcmovnb", "fcmovne", "fcmovnbe", "fcmovnu"}


@sem("wait")
def wait(e, insn):
    if _device_check(e, wait_only=True):
        return
    _pending_check(e)


# The mnemonics Capstone gives the x87 encodings (D8-DF, every ModRM byte): listed, not found
# by decoding all 2,048 at every start (16 ms); tests/test_x87.py checks the list against
# all_encodings().  faddp has no id of its own: Capstone reports fadd's.
MNEMONICS = """f2xm1 fabs fadd faddp fbld fbstp fchs fcmovb fcmovbe fcmove fcmovnb fcmovnbe fcmovne fcmovnu
fcmovu fcom fcomi fcomp fcompi fcompp fcos fdecstp fdisi8087_nop fdiv fdivp fdivr fdivrp feni8087_nop
ffree ffreep fiadd ficom ficomp fidiv fidivr fild fimul fincstp fist fistp fisttp fisub fisubr fld fld1
fldcw fldenv fldl2e fldl2t fldlg2 fldln2 fldpi fldz fmul fmulp fnclex fninit fnop fnsave fnstcw fnstenv
fnstsw fpatan fprem fprem1 fptan frndint frstor fscale fsetpm fsin fsincos fsqrt fst fstp fstpnce fsub
fsubp fsubr fsubrp ftst fucom fucomi fucomp fucompi fucompp fxam fxch fxtract fyl2x fyl2xp1""".split()
_SAME_ID = {"faddp": "fadd"}


def encodings():
    """{mnemonic: Capstone id} of MNEMONICS."""
    from capstone import x86 as X
    return {m: getattr(X, "X86_INS_" + _SAME_ID.get(m, m).upper()) for m in MNEMONICS}


def all_encodings():
    """Every (mnemonic, Capstone id) of an x87 encoding (D8-DF, all ModRM bytes)."""
    import capstone
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    found = {}
    for opc in range(0xD8, 0xE0):
        for modrm in range(256):
            for i in cs.disasm(bytes([opc, modrm, 0, 0, 0, 0]), 0, 1):
                found.setdefault(i.mnemonic, i.id)
    return found


# Registered by Capstone id: some mnemonics (faddp) share an id with another spelling.
for _m, _id in sorted(encodings().items()):
    if _m in FCOMI:
        _info = SemInfo(_m, x87, flags_read="CF PF AF ZF SF", flags_written="CF PF AF ZF SF OF")
    elif _m in FCMOV:
        _info = SemInfo(_m, x87, flags_read="CF PF ZF")
    else:
        _info = SemInfo(_m, x87)
    TABLE.setdefault(_id, _info)
    BY_NAME[_m] = TABLE[_id]

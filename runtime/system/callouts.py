"""VMM handlers for the sensitive and privileged instructions (the callouts named in bt/sensitive.py).

Each handler runs with eip at the instruction, emulates it against the
virtual CPU (runtime/system/syscpu.py) and moves eip past it, or raises the
architectural exception (GuestFault) with the state untouched.
"""
import struct

from bt import state as S
from bt.decode import Reg
from runtime.cpu import GuestFault, Stop
from runtime.cpuid import handle_cpuid
from runtime.devices.bus import SIZE_MASKS

from .descriptors import CALL_GATE, TASK_GATE
from .paging import CR0_TS, CR4_TSD

GP, UD, DB, BP, OF_VEC = 13, 6, 1, 3, 4
SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP = 0x174, 0x175, 0x176
MSR_TSC = 0x10
# An ISA bus access takes about a microsecond on a PC: charging it to virtual time keeps polling
# loops (PIT channel 2 in port 0x61, UART status) from costing millions of translated iterations.
IO_NS = 1000


# ---- operand access from Python ----------------------------------------------------------------
def _reg_read(cpu, r):
    v = cpu.st.regs[r.index]
    if r.width == 4:
        return v
    if r.width == 2:
        return v & 0xFFFF
    return (v >> 8) & 0xFF if r.hi else v & 0xFF


def _reg_write(cpu, r, value):
    old = cpu.st.regs[r.index]
    if r.width == 4:
        new = value
    elif r.width == 2:
        new = (old & 0xFFFF0000) | (value & 0xFFFF)
    elif r.hi:
        new = (old & 0xFFFF00FF) | ((value & 0xFF) << 8)
    else:
        new = (old & 0xFFFFFF00) | (value & 0xFF)
    cpu.st.regs[r.index] = new & 0xFFFFFFFF


def linear_of(cpu, m, size=None, write=False):
    """Linear address of a decode.Mem operand; with a size, of an access checked against the
    segment (SystemCPU.seg_linear; only INVLPG, which accesses nothing, passes none)."""
    ea = m.disp
    if m.base is not None:
        ea += _reg_read(cpu, m.base)
    if m.index is not None:
        ea += _reg_read(cpu, m.index) * m.scale
    ea &= 0xFFFF if m.addr16 else 0xFFFFFFFF
    if size is not None:
        return cpu.seg_linear(m.seg, ea, size, write)
    return (cpu.segs[m.seg].base + ea) & 0xFFFFFFFF


def read_op(cpu, op, size=None):
    size = size or op.size
    if op.kind == "reg":
        return _reg_read(cpu, op.reg)
    if op.kind == "imm":
        return op.imm & ((1 << (8 * size)) - 1)
    if op.kind == "seg":
        return cpu.segs[op.reg].selector
    if op.kind == "mem":
        return int.from_bytes(cpu.read_lin(linear_of(cpu, op.mem, size), size), "little")
    raise GuestFault(UD)


def write_op(cpu, op, value, size=None):
    size = size or op.size
    if op.kind == "reg":
        _reg_write(cpu, op.reg, value)
    elif op.kind == "mem":
        cpu.write_lin(linear_of(cpu, op.mem, size, True), (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
    else:
        raise GuestFault(UD)


def _next(cpu, insn):
    cpu.set_reg("eip", insn.next)


def _shadow(cpu):
    """No interrupt before the next instruction completes (STI with IF clear, MOV/POP SS).  The
    run loop counts this instruction after its handler: the shadow holds while icount is one more
    than now, i.e. only if the run returns to the machine right after it (Machine._in_shadow)."""
    cpu.interrupt_shadow = True
    cpu.shadow_at = cpu.icount + 1


def _ring0(cpu):
    if cpu.cpl != 0:
        raise GuestFault(GP, 0)


def _iopl_ok(cpu):
    return cpu.cpl <= (cpu.st.eflags >> S.IOPL_SHIFT) & 3


# ---- handlers ------------------------------------------------------------------------------------
def hlt(cpu, insn):
    _ring0(cpu)
    _next(cpu, insn)
    raise Stop("hlt")


def software_int(cpu, insn):
    m = insn.mnemonic
    if m == "into":
        if not cpu.st.eflags & (1 << S.OF):
            return _next(cpu, insn)
        return cpu.deliver(OF_VEC, software=True, return_eip=insn.next)
    if m == "int1":
        return cpu.deliver(DB, return_eip=insn.next)
    vector = BP if m == "int3" else insn.ops[0].imm & 0xFF
    cpu.deliver(vector, software=True, return_eip=insn.next)


def iret(cpu, insn):
    if insn.opsize != 4:
        raise Stop("unsupported", message="16-bit IRET is not implemented", eip=insn.addr)
    cpu.iret()


def rdtsc(cpu, insn):
    if cpu.cr4 & CR4_TSD and cpu.cpl != 0:
        raise GuestFault(GP, 0)
    t = cpu.tsc()
    cpu.set_reg("eax", t & 0xFFFFFFFF)
    cpu.set_reg("edx", (t >> 32) & 0xFFFFFFFF)
    _next(cpu, insn)


def msr(cpu, insn):
    _ring0(cpu)
    if insn.mnemonic == "rdpmc":
        raise GuestFault(GP, 0)
    index = cpu.reg("ecx")
    known = (MSR_TSC, SYSENTER_CS, SYSENTER_ESP, SYSENTER_EIP)
    if index not in known:
        raise GuestFault(GP, 0)
    if insn.mnemonic == "rdmsr":
        v = cpu.tsc() if index == MSR_TSC else cpu.msr.get(index, 0)
        cpu.set_reg("eax", v & 0xFFFFFFFF)
        cpu.set_reg("edx", v >> 32)
    else:
        v = (cpu.reg("edx") << 32) | cpu.reg("eax")
        if index == MSR_TSC:
            cpu.tsc_offset = v - cpu.icount - cpu.extra_ns
        else:
            cpu.msr[index] = v
    _next(cpu, insn)


def intflag(cpu, insn):
    if not _iopl_ok(cpu):
        raise GuestFault(GP, 0)
    fl = cpu.st.eflags
    if insn.mnemonic == "sti":
        if not fl & (1 << S.IF):
            _shadow(cpu)
        cpu.set_eflags(fl | (1 << S.IF))
    else:
        cpu.set_eflags(fl & ~(1 << S.IF))
    _next(cpu, insn)


def _base_mnemonic(insn):
    """The mnemonic without a REP prefix (Capstone names REP INSB "rep insb")."""
    return insn.mnemonic.split()[-1]


def _port_size(insn):
    m = _base_mnemonic(insn)
    if m in ("in", "out"):
        data = insn.ops[0] if m == "in" else insn.ops[1]
        return data.size
    return {"b": 1, "w": 2, "d": 4}[m[-1]]


# IN/OUT/INS/OUTS by their bytes and mode: (kind, data size, the port if an immediate, else None).
# A Linux boot makes ~57,000 port accesses (UART status and data, PIT, PIC): working the
# instruction out again each time was a third of the handler.
_IO_PLANS = {}
_IN, _OUT, _STRING = range(3)


def _io_plan(insn):
    m = _base_mnemonic(insn)
    size = _port_size(insn)
    if m in ("in", "out"):
        port_op = insn.ops[1] if m == "in" else insn.ops[0]
        port = port_op.imm & 0xFFFF if port_op.kind == "imm" else None
        return (_IN if m == "in" else _OUT), size, port
    return _STRING, size, None


def io(cpu, insn):
    k = (insn.raw, insn.opsize, insn.addrsize)
    plan = _IO_PLANS.get(k)
    if plan is None:
        plan = _IO_PLANS[k] = _io_plan(insn)
    kind, size, port = plan
    st = cpu.st
    if port is None:
        port = st.regs[2] & 0xFFFF
    if not cpu.io_allowed(port, size):
        raise GuestFault(GP, 0)
    cpu.extra_ns += IO_NS
    if cpu.after_io is not None:
        cpu.after_io()
    bus = cpu.io
    mask = SIZE_MASKS[size]
    if kind == _IN:
        v = bus.read(port, size) if bus else mask
        st.regs[0] = (st.regs[0] & ~mask & 0xFFFFFFFF) | (v & mask)
    elif kind == _OUT:
        if bus:
            bus.write(port, size, st.regs[0] & mask)
    else:
        _string_io(cpu, insn, _base_mnemonic(insn).startswith("ins"), port, size)
        return
    st.eip = insn.next


def _string_io(cpu, insn, is_in, port, size):
    idx_w = 2 if insn.addrsize == 2 else 4
    mask = 0xFFFF if idx_w == 2 else 0xFFFFFFFF
    count = (cpu.reg("ecx") & mask) if insn.rep else 1
    step = -size if cpu.st.eflags & (1 << S.DF) else size
    for _ in range(count):
        if is_in:
            edi = cpu.reg("edi") & mask
            v = cpu.io.read(port, size) if cpu.io else (1 << (8 * size)) - 1
            cpu.write_lin(cpu.seg_linear(S.ES, edi, size, True), v.to_bytes(size, "little"))
            _reg_write(cpu, Reg(7, idx_w), edi + step)
        else:
            esi = cpu.reg("esi") & mask
            seg = insn.seg_override if insn.seg_override is not None else S.DS
            v = int.from_bytes(cpu.read_lin(cpu.seg_linear(seg, esi, size), size), "little")
            if cpu.io:
                cpu.io.write(port, size, v)
            _reg_write(cpu, Reg(6, idx_w), esi + step)
        if insn.rep:
            _reg_write(cpu, Reg(1, idx_w), (cpu.reg("ecx") - 1) & mask)
    _next(cpu, insn)


def movspecial(cpu, insn):
    dst, src = insn.ops
    if dst.kind == "seg":
        sel = read_op(cpu, src, 2)
        if dst.reg == S.CS:
            raise GuestFault(UD)
        cpu.load_segment(dst.reg, sel)
        if dst.reg == S.SS:
            _shadow(cpu)
            cpu.debug_shadow = True         # no interrupt, no #DB trap after it
        return _next(cpu, insn)
    _ring0(cpu)
    special = dst if dst.kind == "other" else src
    name = str(special.reg)
    to_special = dst.kind == "other"
    gpr = src if to_special else dst
    if name.startswith("cr"):
        n = int(name[2:])
        if to_special:
            v = _reg_read(cpu, gpr.reg)
            {0: cpu.set_cr0, 2: lambda x: setattr(cpu, "cr2", x), 3: cpu.set_cr3, 4: cpu.set_cr4}.get(
                n, lambda x: (_ for _ in ()).throw(GuestFault(UD)))(v)
        else:
            if n not in (0, 2, 3, 4):
                raise GuestFault(UD)
            _reg_write(cpu, gpr.reg, getattr(cpu, f"cr{n}"))
    elif name.startswith("dr"):
        n = int(name[2:])
        if to_special:
            cpu.dr[n] = _reg_read(cpu, gpr.reg)
        else:
            _reg_write(cpu, gpr.reg, cpu.dr[n] if n not in (6, 7) else cpu.dr[n] | (0xFFFF0FF0 if n == 6 else 0x400))
    else:
        raise GuestFault(UD)
    _next(cpu, insn)


def segload(cpu, insn):
    m = insn.mnemonic
    if m == "pop":
        (dst,) = insn.ops
        w = insn.opsize
        esp = cpu.reg("esp")
        sel = int.from_bytes(cpu.read_lin(cpu.seg_linear(S.SS, esp, w), w), "little") & 0xFFFF
        cpu.load_segment(dst.reg, sel)
        cpu.set_reg("esp", esp + w)
        if dst.reg == S.SS:
            _shadow(cpu)
            cpu.debug_shadow = True
        return _next(cpu, insn)
    # LDS/LES/LFS/LGS/LSS r, m16:32
    dst, src = insn.ops
    w = dst.size
    addr = linear_of(cpu, src.mem, w + 2)
    raw = cpu.read_lin(addr, w + 2)
    off, sel = int.from_bytes(raw[:w], "little"), int.from_bytes(raw[w:], "little")
    seg = {"lds": S.DS, "les": S.ES, "lfs": S.FS, "lgs": S.GS, "lss": S.SS}[m]
    cpu.load_segment(seg, sel)
    _reg_write(cpu, dst.reg, off)
    _next(cpu, insn)


def _far_target(cpu, sel):
    """The code segment a far JMP/CALL loads (SDM JMP/CALL, protected mode, to a code segment)."""
    if sel & ~3 == 0:
        raise GuestFault(GP, 0)
    lo, hi, _ = cpu.descriptor(sel)
    if not hi & (1 << 12) and (hi >> 8) & 0xF in (CALL_GATE, TASK_GATE, 0x1, 0x9, 0x4):
        raise Stop("unsupported", message=f"far transfer through a gate or TSS (selector {sel:#x})",
                   eip=cpu.st.eip)
    seg, addr, hi = cpu.code_segment(sel)
    if seg.conforming:
        if seg.dpl > cpu.cpl:
            raise GuestFault(GP, sel & 0xFFFC)
    elif (sel & 3) > cpu.cpl or seg.dpl != cpu.cpl:
        raise GuestFault(GP, sel & 0xFFFC)
    return seg, addr, hi


def farjump(cpu, insn):
    m = insn.mnemonic
    w = insn.opsize
    if m == "retf":
        esp = cpu.reg("esp")
        ssb = cpu.segs[S.SS].base
        eip = int.from_bytes(cpu.read_lin(ssb + esp, w), "little")
        cs = int.from_bytes(cpu.read_lin(ssb + esp + w, w), "little") & 0xFFFF
        rpl = cs & 3
        if cs & ~3 == 0:
            raise GuestFault(GP, 0)
        if rpl < cpu.cpl:
            raise GuestFault(GP, cs & 0xFFFC)
        seg, addr, hi = cpu.code_segment(cs)
        if (seg.conforming and seg.dpl > rpl) or (not seg.conforming and seg.dpl != rpl):
            raise GuestFault(GP, cs & 0xFFFC)
        extra = insn.ops[0].imm & 0xFFFF if insn.ops else 0
        if rpl > cpu.cpl:
            new_esp = int.from_bytes(cpu.read_lin(ssb + esp + 2 * w + extra, w), "little")
            new_ss = int.from_bytes(cpu.read_lin(ssb + esp + 3 * w + extra, w), "little") & 0xFFFF
            old_cs = cpu.segs[S.CS]
            cpu.set_cs(seg, rpl)
            try:
                cpu.load_segment(S.SS, new_ss)      # checked against the new CPL
            except GuestFault:
                cpu.segs[S.CS] = old_cs
                cpu.sync_segments()
                raise
            cpu._set_accessed(addr, hi)
            cpu.set_reg("esp", new_esp + extra)
            cpu.null_outer_data_segments(rpl)
        else:
            cpu._set_accessed(addr, hi)
            cpu.set_cs(seg, rpl)
            cpu.set_reg("esp", esp + 2 * w + extra)
        cpu.set_reg("eip", eip)
        return
    if len(insn.ops) == 2:
        sel, off = insn.ops[0].imm & 0xFFFF, insn.ops[1].imm
    else:
        # JMP/CALL m16:16 or m16:32 (Capstone names the 32-bit forms "jmp"/"call" with a 6-byte operand).
        addr = linear_of(cpu, insn.ops[0].mem, w + 2)
        raw = cpu.read_lin(addr, w + 2)
        off, sel = int.from_bytes(raw[:w], "little"), int.from_bytes(raw[w:], "little")
    seg, addr, hi = _far_target(cpu, sel)
    off &= 0xFFFF if w == 2 else 0xFFFFFFFF
    if off > seg.limit:
        raise GuestFault(GP, 0)
    if m in ("lcall", "call"):
        # Push CS then the return EIP, all or nothing.
        esp = (cpu.reg("esp") - 2 * w) & 0xFFFFFFFF
        frame = insn.next.to_bytes(w, "little") + cpu.segs[S.CS].selector.to_bytes(w, "little")
        cpu.write_lin(cpu.seg_linear(S.SS, esp, 2 * w, True), frame)
        cpu.set_reg("esp", esp)
    cpu._set_accessed(addr, hi)
    cpu.set_cs(seg, cpu.cpl)
    cpu.set_reg("eip", off)


def descriptor(cpu, insn):
    m = insn.mnemonic
    if m in ("lgdt", "lidt", "lldt", "ltr", "lmsw"):
        _ring0(cpu)
    op = insn.ops[0] if insn.ops else None
    if m in ("lgdt", "lidt"):
        addr = linear_of(cpu, op.mem, 6)
        raw = cpu.read_lin(addr, 6)
        limit, base = struct.unpack("<HI", raw)
        if insn.opsize == 2:
            base &= 0xFFFFFF
        setattr(cpu, "gdtr" if m == "lgdt" else "idtr", (base, limit))
    elif m in ("sgdt", "sidt"):
        base, limit = cpu.gdtr if m == "sgdt" else cpu.idtr
        cpu.write_lin(linear_of(cpu, op.mem, 6, True), struct.pack("<HI", limit, base))
    elif m == "sldt":
        write_op(cpu, op, cpu.ldtr.selector, 2 if op.kind == "mem" else op.size)
    elif m == "str":
        write_op(cpu, op, cpu.tr.selector, 2 if op.kind == "mem" else op.size)
    elif m == "smsw":
        write_op(cpu, op, cpu.cr0 & (0xFFFF if op.kind == "mem" or op.size == 2 else 0xFFFFFFFF),
                 2 if op.kind == "mem" else op.size)
    elif m == "lmsw":
        v = read_op(cpu, op, 2)
        cpu.set_cr0((cpu.cr0 & ~0xE) | (v & 0xF) | (cpu.cr0 & 1))
    elif m == "lldt":
        cpu.load_ldt(read_op(cpu, op, 2))
    elif m == "ltr":
        cpu.load_tr(read_op(cpu, op, 2))
    _next(cpu, insn)


def segcheck(cpu, insn):
    m = insn.mnemonic
    src = insn.ops[-1]
    sel = read_op(cpu, src, 2)
    ok, value = False, 0
    if sel & ~3:
        try:
            lo, hi, _ = cpu.descriptor(sel)
        except GuestFault:
            lo = hi = None
        if hi is not None:
            from .descriptors import decode
            seg = decode(lo, hi, sel)
            priv_ok = (seg.s and seg.conforming) or (seg.dpl >= cpu.cpl and seg.dpl >= (sel & 3))
            if m in ("verr", "verw"):
                ok = seg.s and priv_ok and (seg.readable if m == "verr" else seg.writable)
            else:
                valid_sys = (not seg.s) and seg.type in (1, 2, 3, 9, 0xB) + ((4, 5, 0xC) if m == "lar" else ())
                ok = priv_ok and (seg.s or valid_sys)
                value = (hi & 0x00F0FF00) if m == "lar" else seg.limit
    zf = 1 << S.ZF
    cpu.set_reg("eflags", (cpu.st.eflags | zf) if ok else (cpu.st.eflags & ~zf))
    if ok and m in ("lar", "lsl"):
        write_op(cpu, insn.ops[0], value)
    _next(cpu, insn)


def cache(cpu, insn):
    _ring0(cpu)
    m = insn.mnemonic
    if m == "invlpg":
        page = linear_of(cpu, insn.ops[0].mem) & 0xFFFFF000
        if page >> 22 in cpu.walker.large:
            # A 4 MiB page's translations cover its whole region (the soft TLB holds them per
            # 4 KiB page): drop everything, as a CR4.PGE toggle does.
            cpu.switch_address_space()
        else:
            cpu.tlb_flush_page(page)
        cpu.cache.invalidate_page(page, "unmap")
        # Nothing of the page is left (blocks, decoded callouts, global entries): its next
        # INVLPG can be done in translated code (bt/semantics/system.py invlpg).
        cpu.lin_interest[page >> 12] = 0
    elif m == "clts":
        cpu.cr0 &= ~CR0_TS
        cpu.update_key()
    _next(cpu, insn)


def sysenter(cpu, insn):
    cs = cpu.msr.get(SYSENTER_CS, 0) & 0xFFFF
    if cs & ~3 == 0:
        raise GuestFault(GP, 0)
    from .descriptors import Segment
    if insn.mnemonic == "sysenter":
        cpu.set_eflags(cpu.st.eflags & ~((1 << S.IF) | (1 << S.RF) | (1 << S.VM)))
        cpu.segs[S.SS] = Segment.flat((cs + 8) & 0xFFFC, False, 0)
        cpu.set_cs(Segment.flat(cs & 0xFFFC, True, 0), 0)
        cpu.set_reg("esp", cpu.msr.get(SYSENTER_ESP, 0))
        cpu.set_reg("eip", cpu.msr.get(SYSENTER_EIP, 0))
    else:
        _ring0(cpu)
        cpu.segs[S.SS] = Segment.flat(((cs + 24) & 0xFFFC) | 3, False, 3)
        cpu.set_cs(Segment.flat(((cs + 16) & 0xFFFC) | 3, True, 3), 3)
        cpu.set_reg("esp", cpu.reg("ecx"))
        cpu.set_reg("eip", cpu.reg("edx"))


HANDLERS = {
    "hlt": hlt, "int": software_int, "iret": iret, "cpuid": handle_cpuid, "rdtsc": rdtsc, "msr": msr,
    "intflag": intflag, "io": io, "movspecial": movspecial, "segload": segload, "farjump": farjump,
    "descriptor": descriptor, "segcheck": segcheck, "cache": cache, "sysenter": sysenter,
}

"""Every sensitive and privileged instruction, through its VMM callout (runtime/system/callouts.py),
from ring 0 (its architectural effect) and from ring 3 (#GP where the SDM says, a silent no-op where
it says so, e.g. POPF changing IF at IOPL 0).

The kernels come from tests/test_system.py's template (flat GDT 0x08/0x10/0x1b/0x23, TSS 0x28, an
IDT whose handlers record vector, error code, CR2, EIP, CS, marker and EFLAGS at 0x300000). Bodies
store what they observe as dwords at OUT; a body that completes stores the marker 0x600d (then, in
ring 3, makes an INT 0x80 that records vector 0x80).

With PRELUDE the body first switches to a bigger GDT (at 0x309000) holding the template's entries
plus the descriptors the checks need (selectors in SEL), an LDT (0x30A000) with a ring-3 data
segment at LDT selector 0x0c, and a second TSS (0x30B000) with an I/O bitmap that allows ports
0x70, 0x71 and 0x3ff only.
"""
import struct
import time

import pytest

from bt import sensitive
from bt import state as S
from runtime.system.machine import Machine
from tests.test_system import PAGING, RESULTS, build, pic_and_pit

OUT = 0x300100          # dwords the bodies store
GOOD = 0x600D


def _desc(base, limit, access, flags):
    lo = (limit & 0xFFFF) | ((base & 0xFFFF) << 16)
    hi = ((base >> 16) & 0xFF) | (access << 8) | (limit & 0xF0000) | (flags << 20) | (base & 0xFF000000)
    return lo, hi


NEW_GDT, LDT_BASE, TSS2 = 0x309000, 0x30A000, 0x30B000
SEL = dict(ldt=0x30, np_data=0x38, ro3=0x40, xonly=0x48, tss2=0x50, conf=0x58, gate=0x60, beyond=0x68)
EXTRA = {
    0x30: _desc(LDT_BASE, 0x17, 0x82, 0),        # LDT
    0x38: _desc(0, 0xFFFFF, 0x12, 0xC),          # data, not present
    0x40: _desc(0x1000, 0xFFF, 0xF0, 0x4),       # read-only data, DPL 3, base 0x1000, limit 0xfff
    0x48: _desc(0, 0xFFFFF, 0x98, 0xC),          # execute-only code, DPL 0
    0x50: _desc(TSS2, 0xE8, 0x89, 0),            # available 32-bit TSS with an I/O bitmap
    0x58: _desc(0, 0xFFFFF, 0x9E, 0xC),          # conforming readable code, DPL 0
    0x60: (0x08 << 16, 0xEC00),                  # 32-bit call gate, DPL 3, to 0x08:0
}
LDT_DATA = _desc(0x2000, 0xFFFF, 0xF2, 0x4)      # LDT selector 0x0c: data, DPL 3, base 0x2000
GDT_LIMIT = 0x67

PRELUDE = "\n".join([
    "    cld", "    mov esi, gdt", f"    mov edi, {NEW_GDT:#x}", "    mov ecx, 48", "    rep movsb",
    *(f"    mov dword ptr [{NEW_GDT + s + 4 * i:#x}], {v:#x}" for s, d in EXTRA.items() for i, v in enumerate(d)),
    f"    mov dword ptr [{LDT_BASE + 8:#x}], {LDT_DATA[0]:#x}",
    f"    mov dword ptr [{LDT_BASE + 12:#x}], {LDT_DATA[1]:#x}",
    f"    mov dword ptr [{TSS2 + 4:#x}], kstack_top", f"    mov dword ptr [{TSS2 + 8:#x}], 0x10",
    f"    mov word ptr [{TSS2 + 0x66:#x}], 0x68",
    f"    mov edi, {TSS2 + 0x68:#x}", "    mov ecx, 0x81", "    mov al, 0xff", "    rep stosb",
    f"    mov byte ptr [{TSS2 + 0x68 + 0x0E:#x}], 0xfc",     # ports 0x70, 0x71
    f"    mov byte ptr [{TSS2 + 0x68 + 0x7F:#x}], 0x7f",     # port 0x3ff
    f"    mov word ptr [{NEW_GDT + 0x800:#x}], {GDT_LIMIT:#x}",
    f"    mov dword ptr [{NEW_GDT + 0x802:#x}], {NEW_GDT:#x}",
    f"    lgdt [{NEW_GDT + 0x800:#x}]",
    "    mov dword ptr [0x2000], 0x1d7d1d7d", "    mov dword ptr [0x1000], 0x0c0ffee0",
    "    mov ax, 0x30", "    lldt ax",
    "    mov ax, 0x50", "    ltr ax", ""])


def to_ring3(code, eflags=0x202, reload=True):
    """Ring-0 code that IRETs to `code` in ring 3 (with the given EFLAGS), which then reports
    completion through INT 0x80."""
    return f"""
    push 0x23
    push ustack_top
    push {eflags:#x}
    push 0x1b
    mov eax, u3_entry
    push eax
    iretd
u3_entry:
{"    mov ax, 0x23" + chr(10) + "    mov ds, ax" + chr(10) + "    mov es, ax" if reload else ""}
{code}
    mov dword ptr [results + 20], 0x600d
    int 0x80
u3_spin:
    jmp u3_spin
"""


def run(ring0="", ring3=None, prelude=True):
    """Boot a test kernel; returns (MachineExit, results dict, the 32 dwords at OUT)."""
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build((PRELUDE if prelude else "") + ring0, ring3))
        res = m.run()
        vals = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))
        out = list(struct.unpack("<32I", m.cpu.read_phys(OUT, 128)))
        return res, dict(zip(("vector", "error", "cr2", "eip", "cs", "marker", "eflags"), vals)), out
    finally:
        m.close()


def completed(res, r, ring3=False):
    assert r["marker"] == GOOD, (res.status, res.message, r)
    if ring3:
        assert r["vector"] == 0x80 and r["cs"] == 0x1B, r
    else:
        assert res.status == 0 and res.message == "", (res.status, res.message)


def faulted(r, vector, error):
    assert (r["vector"], r["error"]) == (vector, error) and r["marker"] != GOOD, \
        f"vector {r['vector']} error {r['error']:#x} marker {r['marker']:#x}"


def store(i, reg="eax"):
    return f"    mov dword ptr [{OUT + 4 * i:#x}], {reg}\n"


IF, IOPL3, ZF, CF, OF = 0x200, 0x3000, 0x40, 0x1, 0x800


def test_table_lists_every_sensitive_instruction():
    listed = {row[0] for row in sensitive.table()}
    for m in ("pushfd", "popfd", "sgdt", "sidt", "sldt", "smsw", "str", "lar", "lsl", "verr", "verw",
              "mov sreg", "ljmp", "lcall", "retf", "int", "into", "int3", "iretd", "cli", "sti", "lgdt",
              "lidt", "lldt", "ltr", "lmsw", "mov crN/drN", "clts", "in", "out", "insb", "outsd", "hlt",
              "invlpg", "invd", "wbinvd", "rdmsr", "wrmsr", "rdpmc", "cpuid", "rdtsc", "sysenter", "sysexit",
              "lds", "lss"):
        assert m in listed, m


# ---- privileged instructions from ring 3: #GP(0) at the instruction ---------------------------------
PRIVILEGED = ["cli", "sti", "hlt", "in al, 0x80", "out 0x80, al", "in eax, dx", "out dx, al", "insb", "rep outsd",
              "mov eax, cr0", "mov eax, cr2", "mov eax, cr3", "mov eax, cr4", "mov cr0, eax", "mov cr2, eax",
              "mov cr3, eax", "mov cr4, eax", "mov eax, dr0", "mov eax, dr7", "mov dr0, eax", "mov dr7, eax",
              "lgdt [0x300100]", "lidt [0x300100]", "lldt ax", "ltr ax", "lmsw ax", "clts", "invlpg [0x1000]",
              "invd", "wbinvd", "rdmsr", "wrmsr", "rdpmc", "sysexit"]


@pytest.mark.parametrize("insn", PRIVILEGED)
def test_privileged_from_ring3_is_gp0_at_the_instruction(insn):
    body = f"    mov eax, here\n{store(0)}    mov ecx, 0x174\n    mov edx, 0x80\n    mov ax, 0x28\nhere:\n    {insn}\n"
    res, r, out = run(to_ring3(body), prelude=False)
    faulted(r, 13, 0)
    assert r["cs"] == 0x1B and r["eip"] == out[0]


# ---- descriptor-table registers -------------------------------------------------------------------------
def _tables_body():
    return ("    sgdt [0x300100]\n    sidt [0x300108]\n    mov ebx, 0xffffffff\n    sldt ebx\n" + store(4, "ebx")
            + "    str ebx\n" + store(5, "ebx") + "    smsw ebx\n" + store(6, "ebx")
            + "    mov dword ptr [0x30011c], 0xffffffff\n    str word ptr [0x30011c]\n")


@pytest.mark.parametrize("ring", [0, 3])
def test_sgdt_sidt_sldt_str_smsw(ring):
    body = _tables_body()
    res, r, out = run(body if ring == 0 else to_ring3(body))
    completed(res, r, ring == 3)
    raw = struct.pack("<8I", *out[:8])
    assert struct.unpack_from("<HI", raw, 0) == (GDT_LIMIT, NEW_GDT)
    assert struct.unpack_from("<HI", raw, 8) == (256 * 8 - 1, 0x303000)
    assert out[4] & 0xFFFF == SEL["ldt"] and out[5] & 0xFFFF == SEL["tss2"] and out[6] & 0xFFFF == 0x11
    assert out[7] == 0xFFFF0050     # a memory destination is 16 bits


def test_lgdt_lidt_and_sgdt_reads_them_back():
    body = """
    mov word ptr [0x300180], 0x2f
    mov dword ptr [0x300182], gdt
    lgdt [0x300180]
    sgdt [0x300100]
    mov word ptr [0x300188], 0x3ff
    mov dword ptr [0x30018a], 0x500000
    lidt [0x300188]
    sidt [0x300108]
    lidt [idt_desc]
    mov ax, 0x10
    mov ds, ax
"""
    res, r, out = run(body, prelude=False)
    completed(res, r)
    raw = struct.pack("<4I", *out[:4])
    assert struct.unpack_from("<H", raw, 0)[0] == 0x2F and struct.unpack_from("<HI", raw, 8) == (0x3FF, 0x500000)


def test_ltr_marks_the_tss_busy_and_lldt_switches_the_ldt():
    body = ("    str eax\n" + store(0) + f"    mov eax, dword ptr [{NEW_GDT + 0x54:#x}]\n" + store(1)
            + "    sldt eax\n" + store(2) + "    mov ax, 0x0c\n    mov gs, ax\n    mov eax, dword ptr gs:[0]\n" + store(3)
            + "    xor eax, eax\n    lldt ax\n    sldt eax\n" + store(4))
    res, r, out = run(body)
    completed(res, r)
    assert out[0] == 0x50 and (out[1] >> 8) & 0xF == 0xB
    assert out[2] == 0x30 and out[3] == 0x1D7D1D7D and out[4] == 0


@pytest.mark.parametrize("insn,sel,vector", [
    ("ltr", 0x28, 13),          # busy TSS
    ("ltr", 0x10, 13),          # not a TSS
    ("ltr", 0x00, 13),          # null
    ("ltr", 0x0C, 13),          # LDT selector
    ("ltr", 0x68, 13),          # beyond the GDT limit
    ("lldt", 0x10, 13),         # not an LDT
    ("lldt", 0x50, 13),
])
def test_ltr_lldt_bad_selectors(insn, sel, vector):
    res, r, _ = run(f"    mov ax, {sel:#x}\n    {insn} ax\n")
    faulted(r, vector, sel & 0xFFFC)


# ---- LAR LSL VERR VERW ------------------------------------------------------------------------------------
SEGCHECK = [
    # ring, insn, selector, ZF, value (LAR: access rights, hi & 0x00F0FF00 (limit 19:16 undefined, compared
    # masked; 0x08 shows the accessed bit set by the far JMP that loaded CS); LSL: the byte limit)
    (0, "lar", 0x08, 1, 0x00C09B00), (0, "lar", 0x10, 1, 0x00C09300), (0, "lsl", 0x10, 1, 0xFFFFFFFF),
    (0, "lar", 0x28, 1, 0x00008B00), (0, "lsl", 0x28, 1, 0x67), (0, "lar", 0x30, 1, 0x00008200),
    (0, "lsl", 0x30, 1, 0x17), (0, "lar", 0x43, 1, 0x0040F000), (0, "lsl", 0x43, 1, 0xFFF),
    (0, "lar", 0x60, 1, 0x0000EC00), (0, "lsl", 0x60, 0, None), (0, "lar", 0x00, 0, None),
    (0, "lsl", 0x68, 0, None), (0, "lsl", 0x0C, 1, 0xFFFF), (0, "lar", 0x13, 0, None),
    (0, "verr", 0x10, 1, None), (0, "verw", 0x10, 1, None), (0, "verr", 0x40, 1, None),
    (0, "verw", 0x40, 0, None), (0, "verr", 0x08, 1, None), (0, "verw", 0x08, 0, None),
    (0, "verr", 0x48, 0, None), (0, "verr", 0x28, 0, None), (0, "verr", 0x00, 0, None),
    (0, "verw", 0x13, 0, None), (0, "verr", 0x68, 0, None), (0, "verr", 0x0C, 1, None),
    (3, "lar", 0x28, 0, None), (3, "lsl", 0x10, 0, None), (3, "lsl", 0x23, 1, 0xFFFFFFFF),
    (3, "lar", 0x43, 1, 0x0040F000), (3, "lsl", 0x0F, 1, 0xFFFF), (3, "lar", 0x58, 1, 0x00C09E00),
    (3, "verr", 0x10, 0, None), (3, "verr", 0x23, 1, None), (3, "verw", 0x23, 1, None),
    (3, "verr", 0x08, 0, None), (3, "verr", 0x58, 1, None), (3, "verw", 0x43, 0, None),
]


@pytest.mark.parametrize("ring,insn,sel,zf,value", SEGCHECK)
def test_lar_lsl_verr_verw(ring, insn, sel, zf, value):
    if insn in ("lar", "lsl"):
        op = f"    mov ebx, 0xdeadbeef\n    {insn} ebx, eax\n"
    else:
        op = f"    {insn} ax\n"
    flags = "    stc\n" if zf else "    xor ecx, ecx\n"     # ZF starts opposite to what is expected
    body = f"    mov eax, {sel:#x}\n{flags}{op}    pushfd\n    pop ecx\n" + store(0, "ebx") + store(1, "ecx")
    res, r, out = run(body if ring == 0 else to_ring3(body))
    completed(res, r, ring == 3)
    assert bool(out[1] & ZF) == bool(zf)
    if insn == "lar" and zf:
        assert out[0] & 0xFFF0FFFF == value
    elif insn in ("lar", "lsl"):
        assert out[0] == (value if zf else 0xDEADBEEF)


# ---- MSW, control and debug registers ------------------------------------------------------------------------
def test_lmsw_smsw_clts():
    body = ("    mov ax, 0x000e\n    lmsw ax\n    mov eax, cr0\n" + store(0) + "    smsw ebx\n" + store(1, "ebx")
            + "    mov dword ptr [0x300108], 0xffffffff\n    smsw word ptr [0x300108]\n"
            + "    clts\n    mov eax, cr0\n" + store(3) + "    xor eax, eax\n    lmsw ax\n    mov eax, cr0\n" + store(4))
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[0] == 0x1F and out[1] & 0xFFFF == 0x1F and out[2] == 0xFFFF001F
    assert out[3] == 0x17          # CLTS clears TS only
    assert out[4] == 0x11          # LMSW cannot clear PE


def test_mov_cr_read_back():
    body = ("    mov eax, 0x301000\n    mov cr3, eax\n    mov ebx, cr3\n" + store(0, "ebx")
            + "    mov eax, 0x12345678\n    mov cr2, eax\n    mov ebx, cr2\n" + store(1, "ebx")
            + "    mov eax, 0x14\n    mov cr4, eax\n    mov ebx, cr4\n" + store(2, "ebx")
            + "    mov ebx, cr0\n" + store(3, "ebx")
            + "    mov eax, cr0\n    or eax, 8\n    mov cr0, eax\n    mov ebx, cr0\n" + store(4, "ebx"))
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[:5] == [0x301000, 0x12345678, 0x14, 0x11, 0x19]


def test_mov_cr4_reserved_bit_is_gp():
    res, r, _ = run("    mov eax, 0x8000\n    mov cr4, eax\n", prelude=False)
    faulted(r, 13, 0)


def test_mov_dr_read_back():
    body = ("    mov eax, 0x1234\n    mov dr0, eax\n    mov eax, 0x5678\n    mov dr3, eax\n    mov eax, 1\n    mov dr7, eax\n"
            "    mov eax, dr0\n" + store(0) + "    mov eax, dr3\n" + store(1) + "    mov eax, dr7\n" + store(2)
            + "    mov eax, dr6\n" + store(3))
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[:4] == [0x1234, 0x5678, 0x401, 0xFFFF0FF0]


# ---- time stamp counter, CPUID, MSRs ------------------------------------------------------------------
def _rdtsc_twice():
    return ("    rdtsc\n" + store(0) + store(1, "edx") + "    mov ecx, 50\nspin_tsc:\n    loop spin_tsc\n"
            "    rdtsc\n" + store(2) + store(3, "edx"))


@pytest.mark.parametrize("ring,tsd", [(0, False), (0, True), (3, False)])
def test_rdtsc_monotonic(ring, tsd):
    pre = "    mov eax, 4\n    mov cr4, eax\n" if tsd else ""
    res, r, out = run(pre + (_rdtsc_twice() if ring == 0 else to_ring3(_rdtsc_twice())), prelude=False)
    completed(res, r, ring == 3)
    assert (out[3] << 32 | out[2]) > (out[1] << 32 | out[0]) > 0


def test_rdtsc_in_ring3_with_cr4_tsd_is_gp():
    res, r, _ = run("    mov eax, 4\n    mov cr4, eax\n" + to_ring3("    rdtsc\n"), prelude=False)
    faulted(r, 13, 0)
    assert r["cs"] == 0x1B


@pytest.mark.parametrize("ring", [0, 3])
def test_cpuid(ring):
    body = ("    xor eax, eax\n    cpuid\n" + store(0) + store(1, "ebx") + store(2, "edx") + store(3, "ecx")
            + "    mov eax, 1\n    cpuid\n" + store(4) + store(5, "edx"))
    res, r, out = run(body if ring == 0 else to_ring3(body), prelude=False)
    completed(res, r, ring == 3)
    assert out[0] >= 1 and struct.pack("<3I", *out[1:4]) == b"BTVMbtvmBTVM"
    assert (out[4] >> 8) & 0xF == 6
    for bit in (0, 4, 8, 15, 3, 13, 11, 5):     # FPU TSC CX8 CMOV PSE PGE SEP MSR
        assert out[5] >> bit & 1, bit


def test_rdmsr_wrmsr_sysenter_msrs_and_tsc():
    body = "".join(f"    mov ecx, {msr:#x}\n    mov eax, {v:#x}\n    xor edx, edx\n    wrmsr\n"
                   for msr, v in ((0x174, 0x08), (0x175, 0x305F00), (0x176, 0x123456)))
    for i, msr in enumerate((0x174, 0x175, 0x176, 0x10)):
        body += f"    mov ecx, {msr:#x}\n    rdmsr\n" + store(2 * i) + store(2 * i + 1, "edx")
    body += "    mov ecx, 0x10\n    mov edx, 5\n    xor eax, eax\n    wrmsr\n    rdmsr\n" + store(8) + store(9, "edx")
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[:6] == [0x08, 0, 0x305F00, 0, 0x123456, 0]
    assert out[6] or out[7]
    assert out[9] == 5 and out[8] < 1000      # the TSC was set to 5 << 32 a few instructions ago


@pytest.mark.parametrize("insn", ["rdmsr", "wrmsr", "rdpmc"])
def test_unknown_msr_and_rdpmc_are_gp(insn):
    res, r, _ = run(f"    mov ecx, 0x1234\n    {insn}\n", prelude=False)
    faulted(r, 13, 0)


# ---- port I/O ----------------------------------------------------------------------------------------
def test_in_out_cmos():
    body = ("    xor eax, eax\n    mov al, 0\n    out 0x70, al\n    in al, 0x71\n" + store(0)
            + "    mov al, 0x15\n    out 0x70, al\n    in al, 0x71\n" + store(1)
            + "    mov dx, 0x70\n    mov al, 0x16\n    out dx, al\n    mov dx, 0x71\n    in al, dx\n" + store(2))
    before = int(time.time())
    res, r, out = run(body, prelude=False)
    after = int(time.time())
    completed(res, r)
    sec = out[0]
    assert sec & 0xF < 10 and sec >> 4 < 6
    assert (sec >> 4) * 10 + (sec & 0xF) in {(t % 60) for t in range(before - 1, after + 2)}
    assert out[1:3] == [0x80, 0x02]       # base memory 640 KiB


def test_rep_ins_outs_through_the_uart_scratch_register():
    body = ("    mov dword ptr [0x300180], 0x44332211\n    mov esi, 0x300180\n    mov ecx, 4\n    mov dx, 0x3ff\n"
            "    rep outsb\n" + store(0, "esi") + store(1, "ecx")
            + "    mov edi, 0x300140\n    mov ecx, 3\n    rep insb\n" + store(2, "edi") + store(3, "ecx")
            + "    std\n    mov edi, 0x30014b\n    mov ecx, 2\n    mov al, 0x5a\n    out dx, al\n    rep insb\n    cld\n"
            + store(4, "edi") + "    mov dword ptr [0x3001a0], 0x77\n    mov esi, 0x3001a0\n    outsb\n    in al, dx\n"
            + store(5))
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[0] == 0x300184 and out[1] == 0
    assert out[2] == 0x300143 and out[3] == 0
    assert out[4] == 0x300149
    data = struct.pack("<4I", *out[16:20])
    assert data[:3] == b"\x44" * 3 and data[3] == 0 and data[10:12] == b"\x5a\x5a"
    assert out[5] & 0xFF == 0x77


IOMAP = [("in al, 0x71", True), ("out 0x70, al", True), ("in ax, 0x70", True), ("in al, 0x60", False),
         ("in ax, 0x71", False), ("mov dx, 0x3ff\n    in al, dx", True), ("mov dx, 0x3ff\n    in ax, dx", False),
         ("mov dx, 0x3ff\n    mov esi, 0x300180\n    mov ecx, 2\n    rep outsb", True),
         ("mov dx, 0x3fe\n    mov esi, 0x300180\n    outsb", False),
         ("mov dx, 0x3ff\n    mov edi, 0x300180\n    insb", True)]


def test_in_merges_into_eax_and_out_sends_its_low_part():
    # The UART's scratch register (0x3FF) keeps what OUT wrote; a 16-bit IN at 0x3FE reads the
    # modem status (0x3FE) and the scratch byte as two byte cycles.  IN AL/AX leave the rest of
    # EAX as it was.
    body = ("    mov eax, 0x12345678\n    mov dx, 0x3ff\n    out dx, al\n"
            "    mov eax, 0xaabbccdd\n    in al, dx\n" + store(0) +
            "    mov eax, 0x11223344\n    mov dx, 0x3fe\n    in ax, dx\n" + store(1) +
            "    mov eax, 0x55667788\n    out dx, eax\n    mov eax, 0\n    in al, 0x80\n" + store(2))
    res, r, out = run(body)
    completed(res, r)
    assert out[0] == 0xAABBCC78
    assert out[1] >> 8 == 0x112278          # AH: the scratch byte; AL: the modem status
    assert out[2] & 0xFFFFFF00 == 0


@pytest.mark.parametrize("insn,allowed", IOMAP)
def test_ring3_io_through_the_tss_bitmap(insn, allowed):
    res, r, _ = run(to_ring3(f"    mov al, 0\n    {insn}\n"))
    if allowed:
        completed(res, r, True)
    else:
        faulted(r, 13, 0)


@pytest.mark.parametrize("insn", ["in al, 0x60", "out 0x80, al", "mov dx, 0x3ff\n    mov esi, 0x300180\n    outsb",
                                  "in eax, 0x40"])
def test_ring3_io_allowed_at_iopl3_without_a_bitmap(insn):
    res, r, _ = run(to_ring3(f"    {insn}\n", eflags=0x3202), prelude=False)
    completed(res, r, True)


# ---- IF, IOPL: CLI STI POPF PUSHF IRET ------------------------------------------------------------------
@pytest.mark.parametrize("ring,iopl,pushed,expect", [
    (0, 0, 0x3203, IF | IOPL3 | CF),     # ring 0 changes IF and IOPL
    (3, 0, 0x3001, IF | CF),             # IF and IOPL silently kept at CPL 3, IOPL 0; CF still changes
    (3, 3, 0x0001, CF | IOPL3),          # IOPL 3: IF changes, IOPL does not
])
def test_popf_if_and_iopl_by_cpl(ring, iopl, pushed, expect):
    body = f"    push {pushed:#x}\n    popfd\n    pushfd\n    pop eax\n" + store(0) + "    push 0x2\n    popfd\n"
    code = body if ring == 0 else to_ring3(body, eflags=0x202 | (iopl << 12))
    res, r, out = run(code, prelude=False)
    completed(res, r, ring == 3)
    assert out[0] & (IF | IOPL3 | CF) == expect


@pytest.mark.parametrize("ring,iopl", [(0, 0), (3, 0), (3, 3)])
def test_pushf_shows_the_virtual_if_and_iopl(ring, iopl):
    body = "    pushfd\n    pop eax\n" + store(0)
    code = body if ring == 0 else to_ring3(body, eflags=0x202 | (iopl << 12))
    res, r, out = run(code, prelude=False)
    completed(res, r, ring == 3)
    assert out[0] & (IF | IOPL3) == (0 if ring == 0 else IF | (iopl << 12))


@pytest.mark.parametrize("insn,iopl,gp", [("cli", 0, True), ("sti", 0, True), ("cli", 3, False), ("sti", 3, False)])
def test_cli_sti_in_ring3_by_iopl(insn, iopl, gp):
    body = f"    {insn}\n    pushfd\n    pop eax\n" + store(0)
    res, r, out = run(to_ring3(body, eflags=0x202 | (iopl << 12)), prelude=False)
    if gp:
        faulted(r, 13, 0)
    else:
        completed(res, r, True)
        assert bool(out[0] & IF) == (insn == "sti")


def test_cli_sti_in_ring0():
    body = ("    sti\n    pushfd\n    pop eax\n" + store(0) + "    cli\n    pushfd\n    pop eax\n" + store(1))
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[0] & IF and not out[1] & IF


def test_hlt_in_ring0_waits_for_the_timer_interrupt():
    body = pic_and_pit(0xFE, 2, 0x2E9B) + "    mov eax, after_hlt\n" + store(0) + \
        "    sti\n    hlt\nafter_hlt:\n    jmp after_hlt\n"
    res, r, out = run(body, prelude=False)
    assert r["vector"] == 0x20 and r["eip"] == out[0] and r["eflags"] & IF


def _one_shot(imr, wait=300000):
    """The PIT's one-shot IRQ0 (256 ticks: ~215,000 instructions at icount's 1 ns each), then a
    loop of `wait` iterations (interrupts disabled, they are on entry)."""
    return pic_and_pit(imr, 0, 256) + (f"    mov ecx, {wait}\nwait_irq:\n    dec ecx\n    jnz wait_irq\n" if wait else "")


@pytest.mark.parametrize("imr,enable", [
    (0xFE, "push 0x202\n    popfd"),                                  # inline in translated code
    (0xFE, "sti\n    nop"),                                           # after STI's shadow
    (0xFE, "push 0x202\n    push 0x08\n    mov eax, enabled\n    push eax\n    iretd"),  # IRET, same ring
    (0xFF, "sti\n    mov al, 0xfe\n    out 0x21, al"),                # an OUT that unmasks IRQ0
    (0xFF, "sti\n    nop\n    mov al, 0xfe\n    out 0x21, al"),       # ... after an inline STI
])
def test_an_interrupt_made_deliverable_is_taken_at_the_next_instruction_boundary(imr, enable):
    # SDM Vol. 3A 6.6: a pending maskable interrupt is recognized at the next instruction boundary
    # once IF (or, here, the PIC's mask) allows it, not at the end of btvm's time slice.  The PIT
    # (one-shot, 256 ticks: ~215,000 instructions at icount's 1 ns each) raises IRQ0 while the
    # loop waits 600,000 instructions with interrupts disabled.
    body = _one_shot(imr) + "    mov eax, enabled\n" + store(0) + f"    {enable}\nenabled:\n" + \
        "    mov ecx, 100000\nlate:\n    dec ecx\n    jnz late\n"
    res, r, out = run(body, prelude=False)
    assert r["vector"] == 0x20 and r["cs"] == 0x08, r
    assert r["eip"] == out[0], f"interrupted at {r['eip']:#x}, not at {out[0]:#x}"


def test_iret_same_ring_restores_flags():
    body = ("    push 0x3003\n    push 0x08\n    mov eax, iret_to\n    push eax\n    iretd\n    hlt\niret_to:\n"
            "    pushfd\n    pop eax\n" + store(0) + "    mov eax, cs\n" + store(1) + "    push 0x2\n    popfd\n")
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[0] & (IOPL3 | CF | IF) == IOPL3 | CF and out[1] == 0x08


def test_a_timer_is_not_late_behind_port_io_in_a_slice():
    # A slice runs to the next deadline in instructions, but each IN/OUT also costs virtual time
    # (1 us): a polling loop must still see the one-shot IRQ0 (256 ticks, ~215 us) on time, not
    # ~4M instructions (4 s of I/O) later.
    body = _one_shot(0xFE, wait=0) + \
        "    xor ecx, ecx\n    sti\npoll:\n    in al, 0x80\n    inc ecx\n    jmp poll\n"
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build(body))
        m.run()
        assert struct.unpack("<I", m.cpu.read_phys(RESULTS, 4))[0] == 0x20
        assert 150 < m.cpu.reg("ecx") < 300, m.cpu.reg("ecx")
    finally:
        m.close()


# An IRQ0 handler (vector 0x20) that counts the ticks at OUT and returns.
COUNT_TICKS = ("    jmp setup\nirq0:\n    push eax\n    mov al, 0x20\n    out 0x20, al\n"
               f"    inc dword ptr [{OUT:#x}]\n    pop eax\n    iretd\nsetup:\n    mov eax, irq0\n"
               "    mov word ptr [idt + 0x20*8], ax\n    shr eax, 16\n    mov word ptr [idt + 0x20*8 + 6], ax\n")


def test_slices_ending_at_timer_deadlines_do_not_single_step(monkeypatch):
    # A 10 kHz PIT in icount mode: slices end near each deadline, a block short at most; the
    # remainder must not run one instruction at a time (KEY_STEP translations at random places).
    pit = pic_and_pit(0xFE, 2, 119)
    loop = "".join(f"    add {r}, {i}\n" for i, r in enumerate(("eax", "ecx", "edx", "esi", "edi", "ebp") * 2))
    body = COUNT_TICKS + pit + f"    sti\nmain:\n{loop}    cmp dword ptr [{OUT:#x}], 500\n    jb main\n    cli\n"
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build(body))
        m.run()
        assert struct.unpack("<I", m.cpu.read_phys(OUT, 4))[0] >= 500
        assert not [k for _, k in m.cpu.cache.blocks if k & S.KEY_STEP]
    finally:
        m.close()


def test_host_clock_tsc_keeps_up_with_the_host_clock():
    # With -clock host the devices follow the host's clock while the TSC counts instructions (and
    # charged time): 40 PIT ticks of 1 ms mostly halted take ~40 ms, and the TSC (1 GHz) must show
    # at least that much, as the PIT the kernel calibrates it against does; it had advanced only
    # by the instructions run (~200,000 ticks).
    body = (COUNT_TICKS + pic_and_pit(0xFE, 2, 1193) + "    rdtsc\n    mov esi, eax\n    mov edi, edx\n    sti\n"
            f"wait:\n    hlt\n    cmp dword ptr [{OUT:#x}], 40\n    jb wait\n    cli\n    rdtsc\n    sub eax, esi\n"
            "    sbb edx, edi\n" + store(1) + store(2, "edx"))
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=False)
    try:
        m.load_multiboot(build(body))
        t0 = time.monotonic_ns()
        m.run(timeout=30)
        elapsed = time.monotonic_ns() - t0
        lo, hi = struct.unpack("<II", m.cpu.read_phys(OUT + 4, 8))
        assert 35_000_000 <= lo + (hi << 32) <= elapsed + 10_000_000, (lo + (hi << 32), elapsed)
    finally:
        m.close()


def test_inline_iret_refuses_a_cs_the_vmm_made_whose_gdt_entry_is_empty():
    # After SYSENTER, CS holds a descriptor the VMM made (not read from the GDT): an IRET to that
    # selector must read the GDT, find it empty (not a code segment) and fault, as the runtime
    # does.  The #GP cannot be delivered through the same selector either: a triple fault.
    body = ("    cli\n    mov ecx, 0x174\n    mov eax, 0x08\n    xor edx, edx\n    wrmsr\n"
            "    mov ecx, 0x175\n    mov eax, esp\n    wrmsr\n    mov ecx, 0x176\n    mov eax, after_se\n"
            "    wrmsr\n    sysenter\nafter_se:\n    mov dword ptr [gdt + 8], 0\n    mov dword ptr [gdt + 12], 0\n"
            + _iret_here(1, 0x2) + "    mov eax, 0x1234\n" + store(0))
    res, r, out = run(body, prelude=False)
    assert "triple fault" in res.message and out[0] != 0x1234


def test_popf_in_ring3_with_iopl3_takes_a_pending_interrupt_at_once():
    # At CPL 3 with IOPL 3 POPF may set IF: a pending IRQ is taken right after it.  The third pass
    # (the first two warm the blocks up and chain them) waits for the IRQ with IF clear.
    ring0 = _one_shot(0xFE, wait=0)
    code = ("    xor ebx, ebx\ntop:\n    push 0x3002\n    popfd\n    mov ecx, 10\n    cmp ebx, 2\n    jne w3\n"
            "    mov ecx, 300000\nw3:\n    dec ecx\n    jnz w3\n    mov eax, en3\n" + store(0)
            + "    push 0x3202\n    popfd\nen3:\n    mov ecx, 1000\nl3:\n    dec ecx\n    jnz l3\n"
            "    inc ebx\n    cmp ebx, 3\n    jb top\n")
    res, r, out = run(ring0 + to_ring3(code, eflags=0x3002), prelude=False)
    assert r["vector"] == 0x20 and r["cs"] == 0x1B and r["eip"] == out[0], (hex(r["eip"]), hex(out[0]))


def _iret_here(n, flags):
    """A ring-0 IRET to the next instruction with the given EFLAGS in its frame."""
    return (f"    push {flags:#x}\n    push 0x08\n    mov eax, back{n}\n    push eax\n    iretd\nback{n}:\n")


@pytest.mark.parametrize("flags,before,runtime_calls", [
    (0x8D5, "", 0),                              # the status flags; IF clear: inline
    (0x244602, "", 0),                           # ID AC NT DF IF: inline
    (0x3002, "", 1),                             # IOPL 3 changes the mode key: the runtime
    (0x202, "    or byte ptr [gdt + 14], 0x10\n", 1),  # CS's GDT entry changed (AVL) since CS was loaded
])
def test_iret_in_ring0_inline_or_through_the_runtime(monkeypatch, flags, before, runtime_calls):
    # The inline IRET (bt/semantics/system.py iretd) must do what the runtime's does (SDM IRET:
    # EFLAGS from the frame under the CPL-0 mask, RF not loaded, ESP past the frame) and leave the
    # cases it cannot prove unchanged (another descriptor, IOPL, TF) to the runtime.
    from runtime.system import callouts
    calls = []
    real = callouts.HANDLERS["iret"]
    monkeypatch.setitem(callouts.HANDLERS, "iret", lambda cpu, insn: calls.append(1) or real(cpu, insn))
    body = ("    cli\n    mov ecx, esp\n" + before + _iret_here(1, flags) + "    pushfd\n    pop eax\n" + store(0)
            + "    mov eax, esp\n    sub eax, ecx\n" + store(1) + "    push 0x2\n    popfd\n"
            + _iret_here(2, 0x2) + "    mov eax, cs\n" + store(2))
    res, r, out = run(body, prelude=False)
    completed(res, r)
    mask = 0x244DD5 | 0x2 | 0x3000 | 0x200
    assert out[0] == (flags & mask) | 0x2, hex(out[0])
    assert out[1] == 0 and out[2] == 0x08
    assert len(calls) == runtime_calls      # the second IRET (frame EFLAGS 0x2) is inline in every case


def test_iret_to_ring3_switches_stack_and_nulls_ring0_data_segments():
    # DS is null now: read it, then reload it before storing (an access through it is #GP(0)).
    body = "    mov ecx, ds\n    mov ax, 0x23\n    mov ds, ax\n    mov es, ax\n" + store(0, "ecx") \
        + "    mov eax, ss\n" + store(1) + "    mov eax, cs\n" + store(2) \
        + "    mov eax, esp\n" + store(3) + "    mov eax, fs\n" + store(4)
    res, r, out = run("    mov ax, 0x23\n    mov fs, ax\n" + to_ring3(body, reload=False), prelude=False)
    completed(res, r, True)
    assert out[:5] == [0, 0x23, 0x1B, 0x308000, 0x23]


def test_iret_in_ring3_ignores_if_and_iopl():
    body = "    push 0x3001\n    push 0x1b\n    mov eax, iret3_to\n    push eax\n    iretd\niret3_to:\n    pushfd\n    pop eax\n" \
        + store(0)
    res, r, out = run(to_ring3(body), prelude=False)
    completed(res, r, True)
    assert out[0] & (IF | IOPL3 | CF) == IF | CF


def test_iret_from_ring3_to_ring0_is_gp():
    res, r, _ = run(to_ring3("    push 0x202\n    push 0x08\n    push 0x100000\n    iretd\n"), prelude=False)
    faulted(r, 13, 0x08)


# ---- software interrupts -------------------------------------------------------------------------------
@pytest.mark.parametrize("ring,setup,insn,vector,error", [
    (0, "", "int3", 3, None), (0, "", "int 0x41", 0x41, None), (0, "mov al, 0x7f\n    add al, 1", "into", 4, None),
    (0, "", "int 0x80", 0x80, None),
    (3, "", "int3", 13, 3 * 8 + 2), (3, "", "int 0x41", 13, 0x41 * 8 + 2),
    (3, "mov al, 0x7f\n    add al, 1", "into", 13, 4 * 8 + 2),
])
def test_int3_into_int_n(ring, setup, insn, vector, error):
    # Through a DPL 0 gate from ring 3: #GP(vector*8+2) at the instruction; otherwise a trap after it.
    body = (f"    mov eax, before_int\n{store(0)}    mov eax, after_int\n{store(1)}    {setup}\n"
            f"before_int:\n    {insn}\nafter_int:\n    nop\n")
    res, r, out = run(body if ring == 0 else to_ring3(body), prelude=False)
    if error is None:
        assert r["vector"] == vector and r["error"] == 0xFFFFFFFF and r["marker"] != GOOD
        assert r["eip"] == out[1] and r["cs"] == 0x08
    else:
        faulted(r, vector, error)
        assert r["eip"] == out[0] and r["cs"] == 0x1B


@pytest.mark.parametrize("ring", [0, 3])
def test_into_with_of_clear_is_a_no_op(ring):
    body = "    xor eax, eax\n    into\n"
    res, r, _ = run(body if ring == 0 else to_ring3(body), prelude=False)
    completed(res, r, ring == 3)


# ---- SYSENTER / SYSEXIT -------------------------------------------------------------------------------
SYSENTER_SETUP = ("".join(f"    mov ecx, {msr:#x}\n    mov eax, {v}\n    xor edx, edx\n    wrmsr\n"
                          for msr, v in ((0x174, "0x08"), (0x175, "0x305f00"), (0x176, "sys_entry")))
                  + "    jmp sys_skip\nsys_entry:\n    pushfd\n    pop eax\n" + store(0) + "    mov eax, cs\n" + store(1)
                  + "    mov eax, ss\n" + store(2) + "    mov eax, esp\n" + store(3)
                  + "    mov ecx, ebp\n    mov edx, sys_back\n    sysexit\nsys_skip:\n")


def test_sysenter_to_ring0_and_sysexit_back():
    ring3 = ("    mov ebp, esp\n    sysenter\nsys_back:\n    mov eax, cs\n" + store(4) + "    mov eax, ss\n" + store(5)
             + "    mov eax, esp\n" + store(6))
    res, r, out = run(SYSENTER_SETUP + to_ring3(ring3), prelude=False)
    completed(res, r, True)
    assert not out[0] & IF and out[1:4] == [0x08, 0x10, 0x305F00]
    assert out[4:7] == [0x1B, 0x23, 0x308000]


def test_sysenter_with_null_sysenter_cs_is_gp():
    res, r, _ = run(to_ring3("    sysenter\n"), prelude=False)
    faulted(r, 13, 0)


# ---- segment registers: MOV, PUSH, POP, LxS -----------------------------------------------------------------
def test_segment_register_moves_in_ring0():
    body = ("    mov ax, 0x08\n    mov fs, ax\n    mov eax, 0xffffffff\n    mov eax, fs\n" + store(0)
            + "    push fs\n    pop gs\n    mov eax, gs\n" + store(1)
            + "    .byte 0x1e\n    pop eax\n" + store(2)               # push ds (32-bit)
            + "    push 0x0c\n    .byte 0x07\n    mov eax, es:[0]\n" + store(3)   # pop es: the LDT segment
            + "    mov ax, 0x10\n    mov es, ax\n"
            + "    xor eax, eax\n    mov ds, ax\n    mov eax, 0x10\n    mov eax, ds\n"
            + f"    mov dword ptr es:[{OUT + 16:#x}], eax\n"                 # not through the null DS
            + "    mov ax, 0x10\n    mov ds, ax\n"
            + "    mov dword ptr [0x300180], 0x1234\n    mov word ptr [0x300184], 0x0c\n    lfs ebx, fword ptr [0x300180]\n"
            + store(5, "ebx") + "    mov eax, fs:[0]\n" + store(6)
            + "    mov dword ptr [0x300188], 0x305e00\n    mov word ptr [0x30018c], 0x10\n    mov ebx, esp\n"
            + "    lss esp, fword ptr [0x300188]\n    mov eax, esp\n    mov esp, ebx\n" + store(7)
            + "    mov ax, 0x58\n    mov gs, ax\n    mov eax, gs\n" + store(8))
    res, r, out = run(body)
    completed(res, r)
    assert out[:9] == [0x08, 0x08, 0x10, 0x1D7D1D7D, 0, 0x1234, 0x1D7D1D7D, 0x305E00, 0x58]


@pytest.mark.parametrize("ring,code,vector,error", [
    (0, "mov ax, 0x38\n    mov ds, ax", 11, 0x38),          # not present
    (0, "mov ax, 0x28\n    mov ds, ax", 13, 0x28),          # system descriptor
    (0, "mov ax, 0x48\n    mov es, ax", 13, 0x48),          # execute-only code
    (0, "mov ax, 0x68\n    mov fs, ax", 13, 0x68),          # beyond the GDT limit
    (0, "mov ax, 0x0c\n    mov fs, ax\n    xor eax, eax\n    lldt ax\n    mov ax, 0x0c\n    mov gs, ax", 13, 0x0C),
    (0, "xor eax, eax\n    mov ss, ax", 13, 0),              # null SS
    (0, "mov ax, 0x23\n    mov ss, ax", 13, 0x20),          # RPL != CPL
    (0, "mov ax, 0x08\n    mov ss, ax", 13, 0x08),          # code
    (0, "mov ax, 0x13\n    mov ds, ax", 13, 0x10),          # RPL > DPL
    (0, "push 0x28\n    .byte 0x1f", 13, 0x28),             # pop ds
    (0, "push 0\n    .byte 0x17", 13, 0),                   # pop ss
    (0, "mov word ptr [0x300184], 0x48\n    lds ebx, fword ptr [0x300180]", 13, 0x48),
    (0, ".byte 0x8e, 0xc8", 6, None),                       # mov cs, ax
    (3, "mov ax, 0x10\n    mov ds, ax", 13, 0x10),          # DPL 0 data
    (3, "mov ax, 0x43\n    mov ss, ax", 13, 0x40),          # read-only
    (3, "mov ax, 0x10\n    mov ss, ax", 13, 0x10),
    (3, "push 0x10\n    pop gs", 13, 0x10),
    (3, "mov ax, 0x08\n    mov es, ax", 13, 0x08),          # non-conforming DPL 0 code
])
def test_bad_segment_loads(ring, code, vector, error):
    body = f"    {code}\n"
    res, r, _ = run(body if ring == 0 else to_ring3(body))
    faulted(r, vector, 0xFFFFFFFF if error is None else error)


def test_segment_loads_in_ring3():
    body = ("    mov ax, 0x0f\n    mov fs, ax\n    mov eax, fs:[0]\n" + store(0)
            + "    mov ax, 0x43\n    mov gs, ax\n    mov eax, gs:[0]\n" + store(1)
            + "    mov ax, 0x5b\n    mov gs, ax\n    mov eax, gs\n" + store(2)      # conforming code: readable
            + "    xor eax, eax\n    mov es, ax\n    mov eax, es\n" + store(3)
            + "    mov ax, 0x23\n    mov es, ax\n    mov ss, ax\n    push ss\n    pop eax\n" + store(4))
    res, r, out = run(to_ring3(body))
    completed(res, r, True)
    assert out[:5] == [0x1D7D1D7D, 0x0C0FFEE0, 0x5B, 0, 0x23]


# SDM 5.4.1: #GP(0); limits and types: tests/test_segment_checks.py
@pytest.mark.parametrize("seg", ["ds", "fs"])
def test_memory_access_through_a_null_selector_is_gp(seg):
    res, r, _ = run(f"    xor eax, eax\n    mov {seg}, ax\n    mov eax, {seg}:[0x300180]\n", prelude=False)
    faulted(r, 13, 0)


# ---- far JMP / CALL / RETF -----------------------------------------------------------------------------------
def test_far_jmp_call_retf_same_ring():
    body = ("    .byte 0xea\n    .long fj_to\n    .word 0x08\n    hlt\nfj_to:\n    mov eax, cs\n" + store(0)
            + "    .byte 0xea\n    .long fj2_to\n    .word 0x58\n    hlt\nfj2_to:\n    mov eax, cs\n" + store(1)
            + "    mov eax, fc_ret\n" + store(2) + "    mov ebx, esp\n"
            + "    .byte 0x9a\n    .long far_fn\n    .word 0x08\nfc_ret:\n    sub ebx, esp\n" + store(3, "ebx")
            + "    jmp fj_done\n"
            + "far_fn:\n    mov eax, [esp]\n" + store(4) + "    mov eax, [esp + 4]\n" + store(5) + "    retf\nfj_done:\n"
            + "    .byte 0xea\n    .long fj3_to\n    .word 0x08\nfj3_to:\n")
    res, r, out = run(body)
    completed(res, r)
    assert out[0] == 0x08 and out[1] == 0x58       # to a conforming segment: CPL (and RPL) stay 0
    assert out[3] == 0 and out[4] == out[2] and out[5] == 0x58     # the caller's CS


def test_far_jmp_call_through_memory():
    body = ("    mov dword ptr [0x300180], fm_to\n    mov word ptr [0x300184], 0x08\n"
            "    .byte 0xff, 0x2d\n    .long 0x300180\n    hlt\nfm_to:\n    mov eax, cs\n" + store(0)
            + "    mov dword ptr [0x300188], fm_fn\n    mov word ptr [0x30018c], 0x08\n    mov eax, fm_ret\n" + store(1)
            + "    .byte 0xff, 0x1d\n    .long 0x300188\nfm_ret:\n    jmp fm_done\n"
            + "fm_fn:\n    mov eax, [esp]\n" + store(2) + "    mov eax, [esp + 4]\n" + store(3) + "    retf\nfm_done:\n")
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[0] == 0x08 and out[2] == out[1] and out[3] == 0x08


def test_retf_imm_pops_parameters():
    body = ("    mov ebx, esp\n    push 1\n    push 2\n    .byte 0x9a\n    .long rf_fn\n    .word 0x08\n    sub ebx, esp\n"
            + store(0, "ebx") + "    jmp rf_done\nrf_fn:\n    retf 8\nrf_done:\n")
    res, r, out = run(body, prelude=False)
    completed(res, r)
    assert out[0] == 0


@pytest.mark.parametrize("ring,code,error", [
    (0, ".byte 0xea\n    .long 0x100000\n    .word 0x10", 0x10),      # data segment
    (0, ".byte 0xea\n    .long 0x100000\n    .word 0x00", 0),         # null
    (0, ".byte 0xea\n    .long 0x100000\n    .word 0x1b", 0x18),      # ring-3 code from ring 0
    (0, ".byte 0x9a\n    .long 0x100000\n    .word 0x0b", 0x08),      # RPL 3 to a DPL 0 non-conforming segment
    (0, ".byte 0xea\n    .long 0x100000\n    .word 0x68", 0x68),      # beyond the limit
    (3, ".byte 0xea\n    .long 0x100000\n    .word 0x08", 0x08),      # ring-0 code from ring 3
    (3, "push 0x08\n    push 0x100000\n    retf", 0x08),              # RETF to an inner ring
    (0, "push 0x23\n    push ustack_top\n    push 0x0b\n    push 0x100000\n    retf", 0x08),   # RPL 3, DPL 0
    (0, "push 0x10\n    push 0x100000\n    retf", 0x10),              # RETF to a data segment
])
def test_far_transfer_faults(ring, code, error):
    body = f"    {code}\n"
    res, r, _ = run(body if ring == 0 else to_ring3(body))
    faulted(r, 13, error)


def test_far_jmp_to_conforming_code_from_ring3_keeps_cpl3():
    body = "    .byte 0xea\n    .long cj_to\n    .word 0x58\n    hlt\ncj_to:\n    mov eax, cs\n" + store(0)
    res, r, out = run(to_ring3(body))
    assert r["marker"] == GOOD and r["vector"] == 0x80 and r["cs"] == 0x5B, r     # INT 0x80 from CS 0x5b
    assert out[0] == 0x5B


def test_far_call_in_ring3():
    body = ("    .byte 0x9a\n    .long f3_fn\n    .word 0x1b\n    jmp f3_done\nf3_fn:\n    mov eax, [esp + 4]\n" + store(0)
            + "    retf\nf3_done:\n")
    res, r, out = run(to_ring3(body), prelude=False)
    completed(res, r, True)
    assert out[0] == 0x1B


def test_retf_to_ring3_switches_stack_and_nulls_ring0_data_segments():
    body = ("    push 0x23\n    push 0x307000\n    push 0x1b\n    mov eax, rf3_to\n    push eax\n    retf\nrf3_to:\n"
            + "    mov ecx, ds\n    mov ax, 0x23\n    mov ds, ax\n    mov es, ax\n"    # DS null: reload first
            + "    mov eax, cs\n" + store(0) + "    mov eax, ss\n" + store(1) + "    mov eax, esp\n" + store(2)
            + store(3, "ecx")
            + "    mov dword ptr [results + 20], 0x600d\n    int 0x80\n")
    res, r, out = run(body, prelude=False)
    assert r["vector"] == 0x80 and r["cs"] == 0x1B and r["marker"] == GOOD, (res.message, r)
    assert out[:4] == [0x1B, 0x23, 0x307000, 0]


# ---- caches and the TLB -------------------------------------------------------------------------------------
def test_invlpg_makes_a_changed_pte_visible():
    body = (PAGING + "    mov dword ptr [0x205000], 0xaaaa\n    mov dword ptr [0x206000], 0xbbbb\n"
            "    mov dword ptr [page_tab + 0x200*4], 0x205007\n    mov eax, dword ptr [0x200000]\n" + store(0)
            + "    mov dword ptr [page_tab + 0x200*4], 0x206007\n    invlpg [0x200000]\n    mov eax, dword ptr [0x200000]\n"
            + store(1) + "    mov dword ptr [page_tab + 0x200*4], 0\n    invlpg [0x200004]\n    mov eax, dword ptr [0x200000]\n")
    res, r, out = run(body, prelude=False)
    assert out[:2] == [0xAAAA, 0xBBBB]
    assert r["vector"] == 14 and r["cr2"] == 0x200000 and r["error"] == 0     # and unmapping is seen too


@pytest.mark.parametrize("insn", ["invd", "wbinvd"])
def test_cache_flushes_are_no_ops_in_ring0(insn):
    res, r, _ = run(f"    mov dword ptr [0x300180], 7\n    {insn}\n    mov eax, [0x300180]\n" + store(0), prelude=False)
    completed(res, r)


def test_far_jmp_through_a_call_gate_stops_cleanly_as_unsupported():
    # Call gates are not implemented yet (README): the VM must stop with a message, not misbehave.
    res, r, _ = run("    .byte 0xea\n    .long 0\n    .word 0x60\n")
    assert res.status == 1 and "gate" in res.message and r["marker"] != GOOD


def test_sti_shadow_does_not_outlive_its_instruction(monkeypatch):
    # STI (IF clear) shadows only the next instruction (here a CLI).  The run goes on past it, so
    # when the slice ends 100,000 instructions later the machine must not run one instruction on its own (that
    # single-step translation would land at a random place in every boot).
    from runtime.cpu import CPU
    from runtime.system import machine
    budgets = []
    real_run = CPU.run
    monkeypatch.setattr(CPU, "run", lambda self, n=None, exact=True: budgets.append(n) or real_run(self, n, exact))
    monkeypatch.setattr(machine, "MAX_SLICE", 20_000)
    res, r, out = run("    cli\n    sti\n    cli\n    mov ecx, 100000\nshadow_loop:\n    dec ecx\n    jnz shadow_loop\n")
    completed(res, r)
    assert len(budgets) > 3 and 1 not in budgets, budgets

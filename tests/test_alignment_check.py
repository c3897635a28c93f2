"""#AC, the alignment-check exception (SDM Vol. 3A 6.15, Interrupt 17): a misaligned data access
at CPL 3 with CR0.AM and EFLAGS.AC set faults with error code 0, eip at the instruction.

Hand-checked against the SDM: neither QEMU's TCG nor Unicorn models #AC, so these kernels are not
recorded (tests/test_qemu_recorded.py).  Each ring-3 body stores the address of the instruction
expected to fault at EXPECT (label `here`) before running it.
"""
import struct

import pytest

from runtime.system.machine import Machine
from tests.kernels import PAGING, RESULTS, build

EXPECT = 0x300300
DATA = 0x300400          # a scratch area the ring-3 bodies read and write (user-accessible)
AM_ON = "    mov eax, cr0\n    or eax, 0x40000\n    mov cr0, eax\n"
AC_ON = "    pushfd\n    or dword ptr [esp], 0x40000\n    popfd\n"
AC_OFF = "    pushfd\n    and dword ptr [esp], 0xfffbffff\n    popfd\n"


def boot(ring0="", ring3=None, extra=()):
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build(ring0, ring3))
        m.run()
        vals = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))
        r = dict(zip(("vector", "error", "cr2", "eip", "cs", "marker", "eflags"), vals))
        r["expect"] = struct.unpack("<I", m.cpu.read_phys(EXPECT, 4))[0]
        r["data"] = m.cpu.read_phys(DATA, 16)
        r["regs"] = {n: m.cpu.reg(n) for n in extra}
        return r
    finally:
        m.close()


def body(access, pre=""):
    return f"""
    mov eax, here
    mov dword ptr [{EXPECT:#x}], eax
    mov dword ptr [{DATA:#x}], 0x04030201
    mov dword ptr [{DATA + 4:#x}], 0x08070605
    mov ebx, {DATA:#x}
{pre}
here:
    {access}
"""


def assert_ac(r):
    assert r["vector"] == 17 and r["error"] == 0, r
    assert r["eip"] == r["expect"] and r["cs"] == 0x1B, r
    assert r["eflags"] & 0x40000, "the frame's EFLAGS has AC set"
    assert r["marker"] != 0x600D


def assert_no_fault(r):
    assert r["vector"] == 0x80 and r["marker"] == 0x600D, r


MISALIGNED = [
    "mov eax, dword ptr [ebx + 1]",
    "mov eax, dword ptr [ebx + 2]",
    "mov ax, word ptr [ebx + 3]",
    "mov dword ptr [ebx + 2], 0x11223344",
    "mov word ptr [ebx + 1], 0x5566",
    "add dword ptr [ebx + 3], 1",
    "movzx eax, word ptr [ebx + 5]",
    "cmpxchg8b qword ptr [ebx + 4]",
    "fld qword ptr [ebx + 4]",
    "fld dword ptr [ebx + 2]",
    "fld tbyte ptr [ebx + 4]",
    "fnstcw word ptr [ebx + 1]",
    "fnstenv [ebx + 2]",
    "push eax",                      # with a misaligned ESP (pre)
]


@pytest.mark.parametrize("access", MISALIGNED)
def test_misaligned_access_at_cpl3_raises_ac(access):
    pre = AC_ON + ("    sub esp, 2\n" if access.startswith("push") else "")
    r = boot(AM_ON, body(access, pre))
    assert_ac(r)
    assert r["data"][:8] == bytes(range(1, 9)), "a faulting store leaves memory unchanged"


ALIGNED = [
    "mov eax, dword ptr [ebx + 4]",
    "mov ax, word ptr [ebx + 2]",
    "mov al, byte ptr [ebx + 3]",
    "mov dword ptr [ebx + 8], 0x11223344",
    "mov byte ptr [ebx + 1], 7",
    "cmpxchg8b qword ptr [ebx + 8]",
    "fld qword ptr [ebx + 8]",
    "fld tbyte ptr [ebx + 8]",
    "fnstenv [ebx + 4]",             # FSTENV's 28-byte image needs 4-byte alignment (operand size 32)
    "fnsave [ebx + 4]",
    "push eax",
]


@pytest.mark.parametrize("access", ALIGNED)
def test_aligned_access_does_not_fault(access):
    assert_no_fault(boot(AM_ON, body(access, AC_ON)))


@pytest.mark.parametrize("case", ["am_clear", "ac_clear", "cpl0"])
def test_no_ac_without_am_ac_and_cpl3(case):
    access = "mov eax, dword ptr [ebx + 1]\n    mov word ptr [ebx + 3], ax"
    if case == "am_clear":
        assert_no_fault(boot("", body(access, AC_ON)))
    elif case == "ac_clear":
        assert_no_fault(boot(AM_ON, body(access)))
    else:
        # Ring 0 with AM and AC set: no alignment checking at CPL 0 (the body ends with the marker).
        r = boot(AM_ON + body(access, AC_ON) + AC_OFF + "    jmp to_user\n",
                 "    mov dword ptr [results + 20], 0x600d\n    int 0x80\n")
        assert_no_fault(r)


def test_popf_toggling_ac_takes_effect_at_the_next_instruction():
    # One straight-line block: AC on, aligned ok; AC off, misaligned ok; AC on, misaligned faults.
    pre = AC_ON + "    mov eax, dword ptr [ebx + 4]\n" + AC_OFF + "    mov eax, dword ptr [ebx + 1]\n" \
        + "    mov ecx, 0x1234\n" + AC_ON
    r = boot(AM_ON, body("mov edx, dword ptr [ebx + 3]", pre), extra=("ecx", "edx"))
    assert_ac(r)
    assert r["regs"]["ecx"] == 0x1234 and r["regs"]["edx"] != 0x06050403


def test_popf_clearing_ac_stops_checking_in_the_same_block():
    r = boot(AM_ON, body("mov eax, dword ptr [ebx + 1]", AC_ON + AC_OFF))
    assert_no_fault(r)


def test_ac_without_am_is_only_a_flag():
    # EFLAGS.AC set in ring 3 without CR0.AM: no check, and the INT 0x80 frame shows AC set.
    r = boot("", body("mov eax, dword ptr [ebx + 1]", AC_ON))
    assert_no_fault(r)
    assert r["eflags"] & 0x40000


def test_page_fault_has_priority_over_ac():
    # A misaligned access to a not-present page: #PF (SDM Vol. 3A Table 6-2), not #AC.
    ring3 = AC_ON + "    mov eax, dword ptr [0x200011]\n"
    r = boot(PAGING + AM_ON, ring3)
    assert r["vector"] == 14 and r["error"] == 4 and r["cr2"] == 0x200011, r


def test_misaligned_access_after_iret_with_ac_in_the_frame():
    # IRET to ring 3 with AC set in the popped EFLAGS: the key follows (no POPF involved).
    ring0 = AM_ON + """
    push 0x23
    push 0x308000
    push 0x40202
    push 0x1b
    mov eax, user2
    push eax
    iretd
user2:
    mov ax, 0x23
    mov ds, ax
""" + body("mov eax, dword ptr [ebx + 2]")
    r = boot(ring0, None)
    assert_ac(r)


def test_ac_in_a_tier2_region(monkeypatch):
    """Tier 2 inlines the TLB probe: the check is emitted there too (a hot ring-3 loop with AC on,
    then the same loop entered with a misaligned index)."""
    from bt import state as S, tier2
    monkeypatch.setattr(tier2, "THRESHOLD", 8)
    monkeypatch.setattr(tier2, "_shared", tier2.Optimizer(sync=True))
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    ring3 = body("mov eax, dword ptr [ebx + ecx]\n    add ecx, 4\n    cmp ecx, 400\n    jb here\n"
                 "    sub ecx, 399\n    jmp here", AC_ON + "    xor ecx, ecx\n")
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build(AM_ON, ring3))
        m.run()
        vals = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))
        r = dict(zip(("vector", "error", "cr2", "eip", "cs", "marker", "eflags"), vals))
        r["expect"] = struct.unpack("<I", m.cpu.read_phys(EXPECT, 4))[0]
        tier2_ac = [tb for tb in m.cpu.cache.blocks.values() if tb.tier == 2 and tb.key & S.KEY_AC]
        ecx = m.cpu.reg("ecx")
    finally:
        m.close()
    assert tier2_ac, "the loop ran in a tier-2 region under KEY_AC"
    assert_ac(r)
    assert ecx == 1

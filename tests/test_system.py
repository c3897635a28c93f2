"""System mode: the demo guest, sensitive/privileged instructions from ring 0 and ring 3,
paging faults, interrupts and the machine's exits.

Each test assembles a small Multiboot kernel from a template (tests/kernels.py): flat ring-0 and ring-3
segments, a TSS, an IDT whose handlers reload DS (a body may fault with a null or small DS),
then record (vector, error code, CR2, saved EIP, saved CS) into a results area and stop the
CPU, then a ring-0 body and (optionally) a ring-3 body.
"""
import struct
import subprocess
import sys

import pytest

from runtime.system.machine import Machine
from tests.kernels import BASE, PAGING, RESULTS, TEMPLATE, build, pic_and_pit  # noqa: F401 (imported by other tests)


def boot(ring0="", ring3=None, out=None):
    sink = out if out is not None else bytearray()
    m = Machine(ram_mb=8, serial_out=sink.extend, icount=True)
    try:
        m.load_multiboot(build(ring0, ring3))
        res = m.run()
        vals = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))
        return res, dict(zip(("vector", "error", "cr2", "eip", "cs", "marker", "eflags"), vals))
    finally:
        m.close()


def test_demo_guest_boots_and_powers_off():
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot"], capture_output=True, timeout=300)
    text = out.stdout.decode()
    assert out.returncode == 0, out.stderr.decode()
    for line in ("btvm demo guest: protected mode", "10 timer interrupts received", "paging on",
                 "hello from ring 3 through INT 0x80", "#GP from CLI in ring 3", "done, powering off"):
        assert line in text
    assert "did not fault" not in text and "unexpected" not in text


def test_ring0_body_completes():
    res, r = boot("    nop\n")
    assert res.status == 0 and r["marker"] == 0x600D


@pytest.mark.parametrize("insn", ["cli", "sti", "hlt", "in al, 0x80", "out 0x80, al", "mov eax, cr0", "mov cr3, eax",
                                  "lgdt [0x300100]", "lidt [0x300100]", "ltr ax", "lldt ax", "rdmsr", "wrmsr",
                                  "invlpg [0x1000]", "wbinvd", "clts", "mov dr0, eax", "lmsw ax"])
def test_privileged_from_ring3_raises_gp(insn):
    res, r = boot(ring3=f"    mov ecx, 0x10\n    {insn}\n")
    assert r["vector"] == 13 and r["error"] == 0, r
    assert r["cs"] == 0x1B and r["marker"] != 0x600D


def test_popf_in_ring3_cannot_change_if_or_iopl():
    # POPF at CPL 3 with IOPL 0 silently keeps IF and IOPL (SDM POPF); the INT 0x80 frame shows EFLAGS.
    ring3 = """
    pushfd
    pop eax
    and eax, 0xfffffdff
    or eax, 0x3001
    push eax
    popfd
"""
    res, r = boot(ring3=ring3)
    assert r["vector"] == 0x80 and r["marker"] == 0x600D
    assert r["eflags"] & 0x200 and not r["eflags"] & 0x3000 and r["eflags"] & 1


def test_sensitive_reads_work_in_ring3():
    ring3 = """
    sgdt [0x300200]
    sidt [0x300210]
    str eax
    smsw ebx
    mov dword ptr [0x300220], eax
    mov dword ptr [0x300224], ebx
"""
    sink = bytearray()
    m = Machine(ram_mb=8, serial_out=sink.extend, icount=True)
    try:
        m.load_multiboot(build(ring3=ring3))
        res = m.run()
        limit, base = struct.unpack("<HI", m.cpu.read_phys(0x300200, 6))
        ilimit, ibase = struct.unpack("<HI", m.cpu.read_phys(0x300210, 6))
        tr, msw = struct.unpack("<II", m.cpu.read_phys(0x300220, 8))
        marker = struct.unpack("<I", m.cpu.read_phys(RESULTS + 20, 4))[0]
    finally:
        m.close()
    assert marker == 0x600D
    assert limit == 6 * 8 - 1 and ilimit == 256 * 8 - 1 and ibase == 0x303000
    assert tr & 0xFFFF == 0x28 and msw & 1


def test_int_to_dpl0_gate_from_ring3_is_gp():
    res, r = boot(ring3="    int 0x81\n")
    assert r["vector"] == 13 and r["error"] == 0x81 * 8 + 2


def test_syscall_gate_from_ring3_switches_stacks():
    res, r = boot(ring3="    mov dword ptr [results + 20], 0x600d\n    int 0x80\n")
    assert r["vector"] == 0x80 and r["cs"] == 0x1B and r["eflags"] & 0x200


def test_page_fault_not_present_has_cr2_and_error_code():
    res, r = boot(PAGING + "    mov eax, dword ptr [0x200010]\n")
    assert r["vector"] == 14 and r["error"] == 0 and r["cr2"] == 0x200010


def test_write_to_readonly_page_with_wp_faults_in_ring0():
    res, r = boot(PAGING + "    mov dword ptr [0x201000], 1\n")
    assert r["vector"] == 14 and r["error"] == 3 and r["cr2"] == 0x201000


def test_ring3_write_to_readonly_user_page_faults():
    # The PDE must allow user access: the page table maps everything U/S except the r/o page is user r/o.
    res, r = boot(PAGING, ring3="    mov dword ptr [0x201004], 1\n")
    assert r["vector"] == 14 and r["error"] == 7 and r["cr2"] == 0x201004


def test_accessed_and_dirty_bits_written_back():
    sink = bytearray()
    m = Machine(ram_mb=8, serial_out=sink.extend, icount=True)
    try:
        m.load_multiboot(build(PAGING + "    mov dword ptr [0x202000], 5\n    mov eax, dword ptr [0x203000]\n"))
        m.run()
        pte_w = struct.unpack("<I", m.cpu.read_phys(0x302000 + 0x202 * 4, 4))[0]
        pte_r = struct.unpack("<I", m.cpu.read_phys(0x302000 + 0x203 * 4, 4))[0]
    finally:
        m.close()
    assert pte_w & 0x60 == 0x60 and pte_r & 0x60 == 0x20


def test_divide_error_vectors_precisely():
    res, r = boot("    xor ecx, ecx\n    mov eax, 1\n    div ecx\n")
    assert r["vector"] == 0 and r["error"] == 0xFFFFFFFF and r["cs"] == 0x08


def test_isa_debug_exit_status():
    res, _ = boot("    mov al, 3\n    out 0xf4, al\n")
    assert res.status == 7


def test_timer_interrupt_reaches_handler():
    ring0 = pic_and_pit(0xFE, 2, 0x2E9B) + "    sti\nspin:\n    jmp spin\n"
    res, r = boot(ring0)
    assert r["vector"] == 0x20 and r["eflags"] & 0x200


def test_triple_fault_stops_the_vm():
    res, _ = boot("    lidt [0x300400]\n    int3\n")
    assert res.status != 0 and "triple fault" in res.message


def test_boot_cli_errors(tmp_path):
    bad = tmp_path / "k"
    bad.write_bytes(b"not a kernel" * 100)
    for args, msg in ((["-kernel", str(bad)], "neither a Linux bzImage"),
                      (["-kernel", str(tmp_path / "missing")], "no such file"),
                      (["-m", "1"], "between")):
        out = subprocess.run([sys.executable, "-m", "runtime.cli", "boot", *args], capture_output=True, text=True)
        assert out.returncode != 0 and msg in out.stderr and "Traceback" not in out.stderr


@pytest.mark.parametrize("bits,insn,vector", [(0x8, "fld1", 7), (0x4, "fld1", 7), (0xA, "fwait", 7),
                                              (0x8, "fwait", None), (0x0, "fld1", None)])
def test_x87_device_not_available(bits, insn, vector):
    # CR0.TS / CR0.EM make x87 instructions raise #NM; WAIT only with TS and MP (SDM 2.5).
    res, r = boot(f"    mov eax, cr0\n    and eax, 0xfffffff1\n    or eax, {bits}\n    mov cr0, eax\n    {insn}\n")
    if vector is None:
        assert r["marker"] == 0x600D
    else:
        assert r["vector"] == vector and r["marker"] != 0x600D


def test_clts_reenables_the_fpu():
    res, r = boot("    mov eax, cr0\n    or eax, 8\n    mov cr0, eax\n    clts\n    fld1\n    fstp st(0)\n")
    assert r["marker"] == 0x600D


def test_fault_frames_have_rf_set_and_iret_does_not_keep_it():
    # SDM 17.3.1.1: a fault-class exception pushes RF = 1; INT n pushes the current RF (0).
    res, r = boot("    xor ecx, ecx\n    mov eax, 1\n    div ecx\n")
    assert r["vector"] == 0 and r["eflags"] & 0x10000
    res, r = boot(ring3="    int 0x80\n")
    assert r["vector"] == 0x80 and not r["eflags"] & 0x10000


def test_page_crossing_fault_reports_the_second_pages_first_byte():
    res, r = boot(PAGING + "    mov eax, dword ptr [0x1ffffe]\n")
    assert r["vector"] == 14 and r["cr2"] == 0x200000


def test_hlt_with_tf_takes_the_single_step_trap_instead_of_halting():
    # SDM Vol. 2 HLT: a debug exception resumes execution; the single-step trap after HLT is
    # delivered (EIP after the HLT, DR6.BS set) rather than the CPU halting with IF clear (which
    # would power the machine off).  QEMU's TCG halts without the trap (tests/qemu_kernels.py tf).
    body = """
    mov dword ptr [0x300100], after_hlt
    pushfd
    or dword ptr [esp], 0x100
    popfd
    hlt
after_hlt:
    nop
"""
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build(body))
        res = m.run()
        vals = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))
        after = struct.unpack("<I", m.cpu.read_phys(0x300100, 4))[0]
        dr6 = m.cpu.dr[6]
    finally:
        m.close()
    r = dict(zip(("vector", "error", "cr2", "eip", "cs", "marker", "eflags"), vals))
    assert res.status == 0
    assert r["vector"] == 1 and r["eip"] == after and r["eflags"] & 0x100 and not r["eflags"] & 0x10000, r
    assert dr6 & 0x4000


def test_halted_time_advances_the_tsc_like_the_clock():
    """With -clock icount a HLT warps virtual time to the next timer; the TSC must move with it
    (Linux's clocksource watchdog compares the TSC with the PIT and once found it at half speed)."""
    from runtime.system.machine import Machine
    m = Machine(ram_mb=8, icount=True)
    try:
        fired = []
        timer = m.clock.timer(lambda when: fired.append(when))
        t0, tsc0 = m.clock.now_ns(), m.cpu.tsc()
        timer.mod(t0 + 5_000_000)
        m.clock.idle()
        assert fired
        assert m.clock.now_ns() - t0 == m.cpu.tsc() - tsc0 >= 5_000_000
    finally:
        m.close()


@pytest.mark.parametrize("ss0,why", [(0, "null"), (0x08, "code segment"), (0x7F8, "beyond the GDT"),
                                      (0x13, "RPL 3"), (0x23, "DPL 3 data")])
def test_bad_ss0_in_the_tss_is_ts_and_ends_in_a_triple_fault(ss0, why):
    """A ring 3 -> 0 transition whose TSS SS0 is unusable raises #TS (SDM 6.12.1.1); #TS itself
    needs the same stack switch, so with no task gate the machine shuts down."""
    res, r = boot(ring0=f"    mov dword ptr [tss + 8], {ss0}\n", ring3="    int 0x80\n")
    assert res.status != 0 and "triple fault" in res.message, (why, res.message)


def test_not_present_ss0_is_ss_fault():
    """A present-bit-clear SS0 descriptor is #SS(selector), not #TS; it also cascades here."""
    res, r = boot(ring0="    and byte ptr [gdt + 0x10 + 5], 0x7f\n    mov dword ptr [tss + 8], 0x10\n",
                  ring3="    int 0x80\n")
    assert res.status != 0 and "triple fault" in res.message

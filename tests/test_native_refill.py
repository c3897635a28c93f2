"""The native soft-MMU refill of system machines (runtime/native_refill.py) against the runtime's
own slow path (SystemCPU._load_slow/_store_slow and runtime/system/paging.py): the same access
through the same page tables, once with each; the outcome - the value read or written, the fault
and its error code, the accessed/dirty bits written back - must agree, and be the SDM's (derived
in _expected from the paging rules, independently of either).  The runtime's walker is itself
checked against QEMU (tests/test_qemu_recorded.py) and the SDM (tests/test_system.py)."""
import itertools
import struct

import pytest

from runtime.system.machine import Machine
from tests.kernels import PAGING, RESULTS, build

DATA, PAGE_TAB, PAGE_DIR = 0x202010, 0x302000, 0x301000
BIG = 0x800010                 # through a 4 MiB page onto physical 0x400010

# Entry flags: P RW US A D in the combinations that matter (PS is added for the 4 MiB case).
FLAGS = {"rw-user-AD": 0x67, "ro-user-AD": 0x65, "rw-sup-AD": 0x63, "rw-user": 0x07,
         "rw-user-A": 0x27, "ro-sup-AD": 0x61}


def _kernel(flags, large, wp, user, write):
    at = BIG if large else DATA
    ring0 = "    mov dword ptr [0x400010], 0x11223344\n    mov dword ptr [0x202010], 0x11223344\n" + PAGING + (
        (f"    mov eax, cr4\n    or eax, 0x10\n    mov cr4, eax\n"
           f"    mov dword ptr [{PAGE_DIR + 8:#x}], {0x400080 | flags:#x}\n" if large else
           f"    mov dword ptr [{PAGE_TAB + 0x202 * 4:#x}], {0x202000 | flags:#x}\n")
        + "    mov eax, cr3\n    mov cr3, eax\n"
        + ("" if wp else "    mov eax, cr0\n    and eax, 0xfffeffff\n    mov cr0, eax\n"))
    access = (f"    mov dword ptr [{at:#x}], 0x5a5a5a5a\n" if write else
              f"    mov eax, dword ptr [{at:#x}]\n    mov dword ptr [0x300100], eax\n")
    return build(ring0 + ("" if user else access), access if user else None)


def _outcome(kernel, native):
    m = Machine(ram_mb=8, serial_out=lambda b: None, icount=True)
    try:
        if not native:
            st = m.cpu.st
            st.load_slow, st.store_slow = st.refill_slow, st.refill_store_slow
        m.load_multiboot(kernel)
        m.run()
        r = dict(zip(("vector", "error", "cr2"), struct.unpack("<3I", m.cpu.read_phys(RESULTS, 12))))
        r["marker"] = struct.unpack("<I", m.cpu.read_phys(RESULTS + 20, 4))[0]
        r["read"], = struct.unpack("<I", m.cpu.read_phys(0x300100, 4))
        r["memory"] = struct.unpack("<2I", m.cpu.read_phys(0x202010, 4) + m.cpu.read_phys(0x400010, 4))
        r["entries"] = struct.unpack("<2I", m.cpu.read_phys(PAGE_TAB + 0x202 * 4, 4)
                                     + m.cpu.read_phys(PAGE_DIR + 8, 4))
        return r
    finally:
        m.close()


@pytest.mark.parametrize("flags,large,wp,user,write", [
    (f, large, wp, user, write)
    for f, large, wp, user, write in itertools.product(FLAGS, (False, True), (True, False), (False, True),
                                                       (False, True))
    if wp or (write and not user)])        # WP only matters to supervisor writes
def test_native_refill_agrees_with_the_runtime(flags, large, wp, user, write):
    kernel = _kernel(FLAGS[flags], large, wp, user, write)
    native = _outcome(kernel, True)
    assert native == _outcome(kernel, False)
    assert native == _expected(FLAGS[flags], large, wp, user, write, native)


def _expected(f, large, wp, user, write, got):
    """The SDM's outcome (Vol. 3A 4.6, 4.8): a user access needs U/S, a write needs R/W where
    CPL 3 or CR0.WP asks for it (#PF, error P | W | U, no A/D bit written); else A is set, and
    D by a write.  (The page directory entry of the 4 KiB case allows everything.)"""
    at = BIG if large else DATA
    out = dict(got, read=0, marker=0x600D)      # (the vector is INT 0x80's or none after success)
    entry = (0x400080 if large else 0x202000) | f
    memory = [0x11223344, 0x11223344]           # at DATA and at BIG's physical 0x400010
    if (user and not f & 4) or (write and not f & 2 and (user or wp)):
        out.update(vector=14, error=1 | (2 if write else 0) | (4 if user else 0), cr2=at, marker=0)
    else:
        entry |= 0x20 | (0x40 if write else 0)
        if write:
            memory[1 if large else 0] = 0x5A5A5A5A
        else:
            out["read"] = 0x11223344
    out["memory"] = tuple(memory)
    out["entries"] = (got["entries"][0], entry) if large else (entry, got["entries"][1])
    return out


def test_a_supervisor_read_of_an_accessed_page_is_refilled_natively(monkeypatch):
    # The walk above happens in native code at all: the runtime's slow path never sees the read.
    from runtime.system.syscpu import SystemCPU
    seen = []
    real = SystemCPU._load_slow
    monkeypatch.setattr(SystemCPU, "_load_slow", lambda self, st, addr, size: seen.append(addr) or real(self, st, addr, size))
    out = _outcome(_kernel(FLAGS["rw-user-AD"], False, True, False, False), True)
    assert out["read"] == 0x11223344 and out["marker"] == 0x600D
    assert DATA not in seen


def test_native_walk_agrees_with_the_walker_on_random_page_tables():
    # SystemCPU.translate walks natively (btvm_walk) when no A/D bit is to be set and no fault
    # raised; where it answers, the runtime's walker must answer the same without writing.
    import random
    from runtime.system.paging import CR0_PE, CR0_PG, CR4_PGE, CR4_PSE, PageFault
    rng = random.Random(7)
    m = Machine(ram_mb=8, serial_out=lambda b: None, icount=True)
    try:
        cpu = m.cpu
        ram = cpu.ram_size
        pd = 0x100000
        for i in range(1024):
            flags = rng.choice([0, 0x1, 0x7, 0x27, 0x67, 0x25, 0x21, 0x87, 0xA7, 0x1A7, 0x1E7, 0x85])
            table = rng.choice([0x101000, 0x102000, 0x7FF000 + 0x2000])     # the last is beyond RAM
            base = (rng.randrange(0, 3) << 22) if flags & 0x80 else table      # 8 MiB: beyond RAM
            cpu.write_phys32(pd + 4 * i, base | flags)
        for t in (0x101000, 0x102000):
            for i in range(1024):
                page = rng.randrange(0, (ram >> 12) + 16) << 12                 # some beyond RAM
                cpu.write_phys32(t + 4 * i, page | rng.choice([0, 0x1, 0x5, 0x25, 0x65, 0x165, 0x21, 0x61]))
        for cr4 in (0, CR4_PSE, CR4_PSE | CR4_PGE):
            cpu.set_cr4(cr4)
            cpu.set_cr3(pd)
            cpu.set_cr0(CR0_PE | CR0_PG)
            answered = 0
            for _ in range(3000):
                lin, user = rng.randrange(0, 1 << 32), rng.random() < 0.5
                native = cpu._native_walk(cpu.st_addr, lin, user)
                if not native:
                    continue
                answered += 1
                before = cpu.read_phys(pd, 4096) + cpu.read_phys(0x101000, 8192)
                try:
                    phys, glob, dirty = cpu.walker.translate(cpu.cr0, cpu.cr3, cpu.cr4, lin, False, user)
                except PageFault as pf:
                    raise AssertionError(f"native walk of {lin:#x} (user={user}) answered, walker faulted: {pf}")
                assert (native & ~0xFFF, bool(native & 1), bool(native & 2)) == (phys & ~0xFFF, glob, dirty), hex(lin)
                assert cpu.read_phys(pd, 4096) + cpu.read_phys(0x101000, 8192) == before, "walker wrote A/D"
            assert answered > 100
    finally:
        m.close()

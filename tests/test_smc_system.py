"""Self-modifying code in system mode (runtime/system/syscpu.py _phys_written): a write to a page
holding translated code drops the blocks whose bytes it overlaps and only those; a page whose
writes keep missing every block (busy data next to code) is invalidated whole after
SMC_SPARE_WRITES of them, so that its writes run at full speed again.

The kernels are the template of tests/kernels.py without paging (linear = physical); the functions
under test are written by the body into page 0x205000, called, patched and called again, and what
they return is stored as dwords at OUT."""
import struct

from runtime.system import syscpu
from runtime.system.machine import Machine
from tests.kernels import RESULTS, build
from tests.test_callouts import OUT, store

PAGE = 0x205000
F, G = PAGE, PAGE + 0x40         # two functions on one page: mov eax, imm32; ret
DATA = PAGE + 0x800              # data on the same page


def _put(addr, code):
    return "".join(f"    mov byte ptr [{addr + i:#x}], {b:#x}\n" for i, b in enumerate(code))


def _fn(addr, value):
    """mov eax, value; ret - written byte by byte at addr."""
    return _put(addr, bytes([0xB8]) + value.to_bytes(4, "little") + bytes([0xC3]))


def _call(addr, i):
    return f"    mov ebx, {addr:#x}\n    call ebx\n" + store(i)


def _run(body):
    m = Machine(ram_mb=8, serial_out=bytearray().extend, icount=True)
    try:
        m.load_multiboot(build(body))
        res = m.run()
        marker = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))[5]
        assert res.status == 0 and marker == 0x600D, (res.message, hex(marker))
        out = list(struct.unpack("<32I", m.cpu.read_phys(OUT, 128)))
        return out, m.cpu.cache.counters["invalidations_smc"], m.cpu
    finally:
        m.close()


def test_write_next_to_code_keeps_the_blocks():
    body = (_fn(F, 1) + _fn(G, 10) + _call(F, 0) + _call(G, 1)
            + "".join(f"    mov dword ptr [{DATA + 4 * i:#x}], {i}\n" for i in range(8))
            + _call(F, 2) + _call(G, 3))
    base, base_inv, _ = _run(_fn(F, 1) + _fn(G, 10) + _call(F, 0) + _call(G, 1) + _call(F, 2) + _call(G, 3))
    out, inv, cpu = _run(body)
    assert out[:4] == base[:4] == [1, 10, 1, 10]
    assert inv == base_inv                      # the data writes invalidated nothing
    assert PAGE in cpu.code_phys                # and the page still traps writes


def test_write_into_a_block_drops_that_block_only():
    out, inv, _ = _run(_fn(F, 1) + _fn(G, 10) + _call(F, 0) + _call(G, 1)
                       + _put(G + 1, bytes([20])) + _call(F, 2) + _call(G, 3)
                       + _put(F + 1, bytes([2])) + _call(F, 4) + _call(G, 5))
    assert out[:6] == [1, 10, 1, 20, 2, 20]
    base = _run(_fn(F, 1) + _fn(G, 10) + _call(F, 0) + _call(G, 1) + _call(F, 2) + _call(G, 3)
                + _call(F, 4) + _call(G, 5))[1]
    assert inv == base + 2                      # G's block, then F's: one each


def test_block_crossing_into_the_written_page_is_dropped():
    fn = 0x205FFC                               # mov eax, imm32 spans 0x205ffc..0x206000, ret at 0x206001
    out, _, _ = _run(_fn(fn, 0x11111111) + _call(fn, 0) + _put(0x206000, bytes([0x22])) + _call(fn, 1))
    assert out[:2] == [0x11111111, 0x22111111]


def test_block_rewrites_its_own_next_instruction():
    out, _, _ = _run("    mov byte ptr [patched + 1], 42\npatched:\n    mov eax, 7\n" + store(0))
    assert out[0] == 42


def test_page_with_busy_data_is_invalidated_whole_and_stops_trapping():
    n = syscpu.SMC_SPARE_WRITES + 8
    loop = (f"    mov ecx, {n}\nbusy:\n    mov dword ptr [{DATA:#x} + ecx*4], ecx\n    dec ecx\n    jnz busy\n")
    out, _, cpu = _run(_fn(F, 1) + _fn(G, 10) + _call(F, 0) + _call(G, 1) + loop)
    assert out[:2] == [1, 10]
    assert PAGE not in cpu.code_phys and not cpu.cache.has_code(PAGE)
    # ...and code translated there again is tracked again.
    out, _, _ = _run(_fn(F, 1) + _call(F, 0) + loop + _call(F, 1) + _put(F + 1, bytes([3])) + _call(F, 2))
    assert out[:3] == [1, 1, 3]

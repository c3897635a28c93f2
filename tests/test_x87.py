"""x87 FPU: differential tests against the host CPU running the same i386 code natively.

Each test assembles one snippet, runs it in btvm (ending in HLT) and natively in a
tiny `gcc -m32 -static` harness (tests/x87_native.c, ending in RET), both from the
FNINIT state, and compares the data region the snippet stored its results into
(FSTP m80, FNSTSW, FNSTENV, FNSAVE, LAHF...).  The FIP/FCS/FOP/FDP/FDS fields of
saved environments are host addresses natively and are masked (checked separately).
"""
import functools
import os
import shutil
import struct
import subprocess
import tempfile

import pytest

from runtime.snippet import run_case
from runtime.cpuid import cpuid
from tests.helpers import asm, make_case

C = 0x10000000
D = 0x10010000
OUT = D + 0x1000
LEN = 0x3000
HERE = os.path.dirname(os.path.abspath(__file__))


@functools.lru_cache(maxsize=None)
def native_harness():
    gcc = shutil.which("gcc")
    if gcc is None:
        return None
    out = os.path.join(tempfile.mkdtemp(prefix="btvm_x87_"), "x87n")
    r = subprocess.run([gcc, "-m32", "-static", "-O1", "-o", out, os.path.join(HERE, "x87_native.c")],
                       capture_output=True)
    return out if r.returncode == 0 else None


def f80(sign, exp, mant):
    return (mant | (exp << 64) | (sign << 79)).to_bytes(10, "little")


def ext(x):
    """A Python float as an exact 80-bit value."""
    import math
    if x == 0:
        return f80(1 if math.copysign(1, x) < 0 else 0, 0, 0)
    if math.isinf(x):
        return f80(int(x < 0), 0x7FFF, 1 << 63)
    m, e = math.frexp(abs(x))           # x = m * 2**e, 0.5 <= m < 1
    return f80(int(x < 0), e - 1 + 16383, int(m * 2 ** 64))


EDGE80 = [
    ext(0.0), ext(-0.0), ext(1.0), ext(-1.5), ext(3.0), ext(1e300), ext(-7e-300),
    f80(0, 0x3FFD, 0xAAAAAAAAAAAAAAAB),          # 1/3 in extended precision
    f80(0, 0x3FFF, 0xFFFFFFFFFFFFFFFF),          # just below 2: rounds differently in every mode
    f80(0, 0x7FFE, 0xFFFFFFFFFFFFFFFF),          # largest finite
    f80(1, 0x0001, 0x8000000000000000),          # smallest normal (negative)
    f80(0, 0x0000, 0x0000000000000001),          # smallest denormal
    f80(0, 0x0000, 0x4000000000000000),          # a large denormal
    ext(float("inf")), ext(float("-inf")),
    f80(0, 0x7FFF, 0xC000000000000001),          # QNaN
    f80(1, 0x7FFF, 0x8000000000000005),          # SNaN
]
RC = [0x037F, 0x077F, 0x0B7F, 0x0F7F]             # nearest, down, up, toward zero
PC = [0x007F, 0x027F, 0x037F]                     # single, double, extended precision


def slots(values, width=16):
    return b"".join(v + bytes(width - len(v)) for v in values)


def run_both(body, data):
    """Run body (Intel syntax, may use the D and OUT addresses) both ways; returns (btvm, native)."""
    blob = data + bytes(LEN - len(data))
    code_b, code_n = asm(body + "\nhlt", C), asm(body + "\nret", C)
    assert len(code_b) < 0x10000
    exe = native_harness()
    if exe is None:
        pytest.skip("no gcc -m32 -static for the native oracle")
    p = subprocess.run([exe], input=struct.pack("<I", len(code_n)) + code_n + struct.pack("<I", LEN) + blob,
                       capture_output=True, check=True)
    native = p.stdout
    r = run_case(make_case(code_b, addr=C, data={D: blob}, max_instructions=10 ** 7))
    assert r["exception"] is None, r["exception"]
    ram = dict(map(tuple, r["final"]["ram"]))
    mine = bytes(ram.get(D + i, 0) for i in range(LEN))
    return mine, native


def mask_env(buf, at, n=1):
    """Blank the pointer fields (bytes 12..27) of n environments/images at offsets `at`."""
    b = bytearray(buf)
    for a in ([at] if isinstance(at, int) else at):
        b[a + 12:a + 28] = bytes(16)
    return bytes(b)


def same(mine, native, what="", masks=()):
    for m in masks:
        mine, native = mask_env(mine, m), mask_env(native, m)
    if mine != native:
        diffs = [i for i in range(len(mine)) if mine[i] != native[i]]
        first = diffs[0] & ~15
        pytest.fail(f"{what}: {len(diffs)} bytes differ, first at data+{diffs[0]:#x}: "
                    f"btvm {mine[first:first + 16].hex()} native {native[first:first + 16].hex()}")


# ---------------------------------------------------------------------------- arithmetic
BINOPS = ["fadd", "fsub", "fsubr", "fmul", "fdiv", "fdivr"]


def _pairs_program(cw_addr, op_lines, values):
    """For every ordered pair (a, b): fninit, fldcw, fld a, fld b, <op>, store ST(0) and FSW."""
    lines, k = [], 0
    n = len(values)
    for i in range(n):
        for j in range(n):
            o = OUT + 16 * k
            lines += ["fninit", f"fldcw word ptr [{cw_addr}]",
                      f"fld tbyte ptr [{D + 16 * i}]", f"fld tbyte ptr [{D + 16 * j}]"]
            lines += op_lines[k % len(op_lines)]
            lines += [f"fnstsw word ptr [{o + 10}]", f"fstp tbyte ptr [{o}]", f"fnstsw word ptr [{o + 12}]"]
            k += 1
    return "\n".join(lines)


@pytest.mark.parametrize("op", BINOPS)
@pytest.mark.parametrize("cw", RC + PC[:1])
def test_arith_register_forms(op, cw):
    forms = [[f"{op} st(0), st(1)"], [f"{op} st(1), st(0)"], [f"{op}p st(1), st(0)"]]
    data = slots(EDGE80) + struct.pack("<H", cw)
    cw_addr = D + 16 * len(EDGE80)
    same(*run_both(_pairs_program(cw_addr, forms, EDGE80), data), f"{op} cw={cw:#x}")


M32 = [0x00000000, 0x80000000, 0x3F800000, 0x00000001, 0x807FFFFF, 0x7F800000, 0xFF800000,
       0x7FC00001, 0x7F800001, 0x7F7FFFFF, 0x3EAAAAAB]
M64 = [0, 1 << 63, 0x3FF0000000000000, 1, 0x800FFFFFFFFFFFFF, 0x7FF0000000000000,
       0x7FF8000000000001, 0x7FF0000000000001, 0x7FEFFFFFFFFFFFFF, 0x3FD5555555555555]
I16 = [0, 1, -1, 0x7FFF, -0x8000, 1234]
I32 = [0, 1, -1, 0x7FFFFFFF, -0x80000000, 123456789]


@pytest.mark.parametrize("op", BINOPS)
@pytest.mark.parametrize("cw", [0x037F, 0x0F7F])
def test_arith_memory_forms(op, cw):
    m = D + 0x400
    mem = (b"".join(struct.pack("<I", v) for v in M32) + b"".join(struct.pack("<Q", v) for v in M64)
           + b"".join(struct.pack("<h", v) for v in I16) + b"".join(struct.pack("<i", v) for v in I32))
    offs = ([("dword", m + 4 * i, "") for i in range(len(M32))]
            + [("qword", m + 44 + 8 * i, "") for i in range(len(M64))]
            + [("word", m + 124 + 2 * i, "i") for i in range(len(I16))]
            + [("dword", m + 136 + 4 * i, "i") for i in range(len(I32))])
    lines, k = [], 0
    for i in range(len(EDGE80)):
        for size, addr, i_ in offs:
            o = OUT + 16 * k
            lines += ["fninit", f"fldcw word ptr [{D + 0x3F0}]", f"fld tbyte ptr [{D + 16 * i}]",
                      f"f{i_}{op[1:]} {size} ptr [{addr}]",
                      f"fnstsw word ptr [{o + 10}]", f"fstp tbyte ptr [{o}]"]
            k += 1
    data = bytearray(slots(EDGE80) + bytes(0x400))
    data[0x3F0:0x3F2] = struct.pack("<H", cw)
    data[0x400:0x400 + len(mem)] = mem
    same(*run_both("\n".join(lines), bytes(data)), f"{op} memory cw={cw:#x}")


# ---------------------------------------------------------------------- loads and stores
@pytest.mark.parametrize("cw", RC + PC[:2])
def test_store_formats_and_integer_conversions(cw):
    vals = EDGE80 + [ext(x) for x in (2.5, -2.5, 3.5, -0.5, 0.5, 32767.5, -32768.7, 2.0 ** 31, -2.0 ** 63,
                                      2.0 ** 63, 123456789.75, 1e18 + 0.5, 9.87654321e17)]
    lines = []
    for i in range(len(vals)):
        o = OUT + 64 * i
        lines += ["fninit", f"fldcw word ptr [{D + 0x3F0}]", f"fld tbyte ptr [{D + 16 * i}]",
                  f"fst dword ptr [{o}]", f"fnstsw word ptr [{o + 4}]", "fnclex",
                  f"fst qword ptr [{o + 8}]", f"fnstsw word ptr [{o + 6}]", "fnclex",
                  f"fist word ptr [{o + 16}]", f"fnstsw word ptr [{o + 18}]", "fnclex",
                  f"fist dword ptr [{o + 20}]", f"fnstsw word ptr [{o + 24}]", "fnclex",
                  "fld st(0)", f"fistp qword ptr [{o + 26}]", f"fnstsw word ptr [{o + 34}]", "fnclex",
                  "fld st(0)", f"fbstp tbyte ptr [{o + 36}]", f"fnstsw word ptr [{o + 46}]", "fnclex",
                  "fld st(0)", f"fistp dword ptr [{o + 48}]", "fld st(0)", f"fistp word ptr [{o + 52}]",
                  f"fstp tbyte ptr [{o + 54}]", f"fnstsw word ptr [{o + 62}]"]
    data = bytearray(slots(vals) + bytes(0x400))
    data[0x3F0:0x3F2] = struct.pack("<H", cw)
    same(*run_both("\n".join(lines), bytes(data[:0x400])), f"stores cw={cw:#x}")


def test_load_formats():
    m = D + 0x400
    mem = (b"".join(struct.pack("<I", v) for v in M32) + b"".join(struct.pack("<Q", v) for v in M64)
           + b"".join(struct.pack("<h", v) for v in I16) + b"".join(struct.pack("<i", v) for v in I32)
           + b"".join(struct.pack("<q", v) for v in (0, -1, 2 ** 63 - 1, -2 ** 63, 10 ** 18 + 7))
           + bytes.fromhex("99999999999999999900") + bytes.fromhex("12345678900000000080")
           + bytes.fromhex("ffffffffffffffffffff"))
    forms = ([f"fld dword ptr [{m + 4 * i}]" for i in range(len(M32))]
             + [f"fld qword ptr [{m + 44 + 8 * i}]" for i in range(len(M64))]
             + [f"fild word ptr [{m + 124 + 2 * i}]" for i in range(len(I16))]
             + [f"fild dword ptr [{m + 136 + 4 * i}]" for i in range(len(I32))]
             + [f"fild qword ptr [{m + 160 + 8 * i}]" for i in range(5)]
             + [f"fbld tbyte ptr [{m + 200 + 10 * i}]" for i in range(3)]
             + [f"fld tbyte ptr [{D + 16 * i}]" for i in range(len(EDGE80))])
    lines = []
    for k, f in enumerate(forms):
        o = OUT + 16 * k
        lines += ["fninit", f, f"fnstsw word ptr [{o + 10}]", f"fstp tbyte ptr [{o}]", f"fnstsw word ptr [{o + 12}]"]
    data = bytearray(slots(EDGE80) + bytes(0x400))
    data[0x400:0x400 + len(mem)] = mem
    same(*run_both("\n".join(lines), bytes(data)), "loads")


# ------------------------------------------------------------------------------ compares
def test_compares_and_classes():
    vals = EDGE80 + [f80(0, 0x4000, 0x4000000000000000)]   # an unnormal
    cmps = [["fcom st(1)"], ["fcomp st(1)"], ["fcompp"], ["fucom st(1)"], ["fucomp st(1)"], ["fucompp"],
            ["ftst"], ["fxam"], ["fxch st(1)", "fxam"],
            ["fcomi st(0), st(1)", "lahf", "mov byte ptr [{o}+14], ah"],
            ["fcomip st(0), st(1)", "lahf", "mov byte ptr [{o}+14], ah"],
            ["fucomi st(0), st(1)", "lahf", "mov byte ptr [{o}+14], ah"],
            ["fucomip st(0), st(1)", "lahf", "mov byte ptr [{o}+14], ah"]]
    lines, k = [], 0
    n = len(vals)
    for c in cmps:
        for i in range(n):
            for j in range(n):
                o = OUT + 16 * k
                lines += ["fninit", "xor eax, eax", "sahf", f"fld tbyte ptr [{D + 16 * i}]",
                          f"fld tbyte ptr [{D + 16 * j}]"]
                lines += [x.format(o=o) for x in c]
                lines += [f"fnstsw word ptr [{o + 10}]", f"fstp tbyte ptr [{o}]", f"fnstsw word ptr [{o + 12}]"]
                k += 1
        if k > 0x200 - n * n:
            break
    assert 16 * k <= LEN - 0x1000
    same(*run_both("\n".join(lines), slots(vals)), "compares")


def test_more_compares_and_empty_classes():
    lines = []
    k = 0
    ints = D + 0x400
    for i in range(len(EDGE80)):
        for size, a in (("word", ints), ("word", ints + 2), ("dword", ints + 4), ("dword", ints + 8)):
            for op in ("ficom", "ficomp", "fcom", "fcomp"):
                if op.startswith("fcom") and size == "word":
                    continue
                o = OUT + 16 * k
                lines += ["fninit", f"fld tbyte ptr [{D + 16 * i}]", f"{op} {size} ptr [{a}]",
                          f"fnstsw word ptr [{o}]"]
                k += 1
    # FXAM of an empty register, of ST(7) after pops; FTST/FCOM on an empty stack.
    o = OUT + 16 * k
    lines += ["fninit", "fxam", f"fnstsw word ptr [{o}]", "fld1", "fchs", "fstp st(0)", "fxam",
              f"fnstsw word ptr [{o + 2}]", "ftst", f"fnstsw word ptr [{o + 4}]",
              "fninit", "fcom st(3)", f"fnstsw word ptr [{o + 6}]"]
    data = bytearray(slots(EDGE80) + bytes(0x400))
    data[0x400:0x40C] = struct.pack("<hhii", 3, -1, 0x7FFFFFFF, -7)
    same(*run_both("\n".join(lines), bytes(data)), "ficom/fcom m")


# ------------------------------------------------------------- unary ops and constants
UNARY = ["fchs", "fabs", "fsqrt", "frndint", "fsin", "fcos", "f2xm1", "fxtract", "fsincos", "fptan"]
BINARY_ST01 = ["fscale", "fprem", "fprem1", "fpatan", "fyl2x", "fyl2xp1"]


@pytest.mark.parametrize("cw", RC + PC[:1])
def test_unary_and_special(cw):
    vals = EDGE80 + [ext(x) for x in (0.3, -0.7, 2.5, -3.5, 100.25, 1e10, -1e-5, 7.0, 0.999, 1e19)]
    lines, k = [], 0
    cwa = D + 16 * len(vals)
    for op in UNARY:
        for i in range(len(vals)):
            o = OUT + 32 * k
            lines += ["fninit", f"fldcw word ptr [{cwa}]", f"fld tbyte ptr [{D + 16 * i}]", op,
                      f"fnstsw word ptr [{o + 10}]", f"fstp tbyte ptr [{o}]", f"fnstsw word ptr [{o + 12}]",
                      f"fstp tbyte ptr [{o + 16}]", f"fnstsw word ptr [{o + 26}]"]
            k += 1
    for op in ["fld1", "fldz", "fldpi", "fldl2e", "fldl2t", "fldlg2", "fldln2"]:
        o = OUT + 32 * k
        lines += ["fninit", f"fldcw word ptr [{cwa}]", op, f"fnstsw word ptr [{o + 10}]", f"fstp tbyte ptr [{o}]"]
        k += 1
    data = slots(vals) + struct.pack("<H", cw)
    same(*run_both("\n".join(lines), data), f"unary cw={cw:#x}")


@pytest.mark.parametrize("op", BINARY_ST01)
def test_binary_special(op):
    vals = EDGE80[:13] + [ext(x) for x in (0.3, -3.5, 1e10, 1e19)]
    body = _pairs_program(D + 16 * len(vals), [[op, "fld st(1)"]], vals)   # leaves FSW after op
    data = slots(vals) + struct.pack("<H", 0x037F)
    same(*run_both(body, data), op)


def test_fprem_partial_remainder_loop():
    # 1e4000 rem 3: FPREM needs many iterations; C2 set until done, quotient bits in C0 C3 C1.
    lines = [f"fld tbyte ptr [{D + 16}]", f"fld tbyte ptr [{D}]", "mov ecx, 0", "xor edi, edi"]
    lines += ["again: fprem", "fnstsw ax", f"mov word ptr [{OUT} + edi*2], ax", "inc edi",
              "test ah, 4", "jnz again", f"fstp tbyte ptr [{OUT + 0x400}]", f"mov [{OUT + 0x410}], edi"]
    data = f80(0, 0x3FFF + 13000, 0xC90FDAA22168C235) + bytes(6) + ext(3.0) + bytes(6)
    same(*run_both("\n".join(lines), data), "fprem loop")


# ------------------------------------------------- stack, tags, FCMOV, environment
def test_stack_tags_overflow_underflow():
    e = OUT
    lines = ["fld1", f"fnstenv [{e}]", "fldz", "fldpi", f"fld tbyte ptr [{D + 16 * 11}]",   # a denormal
             f"fld tbyte ptr [{D + 16 * 13}]", f"fld tbyte ptr [{D + 16 * 15}]", f"fnstenv [{e + 32}]",
             "fld1", "fld1", f"fnstenv [{e + 64}]",
             "fld1", f"fnstenv [{e + 96}]", f"fnsave [{e + 128}]", f"frstor [{e + 128}]",   # overflow
             "fstp st(0)", "fstp st(0)", "ffree st(2)", f"fnstenv [{e + 240}]", "fincstp", "fdecstp",
             "fdecstp", f"fnstenv [{e + 272}]", "fninit",
             "fadd st(0), st(3)", f"fnstenv [{e + 304}]",                                # underflow
             "fld1", "fstp st(0)", "fstp st(0)", f"fnstenv [{e + 336}]",
             "fninit", "fld1", "fsqrt", "faddp st(2), st(0)", f"fnsave [{e + 368}]",
             "fninit", "fxch st(3)", f"fnsave [{e + 480}]",
             "fninit", f"fld qword ptr [{D + 0x3F8}]", f"fistp word ptr [{e + 600}]", f"fnstsw [{e + 602}]",
             ]
    data = bytearray(slots(EDGE80) + bytes(0x400))
    data[0x3F8:0x400] = struct.pack("<d", 1e10)
    masks = [0, 32, 64, 96, 128, 240, 272, 304, 336, 368, 480]
    mine, native = run_both("\n".join(lines), bytes(data))
    same(mine, native, "stack", masks=[OUT - D + m for m in masks])
    # Overflow pushed the QNaN indefinite into ST(0) of the saved image.
    img = mine[OUT - D + 128:OUT - D + 236]
    assert img[28:38] == bytes.fromhex("00000000000000c0ffff")


def test_fcmov():
    lines, k = [], 0
    for flags in (0x00, 0x01, 0x04, 0x40, 0x45, 0x41):
        for op in ("fcmovb", "fcmove", "fcmovbe", "fcmovu", "fcmovnb", "fcmovne", "fcmovnbe", "fcmovnu"):
            o = OUT + 16 * k
            lines += ["fninit", "fld1", "fldpi", f"mov ah, {flags}", "sahf", f"{op} st(0), st(1)",
                      f"fstp tbyte ptr [{o}]", f"fnstsw word ptr [{o + 10}]"]
            k += 1
    same(*run_both("\n".join(lines), b""), "fcmov")


def test_environment_round_trips():
    e = OUT
    lines = [f"fld tbyte ptr [{D}]", f"fld tbyte ptr [{D + 32}]", "fldpi", "fdiv st(0), st(2)",   # 0/..., PE
             f"fldcw word ptr [{D + 0x3F0}]", f"fnstcw [{e}]", f"fnstsw [{e + 2}]", "fnstsw ax",
             f"mov [{e + 4}], ax", f"fnstenv [{e + 16}]", f"fnstcw [{e + 8}]",   # FNSTENV masks all
             f"fldenv [{e + 16}]", f"fnstenv [{e + 48}]",
             f"fnsave [{e + 80}]", f"fnstenv [{e + 192}]",                    # FNSAVE re-inits
             f"frstor [{e + 80}]", f"fnsave [{e + 224}]", f"frstor [{e + 224}]",
             "fincstp", "fxch st(2)", f"fstp tbyte ptr [{e + 340}]", f"fnstenv [{e + 352}]", "fnclex",
             f"fnstsw [{e + 384}]", "fninit", f"fnsave [{e + 400}]"]
    data = bytearray(slots(EDGE80) + bytes(0x400))
    data[0x3F0:0x3F2] = struct.pack("<H", 0x0A72)
    mine, native = run_both("\n".join(lines), bytes(data))
    same(mine, native, "env", masks=[OUT - D + m for m in (16, 48, 80, 192, 224, 352, 400)])
    # The guest pointers: FIP/FOP of the last non-control instruction, FDP of its operand.
    env = mine[OUT - D + 352:OUT - D + 380]
    fip, fcs_fop, fdp = struct.unpack("<III", env[12:24])
    assert fip == C + len(asm("\n".join(lines[:lines.index("fincstp") + 2]), C)) and fdp == e + 340
    assert fcs_fop >> 16 == 0x33D    # FSTP m80: DB /7 (FOP = low 3 opcode bits, ModRM 0x3D)
    assert mine[OUT - D + 400 + 12:OUT - D + 400 + 26] == bytes(14)      # FNINIT cleared them


# ----------------------------------------------------------------- btvm-only behaviour
def _btvm(body, data=b""):
    code = asm(body + "\nhlt", C)
    r = run_case(make_case(code, addr=C, data={D: data + bytes(0x100)}))
    ram = dict(map(tuple, r["final"]["ram"]))
    return r, bytes(ram.get(OUT + i, 0) for i in range(0x100))


def test_unmasked_exception_raises_mf_at_next_waiting_insn():
    pre = f"fldcw word ptr [{D}]; fld1; fldz; fdivp st(1), st(0); fnstsw word ptr [{OUT}]"
    r, out = _btvm(pre + "; fld1; mov eax, 5", struct.pack("<H", 0x037B))   # ZE unmasked
    assert r["exception"] == {"vector": 16, "error_code": None}
    assert r["final"]["regs"]["eip"] == C + len(asm(pre, C))
    sw = struct.unpack("<H", out[:2])[0]
    assert sw & 0x8084 == 0x8084 and (sw >> 11) & 7 == 6      # B, ES, ZE; no pop: TOP still 6
    # FNSTENV masks every exception (the hardware then clears ES): no fault; FLDENV re-arms it.
    env = f"; fnstenv [{OUT + 16}]; fld1"
    r, _ = _btvm(pre + env, struct.pack("<H", 0x037B))
    assert r["exception"] is None
    r, _ = _btvm(pre + env + f"; fldenv [{OUT + 16}]; fnstsw ax; wait", struct.pack("<H", 0x037B))
    assert r["exception"] == {"vector": 16, "error_code": None}
    assert r["final"]["regs"]["eax"] & 0x8084 == 0x8084


def test_fault_on_store_leaves_fpu_state_unchanged():
    from runtime.snippet import Snippet
    sn = Snippet()
    try:
        code = asm("fld1; fldpi; fstp tbyte ptr [0x7ffffffa]; hlt", C)
        sn.mem.write(C, code)
        sn.mem.unmap(0x7FFFF000, 0x1000)
        sn.cpu.set_reg("eip", C)
        sn.cpu.set_reg("esp", 0x9000)
        stop = sn.cpu.run(100)
        assert stop.reason == "exception" and stop.info["vector"] == 14
        sw = sn.cpu.st.fpu[4] | sn.cpu.st.fpu[5] << 8
        assert (sw >> 11) & 7 == 6          # both pushes done, the FSTP not
    finally:
        sn.close()


def test_cpuid_reports_fpu():
    assert cpuid(1)[3] & 1


def test_the_x87_mnemonic_list_is_what_capstone_decodes():
    # bt/semantics/x87.py lists the mnemonics instead of decoding every encoding at start-up.
    from bt.semantics.x87 import all_encodings, encodings
    assert encodings() == all_encodings()

"""Segment limit, type and null-selector checks on memory accesses (SDM Vol. 3A 5.3, 5.4.1, 5.5).

Unicorn (QEMU's TCG) does not check data-segment limits, so these are hand-checked SDM cases: an
access through a null selector, beyond the limit (expand-up: offset..offset+size-1 within
[0, limit]; expand-down: within [limit+1, 0xFFFF or 0xFFFFFFFF by the B flag]), or a write to a
read-only data or a code segment is #GP(0), or #SS(0) through SS.

The bodies run in tests/test_callouts.py's kernel (its PRELUDE GDT), extended with the descriptors
below.  The IDT handler records through DS, so DS only ever gets segments that cover the results area.
"""
import pytest

from bt import state as S
from tests.test_callouts import NEW_GDT, OUT, _desc, completed, faulted, run, store, to_ring3

SMALL, DS_LIM, XDOWN32, XDOWN16, STACK = 0x70, 0x78, 0x80, 0x88, 0x90
DESCS = {
    SMALL: _desc(0x300000, 0x1FF, 0x92, 0x4),      # data, base 0x300000, limit 0x1ff
    DS_LIM: _desc(0, 0x30F, 0x92, 0xC),            # data, base 0, limit 0x30ffff (4 KiB granular)
    XDOWN32: _desc(0, 0x2FF, 0x96, 0xC),           # expand-down, B=1: offsets 0x300000..0xffffffff
    XDOWN16: _desc(0x300000, 0xFF, 0x96, 0x0),     # expand-down, B=0: offsets 0x100..0xffff
    STACK: _desc(0, 0x305, 0x92, 0xC),             # stack, limit 0x305fff (kstack_top is 0x306000)
}
RO, CONF = 0x40, 0x58                              # PRELUDE: read-only (base 0x1000, limit 0xfff); readable code

GDT = "".join(f"    mov dword ptr [{NEW_GDT + s + 4 * i:#x}], {v:#x}\n" for s, d in DESCS.items() for i, v in enumerate(d)) \
    + f"    mov word ptr [{NEW_GDT + 0x800:#x}], {max(DESCS) + 7:#x}\n    lgdt [{NEW_GDT + 0x800:#x}]\n"


def seg(reg, sel):
    return f"    mov ax, {sel:#x}\n    mov {reg}, ax\n"


@pytest.mark.parametrize("code,vector", [
    (seg("fs", SMALL) + "    mov eax, fs:[0x1fd]", 13),              # dword crosses the limit
    (seg("gs", SMALL) + "    mov byte ptr gs:[0x200], 1", 13),
    (seg("ds", DS_LIM) + "    mov eax, [0x30fffe]", 13),             # DS not flat: checked too
    (seg("ds", DS_LIM) + "    mov esi, 0x30fff0\n    mov edi, 0x300180\n    mov ecx, 8\n    .byte 0xf3, 0xa5   # rep movsd", 13),
    ("    xor eax, eax\n    mov es, ax\n    mov edi, 0x300180\n    stosd", 13),   # null ES
    (seg("fs", RO) + "    mov fs:[0], eax", 13),                     # read-only data
    (seg("fs", RO) + "    add fs:[0], eax", 13),
    (seg("gs", CONF) + "    mov gs:[0x300180], eax", 13),            # code is never writable
    (seg("es", XDOWN32) + "    mov eax, es:[0x2ffffe]", 13),         # below an expand-down range
    (seg("fs", XDOWN16) + "    mov eax, fs:[0xfffe]", 13),           # beyond 0xffff (B=0)
    (seg("fs", XDOWN16) + "    mov eax, fs:[0xfc]", 13),
    (seg("fs", SMALL) + "    mov ecx, 0x1000\n    bt dword ptr fs:[0], ecx", 13),   # bit string: the word at 0x200
    (seg("fs", SMALL) + "    fld qword ptr fs:[0x1fc]", 13),
    (seg("fs", SMALL) + "    bound eax, qword ptr fs:[0x1fc]", 13),
    (seg("ss", STACK) + "    mov eax, [esp + 8]", 12),               # SS: #SS(0)
    (seg("ss", STACK) + "    mov eax, ss:[0x306000]", 12),
    (seg("ss", STACK) + "    mov esp, 0x306002\n    push eax", 12),
    ("    xor eax, eax\n    mov fs, ax\n    sgdt fs:[0x300180]", 13),            # a callout's operand too
])
def test_access_outside_the_segment_faults(code, vector):
    res, r, _ = run(GDT + code + "\n")
    faulted(r, vector, 0)


def test_accesses_inside_the_segments_work():
    body = (GDT + "    mov dword ptr [0x3001fc], 0x11111111\n    mov dword ptr [0x300180], 0x22222222\n"
            + seg("fs", SMALL) + "    mov eax, fs:[0x1fc]\n" + store(0)
            + "    mov ecx, 0xfff\n    bts dword ptr fs:[0], ecx\n    mov eax, [0x3001fc]\n" + store(1)
            + seg("es", XDOWN32) + "    mov eax, es:[0x300180]\n" + store(2)
            + seg("gs", XDOWN16) + "    mov eax, gs:[0x180]\n" + store(3)
            + seg("ds", DS_LIM) + "    mov esi, 0x300180\n    mov edi, 0x300190\n    mov ecx, 1\n    .byte 0xf3, 0xa5   # rep movsd\n"
            + "    mov eax, [0x300190]\n" + store(4)
            + seg("ds", 0x10) + seg("ss", STACK) + "    push 0x33\n    pop eax\n" + store(5)
            + seg("gs", CONF) + "    mov eax, gs:[0x300180]\n" + store(6)
            + seg("ss", 0x10) + seg("es", 0x10))
    res, r, out = run(body)
    completed(res, r)
    assert out[:7] == [0x11111111, 0x91111111, 0x22222222, 0x22222222, 0x22222222, 0x33, 0x22222222]


def test_null_fs_in_ring3_is_gp():
    res, r, _ = run(to_ring3("    xor eax, eax\n    mov fs, ax\n    mov eax, fs:[0]\n"), prelude=False)
    faulted(r, 13, 0)


# ---- the common case costs nothing --------------------------------------------------------------
def _ir(text, **key):
    from bt.decode import decode_block
    from bt.jit import ModuleText
    from bt.semantics import ends_block
    from bt.translate import translate_block
    from tests.helpers import asm, CODE
    code = asm(text)
    blk = decode_block(lambda a, n: code[a - CODE:a - CODE + n], CODE, S.make_key(**key), ends_block)
    mt = ModuleText("t")
    translate_block(blk, "f", mt)
    return mt.text()


def _checks(ir):
    lo = S.offset("seg_lo")
    return sum(f"ptr %st, i64 {lo + 4 * i}\n" in ir for i in range(12))


def test_flat_segments_and_a_4gib_fs_are_not_checked():
    assert _checks(_ir("mov eax, [ebx]; mov [ecx], eax; push eax; rep movsb; ret")) == 0
    assert _checks(_ir("mov eax, fs:[ebx]; mov gs:[ebx], eax; ret")) == 1                    # GS only
    assert _checks(_ir("mov eax, fs:[ebx]; mov gs:[ebx], eax; ret", fs_full=False)) == 2

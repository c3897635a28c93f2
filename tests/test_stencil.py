"""Tier 1 by copy-and-patch (bt/stencil.py): blocks built from stencils must behave as the
oracle (Unicorn) says, whichever process compiled the stencils, and the stencil store must
never hand out a stencil that does not belong to the shape asked for."""
import llvmlite.binding as llvm
import pytest

from bt import cache as C, stencil
from runtime.snippet import run_case
from tests.helpers import asm, make_case, oracle_mismatches


@pytest.fixture
def fresh_library(monkeypatch, tmp_path):
    """A new stencil library stored in tmp_path (new(): another one, as another process would
    have, reading the same folder); no block memo carried over between runs."""
    monkeypatch.setattr(C, "_MEMO", {})
    monkeypatch.setenv("BTVM_NO_CACHE", "1")

    def new():
        stencil.flush_stores()              # what the previous "process" wrote at exit
        b = stencil.Builder(stencil.Library(stencil.Store(tmp_path, "v" * 24)))
        monkeypatch.setattr(stencil, "_shared", b)
        C._MEMO.clear()
        return b
    return new


def _check(code, **kw):
    case = make_case(code, **kw)
    result = run_case(case)
    assert oracle_mismatches(case, result) == []
    return result


def test_blocks_are_built_from_stencils(fresh_library):
    b = fresh_library()
    _check(asm("""
        mov eax, 0x12345678
        add eax, 0x7FFFFFF0
        mov ecx, 10
    l:  lea edx, [eax + ecx*4 - 0x80000000]
        xor eax, edx
        sub dword ptr [0x3000 + ecx*4], 0xFFFFFF80
        dec ecx
        jnz l
        hlt"""), data={0x3000: bytes(range(64))})
    assert b.blocks >= 3 and b.lib.compiled > 0


def test_high_hole_values_are_not_sign_extended(fresh_library):
    """Immediates, displacements and addresses >= 2^31 patched into holes (LLVM must not treat
    them as sign-extended 32-bit symbol addresses)."""
    fresh_library()
    _check(asm("""
        mov ebx, 0x80000000
        mov eax, dword ptr [ebx + 0x7FFFF004]
        mov ecx, 0xF0006000
        add ecx, 0x80000000
        mov edx, dword ptr [ecx + 0x90000000]
        mov esi, dword ptr [0xFFFFF006]
        hlt"""), data={0xFFFFF004: b"\x11\x22\x33\x44\x99\xAA", 0x6000: b"\x55\x66\x77\x88"})


def test_a_shape_raised_to_a_fixed_operand_is_not_shared(fresh_library):
    """RET imm16 computes with its operand in Python, so its stencil has the operand fixed: a
    later process that learns that from the store must not run `ret 12` with the stencil made
    for `ret 8` (the store once aliased the open shape to the first fixed one)."""
    def ret_n(n):
        return asm(f"""
            push 0x11111111
            push 0x22222222
            push 0x33333333
            push 0x44444444
            call f
            hlt
        f:  ret {n}""")
    a = fresh_library()
    _check(ret_n(8))
    assert a.lib.level, "ret imm16 no longer needs a fixed operand: pick another instruction"
    b = fresh_library()                     # same store, fresh process state
    _check(ret_n(12))
    assert b.lib.loaded > 0


def test_store_writes_in_batches_and_at_exit(fresh_library, tmp_path, monkeypatch):
    """Each compile's records wait for a batch (a file per compile cost a cold Linux boot ~1 s of
    small writes); exit and fork write what is pending, and a later process loads it."""
    monkeypatch.setattr(stencil, "SAVE_SECONDS", 3600)
    a = fresh_library()
    _check(asm("mov eax, 7\nimul eax, eax, 6\nhlt"))
    assert a.lib.compiled > 0 and a.lib.store.pending and not list(tmp_path.rglob("*.stl"))
    monkeypatch.setattr(stencil, "SAVE_BATCH", 1)
    _check(asm("mov eax, 7\nshl eax, 3\nhlt"))
    assert not a.lib.store.pending and len(list(tmp_path.rglob("*.stl"))) == 1
    monkeypatch.setattr(stencil, "SAVE_BATCH", 10**6)
    _check(asm("mov eax, 7\nrol eax, 3\nhlt"))
    assert a.lib.store.pending
    b = fresh_library()                     # flushes a's store, as exit does
    assert len(list(tmp_path.rglob("*.stl"))) == 2
    _check(asm("mov eax, 7\nrol eax, 3\nhlt"))
    assert b.lib.loaded > 0 and b.lib.compiled == 0


_EXIT_WRITES = r'''
import os, sys
from pathlib import Path
from bt import stencil
from runtime.snippet import run_case
from tests.helpers import asm, make_case
stencil._shared = stencil.Builder(stencil.Library(stencil.Store(Path(sys.argv[1]), "v" * 24)))
run_case(make_case(asm("mov eax, 7\nimul eax, eax, 6\nhlt")))
before = len(list(Path(sys.argv[1]).rglob("*.stl")))
if sys.argv[2] == "fork":
    pid = os.fork()         # the parent writes what is pending first; the child has nothing left
    if pid == 0:
        sys.exit(0)
    os.waitpid(pid, 0)
    print(before, len(list(Path(sys.argv[1]).rglob("*.stl"))), flush=True)
'''


@pytest.mark.parametrize("how", ["exit", "fork"])
def test_pending_records_are_written_at_exit_and_fork_once(tmp_path, how):
    import os
    import subprocess
    import sys
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = subprocess.run([sys.executable, "-c", _EXIT_WRITES, str(tmp_path), how], capture_output=True, text=True,
                       timeout=120, cwd=root, env=dict(os.environ, BTVM_NO_CACHE="1"))
    assert p.returncode == 0, p.stderr
    files = list(tmp_path.rglob("*.stl"))
    if how == "fork":
        assert p.stdout.split() == ["0", "1"]       # nothing before the fork, one file at it
    assert len(files) == 1                          # written once: the child and the exit add none


def test_corrupt_store_files_are_ignored(fresh_library, tmp_path):
    fresh_library()
    code = asm("mov eax, 7\nimul eax, eax, 6\nhlt")
    _check(code)
    stencil.flush_stores()
    files = list(tmp_path.rglob("*.stl"))
    assert files
    for p in files:
        data = bytearray(p.read_bytes())
        data[-1] ^= 0xFF
        p.write_bytes(bytes(data))
    b = fresh_library()
    _check(code)
    assert b.lib.loaded == 0 and b.lib.compiled > 0


def test_llvm_tier1_still_matches_the_oracle(monkeypatch):
    """The LLVM tier 1 serves blocks without stencils: run the same code through it alone."""
    monkeypatch.setattr(stencil, "ENABLED", False)
    monkeypatch.setattr(C, "_MEMO", {})
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    _check(asm("""
        mov ecx, 20
        xor eax, eax
    l:  add eax, ecx
        rol eax, 3
        loop l
        hlt"""))


def test_a_stencil_calling_into_its_module_is_refused():
    """A call that LLVM resolved inside the object (to a function it did not inline) would jump
    into nothing once the stencil is copied: parse_object must refuse that stencil."""
    stencil._init()
    tm = llvm.Target.from_default_triple().create_target_machine(reloc="static", codemodel="small")
    mod = llvm.parse_assembly("""
define internal i32 @helper(ptr %st) noinline { ret i32 1 }
define i32 @s1(ptr %st) section ".text.s1" { %r = call i32 @helper(ptr %st) ret i32 %r }
define i32 @s2(ptr %st) section ".text.s2" { ret i32 2 }
""")
    out = stencil.parse_object(tm.emit_object(mod))
    assert out["s1"] is None and out["s2"] is not None


def test_register_operands_are_holes(fresh_library):
    """One stencil serves an instruction whatever registers it names (their state offsets are
    holes); naming the same register twice is another shape (the values must see each other)."""
    b = fresh_library()
    _check(asm("""
        mov eax, 0x1234
        mov ebx, 0x77
        mov ecx, 0xF0000000
        mov edx, 3
        add eax, ebx
        add ecx, edx
        add esi, edi
        add edx, edx
        add ebp, ebp
        hlt"""))
    adds = [k for k in b.lib.stencils if k[0] == "i" and k[4] == "add"]
    assert len(adds) == 2, adds


@pytest.mark.parametrize("first, second", [
    ("push ebx", "push esp"),
    ("pop ebx", "pop esp"),
    ("pop dword ptr [ebx + 4]", "pop dword ptr [esp + 4]"),
    ("mul ecx", "mul eax"),
    ("mul ecx", "mul edx"),
    ("div ecx", "div edx"),
    ("xadd ecx, edx", "xadd eax, eax"),
    ("cmpxchg ecx, edx", "cmpxchg ecx, eax"),
    ("cmpxchg ecx, edx", "cmpxchg eax, edx"),
    ("xchg ecx, edx", "xchg eax, eax"),
    ("shl edx, cl", "shl ecx, cl"),
    ("lea ebx, [esp + 8]", "lea esp, [esp + 8]"),
    ("cwde", "cbw"),
    ("movzx ecx, ah", "movzx eax, ah"),
    ("mov ah, bl", "mov bh, bl"),
])
def test_a_register_hole_never_aliases_an_implicit_register(fresh_library, first, second):
    """A stencil made for `first` names some registers itself (ESP for a push, EAX:EDX for a
    multiply); `second`, of the same shape, holds one of those in a register hole.  It must take
    a stencil with its registers fixed: values cached within the stencil would not see each
    other's updates."""
    fresh_library()
    _check(asm(f"""
        mov eax, 0x81234567
        mov ebx, 0x00008000
        mov ecx, 0x00000005
        mov edx, 0x00000002
        mov ebx, 0x8000
        push 0x11111111
        push 0x22222222
        push 0x33333333
        {first}
        push 0x44444444
        push 0x55555555
        {second}
        hlt"""), data={0x8000: bytes(range(32))})


def test_single_step_blocks_share_the_stencils(fresh_library):
    """KEY_STEP (one instruction per block) changes no instruction's code: its blocks use the
    same stencils, and only the jump-cache probe of an indirect exit (a hole) sees the key."""
    from bt import state as S
    from bt.decode import decode_block
    from bt.semantics import ends_block
    b = fresh_library()
    code = asm("mov eax, 0x1000\n add eax, ebx\n jmp eax")
    fetch = lambda a, n: code[a - 0x1000:a - 0x1000 + n]        # noqa: E731
    key = S.KEY_CS32 | S.KEY_PE | S.KEY_FLAT
    assert b.build(decode_block(fetch, 0x1000, key, ends_block)) is not None
    shapes = {k for k in b.lib.stencils if k[0] == "i"}
    pos = 0x1000
    while pos < 0x1000 + len(code):
        blk = decode_block(fetch, pos, key | S.KEY_STEP, ends_block)
        assert len(blk.insns) == 1 and b.build(blk) is not None
        pos = blk.end
    assert {k for k in b.lib.stencils if k[0] == "i"} == shapes
    _check(code + asm("hlt"), regs={"ebx": len(code)})


def _recipes(builder, code, at, key):
    """The recipes builder makes of code's blocks placed at guest address at."""
    from bt.decode import decode_block
    from bt.semantics import ends_block, starts_block
    fetch = lambda a, n: code[a - at:a - at + n] if a >= at else b""     # noqa: E731
    out, pos = [], at
    while pos < at + len(code):
        blk = decode_block(fetch, pos, key, ends_block, starts_block=starts_block)
        out.append(builder.build(blk, 100)[-1])
        pos = blk.end
    return out


def test_pieces_give_the_recipes_a_fresh_library_gives(fresh_library):
    """Builder keeps each instruction's stencil with its fixed values patched in (a Piece, looked
    up by the instruction's bytes): the same bytes at other addresses, on another page and
    across page ends, must give byte for byte the recipe that a library without pieces gives."""
    from bt import state as S
    code = asm("""
        push ebp
        mov ebp, esp
        mov eax, dword ptr [ebp + 8]
        add eax, 0x12345
        cmp eax, 7
        jne l1
        call l2
    l1: lea edx, [eax + ecx*4 - 0x80]
        mov dword ptr [0x3000 + ecx*4], edx
        jmp l2
    l2: shl eax, 3
        loop l1
        jecxz l3
        pop ebp
        ret
    l3: mov eax, dword ptr [0xFF8]
        jmp eax""")
    key = S.make_key(cpl=0) | S.KEY_PG

    def recipes(builder, at):
        return _recipes(builder, code, at, key)

    warm = fresh_library()
    recipes(warm, 0x1000)
    held = len(warm.lib.pieces)
    for at in (0x7FF3, 0x12340, 0x2FFE0):
        mine = recipes(warm, at)
        assert mine == recipes(fresh_library(), at)
    assert held > 10
    # btvm_assemble with buffers too small for one part and one recipe: they grow.
    small = fresh_library()
    small.assemble([], [])
    small._assembler._grow(1, 16)
    assert recipes(small, 0x7FF3) == recipes(warm, 0x7FF3)


def test_pieces_are_shared_by_instructions_of_one_form(fresh_library, monkeypatch):
    """An instruction whose bytes are new but whose form (the instruction with its immediates
    and displacements left out) was met takes that form's piece, its values as vars: no shape
    is made for it, and the recipe is byte for byte a fresh library's.  An immediate that the
    kind's level fixes in the stencil (RET imm16 reads its encoding) is part of the form."""
    from bt import state as S
    text = """
        mov eax, dword ptr [ebp + {d}]
        add eax, {i}
        lea edx, [eax + ecx*4 - {d}]
        mov dword ptr [{a} + ecx*4], edx
        cmp edx, {i}
        jne l1
    l1: ret {r}"""
    key = S.make_key(cpl=0) | S.KEY_PG

    def recipes(builder, code):
        return _recipes(builder, code, 0x1000, key)

    warm = fresh_library()
    recipes(warm, asm(text.format(d=8, i=0x12345, a=0x3000, r=4)))
    other = asm(text.format(d=0x7FF0, i=7, a=0x80004000, r=4))
    made = []
    shape = warm.lib.shape
    monkeypatch.setattr(warm.lib, "shape", lambda *a: made.append(a[0].mnemonic) or shape(*a))
    mine = recipes(warm, other)
    assert made == []
    assert mine == recipes(fresh_library(), other)
    # RET imm16 is made at a level that fixes its immediate: another one needs its own shape.
    again = recipes(warm, asm(text.format(d=8, i=0x12345, a=0x3000, r=8)))
    assert made == ["ret"]
    assert again == recipes(fresh_library(), asm(text.format(d=8, i=0x12345, a=0x3000, r=8)))


def test_instructions_sharing_a_form_run_as_the_oracle_says(fresh_library, monkeypatch):
    """The second program differs from the first only in immediates and displacements: its
    instructions take the first's pieces by form, no shape is made, and it must still compute
    what Unicorn computes."""
    text = """
        mov eax, dword ptr [0x3000 + {d}]
        add eax, {i}
        lea edx, [eax + ecx*4 - {d}]
        mov dword ptr [0x3100 + ecx*4 + {d}], edx
        imul ebx, eax, {i}
        cmp edx, {i}
        jne l1
        xor esi, esi
    l1: shr eax, 3
        hlt"""
    b = fresh_library()
    data = {0x3000: bytes(range(128))}
    _check(asm(text.format(d=8, i=0x12345)), regs={"ecx": 3}, data=data)
    made = []
    shape = b.lib.shape
    monkeypatch.setattr(b.lib, "shape", lambda *a: made.append(a[0].mnemonic) or shape(*a))
    built = b.blocks
    _check(asm(text.format(d=0x24, i=0x7FFF0001)), regs={"ecx": 5}, data=data)
    assert b.blocks > built and made == []


def test_shapes_with_the_same_ir_share_one_stencil(fresh_library):
    """Shapes of one instruction under keys that differ in a bit its code never looks at (IOPL
    for ADD) compile once; a bit it does look at (CPL for a memory access: the user TLB) gives
    a stencil of its own.  A later process finds the shared stencil through the store."""
    from bt import state as S
    from bt.decode import disasm

    def stencil_of(lib, text, key):
        insn = next(disasm(asm(text), 0x1000, 1))
        st, = lib.get([lib.shape(insn, key, 0x1000)])
        return st

    k0, k3 = S.make_key(iopl=0), S.make_key(iopl=3)
    b = fresh_library()
    add0 = stencil_of(b.lib, "add eax, ebx", k0)
    n = b.lib.compiled
    assert stencil_of(b.lib, "add eax, ebx", k3) is add0
    assert b.lib.compiled == n and b.lib.shared == 1
    assert stencil_of(b.lib, "mov eax, [ebx]", S.make_key(cpl=3)) is not stencil_of(b.lib, "mov eax, [ebx]", k0)
    b2 = fresh_library()
    assert stencil_of(b2.lib, "add eax, ebx", S.make_key(iopl=2)).code == add0.code
    assert b2.lib.compiled == 0 and b2.lib.shared == 1
    _check(asm("mov eax, 5\n add eax, ebx\n mov ebx, 0x3000\n mov ecx, [ebx]\n hlt"), regs={"ebx": 7},
           data={0x3000: b"\x01\x02\x03\x04"})


def _patched_by_hand(recipe, addr, slots, hot_cell, cnt_cell, delta):
    """What Builder._install's native btvm_install must write: the recipe's code with its moving
    values moved by delta and its cell and code references patched (the Python it replaced)."""
    import struct
    S_ = stencil
    ncode, nrel, nslots, nmove = S_._RECIPE_HEAD.unpack_from(recipe)
    moves_at = S_._RECIPE_HEAD.size + nrel * S_._CELL_REL.size
    code_at = moves_at + (0 if nmove == S_._FIXED else nmove * S_._MOVE_REL.size)
    bases = {S_._HOT: hot_cell, S_._CNT: cnt_cell, S_._CODE: addr, S_._ZERO: 0}
    buf = bytearray(recipe[code_at:])
    for k in range(nmove if delta else 0):
        off, size, addend = S_._MOVE_REL.unpack_from(recipe, moves_at + k * S_._MOVE_REL.size)
        v, = struct.unpack_from(S_._PACK[size], buf, off)
        struct.pack_into(S_._PACK[size], buf, off, (((v - addend + delta) & 0xFFFFFFFF) + addend) & S_._MASK[size])
    for off, size, pcrel, which, addend in S_._CELL_REL.iter_unpack(recipe[S_._RECIPE_HEAD.size:moves_at]):
        v = (slots[which] if which < nslots else bases[which]) + addend - (addr + off if pcrel else 0)
        struct.pack_into(S_._PACK[size], buf, off, v & S_._MASK[size])
    return bytes(buf)


def test_recipes_install_as_patched_by_hand_and_corrupt_ones_stay_in_bounds(fresh_library):
    """btvm_install (bt.assemble) copies a recipe into code memory and patches it as the Python
    above does, moved or not; a corrupt recipe (the disk cache's) is refused or installed, but
    never written past its own code."""
    import ctypes
    import random
    from bt import state as S
    from bt.decode import decode_block
    from bt.semantics import ends_block, starts_block
    b = fresh_library()
    code = asm("""
        mov eax, dword ptr [ebp + 8]
        add eax, 0x12345
        jne l1
        call l1
    l1: lea edx, [eax + ecx*4 - 0x80]
        mov dword ptr [0x3000 + ecx*4], edx
        loop l1
        ret""")
    key = S.make_key(cpl=3) | S.KEY_PG
    fetch = lambda a, n: code[a - 0x1000:a - 0x1000 + n] if a >= 0x1000 else b""     # noqa: E731
    recipes, pos = [], 0x1000
    while pos < 0x1000 + len(code):
        blk = decode_block(fetch, pos, key, ends_block, starts_block=starts_block)
        addr, slots, hot, cnt, recipe = b.build(blk, 100)
        assert ctypes.string_at(addr, len(_patched_by_hand(recipe, addr, slots, hot, cnt, 0))) == \
            _patched_by_hand(recipe, addr, slots, hot, cnt, 0)
        recipes.append(recipe)
        pos = blk.end
    for recipe in recipes:
        assert stencil.movable(recipe)
        addr, slots, hot, cnt = b.rebuild(recipe, 100, 0x5000)
        want = _patched_by_hand(recipe, addr, slots, hot, cnt, 0x5000)
        assert ctypes.string_at(addr, len(want)) == want
    rng = random.Random(3)
    refused = 0
    for _ in range(2000):
        r = bytearray(rng.choice(recipes))
        for _ in range(rng.randrange(1, 6)):
            r[rng.randrange(len(r))] = rng.randrange(256)
        ncode = stencil._RECIPE_HEAD.unpack_from(r)[0]
        got = b.rebuild(bytes(r), 100, rng.choice([0, 0x1000]))
        refused += got is None
        if got is not None:         # the bytes after its code (fresh, zeroed memory) are untouched
            end = got[0] + ncode
            assert ctypes.string_at(end, 64) == bytes(64)
    assert refused > 0

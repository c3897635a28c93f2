"""The prebuilt stencil library (bt/library.py, `btvm prebuild`): its forms are instructions the
translator supports, its stencils are the ones a guest would have compiled, and code built from
them computes what Unicorn computes without compiling anything."""
import os
import subprocess
import sys

import pytest

from bt import cache as C, decode, library, stencil, state as S
from bt.translate import TABLE
from runtime.snippet import run_case
from tests.helpers import asm, make_case, oracle_mismatches

SNIPPET_MODE = S.make_key(cpl=0)        # runtime.snippet's
PAGING_MODE = S.make_key(pg=True, cpl=0) | S.KEY_FPU_MP


def test_every_form_is_one_supported_instruction():
    forms = library.read_forms()
    assert len(forms) > 500
    for raw in forms:
        insn = next(decode.disasm(raw, 0x1800, 1), None)
        assert insn is not None and insn.size == len(raw), raw.hex()
        assert insn.id in TABLE, insn.text()
    assert SNIPPET_MODE in library.MODES and PAGING_MODE in library.MODES


def test_a_block_ending_instruction_gets_every_page_decision():
    """Under paging a block's last instruction's stencil depends on whether its next address
    and its branch target leave the block's page: all four combinations are made, whatever the
    form's own displacement (here one that reaches far off any page)."""
    lib = stencil.Library(None)
    jne = bytes.fromhex("0f8500100000")             # jne +0x1000
    made = library.shapes(lib, [jne], modes=(PAGING_MODE, SNIPPET_MODE))
    cross = {sh.key[-1] for sh in made if sh.key[0] == "i" and sh.key[2] == PAGING_MODE}
    assert cross == {(("h_imm0", a), ("h_next", b)) for a in (False, True) for b in (False, True)}
    assert len([sh for sh in made if sh.key[0] == "i" and sh.key[2] == SNIPPET_MODE]) == 1


def _same(a, b):
    return (a is None) == (b is None) and (a is None or (a.code, a.relocs, a.phys) == (b.code, b.relocs, b.phys))


def test_prebuilt_stencils_are_the_ones_compiled_on_demand(tmp_path):
    forms = library.read_forms()[::7]
    modes = (SNIPPET_MODE, PAGING_MODE)
    built = stencil.Library(stencil.Store(tmp_path, "v" * 24))
    n, compiled, _ = library.prebuild(built, forms, modes)
    assert compiled > 0 and n > len(forms)
    # Another process reading the folder compiles nothing for them, and gets what a library
    # without a store compiles.
    reader = stencil.Library(stencil.Store(tmp_path, "v" * 24))
    fresh = stencil.Library(None)
    want = library.shapes(reader, forms, modes)
    got = reader.get(want)
    assert reader.compiled == 0 and reader.loaded > 0
    again = fresh.get(library.shapes(fresh, forms, modes))
    assert fresh.compiled > 0
    assert len(got) == len(again) and all(_same(a, b) for a, b in zip(got, again))


@pytest.fixture(scope="module")
def prebuilt(tmp_path_factory):
    """A folder holding the whole library for the snippet mode."""
    root = tmp_path_factory.mktemp("library")
    library.prebuild(stencil.Library(stencil.Store(root, "v" * 24)), modes=(SNIPPET_MODE,))
    stencil.flush_stores()
    return root


def test_code_built_from_the_library_matches_the_oracle_and_compiles_nothing(prebuilt, monkeypatch):
    monkeypatch.setattr(C, "_MEMO", {})
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    b = stencil.Builder(stencil.Library(stencil.Store(prebuilt, "v" * 24)))
    monkeypatch.setattr(stencil, "_shared", b)
    case = make_case(asm("""
        push ebp
        mov ebp, esp
        sub esp, 0x10
        mov eax, dword ptr [ebp + 4]
        mov ecx, 12
    l:  lea edx, [eax + ecx*4 + 3]
        xor eax, edx
        shl eax, 3
        add dword ptr [esp + 4], eax
        movzx ebx, byte ptr [esp + 5]
        or eax, ebx
        test ecx, 1
        je l2
        sub eax, ecx
    l2: dec ecx
        jne l
        mov esp, ebp
        pop ebp
        hlt"""), regs={"esp": 0x3800}, data={0x37E0: bytes(range(1, 49))})
    result = run_case(case)
    assert oracle_mismatches(case, result) == []
    assert b.blocks >= 4 and b.lib.loaded > 0
    assert b.lib.compiled == 0


def _btvm(*args, **kw):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, **kw)


def test_btvm_prebuild_fills_the_cache_folder_once(tmp_path):
    first = _btvm("prebuild", "--cache-dir", str(tmp_path / "c"))
    assert first.returncode == 0, first.stderr
    assert " compiled now" in first.stdout and first.stderr == ""
    again = _btvm("prebuild", "--cache-dir", str(tmp_path / "c"))
    assert again.returncode == 0 and "(0 compiled now" in again.stdout
    assert any((tmp_path / "c" / "stencils").rglob("*.stl")) and any((tmp_path / "c" / "runtime").glob("*.o"))


def test_btvm_prebuild_without_a_usable_folder_says_so_in_one_line(tmp_path):
    (tmp_path / "file").write_text("")
    unusable = str(tmp_path / "file" / "sub")
    for args, env in (((("--cache-dir", unusable)), {}), ((), {"BTVM_CACHE_DIR": unusable}), ((), {"BTVM_NO_CACHE": "1"})):
        bad = _btvm("prebuild", *args, env=dict(os.environ, **env))
        assert bad.returncode == 1 and bad.stdout == "", (args, env)
        assert len(bad.stderr.splitlines()) == 1 and bad.stderr.startswith("btvm prebuild: "), bad.stderr
    assert not (tmp_path / "file").is_dir()


def test_a_malformed_forms_line_is_named(tmp_path):
    forms = tmp_path / "forms.txt"
    forms.write_text("# comment\n89c8  mov eax, ecx\n\nzz12  junk\n")
    with pytest.raises(ValueError, match=r"forms.txt:4: "):
        library.read_forms(forms)
    forms.write_text("# comment\n89c8  mov eax, ecx\n")
    assert library.read_forms(forms) == [b"\x89\xc8"]

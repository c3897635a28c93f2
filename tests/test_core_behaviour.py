"""Behaviour of the core translator beyond single instructions: self-modifying code,
precise exceptions, exact instruction budgets, chaining and the code-cache counters."""
import ctypes
import json
import subprocess
import sys

import pytest

from runtime.snippet import Snippet, run_case, CaseError
from tests.helpers import asm, make_case, oracle_mismatches, CODE


def test_block_rewrites_its_own_later_instruction():
    # mov byte [imm8 of the next instruction], 0x42 ; mov al, 0 ; hlt  -- one block
    code = bytearray(asm("mov byte ptr [0x1008], 0x42; mov al, 0; hlt"))
    assert code[7] == 0xB0 and len(code) == 10
    case = make_case(bytes(code))
    r = run_case(case)
    assert r["final"]["regs"]["eax"] & 0xFF == 0x42
    assert oracle_mismatches(case, r) == []


def test_rep_stos_overwrites_code_ahead_in_the_same_block():
    # rep stosb fills the following 'mov eax, 1' (B8 01 00 00 00) with NOPs (0x90).
    code = asm("mov edi, 0x100e; mov ecx, 5; mov al, 0x90; rep stosb; mov eax, 1; hlt")
    assert code[0xe:0x13] == bytes.fromhex("b801000000")
    case = make_case(code)
    r = run_case(case)
    assert r["final"]["regs"]["eax"] == 0x90
    assert oracle_mismatches(case, r) == []


def test_loop_patches_a_translated_block():
    # A loop calls a function, then patches its immediate; the next call must see the new code.
    src = """
        mov ecx, 3
    top:
        call 0x1100
        add ebx, eax
        inc byte ptr [0x1101]
        loop top
        hlt
    """
    code = bytearray(asm(src))
    fn = asm("mov eax, 5; ret", 0x1100)
    blob = bytes(code) + bytes(0x100 - len(code)) + fn
    case = make_case(blob)
    r = run_case(case)
    assert r["final"]["regs"]["ebx"] == 5 + 6 + 7
    assert oracle_mismatches(case, r) == []


def test_divide_error_is_precise():
    code = asm("mov eax, 7; push eax; mov edx, 0; mov ebx, 0; div ebx; mov eax, 9; hlt")
    r = run_case(make_case(code))
    assert r["exception"] == {"vector": 0, "error_code": None}
    regs = r["final"]["regs"]
    assert regs["eip"] == CODE + len(asm("mov eax, 7; push eax; mov edx, 0; mov ebx, 0"))
    assert regs["eax"] == 7 and regs["esp"] == 0x9000 - 4


def test_ud2_and_undecodable_bytes_raise_ud():
    r = run_case(make_case(asm("inc eax; ud2")))
    assert r["exception"]["vector"] == 6 and r["final"]["regs"]["eip"] == CODE + 1
    assert r["final"]["regs"]["eax"] == 1
    r = run_case(make_case(asm("inc eax") + bytes.fromhex("0f0b") + b"\xf4"))
    assert r["exception"]["vector"] == 6
    # LOCK on a register destination is #UD too.
    r = run_case(make_case(bytes.fromhex("f001d8f4")))
    assert r["exception"]["vector"] == 6 and r["final"]["regs"]["eip"] == CODE


@pytest.mark.parametrize("n", [0, 1, 2, 5, 17, 40])
def test_max_instructions_is_exact(n):
    code = asm("l: inc eax; inc ebx; inc ecx; jmp l")
    r = run_case(make_case(code, max_instructions=n))
    assert r["instructions"] == n
    regs = r["final"]["regs"]
    assert regs["eax"] + regs["ebx"] + regs["ecx"] == n - n // 4


def test_rep_iterations_count_and_resume_exactly():
    code = asm("mov ecx, 10; mov edi, 0x2000; rep stosb; hlt")
    r = run_case(make_case(code, max_instructions=5))
    regs = r["final"]["regs"]
    assert r["instructions"] == 5
    assert regs["ecx"] == 7 and regs["edi"] == 0x2003 and regs["eip"] == CODE + 10


def _blocks_after(code, slice_):
    """The block addresses in the cache after running code to HLT in slices of slice_ instructions."""
    sn = Snippet(trace_writes=False)
    try:
        sn.mem.write(CODE, code)
        sn.cpu.set_reg("eip", CODE)
        sn.cpu.set_reg("esp", 0x9000)
        for _ in range(1000):
            if sn.cpu.run(slice_).reason == "hlt":
                break
        return sorted({eip for eip, _ in sn.cpu.cache.blocks}), sn.cpu.reg("edi")
    finally:
        sn.close()


def test_rep_string_starts_a_block_so_resuming_meets_a_known_block():
    # A REP instruction cut short (budget, interrupt, fault) resumes at its own address; that
    # is a block head whether or not it was cut (so a warm run's disk cache has it).
    code = asm("mov ecx, 100; mov edi, 0x2000; rep stosb; mov eax, 1; hlt")
    whole = _blocks_after(code, 100000)
    assert whole == _blocks_after(code, 7)
    assert whole[0] == [CODE, CODE + 10] and whole[1] == 0x2000 + 100


def test_same_code_bytes_at_two_addresses_branch_relative_to_each():
    # The decoder and the stencil builder remember instructions by their bytes: a copy of a
    # function elsewhere must still call and jump relative to its own address.
    func = asm("call f; jmp done; f: add eax, 5; ret; done: ret", 0)
    assert func[7:10] == b"\x83\xc0\x05"
    # The first copy's f then adds 100: the second copy must not go there.
    code = asm("call 0x1100; mov byte ptr [0x1109], 100; call 0x1200; hlt")
    case = make_case(code, data={0x1100: func, 0x1200: func})
    r = run_case(case)
    assert r["final"]["regs"]["eax"] == 10
    assert oracle_mismatches(case, r) == []


def test_infinite_loop_is_bounded():
    r = run_case(make_case(asm("l: jmp l"), max_instructions=2_000_000))
    assert r["instructions"] == 2_000_000 and r["exception"] is None


def test_chaining_and_cache_counters():
    sn = Snippet(trace_writes=False)
    try:
        code = asm("mov ecx, 1000; l: add eax, ecx; dec ecx; jnz l; hlt")
        sn.mem.write(CODE, code)
        sn.cpu.set_reg("eip", CODE)
        sn.cpu.set_reg("esp", 0x9000)
        stop = sn.cpu.run(100000)
        assert stop.reason == "hlt"
        assert sn.cpu.reg("eax") == sum(range(1, 1001))
        c = sn.cpu.cache.counters
        assert c["chain_links"] >= 1
        # The loop ran natively through its chain: far fewer lookups than iterations.
        assert c["lookups"] < 20
    finally:
        sn.close()


# L's direct exit to T meets T already in the jump cache (reached first through an indirect
# jump): the native entry links it (runtime/cpu.py), and the runtime records the chain.  T is on
# a page of its own, so that a store into it invalidates T alone, not L.
def _native_chain_code():
    """(code at CODE, T's code, address of L, address of T, address of the rewrite)."""
    t = CODE + 0x1000
    head = asm(f"mov ecx, 3; mov edx, {t:#x}; jmp edx")
    l = CODE + len(head)
    jump = asm(f"jmp {t:#x}", l)
    after = l + len(jump)
    # Then the guest turns T's "inc ebx" (0x43) into "inc esi" (0x46) and loops through L again.
    tail = asm(f"""
        mov byte ptr [{t:#x}], 0x46
        mov ecx, 3
        cmp edi, 0
        jne done
        mov edi, 1
        jmp {l:#x}
    done: hlt
    """, after)
    return head + jump + tail, asm(f"inc ebx; dec ecx; jnz {l:#x}; jmp {after:#x}", t), l, t, after


def test_native_entry_links_and_the_runtime_records_it():
    code, t_code, l, t, after = _native_chain_code()
    sn = Snippet(trace_writes=False)
    try:
        sn.mem.write(CODE, code[:after - CODE] + b"\xf4")          # hlt before the rewrite
        sn.mem.write(t, t_code)
        sn.cpu.set_reg("eip", CODE)
        sn.cpu.set_reg("esp", 0x9000)
        cache = sn.cpu.cache
        by_python = []
        link = cache.link
        cache.link = lambda slot, tb: (by_python.append(slot), link(slot, tb))
        assert sn.cpu.run(1000).reason == "hlt"
        assert sn.cpu.reg("ebx") == 3
        l_tb, t_tb = cache.blocks[(l, sn.cpu.key)], cache.blocks[(t, sn.cpu.key)]
        (slot,) = l_tb.slots
        assert slot not in by_python                        # not linked by the runtime...
        assert ctypes.c_uint64.from_address(slot).value == t_tb.fn     # ...but linked
        assert cache.slot_target[slot] is t_tb and slot in cache.incoming[t_tb]
        cache.forget(t_tb, "smc")                           # and unlinked with its target
        assert ctypes.c_uint64.from_address(slot).value == 0
    finally:
        sn.close()


def test_native_chain_into_code_the_guest_rewrites():
    # The chain L -> T that the native entry made must go with the old T.
    code, t_code, _, t, _ = _native_chain_code()
    case = make_case(code, data={t: t_code})
    result = run_case(case)
    assert not oracle_mismatches(case, result)
    assert result["final"]["regs"]["ebx"] == 3 and result["final"]["regs"]["esi"] == 3


def test_a_chain_slot_left_by_a_fault_is_not_linked_later():
    # A jumps (direct exit, empty slot) to bytes that do not decode: #UD, whose handler goes to H,
    # where a POPF that flips EFLAGS.AC leaves its block (EXIT_LOOKUP without a slot).  A's slot
    # must not be linked to the block after that POPF: A is reached again and faults again.
    h, n, a, bad = CODE + 0x100, CODE + 0x180, CODE + 0x200, CODE + 0x280
    flip = asm("pushfd; xor dword ptr [esp], 0x40000; popfd", h)
    sn = Snippet(trace_writes=False)
    try:
        for addr, code in [(CODE, asm(f"mov esi, 0; mov edx, {h:#x}; jmp edx")),
                           (h, flip + asm(f"jmp {n:#x}", h + len(flip))),
                           (n, asm(f"inc esi; cmp esi, 3; jb {a:#x}; hlt", n)),
                           (a, asm(f"jmp {bad:#x}", a)),
                           (bad, bytes.fromhex("0f04"))]:
            sn.mem.write(addr, code)
        cpu = sn.cpu
        cpu.set_reg("eip", CODE)
        cpu.set_reg("esp", 0x9000)
        faults = []

        def on_exception(c, vector, error, fault_addr):
            faults.append((vector, c.st.eip))
            c.set_reg("eip", h)
        cpu.on_exception = on_exception
        assert cpu.run(10000).reason == "hlt"
        assert cpu.reg("esi") == 3
        assert faults == [(6, bad), (6, bad)]
    finally:
        sn.close()


def _btvm(*args, stdin=None):
    return subprocess.run([sys.executable, "-m", "runtime.cli", *args], capture_output=True, text=True, input=stdin)


def test_exec_cli_output_format(tmp_path):
    case = make_case(asm("add eax, ebx; hlt"), regs={"eax": 5, "ebx": 7})
    p = tmp_path / "c.json"
    p.write_text(json.dumps(case))
    out = _btvm("exec", str(p))
    assert out.returncode == 0, out.stderr
    res = json.loads(out.stdout)
    assert set(res) == {"final", "exception", "instructions"}
    assert res["final"]["regs"]["eax"] == 12 and res["instructions"] == 2
    assert [a for a, _ in res["final"]["ram"]] == sorted(a for a, _ in case["initial"]["ram"])


@pytest.mark.parametrize("content,msg", [
    ("{not json", "malformed JSON"),
    ('{"mode": 32, "initial": {"regs": {"eax": 1, "rax": 2}}}', "unknown register"),
    ('{"mode": 32, "initial": {"regs": {"eax": 4294967296}}}', "0..0xffffffff"),
    ('{"mode": 32, "initial": {"regs": {}, "ram": [[1, 256]]}}', "byte out of range"),
    ('{"mode": 16, "initial": {}}', "mode"),
    ('[]', "JSON object"),
])
def test_exec_cli_bad_input(tmp_path, content, msg):
    p = tmp_path / "bad.json"
    p.write_text(content)
    out = _btvm("exec", str(p))
    assert out.returncode != 0
    assert msg in out.stderr and "Traceback" not in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_exec_cli_missing_file():
    out = _btvm("exec", "/nonexistent/case.json")
    assert out.returncode != 0 and "no such file" in out.stderr and "Traceback" not in out.stderr


def test_case_error_api():
    with pytest.raises(CaseError):
        run_case({"mode": 32})


@pytest.mark.parametrize("value", [0x10, 0x20, 0x30, 0x0F, 0x31, 0xFFFFFFFF, 0x7FFFFFFF])
def test_bound_against_unicorn(value):
    # BOUND eax, [0x2000] with signed bounds 0x10..0x30: #BR (vector 5) outside them, precisely.
    code = asm("bound eax, qword ptr [0x2000]; inc ebx; hlt")
    case = make_case(code, regs={"eax": value}, data={0x2000: (0x10).to_bytes(4, "little") + (0x30).to_bytes(4, "little")})
    r = run_case(case)
    assert oracle_mismatches(case, r) == []
    assert (r["exception"] is None) == (0x10 <= value <= 0x30)


@pytest.mark.parametrize("dst,src", [(0x10, 0x3), (0x13, 0x1), (0x12, 0x12), (0xFFFF, 0x0)])
def test_arpl_against_unicorn(dst, src):
    code = asm("arpl ax, bx; hlt")
    case = make_case(code, regs={"eax": 0xABCD0000 | dst, "ebx": src})
    r = run_case(case)
    assert oracle_mismatches(case, r) == []
    lower = (dst & 3) < (src & 3)
    assert r["final"]["regs"]["eax"] & 0xFFFF == ((dst & ~3) | (src & 3) if lower else dst)
    assert bool(r["final"]["regs"]["eflags"] & 0x40) == lower


def test_tlb_conflict_misses_are_refilled_in_native_code(monkeypatch):
    # 0x100000 and 0x500000 share a slot of the direct-mapped soft TLB, so alternating reads miss
    # every time; on a flat machine the refill is native (runtime/native_refill.py), not Python.
    from runtime.cpu import CPU
    code = asm("mov ecx, 100; top: add eax, [0x100000]; add bx, [0x500002]; loop top; hlt")
    case = make_case(code, data={0x100000: (3).to_bytes(4, "little"), 0x500000: (5 << 16).to_bytes(4, "little")})
    calls = []
    python_path = CPU._load_slow
    monkeypatch.setattr(CPU, "_load_slow", lambda self, st, a, s: calls.append(a) or python_path(self, st, a, s))
    r = run_case(case)
    assert (r["final"]["regs"]["eax"], r["final"]["regs"]["ebx"]) == (300, 500)
    assert oracle_mismatches(case, r) == []
    assert len(calls) < 5, f"{len(calls)} reads took the Python slow path"


def test_cli_sti_in_ring0_are_inline_and_match_unicorn():
    # At CPL 0 (CPL <= IOPL) CLI and STI are translated inline (bt/semantics/system.py); STI with
    # IF clear still calls out (the interrupt shadow).  Both orders, and a block that keeps going.
    code = asm("cli; pushfd; pop eax; sti; pushfd; pop ebx; sti; pushfd; pop ecx; cli; cli; "
               "pushfd; pop edx; add esi, 1; hlt")
    for eflags in (0x2, 0x202):
        case = make_case(code, regs={"eflags": eflags})
        r = run_case(case)
        regs = r["final"]["regs"]
        assert [regs[x] & 0x200 for x in ("eax", "ebx", "ecx", "edx")] == [0, 0x200, 0x200, 0]
        assert oracle_mismatches(case, r) == []

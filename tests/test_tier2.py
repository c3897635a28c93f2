"""Tier 2 (bt/tier2.py): hot regions recompiled at -O2 must behave exactly like tier 1.

The tests force promotion with a small hot threshold and, unless they are about the optimizer's
thread or worker process, a synchronous optimizer, so the swap happens at a deterministic point;
they compare with Unicorn (the oracle)."""
import json
import os
import subprocess
import sys

import pytest

from bt import cache as C, tier2
from runtime.snippet import Snippet, run_case
from corpus.oracle import run_unicorn
from tests.helpers import asm, make_case, oracle_mismatches


@pytest.fixture
def promote(monkeypatch):
    """Tier 2 after `threshold` executions, compiled on the calling thread."""
    def set_threshold(threshold):
        monkeypatch.setattr(tier2, "THRESHOLD", threshold)
        monkeypatch.setattr(tier2, "_shared", tier2.Optimizer(sync=True))
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    return set_threshold


def _run(code, after=None):
    """Run code (at 0x1000) in a fresh snippet; returns (eax, code-cache counters, tier-2 blocks
    left installed).  after() runs once the snippet is closed."""
    sn = Snippet(trace_writes=False)
    try:
        sn.mem.write(0x1000, code)
        sn.cpu.set_reg("eip", 0x1000)
        assert sn.cpu.run(10**6).reason == "hlt"
        t2 = [tb for tb in sn.cpu.cache.blocks.values() if tb.tier == 2]
        result = sn.cpu.reg("eax"), dict(sn.cpu.cache.counters), t2
    finally:
        sn.close()
    if after is not None:
        after()
    return result


def _region_matches_unicorn(code, blocks=1):
    """code ends with EAX summing what it computed: it must run in tier 2 (at least `blocks`
    blocks) and agree with Unicorn there, and again in full (registers, EFLAGS, memory) when a
    second machine adopts the same regions from the memo."""
    eax, counters, _ = _run(code)
    assert counters["tier2_blocks"] >= blocks and eax == _unicorn_eax(code)
    case = make_case(code, max_instructions=10**6)
    assert oracle_mismatches(case, run_case(case)) == []


def _patched_loop_matches_unicorn(code):
    """A 200-iteration loop adding an immediate (1) to EBX that it patches to 3 after 100: the
    new code must run from then on, as on hardware and in Unicorn."""
    case = make_case(code, max_instructions=10**6)
    r = run_case(case)
    assert r["final"]["regs"]["ebx"] == 101 * 1 + 99 * 3
    assert oracle_mismatches(case, r) == []


def _unicorn_eax(code):
    """EAX after running code under the oracle (Unicorn)."""
    return run_unicorn(make_case(code, max_instructions=10**6), strict=False)["expected"]["regs"]["eax"]


def test_loop_runs_in_a_region_and_matches_unicorn(promote):
    promote(16)
    # crc-like loop: a conditional inside a counted loop (several blocks reaching each other).
    code = asm("""
        mov esi, 0x3000
        mov ecx, 300
        mov edx, 0xFFFFFFFF
    byte_loop:
        movzx ebx, byte ptr [esi]
        xor edx, ebx
        mov edi, 8
    bit_loop:
        shr edx, 1
        jnc no_xor
        xor edx, 0xEDB88320
    no_xor:
        dec edi
        jnz bit_loop
        mov [esi], dl
        inc esi
        dec ecx
        jnz byte_loop
        hlt
    """, 0x1000)
    case = make_case(code, data={0x3000: bytes((i * 37 + 11) & 0xFF for i in range(300))}, max_instructions=10**6)
    r = run_case(case)
    assert oracle_mismatches(case, r) == []


def test_region_counters_and_swap(promote):
    promote(16)
    code = asm("mov ecx, 1000; xor eax, eax; l: add eax, ecx; test cl, 1; jz s; xor eax, 0x55; "
               "s: dec ecx; jnz l; hlt", 0x1000)
    eax, c, t2 = _run(code)
    assert c["tier2_regions"] >= 1 and c["tier2_blocks"] >= 2
    assert t2 and all(tb.region for tb in t2)         # members know each other
    assert eax == _unicorn_eax(code)


def test_self_modifying_code_inside_a_region(promote):
    """A promoted loop patches an immediate of its own region: every member is dropped
    (they call each other directly) and the new code runs, as on hardware."""
    promote(8)
    code = asm("""
        mov ecx, 200
        xor ebx, ebx
    top:
        mov eax, 1
        add ebx, eax
        cmp ecx, 100
        jne skip
        mov byte ptr [0x1008], 3
    skip:
        dec ecx
        jnz top
        hlt
    """, 0x1000)
    assert code[7:9] == bytes.fromhex("b801")        # mov eax, imm32 at 0x1007: imm at 0x1008
    _patched_loop_matches_unicorn(code)


def test_faults_inside_a_region_are_precise(promote):
    """A #DE deep in an optimized loop reports the faulting instruction and the state before it."""
    promote(8)
    code = asm("mov ecx, 100; l: mov eax, 1000; xor edx, edx; div ecx; add ebx, eax; add [0x7000], edx; "
               "dec ecx; jmp l", 0x1000)
    case = make_case(code, max_instructions=10**6)
    r = run_case(case)
    assert r["exception"] and r["exception"]["vector"] == 0
    assert oracle_mismatches(case, r) == []


def test_max_instructions_is_exact_in_a_region(promote):
    promote(8)
    code = asm("xor eax, eax; l: inc eax; add ebx, eax; jmp l", 0x1000)
    for n in (1000, 1001, 4097):
        r = run_case(make_case(code, max_instructions=n))
        regs = r["final"]["regs"]
        k = (n - 1) // 3                 # loop iterations done, and what the last one left
        done = (n - 1) % 3
        eax = k + (done >= 1)
        assert r["instructions"] == n
        assert (regs["eax"], regs["ebx"]) == (eax, k * (k + 1) // 2 + (eax if done >= 2 else 0))


def test_a_new_cache_adopts_the_region(promote):
    promote(16)
    code = asm("mov ecx, 500; l: add eax, ecx; rol eax, 3; dec ecx; jnz l; hlt", 0x1000)
    a, first, _ = _run(code)
    b, second, _ = _run(code)
    assert a == b == _unicorn_eax(code) and first["tier2_blocks"] >= 1
    assert second["tier2_adopted"] >= 1 and second.get("tier2_regions", 0) == 0


def test_region_finished_after_its_machine_is_gone(monkeypatch):
    """The optimizer finishes a region after the snippet that asked for it was closed: the next
    machine meeting the same code takes the region (and nothing touches the closed memory)."""
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    monkeypatch.setattr(tier2, "THRESHOLD", 16)
    monkeypatch.setattr(tier2, "QUIET", 0)          # promote even right after a tier-1 compile
    opt = tier2.Optimizer(sync=False)
    monkeypatch.setattr(tier2, "_shared", opt)
    code = asm("mov ecx, 400; l: add eax, ecx; ror eax, 5; xor eax, 0x1234; dec ecx; jnz l; hlt", 0x1000)
    a, first, _ = _run(code, after=opt.wait_idle)
    b, second, _ = _run(code, after=opt.wait_idle)
    assert a == b == _unicorn_eax(code) and first["tier2_regions"] >= 1
    assert second["tier2_adopted"] >= 1


def test_promotion_waits_while_tier1_compiles(monkeypatch):
    """Right after a tier-1 compile a hot block is re-armed, not sent to the background optimizer
    (whose LLVM calls would stall tier 1 behind llvmlite's lock), and fires again later.
    Tier 1 through LLVM here: stencils (bt.stencil) compile only for new instruction shapes."""
    from bt import stencil
    monkeypatch.setattr(stencil, "ENABLED", False)
    monkeypatch.setattr(C, "_MEMO", {})
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    monkeypatch.setattr(tier2, "THRESHOLD", 50)
    monkeypatch.setattr(tier2, "QUIET", 3600)        # tier 1 is always "busy"
    monkeypatch.setattr(tier2, "_shared", tier2.Optimizer(sync=False))
    code = asm("mov ecx, 400; l: add eax, ecx; ror eax, 7; dec ecx; jnz l; hlt", 0x1000)
    eax, c, _ = _run(code)
    assert c["tier2_deferred"] >= 2 and c.get("tier2_regions", 0) == 0   # re-armed, fired again
    assert eax == _unicorn_eax(code)


def test_promotion_does_not_wait_for_tier1_with_the_worker_process(monkeypatch):
    """The worker process shares no LLVM lock with the guest thread: a hot block goes to it at
    once, however recently tier 1 compiled."""
    from bt import stencil
    monkeypatch.setattr(stencil, "ENABLED", False)
    monkeypatch.setattr(C, "_MEMO", {})
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    monkeypatch.setattr(tier2, "THRESHOLD", 50)
    monkeypatch.setattr(tier2, "QUIET", 3600)
    opt = tier2.Optimizer(sync=False)
    opt.process = True
    monkeypatch.setattr(tier2, "_shared", opt)
    code = asm("mov ecx, 400; l: add eax, ecx; ror eax, 7; dec ecx; jnz l; hlt", 0x1000)
    eax, c, _ = _run(code, after=opt.wait_idle)
    opt._stop_worker()
    assert c.get("tier2_deferred", 0) == 0 and c["tier2_regions"] >= 1
    assert eax == _unicorn_eax(code)


def test_profile_reports_tier2(tmp_path):
    j = tmp_path / "p.json"
    env = dict(os.environ, BTVM_HOT="200", BTVM_TIER2_SYNC="1", BTVM_NO_CACHE="1")
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "profile", "--top", "5", "--json", str(j),
                          "boot", "-no-stdin"], capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr
    r = json.loads(j.read_text())
    t2 = [v for k, v in r["tiers"].items() if k.startswith("2")][0]
    t1 = [v for k, v in r["tiers"].items() if k.startswith("1")][0]
    assert t2["blocks"] > 0 and t2["compile_seconds"] > 0
    assert r["compiled_blocks"] == t1["blocks"] + t2["blocks"]
    assert any("2" in h["tier"] for h in r["hottest"])


def test_fork_while_the_optimizer_compiles(monkeypatch):
    """A fork (a user-mode guest's) in the middle of a background compile: the child must still be
    able to compile (llvmlite's global lock is not left held by a thread that no longer exists)."""
    import os
    opt = tier2.Optimizer(sync=False)
    code = asm("mov ecx, 300; l: add eax, ecx; xor eax, 0x77; dec ecx; jnz l; hlt", 0x1000)
    monkeypatch.setenv("BTVM_NO_CACHE", "1")
    monkeypatch.setattr(tier2, "THRESHOLD", 8)
    monkeypatch.setattr(tier2, "QUIET", 0)
    monkeypatch.setattr(tier2, "_shared", opt)
    for _ in range(3):
        sn = Snippet(trace_writes=False)
        sn.mem.write(0x1000, code)
        sn.cpu.set_reg("eip", 0x1000)
        sn.cpu.run(10**6)                      # leaves a region compiling in the background
        pid = os.fork()
        if pid == 0:
            try:
                sn2 = Snippet(trace_writes=False)
                sn2.mem.write(0x2000, asm("mov eax, 5; add eax, 6; hlt", 0x2000))
                sn2.cpu.set_reg("eip", 0x2000)
                sn2.cpu.run(100)
                grandchild = os.fork()         # the child forks too (its fork handlers must work)
                if grandchild == 0:
                    os._exit(0)
                os.waitpid(grandchild, 0)
                os._exit(0 if sn2.cpu.reg("eax") == 11 else 1)
            except BaseException:
                os._exit(2)
        sn.close()
        deadline = __import__("time").monotonic() + 60
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                break
            if __import__("time").monotonic() > deadline:
                os.kill(pid, 9)
                os.waitpid(pid, 0)
                raise AssertionError("the forked child hung")
            __import__("time").sleep(0.01)
        assert os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0
    opt.wait_idle()


_REGION = """
define i32 @t1(ptr noalias %st) nounwind {
entry:
  %p = getelementptr i8, ptr %st, i64 4
  %v = load i32, ptr %p
  %w = mul i32 %v, 7
  store i32 %w, ptr %p
  ret i32 3
}
"""


def test_worker_process_compiles_what_the_thread_would():
    """System mode compiles regions in a child process (`python -m bt.tier2`): same object."""
    opt = tier2.Optimizer(sync=False)
    opt.process = True
    try:
        obj = opt._in_worker(_REGION)
        assert opt.process and obj == tier2.compile_region(opt.tm, _REGION)
        with pytest.raises(RuntimeError, match="tier-2 worker"):
            opt._in_worker("this is not IR")
        assert opt.process                      # an error in one module keeps the worker
    finally:
        opt._stop_worker()


def test_a_broken_worker_process_falls_back_to_the_thread(monkeypatch):
    opt = tier2.Optimizer(sync=False)
    opt.process = True
    monkeypatch.setattr(sys, "executable", "/bin/true")     # exits at once: the pipe breaks
    job = tier2.Job(None, [], [], ["t1"], [], [], _REGION)
    opt._run(job)
    assert job.error is None and job.obj == tier2.compile_region(opt.tm, _REGION)
    assert not opt.process


LAZY_OPS = [("add bl, dl", 0x8D5), ("add bx, dx", 0x8D5), ("add ebx, edx", 0x8D5),
            ("sub bl, dl", 0x8D5), ("sub bx, dx", 0x8D5), ("cmp ebx, edx", 0x8D5), ("neg ebx", 0x8D5),
            ("and bl, dl", 0x8C5), ("or bx, dx", 0x8C5), ("xor ebx, edx", 0x8C5), ("test ebx, edx", 0x8C5),
            ("inc bl", 0x8D5), ("inc bx", 0x8D5), ("inc ebx", 0x8D5),
            ("dec bl", 0x8D5), ("dec bx", 0x8D5), ("dec ebx", 0x8D5)]


@pytest.mark.parametrize("op,mask", LAZY_OPS, ids=[op for op, _ in LAZY_OPS])
def test_lazy_flags_left_by_a_region_read_by_the_next_block(promote, op, mask):
    # The region's exits leave `op`'s flags lazy (bt/lazyflags.py): the indirect JMP's (its
    # successor is unknown), read by PUSHFD at the start of the next block, and the back edge's
    # (ADD overwrites them); the exit after the loop packs them (ADC reads CF) and the runtime reads
    # the final EFLAGS.  The CF
    # that INC/DEC keep comes from the ADD/SUB before them.  mask: the flags the SDM defines.
    promote(8)
    code = asm(f"""
        mov ecx, 60
        mov ebx, 0x7FFFFF80
        mov edx, 0x00FF7FFF
        xor esi, esi
        lea edi, [mid]
    top:
        add ebx, 0x01234567
        sub edx, ebx
        {op}
        jmp edi
    mid:
        pushfd
        pop eax
        and eax, {mask:#x}
        xor esi, eax
        rol esi, 5
        sub edx, 0x111
        {op}
        loop top
        adc esi, 0
        mov eax, esi
        hlt
    """, 0x1000)
    _region_matches_unicorn(code, blocks=2)


@pytest.mark.parametrize("head", ["", "adc esi, 0"], ids=["overwritten", "read"])
def test_lazy_flags_through_a_block_that_touches_none(promote, monkeypatch, head):
    # sha256's round loop: CMP; JE leaves the loop, and the block it falls into touches no flag
    # and JMPs back to a block that writes CF/OF (ROR) before it writes all six (XOR).  The flags
    # are dead across both exits, so the region leaves them lazy there; with `head` reading CF
    # at the loop's top they are live and packed.  Either way the result is Unicorn's.
    promote(8)
    live = {}
    real = C.CodeCache._flags_live
    monkeypatch.setattr(C.CodeCache, "_flags_live", lambda self, region, key: live.update(
        r := real(self, region, key)) or r)
    code = asm(f"""
        mov ecx, 0x12345678
        xor ebp, ebp
        xor esi, esi
        mov ebx, 1
    top:
        {head}
        mov edx, ecx
        ror edx, 6
        xor edx, esi
        add esi, edx
        inc ebp
        cmp ebp, 50
        je done
        mov ecx, edx
        jmp top
    done:
        pushfd
        pop eax
        and eax, 0x8D5
        add eax, esi
        hlt
    """, 0x1000)
    _region_matches_unicorn(code, blocks=2)
    top = 0x1000 + len(asm("mov ecx, 0x12345678; xor ebp, ebp; xor esi, esi; mov ebx, 1", 0x1000))
    assert live.get(top) is (head != ""), live


@pytest.mark.parametrize("esp", [0x7800, 0x7FF0], ids=["one-page", "crossing"])
def test_stack_window_of_a_region_matches_unicorn(promote, esp):
    # [esp + disp] operands of a region's block share one TLB check at its entry
    # (Emitter._base_windows); a window that crosses a page takes the probes instead.
    promote(8)
    code = asm(f"""
        mov esp, {esp:#x}
        mov ecx, 50
        mov dword ptr [esp + 0x3c], 7
    top:
        mov eax, [esp + 0x3c]
        add [esp + 4], eax
        mov edx, [esp + 4]
        xor [esp + 0x20], edx
        mov ebx, [esp + 0x20]
        mov [esp], ebx
        add dword ptr [esp + 0x3c], {esp >> 8}
        push ecx
        pop ecx
        mov [esp + 8], ecx
        loop top
        mov eax, [esp]
        hlt
    """, 0x1000)
    _region_matches_unicorn(code)


def test_stack_relative_store_into_a_regions_own_code(promote):
    # ESP points at the code page: stores through [esp + disp] must still trap and invalidate.
    promote(8)

    def program(disp):
        return asm(f"""
        mov esp, 0x1000
        mov ecx, 200
        xor ebx, ebx
    top:
        mov eax, 1
        add ebx, eax
        mov edx, [esp + 0x10]
        cmp ecx, 100
        jne skip
        mov edx, [esp + 0x18]
        mov edx, [esp + 0x1c]
        mov byte ptr [esp + {disp:#x}], 3
    skip:
        mov [esp + 0x80], edx
        dec ecx
        jnz top
        hlt
    """, 0x1000)
    imm = program(0x7F).index(bytes.fromhex("b801000000")) + 1     # mov eax, 1: its immediate
    code = program(imm)
    assert code[imm - 1:imm + 1] == bytes.fromhex("b801")
    _patched_loop_matches_unicorn(code)


def test_base_register_window_ends_where_the_register_changes(promote):
    # [edi + disp] operands share a window while EDI keeps its entry value; after `add edi, 4`
    # they take the probe again (their addresses moved), as do those after a partial write (mov di).
    promote(8)
    code = asm("""
        mov edi, 0x7800
        mov ecx, 40
        mov dword ptr [edi + 4], 5
    top:
        mov eax, [edi + 4]
        add [edi + 8], eax
        mov [edi + 0x10], eax
        add edi, 4
        mov ebx, [edi + 4]
        add [edi + 0x10], ebx
        sub edi, 4
        mov [edi + 0x14], ecx
        mov esi, edi
        mov di, 0x7900
        add [edi + 4], esi
        mov edi, esi
        loop top
        mov eax, [edi + 0x10]
        add eax, [edi + 0x14]
        add eax, [0x7904]
        hlt
    """, 0x1000)
    _region_matches_unicorn(code)


def test_base_register_window_does_not_cover_an_access_after_the_register_moved(promote):
    # One block: the window of EDI's entry value covers page 0x7000; in the last iteration EDI
    # moves by 0x1000 mid-block, and the next [edi + 4] addresses page 0x8000, which is not
    # readable: that access must fault (#PF) at its instruction, in the region too.
    promote(8)
    code = asm("""
        mov edi, 0x7800
        mov ecx, 100
    top:
        xor edx, edx
        cmp ecx, 1
        sete dl
        shl edx, 12
        mov eax, [edi + 4]
        add [edi + 8], eax
        mov [edi + 0x10], ecx
        add edi, edx
        mov ebx, [edi + 4]
        sub edi, edx
        loop top
        hlt
    """, 0x1000)
    sn = Snippet(trace_writes=False)
    try:
        sn.mem.write(0x1000, code)
        sn.mem.map(0x8000, 0x1000, 0)
        sn.cpu.set_reg("eip", 0x1000)
        stop = sn.cpu.run(10**6)
        assert stop.reason == "exception" and stop.info["vector"] == 14, stop.info
        assert sn.cpu.reg("ecx") == 1 and sn.cpu.reg("edi") == 0x8800
        assert sn.cpu.cache.counters["tier2_blocks"] >= 1
    finally:
        sn.close()


# A module that takes LLVM ~0.1-0.3 s to compile at -O2; the script exits as soon as the first
# compile has started.
_EXIT_RACE = r'''
import atexit, sys, time
from bt import tier2
body = ["define i32 @f(i32 %a, ptr %p) {", "entry:", "  %x0 = add i32 %a, 1"]
for i in range(1, 3000):
    body += [f"  %x{i} = mul i32 %x{i-1}, {i+3}", f"  %c{i} = icmp ult i32 %x{i}, {i*7}",
             f"  br i1 %c{i}, label %b{i}, label %b{i}", f"b{i}:", f"  store volatile i32 %x{i}, ptr %p"]
body += ["  ret i32 %x2999", "}", ""]
opt = tier2.Optimizer(sync=False)
# atexit runs handlers last-registered first: this one runs after the optimizer's own.
atexit.register(lambda: print("at exit: busy" if opt.busy() else "at exit: idle", len(opt.done)))
for _ in range(3):
    opt.submit(tier2.Job(None, [], [], [], [], [], "\n".join(body)))
while not opt.busy() and not opt.done:
    time.sleep(0.001)
'''


def test_interpreter_exit_waits_for_the_compile_in_flight():
    """Exit runs LLVM's static destructors (its pass registries, its value-type tables): a compile
    still running on the optimizer's thread then crashed the process (seen as SelectionDAG
    assertions or a segfault when short user-mode guests exited).  The optimizer's exit hook
    waits for the compile in progress and drops the queued ones."""
    p = subprocess.run([sys.executable, "-c", _EXIT_RACE], capture_output=True, text=True, timeout=120,
                       cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert p.returncode == 0, p.stderr
    assert p.stdout.split() == ["at", "exit:", "idle", "1"], p.stdout


def test_a_tier2_block_is_checked_against_its_physical_page_after_a_remap(promote):
    # A hot loop at linear 0x200000 (physical page A) goes to tier 2; then 0x200000 maps page B,
    # which holds other code, and CR3 is written: the region must not run there (it kept no
    # physical page once, and nothing checked it).
    import struct
    from runtime.system.machine import Machine
    from tests.test_callouts import OUT, build, store
    from tests.test_tlb_global import A, B, CR3, SETUP, _bytes_at, _map
    promote(8)
    loop = bytes([0x40, 0x49, 0x75, 0xFC, 0xC3])                 # l: inc eax; dec ecx; jnz l; ret
    other = bytes([0xB8, 0x77, 0, 0, 0, 0xC3])                  # mov eax, 0x77; ret
    body = (_bytes_at(loop, 0x205000) + _bytes_at(other, 0x206000)
            + _map(A) + CR3 + "    xor eax, eax\n    mov ecx, 300\n    mov ebx, 0x200000\n    call ebx\n"
            + store(0)
            + _map(B) + CR3 + "    xor eax, eax\n    mov ecx, 1\n    mov ebx, 0x200000\n    call ebx\n"
            + store(1))
    m = Machine(ram_mb=8, serial_out=bytearray().extend)
    try:
        m.load_multiboot(build(SETUP + body, None))
        m.run()
        out = struct.unpack("<2I", m.cpu.read_phys(OUT, 8))
        assert m.cpu.cache.counters["tier2_blocks"] > 0
    finally:
        m.close()
    assert out == (300, 0x77)

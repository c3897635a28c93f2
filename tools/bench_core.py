#!/usr/bin/env python3
"""CPU-bound guest-code benchmark: btvm versus Unicorn.

Each workload is a small i386 program (Intel syntax, assembled with keystone
in 32-bit mode at 0x1000) that generates its own input data, computes a
result into EAX and stops at HLT:

  crc32     bitwise reflected CRC-32 (poly 0xEDB88320, 8-step inner shift
            loop per byte) over a 64 KiB buffer at 0x100000, 4 passes, each
            pass chained into the next by storing the CRC into the buffer
  sieve     sieve of Eratosthenes over 2^20 bytes at 0x200000; EAX = number
            of primes below 2^20
  memcpy    REP MOVSD copy of 64 KiB plus a LODSD/LOOP checksum, 64 passes
  bsort     bubble sort of 1024 unsigned dwords, EAX = polynomial hash
  fib       recursive Fibonacci (CALL/RET/PUSH/POP heavy), EAX = fib(27)

The final EAX is checked against a value computed in Python and between the
two engines.  Instruction counts come from a calibration run of Unicorn with a
block hook (REP iterations count one each plus one for the ECX=0 exit
check, the final HLT is not counted);
every MIPS figure in the table divides that same count by the engine's wall
time, so "ratio" is simply the speed ratio btvm-warm / Unicorn.

btvm runs through runtime.snippet.run_case.  The first call per workload is
reported as "cold" (includes translation / LLVM compilation), the following
calls as "warm": translated code memoized in-process, once the tier-2 regions
the cold call asked for are compiled (a workload of a few milliseconds would
otherwise measure how soon they arrive, not how fast they run).
"""
import argparse
import json
import math
import os
import platform
import statistics
import sys
import time
import zlib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

CODE_ADDR = 0x1000
STACK_TOP = 0x80000
MASK32 = 0xFFFFFFFF
LCG_A, LCG_C = 1103515245, 12345


# --------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------

class Workload:
    """One guest program: assembly source, expected EAX, highest address used."""

    def __init__(self, name, desc, asm, expected, mem_top):
        self.name = name
        self.desc = desc
        self.asm = asm
        self.expected = expected      # callable -> int (computed lazily)
        self.mem_top = mem_top        # exclusive upper bound of guest memory used
        self._code = None
        self._hlt = None

    @property
    def code(self):
        if self._code is None:
            self._code, self._hlt = assemble(self.asm)
        return self._code

    @property
    def hlt_addr(self):
        self.code
        return self._hlt

    def case(self, max_instructions):
        regs = {r: 0 for r in ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp")}
        regs.update(esp=STACK_TOP, eip=CODE_ADDR, eflags=0x2)
        ram = [[CODE_ADDR + i, b] for i, b in enumerate(self.code)]
        return {"name": "bench_" + self.name, "mode": 32,
                "initial": {"regs": regs, "ram": ram},
                "max_instructions": int(max_instructions)}


def _round(n, unit):
    return max(unit, int(n) // unit * unit)


def _lcg_words(seed, count):
    out, x = [], seed
    for _ in range(count):
        x = (x * LCG_A + LCG_C) & MASK32
        out.append(x)
    return out


# The LCG fill loop shared by several workloads: EDI=dst, ECX=dwords, EAX=seed.
_FILL = """
fill:
    imul eax, eax, {a}
    add eax, {c}
    mov dword ptr [edi], eax
    add edi, 4
    dec ecx
    jnz fill
""".format(a=LCG_A, c=LCG_C)


def wl_crc32(size):
    buf, nbytes, passes, seed = 0x100000, _round(65536 * size, 64), 4, 0x12345678
    asm = """
    mov edi, {buf}
    mov ecx, {ndw}
    mov eax, {seed}
""" + _FILL + """
    mov ebp, {passes}
pass_loop:
    mov esi, {buf}
    mov ecx, {n}
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
    inc esi
    dec ecx
    jnz byte_loop
    not edx
    mov dword ptr [{buf}], edx
    dec ebp
    jnz pass_loop
    mov eax, edx
    hlt
"""
    asm = asm.format(buf=buf, ndw=nbytes // 4, n=nbytes, seed=seed, passes=passes)

    def expected():
        data = bytearray(b"".join(w.to_bytes(4, "little") for w in _lcg_words(seed, nbytes // 4)))
        crc = 0
        for _ in range(passes):
            crc = zlib.crc32(data) & MASK32
            data[0:4] = crc.to_bytes(4, "little")
        return crc

    return Workload("crc32", "bitwise CRC-32, %d KiB x %d" % (nbytes // 1024, passes),
                    asm, expected, buf + nbytes)


def wl_sieve(size):
    base, n = 0x200000, _round((1 << 20) * size, 64)
    asm = """
    mov edi, {base}
    mov ecx, {n}
    mov esi, 2
outer:
    mov ebx, esi
    imul ebx, esi
    cmp ebx, ecx
    jae count_phase
    cmp byte ptr [edi+esi], 0
    jne next_i
mark:
    mov byte ptr [edi+ebx], 1
    add ebx, esi
    cmp ebx, ecx
    jb mark
next_i:
    inc esi
    jmp outer
count_phase:
    xor eax, eax
    mov esi, 2
count_loop:
    cmp byte ptr [edi+esi], 0
    jne not_prime
    inc eax
not_prime:
    inc esi
    cmp esi, ecx
    jb count_loop
    hlt
""".format(base=base, n=n)

    def expected():
        s = bytearray([1]) * n
        s[0] = s[1] = 0
        for i in range(2, math.isqrt(n - 1) + 1):
            if s[i]:
                s[i * i::i] = bytes(len(range(i * i, n, i)))
        return sum(s)

    return Workload("sieve", "Eratosthenes over %d KiB" % (n // 1024), asm, expected, base + n)


def wl_memcpy(size):
    src, nbytes, passes, seed = 0x100000, _round(65536 * size, 64), 64, 0x9E3779B9
    dst = src + _round(nbytes + 0xFFFF, 0x10000)
    asm = """
    cld
    mov edi, {src}
    mov ecx, {ndw}
    mov eax, {seed}
""" + _FILL + """
    mov ebp, {passes}
    xor edx, edx
pass_loop:
    mov esi, {src}
    mov edi, {dst}
    mov ecx, {ndw}
    rep movsd dword ptr es:[edi], dword ptr [esi]
    mov esi, {dst}
    mov ecx, {ndw}
sum_loop:
    lodsd
    add edx, eax
    rol edx, 1
    loop sum_loop
    mov dword ptr [{src}], edx
    dec ebp
    jnz pass_loop
    mov eax, edx
    hlt
"""
    asm = asm.format(src=src, dst=dst, ndw=nbytes // 4, seed=seed, passes=passes)

    def expected():
        words = _lcg_words(seed, nbytes // 4)
        h = 0
        for _ in range(passes):
            for w in words:
                h = (h + w) & MASK32
                h = ((h << 1) | (h >> 31)) & MASK32
            words[0] = h
        return h

    return Workload("memcpy", "REP MOVSD + LODSD sum, %d KiB x %d" % (nbytes // 1024, passes),
                    asm, expected, dst + nbytes)


def wl_bsort(size):
    arr, seed = 0x100000, 0xC0FFEE
    n = max(16, int(round(1024 * math.sqrt(size))))
    asm = """
    mov edi, {arr}
    mov ecx, {n}
    mov eax, {seed}
""" + _FILL + """
    mov ecx, {n1}
outer:
    mov esi, {arr}
    mov edx, ecx
inner:
    mov eax, dword ptr [esi]
    mov ebx, dword ptr [esi+4]
    cmp eax, ebx
    jbe no_swap
    mov dword ptr [esi], ebx
    mov dword ptr [esi+4], eax
no_swap:
    add esi, 4
    dec edx
    jnz inner
    dec ecx
    jnz outer
    mov esi, {arr}
    mov ecx, {n}
    xor eax, eax
hash_loop:
    imul eax, eax, 31
    add eax, dword ptr [esi]
    add esi, 4
    dec ecx
    jnz hash_loop
    hlt
"""
    asm = asm.format(arr=arr, n=n, n1=n - 1, seed=seed)

    def expected():
        h = 0
        for w in sorted(_lcg_words(seed, n)):
            h = (h * 31 + w) & MASK32
        return h

    return Workload("bsort", "bubble sort of %d dwords" % n, asm, expected, arr + 4 * n)


def wl_fib(size):
    # fib(n) costs ~phi^n calls: scale n so work grows linearly with size.
    n = max(8, 27 + int(round(math.log(size) / math.log((1 + 5 ** 0.5) / 2))))
    asm = """
    push {n}
    call fib
    add esp, 4
    hlt
fib:
    mov ecx, dword ptr [esp+4]
    cmp ecx, 2
    jb base
    dec ecx
    push ecx
    call fib
    pop ecx
    push eax
    dec ecx
    push ecx
    call fib
    add esp, 4
    pop edx
    add eax, edx
    ret
base:
    mov eax, ecx
    ret
""".format(n=n)

    def expected():
        a, b = 0, 1
        for _ in range(n):
            a, b = b, a + b
        return a & MASK32

    return Workload("fib", "recursive fib(%d)" % n, asm, expected, STACK_TOP)


WORKLOADS = {"crc32": wl_crc32, "sieve": wl_sieve, "memcpy": wl_memcpy,
             "bsort": wl_bsort, "fib": wl_fib}


def make_workloads(size, names=None):
    return [WORKLOADS[n](size) for n in (names or WORKLOADS)]


def assemble(asm):
    """Assemble at CODE_ADDR; return (bytes, address of the first HLT)."""
    import keystone
    import capstone
    ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)
    enc, _ = ks.asm(asm, CODE_ADDR)
    code = bytes(enc)
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    end = CODE_ADDR
    for insn in md.disasm(code, CODE_ADDR):
        end = insn.address + insn.size
        if insn.mnemonic == "hlt":
            return code, insn.address
    raise ValueError("no HLT found in assembled workload (decoded up to %#x)" % end)


# --------------------------------------------------------------------------
# Unicorn
# --------------------------------------------------------------------------

def _uc_setup(wl):
    import unicorn
    from unicorn import x86_const as X
    uc = unicorn.Uc(unicorn.UC_ARCH_X86, unicorn.UC_MODE_32)
    top = (max(wl.mem_top, STACK_TOP, CODE_ADDR + len(wl.code)) + 0xFFFFF) & ~0xFFFFF
    uc.mem_map(0, top)
    uc.mem_write(CODE_ADDR, wl.code)
    for r in ("EAX", "EBX", "ECX", "EDX", "ESI", "EDI", "EBP"):
        uc.reg_write(getattr(X, "UC_X86_REG_" + r), 0)
    uc.reg_write(X.UC_X86_REG_ESP, STACK_TOP)
    uc.reg_write(X.UC_X86_REG_EFLAGS, 0x2)
    return uc


def unicorn_count(wl):
    """Executed-instruction count (calibration run with a block hook)."""
    import unicorn
    import capstone
    from unicorn import x86_const as X
    md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
    code, sizes = wl.code, {}
    total = [0]

    def ninsns(addr, size):
        off = addr - CODE_ADDR
        return sum(1 for _ in md.disasm_lite(code[off:off + size], addr))

    def hook(uc, addr, size, _):
        k = (addr, size)
        c = sizes.get(k)
        if c is None:
            c = sizes[k] = ninsns(addr, size)
        total[0] += c

    uc = _uc_setup(wl)
    uc.hook_add(unicorn.UC_HOOK_BLOCK, hook)
    uc.emu_start(CODE_ADDR, wl.hlt_addr)
    return total[0], uc.reg_read(X.UC_X86_REG_EAX)


def unicorn_count_exact(wl):
    """Per-instruction UC_HOOK_CODE count (slow; used by the tests to check unicorn_count)."""
    import unicorn
    n = [0]

    def hook(uc, addr, size, _):
        n[0] += 1

    uc = _uc_setup(wl)
    uc.hook_add(unicorn.UC_HOOK_CODE, hook)
    uc.emu_start(CODE_ADDR, wl.hlt_addr)
    return n[0]


def unicorn_run(wl):
    """Un-hooked run in a fresh Uc; returns (seconds, final EAX, final EIP)."""
    from unicorn import x86_const as X
    uc = _uc_setup(wl)
    t0 = time.perf_counter()
    uc.emu_start(CODE_ADDR, wl.hlt_addr)
    dt = time.perf_counter() - t0
    return dt, uc.reg_read(X.UC_X86_REG_EAX), uc.reg_read(X.UC_X86_REG_EIP)


# --------------------------------------------------------------------------
# btvm
# --------------------------------------------------------------------------

def load_btvm():
    """Return (run_case, None) or (None, reason)."""
    try:
        from runtime.snippet import run_case
    except Exception as e:  # ImportError, or the module failing on import
        return None, "%s: %s" % (type(e).__name__, e)
    return run_case, None


def btvm_run(run_case, wl, max_instructions):
    """One timed run_case call; returns (seconds, result dict)."""
    case = wl.case(max_instructions)
    t0 = time.perf_counter()
    res = run_case(case, trace_writes=False)
    return time.perf_counter() - t0, res


def btvm_reg(res, name):
    """A final register from a run_case result (accepts ints or numeric strings)."""
    v = res["final"]["regs"][name]
    return int(v, 0) if isinstance(v, str) else v


def btvm_problem(wl, res):
    """Describe how a btvm result deviates from a clean stop at HLT, or None."""
    if res.get("exception"):
        return "exception %r" % (res["exception"],)
    eip = btvm_reg(res, "eip")
    if eip and eip != wl.hlt_addr + 1:
        return "stopped at eip=%#x, expected %#x (after HLT)" % (eip, wl.hlt_addr + 1)
    return None


# --------------------------------------------------------------------------
# Driver
# --------------------------------------------------------------------------

def _mips(insns, secs):
    return insns / secs / 1e6 if secs else None


def bench(workloads, repeat=3, use_btvm=True, log=print):
    run_case, why = load_btvm() if use_btvm else (None, "disabled (--no-btvm)")
    if run_case is None:
        log("btvm runtime not available: %s" % why)
    rows = []
    for wl in workloads:
        row = {"workload": wl.name, "desc": wl.desc, "code_bytes": len(wl.code)}
        rows.append(row)
        exp = wl.expected()
        insns, cal_eax = unicorn_count(wl)
        row.update(instructions=insns, expected_eax=exp)
        times, eax = [], None
        for _ in range(repeat):
            dt, eax, eip = unicorn_run(wl)
            times.append(dt)
        row["unicorn_s"] = statistics.median(times)
        row["unicorn_mips"] = _mips(insns, row["unicorn_s"])
        row["unicorn_eax"] = eax
        if eax != exp or cal_eax != exp:
            log("WARNING: %s: Unicorn EAX %#x (calibration %#x) != expected %#x"
                % (wl.name, eax, cal_eax, exp))
        if run_case is None:
            row["btvm_error"] = "runtime not available: " + why
            continue
        budget = 4 * insns + 100000
        try:
            cold, res = btvm_run(run_case, wl, budget)
            _tier2_settle()
            warm, results = [], [res]
            for _ in range(repeat):
                dt, r = btvm_run(run_case, wl, budget)
                warm.append(dt)
                results.append(r)
        except Exception as e:
            row["btvm_error"] = "%s: %s" % (type(e).__name__, e)
            log("WARNING: %s: btvm run_case raised %s" % (wl.name, row["btvm_error"]))
            continue
        row["btvm_cold_s"] = cold
        row["btvm_warm_s"] = statistics.median(warm)
        row["btvm_cold_mips"] = _mips(insns, cold)
        row["btvm_warm_mips"] = _mips(insns, row["btvm_warm_s"])
        row["ratio"] = row["btvm_warm_mips"] / row["unicorn_mips"]
        row["btvm_instructions"] = res.get("instructions")
        row["btvm_eax"] = btvm_reg(res, "eax")
        for i, r in enumerate(results):
            prob = btvm_problem(wl, r)
            if prob:
                log("WARNING: %s: btvm run %d: %s" % (wl.name, i, prob))
                row.setdefault("btvm_problems", []).append(prob)
            if btvm_reg(r, "eax") != exp:
                log("WARNING: %s: btvm run %d EAX %#x != Unicorn %#x (expected %#x)"
                    % (wl.name, i, btvm_reg(r, "eax"), eax, exp))
                row["btvm_eax_mismatch"] = True
        row["btvm_valid"] = not (row.get("btvm_eax_mismatch") or row.get("btvm_problems"))
    return rows


def _fmt(v, spec):
    return "n/a" if v is None else format(v, spec)


def format_table(rows):
    hdr = ("workload", "instructions", "Unicorn MIPS", "btvm cold MIPS",
           "btvm warm MIPS", "warm/Unicorn")
    lines = []
    for r in rows:
        # "!" marks btvm figures from runs that gave a wrong result: not comparable.
        bad = "!" if r.get("btvm_valid") is False else ""
        lines.append((r["workload"], "{:,}".format(r["instructions"]),
                      _fmt(r.get("unicorn_mips"), ".1f"),
                      _fmt(r.get("btvm_cold_mips"), ".1f") + bad,
                      _fmt(r.get("btvm_warm_mips"), ".1f") + bad,
                      _fmt(r.get("ratio"), ".3f") + bad))
    widths = [max(len(h), *(len(l[i]) for l in lines)) for i, h in enumerate(hdr)]
    out = ["  ".join(h.ljust(w) if i == 0 else h.rjust(w) for i, (h, w) in enumerate(zip(hdr, widths)))]
    out.append("  ".join("-" * w for w in widths))
    for l in lines:
        out.append("  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                             for i, (c, w) in enumerate(zip(l, widths))))
    return "\n".join(out)


def _tier2_settle():
    """Wait for the background tier-2 compiles the cold run asked for (a warm run installs them)."""
    try:
        from bt import tier2
    except ImportError:
        return
    opt = tier2.shared_optimizer()
    if opt is not None:
        opt.wait_idle()


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="bench_core.py",
        description=__doc__.split("\n\n")[0],
        epilog="MIPS for every engine = Unicorn-calibrated instruction count / wall time "
               "(REP iterations counted individually). btvm 'cold' is the first run_case call "
               "per workload in this process, 'warm' the median of the --repeat calls after it.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--size", type=float, default=1.0,
                    help="scale factor for every workload's amount of work")
    ap.add_argument("--repeat", type=int, default=3,
                    help="timed runs per engine; the median is reported")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON to FILE")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help="comma-separated subset of: " + ", ".join(WORKLOADS))
    ap.add_argument("--no-btvm", action="store_true", help="only run Unicorn")
    args = ap.parse_args(argv)
    if args.size <= 0 or args.repeat < 1:
        ap.error("--size must be > 0 and --repeat >= 1")
    names = [n.strip() for n in args.workloads.split(",") if n.strip()]
    bad = [n for n in names if n not in WORKLOADS]
    if bad:
        ap.error("unknown workload(s): %s" % ", ".join(bad))

    rows = bench(make_workloads(args.size, names), repeat=args.repeat, use_btvm=not args.no_btvm)
    print(format_table(rows))
    if any(r.get("btvm_valid") is False for r in rows):
        print("! = btvm gave a wrong result or did not stop cleanly at HLT (see warnings); "
              "its figures are not comparable")
    errs = {r.get("btvm_error") for r in rows if r.get("btvm_error")}
    for e in sorted(errs):
        if not e.startswith("runtime not available"):
            print("btvm error: " + e)
    for r in rows:
        bi = r.get("btvm_instructions")
        # btvm counts the final HLT, Unicorn (stopping at its address) does not.
        if bi is not None and bi != r["instructions"] + 1:
            print("note: %s: btvm counted %s instructions, Unicorn %s (+1 HLT expected; "
                  "Unicorn's hook also fires once more per REP instruction, at ECX=0)"
                  % (r["workload"], "{:,}".format(bi), "{:,}".format(r["instructions"])))
    if args.json:
        import unicorn
        meta = {"size": args.size, "repeat": args.repeat, "python": sys.version.split()[0],
                "platform": platform.platform(), "unicorn": unicorn.__version__}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Differential test: seeded random instruction sequences, btvm vs Unicorn live.

    BTVM_DIFF_SEED   seed (default 1234)
    BTVM_DIFF_INSNS  total instructions over all sequences (default 10000)

Sequences of SEQ_LEN instructions are drawn from every corpus family
(assembled with keystone at 0x1000; sequences keystone rejects are
skipped).  Half the sequences use only instructions whose flags are fully
defined; the other half mix in instructions with undefined flags (MUL, DIV,
shifts, BT*, BCD, ...).  The Unicorn oracle tracks undefined flags per
executed instruction (corpus.oracle.flag_effect), so flags are masked
exactly as the SDM requires.  Memory operands use ESI/EDI/EBP as pointers
into the data area; random instructions never write those registers except
string instructions with small counts.  Only forward branches and bounded
loops are generated.

A failure prints a minimal reproducer: the failing case JSON (with the
oracle's expectation), shrunk by dropping instructions while it still fails.
"""

import json
import os
import random

import pytest

keystone = pytest.importorskip("keystone")
pytest.importorskip("unicorn")

from corpus import oracle  # noqa: E402

SEED = int(os.environ.get("BTVM_DIFF_SEED", "1234"))
TOTAL_INSNS = int(os.environ.get("BTVM_DIFF_INSNS", "10000"))
SEQ_LEN = 20
CHUNKS = 10
CODE = 0x1000
DATA_LO, DATA_HI = 0x2000, 0x2800
STACK_LO, STACK_HI = 0x3700, 0x3900
ESP0 = 0x3800

R32 = ("eax", "ebx", "ecx", "edx")
R16 = ("ax", "bx", "cx", "dx")
R8 = ("al", "bl", "cl", "dl", "ah", "bh", "ch", "dh")
RS = {8: R8, 16: R16, 32: R32}
PTR = {8: "byte", 16: "word", 32: "dword"}
CC = ("o", "no", "b", "ae", "e", "ne", "be", "a", "s", "ns", "p", "np", "l", "ge", "le", "g")
EDGE = (0, 1, 0x7F, 0x80, 0xFF, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0xFFFFFFFE)

_ks = keystone.Ks(keystone.KS_ARCH_X86, keystone.KS_MODE_32)


class SeqGen:
    def __init__(self, rng: random.Random):
        self.r = rng

    def val(self):
        return self.r.choice(EDGE) if self.r.random() < 0.3 else self.r.getrandbits(32)

    def imm(self, bits):
        r = self.r
        return r.choice((0, 1, (1 << bits) - 1, 1 << (bits - 1), r.getrandbits(bits), r.randrange(0, 16)))

    def reg(self, bits):
        return self.r.choice(RS[bits])

    def mem(self, bits):
        r = self.r
        if r.random() < 0.15:
            return f"{PTR[bits]} ptr [{r.randrange(0x2400, 0x2600):#x}]"
        base = r.choice(("esi", "edi", "ebp"))
        d = r.randint(-64, 64)
        return f"{PTR[bits]} ptr [{base}{d:+d}]"

    def rm(self, bits):
        return self.mem(bits) if self.r.random() < 0.35 else self.reg(bits)

    def bits(self):
        return self.r.choice((8, 16, 32, 32))

    # -- instruction templates; each returns a list of asm lines ------------
    def defined(self):
        r = self.r
        b = self.bits()
        k = r.randrange(17)
        if k == 0:
            op = r.choice(("add", "adc", "sub", "sbb", "cmp"))
            d = self.rm(b)
            s = self.reg(b) if "ptr" in d or r.random() < 0.5 else (self.mem(b) if r.random() < 0.4 else hex(self.imm(b)))
            return [f"{op} {d}, {s}"]
        if k == 1:
            return [f"{r.choice(('inc', 'dec', 'neg', 'not'))} {self.rm(b)}"]
        if k == 2:
            d = self.rm(b)
            s = self.reg(b) if "ptr" in d else r.choice((self.reg(b), hex(self.imm(b)), self.mem(b)))
            return [f"mov {d}, {s}"]
        if k == 3:
            sb = r.choice((8, 16))
            db = 32 if sb == 16 else r.choice((16, 32))
            return [f"{r.choice(('movzx', 'movsx'))} {self.reg(db)}, {self.rm(sb)}"]
        if k == 4:
            return [f"lea {self.reg(32)}, [{r.choice(R32 + ('esi', 'edi', 'ebp'))}+{self.reg(32)}*{r.choice((1, 2, 4, 8))}{r.randint(-999, 999):+d}]"]
        if k == 5:
            op = r.choice(("xchg", "xadd", "cmpxchg"))
            return [f"{op} {self.rm(b)}, {self.reg(b)}"]
        if k == 6:
            return [r.choice((f"push {self.reg(32)}", f"push {self.mem(32)}", f"push {self.imm(32):#x}",
                              f"pop {self.reg(32)}", f"pop {self.mem(32)}", f"push {self.reg(16)}",
                              f"pop {self.reg(16)}", "pushfd", "pushfd\npopfd", "pushad\npopad"))]
        if k == 7:
            return [r.choice(("cbw", "cwde", "cwd", "cdq", "lahf", "sahf", "clc", "stc", "cmc", "cld", "std",
                              f"bswap {self.reg(32)}", "nop"))]
        if k == 8:
            b = r.choice((16, 32))
            return [f"cmov{r.choice(CC)} {self.reg(b)}, {self.rm(b)}"]
        if k == 9:
            return [f"set{r.choice(CC)} {self.rm(8)}"]
        if k == 10:
            op = r.choice(("movs", "stos", "lods", "cmps", "scas"))
            sz = r.choice("bwd")
            pre = r.choice(("", "rep ")) if op in ("movs", "stos", "lods") else r.choice(("", "repe ", "repne "))
            p = {"b": "byte", "w": "word", "d": "dword"}[sz]
            # use the operand forms keystone accepts
            form = {"movs": f"movs {p} ptr es:[edi], {p} ptr [esi]", "stos": f"stos {p} ptr es:[edi]",
                    "lods": f"lods {p} ptr [esi]", "cmps": f"cmps {p} ptr [esi], {p} ptr es:[edi]",
                    "scas": f"scas {p} ptr es:[edi]"}[op]
            return [f"mov ecx, {r.randrange(0, 4)}", pre + form]
        if k == 11:
            return [("jcc", f"j{r.choice(CC)}")]
        if k == 12:
            return [("jcc", r.choice(("jmp", "jecxz")))]
        if k == 13:
            n = r.randrange(1, 4)
            lab = f"B{r.getrandbits(32):x}"
            body = f"{r.choice(('add', 'sub', 'adc', 'xor'))} {r.choice(('eax', 'ebx', 'edx'))}, {self.reg(32)}"
            return [f"mov ecx, {n}", f"{lab}: {body}", f"loop {lab}"]
        if k == 14:
            return ["mov ebx, 0x2400", "xlatb"] if r.random() < 0.3 else [f"cmpxchg8b qword ptr [{r.choice(('esi', 'edi', 'ebp'))}{r.randint(-64, 56):+d}]"]
        if k == 15:
            return [("call",)]
        return [f"cmp {self.reg(b)}, {hex(self.imm(b))}"]

    def defined_simple(self):
        b = self.bits()
        return f"{self.r.choice(('add', 'sub', 'adc', 'sbb'))} {self.reg(b)}, {self.reg(b)}"

    def undefined(self):
        r = self.r
        b = self.bits()
        k = r.randrange(9)
        if k == 0:
            return [f"{r.choice(('and', 'or', 'xor', 'test'))} {self.rm(b)}, {r.choice((self.reg(b), hex(self.imm(b))))}"]
        if k == 1:
            return [f"{r.choice(('mul', 'imul'))} {self.rm(b)}"] if r.random() < 0.5 else \
                [f"imul {self.reg(32)}, {self.rm(32)}", f"imul {self.reg(16)}, {self.reg(16)}, {r.randint(-128, 300)}"][r.randrange(2):][:1]
        if k == 2:
            op = r.choice(("shl", "shr", "sar", "rol", "ror", "rcl", "rcr"))
            cnt = r.choice(("cl", "1", str(r.randrange(0, 40))))
            return [f"{op} {self.rm(b)}, {cnt}"]
        if k == 3:
            bb = r.choice((16, 32))
            op = r.choice(("shld", "shrd"))
            cnt = r.choice(("cl", str(r.randrange(0, 32))))
            return [f"{op} {self.rm(bb)}, {self.reg(bb)}, {cnt}"]
        if k == 4:
            bb = r.choice((16, 32))
            op = r.choice(("bt", "bts", "btr", "btc"))
            if r.random() < 0.6:
                return [r.choice((f"{op} {self.reg(bb)}, {self.reg(bb)}", f"{op} {self.rm(bb)}, {r.randrange(0, 128)}"))]
            # register bit offset into a memory bit string: keep it small
            return ["and edx, 0xff", f"{op} {self.mem(bb)}, {'edx' if bb == 32 else 'dx'}"]
        if k == 5:
            bb = r.choice((16, 32))
            return [f"{r.choice(('bsf', 'bsr'))} {self.reg(bb)}, {self.rm(bb)}"]
        if k == 6:
            return [r.choice(("daa", "das", "aaa", "aas", f"aam {r.randrange(1, 256)}", f"aad {r.randrange(0, 256)}"))]
        if k == 7:
            return r.choice((["xor edx, edx", "or ecx, 1", "div ecx"],
                             ["cdq", "or ecx, 1", "idiv ecx"],
                             ["and eax, 0xff", "or cl, 1", "div cl"],
                             ["movzx eax, ax", "xor edx, edx", "or bx, 1", "div bx"]))
        return self.defined()


def gen_sequence(rng: random.Random, mixed: bool):
    """-> (asm text, number of instructions)."""
    g = SeqGen(rng)
    out, pending, n, labno = [], [], 0, 0
    while n < SEQ_LEN:
        undefined = mixed and rng.random() < 0.45
        items = g.undefined() if undefined else g.defined()
        if undefined:
            # Flags the SDM leaves undefined must not flow into later results (SBB, SETcc,
            # CMOVcc, PUSHFD, DAA ... would copy them into registers or memory, where no
            # mask can follow them): redefine all six with a CMP that changes no register.
            items = list(items) + [f"cmp {rng.choice(('eax', 'ebx', 'ecx', 'edx'))}, {rng.choice(('eax', 'ebx', 'edx'))}"]
        # a group of lines is atomic: labels are only placed between groups,
        # so no branch enters a macro (e.g. skips its "mov ecx, k")
        for it in items:
            if isinstance(it, tuple):
                labno += 1
                lab = f"F{labno}"
                if it[0] == "call":
                    out += [f"call {lab}s", f"jmp {lab}", f"{lab}s: {g.defined_simple()}", "ret", f"{lab}:"]
                    n += 3
                else:
                    out.append(f"{it[1]} {lab}")
                    pending.append([rng.randrange(1, 4), lab])
            else:
                out.append(it)
            n += 1
        for p in pending:
            p[0] -= 1
        for p in [p for p in pending if p[0] <= 0]:
            out.append(f"{p[1]}:")
            pending.remove(p)
    for p in pending:
        out.append(f"{p[1]}:")
    return out, n


def make_case(rng: random.Random, lines, name):
    try:
        enc, _ = _ks.asm("\n".join(lines) + "\nhlt", CODE)
    except keystone.KsError:
        return None
    if not enc:
        return None
    code = bytes(enc)
    regs = {r: (rng.choice(EDGE) if rng.random() < 0.3 else rng.getrandbits(32)) for r in ("eax", "ebx", "ecx", "edx")}
    regs.update(esi=rng.randrange(0x2300, 0x2500), edi=rng.randrange(0x2300, 0x2500),
                ebp=rng.randrange(0x2300, 0x2500), esp=ESP0, eip=CODE,
                eflags=2 | (rng.getrandbits(12) & (oracle.STATUS | oracle.DF)))
    ram = {CODE + i: b for i, b in enumerate(code)}
    ram.update(zip(range(DATA_LO, DATA_HI), rng.randbytes(DATA_HI - DATA_LO)))
    ram.update(zip(range(STACK_LO, STACK_HI), rng.randbytes(STACK_HI - STACK_LO)))
    case = oracle.make_case(name, code, regs, ram, max_instructions=10000)
    case["asm"] = "\n".join(lines)
    return case


def annotate(case):
    """Oracle expectation, or None if the sequence is unusable (touches
    unlisted memory, makes a register architecturally undefined, ...)."""
    try:
        c = oracle.annotate(case, strict=True)
    except oracle.OracleError:
        return None
    if "regs_mask" in c:
        return None
    return c


def run_btvm(case):
    from runtime.snippet import run_case
    inp = {k: case[k] for k in ("name", "mode", "initial", "max_instructions")}
    try:
        return oracle.compare(case, run_case(json.loads(json.dumps(inp))))
    except Exception as e:  # btvm crash = failure
        return [f"btvm raised {type(e).__name__}: {e}"]


def shrink(case, lines, budget=80):
    """Drop instructions (and labelled lines) while the case still fails."""
    best, best_case = list(lines), case
    changed = True
    while changed and budget > 0:
        changed = False
        for i in range(len(best) - 1, -1, -1):
            if budget <= 0:
                break
            cand = best[:i] + best[i + 1:]
            c = make_case(random.Random(0), cand, case["name"] + " (shrunk)")
            if c is None:
                continue
            # keep the failing case's initial state, just new code
            c["initial"] = _with_code(case["initial"], c)
            c = annotate(c)
            if c is None:
                continue
            budget -= 1
            if run_btvm(c):
                best, best_case, changed = cand, c, True
    return best_case


def _with_code(initial, new_case):
    """initial state of the original case with new_case's code bytes."""
    old = oracle.ram_dict(initial["ram"])
    new = oracle.ram_dict(new_case["initial"]["ram"])
    code = {a: b for a, b in new.items() if a < DATA_LO}
    ram = {a: b for a, b in old.items() if a >= DATA_LO}
    ram.update(code)
    return {"regs": dict(initial["regs"]), "ram": oracle.ram_pairs(ram)}


def _chunk_sequences(chunk):
    """Sequences of one chunk, deterministic in (SEED, chunk)."""
    per_chunk = max(1, -(-TOTAL_INSNS // (SEQ_LEN * CHUNKS)))
    rng = random.Random(f"{SEED}/{chunk}")
    made = tries = 0
    while made < per_chunk and tries < per_chunk * 10:
        tries += 1
        mixed = made % 2 == 1
        lines, n = gen_sequence(rng, mixed)
        case = make_case(rng, lines, f"diff seed={SEED} chunk={chunk} #{made} {'mixed' if mixed else 'defined'}")
        if case is None:
            continue
        case = annotate(case)
        if case is None:
            continue
        made += 1
        yield case, lines, n


@pytest.mark.parametrize("chunk", range(CHUNKS))
def test_random_diff(chunk):
    pytest.importorskip("runtime.snippet")
    total = 0
    failures = []
    for case, lines, n in _chunk_sequences(chunk):
        total += n
        problems = run_btvm(case)
        if problems:
            failures.append((case, lines, problems))
    assert total >= TOTAL_INSNS // CHUNKS
    if failures:
        case, lines, problems = failures[0]
        small = shrink(case, lines)
        msg = [f"{len(failures)} of the sequences in chunk {chunk} (seed {SEED}) differ from Unicorn.",
               "first failure: " + "; ".join(problems[:8]),
               "minimal reproducer (case JSON; expected = Unicorn):",
               json.dumps(small, separators=(",", ":")),
               "its mismatches: " + "; ".join(run_btvm(small)[:8])]
        for case2, _, p2 in failures[1:6]:
            msg.append(f"also: {case2['name']}: {'; '.join(p2[:3])}\n  asm: {case2['asm'].replace(chr(10), '; ')}")
        pytest.fail("\n".join(msg), pytrace=False)

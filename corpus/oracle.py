"""Unicorn oracle, undefined-flags table and result comparison for the corpus.

Case format (SingleStepTests layout)::

    {"name": str, "mode": 32,
     "initial": {"regs": {"eax", ..., "esp", "eip", "eflags"}, "ram": [[addr, byte], ...]},
     "max_instructions": N}

Stored corpus cases also carry ``expected`` ({"regs", "ram", "exception"}),
``flags_mask`` (EFLAGS bits compared), optionally ``regs_mask`` ({reg: bits
compared} for registers whose value is partly architecturally undefined) and
``oracle`` ({"name": "unicorn", "version": ...}).

``run_unicorn(case)`` computes the expected state; ``compare(case, result)``
compares a btvm result dict against the stored expectation.  Only
``compare`` and the pure helpers are needed by tests that do not call
Unicorn; Unicorn and Capstone are imported lazily.
"""

from __future__ import annotations

REGS32 = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp")
ALL_REGS = REGS32 + ("eip", "eflags")

CF, PF, AF, ZF, SF, DF, OF = 0x1, 0x4, 0x10, 0x40, 0x80, 0x400, 0x800
STATUS = CF | PF | AF | ZF | SF | OF
COMPARED_FLAGS = STATUS | DF          # the most flags_mask ever compares
FLAG_NAMES = {CF: "CF", PF: "PF", AF: "AF", ZF: "ZF", SF: "SF", DF: "DF", OF: "OF"}

VEC_DE, VEC_BR, VEC_UD = 0, 5, 6

ORACLE_NAME = "unicorn"


class OracleError(Exception):
    """The oracle could not produce a valid expectation (bad case)."""


def flag_names(mask: int) -> str:
    return "|".join(n for b, n in sorted(FLAG_NAMES.items()) if mask & b) or "-"


# --------------------------------------------------------------------------
# Undefined-flags table (Intel SDM vol. 2, "Flags Affected" of each insn).
#
# For each mnemonic: (written, undefined) masks over the six status flags.
# ``written`` = flags the instruction sets to a defined value, ``undefined``
# = flags the instruction leaves architecturally undefined.  Flags in
# neither set are unaffected.  Count-dependent instructions (shifts,
# rotates, double shifts) and REP-prefixed compares are handled in
# ``flag_effect``.
# --------------------------------------------------------------------------

_ARITH = (STATUS, 0)
FLAG_TABLE: dict[str, tuple[int, int]] = {
    **{m: _ARITH for m in ("add", "adc", "sub", "sbb", "cmp", "neg", "xadd",
                           "cmpxchg", "cmpsb", "cmpsw", "cmpsd",
                           "scasb", "scasw", "scasd")},
    "inc": (STATUS & ~CF, 0),
    "dec": (STATUS & ~CF, 0),
    **{m: (STATUS & ~AF, AF) for m in ("and", "or", "xor", "test")},
    "mul": (CF | OF, SF | ZF | AF | PF),
    "imul": (CF | OF, SF | ZF | AF | PF),
    "div": (0, STATUS),
    "idiv": (0, STATUS),
    "bt": (CF, OF | SF | AF | PF),
    "bts": (CF, OF | SF | AF | PF),
    "btr": (CF, OF | SF | AF | PF),
    "btc": (CF, OF | SF | AF | PF),
    "bsf": (ZF, CF | OF | SF | AF | PF),
    "bsr": (ZF, CF | OF | SF | AF | PF),
    "daa": (STATUS & ~OF, OF),
    "das": (STATUS & ~OF, OF),
    "aaa": (AF | CF, OF | SF | ZF | PF),
    "aas": (AF | CF, OF | SF | ZF | PF),
    "aam": (SF | ZF | PF, OF | AF | CF),
    "aad": (SF | ZF | PF, OF | AF | CF),
    "cmpxchg8b": (ZF, 0),
    "popfd": (STATUS, 0), "popf": (STATUS, 0), "popfw": (STATUS, 0),
    "sahf": (SF | ZF | AF | PF | CF, 0),
    "clc": (CF, 0), "stc": (CF, 0), "cmc": (CF, 0),
}
SHIFTS = ("shl", "sal", "shr", "sar")
ROTATES = ("rol", "ror", "rcl", "rcr")
DSHIFTS = ("shld", "shrd")
PREFIX_WORDS = ("rep", "repe", "repne", "repz", "repnz", "lock")


def static_undefined(mnemonic: str, count: int | None = None, width: int = 32) -> int:
    """Undefined status flags of one instruction (count = masked count)."""
    w, u, _ = _effect(mnemonic, count, width)
    return u


def _effect(base: str, count, width):
    """-> (written, undefined, dest_undefined) for a mnemonic.

    ``count`` is the raw count operand value for shifts/rotates (None if
    not applicable); ``width`` the operand size in bits.
    """
    if base in SHIFTS:
        c = count & 0x1F
        if c == 0:
            return 0, 0, False
        und = AF
        if c != 1:
            und |= OF
        if base in ("shl", "sal", "shr") and c >= width:
            und |= CF
        return STATUS & ~und, und, False
    if base in ROTATES:
        c = count & 0x1F
        if c == 0:
            return 0, 0, False
        und = 0 if c == 1 else OF
        return (CF | OF) & ~und, und, False
    if base in DSHIFTS:
        c = count & 0x1F
        if c == 0:
            return 0, 0, False
        if c > width:
            return 0, STATUS, True
        und = AF | (0 if c == 1 else OF)
        return STATUS & ~und, und, False
    w, u = FLAG_TABLE.get(base, (0, 0))
    return w, u, False


# --------------------------------------------------------------------------
# Helpers on cases
# --------------------------------------------------------------------------

def ram_dict(pairs) -> dict[int, int]:
    return {int(a): int(b) & 0xFF for a, b in pairs}


def ram_pairs(d: dict[int, int]) -> list[list[int]]:
    return [[a, d[a]] for a in sorted(d)]


# --------------------------------------------------------------------------
# Unicorn runner
# --------------------------------------------------------------------------

_md = None
_insn_cache: dict[tuple[int, bytes], object] = {}


def _capstone():
    global _md
    if _md is None:
        import capstone
        _md = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32)
        _md.detail = True
    return _md


def _decode(address: int, code: bytes):
    key = (address, code)
    insn = _insn_cache.get(key)
    if insn is None:
        insns = list(_capstone().disasm(code, address, 1))
        insn = insns[0] if insns else None
        _insn_cache[key] = insn
    return insn


def _uc_reg(name: str):
    from unicorn import x86_const
    return getattr(x86_const, "UC_X86_REG_" + name.upper())


def _read_reg(uc, insn, reg_id) -> int:
    return uc.reg_read(_uc_reg(insn.reg_name(reg_id)))


def _ea(uc, insn, op) -> int:
    m = op.mem
    a = m.disp
    if m.base:
        a += _read_reg(uc, insn, m.base)
    if m.index:
        a += _read_reg(uc, insn, m.index) * m.scale
    if insn.prefix[3] == 0x67:
        a &= 0xFFFF
    return a & 0xFFFFFFFF


def _operand_value(uc, insn, op) -> int:
    from capstone import x86
    if op.type == x86.X86_OP_REG:
        return _read_reg(uc, insn, op.reg)
    if op.type == x86.X86_OP_IMM:
        return op.imm & 0xFFFFFFFF
    if op.type == x86.X86_OP_MEM:
        return int.from_bytes(uc.mem_read(_ea(uc, insn, op), op.size), "little")
    raise OracleError("unexpected operand type")


def flag_effect(uc, insn):
    """Effect of ``insn`` (about to execute in ``uc``) on flag definedness.

    Returns (written, undefined, undef_regs) where undef_regs maps a 32-bit
    register name to the mask of its bits that become undefined.
    """
    from capstone import x86
    words = insn.mnemonic.split()
    prefixes = [w for w in words if w in PREFIX_WORDS]
    base = words[-1]
    ops = insn.operands
    width = ops[0].size * 8 if ops else 32
    undef_regs: dict[str, int] = {}
    count = None
    if base in SHIFTS or base in ROTATES:
        count = _operand_value(uc, insn, ops[1]) if len(ops) > 1 else 1
    elif base in DSHIFTS:
        count = _operand_value(uc, insn, ops[2])
    if any(p.startswith("rep") for p in prefixes) and uc.reg_read(_uc_reg("ecx")) == 0:
        return 0, 0, undef_regs          # REP with ECX=0: no iteration
    written, undef, dest_undef = _effect(base, count, width)
    if base in ("bsf", "bsr") and _operand_value(uc, insn, ops[1]) & ((1 << width) - 1) == 0:
        dest_undef = True
    if dest_undef:
        op = ops[0]
        if op.type != x86.X86_OP_REG:
            raise OracleError(f"undefined memory destination: {insn.mnemonic} {insn.op_str}")
        name = insn.reg_name(op.reg)
        full = {"ax": "eax", "bx": "ebx", "cx": "ecx", "dx": "edx",
                "si": "esi", "di": "edi", "bp": "ebp", "sp": "esp"}.get(name, name)
        undef_regs[full] = (1 << width) - 1
    return written, undef, undef_regs


def make_case(name, code: bytes, regs: dict, ram: dict[int, int], max_instructions=1000):
    """Build an (unexpected) case dict: regs must give all 10 registers."""
    return {
        "name": name,
        "mode": 32,
        "initial": {"regs": {r: int(regs[r]) & 0xFFFFFFFF for r in ALL_REGS},
                    "ram": ram_pairs(ram)},
        "max_instructions": max_instructions,
    }


def run_unicorn(case, strict: bool = True):
    """Run ``case`` under Unicorn; return the expectation.

    Returns a dict {"expected": {...}, "flags_mask": int, "regs_mask": {...},
    "oracle": {...}, "instructions": n}.  The first four are what a stored
    case carries.  With ``strict`` every memory access must hit an address
    listed in initial.ram (else OracleError); otherwise accesses anywhere in
    the mapped pages are allowed (they read zero in both models).
    """
    import unicorn
    from unicorn import Uc, UcError, UC_ARCH_X86, UC_MODE_32, UC_HOOK_CODE, \
        UC_HOOK_INTR, UC_HOOK_MEM_WRITE, UC_HOOK_MEM_READ, UC_ERR_INSN_INVALID

    init = case["initial"]
    ram = ram_dict(init["ram"])
    regs = init["regs"]
    uc = Uc(UC_ARCH_X86, UC_MODE_32)
    for page in sorted({a >> 12 for a in ram}):
        uc.mem_map(page << 12, 0x1000)
    for a0, blob in _runs(ram):
        uc.mem_write(a0, blob)
    for r in REGS32:
        uc.reg_write(_uc_reg(r), regs[r])
    uc.reg_write(_uc_reg("eflags"), regs["eflags"] | 2)

    start = regs["eip"]

    written: set[int] = set()
    accessed: set[int] = set()
    bad: list[str] = []
    state = {"pending": None, "undef": 0, "undef_regs": {}, "count": 0, "intr": None,
             "last": None}

    def apply_pending():
        p = state["pending"]
        if p is not None:
            w, u, ur = p[1]
            state["undef"] = (state["undef"] & ~w) | u
            for k, v in ur.items():
                state["undef_regs"][k] = state["undef_regs"].get(k, 0) | v
            state["pending"] = None

    def hook_code(uc_, address, size, _):
        apply_pending()
        state["count"] += 1
        if not 0 < size <= 15:     # Unicorn reports a bogus size for invalid opcodes
            state["last"] = (address, None)
            return
        insn = _decode(address, bytes(uc_.mem_read(address, size)))
        state["last"] = (address, insn.mnemonic if insn is not None else None)
        if insn is None:
            return
        try:
            eff = flag_effect(uc_, insn)
        except OracleError as e:
            bad.append(str(e))
            uc_.emu_stop()
            return
        state["pending"] = (address, eff)

    def hook_write(uc_, access, address, size, value, _):
        for a in range(address, address + size):
            written.add(a & 0xFFFFFFFF)
            accessed.add(a & 0xFFFFFFFF)
            if strict and a not in ram:
                bad.append(f"write to unlisted address {a:#x}")

    def hook_read(uc_, access, address, size, value, _):
        for a in range(address, address + size):
            accessed.add(a & 0xFFFFFFFF)
            if strict:
                if a not in ram:
                    bad.append(f"read of unlisted address {a:#x}")

    def hook_intr(uc_, intno, _):
        state["intr"] = intno
        uc_.emu_stop()

    uc.hook_add(UC_HOOK_CODE, hook_code)
    uc.hook_add(UC_HOOK_MEM_WRITE, hook_write)
    uc.hook_add(UC_HOOK_MEM_READ, hook_read)
    uc.hook_add(UC_HOOK_INTR, hook_intr)

    exception = None
    try:
        # One instruction per emu_start: Unicorn 2.1.4 loses lazily computed flags
        # inside a translation block in some cases (e.g. CMP followed by LOOPNE leaves
        # a wrong CF; checked against the host CPU), but is exact at block boundaries.
        # Unicorn stops after executing HLT, with EIP = address after it.
        # A store into the instruction's own translation block makes Unicorn re-run it
        # without advancing under count=1: from there on, run without stepping.
        pc = start
        budget = case.get("max_instructions", 1000) + 1
        while budget > 0:
            uc.emu_start(pc, 0xFFFFFFFF, count=1)
            budget -= 1
            new_pc = uc.reg_read(_uc_reg("eip"))
            last = state["last"]
            if bad or state["intr"] is not None or (last is not None and last[1] == "hlt" and new_pc == last[0] + 1):
                break
            if new_pc == pc and last is not None and last[0] == pc and not last[1].startswith(("rep", "jmp", "loop")):
                uc.emu_start(new_pc, 0xFFFFFFFF, count=budget)
                break
            pc = new_pc
    except UcError as e:
        if e.errno == UC_ERR_INSN_INVALID:
            exception = {"vector": VEC_UD, "error_code": None}
        else:
            raise OracleError(f"unicorn error {e} at eip={uc.reg_read(_uc_reg('eip')):#x}")
    if bad:
        raise OracleError("; ".join(bad[:5]))
    if state["intr"] is not None:
        if state["intr"] not in (VEC_DE, VEC_BR, VEC_UD):   # faults: eip stays at the instruction
            raise OracleError(f"unexpected interrupt {state['intr']}")
        exception = {"vector": state["intr"], "error_code": None}

    eip = uc.reg_read(_uc_reg("eip"))
    if exception is not None:
        # precise fault: the faulting instruction has no effect
        p = state["pending"]
        if p is not None and p[0] == eip:
            state["pending"] = None
            state["count"] -= 1
        apply_pending()
    else:
        apply_pending()
        last = state["last"]
        if last is None or last[1] != "hlt" or eip != last[0] + 1:
            raise OracleError(f"did not stop at a HLT (eip={eip:#x}, last={last})")

    out_regs = {r: uc.reg_read(_uc_reg(r)) for r in REGS32}
    out_regs["eip"] = eip
    out_regs["eflags"] = uc.reg_read(_uc_reg("eflags"))
    final_ram = {}
    for a0, blob in _runs(dict.fromkeys(set(ram) | written, 0)):
        for i, b in enumerate(uc.mem_read(a0, len(blob))):
            final_ram[a0 + i] = b
    res = {
        "expected": {"regs": out_regs, "ram": ram_pairs(final_ram), "exception": exception},
        "flags_mask": COMPARED_FLAGS & ~state["undef"],
        "oracle": {"name": ORACLE_NAME, "version": unicorn.__version__},
        "instructions": state["count"],
        "accessed": accessed,
    }
    if state["undef_regs"]:
        res["regs_mask"] = {k: 0xFFFFFFFF & ~v for k, v in sorted(state["undef_regs"].items())}
    return res


def _runs(ram: dict[int, int]):
    """Contiguous (start, bytes) runs of a sparse memory dict."""
    start, buf, prev = None, bytearray(), None
    for a in sorted(ram):
        if prev is not None and a == prev + 1:
            buf.append(ram[a])
        else:
            if start is not None:
                yield start, bytes(buf)
            start, buf = a, bytearray([ram[a]])
        prev = a
    if start is not None:
        yield start, bytes(buf)


def annotate(case, strict: bool = True):
    """Return a copy of ``case`` carrying expected/flags_mask/regs_mask/oracle."""
    r = run_unicorn(case, strict=strict)
    out = dict(case)
    out["expected"] = r["expected"]
    out["flags_mask"] = r["flags_mask"]
    if "regs_mask" in r:
        out["regs_mask"] = r["regs_mask"]
    else:
        out.pop("regs_mask", None)
    out["oracle"] = r["oracle"]
    return out


# --------------------------------------------------------------------------
# Comparison
# --------------------------------------------------------------------------

def compare(case, result) -> list[str]:
    """Compare a btvm result with ``case["expected"]``; return mismatches.

    EFLAGS is compared under ``flags_mask``; a register in ``regs_mask``
    under its mask.  Memory is compared by value over the union of the
    expected and the reported addresses (a missing address reads as its
    initial value, or 0); every initial.ram address must be reported.  The
    exception (vector, error code) must match.  ``instructions`` is not
    compared.
    """
    exp = case["expected"]
    out: list[str] = []
    if not isinstance(result, dict) or "final" not in result:
        return [f"malformed result: {result!r:.200}"]
    final = result.get("final") or {}
    got_regs = final.get("regs") or {}
    regs_mask = case.get("regs_mask", {})
    for r in ALL_REGS:
        e = exp["regs"][r]
        if r not in got_regs:
            out.append(f"{r}: missing from result")
            continue
        g = int(got_regs[r]) & 0xFFFFFFFF
        if r == "eflags":
            m = case.get("flags_mask", COMPARED_FLAGS)
            diff = (e ^ g) & m
            if diff:
                out.append(f"eflags: expected {e:#x} got {g:#x} (mask {m:#x}; differ in {flag_names(diff)})")
        else:
            m = regs_mask.get(r, 0xFFFFFFFF)
            if (e ^ g) & m:
                out.append(f"{r}: expected {e:#x} got {g:#x}" + (f" (mask {m:#x})" if m != 0xFFFFFFFF else ""))
    init = ram_dict(case["initial"]["ram"])
    exp_ram = ram_dict(exp["ram"])
    try:
        got_ram = ram_dict(final.get("ram") or [])
    except (TypeError, ValueError):
        return out + ["final.ram malformed"]
    missing = [a for a in init if a not in got_ram]
    if missing:
        out.append(f"final.ram lacks {len(missing)} initial address(es), first {min(missing):#x}")
    nbad = 0
    for a in sorted(set(exp_ram) | set(got_ram)):
        e = exp_ram.get(a, init.get(a, 0))
        g = got_ram.get(a, init.get(a, 0))
        if e != g:
            nbad += 1
            if nbad <= 8:
                out.append(f"ram[{a:#x}]: expected {e:#04x} got {g:#04x}")
    if nbad > 8:
        out.append(f"... {nbad - 8} more ram mismatches")
    ee, ge = exp.get("exception"), result.get("exception")
    norm = lambda x: None if x is None else (x.get("vector"), x.get("error_code"))
    if norm(ee) != norm(ge):
        out.append(f"exception: expected {ee} got {ge}")
    return out

"""The snippet runner behind `btvm exec CASE.json`: one case in the SingleStepTests layout.

Memory is a flat, zero-filled 32-bit space holding the case's bytes; CS, DS,
ES and SS are flat ring-0 segments.  Execution stops at HLT (eip after it), at
an exception (state as at the faulting instruction) or after max_instructions.
"""
import json

from bt import state as S
from .cpu import CPU, Stop, GuestFault
from .cpuid import handle_cpuid
from .memory import GuestMemory, RWX

REGS = ("eax", "ebx", "ecx", "edx", "esi", "edi", "ebp", "esp", "eip", "eflags")
DEFAULT_MAX = 1_000_000
GP = 13


class CaseError(Exception):
    """A malformed case (reported as one line by the CLI)."""


def _u32(where, v):
    if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v <= 0xFFFFFFFF:
        raise CaseError(f"{where}: expected an integer in 0..0xffffffff, got {v!r}")
    return v


def parse_case(case):
    """Validate a case dict; returns (regs, ram, max_instructions)."""
    if not isinstance(case, dict):
        raise CaseError("a case must be a JSON object")
    mode = case.get("mode", 32)
    if mode != 32:
        raise CaseError(f"mode {mode!r} is not supported (only 32)")
    init = case.get("initial")
    if not isinstance(init, dict):
        raise CaseError("missing 'initial' object")
    regs_in = init.get("regs", {})
    if not isinstance(regs_in, dict):
        raise CaseError("'initial.regs' must be an object")
    unknown = sorted(set(regs_in) - set(REGS))
    if unknown:
        raise CaseError(f"unknown register name(s): {', '.join(map(str, unknown))}")
    regs = {r: _u32(f"initial.regs.{r}", v) for r, v in regs_in.items()}
    ram_in = init.get("ram", [])
    if not isinstance(ram_in, list):
        raise CaseError("'initial.ram' must be a list of [address, byte] pairs")
    ram = []
    for i, pair in enumerate(ram_in):
        if not isinstance(pair, list) or len(pair) != 2:
            raise CaseError(f"initial.ram[{i}]: expected [address, byte]")
        addr = _u32(f"initial.ram[{i}] address", pair[0])
        b = pair[1]
        if isinstance(b, bool) or not isinstance(b, int) or not 0 <= b <= 255:
            raise CaseError(f"initial.ram[{i}]: byte out of range: {b!r}")
        ram.append((addr, b))
    mx = case.get("max_instructions", DEFAULT_MAX)
    if isinstance(mx, bool) or not isinstance(mx, int) or mx < 0:
        raise CaseError(f"max_instructions must be a non-negative integer, got {mx!r}")
    return regs, ram, mx


def _hlt(cpu, insn):
    cpu.set_reg("eip", insn.next)
    raise Stop("hlt")


def _int(cpu, insn):
    # Software interrupts are traps: reported with eip after the instruction.
    vector = cpu.st.callout_arg
    if insn.mnemonic == "into" and not cpu.reg("eflags") & (1 << S.OF):
        cpu.set_reg("eip", insn.next)
        return
    cpu.set_reg("eip", insn.next)
    raise Stop("exception", vector=vector, error=None)


def _rdtsc(cpu, insn):
    tsc = cpu.icount
    cpu.set_reg("eax", tsc & 0xFFFFFFFF)
    cpu.set_reg("edx", tsc >> 32)
    cpu.set_reg("eip", insn.next)


def _intflag(cpu, insn):
    ef = cpu.reg("eflags")
    ef = ef | (1 << S.IF) if insn.mnemonic == "sti" else ef & ~(1 << S.IF)
    cpu.set_reg("eflags", ef)
    cpu.set_reg("eip", insn.next)


def _io(cpu, insn):
    # No devices on a snippet machine: reads float high (open bus), writes are dropped.
    if insn.mnemonic == "in":
        dst = insn.ops[0]
        cpu.set_reg("eax", cpu.reg("eax") | ((1 << (8 * dst.size)) - 1))
        cpu.set_reg("eip", insn.next)
    elif insn.mnemonic == "out":
        cpu.set_reg("eip", insn.next)
    else:
        raise Stop("unsupported", message=f"string I/O '{insn.text()}' on the snippet machine", eip=insn.addr)


CALLOUTS = {"hlt": _hlt, "int": _int, "cpuid": handle_cpuid, "rdtsc": _rdtsc, "intflag": _intflag, "io": _io}


class Snippet:
    """A flat ring-0 machine for running one piece of code (reusable API under run_case)."""

    def __init__(self, trace_writes=True):
        self.mem = GuestMemory(default_perm=RWX)
        self.cpu = CPU(self.mem, S.make_key(cpl=0), trace_writes=trace_writes)
        self.cpu.callouts.update(CALLOUTS)

    def close(self):
        self.mem.close()


def run_case(case, trace_writes=True):
    """Run a case dict; returns {"final": {"regs", "ram"}, "exception", "instructions"}."""
    regs, ram, max_insns = parse_case(case)
    sn = Snippet(trace_writes)
    try:
        cpu = sn.cpu
        for addr, b in ram:
            sn.mem.write(addr, bytes([b]))
        for r, v in regs.items():
            cpu.set_reg(r, v)
        stop = cpu.run(max_insns)
        exception = None
        if stop.reason == "exception":
            err = stop.info.get("error")
            exception = {"vector": stop.info["vector"], "error_code": err}
        elif stop.reason == "unsupported":
            raise CaseError(f"btvm cannot run this case: {stop.info.get('message')}")
        addrs = sorted({a for a, _ in ram} | cpu.written)
        final_ram = [[a, sn.mem.read(a, 1)[0]] for a in addrs]
        return {"final": {"regs": {r: cpu.reg(r) for r in REGS}, "ram": final_ram},
                "exception": exception, "instructions": cpu.icount}
    finally:
        sn.close()


def load_case_file(path):
    try:
        with open(path) as f:
            return json.load(f)
    except FileNotFoundError:
        raise CaseError(f"{path}: no such file")
    except IsADirectoryError:
        raise CaseError(f"{path}: is a directory")
    except json.JSONDecodeError as exc:
        raise CaseError(f"{path}: malformed JSON ({exc.msg} at line {exc.lineno})")
    except UnicodeDecodeError:
        raise CaseError(f"{path}: not a text file")

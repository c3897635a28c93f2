"""Shared helpers for tests that assemble code and compare btvm with Unicorn."""
from keystone import Ks, KS_ARCH_X86, KS_MODE_32

from corpus.oracle import run_unicorn, compare

CODE = 0x1000
_ks = Ks(KS_ARCH_X86, KS_MODE_32)


def asm(text, addr=CODE):
    enc, _ = _ks.asm(text, addr)
    return bytes(enc)


def make_case(code, regs=None, data=None, max_instructions=100000, addr=CODE):
    """A case with code at addr, an 8 KiB stack below 0x9000 and optional data bytes {addr: bytes}."""
    r = {"eax": 0, "ebx": 0, "ecx": 0, "edx": 0, "esi": 0, "edi": 0, "ebp": 0,
         "esp": 0x9000, "eip": addr, "eflags": 2}
    r.update(regs or {})
    ram = {addr + i: b for i, b in enumerate(code)}
    for a in range(0x7000, 0x9000):
        ram.setdefault(a, 0)
    for base, blob in (data or {}).items():
        for i, b in enumerate(blob):
            ram[base + i] = b
    return {"name": "t", "mode": 32, "initial": {"regs": r, "ram": sorted([a, b] for a, b in ram.items())},
            "max_instructions": max_instructions}


def oracle_mismatches(case, result):
    """Annotate case with Unicorn's expectation and compare btvm's result with it."""
    case = dict(case)
    case.update(run_unicorn(case, strict=False))
    return compare(case, result)

"""The semantics table: one small function per mnemonic, registered with its metadata.

A semantics function has the signature ``fn(e, insn)`` where ``e`` is the
block emitter (bt.emit.Emitter) and ``insn`` a normalized instruction
(bt.decode.Insn).  The registration records, once, what the dispatcher, the
block builder, the sensitive-instruction table and the coverage report need.
"""
from dataclasses import dataclass

from capstone import x86 as X


class Unsupported(Exception):
    """An instruction with no semantics: named, never silently skipped."""


@dataclass
class SemInfo:
    mnemonic: str
    fn: object
    ends_block: bool = False
    lockable: bool = False
    flags_read: str = ""
    flags_written: str = ""
    undefined_flags: str = ""   # flags the SDM leaves undefined (masked by oracles)
    callout: str = ""           # non-empty: a sensitive/privileged instruction handled by the VMM
    why: str = ""               # why it is sensitive or privileged
    does: str = ""              # what the callout does
    # A REP form may leave mid-way (budget spent, a fault) and resume at its own address: it
    # starts a block, so that resuming finds a block that exists (and is in the disk cache).
    resumable: bool = False


CALLOUT_INFO = {}   # callout name -> why, does, mnemonics (filled by system.py)
TABLE = {}      # capstone instruction id -> SemInfo
BY_NAME = {}    # mnemonic -> SemInfo


def insn_id(mnemonic):
    return getattr(X, "X86_INS_" + mnemonic.upper())


def sem(*mnemonics, **meta):
    """Register fn as the semantics of each mnemonic (Capstone spelling)."""
    def register(fn):
        for m in mnemonics:
            info = SemInfo(m, fn, **meta)
            TABLE[insn_id(m)] = info
            BY_NAME[m] = info
        return fn
    return register


def lookup(insn):
    info = TABLE.get(insn.id)
    if info is None:
        raise Unsupported(f"no semantics for '{insn.text()}' at {insn.addr:#x}")
    return info


def _ends(info):
    return info is None or info.ends_block


def _resumable(info):
    return info is not None and info.resumable


def ends_block(insn):
    return _ends(TABLE.get(insn.id))


def starts_block(insn):
    """Whether an instruction must begin a block (see SemInfo.resumable)."""
    return bool(insn.rep) and _resumable(TABLE.get(insn.id))


_RULES = None


def block_rules():
    """ends_block and starts_block as a bt.decode.BlockRules, for decoding a block in one native
    call (made once: every family registered when this package was imported)."""
    global _RULES
    if _RULES is None:
        from ..decode import RULE_ENDS, RULE_RESUMABLE, BlockRules
        _RULES = BlockRules((RULE_ENDS if _ends(TABLE.get(i)) else 0) | (RULE_RESUMABLE if _resumable(TABLE.get(i)) else 0)
                            for i in range(X.X86_INS_ENDING))
    return _RULES


def load_all():
    """Import every family module so their registrations run."""
    from . import alu, move, muldiv, shift, bits, bcd, control, string, flagops, system, checks, x87  # noqa: F401


load_all()

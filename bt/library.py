"""The prebuilt stencil library: tier 1's stencils for common instruction forms, compiled ahead
of any guest by `btvm prebuild`, as a compiled translator ships its code generator.

bt/library.txt lists the forms (tools/gen_library.py chose them, by the rules in its docstring,
from gcc's static C library and enumerations of the ISA: no guest's code).  Each is made a stencil in each of MODES, with every page decision a block's
last instruction can have, together with the block heads and tails of those modes; the
stencils go to the stencil store (bt.stencil.Store) of the translation cache's folder, keyed
by the translator version like any other, so a later run compiles only the shapes the library
lacks (after an update of btvm's translator, until `btvm prebuild` runs again, it compiles them
all on demand as before).  The runtime's own fixed functions (entry trampoline, decoder, assembler, TLB refills)
are compiled into the same folder.
"""
import time
from pathlib import Path

from . import decode, state as S
from .semantics import ends_block
from .stencil import HeadShape, TailShape
from .translate import TABLE

FORMS = Path(__file__).with_name("library.txt")

# The modes the library is made for: a user-mode program under `btvm run`, and a 32-bit
# protected-mode kernel with CR0.MP set (as an OS with an FPU sets it) before and after it
# enables paging, with FS usable as a flat segment or not, and the user mode under it.
_MP = S.KEY_FPU_MP
MODES = (S.make_key(cpl=3),
         S.make_key(cpl=0) | _MP, S.make_key(cpl=0, fs_full=False) | _MP,
         S.make_key(pg=True, cpl=0) | _MP, S.make_key(pg=True, cpl=0, fs_full=False) | _MP,
         S.make_key(pg=True, cpl=3, fs_full=False) | _MP, S.make_key(pg=True, cpl=3) | _MP,
         S.make_key(cpl=0))

# A block's last instruction is made at these places (its address, its block's start), a
# relative branch's displacement set to _REL first: between them every combination of "the next
# instruction is off the block's page" and "the target is" (no, both, the target only, the
# next only: bt.stencil.InsnShape.cross).
_REL = -0x30


def _places(size):
    return ((0x1800, 0x1000), (0x1800, 0x0000), (0x1000, 0x1000), (0x2000 - size, 0x1000))


def read_forms(path=FORMS):
    """The library's instruction forms: a list of instruction bytes.  Raises OSError, or
    ValueError naming the line that is not hex bytes."""
    out = []
    for n, line in enumerate(Path(path).read_text().splitlines(), 1):
        line = line.strip()
        if line and not line.startswith("#"):
            try:
                out.append(bytes.fromhex(line.split()[0]))
            except ValueError:
                raise ValueError(f"{path}:{n}: not an instruction's hex bytes") from None
    return out


def _decode(raw, at):
    return next(decode.disasm(raw, at, 1), None)


def _with_rel(insn, rel):
    """insn's bytes with its relative displacement (its last 4, 2 or 1 bytes) set to rel."""
    raw = insn.raw
    for width in (4, 2, 1):
        new = raw[:-width] + (rel & ((1 << 8 * width) - 1)).to_bytes(width, "little")
        i = _decode(new, insn.addr)
        if i is not None and i.size == insn.size and i.id == insn.id and i.ops[0].imm & 0xFFFFFFFF == (insn.next + rel) & 0xFFFFFFFF:
            return new
    return raw


def shapes(library, forms, modes=MODES):
    """The shapes to make stencils of: each form in each mode (and its page decisions where it
    can end a block under paging), and the block heads and tails of each mode."""
    out = {}
    for mode in modes:
        for hot in (False, True):
            for count in (False, True):
                sh = HeadShape(mode, hot, count)
                out.setdefault(sh.key, sh)
        for cross in (False, True):
            sh = TailShape(mode, cross)
            out.setdefault(sh.key, sh)
    for raw in forms:
        insn = _decode(raw, 0x1800)
        if insn is None or insn.id not in TABLE or insn.size != len(raw):
            continue
        places = _places(insn.size) if ends_block(insn) else _places(insn.size)[:1]
        if insn.relative and len(insn.ops) == 1 and insn.ops[0].kind == "imm":
            raw = _with_rel(insn, _REL)
        for mode in modes:
            for at, block in (places if mode & S.KEY_PG else places[:1]):
                i = _decode(raw, at)
                sh = library.shape(i, mode, block)
                out.setdefault(sh.key, sh)
    return list(out.values())


def runtime_functions():
    """Compile (or load) the runtime's fixed functions into the cache folder."""
    from runtime import cpu, native_refill
    from . import assemble
    decode._native()
    assemble._compiled()
    cpu._native_enter()
    for f in (native_refill.load_refill_address, native_refill.sys_load_refill_address,
              native_refill.sys_store_refill_address, native_refill.invlpg_address,
              native_refill.walk, native_refill.drop_writes):
        f()


def prebuild(library, forms=None, modes=MODES, batch=128, progress=None):
    """Make the library's stencils in library (a bt.stencil.Library with a store), compiling
    those the store lacks, and write them out.  progress(done, total) is called per batch.
    Returns (shapes, compiled now, seconds)."""
    t0 = time.perf_counter()
    todo = shapes(library, read_forms() if forms is None else forms, modes)
    before = library.compiled
    for i in range(0, len(todo), batch):
        library.get(todo[i:i + batch])
        if progress:
            progress(min(i + batch, len(todo)), len(todo))
    if library.store is not None:
        library.store.flush()
    return len(todo), library.compiled - before, time.perf_counter() - t0

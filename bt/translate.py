"""Decoded block -> LLVM IR function text, through the semantics table."""
from .decode import Block
from .emit import Emitter
from .semantics import TABLE, Unsupported

UD = 6


def _lock_ok(insn, info):
    return info.lockable and insn.ops and insn.ops[0].kind == "mem"


def translate_block(block, name, mt):
    """Append the function for `block` to ModuleText mt; returns the (possibly shortened) block.

    A block whose instruction k has no semantics is cut before k (the next
    block then starts with it, and translating that one raises Unsupported
    naming the instruction): the earlier instructions still run.
    """
    insns = block.insns
    for k, insn in enumerate(insns):
        if insn.id not in TABLE:
            if k == 0:
                TABLE.get(insn.id) or _raise_unsupported(insn)
            block = _cut(block, k)
            break
    try:
        return _emit(block, name, mt)
    except Unsupported as exc:
        k = getattr(exc, "index", 0)
        if k == 0:
            raise
        return _emit(_cut(block, k), name, mt)


def _raise_unsupported(insn):
    raise Unsupported(f"no semantics for '{insn.text()}' ({insn.raw.hex()}) at {insn.addr:#x}")


def _cut(block, k):
    b = Block(block.eip, block.key, block.insns[:k], "cut")
    return b


def emit_insn(e, k, insn):
    """Emit instruction k of e's block through the semantics table (bt.stencil emits one
    instruction at a time with this too)."""
    info = TABLE[insn.id]
    e.begin_insn(k, insn)
    try:
        if insn.lock and not _lock_ok(insn, info):
            e.raise_now(UD)
        else:
            info.fn(e, insn)
    except Unsupported as exc:
        exc.index = k
        raise
    e.end_insn()


def _emit(block, name, mt):
    e = Emitter(name, block, block.key, mt)
    for k, insn in enumerate(block.insns):
        emit_insn(e, k, insn)
        if e.terminated:
            break
    if not e.terminated:
        e.exit_direct(block.end)
    mt.functions.append(e.text())
    e.block = block
    return block, e.slots


def static_successors(block):
    """Guest addresses a block may continue at that are known at translation time."""
    if not block.insns:
        return []
    last = block.insns[-1]
    info = TABLE.get(last.id)
    if info is None or not info.ends_block or block.stop_reason:
        return [block.end & 0xFFFFFFFF]     # a block that ends at the top goes on at 0
    out = []
    groups = set(last.groups)
    if info.callout:
        # Execution continues after most callouts (INT 0x80, CPUID, I/O), not after these.
        return [] if info.callout in ("hlt", "iret", "farjump", "sysenter") else [last.next]
    if last.ops and last.ops[0].kind == "imm" and (1 in groups or 2 in groups or last.relative):
        target = last.ops[0].imm & (0xFFFF if last.opsize == 2 else 0xFFFFFFFF)
        out.append(target)
        if last.mnemonic != "jmp":
            out.append(last.next)
    elif 2 in groups:           # indirect call: the return address
        out.append(last.next)
    return out

"""bt.decode reads Capstone's C structures itself (the binding's objects are slow): every field
it takes must match what the binding reports for the same bytes."""
import random

import capstone
from capstone import x86 as X

from bt import decode
from bt.decode import Op, _mem_operand, _reg_operand


def _expected(ci, bits):
    """The Insn fields as read through Capstone's Python binding."""
    ops = []
    for o in ci.operands:
        if o.type == X.X86_OP_REG:
            ops.append(_reg_operand(o.reg, o.size))
        elif o.type == X.X86_OP_IMM:
            ops.append(Op("imm", o.size or 1, imm=o.imm))
        else:
            m = o.mem
            seg_override = decode._SEG_PREFIX.get(ci.prefix[1])
            ops.append(Op("mem", o.size, mem=_mem_operand(m.segment, m.base, m.index, m.scale, m.disp,
                                                           ci.addr_size, seg_override)))
    wide = ci.prefix[2] == 0x66
    return (ci.address, ci.size, bytes(ci.bytes), ci.id, ci.mnemonic, ci.op_str, tuple(ops),
            ci.prefix[0] if ci.prefix[0] in (0xF2, 0xF3) else 0, ci.prefix[0] == 0xF0,
            (2 if wide else 4) if bits == 32 else (4 if wide else 2), ci.addr_size,
            decode._SEG_PREFIX.get(ci.prefix[1]), tuple(ci.groups))


def _fields(i):
    return (i.addr, i.size, i.raw, i.id, i.mnemonic, i.op_str, i.ops, i.rep, i.lock, i.opsize,
            i.addrsize, i.seg_override, i.groups)


def test_decoder_matches_the_capstone_binding():
    rng = random.Random(5)
    common = [b"\x8b\x44\x24\x08", b"\xf3\xa5", b"\x66\x89\x18", b"\x0f\xb6\xc4", b"\xe8\x00\x01\x00\x00",
              b"\x64\xa1\x14\x00\x00\x00", b"\xf0\x0f\xb1\x0a", b"\xc1\xe0\x04", b"\xd1\xe8", b"\x8e\xd8",
              b"\x0f\x22\xc0", b"\xdd\x04\x24", b"\x26\x67\x8b\x07", b"\xcd\x80", b"\xc2\x08\x00"]
    seen = 0
    for bits, mode in ((32, capstone.CS_MODE_32), (16, capstone.CS_MODE_16)):
        cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
        cs.detail = True
        blobs = common + [bytes(rng.randrange(256) for _ in range(24)) for _ in range(3000)]
        for blob in blobs:
            addr = rng.randrange(1 << 32)
            want = []
            try:
                for ci in cs.disasm(blob, addr, 8):
                    want.append(_expected(ci, bits))
            except decode.DecodeError:
                continue
            try:
                got = [_fields(i) for i in decode.disasm(blob, addr, 8, bits)]
            except decode.DecodeError:
                continue
            assert got == want, blob.hex()
            seen += len(got)
    assert seen > 10000


def test_relative_branches_met_again_match_the_binding_at_every_address():
    """A relative branch met before is rebuilt from its displacement (decode._SEEN): its target,
    operand, text and values must be what Capstone says at each new address, across the 4 GiB
    wrap, for targets Capstone prints in decimal, and for every operand and address size."""
    rng = random.Random(7)
    branches = [b"\xeb\x05", b"\xeb\xf0", b"\x74\x7f", b"\x7e\x80", b"\xe8\x00\x01\x00\x00",
                b"\xe9\xfb\xff\xff\xff", b"\x0f\x85\x00\x00\x00\x80", b"\x66\xe9\x00\x01",
                b"\x66\x0f\x84\xf0\xff", b"\xe2\xfe", b"\xe0\x10", b"\xe3\x02", b"\x67\xe3\xfe",
                b"\x66\xe8\x34\x12"]
    for bits, mode in ((32, capstone.CS_MODE_32), (16, capstone.CS_MODE_16)):
        cs = capstone.Cs(capstone.CS_ARCH_X86, mode)
        cs.detail = True
        for raw in branches:
            addrs = [0, 1, 0xFFFFFFF0, 0xFFFFFFFE, 0xFFFF, 0x7FFFFFFF] + [rng.randrange(1 << 32) for _ in range(40)]
            for addr in addrs:
                ci = next(cs.disasm(raw, addr), None)
                if ci is None:
                    continue
                for _ in range(2):
                    i, = decode.disasm(raw, addr, 1, bits)
                    assert _fields(i) == _expected(ci, bits), (raw.hex(), hex(addr))
                    assert i.relative and i.values == (i.ops[0].imm & 0xFFFFFFFF, 0, 0, 0)


def test_instructions_met_again_elsewhere_have_their_own_address():
    # Decoded instructions are remembered by their bytes (decode._SEEN): a relative branch's
    # target still comes from its own address, and every instruction keeps its address.
    for _ in range(2):
        for at in (0x1000, 0x5000):
            jmp, = decode.disasm(b"\xeb\x05", at, 1)
            load, = decode.disasm(b"\x8b\x43\x04", at, 1)
            assert (jmp.addr, jmp.ops[0].imm, jmp.next) == (at, at + 7, at + 2)
            assert (load.addr, load.next, load.ops[1].mem.disp) == (at, at + 3, 4)


def test_native_block_decoding_matches_the_python_loop():
    """decode_block with rules (one native call per block: btvm_decode) gives the blocks the
    Python loop over Capstone gives: same instructions and stop reason, at page ends, with the
    next page unreadable or cut short, with REP string instructions that must begin a block,
    in 16- and 32-bit code and single-stepping."""
    from bt import state as S
    from bt.semantics import block_rules, ends_block, starts_block
    rules = block_rules()
    rng = random.Random(11)
    pieces = [b"\x8b\x44\x24\x08", b"\xf3\xa5", b"\xf3\xa4", b"\xf2\xae", b"\x66\x89\x18", b"\x74\x05",
              b"\xe8\x00\x01\x00\x00", b"\x0f\x05", b"\x90", b"\xc3", b"\xcd\x80", b"\x0f\x0b"]
    keys = [S.make_key(cpl=3), S.make_key(cpl=0) | S.KEY_PG, S.make_key(cpl=3) | S.KEY_STEP, 0]
    for trial in range(3000):
        blob = b"".join(rng.choice(pieces) if rng.random() < 0.7 else bytes([rng.randrange(256)])
                        for _ in range(rng.randrange(1, 80)))
        base = 0x400000 + rng.choice([0, 0xF80, 0xFF0, 0xFFA])
        end = rng.choice([len(blob), 0x1000 - (base & 0xFFF) + rng.randrange(0, 16)])

        def fetch(a, n):
            o = a - base
            return blob[o:min(o + n, end)] if 0 <= o < end else b""
        key, eip = rng.choice(keys), base + rng.randrange(0, 8)
        want = decode.decode_block(fetch, eip, key, ends_block, starts_block=starts_block)
        got = decode.decode_block(fetch, eip, key, ends_block, starts_block=starts_block, rules=rules)
        assert [_fields(i) for i in got.insns] == [_fields(i) for i in want.insns], (trial, hex(eip))
        assert got.stop_reason == want.stop_reason, (trial, hex(eip))

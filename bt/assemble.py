"""Native assembly and installation of stencil recipes: bt.stencil's Pieces placed one after
the other (btvm_assemble), and a recipe copied into code memory and patched (btvm_install).

Assembling a block's recipe in Python cost ~20 us of a cold Linux boot's ~200 us per block
translated (a loop over every Piece's patches and references).  The same work is one call into
btvm_assemble, compiled once per machine with LLVM from the IR below (kept in the disk cache's
folder like the runtime's other fixed functions: bt.jit.JIT.compile_cached).

A Piece is handed over as a blob (blob()), little-endian:
  header (16 bytes): u32 code bytes, u16 patches, u16 references, u16 moves (0xFFFF: the piece
      cannot move), u16 chain slots, 4 bytes of padding;
  the code, padded to 8 bytes;
  patches, 16 bytes each: u32 offset, u8 size, u8 var, 2 bytes padding, i64 addend: the code at
      offset gets var + addend (its low size bytes);
  references, 16 bytes each: u32 offset, u8 size, u8 pc-relative, u8 base, u8 how, i64 value:
      a recipe reference (bt.stencil._CELL_REL) whose base moves by the chain slots before the
      piece (how 1), whose value moves by the piece's position (how 2), or by var how - 3;
  moves, 16 bytes each: u32 offset, u8 size, 3 bytes padding, i64 addend (bt.stencil._MOVE_REL).
Each part of a block has 8 vars (i64): an instruction's address, next address, instructions left
from it and after it, and its 4 operands' immediates or displacements (a relative branch's
target is its operand 0); a block head's address and length; a tail's target.
"""
import ctypes
import struct

NVARS = 8
_HEAD = struct.Struct("<IHHHHI")
_PATCH = struct.Struct("<IBBHq")
_REF = struct.Struct("<IBBBBq")
_MOVE = struct.Struct("<IB3xq")
NOT_MOVABLE = 0xFFFF


def blob(code, patches, refs, moves, nslots):
    """A Piece as btvm_assemble reads it: patches [(offset, size, var, addend)], refs [(offset,
    size, pc-relative, base, how, value)], moves [(offset, size, addend)] or None."""
    return b"".join([_HEAD.pack(len(code), len(patches), len(refs), NOT_MOVABLE if moves is None else len(moves),
                                nslots, 0),
                     code, bytes(-len(code) % 8)]
                    + [_PATCH.pack(off, size, var, 0, addend) for off, size, var, addend in patches]
                    + [_REF.pack(*r) for r in refs]
                    + [_MOVE.pack(*m) for m in moves or ()])


def address(data):
    """Where the bytes object data keeps its bytes (they never move while it lives)."""
    return ctypes.cast(ctypes.c_char_p(data), ctypes.c_void_p).value


_INSTALL_IR = r'''
declare void @llvm.memcpy.p0.p0.i64(ptr, ptr, i64, i1)

define internal i1 @btvm_store_sized(ptr %p, i8 %size, i64 %v) alwaysinline nounwind {
entry:
  switch i8 %size, label %bad [ i8 1, label %s1  i8 2, label %s2  i8 4, label %s4  i8 8, label %s8 ]
s1:
  %v1 = trunc i64 %v to i8
  store i8 %v1, ptr %p, align 1
  ret i1 true
s2:
  %v2 = trunc i64 %v to i16
  store i16 %v2, ptr %p, align 1
  ret i1 true
s4:
  %v4 = trunc i64 %v to i32
  store i32 %v4, ptr %p, align 1
  ret i1 true
s8:
  store i64 %v, ptr %p, align 1
  ret i1 true
bad:
  ret i1 false
}

define i32 @btvm_install(ptr %recipe, i64 %code_at, i64 %ncode, ptr %dst, ptr %bases, i64 %nslots, i64 %nrel,
                         i64 %rel_at, i64 %nmove, i64 %move_at, i64 %delta) nounwind {
entry:
  %i = alloca i64
  %src = getelementptr i8, ptr %recipe, i64 %code_at
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %src, i64 %ncode, i1 false)
  %addr = ptrtoint ptr %dst to i64
  store i64 0, ptr %i
  br label %mv.head
mv.head:
  %k = load i64, ptr %i
  %mdone = icmp uge i64 %k, %nmove
  br i1 %mdone, label %rel.init, label %mv.body
mv.body:
  %mo = mul i64 %k, 13
  %mo1 = add i64 %mo, %move_at
  %me = getelementptr i8, ptr %recipe, i64 %mo1
  %moff32 = load i32, ptr %me, align 1
  %moff = zext i32 %moff32 to i64
  %msz.p = getelementptr i8, ptr %me, i64 4
  %msz = load i8, ptr %msz.p, align 1
  %mad.p = getelementptr i8, ptr %me, i64 5
  %madd = load i64, ptr %mad.p, align 1
  %msz64 = zext i8 %msz to i64
  %mend = add i64 %moff, %msz64
  %min = icmp ule i64 %mend, %ncode
  %m4 = icmp eq i8 %msz, 4
  %m8 = icmp eq i8 %msz, 8
  %m48 = or i1 %m4, %m8
  %mok = and i1 %min, %m48
  br i1 %mok, label %mv.do, label %bad
mv.do:
  %mp = getelementptr i8, ptr %dst, i64 %moff
  br i1 %m4, label %mv.4, label %mv.8
mv.4:
  %mv4 = load i32, ptr %mp, align 1
  %mv4z = zext i32 %mv4 to i64
  br label %mv.moved
mv.8:
  %mv8 = load i64, ptr %mp, align 1
  br label %mv.moved
mv.moved:
  %mv = phi i64 [ %mv4z, %mv.4 ], [ %mv8, %mv.8 ]
  %ma = sub i64 %mv, %madd
  %mb = add i64 %ma, %delta
  %mc = and i64 %mb, 4294967295
  %md = add i64 %mc, %madd
  %mstored = call i1 @btvm_store_sized(ptr %mp, i8 %msz, i64 %md)
  %kn = add i64 %k, 1
  store i64 %kn, ptr %i
  br label %mv.head
rel.init:
  store i64 0, ptr %i
  br label %rel.head
rel.head:
  %r = load i64, ptr %i
  %rdone = icmp uge i64 %r, %nrel
  br i1 %rdone, label %done, label %rel.body
rel.body:
  %ro = mul i64 %r, 15
  %ro1 = add i64 %ro, %rel_at
  %re = getelementptr i8, ptr %recipe, i64 %ro1
  %roff32 = load i32, ptr %re, align 1
  %roff = zext i32 %roff32 to i64
  %rsz.p = getelementptr i8, ptr %re, i64 4
  %rsz = load i8, ptr %rsz.p, align 1
  %rpc.p = getelementptr i8, ptr %re, i64 5
  %rpc = load i8, ptr %rpc.p, align 1
  %rwh.p = getelementptr i8, ptr %re, i64 6
  %rwh = load i8, ptr %rwh.p, align 1
  %rad.p = getelementptr i8, ptr %re, i64 7
  %radd = load i64, ptr %rad.p, align 1
  %rsz64 = zext i8 %rsz to i64
  %rend = add i64 %roff, %rsz64
  %rin = icmp ule i64 %rend, %ncode
  %which = zext i8 %rwh to i64
  %isslot = icmp ult i64 %which, %nslots
  %isfixed = icmp uge i8 %rwh, -4
  %known = or i1 %isslot, %isfixed
  %rok = and i1 %rin, %known
  br i1 %rok, label %rel.base, label %bad
rel.base:
  %bp = getelementptr i64, ptr %bases, i64 %which
  %base = load i64, ptr %bp
  %iscell0 = icmp eq i8 %rwh, -4
  %iscell1 = icmp eq i8 %rwh, -3
  %iscell = or i1 %iscell0, %iscell1
  %nobase = icmp eq i64 %base, 0
  %missing = and i1 %iscell, %nobase
  br i1 %missing, label %bad, label %rel.do
rel.do:
  %v0 = add i64 %base, %radd
  %at = add i64 %addr, %roff
  %pcrel = icmp ne i8 %rpc, 0
  %vpc = sub i64 %v0, %at
  %v = select i1 %pcrel, i64 %vpc, i64 %v0
  %rp = getelementptr i8, ptr %dst, i64 %roff
  %stored = call i1 @btvm_store_sized(ptr %rp, i8 %rsz, i64 %v)
  br i1 %stored, label %rel.next, label %bad
rel.next:
  %rn = add i64 %r, 1
  store i64 %rn, ptr %i
  br label %rel.head
done:
  ret i32 0
bad:
  ret i32 1
}
'''


_FNS = None


def _compiled():
    """{name: address} of btvm_assemble and btvm_install: one module (they share the sized
    store), compiled once per machine and kept like the runtime's fixed functions."""
    global _FNS
    if _FNS is None:
        from .jit import ModuleText, shared_jit
        mt = ModuleText("btvm_assemble")
        mt.functions.append(_INSTALL_IR + _ASSEMBLE_IR)
        _FNS, _ = shared_jit().compile_cached(mt, ["btvm_assemble", "btvm_install"])
    return _FNS


class Installer:
    """Calls btvm_install: a recipe's code copied to its place in code memory, its moving values
    moved by delta and its references to cells and to its own code patched.  Everything it
    writes is bounds-checked against the code's size: a recipe may come from the disk cache."""

    def __init__(self):
        i64 = ctypes.c_int64
        self._fn = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_char_p, i64, i64, ctypes.c_void_p, ctypes.c_void_p,
                                    i64, i64, i64, i64, i64, i64)(_compiled()["btvm_install"])
        self.bases = (ctypes.c_int64 * 256)()       # chain slot i's cell at i; 252-255 as stencil._HOT...

    def __call__(self, recipe, code_at, ncode, dst, nslots, nrel, rel_at, nmove, move_at, delta):
        """0 if installed, 1 if the recipe is malformed (something then may have been written
        inside dst's ncode bytes, never outside them)."""
        return self._fn(recipe, code_at, ncode, dst, self.bases, nslots, nrel, rel_at, nmove, move_at, delta)


class Assembler:
    """Calls btvm_assemble with buffers of its own (one per user: not thread-safe)."""

    def __init__(self):
        self._fn = ctypes.CFUNCTYPE(ctypes.c_int64, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int32,
                                    ctypes.c_void_p, ctypes.c_int64)(_compiled()["btvm_assemble"])
        self._grow(128, 1 << 16)

    def _grow(self, parts, out):
        self._parts = (ctypes.c_uint64 * parts)()
        self._vars = (ctypes.c_int64 * (NVARS * parts))()
        self._out = ctypes.create_string_buffer(out)
        self._out_size = out

    def __call__(self, blobs, vars_):
        """The recipe (bytes) of the pieces at addresses blobs, vars_ their vars (NVARS each, flat;
        the pieces' Python objects must live until this returns)."""
        n, nv = len(blobs), len(vars_)      # vars_ may go on past the last part
        if n > len(self._parts) or nv > len(self._vars):
            self._grow(max(2 * n, nv // NVARS + 1), self._out_size)
        self._parts[:n] = blobs
        self._vars[:nv] = vars_
        got = self._fn(self._parts, self._vars, n, self._out, self._out_size)
        if got < 0:
            self._out = ctypes.create_string_buffer(2 * -got)
            self._out_size = 2 * -got
            got = self._fn(self._parts, self._vars, n, self._out, self._out_size)
        if got <= 0:
            raise ValueError("a block with too many chain slots")
        return ctypes.string_at(self._out, got)


_ASSEMBLE_IR = r'''
define i64 @btvm_assemble(ptr %parts, ptr %vars, i32 %n, ptr %out, i64 %cap) nounwind {
entry:
  %k = alloca i64
  %code = alloca i64
  %nrel = alloca i64
  %nmove = alloca i64
  %mov = alloca i1
  %ns = alloca i64
  %pos = alloca i64
  %i = alloca i64
  %relp = alloca ptr
  %movp = alloca ptr
  %n64 = zext i32 %n to i64
  store i64 0, ptr %k
  store i64 0, ptr %code
  store i64 0, ptr %nrel
  store i64 0, ptr %nmove
  store i1 true, ptr %mov
  store i64 0, ptr %ns
  br label %a.head
a.head:
  %ka = load i64, ptr %k
  %adone = icmp eq i64 %ka, %n64
  br i1 %adone, label %a.end, label %a.body
a.body:
  %pa = getelementptr ptr, ptr %parts, i64 %ka
  %ba = load ptr, ptr %pa
  %cla = load i32, ptr %ba
  %cla64 = zext i32 %cla to i64
  %nra.p = getelementptr i8, ptr %ba, i64 6
  %nra = load i16, ptr %nra.p
  %nra64 = zext i16 %nra to i64
  %nma.p = getelementptr i8, ptr %ba, i64 8
  %nma = load i16, ptr %nma.p
  %nma64 = zext i16 %nma to i64
  %nsa.p = getelementptr i8, ptr %ba, i64 10
  %nsa = load i16, ptr %nsa.p
  %nsa64 = zext i16 %nsa to i64
  %code0a = load i64, ptr %code
  %code1a = add i64 %code0a, %cla64
  store i64 %code1a, ptr %code
  %nrel0a = load i64, ptr %nrel
  %nrel1a = add i64 %nrel0a, %nra64
  store i64 %nrel1a, ptr %nrel
  %fixed = icmp eq i16 %nma, -1
  %mov0a = load i1, ptr %mov
  %notfixed = xor i1 %fixed, true
  %mov1a = and i1 %mov0a, %notfixed
  store i1 %mov1a, ptr %mov
  %addm = select i1 %fixed, i64 0, i64 %nma64
  %nm0a = load i64, ptr %nmove
  %nm1a = add i64 %nm0a, %addm
  store i64 %nm1a, ptr %nmove
  %ns0a = load i64, ptr %ns
  %ns1a = add i64 %ns0a, %nsa64
  store i64 %ns1a, ptr %ns
  %ka1 = add i64 %ka, 1
  store i64 %ka1, ptr %k
  br label %a.head
a.end:
  %mvf = load i1, ptr %mov
  %nmv = load i64, ptr %nmove
  %few = icmp ult i64 %nmv, 65535
  %movable = and i1 %mvf, %few
  %nmv.eff = select i1 %movable, i64 %nmv, i64 0
  %nsl = load i64, ptr %ns
  %toomany = icmp uge i64 %nsl, 252
  br i1 %toomany, label %bad, label %size
bad:
  ret i64 0
size:
  %nr = load i64, ptr %nrel
  %cd = load i64, ptr %code
  %r15 = mul i64 %nr, 15
  %m13 = mul i64 %nmv.eff, 13
  %t1 = add i64 %r15, %m13
  %t2 = add i64 %t1, %cd
  %need = add i64 %t2, 9
  %fits = icmp ule i64 %need, %cap
  br i1 %fits, label %write, label %grow
grow:
  %neg = sub i64 0, %need
  ret i64 %neg
write:
  %cd32 = trunc i64 %cd to i32
  store i32 %cd32, ptr %out, align 1
  %h4 = getelementptr i8, ptr %out, i64 4
  %nr16 = trunc i64 %nr to i16
  store i16 %nr16, ptr %h4, align 1
  %h6 = getelementptr i8, ptr %out, i64 6
  %ns8 = trunc i64 %nsl to i8
  store i8 %ns8, ptr %h6, align 1
  %h7 = getelementptr i8, ptr %out, i64 7
  %nmv16 = trunc i64 %nmv to i16
  %hm = select i1 %movable, i16 %nmv16, i16 -1
  store i16 %hm, ptr %h7, align 1
  %rel0 = getelementptr i8, ptr %out, i64 9
  %mov0 = getelementptr i8, ptr %rel0, i64 %r15
  %code0 = getelementptr i8, ptr %mov0, i64 %m13
  store ptr %rel0, ptr %relp
  store ptr %mov0, ptr %movp
  store i64 0, ptr %k
  store i64 0, ptr %pos
  store i64 0, ptr %ns
  br label %b.head
b.head:
  %kb = load i64, ptr %k
  %bdone = icmp eq i64 %kb, %n64
  br i1 %bdone, label %b.end, label %b.body
b.body:
  %pb = getelementptr ptr, ptr %parts, i64 %kb
  %bl = load ptr, ptr %pb
  %cl = load i32, ptr %bl
  %cl64 = zext i32 %cl to i64
  %npa.p = getelementptr i8, ptr %bl, i64 4
  %npa = load i16, ptr %npa.p
  %npa64 = zext i16 %npa to i64
  %nre.p = getelementptr i8, ptr %bl, i64 6
  %nre = load i16, ptr %nre.p
  %nre64 = zext i16 %nre to i64
  %nmo.p = getelementptr i8, ptr %bl, i64 8
  %nmo = load i16, ptr %nmo.p
  %nmo64 = zext i16 %nmo to i64
  %nsb.p = getelementptr i8, ptr %bl, i64 10
  %nsb = load i16, ptr %nsb.p
  %nsb64 = zext i16 %nsb to i64
  %src = getelementptr i8, ptr %bl, i64 16
  %posv = load i64, ptr %pos
  %dst = getelementptr i8, ptr %code0, i64 %posv
  call void @llvm.memcpy.p0.p0.i64(ptr %dst, ptr %src, i64 %cl64, i1 false)
  %cl7 = add i64 %cl64, 7
  %cl8 = and i64 %cl7, -8
  %tab = getelementptr i8, ptr %src, i64 %cl8
  %vbase = mul i64 %kb, 8
  %vk = getelementptr i64, ptr %vars, i64 %vbase
  %nsv = load i64, ptr %ns
  %nsv8 = trunc i64 %nsv to i8
  store i64 0, ptr %i
  br label %pa.head
pa.head:
  %ip = load i64, ptr %i
  %pdone = icmp eq i64 %ip, %npa64
  br i1 %pdone, label %re.init, label %pa.body
pa.body:
  %peo = mul i64 %ip, 16
  %pe = getelementptr i8, ptr %tab, i64 %peo
  %poff = load i32, ptr %pe
  %poff64 = zext i32 %poff to i64
  %psz.p = getelementptr i8, ptr %pe, i64 4
  %psz = load i8, ptr %psz.p
  %pvr.p = getelementptr i8, ptr %pe, i64 5
  %pvr = load i8, ptr %pvr.p
  %pvr64 = zext i8 %pvr to i64
  %pad.p = getelementptr i8, ptr %pe, i64 8
  %padd = load i64, ptr %pad.p
  %pv.p = getelementptr i64, ptr %vk, i64 %pvr64
  %pv = load i64, ptr %pv.p
  %pval = add i64 %pv, %padd
  %pat = getelementptr i8, ptr %dst, i64 %poff64
  %ipn = add i64 %ip, 1
  store i64 %ipn, ptr %i
  %pstored = call i1 @btvm_store_sized(ptr %pat, i8 %psz, i64 %pval)
  br label %pa.head
re.init:
  %pbytes = mul i64 %npa64, 16
  %rtab = getelementptr i8, ptr %tab, i64 %pbytes
  store i64 0, ptr %i
  br label %re.head
re.head:
  %ir = load i64, ptr %i
  %rdone = icmp eq i64 %ir, %nre64
  br i1 %rdone, label %mo.init, label %re.body
re.body:
  %reo = mul i64 %ir, 16
  %re = getelementptr i8, ptr %rtab, i64 %reo
  %roff = load i32, ptr %re
  %roff64 = zext i32 %roff to i64
  %rsz.p = getelementptr i8, ptr %re, i64 4
  %rsz = load i8, ptr %rsz.p
  %rpc.p = getelementptr i8, ptr %re, i64 5
  %rpc = load i8, ptr %rpc.p
  %rbs.p = getelementptr i8, ptr %re, i64 6
  %rbs = load i8, ptr %rbs.p
  %rhw.p = getelementptr i8, ptr %re, i64 7
  %rhw = load i8, ptr %rhw.p
  %rvl.p = getelementptr i8, ptr %re, i64 8
  %rvl = load i64, ptr %rvl.p
  %isslot = icmp eq i8 %rhw, 1
  %rbs.s = add i8 %rbs, %nsv8
  %rbase = select i1 %isslot, i8 %rbs.s, i8 %rbs
  %ispos = icmp eq i8 %rhw, 2
  %addpos = select i1 %ispos, i64 %posv, i64 0
  %isvar = icmp uge i8 %rhw, 3
  %rhw64 = zext i8 %rhw to i64
  %rvi0 = sub i64 %rhw64, 3
  %rvi = select i1 %isvar, i64 %rvi0, i64 0
  %rv.p = getelementptr i64, ptr %vk, i64 %rvi
  %rv = load i64, ptr %rv.p
  %addv = select i1 %isvar, i64 %rv, i64 0
  %rv1 = add i64 %rvl, %addpos
  %rvalue = add i64 %rv1, %addv
  %rp = load ptr, ptr %relp
  %rat = add i64 %posv, %roff64
  %rat32 = trunc i64 %rat to i32
  store i32 %rat32, ptr %rp, align 1
  %rp4 = getelementptr i8, ptr %rp, i64 4
  store i8 %rsz, ptr %rp4, align 1
  %rp5 = getelementptr i8, ptr %rp, i64 5
  store i8 %rpc, ptr %rp5, align 1
  %rp6 = getelementptr i8, ptr %rp, i64 6
  store i8 %rbase, ptr %rp6, align 1
  %rp7 = getelementptr i8, ptr %rp, i64 7
  store i64 %rvalue, ptr %rp7, align 1
  %rpn = getelementptr i8, ptr %rp, i64 15
  store ptr %rpn, ptr %relp
  %irn = add i64 %ir, 1
  store i64 %irn, ptr %i
  br label %re.head
mo.init:
  %rbytes = mul i64 %nre64, 16
  %mtab = getelementptr i8, ptr %rtab, i64 %rbytes
  store i64 0, ptr %i
  br i1 %movable, label %mo.head, label %b.next
mo.head:
  %im = load i64, ptr %i
  %mdone = icmp eq i64 %im, %nmo64
  br i1 %mdone, label %b.next, label %mo.body
mo.body:
  %meo = mul i64 %im, 16
  %me = getelementptr i8, ptr %mtab, i64 %meo
  %moff = load i32, ptr %me
  %moff64 = zext i32 %moff to i64
  %msz.p = getelementptr i8, ptr %me, i64 4
  %msz = load i8, ptr %msz.p
  %mad.p = getelementptr i8, ptr %me, i64 8
  %madd = load i64, ptr %mad.p
  %mp = load ptr, ptr %movp
  %mat = add i64 %posv, %moff64
  %mat32 = trunc i64 %mat to i32
  store i32 %mat32, ptr %mp, align 1
  %mp4 = getelementptr i8, ptr %mp, i64 4
  store i8 %msz, ptr %mp4, align 1
  %mp5 = getelementptr i8, ptr %mp, i64 5
  store i64 %madd, ptr %mp5, align 1
  %mpn = getelementptr i8, ptr %mp, i64 13
  store ptr %mpn, ptr %movp
  %imn = add i64 %im, 1
  store i64 %imn, ptr %i
  br label %mo.head
b.next:
  %posn = add i64 %posv, %cl64
  store i64 %posn, ptr %pos
  %nsn = add i64 %nsv, %nsb64
  store i64 %nsn, ptr %ns
  %kbn = add i64 %kb, 1
  store i64 %kbn, ptr %k
  br label %b.head
b.end:
  ret i64 %need
}
'''

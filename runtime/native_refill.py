"""Soft-MMU misses in native code: the TLB refills that need no decision of the runtime's.

Flat machines (user mode, snippets): every guest page lives at GuestMemory.base + address,
so a read TLB entry only says "this page is readable".  A read that misses the TLB used to
call back into Python (CPU._load_slow) just to look the page's permission up and refill the
entry: a direct-mapped TLB of 1,024 pages thrashes when a program walks several big arrays
whose pages share TLB slots (tools/bench_prog.c's LZ77: ~370,000 misses, a seventh of its
run).  btvm_load_refill reads the page's permission byte from GuestMemory.perm (a bytearray
that is never resized, so its buffer stays put), refills the entry and does the load.

System machines: btvm_sys_load_refill and btvm_sys_store_refill walk the guest's page
tables (runtime/system/paging.py's rules) when the walk needs no accessed or dirty bit set
and ends in RAM, and a store's page holds no translated code (a Linux boot: ~400,000 misses,
~1.5 s of Python, most of them in the kernel's direct map).

Anything else - a probe, a page-crossing access, a fault, an A/D bit to set, MMIO, a store
into code - goes on to the runtime's slow path, whose address the state holds in refill_slow
(refill_store_slow).
"""
import ctypes

from bt import state as S
from bt.jit import ModuleText, shared_jit

_fns = {}


def _fill(o, kind):
    """Entry (priv by %user, kind) of %addr's page gets its tag and %addend (host address minus
    guest address); %hp is then the host address of %addr."""
    return f"""fill:
  %first = select i1 %user, i64 {S.tlb_index(1, kind)}, i64 {S.tlb_index(0, kind)}
  %pg = lshr i32 %addr, 12
  %slot = and i32 %pg, {S.TLB_SIZE - 1}
  %slot64 = zext i32 %slot to i64
  %i = add i64 %first, %slot64
  %i16 = shl i64 %i, 4
  %eo = add i64 %i16, {o('tlb')}
  %ent = getelementptr i8, ptr %st, i64 %eo
  %tag = and i32 %addr, -4096
  store i32 %tag, ptr %ent
  %ap = getelementptr i8, ptr %ent, i64 8
  store i64 %addend, ptr %ap
  %a64 = zext i32 %addr to i64
  %h = add i64 %addend, %a64
  %hp = inttoptr i64 %h to ptr
"""


_SIZES = ((1, "i8"), (2, "i16"), (4, "i32"), (8, "i64"))
_CASES = " ".join(f"i32 {n}, label %by{n}" for n, _ in _SIZES)


def _load_tail(o):
    loads = "".join(f"""by{n}:
  %x{n} = load {t}, ptr %hp, align 1
{'' if t == 'i64' else f'  %z{n} = zext {t} %x{n} to i64' + chr(10)}  ret i64 {'%x8' if n == 8 else f'%z{n}'}
""" for n, t in _SIZES)
    return f"""{_fill(o, S.TLB_READ)}  switch i32 %size, label %py [ {_CASES} ]
{loads}py:
  %fpp = getelementptr i8, ptr %st, i64 {o('refill_slow')}
  %fp = load ptr, ptr %fpp
  %v = call i64 %fp(ptr %st, i32 %addr, i32 %size)
  ret i64 %v
"""


def _head(o, probes):
    """An access within one page (a load that is not a probe) and whether it is made at CPL 3
    (%user); on to %go, else to %py."""
    probe = """  %kind = and i32 %size, 768
  %plain = icmp eq i32 %kind, 0
  br i1 %plain, label %span, label %py
""" if probes else "  br label %span\n"
    return f"""entry:
{probe}span:
  %sz1 = add i32 %size, -1
  %last = add i32 %addr, %sz1
  %same = xor i32 %addr, %last
  %one = icmp ult i32 %same, 4096
  %kp = getelementptr i8, ptr %st, i64 {o('mode_key')}
  %key = load i32, ptr %kp
  %cpl0 = lshr i32 %key, {S.KEY_CPL_SHIFT}
  %cpl = and i32 %cpl0, 3
  %user = icmp eq i32 %cpl, 3
  %bpp = getelementptr i8, ptr %st, i64 {o('refill_base')}
  %base = load i64, ptr %bpp
  br i1 %one, label %go, label %py
"""


def _page_byte(o, field, at, out):
    """%out = the byte for %at's page in the per-page map that state.field points to."""
    return f"""  %{out}m = getelementptr i8, ptr %st, i64 {o(field)}
  %{out}t = load ptr, ptr %{out}m
  %{out}n = lshr i32 %{at}, 12
  %{out}n64 = zext i32 %{out}n to i64
  %{out}p = getelementptr i8, ptr %{out}t, i64 %{out}n64
  %{out} = load i8, ptr %{out}p
"""


def _ir():
    o = S.offset
    return f"""
define i64 @btvm_load_refill(ptr %st, i32 %addr, i32 %size) nounwind {{
{_head(o, True)}go:
{_page_byte(o, 'refill_perm', 'addr', 'bits')}  %r = and i8 %bits, 1
  %ok = icmp ne i8 %r, 0
  %addend = add i64 %base, 0
  br i1 %ok, label %fill, label %py
{_load_tail(o)}}}
"""


# Page-table entry bits (runtime/system/paging.py).
_P, _RW, _US, _A, _D, _PS = 1, 2, 4, 0x20, 0x40, 0x80


def _entry(e, at, need, then):
    """Page-table entry %e at guest-physical %at (in RAM), with every bit of %need set: on to then."""
    return f"""  %{e}a = zext i32 %{at} to i64
  %{e}end = add i64 %{e}a, 4
  %{e}in = icmp ule i64 %{e}end, %ram
  br i1 %{e}in, label %{e}ld, label %py
{e}ld:
  %{e}h = add i64 %base, %{e}a
  %{e}p = inttoptr i64 %{e}h to ptr
  %{e} = load i32, ptr %{e}p, align 4
  %{e}n = and i32 %{e}, %{need}
  %{e}ok = icmp eq i32 %{e}n, %{need}
  br i1 %{e}ok, label %{then}, label %py
"""


def _walk(o, write):
    """From %go: the page walk of runtime/system/paging.py for an access that needs no accessed
    or dirty bit set and raises no fault: on to %inram with %phys (the page) and %addend if the
    page is in RAM, else to %py.  A write also needs RW where CPL 3 or CR0.WP asks for it."""
    rights = f"""  %needu = select i1 %user, i32 {_P | _A | _US}, i32 {_P | _A}
"""
    if write:
        rights += f"""  %wp0 = and i32 %mode, {S.PG_WP}
  %wp = icmp ne i32 %wp0, 0
  %wchk = or i1 %user, %wp
  %rw = select i1 %wchk, i32 {_RW}, i32 0
  %need = or i32 %needu, %rw
  %needd = or i32 %need, {_D}
"""
    else:
        rights += """  %need = or i32 %needu, 0
  %needd = or i32 %need, 0
"""
    return f"""go:
  %mp = getelementptr i8, ptr %st, i64 {o('pg_mode')}
  %mode = load i32, ptr %mp
  %rp = getelementptr i8, ptr %st, i64 {o('ram_size')}
  %ram = load i64, ptr %rp
{rights}  %pgon = and i32 %mode, {S.PG_ON}
  %paged = icmp ne i32 %pgon, 0
  %flat = and i32 %addr, -4096
  br i1 %paged, label %pde, label %inram
pde:
  %dp = getelementptr i8, ptr %st, i64 {o('pg_dir')}
  %dir = load i32, ptr %dp
  %di = lshr i32 %addr, 22
  %do = shl i32 %di, 2
  %da = or i32 %dir, %do
{_entry("e1", "da", "need", "pde3")}pde3:
  %ps = and i32 %e1, {_PS}
  %pse = and i32 %mode, {S.PG_PSE}
  %big0 = icmp ne i32 %ps, 0
  %pse1 = icmp ne i32 %pse, 0
  %big = and i1 %big0, %pse1
  br i1 %big, label %large, label %pte
large:
  %e1d = and i32 %e1, %needd
  %e1dok = icmp eq i32 %e1d, %needd
  br i1 %e1dok, label %large2, label %py
large2:
  %lp = getelementptr i8, ptr %st, i64 {o('pg_large')}
  %lm = load ptr, ptr %lp
  %di64 = zext i32 %di to i64
  %lb = getelementptr i8, ptr %lm, i64 %di64
  store i8 1, ptr %lb
  %lhi = and i32 %e1, -4194304
  %llo = and i32 %addr, 4190208
  %lphys = or i32 %lhi, %llo
  br label %inram
pte:
  %tbase = and i32 %e1, -4096
  %ti0 = lshr i32 %addr, 12
  %ti = and i32 %ti0, 1023
  %to = shl i32 %ti, 2
  %ta = or i32 %tbase, %to
{_entry("e2", "ta", "needd", "small")}small:
  %sphys = and i32 %e2, -4096
  br label %inram
inram:
  %phys = phi i32 [ %flat, %go ], [ %lphys, %large2 ], [ %sphys, %small ]
  %leaf = phi i32 [ 0, %go ], [ %e1, %large2 ], [ %e2, %small ]
  %p64 = zext i32 %phys to i64
  %pend = add i64 %p64, 4096
  %pin = icmp ule i64 %pend, %ram
  %t64 = zext i32 %flat to i64
  %hb = add i64 %base, %p64
  %addend = sub i64 %hb, %t64
"""


def _sys_ir():
    """Loads of a system machine: the page walk, then as btvm_load_refill.  Entries filled here
    are not known to the TLB shadow (runtime/system/tlb.py): a global one is simply missed again
    after a CR3 write, which hardware may do too."""
    o = S.offset
    return f"""
define i64 @btvm_sys_load_refill(ptr %st, i32 %addr, i32 %size) nounwind {{
{_head(o, True)}{_walk(o, False)}  br i1 %pin, label %fill, label %py
{_load_tail(o)}}}
"""


def _sys_store_ir():
    """Stores of a system machine: the page walk (dirty and writable pages only), and a page
    without translated code (state.pg_code: those stores must reach the runtime, which drops the
    code they overwrite); then the write entry is filled and the store done."""
    o = S.offset
    stores = "".join(f"""by{n}:
{'' if t == 'i64' else f'  %v{n} = trunc i64 %val to {t}' + chr(10)}  store {t} {'%val' if t == 'i64' else f'%v{n}'}, ptr %hp, align 1
  ret void
""" for n, t in _SIZES)
    return f"""
define void @btvm_sys_store_refill(ptr %st, i32 %addr, i64 %val, i32 %size) nounwind {{
{_head(o, False)}{_walk(o, True)}  br i1 %pin, label %code, label %py
code:
{_page_byte(o, 'pg_code', 'phys', 'isc')}  %noc = icmp eq i8 %isc, 0
  br i1 %noc, label %fill, label %py
{_fill(o, S.TLB_WRITE)}  switch i32 %size, label %py [ {_CASES} ]
{stores}py:
  %fpp = getelementptr i8, ptr %st, i64 {o('refill_store_slow')}
  %fp = load ptr, ptr %fpp
  call void %fp(ptr %st, i32 %addr, i64 %val, i32 %size)
  ret void
}}
"""


def _walk_ir():
    """The page walk alone, for the runtime's own reads (SystemCPU.translate): paging on, %user
    from the caller.  Returns the physical page | 4, | 1 if it is global (G with CR4.PGE), | 2 if
    dirty; 0 where Python must walk (the same cases as the refills)."""
    o = S.offset
    return f"""
define i64 @btvm_walk(ptr %st, i32 %addr, i32 %userflag) nounwind {{
entry:
  %user = icmp ne i32 %userflag, 0
  %bpp = getelementptr i8, ptr %st, i64 {o('refill_base')}
  %base = load i64, ptr %bpp
  br label %go
{_walk(o, False)}  br i1 %pin, label %ok, label %py
ok:
  %g0 = and i32 %leaf, 256
  %pge0 = and i32 %mode, {S.PG_PGE}
  %g1 = icmp ne i32 %g0, 0
  %pge = icmp ne i32 %pge0, 0
  %glob = and i1 %g1, %pge
  %gb = select i1 %glob, i64 1, i64 0
  %d0 = and i32 %leaf, {_D}
  %dirty = icmp ne i32 %d0, 0
  %db = select i1 %dirty, i64 2, i64 0
  %r0 = or i64 %p64, 4
  %r1 = or i64 %r0, %gb
  %r = or i64 %r1, %db
  ret i64 %r
py:
  ret i64 0
}}
"""


def _drop_writes_ir():
    return f"""
define void @btvm_drop_writes(ptr %st, i64 %first, i64 %host) nounwind {{
entry:
  br label %loop
loop:
  %k = phi i64 [ 0, %entry ], [ %k1, %next ]
  %i = add i64 %first, %k
  %i16 = shl i64 %i, 4
  %eo = add i64 %i16, {S.offset('tlb')}
  %ent = getelementptr i8, ptr %st, i64 %eo
  %tag = load i32, ptr %ent
  %ap = getelementptr i8, ptr %ent, i64 8
  %addend = load i64, ptr %ap
  %t64 = zext i32 %tag to i64
  %page = add i64 %addend, %t64
  %hit0 = icmp eq i64 %page, %host
  %valid = icmp ne i32 %tag, {S.TLB_INVALID}
  %hit = and i1 %hit0, %valid
  br i1 %hit, label %drop, label %next
drop:
  store i32 {S.TLB_INVALID}, ptr %ent
  br label %next
next:
  %k1 = add i64 %k, 1
  %more = icmp ult i64 %k1, {S.TLB_SIZE}
  br i1 %more, label %loop, label %done
done:
  ret void
}}
"""


def _invlpg_ir():
    """INVLPG of a page the runtime holds nothing of (state.pg_interest) and that no 4 MiB page
    maps (state.pg_large): its soft-TLB entries, in every privilege and kind, are dropped here.
    Returns 1 (call out to the runtime) otherwise."""
    o = S.offset
    drops = "".join(f"""  %e{i}o = add i64 %s16, {o('tlb') + 16 * S.tlb_index(p, k)}
  %e{i} = getelementptr i8, ptr %st, i64 %e{i}o
  %t{i} = load i32, ptr %e{i}
  %h{i} = icmp eq i32 %t{i}, %page
  %n{i} = select i1 %h{i}, i32 {S.TLB_INVALID}, i32 %t{i}
  store i32 %n{i}, ptr %e{i}
""" for i, (p, k) in enumerate((p, k) for p in range(S.TLB_PRIVS) for k in range(S.TLB_KINDS)))
    return f"""
define i32 @btvm_invlpg(ptr %st, i32 %addr) nounwind {{
entry:
  %lp = getelementptr i8, ptr %st, i64 {o('pg_large')}
  %lm = load ptr, ptr %lp
  %di = lshr i32 %addr, 22
  %di64 = zext i32 %di to i64
  %lb = getelementptr i8, ptr %lm, i64 %di64
  %large = load i8, ptr %lb
  %small = icmp eq i8 %large, 0
  br i1 %small, label %mine, label %py
mine:
{_page_byte(o, 'pg_interest', 'addr', 'held')}  %free = icmp eq i8 %held, 0
  br i1 %free, label %drop, label %py
drop:
  %page = and i32 %addr, -4096
  %pn = lshr i32 %addr, 12
  %slot = and i32 %pn, {S.TLB_SIZE - 1}
  %s64 = zext i32 %slot to i64
  %s16 = shl i64 %s64, 4
{drops}  ret i32 0
py:
  ret i32 1
}}
"""


def _compiled(name, ir):
    if name not in _fns:
        mt = ModuleText(name)
        mt.functions.append(ir())
        fns, _ = shared_jit().compile_cached(mt, [name])
        _fns[name] = fns[name]
    return _fns[name]


def load_refill_address():
    """Address of btvm_load_refill (compiled once per process): a load slow path with the
    signature of state.load_slow, for a CPU whose state has refill_perm, refill_base and
    refill_slow set."""
    return _compiled("btvm_load_refill", _ir)


def sys_load_refill_address():
    """Address of btvm_sys_load_refill: like load_refill_address for a system machine, whose
    state also has pg_dir, pg_mode, ram_size and pg_large set."""
    return _compiled("btvm_sys_load_refill", _sys_ir)


def sys_store_refill_address():
    """Address of btvm_sys_store_refill, a store slow path with the signature of
    state.store_slow (the runtime's own one in refill_store_slow; pg_code set too)."""
    return _compiled("btvm_sys_store_refill", _sys_store_ir)


def invlpg_address():
    """Address of btvm_invlpg (state.invlpg): for a system machine whose state has pg_large and
    pg_interest set."""
    return _compiled("btvm_invlpg", _invlpg_ir)


_WALK = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)


def walk():
    """walk(state address, linear address, user): btvm_walk (see _walk_ir) as a ctypes function."""
    return _WALK(_compiled("btvm_walk", _walk_ir))


_DROP = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint64, ctypes.c_uint64)


def drop_writes():
    """drop(state address, first TLB entry, host page): invalidate the TLB_SIZE write entries
    from first on that map the host page (translated code now lives there)."""
    return _DROP(_compiled("btvm_drop_writes", _drop_writes_ir))

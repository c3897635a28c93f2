"""The soft-MMU read miss of flat machines (user mode, snippets) in native code.

On a flat machine every guest page lives at GuestMemory.base + address, so a read
TLB entry only says "this page is readable".  A read that misses the TLB used to call
back into Python (CPU._load_slow) just to look the page's permission up and refill
the entry: a direct-mapped TLB of 1,024 pages thrashes when a program walks several
big arrays whose pages share TLB slots (tools/bench_prog.c's LZ77: ~370,000 misses, a
seventh of its run).  btvm_load_refill does that in native code: it reads the page's
permission byte from GuestMemory.perm (a bytearray that is never resized, so its
buffer stays put), refills the entry and does the load.  Anything else - a probe, a
page-crossing access, a page that is not readable (the fault is raised by Python) -
goes on to the Python slow path, whose address the state holds in refill_slow.
"""
from bt import state as S
from bt.jit import ModuleText, shared_jit

_fn = None


def _ir():
    o = S.offset
    sizes = ((1, "i8"), (2, "i16"), (4, "i32"), (8, "i64"))
    cases = " ".join(f"i32 {n}, label %ld{n}" for n, _ in sizes)
    loads = "".join(f"""ld{n}:
  %x{n} = load {t}, ptr %hp, align 1
{'' if t == 'i64' else f'  %z{n} = zext {t} %x{n} to i64' + chr(10)}  ret i64 {'%x8' if n == 8 else f'%z{n}'}
""" for n, t in sizes)
    return f"""
define i64 @btvm_load_refill(ptr %st, i32 %addr, i32 %size) nounwind {{
entry:
  %kind = and i32 %size, 768
  %plain = icmp eq i32 %kind, 0
  br i1 %plain, label %span, label %py
span:
  %sz1 = add i32 %size, -1
  %last = add i32 %addr, %sz1
  %same = xor i32 %addr, %last
  %one = icmp ult i32 %same, 4096
  br i1 %one, label %perm, label %py
perm:
  %pp = getelementptr i8, ptr %st, i64 {o('refill_perm')}
  %pt = load ptr, ptr %pp
  %pg = lshr i32 %addr, 12
  %pg64 = zext i32 %pg to i64
  %bp = getelementptr i8, ptr %pt, i64 %pg64
  %bits = load i8, ptr %bp
  %r = and i8 %bits, 1
  %ok = icmp ne i8 %r, 0
  br i1 %ok, label %fill, label %py
fill:
  %kp = getelementptr i8, ptr %st, i64 {o('mode_key')}
  %key = load i32, ptr %kp
  %cpl0 = lshr i32 %key, {S.KEY_CPL_SHIFT}
  %cpl = and i32 %cpl0, 3
  %user = icmp eq i32 %cpl, 3
  %first = select i1 %user, i64 {S.tlb_index(1, S.TLB_READ)}, i64 {S.tlb_index(0, S.TLB_READ)}
  %slot = and i32 %pg, {S.TLB_SIZE - 1}
  %slot64 = zext i32 %slot to i64
  %i = add i64 %first, %slot64
  %i16 = shl i64 %i, 4
  %eo = add i64 %i16, {o('tlb')}
  %ent = getelementptr i8, ptr %st, i64 %eo
  %tag = and i32 %addr, -4096
  store i32 %tag, ptr %ent
  %bpp = getelementptr i8, ptr %st, i64 {o('refill_base')}
  %base = load i64, ptr %bpp
  %ap = getelementptr i8, ptr %ent, i64 8
  store i64 %base, ptr %ap
  %a64 = zext i32 %addr to i64
  %h = add i64 %base, %a64
  %hp = inttoptr i64 %h to ptr
  switch i32 %size, label %py [ {cases} ]
{loads}py:
  %fpp = getelementptr i8, ptr %st, i64 {o('refill_slow')}
  %fp = load ptr, ptr %fpp
  %v = call i64 %fp(ptr %st, i32 %addr, i32 %size)
  ret i64 %v
}}
"""


def load_refill_address():
    """Address of btvm_load_refill (compiled once per process): a load slow path with the
    signature of state.load_slow, for a CPU whose state has refill_perm, refill_base and
    refill_slow set."""
    global _fn
    if _fn is None:
        mt = ModuleText("refill")
        mt.functions.append(_ir())
        fns, _ = shared_jit().compile(mt, ["btvm_load_refill"])
        _fn = fns["btvm_load_refill"]
    return _fn

"""The virtual CPU: state, soft-MMU slow paths, and the run loop around translated code.

Translated code runs natively until a block exits with a reason the runtime
must see (a code-cache miss, an exception, a callout, the end of the budget).
The loop here handles those and re-enters native code through `btvm_enter`,
a small dispatcher generated with llvmlite that probes the jump cache.
"""
import ctypes

from bt import lazyflags, state as S
from bt.cache import CodeCache
from bt.decode import DecodeError, decode_block
from bt.emit import CC
from bt.jit import ModuleText, shared_jit
from bt.semantics import Unsupported, ends_block
from bt.sensitive import callout_name

from .memory import PAGE, R, W, X
from .native_refill import load_refill_address

LOAD_SLOW = ctypes.CFUNCTYPE(ctypes.c_uint64, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint32)
STORE_SLOW = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_uint32, ctypes.c_uint64, ctypes.c_uint32)
ENTER = ctypes.CFUNCTYPE(ctypes.c_int32, ctypes.c_void_p)

PF, UD, GP = 14, 6, 13
SLICE = 1 << 22

_enter_fn = None


def _jc_probe(n):
    """IR probing the jump cache (%jc) for state's eip and mode key (%eipp, %keyp): defines
    %entN (the entry) and %hitN (its tag matches), as S.jc_hash hashes."""
    mult = S.JMP_CACHE_MULT - (1 << 32) if S.JMP_CACHE_MULT >= 1 << 31 else S.JMP_CACHE_MULT
    return f"""
  %eip{n} = load i32, ptr %eipp
  %key{n} = load i32, ptr %keyp
  %x{n} = mul i32 %eip{n}, {mult}
  %h{n} = lshr i32 %x{n}, {32 - S.JMP_CACHE_BITS}
  %hw{n} = zext i32 %h{n} to i64
  %off{n} = shl i64 %hw{n}, 4
  %ent{n} = getelementptr i8, ptr %jc, i64 %off{n}
  %tag{n} = load i64, ptr %ent{n}
  %ew{n} = zext i32 %eip{n} to i64
  %kw{n} = zext i32 %key{n} to i64
  %kh{n} = shl i64 %kw{n}, 32
  %want{n} = or i64 %ew{n}, %kh{n}
  %hit{n} = icmp eq i64 %tag{n}, %want{n}"""


def _native_enter():
    """Compile (once per process) the native entry: jump-cache probe, then call the block."""
    global _enter_fn
    if _enter_fn is None:
        o = S.offset
        ir = f"""
define i32 @btvm_enter(ptr %st) nounwind {{
entry:
  ; chain_from is set only by an exit through an empty slot of this run: one left from a run
  ; whose lookup then failed (a fault) must not be linked to the block after some later exit.
  %cfp = getelementptr i8, ptr %st, i64 {o('chain_from')}
  store i64 0, ptr %cfp
  %eipp = getelementptr i8, ptr %st, i64 {o('eip')}
  %keyp = getelementptr i8, ptr %st, i64 {o('mode_key')}
  %jcpp = getelementptr i8, ptr %st, i64 {o('jmp_cache')}
  %jc = load ptr, ptr %jcpp{_jc_probe(1)}
  br i1 %hit1, label %first, label %miss
first:
  %fpp = getelementptr i8, ptr %ent1, i64 8
  %fp0 = load ptr, ptr %fpp
  br label %go
go:
  %fp = phi ptr [ %fp0, %first ], [ %fp1, %relink ]
  %r = call {CC} i32 %fp(ptr %st)
  %lookup = icmp eq i32 %r, {S.EXIT_LOOKUP}
  br i1 %lookup, label %unlinked, label %done
unlinked:
  ; A direct exit whose chain slot is empty (chain_from) to a block the jump cache has: link it
  ; here, as the runtime would, and log the slot for the runtime's back-links (CodeCache.drain_links).
  %cf = load i64, ptr %cfp
  %has = icmp ne i64 %cf, 0
  br i1 %has, label %probe, label %done
probe:{_jc_probe(2)}
  br i1 %hit2, label %room, label %done
room:
  %logpp = getelementptr i8, ptr %st, i64 {o('link_log')}
  %logp = load ptr, ptr %logpp
  %n = load i64, ptr %logp
  %free = icmp ult i64 %n, {S.LINK_LOG}
  br i1 %free, label %relink, label %done
relink:
  %fpp1 = getelementptr i8, ptr %ent2, i64 8
  %fp1 = load ptr, ptr %fpp1
  %slot = inttoptr i64 %cf to ptr
  store ptr %fp1, ptr %slot
  %n1 = add i64 %n, 1
  %at = getelementptr i64, ptr %logp, i64 %n1
  store i64 %cf, ptr %at
  store i64 %n1, ptr %logp
  store i64 0, ptr %cfp
  br label %go
done:
  %ccp = getelementptr i8, ptr %st, i64 {o('cc_op')}
  %cc = load i32, ptr %ccp
  %lazy = icmp ne i32 %cc, 0
  br i1 %lazy, label %fold, label %out
fold:
  call void @btvm_materialize(ptr %st)
  br label %out
out:
  ret i32 %r
miss:
  ret i32 {S.EXIT_LOOKUP}
}}
"""
        # The runtime sees plain EFLAGS: lazy flags a region left are folded in on the way out.
        mt = lazyflags.materializer_ir()
        mt.functions.append(ir)
        fns, _ = shared_jit().compile_cached(mt, ["btvm_enter", "btvm_materialize"])
        _enter_fn = ENTER(fns["btvm_enter"])
        _enter_fn.materialize = fns["btvm_materialize"]
    return _enter_fn


class Stop(Exception):
    """Ends CPU.run: raised by callout and exception handlers."""

    def __init__(self, reason, **info):
        super().__init__(reason)
        self.reason = reason
        self.info = info


class GuestFault(Exception):
    """An architectural exception raised by the runtime (e.g. in a callout handler)."""

    def __init__(self, vector, error=None, fault_addr=None):
        super().__init__(vector)
        self.vector, self.error, self.fault_addr = vector, error, fault_addr


class CPU:
    """A 32-bit x86 CPU over a GuestMemory, running translated code.

    Machines customize it through `callouts` (callout name -> fn(cpu, insn)) and
    `on_exception(cpu, vector, error, fault_addr)`, which either delivers the
    exception to the guest (returns) or raises Stop.
    """

    def __init__(self, mem, key=None, trace_writes=False):
        self.mem = mem
        self.st = S.CPUState()
        self.st_addr = ctypes.addressof(self.st)
        self.key = key if key is not None else S.make_key()
        self.st.mode_key = self.key
        self.st.eflags = S.EFLAGS_FIXED1
        self.trace_writes = trace_writes
        self.written = set()
        self._load_cb = LOAD_SLOW(self._load_slow)
        self._store_cb = STORE_SLOW(self._store_slow)
        self.st.load_slow = ctypes.cast(self._load_cb, ctypes.c_void_p).value
        if type(self)._load_slow is CPU._load_slow and type(self)._tlb_fill is CPU._tlb_fill:
            # Flat memory: read misses of readable pages are refilled natively (native_refill).
            self._perm_view = (ctypes.c_uint8 * len(mem.perm)).from_buffer(mem.perm)
            self.st.refill_perm = ctypes.addressof(self._perm_view)
            self.st.refill_base = mem.base
            self.st.refill_slow = self.st.load_slow
            self.st.load_slow = load_refill_address()
        self.st.store_slow = ctypes.cast(self._store_cb, ctypes.c_void_p).value
        self.cache = CodeCache(self._fetch, self._code_page)
        self.st.jmp_cache = self.cache.jmp_cache_addr
        self.st.link_log = self.cache.link_log_addr
        self.tlb_flush()
        self.callouts = {}
        self.on_exception = None
        self.icount = 0
        self.tsc_offset = 0
        self.extra_ns = 0       # virtual time charged beyond one ns per instruction (I/O bus cycles)
        self._enter = _native_enter()
        self.st.materialize = self._enter.materialize
        self._pending_error = None
        # EFLAGS.TF single-stepping (SDM Vol. 3A 17.3.1.4): a machine that implements it sets
        # on_single_step(cpu), which delivers the #DB trap (eip already after the instruction).
        # Without it TF is ignored (btvm exec).  step_event: an exception or interrupt was
        # delivered during the instruction (it is reported instead of the trap); debug_shadow:
        # MOV SS / POP SS inhibit the trap at the next instruction boundary (SDM 6.8.3).
        self.on_single_step = None
        self.step_event = False
        self.debug_shadow = False
        self.end_slice = False      # set by a machine's device: the run returns Stop("event")
        self.after_io = None        # a machine's check after each port I/O instruction

    # ---- registers --------------------------------------------------------------
    def reg(self, name):
        if name in S.REG_NAMES:
            return self.st.regs[S.REG_NAMES.index(name)]
        if name in ("eip", "eflags"):
            return getattr(self.st, name)
        raise KeyError(name)

    def set_reg(self, name, value):
        value &= 0xFFFFFFFF
        if name in S.REG_NAMES:
            self.st.regs[S.REG_NAMES.index(name)] = value
        elif name == "eip":
            self.st.eip = value
        elif name == "eflags":
            self.st.eflags = (value | S.EFLAGS_FIXED1) & ~((1 << 3) | (1 << 5) | (1 << 15)) & 0x3F7FD7
            self.sync_ac()
        else:
            raise KeyError(name)

    @property
    def cpl(self):
        return S.key_cpl(self.key)

    # CR0.AM for machines without control registers: `btvm run` sets it, as Linux does on i386,
    # so that EFLAGS.AC at CPL 3 enables alignment checking (SystemCPU reads its CR0).
    cr0_am = False

    def sync_ac(self):
        """Set KEY_AC in the key iff CR0.AM, EFLAGS.AC and CPL 3 hold (after EFLAGS.AC may have
        changed: set_reg("eflags"), a CPL-3 POPF, which leaves its block when it flips AC)."""
        want = S.KEY_AC if self.st.eflags & (1 << S.AC) and S.key_cpl(self.key) == 3 and self.cr0_am else 0
        if self.key & S.KEY_AC != want:
            self.set_key((self.key & ~S.KEY_AC) | want)

    def set_key(self, key):
        if key != self.key:
            self.key = key
            self.st.mode_key = key

    # ---- soft-MMU slow paths (called from translated code) --------------------------
    def tlb_flush(self):
        self.cache.mapping_changed()
        ctypes.memset(ctypes.addressof(self.st) + S.offset("tlb"), 0xFF, ctypes.sizeof(self.st.tlb))

    def tlb_flush_page(self, page, remap=True):
        """Drop page's TLB entries; remap=False: its mapping stays (writes must trap now)."""
        if remap:
            # Only this page's mapping may change (INVLPG): only its decoded callouts are dropped
            # (a Linux boot runs ~70,000 INVLPGs; a generation bump made every callout after one
            # re-read its bytes).
            self.cache.forget_instructions_of(page & 0xFFFFF000)
        i = (page >> 12) & (S.TLB_SIZE - 1)
        for priv in range(S.TLB_PRIVS):
            for kind in range(S.TLB_KINDS):
                ent = self.st.tlb[S.tlb_index(priv, kind) + i]
                if ent.tag == page:
                    ent.tag = S.TLB_INVALID

    def _tlb_fill(self, addr, kind):
        page = addr & 0xFFFFF000
        ent = self.st.tlb[S.tlb_index(1 if self.cpl == 3 else 0, kind) + ((addr >> 12) & (S.TLB_SIZE - 1))]
        ent.tag = page
        ent.addend = self.mem.base

    def _fault(self, addr, write):
        """Record a page fault for translated code to raise precisely."""
        present = bool(self.mem.page_perm(addr) & R)
        err = (1 if present else 0) | (2 if write else 0) | (4 if self.cpl == 3 else 0)
        st = self.st
        st.fault = 1
        st.exc_vector = PF
        st.exc_error = err
        st.fault_addr = addr

    def _load_slow(self, _st, addr, size):
        try:
            # 0x100|size: a write-permission probe, 0x200|size: a read probe (no access)
            probe, write = size & 0x300, size & 0x100
            size &= 0xFF
            need = W if write else R
            bad = self.mem.check(addr, size, need)
            if bad is not None:
                self._fault(bad, bool(write))
                return 0
            if probe:
                return 0
            if (addr & 0xFFF) + size <= PAGE:
                self._tlb_fill(addr, S.TLB_READ)
            return int.from_bytes(self.mem.read(addr, size), "little")
        except BaseException as exc:      # never let an exception unwind into native code
            self._pending_error = exc
            self.st.fault = 1
            self.st.exc_vector = 0xFFFF
            return 0

    def _store_slow(self, _st, addr, value, size):
        try:
            bad = self.mem.check(addr, size, W)
            if bad is not None:
                self._fault(bad, True)
                return
            first, last = addr & 0xFFFFF000, (addr + size - 1) & 0xFFFFF000
            for page in {first, last}:
                if self.cache.has_code(page):
                    self.cache.invalidate_page(page, "smc")
                    self.st.smc = 1
            self.mem.write(addr, (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little"))
            if self.trace_writes:
                self.written.update((addr + i) & 0xFFFFFFFF for i in range(size))
            elif first == last and not self.cache.has_code(first):
                self._tlb_fill(addr, S.TLB_WRITE)
        except BaseException as exc:
            self._pending_error = exc
            self.st.fault = 1
            self.st.exc_vector = 0xFFFF

    def _code_page(self, page):
        """A page now holds translated code: writes to it must take the slow path."""
        self.tlb_flush_page(page, remap=False)

    def _fetch(self, addr, n):
        out = bytearray()
        a = addr
        while len(out) < n:
            if not self.mem.page_perm(a) & X:
                break
            chunk = min(n - len(out), PAGE - (a & (PAGE - 1)))
            out += self.mem.read(a, chunk)
            a = (a + chunk) & 0xFFFFFFFF
        return bytes(out)

    # ---- the run loop ---------------------------------------------------------------
    def insn_at(self, eip, expect=None):
        """The decoded instruction at eip (for callout handlers; expect: see CodeCache.instruction)."""
        insn = self.cache.instruction(eip, self.key, expect)
        if insn is None:
            raise GuestFault(UD)
        return insn

    def raise_exception(self, vector, error=None, fault_addr=None):
        """Hand an architectural exception (eip at the faulting instruction) to the machine."""
        self.step_event = True
        if self.on_exception is None:
            raise Stop("exception", vector=vector, error=error, fault_addr=fault_addr)
        self.on_exception(self, vector, error, fault_addr)

    def _miss(self):
        st = self.st
        chain_from, st.chain_from = st.chain_from, 0     # taken before anything can raise
        self.sync_ac()
        eip = st.eip
        try:
            tb = self.cache.get(eip, self.key)
        except DecodeError:
            fault = self.fetch_fault(eip, 16)
            if fault is not None and (fault[0] == eip or self._cut_by(eip, fault[0])):
                self.st.fault_addr = fault[0]
                self.raise_exception(PF, fault[1], fault[0])
            else:
                self.raise_exception(UD)
            return
        except Unsupported as exc:
            raise Stop("unsupported", message=str(exc), eip=eip)
        if chain_from:
            self.cache.link(chain_from, tb)     # refused if the slot's block has another key

    def fetch_fault(self, addr, n):
        """(first address in [addr, addr+n) that cannot be fetched, #PF error code) or None."""
        bad = self.mem.check(addr, n, X)
        if bad is None:
            return None
        return bad, (1 if self.mem.page_perm(bad) & R else 0) | (4 if self.cpl == 3 else 0)

    def _cut_by(self, eip, bad):
        data = self._fetch(eip, bad - eip)
        blk = decode_block(lambda a, n: data[a - eip:a - eip + n], eip, self.key | S.KEY_STEP, ends_block)
        return not blk.insns

    def run(self, max_instructions=None, exact=True):
        """Run until a handler raises Stop or max_instructions have executed; returns the Stop.

        exact=False lets the run stop up to one block short of max_instructions once it has made
        progress, instead of finishing one instruction at a time: a machine's time slice
        needs no exact end, and single-step translations at arbitrary places cost compiles.

        With EFLAGS.TF set at an instruction's start (and on_single_step set), the instruction
        runs alone (KEY_STEP, budget 1) and the #DB trap follows it, unless it delivered an
        exception or interrupt (a fault, INT n/INT3/INTO) or was MOV SS/POP SS.  Translated code
        returns here whenever TF may have become set (POPF with TF in the result, IRET, callouts),
        so code running with TF clear is translated and run as before."""
        try:
            return self._run(max_instructions, exact)
        finally:
            self.cache.drain_links()    # the chains made natively, counted and unlinkable

    def _run(self, max_instructions, exact):
        st = self.st
        remaining = max_instructions
        stepping = False
        tf_bit = 1 << S.TF
        while True:
            if remaining is not None and remaining <= 0:
                return Stop("max_instructions")
            tf = bool(st.eflags & tf_bit) and self.on_single_step is not None
            if tf:
                budget = 1
                self.step_event = self.debug_shadow = False
                if not self.key & S.KEY_STEP:
                    self.set_key(self.key | S.KEY_STEP)
            else:
                budget = SLICE if remaining is None else min(SLICE, remaining)
                if not stepping and self.key & S.KEY_STEP:
                    self.set_key(self.key & ~S.KEY_STEP)
            st.budget = budget
            st.tsc_base = (self.icount + self.extra_ns + self.tsc_offset + budget) & 0xFFFFFFFFFFFFFFFF
            opt = self.cache.optimizer
            if opt is not None and opt.done:
                self.cache.poll_tier2()
            try:
                rc = self._enter(self.st_addr)
                done = budget - st.budget
                self.icount += done
                if remaining is not None:
                    remaining -= done
                if self._pending_error is not None:
                    err, self._pending_error = self._pending_error, None
                    raise err
                completed = done
                if rc == S.EXIT_LOOKUP:
                    self._miss()
                elif rc == S.EXIT_BUDGET:
                    if tf:
                        pass
                    elif remaining is not None and 0 < remaining < max_instructions and done == 0 and not exact:
                        return Stop("max_instructions")
                    elif remaining is not None and 0 < remaining and done == 0 and not stepping:
                        # The next block is longer than what is left: finish one instruction at a time.
                        stepping = True
                        self.set_key(self.key | S.KEY_STEP)
                elif rc == S.EXIT_EXCEPTION:
                    vector, err = st.exc_vector, st.exc_error
                    st.fault = 0
                    self.raise_exception(vector, None if err == S.NO_ERROR_CODE else err,
                                         st.fault_addr if vector == PF else None)
                elif rc == S.EXIT_CALLOUT:
                    try:
                        self._callout()
                    except Stop as stop:
                        if stop.reason == "hlt":
                            self.icount += 1
                            remaining = None if remaining is None else remaining - 1
                            if tf and not self.step_event:
                                # HLT with TF: the #DB trap after it resumes execution (SDM Vol. 2
                                # HLT: "a debug exception ... will resume execution").
                                self.on_single_step(self)
                                continue
                        raise
                    # The handler executed the instruction (it raised otherwise): count it.
                    self.icount += 1
                    remaining = None if remaining is None else remaining - 1
                    completed = 1
                elif rc == S.EXIT_SMC:
                    st.smc = 0
                elif rc == S.EXIT_HOT:
                    self.cache.hot(st.eip, self.key)
                elif rc == S.EXIT_HLT:
                    raise Stop("hlt")
                if tf and completed and not self.step_event and not self.debug_shadow:
                    self.on_single_step(self)
                if completed and (st.irq_pending & st.eflags or self.end_slice):
                    # A machine's interrupt became deliverable (STI, IRET, POPF, an OUT that
                    # raised or unmasked an IRQ): it is taken now, not at the slice's end.  Or
                    # a device timer was armed earlier than the deadline the slice ran to.
                    self.end_slice = False
                    raise Stop("event")
            except GuestFault as f:
                self.raise_exception(f.vector, f.error, f.fault_addr)
            except Stop as s:
                if stepping:
                    self.set_key(self.key & ~S.KEY_STEP)
                return s
            if stepping and (remaining is None or remaining <= 0):
                stepping = False
                self.set_key(self.key & ~S.KEY_STEP)

    def _callout(self):
        st = self.st
        name = callout_name(st.callout_id)
        handler = self.callouts.get(name)
        if handler is None:
            raise Stop("unsupported", message=f"callout '{name}' has no handler in this machine", eip=st.eip)
        handler(self, self.insn_at(st.eip, ((st.next_eip - st.eip) & 0xFFFFFFFF, st.callout_id)))

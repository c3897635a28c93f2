"""Guest threads on one host thread: per-thread CPU context and a deterministic round-robin scheduler.

The Machine always keeps the *running* thread's state where single-threaded code expects it (the CPU
state struct, m.tls, m.sig.mask/altstack/pending, m.clear_child_tid), so syscalls and signal
delivery need not know about threads. A switch saves those into the outgoing Thread and loads the
incoming one's; memory, the code cache, fds, signal actions and brk/mmap state are simply shared.

Switch points: the end of an instruction slice (only if another thread is runnable, so the order
depends on instruction counts, not on host timing), a futex wait or sleep that blocks, sched_yield
and thread exit. Waits with timeouts are the only place host time decides anything.
"""
import ctypes
import errno as E
import struct
import time

from bt import state as S
from ..cpu import Stop
from .syscalls import signals as sg
from .syscalls.base import EFault, put_u32

# regs, eip, eflags, seg_base[6], seg_sel[6] are contiguous at the start of the state struct
CTX_SIZE = S.offset("seg_sel") + 12
assert S.offset("regs") == 0 and S.offset("eip") == 32 and S.offset("eflags") == 36
SEG_BASE, SEG_SEL = S.offset("seg_base"), S.offset("seg_sel")
FPU, FPU_SIZE = S.offset("fpu"), S.FPU_SLOT

RUNNABLE, FUTEX, SLEEP, SIGWAIT, EXITED = "runnable", "futex", "sleep", "sigwait", "exited"
POLL = 0.05          # seconds: while every thread is parked, how often host signals are looked at
FUTEX_BITSET_ANY = 0xFFFFFFFF


class Thread:
    def __init__(self, tid):
        self.tid = tid
        self.state = RUNNABLE
        self.ctx = None             # bytearray of CTX_SIZE while not running
        self.fpu = None
        self.tls = {}
        self.mask = 0
        self.altstack = (0, sg.SS_DISABLE, 0)
        self.pending = {}
        self.clear_child_tid = 0
        self.robust_list = (0, 0)
        self.futex = None           # (address, bitset) while waiting on a futex
        self.deadline = None        # time.monotonic_ns() to give up a wait/sleep, or None
        self.timeout_result = 0     # eax if the deadline passes (-ETIMEDOUT for futexes, 0 for sleep)
        self.result = None          # eax to store when the thread next runs (woken from a wait)
        self.suspend_mask = None    # in sigsuspend/pause: the mask the handler frame restores


class Scheduler:
    def __init__(self, m, tid):
        self.m = m
        self.current = Thread(tid)
        self.threads = [self.current]     # live threads in creation order: the round-robin order
        self.waiters = []                 # threads in futex waits, in the order they started waiting
        self.next_tid = tid + 1

    @property
    def multi(self):
        return len(self.threads) > 1

    def find(self, tid):
        for t in self.threads:
            if t.tid == tid:
                return t
        return None

    # ---- context save/restore ---------------------------------------------------------------------
    def _save(self, t):
        m, st = self.m, self.m.cpu.st_addr
        t.ctx = bytearray(ctypes.string_at(st, CTX_SIZE))
        t.fpu = ctypes.string_at(st + FPU, FPU_SIZE)
        t.tls, t.clear_child_tid = m.tls, m.clear_child_tid
        t.mask, t.altstack, t.pending = m.sig.mask, m.sig.altstack, m.sig.pending

    def _load(self, t):
        m, st = self.m, self.m.cpu.st_addr
        ctypes.memmove(st, bytes(t.ctx), CTX_SIZE)
        ctypes.memmove(st + FPU, t.fpu, FPU_SIZE)
        m.cpu.sync_ac()          # the thread's EFLAGS.AC
        m.tls, m.clear_child_tid = t.tls, t.clear_child_tid
        m.sig.mask, m.sig.altstack, m.sig.pending = t.mask, t.altstack, t.pending
        t.ctx = t.fpu = None
        self.current = t
        if t.result is not None:
            m.cpu.set_reg("eax", t.result)
            t.result = None

    # ---- creation and exit ------------------------------------------------------------------------
    def spawn(self, newsp, tls_desc, clear_tid):
        """A new thread whose registers copy the caller's (the clone returns 0 in it)."""
        t = Thread(self.next_tid)
        self.next_tid += 1
        self._save(t)                 # snapshot of the caller, then patched for the child
        t.tls, t.pending, t.altstack = dict(self.m.tls), {}, (0, sg.SS_DISABLE, 0)
        struct.pack_into("<I", t.ctx, 0, 0)                    # eax = 0 in the child
        if newsp:
            struct.pack_into("<I", t.ctx, 4 * 4, newsp)        # esp
        if tls_desc is not None:
            entry = tls_desc[0]
            t.tls[entry] = tls_desc[1:]
            for seg in range(6):          # a selector naming the entry reloads its base, as on a GDT switch
                sel = struct.unpack_from("<H", t.ctx, SEG_SEL + 2 * seg)[0]
                if sel >> 3 == entry and sel & 4 == 0:
                    struct.pack_into("<I", t.ctx, SEG_BASE + 4 * seg, tls_desc[1])
        t.clear_child_tid = clear_tid
        self.threads.append(t)
        return t

    def exit_current(self, status):
        """SYS_exit: only this thread ends (CLONE_CHILD_CLEARTID wakes a joiner); the last one ends the process."""
        t = self.current
        if t.clear_child_tid:
            try:
                put_u32(self.m, t.clear_child_tid, 0)
                self.futex_wake(t.clear_child_tid, 1, FUTEX_BITSET_ANY)
            except EFault:
                pass
        t.state = EXITED
        self.threads.remove(t)
        if not self.threads:
            raise Stop("exit", status=status & 0xFF)
        raise Stop("switch")

    def after_fork(self, pid):
        """In a fork child only the calling thread survives; its tid becomes the new pid."""
        t = self.current
        t.tid = pid
        self.threads = [t]
        self.waiters = []
        self.next_tid = pid + 1

    # ---- blocking ---------------------------------------------------------------------------------
    def block(self, state, deadline, timeout_result):
        """Park the running thread (the caller then raises Stop("switch"))."""
        t = self.current
        t.state, t.deadline, t.timeout_result = state, deadline, timeout_result

    def _wake(self, t, result):
        if t.futex is not None:
            self.waiters.remove(t)
            t.futex = None
        t.state, t.deadline, t.result = RUNNABLE, None, result

    def futex_wait(self, addr, bitset, deadline):
        t = self.current
        t.futex = (addr, bitset)
        self.waiters.append(t)
        self.block(FUTEX, deadline, -E.ETIMEDOUT)
        raise Stop("switch")

    def futex_wake(self, addr, n, bitset):
        woken = 0
        for t in list(self.waiters):
            if woken >= n:
                break
            if t.futex[0] == addr and t.futex[1] & bitset:
                self._wake(t, 0)
                woken += 1
        return woken

    def futex_requeue(self, addr, addr2, n):
        moved = 0
        for t in self.waiters:
            if moved >= n:
                break
            if t.futex[0] == addr:
                t.futex = (addr2, t.futex[1])
                moved += 1
        return moved

    def interrupt(self, t, sig):
        """A signal for a thread parked in a wait: the wait returns -EINTR, or, for a futex wait and an
        SA_RESTART handler, runs again after the handler (as Linux's -ERESTARTSYS: eip back on the
        2-byte INT 0x80, eax still the syscall number since the result was never stored)."""
        if t.state == FUTEX and self.m.sig.action(sig)[1] & sg.SA_RESTART:
            self._wake(t, None)
            eip = struct.unpack_from("<I", t.ctx, 32)[0]
            struct.pack_into("<I", t.ctx, 32, eip - 2)
        elif t.state in (FUTEX, SLEEP, SIGWAIT):
            self._wake(t, -E.EINTR)

    def suspend(self, restore_mask):
        """rt_sigsuspend/pause with other threads alive: park until a signal this thread takes arrives."""
        self.current.suspend_mask = restore_mask
        self.block(SIGWAIT, None, -E.EINTR)
        raise Stop("switch")

    # ---- signals ----------------------------------------------------------------------------------
    def mask_of(self, t):
        return self.m.sig.mask if t is self.current else t.mask

    def signal_thread(self, t, sig, info):
        running = t is self.current and t.ctx is None
        (self.m.sig.pending if running else t.pending).setdefault(sig, info)
        if not running and not t.mask & sg.bit(sig):
            self.interrupt(t, sig)

    def route(self, sig, info):
        """A process-directed signal goes to the first thread (running one first) not blocking it."""
        order = [self.current] + [t for t in self.threads if t is not self.current]
        target = next((t for t in order if not self.mask_of(t) & sg.bit(sig)), self.current)
        self.signal_thread(target, sig, info)

    def _take_host_signals(self):
        """While every thread is parked: hand host signals (recorded on the last thread run) to a taker."""
        pend = self.m.sig.pending
        for s in [s for s, info in pend.items() if info[0] == sg.SI_USER]:
            info = pend.pop(s)
            target = next((t for t in self.threads if not t.mask & sg.bit(s)), self.threads[0])
            self.signal_thread(target, s, info)

    def reroute_host_signals(self):
        """Host signals land on the running thread; move those it blocks to a thread that does not."""
        pend = self.m.sig.pending
        for s in [s for s, info in pend.items() if info[0] == sg.SI_USER and self.m.sig.mask & sg.bit(s)]:
            other = next((t for t in self.threads if t is not self.current and not t.mask & sg.bit(s)), None)
            if other is not None:
                self.signal_thread(other, s, pend.pop(s))

    # ---- scheduling -------------------------------------------------------------------------------
    def _expire(self):
        now = time.monotonic_ns()
        for t in self.threads:
            if t.state != RUNNABLE and t.deadline is not None and t.deadline <= now:
                self._wake(t, t.timeout_result)

    def _next_runnable(self):
        """The first runnable thread after the current one in round-robin order (maybe itself)."""
        n = len(self.threads)
        start = self.threads.index(self.current) + 1 if self.current in self.threads else 0
        for i in range(n):
            t = self.threads[(start + i) % n]
            if t.state == RUNNABLE:
                return t
        return None

    def preempt(self):
        """End of a slice: let the next runnable thread run."""
        self.reroute_host_signals()
        self._expire()
        self.switch_to(self._next_runnable())

    def reschedule(self):
        """The running thread yielded, blocked or exited: run the next runnable one, waiting if none is."""
        cur = self.current
        if cur.state != EXITED and cur.ctx is None:
            self._save(cur)
        while True:
            self._take_host_signals()
            self._expire()
            nxt = self._next_runnable()
            if nxt is not None:
                break
            deadlines = [t.deadline for t in self.threads if t.deadline is not None]
            if deadlines:
                time.sleep(min(POLL, max(0, min(deadlines) - time.monotonic_ns()) / 1e9))
            elif any(t.state == SIGWAIT for t in self.threads):
                time.sleep(POLL)            # only a host signal can wake the process (as natively)
            else:
                raise Stop("deadlock", report=self.deadlock_report())
        self._load(nxt)
        self._deliver()

    def _deliver(self):
        """Signals pending for the thread just switched in; one woken from sigsuspend restores its mask."""
        t, m = self.current, self.m
        if t.suspend_mask is not None:
            mask, t.suspend_mask = t.suspend_mask, None
            if m.deliverable():
                m.deliver_pending(saved_mask=mask)
            else:                               # the signal went away (now ignored): just return
                m.sig.mask = mask
        elif m.sig.pending:
            m.deliver_pending()

    def switch_to(self, t):
        if t is None or t is self.current:
            return
        self._save(self.current)
        self._load(t)
        self._deliver()

    def deadlock_report(self):
        parts = [f"tid {t.tid} on futex 0x{t.futex[0]:08x}" if t.futex else f"tid {t.tid} {t.state}"
                 for t in self.threads]
        n = len(self.threads)
        return (f"deadlock: {'all ' + str(n) + ' guest threads are' if n > 1 else 'the only guest thread is'} "
                f"blocked with no timeout ({', '.join(parts)})")

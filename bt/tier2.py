"""Tier 2: hot regions of tier-1 code recompiled by LLVM at -O2 off the guest's thread.

Tier-1 blocks (bt.cache, LLVM -O0) count down from THRESHOLD executions and then
leave with EXIT_HOT.  The code cache then picks a *region*: the hot block and
the tier-1 blocks it reaches by direct jumps that are themselves warm.  The
region is re-emitted from the same semantics (bt.translate) with its internal
direct exits as direct calls, so LLVM's inliner and tail-call elimination turn
a guest loop into a host loop with guest registers in SSA and flags computed
only where live.  The Optimizer compiles it to an object on its own thread (its
own LLVM context and target machine: llvmlite releases the GIL while compiling) or,
in system mode, in a worker process of its own (`python -m bt.tier2`: no LLVM lock
shared with the guest thread), and the code cache swaps the region in between two
native runs, where no translated code is executing (bt.cache.CodeCache.poll_tier2).

BTVM_HOT=N sets the threshold (0 turns tier 2 off); BTVM_TIER2_SYNC=1 compiles on
the calling thread (tests: the swap then happens at a deterministic point).
"""
import atexit
import os
import struct
import subprocess
import sys
import threading
import time
from collections import deque

import llvmlite.binding as llvm

# Executions of a tier-1 block before its region goes to tier 2.  A cold Linux boot keeps the
# optimizer busy (223 regions, ~9 s of -O2 on the other core, queues of 10-20): at 50000 instead
# of 20000 it took 16.2 s against 16.7 s (mean of 7 interleaved rounds), at 8000 22 s; warm
# boots and tools/bench_user.py did not move.
THRESHOLD = int(os.environ.get("BTVM_HOT", "50000"))
SYNC = os.environ.get("BTVM_TIER2_SYNC", "") not in ("", "0")
MAX_BLOCKS = 12          # blocks per region
MAX_INSNS = 400          # guest instructions per region
# Regions of up to INLINE_BLOCKS blocks and INLINE_INSNS guest instructions are compiled as one
# loop (ModuleText inline): that runs small loops ~5-10% faster, but LLVM's time grows with the
# copies it inlines (every region inlined: a Linux boot's tier-2 compiles took twice as long; up
# to 100 instructions: a cold busybox shell loop's took 28 s instead of ~15).
INLINE_BLOCKS = 3
INLINE_INSNS = 100
# While tier 1 is busy compiling (a miss compiled within QUIET seconds) a hot block is re-armed
# instead of promoted: llvmlite serializes all LLVM calls, so a background -O2 compile then
# stalls the guest's own tier-1 compiles (measured: a cold Linux boot 17% slower).  Not with the
# worker process, which shares no lock: there waiting only kept hot code in tier 1 longer (a
# Linux boot's decompressor sent its first region 0.3 s later).
QUIET = 0.25
OPT = 2


class Job:
    """One region on its way through the optimizer."""
    __slots__ = ("owner", "old", "blocks", "names", "slots", "windows", "text", "obj", "error", "seconds")

    def __init__(self, owner, old, blocks, names, slots, windows, text):
        self.owner = owner            # the code cache that asked (it installs the region)
        self.old, self.blocks, self.names, self.slots, self.text = old, blocks, names, slots, text
        self.windows = windows        # each block's first guest bytes (disk-cache keys), taken at submit
        self.obj = self.error = None
        self.seconds = 0.0


class Optimizer:
    """Compiles tier-2 modules to relocatable objects, off the guest's thread."""

    def __init__(self, sync=None):
        from .jit import host_target_machine
        self.tm = host_target_machine(OPT, jit=True)
        self.chosen = sync is not None   # sync given by the caller (tests): kept in system mode too
        self.sync = SYNC if sync is None else sync
        self.done = deque()          # finished jobs: appended by the worker, drained by code caches
        self._todo = deque()
        self._wake = threading.Condition()
        self._thread = None
        self.inflight = 0            # submitted and not yet in done
        # Held by the worker for a whole compile.  llvmlite serializes every LLVM call with one
        # process-wide lock; a fork (a user-mode guest's fork) while the worker held it would leave
        # the child's LLVM locked forever.  So fork waits for the compile in progress, and the
        # child starts without a worker (its guest forked; its own code cache goes on).
        self._busy = threading.Lock()
        self._closed = False
        os.register_at_fork(before=lambda: self._busy.acquire(), after_in_parent=lambda: self._busy.release(),
                            after_in_child=self._after_fork_in_child)

    def submit(self, job):
        if self.sync:
            self._run(job)
            return
        with self._wake:
            self.inflight += 1
            self._todo.append(job)
            if self._thread is None:
                self._thread = threading.Thread(target=self._worker, name="btvm-tier2", daemon=True)
                self._thread.start()
                atexit.register(self.close)
            self._wake.notify()

    def _worker(self):
        while True:
            with self._wake:
                while not self._todo:
                    self._wake.wait()
                # Oldest first: the newest first (the code running now) made a cold Linux boot
                # slower, 14.7-15.2 s against 14.2-14.5 s (3 interleaved rounds).
                job = self._todo.popleft()
            with self._busy:
                if not self._closed:
                    self._run(job)
            with self._wake:
                self.inflight -= 1

    def busy(self):
        """True while the worker thread is compiling."""
        return self._busy.locked()

    def close(self):
        """Let the worker thread finish the compile in progress and start no other (run at
        interpreter exit).  exit() runs LLVM's static destructors -- its pass registries, its
        value-type tables -- and a compile still running on the daemon thread then crashed the
        process: SelectionDAG assertions or segfaults as short user-mode guests exited.  Regions
        dropped here are not stored: a later run promotes them again."""
        if self._closed:
            return
        with self._wake:
            self._closed = True
            self.inflight -= len(self._todo)
            self._todo.clear()
        if self.process:
            return      # compiled by the worker process: nothing of LLVM's runs in this one
        with self._busy:
            pass

    def _after_fork_in_child(self):
        if self._proc is not None:      # the parent's worker: not ours to use or stop
            for f in (self._proc.stdin, self._proc.stdout):
                try:
                    f.close()
                except OSError:
                    pass
            self._proc = None
        for job in self._todo:
            for t in job.old:
                t.promoting = False
        self._todo.clear()
        self._busy = threading.Lock()
        self._wake = threading.Condition()
        self._thread = None
        self._closed = False
        self.inflight = 0

    def _run(self, job):
        t0 = time.perf_counter()
        try:
            obj = self._in_worker(job.text) if self.process else None
            job.obj = obj if obj is not None else compile_region(self.tm, job.text)
        except Exception as exc:          # a bug of ours: the region just stays at tier 1
            job.error = exc
        job.seconds = time.perf_counter() - t0
        self.done.append(job)

    # ---- the worker process ----------------------------------------------------------------
    # With `process` set (system mode: the guest cannot see btvm's file descriptors), regions are
    # compiled by a child process: llvmlite serializes every LLVM call in a process, so a region
    # compiled on a thread stalls the guest thread's stencil compiles (a cold Linux boot's tier-2
    # work is ~20 s on the other core).
    process = False
    _proc = None

    def _in_worker(self, text):
        """The object compiled by the worker process, or None if it cannot be had (then the
        caller compiles in this process, and so does every later job)."""
        try:
            if self._proc is None:
                # Its own session: a terminal's Ctrl-C (SIGINT to the foreground group) is btvm's.
                self._proc = subprocess.Popen([sys.executable, "-m", "bt.tier2"], stdin=subprocess.PIPE,
                                              stdout=subprocess.PIPE, close_fds=True, start_new_session=True)
            data = text.encode()
            self._proc.stdin.write(struct.pack("<I", len(data)) + data)
            self._proc.stdin.flush()
            status, n = struct.unpack("<BI", _read_exactly(self._proc.stdout, 5))
            payload = _read_exactly(self._proc.stdout, n)
        except (OSError, ValueError, struct.error):
            self.process = False
            self._stop_worker()
            return None
        if status:
            raise RuntimeError(f"tier-2 worker: {payload.decode(errors='replace')}")
        return payload

    def worker_pid(self):
        """The worker process's pid, or None while there is none."""
        proc = self._proc
        return proc.pid if proc is not None else None

    def _stop_worker(self):
        proc, self._proc = self._proc, None
        if proc is not None:
            try:
                proc.stdin.close()
                proc.wait(timeout=5)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                proc.kill()

    def wait_idle(self, timeout=60.0):
        """Block until every submitted job is finished (tests, benchmarks)."""
        end = time.monotonic() + timeout
        while self.inflight and time.monotonic() < end:
            time.sleep(0.005)


def compile_region(tm, text):
    """A region module's text compiled at -O2 to a relocatable object."""
    # A context of its own: the guest thread keeps compiling tier-1 code in the global one.
    ctx = llvm.create_context()
    mod = llvm.parse_assembly(text, context=ctx)
    pto = llvm.create_pipeline_tuning_options(speed_level=OPT)
    pb = llvm.create_pass_builder(tm, pto)
    pb.getModulePassManager().run(mod, pb)
    return tm.emit_object(mod)


def _read_exactly(f, n):
    out = f.read(n)
    if len(out) != n:
        raise OSError("tier-2 worker closed its pipe")
    return out


def worker_main():
    """`python -m bt.tier2`: compile region modules read from stdin (length, text) and write
    (status, length, object or error) to stdout until stdin closes."""
    from .jit import host_target_machine
    tm = host_target_machine(OPT, jit=True)
    inp, out = sys.stdin.buffer, sys.stdout.buffer
    try:
        while True:
            head = inp.read(4)
            if len(head) < 4:
                return 0
            text = _read_exactly(inp, struct.unpack("<I", head)[0]).decode()
            try:
                status, payload = 0, compile_region(tm, text)
            except Exception as exc:
                status, payload = 1, repr(exc).encode()
            out.write(struct.pack("<BI", status, len(payload)) + payload)
            out.flush()
    except (OSError, KeyboardInterrupt):      # btvm went away: nothing to report, nothing to flush
        os._exit(0)


_shared = None


def use_worker_process():
    """Compile regions in a child process from now on (system mode: see Optimizer.process)."""
    opt = shared_optimizer()
    if opt is not None and not opt.chosen and not SYNC:
        opt.sync = False
        opt.process = True


def shared_optimizer():
    """The process-wide optimizer, or None when tier 2 is off."""
    global _shared
    if THRESHOLD <= 0:
        return None
    if _shared is None:
        _shared = Optimizer()
    return _shared


if __name__ == "__main__":
    sys.exit(worker_main())

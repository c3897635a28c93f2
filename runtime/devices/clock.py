"""The virtual clock: the only source of time for devices, plus one-shot timers.

Two modes:
  * host (default): ``now_ns()`` follows the host monotonic clock (from 0 at construction);
  * icount: ``now_ns() = icount() * ns_per_insn + warp``, where ``icount`` is a callable
    returning the guest's retired-instruction count. Fully deterministic. While the guest
    is halted no instructions retire, so the machine calls ``idle()`` which warps virtual
    time forward to the next timer deadline instead of sleeping.

Timers are one-shot: ``t = clock.timer(cb)``; ``t.mod(when_ns)`` (re)arms, ``t.cancel()``
disarms. Callbacks run only from ``run_due()`` (called by the machine between translated
code slices and after idle), as ``cb(deadline_ns)``, in deadline order.

Machine loop sketch::

    while running:
        budget = clock.insns_until_deadline()   # icount: end the slice at the next deadline
        cpu.run(budget)                         # translated code
        clock.run_due()
        if cpu.halted and not pic.pending():
            clock.idle()                        # sleep (host) / warp (icount) to next deadline
"""
import heapq
import itertools
import time


class Timer:
    __slots__ = ("clock", "callback", "expires", "_seq", "name")

    def __init__(self, clock, callback, name=None):
        self.clock = clock
        self.callback = callback
        self.expires = None
        self._seq = None
        self.name = name

    @property
    def pending(self):
        return self.expires is not None

    def mod(self, when_ns):
        """Arm (or re-arm) the timer to fire at virtual time when_ns."""
        self.clock._arm(self, int(when_ns))

    def mod_in(self, delta_ns):
        self.mod(self.clock.now_ns() + delta_ns)

    def cancel(self):
        self.expires = None
        self._seq = None

    def __repr__(self):
        return f"Timer({self.name or self.callback!r}, expires={self.expires})"


class VirtualClock:
    def __init__(self, icount=None, ns_per_insn=1, host_ns=time.monotonic_ns, advance=None):
        """advance(ns), in icount mode, moves the instruction-time source itself forward when
        virtual time warps (so the CPU's TSC, which counts the same time, keeps step)."""
        self._icount = icount
        self._advance = advance
        self.ns_per_insn = ns_per_insn
        self._host_ns = host_ns
        self._host_base = host_ns()
        self._warp = 0
        self._last = 0
        self._heap = []
        self._seq = itertools.count()
        self.max_callbacks_per_poll = 100000
        # on_earlier(): called when a timer is armed before every other deadline (the machine's
        # time slice, computed from the old earliest deadline, must end sooner).
        self.on_earlier = None

    @property
    def icount_mode(self):
        return self._icount is not None

    def now_ns(self):
        if self._icount is not None:
            t = self._icount() * self.ns_per_insn + self._warp
        else:
            t = self._host_ns() - self._host_base + self._warp
        t = int(t)
        if t < self._last:          # never run backwards
            t = self._last
        self._last = t
        return t

    # ---- timers -------------------------------------------------------------------------
    def timer(self, callback, name=None):
        return Timer(self, callback, name)

    def call_at(self, when_ns, callback, name=None):
        t = Timer(self, callback, name)
        t.mod(when_ns)
        return t

    def _arm(self, timer, when):
        head = self.next_deadline() if self.on_earlier is not None else None
        seq = next(self._seq)
        timer.expires = when
        timer._seq = seq
        heapq.heappush(self._heap, (when, seq, timer))
        if head is not None and when < head or head is None and self.on_earlier is not None:
            self.on_earlier()

    def _clean(self):
        h = self._heap
        while h and h[0][2]._seq != h[0][1]:
            heapq.heappop(h)

    def next_deadline(self):
        """Virtual time (ns) of the earliest armed timer, or None."""
        self._clean()
        return self._heap[0][0] if self._heap else None

    def ns_until_deadline(self):
        d = self.next_deadline()
        return None if d is None else max(0, d - self.now_ns())

    def insns_until_deadline(self):
        """icount mode: instructions the CPU may run before the next deadline (>= 1), or None."""
        if self._icount is None:
            return None
        d = self.ns_until_deadline()
        if d is None:
            return None
        return max(1, -(-d // self.ns_per_insn))

    def run_due(self):
        """Run every timer whose deadline has passed, earliest first. Returns how many ran."""
        n = 0
        h = self._heap
        now = self.now_ns()
        while h and n < self.max_callbacks_per_poll:
            when, seq, t = h[0]
            if t._seq != seq:
                heapq.heappop(h)
                continue
            if when > now:
                break
            heapq.heappop(h)
            t.expires = None
            t._seq = None
            t.callback(when)
            n += 1
            now = self.now_ns()
        return n

    # ---- idling (HLT) -------------------------------------------------------------------
    def warp(self, delta_ns):
        """Move virtual time forward by delta_ns (both modes)."""
        if delta_ns > 0:
            if self._icount is not None and self._advance is not None:
                self._advance(int(delta_ns))
            else:
                self._warp += int(delta_ns)

    def idle(self, max_ns=None):
        """Wait for the next deadline: icount mode warps virtual time to it, host mode sleeps.
        With no timer armed, waits max_ns (or returns at once if None). Then runs due timers."""
        d = self.ns_until_deadline()
        if d is None:
            d = max_ns
        elif max_ns is not None:
            d = min(d, max_ns)
        if d:
            if self._icount is not None:
                self.warp(d)
            else:
                time.sleep(d / 1e9)
        return self.run_due()

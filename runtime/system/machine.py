"""The virtual PC: RAM, the system-mode CPU, the legacy devices, and the run loop.

The loop runs translated code in slices; between slices it fires due device
timers and delivers a pending interrupt when EFLAGS.IF allows it (and no
STI/MOV SS shadow is active).  HLT with IF set sleeps until the next device
deadline; HLT with IF clear stops the machine: that is how the demo guest and a
Linux kernel without ACPI power off.
"""
import sys

from bt import state as S
from bt.decode import MAX_BLOCK_INSNS
from runtime.cpu import GuestFault, Stop
from runtime.memory import GuestMemory

from .callouts import HANDLERS
from .syscpu import SystemCPU, TripleFault

# A slice runs until the next device deadline, within these bounds.  Each slice is a trip through
# Python (devices, console, interrupt check): 20,000-instruction slices cost a warm boot ~640,000
# of them.  An interrupt that becomes deliverable inside a slice ends it (st.irq_pending).
MIN_SLICE = 2_000
MAX_SLICE = 4_000_000
SLICE_NS = 2_000_000    # host-clock mode: longest wall time a slice should take (console, timeout)
TIMEOUT_STATUS = 124   # timeout(1)'s status for a command that ran out of time


class MachineExit(Exception):
    """Ends Machine.run with an exit status and a one-line report (may be empty).  reset: the
    guest asked for a reset or triple-faulted (a shutdown cycle, which resets a PC's CPU): the
    caller may boot again (btvm boot does, as QEMU, unless -no-reboot)."""

    def __init__(self, status, message="", reset=False):
        super().__init__(message)
        self.status, self.message, self.reset = status, message, reset


class Machine:
    def __init__(self, ram_mb=128, serial_out=None, icount=False, reset_exits=True, rtc_base=None):
        from runtime.devices import build_pc
        from runtime.devices.bus import IOBus
        from runtime.devices.clock import VirtualClock
        self.ram_size = ram_mb << 20
        self.mem = GuestMemory()
        self.bus = IOBus()
        self.cpu = SystemCPU(self.mem, self.ram_size, self.bus)
        self.cpu.callouts.update(HANDLERS)
        self.cpu.on_exception = self._exception
        self.cpu.interrupt_shadow = False
        self.cpu.shadow_at = 0
        # Halted time (an idle warp) is charged to extra_ns like I/O time: the TSC (instructions +
        # extra_ns) and the devices then agree; with the warp outside, a halted guest saw its TSC
        # run at half the PIT's rate ("Marking clocksource 'tsc-early' as unstable").
        self.clock = VirtualClock(icount=(lambda: self.cpu.icount + self.cpu.extra_ns) if icount else None,
                                  advance=self._charge_idle)
        # COM1 to stdout by default, gathered and written once per time slice (run()): a write
        # and a flush per character cost a system call each (~15,000 for a Linux boot's log).
        self._serial = bytearray()
        out = serial_out or self._serial.extend
        self.pc = build_pc(self.bus, self.clock, ram_mb, out, on_reset=self._reset, on_exit=self._debug_exit,
                           rtc_start_time=rtc_base, on_intr=self._intr)
        self.reset_exits = reset_exits
        self.halted = False
        self._rate = 0.01       # guest instructions per host ns (EMA over slices; host-clock mode)
        self._slice_end = None
        self.cpu.after_io = self._after_io
        self.clock.on_earlier = self._deadline_moved
        from bt import tier2
        tier2.use_worker_process()      # the guest cannot see btvm's file descriptors here

    # ---- device callbacks ---------------------------------------------------------------------------
    def _charge_idle(self, ns):
        self.cpu.extra_ns += ns

    def _intr(self, level):
        # The INTR pin, where translated code and the run loop see it: with IF it ends the run
        # (CPU.run), and a POPF that sets IF leaves its block (bt/semantics/flagops.py).
        self.cpu.st.irq_pending = (1 << S.IF) if level else 0

    def _deadline_moved(self):
        # A device (an OUT to the PIT, say) armed a timer before the deadline the current slice
        # runs to: end the slice after this instruction, so the timer fires on time.
        self.cpu.end_slice = True

    def _reset(self):
        raise MachineExit(0, "guest requested a reset", reset=True)

    def _debug_exit(self, status):
        raise MachineExit(status)

    # ---- exceptions ------------------------------------------------------------------------------------
    def _exception(self, cpu, vector, error, fault_addr):
        if vector == 14 and fault_addr is not None:
            cpu.cr2 = fault_addr
        try:
            cpu.deliver(vector, error)
        except TripleFault as tf:
            raise MachineExit(1, f"btvm: {tf} at eip={cpu.st.eip:#x}", reset=True)

    # ---- boot ----------------------------------------------------------------------------------------
    def load_multiboot(self, image, cmdline=""):
        from runtime.boot import multiboot
        entry, info = multiboot.load(image, self.cpu.write_phys, self.ram_size, cmdline)
        cpu = self.cpu
        cpu.set_reg("eax", multiboot.BOOTLOADER_MAGIC)
        cpu.set_reg("ebx", info)
        cpu.set_reg("esp", 0x7000)
        cpu.set_reg("eip", entry)
        cpu.set_eflags(2)

    def load_linux(self, image, cmdline="", initrd=None):
        from runtime.boot import linux
        from .descriptors import Segment
        entry = linux.load(image, self.cpu.write_phys, self.ram_size, cmdline, initrd)
        cpu = self.cpu
        cpu.gdtr = entry["gdt"]
        for r in (S.ES, S.SS, S.DS, S.FS, S.GS):
            cpu.segs[r] = Segment.flat(entry["ds"], False)
        cpu.segs[S.CS] = Segment.flat(entry["cs"], True)
        cpu.sync_segments()
        for r in ("eax", "ebx", "ecx", "edx", "edi", "ebp", "esp"):
            cpu.set_reg(r, 0)
        cpu.set_reg("esi", entry["esi"])
        cpu.set_reg("eip", entry["eip"])
        cpu.set_eflags(2)

    # ---- running -------------------------------------------------------------------------------------
    def _interrupt(self):
        cpu = self.cpu
        if not cpu.st.eflags & (1 << S.IF) or not self.pc.pic.pending():
            return False
        if self._in_shadow():
            return False            # the run loop runs the shadowed instruction alone first
        vector = self.pc.pic.acknowledge()
        self.halted = False
        self._exception_safe(lambda: cpu.deliver(vector, None, return_eip=cpu.st.eip))
        return True

    def _in_shadow(self):
        """Whether the instruction just executed was an STI/MOV SS whose shadow covers the next one.
        A run goes on past them (the machine sees pending interrupts at the end of its slice), so a
        shadow that is not the last instruction has long passed: running the instruction the slice
        stopped at on its own (budget 1) would only translate it again, at a random place each boot."""
        cpu = self.cpu
        if cpu.interrupt_shadow and cpu.icount != cpu.shadow_at:
            cpu.interrupt_shadow = False
        return cpu.interrupt_shadow

    def _slice(self):
        """Instructions to run before the machine looks at its devices again; sets the time the
        slice should end by (_slice_end, virtual ns), which port I/O checks (_after_io)."""
        if self._in_shadow():
            self._slice_end = None
            return 1
        clock = self.clock
        deadline = clock.next_deadline()
        if clock.icount_mode:
            self._slice_end = deadline
            n = clock.insns_until_deadline()
            # At least a whole block: a shorter budget would make the run loop translate the
            # block it stopped at one instruction at a time (KEY_STEP), wherever the guest is.
            return MAX_SLICE if n is None else max(MAX_BLOCK_INSNS, min(MAX_SLICE, n))
        now = clock.now_ns()
        self._slice_end = now + SLICE_NS if deadline is None else min(deadline, now + SLICE_NS)
        return max(MIN_SLICE, min(MAX_SLICE, int((self._slice_end - now) * self._rate)))

    def _after_io(self):
        # Port I/O costs virtual time (IO_NS) and, in host-clock mode, much wall time: a slice
        # of polling loops would run far past the deadline it was sized for.
        if self._slice_end is not None and self.clock.now_ns() >= self._slice_end:
            self.cpu.end_slice = True

    def _measure(self, done, ns):
        """Feed one slice's speed into the rate that turns deadlines into instruction counts."""
        if done > 1000 and ns > 0:
            self._rate += (done / ns - self._rate) * 0.25

    def _exception_safe(self, fn):
        try:
            fn()
        except TripleFault as tf:
            raise MachineExit(1, f"btvm: {tf}", reset=True)

    def run(self, console=None, status_every=None, timeout=None, started=None):
        """Run until the guest powers off, exits through isa-debug-exit or fails; returns the status.

        console (runtime.system.console.Console) feeds stdin to COM1; status_every (seconds)
        prints a status line (guest MIPS, blocks compiled in all tiers, the code cache's memory as
        runtime.memstat measures it) on stderr; timeout (seconds of wall clock, counted from the
        time.monotonic() value started, default now) stops a guest that never ends with status
        124, as timeout(1) does."""
        cpu = self.cpu
        import time
        from .console import QuitRequest
        t_last = t0 = time.monotonic()
        memory = None
        if status_every is not None:
            from bt import tier2
            from runtime.memstat import CacheMemory
            opt = tier2.shared_optimizer()
            memory = CacheMemory(self.mem.base, self.ram_size, opt.worker_pid if opt is not None else lambda: None)
        deadline = None if timeout is None else (t0 if started is None else started) + timeout
        i_last = 0
        try:
            while True:
                if self._serial:
                    self._flush_serial()
                # Once per slice (or idle step while halted): a spinning or halted guest is
                # caught within one slice of the limit.
                if deadline is not None and time.monotonic() >= deadline:
                    raise MachineExit(TIMEOUT_STATUS, f"btvm: timeout after {timeout:g} s (-timeout) at "
                                                      f"eip={cpu.st.eip:#x}" + (" (halted)" if self.halted else ""))
                self.clock.run_due()
                if console is not None:
                    console.poll()
                if status_every is not None and time.monotonic() - t_last >= status_every:
                    now = time.monotonic()
                    c = cpu.cache.counters
                    used = memory.bytes()
                    print(f"\r\nbtvm: {now - t0:7.1f}s  {(cpu.icount - i_last) / (now - t_last) / 1e6:7.1f} MIPS  "
                          f"{cpu.icount / 1e9:6.2f}G insns  {c['compiled_blocks'] + c['tier2_blocks']} blocks compiled  "
                          f"{c['persistent_hits']} from disk"
                          + (f"  code cache {used / 2**20:.0f} MiB" if used is not None else "")
                          + "\r", file=sys.stderr, flush=True)
                    t_last, i_last = now, cpu.icount
                self._interrupt()
                if self.halted:
                    if not cpu.st.eflags & (1 << S.IF):
                        raise MachineExit(0, "")   # CLI; HLT: the guest stopped the CPU (power off)
                    if console is not None and not console.eof and not self.clock.icount_mode:
                        # Sleep until the next timer, but wake up for typed keys.
                        d = self.clock.ns_until_deadline()
                        console.poll(0.05 if d is None else min(0.05, d / 1e9))
                        self.clock.idle(max_ns=0)
                    else:
                        self.clock.idle(max_ns=50_000_000)
                    continue
                if not self.clock.icount_mode:
                    # Host clock: the TSC (instructions + charged time) must not fall behind the
                    # devices' time, or the kernel's TSC calibration against the PIT measures
                    # btvm's speed (and halted time would not count at all).
                    lag = self.clock.now_ns() - cpu.icount - cpu.extra_ns
                    if lag > 0:
                        cpu.extra_ns += lag
                budget = self._slice()
                # The slice may end a block early (exact=False); the interrupt shadow's one
                # instruction must be exact.
                i0, t_run = cpu.icount, time.monotonic_ns()
                cpu.end_slice = False       # a timer re-armed between slices (run_due) is in budget
                stop = cpu.run(budget, exact=budget == 1)
                self._measure(cpu.icount - i0, time.monotonic_ns() - t_run)
                if budget == 1:
                    cpu.interrupt_shadow = False
                if stop.reason in ("max_instructions", "event"):
                    continue
                if stop.reason == "hlt":
                    self.halted = True
                    continue
                if stop.reason == "exception":
                    raise MachineExit(1, f"btvm: unhandled exception {stop.info}")
                if stop.reason == "unsupported":
                    raise MachineExit(1, f"btvm: {stop.info.get('message')} (eip={cpu.st.eip:#x})")
                raise MachineExit(1, f"btvm: the VM stopped: {stop.reason} {stop.info}")
        except MachineExit as e:
            return e
        except QuitRequest:
            return MachineExit(0, "btvm: quit (Ctrl-A x)")
        except TripleFault as tf:
            return MachineExit(1, f"btvm: {tf} at eip={cpu.st.eip:#x}", reset=True)
        except GuestFault as f:
            return MachineExit(1, f"btvm: fault {f.vector} outside guest delivery at eip={cpu.st.eip:#x}")
        finally:
            if self._serial:
                try:
                    self._flush_serial()
                except BrokenPipeError:
                    pass

    def _flush_serial(self):
        data = bytes(self._serial)
        self._serial.clear()            # written or not (a closed pipe): never twice
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()

    def close(self):
        self.mem.close()

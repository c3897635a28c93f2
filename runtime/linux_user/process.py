"""A Linux i386 user-mode process on the translator: memory, CPU, syscalls, TLS and signals.

Host fds are the guest's fds and the host pid is the guest's pid: fork() is os.fork() (the guest
memory is one MAP_PRIVATE mapping, so the child gets a copy-on-write image), and execve of another
static i386 program replaces the machine inside the same host process.
"""
import errno as E
import os
import resource
import signal as hostsig
import sys
import time

from bt import state as S
from ..cpu import CPU, GuestFault, Stop
from ..cpuid import handle_cpuid
from ..memory import GuestMemory, PAGE, R, W, X
from . import elf
from .syscalls import TABLE, I386_NAMES, EFault, SysError
from .syscalls import signals as sg
from .syscalls.memory import MMAP_TOP, MMAP_BOTTOM
from .threads import Scheduler

SLICE = 1 << 22
TRAMPOLINE = 0xFFFFE000
# pop eax; mov eax, 119 (sigreturn); int 0x80 | mov eax, 173 (rt_sigreturn); int 0x80
TRAMPOLINE_CODE = bytes.fromhex("58b877000000cd80") + bytes.fromhex("b8ad000000cd80")
ARG_REGS = ("ebx", "ecx", "edx", "esi", "edi", "ebp")
_WARNED = set()


def _x87_fpe_code(cpu):
    """si_code of the SIGFPE for an x87 #MF: the first unmasked exception in the status word, in
    Linux's order (fpu__exception_code): invalid, zero divide, overflow, denormal or underflow,
    precision; 0 when none is (a spurious trap)."""
    img = cpu.st.fpu
    cw = img[S.FPU_CW] | img[S.FPU_CW + 1] << 8
    err = (img[S.FPU_SW] | img[S.FPU_SW + 1] << 8) & ~cw
    for bits, code in ((0x01, 7), (0x04, 3), (0x08, 4), (0x12, 5), (0x20, 6)):   # FPE_FLTINV...
        if err & bits:
            return code
    return 0


class Machine:
    def __init__(self, path, argv, env, strace=False, sigstate=None, execfn=None):
        self.exe_path = os.path.abspath(path)
        self.strace = strace
        self.mem = GuestMemory()
        self.mapped = bytearray(1 << 20)          # one byte per page: 1 if mapped (any permission)
        self.cpu = CPU(self.mem, S.make_key(cpl=3))
        self.cpu.cr0_am = True      # Linux sets CR0.AM: EFLAGS.AC makes misaligned accesses SIGBUS
        self.tls = {}
        self.sig = sigstate or sg.SignalState()
        self.reserved_fds = set()
        self.clear_child_tid = 0
        self.sched = Scheduler(self, os.getpid())
        self._keep = []
        try:
            self.image = elf.load(self.mem, path, self.mark_mapped)
            self.brk_start = self.brk = self.image.brk
            sp = elf.setup_stack(self.mem, self.image, argv, env, execfn or path, self.mark_mapped,
                                 (os.getuid(), os.geteuid(), os.getgid(), os.getegid()))
        except BaseException:
            self.mem.close()
            raise
        self.mem.map(TRAMPOLINE, PAGE, R | X)
        self.mark_mapped(TRAMPOLINE, PAGE)
        self.mem.write(TRAMPOLINE, TRAMPOLINE_CODE)
        self.trampoline = TRAMPOLINE
        c = self.cpu
        c.set_reg("esp", sp)
        c.set_reg("eip", self.image.entry)
        c.set_reg("eflags", 0x202)
        for seg, sel in ((S.CS, sg.USER_CS), (S.SS, sg.USER_DS), (S.DS, sg.USER_DS), (S.ES, sg.USER_DS)):
            c.st.seg_sel[seg] = sel
        c.callouts.update({"int": self._int, "movspecial": self._movspecial, "segload": self._segload,
                           "cpuid": handle_cpuid, "rdtsc": self._rdtsc})
        for name in ("hlt", "intflag", "io", "msr", "descriptor", "cache", "iret", "farjump", "segcheck",
                     "sysenter"):
            c.callouts[name] = self._gp
        c.on_exception = self._on_exception
        c.on_single_step = self._single_step
        sg.set_host_disposition(self, 0, None)

    def close(self):
        self.mem.close()

    # ---- helpers for syscalls ---------------------------------------------------------------------
    def keep(self, obj):
        self._keep.append(obj)
        return obj

    def warn_once(self, key, message):
        if key not in _WARNED:
            _WARNED.add(key)
            sys.stderr.write(f"btvm: {message}\n")
            sys.stderr.flush()

    def wrote(self, addr, n):
        """The host wrote guest memory: drop translations of code in that range."""
        if n <= 0:
            return
        cache = self.cpu.cache
        for page in range(addr & ~(PAGE - 1), addr + n, PAGE):
            if cache.has_code(page & 0xFFFFFFFF):
                cache.invalidate_page(page & 0xFFFFFFFF, "smc")

    def mark_mapped(self, addr, size):
        first, last = addr // PAGE, (addr + size + PAGE - 1) // PAGE
        self.mapped[first:last] = b"\1" * (last - first)

    def range_free(self, addr, size):
        first, last = addr // PAGE, (addr + size + PAGE - 1) // PAGE
        return last <= len(self.mapped) and not any(self.mapped[first:last])

    def range_mapped(self, addr, size):
        first, last = addr // PAGE, (addr + size + PAGE - 1) // PAGE
        return last <= len(self.mapped) and all(self.mapped[first:last])

    def find_free(self, size):
        n = size // PAGE
        i = self.mapped.rfind(bytes(n), MMAP_BOTTOM // PAGE, MMAP_TOP // PAGE)
        if i < 0:
            i = self.mapped.rfind(bytes(n), max(self.brk_start // PAGE + 0x1000, 16), elf.STACK_TOP // PAGE - 0x8000)
        return None if i < 0 else i * PAGE

    def _flush_code(self, addr, size):
        self.cpu.tlb_flush()
        cache = self.cpu.cache
        for page in range(addr, addr + size, PAGE):
            if cache.has_code(page):
                cache.invalidate_page(page, "unmap")

    def map_region(self, addr, size, perm):
        self.mem.unmap(addr, size)
        self._flush_code(addr, size)
        self.mem.map(addr, size, perm)
        self.mark_mapped(addr, size)

    def unmap_region(self, addr, size):
        self.mem.unmap(addr, size)
        first, last = addr // PAGE, (addr + size + PAGE - 1) // PAGE
        self.mapped[first:last] = bytes(last - first)
        self._flush_code(addr, size)

    def protect_region(self, addr, size, perm):
        self.mem.map(addr, size, perm)
        self._flush_code(addr, size)

    # ---- segments and TLS -------------------------------------------------------------------------
    def load_segment(self, seg, sel):
        sel &= 0xFFFF
        st = self.cpu.st
        if sel & ~3 == 0:
            if seg in (S.SS, S.CS):
                raise GuestFault(13, 0)
            st.seg_sel[seg], st.seg_base[seg] = sel, 0
            return
        idx = sel >> 3
        if sel & 4 or sel & 3 != 3:
            raise GuestFault(13, sel & 0xFFFC)
        if idx in (4, 5):
            base = 0
        elif idx in self.tls:
            base = self.tls[idx][0]
        else:
            raise GuestFault(13, sel & 0xFFFC)
        st.seg_sel[seg], st.seg_base[seg] = sel, base

    def _ea(self, mem):
        regs = self.cpu.st.regs
        a = mem.disp
        if mem.base is not None:
            a += regs[mem.base.index]
        if mem.index is not None:
            a += regs[mem.index.index] * mem.scale
        a &= 0xFFFF if mem.addr16 else 0xFFFFFFFF
        return (a + self.cpu.st.seg_base[mem.seg]) & 0xFFFFFFFF

    def _uread(self, addr, n):
        bad = self.mem.check(addr, n, R)
        if bad is not None:
            raise GuestFault(14, 4 | (1 if self.mem.page_perm(bad) else 0), bad)
        return int.from_bytes(self.mem.read(addr, n), "little")

    def _movspecial(self, cpu, insn):
        dst, src = insn.ops[0], insn.ops[1]
        if dst.kind != "seg":
            raise GuestFault(13, 0)
        if src.kind == "reg":
            v = cpu.st.regs[src.reg.index] & 0xFFFF
        elif src.kind == "mem":
            v = self._uread(self._ea(src.mem), 2)
        else:
            raise GuestFault(6)
        self.load_segment(dst.reg, v)
        cpu.set_reg("eip", insn.next)
        if dst.reg == S.SS:
            cpu.debug_shadow = True      # MOV SS: no single-step trap at the next boundary

    def _segload(self, cpu, insn):
        m = insn.mnemonic
        if m.startswith("pop"):
            seg = insn.ops[0].reg
            esp = cpu.reg("esp")
            v = self._uread(esp, 2)
            self.load_segment(seg, v)
            cpu.set_reg("esp", esp + insn.opsize)
            if seg == S.SS:
                cpu.debug_shadow = True
        else:
            seg = {"lds": S.DS, "les": S.ES, "lfs": S.FS, "lgs": S.GS, "lss": S.SS}[m]
            a = self._ea(insn.ops[1].mem)
            size = insn.ops[0].size
            off = self._uread(a, size)
            sel = self._uread(a + size, 2)
            self.load_segment(seg, sel)
            r = insn.ops[0].reg.index
            if size == 2:
                cpu.st.regs[r] = (cpu.st.regs[r] & 0xFFFF0000) | off
            else:
                cpu.st.regs[r] = off
        cpu.set_reg("eip", insn.next)

    def _rdtsc(self, cpu, insn):
        t = time.monotonic_ns() * 3
        cpu.set_reg("eax", t & 0xFFFFFFFF)
        cpu.set_reg("edx", (t >> 32) & 0xFFFFFFFF)
        cpu.set_reg("eip", insn.next)

    def _gp(self, cpu, insn):
        raise GuestFault(13, 0)

    # ---- INT and syscalls -------------------------------------------------------------------------
    def _int(self, cpu, insn):
        vec = cpu.st.callout_arg
        # INT n/INT3/INTO (with OF) enter the kernel through a gate that clears TF: the CPU does
        # not single-step trap them (Linux synthesizes no trap either without ptrace).
        cpu.step_event = not (insn.mnemonic == "into" and not cpu.reg("eflags") & (1 << S.OF))
        if insn.mnemonic == "int" and vec == 0x80:
            cpu.set_reg("eip", insn.next)
            self.syscall()
            return
        if insn.mnemonic == "int3":
            cpu.set_reg("eip", insn.next)
            self.force_signal(sg.SIGTRAP, (sg.SI_KERNEL, 0), (3, 0, 0))
            return
        if insn.mnemonic == "into":
            if not cpu.reg("eflags") & (1 << S.OF):
                cpu.set_reg("eip", insn.next)
                return
            cpu.set_reg("eip", insn.next)
            self.force_signal(sg.SIGSEGV, (sg.SI_KERNEL, 0), (4, 0, 0))
            return
        raise GuestFault(13, (vec << 3) | 2)

    def syscall(self):
        c = self.cpu
        nr = c.reg("eax")
        args = [c.reg(r) for r in ARG_REGS]
        name = I386_NAMES.get(nr, f"syscall_{nr}")
        entry = TABLE.get(name)
        ret = None
        try:
            if entry is None:
                self.warn_once(("nosys", nr), f"unimplemented syscall {name} (nr {nr}), returning -ENOSYS")
                ret = -E.ENOSYS
            else:
                fn = entry[0]
                n = fn.__code__.co_argcount - 1
                try:
                    ret = fn(self, *args[:n])
                except EFault:
                    ret = -E.EFAULT
                except SysError as exc:
                    ret = -exc.err
                except sg.Return as rr:
                    if self.strace:
                        self._trace(name, entry, args, rr.eax)
                    self.deliver_pending()
                    return
        except Stop as stop:
            if self.strace:      # a yield shows its result; a blocking wait's comes when the thread resumes
                t = self.sched.current
                self._trace(name, entry, args, t.result if stop.reason == "switch" else None)
            raise
        finally:
            self._keep.clear()
        c.set_reg("eax", ret)
        if self.strace:
            self._trace(name, entry, args, ret)
        if self.sig.pending:
            self.deliver_pending()

    def _trace(self, name, entry, args, ret):
        fmt = entry[1] if entry else "xxxxxx"
        out = []
        for f, v in zip(fmt, args):
            if f == "s":
                try:
                    raw = self.mem.read(v, 64).split(b"\0")[0] if self.mem.check(v, 1, R) is None else None
                except Exception:
                    raw = None
                out.append(repr(raw.decode("latin-1")).replace("'", '"') if raw is not None else f"0x{v:x}")
            elif f in "df":
                out.append(str(v - (1 << 32) if v & 0x80000000 else v))
            elif f == "u":
                out.append(str(v))
            elif f == "o":
                out.append(f"0{v:o}")
            else:
                out.append(f"0x{v:x}" if v else "NULL" if f == "p" else "0")
        if ret is None:
            r = "?"
        elif -4096 < ret < 0:
            r = f"-1 {E.errorcode.get(-ret, '?')} ({os.strerror(-ret)})"
        else:
            r = str(ret) if ret < 0x10000 else f"0x{ret & 0xFFFFFFFF:x}"
        sys.stderr.write(f"[{self.sched.current.tid}] {name}({', '.join(out)}) = {r}\n")
        sys.stderr.flush()

    # ---- signals ----------------------------------------------------------------------------------
    def raise_signal(self, sig, info=None, thread=None):
        """Make sig pending: for `thread`, or for the process (a thread that does not block it)."""
        if sig <= 0:
            return
        h = self.sig.action(sig)[0]
        if h == sg.SIG_IGN or h == sg.SIG_DFL and sig in sg.DEFAULT_IGNORE | sg.DEFAULT_STOP:
            return
        info = info or (sg.SI_TKILL, os.getpid(), os.getuid())
        if thread is not None:
            self.sched.signal_thread(thread, sig, info)
        else:
            self.sched.route(sig, info)

    def force_signal(self, sig, info, trap):
        """A synchronous signal from a fault: delivered now, or fatal if blocked/ignored/default."""
        h = self.sig.action(sig)[0]
        if h in (sg.SIG_DFL, sg.SIG_IGN) or self.sig.mask & sg.bit(sig):
            raise Stop("signal", sig=sig)
        sg.setup_frame(self, sig, info, trap)

    def deliverable(self):
        return any(not self.sig.mask & sg.bit(s) for s in self.sig.pending)

    def deliver_pending(self, saved_mask=None):
        for s in sorted(self.sig.pending):
            if self.sig.mask & sg.bit(s):
                continue
            info = self.sig.pending.pop(s)
            h = self.sig.action(s)[0]
            if h == sg.SIG_IGN:
                continue
            if h == sg.SIG_DFL:
                if s in sg.DEFAULT_IGNORE or s in sg.DEFAULT_STOP:
                    continue
                raise Stop("signal", sig=s)
            sg.setup_frame(self, s, info, saved_mask=saved_mask)
            return

    def _single_step(self, cpu):
        """EFLAGS.TF trap after an instruction: SIGTRAP with si_code TRAP_TRACE and si_addr the next
        instruction, trapno 1 and err 0 in the sigcontext (Linux exc_debug_user, send_sigtrap)."""
        self.force_signal(sg.SIGTRAP, (sg.TRAP_TRACE, cpu.reg("eip")), (1, 0, 0))

    def _on_exception(self, cpu, vector, error, fault_addr):
        eip = cpu.reg("eip")
        err = error or 0
        if vector == 14:
            sig, info = sg.SIGSEGV, (2 if err & 1 else 1, fault_addr or 0)
        elif vector == 0:
            sig, info = sg.SIGFPE, (1, eip)          # FPE_INTDIV
        elif vector == 6:
            sig, info = sg.SIGILL, (2, eip)          # ILL_ILLOPN
        elif vector in (1, 3):
            sig, info = sg.SIGTRAP, (sg.SI_KERNEL, 0)
        elif vector == 16:
            sig, info = sg.SIGFPE, (_x87_fpe_code(cpu), eip)
        elif vector == 19:
            sig, info = sg.SIGFPE, (0, eip)
        elif vector == 17:
            sig, info = sg.SIGBUS, (1, fault_addr or 0)
        else:
            sig, info = sg.SIGSEGV, (sg.SI_KERNEL, 0)
        self.force_signal(sig, info, (vector, err, fault_addr or 0))

    # ---- running ------------------------------------------------------------------------------------
    def run(self):
        while True:
            try:
                stop = self.cpu.run(SLICE)
                if stop.reason == "max_instructions":
                    if self.sig.pending:
                        self.deliver_pending()
                    if self.sched.multi:
                        self.sched.preempt()
                    continue
                if stop.reason == "switch":           # the running thread yielded, blocked or exited
                    self.sched.reschedule()
                    continue
            except Stop as s:
                stop = s
            except GuestFault as f:
                try:
                    self._on_exception(self.cpu, f.vector, f.error, f.fault_addr)
                    continue
                except Stop as s:
                    stop = s
            return stop


def _close_cloexec_fds():
    import fcntl
    try:
        fds = [int(x) for x in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        try:
            if fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC:
                os.close(fd)
        except OSError:
            pass


def run_program(path, argv, env, strace=False):
    """Run a static i386 Linux program; returns its exit status (0..255), or -N if signal N killed it.

    Raises elf.ElfError (with .status) if the program cannot be loaded."""
    try:
        resource.setrlimit(resource.RLIMIT_CORE, (0, resource.getrlimit(resource.RLIMIT_CORE)[1]))
    except (ValueError, OSError):
        pass
    hostsig.signal(hostsig.SIGINT, hostsig.SIG_DFL)
    m = Machine(path, argv, env, strace)
    while True:
        try:
            stop = m.run()
        finally:
            sys.stdout.flush()
        if stop.reason == "exit":
            return stop.info["status"]
        if stop.reason == "signal":
            return -stop.info["sig"]
        if stop.reason == "exec":
            info = stop.info
            sigstate = m.sig
            sigstate.after_exec()
            for s in range(1, 32):
                if s in sg._ASYNC_OK and sigstate.action(s)[0] != sg.SIG_IGN:
                    sg.set_host_disposition(m, s, sg.SIG_DFL)
            _close_cloexec_fds()
            m.close()
            m = Machine(info["path"], info["argv"], info["env"], strace, sigstate)
            continue
        if stop.reason == "deadlock":
            sys.stderr.write(f"btvm: {stop.info['report']}\n")
            return 1
        if stop.reason == "unsupported":
            sys.stderr.write(f"btvm: unsupported instruction at 0x{stop.info.get('eip', 0):08x}: "
                             f"{stop.info.get('message')}\n")
            return 1
        sys.stderr.write(f"btvm: machine stopped: {stop.reason} {stop.info}\n")
        return 1

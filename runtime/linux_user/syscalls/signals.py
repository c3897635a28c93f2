"""Signal syscalls and delivery: i386 rt and non-rt signal frames, sigreturn, default actions."""
import errno as E
import os
import signal as hostsig
import ctypes
import struct

from bt import state as S
from ...cpu import Stop
from .base import syscall, get, put, put_u32, s32

SIG_DFL, SIG_IGN = 0, 1
SA_SIGINFO, SA_ONSTACK, SA_RESTART, SA_NODEFER, SA_RESETHAND, SA_RESTORER = \
    4, 0x08000000, 0x10000000, 0x40000000, 0x80000000, 0x04000000
SS_ONSTACK, SS_DISABLE = 1, 2
SIGHUP, SIGINT, SIGQUIT, SIGILL, SIGTRAP, SIGABRT, SIGBUS, SIGFPE, SIGKILL, SIGUSR1, SIGSEGV, SIGUSR2, \
    SIGPIPE, SIGALRM, SIGTERM, SIGSTKFLT, SIGCHLD, SIGCONT, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU, SIGURG, \
    SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGWINCH, SIGIO, SIGPWR, SIGSYS = range(1, 32)
DEFAULT_IGNORE = {SIGCHLD, SIGURG, SIGWINCH, SIGCONT}
DEFAULT_STOP = {SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU}
SYNC = {SIGSEGV, SIGBUS, SIGFPE, SIGILL, SIGTRAP, SIGSYS}
UNBLOCKABLE = (1 << (SIGKILL - 1)) | (1 << (SIGSTOP - 1))

SI_USER, SI_KERNEL, SI_TKILL = 0, 0x80, -6
TRAP_TRACE = 2          # si_code of SIGTRAP from EFLAGS.TF

# Selectors of the flat user segments (GDT entries 4 and 5 on i386 Linux).
USER_CS, USER_DS = 0x23, 0x2B
SIGCONTEXT = "<HHHHHHHH8I3IHH2IHH3I"      # struct sigcontext (88 bytes)
SIGCONTEXT_SIZE = struct.calcsize(SIGCONTEXT)
assert SIGCONTEXT_SIZE == 88


def bit(sig):
    return 1 << (sig - 1)


class SignalState:
    def __init__(self):
        self.actions = {}           # sig -> (handler, flags, restorer, mask)
        self.mask = 0
        self.pending = {}           # sig -> siginfo fields (code, addr/pid, ...)
        self.altstack = (0, SS_DISABLE, 0)

    def action(self, sig):
        return self.actions.get(sig, (SIG_DFL, 0, 0, 0))

    def after_exec(self):
        """Handled signals revert to default; ignored stay ignored; mask and pending survive."""
        self.actions = {s: a for s, a in self.actions.items() if a[0] == SIG_IGN}
        self.altstack = (0, SS_DISABLE, 0)


# ---- host side: asynchronous signals are recorded and delivered between slices ------------------------
_ASYNC_OK = {SIGHUP, SIGINT, SIGQUIT, SIGUSR1, SIGUSR2, SIGALRM, SIGTERM, SIGCHLD, SIGCONT, SIGTSTP, SIGTTIN,
             SIGTTOU, SIGURG, SIGXCPU, SIGXFSZ, SIGVTALRM, SIGPROF, SIGWINCH, SIGIO, SIGPWR}
_machine = None


def _record(signum, frame):
    if _machine is not None:
        _machine.sig.pending.setdefault(signum, (SI_USER, 0))
        _machine.cpu.st.budget = 0


def set_host_disposition(m, sig, handler):
    global _machine
    _machine = m
    if sig not in _ASYNC_OK:
        return
    try:
        if handler == SIG_IGN:
            hostsig.signal(sig, hostsig.SIG_IGN)
        elif handler == SIG_DFL:
            hostsig.signal(sig, hostsig.SIG_DFL)
        else:
            hostsig.signal(sig, _record)
    except (OSError, ValueError):
        pass


# ---- syscalls -----------------------------------------------------------------------------------------
@syscall("rt_sigaction", "dppu")
def sys_rt_sigaction(m, sig, act, oact, size):
    if not 1 <= sig <= 64 or size != 8:
        return -E.EINVAL
    new = None
    if act:
        h, flags, restorer, mask = struct.unpack("<IIIQ", get(m, act, 20))
        if sig in (SIGKILL, SIGSTOP):
            return -E.EINVAL
        new = (h, flags, restorer, mask)
    if oact:
        put(m, oact, struct.pack("<IIIQ", *m.sig.action(sig)))
    if new is not None:
        m.sig.actions[sig] = new
        set_host_disposition(m, sig, new[0])
        if new[0] == SIG_IGN or new[0] == SIG_DFL and sig in DEFAULT_IGNORE:
            m.sig.pending.pop(sig, None)
            for t in m.sched.threads:         # the other threads' pending signals too
                if t.ctx is not None:
                    t.pending.pop(sig, None)
    return 0


@syscall("sigaction", "dpp")
def sys_sigaction(m, sig, act, oact):
    if not 1 <= sig <= 64:
        return -E.EINVAL
    if oact:
        h, flags, restorer, mask = m.sig.action(sig)
        put(m, oact, struct.pack("<IIII", h, mask & 0xFFFFFFFF, flags, restorer))
    if act:
        h, mask, flags, restorer = struct.unpack("<IIII", get(m, act, 16))
        m.sig.actions[sig] = (h, flags, restorer, mask)
        set_host_disposition(m, sig, h)
    return 0


def _sigprocmask(m, how, new, old, size):
    if old:
        put(m, old, struct.pack("<Q", m.sig.mask)[:size])
    if new:
        v = int.from_bytes(get(m, new, size), "little")
        if how == 0:
            m.sig.mask |= v
        elif how == 1:
            m.sig.mask &= ~v
        elif how == 2:
            m.sig.mask = v
        else:
            return -E.EINVAL
        m.sig.mask &= ~UNBLOCKABLE
    return 0


@syscall("rt_sigprocmask", "dppu")
def sys_rt_sigprocmask(m, how, new, old, size):
    if size != 8:
        return -E.EINVAL
    return _sigprocmask(m, how, new, old, 8)


@syscall("sigprocmask", "dpp")
def sys_sigprocmask(m, how, new, old):
    return _sigprocmask(m, how, new, old, 4)


@syscall("rt_sigpending", "pu")
def sys_rt_sigpending(m, p, size):
    bits = 0
    for s in m.sig.pending:
        bits |= bit(s)
    put(m, p, struct.pack("<Q", bits & m.sig.mask)[:size])
    return 0


def _suspend(m, restore_mask):
    """Wait for a deliverable signal; its handler frame restores restore_mask, and the call returns -EINTR
    (stored in eax before the frame is built, so the handler's sigreturn brings it back)."""
    m.cpu.set_reg("eax", -E.EINTR)
    if m.sched.multi and not m.deliverable():
        m.sched.suspend(restore_mask)         # other threads run until a signal wakes this one
    while not m.deliverable():
        hostsig.pause()
    m.deliver_pending(saved_mask=restore_mask)
    raise _Return(-E.EINTR)


@syscall("rt_sigsuspend", "pu")
def sys_rt_sigsuspend(m, p, size):
    new = int.from_bytes(get(m, p, 8), "little")
    old = m.sig.mask
    m.sig.mask = new & ~UNBLOCKABLE
    _suspend(m, old)


@syscall("pause", "")
def sys_pause(m):
    _suspend(m, m.sig.mask)


@syscall("sigaltstack", "pp")
def sys_sigaltstack(m, ss, old):
    if old:
        sp, flags, size = m.sig.altstack
        on = flags != SS_DISABLE and sp <= m.cpu.reg("esp") < sp + size
        put(m, old, struct.pack("<IiI", sp, SS_ONSTACK if on else flags, size))
    if ss:
        sp, flags, size = struct.unpack("<IiI", get(m, ss, 12))
        if flags & ~(SS_DISABLE | (1 << 31)):
            return -E.EINVAL
        if flags & SS_DISABLE:
            m.sig.altstack = (0, SS_DISABLE, 0)
        else:
            if size < 2048:
                return -E.ENOMEM
            m.sig.altstack = (sp, 0, size)
    return 0


# ---- frames ------------------------------------------------------------------------------------------
def _sigcontext(m, trapno, err, cr2, mask, fpstate):
    c = m.cpu
    st = c.st
    sel = st.seg_sel
    return struct.pack(SIGCONTEXT, sel[5], 0, sel[4], 0, sel[0] or USER_DS, 0, sel[3] or USER_DS, 0,
                       c.reg("edi"), c.reg("esi"), c.reg("ebp"), c.reg("esp"), c.reg("ebx"), c.reg("edx"),
                       c.reg("ecx"), c.reg("eax"), trapno, err, c.reg("eip"), USER_CS, 0, c.reg("eflags"),
                       c.reg("esp"), USER_DS, 0, fpstate, mask & 0xFFFFFFFF, cr2)


def _restore_sigcontext(m, raw):
    f = struct.unpack(SIGCONTEXT, raw)
    _restore_fpstate(m, f[SC_FPSTATE])
    gs, fs, es, ds = f[0], f[2], f[4], f[6]
    edi, esi, ebp, esp, ebx, edx, ecx, eax = f[8:16]
    eip, eflags = f[18], f[21]
    c = m.cpu
    for n, v in zip(("edi", "esi", "ebp", "esp", "ebx", "edx", "ecx", "eax", "eip"),
                    (edi, esi, ebp, esp, ebx, edx, ecx, eax, eip)):
        c.set_reg(n, v)
    keep = ~0x40DD5 & 0xFFFFFFFF
    c.set_reg("eflags", (c.reg("eflags") & keep) | (eflags & 0x40DD5))
    from bt import state as S
    for seg, sel in ((S.GS, gs), (S.FS, fs)):
        try:
            m.load_segment(seg, sel)
        except Exception:
            m.load_segment(seg, 0)
    return eax


# struct _fpstate_32 as Linux writes it when the CPU has no FXSR (CPUID does not report it): the
# FNSAVE image, the status word, magic 0xffff.  It lies above the frame, 64-byte aligned.
FPSTATE_SIZE = S.FPU_IMAGE + 4
SC_FPSTATE = 25                             # sigcontext.fpstate among the SIGCONTEXT fields
FPSTATE_UNUSED = 624                        # sizeof(struct _fpstate_32), the UAPI one with FXSR fields


def _fpstate(m):
    img = bytes(m.cpu.st.fpu)[:S.FPU_IMAGE]
    return img + img[S.FPU_SW:S.FPU_SW + 2] + struct.pack("<H", 0xFFFF)


def _restore_fpstate(m, addr):
    """sigreturn: the x87 state saved in the frame (the user may have changed it), or a fresh
    one if the frame has none."""
    st = m.cpu.st
    if not addr:
        S.fpu_reset(st)
        return
    img = get(m, addr, S.FPU_IMAGE)
    ctypes.memmove(ctypes.addressof(st) + S.offset("fpu"), img, S.FPU_IMAGE)


def _siginfo(sig, info):
    code = info[0]
    body = struct.pack("<iii", sig, 0, code)
    if sig in SYNC and code != SI_USER and code != SI_TKILL:
        body += struct.pack("<I", info[1])
    elif len(info) > 2:
        body += struct.pack("<ii", info[1], info[2])
    else:
        body += struct.pack("<ii", info[1], 0)
    return body + bytes(128 - len(body))


def setup_frame(m, sig, info, trap=(0, 0, 0), saved_mask=None):
    """Push a signal frame and point the CPU at the guest handler."""
    handler, flags, restorer, amask = m.sig.action(sig)
    c = m.cpu
    mask = m.sig.mask if saved_mask is None else saved_mask
    sp = c.reg("esp")
    asp, aflags, asize = m.sig.altstack
    if flags & SA_ONSTACK and aflags != SS_DISABLE and not asp <= sp < asp + asize:
        sp = asp + asize
    trapno, err, cr2 = trap
    fp = (sp - FPSTATE_SIZE) & ~63
    sp = fp
    sc = _sigcontext(m, trapno, err, cr2, mask, fp)
    put(m, fp, _fpstate(m))
    if flags & SA_SIGINFO:
        size = 4 * 4 + 128 + 20 + 88 + 8 + 8
        frame = (((sp - size) + 4) & ~15) - 4
        info_addr, uc_addr = frame + 16, frame + 144
        ret = restorer if flags & SA_RESTORER and restorer else m.trampoline + 8
        uc = struct.pack("<II", 0, 0) + struct.pack("<IiI", asp, aflags if aflags == SS_DISABLE else 0, asize) \
            + sc + struct.pack("<Q", mask)
        put(m, frame, struct.pack("<IiII", ret, sig, info_addr, uc_addr) + _siginfo(sig, info) + uc)
        c.set_reg("eax", sig)
        c.set_reg("edx", info_addr)
        c.set_reg("ecx", uc_addr)
    else:
        # struct sigframe_ia32: pretcode, sig, sigcontext, an unused struct _fpstate_32 (the real
        # one lies above the frame), extramask, retcode.
        size = 8 + 88 + FPSTATE_UNUSED + 4 + 8
        frame = (((sp - size) + 4) & ~15) - 4
        ret = restorer if flags & SA_RESTORER and restorer else m.trampoline
        put(m, frame, struct.pack("<Ii", ret, sig) + sc + bytes(FPSTATE_UNUSED) + struct.pack("<I", mask >> 32))
        c.set_reg("eax", sig)
        c.set_reg("edx", 0)
        c.set_reg("ecx", 0)
    c.set_reg("esp", frame)
    c.set_reg("eip", handler)
    S.fpu_reset(c.st)           # the handler starts with a fresh FPU (Linux: fpu__clear_user_states)
    # Linux clears TF, DF and RF for the handler (handle_signal), not AC (measured: a handler
    # entered by an #AC SIGBUS still runs with EFLAGS.AC set).
    c.set_reg("eflags", c.reg("eflags") & ~((1 << 8) | (1 << 10)))
    m.load_segment(3, USER_DS)
    m.load_segment(0, USER_DS)
    m.sig.mask |= amask
    if not flags & SA_NODEFER:
        m.sig.mask |= bit(sig)
    m.sig.mask &= ~UNBLOCKABLE
    if flags & SA_RESETHAND:
        m.sig.actions[sig] = (SIG_DFL, 0, 0, 0)


@syscall("sigreturn", "")
def sys_sigreturn(m):
    sp = m.cpu.reg("esp")        # the restorer popped the signal number: esp -> sigcontext
    raw = get(m, sp, 88 + FPSTATE_UNUSED + 4)
    mask = struct.unpack_from("<I", raw, 80)[0]       # sigcontext.oldmask
    high = struct.unpack_from("<I", raw, 88 + FPSTATE_UNUSED)[0]     # extramask
    m.sig.mask = (mask | (high << 32)) & ~UNBLOCKABLE
    raise _Return(_restore_sigcontext(m, raw[:88]))


@syscall("rt_sigreturn", "")
def sys_rt_sigreturn(m):
    frame = m.cpu.reg("esp") - 4
    uc = frame + 144
    raw = get(m, uc + 20, 88 + 8)
    m.sig.mask = struct.unpack_from("<Q", raw, 88)[0] & ~UNBLOCKABLE
    raise _Return(_restore_sigcontext(m, raw[:88]))


class _Return(Exception):
    """Raised by sigreturn: the registers are restored, eax included (no return value to store)."""

    def __init__(self, eax):
        super().__init__(eax)
        self.eax = eax


Return = _Return

"""Thread syscalls: clone (threads here, new processes in process.py), exit/exit_group, tids, thread signals.

Guest threads are scheduled by runtime/linux_user/threads.py on the one host thread; tids of threads
other than the first are made up (pid+1, pid+2, ...) and mean nothing to the host.
"""
import errno as E
import os
import struct

from ...cpu import Stop
from .base import syscall, host, ptr, get, put_u32, s32
from .process import (do_fork, CLONE_VM, CLONE_SIGHAND, CLONE_VFORK, CLONE_THREAD, CLONE_SETTLS,
                      CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID)


@syscall("exit", "d")
def sys_exit(m, status):
    if not m.sched.multi:
        raise Stop("exit", status=status & 0xFF)
    m.sched.exit_current(status)


@syscall("exit_group", "d")
def sys_exit_group(m, status):
    raise Stop("exit", status=status & 0xFF)


@syscall("gettid", "")
def sys_gettid(m):
    return m.sched.current.tid


@syscall("set_tid_address", "p")
def sys_set_tid_address(m, p):
    m.clear_child_tid = p
    return m.sched.current.tid


@syscall("set_robust_list", "pu")
def sys_set_robust_list(m, head, n):
    if n != 12:
        return -E.EINVAL
    m.sched.current.robust_list = (head, n)     # kept, not walked at exit (no owner-died recovery)
    return 0


@syscall("get_robust_list", "dpp")
def sys_get_robust_list(m, tid, head_ptr, len_ptr):
    t = m.sched.current if tid == 0 else m.sched.find(s32(tid))
    if t is None:
        return -E.ESRCH
    put_u32(m, head_ptr, t.robust_list[0])
    put_u32(m, len_ptr, t.robust_list[1])
    return 0


def _tls_desc(m, uinfo):
    """CLONE_SETTLS: the new thread's GDT TLS entry from a struct user_desc (entry, base, limit, flags)."""
    entry, base, limit, flags = struct.unpack("<iIII", get(m, uinfo, 16))
    if entry not in (6, 7, 8):
        return None
    return entry, base, limit, flags


@syscall("clone", "xpppp")
def sys_clone(m, flags, newsp, ptid, tls, ctid):
    if not flags & CLONE_VM or flags & CLONE_VFORK:
        return do_fork(m, flags, newsp, ptid, ctid)
    if not flags & CLONE_THREAD:
        m.warn_once("clonevm", "clone: CLONE_VM without CLONE_THREAD (a process sharing memory) is not supported")
        return -E.ENOSYS
    if not flags & CLONE_SIGHAND:
        return -E.EINVAL              # as Linux: a thread shares the signal handlers
    desc = None
    if flags & CLONE_SETTLS:
        desc = _tls_desc(m, tls)
        if desc is None:
            return -E.EINVAL
    t = m.sched.spawn(newsp, desc, ctid if flags & CLONE_CHILD_CLEARTID else 0)
    if flags & CLONE_PARENT_SETTID:
        put_u32(m, ptid, t.tid)
    if flags & CLONE_CHILD_SETTID:
        put_u32(m, ctid, t.tid)       # one address space: writing it now is what the child would see
    return t.tid


@syscall("sched_yield", "")
def sys_sched_yield(m):
    if not m.sched.multi:
        return 0
    m.sched.current.result = 0
    raise Stop("switch")


@syscall("sched_getaffinity", "dup")
def sys_sched_getaffinity(m, pid, n, buf):
    if m.sched.find(s32(pid)) is not None:
        pid = 0                       # one of our threads: the host knows only the process
    return host("sched_getaffinity", s32(pid), n, ptr(m, buf, n, True))


# ---- signals to processes and threads ------------------------------------------------------------------
@syscall("kill", "dd")
def sys_kill(m, pid, sig):
    pid = s32(pid)
    if sig > 64:
        return -E.EINVAL
    if pid == os.getpid() or m.sched.find(pid) is not None:
        if sig:
            m.raise_signal(sig, (0, os.getpid(), os.getuid()))      # SI_USER, process-directed
        return 0
    return host("kill", pid, sig)


@syscall("tgkill", "ddd")
def sys_tgkill(m, tgid, tid, sig):
    if sig > 64:
        return -E.EINVAL
    if s32(tgid) == os.getpid():
        t = m.sched.find(s32(tid))
        if t is None:
            return -E.ESRCH
        if sig:
            m.raise_signal(sig, thread=t)
        return 0
    return host("tgkill", s32(tgid), s32(tid), sig)


@syscall("tkill", "dd")
def sys_tkill(m, tid, sig):
    return sys_tgkill(m, os.getpid(), tid, sig)

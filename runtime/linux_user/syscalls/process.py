"""Process syscalls: ids, fork (clone of a new process), execve, wait, TLS descriptors, limits.

Thread-related calls (clone of a thread, exit, gettid, kill/tgkill, sched_*) are in thread.py."""
import ctypes
import errno as E
import os
import struct

from ...cpu import Stop
from .base import syscall, host, ptr, optr, cstr, get, put, put_u32, get_u32, strvec, addr_of, s32, SysError

CLONE_VM, CLONE_FS, CLONE_FILES, CLONE_SIGHAND = 0x100, 0x200, 0x400, 0x800
CLONE_VFORK, CLONE_PARENT, CLONE_THREAD = 0x4000, 0x8000, 0x10000
CLONE_SETTLS, CLONE_PARENT_SETTID, CLONE_CHILD_CLEARTID, CLONE_CHILD_SETTID = 0x80000, 0x100000, 0x200000, 0x1000000


for _name, _fn in (("getpid", os.getpid), ("getppid", os.getppid),
                   ("getuid32", os.getuid), ("geteuid32", os.geteuid), ("getgid32", os.getgid),
                   ("getegid32", os.getegid), ("getpgrp", os.getpgrp)):
    syscall(_name, "")((lambda f: lambda m: f())(_fn))

for _name, _fn in (("getuid", os.getuid), ("geteuid", os.geteuid), ("getgid", os.getgid), ("getegid", os.getegid)):
    syscall(_name, "")((lambda f: lambda m: min(f(), 0xFFFE))(_fn))


@syscall("getgroups32", "dp")
def sys_getgroups32(m, size, lst):
    g = os.getgroups()
    if size == 0:
        return len(g)
    if size < len(g):
        return -E.EINVAL
    put(m, lst, struct.pack(f"<{len(g)}I", *g))
    return len(g)


@syscall("setgroups32", "dp")
def sys_setgroups32(m, size, lst):
    return -E.EPERM


@syscall("setuid32", "d")
def sys_setuid32(m, uid):
    return host("setuid", uid)


@syscall("setgid32", "d")
def sys_setgid32(m, gid):
    return host("setgid", gid)


@syscall("setreuid32", "dd")
def sys_setreuid32(m, a, b):
    return host("setreuid", s32(a), s32(b))


@syscall("setregid32", "dd")
def sys_setregid32(m, a, b):
    return host("setregid", s32(a), s32(b))


@syscall("getresuid32", "ppp")
def sys_getresuid32(m, a, b, c):
    for p, v in zip((a, b, c), os.getresuid()):
        put_u32(m, p, v)
    return 0


@syscall("getresgid32", "ppp")
def sys_getresgid32(m, a, b, c):
    for p, v in zip((a, b, c), os.getresgid()):
        put_u32(m, p, v)
    return 0


@syscall("setpgid", "dd")
def sys_setpgid(m, pid, pgid):
    return host("setpgid", s32(pid), s32(pgid))


@syscall("getpgid", "d")
def sys_getpgid(m, pid):
    return host("getpgid", s32(pid))


@syscall("getsid", "d")
def sys_getsid(m, pid):
    return host("getsid", s32(pid))


@syscall("setsid", "")
def sys_setsid(m):
    return host("setsid")


@syscall("uname", "p")
def sys_uname(m, buf):
    return host("uname", ptr(m, buf, 390, True))


@syscall("sysinfo", "p")
def sys_sysinfo(m, buf):
    hb = ctypes.create_string_buffer(112)
    r = host("sysinfo", addr_of(hb))
    if r < 0:
        return r
    f = struct.unpack_from("<q3Q6QHxxxxxxQQI", hb.raw)
    uptime, loads, mems, procs, th, fh, unit = f[0], f[1:4], f[4:10], f[10], f[11], f[12], f[13]
    sizes = list(mems) + [th, fh]
    while any(v * 1 > 0xFFFFFFFF for v in sizes):
        sizes = [v >> 1 for v in sizes]
        unit <<= 1
    put(m, buf, struct.pack("<i3I6IHxxIII8x", uptime, *(v & 0xFFFFFFFF for v in loads), *sizes[:6], procs,
                            sizes[6], sizes[7], unit))
    return 0


@syscall("prlimit64", "ddpp")
def sys_prlimit64(m, pid, res, new, old):
    return host("prlimit64", s32(pid), res, optr(m, new, 16), optr(m, old, 16, True))


def _rlim32(v):
    return 0xFFFFFFFF if v >= 0xFFFFFFFF else v


@syscall("ugetrlimit", "dp")
def sys_ugetrlimit(m, res, buf):
    hb = (ctypes.c_uint64 * 2)()
    r = host("prlimit64", 0, res, 0, addr_of(hb))
    if r == 0:
        put(m, buf, struct.pack("<II", _rlim32(hb[0]), _rlim32(hb[1])))
    return r


@syscall("getrlimit", "dp")
def sys_getrlimit(m, res, buf):
    return sys_ugetrlimit(m, res, buf)


@syscall("setrlimit", "dp")
def sys_setrlimit(m, res, buf):
    a, b = struct.unpack("<II", get(m, buf, 8))
    hb = (ctypes.c_uint64 * 2)(*((1 << 64) - 1 if v == 0xFFFFFFFF else v for v in (a, b)))
    return host("prlimit64", 0, res, addr_of(hb), 0)


def rusage32(raw):
    f = struct.unpack_from("<18q", raw)
    return struct.pack("<18i", *(v & 0xFFFFFFFF if v >= 0 else v for v in f))


@syscall("getrusage", "dp")
def sys_getrusage(m, who, buf):
    hb = ctypes.create_string_buffer(144)
    r = host("getrusage", s32(who), addr_of(hb))
    if r == 0:
        put(m, buf, rusage32(hb.raw))
    return r


@syscall("set_thread_area", "p")
def sys_set_thread_area(m, uinfo):
    entry, base, limit, flags = struct.unpack("<iIII", get(m, uinfo, 16))
    if entry == -1:
        free = [i for i in (6, 7, 8) if i not in m.tls]
        if not free:
            return -E.ESRCH
        entry = free[0]
        put_u32(m, uinfo, entry)
    if entry not in (6, 7, 8):
        return -E.EINVAL
    m.tls[entry] = (base, limit, flags)
    return 0


@syscall("get_thread_area", "p")
def sys_get_thread_area(m, uinfo):
    entry = struct.unpack("<i", get(m, uinfo, 4))[0]
    if entry not in (6, 7, 8):
        return -E.EINVAL
    base, limit, flags = m.tls.get(entry, (0, 0, 0x28))
    put(m, uinfo, struct.pack("<iIII", entry, base, limit, flags))
    return 0


@syscall("rseq", "puxx")
def sys_rseq(m, a, b, c, d):
    return -E.ENOSYS      # declined quietly: glibc falls back


@syscall("clone3", "pu")
def sys_clone3(m, a, b):
    return -E.ENOSYS      # declined quietly: glibc falls back to clone


@syscall("personality", "x")
def sys_personality(m, p):
    return 0


@syscall("prctl", "dxxxx")
def sys_prctl(m, op, a, b, c, d):
    if op in (15, 16):       # PR_SET_NAME / PR_GET_NAME
        return host("prctl", op, ptr(m, a, 16, op == 16), 0, 0, 0)
    return -E.EINVAL


# ---- fork / exec / wait ---------------------------------------------------------------------------
def do_fork(m, flags=0x11, newsp=0, ptid=0, ctid=0):
    """A new process (threads are syscalls/thread.py's clone): the host forks."""
    vfork = bool(flags & CLONE_VFORK)
    if vfork:
        rfd, wfd = os.pipe()          # closed by the child's exec or exit: the parent resumes
    import sys
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        m.sched.after_fork(os.getpid())
        if vfork:
            os.close(rfd)
            m.reserved_fds.add(wfd)
        if newsp:
            m.cpu.set_reg("esp", newsp)
        if flags & CLONE_CHILD_SETTID and ctid:
            put_u32(m, ctid, os.getpid())
        if flags & CLONE_CHILD_CLEARTID:
            m.clear_child_tid = ctid
        return 0
    if vfork:
        os.close(wfd)
        try:
            while os.read(rfd, 1):
                pass
        finally:
            os.close(rfd)
    if flags & CLONE_PARENT_SETTID and ptid:
        put_u32(m, ptid, pid)
    return pid


@syscall("fork", "")
def sys_fork(m):
    return do_fork(m)


@syscall("vfork", "")
def sys_vfork(m):
    return do_fork(m)


@syscall("execve", "spp")
def sys_execve(m, path, argv, envp):
    p = os.fsdecode(cstr(m, path))
    args = [os.fsdecode(a) for a in strvec(m, argv)]
    env = [os.fsdecode(e) for e in strvec(m, envp)]
    if p in ("/proc/self/exe", f"/proc/{os.getpid()}/exe"):
        p = m.exe_path
    from ..elf import read_elf, ElfError
    if not os.path.exists(p):
        return -E.ENOENT
    if os.path.isdir(p):
        return -E.EACCES
    if not os.access(p, os.X_OK):
        return -E.EACCES
    try:
        read_elf(p)
    except ElfError:
        with open(p, "rb") as f:
            head = f.read(256)
        if head.startswith(b"#!"):
            line = head[2:].split(b"\n")[0].strip().split(None, 1)
            if not line:
                return -E.ENOEXEC
            interp = os.fsdecode(line[0])
            extra = [os.fsdecode(line[1])] if len(line) > 1 else []
            try:
                read_elf(interp)
            except ElfError:
                return -E.ENOEXEC
            raise Stop("exec", path=interp, argv=[interp] + extra + [p] + args[1:], env=env)
        return -E.ENOEXEC
    raise Stop("exec", path=p, argv=args, env=env)


def _wait(m, pid, status, options, rusage):
    try:
        rpid, st, ru = os.wait4(s32(pid), options & 0xFFFFFFFF)
    except ChildProcessError:
        return -E.ECHILD
    except InterruptedError:
        return -E.EINTR
    except OSError as exc:
        return -exc.errno
    if rpid and status:
        put_u32(m, status, st)
    if rusage:
        put(m, rusage, struct.pack("<18i", int(ru.ru_utime), int(ru.ru_utime % 1 * 1e6), int(ru.ru_stime),
                                   int(ru.ru_stime % 1 * 1e6), ru.ru_maxrss, ru.ru_ixrss, ru.ru_idrss,
                                   ru.ru_isrss, ru.ru_minflt, ru.ru_majflt, ru.ru_nswap, ru.ru_inblock,
                                   ru.ru_oublock, ru.ru_msgsnd, ru.ru_msgrcv, ru.ru_nsignals, ru.ru_nvcsw,
                                   ru.ru_nivcsw))
    return rpid


@syscall("wait4", "dpxp")
def sys_wait4(m, pid, status, options, rusage):
    return _wait(m, pid, status, options, rusage)


@syscall("waitpid", "dpx")
def sys_waitpid(m, pid, status, options):
    return _wait(m, pid, status, options, 0)

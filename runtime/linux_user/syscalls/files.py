"""File and directory syscalls.  Host fds are the guest's fds; most calls pass through to the
host kernel with guest pointers translated, converting the structures whose i386 layout differs."""
import ctypes
import errno as E
import os
import struct

from .base import (syscall, host, s32, ptr, optr, cstr, sptr, get, put, put_u32, get_u32, hostbuf, addr_of,
                   SysError)

AT_FDCWD = -100
SIGPIPE = 13


def _path_ptr(m, addr):
    """Host pointer to a guest path, redirecting /proc/self/exe to the guest program."""
    p = cstr(m, addr)
    if p in (b"/proc/self/exe", b"/proc/%d/exe" % os.getpid()):
        return addr_of(m.keep(ctypes.create_string_buffer(os.fsencode(m.exe_path))))
    return m.mem.host_addr(addr)


# ---- read / write ------------------------------------------------------------------------------
@syscall("read", "fpu")
def sys_read(m, fd, buf, n):
    r = host("read", fd, ptr(m, buf, n, True), n)
    if r > 0:
        m.wrote(buf, r)
    return r


@syscall("write", "fsu")
def sys_write(m, fd, buf, n):
    r = host("write", fd, ptr(m, buf, n), n)
    if r == -E.EPIPE:
        m.raise_signal(SIGPIPE)
    return r


@syscall("pread64", "fpuuu")
def sys_pread64(m, fd, buf, n, lo, hi):
    r = host("pread64", fd, ptr(m, buf, n, True), n, lo | (hi << 32))
    if r > 0:
        m.wrote(buf, r)
    return r


@syscall("pwrite64", "fsuuu")
def sys_pwrite64(m, fd, buf, n, lo, hi):
    return host("pwrite64", fd, ptr(m, buf, n), n, lo | (hi << 32))


def _sendfile(m, out_fd, in_fd, offp, count, wide):
    """sendfile: offp is a guest loff_t* (sendfile64) or off_t* (sendfile), or NULL (use in_fd's offset)."""
    size, fmt = (8, "<q") if wide else (4, "<i")
    off = None
    if offp:
        off = ctypes.c_int64(struct.unpack(fmt, get(m, offp, size))[0])
    r = host("sendfile", out_fd, in_fd, addr_of(off) if off is not None else 0, count)
    if off is not None and r >= 0:
        if not wide and off.value > 0x7FFFFFFF:
            return -E.EOVERFLOW
        put(m, offp, struct.pack(fmt, off.value))
    if r == -E.EPIPE:
        m.raise_signal(SIGPIPE)
    return r


@syscall("sendfile64", "ffpu")
def sys_sendfile64(m, out_fd, in_fd, offp, count):
    return _sendfile(m, out_fd, in_fd, offp, count, True)


@syscall("sendfile", "ffpu")
def sys_sendfile(m, out_fd, in_fd, offp, count):
    return _sendfile(m, out_fd, in_fd, offp, count, False)


def _iov(m, iov, cnt, write):
    if cnt > 1024:
        raise SysError(E.EINVAL)
    raw = get(m, iov, 8 * cnt)
    arr = (ctypes.c_uint64 * (2 * cnt))()
    spans = []
    for i in range(cnt):
        b, n = struct.unpack_from("<II", raw, 8 * i)
        arr[2 * i] = ptr(m, b, n, write) if n else 0
        arr[2 * i + 1] = n
        spans.append((b, n))
    return arr, spans


@syscall("readv", "fpu")
def sys_readv(m, fd, iov, cnt):
    arr, spans = _iov(m, iov, cnt, True)
    r = host("readv", fd, addr_of(arr), cnt)
    for b, n in spans:
        m.wrote(b, n)
    return r


@syscall("writev", "fpu")
def sys_writev(m, fd, iov, cnt):
    arr, _ = _iov(m, iov, cnt, False)
    r = host("writev", fd, addr_of(arr), cnt)
    if r == -E.EPIPE:
        m.raise_signal(SIGPIPE)
    return r


# ---- open / close / dup ------------------------------------------------------------------------
@syscall("open", "sxo")
def sys_open(m, path, flags, mode):
    return host("openat", AT_FDCWD, _path_ptr(m, path), flags, mode)


@syscall("openat", "fsxo")
def sys_openat(m, dirfd, path, flags, mode):
    return host("openat", s32(dirfd), _path_ptr(m, path), flags, mode)


@syscall("creat", "so")
def sys_creat(m, path, mode):
    return host("openat", AT_FDCWD, sptr(m, path), os.O_CREAT | os.O_WRONLY | os.O_TRUNC, mode)


@syscall("close", "f")
def sys_close(m, fd):
    if fd in m.reserved_fds:
        return -E.EBADF
    return host("close", fd)


@syscall("dup", "f")
def sys_dup(m, fd):
    return host("dup", fd)


@syscall("dup2", "ff")
def sys_dup2(m, fd, fd2):
    return host("dup2", fd, fd2)


@syscall("dup3", "ffx")
def sys_dup3(m, fd, fd2, flags):
    return host("dup3", fd, fd2, flags)


@syscall("pipe", "p")
def sys_pipe(m, fds):
    return host("pipe2", ptr(m, fds, 8, True), 0)


@syscall("pipe2", "px")
def sys_pipe2(m, fds, flags):
    return host("pipe2", ptr(m, fds, 8, True), flags)


@syscall("lseek", "fdd")
def sys_lseek(m, fd, off, whence):
    r = host("lseek", fd, s32(off), whence)
    if r > 0x7FFFFFFF:
        return -E.EOVERFLOW
    return r


@syscall("_llseek", "fuupd")
def sys_llseek(m, fd, hi, lo, result, whence):
    off = (hi << 32) | lo
    if off >= 1 << 63:
        off -= 1 << 64
    r = host("lseek", fd, off, whence)
    if r < 0:
        return r
    put(m, result, struct.pack("<q", r))
    return 0


F_GETLK, F_SETLK, F_SETLKW = 5, 6, 7
F_GETLK64, F_SETLK64, F_SETLKW64 = 12, 13, 14
F_OFD = (36, 37, 38)
_PLAIN_FCNTL = {0, 1, 2, 3, 4, 8, 9, 10, 11, 15, 16, 1024, 1025, 1026, 1030, 1031, 1032, 1033, 1034}


def _fcntl(m, fd, cmd, arg, is64):
    if cmd in _PLAIN_FCNTL:
        return host("fcntl", fd, cmd, arg)
    if cmd in (F_GETLK, F_SETLK, F_SETLKW) and not is64 or cmd in (F_GETLK64, F_SETLK64, F_SETLKW64) or cmd in F_OFD:
        small = cmd in (F_GETLK, F_SETLK, F_SETLKW)
        fmt = "<hhiii" if small else "<hhqqi"
        t, wh, start, length, pid = struct.unpack(fmt, get(m, arg, struct.calcsize(fmt)))
        hb = hostbuf(32)
        struct.pack_into("<hh4xqqi4x", hb, 0, t, wh, start, length, pid)
        hcmd = cmd if cmd in F_OFD else {5: 5, 6: 6, 7: 7, 12: 5, 13: 6, 14: 7}[cmd]
        r = host("fcntl", fd, hcmd, addr_of(hb))
        if r >= 0 and hcmd in (5, 36):
            t, wh, start, length, pid = struct.unpack_from("<hh4xqqi4x", hb.raw)
            put(m, arg, struct.pack(fmt, t, wh, start, length, pid))
        return r
    return -E.EINVAL


@syscall("fcntl64", "fdx")
def sys_fcntl64(m, fd, cmd, arg):
    return _fcntl(m, fd, cmd, arg, True)


@syscall("fcntl", "fdx")
def sys_fcntl(m, fd, cmd, arg):
    return _fcntl(m, fd, cmd, arg, False)


# request -> (size of the argument pointed to, direction 'r' kernel reads / 'w' kernel writes / 'i' int value)
_IOCTLS = {0x5401: (36, "w"), 0x5402: (36, "r"), 0x5403: (36, "r"), 0x5404: (36, "r"),
           0x5413: (8, "w"), 0x5414: (8, "r"), 0x540F: (4, "w"), 0x5410: (4, "r"), 0x541B: (4, "w"),
           0x5421: (4, "r"), 0x5451: (0, "i"), 0x5450: (0, "i"), 0x540B: (0, "i"), 0x540E: (0, "i"),
           0x5429: (4, "w"), 0x5422: (0, "i")}


@syscall("ioctl", "fxx")
def sys_ioctl(m, fd, req, arg):
    spec = _IOCTLS.get(req)
    if spec is None:
        m.warn_once(f"ioctl 0x{req:x}", f"unsupported ioctl request 0x{req:x}")
        return -E.ENOTTY
    size, how = spec
    if how == "i":
        return host("ioctl", fd, req, arg)
    r = host("ioctl", fd, req, ptr(m, arg, size, how == "w"))
    if r >= 0 and how == "w":
        m.wrote(arg, size)
    return r


# ---- stat ----------------------------------------------------------------------------------------
_HSTAT = "<QQQIII4xQqqqqqqqqq24x"     # x86-64 struct stat (144 bytes)
_STAT64 = "<Q4xIIIIIQ4xqIQIIIIIIQ"    # i386 struct stat64 (96 bytes)


def _stat64_from_host(raw):
    (dev, ino, nlink, mode, uid, gid, rdev, size, blksize, blocks, at, atn, mt, mtn, ct, ctn) = \
        struct.unpack_from(_HSTAT, raw)
    return struct.pack(_STAT64, dev, ino & 0xFFFFFFFF, mode, nlink, uid, gid, rdev, size, blksize, blocks,
                       at & 0xFFFFFFFF, atn, mt & 0xFFFFFFFF, mtn, ct & 0xFFFFFFFF, ctn, ino)


def _fstatat(m, dirfd, pathp, buf, flags):
    hb = hostbuf(144)
    r = host("newfstatat", dirfd, pathp, addr_of(hb), flags)
    if r < 0:
        return r
    put(m, buf, _stat64_from_host(hb.raw))
    return 0


AT_SYMLINK_NOFOLLOW, AT_EMPTY_PATH = 0x100, 0x1000


@syscall("stat64", "sp")
def sys_stat64(m, path, buf):
    return _fstatat(m, AT_FDCWD, _path_ptr(m, path), buf, 0)


@syscall("lstat64", "sp")
def sys_lstat64(m, path, buf):
    return _fstatat(m, AT_FDCWD, _path_ptr(m, path), buf, AT_SYMLINK_NOFOLLOW)


@syscall("fstat64", "fp")
def sys_fstat64(m, fd, buf):
    return _fstatat(m, fd, addr_of(m.keep(ctypes.create_string_buffer(b""))), buf, AT_EMPTY_PATH)


@syscall("fstatat64", "fspx")
def sys_fstatat64(m, dirfd, path, buf, flags):
    return _fstatat(m, s32(dirfd), _path_ptr(m, path), buf, flags)


@syscall("statx", "fsxxp")
def sys_statx(m, dirfd, path, flags, mask, buf):
    r = host("statx", s32(dirfd), _path_ptr(m, path), flags, mask, ptr(m, buf, 256, True))
    return r


@syscall("getdents64", "fpu")
def sys_getdents64(m, fd, buf, n):
    r = host("getdents64", fd, ptr(m, buf, n, True), n)
    # A 32-bit process gets 32-bit directory offsets (ext4 returns the major hash only, which is
    # the high half of the 64-bit offset): glibc's readdir fails with EOVERFLOW otherwise.
    pos = 0
    while 0 < r and pos + 19 <= r:
        off, = struct.unpack_from("<Q", m.mem.read(buf + pos + 8, 8))
        if off > 0x7FFFFFFF:
            m.mem.write(buf + pos + 8, struct.pack("<Q", off >> 32))
        reclen, = struct.unpack("<H", m.mem.read(buf + pos + 16, 2))
        if reclen == 0:
            break
        pos += reclen
    return r


@syscall("statfs64", "sup")
def sys_statfs64(m, path, size, buf):
    hb = hostbuf(120)
    r = host("statfs", sptr(m, path), addr_of(hb))
    if r < 0:
        return r
    return _put_statfs64(m, buf, hb.raw)


@syscall("fstatfs64", "fup")
def sys_fstatfs64(m, fd, size, buf):
    hb = hostbuf(120)
    r = host("fstatfs", fd, addr_of(hb))
    if r < 0:
        return r
    return _put_statfs64(m, buf, hb.raw)


def _put_statfs64(m, buf, raw):
    f = struct.unpack_from("<qqQQQQQ2iqqq4q", raw)
    put(m, buf, struct.pack("<IIQQQQQ2iIII4I", f[0] & 0xFFFFFFFF, f[1] & 0xFFFFFFFF, *f[2:7], f[7], f[8],
                            f[9] & 0xFFFFFFFF, f[10] & 0xFFFFFFFF, f[11] & 0xFFFFFFFF, 0, 0, 0, 0))
    return 0


# ---- paths -----------------------------------------------------------------------------------------
@syscall("access", "so")
def sys_access(m, path, mode):
    return host("faccessat", AT_FDCWD, _path_ptr(m, path), mode)


@syscall("faccessat", "fso")
def sys_faccessat(m, dirfd, path, mode):
    return host("faccessat", s32(dirfd), _path_ptr(m, path), mode)


@syscall("faccessat2", "fsox")
def sys_faccessat2(m, dirfd, path, mode, flags):
    return host("faccessat2", s32(dirfd), _path_ptr(m, path), mode, flags)


def _readlink(m, dirfd, path, buf, n):
    p = cstr(m, path)
    if p in (b"/proc/self/exe", b"/proc/%d/exe" % os.getpid()):
        target = os.fsencode(os.path.abspath(m.exe_path))[:n]
        put(m, buf, target)
        return len(target)
    r = host("readlinkat", dirfd, m.mem.host_addr(path), ptr(m, buf, n, True), n)
    if r > 0:
        m.wrote(buf, r)
    return r


@syscall("readlink", "spu")
def sys_readlink(m, path, buf, n):
    return _readlink(m, AT_FDCWD, path, buf, n)


@syscall("readlinkat", "fspu")
def sys_readlinkat(m, dirfd, path, buf, n):
    return _readlink(m, s32(dirfd), path, buf, n)


@syscall("unlink", "s")
def sys_unlink(m, path):
    return host("unlinkat", AT_FDCWD, sptr(m, path), 0)


@syscall("unlinkat", "fsx")
def sys_unlinkat(m, dirfd, path, flags):
    return host("unlinkat", s32(dirfd), sptr(m, path), flags)


@syscall("mkdir", "so")
def sys_mkdir(m, path, mode):
    return host("mkdirat", AT_FDCWD, sptr(m, path), mode)


@syscall("mkdirat", "fso")
def sys_mkdirat(m, dirfd, path, mode):
    return host("mkdirat", s32(dirfd), sptr(m, path), mode)


@syscall("rmdir", "s")
def sys_rmdir(m, path):
    return host("unlinkat", AT_FDCWD, sptr(m, path), 0x200)


@syscall("rename", "ss")
def sys_rename(m, a, b):
    return host("renameat", AT_FDCWD, sptr(m, a), AT_FDCWD, sptr(m, b))


@syscall("renameat", "fsfs")
def sys_renameat(m, da, a, db, b):
    return host("renameat", s32(da), sptr(m, a), s32(db), sptr(m, b))


@syscall("renameat2", "fsfsx")
def sys_renameat2(m, da, a, db, b, flags):
    return host("renameat2", s32(da), sptr(m, a), s32(db), sptr(m, b), flags)


@syscall("link", "ss")
def sys_link(m, a, b):
    return host("linkat", AT_FDCWD, sptr(m, a), AT_FDCWD, sptr(m, b), 0)


@syscall("linkat", "fsfsx")
def sys_linkat(m, da, a, db, b, flags):
    return host("linkat", s32(da), sptr(m, a), s32(db), sptr(m, b), flags)


@syscall("symlink", "ss")
def sys_symlink(m, a, b):
    return host("symlinkat", sptr(m, a), AT_FDCWD, sptr(m, b))


@syscall("symlinkat", "sfs")
def sys_symlinkat(m, a, d, b):
    return host("symlinkat", sptr(m, a), s32(d), sptr(m, b))


@syscall("chdir", "s")
def sys_chdir(m, path):
    return host("chdir", sptr(m, path))


@syscall("fchdir", "f")
def sys_fchdir(m, fd):
    return host("fchdir", fd)


@syscall("getcwd", "pu")
def sys_getcwd(m, buf, n):
    r = host("getcwd", ptr(m, buf, n, True), n)
    if r > 0:
        m.wrote(buf, r)
    return r


@syscall("chmod", "so")
def sys_chmod(m, path, mode):
    return host("fchmodat", AT_FDCWD, sptr(m, path), mode)


@syscall("fchmod", "fo")
def sys_fchmod(m, fd, mode):
    return host("fchmod", fd, mode)


@syscall("fchmodat", "fso")
def sys_fchmodat(m, dirfd, path, mode):
    return host("fchmodat", s32(dirfd), sptr(m, path), mode)


@syscall("chown32", "sdd")
def sys_chown32(m, path, uid, gid):
    return host("fchownat", AT_FDCWD, sptr(m, path), s32(uid), s32(gid), 0)


@syscall("lchown32", "sdd")
def sys_lchown32(m, path, uid, gid):
    return host("fchownat", AT_FDCWD, sptr(m, path), s32(uid), s32(gid), AT_SYMLINK_NOFOLLOW)


@syscall("fchown32", "fdd")
def sys_fchown32(m, fd, uid, gid):
    return host("fchown", fd, s32(uid), s32(gid))


@syscall("fchownat", "fsddx")
def sys_fchownat(m, dirfd, path, uid, gid, flags):
    return host("fchownat", s32(dirfd), sptr(m, path), s32(uid), s32(gid), flags)


@syscall("umask", "o")
def sys_umask(m, mask):
    return host("umask", mask)


def _times32(m, addr):
    if addr == 0:
        return 0
    a, an, b, bn = struct.unpack("<iiii", get(m, addr, 16))
    buf = (ctypes.c_int64 * 4)(a, an, b, bn)
    m.keep(buf)
    return addr_of(buf)


@syscall("utimensat", "fspx")
def sys_utimensat(m, dirfd, path, times, flags):
    return host("utimensat", s32(dirfd), sptr(m, path) if path else 0, _times32(m, times), flags)


@syscall("utimensat_time64", "fspx")
def sys_utimensat64(m, dirfd, path, times, flags):
    return host("utimensat", s32(dirfd), sptr(m, path) if path else 0, optr(m, times, 32), flags)


@syscall("truncate64", "suu")
def sys_truncate64(m, path, lo, hi):
    return host("truncate", sptr(m, path), lo | (hi << 32))


@syscall("ftruncate64", "fuu")
def sys_ftruncate64(m, fd, lo, hi):
    return host("ftruncate", fd, lo | (hi << 32))


@syscall("truncate", "sd")
def sys_truncate(m, path, n):
    return host("truncate", sptr(m, path), s32(n))


@syscall("ftruncate", "fd")
def sys_ftruncate(m, fd, n):
    return host("ftruncate", fd, s32(n))


@syscall("fsync", "f")
def sys_fsync(m, fd):
    return host("fsync", fd)


@syscall("fdatasync", "f")
def sys_fdatasync(m, fd):
    return host("fdatasync", fd)


@syscall("sync", "")
def sys_sync(m):
    return host("sync")


@syscall("fadvise64_64", "fuuuud")
def sys_fadvise(m, fd, a, b, c, d, advice):
    return 0


# ---- poll / select -------------------------------------------------------------------------------
@syscall("poll", "pud")
def sys_poll(m, fds, n, timeout):
    r = host("poll", ptr(m, fds, 8 * n, True) if n else 0, n, s32(timeout))
    if r > 0:
        m.wrote(fds, 8 * n)
    return r


def _select(m, n, rfds, wfds, efds, tvp, tv64):
    nbytes = ((n + 63) // 64) * 8
    if n < 0 or n > 4096:
        return -E.EINVAL
    sets = [optr(m, p, nbytes, True) for p in (rfds, wfds, efds)]
    ts = 0
    if tvp:
        if tv64:
            sec, usec = struct.unpack("<qq", get(m, tvp, 16))
        else:
            sec, usec = struct.unpack("<ii", get(m, tvp, 8))
        tsb = (ctypes.c_int64 * 2)(sec, usec * (1 if tv64 else 1000))
        m.keep(tsb)
        ts = addr_of(tsb)
    r = host("pselect6", n, *sets, ts, 0)
    for p in (rfds, wfds, efds):
        if p:
            m.wrote(p, nbytes)
    return r


@syscall("_newselect", "dpppp")
def sys_newselect(m, n, rfds, wfds, efds, tv):
    return _select(m, s32(n), rfds, wfds, efds, tv, False)


@syscall("select", "p")
def sys_oldselect(m, args):
    n, rfds, wfds, efds, tv = struct.unpack("<5I", get(m, args, 20))
    return _select(m, s32(n), rfds, wfds, efds, tv, False)


@syscall("pselect6_time64", "dppppp")
def sys_pselect64(m, n, rfds, wfds, efds, ts, sig):
    return _select(m, s32(n), rfds, wfds, efds, ts, True)


@syscall("getrandom", "pux")
def sys_getrandom(m, buf, n, flags):
    r = host("getrandom", ptr(m, buf, n, True), n, flags)
    if r > 0:
        m.wrote(buf, r)
    return r

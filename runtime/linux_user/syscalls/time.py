"""Time syscalls (32-bit and 64-bit time_t variants)."""
import ctypes
import errno
import struct
import time

from ...cpu import Stop

from .base import syscall, host, ptr, optr, get, put, addr_of, s32


def _ts_host():
    return (ctypes.c_int64 * 2)()


@syscall("clock_gettime", "dp")
def sys_clock_gettime(m, clk, tp):
    ts = _ts_host()
    r = host("clock_gettime", s32(clk), addr_of(ts))
    if r == 0:
        put(m, tp, struct.pack("<ii", ts[0] & 0xFFFFFFFF if ts[0] >= 0 else ts[0], ts[1]))
    return r


@syscall("clock_gettime64", "dp")
def sys_clock_gettime64(m, clk, tp):
    r = host("clock_gettime", s32(clk), ptr(m, tp, 16, True))
    return r


@syscall("clock_getres", "dp")
def sys_clock_getres(m, clk, tp):
    ts = _ts_host()
    r = host("clock_getres", s32(clk), addr_of(ts))
    if r == 0 and tp:
        put(m, tp, struct.pack("<ii", ts[0], ts[1]))
    return r


@syscall("clock_getres_time64", "dp")
def sys_clock_getres64(m, clk, tp):
    return host("clock_getres", s32(clk), optr(m, tp, 16, True))


@syscall("gettimeofday", "pp")
def sys_gettimeofday(m, tv, tz):
    t = _ts_host()
    z = (ctypes.c_int32 * 2)()
    r = host("gettimeofday", addr_of(t), addr_of(z))
    if r == 0:
        if tv:
            put(m, tv, struct.pack("<iI", t[0] & 0x7FFFFFFF, t[1]))
        if tz:
            put(m, tz, bytes(z))
    return r


@syscall("time", "p")
def sys_time(m, tp):
    t = _ts_host()
    host("clock_gettime", 0, addr_of(t))
    if tp:
        put(m, tp, struct.pack("<I", t[0] & 0xFFFFFFFF))
    return t[0] & 0xFFFFFFFF


TIMER_ABSTIME = 1


def _sleep_thread(m, clk, flags, sec, nsec):
    """With other guest threads alive a sleep parks only this one (rem is not written on EINTR)."""
    if sec < 0 or not 0 <= nsec < 1_000_000_000:
        return -errno.EINVAL
    ns = sec * 1_000_000_000 + nsec
    now = time.monotonic_ns()
    if flags & TIMER_ABSTIME:
        ns -= time.clock_gettime_ns(clk)
    m.sched.block("sleep", now + max(ns, 0), 0)
    raise Stop("switch")


def _sleep(m, clk, flags, req, rem, wide):
    if wide:
        sec, nsec = struct.unpack("<qq", get(m, req, 16))
    else:
        sec, nsec = struct.unpack("<ii", get(m, req, 8))
    if m.sched.multi and clk in (0, 1, 7):      # REALTIME, MONOTONIC, BOOTTIME
        return _sleep_thread(m, clk, flags, sec, nsec)
    ts = (ctypes.c_int64 * 2)(sec, nsec)
    left = _ts_host()
    r = host("clock_nanosleep", clk, flags, addr_of(ts), addr_of(left))
    if r == -4 and rem:
        put(m, rem, struct.pack("<qq" if wide else "<ii", left[0], left[1]))
    return r


@syscall("nanosleep", "pp")
def sys_nanosleep(m, req, rem):
    return _sleep(m, 1, 0, req, rem, False)


@syscall("clock_nanosleep", "dxpp")
def sys_clock_nanosleep(m, clk, flags, req, rem):
    return _sleep(m, s32(clk), flags, req, rem, False)


@syscall("clock_nanosleep_time64", "dxpp")
def sys_clock_nanosleep64(m, clk, flags, req, rem):
    return _sleep(m, s32(clk), flags, req, rem, True)


@syscall("times", "p")
def sys_times(m, buf):
    t = (ctypes.c_int64 * 4)()
    r = host("times", addr_of(t))
    if buf:
        put(m, buf, struct.pack("<4I", *(v & 0xFFFFFFFF for v in t)))
    return r & 0xFFFFFFFF


@syscall("alarm", "u")
def sys_alarm(m, secs):
    return host("alarm", secs)

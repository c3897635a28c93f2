"""futex and futex_time64: the wait/wake operations glibc's threads use, on the scheduler's wait queue.

All guest threads share one address space and run on one host thread, so the value check and the
enqueue are atomic by construction and FUTEX_PRIVATE_FLAG changes nothing. The PI operations are not
implemented (-ENOSYS): glibc uses them only for PTHREAD_PRIO_INHERIT mutexes.
"""
import errno as E
import struct
import time

from .base import syscall, get, get_u32, put_u32, s32

FUTEX_WAIT, FUTEX_WAKE, FUTEX_FD, FUTEX_REQUEUE, FUTEX_CMP_REQUEUE, FUTEX_WAKE_OP = range(6)
FUTEX_WAIT_BITSET, FUTEX_WAKE_BITSET = 9, 10
FUTEX_PRIVATE_FLAG, FUTEX_CLOCK_REALTIME = 128, 256
NSEC = 1_000_000_000
FUTEX_BITSET_ANY = 0xFFFFFFFF


def _timespec(m, addr, wide):
    if wide:
        sec, nsec = struct.unpack("<qq", get(m, addr, 16))
    else:
        sec, nsec = struct.unpack("<iI", get(m, addr, 8))
    if sec < 0 or not 0 <= nsec < NSEC:
        return None
    return sec * NSEC + nsec


def _deadline(m, utime, wide, absolute, realtime):
    """(errno, deadline): a time.monotonic_ns() deadline or None for no timeout; errno 0 or -EINVAL."""
    if not utime:
        return 0, None
    ns = _timespec(m, utime, wide)
    if ns is None:
        return -E.EINVAL, None
    now = time.monotonic_ns()
    if not absolute:
        return 0, now + ns
    return 0, (ns - time.clock_gettime_ns(time.CLOCK_REALTIME) + now if realtime else ns)


def _wake_op(m, uaddr, val, val2, uaddr2, val3):
    """FUTEX_WAKE_OP: *uaddr2 = old OP oparg; wake val on uaddr, and val2 on uaddr2 if old CMP cmparg."""
    op, cmp = (val3 >> 28) & 7, (val3 >> 24) & 15
    oparg, cmparg = (val3 >> 12) & 0xFFF, val3 & 0xFFF
    if val3 & (8 << 28):
        oparg = 1 << oparg
    old = get_u32(m, uaddr2)
    ops = {0: lambda a: oparg, 1: lambda a: a + oparg, 2: lambda a: a | oparg, 3: lambda a: a & ~oparg,
           4: lambda a: a ^ oparg}
    if op not in ops or cmp > 5:
        return -E.ENOSYS
    put_u32(m, uaddr2, ops[op](old))
    n = m.sched.futex_wake(uaddr, val, FUTEX_BITSET_ANY)
    a, b = s32(old), cmparg
    if (a == b, a != b, a < b, a <= b, a > b, a >= b)[cmp]:
        n += m.sched.futex_wake(uaddr2, val2, FUTEX_BITSET_ANY)
    return n


def do_futex(m, uaddr, op, val, utime, uaddr2, val3, wide):
    cmd, realtime = op & ~(FUTEX_PRIVATE_FLAG | FUTEX_CLOCK_REALTIME), bool(op & FUTEX_CLOCK_REALTIME)
    if realtime and cmd not in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        return -E.ENOSYS
    if uaddr & 3:
        return -E.EINVAL
    if cmd in (FUTEX_WAIT, FUTEX_WAIT_BITSET):
        bitset = FUTEX_BITSET_ANY if cmd == FUTEX_WAIT else val3
        if not bitset:
            return -E.EINVAL
        err, deadline = _deadline(m, utime, wide, cmd == FUTEX_WAIT_BITSET, realtime)
        if err:
            return err
        if get_u32(m, uaddr) != val:
            return -E.EAGAIN
        if deadline is not None and deadline <= time.monotonic_ns():
            return -E.ETIMEDOUT
        m.sched.futex_wait(uaddr, bitset, deadline)     # switches to another thread
    if cmd in (FUTEX_WAKE, FUTEX_WAKE_BITSET):
        bitset = FUTEX_BITSET_ANY if cmd == FUTEX_WAKE else val3
        if not bitset:
            return -E.EINVAL
        return m.sched.futex_wake(uaddr, s32(val), bitset)
    if cmd in (FUTEX_REQUEUE, FUTEX_CMP_REQUEUE):
        val2 = s32(utime)               # the timeout slot carries the requeue count
        if s32(val) < 0 or val2 < 0:
            return -E.EINVAL
        if cmd == FUTEX_CMP_REQUEUE and get_u32(m, uaddr) != val3:
            return -E.EAGAIN
        woken = m.sched.futex_wake(uaddr, s32(val), FUTEX_BITSET_ANY)
        return woken + m.sched.futex_requeue(uaddr, uaddr2, val2)
    if cmd == FUTEX_WAKE_OP:
        return _wake_op(m, uaddr, s32(val), s32(utime), uaddr2, val3)
    m.warn_once(("futex", cmd), f"futex operation {cmd} is not supported, returning -ENOSYS")
    return -E.ENOSYS


@syscall("futex", "pxdppx")
def sys_futex(m, uaddr, op, val, utime, uaddr2, val3):
    return do_futex(m, uaddr, op, val, utime, uaddr2, val3, False)


@syscall("futex_time64", "pxdppx")
def sys_futex_time64(m, uaddr, op, val, utime, uaddr2, val3):
    return do_futex(m, uaddr, op, val, utime, uaddr2, val3, True)

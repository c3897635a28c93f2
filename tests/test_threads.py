"""Guest threads under `btvm run`: pthread programs compared byte for byte with native runs.

The programs print only after their joins, so their native output is deterministic. The deadlock
program is not compared: btvm must end it with a one-line report and a non-zero status, quickly.
"""
import concurrent.futures as cf
import os
import subprocess
import time

import pytest

from tests.test_linux_user import BTVM, ROOT, SRC, _gcc_ok, _run

PROGRAMS = ["thr_sum", "thr_condvar", "thr_tls", "thr_barrier", "thr_misc", "thr_cancel"]
DEADLOCK = "thr_deadlock"

pytestmark = pytest.mark.skipif(not _gcc_ok(), reason="gcc -m32 -static cannot link here")


def _build(bindir, name):
    exe = bindir / name
    r = subprocess.run(["gcc", "-m32", "-static", "-O2", "-pthread", str(SRC / f"{name}.c"), "-o", str(exe)],
                       capture_output=True)
    assert r.returncode == 0, r.stderr.decode()
    return str(exe)


def _timed(cmd):
    t = time.monotonic()
    r = _run(cmd)
    return r, time.monotonic() - t


@pytest.fixture(scope="session")
def thread_results(tmp_path_factory):
    """{name: (native (rc, out, err), btvm (rc, out, err))} plus the deadlock run, computed in parallel."""
    bindir = tmp_path_factory.mktemp("thread_bin")
    env = dict(os.environ)
    env.pop("PYTHONWARNINGS", None)
    with cf.ThreadPoolExecutor(max(2, os.cpu_count() or 2)) as ex:
        exes = dict(zip(PROGRAMS + [DEADLOCK], ex.map(lambda n: _build(bindir, n), PROGRAMS + [DEADLOCK])))
        jobs = {n: (ex.submit(_run, [exes[n]], env), ex.submit(_run, BTVM + ["--", exes[n]], env))
                for n in PROGRAMS}
        dead = ex.submit(_timed, BTVM + ["--", exes[DEADLOCK]])
        out = {n: (a.result(), b.result()) for n, (a, b) in jobs.items()}
        out[DEADLOCK] = dead.result()
    return out


@pytest.mark.parametrize("name", PROGRAMS)
def test_thread_program_matches_native(thread_results, name):
    native, emu = thread_results[name]
    assert emu[2] == native[2], "stderr differs"
    assert emu[1] == native[1], "stdout differs"
    assert emu[0] == native[0], "exit status differs"


def test_deadlock_is_reported(thread_results):
    (rc, out, err), seconds = thread_results[DEADLOCK]
    lines = err.decode().strip().splitlines()
    assert rc != 0
    assert len(lines) == 1 and lines[0].startswith("btvm: deadlock:"), err
    assert "all 3 guest threads" in lines[0]
    assert out == b""
    assert seconds < 60, seconds        # a few seconds alone; generous for a loaded machine


def test_scheduling_is_deterministic(tmp_path):
    """Two btvm runs of a racy program (unsynchronized interleaving) print the same thing."""
    src = tmp_path / "race.c"
    src.write_text(r'''
#include <pthread.h>
#include <stdio.h>
static char log_[64]; static volatile int n;
static void *w(void *a) { for (int i = 0; i < 20; i++) { for (volatile int k = 0; k < 200000; k++); log_[n++] = *(char *)a; } return 0; }
int main(void) { pthread_t t[2]; pthread_create(&t[0], 0, w, "a"); pthread_create(&t[1], 0, w, "b");
  pthread_join(t[0], 0); pthread_join(t[1], 0); printf("%d %s\n", n, log_); return 0; }
''')
    exe = tmp_path / "race"
    subprocess.run(["gcc", "-m32", "-static", "-O0", "-pthread", str(src), "-o", str(exe)], check=True)
    runs = [subprocess.run(BTVM + ["--", str(exe)], capture_output=True, timeout=300, cwd=ROOT) for _ in range(2)]
    assert runs[0].returncode == 0 and runs[0].stdout.startswith(b"40 "), runs[0].stderr
    assert runs[0].stdout == runs[1].stdout

"""`btvm run`: static i386 Linux programs under the translator, compared byte for byte with native runs.

Every program is compiled once per session and all runs (native and btvm) are started together
from a session fixture on a thread pool, so the file costs roughly (sum of btvm runs) / cores.
"""
import concurrent.futures as cf
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent
SRC = HERE / "guest_c"
BTVM = [sys.executable, "-m", "runtime.cli", "run"]
ROOT = HERE.parent
TIMEOUT = 300
X87_MSG = "x87"

# name -> list of (case id, args); "TMP" is replaced by a fresh temporary directory
CASES = {
    "hello": [("hello", [])],
    "arith64": [("arith64", [])],
    "argv_env": [("argv_env", ["one", "two words", ""])],
    "fileio": [("fileio", ["TMP"])],
    "forkpipe": [("forkpipe", [])],
    "setjmp": [("setjmp", [])],
    "qsort_str": [("qsort_str", [])],
    "sigsegv": [("sigsegv", [])],
    "sigfpe": [("sigfpe", [])],
    "sigill": [("sigill", [])],
    "sigtrap_tf": [("sigtrap_tf", [])],
    "sigbus_ac": [("sigbus_ac", [])],
    "sigfpu": [("sigfpu", [])],
    "sigframe_old": [("sigframe_old", [])],
    "sigfpe_x87": [("sigfpe_x87", []), ("sigfpe_x87_frstor", ["frstor"])],
    "exitcode": [("exit_abort", ["abort"]), ("exit_kill", ["kill"]),
                 ("exit_handler", ["handler"])],
    "floatfmt": [("floatfmt", [])],
}
FLOAT_CASES = {"floatfmt"}
BB_SCRIPT = ("echo hi $((3+4)); seq 1 20 | sort -rn | head -n 3 | wc -l; "
             "echo abc | md5sum; X=1; for i in 1 2 3 4 5; do X=$((X*i)); done; echo $X; "
             "echo one two three | tr a-z A-Z; (exit 3); echo status $?")


def _gcc_ok():
    if shutil.which("gcc") is None:
        return False
    with tempfile.TemporaryDirectory() as d:
        c = Path(d) / "t.c"
        c.write_text("int main(void){return 0;}\n")
        r = subprocess.run(["gcc", "-m32", "-static", "-O2", str(c), "-o", str(Path(d) / "t")],
                           capture_output=True)
        return r.returncode == 0


pytestmark = pytest.mark.skipif(not _gcc_ok(), reason="gcc -m32 -static cannot link here")


def _busybox():
    cache = Path(os.environ.get("BTVM_GUESTS", Path.home() / ".cache/btvm/guests"))
    bb = cache / "x/busybox-static/bin/busybox"
    return bb if bb.is_file() else None


def _run(cmd, env=None):
    p = subprocess.run(cmd, capture_output=True, timeout=TIMEOUT, env=env, cwd=ROOT)
    return p.returncode, p.stdout, p.stderr


@pytest.fixture(scope="session")
def results(tmp_path_factory):
    """{case id: (native (rc, out, err), btvm (rc, out, err))}, all computed in parallel."""
    bindir = tmp_path_factory.mktemp("guest_bin")
    env = dict(os.environ, BTVM_TEST_VAR="value with spaces")
    env.pop("PYTHONWARNINGS", None)
    jobs = {}
    workers = max(2, os.cpu_count() or 2)
    with cf.ThreadPoolExecutor(workers) as ex:
        builds = {name: ex.submit(subprocess.run, ["gcc", "-m32", "-static", "-O2", str(SRC / f"{name}.c"), "-o",
                                                   str(bindir / name)], capture_output=True)
                  for name in CASES}
        for name, cases in CASES.items():
            b = builds[name].result()
            assert b.returncode == 0, b.stderr.decode()
            for cid, args in cases:
                # native and btvm runs get their own temporary directories (they run concurrently)
                a1 = [str(tmp_path_factory.mktemp(cid)) if a == "TMP" else a for a in args]
                a2 = [str(tmp_path_factory.mktemp(cid)) if a == "TMP" else a for a in args]
                prog = str(bindir / name)
                jobs[cid] = (ex.submit(_run, [prog] + a1, env), ex.submit(_run, BTVM + ["--", prog] + a2, env))
        bb = _busybox()
        if bb:
            jobs["busybox"] = (ex.submit(_run, [str(bb), "sh", "-c", BB_SCRIPT], env),
                               ex.submit(_run, BTVM + [str(bb), "sh", "-c", BB_SCRIPT], env))
        return {cid: (a.result(), b.result()) for cid, (a, b) in jobs.items()}


ALL = [(name, cid) for name, cases in CASES.items() for cid, _ in cases]


@pytest.mark.parametrize("name,cid", ALL, ids=[c for _, c in ALL])
def test_program_matches_native(results, name, cid):
    native, emu = results[cid]
    if name == "sigbus_ac" and b"signal 7" not in native[1]:
        pytest.skip("the host does not raise #AC for 32-bit programs (no CR0.AM)")
    if name in FLOAT_CASES and emu != native and X87_MSG in emu[2].decode(errors="replace") \
            and b"unsupported" in emu[2]:
        pytest.xfail("x87 pending")
    assert emu[2] == native[2], "stderr differs"
    assert emu[1] == native[1], "stdout differs"
    assert emu[0] == native[0], "exit status differs"


def test_busybox_sh(results):
    if "busybox" not in results:
        pytest.skip("busybox-static not fetched (tools/fetch_guests.sh)")
    native, emu = results["busybox"]
    assert emu == native


# ---- bad inputs: one line on stderr, a non-zero status, no traceback ---------------------------------
def _bad(tmp_path, data=None, name="f", path=None):
    if path is None:
        path = tmp_path / name
        path.write_bytes(data)
        path.chmod(0o755)
    r = subprocess.run(BTVM + [str(path)], capture_output=True, timeout=60, cwd=ROOT)
    err = r.stderr.decode()
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1, err
    return r.returncode, err


def test_not_elf(tmp_path):
    rc, err = _bad(tmp_path, b"just some text\n")
    assert rc == 1 and "not an ELF" in err


def test_elf64(tmp_path):
    rc, err = _bad(tmp_path, path=Path(sys.executable).resolve())
    assert rc == 1 and "64-bit" in err


def test_dynamic_elf(tmp_path):
    src = tmp_path / "d.c"
    src.write_text("int main(void){return 0;}\n")
    exe = tmp_path / "d"
    r = subprocess.run(["gcc", "-m32", "-O2", str(src), "-o", str(exe)], capture_output=True)
    if r.returncode != 0:
        pytest.skip("no 32-bit dynamic linking")
    rc, err = _bad(tmp_path, path=exe)
    assert rc == 1 and "dynamically linked" in err


def test_missing_file(tmp_path):
    rc, err = _bad(tmp_path, path=tmp_path / "does-not-exist")
    assert rc == 127 and "no such file" in err

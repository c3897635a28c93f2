#!/usr/bin/env python3
"""Boot Debian's 686 kernel + a busybox initramfs to the /init marker under btvm (cold and warm
translation cache) and under qemu-system-i386 -accel tcg, in one run; print times and ratios.

    python tools/bench_boot.py [--repeat N] [--cold-repeat N] [--json FILE] [--timeout S]

Rows: btvm cold (empty translation cache after `btvm prebuild`, as the README sets btvm up),
cold with nothing prebuilt (an empty cache folder), cold with the stencils of that run kept,
warm, and QEMU (run before each btvm run and --repeat times at the end: its median over all
runs is the reference, and each btvm run is also divided by the QEMU run just before it, as this
machine's speed drifts).  The guest images come from tools/fetch_guests.sh all; the initramfs (built here) prints
BTVM-INIT-OK from /init and powers off.  QEMU is skipped with a note if it is not installed
(Debian package qemu-system-x86).  A benchmark, not a test: this machine is noisy, quote ratios.
"""
import argparse
import atexit
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
MARKER = b"BTVM-INIT-OK"


def guests():
    out = subprocess.run(["sh", str(ROOT / "tools/fetch_guests.sh"), "all"], capture_output=True, text=True, check=True)
    return dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)


def time_to_marker(cmd, timeout, env=None, rss=None, stderr=None, linger=30):
    """Seconds until MARKER appears on stdout; None on timeout.  The guest then powers off: the
    process gets up to linger more seconds to exit by itself (btvm stores the translations it
    made when it exits), then is killed.  rss, a list, gets the process's peak resident memory in
    MiB; stderr, a path, the process's stderr."""
    t0 = time.monotonic()
    err = open(stderr, "wb") if stderr else subprocess.DEVNULL
    p = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
    os.set_blocking(p.stdout.fileno(), False)
    seen = b""
    usage = None            # set when the process is reaped (by wait4 only: Popen must not reap it)
    found = None            # seconds to the marker
    deadline = t0 + timeout
    try:
        while time.monotonic() < deadline:
            chunk = p.stdout.read()
            if chunk and found is None:
                seen += chunk
                if MARKER in seen:
                    found = time.monotonic() - t0
                    deadline = time.monotonic() + linger
            if chunk:
                continue
            pid, _, u = os.wait4(p.pid, os.WNOHANG)
            if pid:
                usage = u
                break
            time.sleep(0.05)
        return found
    finally:
        if usage is None:
            try:
                os.kill(p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            _, _, usage = os.wait4(p.pid, 0)
        p.returncode = -9
        p.stdout.close()
        if rss is not None:
            rss.append(usage.ru_maxrss / 1024)
        if stderr:
            err.close()


def last_status(stderr, pattern):
    """The number pattern matches in the last -status line btvm printed (at most 1 s old)."""
    found = re.findall(pattern, Path(stderr).read_bytes())
    return int(found[-1]) if found else None


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])

    def at_least_1(text):
        n = int(text)
        if n < 1:
            raise argparse.ArgumentTypeError(f"{text}: must be at least 1")
        return n
    ap.add_argument("--repeat", type=at_least_1, default=1,
                    help="warm btvm and QEMU runs to take the median of (default 1)")
    ap.add_argument("--cold-repeat", type=at_least_1, default=1,
                    help="runs of each cold row to take the median of, each from a fresh folder (default 1)")
    ap.add_argument("--timeout", type=float, default=3600, help="seconds allowed per boot (default 3600)")
    ap.add_argument("--json", metavar="FILE", help="also write the results as JSON")
    ap.add_argument("--fixed-rtc", action="store_true",
                    help="start btvm's CMOS clock at a fixed time (a deterministic, exactly repeated run)")
    args = ap.parse_args(argv)

    # btvm byte-compiled, as a pip install leaves it: with PYTHONDONTWRITEBYTECODE set (as on
    # some machines) every run would compile its ~30 modules again (~0.05 s each run).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "bt"),
                    os.path.join(ROOT, "runtime")], check=False, capture_output=True)
    g = guests()
    work = Path(tempfile.mkdtemp(prefix="btvm-bench-boot-"))
    atexit.register(shutil.rmtree, work, True)      # also when a run fails
    initrd = work / "initrd.cpio.gz"
    subprocess.run([sys.executable, str(ROOT / "tools/make_initramfs.py"), "--busybox", g["busybox"],
                    "--script", os.devnull, "-o", str(initrd)], check=True, capture_output=True)
    btvm = [sys.executable, "-m", "runtime.cli", "boot", "-kernel", g["kernel"], "-initrd", str(initrd),
            "-append", "console=ttyS0", "-m", "256", "-no-stdin", "-status", "1"]
    if args.fixed_rtc:
        # A fixed CMOS time makes the run deterministic (with the default -clock icount), so the
        # warm run meets exactly the code the cold run translated and in the same order.
        btvm += ["-rtc", "base=2026-01-01T00:00:00"]
    env = dict(os.environ, BTVM_CACHE_DIR=str(work / "code"))
    rows, rss, blocks, cache_mib = {}, {}, {}, {}
    log = work / "stderr.txt"

    # QEMU runs once before each btvm run too, and its median over all runs is the reference:
    # this machine's speed drifts over minutes, and each btvm run is paired with the one before it.
    qemu = shutil.which("qemu-system-i386")
    qemu_cmd = [qemu, "-accel", "tcg", "-nographic", "-no-reboot", "-m", "256", "-kernel", g["kernel"],
                "-initrd", str(initrd), "-append", "console=ttyS0 panic=-1"]

    def qemu_run():
        if qemu:
            rows.setdefault("qemu-system-i386", []).append(
                time_to_marker(qemu_cmd, args.timeout, rss=rss.setdefault("qemu-system-i386", [])))

    paired = {}     # btvm row -> [its run's time / the QEMU run's just before it]

    def btvm_run(name, run_env=env):
        qemu_run()
        rss.setdefault(name, [])
        t = time_to_marker(btvm, args.timeout, run_env, rss[name], log)
        q_before = rows.get("qemu-system-i386", [None])[-1]
        if t is not None and q_before:
            paired.setdefault(name, []).append(t / q_before)
        blocks.setdefault(name, []).append(last_status(log, rb"(\d+) blocks compiled"))
        cache_mib.setdefault(name, []).append(last_status(log, rb"code cache (-?\d+) MiB"))
        return t

    # Each cold row runs --cold-repeat times, each run from a fresh copy of its folder.
    def cold_runs(name, folder):
        print(f"{name}...", file=sys.stderr)
        out = []
        for i in range(args.cold_repeat):
            run_dir = work / f"{name.replace(' ', '-').replace(',', '')}-{i}"
            if folder is not None:
                shutil.copytree(folder, run_dir)
            out.append(btvm_run(name, dict(env, BTVM_CACHE_DIR=str(run_dir))))
            last[name] = run_dir
        rows[name] = out
    last = {}
    # Nothing prebuilt: the cache folder is empty, stencil library and runtime functions included.
    cold_runs("btvm cold, nothing prebuilt", None)
    # The same with the stencil library (machine code per instruction shape, made once per
    # translator version and shared by every guest and program) and the runtime's own functions
    # kept from that run: what a boot costs once the translator has met these instruction shapes
    # anywhere.
    kept = work / "kept"
    kept.mkdir()
    for sub in ("stencils", "runtime"):
        if (last["btvm cold, nothing prebuilt"] / sub).is_dir():
            shutil.copytree(last["btvm cold, nothing prebuilt"] / sub, kept / sub)
    cold_runs("btvm cold, stencils kept", kept)
    # As installed by the README's setup command: `btvm prebuild` (bt/library.txt's forms, from
    # no guest's code) into an empty folder, then the first boot: its translation cache is empty.
    library = work / "library"
    library.mkdir()
    t0 = time.monotonic()
    subprocess.run([sys.executable, "-m", "runtime.cli", "prebuild"], env=dict(env, BTVM_CACHE_DIR=str(library)),
                   check=True, capture_output=True)
    prebuild_seconds = time.monotonic() - t0
    print(f"btvm prebuild took {prebuild_seconds:.1f} s", file=sys.stderr)
    cold_runs("btvm cold", library)
    # The warm runs use the folder the last cold run filled.
    env["BTVM_CACHE_DIR"] = str(last["btvm cold"])
    print("btvm warm...", file=sys.stderr)
    rows["btvm warm"] = [btvm_run("btvm warm") for _ in range(args.repeat)]
    if qemu:
        print("qemu-system-i386...", file=sys.stderr)
        for _ in range(args.repeat):
            qemu_run()
    else:
        print("qemu-system-i386 not installed (Debian package qemu-system-x86): no QEMU column", file=sys.stderr)
    order = ["btvm cold", "btvm cold, nothing prebuilt", "btvm cold, stencils kept", "btvm warm"]
    rows = {k: rows[k] for k in order + [k for k in rows if k not in order]}
    # Medians over the runs that reached the marker (a timed-out run is None: counted below).
    med = {k: (statistics.median([x for x in v if x is not None]) if any(x is not None for x in v) else None)
           for k, v in rows.items()}
    lost = {k: sum(x is None for x in v) for k, v in rows.items() if None in v}
    q = med.get("qemu-system-i386")
    print(f"{'boot to /init marker':28} {'seconds':>9} {'x QEMU':>8} {'paired':>7} {'peak RSS MiB':>13} "
          f"{'code cache MiB':>15} {'blocks compiled':>16}")
    for k, v in med.items():
        ratio = f"{v / q:8.2f}" if v and q else "       -"
        mem = f"{max(rss[k]):13.0f}" if rss.get(k) else "            -"
        nb = blocks.get(k, [None])[-1]
        pr = f"{statistics.median(paired[k]):7.2f}" if paired.get(k) else "      -"
        cm = max([x for x in cache_mib.get(k, []) if x is not None], default=None)
        print(f"{k:28} {v if v is not None else float('nan'):9.1f} {ratio} {pr} {mem} {'-' if cm is None else cm:>15} "
              f"{'-' if nb is None else nb:>16}")
    print("(code cache: what btvm's anonymous memory grew by, the guest's RAM left out and the tier-2 worker's "
          "counted, the largest of the row's runs; blocks compiled: all tiers; both from btvm's last -status line "
          "before the marker)")
    print("(x QEMU: over QEMU's median; paired: the median of each btvm run over the QEMU run just before it)")
    if lost:
        print("(runs that timed out, left out of the medians: "
              + ", ".join(f"{k} {n} of {len(rows[k])}" for k, n in lost.items()) + ")")
    print(f"(btvm cold: after `btvm prebuild`, which took {prebuild_seconds:.1f} s once; nothing prebuilt: an empty "
          "cache folder; stencils kept: the stencils and runtime functions of the nothing-prebuilt run)")
    if args.json:
        Path(args.json).write_text(json.dumps({"median_seconds": med, "runs": rows, "peak_rss_mib": rss,
                                               "blocks_compiled": blocks, "code_cache_mib": cache_mib,
                                               "prebuild_seconds": prebuild_seconds,
                                               "paired_ratios": paired},
                                              indent=1))
    shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

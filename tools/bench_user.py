#!/usr/bin/env python3
"""User-mode benchmark: Debian's busybox-static (i386) natively, under qemu-i386 and under `btvm run`.

Workloads (sizes scale with --scale):
  loop     busybox sh -c 'i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; echo $i'
  sha256   busybox sha256sum FILE            (FILE: 16 MiB of fixed, partly compressible bytes)
  gzip     busybox gzip -c FILE > /dev/null
  cprog    tools/bench_prog.c built with gcc -m32 -O2 -static: a bytecode interpreter (Collatz
           search) and an LZ77 compressor over 4 MiB; output compared with the native run

Every engine runs each workload once untimed (page cache, and for btvm the cold measurement), then
--repeat rounds in which every engine runs it once (interleaved: the machine's speed drifts); the
table shows median wall-clock seconds, and btvm over qemu-i386 also as the median of the rounds' pairs. btvm's first run uses an empty
persistent translation cache (BTVM_CACHE_DIR = a fresh temporary folder per workload) and is reported as "btvm
cold"; the timed runs reuse that folder ("btvm warm": start-up code and hot loops come from the disk
cache, nothing is compiled). Ratios are btvm warm / qemu-i386 and btvm warm / native (higher =
slower). Outputs are checked (loop count, sha256 digest, gzip exit status, cprog's output) on every run.

qemu-i386 is Debian's qemu-user (`apt-get install qemu-user`); without it the column is skipped.
busybox comes from tools/fetch_guests.sh (default: $BTVM_GUESTS or ~/.cache/btvm/guests).
"""
import argparse
import hashlib
import json
import os
import platform
import random
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WORKLOADS = ("loop", "sha256", "gzip", "cprog")
LOOP_N = 200000
FILE_MB = 16
TIMEOUT = 3600


def default_busybox():
    guests = os.environ.get("BTVM_GUESTS", os.path.join(os.path.expanduser("~"), ".cache/btvm/guests"))
    return os.path.join(guests, "x/busybox-static/bin/busybox")


def make_file(path, size):
    """size bytes of fixed content: word-salad text lines interleaved with random runs (~2.5x gzip)."""
    rng = random.Random(20240611)
    vocab = [bytes(rng.choice(b"abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 9))) for _ in range(500)]
    with open(path, "wb") as f:
        done = 0
        while done < size:
            if rng.random() < 0.3:
                chunk = rng.randbytes(rng.randint(64, 1024))
            else:
                chunk = b" ".join(rng.choices(vocab, k=rng.randint(20, 200))) + b"\n"
            chunk = chunk[:size - done]
            f.write(chunk)
            done += len(chunk)
    with open(path, "rb") as f:
        return hashlib.sha256(f.read()).hexdigest()


def build_prog(tmp):
    """tools/bench_prog.c built with gcc -m32 -O2 -static, and its native output (the reference)."""
    exe = os.path.join(tmp, "bench_prog")
    src = os.path.join(ROOT, "tools", "bench_prog.c")
    p = subprocess.run(["gcc", "-m32", "-O2", "-static", "-o", exe, src], capture_output=True, text=True)
    if p.returncode != 0:
        sys.exit(f"bench_user: cannot build {src} (gcc -m32 needs gcc-multilib): {p.stderr[-300:]}")
    return exe


def workloads(bb, data, digest, scale, prog=None):
    n = max(1, int(LOOP_N * scale))
    loop = f"i=0; while [ $i -lt {n} ]; do i=$((i+1)); done; echo $i"
    out = {
        "loop": ([bb, "sh", "-c", loop], lambda out: out.strip() == str(n).encode()),
        "sha256": ([bb, "sha256sum", data], lambda out: out.split()[:1] == [digest.encode()]),
        "gzip": ([bb, "gzip", "-c", data], None),      # stdout to /dev/null: checked by exit status only
    }
    if prog is not None:
        argv = [prog, str(max(1, int(100 * scale)))]
        ref = subprocess.run(argv, capture_output=True, check=True).stdout
        out["cprog"] = (argv, lambda out: out == ref)
    return out


def timed(prefix, argv, check, env=None):
    out = subprocess.DEVNULL if check is None else subprocess.PIPE
    t0 = time.perf_counter()
    p = subprocess.run(prefix + argv, stdout=out, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                       env=env, timeout=TIMEOUT)
    dt = time.perf_counter() - t0
    if p.returncode != 0 or (check is not None and not check(p.stdout)):
        sys.exit(f"bench_user: {' '.join(prefix[:1] + argv[:3])}... failed (status {p.returncode}): "
                 f"{p.stderr.decode(errors='replace')[-500:]}")
    return dt


def fmt(v):
    return "-" if v is None else f"{v:.3f}"


def ratio(a, b):
    return None if a is None or b is None or b == 0 else a / b


def main(argv=None):
    ap = argparse.ArgumentParser(
        prog="tools/bench_user.py", description=__doc__.split("\n\n")[0],
        epilog=__doc__.split("\n", 1)[1], formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0,
                    help=f"scale the loop count ({LOOP_N}) and the file size ({FILE_MB} MiB) (default 1.0)")
    ap.add_argument("--repeat", type=int, default=3, metavar="N", help="timed runs per engine and workload (default 3)")
    ap.add_argument("--json", metavar="FILE", help="also write all times and medians as JSON to FILE")
    ap.add_argument("--workloads", default=",".join(WORKLOADS),
                    help=f"comma-separated subset of {','.join(WORKLOADS)} (default: all)")
    ap.add_argument("--busybox", default=default_busybox(), metavar="PATH",
                    help="the i386 busybox-static binary (default: the tools/fetch_guests.sh cache)")
    ap.add_argument("--qemu", default=shutil.which("qemu-i386"), metavar="PATH",
                    help="qemu-i386 binary (default: from PATH; absent = column skipped)")
    ap.add_argument("--no-cold", action="store_true", help="skip the cold btvm run (warm up the temp cache untimed)")
    args = ap.parse_args(argv)

    names = [w for w in args.workloads.split(",") if w]
    bad = [w for w in names if w not in WORKLOADS]
    if bad or not names:
        ap.error(f"unknown workload(s) {bad}; choose from {','.join(WORKLOADS)}")
    if args.repeat < 1:
        ap.error("--repeat must be >= 1")
    if not os.path.isfile(args.busybox):
        sys.exit(f"bench_user: {args.busybox} not found: run tools/fetch_guests.sh")
    bb = os.path.abspath(args.busybox)
    if not args.qemu or not os.path.isfile(args.qemu):
        print("bench_user: qemu-i386 not found (apt-get install qemu-user): skipping the qemu-i386 column",
              flush=True)
        args.qemu = None

    # btvm byte-compiled, as a pip install leaves it: with PYTHONDONTWRITEBYTECODE set (as on
    # some machines) every run would compile its ~30 modules again (~0.05 s each run).
    subprocess.run([sys.executable, "-m", "compileall", "-q", os.path.join(ROOT, "bt"),
                    os.path.join(ROOT, "runtime")], check=False, capture_output=True)
    tmp = tempfile.mkdtemp(prefix="bench_user.")
    try:
        data = os.path.join(tmp, "data.bin")
        size = max(1, int(FILE_MB * 2**20 * args.scale))
        digest = make_file(data, size)
        wl = workloads(bb, data, digest, args.scale, build_prog(tmp) if "cprog" in names else None)

        res = {}
        for name in names:
            cmd, check = wl[name]
            r = res[name] = {}
            # each workload starts btvm from its own empty persistent cache
            btvm_env = dict(os.environ, BTVM_CACHE_DIR=os.path.join(tmp, "btvm-cache-" + name), PYTHONPATH=ROOT)
            btvm_env.pop("BTVM_NO_CACHE", None)
            engines = [("native", [], None)]
            if args.qemu:
                engines.append(("qemu-i386", [args.qemu], None))
            engines.append(("btvm", [sys.executable, "-m", "runtime.cli", "run", "--"], btvm_env))
            for eng, prefix, env in engines:
                first = timed(prefix, cmd, check, env)          # untimed warm-up; btvm: empty cache = cold
                if eng == "btvm" and not args.no_cold:
                    r["btvm cold"] = first
                    print(f"  {name:7s} {'btvm cold':10s} {fmt(first)} s  (empty persistent cache)", flush=True)
            # Rounds of one run per engine, not one engine's runs in a row: this machine's speed
            # drifts by tens of percent within minutes, and a ratio of runs minutes apart showed it.
            times = {eng: [] for eng, _, _ in engines}
            for _ in range(args.repeat):
                for eng, prefix, env in engines:
                    times[eng].append(timed(prefix, cmd, check, env))
            for eng, _, _ in engines:
                key = "btvm warm" if eng == "btvm" else eng
                r[key + " runs"] = times[eng]
                r[key] = statistics.median(times[eng])
                print(f"  {name:7s} {key:10s} {fmt(r[key])} s  (runs: {', '.join(fmt(t) for t in times[eng])})",
                      flush=True)
            r["btvm/qemu-i386"] = ratio(r.get("btvm warm"), r.get("qemu-i386"))
            if args.qemu:
                r["paired"] = statistics.median(b / q for b, q in zip(times["btvm"], times["qemu-i386"]))
            r["btvm/native"] = ratio(r.get("btvm warm"), r.get("native"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)

    cols = ["native"] + (["qemu-i386"] if args.qemu else []) + ([] if args.no_cold else ["btvm cold"]) + \
           ["btvm warm"] + (["btvm/qemu-i386", "paired"] if args.qemu else []) + ["btvm/native"]
    n = max(1, int(LOOP_N * args.scale))
    label = {"loop": f"sh loop {n}", "sha256": f"sha256sum {size / 2**20:g}MiB",
             "gzip": f"gzip -c {size / 2**20:g}MiB", "cprog": "bench_prog.c -O2"}
    w0 = max(len(label[x]) for x in names) + 2
    print(f"\nmedian wall seconds over {args.repeat} run(s); ratios use btvm warm (x = times slower); paired: the "
          f"median of each round's btvm run over its qemu-i386 run")
    print("workload".ljust(w0) + "".join(c.rjust(max(11, len(c) + 2)) for c in cols))
    for name in names:
        row = label[name].ljust(w0)
        for c in cols:
            v = res[name].get(c)
            s = "-" if v is None else (f"{v:.1f}x" if "/" in c or c == "paired" else f"{v:.3f}")
            row += s.rjust(max(11, len(c) + 2))
        print(row)

    if args.json:
        meta = {"busybox": bb, "qemu": args.qemu, "scale": args.scale, "repeat": args.repeat,
                "loop_n": n, "file_bytes": size, "host": platform.platform(), "python": sys.version.split()[0]}
        with open(args.json, "w") as f:
            json.dump({"config": meta, "results": res}, f, indent=2)
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

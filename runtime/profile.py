"""`btvm profile`: run a guest (`run` or `exec`) and report what the code cache did.

The report comes from the code caches' counters (bt/cache.py) and, for the
hottest blocks, from per-block execution counters that translated code
increments while profiling (bt.emit.COUNT_EXECS).
"""
import json
import sys


def _tier():
    from bt.jit import shared_jit
    jit = shared_jit()
    return f"llvm-O{jit.opt}"


def collect(caches, top=10):
    from bt import cache as C
    total = {}
    for c in caches:
        for k, v in c.counters.items():
            total[k] = total.get(k, 0) + v
    invalidations = {k[len("invalidations_"):]: v for k, v in sorted(total.items())
                     if k.startswith("invalidations_")}
    blocks = {}
    for tb in list(C._MEMO.values()):
        n = tb.executions()
        if n:
            blocks[tb.memo_key] = (n, tb)
    hottest = sorted(blocks.values(), key=lambda x: -x[0])[:top]
    return {
        "compiled_blocks": total.get("compiled_blocks", 0),
        "tiers": {_tier(): {"blocks": total.get("compiled_blocks", 0),
                            "compile_seconds": round(total.get("compile_us", 0) / 1e6, 6)}},
        "translate_seconds": round(total.get("translate_seconds_x1e6", 0) / 1e6, 6),
        "batches": total.get("batches", 0),
        "lookups": total.get("lookups", 0),
        "hits": total.get("hits", 0),
        "misses": total.get("misses", 0),
        "chain_links": total.get("chain_links", 0),
        "chain_unlinks": total.get("chain_unlinks", 0),
        "invalidations": invalidations,
        "persistent_hits": total.get("persistent_hits", 0),
        "persistent_stores": total.get("persistent_stores", 0),
        "memo_hits": total.get("memo_hits", 0),
        "hottest": [{"eip": f"0x{tb.eip:08x}", "key": tb.key, "insns": tb.ninsns, "executions": n,
                     "guest_instructions": n * tb.ninsns} for n, tb in hottest],
    }


def format_report(r):
    lines = ["btvm profile:"]
    for tier, t in r["tiers"].items():
        lines.append(f"  compiled blocks   {r['compiled_blocks']:>10}   ({tier}: {t['compile_seconds']:.3f} s compiling, "
                     f"{r['translate_seconds']:.3f} s decoding+IR, {r['batches']} batches)")
    lines.append(f"  persistent hits   {r['persistent_hits']:>10}   (blocks loaded from the disk cache; "
                 f"{r['persistent_stores']} batches stored)")
    lines.append(f"  lookups           {r['lookups']:>10}   (hits {r['hits']}, misses {r['misses']})")
    lines.append(f"  chain links       {r['chain_links']:>10}   (unlinks {r['chain_unlinks']})")
    inv = ", ".join(f"{k} {v}" for k, v in r["invalidations"].items()) or "none"
    lines.append(f"  invalidations     {sum(r['invalidations'].values()):>10}   ({inv})")
    if r["hottest"]:
        lines.append("  hottest blocks:        eip  insns  executions")
        for h in r["hottest"]:
            lines.append(f"    {h['eip']:>24} {h['insns']:>6} {h['executions']:>11}")
    return "\n".join(lines)


def run(args, build_parser):
    """args.target: ['run' | 'exec', ARGS...]; returns the guest command's exit status."""
    from bt import cache as C, emit
    if not args.target or args.target[0] not in ("run", "exec"):
        print("btvm profile: expected 'run PROGRAM ARGS...' or 'exec CASE.json'", file=sys.stderr)
        return 2
    emit.COUNT_EXECS = True
    C.TRACK = []
    sub = build_parser().parse_args(args.target)
    status = 1
    try:
        status = sub.fn(sub)
    finally:
        report = collect(C.TRACK, args.top)
        C.TRACK = None
        emit.COUNT_EXECS = False
        sys.stdout.flush()
        print(format_report(report), file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
    return status

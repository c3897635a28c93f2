"""`btvm profile`: run a guest (`run` or `exec`) and report what the code cache did.

The report comes from the code caches' counters (bt/cache.py) and, for the
hottest blocks, from per-block execution counters that translated code
increments while profiling (bt.emit.COUNT_EXECS).
"""
import json
import sys


def _tier1():
    from bt.jit import shared_jit
    return f"1: llvm-O{shared_jit().opt} blocks"  # blocks that have no stencils (bt.stencil)


def _tier2():
    from bt import tier2
    return f"2: llvm-O{tier2.OPT} regions"


def collect(caches, top=10):
    from bt import cache as C
    total = {}
    for c in caches:
        for k, v in c.counters.items():
            total[k] = total.get(k, 0) + v
    invalidations = {k[len("invalidations_"):]: v for k, v in sorted(total.items())
                     if k.startswith("invalidations_")}
    blocks = {}           # memo key -> [executions in every tier, a TB, tiers it ran in]
    for tb in list(C._MEMO.values()) + list(C.TIER2):
        n = tb.executions()
        if n:
            b = blocks.setdefault(tb.memo_key, [0, tb, set()])
            b[0] += n
            b[2].add(tb.tier)
    hottest = sorted(blocks.values(), key=lambda x: -x[0])[:top]
    return {
        "compiled_blocks": total.get("compiled_blocks", 0) + total.get("tier2_blocks", 0),
        "tiers": {"1: copy-and-patch blocks": {
                      "blocks": total.get("stencil_blocks", 0),
                      "compile_seconds": round(total.get("stencil_compile_us", 0) / 1e6, 6),
                      "stencils_compiled": total.get("stencils_compiled", 0),
                      "fallbacks": total.get("stencil_fallbacks", 0)},
                  _tier1(): {"blocks": total.get("compiled_blocks", 0) - total.get("stencil_blocks", 0),
                             "compile_seconds": round(total.get("compile_us", 0) / 1e6, 6)},
                  _tier2(): {"blocks": total.get("tier2_blocks", 0),
                             "compile_seconds": round(total.get("tier2_compile_us", 0) / 1e6, 6),
                             "regions": total.get("tier2_regions", 0),
                             "adopted_blocks": total.get("tier2_adopted", 0),
                             "dropped_regions": total.get("tier2_dropped", 0)}},
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
        "persistent_moved": total.get("persistent_moved", 0),
        "memo_hits": total.get("memo_hits", 0),
        "hottest": [{"eip": f"0x{tb.eip:08x}", "key": tb.key, "insns": tb.ninsns, "executions": n,
                     "guest_instructions": n * tb.ninsns, "tier": "+".join(map(str, sorted(tiers))),
                     "disassembly": _disassemble(tb)} for n, tb, tiers in hottest],
        "compile_timeline": _timeline(caches),
    }


def _disassemble(tb):
    """The guest instructions of a block (from its bytes: disk-loaded blocks keep only those)."""
    import capstone
    from bt import state as S
    eip, key, raw = tb.memo_key
    cs = capstone.Cs(capstone.CS_ARCH_X86, capstone.CS_MODE_32 if key & S.KEY_CS32 else capstone.CS_MODE_16)
    return [f"{i.address:08x}  {i.mnemonic} {i.op_str}".rstrip() for i in cs.disasm(raw, eip)]


def _timeline(caches):
    """[(seconds since the first batch, cumulative compile seconds, cumulative blocks)]."""
    log = sorted(x for c in caches for x in c.compile_log)
    out, secs, blocks = [], 0.0, 0
    t0 = log[0][0] if log else 0
    for t, n, dt in log:
        secs += dt
        blocks += n
        out.append((round(t - t0, 4), round(secs, 4), blocks))
    return out


def write_html(r, path):
    """A single self-contained page: the figures, the hottest blocks and an SVG of compile time."""
    import html
    rows = "".join(f"<tr><td>{html.escape(k)}</td><td>{html.escape(str(v))}</td></tr>"
                   for k, v in r.items() if k not in ("hottest", "compile_timeline", "tiers"))
    tiers = "".join(f"<tr><td>tier {html.escape(t)}</td><td>{v['blocks']} blocks, {v['compile_seconds']:.3f} s</td></tr>"
                    for t, v in r["tiers"].items())
    hot = r["hottest"]
    top = max((h["executions"] for h in hot), default=1)
    bars = "".join(f'<rect x="0" y="{i * 22}" width="{600 * h["executions"] / top:.1f}" height="18" fill="#4a7"/>'
                   f'<text x="4" y="{i * 22 + 13}" font-size="11">{h["eip"]} x{h["executions"]}</text>'
                   for i, h in enumerate(hot))
    tl = r["compile_timeline"]
    tmax = max((p[0] for p in tl), default=1) or 1
    smax = max((p[1] for p in tl), default=1) or 1
    pts = " ".join(f"{600 * t / tmax:.1f},{200 - 190 * c / smax:.1f}" for t, c, _ in tl)
    blocks = "".join(f"<h3>{h['eip']} ({h['insns']} insns, {h['executions']} runs, {h['tier']})</h3>"
                     f"<pre>{html.escape(chr(10).join(h['disassembly']))}</pre>" for h in hot)
    page = f"""<!doctype html><html><head><meta charset="utf-8"><title>btvm profile</title>
<style>body{{font-family:sans-serif;margin:2em}}td{{padding:2px 8px}}pre{{background:#f4f4f4;padding:6px}}</style>
</head><body><h1>btvm profile</h1><table>{tiers}{rows}</table>
<h2>Hottest blocks</h2><svg width="620" height="{22 * len(hot) + 4}">{bars}</svg>
<h2>Compile time over the run</h2><p>cumulative compile seconds (up to {smax:.2f} s) against seconds since
the first batch (up to {tmax:.2f} s), {tl[-1][2] if tl else 0} blocks</p>
<svg width="620" height="210"><polyline fill="none" stroke="#36c" stroke-width="2" points="{pts}"/>
<line x1="0" y1="200" x2="600" y2="200" stroke="#999"/></svg>
<h2>Disassembly of the hottest blocks</h2>{blocks}</body></html>"""
    with open(path, "w") as f:
        f.write(page)


def format_report(r):
    lines = ["btvm profile:"]
    lines.append(f"  compiled blocks   {r['compiled_blocks']:>10}   ({r['translate_seconds']:.3f} s decoding+IR, "
                 f"{r['batches']} tier-1 batches)")
    for tier, t in r["tiers"].items():
        lines.append(f"    tier {tier:24} {t['blocks']:>8} blocks, {t['compile_seconds']:.3f} s compiling"
                     + (f" ({t['regions']} regions, off the guest's thread)" if "regions" in t else "")
                     + (f" ({t['stencils_compiled']} stencils)" if "stencils_compiled" in t else ""))
    lines.append(f"  persistent hits   {r['persistent_hits']:>10}   (blocks loaded from the disk cache, "
                 f"{r['persistent_moved']} of them moved to another address; {r['persistent_stores']} batches stored)")
    lines.append(f"  lookups           {r['lookups']:>10}   (hits {r['hits']}, misses {r['misses']})")
    lines.append(f"  chain links       {r['chain_links']:>10}   (unlinks {r['chain_unlinks']})")
    inv = ", ".join(f"{k} {v}" for k, v in r["invalidations"].items()) or "none"
    lines.append(f"  invalidations     {sum(r['invalidations'].values()):>10}   ({inv})")
    if r["hottest"]:
        lines.append("  hottest blocks:        eip  insns  executions  tier")
        for h in r["hottest"]:
            lines.append(f"    {h['eip']:>24} {h['insns']:>6} {h['executions']:>11}  {h['tier']}")
    return "\n".join(lines)


def run(args, build_parser):
    """args.target: ['run' | 'exec', ARGS...]; returns the guest command's exit status."""
    from bt import cache as C, emit
    if not args.target or args.target[0] not in ("run", "exec", "boot"):
        print("btvm profile: expected 'run PROGRAM ARGS...', 'boot [-kernel ...]' or 'exec CASE.json'",
              file=sys.stderr)
        return 2
    emit.COUNT_EXECS = True
    C.TRACK = []
    sub = build_parser().parse_args(args.target)
    status = 1
    try:
        status = sub.fn(sub)
    finally:
        C.save_all()                # stencil blocks not stored yet: counted as stores in the report
        report = collect(C.TRACK, args.top)
        C.TRACK = None
        emit.COUNT_EXECS = False
        sys.stdout.flush()
        print(format_report(report), file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump(report, f, indent=1)
                f.write("\n")
        if getattr(args, "html", None):
            write_html(report, args.html)
    return status

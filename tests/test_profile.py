"""`btvm profile`: the JSON keys the issue fixes, hottest blocks with disassembly, the HTML page."""
import json
import subprocess
import sys


def test_profile_boot_demo_json_and_html(tmp_path):
    j, h = tmp_path / "p.json", tmp_path / "p.html"
    out = subprocess.run([sys.executable, "-m", "runtime.cli", "profile", "--top", "3", "--json", str(j),
                          "--html", str(h), "boot", "-no-stdin"], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "btvm profile:" in out.stderr and "done, powering off" in out.stdout
    r = json.loads(j.read_text())
    for key in ("compiled_blocks", "tiers", "lookups", "hits", "misses", "chain_links", "invalidations",
                "persistent_hits", "hottest"):
        assert key in r
    assert r["lookups"] == r["hits"] + r["misses"]
    assert len(r["hottest"]) == 3 and all(b["disassembly"] and b["executions"] > 0 for b in r["hottest"])
    # The demo's timer handler counts ticks in a dword on a page of its code, outside every block:
    # those writes invalidate nothing (they did invalidate the page's blocks, 252 of them, until
    # writes were checked against the blocks' bytes: tests/test_smc_system.py).
    assert r["invalidations"].get("smc", 0) == 0
    page = h.read_text()
    assert page.startswith("<!doctype html>") and "<svg" in page and r["hottest"][0]["eip"] in page


def test_perf_map_names_every_installed_block(tmp_path):
    # BTVM_PERFMAP=1: /tmp/perf-PID.map (Linux perf's JIT symbol file) lists the translated blocks.
    import os
    env = dict(os.environ, BTVM_PERFMAP="1", BTVM_NO_CACHE="1")
    p = subprocess.Popen([sys.executable, "-m", "runtime.cli", "boot", "-no-stdin"], env=env,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    out, err = p.communicate(timeout=300)
    assert p.returncode == 0, err
    path = f"/tmp/perf-{p.pid}.map"
    try:
        lines = open(path).read().splitlines()
    finally:
        os.unlink(path)
    rows = [line.split() for line in lines]
    assert len(rows) > 50 and all(len(r) == 3 and r[2].startswith("btvm_") for r in rows)
    addrs = [int(r[0], 16) for r in rows]
    assert addrs == sorted(addrs) and all(0 < int(r[1], 16) <= 65536 for r in rows)

"""The persistent translation cache (bt/diskcache.py) and the lazy-flag emitter (bt/emit.py)."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path

import llvmlite.binding as llvm
import pytest

from tests.helpers import asm, CODE

ROOT = Path(__file__).resolve().parent.parent

# A loop with a call, a conditional branch and memory traffic: several blocks and batches.
PROGRAM_A = asm("""
    mov esp, 0x9000
    mov ecx, 50
    xor eax, eax
    jmp body
    """ + "nop\n" * 40 + """
body:
    add eax, ecx
    push eax
    call f
    pop edx
    dec ecx
    jnz body
    hlt
f:
    mov ebx, [esp + 4]
    shl ebx, 1
    mov [0x8000], ebx
    ret
""")
# Same first bytes (same disk-cache lookup key), different code at `body`.
PROGRAM_B = PROGRAM_A.replace(asm("shl ebx, 1", 0), asm("shr ebx, 1", 0))
assert PROGRAM_A != PROGRAM_B and PROGRAM_A[:64] == PROGRAM_B[:64]

RUNNER = r"""
import json, sys
from runtime.snippet import Snippet
code = bytes.fromhex(sys.argv[1])
sn = Snippet(trace_writes=False)
sn.mem.write(%d, code)
if len(sys.argv) > 2:
    sn.mem.write(0x5000, bytes.fromhex(sys.argv[2]))
sn.cpu.set_reg("eip", %d)
stop = sn.cpu.run(1_000_000)
c = sn.cpu.cache.counters
print(json.dumps({"stop": stop.reason, "eax": sn.cpu.reg("eax"), "ebx": sn.cpu.reg("ebx"),
                  "compiled": c["compiled_blocks"], "hits": c["persistent_hits"],
                  "tier2": c["tier2_blocks"], "regions_loaded": c["persistent_regions"]}))
""" % (CODE, CODE)


def _start(code, cache_dir, at_5000=None, **env):
    e = dict(os.environ, BTVM_CACHE_DIR=str(cache_dir))
    e.pop("BTVM_NO_CACHE", None)
    e.update(env)
    return subprocess.Popen([sys.executable, "-c", RUNNER, code.hex()] + ([at_5000.hex()] if at_5000 else []),
                            cwd=ROOT, env=e, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _run(code, cache_dir, at_5000=None, **env):
    p = _start(code, cache_dir, at_5000, **env)
    out, err = p.communicate()
    assert p.returncode == 0, err
    return json.loads(out)


def _entries(d):
    return sorted(Path(d).rglob("*.bto"))


def test_second_run_compiles_nothing(tmp_path):
    first = _run(PROGRAM_A, tmp_path)
    assert first["stop"] == "hlt" and first["compiled"] > 0 and first["hits"] == 0
    assert _entries(tmp_path)
    second = _run(PROGRAM_A, tmp_path)
    assert second["compiled"] == 0 and second["hits"] >= first["compiled"]
    assert (second["eax"], second["ebx"]) == (first["eax"], first["ebx"])


def test_disabled(tmp_path):
    _run(PROGRAM_A, tmp_path, BTVM_NO_CACHE="1")
    assert not _entries(tmp_path)


def test_corrupt_entries_are_rebuilt(tmp_path):
    ref = _run(PROGRAM_A, tmp_path)
    for i, p in enumerate(_entries(tmp_path)):
        data = bytearray(p.read_bytes())
        if i % 2:
            data[len(data) // 2] ^= 0xFF        # flipped byte: hash mismatch
            p.write_bytes(bytes(data))
        else:
            p.write_bytes(bytes(data[:len(data) // 3]))   # truncated
    again = _run(PROGRAM_A, tmp_path)
    assert again["hits"] == 0 and again["compiled"] > 0
    assert (again["eax"], again["ebx"]) == (ref["eax"], ref["ebx"])
    third = _run(PROGRAM_A, tmp_path)
    assert third["compiled"] == 0 and (third["eax"], third["ebx"]) == (ref["eax"], ref["ebx"])


def test_entries_are_deflated_and_a_bad_stream_is_not_trusted(tmp_path):
    # The body is deflated (stencil recipes repeat the same stencils): smaller on disk, read back
    # the same.  A body whose hash matches but that does not inflate to the lengths the header
    # gives is refused, not half-used.
    import hashlib
    import zlib
    from bt.diskcache import DiskCache, MAGIC, _HDR
    d = DiskCache(tmp_path, "test")
    mem = {0x1000: bytes(range(64))}
    fetch = lambda a, n: mem.get(a & ~0xFFF, b"")[a & 0xFFF:(a & 0xFFF) + n]   # noqa: E731
    obj = b"\x48\x8b\x47\x10\x89\x47\x14" * 3000
    name = d.store(1, [(0x1000, fetch(0x1000, 8), fetch(0x1000, 32), 1, "f", [])], obj)
    d.flush()
    path = d._path_of(name)
    assert path.stat().st_size < len(obj) // 10
    ent = DiskCache(tmp_path, "test").open(name, 0x1000, 1, fetch)
    assert ent is not None and ent.obj == obj
    magic, _, nmeta, nobj = _HDR.unpack_from(path.read_bytes())
    body = zlib.compress(b"x" * (nmeta + nobj - 1))          # one byte short
    path.write_bytes(_HDR.pack(MAGIC, hashlib.sha256(body).digest(), nmeta, nobj) + body)
    assert DiskCache(tmp_path, "test").open(name, 0x1000, 1, fetch) is None


def test_entry_files_are_written_by_the_storing_thread(tmp_path, monkeypatch):
    # A user-mode guest shares btvm's descriptor table: a file the packing thread opened could
    # take the number the guest's next open() expects.  So only deflating and hashing happen on
    # that thread; the files are written by the thread that stores, at its next store() or at
    # flush_all() (at exit), which also covers a DiskCache made outside bt.cache.
    import threading
    import time
    from bt import diskcache
    from bt.diskcache import DiskCache
    writers = []
    real_write, real_log = diskcache.atomic_write, DiskCache._log_records
    monkeypatch.setattr(diskcache, "atomic_write",
                        lambda *a: (writers.append(threading.current_thread()), real_write(*a))[1])
    monkeypatch.setattr(DiskCache, "_log_records",
                        lambda self, parts: (writers.append(threading.current_thread()), real_log(self, parts))[1])
    d = DiskCache(tmp_path, "test")
    mem = {0x1000 * i: bytes([i]) * 64 for i in range(1, 6)}
    fetch = lambda a, k: mem.get(a & ~0xFFF, b"")[a & 0xFFF:(a & 0xFFF) + k]   # noqa: E731
    names = []
    for i in range(1, 6):
        names.append(d.store(1, [(0x1000 * i, fetch(0x1000 * i, 8), fetch(0x1000 * i, 32), 1, f"f{i}", [])],
                             _OBJ))
        time.sleep(0.02)            # the thread packs meanwhile
    diskcache.flush_all()
    assert all(d._path_of(n).is_file() for n in names)
    assert writers and all(t is threading.main_thread() for t in writers)


def test_entries_of_another_file_format_are_not_indexed(monkeypatch):
    # Old entries' files are refused (their MAGIC); their index records must not be found
    # either, or every lookup of their blocks would read a dead file first.
    from bt import diskcache
    before = diskcache.DiskCache("/nonexistent", "x").version
    monkeypatch.setattr(diskcache, "MAGIC", b"BTVMOBJ9")
    assert diskcache.DiskCache("/nonexistent", "x").version != before


def test_entry_for_other_guest_bytes_is_not_used(tmp_path):
    a = _run(PROGRAM_A, tmp_path)
    b_ref = _run(PROGRAM_B, tmp_path / "fresh")
    b = _run(PROGRAM_B, tmp_path)            # same head bytes as A, different code later
    assert (b["eax"], b["ebx"]) == (b_ref["eax"], b_ref["ebx"]) != (a["eax"], a["ebx"])
    assert b["compiled"] > 0


def test_divergent_run_finds_blocks_of_other_batches(tmp_path):
    """A run whose first block differs (so its batches have other heads) still loads every
    block an earlier run compiled, through the block index, and compiles only what is new."""
    program_d = PROGRAM_A.replace(asm("xor eax, eax", 0), asm("sub eax, eax", 0))
    assert program_d != PROGRAM_A and len(program_d) == len(PROGRAM_A)
    ref = _run(program_d, tmp_path / "fresh")
    a = _run(PROGRAM_A, tmp_path)
    d = _run(program_d, tmp_path)
    assert d["compiled"] == 1 and d["hits"] >= a["compiled"] - 1
    assert (d["eax"], d["ebx"]) == (ref["eax"], ref["ebx"])
    assert list(_index_dirs(tmp_path)[0].glob("*.log"))


def test_tier2_regions_are_persisted(tmp_path):
    env = {"BTVM_HOT": "10", "BTVM_TIER2_SYNC": "1"}
    first = _run(PROGRAM_A, tmp_path, **env)
    assert first["tier2"] > 0
    second = _run(PROGRAM_A, tmp_path, **env)
    assert second["compiled"] == 0 and second["tier2"] == 0 and second["regions_loaded"] >= 1
    assert (second["eax"], second["ebx"]) == (first["eax"], first["ebx"])
    b = _run(PROGRAM_B, tmp_path, **env)          # a region whose bytes changed is not used
    b_ref = _run(PROGRAM_B, tmp_path / "fresh", **env)
    assert (b["eax"], b["ebx"]) == (b_ref["eax"], b_ref["ebx"])


# The loop at the end of its page: its first 32 bytes (the disk cache's lookup window) run on
# into the next page, which holds no code and gets a byte written before the loop is hot.  So
# when the second run loads the batch holding the loop, the loop's window is not yet the one
# its region was stored under; it is when the loop gets hot.
_PAD = 4061
WINDOW_CHANGES = asm("""
    mov ecx, 300
    xor eax, eax
    mov byte ptr [0x2008], 0x90
    jmp body
""" + "nop\n" * _PAD + """
body:
    add eax, ecx
    dec ecx
    jnz body
    hlt
""")
assert WINDOW_CHANGES[0xFF0:0xFF2] == asm("add eax, ecx", 0)


def test_a_block_that_gets_hot_takes_its_stored_region(tmp_path):
    env = {"BTVM_HOT": "10", "BTVM_TIER2_SYNC": "1"}
    first = _run(WINDOW_CHANGES, tmp_path, **env)
    assert first["stop"] == "hlt" and first["tier2"] > 0
    second = _run(WINDOW_CHANGES, tmp_path, **env)
    assert second["tier2"] == 0 and second["regions_loaded"] >= 1 and second["compiled"] == 0, second
    assert second["eax"] == first["eax"] == sum(range(301))


def _index_dirs(root):
    """The per-version index folders under a cache folder."""
    from bt import diskcache
    return sorted(p for p in (Path(root) / diskcache.INDEX_DIR).iterdir() if p.is_dir())


def test_index_is_per_version(tmp_path):
    _run(PROGRAM_A, tmp_path)
    _run(PROGRAM_A, tmp_path, BTVM_HOT="7")        # another code fingerprint: another version
    dirs = _index_dirs(tmp_path)
    assert len(dirs) == 2 and all(list(d.glob("*.log")) for d in dirs)


def test_index_logs_are_merged(tmp_path):
    from bt import diskcache
    for _ in range(3):
        _run(PROGRAM_A, tmp_path, BTVM_NO_CACHE="")
    (index,) = _index_dirs(tmp_path)
    for p in index.glob("*.log"):
        os.utime(p, (1, 1))           # settled: no process appends to them any more
    for i in range(diskcache.MERGE_AT):
        (index / f"flat-junk{i}.log").write_bytes(b"\x01" * 7)     # a torn record: ignored
    fresh = index / "flat-junk0.log"
    for p in index.glob("flat-junk*.log"):
        if p != fresh:
            os.utime(p, (1, 1))
    _run(PROGRAM_A, tmp_path)
    logs = list(index.glob("*.log"))
    # The merged one, this run's own (if it stored anything), and the log written lately (a
    # running process may still append to it): merged, but kept.
    assert len(logs) <= 3 and fresh in logs
    again = _run(PROGRAM_A, tmp_path)
    assert again["compiled"] == 0


def test_index_partitions_are_read_apart(tmp_path):
    # A user-mode run reads only the records of unpaged code, not those of the kernels it
    # shares the cache folder with (and a guest OS reads both).
    from bt import diskcache, state as S
    paged, flat = S.make_key(pg=True), S.make_key(cpl=3)
    diskcache.DiskCache(tmp_path, "x")._append_index([(0x1000, paged, b"w" * 8, b"n" * 32, 1),
                                                      (0x2000, flat, b"v" * 8, b"m" * 32, 1)])
    fresh = diskcache.DiskCache(tmp_path, "x")
    assert fresh.has(0x2000, flat, b"") is False          # another window
    idx = fresh.index(flat)
    assert diskcache._ikey(0x2000, flat, b"v" * 8) in idx and diskcache._ikey(0x1000, paged, b"w" * 8) not in idx
    assert diskcache._ikey(0x1000, paged, b"w" * 8) in fresh.index(paged)


def test_concurrent_writers(tmp_path):
    procs = [_start(PROGRAM_A, tmp_path) for _ in range(4)]
    results = []
    for p in procs:
        out, err = p.communicate()
        assert p.returncode == 0, err
        results.append(json.loads(out))
    assert len({(r["eax"], r["ebx"]) for r in results}) == 1
    assert not [p for p in Path(tmp_path).rglob("*") if p.name.startswith(".tmp-")]
    last = _run(PROGRAM_A, tmp_path)
    assert last["compiled"] == 0 and (last["eax"], last["ebx"]) == (results[0]["eax"], results[0]["ebx"])


# Object code that does not deflate: entries of ~2,000 bytes on disk.
_OBJ = random.Random(6).randbytes(2000)


def test_lru_eviction(tmp_path):
    from bt.diskcache import DiskCache
    d = DiskCache(tmp_path, "test", max_bytes=20_000)
    mem = {0x1000 * i: bytes([i]) * 64 for i in range(1, 40)}
    fetch = lambda a, n: mem.get(a & ~0xFFF, b"")[a & 0xFFF:(a & 0xFFF) + n]   # noqa: E731
    for i in range(1, 40):
        eip = 0x1000 * i
        d.store(1, [(eip, fetch(eip, 8), fetch(eip, 32), 1, f"f{i}", [])], _OBJ)
        d.flush()
        if i == 2:
            old = d._path(0x1000, 1, fetch(0x1000, 32))
            os.utime(old, (1, 1))
    total = sum(p.stat().st_size for p in _entries(tmp_path))
    assert total <= 20_000
    assert d.lookup(0x1000, 1, fetch(0x1000, 32), fetch) is None        # least recently used: gone
    ent = d.lookup(0x1000 * 39, 1, fetch(0x1000 * 39, 32), fetch)       # the newest survives
    assert ent is not None and ent.obj == _OBJ


def test_lru_eviction_reaches_stencil_files(tmp_path):
    # Each translator version keeps its stencils in a folder of its own: an old version's must
    # count against the bound and go first, a used one's stay.
    from bt.diskcache import DiskCache, STENCIL_DIR
    old, used = tmp_path / STENCIL_DIR / "old", tmp_path / STENCIL_DIR / "used"
    for folder, when in ((old, 1), (used, None)):
        folder.mkdir(parents=True)
        for i in range(8):
            (folder / f"{i}.stl").write_bytes(b"s" * 1000)
            os.utime(folder / f"{i}.stl", (when, when) if when else None)
    d = DiskCache(tmp_path, "test", max_bytes=12_000)
    assert d.evict(8_000) == 8_000
    assert not list(old.glob("*.stl")) and len(list(used.glob("*.stl"))) == 8


# ---- the lazy emitter -------------------------------------------------------------------
def _block_ir(code):
    from bt import state as S
    from bt.decode import decode_block
    from bt.jit import ModuleText
    from bt.semantics import ends_block
    from bt.translate import translate_block
    blk = decode_block(lambda a, n: code[a - CODE:a - CODE + n], CODE, S.make_key(), ends_block)
    mt = ModuleText("t")
    translate_block(blk, "f", mt)
    text = mt.text()
    llvm.parse_assembly(text).verify()
    return text


def test_dead_flags_are_not_emitted():
    # Three adds: only the last one's flags reach the exit; none is read.
    text = _block_ir(asm("add eax, 1; add eax, 2; add eax, 3; jmp 0x2000"))
    assert text.count("llvm.ctpop") == 2           # the declaration and one PF
    # A flag read by a branch is computed once, on the main line.
    text = _block_ir(asm("cmp eax, ebx; jne 0x2000"))
    assert text.count("icmp eq i32") == 1


@pytest.mark.parametrize("src", [
    "add eax, [ebx]; mov [ecx], eax; adc edx, [esi]; jc 0x2000",
    "cmp eax, 1; mov [ebx], eax; push ecx; pop dword ptr [edx]; sete al; jmp 0x2000",
    "sub eax, ebx; rep movsb; shl eax, cl; div ecx; ja 0x2000",
    "inc eax; bt [ebx], ecx; pushfd; cmpsb; repne scasb; loopne 0x1010",
    "add eax, ebx; popfd",
])
def test_lazy_ir_verifies(src):
    _block_ir(asm(src))


def test_folder_size_is_kept_in_a_file(tmp_path):
    """The first store of a run reads the folder's size from a file instead of listing the folder
    (seconds with a few GB of entries); eviction lists it and writes the exact figure."""
    from bt.diskcache import DiskCache
    d = DiskCache(tmp_path, "test", max_bytes=40_000)
    mem = {0x1000 * i: bytes([i]) * 64 for i in range(1, 60)}
    fetch = lambda a, n: mem.get(a & ~0xFFF, b"")[a & 0xFFF:(a & 0xFFF) + n]   # noqa: E731
    d.store(1, [(0x1000, fetch(0x1000, 8), fetch(0x1000, 32), 1, "f1", [])], _OBJ)
    d.flush()
    assert int((tmp_path / DiskCache.SIZE_FILE).read_text()) > 0
    d2 = DiskCache(tmp_path, "test", max_bytes=40_000)
    d2._entries = lambda: (_ for _ in ()).throw(AssertionError("listed the folder"))
    d2.store(1, [(0x2000, fetch(0x2000, 8), fetch(0x2000, 32), 1, "f2", [])], _OBJ)
    d2.flush()
    del d2._entries
    for i in range(3, 60):
        d2.store(1, [(0x1000 * i, fetch(0x1000 * i, 8), fetch(0x1000 * i, 32), 1, f"f{i}", [])], _OBJ)
    d2.flush()
    total = sum(p.stat().st_size for p in Path(tmp_path).rglob("*.bto")) + \
        sum(p.stat().st_size for p in Path(tmp_path).rglob("*.log"))
    assert total <= 40_000
    assert int((tmp_path / DiskCache.SIZE_FILE).read_text()) <= 40_000


# ---- the command line: --cache-dir DIR, --no-cache (issue 6) ----------------------------------------
GUESTS = Path(os.environ.get("BTVM_GUESTS", Path.home() / ".cache/btvm/guests"))
BUSYBOX = GUESTS / "x/busybox-static/bin/busybox"
needs_busybox = pytest.mark.skipif(not BUSYBOX.is_file(), reason="busybox-static not fetched (tools/fetch_guests.sh)")


def _btvm(args, **env):
    """Run the btvm command with BTVM_CACHE_DIR/BTVM_NO_CACHE only as given."""
    e = {k: v for k, v in os.environ.items() if k not in ("BTVM_CACHE_DIR", "BTVM_NO_CACHE")}
    e.update(env)
    return subprocess.run([sys.executable, "-m", "runtime.cli"] + args, cwd=ROOT, env=e,
                          capture_output=True, text=True, timeout=300)


@needs_busybox
def test_run_cache_dir_option(tmp_path):
    """--cache-dir D stores under D, over both environment variables; options after PROGRAM are
    the guest's (its --no-cache does not disable the cache)."""
    d, env_dir = tmp_path / "d", tmp_path / "env"
    r = _btvm(["run", "--cache-dir", str(d), str(BUSYBOX), "echo", "hi", "--no-cache"],
              BTVM_CACHE_DIR=str(env_dir), BTVM_NO_CACHE="1")
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi --no-cache\n", "")
    assert _entries(d) and not env_dir.exists()


@needs_busybox
def test_run_no_cache_option(tmp_path):
    env_dir = tmp_path / "env"
    r = _btvm(["run", "--no-cache", str(BUSYBOX), "echo", "hi"], BTVM_CACHE_DIR=str(env_dir))
    assert (r.returncode, r.stdout, r.stderr) == (0, "hi\n", "")
    assert not _entries(env_dir)
    r = _btvm(["run", "--no-cache", "--cache-dir", str(env_dir), str(BUSYBOX), "true"])
    assert r.returncode == 0 and not _entries(env_dir)          # --no-cache wins


@needs_busybox
def test_run_unusable_cache_dir(tmp_path):
    """A folder that cannot be made (here: under a regular file; root may write anywhere else) is
    one line on stderr, and the guest runs without the cache."""
    (tmp_path / "file").write_text("")
    bad = tmp_path / "file" / "cache"
    r = _btvm(["run", "--cache-dir", str(bad), str(BUSYBOX), "echo", "hi"])
    assert r.returncode == 0 and r.stdout == "hi\n"
    assert r.stderr.count("\n") == 1 and f"--cache-dir {bad}" in r.stderr and "without the translation cache" in r.stderr


def test_boot_cache_options(tmp_path):
    """`btvm boot` (the demo guest) takes both spellings, QEMU's single dash and the double one."""
    env_dir = tmp_path / "env"
    for opt in ("-no-cache", "--no-cache"):
        r = _btvm(["boot", "-no-stdin", opt], BTVM_CACHE_DIR=str(env_dir))
        assert r.returncode == 0 and "done, powering off" in r.stdout, r.stderr
        assert not _entries(env_dir)
    for opt in ("-cache-dir", "--cache-dir"):
        d = tmp_path / opt
        r = _btvm(["boot", "-no-stdin", opt, str(d)], BTVM_NO_CACHE="1")
        assert r.returncode == 0 and "done, powering off" in r.stdout, r.stderr
        assert _entries(d)
    assert not env_dir.exists()


def test_profile_passes_cache_options_through(tmp_path):
    """`btvm profile boot ...` takes boot's options: a second run with the same --cache-dir compiles
    nothing, and --no-cache neither reads nor writes it."""
    d, j = tmp_path / "d", tmp_path / "p.json"

    def profile(*opts):
        r = _btvm(["profile", "--json", str(j), "boot", "-no-stdin", *opts], BTVM_NO_CACHE="1")
        assert r.returncode == 0 and "btvm profile:" in r.stderr, r.stderr
        return json.loads(j.read_text())
    first = profile("--cache-dir", str(d))
    assert first["compiled_blocks"] > 0 and first["persistent_stores"] > 0 and _entries(d)
    second = profile("--cache-dir", str(d))
    assert second["compiled_blocks"] == 0 and second["persistent_hits"] > 0
    third = profile("--no-cache", "--cache-dir", str(d))
    assert third["persistent_hits"] == 0 and third["persistent_stores"] == 0


def test_stencil_batches_with_the_same_head_do_not_overwrite_each_other(tmp_path):
    # Two runs store stencil-recipe batches (tier 3) that start with the same block but hold
    # different blocks after it: every block stays findable through the index.
    from bt.diskcache import DiskCache
    mem = {0x1000 * i: bytes([i]) * 64 for i in range(1, 4)}
    fetch = lambda a, n: mem.get(a & ~0xFFF, b"")[a & 0xFFF:(a & 0xFFF) + n]   # noqa: E731
    blk = lambda eip: (eip, fetch(eip, 8), fetch(eip, 32), 1, f"f{eip:x}", [])  # noqa: E731
    run1 = DiskCache(tmp_path, "test")
    run1.store(1, [blk(0x1000), blk(0x2000)], b"A" * 100, tier=3)
    run1.flush()
    run2 = DiskCache(tmp_path, "test")
    run2.store(1, [blk(0x1000), blk(0x3000)], b"B" * 100, tier=3)
    run2.flush()
    run3 = DiskCache(tmp_path, "test")
    for eip in (0x2000, 0x3000):
        found = [run3.open(n, eip, 1, fetch) for n in run3.candidates(eip, 1, fetch(eip, 32))]
        assert any(e is not None and eip in e.valid for e in found), hex(eip)


def test_block_whose_bytes_arrive_after_its_entry_was_loaded_is_not_compiled_again(tmp_path):
    # The program writes a function (mov eax, 5; ret) to a fresh page and calls it.  The second
    # run loads the entry holding all three blocks before the function's bytes are in memory; the
    # function must still come from that entry when it is reached, not be compiled again.
    code = asm("""
        mov edi, 0x5000
        mov dword ptr [edi], 0x000005b8
        mov word ptr [edi + 4], 0xc300
        call edi
        add eax, 1
        hlt
    """)
    first = _run(code, tmp_path)
    assert first["stop"] == "hlt" and first["eax"] == 6 and first["compiled"] >= 3
    second = _run(code, tmp_path)
    assert second["eax"] == 6 and second["compiled"] == 0, second


# Writes `mov eax, 5; ret` at 0x5000 and calls it, patches it to `mov eax, 7` and calls it again:
# two versions of one block at one address (EAX = 5 + 7).
PATCH_TWICE = asm("""
    mov edi, 0x5000
    mov dword ptr [edi], 0x000005b8
    mov word ptr [edi + 4], 0xc300
    call edi
    mov ebx, eax
    mov dword ptr [edi], 0x000007b8
    call edi
    add eax, ebx
    hlt
""")


def test_two_versions_of_a_block_kept_for_later_are_both_found(tmp_path):
    # The guest writes one function, calls it, rewrites one byte of it and calls it again (the
    # Linux kernel patching LOCK prefixes in and out).  The first run stores both versions at
    # one address in one entry; the second loads that entry before either is in memory, and
    # must rebuild each version when memory holds it (it once kept only the last one).
    first = _run(PATCH_TWICE, tmp_path)
    assert first["stop"] == "hlt" and first["eax"] == 12 and first["compiled"] >= 4
    second = _run(PATCH_TWICE, tmp_path)
    assert second["eax"] == 12 and second["compiled"] == 0, second


def test_the_stored_version_of_a_patched_block_that_memory_holds_is_the_one_that_runs(tmp_path):
    # An entry holding two versions of a block at one address (above), loaded when memory holds
    # the second: the first must not be rebuilt and run (it once was, by matching eips only).
    assert _run(PATCH_TWICE, tmp_path)["eax"] == 12
    caller = asm("mov edi, 0x5000\n call edi\n hlt")
    assert _run(caller, tmp_path, at_5000=bytes.fromhex("b807000000c3"))["eax"] == 7
    assert _run(caller, tmp_path, at_5000=bytes.fromhex("b805000000c3"))["eax"] == 5


def test_blocks_kept_for_later_are_bounded(monkeypatch):
    # Blocks of loaded entries whose bytes were not in memory yet are kept to be rebuilt when
    # reached (above); only the newest _DEFERRED_MAX entries' are, the oldest go first.
    import struct as st
    from types import SimpleNamespace
    from bt import cache as C, diskcache
    monkeypatch.setattr(C, "_DEFERRED", {})
    monkeypatch.setattr(C, "_ENTRIES", {})
    monkeypatch.setattr(C, "_DEFERRED_MAX", 3)
    cache = C.CodeCache(lambda a, n: b"")
    for i in range(5):
        blk = diskcache.StoredBlock(0x1000 * (i + 1), 1, b"\x90", 1)
        ent = SimpleNamespace(name=f"e{i}", valid=set(), matched=[False], blocks=[(blk, None, None)],
                              obj=st.pack("<I", 2) + b"rr")
        assert cache._load_stencil_entry(ent, 0x1000, 1) is None
    assert list(C._DEFERRED) == ["e2", "e3", "e4"]


# A ring-3 function (a loop with a relative call and LOOP) on a page that the kernel maps at the
# linear address the test puts at 0x300300: a guest OS placing a library or its vDSO at another
# address in each run (ASLR).
MOVED_RUNNER = r"""
import json, struct, sys
from runtime.system.machine import Machine
from tests.kernels import PAGING, RESULTS, assemble, build
where = int(sys.argv[1], 16)
ring0 = PAGING + '''
    mov eax, dword ptr [0x300300]
    shr eax, 12
    mov dword ptr [page_tab + eax*4], 0x2a0007
    mov eax, cr3
    mov cr3, eax
'''
ring3 = '''
    mov eax, dword ptr [0x300300]
    call eax
    mov dword ptr [0x300228], eax
'''
func = assemble('''
    xor eax, eax
    mov ecx, 20
l:  call add_it
    loop l
    ret
add_it:
    lea eax, [eax + ecx*2]
    ret
''', where)
m = Machine(ram_mb=8, serial_out=lambda b: None, icount=True)
m.load_multiboot(build(ring0, ring3))
m.cpu.write_phys(0x300300, struct.pack("<I", where))
m.cpu.write_phys(0x2a0000, func)
m.run()
vals = struct.unpack("<7I", m.cpu.read_phys(RESULTS, 28))
c = m.cpu.cache.counters
print(json.dumps({"vector": vals[0], "sum": struct.unpack("<I", m.cpu.read_phys(0x300228, 4))[0],
                  "compiled": c["compiled_blocks"], "moved": c["persistent_moved"]}))
"""


def _run_moved(where, cache_dir):
    e = dict(os.environ, BTVM_CACHE_DIR=str(cache_dir))
    e.pop("BTVM_NO_CACHE", None)
    p = subprocess.run([sys.executable, "-c", MOVED_RUNNER, f"{where:x}"], cwd=ROOT, env=e,
                       capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    return json.loads(p.stdout)


def test_user_code_moved_to_another_address_is_rebuilt_not_compiled(tmp_path):
    first = _run_moved(0x280000, tmp_path)
    assert first["vector"] == 0x80 and first["sum"] == 420 and first["compiled"] > 0, first
    assert first["moved"] == 0
    # The same bytes 64 KiB further on: the kernel is unchanged, the user blocks move.
    second = _run_moved(0x290000, tmp_path)
    assert second["vector"] == 0x80 and second["sum"] == 420, second
    assert second["compiled"] == 0 and second["moved"] >= 3, second


def test_runtime_functions_are_compiled_once_per_folder(tmp_path, monkeypatch):
    # The entry trampoline and the TLB refills (JIT.compile_cached) are loaded from the folder
    # by later processes; a damaged file is compiled again and replaced.
    import ctypes
    from bt import diskcache
    from bt.jit import JIT, ModuleText
    monkeypatch.setattr(diskcache, "_configured", None)
    monkeypatch.setenv("BTVM_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("BTVM_NO_CACHE", raising=False)

    def build(jit):
        mt = ModuleText("rt")
        mt.functions.append("define i32 @rt_seven() {\n  ret i32 7\n}")
        fns, _ = jit.compile_cached(mt, ["rt_seven"])
        return ctypes.CFUNCTYPE(ctypes.c_int32)(fns["rt_seven"])()

    assert build(JIT(opt=0)) == 7
    files = list((tmp_path / "runtime").glob("*.o"))
    assert len(files) == 1
    compiled = []
    real = JIT.compile
    monkeypatch.setattr(JIT, "compile", lambda self, *a, **k: compiled.append(1) or real(self, *a, **k))
    assert build(JIT(opt=0)) == 7 and not compiled
    data = bytearray(files[0].read_bytes())
    data[-1] ^= 0xFF
    files[0].write_bytes(bytes(data))
    assert build(JIT(opt=0)) == 7 and compiled == [1]
    assert build(JIT(opt=0)) == 7 and compiled == [1]

"""Persistent translation cache: compiled batches on disk, reused by later runs.

An entry holds one batch's relocatable object code (bt.jit) and, for each block
in it, the guest address and the exact guest bytes it was translated from.  Its
file name is a hash of (translator version, head address, translation key, the
first guest bytes at the head); an index maps the same triple for *every* block
of every entry to the entry, so a run that diverges from an earlier one (other
batch heads, other miss order) still finds each block it meets.  A block is
used only if its bytes still match guest memory, so a hit skips decoding, IR
generation and LLVM entirely.  The translator version hashes the sources that
shape the machine code, llvmlite/LLVM and the host CPU.

The index is a folder of append-only logs of fixed-size records, one log per
process (so writers never contend), merged into one when they pile up; a record
whose entry was evicted or is corrupt just misses.

Folder: ~/.cache/btvm/code (BTVM_CACHE_DIR overrides, BTVM_NO_CACHE=1 disables; the command
line's --cache-dir and --no-cache override both, through configure()).
Writes are atomic (temporary file + os.replace), so concurrent processes are
safe; an entry that is truncated, corrupt or from another version is ignored
(and replaced by the rebuilt one).  Entries are deflated and hashed by a thread of
the DiskCache and written at the next store() or flush() (at exit, before a fork).
The folder is kept under BTVM_CACHE_MAX_MB
(default 2048: a cold Linux boot stores ~500 MB) by evicting the least recently used entries (mtime, touched on a hit).
"""
import hashlib
import json
import os
import secrets
import struct
import queue
import tempfile
import threading
import time
import weakref
import zlib
from collections import deque
from pathlib import Path

from . import state as S

# An entry file: _HDR, then meta (JSON) and the object, deflated together.  Deflated because a
# warm Linux boot reads the entries of ~55,000 blocks: 77 MiB as they are (stencil recipes are
# mostly the same few stencils over and over), 12 MiB deflated at level 1, which takes 0.2 s to
# inflate.  Read from disk rather than the page cache (this machine's memory reclaim drops
# files unused for a while), the 77 MiB had made that boot 20 s instead of 10.
MAGIC = b"BTVMOBJ2"
WINDOW = 32                 # guest bytes at the head that are part of the lookup key
_HDR = struct.Struct("<8s32sII")     # magic, sha256(the deflated body), len(meta), len(object)
DEFLATE_LEVEL = 1
_REC = struct.Struct("<II8s32sI")     # block eip, key, sha256(window)[:8], entry name (sha256), tier
STENCIL_DIR = "stencils"                # bt.stencil.Store's folder
INDEX_DIR = "index1"                  # the number is the record format's version
# Key bit of an index record that says its block's code can be rebuilt at the same page offset
# of another page (bt.stencil.movable): looked up by (page offset, key, window digest).
MOVABLE = 1 << 31
MERGE_AT = 32                         # index logs that trigger a merge
MERGE_SETTLE_SECONDS = 120            # a merge deletes only logs unchanged for this long
# Sources that decide batching and storage, not the machine code: editing them keeps the cache.
_NOT_CODEGEN = {"cache.py", "diskcache.py", "library.py"}

_source_hash = None


def source_hash():
    """Hash of the translator's sources that shape the generated code (bt/ minus _NOT_CODEGEN)."""
    global _source_hash
    if _source_hash is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for p in sorted(root.rglob("*.py")):
            if p.name in _NOT_CODEGEN and p.parent == root:
                continue
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
        _source_hash = h.hexdigest()
    return _source_hash


# Folders atomic_write has made or found: a mkdir per write was ~0.25 ms of a cold boot's ~500
# stores each.
_MADE = set()
_ALL = weakref.WeakSet()        # every DiskCache of this process (flush_all)


def flush_all():
    """Write what every DiskCache of this process has stored (bt.cache.save_all: at exit,
    before a fork)."""
    for d in list(_ALL):
        d.flush()


def atomic_write(path, data):
    """Write data to path (a Path) through a temporary file and a rename: readers in other
    processes see the old file or the new one, never a part."""
    parent = path.parent
    if parent not in _MADE:
        parent.mkdir(parents=True, exist_ok=True)
        _MADE.add(parent)
    try:
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    except FileNotFoundError:               # removed since (the folder was cleared): again
        parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=parent, prefix=".tmp-")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


# Set by configure() (the command line): None = the environment decides, False = disabled, else a folder.
_configured = None


def configure(directory=None, enabled=True):
    """Choose the folder for this process, over BTVM_CACHE_DIR/BTVM_NO_CACHE: `btvm run|boot
    --cache-dir DIR` / `--no-cache`.  enabled=False disables the cache; a directory that cannot be
    created or written disables it too, and the reason is returned (else None)."""
    global _configured
    if not enabled:
        _configured = False
        return None
    if directory is None:
        _configured = None
        return None
    d = Path(directory).expanduser()
    try:
        d.mkdir(parents=True, exist_ok=True)
        if not os.access(d, os.W_OK | os.X_OK):
            raise PermissionError(13, "permission denied")
    except OSError as exc:
        _configured = False
        return (exc.strerror or str(exc)).lower()
    _configured = d
    return None


def default_dir():
    if _configured is not None:
        return _configured or None
    if os.environ.get("BTVM_NO_CACHE", "") not in ("", "0"):
        return None
    d = os.environ.get("BTVM_CACHE_DIR")
    if d:
        return Path(d)
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    return Path(base) / "btvm" / "code"


class StoredBlock:
    """What the code cache needs of a block that was not decoded in this process."""
    __slots__ = ("eip", "key", "raw", "ninsns", "end")

    def __init__(self, eip, key, raw, ninsns):
        self.eip, self.key, self.raw, self.ninsns = eip, key, raw, ninsns
        self.end = (eip + len(raw)) & 0xFFFFFFFF

    def pages(self):
        first = self.eip & ~0xFFF
        last = (self.eip + len(self.raw) - 1) & ~0xFFF
        return (first,) if first == last else (first, last & 0xFFFFFFFF)


class Entry:
    def __init__(self, meta, obj, path, name):
        self.meta, self.obj, self.path, self.name = meta, obj, path, name
        self.blocks = [(StoredBlock(b[0], meta["key"], bytes.fromhex(b[1]), b[2]), b[3], b[4])
                       for b in meta["blocks"]]
        self.valid = set()          # eips of the blocks whose bytes matched guest memory at lookup
        self.matched = []           # per block (an entry may hold two versions at one eip): it matched
        self.tier = meta.get("tier", 1)


def _matches(fetch, blocks):
    """Whether guest memory holds each (address, bytes) of blocks: one fetch per page for the
    blocks within a page (an entry's blocks are mostly a few pages of code), one per other block."""
    spans = {}
    for a, raw in blocks:
        if (a & 0xFFF) + len(raw) <= 0x1000:
            lo, hi = spans.get(a >> 12, (a, a))
            spans[a >> 12] = (min(lo, a), max(hi, a + len(raw)))
    got = {p: (lo, fetch(lo, hi - lo)) for p, (lo, hi) in spans.items()}
    out = []
    for a, raw in blocks:
        span = got.get(a >> 12) if (a & 0xFFF) + len(raw) <= 0x1000 else None
        if span is None:
            out.append(fetch(a, len(raw)) == raw)
        else:
            lo, data = span
            out.append(data[a - lo:a - lo + len(raw)] == raw)
    return out


def _part(key):
    """The index partition of a translation key: paged code (a guest OS) apart from unpaged (user
    mode, boot code), so that `btvm run` does not read the records of every kernel it shares
    the cache folder with (~0.15 s of start-up for one Linux boot's)."""
    return "pg" if key & S.KEY_PG else "flat"


_LAST_DIGEST = (None, None)


# The index holds a record per block stored (~55,000 for a Linux boot): each is one int, not a
# tuple of three objects, and an entry's name is shared by its records (25 -> 9 MB).
def _at(eip, key):
    return key << 32 | eip


def _ikey(eip, key, wd):
    """An index record's key: (eip, key, window digest) as one int."""
    return int.from_bytes(wd, "little") << 64 | key << 32 | eip


def _unkey(k):
    return k & 0xFFFFFFFF, k >> 32 & 0xFFFFFFFF, (k >> 64).to_bytes(8, "little")


class DiskCache:
    def __init__(self, root, fingerprint, max_bytes=None):
        self.root = Path(root)
        # MAGIC too: the index records of entries in an older format must not be found (their
        # files are refused), and this file's sources are not part of source_hash().
        self.version = hashlib.sha256((source_hash() + "|" + fingerprint + "|" + MAGIC.decode()).encode()).hexdigest()
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("BTVM_CACHE_MAX_MB", "2048")) * 2**20)
        self.max_bytes = max_bytes
        self._written = 0
        self._sized = None          # bytes in the folder, read or measured at the first write
        self._unsaved = 0           # bytes this process added since it last wrote the size file
        self.errors = 0
        self._index = None          # _ikey(eip, key, window digest) -> entry name or tuple of names
        self._log = None            # this process's index log (named at the first store)
        self._writes = None         # entries stored and not yet packed: (queue, packing thread, pid)
        self._packed = deque()      # (name, file contents, index records) packed, not yet written
        _ALL.add(self)

    def _name(self, eip, key, window):
        return hashlib.sha256(f"{self.version}:{eip:x}:{key:x}:".encode() + window).digest()

    def _path_of(self, name):
        h = name.hex()
        return self.root / h[:2] / (h[2:] + ".bto")

    def _path(self, eip, key, window):
        return self._path_of(self._name(eip, key, window))

    @staticmethod
    def _wdigest(window):
        # A lookup that finds records asks for the same window's digest more than once in a row
        # (candidates, moved_candidates, in_region); one tuple swapped whole, so another thread
        # never sees a window with the other one's digest.
        global _LAST_DIGEST
        last = _LAST_DIGEST
        if last[0] is not window:
            last = _LAST_DIGEST = (window, hashlib.sha256(window).digest()[:8])
        return last[1]

    def lookup(self, eip, key, window, fetch):
        """A valid entry holding the block at (eip, key) whose first guest bytes are window
        (fetch(eip, WINDOW)), or None.  The entry's `valid` names the blocks (by eip) whose
        bytes still match guest memory; the one at eip always does.  Tier-2 regions come first
        (the newest entries) and are valid only whole: their blocks call each other directly."""
        for name in self.candidates(eip, key, window):
            ent = self.open(name, eip, key, fetch)
            if ent is not None:
                return ent
        return None

    def candidates(self, eip, key, window):
        """Names of the entries that may hold the block, the most promising first."""
        # Only what the index lists: probing the tier-1 batch's own name as well cost a failed
        # open() per translation of a cold run (~2 s of a Linux boot).  An entry another process
        # stores after this one loaded the index is missed: it is compiled again, never wrong.
        index = self.index(key)
        if _at(eip, key) not in self._at:
            return []
        names = index.get(_ikey(eip, key, self._wdigest(window)), ())
        names = [names] if type(names) is bytes else list(reversed(names))
        # Tier-2 regions first, however old: a tier-1 batch stored later (stencil blocks are
        # stored at exit, after the regions made during the run) must not shadow them.
        names.sort(key=lambda n: self._tiers.get(n) != 2)
        return names

    def tier_of(self, name):
        """The tier an indexed entry was stored with (store's tier: 2 is a tier-2 region), or None."""
        return self._tiers.get(name)

    def has(self, eip, key, window):
        """Whether the index knows a block at (eip, key) with these first bytes (a hint: the
        entry may since have been evicted)."""
        index = self.index(key)
        return _at(eip, key) in self._at and _ikey(eip, key, self._wdigest(window)) in index

    def in_region(self, eip, key, window):
        """Whether a stored tier-2 region holds the block at (eip, key) with these first bytes."""
        self.index(key)
        return _ikey(eip, key, self._wdigest(window)) in self._in_region

    def maybe_in_region(self, eip, key):
        """False if no stored tier-2 region holds a block at (eip, key), whatever its bytes
        (in_region without fetching and hashing the window)."""
        self.index(key)
        return _at(eip, key) in self._in_region_at

    def moved_candidates(self, eip, key, window):
        """[(entry name, eip there)] of movable blocks with these first bytes at eip's page offset
        elsewhere (see open's delta), the newest first."""
        self.index(key)
        if (eip & 0xFFF, key) not in self._movable_at:
            return []
        return list(reversed(self._movable.get((eip & 0xFFF, key, self._wdigest(window)), ())))

    def open(self, name, eip, key, fetch, delta=0):
        """The entry called name if it is intact, of this version, and valid for (eip, key).
        With delta, its blocks are looked for delta bytes further on in guest memory (valid
        still names them by their stored eips)."""
        path = self._path_of(name)
        try:
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        ent = self._parse(data, path, name)
        if ent is None or ent.meta.get("version") != self.version or ent.meta.get("key") != key:
            return None
        ent.matched = _matches(fetch, [((b.eip + delta) & 0xFFFFFFFF, b.raw) for b, _, _ in ent.blocks])
        ent.valid = {b.eip for (b, _, _), ok in zip(ent.blocks, ent.matched) if ok}
        if eip not in ent.valid or (ent.tier == 2 and len(ent.valid) != len(ent.blocks)):
            return None
        try:
            os.utime(path)          # LRU: a hit makes the entry recent
        except OSError:
            pass
        return ent

    # ---- the block index ------------------------------------------------------------
    def index(self, key):
        """The block index: _ikey(eip, key, window digest) -> an entry name or a tuple of them
        (the newest last), loaded by partition (see _part): the records of the partition of key
        are in it, maybe others'."""
        if self._index is None:
            self._index = {}
            self._tiers = {}            # entry name -> tier
            self._names = {}            # entry name -> itself (one object for all its records)
            self._in_region = set()     # index keys of blocks that some tier-2 region holds
            self._in_region_at = set()  # their _at(eip, key)
            self._movable = {}          # (page offset, key, window digest) -> [(entry name, eip)]
            # What the index has records for, whatever their bytes: a cold run's lookups (nearly
            # all of its translations) need not hash their window.
            self._at = set()            # _at(eip, key)
            self._movable_at = set()    # (page offset, key)
            self._loaded = set()        # partitions read
        part = _part(key)
        if part not in self._loaded:
            self._loaded.add(part)
            logs = self._logs(part)
            for p in logs:
                try:
                    data = p.read_bytes()
                except OSError:
                    continue
                self._add_records(data)
            if len(logs) >= MERGE_AT:
                self._merge(logs, part)
        return self._index

    def _index_dir(self):
        # One folder per translator version: records of other versions can never hit, and
        # reading them cost every start-up (seconds once the folder held a few runs' worth).
        return self.root / INDEX_DIR / self.version[:16]

    def _logs(self, part):
        try:
            return sorted(self._index_dir().glob(f"{part}-*.log"))
        except OSError:
            return []

    def _add_records(self, data):
        idx, names = self._index, self._names
        for eip, key, wd, name, tier in _REC.iter_unpack(data[:len(data) - len(data) % _REC.size]):
            name = names.setdefault(name, name)
            if key & MOVABLE:
                lst = self._movable.setdefault((eip & 0xFFF, key & ~MOVABLE, wd), [])
                if (name, eip) not in lst:
                    lst.append((name, eip))
                self._movable_at.add((eip & 0xFFF, key & ~MOVABLE))
                continue
            at = _at(eip, key)
            self._at.add(at)
            k = _ikey(eip, key, wd)
            had = idx.get(k)
            if had is None:
                idx[k] = name
            elif type(had) is bytes:
                if had != name:
                    idx[k] = (had, name)
            elif name not in had:
                idx[k] = had + (name,)
            self._tiers[name] = tier
            if tier == 2:
                self._in_region.add(k)
                self._in_region_at.add(at)

    def _merge(self, logs, part):
        """Rewrite a partition's logs as one without the records of evicted entries."""
        alive = {}
        out = bytearray()
        records = [(*_unkey(k), n) for k, names in self._index.items()
                   for n in ((names,) if type(names) is bytes else names)]
        records += [(eip, key | MOVABLE, wd, n) for (_, key, wd), lst in self._movable.items() for n, eip in lst]
        for eip, key, wd, n in records:
            if _part(key) != part:
                continue
            ok = alive.get(n)
            if ok is None:
                ok = alive[n] = self._path_of(n).exists()
            if ok:
                out += _REC.pack(eip, key, wd, n, self._tiers.get(n, 1))
        try:
            atomic_write(self._index_dir() / f"{part}-merged-{secrets.token_hex(8)}.log", bytes(out))
        except OSError:
            self.errors += 1
            return
        # A log written to lately may still be appended to by a running process after this one
        # read it: deleting it would lose those records (their blocks compiled again).  Its
        # records are in the merged log too; it goes at a later merge.
        settled = time.time() - MERGE_SETTLE_SECONDS
        for p in logs:
            try:
                if p.stat().st_mtime < settled:
                    p.unlink()
            except OSError:
                pass

    def _append_index(self, records):
        """Add records to the index, this process's and the log's, at once."""
        self._log_records(self._index_records(records))

    def _index_records(self, records):
        """Add records to this process's index; {partition: their bytes} for _log_records."""
        parts = {}
        for r in records:
            parts.setdefault(_part(r[1]), []).append(r)
        out = {}
        for part, recs in parts.items():
            data = out[part] = b"".join(_REC.pack(*r) for r in recs)
            self.index(recs[0][1])
            self._add_records(data)
        return out

    def _log_records(self, parts):
        """Append {partition: record bytes} to this process's index logs, for other processes."""
        for part, data in parts.items():
            try:
                if self._log is None:
                    d = self._index_dir()
                    d.mkdir(parents=True, exist_ok=True)
                    self._log = f"{os.getpid()}-{secrets.token_hex(6)}.log"
                # Opened for each write, never kept: a user-mode guest shares this process's fd
                # table (its dup2 could land on our descriptor, or ours on a number it expects
                # free).  O_APPEND and one write per batch: records of one process never interleave.
                fd = os.open(self._index_dir() / f"{part}-{self._log}",
                             os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
                try:
                    os.write(fd, data)
                finally:
                    os.close(fd)
            except OSError:
                self.errors += 1

    def _parse(self, data, path, name):
        try:
            magic, digest, nmeta, nobj = _HDR.unpack_from(data)
            if magic != MAGIC:
                return None
            body = memoryview(data)[_HDR.size:]
            if hashlib.sha256(body).digest() != digest:
                return None
            raw = zlib.decompress(body)
            if len(raw) != nmeta + nobj:
                return None
            meta = json.loads(raw[:nmeta])
            return Entry(meta, raw[nmeta:], path, name)
        except (struct.error, ValueError, KeyError, IndexError, TypeError, zlib.error):
            self.errors += 1
            return None

    def store(self, key, blocks, obj, tier=1, movable=()):
        """Persist one compiled batch (tier 1) or region (tier 2); its entry name.  blocks: [(eip,
        raw bytes, window, ninsns, function name, [slot names])] of the object, the head first;
        window is fetch(eip, WINDOW).  movable: the eips of blocks whose code can be rebuilt
        elsewhere (indexed by page offset too: moved_candidates).  This process's index has the
        blocks at once; a thread of this cache's deflates and hashes the entry (the guest's
        thread runs meanwhile), and the file and the index log are written at the next store()
        or flush()."""
        meta = json.dumps({"version": self.version, "eip": blocks[0][0], "key": key, "tier": tier,
                           "blocks": [[b, raw.hex(), n, name, list(slots)]
                                      for b, raw, _, n, name, slots in blocks]},
                          separators=(",", ":")).encode()
        name = self._name(blocks[0][0], key, blocks[0][2])
        if tier != 1:
            # Named by its blocks too: two runs that store different batches under the same head
            # (stencil blocks are stored in the order they were met) must not overwrite each
            # other, or the index records of the first point at an entry without their blocks.
            name = hashlib.sha256(name + b"tier%d" % tier + hashlib.sha256(meta).digest()).digest()
        records = self._index_records(
            [(b, key, self._wdigest(w), name, tier) for b, _, w, _, _, _ in blocks]
            + [(b, key | MOVABLE, self._wdigest(w), name, tier) for b, _, w, _, _, _ in blocks if b in movable])
        self._write_packed()
        w = self._writes
        if w is None or w[2] != os.getpid():        # none yet, or inherited through a fork
            q = queue.Queue()
            t = threading.Thread(target=self._packer, args=(q,), name="btvm-diskcache", daemon=True)
            try:
                t.start()
            except RuntimeError:                    # at interpreter shutdown (Python 3.12.0-1)
                self._write(name, self._pack(meta, obj), records)
                return name
            w = self._writes = (q, t, os.getpid())
        w[0].put((name, meta, obj, records))
        return name

    def flush(self):
        """Write everything stored so far (at exit, before a fork): wait for the packing thread,
        then write what it packed."""
        w = self._writes
        if w is not None and w[2] == os.getpid():
            w[0].join()
        self._write_packed()

    # The thread only deflates and hashes.  The files are written by the thread that stores
    # (at its next store() or flush()): a user-mode guest shares this process's descriptor table,
    # and a descriptor the thread opened could take the number the guest's next open() expects
    # (or a dup2 of the guest's could land on the thread's file).
    def _packer(self, q):
        while True:
            name, meta, obj, records = q.get()
            try:
                self._packed.append((name, self._pack(meta, obj), records))
            except Exception:
                self.errors += 1
            finally:
                q.task_done()

    @staticmethod
    def _pack(meta, obj):
        body = zlib.compress(meta + obj, DEFLATE_LEVEL)
        return _HDR.pack(MAGIC, hashlib.sha256(body).digest(), len(meta), len(obj)) + body

    def _write_packed(self):
        packed = self._packed
        while packed:
            self._write(*packed.popleft())

    def _write(self, name, data, records):
        try:
            atomic_write(self._path_of(name), data)
        except OSError:
            self.errors += 1
            return
        self._log_records(records)
        self._account(len(data))

    # ---- size bound ---------------------------------------------------------------
    def _entries(self):
        out = []
        try:
            subdirs = list(os.scandir(self.root))
        except OSError:
            return out
        for d in subdirs:
            if not d.is_dir():
                continue
            try:
                # Index logs and stencil files count and age like entries (those of old
                # versions go first): they are kept in a folder per translator version.
                files = os.scandir(d.path) if d.name not in (INDEX_DIR, STENCIL_DIR) else \
                    (e for v in os.scandir(d.path) if v.is_dir() for e in os.scandir(v.path))
                for e in files:
                    if e.name.endswith((".bto", ".log", ".o", ".stl")):   # .o: runtime/ (JIT.compile_cached)
                        st = e.stat()
                        out.append((st.st_mtime, st.st_size, e.path))
            except OSError:
                continue
        return out

    # The folder's size is kept in a small file (SIZE_FILE), updated by every writer as it goes:
    # measuring it by listing the folder took ~0.8 s with a few GB of entries, paid by every run
    # that stored anything.  It is approximate under concurrent writers; evict() lists the folder
    # and writes the exact figure.
    SIZE_FILE = "size"
    SIZE_SAVE_EVERY = 8 << 20

    def _read_size(self):
        try:
            return int((self.root / self.SIZE_FILE).read_text())
        except (OSError, ValueError):
            return None

    def _save_size(self, total):
        try:
            atomic_write(self.root / self.SIZE_FILE, str(max(0, total)).encode())
        except OSError:
            self.errors += 1

    def _account(self, n):
        if self._sized is None:
            self._sized = self._read_size()
            if self._sized is None:
                self._sized = sum(s for _, s, _ in self._entries())
                self._save_size(self._sized)
            self._unsaved = 0
        self._sized += n
        self._unsaved += n
        if self._sized > self.max_bytes:
            self.evict()
        elif self._unsaved >= self.SIZE_SAVE_EVERY:
            # Others may have written meanwhile: add this process's growth to the file's figure.
            on_disk = self._read_size()
            self._sized = (on_disk if on_disk is not None and on_disk > self._sized - self._unsaved
                           else self._sized - self._unsaved) + self._unsaved
            self._save_size(self._sized)
            self._unsaved = 0

    def evict(self, target=None):
        """Delete least recently used entries until the folder holds at most target bytes
        (default 3/4 of the bound)."""
        target = self.max_bytes * 3 // 4 if target is None else target
        entries = sorted(self._entries())
        total = sum(s for _, s, _ in entries)
        for _, size, path in entries:
            if total <= target:
                break
            try:
                os.unlink(path)
                total -= size
            except OSError:
                pass
        self._sized = total
        self._unsaved = 0
        self._save_size(total)
        return total

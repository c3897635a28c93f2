"""Persistent translation cache: compiled batches on disk, reused by later runs.

An entry holds one batch's relocatable object code (bt.jit) and, for each block
in it, the guest address and the exact guest bytes it was translated from.  It
is found by a hash of (translator version, head address, translation key, the
first guest bytes at the head) and used only if every block's bytes still match
guest memory, so a hit skips decoding, IR generation and LLVM entirely.  The
translator version hashes the bt/ sources, llvmlite/LLVM and the host CPU.

Folder: ~/.cache/btvm/code (BTVM_CACHE_DIR overrides, BTVM_NO_CACHE=1 disables).
Writes are atomic (temporary file + os.replace), so concurrent processes are
safe; an entry that is truncated, corrupt or from another version is ignored
(and replaced by the rebuilt one).  The folder is kept under BTVM_CACHE_MAX_MB
(default 2048: a cold Linux boot stores ~500 MB) by evicting the least recently used entries (mtime, touched on a hit).
"""
import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

MAGIC = b"BTVMOBJ1"
WINDOW = 32                 # guest bytes at the head that are part of the lookup key
_HDR = struct.Struct("<8s32sII")     # magic, sha256(meta + object), len(meta), len(object)

_source_hash = None


def source_hash():
    """Hash of the translator's own sources (every bt/ Python file)."""
    global _source_hash
    if _source_hash is None:
        h = hashlib.sha256()
        root = Path(__file__).resolve().parent
        for p in sorted(root.rglob("*.py")):
            h.update(str(p.relative_to(root)).encode() + b"\0")
            h.update(p.read_bytes())
        _source_hash = h.hexdigest()
    return _source_hash


def default_dir():
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
        return [first] if first == last else [first, last & 0xFFFFFFFF]


class Entry:
    def __init__(self, meta, obj, path):
        self.meta, self.obj, self.path = meta, obj, path
        self.blocks = [(StoredBlock(b[0], meta["key"], bytes.fromhex(b[1]), b[2]), b[3], b[4])
                       for b in meta["blocks"]]


class DiskCache:
    def __init__(self, root, fingerprint, max_bytes=None):
        self.root = Path(root)
        self.version = hashlib.sha256((source_hash() + "|" + fingerprint).encode()).hexdigest()
        if max_bytes is None:
            max_bytes = int(float(os.environ.get("BTVM_CACHE_MAX_MB", "2048")) * 2**20)
        self.max_bytes = max_bytes
        self._written = 0
        self._sized = None          # bytes in the folder, measured at the first write
        self.errors = 0

    def _path(self, eip, key, window):
        h = hashlib.sha256(f"{self.version}:{eip:x}:{key:x}:".encode() + window).hexdigest()
        return self.root / h[:2] / (h[2:] + ".bto")

    def lookup(self, eip, key, window, fetch):
        """The valid entry for a batch headed at (eip, key) whose first guest bytes are window
        (fetch(eip, WINDOW)), or None."""
        try:
            path = self._path(eip, key, window)
            with open(path, "rb") as f:
                data = f.read()
        except OSError:
            return None
        ent = self._parse(data, path)
        if ent is None or ent.meta.get("version") != self.version or ent.meta.get("eip") != eip \
                or ent.meta.get("key") != key:
            return None
        for blk, _, _ in ent.blocks:
            if fetch(blk.eip, len(blk.raw)) != blk.raw:
                return None
        try:
            os.utime(path)          # LRU: a hit makes the entry recent
        except OSError:
            pass
        return ent

    def _parse(self, data, path):
        try:
            magic, digest, nmeta, nobj = _HDR.unpack_from(data)
            if magic != MAGIC or len(data) != _HDR.size + nmeta + nobj:
                return None
            body = memoryview(data)[_HDR.size:]
            if hashlib.sha256(body).digest() != digest:
                return None
            meta = json.loads(bytes(body[:nmeta]))
            return Entry(meta, bytes(body[nmeta:]), path)
        except (struct.error, ValueError, KeyError, IndexError, TypeError):
            self.errors += 1
            return None

    def store(self, eip, key, window, blocks, obj):
        """blocks: [(eip, raw bytes, ninsns, function name, [slot names])] of the object."""
        meta = json.dumps({"version": self.version, "eip": eip, "key": key,
                           "blocks": [[b, raw.hex(), n, name, list(slots)] for b, raw, n, name, slots in blocks]},
                          separators=(",", ":")).encode()
        body = meta + obj
        data = _HDR.pack(MAGIC, hashlib.sha256(body).digest(), len(meta), len(obj)) + body
        path = self._path(eip, key, window)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-")
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
        except OSError:
            self.errors += 1
            return False
        self._account(len(data))
        return True

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
                for e in os.scandir(d.path):
                    if e.name.endswith(".bto"):
                        st = e.stat()
                        out.append((st.st_mtime, st.st_size, e.path))
            except OSError:
                continue
        return out

    def _account(self, n):
        if self._sized is None:
            self._sized = sum(s for _, s, _ in self._entries())
        else:
            self._sized += n
        if self._sized > self.max_bytes:
            self.evict()

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
        return total

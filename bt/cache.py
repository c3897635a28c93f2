"""The code cache: translated blocks keyed by (guest address, translation key).

It owns the native jump cache that translated code probes for indirect
branches, links direct exits ("chaining") by patching chain slots and keeps
the back-links that make unlinking exact when a block is invalidated.  Every
decision bumps a named counter; the profiler reads only the counters.
"""
import atexit
import os
import secrets
import struct
import time
import weakref
from collections import Counter, defaultdict, deque

from . import state as S
from .decode import decode_block, DecodeError
from .jit import ModuleText, shared_jit
from . import diskcache, emit, lazyflags, stencil, tier2
from .semantics import block_rules, ends_block, starts_block, Unsupported, TABLE
from .translate import translate_block, static_successors

import ctypes

# Blocks compiled in this process, by (eip, key, guest bytes): a second machine
# running the same code (the corpus, a re-run) reuses them instead of compiling.
_MEMO = {}
# Disk-cache entries whose object is loaded in this process (its symbols are taken), by entry
# name: (tier, [TB of each block]).  A later miss on one of their blocks adopts the TB.
_ENTRIES = {}
_DEFERRED = {}    # stencil entry name -> {eip: [(stored block, recipe)]} not rebuilt at load (an entry
                  # may hold several versions of a block: code the guest patched while it ran)
_DEFERRED_MAX = 4096    # entries kept (oldest dropped first: their blocks are compiled if reached)
# Tier-2 regions by the memo key of each member: a cache that adopts a memoized tier-1 block
# takes its whole region instead when every member's bytes are in its memory.
_REGIONS = {}
# Tier-2 blocks made while profiling (the profiler reads their counters; they are not in _MEMO:
# a region member must not be adopted without the blocks it calls directly).
TIER2 = []
# When a list (set by `btvm profile`), every CodeCache created appends itself to it.
TRACK = None
_DISKS = {}
# Blocks built from stencils are stored STENCIL_BATCH at a time, or those of the last
# STENCIL_SAVE_SECONDS when fewer (a run killed with SIGKILL loses only those), and at exit and
# before a fork.  512 rather than 128: a cold Linux boot's saves took 0.54 s instead of 0.68 s
# (108 entries instead of 435), and warm boots from either took the same time.
STENCIL_BATCH = 512
STENCIL_SAVE_SECONDS = 2.0
STENCIL_TIER = 3            # the disk-cache entry kind of stencil recipes


def _recipes(ent):
    """(stored block, recipe) of each block of a stencil entry (save_stencil_blocks' layout)."""
    pos, data = 0, ent.obj
    for blk, _, _ in ent.blocks:
        n, = struct.unpack_from("<I", data, pos)
        yield blk, data[pos + 4:pos + 4 + n]
        pos += 4 + n


def _moves(key):
    """Whether blocks of this key are stored movable (bt.stencil.movable): user code under
    paging, which the guest OS may place at other addresses each run (ASLR: the vDSO, shared
    libraries, PIE programs)."""
    return bool(key & S.KEY_PG) and S.key_cpl(key) == 3
_LIVE = weakref.WeakSet()


def save_all():
    """Store what is pending for the cache folder -- every cache's unsaved stencil blocks, the
    entries queued for writing, the stencil stores' new records -- at exit, before a fork, and before btvm dies of its guest's
    signal (runtime/cli.py)."""
    for c in list(_LIVE):
        if c._unsaved and c.disk is not None:
            try:
                c.save_stencil_blocks()
            except Exception:
                pass
    diskcache.flush_all()       # the entries stored and not written yet
    stencil.flush_stores()


atexit.register(save_all)
os.register_at_fork(before=save_all)

# BTVM_PERFMAP=1: name translated code for Linux perf (`perf record`, then `perf report`): at exit,
# /tmp/perf-PID.map gets a line per block ever installed, "btvm_<eip>_t<tier>" (t1s: stencils),
# its size taken as the distance to the next block (capped at 64 KiB).
_PERF_BLOCKS = {} if os.environ.get("BTVM_PERFMAP", "") not in ("", "0") else None


def _write_perf_map():
    addrs = sorted(_PERF_BLOCKS)
    try:
        with open(f"/tmp/perf-{os.getpid()}.map", "w") as f:
            for i, a in enumerate(addrs):
                size = min(addrs[i + 1] - a if i + 1 < len(addrs) else 4096, 65536)
                f.write(f"{a:x} {size:x} {_PERF_BLOCKS[a]}\n")
    except OSError:
        pass


if _PERF_BLOCKS is not None:
    atexit.register(_write_perf_map)


def shared_disk(jit):
    """The persistent cache for jit's code (None when disabled), one per folder and engine."""
    root = diskcache.default_dir()
    if root is None:
        return None
    k = (str(root), id(jit), emit.COUNT_EXECS, tier2.THRESHOLD)
    d = _DISKS.get(k)
    if d is None:
        d = _DISKS[k] = diskcache.DiskCache(root, jit.fingerprint() +
                                            f"|count={emit.COUNT_EXECS}|hot={max(tier2.THRESHOLD, 0)}"
                                            f"|stencil_cg={stencil.CODEGEN_OPT}")
    return d


class TB:
    """A translated block."""
    __slots__ = ("eip", "key", "fn", "slots", "pages", "ninsns", "owner", "execs", "memo_key", "_name",
                 "counter", "tier", "region", "promoting", "hot_addr", "stenciled", "phys")

    def __init__(self, block, fn, slots, name):
        # Keep the bytes (in memo_key), not the decoded instructions (hundreds of bytes of Python
        # objects per instruction, for every block ever translated); tier 2 decodes hot ones again.
        self.eip, self.key = block.eip, block.key
        self.fn, self.slots, self._name = fn, slots, name
        self.pages = block.pages()
        self.ninsns = block.ninsns if isinstance(block, diskcache.StoredBlock) else len(block.insns)
        self.owner = None
        self.execs = 0
        self.memo_key = (block.eip, block.key, block.raw)
        self.counter = 0          # address of the block's execution counter (COUNT_EXECS), else 0
        self.tier = 1
        self.region = ()          # tier 2: every block of the region (they call each other directly)
        self.promoting = False    # tier 1: in a region on its way through the optimizer
        self.hot_addr = 0         # tier 1 by copy-and-patch: address of the tier-2 countdown cell
        self.stenciled = False    # tier 1 by copy-and-patch (bt.stencil), not LLVM
        self.phys = None          # system mode: the physical page of its first byte when installed

    @property
    def block(self):
        """Its guest bytes and where they are, as a diskcache.StoredBlock."""
        eip, key, raw = self.memo_key
        return diskcache.StoredBlock(eip, key, raw, self.ninsns)

    @property
    def name(self):
        """Its function's symbol (LLVM blocks), or a name made from its address (stencil blocks
        have no symbol: not kept, for the ~55,000 blocks of a Linux boot)."""
        return self._name or f"c{self.eip:08x}_{self.key:x}"

    def executions(self):
        return ctypes.c_uint64.from_address(self.counter).value if self.counter else None


class CodeCache:
    def __init__(self, fetch, on_code_page=None, jit=None, batch=16, batch_insns=256, max_blocks=200_000,
                 disk=None, optimizer=None):
        """fetch(addr, n) -> bytes of executable guest memory; on_code_page(page) is
        called when a page first holds translated code (so the memory can trap writes);
        on_install(tb), if set, is called for every block entering the cache.
        disk: a bt.diskcache.DiskCache, False for none, None for the shared default;
        optimizer: a bt.tier2.Optimizer, False for no tier 2, None for the shared default."""
        self.fetch = fetch
        self.on_code_page = on_code_page or (lambda page: None)
        self.jit = jit or shared_jit()
        self.disk = shared_disk(self.jit) if disk is None else (disk or None)
        self.optimizer = tier2.shared_optimizer() if optimizer is None else (optimizer or None)
        self.hot_threshold = tier2.THRESHOLD if self.optimizer is not None else 0
        self.batch = batch
        self.batch_insns = batch_insns
        self.max_blocks = max_blocks
        self.jmp_cache = (S.JmpCacheEntry * S.JMP_CACHE_SIZE)()
        self.link_log = (ctypes.c_uint64 * (1 + S.LINK_LOG))()    # see drain_links
        self.blocks = {}
        self.by_page = defaultdict(set)
        self.incoming = defaultdict(list)     # TB -> slot addresses linked to it (few: a list)
        self.slot_target = {}                 # slot address -> TB
        self.by_fn = {}
        self.on_install = None
        # fn(tb): put a block installed along with the one a miss asked for (the rest of a stored
        # entry) in the jump cache, so that the native entry can reach and chain it without the
        # runtime.  System mode decides by page (SystemCPU._prefill); default: always.
        self.prefill = self._jc_fill
        self.insns = {}                       # (eip, key) -> (insn, mapping_gen, global_gen, expect): callouts
        self.mapping_gen = 0                  # bumped when the linear->physical view may have changed
        self.global_gen = 0                   # bumped when that of global pages may have (not CR3 writes)
        self.is_global = None                 # fn(eip): its page is mapped global (system mode sets it)
        self.insns_by_page = {}               # page -> keys of self.insns
        self.slot_owner = {}                  # slot address -> TB whose exit it is
        self.counters = Counter()
        self.stencils = stencil.shared_builder() if stencil.ENABLED else None
        self._unsaved = []                    # [(TB, recipe)] built from stencils, not yet stored
        self._saved_at = time.monotonic()
        _LIVE.add(self)
        self.last_compile = 0.0               # perf_counter() of the last tier-1 compile
        self.compile_log = []                 # (time, blocks, seconds) per batch
        if TRACK is not None:
            TRACK.append(self)

    @property
    def jmp_cache_addr(self):
        return ctypes.addressof(self.jmp_cache)

    @property
    def link_log_addr(self):
        return ctypes.addressof(self.link_log)

    # ---- lookup -------------------------------------------------------------
    def lookup(self, eip, key):
        self.counters["lookups"] += 1
        tb = self.blocks.get((eip, key))
        if tb is None:
            self.counters["misses"] += 1
        else:
            self.counters["hits"] += 1
        return tb

    def _jc_fill(self, tb):
        ent = self.jmp_cache[S.jc_hash(tb.eip)]
        ent.eip, ent.key, ent.fn = tb.eip, tb.key, tb.fn

    def _jc_drop(self, tb):
        ent = self.jmp_cache[S.jc_hash(tb.eip)]
        if ent.fn == tb.fn:
            ent.eip, ent.key, ent.fn = 1, 0xFFFFFFFF, 0

    def get(self, eip, key):
        """The block at (eip, key), translating (and batching its successors) on a miss.
        Raises DecodeError/Unsupported when the first instruction cannot be translated."""
        tb = self.lookup(eip, key)
        if tb is None:
            tb = self._translate(eip, key)
        self._jc_fill(tb)
        return tb

    # ---- chaining -------------------------------------------------------------
    def drain_links(self):
        """Record the chains the native entry made (runtime/cpu.py: an empty slot whose target the
        jump cache had), so that unlinking finds them: called before anything reads or changes
        the back-links."""
        log = self.link_log
        n = log[0]
        if not n:
            return
        log[0] = 0
        owner, by_fn = self.slot_owner, self.by_fn
        for s in log[1:n + 1]:
            cell = ctypes.c_uint64.from_address(s)
            tb = by_fn.get(cell.value)
            if tb is None or s not in owner:
                # Its block was dropped while it ran (it wrote over its own code), or emptied
                # since: never entered again as it is (a re-install empties its slots).
                cell.value = 0
                continue
            self._linked(s, tb)

    def _linked(self, slot_addr, tb):
        """Record that slot_addr now jumps into tb (the back-link forget() unlinks by)."""
        old = self.slot_target.get(slot_addr)
        if old is tb:
            return
        if old is not None:
            self._drop_back_link(old, slot_addr)
        self.slot_target[slot_addr] = tb
        self.incoming[tb].append(slot_addr)
        self.counters["chain_links"] += 1

    def _drop_back_link(self, tb, slot_addr):
        into = self.incoming[tb]
        if slot_addr in into:
            into.remove(slot_addr)

    def link(self, slot_addr, tb):
        """Patch a direct exit of some block to jump straight into tb."""
        self.drain_links()
        owner = self.slot_owner.get(slot_addr)
        if owner is None or owner.key != tb.key:
            return                  # a chain never changes the mode key
        ctypes.c_uint64.from_address(slot_addr).value = tb.fn
        self._linked(slot_addr, tb)

    def _unlink_slot(self, slot_addr):
        tb = self.slot_target.pop(slot_addr, None)
        ctypes.c_uint64.from_address(slot_addr).value = 0
        if tb is not None:
            self._drop_back_link(tb, slot_addr)
            self.counters["chain_unlinks"] += 1

    # ---- translation ------------------------------------------------------------
    def _decode(self, eip, key):
        return decode_block(self.fetch, eip, key, ends_block, starts_block=starts_block, rules=block_rules())

    def _translate(self, eip, key):
        t0 = time.perf_counter()
        window = None
        if self.disk is not None:
            window = self.fetch(eip, diskcache.WINDOW)
            tb = self._from_disk(eip, key, window)
            if tb is not None:
                self.counters["translate_seconds_x1e6"] += int((time.perf_counter() - t0) * 1e6)
                return tb
        first = self._decode(eip, key)
        if not first.insns:
            raise DecodeError(first.stop_reason or "undecodable")
        if self.stencils is not None:
            tb = self._from_stencils(first, window)
            self.counters["translate_seconds_x1e6"] += int((time.perf_counter() - t0) * 1e6)
            if tb is not None:
                return tb
        todo = deque([first])
        seen = {eip}
        mt = ModuleText(f"batch{self.jit.modules}", hot=self.hot_threshold)
        uid = secrets.token_hex(6)      # symbol names unique across processes sharing the disk cache
        pending = []
        adopted = []
        insns = 0
        while todo and len(pending) + len(adopted) < self.batch and insns < self.batch_insns:
            blk = todo.popleft()
            insns += len(blk.insns)
            memo_key = (blk.eip, blk.key, blk.raw)
            hit = _MEMO.get(memo_key)
            if hit is not None:
                adopted.append(hit)
            else:
                name = f"b{blk.eip:08x}_{blk.key:x}_{uid}_{len(pending)}"
                try:
                    blk2, slots = translate_block(blk, name, mt)
                except Unsupported:
                    if blk is first:
                        raise
                    continue
                pending.append((blk2, name, slots))
            for nxt in static_successors(blk):
                if nxt not in seen and (nxt, key) not in self.blocks:
                    seen.add(nxt)
                    if self.disk is not None and self.disk.has(nxt, key, self.fetch(nxt, diskcache.WINDOW)):
                        continue        # compiled by an earlier run: loaded when first reached
                    try:
                        b = self._decode(nxt, key)
                    except Exception:
                        continue
                    if b.insns:
                        todo.append(b)
        self.counters["translate_seconds_x1e6"] += int((time.perf_counter() - t0) * 1e6)
        fresh = set()
        if pending:
            t1 = time.perf_counter()
            fns, slots, obj = self.jit.compile(mt, [n for _, n, _ in pending], want_object=True)
            dt = time.perf_counter() - t1
            self.counters["compile_us"] += int(dt * 1e6)
            self.counters["compiled_blocks"] += len(pending)
            self.counters["batches"] += 1
            self.compile_log.append((time.perf_counter(), len(pending), dt))
            self.last_compile = time.perf_counter()
            for blk, name, sl in pending:
                tb = TB(blk, fns[name], [slots[s] for s in sl], name)
                self._attach_counter(tb)
                _MEMO[tb.memo_key] = tb
                adopted.append(tb)
                fresh.add(tb)
            if self.disk is not None:
                stored = [(b.eip, b.raw, window if b.eip == eip else self.fetch(b.eip, diskcache.WINDOW),
                           len(b.insns), n, sl) for b, n, sl in pending]
                name = self.disk.store(key, stored, obj)
                if name is not None:
                    _ENTRIES[name] = (1, [tb for tb in adopted if tb in fresh])
                    self.counters["persistent_stores"] += 1
        return self._adopt(adopted, eip, key, fresh)

    def _from_stencils(self, blk, window=None):
        """The block at blk instantiated from stencils (bt.stencil), or None to compile it with LLVM.
        window: fetch(blk.eip, diskcache.WINDOW) if the caller has it (no guest code ran since)."""
        memo_key = (blk.eip, blk.key, blk.raw)
        hit = _MEMO.get(memo_key)
        if hit is not None and hit.stenciled:
            return self._adopt([hit], blk.eip, blk.key)
        if not TABLE.keys() >= {i.id for i in blk.insns}:
            return None
        lib = self.stencils.lib
        before, t0 = lib.compiled, lib.compile_seconds
        built = self.stencils.build(blk, self.hot_threshold)
        if lib.compiled != before:
            self.counters["stencils_compiled"] += lib.compiled - before
            self.counters["stencil_compile_us"] += int((lib.compile_seconds - t0) * 1e6)
            self.last_compile = time.perf_counter()
        if built is None:
            self.counters["stencil_fallbacks"] += 1
            return None
        fn, slots, hot, cnt, recipe = built
        tb = self._stencil_tb(blk, fn, slots, hot, cnt)
        self.counters["stencil_blocks"] += 1
        self.counters["compiled_blocks"] += 1
        _MEMO[tb.memo_key] = tb
        if self.disk is not None:
            # The window now: at save time the guest memory may be gone (a closed snippet).
            self._unsaved.append((tb, recipe, window if window is not None else self.fetch(tb.eip, diskcache.WINDOW)))
            if len(self._unsaved) >= STENCIL_BATCH or time.monotonic() - self._saved_at > STENCIL_SAVE_SECONDS:
                self.save_stencil_blocks()
        return self._adopt([tb], blk.eip, blk.key, fresh={tb}, new=True)

    @staticmethod
    def _stencil_tb(blk, fn, slots, hot, cnt):
        tb = TB(blk, fn, slots, None)
        tb.hot_addr, tb.counter, tb.stenciled = hot, cnt, True
        return tb

    def save_stencil_blocks(self):
        """Store the recipes of the blocks built from stencils since the last call (one disk-cache
        entry, tier STENCIL_TIER): a later run rebuilds them without decoding."""
        todo, self._unsaved = self._unsaved, []
        self._saved_at = time.monotonic()
        by_key = defaultdict(list)
        for item in todo:
            by_key[item[0].key].append(item)
        for key, items in by_key.items():
            stored = [(tb.eip, tb.block.raw, w, tb.ninsns, tb.name, []) for tb, _, w in items]
            obj = b"".join(struct.pack("<I", len(r)) + r for _, r, _ in items)
            movable = {tb.eip for tb, r, _ in items if stencil.movable(r)} if _moves(key) else ()
            name = self.disk.store(key, stored, obj, tier=STENCIL_TIER, movable=movable)
            if name is not None:
                _ENTRIES[name] = (STENCIL_TIER, [tb for tb, _, _ in items])
                self.counters["persistent_stores"] += 1

    def _attach_counter(self, tb):
        if emit.COUNT_EXECS:
            tb.counter = self.jit.engine.get_global_value_address(tb.name + "_n")

    def _adopt(self, tbs, eip, key, fresh=(), new=False):
        """Install tbs (those not in the cache yet); the TB at (eip, key).  fresh: the ones
        compiled for this call (the others count as memo hits); new: all of them are, with
        chain slots never linked (still zero)."""
        result = None
        for tb in tbs:
            if (tb.eip, tb.key) in self.blocks:
                continue
            region = _REGIONS.get(tb.memo_key)
            if region is not None and self._adopt_region(region):
                continue
            if tb.owner is not None and tb.owner is not self:
                tb.owner.forget(tb)
            if tb not in fresh:
                self.counters["memo_hits"] += 1
            self._install(tb, linked=not new)
            if tb.eip == eip:
                result = tb
            elif self.prefill is not None:
                self.prefill(tb)
        if result is None:
            result = self.blocks[(eip, key)]
        return result

    def _from_disk(self, eip, key, window):
        """Install the blocks of a persistent-cache entry for (eip, key); returns the TB at eip or None."""
        for name in self.disk.candidates(eip, key, window):
            tb = self._take_entry(name, eip, key)
            if tb is not None:
                return tb
        if _moves(key) and self.stencils is not None:
            for name, there in self.disk.moved_candidates(eip, key, window):
                delta = (eip - there) & 0xFFFFFFFF
                ent = self.disk.open(name, there, key, self.fetch, delta) if delta else None
                if ent is not None:
                    return self._load_moved(ent, eip, key, delta)
        return None

    def _take_entry(self, name, eip, key):
        """Install the blocks of the indexed entry called name that match guest memory; the TB at
        (eip, key), or None if the entry does not hold it as memory has it."""
        known = _ENTRIES.get(name)
        if known is not None:           # loaded earlier in this process: no file to read
            tb = self._adopt_entry(*known, eip, key, counter="memo_hits")
            return tb if tb is not None else self._rebuild_deferred(name, eip, key)
        ent = self.disk.open(name, eip, key, self.fetch)
        return self._load_entry(ent, eip, key) if ent is not None else None

    def _load_moved(self, ent, eip, key, delta):
        """The blocks of a stored stencil entry whose bytes are delta bytes further on now, rebuilt
        there; the TB at eip or None.  Not remembered by entry name (_ENTRIES): that is for the
        blocks at their stored addresses."""
        tbs = []
        try:
            for (blk, recipe), ok in zip(_recipes(ent), ent.matched):
                if ok and stencil.movable(recipe):
                    moved = diskcache.StoredBlock((blk.eip + delta) & 0xFFFFFFFF, key, blk.raw, blk.ninsns)
                    if self.blocks.get((moved.eip, key)) is None:
                        tb = self._rebuilt(moved, recipe, delta)
                        if tb is not None:
                            tbs.append(tb)
        except (struct.error, IndexError, KeyError):
            self.counters["persistent_errors"] += 1
            return None
        self.counters["persistent_moved"] += len(tbs)
        return self._adopt_entry(STENCIL_TIER, tbs, eip, key, checked=True)

    def _load_entry(self, ent, eip, key):
        if ent.tier == STENCIL_TIER:
            return self._load_stencil_entry(ent, eip, key)
        names = [name for _, name, _ in ent.blocks]
        try:
            fns, slots = self.jit.load_object(ent.obj, names, [s for _, _, sl in ent.blocks for s in sl])
        except Exception:
            self.counters["persistent_errors"] += 1
            return None
        members = [(blk, fns[name], [slots[s] for s in sl], name) for blk, name, sl in ent.blocks]
        if ent.tier == 2:
            tbs = self._make_region(members)
            self.counters["persistent_regions"] += 1
        else:
            tbs = []
            for blk, fn, sl, name in members:
                tb = TB(blk, fn, sl, name)
                self._attach_counter(tb)
                # Blocks whose guest bytes changed since are kept only in the memo (keyed by their
                # bytes): they are adopted if memory ever holds those bytes again.
                _MEMO.setdefault(tb.memo_key, tb)
                tbs.append(tb)
        _ENTRIES[ent.name] = (ent.tier, tbs)
        self.counters["persistent_batches"] += 1
        return self._adopt_entry(ent.tier, tbs, eip, key)

    def _load_stencil_entry(self, ent, eip, key):
        """Rebuild the blocks of a stored entry of stencil recipes (those whose bytes match)."""
        if self.stencils is None:
            return None
        tbs = []
        try:
            for (blk, recipe), ok in zip(_recipes(ent), ent.matched):
                if not ok:
                    # Its bytes are not in memory (yet: a page the guest has not loaded, or the
                    # other version of code the guest patches): kept, to be rebuilt if they are
                    # there when it is reached.  Never by its eip alone: a stale version would
                    # run.
                    if ent.name not in _DEFERRED and len(_DEFERRED) >= _DEFERRED_MAX:
                        del _DEFERRED[next(iter(_DEFERRED))]
                    _DEFERRED.setdefault(ent.name, {}).setdefault(blk.eip, []).append((blk, recipe))
                    continue
                tb = self._rebuilt(blk, recipe)
                if tb is not None:
                    tbs.append(tb)
        except (struct.error, IndexError, KeyError):
            self.counters["persistent_errors"] += 1
            return None
        _ENTRIES[ent.name] = (STENCIL_TIER, tbs)
        self.counters["persistent_batches"] += 1
        return self._adopt_entry(STENCIL_TIER, tbs, eip, key, checked=True)

    def _rebuilt(self, blk, recipe, delta=0):
        """The TB of a stored block rebuilt from its recipe (memoized), or None if it is refused;
        delta: how far the block moved since it was stored."""
        built = self.stencils.rebuild(recipe, self.hot_threshold, delta)
        if built is None:
            return None
        tb = self._stencil_tb(blk, *built)
        _MEMO.setdefault(tb.memo_key, tb)
        return tb

    def _rebuild_deferred(self, name, eip, key):
        """The block at eip from a loaded stencil entry that skipped it (its bytes were not in
        memory then), if they are now; None otherwise."""
        versions = _DEFERRED.get(name, {}).get(eip)
        if not versions or self.stencils is None:
            return None
        for item in versions:
            blk, recipe = item
            if blk.key == key and self.fetch(blk.eip, len(blk.raw)) == blk.raw:
                break
        else:
            return None
        tb = self._rebuilt(blk, recipe)
        if tb is None:
            return None
        versions.remove(item)
        if not versions:
            del _DEFERRED[name][eip]
            if not _DEFERRED[name]:
                del _DEFERRED[name]
        _ENTRIES[name][1].append(tb)
        return self._adopt_entry(STENCIL_TIER, [tb], eip, key)

    def _adopt_entry(self, tier, tbs, eip, key, counter="persistent_hits", checked=False):
        """Install the blocks of a loaded entry that match guest memory; the TB at eip or None.
        checked: tbs were just built from blocks whose bytes matched."""
        def valid(tb):
            if checked:
                return True
            e, _, raw = tb.memo_key
            return self.fetch(e, len(raw)) == raw
        if tier == 2:
            if not self._adopt_region(tbs):
                return None
            self.counters[counter] += len(tbs)
            return self.blocks.get((eip, key))
        # A block that a stored region holds is left to be loaded with its region when reached.
        disk = self.disk
        use = [tb for tb in tbs if tb.owner is not self and valid(tb) and (
            tb.eip == eip or not disk.maybe_in_region(tb.eip, key)
            or not disk.in_region(tb.eip, key, self.fetch(tb.eip, diskcache.WINDOW)))]
        if all(tb.eip != eip for tb in use):
            return None
        self.counters[counter] += len(use)
        # checked: just rebuilt into new cells (their chain slots were never linked).
        return self._adopt(use, eip, key, fresh=set(use), new=checked)

    def _install(self, tb, notify=True, linked=True):
        if len(self.blocks) >= self.max_blocks:
            self.flush("capacity")
        tb.owner = self
        for s in tb.slots:
            if linked:          # a chain an earlier install made (the TB was forgotten since)
                ctypes.c_uint64.from_address(s).value = 0
            self.slot_owner[s] = tb
        self.blocks[(tb.eip, tb.key)] = tb
        self.by_fn[tb.fn] = tb
        if _PERF_BLOCKS is not None:
            _PERF_BLOCKS[tb.fn] = f"btvm_{tb.eip:08x}_t{tb.tier}{'s' if tb.stenciled else ''}"
        for p in tb.pages:
            if not self.by_page[p]:
                self.on_code_page(p)
            self.by_page[p].add(tb)
        if notify and self.on_install is not None:
            self.on_install(tb)

    def cut_paths_into(self, tb):
        """Unlink every chained exit into tb and drop it from the jump cache (tb itself stays)."""
        self.drain_links()
        for s in list(self.incoming.get(tb, ())):
            self._unlink_slot(s)
        self._jc_drop(tb)

    def forget(self, tb, cause=None):
        """Remove tb: unlink every chain into and out of it and drop it from the jump cache."""
        if self.blocks.get((tb.eip, tb.key)) is not tb:
            return
        self.drain_links()
        del self.blocks[(tb.eip, tb.key)]
        self.by_fn.pop(tb.fn, None)
        self._jc_drop(tb)
        for s in list(self.incoming.pop(tb, ())):
            self._unlink_slot(s)
        for s in tb.slots:
            self._unlink_slot(s)
            self.slot_owner.pop(s, None)
        for p in tb.pages:
            self.by_page[p].discard(tb)
        tb.owner = None
        if cause:
            self.counters["invalidations"] += 1
            self.counters["invalidations_" + cause] += 1
        for other in tb.region:
            self.forget(other, cause)      # they call tb directly

    def invalidate_page(self, page, cause="smc"):
        """Drop every block with bytes on a guest page (and its decoded callout instructions);
        returns how many blocks."""
        return self.invalidate_range(page, 0, 0x1000, cause)

    def invalidate_range(self, page, start, end, cause="smc"):
        """Drop the blocks with bytes at offsets [start, end) of a guest page (and the page's
        decoded callout instructions); returns how many blocks.  Blocks elsewhere on the page stay."""
        tbs = []
        for tb in self.by_page.get(page, ()):
            a = tb.eip - page
            if a > 0xFFF:
                a -= 1 << 32            # a block that wraps around the top of the address space
            if a < end and start < a + len(tb.memo_key[2]):
                tbs.append(tb)
        for tb in tbs:
            self.forget(tb, cause)
        if not self.by_page.get(page):
            self.by_page.pop(page, None)
        self.forget_instructions_of(page)
        return len(tbs)

    def instruction(self, eip, key, expect=None):
        """The decoded instruction at (eip, key), for the runtime's callout handlers; None if the
        bytes do not decode.  Kept until its page is invalidated, like the blocks, so a callout
        (a syscall, an IN/OUT) does not pay for Capstone each time.  An entry is trusted as long
        as the linear->physical view has not changed since it was checked (mapping_changed) and
        its page still holds translated code (so writes to it invalidate it); otherwise it is
        checked against the bytes now at eip, so it survives address-space switches (an Insn
        depends only on its bytes, its address and the mode bits of key).  expect: (length,
        callout id) of the instruction the exiting block was translated from (it ends a block at
        a callout): an entry that disagrees is not trusted, so a block translated from another
        physical page (a PTE changed without INVLPG) is never handed the old instruction."""
        k = (eip, key)
        hit = self.insns.get(k)
        if hit is not None:
            insn, gen, ggen, what = hit
            agrees = expect is None or what == expect
            if agrees and (gen == self.mapping_gen or ggen == self.global_gen) and self.by_page.get(eip & ~0xFFF):
                return insn
            if agrees and self.fetch(eip, insn.size) == insn.raw:
                self.insns[k] = (insn, self.mapping_gen, self._global_gen_of(eip), what)
                return insn
        blk = decode_block(self.fetch, eip, key | S.KEY_STEP, ends_block)
        if not blk.insns:
            return None
        insn = blk.insns[0]
        if (eip & 0xFFF) + insn.size <= 0x1000:
            if hit is None:
                self.insns_by_page.setdefault(eip & ~0xFFF, []).append(k)
            self.insns[k] = (insn, self.mapping_gen, self._global_gen_of(eip),
                             expect if expect is not None and expect[0] == insn.size else None)
        elif hit is not None:
            del self.insns[k]
        return insn

    def _global_gen_of(self, eip):
        # An entry of a global page stays trusted across CR3 writes, as its TLB entries do.
        return self.global_gen if self.is_global is not None and self.is_global(eip) else -1

    def mapping_changed(self, keep_global=False):
        """The linear->physical view may have changed (a TLB flush; keep_global: a CR3 write,
        which keeps global pages): callout instructions are checked against memory again
        before they are trusted."""
        self.mapping_gen += 1
        if not keep_global:
            self.global_gen += 1

    def forget_instructions_of(self, page):
        """Drop the decoded callout instructions of a page (its code or its mapping changed)."""
        for k in self.insns_by_page.pop(page, ()):
            self.insns.pop(k, None)

    def forget_instructions(self):
        """Drop every decoded callout instruction (the linear->physical mapping changed)."""
        self.insns.clear()
        self.insns_by_page.clear()

    # ---- tier 2 ---------------------------------------------------------------------
    def hot(self, eip, key):
        """A tier-1 block ran out its hot counter (EXIT_HOT): send its region to the optimizer."""
        tb = self.blocks.get((eip, key))
        if tb is None or tb.tier != 1 or tb.promoting or self.optimizer is None:
            return
        if self._stored_region(eip, key):
            return
        opt = self.optimizer
        if not opt.sync and not opt.process and time.perf_counter() - self.last_compile < tier2.QUIET:
            self._rearm(tb)
            self.counters["tier2_deferred"] += 1
            return
        region = self._region(tb)
        uid = secrets.token_hex(4)
        names = {b.eip: f"t{b.eip:08x}_{key:x}_{uid}" for _, b in region}
        mt = ModuleText(f"tier2_{eip:x}_{uid}", region=names,
                        inline=len(region) <= tier2.INLINE_BLOCKS
                        and sum(len(blk.insns) for _, blk in region) <= tier2.INLINE_INSNS)
        mt.flags_live = self._flags_live(region, key)
        old, blocks, slots = [], [], []
        try:
            for t, blk in region:
                blk2, sl = translate_block(blk, names[blk.eip], mt)
                old.append(t)
                blocks.append(blk2)
                slots.append(sl)
        except (Unsupported, DecodeError):
            self.counters["tier2_errors"] += 1
            return
        for t in old:
            t.promoting = True
        self.counters["tier2_regions"] += 1
        windows = [self.fetch(b.eip, diskcache.WINDOW) for b in blocks]
        self.optimizer.submit(tier2.Job(self, old, blocks, [names[b.eip] for b in blocks], slots, windows,
                                        mt.text()))
        if self.optimizer.sync:
            self.poll_tier2()

    def _stored_region(self, eip, key):
        """Install a region of the disk cache that holds the hot block at (eip, key) as memory
        has it now; whether there was one.  Its tier-1 batch may have been loaded while the
        block's lookup window (bytes past the block) still differed from the one the region was
        stored under: code the guest patches or loads near it.  A Linux boot compiled three
        regions again in every warm run that way."""
        disk = self.disk
        if disk is None or not disk.maybe_in_region(eip, key):
            return False
        window = self.fetch(eip, diskcache.WINDOW)
        if not disk.in_region(eip, key, window):
            return False
        for name in disk.candidates(eip, key, window):
            if disk.tier_of(name) != 2:
                break               # tier-2 regions come first
            tb = self._take_entry(name, eip, key)
            if tb is not None and tb.tier == 2:
                return True
        return False

    def _flags_live(self, region, key):
        """bt.lazyflags.flags_live of every block the region's members may jump to directly: an
        exit leaves the flags lazy only where its successors do not need them at once."""
        blocks = {blk.eip: blk for _, blk in region}
        memo = {}

        def live_at(t, depth=0):
            if t not in memo:
                memo[t] = True          # while it is being worked out (a cycle): needed
                succ = blocks.get(t)
                if succ is None and depth < 4:
                    try:
                        succ = self._decode(t, key)
                    except Exception:
                        succ = None
                if succ is not None:
                    memo[t] = lazyflags.flags_live(succ.insns, lambda a: live_at(a, depth + 1))
            return memo[t]
        return {t: live_at(t) for blk in list(blocks.values()) for t in static_successors(blk)}

    @staticmethod
    def _decoded(tb):
        """The decoded instructions of a block (TBs keep only its bytes)."""
        raw, eip = tb.block.raw, tb.block.eip
        return decode_block(lambda a, n: raw[a - eip:a - eip + n], eip, tb.key, ends_block)

    def _region(self, tb):
        """The hot block and the warm tier-1 blocks it reaches by direct jumps (same page when
        paging is on: chains never leave a page there)."""
        out, seen, todo, insns = [], {tb.eip}, deque([tb]), 0
        warm = max(1, self.hot_threshold // 4)
        while todo and len(out) < tier2.MAX_BLOCKS:
            t = todo.popleft()
            blk = self._decoded(t)
            if not blk.insns or insns + len(blk.insns) > tier2.MAX_INSNS and out:
                continue
            out.append((t, blk))
            insns += len(blk.insns)
            for nxt in static_successors(blk):
                if nxt in seen or (t.key & S.KEY_PG and (nxt ^ tb.eip) & ~0xFFF):
                    continue
                seen.add(nxt)
                s = self.blocks.get((nxt, t.key))
                if s is not None and s.tier == 1 and not s.promoting and self._runs(s) >= warm:
                    todo.append(s)
        return out

    def _hot_cell(self, tb):
        if tb.stenciled:
            return tb.hot_addr
        return self.jit.engine.get_global_value_address(tb.name + "_h")

    def _rearm(self, tb):
        """Let a tier-1 block count down to EXIT_HOT again."""
        addr = self._hot_cell(tb)
        if addr:
            ctypes.c_int32.from_address(addr).value = self.hot_threshold

    def _runs(self, tb):
        """Executions of a tier-1 block so far (from its hot counter)."""
        try:
            addr = self._hot_cell(tb)
        except Exception:
            return 0
        left = ctypes.c_int32.from_address(addr).value if addr else self.hot_threshold
        return self.hot_threshold - left

    def _adopt_region(self, region):
        """Take a tier-2 region made by another cache if its guest bytes are all here."""
        for m in region:
            eip, key, raw = m.memo_key
            if self.fetch(eip, len(raw)) != raw:
                return False
        for m in region:
            if m.owner is not None and m.owner is not self:
                m.owner.forget(m)
        for m in region:
            old = self.blocks.get((m.eip, m.key))
            if old is not None and old is not m:
                self.forget(old)
            if old is not m:
                self._install(m)
        self.counters["tier2_adopted"] += len(region)
        return True

    def poll_tier2(self):
        """Install every region the optimizer has finished (call between native runs)."""
        done = self.optimizer.done if self.optimizer is not None else ()
        while done:
            job = done.popleft()
            if job.owner is self:
                self._install_region(job)
                continue
            for t in job.old:
                t.promoting = False
            if job.error is None and job.owner.jit is self.jit:
                # Its cache is gone or idle (a finished snippet): keep the region for whoever
                # meets these blocks next (memo and disk), without touching that cache.
                self._register_region(job)

    def _register_region(self, job):
        """Load a finished region's code and remember it (memo, disk); returns its TBs."""
        fns, slots = self.jit.load_object(job.obj, job.names, [s for sl in job.slots for s in sl])
        new = self._make_region([(blk, fns[name], [slots[s] for s in sl], name)
                                 for blk, name, sl in zip(job.blocks, job.names, job.slots)])
        self.counters["tier2_blocks"] += len(new)
        self.counters["tier2_compile_us"] += int(job.seconds * 1e6)
        if self.disk is not None:
            stored = [(b.eip, b.raw, w, len(b.insns), n, sl)
                      for b, w, n, sl in zip(job.blocks, job.windows, job.names, job.slots)]
            name = self.disk.store(job.old[0].key, stored, job.obj, tier=2)
            if name is not None:
                _ENTRIES[name] = (2, new)
                self.counters["persistent_stores"] += 1
        return new

    def _install_region(self, job):
        for t in job.old:
            t.promoting = False
        if job.error is not None:
            self.counters["tier2_errors"] += 1
            return
        if any(self.blocks.get((t.eip, t.key)) is not t for t in job.old):
            self.counters["tier2_dropped"] += 1        # invalidated while being optimized
            return
        new = self._register_region(job)
        phys = {t.eip: t.phys for t in job.old}
        for t in job.old:
            self.forget(t)
        for tb in new:
            # Not announced (on_install): it replaces a block translated from the same bytes,
            # and keeps its physical page (checked again at every lookup in system mode).
            tb.phys = phys.get(tb.eip)
            self._install(tb, notify=False)

    def _make_region(self, members):
        """Tier-2 TBs from [(block, function address, slot addresses, name)], knowing each other."""
        new = []
        for blk, fn, slots, name in members:
            tb = TB(blk, fn, slots, name)
            tb.tier = 2
            self._attach_counter(tb)
            new.append(tb)
        for tb in new:
            tb.region = tuple(x for x in new if x is not tb)
            _REGIONS[tb.memo_key] = new
        if TRACK is not None:
            TIER2.extend(new)
        return new

    def has_code(self, page):
        return bool(self.by_page.get(page))

    def flush(self, cause="flush"):
        self.forget_instructions()
        for tb in list(self.blocks.values()):
            self.forget(tb, cause)

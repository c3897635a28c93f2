"""What the soft TLB (bt/state.py CPUState.tlb, flushed with one memset) cannot say by itself.

- Global pages (CR4.PGE with PTE/PDE.G; SDM Vol. 3A 4.10.2.4, 4.10.4.1): a CR3 write invalidates
  every entry except global ones, so a kernel mapped global keeps its translations across
  address-space switches (and a changed global PTE stays invisible until INVLPG, as on hardware).
  The global entries are remembered here and put back when the TLB is flushed.
- Global write entries by physical page: when a page gets translated code, every write entry
  mapping it - through whatever linear alias - must go, so that writes to the code reach the slow
  path that invalidates it (self-modifying code through an alias).  The entries in the TLB are
  found by a scan (SystemCPU._track_code: the native refill fills entries too); the global ones
  remembered here must not come back at the next CR3 write.
"""
import ctypes

from bt import state as S


class TLBShadow:
    def __init__(self):
        self.globals = {}      # entry index -> (tag, addend, kind, physical page)
        self.gwrites = {}      # physical page -> {entry index: tag} of the global write entries
        self.image = None      # the TLB as a CR3 write leaves it (only the globals), or None: stale

    def filled(self, i, tag, addend, phys_page, is_global, kind):
        """Entry i was just (re)filled."""
        self._drop_global(i)
        if is_global:
            self.globals[i] = (tag, addend, kind, phys_page)
            self.image = None
            if kind == S.TLB_WRITE:
                self.gwrites.setdefault(phys_page, {})[i] = tag

    def _drop_global(self, i):
        old = self.globals.pop(i, None)
        if old is not None:
            self.image = None
            if old[2] == S.TLB_WRITE:
                recs = self.gwrites.get(old[3])
                if recs is not None:
                    recs.pop(i, None)
                    if not recs:
                        del self.gwrites[old[3]]

    def drop_page(self, page):
        """INVLPG: the entries of a linear page are gone, global or not.  A global entry of
        another page at the same index stays (the TLB keeps it), and so must its write record."""
        i = (page >> 12) & (S.TLB_SIZE - 1)
        for priv in range(S.TLB_PRIVS):
            for kind in range(S.TLB_KINDS):
                g = self.globals.get(S.tlb_index(priv, kind) + i)
                if g is not None and g[0] == page & 0xFFFFF000:
                    self._drop_global(S.tlb_index(priv, kind) + i)

    def drop_writes_to(self, tlb, phys_page):
        """Translated code now lives in phys_page: no global write entry to it may come back
        (those in the TLB now are the caller's to drop)."""
        for i, tag in list(self.gwrites.get(phys_page, {}).items()):
            if tlb[i].tag == tag:
                tlb[i].tag = S.TLB_INVALID
            self._drop_global(i)

    def clear(self):
        self.globals.clear()
        self.gwrites.clear()
        self.image = None

    def restore_globals(self, tlb):
        """A CR3 write with CR4.PGE: the whole TLB becomes the global entries alone (one copy of
        an image rebuilt only when the globals changed: a kernel switches address spaces far more
        often than it maps new global pages)."""
        if self.image is None:
            img = self.image = type(tlb)()
            ctypes.memset(ctypes.addressof(img), 0xFF, ctypes.sizeof(img))
            for i, (tag, addend, _, _) in self.globals.items():
                ent = img[i]
                ent.tag, ent.addend = tag, addend
        ctypes.memmove(ctypes.addressof(tlb), ctypes.addressof(self.image), ctypes.sizeof(tlb))

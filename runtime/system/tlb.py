"""What the soft TLB (bt/state.py CPUState.tlb, flushed with one memset) cannot say by itself.

- Global pages (CR4.PGE with PTE/PDE.G; SDM Vol. 3A 4.10.2.4, 4.10.4.1): a CR3 write invalidates
  every entry except global ones, so a kernel mapped global keeps its translations across
  address-space switches (and a changed global PTE stays invisible until INVLPG, as on hardware).
  The global entries are remembered here and put back after the memset.
- Write entries by physical page: when a page gets translated code, every write entry mapping
  it - through whatever linear alias, global or not - must go, so that writes to the code reach
  the slow path that invalidates it (self-modifying code through an alias).
"""
from bt import state as S


class TLBShadow:
    def __init__(self):
        self.globals = {}      # entry index -> (tag, addend, kind, physical page)
        self.writes = {}       # physical page -> {entry index: tag} of write entries mapping it

    def filled(self, i, tag, addend, phys_page, is_global, kind):
        """Entry i was just (re)filled."""
        self.globals.pop(i, None)
        if is_global:
            self.globals[i] = (tag, addend, kind, phys_page)
        if kind == S.TLB_WRITE:
            self.writes.setdefault(phys_page, {})[i] = tag

    def drop_page(self, page):
        """INVLPG: the entries of a linear page are gone, global or not."""
        i = (page >> 12) & (S.TLB_SIZE - 1)
        for priv in range(S.TLB_PRIVS):
            for kind in range(S.TLB_KINDS):
                self.globals.pop(S.tlb_index(priv, kind) + i, None)

    def drop_writes_to(self, tlb, phys_page):
        """Translated code now lives in phys_page: no write may bypass the slow path.
        (A record may be stale - the entry refilled for another page with the same tag: then
        the entry only costs one more slow path.)"""
        for i, tag in self.writes.pop(phys_page, {}).items():
            if tlb[i].tag == tag:
                tlb[i].tag = S.TLB_INVALID
                self.globals.pop(i, None)

    def clear(self):
        self.globals.clear()
        self.writes.clear()

    def restore_globals(self, tlb):
        """After a memset flush for a CR3 write: put the global entries back."""
        self.writes = {}
        for i, (tag, addend, kind, phys_page) in self.globals.items():
            ent = tlb[i]
            ent.tag, ent.addend = tag, addend
            if kind == S.TLB_WRITE:
                self.writes.setdefault(phys_page, {})[i] = tag

"""The system-mode CPU: protected-mode segmentation, paging, rings 0-3 and the IDT.

It extends runtime.cpu.CPU (which runs translated code) with what a guest
kernel sees: control registers, descriptor tables, a paging soft-MMU whose TLB
entries map linear pages to host addresses of guest-physical RAM, and the
delivery of exceptions and interrupts through the guest IDT (SDM Vol. 3A,
chapter 6).  Sensitive and privileged instructions reach it as callouts
(runtime/system/callouts.py).
"""
import ctypes
import struct

from bt import state as S
from bt.semantics.flagops import popf_mask
from runtime.cpu import CPU, GuestFault, Stop
from runtime.native_refill import (drop_writes, invlpg_address, sys_load_refill_address,
                                   sys_store_refill_address, walk)

from .descriptors import FULL, Segment, decode, INT_GATE, TRAP_GATE, TSS_AVAIL, TSS_BUSY, LDT
from .tlb import TLBShadow
from .paging import Walker, PageFault, CR0_PE, CR0_PG, CR0_WP, CR0_ET, CR0_EM, CR0_TS, CR0_MP, CR0_AM, CR4_PSE, CR4_PGE, CR4_TSD

DE, DB, NMI, BP, OF, BR, UD, NM, DF, TS, NP, SS_, GP, PF, MF, AC = 0, 1, 2, 3, 4, 5, 6, 7, 8, 10, 11, 12, 13, 14, 16, 17
CONTRIBUTORY = {DE, TS, NP, SS_, GP}
EFLAGS_USER_MASK = 0x3F7FD7
# Trapped writes to a page of translated code that may miss every block on it before the whole
# page is invalidated (see SystemCPU._phys_written).
SMC_SPARE_WRITES = 64
# A CR3 write resets the jump-cache entries of non-global code one by one up to this many (else
# the whole cache, global code included, with one memset).
JC_SELECTIVE_MAX = 4096


class TripleFault(Exception):
    pass


def _second_page(addr, size):
    """Where an access's second page is checked: its first byte there (not the access's last
    byte), which is the address CR2 reports if that page faults (a dword at 0x1FFFFE whose
    second page is not present faults with CR2 = 0x200000, as on hardware and in QEMU)."""
    last = (addr + size - 1) & 0xFFFFFFFF
    return last & ~0xFFF if (addr ^ last) & ~0xFFF else last


# The CR0 and EFLAGS bits the mode key depends on (SystemCPU.update_key).
_KEY_CR0 = CR0_PE | CR0_PG | CR0_AM | CR0_EM | CR0_TS | CR0_MP
_KEY_EFLAGS = (3 << S.IOPL_SHIFT) | (1 << S.AC)
_KEYS = {}


class SystemCPU(CPU):
    """An i686 in protected mode (no real mode yet) over guest-physical RAM."""

    def __init__(self, mem, ram_size, io=None):
        self.ram_size = ram_size
        self.io = io
        self._seg_flags = None      # (FLAT, FS_FULL) as of the last sync_segments
        self.cr0, self.cr2, self.cr3, self.cr4 = CR0_PE | CR0_ET, 0, 0, 0
        self.dr = [0] * 8
        self._gdtr = (0, 0)
        self.idtr = (0, 0x3FF)
        self.ldtr = Segment(0, 0, 0, LDT, False)
        self.tr = Segment(0, 0, 0x67, TSS_BUSY, False)
        self.segs = [Segment.flat(0x10, False), Segment.flat(0x08, True), Segment.flat(0x10, False),
                     Segment.flat(0x10, False), Segment.flat(0x10, False), Segment.flat(0x10, False)]
        self.msr = {}
        self.code_phys = {}     # physical page -> linear pages holding translated code
        self.smc_spare = {}     # physical page in code_phys -> trapped writes left that may hit no block
        self.walker = Walker(self.read_phys32, self.write_phys32)
        self.delivering = None  # vector being delivered (for #DF / triple fault)
        self.tsc_offset = 0
        # During a miss (no guest code runs, so no mapping changes): (linear page, user) -> its
        # physical page, for the fetches and installs the miss makes (a block's page was walked
        # three times: for the disk cache's window, for decoding, and at install).
        self._xlat = None
        self.tlb_shadow = TLBShadow()
        self.jc_local = set()       # jump-cache entries that may hold code of non-global pages
        super().__init__(mem, S.make_key(cpl=0))
        # Read misses that need only a page walk are refilled in native code (native_refill).
        st = self.st
        self._large_view = (ctypes.c_uint8 * 1024).from_buffer(self.walker.large.map)
        st.pg_large = ctypes.addressof(self._large_view)
        st.refill_base, st.ram_size = mem.base, ram_size
        st.refill_slow = st.load_slow
        st.load_slow = sys_load_refill_address()
        self._code_map = bytearray(ram_size >> 12)      # 1 where code_phys has the page
        self._code_view = (ctypes.c_uint8 * len(self._code_map)).from_buffer(self._code_map)
        st.pg_code = ctypes.addressof(self._code_view)
        st.refill_store_slow = st.store_slow
        st.store_slow = sys_store_refill_address()
        self._drop_writes = drop_writes()
        # Linear pages whose INVLPG the runtime must see (translated code or a remembered global
        # TLB entry there); translated code drops the TLB entries of the others itself.  A byte
        # is cleared only by that INVLPG (callouts.py cache), which leaves nothing of the page.
        self.lin_interest = bytearray(1 << 20)
        self._interest_view = (ctypes.c_uint8 * len(self.lin_interest)).from_buffer(self.lin_interest)
        st.pg_interest = ctypes.addressof(self._interest_view)
        st.invlpg = invlpg_address()
        self._native_walk = walk()
        self._sync_paging()
        self.cache.on_install = self._on_install
        self.cache.prefill = self._prefill
        self.cache.is_global = self._maps_global
        self.on_single_step = SystemCPU.single_step_trap
        self.sync_segments()
        self.gdtr = (0, 0)      # (base, limit)

    @property
    def gdtr(self):
        return self._gdtr

    @gdtr.setter
    def gdtr(self, v):
        self._gdtr = v
        self.st.gdt_base, self.st.gdt_limit = v

    # ---- physical memory ------------------------------------------------------------
    def read_phys(self, addr, n):
        if addr + n <= self.ram_size:
            return self.mem.read(addr, n)
        return bytes(self.mem.read(a, 1)[0] if a < self.ram_size else 0xFF for a in range(addr, addr + n))

    def write_phys(self, addr, data):
        if addr + len(data) <= self.ram_size:
            self.mem.write(addr, data)
        else:
            for i, b in enumerate(data):
                if addr + i < self.ram_size:
                    self.mem.write(addr + i, bytes([b]))

    def read_phys32(self, addr):
        # Page-table walks read aligned dwords: index RAM as a ctypes array (no bytes objects).
        if not addr & 3 and addr + 4 <= self.ram_size:
            return self._ram32()[addr >> 2]
        return int.from_bytes(self.read_phys(addr, 4), "little")

    def write_phys32(self, addr, v):
        if not addr & 3 and addr + 4 <= self.ram_size:
            self._ram32()[addr >> 2] = v
        else:
            self.write_phys(addr, v.to_bytes(4, "little"))
        self._phys_written(addr, 4)

    def _ram32(self):
        ram = self.__dict__.get("_ram32_view")
        if ram is None or self._ram32_base != self.mem.base:
            ram = self._ram32_view = (ctypes.c_uint32 * (self.ram_size // 4)).from_address(self.mem.base)
            self._ram32_base = self.mem.base
        return ram

    # ---- linear memory (for the runtime's own accesses, e.g. interrupt frames) --------------
    def translate(self, lin, write=False, user=None, fetch=False):
        """Physical address of a linear one at the current (or given) privilege; raises PageFault."""
        user = self.cpl == 3 if user is None else user
        if not self.cr0 & CR0_PG:
            return lin & 0xFFFFFFFF, False, True
        if not write:
            # The walks that set no A/D bit and raise no fault are done in native code (the same
            # rules: runtime/native_refill.py), the rest here.
            r = self._native_walk(self.st_addr, lin & 0xFFFFFFFF, user)
            if r:
                return (r & 0xFFFFF000) | (lin & 0xFFF), bool(r & 1), bool(r & 2)
        return self.walker.translate(self.cr0, self.cr3, self.cr4, lin, write, user, fetch)

    def _pieces(self, lin, n, write, user):
        """[(physical address, length)] of the linear range [lin, lin + n), one per page (every
        page translated before anything is touched: a fault leaves memory as it was)."""
        out = []
        user = self.cpl == 3 if user is None else user
        while n:
            lin &= 0xFFFFFFFF
            chunk = min(n, 0x1000 - (lin & 0xFFF))
            phys = self._tlb_phys(lin, write, user)
            if phys is None:
                phys = self.translate(lin, write, user)[0]
            out.append((phys, chunk))
            lin += chunk
            n -= chunk
        return out

    def _tlb_phys(self, lin, write, user):
        """The physical address of lin if the soft TLB maps it for this access, else None.  An
        entry there was made by a walk with the same rights (which set the same accessed and dirty
        bits), so the runtime's own accesses - interrupt frames, descriptors, the instruction a
        callout decodes - need not walk again (without NX, fetching needs what reading does)."""
        if not self.cr0 & CR0_PG:
            return None
        ent = self.st.tlb[S.tlb_index(1 if user else 0, S.TLB_WRITE if write else S.TLB_READ)
                          + ((lin >> 12) & (S.TLB_SIZE - 1))]
        if ent.tag != lin & 0xFFFFF000:
            return None
        return (ent.addend + lin - self.mem.base) & 0xFFFFFFFF

    def read_lin(self, lin, n, user=None):
        return b"".join(self.read_phys(p, k) for p, k in self._pieces(lin, n, False, user))

    def write_lin(self, lin, data, user=None):
        pos = 0
        for p, k in self._pieces(lin, len(data), True, user):
            self.write_phys(p, data[pos:pos + k])
            self._phys_written(p, k)
            pos += k

    def read_lin32(self, lin, user=None):
        return int.from_bytes(self.read_lin(lin, 4, user), "little")

    def read_lin_dwords(self, lin, count, user=None):
        """count little-endian dwords at lin, as a list (interrupt frames, descriptors: the
        commonest runtime reads, aligned and within a page of RAM, go straight to memory)."""
        lin &= 0xFFFFFFFF
        if not lin & 3 and (lin & 0xFFF) + 4 * count <= 0x1000:
            user = self.cpl == 3 if user is None else user
            phys = self._tlb_phys(lin, False, user)
            if phys is None:
                phys = self.translate(lin, False, user)[0]
            if phys + 4 * count <= self.ram_size:
                i = phys >> 2
                return self._ram32()[i:i + count]
        return list(struct.unpack(f"<{count}I", self.read_lin(lin, 4 * count, user)))

    def _phys_written(self, phys, n):
        """Guest bytes [phys, phys + n) were written: drop the translated blocks they overlap.
        Blocks elsewhere on the page stay, and so does the page's write trap while any block is
        left (a kernel patching call sites - ftrace, alternatives, static keys - rewrites a few
        bytes here and there in pages of running code), but after SMC_SPARE_WRITES trapped writes
        that hit no block the page's blocks are all dropped, and writes to it run at full speed
        again until code is translated there anew (code next to busy data)."""
        cache = self.cache
        for page in {phys & ~0xFFF, (phys + n - 1) & ~0xFFF}:
            lins = self.code_phys.get(page)
            if lins is None:
                continue
            spare = self.smc_spare.get(page, SMC_SPARE_WRITES)
            lo, hi = max(phys, page) - page, min(phys + n, page + 0x1000) - page
            hit = 0
            for lin in list(lins):
                # By linear page: the blocks there may come from another physical page (another
                # address space), which only costs those blocks a translation.
                hit += cache.invalidate_range(lin, lo, hi, "smc") if spare else cache.invalidate_page(lin, "smc")
                if not cache.has_code(lin):
                    lins.discard(lin)
            if not lins or not spare:
                del self.code_phys[page]
                self._mark_code(page, 0)
                self.smc_spare.pop(page, None)
            elif not hit:
                self.smc_spare[page] = spare - 1
            if hit:
                self.st.smc = 1

    # ---- soft-MMU slow paths ------------------------------------------------------------------
    def _pf(self, exc):
        st = self.st
        st.fault = 1
        st.exc_vector = PF
        st.exc_error = exc.error
        st.fault_addr = exc.addr

    def _load_slow(self, _st, addr, size):
        try:
            # 0x100|size: a write-permission probe, 0x200|size: a read probe (no access)
            probe, write = size & 0x300, bool(size & 0x100)
            size &= 0xFF
            user = self.cpl == 3
            try:
                first = self.translate(addr, write, user)
                last = self.translate(_second_page(addr, size), write, user) if size > 1 else first
            except PageFault as pf:
                self._pf(pf)
                return 0
            if probe:
                return 0
            if (addr & 0xFFF) + size <= 0x1000:
                data = self.read_phys(first[0], size)
                if first[0] < self.ram_size:
                    self._fill(addr, first[0], S.TLB_READ, first[1])
            else:
                split = 0x1000 - (addr & 0xFFF)
                data = self.read_phys(first[0], split) + self.read_phys(last[0], size - split)
            return int.from_bytes(data, "little")
        except BaseException as exc:
            self._pending_error = exc
            self.st.fault = 1
            return 0

    def _store_slow(self, _st, addr, value, size):
        try:
            user = self.cpl == 3
            try:
                first = self.translate(addr, True, user)
                last = self.translate(_second_page(addr, size), True, user) if size > 1 else first
            except PageFault as pf:
                self._pf(pf)
                return
            data = (value & ((1 << (8 * size)) - 1)).to_bytes(size, "little")
            if (addr & 0xFFF) + size <= 0x1000:
                self.write_phys(first[0], data)
                self._phys_written(first[0], size)
                if first[0] < self.ram_size and (first[0] & ~0xFFF) not in self.code_phys and first[2]:
                    self._fill(addr, first[0], S.TLB_WRITE, first[1])
            else:
                split = 0x1000 - (addr & 0xFFF)
                p2 = last[0]
                self.write_phys(first[0], data[:split])
                self.write_phys(p2, data[split:])
                self._phys_written(first[0], split)
                self._phys_written(p2, size - split)
        except BaseException as exc:
            self._pending_error = exc
            self.st.fault = 1

    def _fill(self, lin, phys, kind, is_global):
        i = S.tlb_index(1 if self.cpl == 3 else 0, kind) + ((lin >> 12) & (S.TLB_SIZE - 1))
        ent = self.st.tlb[i]
        ent.tag = lin & 0xFFFFF000
        ent.addend = (self.mem.base + (phys & 0xFFFFF000) - (lin & 0xFFFFF000)) & 0xFFFFFFFFFFFFFFFF
        self.tlb_shadow.filled(i, ent.tag, ent.addend, phys & ~0xFFF, is_global, kind)
        if is_global:
            self.lin_interest[lin >> 12] = 1

    def tlb_flush(self, keep_global=False):
        """Empty the soft TLB; keep_global (a CR3 write with CR4.PGE) puts global entries back."""
        if keep_global:
            self.cache.mapping_changed(keep_global=True)
            self.tlb_shadow.restore_globals(self.st.tlb)       # overwrites every entry
        else:
            super().tlb_flush()
            self.tlb_shadow.clear()
            self.walker.large.clear()

    def tlb_flush_page(self, page, remap=True):
        super().tlb_flush_page(page, remap)
        self.tlb_shadow.drop_page(page)

    def _fetch(self, addr, n):
        user = self.cpl == 3
        if (addr & 0xFFF) + n <= 0x1000:
            # Within a page (nearly every block and window): one translation, one read.
            phys = self._tlb_phys(addr, False, user)
            if phys is None:
                try:
                    phys = self._fetch_page(addr, user) | (addr & 0xFFF)
                except PageFault:
                    return b""
            if phys + n <= self.ram_size:
                return self.mem.read(phys, n)
        out = bytearray()
        a = addr
        while len(out) < n:
            phys = self._tlb_phys(a, False, user)
            if phys is None:
                try:
                    phys = self._fetch_page(a, user) | (a & 0xFFF)
                except PageFault:
                    break
            if phys >= self.ram_size:
                break
            chunk = min(n - len(out), 0x1000 - (a & 0xFFF))
            out += self.read_phys(phys, chunk)
            a = (a + chunk) & 0xFFFFFFFF
        return bytes(out)

    def fetch_fault(self, addr, n):
        for a in range(addr, addr + n):
            try:
                self.translate(a, False, self.cpl == 3, True)
            except PageFault as pf:
                return a, pf.error
        return None

    def _maps_global(self, lin):
        """Whether lin's page is mapped global now (PGE on): a CR3 write keeps its translation."""
        if not self.cr0 & CR0_PG or not self.cr4 & CR4_PGE:
            return False
        try:
            return bool(self.translate(lin, False, self.cpl == 3, True)[1])
        except PageFault:
            return False

    def _code_page(self, lin_page):
        try:
            phys = self.translate(lin_page, False, self.cpl == 3, True)[0] & ~0xFFF
        except PageFault:
            return
        self._track_code(phys, lin_page)

    def _track_code(self, phys, lin_page):
        """Blocks on lin_page have bytes from the physical page phys: writes to phys must trap."""
        lins = self.code_phys.get(phys)
        if lins is None:
            lins = self.code_phys[phys] = set()
            self._mark_code(phys, 1)
        if lin_page not in lins:
            lins.add(lin_page)
            self.cache.forget_instructions_of(lin_page)     # decoded from another physical page
            self.tlb_flush_page(lin_page, remap=False)
            # Every write entry that maps phys must go, whoever filled it (the native refill too).
            host = self.mem.base + phys
            for priv in range(S.TLB_PRIVS):
                self._drop_writes(self.st_addr, S.tlb_index(priv, S.TLB_WRITE), host)
            self.tlb_shadow.drop_writes_to(self.st.tlb, phys)

    def _mark_code(self, phys, v):
        """Tell the native store refill whether a physical page holds translated code."""
        if phys < self.ram_size:
            self._code_map[phys >> 12] = v

    # ---- control registers and mode ---------------------------------------------------------------
    def flush_translations(self):
        """Forget the linear->physical view: the soft TLB, and translated code keyed by linear address."""
        self.tlb_flush()
        self.cache.flush("mode")
        self.code_phys.clear()
        self._code_map[:] = bytes(len(self._code_map))
        self.smc_spare.clear()

    def _sync_paging(self):
        """Tell the native read refill what CR0, CR3 and CR4 now say."""
        self.st.pg_dir = self.cr3 & 0xFFFFF000
        self.st.pg_mode = ((S.PG_ON if self.cr0 & CR0_PG else 0) | (S.PG_PSE if self.cr4 & CR4_PSE else 0)
                           | (S.PG_WP if self.cr0 & CR0_WP else 0) | (S.PG_PGE if self.cr4 & CR4_PGE else 0))

    def set_cr0(self, v):
        v |= CR0_ET
        if not v & CR0_PE:
            raise Stop("unsupported", message="real mode (CR0.PE=0) is not implemented", eip=self.st.eip)
        changed = (self.cr0 ^ v) & (CR0_PG | CR0_WP | CR0_PE)
        self.cr0 = v & 0xE005003F
        self._sync_paging()
        if changed:
            self.switch_address_space()
        self.update_key()

    def set_cr3(self, v):
        self.cr3 = v & 0xFFFFF018
        self._sync_paging()
        self.switch_address_space(keep_global=bool(self.cr4 & CR4_PGE))

    def _fetch_page(self, lin, user):
        """The physical page of linear address lin for an instruction fetch (PageFault if none),
        remembered for the rest of the miss (_xlat)."""
        return self._fetch_page_g(lin, user) & ~0xFFF

    def _fetch_page_g(self, lin, user):
        """_fetch_page's physical page, plus 1 if the mapping is global."""
        memo = self._xlat
        at = (lin & 0xFFFFF000, user)
        v = None if memo is None else memo.get(at)
        if v is None:
            phys, glob, _ = self.translate(lin, False, user, True)
            v = (phys & ~0xFFF) | glob
            if memo is not None:
                memo[at] = v
        return v

    def _on_install(self, tb):
        """Remember the physical page a block came from (checked again at every lookup), and
        track the physical page of each of its linear pages: the cache announces a linear page
        (_code_page) only when it gets its first block, and the page may already hold blocks
        translated while it mapped another physical page (another address space)."""
        user = S.key_cpl(tb.key) == 3
        interest = self.lin_interest
        for i, lin in enumerate(tb.pages):
            interest[lin >> 12] = 1
            try:
                phys = self._fetch_page(lin, user)
            except PageFault:
                continue
            if i == 0:
                tb.phys = phys
            self._track_code(phys, lin)

    def _prefill(self, tb):
        """Put a block just installed from a stored entry in the jump cache if its page is global
        (as a lookup would, without the jc_local record that the other pages' entries need)."""
        if len(tb.pages) != 1 or tb.phys is None:
            return
        try:
            v = self._fetch_page_g(tb.eip, S.key_cpl(tb.key) == 3)
        except PageFault:
            return
        if v == tb.phys | 1:           # global, and the page the block came from
            self.cache._jc_fill(tb)

    def switch_address_space(self, keep_global=False):
        """A new linear->physical mapping.  Translated blocks are kept: a block is re-checked
        against the physical page it came from whenever it is looked up, chains never cross a
        page when paging is on (bt/emit.py), and the native jump cache - the only other way
        into a block - is cleared here.  The TLB keeps global entries on a CR3 write (keep_global)."""
        self.tlb_flush(keep_global)
        cache = self.cache
        if keep_global and len(self.jc_local) < JC_SELECTIVE_MAX:
            # Blocks on global pages stay reachable, as their global TLB entries stay valid: a
            # kernel mapped global is not looked up again in Python after every context switch.
            jc = cache.jmp_cache
            for i in self.jc_local:
                ent = jc[i]
                ent.eip, ent.key, ent.fn = 1, 0xFFFFFFFF, 0
        else:
            ctypes.memset(cache.jmp_cache, 0, ctypes.sizeof(cache.jmp_cache))
        self.jc_local = set()
        self.counters_switches = getattr(self, "counters_switches", 0) + 1

    @property
    def cr0_am(self):
        return bool(self.cr0 & CR0_AM)

    def _miss(self):
        self.sync_ac()      # a CPL-3 POPF that changed EFLAGS.AC left its block to come here
        if (self.st.eflags >> S.IOPL_SHIFT) & 3 != S.key_iopl(self.key):
            self.update_key()       # so did a POPF that changed IOPL (part of the key)
        eip, key = self.st.eip, self.key
        try:
            phys, glob, _ = self.translate(eip, False, self.cpl == 3, True)
            phys &= ~0xFFF
        except PageFault:
            phys, glob = None, False
        tb = self.cache.blocks.get((eip, key))
        if tb is not None and tb.phys not in (None, phys):
            self.cache.forget(tb, "remap")
        self._xlat = {} if phys is None else {(eip & 0xFFFFF000, self.cpl == 3): phys | glob}
        try:
            super()._miss()
        finally:
            self._xlat = None
        tb = self.cache.blocks.get((eip, key))
        if not glob or tb is None or len(tb.pages) != 1:
            self.jc_local.add(S.jc_hash(eip))

    def set_cr4(self, v):
        if v & ~(CR4_TSD | 0x8 | CR4_PSE | CR4_PGE | 0x200 | 0x400):
            raise GuestFault(GP, 0)
        changed = (self.cr4 ^ v) & (CR4_PSE | CR4_PGE)
        self.cr4 = v
        self._sync_paging()
        if changed:
            # Toggling PGE flushes global entries too (Linux's way to flush them, SDM 4.10.4.1).
            self.switch_address_space()

    @property
    def eflags(self):
        return self.st.eflags

    def set_eflags(self, v):
        self.st.eflags = (v & EFLAGS_USER_MASK) | 2
        self.update_key()

    def update_key(self):
        cs, cr0 = self.segs[S.CS], self.cr0
        cpl = cs.selector & 3 if cr0 & CR0_PE else 0
        cpl = self._cpl_override if getattr(self, "_cpl_override", None) is not None else cpl
        flat, fs_full = self._seg_flags if self._seg_flags is not None else self._segment_flags()
        # IRET, STI/POPF callouts and segment loads call this ~50,000 times in a Linux boot.
        sig = (cpl, cs.db, cr0 & _KEY_CR0, flat, fs_full, self.st.eflags & _KEY_EFLAGS, self.key & S.KEY_STEP)
        key = _KEYS.get(sig)
        if key is None:
            key = S.make_key(cs32=cs.db, pe=bool(cr0 & CR0_PE), pg=bool(cr0 & CR0_PG), cpl=cpl, flat=flat,
                             iopl=(self.st.eflags >> S.IOPL_SHIFT) & 3, fs_full=fs_full,
                             ac=bool(cr0 & CR0_AM and self.st.eflags & (1 << S.AC)))
            key |= self.key & S.KEY_STEP
            key |= (S.KEY_FPU_EM if cr0 & CR0_EM else 0) | (S.KEY_FPU_TS if cr0 & CR0_TS else 0) \
                | (S.KEY_FPU_MP if cr0 & CR0_MP else 0)
            _KEYS[sig] = key
        self.set_key(key)

    @property
    def cpl(self):
        return S.key_cpl(self.key)

    def _segment_flags(self):
        """(FLAT, FS_FULL) of the mode key: translated code neither adds ES/CS/SS/DS bases nor
        checks ES/SS/DS (Emitter.seg_check); FS accesses unchecked."""
        segs = self.segs
        flat = segs[S.CS].base == 0 and all(
            segs[i].base == 0 and segs[i].ranges() == (FULL, FULL) for i in (S.ES, S.SS, S.DS))
        return flat, segs[S.FS].ranges() == (FULL, FULL)

    def sync_segments(self, only=None):
        """Publish the segment registers to translated code (after any change to self.segs;
        only: the one register that changed)."""
        st = self.st
        for i, seg in enumerate(self.segs):
            if only is not None and i != only:
                continue
            st.seg_base[i] = seg.base
            st.seg_sel[i] = seg.selector
            if i == S.CS:
                st.cs_desc[0], st.cs_desc[1] = seg.raw or (0, 0)
            (st.seg_lo[i], st.seg_hi[i]), (st.seg_lo[6 + i], st.seg_hi[6 + i]) = seg.ranges()
        # Kept for update_key, which EFLAGS and CR0 writes call far more often than segments change.
        self._seg_flags = self._segment_flags()
        self.update_key()

    # ---- descriptors ------------------------------------------------------------------------------
    def descriptor(self, selector, exc=GP):
        """The raw (lo, hi) descriptor of a selector from the GDT or LDT; #GP(sel) beyond the limit."""
        index = selector & ~7
        base, limit = (self.ldtr.base, self.ldtr.limit) if selector & 4 else self.gdtr
        if index + 7 > limit:
            raise GuestFault(exc, selector & 0xFFFC)
        lo, hi = self.read_lin_dwords(base + index, 2, user=False)
        return lo, hi, base + index

    def load_segment(self, reg, selector):
        """MOV/POP to a data segment register or SS with the protection checks (SDM 5.5-5.7)."""
        selector &= 0xFFFF
        rpl, cpl = selector & 3, self.cpl
        if selector & ~3 == 0:
            if reg == S.SS:
                raise GuestFault(GP, 0)
            self.segs[reg] = Segment.null(selector)
            self.sync_segments()
            return
        lo, hi, addr = self.descriptor(selector)
        seg = decode(lo, hi, selector)
        if reg == S.SS:
            if rpl != cpl or seg.dpl != cpl or not seg.writable:
                raise GuestFault(GP, selector & 0xFFFC)
            if not seg.present:
                raise GuestFault(SS_, selector & 0xFFFC)
        else:
            if not seg.s or not seg.readable:
                raise GuestFault(GP, selector & 0xFFFC)
            if not seg.conforming and (seg.dpl < cpl or seg.dpl < rpl):
                raise GuestFault(GP, selector & 0xFFFC)
            if not seg.present:
                raise GuestFault(NP, selector & 0xFFFC)
        self._set_accessed(addr, hi)
        self.segs[reg] = seg
        self.sync_segments(reg)

    def seg_linear(self, seg, off, size, write=False):
        """The linear address of a size-byte access at offset off through segment register seg,
        checked as translated code checks it (bt/emit.py Emitter.seg_check): #GP(0), #SS(0) for SS."""
        lo, hi = self.segs[seg].ranges()[1 if write else 0]
        if off < lo or off + size - 1 > hi:
            raise GuestFault(SS_ if seg == S.SS else GP, 0)
        return (self.segs[seg].base + off) & 0xFFFFFFFF

    def _set_accessed(self, addr, hi):
        if not hi & 0x100:
            self.write_lin(addr + 4, struct.pack("<I", hi | 0x100), user=False)

    def code_segment(self, selector, exc=GP):
        if selector & ~3 == 0:
            raise GuestFault(GP, 0)
        lo, hi, addr = self.descriptor(selector)
        seg = decode(lo, hi, selector)
        if not seg.is_code:
            raise GuestFault(exc, selector & 0xFFFC)
        if not seg.present:
            raise GuestFault(NP, selector & 0xFFFC)
        return seg, addr, hi

    def set_cs(self, seg, cpl, alone=False):
        """Load CS (alone: no other segment register changed since the last sync)."""
        seg.selector = (seg.selector & ~3) | cpl
        self.segs[S.CS] = seg
        self.sync_segments(S.CS if alone else None)

    # ---- stack helpers for interrupt frames ----------------------------------------------------------
    def push32(self, v, user=None):
        esp = (self.reg("esp") - 4) & 0xFFFFFFFF
        self.write_lin(self.segs[S.SS].base + esp, struct.pack("<I", v & 0xFFFFFFFF), user)
        self.set_reg("esp", esp)

    def pop32(self):
        esp = self.reg("esp")
        v = self.read_lin32(self.segs[S.SS].base + esp)
        self.set_reg("esp", esp + 4)
        return v

    # ---- exceptions and interrupts ---------------------------------------------------------------------
    def deliver(self, vector, error=None, software=False, return_eip=None):
        """Deliver an exception/interrupt through the IDT (eip at the faulting instruction for faults,
        return_eip for traps and software/external interrupts)."""
        self.step_event = True      # an instruction that delivers an event is not single-step trapped
        prev = self.delivering
        if prev is not None:
            if prev == DF:
                raise TripleFault(f"triple fault (vector {vector} while delivering #DF)")
            if (prev in CONTRIBUTORY or prev == PF) and (vector in CONTRIBUTORY or vector == PF) \
                    and not (prev in CONTRIBUTORY and vector == PF):
                self.delivering = None
                return self.deliver(DF, 0)
        self.delivering = vector
        try:
            self._deliver(vector, error, software, return_eip)
        except GuestFault as f:
            self.deliver(f.vector, f.error)
            return
        except PageFault as pf:
            self.cr2 = pf.addr
            self.deliver(PF, pf.error)
            return
        finally:
            self.delivering = None if self.delivering == vector else self.delivering
        self.delivering = None

    def _deliver(self, vector, error, software, return_eip):
        base, limit = self.idtr
        if vector * 8 + 7 > limit:
            raise GuestFault(GP, vector * 8 + 2 + (0 if software else 1))
        lo, hi = struct.unpack("<II", self.read_lin(base + vector * 8, 8, user=False))
        gtype, dpl, present = (hi >> 8) & 0x1F, (hi >> 13) & 3, hi & 0x8000
        if gtype & 0xF not in (INT_GATE, TRAP_GATE) or gtype & 0x10:
            raise Stop("unsupported", message=f"IDT vector {vector}: gate type {gtype & 0xF:#x} "
                       "(task gates and 16-bit gates are not implemented)", eip=self.st.eip)
        if software and dpl < self.cpl:
            raise GuestFault(GP, vector * 8 + 2)
        if not present:
            raise GuestFault(NP, vector * 8 + 2)
        selector, offset = lo >> 16, (lo & 0xFFFF) | (hi & 0xFFFF0000)
        seg, _, _ = self.code_segment(selector)
        new_cpl = self.cpl if seg.conforming else seg.dpl
        if new_cpl > self.cpl:
            raise GuestFault(GP, selector & 0xFFFC)
        eflags = self.st.eflags
        if return_eip is None and not software:
            # A fault (eip at the faulting instruction): the image pushed has RF set, so that
            # the IRET that restarts the instruction skips its code breakpoint (SDM 17.3.1.1).
            eflags |= 1 << S.RF
        eip = self.st.eip if return_eip is None else return_eip
        old_cs, old_ss, old_esp = self.segs[S.CS].selector, self.segs[S.SS].selector, self.reg("esp")
        if new_cpl < self.cpl:
            # Inner-privilege stack from the TSS (SDM 6.12.1).
            tss = self.tr.base
            esp0 = int.from_bytes(self.read_lin(tss + 4 + 8 * new_cpl, 4, user=False), "little")
            ss0 = int.from_bytes(self.read_lin(tss + 8 + 8 * new_cpl, 2, user=False), "little")
            self._cpl_override = new_cpl
            try:
                ss = self._inner_stack(ss0, new_cpl)
                self.segs[S.SS] = ss
                self.set_reg("esp", esp0)
                frame = [old_ss, old_esp, eflags, old_cs, eip]
                if error is not None:
                    frame.append(error)
                for v in frame:
                    self.push32(v, user=False)
            finally:
                self._cpl_override = None
        else:
            frame = [eflags, old_cs, eip] + ([error] if error is not None else [])
            for v in frame:
                self.push32(v, user=False)
        self.set_cs(seg, new_cpl)
        fl = self.st.eflags & ~((1 << S.TF) | (1 << S.NT) | (1 << S.RF) | (1 << S.VM))
        if gtype == INT_GATE:
            fl &= ~(1 << S.IF)
        self.set_eflags(fl)
        self.set_reg("eip", offset)

    def _inner_stack(self, ss0, new_cpl):
        """The stack segment named by the TSS for a transition to new_cpl, checked as the SDM's
        interrupt pseudocode does: #TS(selector) unless it is a present-or-not writable data
        segment with RPL = DPL = new_cpl, #TS(0) if null, #SS(selector) if not present."""
        if ss0 & ~3 == 0:
            raise GuestFault(TS, 0)
        lo, hi, _ = self.descriptor(ss0, TS)
        ss = decode(lo, hi, ss0)
        if ss0 & 3 != new_cpl or ss.dpl != new_cpl or not ss.writable:
            raise GuestFault(TS, ss0 & 0xFFFC)
        if not ss.present:
            raise GuestFault(SS_, ss0 & 0xFFFC)
        return ss

    def single_step_trap(self):
        """The #DB trap after an instruction that started with EFLAGS.TF set (SDM Vol. 3A 17.3.1.4):
        DR6.BS set (B0-B3 cleared, as no breakpoint matched), the frame's EIP the next instruction
        and its EFLAGS with TF still set; the handler runs with TF clear (_deliver)."""
        self.dr[6] = (self.dr[6] & ~0xF) | 0x4000
        self.deliver(DB, return_eip=self.st.eip)

    def iret(self):
        """IRET from protected mode (same or outer privilege; no task return, no VM86)."""
        if self.st.eflags & (1 << S.NT):
            raise Stop("unsupported", message="IRET with NT set (task return) is not implemented",
                       eip=self.st.eip)
        esp = self.reg("esp")
        ssb = self.segs[S.SS].base
        eip, cs, fl = self.read_lin_dwords(ssb + esp, 3)
        cs &= 0xFFFF
        seg, addr, hi = self.code_segment(cs)
        rpl = cs & 3
        if rpl < self.cpl:
            raise GuestFault(GP, cs & 0xFFFC)
        # The bits POPF may change (IF and IOPL by privilege).  RF is not loaded: it only
        # suppresses code breakpoints (which btvm does not have) for the one instruction returned
        # to, after which the CPU clears it; leaving it set would leak into later interrupt frames
        # and PUSHFs.
        mask = popf_mask(self.key, 4) | (1 << 1)
        new_fl = (fl & mask) | (self.st.eflags & ~mask)
        if rpl > self.cpl:
            new_esp, new_ss = self.read_lin_dwords(ssb + esp + 12, 2)
            new_ss &= 0xFFFF
            self.set_cs(seg, rpl)
            self.set_eflags(new_fl)
            self.load_segment(S.SS, new_ss)
            self.set_reg("esp", new_esp)
            self.null_outer_data_segments(rpl)
        else:
            self.set_reg("esp", esp + 12)
            seg.selector = (seg.selector & ~3) | rpl
            if seg != self.segs[S.CS] or seg.raw != self.segs[S.CS].raw:
                self.set_cs(seg, rpl, alone=True)   # a kernel's interrupt returns keep their CS
            self.set_eflags(new_fl)
        self.set_reg("eip", eip)

    def null_outer_data_segments(self, cpl):
        """After a return to an outer ring (IRET, RETF): data segments (and non-conforming code)
        the new CPL may not use are loaded with the null selector (SDM RET/IRET)."""
        for r in (S.ES, S.DS, S.FS, S.GS):
            s = self.segs[r]
            if s.selector & ~3 and not s.conforming and s.dpl < cpl:
                self.segs[r] = Segment.null()
        self.sync_segments()

    def load_tr(self, selector):
        lo, hi, addr = self.descriptor(selector)
        seg = decode(lo, hi, selector)
        if seg.s or seg.type != TSS_AVAIL:
            raise GuestFault(GP, selector & 0xFFFC)
        if not seg.present:
            raise GuestFault(NP, selector & 0xFFFC)
        self.write_lin(addr + 4, struct.pack("<I", hi | 0x200), user=False)   # mark busy
        seg.type = TSS_BUSY
        self.tr = seg

    def load_ldt(self, selector):
        if selector & ~3 == 0:
            self.ldtr = Segment(0, 0, 0, LDT, False)
            return
        lo, hi, _ = self.descriptor(selector)
        seg = decode(lo, hi, selector)
        if seg.s or seg.type != LDT:
            raise GuestFault(GP, selector & 0xFFFC)
        self.ldtr = seg

    def io_allowed(self, port, size):
        """IOPL, then the TSS I/O permission bitmap (SDM 18.5)."""
        if self.cpl <= (self.st.eflags >> S.IOPL_SHIFT) & 3:
            return True
        if self.tr.limit < 0x67:
            return False
        base = self.tr.base
        iomap = int.from_bytes(self.read_lin(base + 0x66, 2, user=False), "little")
        byte = iomap + port // 8
        if byte + 1 > self.tr.limit:
            return False
        bits = int.from_bytes(self.read_lin(base + byte, 2, user=False), "little")
        return not (bits >> (port % 8)) & ((1 << size) - 1)

    def tsc(self):
        return self.icount + self.extra_ns + self.tsc_offset

"""Two-level 32-bit paging with 4 MiB PSE pages, PGE global pages and CR0.WP
(SDM Vol. 3A, 4.3 and 4.6); accessed and dirty bits are written back."""

P, RW, US, A, D, PS, G = 1, 2, 4, 0x20, 0x40, 0x80, 0x100
CR0_PE, CR0_MP, CR0_EM, CR0_TS, CR0_ET, CR0_NE, CR0_WP, CR0_PG = 1, 2, 4, 8, 0x10, 0x20, 1 << 16, 1 << 31
CR0_AM = 1 << 18
CR4_TSD, CR4_DE, CR4_PSE, CR4_PAE, CR4_PGE = 4, 8, 0x10, 0x20, 0x80


class PageFault(Exception):
    def __init__(self, addr, error):
        super().__init__(f"#PF at {addr:#x} err {error:#x}")
        self.addr, self.error = addr, error


class LargeRegions:
    """The 4 MiB regions (lin >> 22) walked through a PSE directory entry since the last full
    TLB flush: an INVLPG anywhere in one must drop every translation of the region (SDM
    4.10.4.1).  One byte per region in a buffer that native code marks too (state.pg_large)."""

    def __init__(self):
        self.map = bytearray(1024)

    def add(self, region):
        self.map[region] = 1

    def __contains__(self, region):
        return bool(self.map[region])

    def clear(self):
        self.map[:] = bytes(1024)


class Walker:
    """Translates linear to physical addresses against the guest's page tables."""

    def __init__(self, read32, write32):
        self.read32, self.write32 = read32, write32
        self.large = LargeRegions()

    def translate(self, cr0, cr3, cr4, lin, write, user, fetch=False):
        """Physical address and whether the page is global; raises PageFault."""
        lin &= 0xFFFFFFFF
        err_base = (2 if write else 0) | (4 if user else 0) | (0x10 if False and fetch else 0)
        pde_addr = (cr3 & 0xFFFFF000) | ((lin >> 22) << 2)
        pde = self.read32(pde_addr)
        if not pde & P:
            raise PageFault(lin, err_base)
        if pde & PS and cr4 & CR4_PSE:
            self.large.add(lin >> 22)
            flags = pde
            phys = (pde & 0xFFC00000) | (lin & 0x3FFFFF)
            self._check(cr0, flags, flags, lin, write, user, err_base)
            new = pde | A | (D if write else 0)
            if new != pde:
                self.write32(pde_addr, new)
            return phys, bool(pde & G and cr4 & CR4_PGE), bool(new & D)
        pte_addr = (pde & 0xFFFFF000) | (((lin >> 12) & 0x3FF) << 2)
        pte = self.read32(pte_addr)
        if not pte & P:
            raise PageFault(lin, err_base)
        self._check(cr0, pde, pte, lin, write, user, err_base)
        if not pde & A:
            self.write32(pde_addr, pde | A)
        new = pte | A | (D if write else 0)
        if new != pte:
            self.write32(pte_addr, new)
        return (pte & 0xFFFFF000) | (lin & 0xFFF), bool(pte & G and cr4 & CR4_PGE), bool(new & D)

    @staticmethod
    def _check(cr0, pde, pte, lin, write, user, err_base):
        if user and not (pde & US and pte & US):
            raise PageFault(lin, err_base | 1)
        if write and not (pde & RW and pte & RW) and (user or cr0 & CR0_WP):
            raise PageFault(lin, err_base | 1)

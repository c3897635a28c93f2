"""Segment descriptors and the descriptor cache of a segment register (SDM Vol. 3A, 3.4-3.5)."""
from dataclasses import dataclass, field

EMPTY, FULL = (0xFFFFFFFF, 0), (0, 0xFFFFFFFF)    # offset ranges (lo, hi); = bt.state.SEG_EMPTY/SEG_FULL
_RANGES = {}


@dataclass
class Segment:
    """The hidden part of a segment register, as loaded from its descriptor."""
    selector: int = 0
    base: int = 0
    limit: int = 0xFFFF
    type: int = 0x3         # data read/write, accessed
    s: bool = True          # code/data (not system)
    dpl: int = 0
    present: bool = True
    db: bool = False        # D/B: 32-bit code / 32-bit stack
    granular: bool = False
    usable: bool = True     # False after loading a null selector: every access is #GP(0)
    # The two dwords it was decoded from (None: made by the VMM, e.g. SYSENTER's flat CS);
    # translated IRETs compare CS's with the GDT (bt/semantics/system.py iret).
    raw: tuple = field(default=None, compare=False, repr=False)

    @property
    def is_code(self):
        return self.s and bool(self.type & 8)

    @property
    def conforming(self):
        return self.is_code and bool(self.type & 4)

    @property
    def readable(self):
        return not self.is_code or bool(self.type & 2)

    @property
    def writable(self):
        return self.s and not self.is_code and bool(self.type & 2)

    @property
    def expand_down(self):
        return self.s and not self.is_code and bool(self.type & 4)

    def ranges(self):
        """The valid offsets ((lo, hi) for reads, (lo, hi) for writes): an access of n bytes at
        offset o is allowed when lo <= o and o + n - 1 <= hi (SDM 5.3, 5.4.1, 5.5)."""
        # Remembered by the fields they depend on: a kernel's entry and exit paths reload
        # segment registers ~12,000 times in a Linux boot, each publishing all six ranges.
        k = (self.usable, self.type, self.s, self.db, self.limit)
        r = _RANGES.get(k)
        if r is None:
            r = _RANGES[k] = self._ranges()
        return r

    def _ranges(self):
        if not self.usable:
            return EMPTY, EMPTY
        if self.expand_down:
            top = 0xFFFFFFFF if self.db else 0xFFFF
            r = (self.limit + 1, top) if self.limit < top else EMPTY
        else:
            r = (0, self.limit)
        return (r if self.readable else EMPTY), (r if self.writable else EMPTY)

    @classmethod
    def null(cls, selector=0):
        """A data segment register holding a null selector (DS/ES/FS/GS may; using it faults)."""
        return cls(selector, 0, 0, 0, True, 0, False, usable=False)

    @classmethod
    def flat(cls, selector, code, dpl=0):
        return cls(selector, 0, 0xFFFFFFFF, 0xB if code else 0x3, True, dpl, True, True, True)


def decode(lo, hi, selector=0):
    """A Segment from the two dwords of a descriptor."""
    base = (lo >> 16) | ((hi & 0xFF) << 16) | (hi & 0xFF000000)
    limit = (lo & 0xFFFF) | (hi & 0xF0000)
    granular = bool(hi & (1 << 23))
    if granular:
        limit = (limit << 12) | 0xFFF
    return Segment(selector, base, limit, (hi >> 8) & 0xF, bool(hi & (1 << 12)), (hi >> 13) & 3,
                   bool(hi & (1 << 15)), bool(hi & (1 << 22)), granular, raw=(lo, hi))


# System descriptor / gate types.
TSS_AVAIL, LDT, TSS_BUSY = 0x9, 0x2, 0xB
INT_GATE, TRAP_GATE, TASK_GATE, INT_GATE16, TRAP_GATE16, CALL_GATE = 0xE, 0xF, 0x5, 0x6, 0x7, 0xC

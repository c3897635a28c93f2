"""The guest CPU state: one C struct shared by translated code and the runtime.

Translated blocks receive a pointer to this struct and nothing else; every
runtime service they need (soft-MMU slow paths, the jump cache) is reached
through pointers stored in it, so compiled code holds no process-specific
addresses and can later be persisted on disk.
"""
import ctypes

# General registers in x86 encoding order (ModRM reg field numbering).
REG_NAMES = ("eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi")
SEG_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")
ES, CS, SS, DS, FS, GS = range(6)

# EFLAGS bits.
CF, PF, AF, ZF, SF, TF, IF, DF, OF = 0, 2, 4, 6, 7, 8, 9, 10, 11
IOPL_SHIFT, NT, RF, VM, AC, VIF, VIP, ID = 12, 14, 16, 17, 18, 19, 20, 21
STATUS_FLAGS = ("CF", "PF", "AF", "ZF", "SF", "OF")
FLAG_BIT = {"CF": CF, "PF": PF, "AF": AF, "ZF": ZF, "SF": SF, "OF": OF, "DF": DF}
STATUS_MASK = sum(1 << FLAG_BIT[f] for f in STATUS_FLAGS)
EFLAGS_FIXED1 = 0x2

# Exit codes returned by a translated block (and by the native entry).
LINK_LOG = 256       # chain slots the native entry may link before the runtime records them
EXIT_LOOKUP = 0      # eip holds the next guest pc; not in the jump cache / not chained
EXIT_BUDGET = 1      # instruction budget ran out (time slice, max_instructions, interrupt request)
EXIT_EXCEPTION = 2   # exc_vector / exc_error hold an architectural exception; eip at the faulting insn
EXIT_CALLOUT = 3     # callout_id names a sensitive instruction for the VMM; eip at it, next_eip after it
EXIT_HLT = 4         # HLT executed; eip after it
EXIT_SMC = 5         # a store hit translated code; eip at the next instruction
EXIT_HOT = 6         # a tier-1 block's hot counter ran out (bt.tier2); eip at the block, nothing done

NO_ERROR_CODE = 0xFFFFFFFF

TLB_BITS = 10
TLB_SIZE = 1 << TLB_BITS
TLB_INVALID = 0xFFFFFFFF   # never equal to a page-aligned tag; all-ones so a flush is one memset
TLB_READ, TLB_WRITE = 0, 1
TLB_KINDS = 2
TLB_PRIVS = 2            # 0: supervisor (CPL 0-2), 1: user (CPL 3)

# 2^16 entries (1 MiB): a warm Linux boot's jump-cache misses of blocks already translated went
# 73.5k (14 bits) -> 42k, and the boot ~4% faster (median of 5 alternating runs, 8.08 -> 7.71 s);
# 18 bits (35k misses) was slower than 16 (a 4 MiB table no longer fits the host's L2).
JMP_CACHE_BITS = 16
JMP_CACHE_SIZE = 1 << JMP_CACHE_BITS
# Fibonacci hashing of the guest address: the old (eip ^ eip >> 12) folded a busybox loop's eight
# return targets into four colliding pairs that evicted each other on every iteration (a trip
# through Python each).  Translated code, the native entry and the code cache use jc_hash's formula.
JMP_CACHE_MULT = 0x9E3779B1


def jc_hash(eip):
    """Jump-cache bucket of a guest address."""
    return ((eip * JMP_CACHE_MULT) & 0xFFFFFFFF) >> (32 - JMP_CACHE_BITS)


class TLBEntry(ctypes.Structure):
    _fields_ = [("tag", ctypes.c_uint32), ("_pad", ctypes.c_uint32), ("addend", ctypes.c_uint64)]


class JmpCacheEntry(ctypes.Structure):
    _fields_ = [("eip", ctypes.c_uint32), ("key", ctypes.c_uint32), ("fn", ctypes.c_uint64)]


FPU_IMAGE = 108          # FNSAVE image size (32-bit format)
FPU_SLOT = 112
FPU_CW, FPU_SW, FPU_TW, FPU_FIP, FPU_FCS, FPU_FDP, FPU_FDS, FPU_ST0 = 0, 4, 8, 12, 16, 20, 24, 28
FPU_INIT_CW = 0x037F


def fpu_reset(st):
    """FNINIT state: FCW 0x037F, FSW 0, all registers empty (FTW 0xFFFF), pointers 0."""
    ctypes.memset(ctypes.addressof(st) + CPUState.fpu.offset, 0, FPU_SLOT)
    img = st.fpu
    img[FPU_CW], img[FPU_CW + 1] = FPU_INIT_CW & 0xFF, FPU_INIT_CW >> 8
    img[FPU_TW], img[FPU_TW + 1] = 0xFF, 0xFF


class CPUState(ctypes.Structure):
    """Field order is ABI: translated code addresses these fields by offset."""
    _fields_ = [
        ("regs", ctypes.c_uint32 * 8),
        ("eip", ctypes.c_uint32),
        ("eflags", ctypes.c_uint32),
        ("seg_base", ctypes.c_uint32 * 6),
        ("seg_sel", ctypes.c_uint16 * 6),
        ("_pad0", ctypes.c_uint32),
        ("budget", ctypes.c_int64),
        ("exc_vector", ctypes.c_uint32),
        ("exc_error", ctypes.c_uint32),
        ("fault_addr", ctypes.c_uint32),   # CR2-to-be of a page fault
        ("fault", ctypes.c_uint32),        # set by a slow path that raised an exception
        ("smc", ctypes.c_uint32),          # set by a slow-path store that invalidated code
        ("callout_id", ctypes.c_uint32),
        ("callout_arg", ctypes.c_uint32),
        ("next_eip", ctypes.c_uint32),
        ("mode_key", ctypes.c_uint32),     # translation key of the current mode
        ("irq_pending", ctypes.c_uint32),  # 1 << IF while a machine's interrupt controller requests
        ("chain_from", ctypes.c_uint64),   # address of the exit slot that just missed (0: none)
        ("load_slow", ctypes.c_uint64),    # u64 (state*, u32 addr, u32 size)
        ("store_slow", ctypes.c_uint64),   # void (state*, u32 addr, u64 val, u32 size)
        ("jmp_cache", ctypes.c_uint64),    # JmpCacheEntry[JMP_CACHE_SIZE]
        ("link_log", ctypes.c_uint64),     # u64[1 + LINK_LOG]: count, then slots linked natively
        ("scratch", ctypes.c_uint64 * 4),
        # ---- lazy status flags (bt/lazyflags.py): while cc_op != 0, EFLAGS' six status flags are
        # those of the operation cc_op on cc_a, cc_b giving cc_res, not the bits in eflags.
        ("cc_op", ctypes.c_uint32),
        ("cc_a", ctypes.c_uint32),
        ("cc_b", ctypes.c_uint32),
        ("cc_res", ctypes.c_uint32),
        ("materialize", ctypes.c_uint64),  # void (state*): folds the lazy flags into eflags
        ("tlb", TLBEntry * (TLB_PRIVS * TLB_KINDS * TLB_SIZE)),
        # ---- x87 FPU (bt/semantics/x87.py) ----
        # The guest FPU state is kept as an FNSAVE image in the 32-bit protected-mode
        # layout (108 bytes: FCW FSW FTW FIP FCS|FOP FDP FDS, then ST(0)..ST(7) as
        # 10-byte values), exactly as the hardware writes it.
        ("fpu", ctypes.c_uint8 * FPU_SLOT),
        ("fpu_new", ctypes.c_uint8 * FPU_SLOT),    # scratch: image after one instruction
        ("fpu_buf", ctypes.c_uint8 * FPU_SLOT),    # scratch: an instruction's memory operand
        ("fpu_hostcw", ctypes.c_uint16),           # scratch: host control word while a guest insn runs
        ("fpu_eflags", ctypes.c_uint8),            # scratch: SF ZF AF PF CF in/out (FCMOVcc, FCOMI)
        ("_fpu_pad", ctypes.c_uint8 * 5),
        ("tsc_base", ctypes.c_uint64),             # TSC = tsc_base - budget (set per slice by the runtime)
        # ---- segment checks (Emitter.seg_check) ----
        # Per access kind (read: [seg], write: [6 + seg]) the valid offsets [lo, hi] of a segment
        # register, from its descriptor cache: the limit, expand-down, the type (a write range is
        # empty for read-only data and code) and a null selector (both empty) folded into one range.
        ("seg_lo", ctypes.c_uint32 * 12),
        ("seg_hi", ctypes.c_uint32 * 12),
        # ---- the native read-miss path of flat machines (runtime/native_refill.py) ----
        ("refill_perm", ctypes.c_uint64),          # u8 per 4 KiB page, bit 0: readable
        ("refill_base", ctypes.c_uint64),          # host address of guest address 0
        ("refill_slow", ctypes.c_uint64),          # the runtime's own load slow path
        # ---- ... and of system machines: the page walk (runtime/native_refill.py) ----
        ("pg_dir", ctypes.c_uint32),               # CR3's page-directory base
        ("pg_mode", ctypes.c_uint32),              # PG_ON | PG_PSE | PG_WP | PG_PGE as CR0/CR4 say
        ("ram_size", ctypes.c_uint64),             # guest-physical RAM (bytes from refill_base)
        ("pg_large", ctypes.c_uint64),             # u8 per 4 MiB region: walked through a PSE entry
        ("pg_code", ctypes.c_uint64),              # u8 per physical page: holds translated code
        ("refill_store_slow", ctypes.c_uint64),    # the runtime's own store slow path
        # ---- INVLPG in native code (bt/semantics/system.py, runtime/native_refill.py) ----
        ("invlpg", ctypes.c_uint64),               # i32 (state*, u32 linear): 0 done, else call out
        ("pg_interest", ctypes.c_uint64),          # u8 per linear page: the runtime must see its INVLPG
        # ---- IRET in translated code (bt/semantics/system.py iret) ----
        ("gdt_base", ctypes.c_uint32),             # GDTR
        ("gdt_limit", ctypes.c_uint32),
        ("cs_desc", ctypes.c_uint32 * 2),          # the descriptor CS was loaded from (0, 0: none)
    ]

    def __init__(self, *args, **kw):
        super().__init__(*args, **kw)
        fpu_reset(self)
        for i in range(12):                        # no descriptors (user mode, snippets): 4 GiB
            self.seg_lo[i], self.seg_hi[i] = 0, 0xFFFFFFFF


PG_ON, PG_PSE, PG_WP, PG_PGE = 1, 2, 4, 8     # pg_mode bits: CR0.PG, CR4.PSE, CR0.WP, CR4.PGE


def offset(name):
    return getattr(CPUState, name).offset


# Translation key: the mode bits that change how guest bytes translate.
KEY_CS32 = 1 << 0        # CS.D: default operand/address size 32
KEY_PE = 1 << 1
KEY_PG = 1 << 2
KEY_CPL_SHIFT = 3        # 2 bits
KEY_FLAT = 1 << 5        # ES/CS/SS/DS bases are 0, and ES/SS/DS 4 GiB writable: no base, no checks
KEY_STEP = 1 << 6        # one instruction per block (exact budgets, single-stepping)
KEY_IOPL_SHIFT = 7       # 2 bits: POPF/CLI/STI semantics depend on IOPL vs CPL
KEY_FPU_EM = 1 << 9      # CR0.EM: x87 instructions raise #NM
KEY_FPU_TS = 1 << 10     # CR0.TS: x87 instructions raise #NM (WAIT only with CR0.MP)
KEY_FPU_MP = 1 << 11     # CR0.MP
KEY_FS_FULL = 1 << 12    # FS is usable, 4 GiB, writable (Linux's per-cpu segment): FS accesses unchecked
KEY_AC = 1 << 13         # alignment checking: CR0.AM, EFLAGS.AC and CPL 3 all hold (Emitter.align_check)


def make_key(cs32=True, pe=True, pg=False, cpl=0, flat=True, step=False, iopl=0, fs_full=True, ac=False):
    """ac: CR0.AM and EFLAGS.AC are set (KEY_AC is set only if cpl is 3 too)."""
    return ((KEY_CS32 if cs32 else 0) | (KEY_PE if pe else 0) | (KEY_PG if pg else 0)
            | (cpl << KEY_CPL_SHIFT) | (KEY_FLAT if flat else 0) | (KEY_STEP if step else 0)
            | (iopl << KEY_IOPL_SHIFT) | (KEY_FS_FULL if fs_full else 0) | (KEY_AC if ac and cpl == 3 else 0))


SEG_EMPTY = (0xFFFFFFFF, 0)   # a (lo, hi) range no access fits in (lo > hi)
SEG_FULL = (0, 0xFFFFFFFF)


def key_cpl(key):
    return (key >> KEY_CPL_SHIFT) & 3


def key_iopl(key):
    return (key >> KEY_IOPL_SHIFT) & 3


def tlb_index(priv, kind):
    """First entry of the TLB for a privilege (0 sup, 1 user) and access kind."""
    return (priv * TLB_KINDS + kind) * TLB_SIZE

"""CPUID: btvm's virtual CPU, reporting exactly what is implemented."""

VENDOR = b"BTVMbtvmBTVM"    # 12 bytes, EBX EDX ECX order
SIGNATURE = (6 << 8) | (1 << 4) | 1   # family 6 (i686), model 1, stepping 1

# EDX feature bits of leaf 1 that the translator implements.
FEATURES_EDX = {
    "fpu": 0,       # x87 FPU (FCMOVcc is covered by "cmov")
    "tsc": 4,       # RDTSC
    "pse": 3,       # 4 MiB pages (runtime/system/paging.py)
    "msr": 5,       # RDMSR/WRMSR (the MSRs in runtime/system/callouts.py; others #GP)
    "cx8": 8,       # CMPXCHG8B
    "sep": 11,      # SYSENTER/SYSEXIT
    "pge": 13,      # global pages (CR4.PGE accepted; the TLB is flushed whole on CR3 writes)
    "cmov": 15,     # CMOVcc
}
FEATURES_ECX = {}


def cpuid(leaf, subleaf=0):
    """Return (eax, ebx, ecx, edx) for a leaf."""
    if leaf == 0:
        b, d, c = (int.from_bytes(VENDOR[i:i + 4], "little") for i in (0, 4, 8))
        return 1, b, c, d
    if leaf == 1:
        edx = sum(1 << b for b in FEATURES_EDX.values())
        ecx = sum(1 << b for b in FEATURES_ECX.values())
        return SIGNATURE, 0, ecx, edx
    if leaf == 0x80000000:
        return 0x80000000, 0, 0, 0
    return 0, 0, 0, 0


def handle_cpuid(cpu, insn):
    a, b, c, d = cpuid(cpu.reg("eax"), cpu.reg("ecx"))
    for name, v in zip(("eax", "ebx", "ecx", "edx"), (a, b, c, d)):
        cpu.set_reg(name, v)
    cpu.set_reg("eip", insn.next)

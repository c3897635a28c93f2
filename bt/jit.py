"""llvmlite engine: compiles batches of translated blocks (one LLVM module per batch)."""
import hashlib
import os
import threading
import time

import llvmlite.binding as llvm

# BTVM_VERIFY=1 runs LLVM's IR verifier on every module (the tests do; the hot path does not).
VERIFY = os.environ.get("BTVM_VERIFY", "") not in ("", "0")

_init_lock = threading.Lock()
_initialized = False


def _init():
    global _initialized
    with _init_lock:
        if not _initialized:
            llvm.initialize_native_target()
            llvm.initialize_native_asmprinter()
            _initialized = True


def host_target_machine(opt, **kw):
    """A TargetMachine for this host's CPU and features at codegen level opt (kw: jit=True,
    reloc=..., codemodel=...): every tier compiles for the machine it runs on."""
    _init()
    return llvm.Target.from_default_triple().create_target_machine(
        cpu=llvm.get_host_cpu_name(), features=llvm.get_host_cpu_features().flatten(), opt=opt, **kw)


class ModuleText:
    """Accumulates the IR text of one batch: declarations, chain-slot globals, functions."""

    def __init__(self, name, hot=0, region=None, inline=False):
        """hot: executions before a block asks for tier 2 (0: no hot counters);
        region: {guest eip: function name} of the blocks compiled together as one tier-2
        region, whose direct exits to each other become direct calls; inline: every member of
        the region but the first (the hot block) is inlined where it is called, so the hot
        block's function becomes the region's loop."""
        self.inline = inline
        self.name = name
        self.decls = set()
        self.slots = []
        self.counters = []
        self.hot = hot
        self.hots = []
        self.region = region or {}
        self.flags_live = {}          # tier 2: guest eip -> lazyflags.flags_live of the block there
        self.helpers = {}             # name -> text of internal functions shared by the module's blocks
        self.functions = []

    def declare(self, line):
        self.decls.add(line)

    def new_slot(self, fname):
        name = f"{fname}_x{len(self.slots)}"
        self.slots.append(name)
        return name

    def new_counter(self, fname):
        name = f"{fname}_n"
        self.counters.append(name)
        return name

    def new_hot(self, fname):
        name = f"{fname}_h"
        self.hots.append(name)
        return name

    def text(self):
        parts = [f"; ModuleID = '{self.name}'"]
        parts += sorted(self.decls)
        parts += [f"@{s} = global ptr null, align 8" for s in self.slots]
        parts += [f"@{c} = global i64 0, align 8" for c in self.counters]
        parts += [f"@{h} = global i32 {self.hot}, align 4" for h in self.hots]
        parts += self.helpers.values()
        parts += self.functions
        return "\n".join(parts) + "\n"


class JIT:
    """One MCJIT engine; every batch is added to it and stays alive (code is never freed,
    so a block that invalidated itself can still run to its exit)."""

    def __init__(self, opt=2, codegen_opt=None):
        self.opt = opt
        self.codegen_opt = codegen_opt
        self.tm = host_target_machine(opt if codegen_opt is None else codegen_opt, jit=True)
        self.engine = llvm.create_mcjit_compiler(llvm.parse_assembly(""), self.tm)
        self.modules = 0
        self.compile_seconds = 0.0

    def _optimize(self, mod):
        if self.opt <= 0:
            return
        # A fresh PassBuilder per module: reusing one slows down steadily (llvmlite 0.50).
        pto = llvm.create_pipeline_tuning_options(speed_level=self.opt)
        pb = llvm.create_pass_builder(self.tm, pto)
        pb.getModulePassManager().run(mod, pb)

    def compile(self, mt, functions, want_object=False):
        """Compile ModuleText mt; returns ({function: address}, {slot: address}) and, with
        want_object, the object bytes as a third item.

        The module is compiled to a relocatable object (which bt.diskcache can persist)
        and loaded with add_object_file: the code reaches the runtime only through the
        CPU state and its own chain-slot globals, so the object holds no process addresses."""
        t0 = time.perf_counter()
        mod = llvm.parse_assembly(mt.text())
        if VERIFY:
            mod.verify()
        self._optimize(mod)
        obj = self.tm.emit_object(mod)
        fns, slots = self._load(obj, functions, mt.slots, t0)
        return (fns, slots, obj) if want_object else (fns, slots)

    def compile_cached(self, mt, functions):
        """compile() for the runtime's own fixed functions (the entry trampoline, the TLB
        refills): their object code is kept in the disk cache's folder, keyed by the IR and this
        engine's fingerprint, so a process start loads it instead of compiling (~15 ms of every
        `btvm run`).  A file that fails its digest is compiled again and replaced."""
        from .diskcache import default_dir, atomic_write
        root, text = default_dir(), mt.text()
        path = None
        if root is not None:
            key = hashlib.sha256((self.fingerprint() + "\0" + text).encode()).hexdigest()
            path = root / "runtime" / f"{key}.o"
            try:
                data = path.read_bytes()
            except OSError:
                data = b""
            obj = data[32:]
            if obj and hashlib.sha256(obj).digest() == data[:32]:
                return self.load_object(obj, functions, mt.slots)
        fns, slots, obj = self.compile(mt, functions, want_object=True)
        if path is not None:
            try:
                atomic_write(path, hashlib.sha256(obj).digest() + obj)
            except OSError:
                pass
        return fns, slots

    def load_object(self, obj, functions, slots):
        """Load a compiled object (from compile() or the disk cache); returns the addresses."""
        return self._load(obj, functions, slots, time.perf_counter())

    def _load(self, obj, functions, slot_names, t0):
        self.engine.add_object_file(llvm.ObjectFileRef.from_data(obj))
        self.engine.finalize_object()
        fns = {f: self.engine.get_function_address(f) for f in functions}
        slots = {s: self.engine.get_global_value_address(s) for s in slot_names}
        if not all(fns.values()) or not all(slots.values()):
            raise RuntimeError("compiled object lacks a function or slot")
        self.modules += 1
        self.compile_seconds += time.perf_counter() - t0
        return fns, slots

    def fingerprint(self):
        """What, besides the translator's sources, the machine code depends on."""
        import llvmlite
        return "|".join([llvmlite.__version__, ".".join(map(str, llvm.llvm_version_info)), llvm.get_host_cpu_name(),
                         llvm.get_host_cpu_features().flatten(), self.tm.triple, str(self.opt),
                         str(self.codegen_opt)])


_shared = None


DEFAULT_OPT = 0


def shared_jit():
    """The process-wide engine (LLVM's setup is paid once per process).

    BTVM_OPT picks the LLVM optimization level (0-3): cold code is dominated by
    compile time, so the default is 0 (LLVM at -O1 or above costs 3-6x more per block) until a cheaper first tier and an optimizing tier exist."""
    global _shared
    if _shared is None:
        import os
        cg = os.environ.get("BTVM_CODEGEN_OPT")
        _shared = JIT(opt=int(os.environ.get("BTVM_OPT", DEFAULT_OPT)), codegen_opt=None if cg is None else int(cg))
    return _shared

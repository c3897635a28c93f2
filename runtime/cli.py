"""The `btvm` command."""
import argparse
import gc
import json
import sys


def _cmd_exec(args):
    from .snippet import CaseError, load_case_file, run_case
    try:
        case = load_case_file(args.case)
        result = run_case(case)
    except CaseError as exc:
        print(f"btvm exec: {exc}", file=sys.stderr)
        return 2
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")
    return 0


def _cmd_callouts(args):
    from bt.sensitive import table
    rows = table()
    if args.json:
        json.dump([dict(instruction=m, handling=h, why=w, does=d, ends_block=e) for m, h, w, d, e in rows],
                  sys.stdout, indent=1)
        print()
        return 0
    for m, h, w, d, e in rows:
        print(f"{m:10} {h:20} {'ends block' if e else 'continues':10}  {w}; {d}")
    return 0


def _configure_cache(args, cmd):
    """--cache-dir DIR / --no-cache: the persistent translation cache's folder for this process
    (bt.diskcache.configure, over BTVM_CACHE_DIR and BTVM_NO_CACHE).  A folder that cannot be
    created or written costs one line on stderr and the run goes on without the cache."""
    from bt import diskcache
    why = diskcache.configure(args.cache_dir, enabled=not args.no_cache)
    if why:
        print(f"btvm {cmd}: --cache-dir {args.cache_dir}: {why}; running without the translation cache",
              file=sys.stderr)


def _add_cache_options(parser, single_dash=False):
    # `btvm boot` spells its options QEMU's way (-kernel, -no-stdin): there both spellings work.
    short = ("-cache-dir",) if single_dash else ()
    parser.add_argument("--cache-dir", *short, dest="cache_dir", metavar="DIR",
                        help="keep the persistent translation cache in DIR, created if missing (default "
                             "~/.cache/btvm/code; overrides BTVM_CACHE_DIR and BTVM_NO_CACHE); if DIR cannot "
                             "be written, one line on stderr and the guest runs without the cache")
    short = ("-no-cache",) if single_dash else ()
    parser.add_argument("--no-cache", *short, dest="no_cache", action="store_true",
                        help="do not read or write the persistent translation cache (as BTVM_NO_CACHE=1; "
                             "wins over --cache-dir)")


def _cmd_run(args):
    import os
    import signal
    from .linux_user.elf import ElfError
    from .linux_user.process import run_program
    if not args.program:
        print("btvm run: missing PROGRAM", file=sys.stderr)
        return 2
    _configure_cache(args, "run")
    prog, *rest = args.program
    if rest[:1] == ["--"] and prog != "--":
        pass
    if prog == "--":
        if not rest:
            print("btvm run: missing PROGRAM", file=sys.stderr)
            return 2
        prog, *rest = rest
    env = {} if args.clean_env else dict(os.environ)
    for item in args.env:
        if "=" not in item:
            print(f"btvm run: -E expects VAR=VALUE, got {item!r}", file=sys.stderr)
            return 2
        k, v = item.split("=", 1)
        env[k] = v
    path = prog
    if "/" not in prog and not os.path.exists(prog):
        for d in os.environ.get("PATH", "").split(os.pathsep):
            cand = os.path.join(d or ".", prog)
            if os.path.isfile(cand):
                path = cand
                break
    try:
        status = run_program(path, [prog] + rest, [f"{k}={v}" for k, v in env.items()], strace=args.strace)
    except ElfError as exc:
        print(f"btvm: {exc}", file=sys.stderr)
        return exc.status
    sys.stdout.flush()
    sys.stderr.flush()
    if status < 0:
        sig = -status
        from bt import cache
        cache.save_all()                 # what exit would store: the signal skips atexit
        try:
            signal.signal(sig, signal.SIG_DFL)
            signal.pthread_sigmask(signal.SIG_UNBLOCK, {sig})
            os.kill(os.getpid(), sig)
        except (OSError, ValueError):
            pass
        return 128 + sig
    return status


def _cmd_boot(args):
    from runtime.boot.linux import is_bzimage
    from runtime.boot.multiboot import find_header
    _configure_cache(args, "boot")
    if args.kernel is None:
        from runtime.boot.demo import image
        kernel = image()
    else:
        try:
            with open(args.kernel, "rb") as f:
                kernel = f.read()
        except OSError as exc:
            print(f"btvm boot: {args.kernel}: {exc.strerror.lower() if exc.strerror else exc}", file=sys.stderr)
            return 1
        if find_header(kernel) is None and not is_bzimage(kernel):
            print(f"btvm boot: {args.kernel}: neither a Linux bzImage nor a Multiboot kernel", file=sys.stderr)
            return 1
    initrd = None
    if args.initrd is not None:
        try:
            with open(args.initrd, "rb") as f:
                initrd = f.read()
        except OSError as exc:
            print(f"btvm boot: {args.initrd}: {exc.strerror.lower() if exc.strerror else exc}", file=sys.stderr)
            return 1
    if not 2 <= args.m <= 3072:
        print(f"btvm boot: -m {args.m}: guest RAM must be between 2 and 3072 MiB", file=sys.stderr)
        return 1
    rtc_base = None
    if args.rtc is not None:
        import calendar
        import datetime
        spec = args.rtc[5:] if args.rtc.startswith("base=") else args.rtc
        try:
            when = datetime.datetime.strptime(spec, "%Y-%m-%dT%H:%M:%S")
        except ValueError:
            print(f"btvm boot: -rtc {args.rtc}: expected base=YYYY-MM-DDTHH:MM:SS (UTC)", file=sys.stderr)
            return 1
        rtc_base = calendar.timegm(when.timetuple())
    if args.timeout is not None and args.timeout <= 0:
        print(f"btvm boot: -timeout {args.timeout:g}: expected a positive number of seconds", file=sys.stderr)
        return 1
    import time
    started = time.monotonic()   # -timeout bounds the whole command, over the boots of -reboot too
    while True:
        result = _boot_once(args, kernel, initrd, rtc_base, started)
        if result is None:
            return 1
        if not result.reset or not args.reboot:
            break
        # -reboot: a triple fault or a reset request resets the PC and boots the same kernel again.
        print(f"{result.message}; resetting (-reboot)", file=sys.stderr)
    if result.message:
        print(result.message + ("; the VM stops" if result.reset and result.status else ""), file=sys.stderr)
    return result.status


def _boot_once(args, kernel, initrd, rtc_base, started):
    """One power-on of a fresh machine until it exits; None if the kernel cannot be loaded."""
    from runtime.boot.linux import is_bzimage
    from runtime.boot.multiboot import BootError
    from runtime.system.machine import Machine
    m = Machine(ram_mb=args.m, icount=args.clock == "icount", rtc_base=rtc_base)
    try:
        if is_bzimage(kernel):
            m.load_linux(kernel, args.append or "", initrd)
        elif initrd is not None:
            raise BootError("-initrd is only for Linux bzImage kernels")
        else:
            m.load_multiboot(kernel, args.append or "")
        from runtime.system.console import Console
        with Console(m.pc.uart, None if args.no_stdin else sys.stdin) as console:
            return m.run(console=console, status_every=args.status, timeout=args.timeout, started=started)
    except BootError as exc:
        print(f"btvm boot: {exc}", file=sys.stderr)
        return None
    finally:
        m.close()


def _cmd_prebuild(args):
    import time
    from bt import diskcache, library, stencil
    why = diskcache.configure(args.cache_dir)
    root = diskcache.default_dir()
    if not why and root is not None and args.cache_dir is None:
        why = diskcache.configure(root)         # BTVM_CACHE_DIR or ~/.cache: usable too?
    if why:
        print(f"btvm prebuild: {args.cache_dir or root}: {why}", file=sys.stderr)
        return 1
    if root is None:
        print("btvm prebuild: the translation cache is disabled (BTVM_NO_CACHE): there is nowhere "
              "to keep the library", file=sys.stderr)
        return 1
    try:
        forms = library.read_forms()
    except (OSError, ValueError) as exc:
        print(f"btvm prebuild: {exc}", file=sys.stderr)
        return 1
    builder = stencil.shared_builder()
    if builder is None:
        print("btvm prebuild: no executable memory below 2 GiB: tier 1 runs without stencils here",
              file=sys.stderr)
        return 1
    t0 = time.perf_counter()
    library.runtime_functions()
    tty = sys.stderr.isatty()

    def progress(done, total):
        if tty:
            print(f"\rbtvm prebuild: {done}/{total} shapes", end="", file=sys.stderr, flush=True)
    shapes, compiled, _ = library.prebuild(builder.lib, forms, progress=progress)
    if tty:
        print(file=sys.stderr)
    if builder.lib.store.errors:
        print(f"btvm prebuild: {root}: the stencils could not be written", file=sys.stderr)
        return 1
    print(f"btvm prebuild: {shapes} stencil shapes ({compiled} compiled now, the others stored before or sharing one) "
          f"and the runtime's functions in {root} ({time.perf_counter() - t0:.1f} s)")
    return 0


def _cmd_profile(args):
    from .profile import run
    return run(args, build_parser)


def build_parser():
    p = argparse.ArgumentParser(prog="btvm", description="Binary-translation virtual machine for x86 guests.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    ex = sub.add_parser("exec", help="run one snippet case (SingleStepTests JSON layout) and print the final state")
    ex.add_argument("case", metavar="CASE.json")
    ex.set_defaults(fn=_cmd_exec)
    co = sub.add_parser("callouts", help="print the table of sensitive/privileged instructions and their callouts")
    co.add_argument("--json", action="store_true", help="machine-readable output")
    co.set_defaults(fn=_cmd_callouts)
    bo = sub.add_parser("boot", help="boot a guest kernel on the virtual PC; serial console on stdio; "
                                     "with no -kernel, the built-in demo guest")
    bo.add_argument("-kernel", metavar="FILE", help="Linux bzImage (32-bit boot protocol) or Multiboot kernel")
    bo.add_argument("-initrd", metavar="FILE", help="initial ramdisk for a Linux kernel")
    bo.add_argument("-append", metavar="CMDLINE", help="kernel command line")
    bo.add_argument("-m", metavar="MB", type=int, default=128, help="guest RAM in MiB (default 128)")
    bo.add_argument("-clock", choices=("icount", "host"), default="icount",
                    help="virtual time: 'icount' counts guest instructions, 1 ns each (deterministic, and "
                         "consistent with the TSC, which always counts instructions; default), or 'host' "
                         "follows the host's monotonic clock")
    bo.add_argument("-rtc", metavar="base=DATETIME",
                    help="start the CMOS clock at a fixed UTC time (YYYY-MM-DDTHH:MM:SS) instead of the host's: "
                         "with -clock icount the whole run is then deterministic")
    bo.add_argument("-icount", dest="clock", action="store_const", const="icount", help="same as -clock icount")
    bo.add_argument("-status", metavar="SECONDS", type=float, default=None,
                    help="print a status line (guest MIPS, blocks compiled, the code cache's memory) on stderr every SECONDS")
    bo.add_argument("-timeout", metavar="SECONDS", type=float, default=None,
                    help="stop the guest after SECONDS of wall-clock time (also while it spins or is halted): "
                         "a one-line report with the guest's eip on stderr and exit status 124, as timeout(1)")
    bo.add_argument("-no-stdin", dest="no_stdin", action="store_true",
                    help="do not connect stdin to the serial console")
    bo.add_argument("-reboot", dest="reboot", action="store_true",
                    help="reset the machine and boot the kernel again on a triple fault or a guest reset "
                         "request (QEMU's default); by default btvm exits instead: status 1 with a one-line "
                         "report for a triple fault, 0 for a reset request (a guest that triple-faults at "
                         "every boot would otherwise never end)")
    bo.add_argument("-no-reboot", dest="reboot", action="store_false",
                    help="exit on a triple fault or a reset request (the default; accepted as in QEMU)")
    _add_cache_options(bo, single_dash=True)
    bo.set_defaults(fn=_cmd_boot)
    rn = sub.add_parser("run", help="run a static i386 Linux program (user mode)",
                        usage="btvm run [--strace] [--clean-env] [-E VAR=VALUE]... [--cache-dir DIR | --no-cache] "
                              "[--] PROGRAM [ARGS...]",
                        description="Options come before PROGRAM: everything after it is the program's.")
    rn.add_argument("--strace", action="store_true", help="print each system call to stderr")
    rn.add_argument("-E", dest="env", action="append", default=[], metavar="VAR=VALUE",
                    help="set an environment variable for the program (repeatable)")
    rn.add_argument("--clean-env", action="store_true", help="start from an empty environment")
    _add_cache_options(rn)
    rn.add_argument("program", nargs=argparse.REMAINDER, metavar="PROGRAM ARGS")
    rn.set_defaults(fn=_cmd_run)
    pb = sub.add_parser("prebuild", help="compile the stencil library (tier 1's code for common instruction "
                                         "forms in the usual modes) into the translation cache's folder, "
                                         "ahead of any guest",
                        description="Compiles bt/library.txt's instruction forms into stencils, and the "
                                    "runtime's own functions, once per translator version: the first run "
                                    "of a guest then compiles only the shapes the library lacks.")
    pb.add_argument("--cache-dir", dest="cache_dir", metavar="DIR",
                    help="the translation cache's folder (default ~/.cache/btvm/code; overrides BTVM_CACHE_DIR)")
    pb.set_defaults(fn=_cmd_prebuild)
    pr = sub.add_parser("profile", help="run a guest (run, boot or exec) and report the code cache's counters",
                        usage="btvm profile [--json FILE] [--html FILE] [--top N] (run|boot|exec) ARGS...",
                        description="ARGS are the options and operands of `btvm run`, `btvm boot` or `btvm exec`, "
                                    "the cache options included: btvm profile boot --no-cache -kernel FILE ..., "
                                    "btvm profile run --cache-dir DIR PROGRAM ARGS...")
    pr.add_argument("--json", metavar="FILE", help="also write the report as JSON")
    pr.add_argument("--html", metavar="FILE", help="also write a self-contained HTML page with plots")
    pr.add_argument("--top", metavar="N", type=int, default=10, help="hottest blocks to list (default 10)")
    pr.add_argument("target", nargs=argparse.REMAINDER, metavar="(run|boot|exec) ARGS")
    pr.set_defaults(fn=_cmd_profile)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    # The code cache keeps ~10^6 long-lived objects (blocks, their bytes, decoded callouts) and makes
    # few cycles: with the default thresholds the collector rescanned them often enough to cost ~2%
    # of a warm Linux boot (gc_collect_main in perf).
    gc.set_threshold(50_000, 20, 100)
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("btvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1
    finally:
        # The interpreter's final collection would walk them all again (0.6 s after a Linux
        # guest powered off, more than its last second of booting): frozen, they are left to the
        # process's exit.  The cache folder's writes at exit (atexit) still happen.  main() is the
        # process's entry point: nothing calls it in-process (everything alive stays uncollected).
        gc.freeze()


if __name__ == "__main__":
    sys.exit(main())

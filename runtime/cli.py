"""The `btvm` command."""
import argparse
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


def build_parser():
    p = argparse.ArgumentParser(prog="btvm", description="Binary-translation virtual machine for x86 guests.")
    sub = p.add_subparsers(dest="cmd", metavar="COMMAND")
    ex = sub.add_parser("exec", help="run one snippet case (SingleStepTests JSON layout) and print the final state")
    ex.add_argument("case", metavar="CASE.json")
    ex.set_defaults(fn=_cmd_exec)
    co = sub.add_parser("callouts", help="print the table of sensitive/privileged instructions and their callouts")
    co.add_argument("--json", action="store_true", help="machine-readable output")
    co.set_defaults(fn=_cmd_callouts)
    return p


def main(argv=None):
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "fn", None):
        parser.print_help()
        return 2
    try:
        return args.fn(args)
    except KeyboardInterrupt:
        print("btvm: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())

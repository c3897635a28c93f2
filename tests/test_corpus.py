"""Run every stored corpus case through btvm and compare with the oracle's
expectation (corpus/cases/<family>.json; see corpus/README.md).

One test per family; a failing family lists its first mismatching cases
(name, asm, differences).  These tests never call Unicorn.
"""

import glob
import json
import os

import pytest

from corpus.oracle import compare

CASES_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "corpus", "cases")
FAMILY_FILES = sorted(glob.glob(os.path.join(CASES_DIR, "*.json")))
MAX_REPORT = 20


def _family(path):
    return os.path.splitext(os.path.basename(path))[0]


def test_corpus_present():
    assert FAMILY_FILES, "no corpus files: run tools/gen_corpus.py"
    total = sum(len(json.load(open(p))) for p in FAMILY_FILES)
    assert total >= 2000


def _run(case):
    from runtime.snippet import run_case
    # hand btvm only the input part of the case
    inp = {k: case[k] for k in ("name", "mode", "initial", "max_instructions")}
    return run_case(json.loads(json.dumps(inp)))


@pytest.mark.parametrize("path", FAMILY_FILES, ids=_family)
def test_family(path):
    cases = json.load(open(path))
    failures = []
    for case in cases:
        try:
            result = _run(case)
            problems = compare(case, result)
        except Exception as e:  # a crash in btvm is a failure of that case
            problems = [f"btvm raised {type(e).__name__}: {e}"]
        if problems:
            failures.append((case, problems))
    if failures:
        lines = [f"{len(failures)}/{len(cases)} cases of family {_family(path)} fail:"]
        for case, problems in failures[:MAX_REPORT]:
            lines.append(f"- {case['name']!r}")
            lines.extend(f"    {p}" for p in problems[:6])
        if len(failures) > MAX_REPORT:
            lines.append(f"... and {len(failures) - MAX_REPORT} more")
        pytest.fail("\n".join(lines), pytrace=False)

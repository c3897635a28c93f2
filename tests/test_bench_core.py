"""Correctness of tools/bench_core.py workloads at a tiny size (no timing checks).

Every workload must produce the Python-computed EAX under Unicorn, and btvm
(runtime.snippet.run_case) must agree with Unicorn and stop cleanly after HLT.
"""
import importlib.util
import os

import pytest

pytest.importorskip("unicorn")
pytest.importorskip("keystone")

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                     "tools", "bench_core.py")
_spec = importlib.util.spec_from_file_location("bench_core", _PATH)
bench_core = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench_core)

SIZE = 1 / 256
NAMES = list(bench_core.WORKLOADS)


@pytest.fixture(scope="module")
def workloads():
    return {wl.name: wl for wl in bench_core.make_workloads(SIZE)}


@pytest.fixture(scope="module")
def unicorn_results(workloads):
    return {name: bench_core.unicorn_count(wl) for name, wl in workloads.items()}


@pytest.mark.parametrize("name", NAMES)
def test_unicorn_matches_python(name, workloads, unicorn_results):
    wl = workloads[name]
    insns, eax = unicorn_results[name]
    assert eax == wl.expected()
    # The block-hook calibration count equals a per-instruction hook count.
    assert insns == bench_core.unicorn_count_exact(wl)
    _, eax2, eip = bench_core.unicorn_run(wl)
    assert (eax2, eip) == (eax, wl.hlt_addr)


@pytest.mark.parametrize("name", NAMES)
def test_btvm_matches_unicorn(name, workloads, unicorn_results):
    run_case, why = bench_core.load_btvm()
    if run_case is None:
        pytest.skip("btvm runtime not available: " + why)
    wl = workloads[name]
    insns, uc_eax = unicorn_results[name]
    _, res = bench_core.btvm_run(run_case, wl, 4 * insns + 100000)
    assert bench_core.btvm_problem(wl, res) is None
    assert bench_core.btvm_reg(res, "eax") == uc_eax

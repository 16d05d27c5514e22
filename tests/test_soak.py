"""Chaos soak, short: readers keep getting exact bytes while nodes, the metadata service and pool files fail.

Runs ``benchmarks/soak.py`` for about a minute (its own cluster and reader
processes); ``SDCACHE_SOAK_MINUTES=10`` adds a long one (marked ``slow``).
"""

from __future__ import annotations

import importlib.util
import os
import sys

import pytest

from . import conftest

_SOAK = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "benchmarks", "soak.py")


def _soak_module():
    spec = importlib.util.spec_from_file_location("sdcache_bench_soak", _SOAK)
    assert spec is not None and spec.loader is not None
    module = sys.modules[spec.name] = importlib.util.module_from_spec(spec)  # dataclasses look it up there
    spec.loader.exec_module(module)
    return module


def _check(report: dict, min_reads: int) -> None:
    total = report["total"]
    detail = (f"errors {report['errors']}, first {report['first_errors']}, wrong {report['wrong_reads']}, "
              f"kept in {report.get('workdir')}")
    assert total["wrong_bytes"] == 0, detail
    assert total["failed_reads"] == 0, detail
    assert report["hung_readers"] == 0 and not any(report["reader_exits"]), detail
    assert total["reads"] >= min_reads, total
    chaos = report["chaos"]
    assert chaos["node_kills"] >= 1 and chaos["node_restarts"] == chaos["node_kills"], chaos
    assert chaos["meta_restarts"] >= 1, chaos
    assert chaos["corruptions"] >= 1, chaos
    # both read paths ran, and something was served around the faults
    for path in ("short-circuit", "HTTP"):
        assert sum(g["reads"] for name, g in report["groups"].items() if name.startswith(path)) > 0, path
    assert report["tiers"].get("local", 0) > 0 and report["tiers"].get("node", 0) > 0, report["tiers"]


def test_reads_stay_exact_and_succeed_through_node_kills_meta_restarts_and_corruption(tmp_path):
    report = _soak_module().run_soak(readers=4, models=3, model_size=24 << 20, minutes=0.75, seed=11,
                                     workdir=str(tmp_path), token_key=conftest.TOKEN_KEY)
    _check(report, min_reads=100)


_LONG_MINUTES = float(os.environ.get("SDCACHE_SOAK_MINUTES", "0") or 0)


@pytest.mark.slow
@pytest.mark.skipif(not _LONG_MINUTES, reason="long soak: set SDCACHE_SOAK_MINUTES (e.g. 10)")
@pytest.mark.timeout(int(_LONG_MINUTES * 60) + 600)
def test_long_soak(tmp_path):
    report = _soak_module().run_soak(readers=6, models=4, model_size=48 << 20, minutes=_LONG_MINUTES, seed=5,
                                     workdir=str(tmp_path), token_key=conftest.TOKEN_KEY)
    _check(report, min_reads=int(200 * _LONG_MINUTES))

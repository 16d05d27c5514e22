"""``sdcache simulate`` as someone sizing a fleet uses it: same answer for the same seed, sane trends, clear errors."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import subprocess
import sys
from pathlib import Path

import pytest

from sdcache.simulate import Fleet, Result, Workload, cli, read_trace, simulate, synthetic_trace, write_trace

GB = 10**9

# A small fleet and catalogue that still has a long tail: 4 runners, 400 bases, Zipf 1.2.
WORKLOAD = Workload(requests=3000, rate=0.3, bases=400, loras=600, zipf=1.2, seed=7)
FLEET = Fleet(runners=4, device_bytes=16 << 30, host_bytes=32 << 30, pool_bytes=200 * GB)
SMALL = ["--requests", "3000", "--rate", "0.3", "--bases", "400", "--loras", "600", "--zipf", "1.2", "--seed", "7",
         "--runners", "4", "--device-mem", "16GiB", "--host-mem", "32GiB", "-q"]


def _command() -> list[str]:
    """``python -m sdcache simulate`` once the CLI registers it; until then the module's own entry point."""
    from sdcache.cli import build_parser

    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    if "simulate" in sub.choices:
        return [sys.executable, "-m", "sdcache", "simulate"]
    return [sys.executable, "-m", "sdcache.simulate"]


def simulate_cli(*args: str) -> tuple[int, str, str]:
    """The command in this process (same options, same error handling): exit code, stdout, stderr."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli(list(args))
    return rc, out.getvalue(), err.getvalue()


POOLS = [50 * GB, 100 * GB, 200 * GB, 400 * GB]


@pytest.fixture(scope="module")
def trace() -> list:
    return synthetic_trace(WORKLOAD)


@pytest.fixture(scope="module")
def sweep(trace: list) -> list[Result]:
    """Earliest-finish over the same trace for each pool size in POOLS."""
    return [simulate(trace, Fleet(**{**FLEET.__dict__, "pool_bytes": p}), "finish") for p in POOLS]


def test_the_same_seed_gives_the_same_answer(trace: list, sweep: list[Result]) -> None:
    again = simulate(synthetic_trace(WORKLOAD), FLEET, "finish")
    assert again.to_dict() == sweep[2].to_dict() and again.latencies == sweep[2].latencies
    other = synthetic_trace(Workload(**{**WORKLOAD.__dict__, "seed": 8}))
    assert [x.demand.base.key for x in other[:50]] != [x.demand.base.key for x in trace[:50]]


def test_a_bigger_pool_reads_less_from_the_under_store(sweep: list[Result]) -> None:
    small, big = sweep[0], sweep[-1]
    assert big.store_bytes < 0.6 * small.store_bytes
    assert big.tier_hits["store"] < small.tier_hits["store"]
    assert big.p99_s <= small.p99_s
    assert [r.store_bytes for r in sweep] == sorted((r.store_bytes for r in sweep), reverse=True)


def test_earliest_finish_loads_fewer_base_models_than_round_robin(trace: list, sweep: list[Result]) -> None:
    finish = sweep[2]  # FLEET's pool
    rr = simulate(trace, FLEET, "round-robin")
    assert finish.base_loads < 0.85 * rr.base_loads
    assert finish.p99_s < rr.p99_s and finish.p50_s < rr.p50_s
    assert finish.requests == rr.requests == 2700  # all but the 10% warm-up, none rejected


def test_the_sweep_names_the_smallest_pool_meeting_the_target(sweep: list[Result]) -> None:
    target = sweep[2].p99_s + 0.001
    expected = next(r.pool_bytes for r in sweep if r.p99_s <= target)
    assert expected != POOLS[0]  # a real threshold, not the first size tried
    rc, out, err = simulate_cli(*SMALL, "--policy", "finish", "--sweep-pool", "400GB,50GB,100GB,200GB",
                                "--target-p99", f"{target:.3f}", "--json")
    assert rc == 0, err
    doc = json.loads(out)
    assert doc["smallest_pool"] == {"finish": expected}
    assert [r["pool_bytes"] for r in doc["runs"]] == POOLS
    assert [r["p99_s"] for r in doc["runs"]] == [r.p99_s for r in sweep]  # the CLI runs the same simulation


def test_the_table_says_when_no_size_meets_the_target() -> None:
    rc, out, err = simulate_cli(*SMALL, "--requests", "500", "--policy", "finish", "--sweep-pool", "50GB,400GB",
                                "--target-p99", "0.5")
    assert rc == 0, err
    header, *rows, verdict = out.strip().splitlines()
    assert header.split()[:4] == ["policy", "pool", "p50", "s"] and len(rows) == 2
    assert verdict == "finish: no pool size tried meets p99 <= 0.5 s"


def test_a_trace_file_gives_the_same_answer_as_the_synthetic_trace(trace: list, sweep: list[Result],
                                                                   tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    write_trace(str(path), trace)
    assert simulate(read_trace(str(path)), FLEET, "finish").to_dict() == sweep[2].to_dict()


def test_a_hand_written_trace_with_the_documented_fields(tmp_path: Path) -> None:
    path = tmp_path / "trace.jsonl"
    base = {"key": "/models/checkpoints/a.safetensors", "nbytes": "2GB"}
    lora = {"key": "/models/loras/x.safetensors", "nbytes": 100_000_000}
    rows = [
        {"t": 0, "base": base, "steps": 20, "width": 512, "height": 512},
        {"t": 100, "base": base, "loras": [lora], "steps": 20, "width": 512, "height": 512, "batch": 2},
        {"t": 200, "base": base, "loras": [lora]},
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    r = simulate(read_trace(str(path)), Fleet(runners=1, warmup=0), "finish")
    assert r.requests == 3 and r.base_loads == 1  # loaded once, then on the device
    assert r.tier_hits["store"] == pytest.approx(2 / 5)  # the base and the LoRA, once each, of 5 components
    # The first: 2 GB from the under-store at the 1.25 GB/s link, a 1 s build, 20 steps of 0.26 MP.
    assert max(r.latencies) == pytest.approx(1.6 + 1.0 + 0.1 * 20 * 0.262144, rel=0.01)
    rc, out, _ = simulate_cli("--trace", str(path), "--runners", "1", "--warmup", "0", "--policy", "finish",
                              "-q", "--json")
    assert rc == 0 and json.loads(out)["runs"][0]["base_loads"] == 1


@pytest.mark.parametrize(("args", "says"), [
    (["--pool", "lots"], "--pool: not a byte size: 'lots'"),
    (["--runners", "0"], "--runners must be >= 1"),
    (["--policy", "fastest"], "unknown routing policy 'fastest'; known: finish, round-robin, multiplex, all"),
    (["--sweep-pool", ","], "--sweep-pool wants sizes"),
    (["--warmup", "1.5"], "--warmup must be a fraction"),
    (["--trace", "/nonexistent/trace.jsonl"], "cannot read trace /nonexistent/trace.jsonl"),
])
def test_bad_input_is_one_clear_line_and_exit_code_1(args: list[str], says: str) -> None:
    rc, out, err = simulate_cli(*args, "-q")
    assert rc == 1 and out == ""
    assert err.count("\n") == 1 and err.startswith("sdcache: error: ") and says in err


def test_a_bad_trace_line_names_the_file_and_line(tmp_path: Path) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"t": 0, "base": {"key": "/a", "nbytes": 1}}) + '\n{"t": 1}\n')
    rc, _, err = simulate_cli("--trace", str(path), "-q")
    assert rc == 1
    assert err.strip() == f"sdcache: error: {path}:2: a request needs at least 't' and 'base'"


def test_the_real_command_fails_with_one_line(tmp_path: Path) -> None:
    proc = subprocess.run([*_command(), "--pool", "lots"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 1
    assert proc.stderr.strip() == "sdcache: error: --pool: not a byte size: 'lots' (try 8GiB, 512MiB or 4096)"


def test_the_plot_is_a_real_png(tmp_path: Path) -> None:
    cdf, sweep = tmp_path / "cdf.png", tmp_path / "sweep.png"
    rc, out, err = simulate_cli(*SMALL, "--requests", "600", "--plot", str(cdf))
    assert rc == 0, err
    assert out.strip().endswith(f"plot: {cdf}")
    rc, _, err = simulate_cli(*SMALL, "--requests", "600", "--policy", "finish", "--sweep-pool", "50GB,400GB",
                              "--target-p99", "20", "--plot", str(sweep))
    assert rc == 0, err
    for png in (cdf, sweep):
        data = png.read_bytes()
        assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 10_000

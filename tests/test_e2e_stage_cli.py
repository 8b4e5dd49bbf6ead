"""Argo's way of running a plan, in-process: ``lever stage NAME --list-units`` for the fan-out,
then ``lever stage NAME --unit-id ID`` per unit, with the exit handler's partial report midway."""

from __future__ import annotations

import json

import pytest

from lever.cli import main

pytestmark = pytest.mark.slow

PLAN = ["--plan", "baseline", "--profile", "tiny"]
SETS = ["--set", "beam.num_queries=6", "--set", "rl_data.num_queries=6", "--set", "beam.shards=1",
        "--set", "rl_data.shards=1", "--set", "infer.num_samples=6", "--set", "infer.shots=[1,2]",
        "--set", "infer.baselines=[random]", "--set", "infer.shards=1", "--set", "rce.epochs=1", "--set", "v2.epochs=1",
        "--set", "report.bootstrap_samples=100"]


def _run(argv, capsys):
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out = capsys.readouterr()
    return code, out.out, out.err


def test_argo_style_stage_by_stage(tmp_path, capsys):
    store = ["--store", str(tmp_path / "store")]
    from lever.pipeline.graph import order

    for name in order():
        code, out, err = _run(["stage", name, *PLAN, *SETS, "--list-units"], capsys)
        assert code == 0, err
        ids = json.loads(out)
        assert isinstance(ids, list) and all(isinstance(i, str) for i in ids)
        if name == "infer":
            assert len(ids) == 2 * 2  # (selector, random) x shots 1,2 x 1 shard
            # exit handler after a failure: the report is partial, outside the cache
            code, out, err = _run(["report", "baseline", "--profile", "tiny", *SETS, *store, "--run-id", "r1"], capsys)
            assert code == 0, err
            assert "/partial/baseline/r1/report.md" in out and "partial report" in err
        for uid in ids:
            code, out, err = _run(["stage", name, *PLAN, *SETS, *store, "--unit-id", uid], capsys)
            assert code == 0, err
            assert "built" in err
    code, out, err = _run(["report", "baseline", "--profile", "tiny", *SETS, *store], capsys)
    assert code == 0 and "/summarize/" in out
    # a second pass over one stage finds it committed
    code, out, err = _run(["stage", "infer", *PLAN, *SETS, *store, "--unit", "shot=2"], capsys)
    assert code == 0 and err.count("cached") == 2
    code, out, err = _run(["run", "baseline", "--profile", "tiny", *SETS, *store, "--dry-run"], capsys)
    assert code == 0 and "missing" not in out and out.count("cached") >= 11


@pytest.mark.parametrize("argv, needle", [
    (["stage", "infer", *PLAN, "--unit-id", "nope", "--store", "{tmp}"], "has no unit 'nope'"),
    (["stage", "infer", *PLAN, "--unit", "colour=red", "--store", "{tmp}"], "no parameter 'colour'"),
    (["stage", "nosuch", *PLAN, "--list-units"], "unknown stage"),
    (["stage", "prepare-data", *PLAN, "--store", "gs://bucket/x"], "only local directories and s3://"),
    (["stage", "export-embeddings", *PLAN, "--store", "{tmp}"], "not in the store"),
    (["run", "baseline", "--profile", "tiny", "--set", "infer.shots=[0]", "--store", "{tmp}"], "infer"),
])
def test_user_errors_exit_2(argv, needle, tmp_path, capsys):
    argv = [a.replace("{tmp}", str(tmp_path / "s")) for a in argv]
    code, out, err = _run(argv, capsys)
    assert code == 2, (code, out, err)
    assert needle in err

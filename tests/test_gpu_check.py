"""The GPU check's parts that need no GPU: paired rounds, the timing split, the reports, the summary,
the no-GPU exit, and a smoke run of its throughput and IMDB sections on the CPU."""

import json
import subprocess
import sys

import pytest

from conftest import TINY_RUNS, tiny_flags
from test_train import REPO

sys.path.insert(0, str(REPO / "benchmarks"))
import gpu_check  # noqa: E402

SCRIPT = str(REPO / "benchmarks" / "gpu_check.py")


def test_paired_rounds_rotate_the_order_and_take_per_round_ratios():
    seconds = {"a": iter([1.0, 2.0, 4.0]), "b": iter([2.0, 2.0, 2.0])}
    calls = []

    def runner(name):
        def run(n):
            calls.append((name, n))
            return next(seconds[name])
        return run

    result = gpu_check.paired_rounds({"a": runner("a"), "b": runner("b")}, {"a": 2, "b": 4}, batch=8, rounds=3,
                                     baseline="b")
    assert calls == [("a", 2), ("b", 4), ("b", 4), ("a", 2), ("a", 2), ("b", 4)]
    a, b = result["contenders"]["a"], result["contenders"]["b"]
    assert a["chunks"] == [16.0, 8.0, 4.0] and b["chunks"] == [16.0, 16.0, 16.0]  # steps * batch / seconds
    assert a["ratio"] == {"median": 0.5, "min": 0.25, "max": 1.0}
    assert b["ratio"]["median"] == 1.0 and a["examples_per_s"]["median"] == 8.0
    assert gpu_check.steps_for(0.01, 0.5) == 50 and gpu_check.steps_for(2.0, 0.5) == 2


def test_timing_split_by_hand():
    lines = [(1.0, "loading"),
             (2.0, "W1201 08:00:02.0 1 pxla.py:1514] Finished XLA compilation of jit(init) in 0.500000000 sec"),
             (5.0, "lstm: 1,000 trainable / 1,000 total parameters; 1 devices, mesh {'data': 1}"),
             (7.0, "Finished tracing train_step for jit in 0.250000000 sec"),
             (8.0, "Finished XLA compilation of jit(train_step) in 1.75 sec"),
             (20.0, "Finished jaxpr to MLIR module conversion jit(predict) in 1e0 sec")]
    split = gpu_check.timing_split(lines, epoch_seconds=[10.0, 5.0], total=30.0)
    # data 5 - 0.5; compile 0.5 + 0.25 + 1.75 + 1; train 15 - 2 (train_step's compiles); eval 30 - 5 - 15 - 1
    assert split == {"data": 4.5, "compile": 3.5, "train": 13.0, "eval": 9.0, "total": 30.0}
    with pytest.raises(ValueError, match="did not start training"):
        gpu_check.timing_split(lines[:2], [], 3.0)


def test_junit_counts_and_wheel_names():
    xml = """<testsuites><testsuite name="pytest">
      <testcase classname="tests.test_a" name="test_ok"/>
      <testcase classname="tests.test_a" name="test_bad"><failure message="x"/></testcase>
      <testcase classname="tests.test_b" name="test_broken"><error message="y"/></testcase>
      <testcase classname="tests.test_b" name="test_gpu"><skipped message="no gpu"/></testcase>
    </testsuite></testsuites>"""
    assert gpu_check.junit_counts(xml) == {"passed": 1, "failed": 2, "skipped": 1,
                                           "failing": ["tests.test_a::test_bad", "tests.test_b::test_broken"]}
    assert gpu_check.wheel_name("ml_collections-1.1.0-py3-none-any.whl") == "ml-collections"
    assert gpu_check.wheel_name("tensorboardX-2.6.5-py3-none-any.whl") == "tensorboardx"


def test_summary_rows_mark_targets_and_the_table_shows_them():
    group = lambda ratio: {"contenders": {
        "cudnn": {"examples_per_s": {"median": 900.0}, "ratio": {"median": ratio}},
        "torch": {"examples_per_s": {"median": 1000.0}, "ratio": {"median": 1.0}}}}
    results = {"throughput": {"bi2 b256 float32": group(0.9), "bi2 b256 bfloat16": group(1.2)},
               "imdb": {"seconds": {"data": 10.0, "compile": 5.0, "train": 60.0, "eval": 8.0, "total": 83.0},
                        "accuracy": 0.8791, "compile_log_lines": 0},
               "verbalizer": {"jax_reviews_per_s": 1500.0, "torch_reviews_per_s": 1000.0},
               "tests": {"passed": 9, "failed": 0, "skipped": 1}, "errors": {"tests": "RuntimeError: x\nmore"}}
    rows = {r["key"]: r for r in gpu_check.summary_rows(results)}
    assert rows["bi2 b256 float32 cudnn/torch"]["met"] is False and rows["bi2 b256 bfloat16 cudnn/torch"]["met"]
    assert "bi2 b256 float32 torch/torch" not in rows and rows["bi2 b256 float32 torch ex/s"]["met"] is None
    assert rows["imdb launch to report s"]["met"] and rows["imdb test accuracy"]["met"] is False
    assert rows["imdb compile s"]["value"].startswith("no compile lines")  # not a silent 5.0 s
    assert rows["minilm reviews/s ours/torch"]["value"] == 1.5 and rows["tests failed"]["met"]
    assert rows["tests error"]["value"] == "RuntimeError: x"
    table = gpu_check.format_table(list(rows.values())).splitlines()
    line = next(l for l in table if l.startswith("bi2 b256 float32 cudnn/torch"))
    assert line.split()[-5:] == ["0.9000", ">=", "1.0", "NOT", "MET"]
    assert "83.0" in next(l for l in table if l.startswith("imdb launch to report s"))


def test_without_a_gpu_it_stops_at_once_with_one_line(tmp_path):
    proc = subprocess.run([sys.executable, SCRIPT, f"--out={tmp_path / 'x.json'}"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and proc.stdout == ""
    assert proc.stderr.startswith("gpu_check: no CUDA GPU visible to JAX") and proc.stderr.count("\n") == 1
    assert not (tmp_path / "x.json").exists()


def test_smoke_run_on_cpu_writes_the_table_and_json(tmp_path):
    pytest.importorskip("torch")
    run = dict(TINY_RUNS["lstm"], flags={**TINY_RUNS["lstm"]["flags"], "train.epochs": 1, "model.bidirectional": False})
    (tmp_path / "data").mkdir()
    flags = tiny_flags(tmp_path / "data", run)[1:]  # the check names the config itself
    out = tmp_path / "check.json"
    proc = subprocess.run([sys.executable, SCRIPT, "--platform=cpu", "--smoke",
                           "--sections=throughput,imdb", f"--out={out}", f"--workdir={tmp_path / 'w'}",
                           f"--imdb_flags={' '.join(flags)}"], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    result = json.loads(out.read_text())
    group = result["throughput"]["uni b8 float32"]
    assert set(group["contenders"]) == {"scan", "torch"}  # no cuDNN without a GPU
    assert group["orders"] == [["scan", "torch"], ["torch", "scan"]]
    assert all(len(c["chunks"]) == 2 and c["examples_per_s"]["min"] > 0 for c in group["contenders"].values())
    assert group["contenders"]["torch"]["ratio"]["median"] == 1.0
    seconds = result["imdb"]["seconds"]
    assert result["imdb"]["compile_log_lines"] > 0 and seconds["compile"] > 0  # JAX's compile log, parsed
    assert min(seconds.values()) >= 0
    assert sum(v for k, v in seconds.items() if k != "total") == pytest.approx(seconds["total"])
    assert len(result["imdb"]["epoch_seconds"]) == 1 and 0 <= result["imdb"]["accuracy"] <= 1
    assert set(result["section_seconds"]) == {"throughput", "imdb"}
    assert "imdb launch to report s" in proc.stdout and "uni b8 float32 scan/torch" in proc.stdout

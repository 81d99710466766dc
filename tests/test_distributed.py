"""torchrun with two CPU processes (gloo) gives what one process gives with the doubled batch."""

import json
import os
import shutil
import subprocess
import sys

import pytest
import torch

from convgru_cli import checkpoint
from convgru_cli.synth import font_glyphs, moving_digits
from tests.conftest import write_h5

COMMON = ["--input-frames", "3", "--output-frames", "3", "--device", "cpu", "--precision", "fp32", "--epochs", "1"]
ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def _torchrun(arguments, cwd):
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2"]
    done = subprocess.run(
        [*command, "-m", "convgru_cli", *arguments], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


def _single(arguments, cwd):
    done = subprocess.run(
        [sys.executable, "-m", "convgru_cli", *arguments], capture_output=True, text=True, cwd=cwd, env=ENV, timeout=300
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("ddp")
    data = write_h5(workdir / "data.h5", moving_digits(20, 6, font_glyphs(), size=32, digits=1, seed=7))
    two = _torchrun(["train", data, *COMMON, "--batch-size", "2", "--out", "two", "--json"], workdir)
    _single(["train", data, *COMMON, "--batch-size", "4", "--out", "one"], workdir)
    return workdir, data, two


def test_two_processes_equal_one_with_the_doubled_batch(runs):
    workdir, _, two = runs
    assert json.loads(two.stdout)["epochs"] == 1  # one JSON document: rank 0 alone prints
    assert sorted(os.listdir(workdir / "two")) == ["best.pt", "config.json", "config.toml", "last.pt", "metrics.jsonl"]
    assert len(open(workdir / "two" / "metrics.jsonl").readlines()) == 1
    a = checkpoint.load(str(workdir / "two" / "last.pt"))
    b = checkpoint.load(str(workdir / "one" / "last.pt"))
    assert a["progress"]["step"] == b["progress"]["step"] > 0
    for name, tensor in a["model"].items():
        torch.testing.assert_close(tensor, b["model"][name], atol=2e-5, rtol=1e-4)
    assert a["progress"]["best_val"] == pytest.approx(b["progress"]["best_val"], rel=1e-4)


def test_distributed_evaluate_matches_one_process(runs):
    workdir, data, _ = runs
    arguments = [
        "evaluate",
        data,
        "--checkpoint",
        "one/best.pt",
        "--json",
        "--thresholds",
        "100",
        "--device",
        "cpu",
        "--precision",
        "fp32",
    ]
    two = json.loads(_torchrun(arguments, workdir).stdout)
    one = json.loads(_single(arguments, workdir).stdout)
    assert two["windows"] == one["windows"]
    for method, metrics in one["scores"].items():
        for metric, values in metrics.items():
            undefined = [v is None for v in values]  # JSON null: a score with a zero denominator
            assert [v is None for v in two["scores"][method][metric]] == undefined, (method, metric)
            defined = [v for v in values if v is not None]
            theirs = [v for v in two["scores"][method][metric] if v is not None]
            assert theirs == pytest.approx(defined, rel=1e-6), (method, metric)


def test_one_input_frame_trains_under_torchrun(runs):
    """The encoder's hidden convolutions get no gradient from a single (zero-state) step."""
    workdir, data, _ = runs
    one_frame = ["--input-frames", "1", *COMMON[2:], "--batch-size", "2", "--out", "one-frame", "--json"]
    assert json.loads(_torchrun(["train", data, *one_frame], workdir).stdout)["steps"] > 1


def test_a_run_resumes_only_with_as_many_processes(runs):
    workdir, data, _ = runs
    done = subprocess.run(
        [sys.executable, "-m", "convgru_cli", "train", data, "--resume", "two", "--epochs", "2"],
        capture_output=True,
        text=True,
        cwd=workdir,
        env=ENV,
        timeout=300,
    )
    assert done.returncode == 2
    assert "--resume two: the run was trained by 2 process(es) and this is 1" in done.stderr
    assert "Traceback" not in done.stderr


def test_a_checkpoint_that_records_no_process_count_resumes_under_torchrun(runs):
    workdir, data, _ = runs
    shutil.copytree(workdir / "two", workdir / "older")
    last = str(workdir / "older" / "last.pt")
    saved = checkpoint.load(last)
    for newer in ("processes", "epoch_loss", "epoch_sequences"):  # written before these were recorded
        del saved["progress"][newer]
    checkpoint.save(last, saved)
    resumed = _torchrun(["train", data, "--resume", "older", "--epochs", "2", "--json"], workdir)
    assert json.loads(resumed.stdout)["epochs"] == 2

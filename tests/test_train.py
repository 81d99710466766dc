import json
import os
import re
import shutil
import signal
import sys
import time

import numpy as np
import pytest
import torch

from convgru_cli import checkpoint, options, train
from convgru_cli.errors import UserError
from convgru_cli.model import EncoderForecaster, make_config
from convgru_cli.sources import open_frames
from convgru_cli.windowing import DataSpec, WindowDataset, split_windows

SPEC = DataSpec(dataset=None, layout=None, input_frames=3, output_frames=3, stride=2, val_fraction=0.25)


def _config(**changes):
    values = dict(epochs=2, batch_size=4, lr=3e-3, warmup_steps=2, seed=0, device="cpu", precision="fp32")
    return train.TrainConfig(**{**values, **changes})


def _run(digits_file, run_dir, forecaster="anchored", **changes):
    model = make_config("fast", 1, forecaster=forecaster)
    return train.train(digits_file, SPEC, model, _config(**changes), str(run_dir), show_progress=False)


def test_training_lowers_the_loss_and_writes_the_run(digits_file, tmp_path):
    summary = _run(digits_file, tmp_path / "run", epochs=4)
    history = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert len(history) == 4
    assert history[-1]["train_loss"] < 0.8 * history[0]["train_loss"]
    assert history[-1]["val_loss"] < history[0]["val_loss"]
    for name in ("last.pt", "best.pt", "config.json"):
        assert (tmp_path / "run" / name).is_file()
    assert summary["best_val_loss"] == min(h["val_loss"] for h in history)
    saved = checkpoint.load(summary["best_checkpoint"])
    assert saved["data_spec"]["layout"] == "NTHW" and saved["normalisation"]["dtype"] == "uint8"


def test_a_timed_run_validates_within_its_share_and_always_at_the_end(digits_file, tmp_path, monkeypatch):
    """With no share of the time for validation, a --max-time run validates its first epoch (nothing spent yet)
    and its last, and best.pt is one of those; with --patience every epoch is validated."""
    monkeypatch.setattr(train, "VALIDATION_SHARE", 0.0)
    summary = _run(digits_file, tmp_path / "timed", epochs=4, max_time=3600)
    records = [json.loads(line) for line in open(tmp_path / "timed" / "metrics.jsonl")]
    validated = [r["val_loss"] is not None for r in records]
    assert validated == [True, False, False, True]
    assert summary["best_epoch"] in (1, 4)
    assert summary["best_val_loss"] == min(r["val_loss"] for r in records if r["val_loss"] is not None)
    _run(digits_file, tmp_path / "patient", epochs=3, max_time=3600, patience=5)
    records = [json.loads(line) for line in open(tmp_path / "patient" / "metrics.jsonl")]
    assert all(r["val_loss"] is not None for r in records)


@pytest.mark.parametrize("crop", [None, (16, 16)])
def test_interrupted_run_resumes_to_the_same_weights(digits_file, tmp_path, monkeypatch, crop):
    """Random crops included: a resumed epoch draws the crops the uninterrupted one drew."""
    straight = _run(digits_file, tmp_path / "straight", crop=crop)

    calls = {"n": 0}
    real_loss = train.weighted_loss

    def interrupt_mid_epoch(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 5:  # epoch 1 has 9 steps: stop in its middle
            raise KeyboardInterrupt
        return real_loss(*args, **kwargs)

    monkeypatch.setattr(train, "weighted_loss", interrupt_mid_epoch)
    with pytest.raises(train.Interrupted):
        _run(digits_file, tmp_path / "resumed", crop=crop)
    monkeypatch.setattr(train, "weighted_loss", real_loss)
    progress = checkpoint.load(str(tmp_path / "resumed" / "last.pt"))["progress"]
    assert progress["epoch"] == 0 and progress["batch"] == 4
    resumed = train.resume(digits_file, str(tmp_path / "resumed"), show_progress=False)

    assert resumed["steps"] == straight["steps"]
    records = [[json.loads(line) for line in open(tmp_path / run / "metrics.jsonl")] for run in ("straight", "resumed")]
    for key in ("epoch", "step", "train_loss", "val_loss"):  # the interrupted epoch's loss counts all its batches
        assert [r[key] for r in records[1]] == pytest.approx([r[key] for r in records[0]], rel=1e-5), key
    a = checkpoint.load(straight["last_checkpoint"])["model"]
    b = checkpoint.load(resumed["last_checkpoint"])["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


@pytest.mark.skipif(sys.platform == "win32", reason="os.kill with SIGINT ends the process on Windows")
def test_ctrl_c_just_after_an_optimizer_step_resumes_to_the_same_weights(digits_file, tmp_path, monkeypatch):
    """The signal lands between the weight update and the step count: the checkpoint must hold both or neither."""
    straight = _run(digits_file, tmp_path / "straight")
    real_step, calls = torch.optim.AdamW.step, {"n": 0}

    def step_then_signal(self, *args, **kwargs):
        result = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 5:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.1)  # the handler runs here, inside the update
        return result

    monkeypatch.setattr(torch.optim.AdamW, "step", step_then_signal)
    with pytest.raises(train.Interrupted):
        _run(digits_file, tmp_path / "resumed")
    monkeypatch.setattr(torch.optim.AdamW, "step", real_step)
    assert checkpoint.load(str(tmp_path / "resumed" / "last.pt"))["progress"]["step"] == 5
    resumed = train.resume(digits_file, str(tmp_path / "resumed"), show_progress=False)
    a = checkpoint.load(straight["last_checkpoint"])["model"]
    b = checkpoint.load(resumed["last_checkpoint"])["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)


def test_resume_can_extend_epochs(digits_file, tmp_path):
    _run(digits_file, tmp_path / "run", epochs=1)
    last = str(tmp_path / "run" / "last.pt")
    saved = checkpoint.load(last)
    for newer in ("processes", "epoch_loss", "epoch_sequences"):  # a checkpoint from before they were recorded
        del saved["progress"][newer]
    checkpoint.save(last, saved)
    summary = train.resume(digits_file, str(tmp_path / "run"), show_progress=False, epochs=2)
    assert summary["epochs"] == 2
    with pytest.raises(UserError, match="cannot change"):
        train.resume(digits_file, str(tmp_path / "run"), lr=1.0)


def test_existing_run_is_not_overwritten_without_force(digits_file, tmp_path):
    _run(digits_file, tmp_path / "run", epochs=1)
    with pytest.raises(UserError, match="--resume"):
        _run(digits_file, tmp_path / "run", epochs=1)
    train.train(
        digits_file,
        SPEC,
        make_config("fast", 1),
        _config(epochs=1),
        str(tmp_path / "run"),
        force=True,
        show_progress=False,
    )


def test_a_forced_restart_leaves_nothing_of_the_old_run_to_resume(digits_file, tmp_path, monkeypatch):
    _run(digits_file, tmp_path / "run", epochs=1)

    def crash(*args, **kwargs):
        raise RuntimeError("crashed in the first step")

    monkeypatch.setattr(train, "weighted_loss", crash)
    with pytest.raises(RuntimeError):
        train.train(digits_file, SPEC, make_config("fast", 1), _config(), str(tmp_path / "run"), force=True)
    assert not any((tmp_path / "run" / name).exists() for name in ("last.pt", "best.pt", "metrics.jsonl"))


def test_batch_larger_than_training_set_is_a_user_error(digits_file, tmp_path):
    with pytest.raises(UserError, match="--batch-size 999"):
        _run(digits_file, tmp_path / "run", batch_size=999)


def test_bf16_training_reaches_the_fp32_loss(digits_file, tmp_path):
    fp32 = _run(digits_file, tmp_path / "fp32", epochs=3)
    bf16 = _run(digits_file, tmp_path / "bf16", epochs=3, precision="bf16")
    assert bf16["best_val_loss"] == pytest.approx(fp32["best_val_loss"], rel=0.1)


@pytest.mark.skipif(shutil.which("c++") is None, reason="torch.compile on a CPU needs a C++ compiler")
def test_compiled_training_matches_eager(digits_file, tmp_path):
    from torch._dynamo.utils import counters

    # Shi's forecaster: Adam turns the anchored head's near-zero first gradients into full steps of either sign,
    # so its weights part by more than rounding; compiled anchored forecasts are checked in test_cli.
    eager = _run(digits_file, tmp_path / "eager", "shi", epochs=1, batch_size=5)
    counters.clear()
    compiled = _run(digits_file, tmp_path / "compiled", "shi", epochs=1, batch_size=5, compile=True)
    # One training graph and one validation graph: the last of the 12 validation windows, 2, are padded to 5.
    assert counters["stats"]["unique_graphs"] == 2
    assert compiled["best_val_loss"] == pytest.approx(eager["best_val_loss"], rel=1e-3)
    a = checkpoint.load(eager["last_checkpoint"])["model"]
    b = checkpoint.load(compiled["last_checkpoint"])["model"]
    assert a.keys() == b.keys()  # saved from the module itself, loadable without compiling
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-4, rtol=1e-3)


def test_failed_compilation_is_one_clear_error(digits_file, tmp_path, monkeypatch):
    import torch._dynamo
    import torch._inductor.config

    torch._dynamo.reset()
    monkeypatch.setattr(torch._inductor.config, "fx_graph_cache", False)
    monkeypatch.setattr(torch._inductor.config.cpp, "cxx", (None, str(tmp_path / "no-such-compiler")))
    with pytest.raises(UserError, match=r"^--compile: torch.compile failed \(.*C\+\+ compiler.*\); train without"):
        _run(digits_file, tmp_path / "run", epochs=1, compile=True)
    torch._dynamo.reset()


def test_truncated_checkpoint_never_loads_silently(digits_file, tmp_path):
    summary = _run(digits_file, tmp_path / "run", epochs=1)
    whole = open(summary["last_checkpoint"], "rb").read()
    for cut in torch.randint(1, len(whole) - 1, (12,), generator=torch.Generator().manual_seed(0)).tolist():
        broken = tmp_path / f"cut{cut}.pt"
        broken.write_bytes(whole[:cut])
        with pytest.raises(UserError, match="checkpoint"):
            checkpoint.load(str(broken))


def test_foreign_file_is_refused(tmp_path):
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(UserError, match="not a convgru checkpoint"):
        checkpoint.load(str(tmp_path / "other.pt"))


def test_checkpoint_without_a_part_is_refused_naming_it(digits_file, tmp_path):
    saved = checkpoint.load(_run(digits_file, tmp_path / "run", epochs=1)["last_checkpoint"])
    del saved["train_config"], saved["normalisation"]
    checkpoint.save(str(tmp_path / "partial.pt"), saved)
    with pytest.raises(UserError, match="without its normalisation, train_config$"):
        checkpoint.load(str(tmp_path / "partial.pt"))


def test_failed_write_keeps_the_previous_file(tmp_path):
    from convgru_cli.atomic import write_atomically

    target = tmp_path / "out.bin"
    target.write_bytes(b"previous")

    def full_disk(file):
        file.write(b"half")
        raise OSError(28, "No space left on device")

    with pytest.raises(UserError, match="No space left"):
        write_atomically(str(target), full_disk)
    assert target.read_bytes() == b"previous"
    assert os.listdir(tmp_path) == ["out.bin"]


def test_learning_rate_warms_up_then_decays():
    config = _config(lr=1.0, warmup_steps=4)
    rates = [train.learning_rate(config, step, step / 20) for step in range(20)]
    assert rates[0] == 0.25 and rates[3] == 1.0
    assert all(a >= b for a, b in zip(rates[4:], rates[5:], strict=False))


def test_batches_are_a_function_of_seed_and_epoch_and_shard_across_ranks():
    one = train.epoch_batches(20, 2, seed=0, epoch=3, rank=0, world=1)
    assert one == train.epoch_batches(20, 2, seed=0, epoch=3, rank=0, world=1)
    assert one != train.epoch_batches(20, 2, seed=0, epoch=4, rank=0, world=1)
    ranks = [train.epoch_batches(20, 2, seed=0, epoch=3, rank=r, world=2) for r in range(2)]
    merged = [i for pair in zip(*ranks, strict=True) for b in pair for i in b]
    assert merged == [i for b in train.epoch_batches(20, 4, 0, 3, 0, 1) for i in b]


def test_max_time_stops_cleanly_with_checkpoints(digits_file, tmp_path):
    summary = _run(digits_file, tmp_path / "run", epochs=1000, max_time=0.5)
    assert summary["epochs"] < 1000
    assert (tmp_path / "run" / "best.pt").is_file()


def test_a_run_cut_short_by_max_time_resumes_mid_epoch(digits_file, tmp_path, caplog):
    straight = _run(digits_file, tmp_path / "straight", epochs=1)
    with caplog.at_level("INFO", logger="convgru"):
        cut = _run(digits_file, tmp_path / "run", epochs=1, max_time=1e-9)  # out of time after the first step
    assert cut["steps"] == 1 and cut["epochs"] == 0
    assert "epoch 1/1 (cut short: 1 of 9 batches)" in caplog.text
    assert checkpoint.load(str(tmp_path / "run" / "last.pt"))["progress"]["batch"] == 1
    resumed = train.resume(digits_file, str(tmp_path / "run"), show_progress=False, max_time=None)
    assert resumed["epochs"] == 1 and resumed["steps"] == straight["steps"]
    records = [json.loads(line) for line in open(tmp_path / "run" / "metrics.jsonl")]
    assert [(r["epoch"], r["complete"]) for r in records] == [(1, False), (1, True)]
    with pytest.raises(UserError, match="--max-time"):
        _run(digits_file, tmp_path / "other", max_time=-1)


def test_validation_loss_is_the_training_objective_with_its_distribution_term(digits_file, tmp_path):
    summary = _run(digits_file, tmp_path / "run", epochs=1, distribution_weight=0.5)
    saved = checkpoint.load(summary["last_checkpoint"])
    model_config, spec, normalisation = checkpoint.configs(saved)
    model = EncoderForecaster(model_config)
    model.load_state_dict(saved["model"])
    source = open_frames([digits_file], None)
    _, val = split_windows(source, SPEC)
    batch = torch.from_numpy(np.stack([source.read(n, s, SPEC.window) for n, s in val]))
    inputs, target, valid = train._split(batch, normalisation, SPEC)
    with torch.no_grad():
        prediction = model.eval()(inputs, SPEC.output_frames)
    weight = valid.float()
    mse = float(((prediction - target) ** 2 * weight).sum() / weight.sum())
    expected = mse + 0.5 * float(train.distribution_loss(prediction, target, weight))
    assert summary["best_val_loss"] == pytest.approx(expected, rel=1e-4)


def test_distribution_loss_weighs_each_rank_as_its_observed_pixel():
    """Against a plain reference: per frame, the valid values sorted, each gap weighted as the observed pixel of
    that rank (no-data pixels have weight 0); any rearrangement of the observation costs nothing."""
    generator = torch.Generator().manual_seed(0)
    prediction, target = torch.randn(2, 2, 3, 1, 5, 4, generator=generator).double()
    weight = torch.randint(0, 4, target.shape, generator=generator).double()
    expected = 0.0
    for b in range(2):
        for t in range(3):
            keep = weight[b, t].flatten() > 0
            observed, weights = target[b, t].flatten()[keep].numpy(), weight[b, t].flatten()[keep].numpy()
            order = np.argsort(observed)
            forecast = np.sort(prediction[b, t].flatten()[keep].numpy())
            expected += (np.abs(forecast - observed[order]) * weights[order]).sum()
    expected /= int((weight > 0).sum())
    assert float(train.distribution_loss(prediction, target, weight)) == pytest.approx(expected, rel=1e-12)
    rearranged = target.flatten(2)[..., torch.randperm(20, generator=generator)].view_as(target)
    assert float(train.distribution_loss(rearranged, target, torch.ones_like(target))) == 0.0


def test_balance_weights_must_be_positive():
    """A weight of 0 would mark pixels as no data in the distribution term, a negative one reward errors."""
    for weights in ((1.0, 2.0, 0.0, 10.0, 30.0), (1.0, -2.0, 5.0, 10.0, 30.0)):
        with pytest.raises(UserError, match="--balance-weights must all be positive"):
            _config(loss="balanced", balance_weights=weights).check()
    _config(loss="balanced").check()


def test_max_time_without_epochs_trains_until_the_time_is_up(digits_file, tmp_path, caplog):
    assert options.epochs_of({"epochs": None, "max_time": 600.0}) is None
    assert options.epochs_of({"epochs": None, "max_time": None}) == train.TrainConfig.epochs
    assert options.epochs_of({"epochs": 3, "max_time": 600.0}) == 3
    with caplog.at_level("INFO", logger="convgru"):
        summary = _run(digits_file, tmp_path / "run", epochs=None, max_time=2.0)
    assert "stopping: --max-time 2s reached" in caplog.text
    assert re.search(r"epoch 1( \(cut short|  train loss)", caplog.text) and "epoch 1/" not in caplog.text
    assert summary["steps"] > 0
    with pytest.raises(UserError, match="--epochs or --max-time"):
        _config(epochs=None, max_time=None).check()


def test_no_fast_bf16_falls_back_to_fp32_with_one_info_line(monkeypatch, caplog):
    from convgru_cli import device

    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: False)
    with caplog.at_level("INFO", logger="convgru"):
        assert device.pick_precision("auto", torch.device("cpu")) == torch.float32
    assert [r.message for r in caplog.records] == ["no fast bf16 on this cpu: running in fp32"]
    monkeypatch.setattr(device, "cpu_has_fast_bf16", lambda: True)
    assert device.pick_precision("auto", torch.device("cpu")) == torch.bfloat16
    with pytest.raises(UserError, match="fp16 needs a GPU"):
        device.pick_precision("fp16", torch.device("cpu"))


@pytest.mark.parametrize(("capability", "expected"), [((7, 0), torch.float32), ((8, 0), torch.bfloat16)])
def test_auto_precision_on_cuda_wants_bf16_tensor_cores(monkeypatch, capability, expected):
    """A V100 (7.0) emulates bf16, slower than fp32; an A100 (8.0) has it in its tensor cores."""
    from convgru_cli import device

    asked = []
    monkeypatch.setattr(torch.version, "hip", None)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda d: asked.append(d) or capability)
    gpu = torch.device("cuda", 1)
    assert device.pick_precision("auto", gpu) == expected
    assert asked == [gpu]


def test_devices_that_are_not_here_are_user_errors(monkeypatch):
    from convgru_cli import device

    assert device.pick_device("cpu") == torch.device("cpu")
    for name in ("cudafoo", "tpu", "cuda:x"):
        with pytest.raises(UserError, match=f"--device {name}: unknown device"):
            device.pick_device(name)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert device.pick_device("cuda:1") == torch.device("cuda", 1)
    with pytest.raises(UserError, match="--device cuda:7: this machine has 2 CUDA device"):
        device.pick_device("cuda:7")


def test_grad_clip_zero_means_no_clipping(digits_file, tmp_path):
    unclipped = _run(digits_file, tmp_path / "zero", epochs=1, grad_clip=0.0)
    huge = _run(digits_file, tmp_path / "huge", epochs=1, grad_clip=1e12)
    a = checkpoint.load(unclipped["last_checkpoint"])["model"]
    b = checkpoint.load(huge["last_checkpoint"])["model"]
    for name in a:
        torch.testing.assert_close(a[name], b[name], atol=1e-6, rtol=1e-5)
    with pytest.raises(UserError, match="--grad-clip -1"):
        _run(digits_file, tmp_path / "negative", grad_clip=-1.0)


def test_crops_are_drawn_anew_each_epoch_reproducibly_where_the_signal_is_and_read_alone():
    frames = np.zeros((1, 4, 1, 64, 64), dtype=np.float32)
    frames[..., :32, :32] = np.random.default_rng(0).random((4, 1, 32, 32))  # signal in one quadrant only
    asked: list[tuple[int, int]] = []

    class Source:  # WindowDataset reads through FrameSource.read alone
        height, width = 64, 64

        def read(self, sequence: int, start: int, length: int, region=None) -> np.ndarray:
            rows, columns = region
            asked.append((rows.stop - rows.start, columns.stop - columns.start))
            return frames[sequence, start : start + length, :, rows, columns]

    source, windows = Source(), [(0, 0)] * 20

    def crops(seed: int) -> list[torch.Tensor]:
        dataset = WindowDataset(source, windows, 4, crop=(16, 24), seed=seed)
        return [dataset[i] for i in range(len(windows))]

    first, again, other = crops(1), crops(1), crops(2)
    assert all(crop.shape == (4, 1, 16, 24) for crop in first)
    assert all(torch.equal(a, b) for a, b in zip(first, again, strict=True))
    assert not all(torch.equal(a, b) for a, b in zip(first, other, strict=True))
    with_signal = sum(float(crop.std()) > 0 for crop in first)
    assert with_signal >= 16  # one random crop in 4 or so would touch the quadrant; four tries find it
    assert set(asked) == {(16, 24)}  # never the whole frame: the domain's size does not enter memory


def test_rain_trains_with_the_distribution_term_and_augmented_windows_unless_told_otherwise(series_file, tmp_path):
    rain = train.TrainConfig(distribution_weight=3.0, augment=True, lr=2e-3)
    assert train.rain_aware(train.TrainConfig(), "db") == rain
    other = train.TrainConfig(distribution_weight=0.0, augment=False, lr=2e-3)
    assert train.rain_aware(train.TrainConfig(), "none") == other
    assert train.rain_aware(train.TrainConfig(loss="balanced"), "db").lr == 1e-3  # half: it diverged at 2e-3
    assert train.rain_aware(train.TrainConfig(loss="balanced"), "none").lr == 1e-3  # by the loss, whatever the data
    chosen = train.TrainConfig(distribution_weight=0.5, augment=False, lr=5e-3, loss="balanced")
    assert train.rain_aware(chosen, "db") == chosen
    spec = DataSpec(dataset=None, layout=None, input_frames=3, output_frames=3, stride=4, val_fraction=0.25)
    config = train.TrainConfig(epochs=1, batch_size=2, device="cpu", precision="fp32")  # both left to the data
    summary = train.train(series_file, spec, make_config("fast", 1), config, str(tmp_path / "r"), show_progress=False)
    saved = checkpoint.load(summary["last_checkpoint"])
    assert saved["data_spec"]["transform"] == "db"
    assert saved["train_config"]["distribution_weight"] == 3.0 and saved["train_config"]["augment"] is True
    assert saved["train_config"]["lr"] == 2e-3


def test_augmentation_turns_mirrors_reverses_and_rescales_rain_reproducibly():
    batch = torch.arange(2 * 3 * 1 * 8 * 8, dtype=torch.float32).reshape(2, 3, 1, 8, 8)
    once, again = train.augmented(batch, 5, rescale=True), train.augmented(batch, 5, rescale=True)
    torch.testing.assert_close(once, again)
    reversed_windows = 0
    for seed in range(100):
        for window, original in zip(train.augmented(batch, seed, rescale=False), batch, strict=True):
            forwards = [torch.rot90(original, k, dims=(-2, -1)) for k in range(4)]
            forwards += [v.flip(-1) for v in forwards]
            backwards = [v.flip(0) for v in forwards]
            # a symmetry of the square, in time order or backwards, nothing else
            assert any(torch.equal(window, v) for v in forwards + backwards)
            reversed_windows += any(torch.equal(window, v) for v in backwards)
    assert 0.4 < reversed_windows / 200 < 0.6  # about half of them run backwards (REVERSED_SHARE)
    ratios = (once.flatten(1)[:, 1:].sum(dim=1) / batch.flatten(1)[:, 1:].sum(dim=1)).tolist()
    assert all(0.5 <= r <= 4 for r in ratios)
    draws = {tuple(train.augmented(batch, seed, rescale=False)[0, 0, 0, 0].tolist()) for seed in range(12)}
    assert len(draws) > 2  # different steps draw different symmetries


def test_auto_model_is_anchored_and_bounded_for_rain_and_reflectivity_and_shis_for_other_data():
    auto = make_config("fast", 1, forecaster="auto", activation="auto")
    for transform in ("db", "dbz", "log"):
        decided = train.data_aware_model(auto, transform)
        assert (decided.forecaster, decided.activation) == ("anchored", "tanh")
    decided = train.data_aware_model(auto, "none")
    assert (decided.forecaster, decided.activation) == ("shi", "leaky")
    chosen = make_config("fast", 1, forecaster="anchored", activation="tanh")
    assert train.data_aware_model(chosen, "none") == chosen
    one_chosen = train.data_aware_model(make_config("fast", 1, forecaster="shi", activation="auto"), "db")
    assert (one_chosen.forecaster, one_chosen.activation) == ("shi", "tanh")
    with pytest.raises(ValueError, match="auto"):
        EncoderForecaster(auto)
    with pytest.raises(ValueError, match="auto"):
        EncoderForecaster(make_config("fast", 1, forecaster="anchored", activation="auto"))


def test_a_diverging_run_is_told_once(caplog):
    """The training losses per epoch of a --loss balanced run on KNMI that diverged at step 240 (session 17)."""
    losses = [1.42, 1.53, 1.64, 1.52, 1.37, 1.6, 1.45, 2.31, 5.99, 10.03, 12.64, 10.58]
    history = []
    for epoch, loss in enumerate(losses, 1):
        history.append({"epoch": epoch, "step": 10 * epoch, "train_loss": loss})
        train._warn_if_diverged(history)
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "5.99 at step 90" in warnings[0] and "--lr" in warnings[0]
    caplog.clear()
    healthy = [2.5, 1.6, 1.4, 1.9, 1.3, 2.2, 1.2, None, 1.1]  # an epoch cut short by --max-time has no loss
    for epoch in range(1, len(healthy) + 1):
        train._warn_if_diverged([{"epoch": e, "step": e, "train_loss": v} for e, v in enumerate(healthy[:epoch], 1)])
    assert not [r for r in caplog.records if r.levelname == "WARNING"]

"""Training (both stages), resume, checkpoints, NaN stop, evaluation, prediction, DDP — tiny, on CPU."""
import csv
import importlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condseg.data import make_synthetic_dataset
from condseg.data.errors import DatasetError
from condseg.engine import (CheckpointError, TrainingDiverged, evaluate, load_checkpoint, load_model, predict,
                            save_checkpoint, train)
from condseg.engine import checkpoints as ckpt_module
from condseg.engine import loops, runlog
from condseg.engine.evaluate import evaluation_files
from conftest import requires_nnpack

REPO = Path(__file__).resolve().parents[1]
TINY = dict(image_size=32, batch_size=4, encoder="resnet18", decoder_channels=16, epochs=2, stage1_epochs=1,
            progress=False, tensorboard=False, stage1_lr=1e-3, lr=1e-3, encoder_lr=1e-4)


@pytest.fixture(scope="module", autouse=True)
def _one_thread():
    """Tiny models run far faster on one thread, above all on a shared, busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", train=8, val=4, size=32, seed=0)


@pytest.fixture(scope="module")
def trained(synth, tmp_path_factory):
    """One uninterrupted two-stage run, shared by several tests."""
    out = tmp_path_factory.mktemp("run") / "run"
    return train(data_root=str(synth), out=str(out), **TINY)


def _tensors_equal(a, b, path="state"):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _tensors_equal(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _tensors_equal(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


def test_two_stage_training_on_synthetic(trained):
    run = trained.run_dir
    for name in ("stage1_last.pt", "stage1_best.pt", "stage2_last.pt", "stage2_best.pt", "log.csv",
                 "curves.png", "train.log"):
        assert (run / name).is_file(), name
    assert trained.best_checkpoint == run / "stage2_best.pt"
    rows = list(csv.DictReader(open(run / "log.csv")))
    assert [(r["stage"], r["epoch"]) for r in rows] == [("1", "1"), ("2", "1"), ("2", "2")]
    assert all(np.isfinite(float(r["train_loss"])) for r in rows) and rows[1]["lr_encoder"] == "0.0001"
    last = torch.load(run / "stage2_last.pt", weights_only=True)  # plain contents only
    assert {"model", "optimizer", "scheduler", "scaler", "rng", "history", "epoch"} <= last.keys()
    assert last["epoch"] == 2 and last["finished"] and last["model_config"]["arch"] == "condseg"
    assert Image.open(run / "curves.png").size == (960, 400)


def test_channels_last_training_matches_contiguous(synth, tmp_path):
    """The memory format changes the speed, not the result: the same seed gives the same losses
    (to rounding: the convolutions sum in another order)."""
    logs = {}
    for channels_last in (True, False):
        result = train(data_root=str(synth), out=str(tmp_path / str(channels_last)), channels_last=channels_last,
                       **{**TINY, "stage": "2", "epochs": 1})
        logs[channels_last] = next(csv.DictReader(open(result.run_dir / "log.csv")))
        stem = load_checkpoint(result.best_checkpoint)["model"]["encoder.conv1.weight"]  # saved as trained
        assert stem.is_contiguous(memory_format=torch.channels_last) == channels_last
    for key in ("train_loss", "val_loss", "loss_fg", "loss_bg"):
        assert float(logs[True][key]) == pytest.approx(float(logs[False][key]), rel=1e-3), key


def test_compiled_training_matches_eager(synth, tmp_path, monkeypatch):
    """compile=True trains through torch.compile (forward and backward, the fused op inside the
    graph) and gives eager's losses; validation and checkpoints use the eager module. The compiler
    here is AOTAutograd without inductor (inductor's C++ code generation takes minutes on 2 cores):
    it traces the same graphs, custom op and all, and runs them op by op."""
    compiled, graph_calls, real_compile = [], [], torch.compile
    aot_eager = torch._dynamo.lookup_backend("aot_eager")

    def counting_backend(graph, example_inputs):
        run = aot_eager(graph, example_inputs)

        def counted(*args):
            graph_calls.append(len(args))
            return run(*args)
        return counted

    def compile_traced(model, **kwargs):
        compiled.append(kwargs)
        return real_compile(model, backend=counting_backend, **kwargs)

    monkeypatch.setattr(torch, "compile", compile_traced)
    torch._dynamo.reset()
    try:
        options = {**TINY, "stage": "2", "epochs": 1}
        eager = train(data_root=str(synth), out=str(tmp_path / "eager"), **options)
        assert not compiled and not graph_calls
        result = train(data_root=str(synth), out=str(tmp_path / "compiled"), compile=True, **options)
    finally:
        torch._dynamo.reset()
    assert compiled == [{"dynamic": False}]
    assert len(graph_calls) >= 2  # both training steps (8 pairs, batch 4) ran the compiled graph
    logs = [next(csv.DictReader(open(r.run_dir / "log.csv"))) for r in (eager, result)]
    for key in ("train_loss", "val_loss", "loss_fg", "loss_bg"):
        assert float(logs[1][key]) == pytest.approx(float(logs[0][key]), rel=1e-4), key
    state = load_checkpoint(result.best_checkpoint)["model"]
    assert not [k for k in state if k.startswith("_orig_mod")]  # the module's own names


def _record_epochs(monkeypatch, probe):
    """Wraps the trainer's train_epoch: every epoch appends probe(its bound arguments) to the
    returned list before it runs."""
    train_module = importlib.import_module("condseg.engine.train")  # the module, not the function
    real_epoch, seen = train_module.train_epoch, []
    signature = inspect.signature(real_epoch)

    def recording_epoch(*args, **kwargs):
        seen.append(probe(signature.bind(*args, **kwargs).arguments))
        return real_epoch(*args, **kwargs)

    monkeypatch.setattr(train_module, "train_epoch", recording_epoch)
    return seen


def test_cpu_training_flushes_denormals_then_restores(synth, tmp_path, monkeypatch):
    from condseg.engine import runtime
    if not torch.set_flush_denormal(False):
        pytest.skip("this CPU cannot flush denormals")
    seen = _record_epochs(monkeypatch, lambda arguments: runtime.flushing_denormals())
    assert not runtime.flushing_denormals()
    train(data_root=str(synth), out=str(tmp_path / "run"), **{**TINY, "stage": "2", "epochs": 1})
    assert seen == [True]
    assert not runtime.flushing_denormals()  # the caller's mode is back
    torch.set_flush_denormal(True)
    try:
        with runtime.denormals_flushed(torch.device("cpu")):
            pass
        assert runtime.flushing_denormals()  # an enabled mode stays enabled
    finally:
        torch.set_flush_denormal(False)


def test_amp_choice_per_device():
    from condseg.engine.runtime import amp_dtype
    cpu = torch.device("cpu")
    assert amp_dtype("auto", cpu) is None and amp_dtype("off", cpu) is None  # CPU: float32 unless asked
    assert amp_dtype("bf16", cpu) is torch.bfloat16
    with pytest.raises(ValueError, match="amp='fp16' needs a CUDA device"):
        amp_dtype("fp16", cpu)
    with pytest.raises(ValueError, match="amp must be one of"):
        amp_dtype("int8", cpu)


def test_cpu_bf16_training_follows_float32(synth, tmp_path, monkeypatch):
    """amp="bf16" on a CPU runs the epochs under bf16 autocast, keeps float32 weights, and its
    losses stay near those of the same seeded run in float32."""
    seen = _record_epochs(monkeypatch, lambda arguments: arguments["amp"])  # the epoch's autocast dtype
    logs = {}
    for amp in ("bf16", "off"):
        result = train(data_root=str(synth), out=str(tmp_path / amp), amp=amp, device="cpu",
                       **{**TINY, "stage": "2", "epochs": 1})
        logs[amp] = next(csv.DictReader(open(result.run_dir / "log.csv")))
        weights = load_checkpoint(result.best_checkpoint)["model"]
        assert all(w.dtype == torch.float32 for w in weights.values() if w.is_floating_point())
    assert seen == [torch.bfloat16, None]
    for key in ("train_loss", "loss_mask", "val_loss"):
        assert float(logs["bf16"][key]) == pytest.approx(float(logs["off"][key]), rel=0.05), key


def test_stage2_encoder_comes_from_stage1(trained):
    s1 = load_checkpoint(trained.run_dir / "stage1_best.pt")
    model, _ = load_model(trained.best_checkpoint)
    # after stage-2 training the encoder moved, but its BN running stats started from stage 1: the
    # stage-1 weights loaded into a fresh model reproduce the stage-1 encoder exactly
    fresh = type(model)(encoder_name="resnet18", decoder_channels=16)
    fresh.load_stage1_encoder(s1["model"])
    for k, v in fresh.encoder.state_dict().items():
        assert torch.equal(v, s1["model"][f"encoder.{k}"]), k


def test_train_on_real_kvasir_images(kvasir_root, tmp_path):
    ids = (kvasir_root / "val.txt").read_text().split()
    (tmp_path / "tr.txt").write_text("\n".join(ids[:8]))
    (tmp_path / "va.txt").write_text("\n".join(ids[8:12]))
    result = train(data_root=str(kvasir_root), out=str(tmp_path / "run"), train_split=str(tmp_path / "tr.txt"),
                   val_split=str(tmp_path / "va.txt"), **{**TINY, "image_size": 64, "epochs": 1})
    assert result.best_checkpoint.is_file() and 0 <= result.best_metrics["val_mDSC"] <= 1
    summary = evaluate(result.best_checkpoint, kvasir_root, split=str(tmp_path / "va.txt"), original_size=True)
    assert summary["images"] == 4 and summary["resolution"] == "original"


def test_evaluate_writes_csv_and_json(trained, synth, tmp_path):
    out = tmp_path / "eval" / "val.json"
    summary = evaluate(trained.best_checkpoint, synth, split="val", out=out)
    saved = json.loads(out.read_text())
    assert saved["images"] == 4 and saved["resolution"] == "32x32"
    for key in ("mIoU", "mDSC", "recall", "precision"):
        assert 0 <= saved[key] <= 1 and saved[key] == pytest.approx(summary[key])
    rows = list(csv.DictReader(open(out.with_suffix(".csv"))))
    assert [r["id"] for r in rows] == (synth / "val.txt").read_text().split()
    assert np.mean([float(r["dice"]) for r in rows]) == pytest.approx(saved["mDSC"], abs=1e-5)
    # stage-1 checkpoints evaluate too
    assert evaluate(trained.run_dir / "stage1_best.pt", synth, split="val")["images"] == 4
    # --out metrics.csv once wrote the summary, then the table over it
    evaluate(trained.best_checkpoint, synth, split="val", out=tmp_path / "metrics.csv")
    assert json.loads((tmp_path / "metrics.json").read_text())["images"] == 4
    assert len(list(csv.DictReader(open(tmp_path / "metrics.csv")))) == 4


def test_predict_keeps_each_input_size(trained, tmp_path):
    inputs = tmp_path / "in"
    inputs.mkdir()
    Image.fromarray(np.random.randint(0, 255, (50, 70, 3), np.uint8)).save(inputs / "wide.png")
    Image.fromarray(np.random.randint(0, 255, (33, 21), np.uint8)).save(inputs / "gray.jpg")
    single = tmp_path / "rgba.png"
    Image.fromarray(np.random.randint(0, 255, (100, 90, 4), np.uint8)).save(single)
    records = predict(trained.best_checkpoint, [inputs, single], tmp_path / "out", overlay=True,
                      probabilities=True, uncertainty=True, workers=0, batch_size=2)
    sizes = {"gray": (21, 33), "wide": (70, 50), "rgba": (90, 100)}
    assert len(records) == 3
    for r in records:
        stem = Path(r["input"]).stem
        for key in ("mask", "overlay", "probability", "uncertainty"):
            assert Image.open(r[key]).size == sizes[stem], (key, stem)
        assert set(np.unique(np.array(Image.open(r["mask"])))) <= {0, 255}
    with pytest.raises(ValueError, match="stage-1 checkpoint"):
        predict(trained.run_dir / "stage1_best.pt", [single], tmp_path / "o2", uncertainty=True, workers=0)
    with pytest.raises(ValueError, match=r"threshold is a foreground probability in \[0, 1\], got 2"):
        predict(trained.best_checkpoint, [single], tmp_path / "o3", threshold=2, workers=0)


def test_predict_runs_the_model_with_batchnorm_folded(trained, tmp_path, monkeypatch):
    """predict's model has no BatchNorm left and computes what the checkpoint's model does."""
    predict_module = importlib.import_module("condseg.engine.predict")  # (the package exports the function)
    seen = {}
    real = predict_module._predict_files

    def spy(model, *args, **kwargs):
        seen["model"] = model
        return real(model, *args, **kwargs)

    monkeypatch.setattr(predict_module, "_predict_files", spy)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (40, 30, 3), np.uint8)).save(image)
    predict(trained.best_checkpoint, [image], tmp_path / "out", workers=0, device="cpu", winograd=False)
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in seen["model"].modules())
    model, _ = load_model(trained.best_checkpoint, "cpu")
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        expected = model(x, return_aux=True)
        for got, want in zip(seen["model"](x, return_aux=True), expected):
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4 * want.abs().max().item())
    # a stage-1 checkpoint (ConDSegStage1, another forward) folds too
    predict(trained.run_dir / "stage1_best.pt", [image], tmp_path / "out1", workers=0, device="cpu")
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in seen["model"].modules())


@requires_nnpack
def test_predict_on_cpu_takes_winograd_convolutions(trained, tmp_path, nnpack_calls):
    """CPU predictions run the 3x3 convolutions of 64x64 maps and more through NNPACK, and agree
    with the ordinary convolutions' to the probability maps' 8-bit resolution."""
    state = load_checkpoint(trained.best_checkpoint)
    state["image_size"] = [64, 64]  # the network is fully convolutional; 32x32 has no map that large
    checkpoint = tmp_path / "at64.pt"
    torch.save(state, checkpoint)
    image = tmp_path / "photo.png"
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (80, 90, 3), np.uint8)).save(image)
    fast = predict(checkpoint, [image], tmp_path / "fast", probabilities=True, workers=0, device="cpu")
    winograd_calls = len(nnpack_calls)
    assert winograd_calls
    plain = predict(checkpoint, [image], tmp_path / "plain", probabilities=True, workers=0, device="cpu",
                    winograd=False)
    assert len(nnpack_calls) == winograd_calls  # the ordinary convolutions this time
    p_fast, p_plain = (np.array(Image.open(r[0]["probability"])).astype(int) for r in (fast, plain))
    assert np.abs(p_fast - p_plain).max() <= 1
    m_fast, m_plain = (np.array(Image.open(r[0]["mask"])) for r in (fast, plain))
    assert (m_fast != m_plain).mean() <= 0.01


def test_predict_never_writes_into_a_folder_of_inputs(trained, tmp_path):
    """p1.jpg's mask would be p1.png, an image of the folder, whether the folder or only p1.jpg is the
    input (the single-file case once overwrote p1.png); a folder once written to would also hand
    its masks to the next run as inputs."""
    folder = tmp_path / "in"
    folder.mkdir()
    for name in ("p0.jpg", "p1.jpg", "p1.png"):
        Image.fromarray(np.random.randint(0, 255, (40, 40, 3), np.uint8)).save(folder / name)
    before = {p.name: p.read_bytes() for p in folder.iterdir()}
    cases = [(folder, folder), (folder / "p1.jpg", folder), ([folder / "p0.jpg"], tmp_path / "in" / ".")]
    for inputs, out in cases:
        with pytest.raises(ValueError, match=r"output folder .* holds input images"):
            predict(trained.best_checkpoint, inputs, out, workers=0)
    assert {p.name: p.read_bytes() for p in folder.iterdir()} == before
    records = predict(trained.best_checkpoint, folder / "p1.jpg", tmp_path / "masks", workers=0)
    assert Path(records[0]["mask"]) == tmp_path / "masks" / "p1.png"


def test_predict_never_replaces_files_it_did_not_ask_to(trained, synth, tmp_path):
    """Predicting into a folder of ground-truth masks (not the inputs' folder) once replaced them with
    predictions; files of the output names now stop the run unless overwrite=True."""
    masks = tmp_path / "val_masks"
    masks.mkdir()
    images = synth / "images"
    ids = (synth / "val.txt").read_text().split()
    for i in ids:
        (masks / f"{i}.png").write_bytes(b"ground truth " + i.encode())
    (masks / "notes.txt").write_text("mine")
    inputs = [next(images.glob(f"{i}.*")) for i in ids]
    before = {p.name: p.read_bytes() for p in masks.iterdir()}
    with pytest.raises(ValueError, match=rf"{len(ids)} output file\(s\) exist already in .*--overwrite"):
        predict(trained.best_checkpoint, inputs, masks, workers=0)
    assert {p.name: p.read_bytes() for p in masks.iterdir()} == before
    # A second run into its own earlier output stops too; overwrite=True replaces the masks.
    out = tmp_path / "pred"
    predict(trained.best_checkpoint, inputs[:1], out, workers=0)
    with pytest.raises(ValueError, match="1 output file"):
        predict(trained.best_checkpoint, inputs[:1], out, overlay=True, workers=0)
    assert sorted(p.name for p in out.iterdir()) == [f"{ids[0]}.png"]  # not even the overlay was written
    records = predict(trained.best_checkpoint, inputs, masks, overwrite=True, workers=0)
    assert len(records) == len(ids) and (masks / "notes.txt").read_text() == "mine"
    assert all(Image.open(masks / f"{i}.png").size == (32, 32) for i in ids)


def test_predict_that_fails_takes_back_what_it_wrote(trained, synth, tmp_path):
    """A corrupt image after a batch of good ones once left their masks behind, and the rerun was
    refused for them; the folders it made go too, files that were there stay."""
    bad = tmp_path / "zzz_broken.png"
    bad.write_bytes(b"not an image")
    good = sorted((synth / "images").iterdir())[:3]
    with pytest.raises(Exception, match="zzz_broken.png"):
        predict(trained.best_checkpoint, [*good, bad], tmp_path / "new" / "out", workers=0, batch_size=2)
    assert not (tmp_path / "new").exists() and tmp_path.is_dir()
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "mine.txt").write_text("mine")
    with pytest.raises(Exception, match="zzz_broken.png"):
        predict(trained.best_checkpoint, [*good, bad], kept, workers=0, batch_size=2)
    assert sorted(p.name for p in kept.iterdir()) == ["mine.txt"]
    assert len(predict(trained.best_checkpoint, good, kept, workers=0)) == 3  # no --overwrite needed


def test_predict_never_writes_through_a_link(trained, synth, tmp_path):
    image = sorted((synth / "images").iterdir())[0]
    out = tmp_path / "out"
    out.mkdir()
    target = tmp_path / "elsewhere" / "target.png"
    (out / f"{image.stem}.png").symlink_to(target)  # dangling
    with pytest.raises(ValueError, match="1 output file"):
        predict(trained.best_checkpoint, [image], out, workers=0)
    predict(trained.best_checkpoint, [image], out, workers=0, overwrite=True)
    assert not (out / f"{image.stem}.png").is_symlink() and not target.exists()


def test_evaluation_files_of_names_with_dots(tmp_path):
    """Two runs named r18.val and r18.train keep their own files (with_suffix once gave both
    r18.csv, the second run's table over the first's)."""
    assert evaluation_files(tmp_path / "val.json") == (tmp_path / "val.json", tmp_path / "val.csv")
    assert evaluation_files(tmp_path / "val.CSV") == (tmp_path / "val.json", tmp_path / "val.csv")
    names = [evaluation_files(tmp_path / f"r18.{split}") for split in ("val", "train")]
    assert names[0] == (tmp_path / "r18.val.json", tmp_path / "r18.val.csv")
    assert len({path for pair in names for path in pair}) == 4


def test_predict_outputs_never_share_a_name(trained, tmp_path):
    """Inputs scan.png and scan_overlay.png with overlays: scan's overlay and the second input's
    mask were both scan_overlay.png, and one was lost."""
    inputs = tmp_path / "in"
    inputs.mkdir()
    for name, size in (("scan.png", (30, 40)), ("scan_overlay.png", (20, 50))):
        Image.fromarray(np.random.randint(0, 255, (*size, 3), np.uint8)).save(inputs / name)
    records = predict(trained.best_checkpoint, inputs, tmp_path / "out", overlay=True, workers=0)
    paths = [r[key] for r in records for key in ("mask", "overlay")]
    assert len(set(paths)) == 4 and sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(
        Path(p).name for p in paths)
    for r in records:  # each file holds what its record says, at its input's size
        size = Image.open(r["input"]).size
        assert Image.open(r["mask"]).mode == "L" and Image.open(r["mask"]).size == size
        assert Image.open(r["overlay"]).mode == "RGB" and Image.open(r["overlay"]).size == size


class _Interrupt(Exception):
    pass


@pytest.mark.parametrize("stop_after, workers", [(1, 0), (2, 0), (1, 2)],
                         ids=["after-stage1", "mid-stage2", "after-stage1-workers"])
def test_resume_equals_uninterrupted(synth, trained, tmp_path, monkeypatch, stop_after, workers):
    # With data-loader workers too, and the same as without them (``trained``): persistent workers
    # drew their seeds from the global RNG, which also draws the augmentations, in a stage's first
    # epoch only (a loader without workers draws every epoch), so runs with workers, resumed or
    # not, drifted apart.
    out = tmp_path / "run"
    calls = {"n": 0}
    original = runlog.RunLog.epoch

    def epoch_then_die(self, row, history):
        original(self, row, history)
        calls["n"] += 1
        if calls["n"] == stop_after:
            raise _Interrupt

    monkeypatch.setattr(runlog.RunLog, "epoch", epoch_then_die)
    with pytest.raises(_Interrupt):
        train(data_root=str(synth), out=str(out), workers=workers, **TINY)
    monkeypatch.setattr(runlog.RunLog, "epoch", original)
    with pytest.raises(FileExistsError, match="--resume"):
        train(data_root=str(synth), out=str(out), workers=workers, **TINY)
    train(data_root=str(synth), out=str(out), resume=True)  # the run's own options come from its checkpoint
    for name in ("stage2_last.pt", "stage2_best.pt"):
        a = load_checkpoint(trained.run_dir / name)
        b = load_checkpoint(out / name)
        for key in ("model", "optimizer", "scheduler", "scaler", "rng", "epoch", "best_score"):
            if key in a:
                _tensors_equal(a[key], b[key], key)
        strip = lambda h: [{k: v for k, v in r.items() if k != "seconds"} for r in h]  # noqa: E731
        assert strip(a["history"]) == strip(b["history"])
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert len(rows) == 3


def test_resume_refuses_options_it_cannot_honour(synth, tmp_path, monkeypatch):
    # The optimizer and scheduler states restore the run's own learning rate and schedule: a new one
    # was silently ignored, yet recorded in the checkpoints as used. A new image size changed the
    # network's input mid-run. Each now stops, naming the option, and leaves the run as it was.
    out = tmp_path / "run"
    original = runlog.RunLog.epoch

    def epoch_then_die(self, row, history):
        original(self, row, history)
        raise _Interrupt

    monkeypatch.setattr(runlog.RunLog, "epoch", epoch_then_die)
    with pytest.raises(_Interrupt):
        train(data_root=str(synth), out=str(out),
              **{**TINY, "stage": "1", "epochs": 2, "stage1_epochs": None, "scheduler": "cosine"})
    monkeypatch.setattr(runlog.RunLog, "epoch", original)
    before = (out / "stage1_last.pt").read_bytes()
    for options, message in [({"stage1_lr": 1e-5}, r"training recipe: stage1_lr=1e-05 \(the run has 0.001\)"),
                             ({"scheduler": "plateau"}, r"scheduler='plateau' \(the run has 'cosine'\)"),
                             ({"seed": 1}, r"seed=1 \(the run has 0\)"),
                             ({"image_size": 64}, r"different network: image_size=64 \(the run has 32\)"),
                             ({"val_split": "train"}, r"val_split='train' \(the run has 'val'\)"),
                             ({"consistency_threshold": 0.7}, r"consistency_threshold=0.7 \(the run has 0.5\)"),
                             ({"epochs": 3}, "with 3 epochs: its cosine schedule runs over the run's 2")]:
        with pytest.raises(ValueError, match=message) as err:
            train(data_root=str(synth), out=str(out), resume=True, **options)
        assert str(out) in str(err.value)
    assert (out / "stage1_last.pt").read_bytes() == before
    # what it can honour still overrides the run's options, and the run says so; the same value is
    # no change
    train(data_root=str(synth), out=str(out), resume=True, workers=0, stage1_lr=1e-3, channels_last=False,
          batch_size=2)
    state = load_checkpoint(out / "stage1_last.pt")
    assert state["epoch"] == 2 and state["train_config"]["stage1_lr"] == 1e-3
    assert state["train_config"]["workers"] == 0 and state["train_config"]["batch_size"] == 2
    said = [line for line in (out / "train.log").read_text().splitlines() if line.startswith("resuming with")]
    assert said == ["resuming with options other than the run's: batch_size=2 (the run has 4), "
                    "channels_last=False (the run has True), workers=0 (the run has None)"]


def test_checkpoint_write_failure_keeps_old_file(tmp_path, monkeypatch):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)

    def half_then_fail(obj, f):
        f.write(b"PK\x03\x04 half a checkpoint")
        raise OSError("disk full")

    monkeypatch.setattr(ckpt_module.torch, "save", half_then_fail)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint({"epoch": 2, "w": torch.zeros(10)}, path)
    monkeypatch.undo()
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(10))
    assert [p.name for p in tmp_path.iterdir()] == ["last.pt"]
    # readable like the run's other files (mkstemp alone gave 0600)
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask


def test_checkpoint_process_killed_mid_write_keeps_old_file(tmp_path):
    path = tmp_path / "last.pt"
    save_checkpoint({"epoch": 1, "w": torch.arange(10)}, path)
    script = f"""
import os, signal, torch
from condseg.engine import checkpoints
real = torch.save
def save_half_and_die(obj, f):
    real(obj, f)
    f.flush()
    f.truncate(f.tell() // 2)
    os.kill(os.getpid(), signal.SIGKILL)
checkpoints.torch.save = save_half_and_die
checkpoints.save_checkpoint({{"epoch": 2, "w": torch.zeros(100000)}}, {str(path)!r})
"""
    proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True)
    assert proc.returncode == -signal.SIGKILL
    state = load_checkpoint(path)
    assert state["epoch"] == 1 and torch.equal(state["w"], torch.arange(10))


def test_load_checkpoint_errors(tmp_path):
    with pytest.raises(CheckpointError, match="not found"):
        load_checkpoint(tmp_path / "none.pt")
    (tmp_path / "junk.pt").write_bytes(b"junk")
    with pytest.raises(CheckpointError, match="cannot load .*not a file written by torch.save"):
        load_checkpoint(tmp_path / "junk.pt")
    torch.save({"w": torch.zeros(1)}, tmp_path / "plain.pt")
    with pytest.raises(CheckpointError, match="not a condseg checkpoint"):
        load_checkpoint(tmp_path / "plain.pt")

    class Evil:
        def __reduce__(self):
            return (os.system, ("echo pwned",))

    torch.save({"format": "condseg-checkpoint", "x": Evil()}, tmp_path / "evil.pt")
    with pytest.raises(CheckpointError, match="cannot load") as refused:
        load_checkpoint(tmp_path / "evil.pt")
    assert "\x1b" not in str(refused.value)
    # a Kvasir-SEG split file given as the checkpoint: its leading "c" reads as a pickle GLOBAL, and
    # torch's refusal of that one marks words bold with terminal codes
    (tmp_path / "val.txt").write_text("cju0s690hkp960855tjuaqvv0\ncju0sr5ghl0nd08789uzf1raf\n")
    with pytest.raises(CheckpointError, match="cannot load") as refused:
        load_checkpoint(tmp_path / "val.txt")
    assert "\x1b" not in str(refused.value)
    # and says so plainly, not with the unpickler's internals (it was "IndexError: pop from empty list")
    assert "not a file written by torch.save" in str(refused.value) and "Error" not in str(refused.value)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(synth, tmp_path, monkeypatch):
    calls = {"n": 0}
    real = loops.losses.stage1_loss

    def poisoned(a, b, target, threshold=0.5):
        calls["n"] += 1
        loss = real(a, b, target, threshold)
        return loss * float("nan") if calls["n"] > 2 else loss  # epoch 1 has 2 steps

    monkeypatch.setattr(loops.losses, "stage1_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="nan") as err:
        train(data_root=str(synth), out=str(out), **{**TINY, "stage1_epochs": 3})
    assert str(out / "stage1_last.pt") in str(err.value)
    state = load_checkpoint(out / "stage1_last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_nan_validation_stops_before_its_checkpoint(synth, tmp_path, monkeypatch):
    # Weights can break in an epoch's last step, every training loss finite: a non-finite validation
    # loss once went on training, and that epoch's checkpoint became the "last good" one.
    train_module = importlib.import_module("condseg.engine.train")
    real, calls = train_module.validate, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        val = real(*args, **kwargs)
        return {**val, "val_loss": float("nan")} if calls["n"] == 2 else val

    monkeypatch.setattr(train_module, "validate", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="stage 1 epoch 2/3: the validation gave val_loss nan") as err:
        train(data_root=str(synth), out=str(out), **{**TINY, "stage1_epochs": 3})
    assert f"the last good checkpoint is {out / 'stage1_last.pt'} (epoch 1)" in str(err.value)
    for kind in ("last", "best"):
        state = load_checkpoint(out / f"stage1_{kind}.pt")
        assert state["epoch"] == 1 and np.isfinite(state["metrics"]["val_loss"])
    assert [row["epoch"] for row in csv.DictReader(open(out / "log.csv"))] == ["1"]


def test_held_out_validation_and_config_errors(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", train=10, val=0, size=32)
    (root / "train.txt").unlink()
    result = train(data_root=str(root), out=str(tmp_path / "run"), stage="1", val_fraction=0.2,
                   **{**TINY, "epochs": 1, "stage1_epochs": None})
    val_ids = (tmp_path / "run" / "splits" / "val.txt").read_text().split()
    assert len(val_ids) == 2 and result.best_checkpoint.name == "stage1_best.pt"
    with pytest.raises(ValueError, match="multiple of 16"):
        train(data_root=str(root), out=str(tmp_path / "x"), image_size=40)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(data_root=str(root), out=str(tmp_path / "y"), resume=True, **TINY)
    with pytest.raises(FileNotFoundError, match="nothing to resume"):  # a message, not a TypeError on data_root
        train(out=str(tmp_path / "y"), resume=True)
    with pytest.raises(ValueError, match="data_root must be given"):
        train(out=str(tmp_path / "y"))
    assert not (tmp_path / "y").exists()  # a mistyped --out makes no folder
    with pytest.raises(ValueError, match="contradict"):
        train(data_root=str(root), out=str(tmp_path / "run"), resume=True, overwrite=True, **TINY)


def test_an_empty_split_file_stops_training(synth, tmp_path):
    """data check calls an empty val.txt a problem; training once passed over it and held out pairs
    of its own instead."""
    root = tmp_path / "d"
    shutil.copytree(synth, root)
    (root / "val.txt").write_text("\n")
    with pytest.raises(DatasetError, match=r"val\.txt is empty"):
        train(data_root=str(root), out=str(tmp_path / "run"), **TINY)
    assert not (tmp_path / "run").exists()


def test_validation_pairs_that_are_training_pairs_are_named(synth, tmp_path):
    result = train(data_root=str(synth), out=str(tmp_path / "run"), val_split="train",
                   **{**TINY, "stage": "1", "stage1_epochs": 1})
    said = (result.run_dir / "train.log").read_text()
    assert "warning: 8 validation pair(s) are training pairs too" in said
    assert result.best_checkpoint.is_file()  # the run itself goes on
    other = train(data_root=str(synth), out=str(tmp_path / "run2"), **{**TINY, "stage": "1", "stage1_epochs": 1})
    assert "training pairs too" not in (other.run_dir / "train.log").read_text()


def test_without_a_train_split_the_other_splits_stay_out_of_training(tmp_path):
    # Once, with val.txt and test.txt but no train.txt, training took every pair, val and test ones too.
    root = make_synthetic_dataset(tmp_path / "d", train=6, val=2, test=2, size=32)
    (root / "train.txt").unlink()
    one_epoch = {**TINY, "epochs": 1, "stage1_epochs": None}
    train(data_root=str(root), out=str(tmp_path / "run"), stage="1", **one_epoch)
    assert "data: 6 training and 2 validation pairs" in (tmp_path / "run" / "train.log").read_text()
    (root / "val.txt").unlink()  # validation is then held out of the pairs that test.txt does not list
    train(data_root=str(root), out=str(tmp_path / "run2"), stage="1", val_fraction=0.25, **one_epoch)
    split_ids = [(tmp_path / "run2" / "splits" / f"{name}.txt").read_text().split() for name in ("train", "val")]
    not_test = {p.stem for p in (root / "images").iterdir()} - set((root / "test.txt").read_text().split())
    assert sorted(split_ids[0] + split_ids[1]) == sorted(not_test)
    assert len(split_ids[1]) == 2
    (root / "test.txt").write_text("not_downloaded_1\nnot_downloaded_2\n")  # a test split's files need not exist
    train(data_root=str(root), out=str(tmp_path / "run3"), stage="1", val_fraction=0.25, **one_epoch)
    assert "data: 8 training and 2 validation pairs" in (tmp_path / "run3" / "train.log").read_text()


def test_bad_options_fail_before_the_data_is_read(tmp_path):
    nowhere = str(tmp_path / "no-data")  # never reached: each error comes first
    for options, message in [({"stage1_epochs": -2}, "stage1_epochs must be at least 1"),
                             ({"early_stop": -1}, "early_stop must be at least 0"),
                             ({"workers": -1}, "workers must be at least 0"),  # once only after the data loaded
                             ({"val_fraction": 1.0}, "val_fraction must lie between 0 and 1"),
                             ({"encoder_lr": 0.0}, "encoder_lr must be positive"),
                             ({"encoder": "pvt_v2_b2", "image_size": 48}, "multiple of 32 for the pvt_v2_b2"),
                             # once raised only when stage 2 built its network, after stage 1 had trained
                             ({"decoder_channels": 12}, "decoder_channels must be a positive multiple of 8"),
                             # once trained a stage 1 that stage 2 then ignored
                             ({"stage1_checkpoint": "s1.pt"}, "stage1_checkpoint is for stage='2'"),
                             ({"device": "mps"}, "'mps': condseg runs on cpu or cuda")]:
        with pytest.raises(ValueError, match=message):
            train(data_root=nowhere, out=str(tmp_path / "run"), **{**TINY, **options})
    junk = tmp_path / "weights.pt"
    junk.write_text("hello")
    with pytest.raises(ValueError, match=r"cannot load encoder weights .*weights\.pt: not a PyTorch weights file"):
        train(data_root=nowhere, out=str(tmp_path / "run"), encoder_weights=str(junk), **TINY)
    assert not (tmp_path / "run").exists()


def test_a_split_name_given_must_exist(synth, tmp_path):
    """A misspelt --val-split once became a random hold-out of the training pairs."""
    with pytest.raises(DatasetError, match=r"val_split 'vall': no such split in .* \(it has train, val\)"):
        train(data_root=str(synth), out=str(tmp_path / "run"), val_split="vall", **TINY)
    assert not (tmp_path / "run").exists()


def test_overwrite_clears_the_old_run_and_the_log_has_each_epochs_lr(synth, tmp_path):
    root = tmp_path / "noval"
    shutil.copytree(synth, root)
    (root / "val.txt").unlink()  # the first run holds validation pairs out: splits/
    out = tmp_path / "run"
    one = {**TINY, "stage": "1", "stage1_epochs": None, "epochs": 2, "scheduler": "cosine", "stage1_lr": 1e-3}
    train(data_root=str(root), out=str(out), **one)
    assert (out / "splits").is_dir()
    # cosine over 2 epochs: epoch 1 trains at the full rate, epoch 2 at half (the rows once showed
    # the rate after the epoch's scheduler step: 5e-4, then 0)
    rows = list(csv.DictReader(open(out / "log.csv")))
    assert [float(r["lr"]) for r in rows] == pytest.approx([1e-3, 5e-4])
    # one rate for the whole network: the encoder's column shows it too (it was left blank)
    assert [float(r["lr_encoder"]) for r in rows] == pytest.approx([1e-3, 5e-4])
    train(data_root=str(synth), out=str(out), overwrite=True, **one)
    assert not (out / "splits").exists()  # the new run used val.txt: no stale hold-out ids


def test_stage2_run_takes_its_network_from_the_stage1_checkpoint(synth, trained, tmp_path):
    # The tool's own hint for training longer; it once built the default resnet50 and failed to load.
    stage1 = trained.run_dir / "stage1_best.pt"
    result = train(data_root=str(synth), out=str(tmp_path / "s2"), stage="2", stage1_checkpoint=str(stage1),
                   epochs=1, progress=False, tensorboard=False)
    saved = load_checkpoint(result.last_checkpoint)
    assert saved["model_config"]["encoder_name"] == TINY["encoder"]
    assert saved["model_config"]["decoder_channels"] == TINY["decoder_channels"]
    assert saved["train_config"]["image_size"] == TINY["image_size"] and saved["encoder_initialised"]
    with pytest.raises(ValueError, match="holds a resnet18 encoder .* this run builds resnet34"):
        train(data_root=str(synth), out=str(tmp_path / "s2b"), stage="2", stage1_checkpoint=str(stage1),
              encoder="resnet34", epochs=1, progress=False, tensorboard=False)
    assert not (tmp_path / "s2b").exists()  # refused before the data loaded: no run folder left


def test_encoder_weights_are_loaded_and_logged(synth, tmp_path):
    from condseg.models import create_encoder

    weights = tmp_path / "resnet18.pth"
    torch.save(create_encoder("resnet18").state_dict(), weights)
    train(data_root=str(synth), out=str(tmp_path / "run"), stage="1", encoder_weights=str(weights),
          **{**TINY, "epochs": 1, "stage1_epochs": None})
    assert f"stage 1: encoder weights loaded from {weights}" in (tmp_path / "run" / "train.log").read_text()


def test_resume_options_come_from_the_checkpoint(tmp_path):
    from condseg.engine import TrainConfig
    from condseg.engine.train import saved_options

    # a derived stage1_epochs is saved as None, so a resume given new epochs derives it again
    cfg = TrainConfig(data_root="d", out="o", stage="1", epochs=3, encoder="resnet18")
    assert cfg.stage1_epoch_count == 3 and cfg.to_dict()["stage1_epochs"] is None
    resumed = TrainConfig(**{**cfg.to_dict(), "epochs": 5, "resume": True})
    assert resumed.stage1_epoch_count == 5
    assert TrainConfig(data_root="d", out="o", epochs=10).stage1_epoch_count == 2
    # per-call options and fields this version does not know are left out
    run = tmp_path / "run"
    save_checkpoint({"train_config": {**cfg.to_dict(), "removed_option": 1, "overwrite": True}},
                    run / "stage1_last.pt")
    options = saved_options(run)
    assert options["encoder"] == "resnet18" and options["epochs"] == 3
    assert not {"removed_option", "overwrite", "out", "data_root", "resume"} & set(options)
    assert saved_options(tmp_path / "empty") == {}


def test_ddp_two_gloo_processes(synth, tmp_path):
    out = tmp_path / "ddp"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "condseg.cli", "train", str(synth), "--out", str(out), "--epochs", "1", "--stage1-epochs", "1",
           "--image-size", "32", "--batch-size", "2", "--encoder", "resnet18", "--decoder-channels", "16",
           "--device", "cpu", "--no-progress", "--no-tensorboard"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "x2" in (out / "train.log").read_text()
    state = load_checkpoint(out / "stage2_last.pt")
    assert len(state["rng"]) == 2 and state["epoch"] == 1
    assert len(list(csv.DictReader(open(out / "log.csv")))) == 2


def test_multiclass_train_evaluate_predict(synth, tmp_path):
    root = tmp_path / "mc"
    (root / "images").mkdir(parents=True)
    (root / "masks").mkdir()
    for split in ("train", "val"):
        ids = (synth / f"{split}.txt").read_text().split()
        (root / f"{split}.txt").write_text("\n".join(ids) + "\n")
        for sid in ids:
            (root / "images" / f"{sid}.png").write_bytes((synth / "images" / f"{sid}.png").read_bytes())
            blob = np.array(Image.open(synth / "masks" / f"{sid}.png")) > 0
            labels = blob.astype(np.uint8)
            labels[:, 16:] *= 2  # class 1 on the left, class 2 on the right
            Image.fromarray(labels).save(root / "masks" / f"{sid}.png")
    result = train(data_root=str(root), out=str(tmp_path / "run"), classes=3, **{**TINY, "epochs": 1})
    summary = evaluate(result.best_checkpoint, root, split="val")
    assert summary["images"] == 4 and 0 <= summary["mDSC"] <= 1
    # per class, background first; mDSC is the mean of the images' foreground-class means
    assert len(summary["dice_per_class"]) == len(summary["iou_per_class"]) == 3
    assert summary["decision"] == "argmax" and "threshold" not in summary
    assert summary["mDSC"] == pytest.approx(np.mean(summary["dice_per_class"][1:]), abs=1e-6)
    evaluate(result.best_checkpoint, root, split="val", out=tmp_path / "mc.json")
    table = list(csv.DictReader(open(tmp_path / "mc.csv")))
    assert list(table[0]) == ["id", "iou", "dice", "recall", "precision", "dice_0", "dice_1", "dice_2"]
    for row in table:  # an image's Dice is the mean of its foreground classes' Dice
        assert float(row["dice"]) == pytest.approx((float(row["dice_1"]) + float(row["dice_2"])) / 2, abs=2e-6)
    original = evaluate(result.best_checkpoint, root, split="val", original_size=True)
    assert original["dice_per_class"] == pytest.approx(summary["dice_per_class"], abs=1e-6)  # masks are 32x32
    records = predict(result.best_checkpoint, [root / "images" / f"{ids[0]}.png"], tmp_path / "p", overlay=True,
                      workers=0)
    assert set(np.unique(np.array(Image.open(records[0]["mask"])))) <= {0, 1, 2}
    # a threshold means nothing to argmax masks: refused before anything is written
    with pytest.raises(ValueError, match="threshold=0.3 .* applies to binary checkpoints; .* has 3 classes") as e:
        predict(result.best_checkpoint, [root / "images" / f"{ids[0]}.png"], tmp_path / "q", threshold=0.3,
                workers=0)
    assert not (tmp_path / "q").exists()
    from condseg.cli import _message
    assert _message(e.value, "predict").startswith("predict: --threshold applies to binary checkpoints")


def test_masks_that_read_as_background_only(synth, tmp_path):
    root = tmp_path / "data"
    shutil.copytree(synth, root)
    train_ids = (root / "train.txt").read_text().split()
    # one true negative: trains, with a note naming it
    Image.fromarray(np.zeros((32, 32), np.uint8)).save(root / "masks" / f"{train_ids[0]}.png")
    train(data_root=str(root), out=str(tmp_path / "run"), **{**TINY, "epochs": 1, "stage": "1"})
    log = (tmp_path / "run" / "train.log").read_text()
    assert f"note: 1 of 8 training masks read as background only ({train_ids[0]})" in log
    # every training mask saved as 0/1 in a JPEG reads as background only: nothing to learn
    for sid in train_ids:
        mask = np.array(Image.open(synth / "masks" / f"{sid}.png")) > 0
        (root / "masks" / f"{sid}.png").unlink()
        Image.fromarray(mask.astype(np.uint8)).save(root / "masks" / f"{sid}.jpg", quality=95)
    with pytest.raises(DatasetError, match="every training mask .* reads as background only"):
        train(data_root=str(root), out=str(tmp_path / "run2"), **{**TINY, "epochs": 1, "stage": "1"})
    assert not (tmp_path / "run2").exists()

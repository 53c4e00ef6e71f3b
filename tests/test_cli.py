"""The condseg command line: help, data check, train/evaluate/predict round trip, errors, demo."""
import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

import condseg
from condseg.cli import main
from condseg.data import make_synthetic_dataset
from condseg.engine import demo, runtime
from condseg.engine.demo import run_demo

TINY = ["--image-size", "32", "--batch-size", "4", "--encoder", "resnet18", "--decoder-channels", "16",
        "--no-progress", "--no-tensorboard", "--device", "cpu"]

_THREADS = torch.get_num_threads()


def setup_module():
    torch.set_num_threads(1)  # tiny models: one thread is fastest, above all on a busy CPU


def teardown_module():
    torch.set_num_threads(_THREADS)


@pytest.mark.parametrize("argv", [["--help"], ["train", "--help"], ["evaluate", "--help"], ["predict", "--help"],
                                  ["data", "check", "--help"], ["demo", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    assert done.value.code == 0 and "usage: condseg" in capsys.readouterr().out


def test_data_check(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "d", train=3, val=2, size=32)
    assert main(["data", "check", str(root)]) == 0
    assert "no problems found" in capsys.readouterr().out
    (root / "images" / "blob_0001.png").write_bytes(b"broken")
    (root / "val.txt").write_text("blob_0003\nghost\n")
    assert main(["data", "check", str(root)]) == 1
    out = capsys.readouterr().out
    assert "2 problem(s)" in out and "blob_0001.png" in out and "ghost" in out


def test_train_evaluate_predict_round_trip(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "d", train=8, val=4, size=32)
    run = tmp_path / "run"
    assert main(["train", str(root), "--out", str(run), "--epochs", "1", "--stage1-epochs", "1", "--rotation", "5",
                 *TINY]) == 0
    assert "best checkpoint:" in capsys.readouterr().out
    ckpt = run / "stage2_best.pt"
    assert torch.load(ckpt, weights_only=True)["train_config"]["rotation"] == 5.0  # the option reaches training
    out_json = tmp_path / "eval.json"
    assert main(["evaluate", str(ckpt), str(root), "--split", "val", "--out", str(out_json)]) == 0
    assert json.loads(out_json.read_text())["images"] == 4 and out_json.with_suffix(".csv").is_file()
    img = tmp_path / "odd.png"
    Image.fromarray(np.zeros((45, 61, 3), np.uint8)).save(img)
    assert main(["predict", str(ckpt), str(img), "--out", str(tmp_path / "pred"), "--overlay"]) == 0
    assert Image.open(tmp_path / "pred" / "odd.png").size == (61, 45)
    assert (tmp_path / "pred" / "odd_overlay.png").is_file()
    # --resume alone restores the run's options (resnet18 at 32x32, not the resnet50 defaults); the
    # run is finished, so it trains nothing, and more --epochs do not extend it
    capsys.readouterr()
    assert main(["train", str(root), "--out", str(run), "--resume", "--epochs", "3", "--no-progress"]) == 0
    assert "does not extend a finished stage" in capsys.readouterr().out
    assert torch.load(run / "stage2_last.pt", weights_only=True)["epoch"] == 1
    # an option that changes the network cannot resume it; nor can a new run start without --resume
    assert main(["train", str(root), "--out", str(run), "--resume", "--decoder-channels", "64"]) == 1
    err = capsys.readouterr().err
    assert "--decoder-channels=64 (the run has 16)" in err and "--resume restores" in err
    assert main(["train", str(root), "--out", str(run), "--resume", "--lr", "0.5", "--seed", "3"]) == 1
    err = capsys.readouterr().err
    assert "--lr=0.5 (the run has 0.0001)" in err and "--seed=3 (the run has 0)" in err
    assert main(["train", str(root), "--out", str(run), *TINY]) == 1
    assert "--resume" in capsys.readouterr().err


def test_errors_are_messages_not_tracebacks(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "d", train=4, val=2, size=32)
    (root / "train.txt").write_text((root / "train.txt").read_text() + "lost_id\n")
    assert main(["train", str(root), "--out", str(tmp_path / "r"), "--epochs", "1", *TINY]) == 1
    err = capsys.readouterr().err
    assert "lost_id" in err and str(root / "images") in err and "Pass --skip-missing to leave" in err
    assert "=True" not in err  # the Python form is not a flag the command line takes
    assert not (tmp_path / "r").exists()  # no empty run folder left behind
    assert main(["train", str(root), "--out", str(tmp_path / "runs" / "r"), "--epochs", "1", *TINY]) == 1
    assert not (tmp_path / "runs").exists()  # nor the parent it made for it
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "nope.pt"), str(root)]) == 1
    assert "checkpoint not found" in capsys.readouterr().err
    # a wrong encoder name stops before any data is read or any run folder made
    assert main(["train", str(root), "--out", str(tmp_path / "r2"), "--encoder", "resnet5"]) == 1
    assert "unknown encoder 'resnet5'" in capsys.readouterr().err and not (tmp_path / "r2").exists()
    assert main(["evaluate", str(tmp_path / "nope.pt"), str(root), "--device", "gpu"]) == 1
    assert "device 'gpu'" in capsys.readouterr().err
    # training errors name the flags, not the Python fields behind them
    assert main(["train", str(root), "--out", str(tmp_path / "r3"), "--image-size", "70"]) == 1
    err = capsys.readouterr().err
    assert "--image-size must be a multiple of 16" in err and "image_size" not in err
    assert main(["train", str(root), "--out", str(tmp_path / "r3"), "--batch-size", "0"]) == 1
    assert "--batch-size must be at least 1" in capsys.readouterr().err
    # ... but not inside paths: a dataset folder named like a field keeps its name
    named = tmp_path / "image_size"
    named.mkdir()
    assert main(["train", str(named), "--out", str(tmp_path / "r4")]) == 1
    err = capsys.readouterr().err
    assert str(named) in err and "--image-size" not in err


@pytest.mark.parametrize("argv, usage", [
    (["predict", "c.pt", "x.jpg", "--out", "o", "--overlays"], "usage: condseg predict"),
    (["data", "check", "root", "--foo"], "usage: condseg data check"),
    (["train", "root", "--out", "r", "--lrr", "1"], "usage: condseg train"),
])
def test_unknown_options_show_the_commands_usage(argv, usage, capsys):
    with pytest.raises(SystemExit) as done:
        main(argv)
    err = capsys.readouterr().err
    assert done.value.code == 2 and usage in err and "unrecognized arguments" in err
    assert argv[-2 if argv[0] == "train" else -1] in err


def test_ctrl_c_says_how_to_resume(monkeypatch, capsys, tmp_path):
    import condseg.engine

    def interrupted(**options):
        raise KeyboardInterrupt

    monkeypatch.setattr(condseg.engine, "train", interrupted)
    run = tmp_path / "run"
    assert main(["train", "my data", "--out", str(run)]) == 130
    assert capsys.readouterr().err.strip() == "condseg train: interrupted"  # no checkpoint yet: nothing to resume
    run.mkdir()
    (run / "stage1_last.pt").write_bytes(b"")
    assert main(["train", "my data", "--out", str(run)]) == 130
    assert f"interrupted; continue with: condseg train 'my data' --out {run} --resume" in capsys.readouterr().err


@pytest.mark.parametrize("option", ["compile", "cuda_graph"])
@pytest.mark.parametrize("flags, expected", [([], None), (["--{}"], True), (["--no-{}"], False)])
def test_train_compile_flags_reach_the_trainer(option, flags, expected, monkeypatch, capsys, tmp_path):
    """--compile and --cuda-graph set TrainConfig.compile and .cuda_graph; left out, the trainer's
    default (or, with --resume, the run's own setting) decides."""
    import condseg.engine
    seen = []

    def record(**options):
        seen.append(options)
        raise KeyboardInterrupt

    monkeypatch.setattr(condseg.engine, "train", record)
    main(["train", "data", "--out", str(tmp_path / "run"), *(f.format(option.replace("_", "-")) for f in flags)])
    assert seen[0].get(option) is expected


def test_a_compile_failure_is_a_message(tmp_path, monkeypatch, capsys):
    """An inductor that cannot build (no compiler, say) stops --compile training with one line that
    says how to go on, not a traceback; without --compile the same error would not be ours to
    rename."""
    import torch._dynamo.exc as dynamo_exc

    class Broken(torch.nn.Module):
        def forward(self, *args, **kwargs):
            raise dynamo_exc.TorchDynamoException("C++ compile error\nno compiler found")

    def broken_compile(model, **kwargs):
        return Broken()

    monkeypatch.setattr(torch, "compile", broken_compile)
    root = make_synthetic_dataset(tmp_path / "d", train=8, val=2, size=32)
    assert main(["train", str(root), "--out", str(tmp_path / "r"), "--stage", "1", "--stage1-epochs", "1",
                 "--compile", *TINY]) == 1
    err = capsys.readouterr().err
    assert "torch.compile failed (TorchDynamoException: C++ compile error); train without it: --no-compile" in err
    assert "Traceback" not in err and "compile=False" not in err
    log = (tmp_path / "r" / "train.log").read_text()
    assert "torch.compile compiles the training step" in log and "compile=False (CLI: --no-compile)" in log


def test_python_dash_m_runs_the_command():
    done = subprocess.run([sys.executable, "-m", "condseg", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0 and "usage: condseg" in done.stdout


def test_predict_errors_are_messages(tmp_path, capsys):
    root = make_synthetic_dataset(tmp_path / "d", train=8, val=4, size=32)
    run = tmp_path / "run"
    assert main(["train", str(root), "--out", str(run), "--stage", "1", "--epochs", "1", *TINY]) == 0
    capsys.readouterr()
    fake = tmp_path / "fake.jpg"
    fake.write_text("not an image")
    # read by a DataLoader worker process: the message is the file's, not the worker's traceback
    assert main(["predict", str(run / "stage1_best.pt"), str(fake), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert f"cannot read image {fake}" in err and "Traceback" not in err
    assert main(["predict", str(root / "train.txt"), str(fake), "--out", str(tmp_path / "p")]) == 1
    assert "not a condseg checkpoint" in capsys.readouterr().err
    assert main(["predict", str(tmp_path / "nope.pt"), str(root / "images"), "--out", str(tmp_path / "p")]) == 1
    capsys.readouterr()
    # files already in --out: the message names the flag (the Python form is for the API)
    image = root / "images" / "blob_0000.png"
    assert main(["predict", str(run / "stage1_best.pt"), str(image), "--out", str(tmp_path / "p")]) == 0
    assert main(["predict", str(run / "stage1_best.pt"), str(image), "--out", str(tmp_path / "p")]) == 1
    err = capsys.readouterr().err
    assert "pass --overwrite to replace them" in err and "=True" not in err
    assert main(["predict", str(run / "stage1_best.pt"), str(image), "--out", str(tmp_path / "p"), "--overwrite"]) == 0
    # evaluate on a split with a missing id
    (root / "val.txt").write_text((root / "val.txt").read_text() + "lost_id\n")
    assert main(["evaluate", str(run / "stage1_best.pt"), str(root)]) == 1
    err = capsys.readouterr().err
    assert "lost_id" in err and "Pass --skip-missing to leave" in err and "=True" not in err


def test_each_message_is_said_once(tmp_path, capsys):
    """The missing-pairs warning of a run that holds out its own validation pairs (both sets come
    from the one split), and the error of a run that diverged (logged to train.log, printed once)."""
    root = make_synthetic_dataset(tmp_path / "d", train=8, val=2, size=32)
    (root / "val.txt").unlink()
    (root / "train.txt").write_text((root / "train.txt").read_text() + "lost_id\n")
    common = ["--epochs", "1", "--stage1-epochs", "1", *TINY]
    assert main(["train", str(root), "--out", str(tmp_path / "r"), "--stage", "1", "--skip-missing", *common]) == 0
    said = capsys.readouterr()
    assert (said.out + said.err).count("skipping missing pairs") == 1 and "holding out" in said.out
    assert main(["train", str(root), "--out", str(tmp_path / "nan"), "--stage", "1", "--skip-missing",
                 "--stage1-lr", "1e30", *common]) == 1
    said = capsys.readouterr()
    assert (said.out + said.err).count("training stopped") == 1 and "training stopped" in said.err
    assert "training stopped" in (tmp_path / "nan" / "train.log").read_text()


def test_skip_missing_trains(tmp_path):
    root = make_synthetic_dataset(tmp_path / "d", train=8, val=4, size=32)
    (root / "train.txt").write_text((root / "train.txt").read_text() + "lost_id\n")
    assert main(["train", str(root), "--out", str(tmp_path / "r"), "--stage", "1", "--epochs", "1",
                 "--skip-missing", *TINY]) == 0
    assert "lost_id" in (tmp_path / "r" / "train.log").read_text()


def test_demo_small(tmp_path):
    out = run_demo(tmp_path / "demo", train_images=8, val_images=4, epochs=1, stage1_epochs=1, image_size=32,
                   echo=lambda m: None, progress=False, tensorboard=False)
    assert out["checkpoint"].is_file() and out["evaluation"].is_file() and out["curves"].is_file()
    assert len(list(out["predictions"].glob("*_overlay.png"))) == 4
    assert 0 <= out["summary"]["mDSC"] <= 1
    # A second demo in the same folder replaces the first one's run and predictions.
    again = run_demo(tmp_path / "demo", train_images=8, val_images=4, epochs=1, stage1_epochs=1, image_size=32,
                     echo=lambda m: None, progress=False, tensorboard=False)
    assert len(list(again["predictions"].glob("*_overlay.png"))) == 4


@pytest.mark.parametrize("args, error", [(["--epochs", "0"], "epochs must be at least 1"),
                                         (["--device", "cuda:99"], "device cuda")])
def test_demo_checks_its_options_before_writing_anything(tmp_path, capsys, args, error):
    """A bad option or an absent device stops the demo before it writes its data (on a CUDA machine
    cuda:99 is a device that is not there)."""
    assert main(["demo", "--out", str(tmp_path / "demo"), *args]) == 1
    assert error in capsys.readouterr().err
    assert not (tmp_path / "demo").exists()


def test_demo_on_a_busy_cpu_takes_the_idle_cores_only(tmp_path, monkeypatch):
    """Beside busy processes the demo's OpenMP threads wait for each other (543 s against 34 s on one
    thread, 2 cores beside two busy processes): it trains on the idle cores' worth of threads, says
    so, and gives the caller's thread count back."""
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    monkeypatch.setattr(runtime, "idle_cpus", lambda: 0.3)
    seen, said, real_train = [], [], demo.train

    def spy_train(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return real_train(*args, **kwargs)

    monkeypatch.setattr(demo, "train", spy_train)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        demo.run_demo(tmp_path / "demo", train_images=8, val_images=4, epochs=1, stage1_epochs=1, image_size=32,
                      echo=said.append, progress=False, tensorboard=False)
        assert seen == [1] and torch.get_num_threads() == 2
        assert any("runs on 1 thread(s) instead of 2" in line for line in said), said
    finally:
        torch.set_num_threads(before)

    assert runtime.threads_for_idle_cpus(2, None) == 2  # unknown (not Linux): unchanged
    assert runtime.threads_for_idle_cpus(2, 1.9) == 2 and runtime.threads_for_idle_cpus(2, 0.98) == 1
    assert runtime.threads_for_idle_cpus(8, 5.6) == 6 and runtime.threads_for_idle_cpus(4, 0.0) == 1


def test_idle_cpus_from_proc_stat(tmp_path, monkeypatch):
    """/proc/stat's aggregate line, read twice: 3 of 4 jiffies busy over the sample = 75% of the
    machine's CPUs busy (idle counts iowait too)."""
    from condseg.engine import runtime

    stat = tmp_path / "stat"
    stat.write_text("cpu  100 0 100 700 100 0 0 0 0 0\ncpu0 1 2 3 4 5 6 7\n")

    def later(seconds):  # between the two reads: 300 jiffies busy, 100 idle
        stat.write_text("cpu  300 0 200 750 150 0 0 0 0 0\n")

    monkeypatch.setattr(runtime.time, "sleep", later)
    monkeypatch.setattr(runtime.os, "cpu_count", lambda: 4)
    monkeypatch.setattr(runtime.os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    assert runtime.idle_cpus(stat=stat) == pytest.approx(1.0)
    assert runtime.idle_cpus(stat=tmp_path / "missing") is None


@pytest.mark.slow
def test_demo_command(tmp_path, capsys):
    assert main(["demo", "--out", str(tmp_path / "demo")]) == 0
    out = capsys.readouterr().out
    assert "validation: mDSC" in out and "predictions" in out


@pytest.mark.parametrize("busy", [True, False])
def test_train_on_a_busy_cpu_takes_the_idle_cores_only(busy, monkeypatch, capsys, tmp_path):
    """`condseg train` on the CPU does as the demo: beside busy processes (a user's run took 399 s
    for a stage-1 epoch with 2 threads, 44 s with one) it trains on the idle cores' worth of threads
    and says how to choose; OMP_NUM_THREADS, when set, is left alone."""
    import condseg.engine
    seen = []

    def record(**options):
        seen.append(torch.get_num_threads())
        raise KeyboardInterrupt

    monkeypatch.setattr(condseg.engine, "train", record)
    monkeypatch.setattr(runtime, "idle_cpus", lambda: 0.6 if busy else 2.0)
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
        main(["train", "data", "--out", str(tmp_path / "run"), "--device", "cpu"])
        said = capsys.readouterr().out
        assert seen == [1 if busy else 2] and torch.get_num_threads() == 2
        assert ("training runs on 1 thread(s) instead of 2 (set OMP_NUM_THREADS" in said) == busy
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        main(["train", "data", "--out", str(tmp_path / "run"), "--device", "cpu"])
        assert seen[-1] == 2 and "thread(s) instead of" not in capsys.readouterr().out
    finally:
        torch.set_num_threads(before)


def test_bare_command_prints_the_help(capsys):
    with pytest.raises(SystemExit) as done:
        main([])
    out = capsys.readouterr().out
    assert done.value.code == 2 and "usage: condseg" in out and "train" in out and "predict" in out


def test_refusals_name_flags_the_command_line_takes(tmp_path, capsys):
    """Messages naming options in both forms print the flag as the command line takes it (they
    once said "pass --resume=True (--resume)", and argparse refuses --resume=True)."""
    root = make_synthetic_dataset(tmp_path / "d", train=4, val=2, size=32)
    run = tmp_path / "run"
    run.mkdir()
    (run / "stage1_last.pt").write_bytes(b"")
    assert main(["train", str(root), "--out", str(run), "--epochs", "1", *TINY]) == 1
    err = capsys.readouterr().err
    assert "pass --resume to continue it or --overwrite" in err and "=True" not in err
    assert main(["train", str(root), "--out", str(tmp_path / "r2"), "--stage1-checkpoint", "s1.pt", *TINY]) == 1
    err = capsys.readouterr().err
    assert "--stage1-checkpoint is for --stage 2: with --stage both the run" in err and "='" not in err


@pytest.mark.parametrize("flags, winograd", [([], True), (["--no-winograd"], False)])
def test_predict_passes_the_winograd_choice(tmp_path, monkeypatch, capsys, flags, winograd):
    import condseg.engine
    seen = {}

    def fake_predict(checkpoint, inputs, out, **kwargs):
        seen.update(kwargs)
        return []

    monkeypatch.setattr(condseg.engine, "predict", fake_predict)
    assert main(["predict", "model.pt", "photo.png", "--out", str(tmp_path / "masks"), *flags]) == 0
    assert seen["winograd"] is winograd


def test_version_names_the_package_torch_and_the_compiled_kernels(capsys):
    import condseg_ops
    with pytest.raises(SystemExit) as done:
        main(["--version"])
    said = capsys.readouterr().out
    assert condseg.__version__ != "unknown"  # the installed distribution's version
    assert done.value.code == 0 and said.startswith(f"condseg {condseg.__version__}, torch {torch.__version__}")
    info = condseg_ops.build_info()
    assert all(name in said for name in info["backends"]) if info else "reference backend only" in said

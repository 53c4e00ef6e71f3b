"""The CUDA-graph training step (condseg.engine.graphed, ``condseg train --cuda-graph``): what a
CPU can check (the step reads nothing on the host, skips a non-finite loss's update, equals
Adam's plain step) and, on a GPU, the captured step against the eager one."""
import copy
import types

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from condseg.data import make_synthetic_dataset
from condseg.engine import TrainConfig, train
from condseg.engine.builders import build_model, make_optimizer, model_config
from condseg.engine.graphed import GraphedTrainStep, make_capturable, train_step
from condseg.engine.loops import loss_function
from condseg.inference import set_cdfa_backend
from conftest import requires_cuda

CFG = types.SimpleNamespace(consistency_threshold=0.5)
TINY = dict(image_size=32, batch_size=4, encoder="resnet18", decoder_channels=16, epochs=2, stage1_epochs=1,
            progress=False, tensorboard=False, stage1_lr=1e-3, lr=1e-3, encoder_lr=1e-4)


@pytest.fixture(scope="module")
def synth(tmp_path_factory):
    return make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", train=8, val=4, size=32, seed=0)


class HostReads(TorchDispatchMode):
    """Records the ops that read a tensor's value on the host (``.item()``, ``float(t)``,
    ``bool(t)``) or size their output by the data: a CUDA-graph capture cannot hold them."""
    SYNCING = {"aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::_unique2",
               "aten::unique_consecutive", "aten::unique_dim", "aten::equal"}

    def __enter__(self):
        self.seen, self.ops = [], 0
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops += 1
        if func._schema.name in self.SYNCING:
            self.seen.append(func._schema.name)
        return func(*args, **(kwargs or {}))


def small(stage, backend=None, device="cpu"):
    """A light network of ``stage`` with its op on ``backend`` (None: the automatic choice)."""
    torch.manual_seed(0)
    model = build_model(model_config(stage, "resnet18", decoder_channels=16)).to(device).train()
    return set_cdfa_backend(model, backend) if stage == 2 else model


def batch(stage, device="cpu", size=32, n=2):
    gen = torch.Generator().manual_seed(1)
    x = torch.randn(2 * n if stage == 1 else n, 3, size, size, generator=gen).to(device)
    mask = (torch.rand(n, 1, size, size, generator=gen) > 0.5).float().to(device)
    return x, mask, mask.clone()


@pytest.mark.parametrize("stage, backend", [(1, None), (2, None), (2, "reference")])
def test_capturable_step_reads_nothing_on_the_host(stage, backend):
    """Both stages' steps, as the trainer captures them, run without one host read (on a CPU,
    where no capture can be, the same code); the detector does see one."""
    model = small(stage, backend)
    optimizer = make_optimizer(model, lr=1e-3)
    make_capturable(optimizer)
    compute = loss_function(model, stage, CFG, torch.device("cpu"), None, cache=False)
    inputs = batch(stage)
    train_step(compute, optimizer, inputs)  # Adam's state appears at the first step; capture comes later
    with HostReads() as reads:
        loss, parts = train_step(compute, optimizer, inputs)
    assert reads.ops > 300 and reads.seen == [], reads.seen
    with HostReads() as reads:
        float(loss)
    assert reads.seen == ["aten::_local_scalar_dense"]


def test_capturable_step_is_adams_step():
    """A finite step of train_step (capturable fused Adam, found_inf clear) moves the weights as
    the trainer's plain step does."""
    model = small(2)
    twin = copy.deepcopy(model)
    inputs = batch(2)
    optimizer = make_optimizer(model, lr=1e-3)
    make_capturable(optimizer)
    compute = loss_function(model, 2, CFG, torch.device("cpu"), None)
    plain_optimizer = make_optimizer(twin, lr=1e-3)
    plain_compute = loss_function(twin, 2, CFG, torch.device("cpu"), None)
    for _ in range(2):
        loss, parts = train_step(compute, optimizer, inputs)
        plain_optimizer.zero_grad(set_to_none=True)
        plain_loss, plain_parts = plain_compute(*inputs)
        plain_loss.backward()
        plain_optimizer.step()
        assert loss == pytest.approx(float(plain_loss.detach()), rel=1e-5)
        assert parts.keys() == plain_parts.keys()
    for (name, p), q in zip(model.named_parameters(), twin.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6, msg=name)


def test_a_non_finite_loss_leaves_weights_and_adam_state_alone():
    model = small(2)
    optimizer = make_optimizer(model, lr=1e-3)
    found_inf = make_capturable(optimizer)
    compute = loss_function(model, 2, CFG, torch.device("cpu"), None)
    inputs = batch(2)
    train_step(compute, optimizer, inputs)
    before = copy.deepcopy((model.state_dict(), optimizer.state_dict()["state"]))

    def broken(*inputs):
        loss, parts = compute(*inputs)
        return loss * float("nan"), parts

    loss, _ = train_step(broken, optimizer, inputs)
    assert torch.isnan(loss) and found_inf.item() == 1
    after = (model.state_dict(), optimizer.state_dict()["state"])
    for name, value in before[0].items():
        if not name.endswith(("running_mean", "running_var", "num_batches_tracked")):  # the forward's, as eagerly
            assert torch.equal(value, after[0][name]), name
    for index, state in before[1].items():
        for key, value in state.items():
            assert torch.equal(value, after[1][index][key]), (index, key)
    train_step(compute, optimizer, inputs)  # the next finite step updates again
    assert found_inf.item() == 0 and optimizer.state_dict()["state"][0]["step"].item() == 2


def test_the_skip_flag_is_float32_whatever_the_default_dtype():
    """The fused kernel reads found_inf as a 0-dim float32: a flag made under a float64 default
    dtype would fail the step."""
    model = small(2)
    optimizer = make_optimizer(model, lr=1e-3)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.float64)
    try:
        found_inf = make_capturable(optimizer)
    finally:
        torch.set_default_dtype(default)
    assert found_inf.dtype == torch.float32 and found_inf.dim() == 0
    train_step(loss_function(model, 2, CFG, torch.device("cpu"), None), optimizer, batch(2))


def test_graphed_step_refuses_what_it_cannot_capture():
    model = small(2)
    with pytest.raises(ValueError, match="one CUDA device, got \\['cpu'\\]"):
        GraphedTrainStep(lambda *a: None, make_optimizer(model, lr=1e-3))
    with pytest.raises(ValueError, match="must be fused"):
        make_capturable(torch.optim.SGD(model.parameters(), lr=1e-3))


def test_cuda_graph_option_is_checked_before_training(tmp_path):
    with pytest.raises(ValueError, match="pass one of them"):
        TrainConfig(data_root="d", out="o", cuda_graph=True, compile=True)
    with pytest.raises(ValueError, match=r"cuda_graph=True \(CLI: --cuda-graph\) needs a CUDA device"):
        train(data_root=str(tmp_path), out=str(tmp_path / "run"), cuda_graph=True, device="cpu",
              encoder="resnet18", image_size=32)
    assert not (tmp_path / "run").exists()


@requires_cuda
@pytest.mark.parametrize("stage", [1, 2])
def test_cuda_graphed_step_trains_like_the_eager_step(stage):
    """The graph's steps (three eager warm-up steps, the capture, replays, a smaller batch eagerly)
    against the trainer's eager step from the same weights; a NaN loss's replay changes nothing."""
    device = torch.device("cuda")
    model = small(stage, device=device)
    twin = copy.deepcopy(model)
    graphed = GraphedTrainStep(loss_function(model, stage, CFG, device, torch.bfloat16, cache=False),
                               make_optimizer(model, lr=1e-3))
    optimizer = make_optimizer(twin, lr=1e-3)
    compute = loss_function(twin, stage, CFG, device, torch.bfloat16)
    inputs, last = batch(stage, device, 64, n=4), batch(stage, device, 64, n=2)
    for i in range(7):
        data = last if i == 6 else inputs
        loss = float(graphed(*data)[0])
        optimizer.zero_grad(set_to_none=True)
        expected, _ = compute(*data)
        expected.backward()
        optimizer.step()
        assert loss == pytest.approx(float(expected.detach()), rel=2e-2), i
    assert graphed.graph is not None and graphed.calls == 7
    weights = [p.detach().clone() for p in model.parameters()]
    graphed.compute_loss = None  # a replay never calls it
    nan_inputs = [t.clone() for t in inputs]
    nan_inputs[0][0, 0, 0, 0] = float("nan")
    assert torch.isnan(graphed(*nan_inputs)[0]).item()
    assert all(torch.equal(w, p) for w, p in zip(weights, model.parameters()))
    graphed.close()
    assert not hasattr(graphed.optimizer, "found_inf")


class EagerStandIn:
    """GraphedTrainStep's interface on a CPU: what the trainer's loop does with it (one per epoch,
    the step's (loss, parts), the non-finite skip, close) runs without a GPU."""
    made = []

    def __init__(self, compute_loss, optimizer):
        self.compute_loss, self.optimizer, self.calls, self.closed = compute_loss, optimizer, 0, False
        make_capturable(optimizer)
        EagerStandIn.made.append(self)

    def __call__(self, *inputs):
        self.calls += 1
        return train_step(self.compute_loss, self.optimizer, inputs)

    def close(self):
        del self.optimizer.found_inf
        self.closed = True


@pytest.fixture
def stand_in(monkeypatch):
    import importlib
    from condseg.engine import loops
    trainer = importlib.import_module("condseg.engine.train")._Trainer  # the package exports train()
    monkeypatch.setattr(loops, "GraphedTrainStep", EagerStandIn)
    monkeypatch.setattr(trainer, "_check_cuda_graph", lambda self: None)
    EagerStandIn.made = []
    return EagerStandIn


def test_trainer_loop_takes_the_graphed_step(synth, stand_in, tmp_path):
    """With cuda_graph the loop trains through the step object (one per epoch, closed after it)
    and ends where the eager loop ends."""
    options = dict(data_root=str(synth), **TINY)
    graphed = train(out=str(tmp_path / "graphed"), cuda_graph=True, **options)
    assert len(stand_in.made) == 3 and all(s.closed and s.calls == 2 for s in stand_in.made)  # 1 + 2 epochs
    assert "each epoch's step captured as a CUDA graph" in (tmp_path / "graphed" / "train.log").read_text()
    eager = train(out=str(tmp_path / "eager"), **options)
    assert len(stand_in.made) == 3
    for row, expected in zip(graphed.history, eager.history):
        assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=1e-4)
        assert row["val_mDSC"] == pytest.approx(expected["val_mDSC"], abs=1e-3)


def test_trainer_stops_on_a_non_finite_graphed_step(synth, stand_in, tmp_path, monkeypatch):
    from condseg.engine import TrainingDiverged, load_checkpoint, loops
    real, calls = loops.losses.stage1_loss, {"n": 0}

    def poisoned(*args, **kwargs):
        calls["n"] += 1
        loss = real(*args, **kwargs)
        return loss * float("nan") if calls["n"] > 2 else loss  # epoch 1 has 2 steps

    monkeypatch.setattr(loops.losses, "stage1_loss", poisoned)
    out = tmp_path / "run"
    with pytest.raises(TrainingDiverged, match="nan"):
        train(data_root=str(synth), out=str(out), cuda_graph=True, **{**TINY, "stage1_epochs": 3})
    assert stand_in.made[-1].closed  # the loop closed the step on its way out
    state = load_checkpoint(out / "stage1_last.pt")
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["model"].values()
                                       if v.is_floating_point())


def test_cli_names_the_flags(capsys, tmp_path):
    from condseg.cli import main
    assert main(["train", "data", "--out", str(tmp_path / "run"), "--cuda-graph", "--compile"]) != 0
    assert "error: --cuda-graph and --compile are two ways to the same end" in capsys.readouterr().err


@requires_cuda
def test_cuda_trainer_with_cuda_graph_trains_like_without(tmp_path_factory):
    """The whole trainer on a GPU, with a worker process and the pin-memory thread running beside
    the capture: six steps an epoch (three warm-up, the capture, replays), losses as without."""
    data = make_synthetic_dataset(tmp_path_factory.mktemp("synth") / "data", train=24, val=4, size=32, seed=0)
    options = dict(TINY, data_root=str(data), device="cuda", workers=1, amp="bf16")
    runs = {flag: train(out=str(tmp_path_factory.mktemp("run") / "run"), cuda_graph=flag, **options)
            for flag in (False, True)}
    for row, expected in zip(runs[True].history, runs[False].history):
        assert row["train_loss"] == pytest.approx(expected["train_loss"], rel=5e-2), (row, expected)

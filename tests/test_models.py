import io

import numpy as np
import pytest
import torch

import condseg
from condseg.losses import stage1_loss, stage2_loss

RELEASED_CONDSEG_PARAMS = 45_552_786
RELEASED_STAGE1_PARAMS = 8_662_848
# torchvision / official totals minus the parts the encoders drop (ResNet layer4 + fc, VGG
# classifier, PVT head).
ENCODER_PARAMS = {"resnet18": 2_782_784, "resnet34": 8_170_304, "resnet50": 8_543_296,
                  "vgg19": 20_024_384, "pvt_v2_b2": 24_849_856}


def n_params(module):
    return sum(p.numel() for p in module.parameters())


def small_model(encoder="resnet18", **kwargs):
    torch.manual_seed(0)
    return condseg.ConDSeg(encoder, decoder_channels=16, **kwargs)


def blobs(batch=4, size=64, seed=0):
    """Synthetic images: a bright disc (the foreground) on a noisy background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    centre = torch.randint(size // 4, 3 * size // 4, (batch, 2, 1, 1), generator=g)
    radius = torch.randint(size // 8, size // 4, (batch, 1, 1, 1), generator=g)
    mask = ((yy - centre[:, :1]) ** 2 + (xx - centre[:, 1:]) ** 2 <= radius ** 2).float()
    image = 0.3 * torch.rand(batch, 3, size, size, generator=g) + 0.6 * mask
    return image, mask


# ------------------------------------------------------------------------------------------- size

@pytest.mark.parametrize("variant", ["paper", "official"])
def test_condseg_parameter_count_matches_release(variant):
    count = n_params(condseg.ConDSeg(cdfa_variant=variant))
    assert abs(count - RELEASED_CONDSEG_PARAMS) / RELEASED_CONDSEG_PARAMS < 0.01, count


def test_stage1_parameter_count_matches_release():
    count = n_params(condseg.ConDSegStage1())
    assert abs(count - RELEASED_STAGE1_PARAMS) / RELEASED_STAGE1_PARAMS < 0.01, count


@pytest.mark.parametrize("name", sorted(ENCODER_PARAMS))
def test_encoder_parameter_counts(name):
    assert n_params(condseg.create_encoder(name)) == ENCODER_PARAMS[name]


def test_registry():
    assert set(condseg.list_encoders()) == set(ENCODER_PARAMS)
    with pytest.raises(ValueError, match="unknown encoder 'resnet99'.*resnet50"):
        condseg.ConDSeg("resnet99")


# ----------------------------------------------------------------------------------------- shapes

@pytest.mark.parametrize("classes", [1, 4])
@pytest.mark.parametrize("encoder", sorted(ENCODER_PARAMS))
def test_output_shapes_every_encoder(encoder, classes):
    model = small_model(encoder, classes=classes).eval()
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        mask = model(x)
        out = model(x, return_aux=True)
    assert mask.shape == (2, classes, 64, 96)
    assert isinstance(out, condseg.ConDSegOutput)
    assert out.mask.shape == (2, classes, 64, 96)
    assert out.fg.shape == out.bg.shape == out.uc.shape == (2, 1, 64, 96)
    torch.testing.assert_close(out.mask, mask)
    if classes == 1:
        stage1 = condseg.ConDSegStage1(encoder).eval()
        with torch.no_grad():
            assert stage1(x).shape == (2, 1, 64, 96)


@pytest.mark.parametrize("size", [(96, 96), (96, 32), (256, 256)])
def test_output_sizes(size):
    model = small_model(in_channels=1).eval()
    with torch.no_grad():
        assert model(torch.randn(1, 1, *size)).shape == (1, 1, *size)


def test_inference_skips_auxiliary_head():
    model = small_model().eval()
    called = []
    for module in (*model.aux_head.values(), model.decouple.uc):
        module.register_forward_hook(lambda *args: called.append(1))
    with torch.no_grad():
        model(torch.randn(1, 3, 64, 64))
        assert not called
        model(torch.randn(1, 3, 64, 64), return_aux=True)
    assert len(called) == 4   # the uc branch and the three aux branches


@pytest.mark.parametrize("kwargs, name", [(dict(classes=0), "classes"), (dict(classes=2.5), "classes"),
                                          (dict(in_channels=0), "in_channels"), (dict(in_channels=True), "in_channels")])
def test_bad_counts_name_the_argument(kwargs, name):
    with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
        condseg.ConDSeg("resnet18", decoder_channels=8, **kwargs)
    if name == "in_channels":
        with pytest.raises(ValueError, match=f"{name} must be an integer >= 1"):
            condseg.ConDSegStage1("resnet18", **kwargs)


def test_bad_input_size_says_how_to_pad():
    model = small_model()
    with pytest.raises(ValueError, match="multiples of 16, got 250x300: pad to 256x304"):
        model(torch.randn(1, 3, 250, 300))
    with pytest.raises(ValueError, match="multiples of 32"):
        condseg.ConDSegStage1("pvt_v2_b2")(torch.randn(1, 3, 48, 64))


def test_wrong_channel_count_names_in_channels():
    with pytest.raises(ValueError, match=r"ConDSeg was built for in_channels=3, got an input of 1 channels"):
        small_model()(torch.randn(1, 1, 64, 64))
    stage1 = condseg.ConDSegStage1("resnet18", in_channels=1)
    with pytest.raises(ValueError, match=r"ConDSegStage1 was built for in_channels=1, got an input of 3 channels"):
        stage1(torch.randn(2, 3, 32, 32))
    assert stage1(torch.randn(2, 1, 32, 32)).shape == (2, 1, 32, 32)


def test_full_model_forward_small_input():
    model = condseg.ConDSeg().eval()
    with torch.no_grad():
        out = model(torch.randn(1, 3, 64, 64), return_aux=True)
    assert out.mask.shape == out.uc.shape == (1, 1, 64, 64)
    assert all(torch.isfinite(t).all() for t in out)


# ----------------------------------------------------------------------------------- CDFA backend

@pytest.mark.parametrize("variant", ["paper", "official"])
def test_cdfa_compiled_backend_matches_reference(variant):
    condseg_ops = pytest.importorskip("condseg_ops")
    if "cpu" not in condseg_ops.available_backends():
        pytest.skip("the compiled CPU backend of condseg_ops is not built")
    model = small_model(cdfa_variant=variant).double()
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64)
    results = {}
    for backend in ("reference", "cpu"):
        model.zero_grad()
        with condseg_ops.use_backend(backend):
            out = model(x, return_aux=True)
        (out.mask.square().mean() + out.fg.mean()).backward()
        grads = [p.grad.clone() for p in model.cdfa.parameters()]
        results[backend] = (out.mask.detach(), grads)
    # Train mode: BatchNorm uses batch statistics, so the running-stat update of the first pass
    # does not change the second.
    torch.testing.assert_close(results["cpu"][0], results["reference"][0], rtol=0, atol=1e-10)
    for got, want in zip(results["cpu"][1], results["reference"][1]):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)


# ------------------------------------------------------------------------- state and weight files

def test_state_dict_round_trip():
    model = small_model(classes=3).eval()
    buffer = io.BytesIO()
    torch.save(model.state_dict(), buffer)
    buffer.seek(0)
    clone = condseg.ConDSeg("resnet18", decoder_channels=16, classes=3).eval()
    clone.load_state_dict(torch.load(buffer, weights_only=True))
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(clone(x), model(x), rtol=0, atol=0)


def test_imagenet_style_file_loads(tmp_path):
    """A torchvision-style file: full network (layer4, fc), no num_batches_tracked, 3 input
    channels; loads into a 1-channel encoder with summed first-conv filters."""
    source = condseg.create_encoder("resnet18")
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    state["layer4.0.conv1.weight"] = torch.zeros(512, 256, 3, 3)
    state["fc.weight"], state["fc.bias"] = torch.zeros(1000, 512), torch.zeros(1000)
    path = tmp_path / "resnet18-imagenet.pth"
    torch.save(state, path)
    model = condseg.ConDSeg("resnet18", encoder_weights=str(path), in_channels=1, decoder_channels=16)
    torch.testing.assert_close(model.encoder.conv1.weight, state["conv1.weight"].sum(1, keepdim=True))
    torch.testing.assert_close(model.encoder.layer3[1].bn2.running_var, state["layer3.1.bn2.running_var"])


def test_mismatched_weight_file_names_keys_and_shapes(tmp_path):
    state = condseg.create_encoder("resnet18").state_dict()
    state["layer1.0.conv1.weight"] = torch.zeros(64, 64, 1, 1)
    state["extra.weight"] = torch.zeros(1)
    del state["layer2.0.bn1.running_mean"]
    path = tmp_path / "bad.pth"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ValueError) as error:
        condseg.ConDSegStage1("resnet18", encoder_weights=path)
    message = str(error.value)
    assert str(path) in message
    assert "missing keys: layer2.0.bn1.running_mean" in message
    assert "unexpected keys: extra.weight" in message
    assert "layer1.0.conv1.weight: got (64, 64, 1, 1), expected (64, 64, 3, 3)" in message
    with pytest.raises(FileNotFoundError, match="nothing is downloaded"):
        condseg.ConDSeg("resnet18", encoder_weights=tmp_path / "absent.pth")


def test_stage1_encoder_transfer():
    stage1 = condseg.ConDSegStage1("resnet18")
    image, mask = blobs(batch=2, size=32)
    stage1(image)   # train-mode forward: BatchNorm running statistics move away from (0, 1)
    model = small_model()
    assert model.load_stage1_encoder(stage1) is None
    for key, value in stage1.encoder.state_dict().items():
        torch.testing.assert_close(model.encoder.state_dict()[key], value, rtol=0, atol=0)
    model.encoder.bn1.running_mean.zero_()
    model.load_stage1_encoder(stage1.state_dict())
    torch.testing.assert_close(model.encoder.bn1.running_mean, stage1.encoder.bn1.running_mean)
    with pytest.raises(ValueError, match="the stage-1 encoder.*(missing keys|mismatched).*layer"):
        condseg.ConDSeg("resnet34", decoder_channels=16).load_stage1_encoder(stage1)


# ------------------------------------------------------------------------------------ optimisation

def train_steps(model, loss_fn, image, mask, steps, lr=1e-3):
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        optimizer.zero_grad()
        loss = loss_fn(model, image, mask)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses


def condseg_loss(model, image, mask):
    return stage2_loss(model(image, return_aux=True), mask)[0]


def stage1_loss_fn(model, image, mask):
    brighter = (image * 0.8 + 0.2).clamp(0, 1)   # a photometric "augmentation"
    return stage1_loss(model(image), model(brighter), mask)


def test_optimisation_reduces_loss_synthetic():
    image, mask = blobs(batch=4, size=32)
    losses = train_steps(small_model(), condseg_loss, image, mask, steps=4)
    assert losses[-1] < losses[0], losses
    torch.manual_seed(0)
    losses = train_steps(condseg.ConDSegStage1("resnet18"), stage1_loss_fn, image, mask, steps=4)
    assert losses[-1] < losses[0], losses


def load_kvasir(root, count=4, size=32):
    from PIL import Image
    ids = (root / "train.txt").read_text().split()[:count]
    images, masks = [], []
    for name in ids:
        image = Image.open(root / "images" / f"{name}.jpg").convert("RGB").resize((size, size))
        mask = Image.open(root / "masks" / f"{name}.jpg").convert("L").resize((size, size))
        images.append(np.asarray(image, dtype=np.float32).transpose(2, 0, 1) / 255.0)
        masks.append((np.asarray(mask) >= 128).astype(np.float32)[None])
    return torch.from_numpy(np.stack(images)), torch.from_numpy(np.stack(masks))


def test_optimisation_reduces_loss_real_images(kvasir_root):
    image, mask = load_kvasir(kvasir_root)
    assert 0 < mask.mean() < 1
    losses = train_steps(small_model(), condseg_loss, image, mask, steps=4)
    assert losses[-1] < losses[0], losses


# ------------------------------------------------------------------------------------------ compile

@pytest.mark.slow
def test_torch_compile_matches_eager():
    """The whole network traces as one graph (the CDFA op is a real custom op: no graph breaks),
    through AOT autograd and the op's fake kernel. aot_eager keeps this to seconds; inductor's code
    generation for the same network is tested by test_fps.py::test_compiled_runner_matches_eager_on_cpu."""
    model = small_model().eval()
    x = torch.randn(1, 3, 32, 32)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-4, atol=1e-4)


def test_channel_attention_matches_separate_mlp_passes():
    """The batched MLP pass (avg and max vectors together) is CBAM's two separate passes."""
    from condseg.models.blocks import ChannelAttention

    torch.manual_seed(0)
    attention = ChannelAttention(32).double()
    x = torch.randn(3, 32, 5, 7, dtype=torch.float64)
    w1 = attention.fc1.weight.flatten(1)
    w2 = attention.fc2.weight.flatten(1)
    mlp = lambda v: torch.relu(v @ w1.T) @ w2.T  # noqa: E731
    gate = torch.sigmoid(mlp(x.mean(dim=(2, 3))) + mlp(x.amax(dim=(2, 3))))
    torch.testing.assert_close(attention(x), x * gate[:, :, None, None], rtol=1e-12, atol=1e-12)


def test_enhancement_batches_its_branch_attentions_exactly():
    """The FEM's one grouped channel attention over its four stacked branches is each branch's
    own attention (conv, then its ChannelAttention), concatenated: same function, float64."""
    from condseg.models.blocks import DilatedConvEnhancement

    torch.manual_seed(0)
    fem = DilatedConvEnhancement(12, 32, dilations=(1, 2, 3)).double().eval()
    for module in fem.modules():   # non-trivial BatchNorm statistics
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    x = torch.randn(2, 12, 9, 11, dtype=torch.float64)
    per_branch = torch.cat([branch(x) for branch in fem.branches], dim=1)
    expected = fem.sa(torch.relu(fem.fuse(per_branch) + fem.shortcut(x)))
    with torch.no_grad():
        torch.testing.assert_close(fem(x), expected, rtol=1e-12, atol=1e-12)
    # and the same gradients for every branch's own MLP
    mlp_weights = [p for branch in fem.branches for p in branch[1].parameters()]
    upstream = torch.randn_like(expected)
    got = torch.autograd.grad(fem(x), mlp_weights, upstream)
    want = torch.autograd.grad(expected, mlp_weights, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, rtol=1e-10, atol=1e-12)
    assert any(g.abs().sum() > 0 for g in got)


def test_decoder_block_is_the_released_dense_residual_steps():
    """DecoderBlock, written out as the released code does: each step adds every earlier output."""
    from condseg.models.blocks import DecoderBlock, upsample

    torch.manual_seed(0)
    block = DecoderBlock(16, 8, 32).double().eval()
    x, skip = torch.randn(2, 16, 4, 5, dtype=torch.float64), torch.randn(2, 8, 8, 10, dtype=torch.float64)
    d0, d1, d2 = block.dense
    s1 = block.reduce(torch.cat([upsample(x, 2), skip], dim=1))
    s2 = torch.relu(d0(s1) + s1)
    s3 = torch.relu(d1(s2) + s1 + s2)
    s4 = torch.relu(d2(s3) + s1 + s2 + s3)
    with torch.no_grad():
        torch.testing.assert_close(block(x, skip), block.sa(block.ca(s4)), rtol=1e-12, atol=1e-12)

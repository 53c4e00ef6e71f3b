"""The demo: synthetic data, a small two-stage training run on CPU, evaluation and overlays."""
from pathlib import Path

from ..data.synthetic import make_synthetic_dataset
from .evaluate import evaluate, evaluation_files
from .config import TrainConfig
from .predict import predict
from .runtime import resolve_device, threads_for_a_busy_cpu
from .train import train

DEMO = dict(image_size=64, batch_size=8, encoder="resnet18", decoder_channels=16, stage1_lr=1e-3, lr=1e-3,
            encoder_lr=3e-4, scheduler="cosine", early_stop=0)


def run_demo(out="condseg-demo", train_images=96, val_images=32, epochs=8, stage1_epochs=2, device="cpu",
             seed=0, echo=print, **options):
    """Make synthetic data in ``out/data``, train both stages into ``out/run``, evaluate on the
    validation split (``out/eval.json``, ``out/eval.csv``) and write overlays of the validation images
    (``out/predictions``). Returns a dict of those paths and the evaluation summary."""
    with threads_for_a_busy_cpu(device, echo, "the demo"):
        return _run(Path(out), train_images, val_images, epochs, stage1_epochs, device, seed, echo, options)


def _run(out, train_images, val_images, epochs, stage1_epochs, device, seed, echo, options):
    # The options and the device are checked before anything is written.
    config = TrainConfig(data_root=str(out / "data"), out=str(out / "run"), epochs=epochs,
                         stage1_epochs=stage1_epochs, device=device, seed=seed, overwrite=True, **{**DEMO, **options})
    resolve_device(device)
    data = make_synthetic_dataset(out / "data", train=train_images, val=val_images, size=DEMO["image_size"],
                                  seed=seed)
    echo(f"synthetic dataset: {train_images} training and {val_images} validation images in {data}")
    result = train(config)
    evaluation, per_image = evaluation_files(out / "eval.json")
    summary = evaluate(result.best_checkpoint, data, split="val", out=evaluation, device=device)
    val_images_dir = [data / "images" / f"{i}.png" for i in (data / "val.txt").read_text().split()]
    predict(result.best_checkpoint, val_images_dir, out / "predictions", overlay=True, uncertainty=True,
            device=device, workers=0, overwrite=True)  # the demo's own folder: a second demo replaces it
    return {"data": data, "run": result.run_dir, "checkpoint": result.best_checkpoint, "curves":
            result.run_dir / "curves.png", "evaluation": evaluation, "per-image": per_image,
            "predictions": out / "predictions",
            "summary": {k: v for k, v in summary.items() if k != "per_image"}}

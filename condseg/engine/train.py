"""Two-stage ConDSeg training (DESIGN.md section 5): stage 1, stage 2, or both in one call.

Run folder contents: stage1_last.pt / stage1_best.pt, stage2_last.pt / stage2_best.pt (last: full
state for resuming; best: weights of the best validation mDSC), log.csv, curves.png, train.log,
tensorboard/ (when installed), splits/ (when a validation split had to be held out).
"""
import dataclasses
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, DistributedSampler

from ..data.dataset import SegmentationDataset, as_size, collate
from ..data.errors import DatasetError
from ..data.layouts import available_splits, find_samples, format_ids, resolve_layout, shared_images
from ..models.encoders import read_weights_file
from .builders import build_model, make_optimizer, make_scheduler, model_config
from .checkpoints import load_checkpoint, save_checkpoint
from .config import TrainConfig
from .folders import missing_folders, remove_empty
from .loops import CompileFailed, TrainingDiverged, memory_format, train_epoch, validate
from .runlog import RunLog
from .runtime import (amp_dtype, barrier, broadcast, close_distributed, denormals_flushed, gather,
                      init_distributed, resolve_device, rng_state, seed_everything, set_deterministic,
                      set_rng_state)

PRELOAD_LIMIT = 4 << 30  # bytes of decoded uint8 pixels kept in memory by preload="auto"


@dataclass
class TrainResult:
    run_dir: Path
    best_checkpoint: Path
    last_checkpoint: Path
    best_metrics: dict
    history: list = field(default_factory=list)
    train_pairs: int = 0    # training image/mask pairs of the run (all ranks together)


def checkpoint_path(run_dir, stage, kind):
    return Path(run_dir) / f"stage{stage}_{kind}.pt"


# Options of one invocation, never taken from the run being resumed.
PER_CALL_OPTIONS = ("data_root", "out", "resume", "overwrite")


def saved_options(run_dir):
    """The TrainConfig fields of the run in run_dir (from its newest stage*_last.pt), less the
    per-call ones and any this version does not know; {} when the folder holds no run."""
    known = {f.name for f in dataclasses.fields(TrainConfig)} - set(PER_CALL_OPTIONS)
    for stage in (2, 1):
        path = checkpoint_path(run_dir, stage, "last")
        if path.is_file():
            saved = load_checkpoint(path, mmap=True).get("train_config", {})  # read twice per resume: no weights
            return {k: v for k, v in saved.items() if k in known}
    return {}


# Options of the network (and its input size) that a stage-2 run takes from its stage-1 checkpoint.
STAGE1_NETWORK_OPTIONS = ("encoder", "in_channels", "classes", "decoder_channels", "cdfa_variant", "image_size")

# The training recipe, which a resumed run cannot change: its optimizer and scheduler states bring
# back the run's own learning rates, weight decay and schedule, the seed drew its data order,
# random streams and held-out validation pairs, and the splits decide what its best checkpoint was
# measured on. Stage 1's loss threshold counts while stage 1 is unfinished. (A new batch size or
# rotation is honoured, and the log says so: a smaller GPU must be able to go on.)
RECIPE_OPTIONS = ("stage1_lr", "lr", "encoder_lr", "weight_decay", "scheduler", "lr_patience", "lr_factor", "seed",
                  "train_split", "val_split", "val_fraction")
STAGE1_RECIPE_OPTIONS = ("consistency_threshold",)


def stage1_network_options(path):
    """The network options of the run that wrote the stage-1 checkpoint at ``path`` (a stage-2 run
    started from it takes those it is not given)."""
    state = load_checkpoint(path)
    saved = {k: v for k, v in state.get("train_config", {}).items() if k in STAGE1_NETWORK_OPTIONS}
    saved.update(encoder=state["model_config"]["encoder_name"], in_channels=state["model_config"]["in_channels"])
    return saved


def train(config=None, **options):
    """Train ConDSeg; ``config`` is a TrainConfig, or pass its fields as keyword arguments.

    With ``resume=True`` and keyword arguments, the run's own options come back from its last
    checkpoint; the keyword arguments given override them, except that an option of the network
    (image size included) or of the training recipe (RECIPE_OPTIONS) that differs from the run's
    is an error.
    Returns a TrainResult with the best checkpoint (by validation mDSC) of the last stage trained.
    Works the same under ``torchrun`` (one process per GPU, or per CPU slot with gloo).
    """
    if config is not None:
        cfg = dataclasses.replace(config, **options)
    else:
        if options.get("resume") and options.get("out") is not None:
            saved = saved_options(options["out"])
            if not saved:
                raise FileNotFoundError(f"nothing to resume: no stage*_last.pt with a run's options in "
                                        f"{options['out']}")
            options = {**saved, **options}
        elif options.get("stage1_checkpoint") and str(options.get("stage")) == "2":  # else TrainConfig refuses it
            options = {**stage1_network_options(options["stage1_checkpoint"]), **options}
        missing = [name for name in ("data_root", "out") if options.get(name) is None]
        if missing:
            raise ValueError(f"train: {' and '.join(missing)} must be given")
        cfg = TrainConfig(**options)
    device = resolve_device(cfg.device)
    set_deterministic(cfg.deterministic, device)
    ctx, device = init_distributed(device)
    try:
        with denormals_flushed(device):
            return _Trainer(cfg, device, ctx).run()
    finally:
        close_distributed(ctx)


class _Trainer:
    def __init__(self, cfg, device, ctx):
        self.cfg, self.device, self.ctx = cfg, device, ctx
        self.run_dir = Path(cfg.out)
        self.amp = amp_dtype(cfg.amp, device)
        if cfg.cuda_graph:
            self._check_cuda_graph()
        existing = sorted(self.run_dir.glob("stage*_last.pt"))
        if existing and not (cfg.resume or cfg.overwrite):
            raise FileExistsError(f"{self.run_dir} already holds a run ({existing[0].name}); pass "
                                  f"resume=True (CLI: --resume) to continue it or overwrite=True (CLI: --overwrite)")
        if cfg.resume and not existing:
            raise FileNotFoundError(f"nothing to resume: no stage*_last.pt in {self.run_dir}")
        # said in the log once the stage's own resume checks have passed (_run_stage)
        self.overridden = self._check_resume_options(saved_options(self.run_dir)) if cfg.resume else ""
        if cfg.encoder_weights and not cfg.resume:  # a bad file fails now, not after the data loads
            read_weights_file(cfg.encoder_weights)
        if cfg.stage1_checkpoint and not cfg.resume and Path(cfg.stage1_checkpoint).is_file():  # likewise
            self._stage1_source(cfg.stage1_checkpoint)
        new_folders = missing_folders(self.run_dir)  # with any parents it makes (runs/ of runs/kvasir)
        if cfg.overwrite and ctx.is_main:  # everything a run writes (a new run may write less)
            for p in self.run_dir.glob("stage*_*.pt"):
                p.unlink()
            for p in (self.run_dir / "log.csv", self.run_dir / "train.log", self.run_dir / "curves.png"):
                p.unlink(missing_ok=True)
            for folder in ("splits", "tensorboard"):  # before RunLog opens its TensorBoard writer
                shutil.rmtree(self.run_dir / folder, ignore_errors=True)
        self.log = RunLog(self.run_dir, enabled=ctx.is_main, tensorboard=cfg.tensorboard)
        barrier(ctx)
        try:
            self.train_ds, self.val_ds = self._datasets()
        except Exception:
            self.log.close()
            if new_folders and ctx.is_main:  # bad data leaves no empty run folder behind
                shutil.rmtree(self.run_dir, ignore_errors=True)
                remove_empty(new_folders)
            raise

    # -- data ---------------------------------------------------------------------------------
    def _datasets(self):
        cfg, root = self.cfg, self.cfg.data_root
        quiet = lambda message: None  # noqa: E731 - for datasets whose missing ids were reported already
        splits = available_splits(root)
        kw = dict(image_size=cfg.image_size, in_channels=cfg.in_channels, classes=cfg.classes,
                  skip_missing=cfg.skip_missing, warn=self.log.info if self.ctx.is_main else quiet)
        train_split, val_split = (self._split_or_none(name, getattr(cfg, name), splits)
                                  for name in ("train_split", "val_split"))
        train_ids = None
        if train_split is None:
            # No training split: train on every pair that no other split (val, test) lists.
            held_out = [split for split in dict.fromkeys([val_split, *splits]) if split not in (None, "train")]
            train_ids = self._ids_outside(root, held_out)
            if self.ctx.is_main and held_out:
                self.log.info(f"no '{cfg.train_split}' split in {root}: training on the {len(train_ids)} pairs "
                              f"that {', '.join(map(str, held_out))} do not list")
        if val_split is None:
            ids = train_ids if train_ids is not None else self._ids_outside(root, [], split=train_split)
            order = torch.randperm(len(ids), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
            n_val = max(1, round(len(ids) * cfg.val_fraction))
            val_ids, train_ids = [ids[i] for i in order[:n_val]], [ids[i] for i in order[n_val:]]
            if self.ctx.is_main:
                (self.run_dir / "splits").mkdir(parents=True, exist_ok=True)
                (self.run_dir / "splits" / "train.txt").write_text("\n".join(train_ids) + "\n")
                (self.run_dir / "splits" / "val.txt").write_text("\n".join(val_ids) + "\n")
                self.log.info(f"no '{cfg.val_split}' split in {root}: holding out {n_val} of {len(ids)} "
                              f"pairs for validation (ids in {self.run_dir / 'splits'})")
            # the same split's pairs as the training set: its missing ids were reported already
            train_kw, val_kw = dict(split=train_split, ids=train_ids), dict(split=train_split, ids=val_ids,
                                                                          warn=quiet)
        else:
            train_kw, val_kw = dict(split=train_split, ids=train_ids), dict(split=val_split)
        h, w = as_size(cfg.image_size)
        train_ds = SegmentationDataset(root, **{**kw, **train_kw})
        val_ds = SegmentationDataset(root, **{**kw, **val_kw})
        if self._preload(len(train_ds) + len(val_ds), h * w * (cfg.in_channels + 1)):
            train_ds.load_all()
            val_ds.load_all()
        empty = train_ds.empty_masks()
        if empty is not None and len(empty) == len(train_ds):
            raise DatasetError(f"every training mask of {root} reads as background only: there is nothing to "
                               f"learn. Masks stored at another scale (0/1 values saved as JPEG, 0/255 in 16 "
                               f"bits) read so; `condseg data check {root}` names them", root)
        if self.ctx.is_main:
            self.log.info(f"data: {len(train_ds)} training and {len(val_ds)} validation pairs from {root} "
                          f"({train_ds.layout.name} layout) at {h}x{w}")
            if empty:  # true negatives, or masks at another scale: worth a line either way
                self.log.info(f"note: {len(empty)} of {len(train_ds)} training masks read as background only "
                              f"({format_ids(empty)}); `condseg data check {root}` tells masks stored at "
                              f"another scale from empty ones")
            shared = shared_images(train_ds.samples, val_ds.samples)
            if shared:  # allowed (--val-split train watches the fit), but never silently
                self.log.info(f"warning: {len(shared)} validation pair(s) are training pairs too "
                              f"({format_ids(shared)}): the validation scores overstate the model")
        return train_ds, val_ds

    def _split_or_none(self, option, split, splits):
        """``split`` when the data set has it (or it is a split file), None for a missing default
        ("train", "val": the pairs are then divided here). A name given instead of the default
        must exist: a typo would silently become a random hold-out."""
        if split in splits or str(split).endswith(".txt"):
            return split
        if split != getattr(TrainConfig, option):
            raise DatasetError(f"{option} {split!r}: no such split in {self.cfg.data_root} (it has "
                               f"{', '.join(splits) or 'none'}), and not a .txt split file", self.cfg.data_root)
        return None

    def _ids_outside(self, root, splits, split=None):
        """Ids of ``split``'s pairs (None: every pair) that none of ``splits`` lists."""
        listed = {i for other in splits for i in (resolve_layout(root, other).ids or ())}  # files not needed
        quiet = lambda message: None  # noqa: E731 - the datasets report missing ids themselves
        ids = [s.id for s in find_samples(root, split, self.cfg.skip_missing, warn=quiet)[0] if s.id not in listed]
        if not ids:
            raise DatasetError(f"no training pairs in {root}: every pair is listed by {', '.join(map(str, splits))}",
                               root)
        return ids

    def _preload(self, count, bytes_per_item):
        if self.cfg.preload == "auto":
            return count * bytes_per_item <= PRELOAD_LIMIT
        return bool(self.cfg.preload) and self.cfg.preload != "false"

    def _workers(self):
        if self.cfg.workers is not None:
            return self.cfg.workers
        return 0 if self.train_ds._cache is not None else 4

    def _loaders(self):
        cfg, ctx = self.cfg, self.ctx
        workers = self._workers()
        sampler = DistributedSampler(self.train_ds, num_replicas=ctx.world_size, rank=ctx.rank, shuffle=True,
                                     seed=cfg.seed)
        per_rank = len(sampler)
        # Not persistent: every pass over a loader draws its worker seed from the global torch RNG,
        # as a loader without workers does, so the augmentations (drawn from that RNG on the training
        # device) are the same with any number of workers and after a resume. Persistent workers
        # drew only in a stage's first epoch, and a resumed run drew once more.
        common = dict(collate_fn=collate, num_workers=workers, pin_memory=self.device.type == "cuda",
                      persistent_workers=False)
        train = DataLoader(self.train_ds, batch_size=cfg.batch_size, sampler=sampler,
                           drop_last=per_rank > cfg.batch_size, **common)
        val = DataLoader(self.val_ds, batch_size=cfg.batch_size * 2, shuffle=False, **common)
        return train, sampler, val

    # -- resuming -----------------------------------------------------------------------------
    def _resume_point(self):
        """(stage to start, its last checkpoint or None, state whose RNG/history carry over)."""
        stages = self.cfg.stages
        for stage in reversed(stages):
            path = checkpoint_path(self.run_dir, stage, "last")
            if path.is_file():
                state = load_checkpoint(path)
                if state.get("finished") and stage != stages[-1]:
                    return stage + 1, None, state
                return stage, state, state
        return stages[0], None, None

    # -- the run ------------------------------------------------------------------------------
    def run(self):
        cfg, ctx = self.cfg, self.ctx
        seed_everything(cfg.seed + ctx.rank)
        start, resume_state, carry = self._resume_point() if cfg.resume else (cfg.stages[0], None, None)
        history = list(carry["history"]) if carry else []
        if carry is not None and resume_state is None:
            self._restore_rng(carry)
        result = None
        for stage in cfg.stages:
            if stage < start:
                continue
            result = self._run_stage(stage, resume_state if stage == start else None, history)
            history = result.history
        self.log.close()
        return result

    def _restore_rng(self, state):
        rngs = state["rng"]
        set_rng_state(rngs[self.ctx.rank] if len(rngs) == self.ctx.world_size else rngs[0])

    def _stage1_source(self, source):
        """The stage-1 checkpoint at ``source``, refused unless its encoder is the one this run builds."""
        cfg = self.cfg
        state = load_checkpoint(source)
        saved = state["model_config"]
        if saved["arch"] != "stage1":
            raise ValueError(f"{source} is not a stage-1 checkpoint (arch {saved['arch']!r})")
        if (saved["encoder_name"], saved["in_channels"]) != (cfg.encoder, cfg.in_channels):
            raise ValueError(f"{source} holds a {saved['encoder_name']} encoder for {saved['in_channels']} input "
                             f"channels, but this run builds {cfg.encoder} for {cfg.in_channels}: leave the encoder "
                             "option out (a stage-2 run takes it from its stage-1 checkpoint)")
        return state

    def _init_stage2_encoder(self, model):
        cfg = self.cfg
        source = cfg.stage1_checkpoint or checkpoint_path(self.run_dir, 1, "best")
        if not Path(source).is_file():
            if cfg.stage1_checkpoint:
                raise FileNotFoundError(f"stage-1 checkpoint not found: {source}")
            self.log.info("stage 2 without a stage-1 checkpoint: the encoder starts from "
                          + ("encoder_weights" if cfg.encoder_weights else "scratch"))
            return bool(cfg.encoder_weights)
        state = self._stage1_source(source)
        model.load_stage1_encoder(state["model"])
        self.log.info(f"stage 2: encoder initialised from {source} (epoch {state['epoch']})")
        return True

    def _check_cuda_graph(self):
        """cuda_graph=True needs one CUDA device and no gradient scaler (float16's reads its
        overflow flag on the host at every step)."""
        if self.device.type != "cuda":
            problem = f"needs a CUDA device, the run has {self.device}"
        elif self.ctx.enabled:
            problem = "runs in one process, not with several (DistributedDataParallel)"
        elif self.amp == torch.float16:
            problem = ("needs bf16 autocast or none: float16's gradient scaler reads the host at every step "
                       "(amp='bf16' or 'off', CLI: --amp bf16)")
        else:
            return
        raise ValueError(f"cuda_graph=True (CLI: --cuda-graph) {problem}")

    def _check_resume_options(self, saved):
        """Stops a resume given another network, image size or recipe than the run's (``saved``),
        before the data is read: the run could not honour them, yet its checkpoints would record them.
        Returns the other options that differ from the run's ("amp='off' (the run has 'auto')", ...;
        "" for none), which the run then says it uses."""
        now = self.cfg.to_dict()
        size = lambda v: list(as_size(v))  # noqa: E731 - 32 and [32, 32] are the same size

        def changed(names):
            return [k for k in names if k in saved and
                    (size(saved[k]) != size(now[k]) if k == "image_size" else saved[k] != now[k])]

        def detail(names):
            return ", ".join(f"{k}={now[k]!r} (the run has {saved[k]!r})" for k in names)

        in_stage2 = checkpoint_path(self.run_dir, 2, "last").is_file()  # stage 1 is done
        network = changed(STAGE1_NETWORK_OPTIONS)
        recipe = changed(RECIPE_OPTIONS + (() if in_stage2 else STAGE1_RECIPE_OPTIONS))
        if network:
            raise ValueError(f"cannot resume the run in {self.run_dir} with a different network: {detail(network)}. "
                             f"Leave these options out: --resume restores the run's own network")
        if recipe:
            new_run = "start a new run" + (f" (stage 2 alone, on this run's encoder: --stage 2 --stage1-checkpoint "
                                           f"{checkpoint_path(self.run_dir, 1, 'best')})" if in_stage2 else "")
            raise ValueError(f"cannot resume the run in {self.run_dir} with a different training recipe: "
                             f"{detail(recipe)}. Leave these options out: --resume restores the run's own "
                             f"optimizer, schedule and random state. To train with them, {new_run}")
        return detail([k for k in changed(now) if k not in (*PER_CALL_OPTIONS, "progress", "tensorboard")])

    def _check_same_network(self, stage, saved, now):
        changed = [k for k in now if k != "arch" and saved.get(k) != now[k]]
        if changed:
            names = {"encoder_name": "encoder"}
            detail = ", ".join(f"{names.get(k, k)}={now[k]!r} (the run has {saved.get(k)!r})" for k in changed)
            raise ValueError(f"cannot resume stage {stage} in {self.run_dir} with a different network: {detail}. "
                             f"Leave these options out: --resume restores the run's own network")

    def _nothing_to_train(self, stage, resume):
        """The result of a resumed stage that is finished or already has its epochs."""
        if stage == 1:
            how = "a new run with more --epochs"
        else:
            source = self.cfg.stage1_checkpoint or checkpoint_path(self.run_dir, 1, "best")
            how = f"a new run with --stage 2 --stage1-checkpoint {source}"
        self.log.info(f"stage {stage}: nothing to train, {resume['epoch']} epochs done (all its epochs, or an early "
                      f"stop); resuming does not extend a finished stage. To train longer, start {how}")
        return TrainResult(self.run_dir, checkpoint_path(self.run_dir, stage, "best"),
                           checkpoint_path(self.run_dir, stage, "last"), resume.get("best_metrics", {}),
                           list(resume["history"]), len(self.train_ds))

    def _diverged(self, reason, last, epochs_done):
        """The TrainingDiverged to raise (and log) when training stops on a non-finite value."""
        kept = (f"the last good checkpoint is {last} (epoch {epochs_done})" if last.is_file()
                else "no checkpoint was written")
        msg = f"training stopped: {reason}; {kept}. Lower the learning rate, or use --amp off if mixed precision is on"
        self.log.info(msg, console=False)  # the error raised says it on the console
        return TrainingDiverged(msg)

    def _compile_failed(self, error, label):
        """The CompileFailed to raise (and log) when torch.compile cannot build the training step."""
        text = str(error).strip()
        msg = (f"{label}: torch.compile failed ({type(error).__name__}: {text.splitlines()[0] if text else ''}); "
               f"train without it: compile=False (CLI: --no-compile)")
        self.log.info(msg, console=False)  # the error raised says it on the console
        return CompileFailed(msg)

    def _run_stage(self, stage, resume, history):
        cfg, ctx, device = self.cfg, self.ctx, self.device
        epochs = cfg.stage1_epoch_count if stage == 1 else cfg.epochs
        mcfg = model_config(stage, cfg.encoder, cfg.in_channels, cfg.classes, cfg.decoder_channels, cfg.cdfa_variant)
        if resume is not None:
            self._check_same_network(stage, resume["model_config"], mcfg)
            if resume.get("finished") or resume["epoch"] >= epochs:
                return self._nothing_to_train(stage, resume)
            planned = resume["scheduler"].get("T_max")  # a cosine schedule, laid out over the stage's epochs
            if planned is not None and planned != max(1, epochs):
                raise ValueError(f"cannot resume stage {stage} in {self.run_dir} with {epochs} epochs: its cosine "
                                 f"schedule runs over the run's {planned}. Leave epochs and stage1_epochs "
                                 f"(--epochs, --stage1-epochs) out, or start a new run")
        if self.overridden:  # the first stage that trains says so
            self.log.info(f"resuming with options other than the run's: {self.overridden}")
            self.overridden = ""
        model = build_model(mcfg, encoder_weights=None if resume else cfg.encoder_weights)
        if cfg.encoder_weights and not resume and stage == 1:  # stage 2 says where its encoder came from
            self.log.info(f"stage 1: encoder weights loaded from {cfg.encoder_weights}")
        if stage == 1:
            lr, encoder_lr = cfg.stage1_lr, None
        else:
            pretrained = resume["encoder_initialised"] if resume else self._init_stage2_encoder(model)
            lr, encoder_lr = cfg.lr, (cfg.encoder_lr if pretrained else None)
        model.to(device, memory_format=memory_format(cfg))
        optimizer = make_optimizer(model, lr, encoder_lr, cfg.weight_decay)
        scheduler = make_scheduler(optimizer, cfg.scheduler, epochs, cfg.lr_patience, cfg.lr_factor)
        scaler = torch.amp.GradScaler(device.type, enabled=self.amp == torch.float16)
        start, best, best_epoch, bad = 0, -math.inf, 0, 0
        if resume is not None:
            model.load_state_dict(resume["model"])
            optimizer.load_state_dict(resume["optimizer"])
            if scheduler is not None:
                scheduler.load_state_dict(resume["scheduler"])
            scaler.load_state_dict(resume["scaler"])
            start, best = resume["epoch"], resume["best_score"]
            best_epoch, bad = resume["best_epoch"], resume["bad_epochs"]
            history = list(resume["history"])
            self._restore_rng(resume)
            self.log.info(f"stage {stage}: resuming after epoch {start} of {epochs}")
        wrapped = model
        if ctx.enabled:
            wrapped = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
        if cfg.compile:  # the training step only: validation (eval-mode BatchNorm) runs the eager model
            wrapped = torch.compile(wrapped, dynamic=False)
            self.log.info(f"stage {stage}: torch.compile compiles the training step at its first batch "
                          f"(minutes; then the epochs run compiled)")
        train_loader, sampler, val_loader = self._loaders()
        last = checkpoint_path(self.run_dir, stage, "last")
        best_path = checkpoint_path(self.run_dir, stage, "best")
        static = {"stage": stage, "model_config": mcfg, "train_config": cfg.to_dict(),
                  "image_size": list(as_size(cfg.image_size)), "normalization": "imagenet",
                  "encoder_initialised": bool(stage == 1 or encoder_lr is not None)}
        best_metrics = resume.get("best_metrics", {}) if resume else {}
        self.log.info(f"stage {stage}: {sum(p.numel() for p in model.parameters()):,} parameters, "
                      f"epochs {start + 1}..{epochs}, device {device}"
                      + (f" x{ctx.world_size}" if ctx.enabled else "")
                      + (f", autocast {self.amp}" if self.amp else "")
                      + (", each epoch's step captured as a CUDA graph" if cfg.cuda_graph else ""))
        for epoch in range(start, epochs):
            sampler.set_epoch(epoch)
            t0 = time.perf_counter()
            label = f"stage {stage} epoch {epoch + 1}/{epochs}"
            try:
                stats = train_epoch(wrapped, train_loader, optimizer, scaler, stage, cfg, device, self.amp, ctx,
                                    label=label)
            except TrainingDiverged as e:
                raise self._diverged(e, last, epoch) from None
            except Exception as e:
                if cfg.compile and type(e).__module__.startswith(("torch._dynamo", "torch._inductor")):
                    raise self._compile_failed(e, label) from e
                raise
            val = validate(model, val_loader, cfg, device, self.amp) if ctx.is_main else None
            val = broadcast(ctx, val)
            broken = [k for k, v in val.items() if not math.isfinite(v)]
            if broken:  # this epoch's weights are broken: no checkpoint of them, the last one stays good
                values = ", ".join(f"{k} {val[k]}" for k in broken)
                raise self._diverged(f"{label}: the validation gave {values}", last, epoch)
            groups = {g.get("name", "all"): g["lr"] for g in optimizer.param_groups}  # the epoch's, before the step
            if scheduler is not None:
                scheduler.step(val["val_loss"]) if cfg.scheduler == "plateau" else scheduler.step()
            row = {"stage": stage, "epoch": epoch + 1, **stats, **val,
                   "lr": groups.get("rest", groups.get("all")), "lr_encoder": groups.get("encoder", groups.get("all")),
                   "seconds": round(time.perf_counter() - t0, 2)}
            history.append(row)
            improved = val["val_mDSC"] > best
            if improved:
                best, best_epoch, bad = val["val_mDSC"], epoch + 1, 0
                best_metrics = {k: v for k, v in val.items()}
            else:
                bad += 1
            stop = bool(cfg.early_stop) and bad >= cfg.early_stop
            rngs = gather(ctx, rng_state())
            if ctx.is_main:
                state = {**static, "epoch": epoch + 1, "metrics": val, "best_metrics": best_metrics,
                         "best_score": best, "best_epoch": best_epoch, "history": history}
                if improved:
                    save_checkpoint({**state, "model": model.state_dict()}, best_path)
                save_checkpoint({**state, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                                 "scheduler": scheduler.state_dict() if scheduler is not None else {},
                                 "scaler": scaler.state_dict(), "rng": rngs, "bad_epochs": bad,
                                 "finished": stop or epoch + 1 == epochs}, last)
                self.log.epoch(row, history)
                self.log.info(f"stage {stage} epoch {epoch + 1}/{epochs}: loss {stats['train_loss']:.4f}, "
                              f"val loss {val['val_loss']:.4f}, mDSC {val['val_mDSC']:.4f}, "
                              f"mIoU {val['val_mIoU']:.4f}{' (best)' if improved else ''}, {row['seconds']:.1f}s")
            barrier(ctx)
            if stop:
                self.log.info(f"stage {stage}: early stop, no better mDSC for {bad} epochs "
                              f"(best {best:.4f} at epoch {best_epoch})")
                break
        return TrainResult(self.run_dir, best_path, last, best_metrics, history, len(self.train_ds))

"""What a run records: console lines, a progress bar, the CSV log, TensorBoard, the curve plot."""
import csv
import os
import sys
import time
from pathlib import Path

from .plot import plot_history

COLUMNS = ["stage", "epoch", "train_loss", "val_loss", "val_mIoU", "val_mDSC", "val_recall", "val_precision",
           "lr", "lr_encoder", "loss_mask", "loss_fg", "loss_bg", "loss_compl", "seconds"]


class Progress:
    """A one-line progress bar on a terminal; on a pipe or file, one summary line per epoch."""

    def __init__(self, total, desc, enabled=True, stream=None):
        self.total, self.desc, self.enabled = total, desc, enabled
        self.stream = stream or sys.stderr
        self.tty = enabled and getattr(self.stream, "isatty", lambda: False)()
        self.count, self.start, self.last = 0, time.perf_counter(), 0.0

    def update(self, n=1, **info):
        self.count += n
        now = time.perf_counter()
        if self.tty and (now - self.last > 0.2 or self.count == self.total):
            self.last = now
            width = 24
            done = int(width * self.count / max(1, self.total))
            rate = self.count / max(now - self.start, 1e-9)
            extra = " ".join(f"{k} {v:.4f}" if isinstance(v, float) else f"{k} {v}" for k, v in info.items())
            self.stream.write(f"\r{self.desc} [{'#' * done}{'.' * (width - done)}] {self.count}/{self.total} "
                              f"{rate:.2f} it/s {extra}   ")
            self.stream.flush()

    def close(self):
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


class RunLog:
    """Rank-0 recorder of a run folder: ``log.csv`` and ``curves.png`` rewritten from the whole
    history every epoch (so a resumed run never duplicates rows), ``train.log`` with the console
    lines, and TensorBoard events when ``tensorboard`` is installed (or as requested)."""

    def __init__(self, run_dir, enabled=True, tensorboard=None, echo=print):
        self.run_dir, self.enabled, self.echo = Path(run_dir), enabled, echo
        self.writer = None
        if not enabled:
            return
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if tensorboard is not False:
            try:
                from torch.utils.tensorboard import SummaryWriter
                self.writer = SummaryWriter(str(self.run_dir / "tensorboard"))
            except ImportError as e:
                if tensorboard:
                    raise RuntimeError(f"TensorBoard logging requested but unavailable: {e}; "
                                       f"pip install tensorboard") from None

    def info(self, message, console=True):
        """``message`` to train.log and, unless ``console`` is False (an error the caller reports
        anyway), to the console."""
        if not self.enabled:
            return
        if console:
            self.echo(message)
        with open(self.run_dir / "train.log", "a") as f:
            f.write(message + "\n")

    def epoch(self, row, history):
        if not self.enabled:
            return
        self._write_csv(history)
        plot_history(history, self.run_dir / "curves.png")
        if self.writer is not None:
            step = len(history)
            for key, value in row.items():
                if key not in ("stage", "epoch") and isinstance(value, (int, float)):
                    self.writer.add_scalar(f"stage{row['stage']}/{key}", value, step)
            self.writer.flush()

    def _write_csv(self, history):
        path = self.run_dir / "log.csv"
        tmp = path.with_name(f".log.csv.{os.getpid()}.tmp")
        with open(tmp, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=COLUMNS, extrasaction="ignore")
            writer.writeheader()
            for row in history:
                writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
        os.replace(tmp, path)

    def close(self):
        if self.writer is not None:
            self.writer.close()

"""Callbacks that make a fit stoppable and resumable exactly.

``InterruptCheckpoint`` turns SIGTERM or Ctrl-C into a clean stop with ``interrupted.ckpt``;
``ExactResume`` makes the resumed fit replay what the uninterrupted one would have done: the
rest of the interrupted epoch's batches (``data.sampling.ResumableSampler``) and the same random
numbers in every step. Together, a fit killed midway and rerun with ``--ckpt_path last`` ends
with the same weights as one that was never stopped.
"""

from __future__ import annotations

import signal
import sys
import warnings

import pytorch_lightning as pl
import torch
from pytorch_lightning.callbacks import Callback, OnExceptionCheckpoint
from pytorch_lightning.utilities.exceptions import SIGTERMException
from torch.utils.data import DataLoader

from data.sampling import ResumableSampler, global_seed


class InterruptCheckpoint(OnExceptionCheckpoint):
    """Stops a fit cleanly on SIGTERM or Ctrl-C and saves ``interrupted.ckpt``.

    Lightning's own handler may stop anywhere, mid-validation included, and a checkpoint taken
    there can resume with an epoch missing. So the signal only sets a flag; the fit stops (all
    ranks together) at the end of the next training batch, or at the end of the epoch when that
    batch was its last: the two places Lightning resumes from exactly. A second Ctrl-C stops at
    once. Other exceptions (a broken dataset file, a bug) save nothing: resuming from them would
    only repeat the failure.
    """

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self._stop_requested = False
        self._previous_handlers: dict[int, object] = {}

    def _request_stop(self, signum: int, frame) -> None:
        if signum == signal.SIGINT and self._stop_requested:
            raise KeyboardInterrupt
        self._stop_requested = True
        print(f"received {signal.Signals(signum).name}: stopping after this training batch", file=sys.stderr)

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._stop_requested = False
        for signum in (signal.SIGTERM, signal.SIGINT):
            self._previous_handlers[signum] = signal.signal(signum, self._request_stop)

    def _restore_handlers(self) -> None:
        for signum, handler in self._previous_handlers.items():
            signal.signal(signum, handler)
        self._previous_handlers.clear()

    def _stop_now(self, trainer: pl.Trainer) -> bool:
        return trainer.strategy.reduce_boolean_decision(self._stop_requested, all=False)

    def on_train_batch_end(self, trainer: pl.Trainer, *args) -> None:
        # At an epoch's last batch Lightning cannot resume exactly; stop at the epoch's end instead.
        if not trainer.fit_loop.epoch_loop.batch_progress.is_last_batch and self._stop_now(trainer):
            raise SIGTERMException

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self._stop_now(trainer):
            trainer._signal_connector.received_sigterm = True  # Lightning stops once the epoch is complete

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._restore_handlers()

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        self._restore_handlers()
        if isinstance(exception, (SIGTERMException, KeyboardInterrupt)) and trainer.global_step > 0:
            trainer.save_checkpoint(self.ckpt_path, weights_only=False)  # the full training state


class ExactResume(Callback):
    """Make each training step's randomness a function of the step, and skip trained batches.

    * Every training step reseeds torch's generator from ``(seed, global step, rank)``, so
      dropout, drop-path and noise in the model do not depend on what ran before (validation,
      an interruption, a resume).
    * When a fit resumes inside an epoch, the training samplers skip the batches of that epoch
      that were already trained on; the same permutation is drawn again (seeded by the epoch).
    """

    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        # Called after the checkpoint is restored and before the resumed epoch's loader is
        # iterated (Lightning does not call on_train_epoch_start for an epoch it resumes).
        if not trainer.fit_loop.restarted_mid_epoch:
            return
        trained = trainer.fit_loop.epoch_loop.batch_progress.current.processed
        for loader in _loaders(trainer.train_dataloader):
            sampler = getattr(loader, "sampler", None)
            if isinstance(sampler, ResumableSampler):
                sampler.skip = trained * (loader.batch_size or 1)
            else:
                warnings.warn(
                    f"training loader's sampler {type(sampler).__name__} cannot skip trained batches; "
                    "the resumed epoch replays from its start",
                    stacklevel=1,
                )

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        step_seed = (global_seed() * 1_000_003 + trainer.global_step) * 64 + trainer.global_rank
        torch.manual_seed(step_seed % (2**63 - 1))


def _loaders(loaders) -> list[DataLoader]:
    """The DataLoaders inside whatever ``trainer.train_dataloader`` holds (one, a list or a dict)."""
    if isinstance(loaders, DataLoader):
        return [loaders]
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        return [inner for item in loaders for inner in _loaders(item)]
    return []

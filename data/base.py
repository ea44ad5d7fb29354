"""What every datamodule shares: the ``root`` contract, the built-in cache, and prediction I/O.

With a ``root`` a datamodule reads the paper's public layout. Without one it writes its built-in
default, in that same layout, under the cache directory and reads it back with the same loader,
so the real loader runs every time (``../DESIGN.md``, "Data").
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset

from data.errors import DatasetNotFoundError, OutputExistsError
from data.sampling import ResumableSampler, ShardedEvalSampler, global_seed


def cache_root() -> Path:
    """Folder for generated built-in datasets: ``$GLOCAL_CACHE``, else ``$XDG_CACHE_HOME/glocal``."""
    if os.environ.get("GLOCAL_CACHE"):
        return Path(os.environ["GLOCAL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "glocal"


def build_once(name: str, params: dict[str, Any], writer: Callable[[Path], None]) -> Path:
    """Run ``writer(folder)`` once per distinct ``params`` and return the finished folder.

    The folder name carries a hash of ``params``, so changing the generator's settings never
    reuses stale data. ``writer`` fills a temporary sibling that is renamed into place only when
    it returns, so an interrupted generation leaves no half-written dataset behind.
    """
    digest = hashlib.sha1(json.dumps(params, sort_keys=True).encode()).hexdigest()[:10]
    final = cache_root() / f"{name}-{digest}"
    if final.is_dir():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        writer(staging)
        (staging / "GENERATOR.json").write_text(json.dumps({"name": name, **params}, indent=2, sort_keys=True))
        try:
            staging.rename(final)
        except OSError:  # another process finished first; theirs is identical
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return final


class BaseDataModule(pl.LightningDataModule):
    """Shared datamodule arguments and the prediction-writing contract.

    Args:
        root: dataset folder in one of the subclass's supported layouts; ``None`` uses the
            built-in default.
        batch_size: training batch size.
        eval_batch_size: batch size for validation, test and predict (1 allows any image size).
        num_workers: loader worker processes.
        predict_dir: folder of inputs for ``predict``.
        predict_output_dir: where ``predict`` writes one result per input, under the same name.
    """

    #: short dataset name for the leaderboard; subclasses set it once the root is resolved
    dataset_name: str = "unknown"
    #: how samples become a batch; point clouds replace it with offset batching (no padding).
    #: A plain function (a staticmethod), so loader workers never pickle the datamodule.
    collate_fn: Optional[Callable[[list], Any]] = None

    def __init__(
        self,
        root: Optional[str] = None,
        batch_size: int = 8,
        eval_batch_size: int = 1,
        num_workers: int = 0,
        predict_dir: Optional[str] = None,
        predict_output_dir: Optional[str] = None,
    ):
        super().__init__()
        self.save_hyperparameters()
        self.root = root
        self.batch_size = batch_size
        self.eval_batch_size = eval_batch_size
        self.num_workers = num_workers
        self.predict_dir = predict_dir
        self.predict_output_dir = predict_output_dir
        self.datasets: dict[str, Dataset] = {}

    # -- the root ----------------------------------------------------------------------------
    def builtin_root(self) -> Path:
        """Generate (once) and return the built-in default dataset; subclasses implement it."""
        raise TypeError(f"{type(self).__name__} has no built-in default; pass --data.root")

    def prepare_data(self) -> None:
        # Runs on one process per node before ``setup``: the place to write the built-in set.
        if self.root is None:
            self.builtin_root()

    def resolved_root(self) -> Path:
        """The folder the loaders read: ``root`` if given (it must exist), else the built-in set."""
        if self.root is None:
            return self.builtin_root()
        root = Path(self.root).expanduser()
        if not root.is_dir():
            raise DatasetNotFoundError(root, "dataset root does not exist")
        return root

    # -- loaders -----------------------------------------------------------------------------
    def _loader(self, split: str, shuffle: bool, batch_size: int) -> DataLoader:
        dataset = self.datasets[split]
        drop_last = shuffle and len(dataset) > batch_size
        # Training draws (index, augmentation seed) keys in an order a resumed fit can replay.
        # Evaluation shards the split across DDP ranks without repeating any sample.
        sampler = ResumableSampler(dataset, seed=global_seed()) if shuffle else ShardedEvalSampler(dataset, split)
        return DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=sampler,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            drop_last=drop_last,
            collate_fn=type(self).collate_fn,
        )

    def train_dataloader(self) -> DataLoader:
        """Shuffled training batches; datasets read their keys with ``data.sampling.sample_key``."""
        return self._loader("train", shuffle=True, batch_size=self.batch_size)

    def val_dataloader(self) -> DataLoader:
        return self._loader("val", shuffle=False, batch_size=self.eval_batch_size)

    def test_dataloader(self) -> DataLoader:
        return self._loader("test", shuffle=False, batch_size=self.eval_batch_size)

    def predict_dataloader(self) -> DataLoader:
        return self._loader("predict", shuffle=False, batch_size=self.eval_batch_size)

    # -- prediction output -------------------------------------------------------------------
    def prediction_paths(self, names: list[str]) -> list[Path]:
        """Where to write the outputs for ``names``, refusing any name that exists already.

        The paths lie in a hidden staging folder beside ``predict_output_dir``; ``finish_predictions``
        moves them into place when predict ends, and a failed predict removes them, so the output
        folder never holds a partial set.
        """
        if self.predict_output_dir is None:
            raise DatasetNotFoundError("--data.predict_output_dir", "predict needs an output folder")
        out = Path(self.predict_output_dir)
        for name in names:
            if (out / name).exists():
                raise OutputExistsError(out / name, "already exists; choose another --data.predict_output_dir")
        return [self._staging_folder() / name for name in names]

    def _staging_folder(self) -> Path:
        out = Path(self.predict_output_dir).resolve()
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        staging.mkdir(parents=True, exist_ok=True)
        return staging

    def finish_predictions(self) -> list[Path]:
        """Move this process's staged outputs into ``predict_output_dir``; returns their paths."""
        if self.predict_output_dir is None:
            return []
        out = Path(self.predict_output_dir).resolve()
        staging = out.parent / f".{out.name}.partial-{os.getpid()}"
        if not staging.is_dir():
            return []
        moved = []
        for staged in sorted(p for p in staging.rglob("*") if p.is_file()):
            final = out / staged.relative_to(staging)
            if final.exists():
                raise OutputExistsError(final, "appeared while predicting; the staged output is kept in " + str(staging))
            final.parent.mkdir(parents=True, exist_ok=True)
            staged.replace(final)
            moved.append(final)
        shutil.rmtree(staging, ignore_errors=True)
        return moved

    def on_exception(self, exception: BaseException) -> None:
        """A failed predict leaves nothing behind (its staged outputs are removed)."""
        if self.predict_output_dir is not None:
            out = Path(self.predict_output_dir).resolve()
            shutil.rmtree(out.parent / f".{out.name}.partial-{os.getpid()}", ignore_errors=True)

    def write_prediction(self, prediction: torch.Tensor, names: list[str]) -> None:
        """Write one batch of predictions to ``prediction_paths(names)``; subclasses know the format."""
        raise TypeError(f"{type(self).__name__} cannot write predictions")

"""One exception type per way a dataset can be wrong, each naming the offending path.

The CLI prints any ``DatasetError`` as a single line and exits non-zero, so the message must say
everything a user needs: which file or folder, and what is wrong with it.
"""

from __future__ import annotations

from pathlib import Path


class DatasetError(Exception):
    """Base class: a problem with data on disk, reported with the path it concerns."""

    def __init__(self, path: str | Path, problem: str | None = None):
        if problem is None:  # rebuilt from its message alone, as DataLoader workers re-raise errors
            self.path, self.problem = None, str(path)
            super().__init__(str(path))
            return
        self.path = Path(path)
        self.problem = problem
        super().__init__(f"{self.path}: {problem}")


class DatasetNotFoundError(DatasetError):
    """The dataset root, or a split folder the layout requires, does not exist."""


class LayoutError(DatasetError):
    """The folder exists but matches none of the supported layouts (or more than one)."""


class EmptyDatasetError(DatasetError):
    """A split folder holds no usable files."""


class MissingPairError(DatasetError):
    """A file has no partner (a low-light image without its reference, a volume without labels)."""


class UnreadableFileError(DatasetError):
    """A file exists but cannot be decoded: truncated, corrupt or of the wrong format."""


class ShapeMismatchError(DatasetError):
    """Two files that must have the same size (an input and its reference) do not."""


class LabelRangeError(DatasetError):
    """A label file holds values outside the class range."""


class OutputExistsError(DatasetError):
    """Writing would overwrite an existing file; nothing is overwritten silently."""


class SplitError(DatasetError):
    """A train / val / test split is unusable: a class with no image in a split, an image listed
    twice, or a listed file outside the class folders."""


class IntensityRangeError(DatasetError):
    """An image's values lie outside the range its format promises (CT not windowed to [0, 1])."""


class InvalidValueError(DatasetError):
    """A file decodes but holds values that cannot be used (NaN or infinite coordinates)."""


class BadPointCloudError(DatasetError):
    """A point cloud holds no points, too few to register, or non-finite (NaN / inf) coordinates."""

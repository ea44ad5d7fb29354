"""``create_backbone``: ``timm.create_model`` for a task's encoder, with weights from a local file.

Every 2D task builds its encoder through this one function, so any of them can start from a
checkpoint on disk (an official TransNeXt release, a timm ``.safetensors`` file) by naming it in
the config, e.g. ``backbone_kwargs: {weights: ckpts/transnext_micro_224_1k.pth}``. timm maps
the file's keys through the model's ``checkpoint_filter_fn``, drops a classifier of another size
and adapts the first convolution to ``in_chans``. Nothing is ever downloaded: without ``weights``
the encoder starts from random initialisation.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import timm
from torch import nn


def create_backbone(name: str, weights: Optional[str] = None, pretrained: bool = False, **kwargs) -> nn.Module:
    """A registered timm model; ``weights`` is a local file to initialise it from.

    ``pretrained=True`` without ``weights`` keeps timm's own behaviour (its hub, where the
    machine allows it); with ``weights`` the file is used and the hub is never contacted.
    """
    if weights is None:
        return timm.create_model(name, pretrained=pretrained, **kwargs)
    path = Path(weights).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"{path}: backbone weights file for {name!r} does not exist")
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)), **kwargs)

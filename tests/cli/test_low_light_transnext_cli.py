"""TransNeXt as the encoder of the low-light task's global gamma estimator, through the real CLI:
fit, test and export (the exported graph holds the TransNeXt encoder and runs in onnxruntime)."""

from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import torch

from lightning_app import main
from tests.conftest import REPO

CONFIG = str(REPO / "tests" / "conf" / "low_light_transnext_tiny.yaml")


def test_fit_test_export_with_a_transnext_gamma_encoder(tmp_path: Path, lol_v1_root: Path, capsys):
    common = ["--config", CONFIG, "--data.init_args.root", str(lol_v1_root), "--trainer.default_root_dir", str(tmp_path)]
    assert main(["fit", *common]) == 0
    state = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)["state_dict"]
    encoder = [key for key in state if ".global_gamma.encoder." in key or key.startswith("global_gamma.encoder.")]
    assert any("stages.0.blocks.0.attn.learnable_tokens" in key for key in encoder)  # aggregated attention
    assert any("stages.3.blocks.0.attn.qkv.weight" in key for key in encoder)  # the last stage's plain attention

    assert main(["test", *common, "--ckpt_path", "best"]) == 0
    out = capsys.readouterr().out
    assert "test_psnr" in out and "test_ssim" in out

    onnx_path = tmp_path / "iagc_transnext.onnx"
    assert main(["export", *common, "--ckpt_path", "best", "--output", str(onnx_path)]) == 0
    assert "max |difference|" in capsys.readouterr().out
    ops = {node.op_type for node in onnx.load(str(onnx_path)).graph.node}
    assert "Softmax" in ops or "Attention" in ops  # the encoder's attention is in the graph
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    (output,) = session.run(None, {"image": np.random.default_rng(0).random((1, 3, 37, 52), dtype=np.float32)})
    assert output.shape == (1, 3, 37, 52) and 0 <= output.min() and output.max() <= 1

"""--compile: the trainer runs torch.compile'd forward and backward passes that agree with eager mode."""

import torch

from ddpmkit.cli import _given, build_parser
from ddpmkit.data import DatasetInfo, ImageData
from ddpmkit.run.config import RunConfig, apply_overrides
from ddpmkit.train import Trainer


def _trainer(tmp_path, compile: bool) -> Trainer:
    config = apply_overrides(
        RunConfig(),
        {
            "model": {
                "base_channels": 8,
                "channel_mults": (1, 2),
                "num_res_blocks": 1,
                "attn_resolutions": (4,),
                "num_heads": 2,
            },
            "diffusion": {"timesteps": 50},
            "train": {"batch_size": 8, "warmup": 0, "precision": "fp32", "compile": compile},
        },
    )
    config.in_channels, config.image_size, config.num_classes, config.class_names = 1, 8, 2, ("a", "b")
    images = torch.randint(0, 256, (16, 1, 8, 8), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    return Trainer(config, tmp_path, ImageData(images, torch.arange(16) % 2, DatasetInfo("t", 1, 8, 2, ("a", "b"))))


def test_compiled_training_matches_eager(tmp_path):
    compiled, eager = _trainer(tmp_path / "c", True), _trainer(tmp_path / "e", False)
    assert isinstance(compiled.net, torch._dynamo.eval_frame.OptimizedModule)
    assert not isinstance(eager.net, torch._dynamo.eval_frame.OptimizedModule)
    losses = []
    for step in range(3):  # later losses see the weights that the compiled backward pass updated
        compiled.step = eager.step = step
        losses.append(compiled.train_step())
        torch.testing.assert_close(losses[-1], eager.train_step(), rtol=1e-3, atol=1e-5)
    assert len(set(float(x) for x in losses)) == 3


def test_compile_flag_reaches_the_config():
    given = _given(build_parser().parse_args(["train", "--out", "r", "--steps", "1", "--compile"]))
    assert given["train"]["compile"] is True
    assert "compile" not in _given(build_parser().parse_args(["train", "--out", "r", "--steps", "1"]))["train"]

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


def test_compiled_sampling_matches_eager_and_compiles_once(tmp_path):
    """`ddpmkit sample --compile`: the network is compiled once (the denoiser keeps it) and draws the
    same images as eager mode (on a GPU the compiled network replays CUDA graphs; here it is compiled)."""
    from ddpmkit.run import build
    from ddpmkit.run.config import SampleConfig
    from ddpmkit.run.sampling import generate

    trainer = _trainer(tmp_path, False)
    settings = SampleConfig(sampler="ddim", steps=3, precision="fp32")
    labels = torch.tensor([0, 1, 0, 1])
    eager = build.denoiser(trainer.config, trainer.ema, trainer.schedule)
    compiled = build.denoiser(trainer.config, trainer.ema, trainer.schedule)
    on = SampleConfig(**{**settings.__dict__, "compile": True})
    expected = generate(eager, 4, (1, 8, 8), labels=labels, settings=settings)
    first = generate(compiled, 4, (1, 8, 8), labels=labels, settings=on)
    net = compiled.net
    assert isinstance(net, torch._dynamo.eval_frame.OptimizedModule)
    torch.testing.assert_close(first, expected, rtol=1e-4, atol=1e-5)
    generate(compiled, 4, (1, 8, 8), labels=labels, settings=on)
    assert compiled.net is net  # not wrapped a second time
    assert not isinstance(eager.net, torch._dynamo.eval_frame.OptimizedModule)


def test_compiled_uses_cuda_graphs_only_on_a_gpu_and_alone(monkeypatch):
    from ddpmkit.run import build

    seen = []
    monkeypatch.setattr(torch, "compile", lambda module, options=None: seen.append(options) or module)
    net = torch.nn.Linear(2, 2)
    build.compiled(net, "cpu")
    build.compiled(net, "cuda")
    build.compiled(net, "cuda:1", graphs=False)  # under DistributedDataParallel
    build.compiled(net, "cpu", frozen=True)
    assert seen == [
        {"freezing": False},
        {"freezing": False, "triton.cudagraphs": True},
        {"freezing": False},
        {"freezing": True},
    ]

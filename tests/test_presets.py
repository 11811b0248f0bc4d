"""The seed-notebook preset reruns the notebook's configuration (seed 001), as saved in config.json."""

import json

from ddpmkit.cli import main
from ddpmkit.models import build_model, count_parameters
from ddpmkit.config import RunConfig, model_kwargs
from conftest import make_idx_dataset


def test_seed_notebook_preset_matches_the_notebook(tmp_path):
    data = make_idx_dataset(tmp_path / "mnist", n=130)
    run = tmp_path / "run"
    assert main(["train", "--preset", "seed-notebook", "--data-dir", str(data), "--steps", "1",
                 "--out", str(run), "--no-progress"]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "seed-notebook"
    assert saved["data"]["dataset"] == "mnist"
    assert saved["diffusion"]["timesteps"] == 500 and saved["diffusion"]["schedule"] == "cosine"
    assert saved["model"]["arch"] == "convnext" and saved["model"]["mult"] == 3
    assert saved["model"]["channels"] == [16, 32, 64, 128] and saved["model"]["strides"] == [2, 2, 3]
    assert saved["train"]["batch_size"] == 128 and saved["train"]["lr"] == 1e-3
    assert saved["train"]["optimizer"] == "adam" and saved["train"]["epochs"] == 20
    assert saved["train"]["steps"] == 1  # a flag given with a preset overrides it
    assert saved["sample"] == {**saved["sample"], "sampler": "ddim", "steps": 35, "eta": 0.1}
    config = RunConfig.from_json((run / "config.json").read_text())
    # the notebook's network: 2,038,132 trainable parameters + one null-class row of 112
    assert count_parameters(build_model("convnext", **model_kwargs(config))) == 2_038_132 + 112

"""RGB training end to end: an image folder (in memory and streamed by DataLoader workers),
RGB grids and .npz samples, and CIFAR-10 downloaded by `ddpmkit train` from a local server."""

import functools
import hashlib
import http.server
import io
import json
import pickle
import tarfile
import threading

import numpy as np
import pytest
import torch
from PIL import Image, ImageDraw
from safetensors.torch import load_file

from ddpmkit.cli import main
from ddpmkit.data import datasets, folder
from ddpmkit.run import checkpoint

TINY = [
    "--base-channels",
    "8",
    "--channel-mults",
    "1,2",
    "--num-res-blocks",
    "1",
    "--attn-resolutions",
    "8",
    "--num-heads",
    "2",
    "--timesteps",
    "50",
    "--sample-steps",
    "2",
    "--no-progress",
    "--warmup",
    "2",
    "--precision",
    "fp32",
    "--log-every",
    "1",
    "--sample-every",
    "1000",
    "--checkpoint-every",
    "1000",
]
COLOURS = [(220, 40, 40), (40, 180, 60), (50, 80, 230), (240, 200, 30), (200, 60, 200)]


def make_shapes_folder(root, per_class=100, size=24, seed=0):
    """per_class PNGs of each class, "discs" and "squares": a coloured shape on a coloured ground."""
    rng = np.random.default_rng(seed)
    for name in ("discs", "squares"):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            ground, ink = rng.choice(len(COLOURS), 2, replace=False)
            image = Image.new("RGB", (size, size), COLOURS[ground])
            x, y, r = *rng.integers(6, size - 6, 2), int(rng.integers(3, 6))
            draw = ImageDraw.Draw(image)
            (draw.ellipse if name == "discs" else draw.rectangle)((x - r, y - r, x + r, y + r), fill=COLOURS[ink])
            image.save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture
def shapes(tmp_path):
    return make_shapes_folder(tmp_path / "shapes")


def _model_weights(run):
    return load_file(str(checkpoint.latest_checkpoint(run) / "model.safetensors"))


def test_rgb_folder_trains_and_samples_rgb(shapes, tmp_path, capsys):
    run = tmp_path / "run"
    assert (
        main(
            [
                "train",
                "--dataset",
                "folder",
                "--data-dir",
                str(shapes),
                "--image-size",
                "16",
                *TINY,
                "--batch-size",
                "8",
                "--steps",
                "3",
                "--out",
                str(run),
            ]
        )
        == 0
    )
    config = checkpoint.load_config(run)
    assert (config.in_channels, config.image_size, config.class_names) == (3, 16, ("discs", "squares"))
    assert Image.open(run / "samples" / "step-00000003.png").mode == "RGB"

    grid, npz = tmp_path / "grid.png", tmp_path / "samples.npz"
    capsys.readouterr()
    assert main(["sample", str(run), "--n", "6", "--steps", "2", "--out", str(grid), "--npz", str(npz)]) == 0
    assert Image.open(grid).mode == "RGB"
    assert "sampling" in capsys.readouterr().err  # the progress bar, which --no-progress turns off for scripts
    quiet = ["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "quiet.png"), "--no-progress"]
    assert main(quiet) == 0
    assert "sampling" not in capsys.readouterr().err
    with np.load(npz) as arrays:
        assert arrays["images"].shape == (6, 16, 16, 3) and arrays["images"].dtype == np.uint8
        assert arrays["labels"].tolist() == [0, 0, 0, 1, 1, 1]


def test_streaming_trains_exactly_like_memory(shapes, tmp_path, monkeypatch, capfd):
    common = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        str(shapes),
        "--image-size",
        "16",
        *TINY,
        "--batch-size",
        "4",
        "--grad-accum",
        "2",
        "--steps",
        "4",
        "--sample-every",
        "4",
    ]
    assert main([*common, "--out", str(tmp_path / "memory")]) == 0
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 1000)  # too large for memory: streamed automatically
    assert main([*common, "--workers", "2", "--out", str(tmp_path / "streamed")]) == 0
    assert "streaming 180 images" in capfd.readouterr().err  # 20 of the 200 held out
    memory, streamed = _model_weights(tmp_path / "memory"), _model_weights(tmp_path / "streamed")
    assert all(torch.equal(memory[k], streamed[k]) for k in memory)
    losses = [
        [json.loads(line)["loss"] for line in (tmp_path / run / "metrics.jsonl").read_text().splitlines()]
        for run in ("memory", "streamed")
    ]
    assert losses[0] == losses[1] and len(losses[0]) == 4


@pytest.mark.parametrize("workers", [0, 1])
def test_streaming_survives_an_image_that_breaks_mid_epoch(tmp_path, workers, capfd):
    folder = make_shapes_folder(tmp_path / "shapes", per_class=8, size=16)
    blob = (folder / "discs" / "003.png").read_bytes()
    (folder / "discs" / "003.png").write_bytes(blob[: len(blob) // 2])  # the header reads, the pixels do not
    run = tmp_path / "run"
    # 16 images, a global batch of 8: the two steps of the first epoch visit every image once
    args = [
        "train",
        "--dataset",
        "folder",
        "--data-dir",
        str(folder),
        "--stream",
        "--train-on-all",  # all 16 images: two steps of 8 are exactly the first epoch
        "--workers",
        str(workers),
        *TINY,
        "--batch-size",
        "8",
        "--steps",
        "3",
        "--out",
        str(run),
    ]
    assert main(args) == 0
    if workers == 0:  # decoded in this process: its note is printed here (a worker prints the same line)
        notes = [line for line in capfd.readouterr().err.splitlines() if "note:" in line]
        assert len(notes) == 1 and notes[0].startswith("ddpmkit train: note: Skipping unreadable image")
        assert "003.png" in notes[0]
    assert checkpoint.load_state(checkpoint.latest_checkpoint(run))[0]["step"] == 3
    assert checkpoint.load_config(run).data.stream is True


def test_stream_is_only_for_folders(tmp_path, capsys):
    assert main(["train", "--dataset", "mnist", "--stream", "--steps", "1", "--out", str(tmp_path / "r")]) == 2
    assert "--stream is for --dataset folder" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


# ---- CIFAR-10 through the CLI, downloaded from 127.0.0.1 ---------------------------------------


class _QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


@pytest.fixture
def local_mirror(tmp_path):
    """An HTTP server on 127.0.0.1 serving tmp_path/www; yields (directory, base URL)."""
    www = tmp_path / "www"
    www.mkdir()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(_QuietHandler, directory=str(www)))
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield www, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


def tiny_cifar_tarball(path, per_batch=2):
    """cifar-10-python.tar.gz in the real layout, with per_batch images in each of its six batches."""
    rng = np.random.default_rng(0)
    members = {
        name: pickle.dumps(
            {
                "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                "labels": [i % 10 for i in range(per_batch)],
            },
            protocol=4,
        )
        for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    }
    members["batches.meta"] = pickle.dumps({"label_names": [f"kind{i}" for i in range(10)]}, protocol=4)
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in members.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def test_train_cifar10_downloads_it_once_and_trains(local_mirror, tmp_path, monkeypatch):
    www, url = local_mirror
    tarball = tiny_cifar_tarball(www / "cifar-10-python.tar.gz")
    monkeypatch.setattr(datasets, "DEBIAN_DATA_ROOT", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPMKIT_DATA_DIR", raising=False)
    monkeypatch.setitem(datasets.MIRRORS, "cifar10", [url])
    monkeypatch.setitem(datasets.SHA256, "cifar10", {tarball.name: hashlib.sha256(tarball.read_bytes()).hexdigest()})
    tiny = [*TINY[:7], "16", *TINY[8:]]  # attention at 16x16, the second level of a 32x32 model
    run = tmp_path / "run"
    assert main(["train", "--dataset", "cifar10", *tiny, "--batch-size", "8", "--steps", "2", "--out", str(run)]) == 0
    cached = tmp_path / "cache" / "ddpmkit" / "cifar10" / tarball.name
    assert cached.read_bytes() == tarball.read_bytes()
    config = checkpoint.load_config(run)
    assert (config.in_channels, config.image_size, config.class_names[3]) == (3, 32, "kind3")
    assert Image.open(run / "samples" / "step-00000002.png").mode == "RGB"

    tarball.unlink()  # a second run finds the verified copy in the cache
    assert (
        main(
            [
                "train",
                "--dataset",
                "cifar10",
                *tiny,
                "--batch-size",
                "8",
                "--steps",
                "1",
                "--out",
                str(tmp_path / "again"),
            ]
        )
        == 0
    )

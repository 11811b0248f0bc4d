"""Pictures: the reverse-process GIF, the forward-process figure, schedule and loss plots, and their CLI."""

import math

import numpy as np
import pytest
import torch
from conftest import FAST, TINY_MODEL, make_idx_dataset
from PIL import Image

from ddpmkit import viz
from ddpmkit.cli import main
from ddpmkit.core.samplers import Step, Trajectory
from ddpmkit.core.schedules import cosine
from ddpmkit.data import load_dataset, to_model_range, to_uint8

TILE = 28 * 2 + 2  # a 28x28 image at scale 2 plus the grid's 2-pixel gap
TITLE_H = viz.CAPTION_H + 2  # the title strip above each GIF panel


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """A conditional 10-class run on the tiny MNIST-format dataset, trained for 4 steps (T = 50)."""
    root = tmp_path_factory.mktemp("viz")
    data = make_idx_dataset(root / "mnist")
    assert (
        main(
            [
                "train",
                "--dataset",
                "mnist",
                "--data-dir",
                str(data),
                *TINY_MODEL,
                *FAST,
                "--out",
                str(root / "run"),
                "--steps",
                "4",
            ]
        )
        == 0
    )
    return root / "run"


def _frames(path) -> list[np.ndarray]:
    gif = Image.open(path)
    out = []
    for i in range(gif.n_frames):
        gif.seek(i)
        out.append(np.asarray(gif.convert("L")))
    return out


def _durations(path) -> list[int]:
    gif = Image.open(path)
    durations = []
    for i in range(gif.n_frames):
        gif.seek(i)
        durations.append(gif.info["duration"])
    return durations


# ---- the reverse process as a GIF ---------------------------------------------------------------


def test_keep_every_keeps_the_first_and_the_last():
    assert viz.keep_every(5, 1) == [0, 1, 2, 3, 4]
    assert viz.keep_every(5, 2) == [0, 2, 4]
    assert viz.keep_every(6, 2) == [0, 2, 4, 5]
    assert viz.keep_every(3, 10) == [0, 2]
    assert viz.keep_every(1, 3) == [0]


def test_animate_writes_a_looping_gif_ending_on_the_sample(run, tmp_path):
    gif, png = tmp_path / "d.gif", tmp_path / "s.png"
    common = ["--n", "16", "--sampler", "ddim", "--steps", "4", "--seed", "3"]
    assert main(["animate", str(run), "--out", str(gif), "--frames", "x_t", "--fps", "5", *common]) == 0
    assert main(["sample", str(run), "--out", str(png), *common]) == 0
    image = Image.open(gif)
    assert image.format == "GIF" and image.is_animated and image.info["loop"] == 0
    assert image.n_frames == 4 + 1  # x_t at t_4..t_1, then the sample x_0
    # 16 samples of 10 classes: 8 rows of 2, each captioned with a one-digit class (6 + 6 pixels)
    assert image.size == (12 + 2 * TILE + 2, TITLE_H + 8 * TILE + 2)
    assert _durations(gif) == [200, 200, 200, 200, 2000]  # 5 fps, the last held 2 s
    sample = np.asarray(Image.open(png).convert("L"))
    last = _frames(gif)[-1]
    assert np.array_equal(last[TITLE_H:], sample)  # the final frame is exactly `ddpmkit sample`'s grid
    assert not np.array_equal(_frames(gif)[0][TITLE_H:], sample)


def test_every_keeps_the_first_and_last_frames(run, tmp_path):
    common = ["--n", "4", "--frames", "x0_hat", "--steps", "5"]
    assert main(["animate", str(run), "--out", str(tmp_path / "all.gif"), *common]) == 0
    assert main(["animate", str(run), "--out", str(tmp_path / "some.gif"), "--every", "2", *common]) == 0
    every, some = _frames(tmp_path / "all.gif"), _frames(tmp_path / "some.gif")
    assert len(every) == 6 and len(some) == 4  # positions 0..5 -> 0, 2, 4 and the last, 5
    for kept, original in zip(some, [every[0], every[2], every[4], every[5]]):
        assert np.array_equal(kept, original)


def test_frames_both_doubles_the_width(run, tmp_path):
    sizes = {}
    for frames in ("x_t", "x0_hat", "both"):
        out = tmp_path / f"{frames}.gif"
        assert main(["animate", str(run), "--out", str(out), "--n", "16", "--steps", "2", "--frames", frames]) == 0
        sizes[frames] = Image.open(out).size
    assert sizes["x_t"] == sizes["x0_hat"]
    assert sizes["both"] == (2 * sizes["x_t"][0], sizes["x_t"][1])


def test_denoising_frames_of_rgb_images_make_a_gif(tmp_path):
    trajectory, g = Trajectory(), torch.Generator().manual_seed(0)
    for i, t in enumerate([40, 20, 5]):
        trajectory(Step(i, t, torch.randn(3, 3, 8, 8, generator=g), torch.rand(3, 3, 8, 8, generator=g) * 2 - 1))
    x0 = torch.rand(3, 3, 8, 8, generator=g) * 2 - 1
    pictures = viz.denoising_frames(
        trajectory, x0, "both", every=2, labels=torch.tensor([0, 1, 2]), class_names=("cat", "dog", "ant")
    )
    assert len(pictures) == 3 and len({p.size for p in pictures}) == 1
    viz.save_gif(pictures, tmp_path / "rgb.gif", fps=20)
    assert Image.open(tmp_path / "rgb.gif").n_frames == 3
    with pytest.raises(Exception, match="--frames"):
        viz.denoising_frames(trajectory, x0, "eps")


# ---- the forward process ------------------------------------------------------------------------


def test_forward_process_is_q_sample_with_one_noise_per_image():
    schedule, g = cosine(50), torch.Generator().manual_seed(0)
    x0 = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    x_t = viz.forward_process(schedule, x0, [0, 10, 30, 50], generator=g)
    assert x_t.shape == (4, 4, 1, 8, 8)
    assert torch.equal(x_t[:, 0], x0)  # alpha_bar_0 = 1: t = 0 is the clean image
    # eps = (x_t - sqrt(abar_t) x0) / sqrt(1 - abar_t) is the same noise at every t > 0
    eps = [
        (x_t[:, k] - schedule.alpha_bar[t].sqrt() * x0) / (1 - schedule.alpha_bar[t]).sqrt()
        for k, t in ((1, 10), (2, 30), (3, 50))
    ]
    assert torch.allclose(eps[0], eps[1], atol=1e-4) and torch.allclose(eps[0], eps[2], atol=1e-3)


def test_forward_figure_shows_clean_images_then_noise(tmp_path):
    data = load_dataset("mnist", "train", data_dir=make_idx_dataset(tmp_path / "mnist"), progress=False)
    x0 = to_model_range(data.images[:6])
    steps = [0, 10, 25, 50]
    figure = viz.forward_figure(cosine(50), x0, steps, generator=torch.Generator().manual_seed(0))
    assert figure.size == (2 + len(steps) * TILE, viz.HEADER_H + 2 + 6 * TILE)
    pixels = np.asarray(figure.convert("L"))

    def column(c):
        left = 2 + c * TILE
        return np.stack([pixels[viz.HEADER_H + 2 + r * TILE :][:56, left : left + 56] for r in range(6)])

    clean = np.stack([np.asarray(viz.to_pil(image, scale=2)) for image in x0])
    assert np.array_equal(column(0), clean)
    # at t = T, x_T is N(0, I) to within sqrt(abar_T) ~ 1e-3, so its pixels are N(0, 1) mapped to 0..255
    reference = to_uint8(torch.randn(200_000, generator=torch.Generator().manual_seed(1))).float()
    noise = column(3).astype(np.float64)
    assert abs(noise.std() - reference.std().item()) < 0.06 * reference.std().item()
    assert abs(noise.mean() - 127.5) < 6
    assert abs(noise.std() - clean.std()) > 10  # the clean digits look nothing like that


def test_forward_steps_and_one_per_class():
    assert viz.forward_steps(1000) == [0, 50, 100, 250, 500, 750, 1000]
    assert viz.forward_steps(50, 3) == [0, 25, 50]
    with pytest.raises(Exception, match="--num"):
        viz.forward_steps(50, 1)
    labels = torch.tensor([3, 1, 3, 0, 1, 2])
    assert viz.one_per_class(labels, 4) == [3, 1, 5, 0]  # classes 0, 1, 2, 3: each one's first example
    assert viz.one_per_class(labels, 6) == [3, 1, 5, 0, 4]  # then the second of each, where there is one
    assert viz.one_per_class(torch.full((5,), -1), 3) == [0, 1, 2]


def test_forward_command_writes_a_captioned_figure(tiny_mnist, tmp_path):
    out = tmp_path / "noising.png"
    assert (
        main(
            [
                "forward",
                "--dataset",
                "mnist",
                "--data-dir",
                str(tiny_mnist),
                "--out",
                str(out),
                "--n",
                "3",
                "--timesteps",
                "50",
                "--num",
                "5",
                "--schedule",
                "linear",
            ]
        )
        == 0
    )
    # three rows (classes 0, 1, 2, captioned with one digit: 12 pixels), five columns t = 0..50
    assert Image.open(out).size == (12 + 2 + 5 * TILE, viz.HEADER_H + 2 + 3 * TILE)


# ---- plots --------------------------------------------------------------------------------------


def test_schedule_plot_and_loss_curve_write_pngs(tmp_path):
    viz.schedule_plot(tmp_path / "schedules.png", T=100)
    assert Image.open(tmp_path / "schedules.png").size == (900, 340)
    metrics = [{"step": 10 * i, "loss": 1 / (1 + i) + 0.05 * math.sin(i)} for i in range(1, 101)]
    viz.loss_curve(metrics, tmp_path / "loss.png")
    viz.loss_curve(metrics[:1], tmp_path / "one.png")  # too few points to smooth: the raw line only
    assert Image.open(tmp_path / "loss.png").size == (600, 350) and (tmp_path / "one.png").is_file()


def test_montage_puts_pictures_side_by_side_under_titles(tmp_path):
    Image.new("L", (30, 20), 0).save(tmp_path / "a.png")
    Image.new("RGB", (40, 50), (0, 0, 255)).save(tmp_path / "b.png")
    viz.montage([tmp_path / "a.png", tmp_path / "b.png"], tmp_path / "ab.png", titles=["w = 0", "w = 3"])
    out = Image.open(tmp_path / "ab.png")
    assert out.mode == "RGB" and out.size == (30 + 8 + 40, viz.CAPTION_H + 2 + 50)
    assert out.getpixel((38 + 5, viz.CAPTION_H + 2 + 5)) == (0, 0, 255)  # b starts after a and the gap
    assert out.getpixel((5, viz.CAPTION_H + 2 + 30)) == (255, 255, 255)  # below the shorter a: white
    with pytest.raises(Exception, match="one title per picture"):
        viz.montage([tmp_path / "a.png"], tmp_path / "x.png", titles=["1", "2"])


# ---- one-line errors ----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "argv, words",
    [
        (["animate", "{tmp}/no-such-run"], "not a ddpmkit run directory"),
        (["animate", "{run}", "--every", "0"], "--every must be >= 1"),
        (["animate", "{run}", "--fps", "0"], "--fps must be > 0"),
        (["animate", "{run}", "--class", "12"], "out of range"),
        (["forward", "--dataset", "imagenet"], "Unknown dataset"),
        (["forward", "--dataset", "mnist", "--timesteps", "50", "--steps", "0,25,60"], "t = 60 is outside 0..T = 50"),
        (["forward", "--dataset", "mnist", "--num", "1"], "--num must be >= 2"),
    ],
)
def test_bad_input_gives_one_line_and_exit_2(run, tmp_path, capsys, argv, words):
    argv = [a.format(tmp=tmp_path, run=run) for a in argv]
    assert main([*argv, "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and words in err and err.startswith(f"ddpmkit {argv[0]}: error:")
    assert not (tmp_path / "out").exists()

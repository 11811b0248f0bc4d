"""A judge for any folder: the held-out split (by path hash, stratified, stable), training that never
sees it, sample labels in the data's proportions, and `ddpmkit eval` on a folder run and its reference rows."""

import json
import random
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.data import load_dataset, open_folder_dataset
from ddpmkit.data.split import MIN_CLASS_HELD_OUT, held_out, held_out_count, split_indices
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval import domain
from ddpmkit.eval.report import eval_labels, sample_labels
from ddpmkit.run import checkpoint
from ddpmkit.run.config import RunConfig, apply_overrides
from ddpmkit.run.sampling import proportional_labels
from ddpmkit.train.stream import training_data

# unbalanced classes, as in a real folder: 30, 12 and 6 images (3, 1 and 1 held out)
CLASS_SIZES = {"circles": 30, "crosses": 12, "stripes": 6}
COLOURS = {"circles": (220, 40, 40), "crosses": (40, 160, 60), "stripes": (40, 60, 220)}


def make_folder(root, sizes=CLASS_SIZES, size=16, seed=0):
    """Per class, `sizes[class]` RGB PNGs: the class's colour and pattern on a noisy light ground."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:size, :size]
    patterns = {
        "circles": (yy - size / 2) ** 2 + (xx - size / 2) ** 2 < (size / 3) ** 2,
        "crosses": (abs(yy - size / 2) < 2) | (abs(xx - size / 2) < 2),
        "stripes": (xx // 3) % 2 == 0,
    }
    for name, count in sizes.items():
        (root / name).mkdir(parents=True)
        for i in range(count):
            pixels = rng.integers(170, 255, (size, size, 3)).astype(np.uint8)
            pixels[patterns[name]] = COLOURS[name]
            Image.fromarray(pixels).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_folder(tmp_path_factory.mktemp("folder") / "images")


# ---- the split ---------------------------------------------------------------------------------------


def test_held_out_count_is_ten_percent_rounded_and_never_the_last_image():
    assert [held_out_count(n) for n in (0, 1, 2, 4, 5, 14, 15, 85, 2261)] == [0, 0, 0, 0, 1, 1, 2, 9, 226]
    assert held_out_count(MIN_CLASS_HELD_OUT - 1) == 0 < held_out_count(MIN_CLASS_HELD_OUT)


def test_split_is_stratified_by_class_and_decided_by_the_paths_alone():
    labels = [0] * 1 + [1] * 3 + [2] * 10 + [3] * 50 + [4] * 200
    paths = [f"class{label}/{i:04d}.png" for i, label in enumerate(labels)]
    test = held_out(paths, labels)
    per_class = [sum(t for t, label in zip(test, labels) if label == c) for c in range(5)]
    assert per_class == [0, 0, 1, 5, 20]
    # the same images whatever order the files are listed in
    order = list(range(len(paths)))
    random.Random(0).shuffle(order)
    shuffled = held_out([paths[i] for i in order], [labels[i] for i in order])
    assert {paths[i] for i, t in zip(order, shuffled) if t} == {p for p, t in zip(paths, test) if t}
    # adding one image moves at most one other image of its class between the splits
    before = {p for p, t in zip(paths, test) if t}
    for extra in range(20):
        grown = held_out([*paths, f"class3/new{extra}.png"], [*labels, 3])
        after = {p for p, t in zip(paths, grown) if t}  # the old images only
        assert len(before ^ after) <= 1
        assert all(p.startswith("class3/") for p in before ^ after)
    # train and test partition the images; "all" is every one
    train, held = split_indices(paths, labels, "train"), split_indices(paths, labels, "test")
    assert sorted(train + held) == split_indices(paths, labels, "all") == list(range(len(paths)))
    with pytest.raises(DdpmkitError, match="Unknown split 'valid'"):
        split_indices(paths, labels, "valid")


def test_folder_splits_load_disjoint_and_alike_wherever_the_folder_is(folder, tmp_path):
    train = load_dataset("folder", "train", folder, progress=False)
    test = load_dataset("folder", "test", folder, progress=False)
    everything = load_dataset("folder", "all", folder, progress=False)
    assert train.info == test.info == everything.info
    assert torch.bincount(test.labels).tolist() == [3, 1, 1]
    assert torch.bincount(train.labels).tolist() == [27, 11, 5]
    assert len(everything) == len(train) + len(test) == sum(CLASS_SIZES.values())
    rows = lambda data: {bytes(x.numpy()) for x in data.images}  # noqa: E731
    assert not rows(train) & rows(test) and rows(train) | rows(test) == rows(everything)
    moved = shutil.copytree(folder, tmp_path / "elsewhere" / "renamed")  # relative paths decide, not absolute ones
    assert torch.equal(load_dataset("folder", "test", moved, progress=False).images, test.images)
    streamed = open_folder_dataset(folder, split="test")
    assert torch.equal(torch.stack([streamed[i][0] for i in range(len(streamed))]), test.images)


def test_a_folder_too_small_to_hold_out_says_so(tmp_path):
    make_folder(tmp_path / "tiny", {"circles": 4, "crosses": 2})
    assert len(load_dataset("folder", "train", tmp_path / "tiny", progress=False)) == 6
    with pytest.raises(DdpmkitError, match=f"holds out no images: a class needs at least {MIN_CLASS_HELD_OUT}"):
        load_dataset("folder", "test", tmp_path / "tiny", progress=False)
    with pytest.raises(DdpmkitError, match="Unknown split 'all' for mnist"):
        load_dataset("mnist", "all")


def test_training_leaves_out_the_held_out_images_unless_asked(folder, capsys):
    config = apply_overrides(RunConfig(), {"data": {"dataset": "folder", "data_dir": str(folder)}})
    assert len(training_data(config)) == 43
    config.data.train_on_all = True
    assert len(training_data(config)) == 48
    config.data.stream = True
    assert len(training_data(config)) == 48
    assert main(["train", "--out", "never", "--train-on-all", "--steps", "1"]) == 2
    assert "--train-on-all is for --dataset folder" in capsys.readouterr().err


# ---- labels and accuracies ---------------------------------------------------------------------------


def test_proportional_labels_follow_the_class_counts_at_every_prefix():
    assert proportional_labels(7, [4, 4, 4]).tolist() == [0, 1, 2, 0, 1, 2, 0]  # = arange(n) % K
    counts = [85, 159, 270, 131, 264, 2261, 169, 224, 218]  # the emoji folder's classes
    labels = proportional_labels(1000, counts)
    share = torch.tensor(counts, dtype=torch.float64) / sum(counts)
    for n in (1, 10, 99, 500, 1000):
        drawn = torch.bincount(labels[:n], minlength=len(counts))
        assert ((drawn - n * share).abs() <= 1).all(), (n, drawn)
    assert 0 not in proportional_labels(50, [0, 3, 1]).tolist()
    with pytest.raises(DdpmkitError, match="positive total"):
        proportional_labels(5, [0, 0])


def test_sample_labels_come_from_the_classifier_training_counts():
    config = RunConfig(num_classes=3)
    fake = type("FakeDomain", (), {"info": {"train_class_counts": [8, 1, 1]}})()
    assert torch.bincount(sample_labels(config, 10, fake)).tolist() == [8, 1, 1]
    assert sample_labels(config, 6, None).tolist() == [0, 1, 2, 0, 1, 2]


def test_balanced_accuracy_counts_every_class_the_same():
    labels = torch.tensor([0] * 8 + [1, 2])
    pred = torch.zeros(10, dtype=torch.long)  # always the majority class
    assert domain.accuracy(pred, labels) == pytest.approx(0.8)
    assert domain.balanced_accuracy(pred, labels) == pytest.approx(1 / 3)
    assert domain.class_accuracies(pred, labels) == {0: 1.0, 1: 0.0, 2: 0.0}
    assert domain.class_accuracies(torch.tensor([2, 1, 1]), torch.tensor([2, 1, 2])) == {1: 1.0, 2: 0.5}


def test_class_weights_make_every_class_weigh_the_same():
    labels = torch.tensor([0] * 6 + [1] * 3 + [2] * 1)
    weights = domain.class_weights(labels, 3)
    assert torch.allclose(weights, torch.tensor([10 / 18, 10 / 9, 10 / 3]))
    assert torch.allclose(torch.bincount(labels, weights=weights[labels]), torch.full((3,), 10 / 3))
    assert domain.class_weights(torch.tensor([0, 1, 2, 0, 1, 2]), 3) is None  # balanced: plain cross-entropy


@pytest.mark.parametrize("size", [16, 32, 64])
def test_domain_classifier_takes_colour_images_of_any_size(size):
    net = domain.DomainClassifier(3, 9).eval()
    features, logits = net(torch.rand(2, 3, size, size) * 2 - 1)
    assert features.shape == (2, domain.RECIPE["features"]) and logits.shape == (2, 9)


# ---- `ddpmkit eval` on a folder --------------------------------------------------------------------


def test_eval_scores_a_folder_run_and_its_reference_rows(folder, tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    tiny = ["--base-channels", "8", "--channel-mults", "1,2", "--attn-resolutions", "8", "--num-heads", "2"]
    fast = ["--timesteps", "20", "--sample-steps", "2", "--batch-size", "8", "--warmup", "2", "--no-progress"]
    train = ["train", "--dataset", "folder", "--data-dir", str(folder), "--image-size", "16", *tiny, *fast]
    assert main([*train, "--steps", "2", "--precision", "fp32", "--out", str(run)]) == 0
    common = ["--inception", "off", "--no-progress", "--n", "12"]
    # --nll-n auto (the default) on a CPU: 100 images at 16x16, so all 5 held-out ones, said in one line
    assert main(["eval", str(run), *common, "--steps", "2", "--nll-stride", "10"]) == 0
    out, err = capsys.readouterr()
    assert "bits/dim on 5 test images, 6 fp32 network passes each (--nll-n 0 skips it)" in err
    assert "domain classifier_test_balanced_accuracy" in out and "domain conditional_balanced_accuracy" in out
    assert "domain conditional_accuracy_per_class" in out
    (report_file,) = run.glob("eval-*.json")
    results = json.loads(report_file.read_text())["results"]
    classifier = results["classifier"]
    # trained on the train split, judged on the 5 held-out images
    assert classifier["train_images"] == 43 and classifier["test_images"] == 5
    assert classifier["train_class_counts"] == [27, 11, 5]
    assert classifier["test_accuracy"] >= 0.8 and classifier["test_balanced_accuracy"] >= 0.6
    assert results["domain"]["classifier_test_balanced_accuracy"] == classifier["test_balanced_accuracy"]
    assert results["domain"]["reference_n"] == 5 and results["nll"]["conditional"]["n"] == 5
    assert json.loads(report_file.read_text())["nll_n"] == 5

    reports = {}
    for blur in ("0", "1"):
        path = tmp_path / f"reference-blur{blur}.json"
        reference = ["eval", "--reference", "folder", "--data-dir", str(folder), "--image-size", "16"]
        assert main([*reference, *common, "--blur", blur, "--out", str(path)]) == 0
        reports[blur] = json.loads(path.read_text())["results"]["domain"]
    assert reports["0"]["fd_dom"] < reports["1"]["fd_dom"]  # blurring moves real images away from the held-out ones
    assert reports["0"]["conditional_accuracy"] >= 0.8
    # what scripts that score their own draws use: the same labels as eval, in the data's proportions
    config = checkpoint.load_config(run)
    assert torch.bincount(eval_labels(config, 43)).tolist() == [27, 11, 5]
    assert main(["eval", str(run), "--image-size", "16"]) == 2
    assert "--image-size goes with --reference" in capsys.readouterr().err


def test_reference_rows_decode_a_folder_as_the_run_was_trained(tmp_path, monkeypatch, capsys):
    """A run trained with --fit pad --background black is judged against real images framed the same
    way: evaluate_reference (and `eval --reference`) decode the folder with the run's fit and background,
    for the images it scores and for the classifier and held-out set it scores them with."""
    from ddpmkit.eval import report

    root = tmp_path / "tall"
    for name, colour in COLOURS.items():  # tall, mostly transparent images: a coloured bar down the middle
        (root / name).mkdir(parents=True)
        for i in range(12):
            pixels = np.zeros((16, 8, 4), np.uint8)
            pixels[:, 3:5] = (*colour, 255)
            Image.fromarray(pixels, "RGBA").save(root / name / f"{i:03d}.png")
    scored = []

    def score_images(images, labels, data, *rest):  # what would be scored, and with which decoding
        scored.append((images, data))
        return {"domain": {"skipped": "not scored in this test"}}

    monkeypatch.setattr(report, "score_images", score_images)

    def corners(**decoding):
        reference = report.evaluate_reference(
            "folder", n=6, data_dir=str(root), image_size=16, inception="off", progress=False, **decoding
        )
        images, data = scored.pop()
        assert reference["dataset"] == data and data["fit"] == decoding.get("fit", "crop")
        return images[:, :, 0, 0]  # the top-left pixel: a pad bar, or transparency, or (cropped) the bar

    assert bool((corners() == 1).all())  # crop on white: the transparent ground is white
    assert bool((corners(fit="pad", background=(0, 0, 0)) == -1).all())  # letterboxed on black

    out = tmp_path / "reference.json"
    args = ["eval", "--reference", "folder", "--data-dir", str(root), "--image-size", "16", "--n", "6"]
    assert main([*args, "--fit", "pad", "--background", "black", "--inception", "off", "--out", str(out)]) == 0
    assert json.loads(out.read_text())["dataset"]["background"] == [0, 0, 0]
    assert bool((scored.pop()[0][:, :, 0, 0] == -1).all())
    # --reference RUN_DIR: the run's own dataset, size, fit and background, from its config
    data = {"dataset": "folder", "data_dir": str(root), "image_size": 16, "fit": "pad", "background": (0, 0, 0)}
    run = checkpoint.create_run(tmp_path / "run", apply_overrides(RunConfig(), {"data": data}))
    assert main(["eval", "--reference", str(run), "--n", "6", "--inception", "off", "--out", str(out)]) == 0
    described = {"name": "folder", **{k: v for k, v in data.items() if k != "dataset"}, "background": [0, 0, 0]}
    assert json.loads(out.read_text())["dataset"] == described
    assert bool((scored.pop()[0][:, :, 0, 0] == -1).all())
    assert main(["eval", "--reference", str(run), "--image-size", "32", "--fit", "crop"]) == 2
    assert "--image-size and --fit come from the run with --reference RUN_DIR" in capsys.readouterr().err
    assert main(["eval", str(run), "--fit", "pad"]) == 2
    assert "--fit and --background go with --reference" in capsys.readouterr().err

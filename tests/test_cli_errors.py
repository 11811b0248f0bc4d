"""Bad input at the command line: one line on stderr, exit status 2, never a traceback, and a
failed start writes nothing (a new --out is not created, an existing run is byte-for-byte kept)."""

import argparse
import contextlib
import gzip
import io
import os
import string
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, make_idx_dataset
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image
from test_checkpoint import snapshot

from ddpmkit.cli import build_parser, main
from ddpmkit.core.samplers import SAMPLERS
from ddpmkit.data import DATASETS
from ddpmkit.errors import either
from ddpmkit.run import checkpoint
from ddpmkit.run.build import net as build_net
from ddpmkit.run.config import OPTIMIZERS, RunConfig, apply_overrides


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    torch.set_num_threads(1)


def make_run(root: Path, conditional=True, label_dropout=0.1, with_checkpoint=True) -> Path:
    """A run directory with an untrained 8x8 model (T = 20), as `ddpmkit train` leaves it."""
    config = apply_overrides(
        RunConfig(),
        {
            "model": {"base_channels": 8, "channel_mults": (1, 2), "attn_resolutions": (), "num_heads": 2},
            "diffusion": {"timesteps": 20},
            "sample": {"steps": 2},
            "data": {"dataset": "mnist", "conditional": conditional, "label_dropout": label_dropout},
        },
    )
    config.in_channels, config.image_size, config.num_classes = 1, 8, 10
    config.class_names = tuple(str(i) for i in range(10))
    checkpoint.create_run(root, config)
    if with_checkpoint:
        net = build_net(config)
        checkpoint.save_checkpoint(root, 1, net, net, {"optimizer": {}, "cpu_rng": torch.get_rng_state()}, {})
    return root


@pytest.fixture(scope="module")
def ctx(tmp_path_factory):
    """Datasets (good, corrupt, odd-sized folder) and runs (conditional, unconditional, no dropout)."""
    root = tmp_path_factory.mktemp("cli")
    mnist = make_idx_dataset(root / "mnist")
    corrupt = make_idx_dataset(root / "corrupt")
    images = corrupt / "train-images-idx3-ubyte.gz"
    images.write_bytes(gzip.compress(gzip.decompress(images.read_bytes())[:-100]))  # truncated payload
    folder = root / "folder30"
    folder.mkdir()
    for i in range(4):
        Image.new("L", (30, 30), 40 * i).save(folder / f"{i}.png")
    return {
        "root": root,
        "mnist": mnist,
        "corrupt": corrupt,
        "folder30": folder,
        "run": make_run(root / "run"),
        "uncond": make_run(root / "uncond", conditional=False),
        "nodrop": make_run(root / "nodrop", label_dropout=0.0),
        "empty": make_run(root / "empty", with_checkpoint=False),
        "notrun": root / "mnist",
    }


def run_cli(argv, capsys) -> tuple:
    """(exit status, stdout, stderr) of main(argv), argparse's SystemExit included."""
    try:
        status = main([str(a) for a in argv])
    except SystemExit as e:
        status = e.code
    out, err = capsys.readouterr()
    return status, out, err


def assert_one_line_error(status, out, err, message):
    assert status == 2, (status, err)
    assert err.count("\n") == 1 and err.startswith("ddpmkit") and "Traceback" not in err, err
    assert message in err, err
    assert out == ""


def train_argv(ctx, *flags, out=None):
    return [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        ctx["mnist"],
        *TINY_MODEL,
        "--batch-size",
        8,
        "--steps",
        3,
        "--no-progress",
        "--out",
        out or ctx["root"] / "new-run",
        *flags,
    ]


# case -> (argv given ctx, a piece of the message); every train case uses a fresh --out
TRAIN_CASES = {
    "steps zero": (lambda c: train_argv(c, "--steps", 0), "--steps must be >= 1, got 0"),
    "steps negative": (lambda c: train_argv(c, "--steps", -4), "--steps must be >= 1, got -4"),
    "batch size zero": (lambda c: train_argv(c, "--batch-size", 0), "--batch-size must be >= 1"),
    "lr zero": (lambda c: train_argv(c, "--lr", 0), "--lr must be a finite number > 0, got 0.0"),
    "lr infinite": (lambda c: train_argv(c, "--lr", "inf"), "--lr must be a finite number > 0, got inf"),
    "lr nan": (lambda c: train_argv(c, "--lr", "nan"), "--lr must be a finite number > 0, got nan"),
    "epochs infinite": (lambda c: train_argv(c, "--epochs", "inf"), "--epochs must be a finite number > 0"),
    "epochs too many to count": (
        lambda c: train_argv(c, "--epochs", "3.7e306"),  # found by the fuzzer below
        "--epochs 3.7e+306 is more optimizer steps than can be counted",
    ),
    "timesteps zero": (lambda c: train_argv(c, "--timesteps", 0), "--timesteps must be >= 1, got 0"),
    "signal left in x_T": (
        lambda c: train_argv(c, "--schedule", "linear", "--timesteps", 1, "--sample-steps", 1),
        "the linear schedule with T = 1 keeps alpha_bar_T = 0.9 of the image",
    ),
    "sample steps beyond T": (lambda c: train_argv(c, "--sample-steps", 51), "--sample-steps 51 exceeds the 50"),
    "sample steps zero": (lambda c: train_argv(c, "--sample-steps", 0), "sampling steps must be a positive"),
    "eta above 1": (lambda c: train_argv(c, "--eta", 1.5), "--eta must be in [0, 1], got 1.5"),
    "unknown grid sampler": (
        lambda c: train_argv(c, "--sampler", "lms"),
        f"--sampler must be {either(SAMPLERS)}, got 'lms'",
    ),
    "unknown dataset": (
        lambda c: train_argv(c, "--dataset", "imagenet"),
        f"--dataset must be {either(DATASETS)}, got 'imagenet'",
    ),
    "unknown schedule": (lambda c: train_argv(c, "--schedule", "sigmoid"), "--schedule must be linear or cosine"),
    "unknown objective": (lambda c: train_argv(c, "--objective", "score"), "--objective must be eps, x0 or v"),
    "unknown arch": (lambda c: train_argv(c, "--arch", "dit"), "--arch must be unet or convnext, got 'dit'"),
    "unknown optimizer": (
        lambda c: train_argv(c, "--optimizer", "sgd"),
        f"--optimizer must be {either(OPTIMIZERS)}, got 'sgd'",
    ),
    "negative grad clip": (lambda c: train_argv(c, "--grad-clip", -1), "--grad-clip must be >= 0"),
    "label dropout 1": (lambda c: train_argv(c, "--label-dropout", 1), "--label-dropout must be in [0, 1)"),
    "class balance 2": (lambda c: train_argv(c, "--class-balance", 2), "--class-balance must be in [0, 1]"),
    "keep zero": (lambda c: train_argv(c, "--keep", 0), "--keep must be >= 1"),
    "four levels at 28x28": (
        lambda c: train_argv(c, "--channel-mults", "1,2,2,2"),
        "--image-size 28 is not divisible by 8: the 4 levels of --channel-mults (1, 2, 2, 2) halve it 3 times",
    ),
    "folder at 30x30 for 3 levels": (
        lambda c: train_argv(
            c,
            "--dataset",
            "folder",
            "--data-dir",
            c["folder30"],
            "--image-size",
            30,
            "--channel-mults",
            "1,2,2",
            "--attn-resolutions",
            "",
            "--unconditional",
        ),
        "30 is not divisible by 4",
    ),
    "attention at a size no level has": (
        lambda c: train_argv(c, "--attn-resolutions", 5),
        "--attn-resolutions [5] match no level; the levels are [28, 14]",
    ),
    "missing data dir": (lambda c: train_argv(c, "--data-dir", c["root"] / "nowhere"), "nowhere"),
    "corrupt dataset file": (lambda c: train_argv(c, "--data-dir", c["corrupt"]), "is truncated"),
    "unlabelled data, conditional": (
        lambda c: train_argv(c, "--dataset", "folder", "--data-dir", c["folder30"], "--image-size", 28),
        "train it with --unconditional",
    ),
    "no budget": (lambda c: [a for a in train_argv(c) if a not in ("--steps", 3)], "give a training budget"),
    "preset with resume": (
        lambda c: ["train", "--out", c["run"], "--resume", "--preset", "seed-notebook"],
        "--preset cannot be combined with --resume",
    ),
    "resume a directory with no run": (
        lambda c: ["train", "--out", c["root"] / "nothing-here", "--resume"],
        "is not a ddpmkit run directory (no config.json)",
    ),
    "non-numeric steps": (lambda c: train_argv(c, "--steps", "ten"), "argument --steps: invalid int value: 'ten'"),
    "non-numeric lr": (lambda c: train_argv(c, "--lr", "fast"), "argument --lr: invalid float value: 'fast'"),
    "non-numeric channel mults": (
        lambda c: train_argv(c, "--channel-mults", "1,two"),
        "argument --channel-mults: invalid comma-separated integers value",
    ),
    "unknown flag": (lambda c: train_argv(c, "--learning-rate", 1), "unrecognized arguments: --learning-rate"),
    "device that is not there": (lambda c: train_argv(c, "--device", "tpu"), "--device must be auto, cpu or cuda"),
}


@pytest.mark.parametrize("case", sorted(TRAIN_CASES))
def test_bad_train_input_is_one_line_exit_2_and_writes_nothing(ctx, capsys, case):
    make_argv, message = TRAIN_CASES[case]
    before = snapshot(ctx["root"])
    assert_one_line_error(*run_cli(make_argv(ctx), capsys), message)
    assert snapshot(ctx["root"]) == before and not (ctx["root"] / "new-run").exists()


def test_train_into_an_existing_run_or_changing_it_on_resume_changes_no_byte(ctx, capsys):
    run = ctx["run"]
    before = snapshot(run)
    assert_one_line_error(*run_cli(train_argv(ctx, out=run), capsys), "already holds a run; add --resume")
    assert_one_line_error(
        *run_cli(["train", "--out", run, "--resume", "--lr", "0.5"], capsys),
        "--lr cannot change when resuming (this run has 0.001)",
    )
    assert_one_line_error(
        *run_cli(["train", "--out", run, "--resume", "--unconditional"], capsys),
        "--unconditional cannot change when resuming (this run has True)",
    )
    assert snapshot(run) == before


SAMPLE_CASES = {
    "steps zero": (lambda c: ["sample", c["run"], "--steps", 0], "sampling steps must be a positive integer"),
    "steps beyond T": (
        lambda c: ["sample", c["run"], "--steps", 21],
        "cannot sample with 21 steps: the model has only T = 20",
    ),
    "eta above 1": (lambda c: ["sample", c["run"], "--eta", 1.01], "--eta must be in [0, 1], got 1.01"),
    "eta below 0": (lambda c: ["sample", c["run"], "--eta", -0.5], "--eta must be in [0, 1], got -0.5"),
    "guidance, unconditional model": (
        lambda c: ["sample", c["uncond"], "--guidance", 3],
        "--guidance needs a class-conditional model",
    ),
    "guidance, no label dropout": (
        lambda c: ["sample", c["nodrop"], "--guidance", 3],
        "--guidance needs a model trained with label dropout",
    ),
    "guidance nan": (lambda c: ["sample", c["run"], "--guidance", "nan"], "--guidance must be a finite number"),
    "guidance negative": (lambda c: ["sample", c["run"], "--guidance", -2], "--guidance must be a finite number"),
    "class out of range": (
        lambda c: ["sample", c["run"], "--class", 10],
        "class 10 is out of range: this model has classes 0..9",
    ),
    "class negative": (lambda c: ["sample", c["run"], "--class", -1], "class -1 is out of range"),
    "class, unconditional model": (
        lambda c: ["sample", c["uncond"], "--class", 3],
        "--class needs a class-conditional model",
    ),
    "unknown sampler": (
        lambda c: ["sample", c["run"], "--sampler", "plms"],
        f"--sampler must be {either(SAMPLERS)}, got 'plms'",
    ),
    "unipc order 4": (lambda c: ["sample", c["run"], "--order", 4], "--order must be 2 or 3, got 4"),
    "churn negative": (lambda c: ["sample", c["run"], "--s-churn", -1], "--s-churn must be a finite number >= 0"),
    "churn range empty": (
        lambda c: ["sample", c["run"], "--s-tmin", 1, "--s-tmax", 0.5],
        "--s-tmax must be >= --s-tmin (1.0), got 0.5",
    ),
    "s_noise infinite": (lambda c: ["sample", c["run"], "--s-noise", "inf"], "--s-noise must be a finite number"),
    "karras spacing, too many steps": (
        lambda c: ["sample", c["run"], "--spacing", "karras", "--steps", 21],
        "cannot sample with 21 steps",
    ),
    "unknown spacing": (lambda c: ["sample", c["run"], "--spacing", "log"], "unknown spacing 'log'"),
    "n zero": (lambda c: ["sample", c["run"], "--n", 0], "--n must be >= 1, got 0"),
    "batch size zero": (lambda c: ["sample", c["run"], "--batch-size", 0], "--batch-size must be >= 1"),
    "no run": (lambda c: ["sample", c["notrun"]], "is not a ddpmkit run directory"),
    "no such directory": (lambda c: ["sample", c["root"] / "nowhere"], "is not a ddpmkit run directory"),
    "run without a checkpoint": (lambda c: ["sample", c["empty"]], "has no complete checkpoint yet"),
    "unknown weights": (lambda c: ["sample", c["run"], "--which", "best"], "argument --which: invalid choice"),
    "non-numeric n": (lambda c: ["sample", c["run"], "--n", "many"], "argument --n: invalid int value: 'many'"),
}


@pytest.mark.parametrize("case", sorted(SAMPLE_CASES))
def test_bad_sample_input_is_one_line_exit_2_and_writes_nothing(ctx, capsys, case, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # where samples.png would land
    make_argv, message = SAMPLE_CASES[case]
    before = snapshot(ctx["root"])
    assert_one_line_error(*run_cli(make_argv(ctx), capsys), message)
    assert snapshot(ctx["root"]) == before and list(tmp_path.iterdir()) == []


def test_sample_works_on_the_fixture_run(ctx, capsys, tmp_path):
    """The sample cases above fail for their flag, not because the fixture run is broken."""
    status, out, err = run_cli(
        ["sample", ctx["run"], "--n", 4, "--steps", 2, "--guidance", 2, "--out", tmp_path / "s.png"], capsys
    )
    assert status == 0 and (tmp_path / "s.png").is_file(), err


@pytest.mark.parametrize(
    "argv, message",
    [
        (
            [
                "train",
                "--out",
                "{root}/sub",
                "--dataset",
                "mnist",
                "--data-dir",
                "{mnist}",
                "--batch-size",
                "0",
                "--steps",
                "2",
            ],
            "ddpmkit train: error: --batch-size must be >= 1, got 0",
        ),
        (["sample", "{mnist}", "--steps", "4"], "ddpmkit sample: error: {mnist} is not a ddpmkit run directory"),
    ],
)
def test_a_real_process_exits_2_with_a_single_stderr_line(ctx, argv, message):
    fill = {k: str(v) for k, v in ctx.items()}
    result = subprocess.run(
        [sys.executable, "-m", "ddpmkit", *[a.format(**fill) for a in argv]],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.count("\n") == 1 and result.stderr.startswith(message.format(**fill)), result.stderr
    assert not (ctx["root"] / "sub").exists()


# ---- random argument lists -----------------------------------------------------------------------


def _options(command: str) -> dict:
    """{option: its argparse action} of a subcommand, read from the parser itself."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {a.option_strings[-1]: a for a in sub.choices[command]._actions if a.option_strings}


WORDS = st.sampled_from(
    [
        "ddim",
        "dpm++",
        "ddpm",
        "cosine",
        "linear",
        "v",
        "x0",
        "eps",
        "convnext",
        "unet",
        "folder",
        "mnist",
        "cifar10",
        "skip",
        "stop",
        "fp16",
        "bf16",
        "fp32",
        "trailing",
        "quadratic",
        "ema",
        "model",
        "cpu",
        "cuda",
        "auto",
        "full",
        "nearest",
        "seed-notebook",
        "x_t",
        "both",
    ]
)
JUNK = st.one_of(st.sampled_from(["", " ", "-1", "--", "1,2", "nan", "1e999"]), st.text(string.printable, max_size=8))
NUMBERS = {
    int: st.integers(-3, 64).map(str),
    float: st.one_of(
        st.floats(allow_nan=True, allow_infinity=True).map(repr),
        st.sampled_from(["0", "1", "0.1", "0.5", "1.5", "-1", "2", "1e-4", "1e30"]),
    ),
}


def value_for(action) -> st.SearchStrategy:
    """Mostly values of the option's type (so the checks after parsing are reached), sometimes junk."""
    if action.option_strings[-1] in ("--n", "--batch-size", "--num"):
        typed = st.integers(-2, 12).map(str)  # keeps sampling cheap when everything else is valid
    elif action.type in NUMBERS:
        typed = NUMBERS[action.type]
    elif getattr(action.type, "__name__", "") == "comma-separated integers":
        typed = st.lists(st.integers(-1, 30), max_size=4).map(lambda v: ",".join(map(str, v)))
    elif action.choices:
        typed = st.sampled_from(sorted(action.choices))
    else:
        typed = WORDS
    return st.integers(0, 9).flatmap(lambda i: JUNK if i == 0 else typed)


# these would start other processes or write outside the test's directory; --data-dir and --out are fixed
NEVER = {"--nproc", "--data-dir", "--out", "--npz", "--help"}


@st.composite
def argument_lists(draw, command: str):
    options = {k: a for k, a in _options(command).items() if k not in NEVER}
    argv = [command]
    for option in draw(st.lists(st.sampled_from(sorted(options)), max_size=7)):
        argv.append(option)
        if options[option].nargs != 0:
            argv.append(draw(value_for(options[option])))
    return argv


def fuzz(argv):
    """main(argv) ends in status 0 or 2 with no exception; a failure is one line on stderr."""
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except SystemExit as e:
            status = e.code
    assert status in (0, 2), (argv, status, err.getvalue())
    if status == 2:
        assert err.getvalue().count("\n") == 1 and "Traceback" not in err.getvalue(), (argv, err.getvalue())
    return status


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argument_lists("train"), with_data=st.booleans())
def test_random_train_arguments_exit_0_or_2_and_change_nothing(ctx, argv, with_data):
    """Without data nothing may start; with data, every check up to building the model runs, and
    the --out directory, which already holds a file, refuses the run and keeps its bytes."""
    out = ctx["root"] / ("occupied" if with_data else "fuzz-out")
    if with_data:
        out.mkdir(exist_ok=True)
        (out / "mine.txt").write_text("keep me")
    data = ctx["mnist"] if with_data else ctx["root"] / "no-data"
    defaults = ["--dataset", "mnist", "--steps", "3"] if with_data else []  # the random flags come after
    fuzz([argv[0], *defaults, *argv[1:], "--data-dir", str(data), "--out", str(out)])
    assert [p.name for p in out.iterdir()] == ["mine.txt"] if with_data else not out.exists()
    if with_data:
        assert (out / "mine.txt").read_text() == "keep me"


@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argument_lists("sample"), run=st.sampled_from(["run", "uncond", "nodrop", "empty", "notrun"]))
def test_random_sample_arguments_exit_0_or_2(ctx, argv, run):
    out = ctx["root"] / "fuzz.png"
    out.unlink(missing_ok=True)
    status = fuzz([argv[0], str(ctx[run]), *argv[1:], "--out", str(out)])
    assert (status == 0) == out.is_file()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argument_lists("forward"))
def test_random_forward_arguments_exit_0_or_2(ctx, argv):
    assert (
        fuzz([*argv, "--data-dir", str(ctx["root"] / "no-data"), "--out", str(ctx["root"] / "f.png")]) == 2
        or "--help" in argv
        or "-h" in argv
    )

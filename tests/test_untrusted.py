"""A run directory from someone else is untrusted input (issue 18).

Crafted run directories (huge or negative sizes, wrong types, oversized or deeply nested JSON,
weights renamed, reshaped, truncated or lying in their header, a zip-bomb optimizer state) are each
refused in one line with exit status 2, by every command that opens a run, before anything the
directory sizes is built, and without changing a byte of it. One child process tries them all and
reports its peak memory per case, which must stay under 1 GiB (an address-space limit keeps a
failure from taking the machine down). A run that passes the checks loads into a network that gives
bit-identical outputs to the one that was saved.
"""

import contextlib
import hashlib
import io
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import torch
from conftest import perturb
from PIL import Image
from safetensors.torch import load_file, save_file

from ddpmkit.cli import main
from ddpmkit.errors import DdpmkitError
from ddpmkit.run import build, checkpoint, load, weights
from ddpmkit.run.config import RunConfig, apply_overrides, resolve, validate
from ddpmkit.run.presets import PRESETS

PEAK_LIMIT_KIB = 1 << 20  # 1 GiB: importing torch and ddpmkit takes about a quarter of it
ADDRESS_SPACE_LIMIT = 6 << 30  # bytes: a command that tries to allocate gigabytes fails instead of swapping


# ---- one tiny trained run, shared -------------------------------------------------------------


# 8x8 grayscale images in two class folders, and a network of 8 base channels, T = 50
MODEL = ["--base-channels", "8", "--channel-mults", "1,2", "--attn-resolutions", "4", "--num-heads", "2"]
TRAIN = ["--timesteps", "50", "--batch-size", "8", "--sample-steps", "2", "--precision", "fp32", "--no-progress"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    """A run trained for 2 steps by `ddpmkit train`, on 8x8 images of two classes; cases copy it."""
    root = tmp_path_factory.mktemp("untrusted")
    data = root / "images"
    for i in range(16):
        (data / f"class{i % 2}").mkdir(parents=True, exist_ok=True)
        Image.new("L", (8, 8), 15 * i).save(data / f"class{i % 2}" / f"{i}.png")
    run = root / "run"
    argv = ["train", "--dataset", "folder", "--data-dir", data, "--image-size", 8, *MODEL, *TRAIN, "--steps", 2]
    assert run_cli([*argv, "--device", "cpu", "--out", run])[0] == 0
    return run


def tree(directory: Path) -> dict:
    """{relative path: SHA-256, or "dir"} of everything under directory."""
    return {
        str(p.relative_to(directory)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
        for p in sorted(directory.rglob("*"))
    }


# ---- crafting ----------------------------------------------------------------------------------


def latest(run: Path) -> Path:
    return checkpoint.latest_checkpoint(run)


def config(changes: dict):
    """Set {"section.field" or "field": value} in config.json."""

    def craft(run: Path) -> None:
        data = json.loads((run / "config.json").read_text())
        for dotted, value in changes.items():
            *sections, name = dotted.split(".")
            target = data
            for section in sections:
                target = target[section]
            target[name] = value
        (run / "config.json").write_text(json.dumps(data))

    return craft


def config_text(edit):
    """Replace config.json by edit(its text): str or bytes."""

    def craft(run: Path) -> None:
        text = edit((run / "config.json").read_text())
        (run / "config.json").write_bytes(text if isinstance(text, bytes) else text.encode())

    return craft


def state(text: str):
    def craft(run: Path) -> None:
        (latest(run) / "state.json").write_text(text)

    return craft


def tensors(edit, name="ema"):
    """Rewrite a weights file, a well-formed one, from edit(its tensors)."""

    def craft(run: Path) -> None:
        path = latest(run) / f"{name}.safetensors"
        save_file(edit(load_file(str(path))), str(path))

    return craft


def header(edit):
    """Rewrite the JSON header of ema.safetensors (the tensor bytes untouched) by edit(header dict)."""

    def craft(run: Path) -> None:
        path = latest(run) / "ema.safetensors"
        raw = path.read_bytes()
        length = int.from_bytes(raw[:8], "little")
        text = json.dumps(edit(json.loads(raw[8 : 8 + length]))).encode()
        path.write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + length :])

    return craft


def raw_weights(edit):
    def craft(run: Path) -> None:
        path = latest(run) / "ema.safetensors"
        path.write_bytes(edit(path.read_bytes()))

    return craft


def renamed(t: dict) -> dict:
    return {("init_conv.kernel" if k == "init_conv.weight" else k): v for k, v in t.items()}


def reshaped(t: dict) -> dict:
    return {**t, "init_conv.weight": t["init_conv.weight"].reshape(8, 9)}


def first_entry(h: dict) -> dict:
    return h[next(k for k in h if k != "__metadata__")]


def huge_shape(h: dict) -> dict:
    """A header claiming its last tensor is [2^20, 2^20] floats (4 TiB), the offsets consistent with that."""
    last = max((v for k, v in h.items() if k != "__metadata__"), key=lambda v: v["data_offsets"][0])
    begin = last["data_offsets"][0]
    last["shape"], last["data_offsets"] = [2**20, 2**20], [begin, begin + 2**42]
    return h


def lying_shape(h: dict) -> dict:
    first_entry(h)["shape"] = [2**31, 2**31]  # the offsets still cover its few real bytes
    return h


def truncated_in_header(raw: bytes) -> bytes:
    return raw[: 8 + int.from_bytes(raw[:8], "little") // 2]


def nested(depth: int):
    return config_text(lambda text: '{"class_names": ' + "[" * depth + "]" * depth + "}")


def big_config(text: str) -> str:
    data = json.loads(text)
    data["class_names"] = ["x" * 1024] * (50 << 10)  # 50 MiB of well-formed JSON
    return json.dumps(data)


# case -> (how to craft it from the trained run, a piece of the one-line message)
CASES = {
    # config.json: sizes
    "the issue's 4096 base channels and mults 1,2,4,8": (
        config({"model.base_channels": 4096, "model.channel_mults": [1, 2, 4, 8]}),
        "model.base_channels must be at most 1,024, got 4,096",
    ),
    "1024 base channels, within the limit, for weights of 8": (
        config({"model.base_channels": 1024}),
        "do not fit this architecture: shape of time_embed.1.weight is (32, 8), model wants (4096, 1024) "
        "(the config describes",
    ),
    "16 base channels for weights of 8": (config({"model.base_channels": 16}), "do not fit this architecture"),
    "an extra level": (config({"model.channel_mults": [1, 2, 2]}), "do not fit this architecture: missing "),
    "T of a billion": (config({"diffusion.timesteps": 10**9}), "diffusion.timesteps must be at most 10,000"),
    "image size a million": (config({"image_size": 10**6}), "image_size must be at most 1,024, got 1,000,000"),
    "data.image_size 65536": (config({"data.image_size": 65536}), "data.image_size must be at most 1,024"),
    "a billion classes": (config({"num_classes": 10**9}), "num_classes must be at most 100,000"),
    "a million heads": (config({"model.num_heads": 10**6}), "model.num_heads must be at most 64"),
    "a thousand levels": (config({"model.channel_mults": [1] * 1000}), "model.channel_mults must have 1 to 8"),
    "a channel multiplier of a million": (
        config({"model.channel_mults": [1, 10**6]}),
        "model.channel_mults[1] must be at most 16",
    ),
    "100,000 residual blocks": (config({"model.num_res_blocks": 10**5}), "model.num_res_blocks must be at most 16"),
    "a batch of a billion": (config({"train.batch_size": 10**9}), "train.batch_size must be at most 4,096"),
    "a 100,000-character class name": (
        config({"class_names": ["x" * 100_000]}),
        "class_names[0] must be at most 256 characters long",
    ),
    "more class names than classes": (config({"class_names": ["a", "b", "c"]}), "class_names has 3 names for 2"),
    "two image channels": (config({"in_channels": 2}), "in_channels must be 1 or 3, got 2"),
    # negative and non-integer values
    "negative base channels": (config({"model.base_channels": -8}), "model.base_channels must be at least 1"),
    "negative T": (config({"diffusion.timesteps": -5}), "--timesteps must be >= 1, got -5"),
    "conditional with no classes": (config({"num_classes": 0}), "a class-conditional run needs num_classes >= 1"),
    "8.5 base channels": (config({"model.base_channels": 8.5}), "model.base_channels must be an integer, got 8.5"),
    "T as 50.0": (config({"diffusion.timesteps": 50.0}), "diffusion.timesteps must be an integer, got 50.0"),
    # wrong types
    "a number as a string": (config({"model.base_channels": "8"}), "model.base_channels must be an integer, got '8'"),
    "a bool for T": (config({"diffusion.timesteps": True}), "diffusion.timesteps must be an integer, got True"),
    "a list as a string": (config({"model.channel_mults": "1,2"}), "model.channel_mults must be a list of integers"),
    "a section as a list": (config({"model": [8, 16]}), "model must be an object of ModelConfig fields"),
    "null image size": (config({"image_size": None}), "image_size must be an integer, got None"),
    "a string flag": (config({"data.conditional": "yes"}), "data.conditional must be true or false, got 'yes'"),
    "an unknown key": (config({"model.width": 3}), "unknown ModelConfig keys in config: width"),
    "the whole config a list": (config_text(lambda text: "[1, 2]"), "the config must be an object of RunConfig"),
    "NaN learning rate": (
        config_text(lambda text: text.replace('"lr": 0.001', '"lr": NaN')),
        "NaN is not a finite number",
    ),
    "Infinity guidance": (
        config_text(lambda text: re.sub(r'"guidance": [0-9.]+', '"guidance": -Infinity', text, count=1)),
        "-Infinity is not a finite number",
    ),
    "a guidance interval upside down": (
        config({"sample.guidance_interval": [5.0, 0.5]}),
        "--guidance-interval must be LO,HI with 0 <= LO < HI (sigmas), got (5.0, 0.5)",
    ),
    "a guidance interval of three numbers": (
        config({"sample.guidance_interval": [0, 1, 2]}),
        "--guidance-interval must be LO,HI",
    ),
    "a guidance interval of strings": (
        config({"sample.guidance_interval": ["a", "b"]}),
        "sample.guidance_interval[0] must be a number, got 'a'",
    ),
    "a guidance interval as a number": (
        config({"sample.guidance_interval": 3}),
        "sample.guidance_interval must be a list of numbers, got 3",
    ),
    "1e999 dropout": (
        config_text(lambda text: text.replace('"dropout": 0.0', '"dropout": 1e999')),
        "1e999 is not a finite number",
    ),
    "not UTF-8": (config_text(lambda text: b"\xff\xfe\x00" + text.encode()), "is not a valid ddpmkit config: "),
    # oversized and deeply nested JSON
    "a 50 MiB config.json": (config_text(big_config), "is larger than 1,048,576 bytes"),
    "nested 100,000 deep": (nested(100_000), "nested more than 8 levels deep"),
    "nested 100 deep": (nested(100), "nested more than 8 levels deep"),
    # state.json
    "a step as a string": (state('{"step": "2", "format": 1}'), "step must be an integer from 0 to"),
    "format true": (state('{"step": 2, "format": true}'), "format must be an integer from 1 to 2, got True"),
    "a global batch of 1e30": (state('{"step": 2, "format": 1, "global_batch": 1e30}'), "global_batch must be"),
    "a 2 MiB state.json": (state('{"step": 2, "format": 1}' + " " * (2 << 20)), "is larger than 1,048,576 bytes"),
    # weights
    "a tensor renamed": (tensors(renamed), "do not fit this architecture: missing init_conv.weight"),
    "a tensor reshaped": (
        tensors(reshaped),
        "do not fit this architecture: shape of init_conv.weight is (8, 9), model wants (8, 1, 3, 3)",
    ),
    "a tensor in float16": (
        tensors(lambda t: {k: v.half() for k, v in t.items()}),
        "dtype of time_embed.1.weight is F16, model wants F32",
    ),
    "an extra tensor": (tensors(lambda t: {**t, "zz.extra": torch.zeros(3)}), "unexpected zz.extra"),
    "truncated inside its header": (raw_weights(truncated_in_header), "it is truncated: its header claims"),
    "a header length of 2^63": (
        raw_weights(lambda raw: (2**63).to_bytes(8, "little") + raw[8:]),
        "its header claims 9,223,372,036,854,775,808 bytes, over the 16,777,216 allowed",
    ),
    "a header claiming a 4 TiB tensor": (header(huge_shape), "its tensors span 4,398,046,"),
    "a header whose shape its bytes do not hold": (header(lying_shape), "claims shape (2147483648, 2147483648) of F32"),
    "a header that is not JSON": (
        raw_weights(lambda raw: raw[:8] + b"\x00" * int.from_bytes(raw[:8], "little")),
        "its header is not JSON",
    ),
    "a header nested 100,000 deep": (
        raw_weights(lambda raw: (200_000).to_bytes(8, "little") + b"[" * 100_000 + b"]" * 100_000),
        "its header is nested too deeply",
    ),
    "a weights file of 5 bytes": (raw_weights(lambda raw: raw[:5]), "fewer than the 8 of the header length"),
}


def crafted(trained: Path, where: Path, case: str) -> Path:
    run = where / "run"
    shutil.copytree(trained, run)
    CASES[case][0](run) if case in CASES else RESUME_CASES[case][0](run)
    return run


def run_cli(argv) -> tuple:
    """(exit status, stdout, stderr) of main(argv)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        status = main([str(a) for a in argv])
    return status, out.getvalue(), err.getvalue()


@pytest.fixture
def built(monkeypatch) -> list:
    """The devices `run.build.net` built a network on, in order (meta: shapes alone, no memory)."""
    devices, real = [], build.net

    def spy(config):
        net = real(config)
        devices.append(next(net.parameters()).device.type)
        return net

    monkeypatch.setattr(build, "net", spy)
    return devices


def sample_argv(run: Path, out: Path) -> list:
    return ["sample", run, "--n", 2, "--steps", 2, "--device", "cpu", "--out", out]


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_crafted_run_directory_is_refused_in_one_line_before_anything_is_built(trained, tmp_path, built, case):
    run = crafted(trained, tmp_path, case)
    before = tree(run)
    status, out, err = run_cli(sample_argv(run, tmp_path / "s.png"))
    assert status == 2 and out == "", err
    assert err.startswith("ddpmkit sample: error: ") and err.count("\n") == 1 and len(err) < 600, err
    assert CASES[case][1] in err, err
    assert set(built) <= {"meta"}  # nothing was built for real
    assert tree(run) == before and not (tmp_path / "s.png").exists()


def test_the_trained_run_itself_samples(trained, tmp_path, built):
    """The cases above fail for what was crafted, not because the shared run is broken."""
    status, _, err = run_cli(sample_argv(trained, tmp_path / "s.png"))
    assert status == 0 and (tmp_path / "s.png").is_file(), err
    assert built == ["meta"]


# ---- every command opens a run through the same checks ----------------------------------------


def commands(run: Path, tmp: Path) -> dict:
    return {
        "sample": sample_argv(run, tmp / "s.png"),
        "animate": ["animate", run, "--n", 2, "--steps", 2, "--device", "cpu", "--out", tmp / "a.gif"],
        "eval": ["eval", run, "--n", 4, "--steps", 2, "--nll-n", 0, "--inception", "off", "--device", "cpu"],
        "train": ["train", "--out", run, "--resume", "--steps", 4, "--no-progress", "--device", "cpu"],
    }


@pytest.mark.parametrize(
    "case",
    ["1024 base channels, within the limit, for weights of 8", "a header claiming a 4 TiB tensor", "T of a billion"],
)
def test_sample_animate_eval_and_resume_refuse_alike(trained, tmp_path, built, case):
    run = crafted(trained, tmp_path, case)
    before, messages = tree(run), set()
    for command, argv in commands(run, tmp_path).items():
        status, out, err = run_cli(argv)
        assert status == 2 and err.startswith(f"ddpmkit {command}: error: ") and err.count("\n") == 1, err
        assert CASES[case][1] in err, err
        messages.add(err.split(": error: ")[1].replace("model.safetensors", "ema.safetensors"))
    assert len(messages) == 1  # the same sentence from every command (resume checks model, then ema weights)
    with pytest.raises(DdpmkitError, match="\\A[^\n]*\\Z") as caught:  # the library's loader, for `serve`
        load.load_denoiser(run)
    assert str(caught.value) + "\n" in messages
    assert set(built) <= {"meta"} and tree(run) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run"]


def zip_bomb(run: Path) -> None:
    """train_state.pt rewritten with its entries deflated, one of them 64 MiB of zeros (64 KB deflated)."""
    path = latest(run) / "train_state.pt"
    with zipfile.ZipFile(path) as archive:
        entries = [(info.filename, archive.read(info.filename)) for info in archive.infolist()]
    with zipfile.ZipFile(path, "w") as archive:
        for name, data in entries:
            if name.endswith("data/0"):
                data = bytes(64 << 20)
            archive.writestr(name, data, compress_type=zipfile.ZIP_DEFLATED)


def moments_reshaped(run: Path) -> None:
    path = latest(run) / "train_state.pt"
    train_state = torch.load(path, weights_only=True)
    moments = train_state["optimizer"]["state"][0]
    moments["exp_avg"] = moments["exp_avg"].reshape(-1)
    torch.save(train_state, path)


# what only `train --resume` reads: the optimizer state and the metrics
RESUME_CASES = {
    "train_state.pt a zip bomb": (zip_bomb, "its entry"),
    "train_state.pt not an archive": (
        lambda run: (latest(run) / "train_state.pt").write_bytes(b"\x80\x04K\x01."),
        "not a zip archive of tensors",
    ),
    "Adam's moments reshaped": (moments_reshaped, "exp_avg of time_embed.1.weight has shape (256,), the parameter"),
    "metrics.jsonl with a line that is not a row": (
        lambda run: (run / "metrics.jsonl").write_text('{"step": 1, "loss": 0.5}\n[[["oops"]]]\n'),
        "metrics.jsonl line 2 is not a row of metrics",
    ),
}


@pytest.mark.parametrize("case", sorted(RESUME_CASES))
def test_resume_refuses_a_crafted_optimizer_state_or_metrics(trained, tmp_path, case):
    run = crafted(trained, tmp_path, case)
    (run / ".tmp-ckpt-left-by-a-kill").mkdir()  # what tidy() would clear: only after every check passed
    before = tree(run)
    status, out, err = run_cli(commands(run, tmp_path)["train"])
    assert status == 2 and err.startswith("ddpmkit train: error: ") and err.count("\n") == 1, err
    assert RESUME_CASES[case][1] in err, err
    assert tree(run) == before


def test_resume_of_the_trained_run_still_works(trained, tmp_path):
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    (run / ".tmp-ckpt-left-by-a-kill").mkdir()
    status, _, err = run_cli(commands(run, tmp_path)["train"])
    assert status == 0, err
    assert checkpoint.read_state(latest(run))["step"] == 4 and not (run / ".tmp-ckpt-left-by-a-kill").exists()


# ---- peak memory, in a child process ----------------------------------------------------------

# Runs `ddpmkit sample` (cli.main, as `python -m ddpmkit` does) on each crafted directory and reports
# the exit status, stderr and peak resident memory of each. The peak is VmHWM from /proc/self/status,
# reset between cases through /proc/self/clear_refs (where that is refused, each case reports the
# peak so far, which can only overstate it). Not getrusage's ru_maxrss: Linux carries it across
# fork and exec, so a child would report at least the pytest process's size.
CHILD = r"""
import contextlib, io, json, sys

def peak_kib():
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))

def reset_peak():
    with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
        f.write("5")

from ddpmkit.cli import main

cases, report = json.loads(open(sys.argv[1]).read()), {}
for name, argv in cases.items():
    reset_peak()
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            status = main(argv)
        except BaseException as e:  # e.g. MemoryError under the address-space limit: reported, not hidden
            status = f"{type(e).__name__}: {e}"[:300]
    report[name] = [status, err.getvalue(), peak_kib()]
with open(sys.argv[2], "w") as f:
    json.dump(report, f)
"""


def limit_address_space() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (ADDRESS_SPACE_LIMIT, ADDRESS_SPACE_LIMIT))


def child_env() -> dict:
    return {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def test_every_crafted_directory_is_refused_in_a_child_under_1_gib(trained, tmp_path):
    argvs = {}
    for i, case in enumerate(sorted(CASES)):
        run = crafted(trained, tmp_path / str(i), case)
        argvs[case] = [str(a) for a in sample_argv(run, tmp_path / str(i) / "s.png")]
    (tmp_path / "cases.json").write_text(json.dumps(argvs))
    done = subprocess.run(
        [sys.executable, "-c", CHILD, str(tmp_path / "cases.json"), str(tmp_path / "report.json")],
        capture_output=True,
        text=True,
        timeout=300,
        env=child_env(),
        preexec_fn=limit_address_space,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    for case, (status, err, peak_kib) in report.items():
        assert status == 2 and err.count("\n") == 1 and CASES[case][1] in err, (case, status, err)
        assert peak_kib < PEAK_LIMIT_KIB, (case, peak_kib)
    top = max(report, key=lambda case: report[case][2])
    print(f"\n{len(report)} crafted directories refused; the highest peak {report[top][2] >> 10} MiB ({top})")


def test_the_issues_example_through_python_m_ddpmkit(trained, tmp_path):
    """The issue's report, as a user runs it: config.json asks for a wide network (within each
    field's limit) that the weights do not hold; `python -m ddpmkit sample` says so in one line."""
    run = tmp_path / "run"
    shutil.copytree(trained, run)
    config({"model.base_channels": 1024, "model.channel_mults": [1, 4]})(run)
    peak = tmp_path / "peak"
    wrapper = (
        "import atexit, runpy, sys\n"
        "def peak():\n"
        "    status = open('/proc/self/status').read()\n"
        f"    open({str(peak)!r}, 'w').write(status.split('VmHWM:')[1].split()[0])\n"
        "atexit.register(peak)\n"
        "runpy.run_module('ddpmkit', run_name='__main__', alter_sys=True)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", wrapper, *map(str, sample_argv(run, tmp_path / "s.png"))],
        capture_output=True,
        text=True,
        timeout=120,
        env=child_env(),
        preexec_fn=limit_address_space,
    )
    assert done.returncode == 2 and done.stdout == "", done.stderr
    assert done.stderr.startswith("ddpmkit sample: error: weights ") and done.stderr.count("\n") == 1, done.stderr
    assert "do not fit this architecture" in done.stderr and "the config describes" in done.stderr
    assert int(peak.read_text()) < PEAK_LIMIT_KIB


# ---- what passes loads exactly --------------------------------------------------------------------


def tiny(**model) -> RunConfig:
    config = apply_overrides(
        RunConfig(),
        {
            "model": {"base_channels": 8, "channel_mults": (1, 2), "attn_resolutions": (4,), "num_heads": 2, **model},
            "diffusion": {"timesteps": 20},
            "sample": {"steps": 2},
        },
    )
    config.in_channels, config.image_size, config.num_classes = 1, 8, 4
    validate(config)
    return config


@pytest.mark.parametrize(
    "model",
    [
        {},  # SinusoidalEmbedding.freqs: a non-persistent buffer, recomputed after loading
        {"time_embedding": "random_fourier"},  # a persistent random buffer, loaded
        {"time_embedding": "learned", "attn_type": "linear", "final_res_block": True, "init_conv_kernel": 7},
        {"arch": "convnext", "channels": (8, 16), "strides": (2,), "mult": 2},
    ],
    ids=["unet", "random-fourier", "seed-003-options", "convnext"],
)
def test_a_loaded_network_is_bit_identical_and_holds_the_files_tensors(tmp_path, monkeypatch, model):
    config = tiny(**model)
    torch.manual_seed(0)
    saved = perturb(build.net(config)).eval()
    path = tmp_path / "w.safetensors"
    save_file({k: v.contiguous() for k, v in saved.state_dict().items()}, str(path))
    read, real = {}, weights.read_tensors
    monkeypatch.setattr(weights, "read_tensors", lambda *a: read.setdefault("tensors", real(*a)))
    loaded = load.load_net(config, path).eval()
    state = loaded.state_dict()
    assert state.keys() == read["tensors"].keys()
    assert all(state[k].data_ptr() == t.data_ptr() for k, t in read["tensors"].items())  # assigned, not copied
    assert not any(t.is_meta for t in [*loaded.parameters(), *loaded.buffers()])
    x, t, y = torch.randn(3, 1, 8, 8), torch.tensor([1, 10, 20]), torch.tensor([0, 3, 4])
    with torch.no_grad():
        assert torch.equal(loaded(x, t, y), saved(x, t, y))


def test_every_preset_passes_the_limits(tmp_path):
    """The limits are generous: each named configuration is read back from config.json as it was."""
    for i, name in enumerate(sorted(PRESETS)):
        config = apply_overrides(RunConfig(preset=name), PRESETS[name])
        checkpoint.create_run(tmp_path / str(i), config)
        assert checkpoint.load_config(tmp_path / str(i)) == resolve(config)  # with its derived defaults


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--timesteps", "20000"], "--timesteps must be at most 10,000, got 20,000"),
        (["--base-channels", "2048"], "--base-channels must be at most 1,024"),
        (["--channel-mults", "1,2,2,2,2,2,2,2,2"], "--channel-mults must have 1 to 8 entries, got 9"),
        (["--seed", "-1"], "--seed must be at least 0, got -1"),
    ],
)
def test_train_flags_past_a_limit_are_refused_before_anything_starts(tmp_path, flags, message):
    argv = ["train", "--dataset", "mnist", "--data-dir", tmp_path / "none", "--steps", 1, "--out", tmp_path / "run"]
    status, out, err = run_cli([*argv, *flags])
    assert status == 2 and err.count("\n") == 1 and message in err, err
    assert list(tmp_path.iterdir()) == []

"""The run directory: atomic checkpoints, pruning, tidying after a kill, disk faults, safe loading."""

import errno
import hashlib
import io
import json
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ddpmkit.errors import DdpmkitError
from ddpmkit.run import checkpoint
from ddpmkit.run.build import net as build_net
from ddpmkit.run.config import RunConfig, apply_overrides, resolve

FILES = {"ema.safetensors", "model.safetensors", "train_state.pt", "state.json"}


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    torch.set_num_threads(1)


def snapshot(root) -> dict:
    """{relative path: SHA-256} of every file under root: "nothing changed" is equality."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(root.rglob("*"))
        if p.is_file()
    }


def net(value: float = 0.0) -> torch.nn.Module:
    layer = torch.nn.Linear(3, 2)
    with torch.no_grad():
        for p in layer.parameters():
            p.fill_(value)
    return layer


def save(run, step, value=0.0, keep=2):
    model = net(value)
    train_state = {"optimizer": torch.optim.AdamW(model.parameters()).state_dict(), "cpu_rng": torch.get_rng_state()}
    return checkpoint.save_checkpoint(run, step, model, net(value + 1), train_state, {"nan_skipped": 0}, keep=keep)


def assert_complete(ckpt, value=None):
    """Every file of the checkpoint is there and loads through the safe loaders."""
    assert {p.name for p in ckpt.iterdir()} == FILES
    state, train_state = checkpoint.load_state(ckpt)
    assert state["step"] == int(ckpt.name.split("-")[1]) and set(train_state) == {"optimizer", "cpu_rng"}
    model = load_file(str(ckpt / "model.safetensors"))
    if value is not None:
        assert torch.all(model["weight"] == value)


def temps(run):
    return sorted(p.name for p in run.iterdir() if p.name.startswith("."))


# ---- writing -------------------------------------------------------------------------------------


def test_checkpoints_are_complete_and_only_the_newest_k_are_kept(tmp_path):
    for step in range(1, 6):
        save(tmp_path, step, value=step, keep=2)
    found = checkpoint.checkpoints(tmp_path)
    assert [p.name for p in found] == ["ckpt-00000004", "ckpt-00000005"]
    for ckpt in found:
        assert_complete(ckpt, value=int(ckpt.name[-1]))
    assert temps(tmp_path) == []
    assert json.loads((found[-1] / "state.json").read_text())["format"] == checkpoint.FORMAT_VERSION


def test_the_same_step_saved_again_replaces_it_whole(tmp_path):
    save(tmp_path, 3, value=1.0)
    save(tmp_path, 3, value=2.0)
    assert [p.name for p in tmp_path.iterdir()] == ["ckpt-00000003"]
    assert_complete(tmp_path / "ckpt-00000003", value=2.0)


@pytest.mark.parametrize("where", ["model", "ema"])
@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
def test_non_finite_weights_are_never_written(tmp_path, where, bad):
    save(tmp_path, 1, value=1.0)
    before = snapshot(tmp_path)
    model, ema = net(), net()
    with torch.no_grad():
        (model if where == "model" else ema).bias[1] = bad
    with pytest.raises(DdpmkitError, match=f"refusing to save step 2: {where} weight bias holds NaN or inf"):
        checkpoint.save_checkpoint(tmp_path, 2, model, ema, {}, {})
    assert snapshot(tmp_path) == before and temps(tmp_path) == []


def test_checkpoints_ignores_foreign_and_incomplete_directories(tmp_path):
    save(tmp_path, 7)
    (tmp_path / "ckpt-notes").mkdir()
    (tmp_path / "ckpt-notes" / "state.json").write_text("{}")
    (tmp_path / "ckpt-00000009").mkdir()  # no state.json: not a checkpoint
    (tmp_path / ".tmp-ckpt-abc").mkdir()
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000007"]


# ---- what a kill leaves behind ------------------------------------------------------------------


def test_tidy_clears_temp_leftovers_and_unpruned_checkpoints(tmp_path):
    for step in (1, 2, 3):
        save(tmp_path, step, keep=5)
    (tmp_path / ".tmp-ckpt-x1y2").mkdir()
    (tmp_path / ".tmp-ckpt-x1y2" / "model.safetensors").write_bytes(b"half a file")
    (tmp_path / ".metrics.jsonl.123.abcd1234.tmp").write_text('{"step": 1')
    (tmp_path / "samples").mkdir()
    (tmp_path / "samples" / ".step-00000003.png.9.00ff00ff.tmp").write_bytes(b"\x89PNG")
    (tmp_path / "metrics.jsonl").write_text("")
    assert checkpoint.tidy(tmp_path, keep=2) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ckpt-00000002", "ckpt-00000003", "metrics.jsonl", "samples"]
    assert list((tmp_path / "samples").iterdir()) == []
    assert checkpoint.tidy(tmp_path, keep=2) == 0


def test_a_kill_while_pruning_never_leaves_a_partial_checkpoint(tmp_path, monkeypatch):
    """Pruning renames a checkpoint to a temp name before deleting it; die half way through a delete."""
    save(tmp_path, 1)
    save(tmp_path, 2)

    def die_half_way(path, *args, **kwargs):
        victim = next(p for p in sorted(path.rglob("*")) if p.is_file())
        victim.unlink()
        raise SystemExit("killed")

    monkeypatch.setattr(checkpoint.shutil, "rmtree", die_half_way)
    with pytest.raises(SystemExit):
        save(tmp_path, 3)
    monkeypatch.undo()
    for ckpt in tmp_path.glob("ckpt-*"):  # every final-named directory is complete
        assert_complete(ckpt)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000002", "ckpt-00000003"]
    assert checkpoint.tidy(tmp_path, keep=2) == 1 and temps(tmp_path) == []


def test_create_run_never_clobbers_but_accepts_a_killed_create(tmp_path):
    config = RunConfig()
    run = tmp_path / "run"
    run.mkdir()
    (run / ".config.json.77.0badcafe.tmp").write_text("{")  # a create_run killed mid-write
    checkpoint.create_run(run, config)
    assert checkpoint.load_config(run) == resolve(config)  # saved with its derived defaults
    before = snapshot(run)
    with pytest.raises(DdpmkitError, match="already holds a run; add --resume"):
        checkpoint.create_run(run, apply_overrides(config, {"train": {"lr": 0.5}}))
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    with pytest.raises(DdpmkitError, match="already holds files"):
        checkpoint.create_run(tmp_path / "other", config)
    assert snapshot(run) == before and (tmp_path / "other" / "notes.txt").read_text() == "mine"


# ---- disk faults ---------------------------------------------------------------------------------


def enospc(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def fail_on_call(n, real):
    """A stand-in for `real` that works n - 1 times, then fails with ENOSPC (a disk filling up)."""
    calls = []

    def fake(*args, **kwargs):
        calls.append(1)
        if len(calls) >= n:
            enospc()
        return real(*args, **kwargs)

    return fake


REAL_TORCH_SAVE = torch.save


def half_written_torch_save(obj, path, *args, **kwargs):
    """torch.save that writes half its bytes, then finds the disk full."""
    buf = io.BytesIO()
    REAL_TORCH_SAVE(obj, buf)
    with open(path, "wb") as f:
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
    enospc()


FAULTS = {
    "second safetensors file (disk full)": lambda m: m.setattr(
        checkpoint, "save_file", fail_on_call(2, checkpoint.save_file)
    ),
    "first safetensors file (read-only)": lambda m: m.setattr(
        checkpoint, "save_file", lambda *a, **k: (_ for _ in ()).throw(OSError(errno.EROFS, os.strerror(errno.EROFS)))
    ),
    "optimizer state half written": lambda m: m.setattr(checkpoint.torch, "save", half_written_torch_save),
    "fsync": lambda m: m.setattr(checkpoint.os, "fsync", enospc),
    "rename into place": lambda m: m.setattr(checkpoint.os, "rename", enospc),
    "temp directory (read-only run)": lambda m: m.setattr(
        checkpoint.tempfile,
        "mkdtemp",
        lambda *a, **k: (_ for _ in ()).throw(PermissionError(errno.EACCES, os.strerror(errno.EACCES))),
    ),
}


@pytest.mark.parametrize("fault", sorted(FAULTS))
def test_a_failed_save_is_one_clear_error_and_keeps_the_previous_checkpoint(tmp_path, monkeypatch, fault):
    save(tmp_path, 1, value=5.0)
    before = snapshot(tmp_path)
    FAULTS[fault](monkeypatch)
    with pytest.raises(DdpmkitError) as caught:
        save(tmp_path, 2, value=6.0)
    monkeypatch.undo()
    message = str(caught.value)
    assert message.startswith(f"could not save a checkpoint in {tmp_path}: ") and "\n" not in message
    assert "previous checkpoint is intact" in message
    assert snapshot(tmp_path) == before and temps(tmp_path) == []  # the temp directory is gone
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000001"]
    assert_complete(tmp_path / "ckpt-00000001", value=5.0)
    save(tmp_path, 2, value=6.0)  # and the disk, once fixed, takes the next one
    assert_complete(tmp_path / "ckpt-00000002", value=6.0)


def test_a_failed_replace_of_the_same_step_restores_the_old_one(tmp_path, monkeypatch):
    save(tmp_path, 4, value=1.0)
    real_rename = os.rename
    # the new checkpoint (a temp directory) cannot take the final name after the old one moved aside
    monkeypatch.setattr(
        checkpoint.os, "rename", lambda a, b: enospc() if Path(a).name.startswith(".tmp-ckpt-") else real_rename(a, b)
    )
    with pytest.raises(DdpmkitError, match="No space left"):
        save(tmp_path, 4, value=2.0)
    monkeypatch.undo()
    assert [p.name for p in tmp_path.iterdir() if not p.name.startswith(".")] == ["ckpt-00000004"]
    assert_complete(tmp_path / "ckpt-00000004", value=1.0)


# ---- safe loading --------------------------------------------------------------------------------


class RunsAShellCommand:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class OpensAFile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return open, (str(self.marker), "w")


def torch_file(obj) -> bytes:
    buf = io.BytesIO()
    torch.save(obj, buf)
    return buf.getvalue()


PAYLOADS = {
    "torch.save of os.system": (
        lambda m: torch_file({"optimizer": RunsAShellCommand(m), "cpu_rng": torch.ones(2)}),
        lambda path: torch.load(path, weights_only=False),
    ),
    "torch.save of open(marker, 'w')": (
        lambda m: torch_file({"optimizer": OpensAFile(m)}),
        lambda path: torch.load(path, weights_only=False),
    ),
    "raw pickle of os.system": (
        lambda m: pickle.dumps(RunsAShellCommand(m), protocol=2),
        lambda path: pickle.loads(path.read_bytes()),
    ),
    "raw pickle (protocol 4) of open": (
        lambda m: pickle.dumps([OpensAFile(m)], protocol=4),
        lambda path: pickle.loads(path.read_bytes()),
    ),
}


@pytest.mark.parametrize("payload", sorted(PAYLOADS))
def test_a_crafted_pickle_as_train_state_is_refused_and_runs_nothing(tmp_path, payload):
    make, unsafe_load = PAYLOADS[payload]
    (tmp_path / "run").mkdir()
    ckpt = save(tmp_path / "run", 1)
    marker = tmp_path / "pwned"
    (ckpt / "train_state.pt").write_bytes(make(marker))
    with pytest.raises(DdpmkitError, match="refusing to load .*train_state.pt: it is not a plain tensor file") as e:
        checkpoint.load_state(ckpt)
    assert "\n" not in str(e.value) and not marker.exists()
    unsafe_load(ckpt / "train_state.pt")  # the control: an ordinary unpickler does run the payload
    assert marker.exists()


def test_train_state_that_is_not_a_dictionary_is_refused(tmp_path):
    ckpt = save(tmp_path, 1)
    torch.save([torch.ones(2)], ckpt / "train_state.pt")
    with pytest.raises(DdpmkitError, match="holds a list, not a dictionary"):
        checkpoint.load_state(ckpt)


@pytest.mark.parametrize("damage", ["empty", "truncated", "garbage", "bad header length", "header too large"])
def test_corrupt_safetensors_is_a_one_line_error(tmp_path, damage):
    ckpt = save(tmp_path, 1)
    path = ckpt / "ema.safetensors"
    whole = path.read_bytes()
    path.write_bytes(
        {
            "empty": b"",
            "truncated": whole[: len(whole) - 7],
            "garbage": os.urandom(200),
            "bad header length": (9).to_bytes(8, "little") + b'{"a": 1}',
            "header too large": b"\xff" * 8 + b"{}",
        }[damage]
    )
    with pytest.raises(DdpmkitError, match=f"cannot read weights {path}: ") as caught:
        checkpoint.load_weights(net(), path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "content, message",
    [
        (b'{"step": 1, "format": 99}', "has checkpoint format 99, this ddpmkit reads formats 1, 2"),
        (b'{"step": 1}', "has checkpoint format None"),
        (b"[1, 2]", "has checkpoint format None"),
        (b'{"step": 1, "form', "cannot read .*state.json: "),
        (b'\xff\xfe{"step": 1}', "cannot read .*state.json: "),
    ],
)
def test_state_json_with_a_wrong_format_version_or_damage_is_refused(tmp_path, content, message):
    ckpt = save(tmp_path, 1)
    (ckpt / "state.json").write_bytes(content)
    with pytest.raises(DdpmkitError, match=message) as caught:
        checkpoint.load_state(ckpt)
    assert "\n" not in str(caught.value)


def tiny_unet_config(**model):
    config = apply_overrides(
        RunConfig(),
        {"model": {"base_channels": 8, "channel_mults": (1, 2), "attn_resolutions": (), "num_heads": 2, **model}},
    )
    config.in_channels, config.image_size, config.num_classes = 1, 8, 4
    return config


def test_weights_into_another_architecture_name_the_first_mismatching_tensor(tmp_path):
    from safetensors.torch import save_file

    small = build_net(tiny_unet_config())
    save_file({k: v.contiguous() for k, v in small.state_dict().items()}, str(tmp_path / "w.safetensors"))
    wide = build_net(tiny_unet_config(base_channels=16))
    first = next(k for k, v in wide.state_dict().items() if v.shape != small.state_dict()[k].shape)
    with pytest.raises(DdpmkitError, match="do not fit this architecture: shape of ") as caught:
        checkpoint.load_weights(wide, tmp_path / "w.safetensors")
    assert (
        f"shape of {first} is {tuple(small.state_dict()[first].shape)}, model wants "
        f"{tuple(wide.state_dict()[first].shape)}" in str(caught.value)
    )
    deeper = build_net(tiny_unet_config(channel_mults=(1, 2, 2)))
    with pytest.raises(DdpmkitError, match="missing .*"):
        checkpoint.load_weights(deeper, tmp_path / "w.safetensors")


@pytest.mark.parametrize(
    "text", ["{", '{"model": [1, 2]}', '{"model": {"width": 3}}', "[]", '{"train": {"lr": 1}, "x": 2}']
)
def test_a_damaged_config_json_is_one_clear_error(tmp_path, text):
    (tmp_path / "config.json").write_text(text)
    with pytest.raises(DdpmkitError, match="config") as caught:
        checkpoint.load_config(tmp_path)
    assert "\n" not in str(caught.value)


@pytest.mark.parametrize(
    "schedule, T, readable", [("cosine", 100, True), ("linear", 1000, True), ("linear", 100, False)]
)
def test_format_1_checkpoints_load_unless_their_linear_schedule_has_changed(tmp_path, schedule, T, readable):
    """Format 1 predates scaling the linear schedule by 1000 / T: only linear runs at T != 1000 differ."""
    ckpt = save(tmp_path, 1)
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "format": 1}))
    config = RunConfig()
    config.diffusion.schedule, config.diffusion.timesteps = schedule, T
    assert checkpoint.load_state(ckpt)[0]["format"] == 1  # without a config: the files are the same
    if readable:
        assert checkpoint.load_state(ckpt, config)[0]["step"] == 1
    else:
        with pytest.raises(DdpmkitError, match=r"linear schedule at T = 100 before .* retrain it") as caught:
            checkpoint.load_state(ckpt, config)
        assert "\n" not in str(caught.value)

"""Surviving crashes: SIGKILL at random moments, SIGINT/SIGTERM, NaN/inf, full and read-only disks.

The kill loop needs many process starts in little time, so most of its training processes are
forked from a "zygote" that has already imported torch and ddpmkit (a start then costs ~0.3 s
instead of ~3 s); every tenth is a real `python -m ddpmkit train`. Both run the same `main()` and
are killed with SIGKILL by their process id.
"""

import errno
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import TINY_MODEL, make_idx_dataset
from PIL import Image
from safetensors.torch import load_file
from test_checkpoint import FILES, snapshot
from test_train import tiny_config, tiny_data

from ddpmkit.cli import main
from ddpmkit.errors import DdpmkitError
from ddpmkit.run import build, checkpoint
from ddpmkit.train import Trainer
from ddpmkit.train import trainer as train

ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}  # 1 thread: fast on 2 shared cores
KEEP, TARGET, KILL_BUDGET_S = 2, 10, 30.0
CHECKPOINT_STEPS = set(range(2, TARGET + 1, 2))


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    torch.set_num_threads(1)


def train_flags(data_dir, **extra) -> list:
    """A tiny 28x28 model whose checkpoints (every 2 steps) fall between its logs (every 3)."""
    flags = {
        "--batch-size": 8,
        "--log-every": 3,
        "--sample-every": 10**6,
        "--checkpoint-every": 2,
        "--sample-steps": 2,
        "--warmup": 5,
        "--precision": "fp32",
        "--keep": KEEP,
        "--steps": TARGET,
        **{f"--{k.replace('_', '-')}": v for k, v in extra.items()},
    }
    return [
        "train",
        "--dataset",
        "mnist",
        "--data-dir",
        str(data_dir),
        *TINY_MODEL,
        "--no-progress",
        *[str(x) for kv in flags.items() for x in kv],
    ]


# ---- starting and killing training processes ----------------------------------------------------

ZYGOTE = r"""
import json, os, sys, traceback
import matplotlib
matplotlib.use("Agg")
import matplotlib.pyplot
import torch._dynamo  # torch.optim imports it on first use: 3 s
import ddpmkit.cli, ddpmkit.data, ddpmkit.sampling, ddpmkit.train, ddpmkit.viz  # all a run imports
print("ready", flush=True)
for line in sys.stdin:
    command, argument = line.rstrip("\n").split(" ", 1)
    if command == "run":
        log, argv = json.loads(argument)
        pid = os.fork()
        if pid == 0:
            fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
            os.dup2(fd, 1), os.dup2(fd, 2)
            code = 1
            try:
                code = ddpmkit.cli.main(argv)
            except SystemExit as e:
                code = e.code if isinstance(e.code, int) else 1
            except BaseException:
                traceback.print_exc()
            sys.stdout.flush(), sys.stderr.flush()
            os._exit(code)
        print(pid, flush=True)
    elif command == "wait":
        print(os.waitpid(int(argument), 0)[1], flush=True)
"""


class Zygote:
    """A Python process with torch and ddpmkit imported that forks `ddpmkit.cli.main(argv)` runs."""

    def __init__(self):
        self.proc = subprocess.Popen(
            [sys.executable, "-c", ZYGOTE], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=ENV
        )
        assert self.proc.stdout.readline() == "ready\n"

    def ask(self, line: str) -> int:
        self.proc.stdin.write(line + "\n")
        self.proc.stdin.flush()
        return int(self.proc.stdout.readline())

    def start(self, argv, log: Path) -> "Child":
        """Fork a run of main(argv) whose stdout and stderr go to log."""
        return Child(self, self.ask("run " + json.dumps([str(log), argv])))

    def close(self):
        self.proc.stdin.close()
        self.proc.wait(timeout=30)


class Child:
    """A forked run: its exit status comes from the zygote, its parent."""

    def __init__(self, zygote, pid):
        self.zygote, self.pid, self.status = zygote, pid, None

    def finished_within(self, seconds: float) -> bool:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            if _is_zombie(self.pid):
                return True
            time.sleep(0.01)
        return _is_zombie(self.pid)

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        """The exit code, or -signal when a signal ended it (like subprocess)."""
        if self.status is None:
            status = self.zygote.ask(f"wait {self.pid}")
            self.status = -os.WTERMSIG(status) if os.WIFSIGNALED(status) else os.WEXITSTATUS(status)
        return self.status


def _is_zombie(pid: int) -> bool:
    """True once the process has exited (it stays a zombie until its parent waits for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] in ("Z", "X")
    except FileNotFoundError:
        return True


class Real:
    """A real `python -m ddpmkit` process."""

    def __init__(self, argv, log: Path):
        with open(log, "a") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "ddpmkit", *argv], stdout=out, stderr=out, env=ENV)
        self.pid = self.proc.pid

    def finished_within(self, seconds: float) -> bool:
        try:
            self.proc.wait(timeout=seconds)
            return True
        except subprocess.TimeoutExpired:
            return False

    def kill(self):
        os.kill(self.pid, signal.SIGKILL)

    def wait(self) -> int:
        return self.proc.wait(timeout=120)


@pytest.fixture(scope="module")
def zygote():
    z = Zygote()
    yield z
    z.close()


# ---- what must hold after every kill -------------------------------------------------------------


def assert_run_intact(run: Path, keep: int) -> int:
    """Every final-named file in the run directory is complete and loads; returns the latest step.

    A kill between renaming a new checkpoint into place and pruning the oldest leaves keep + 1;
    the next start prunes them (checkpoint.tidy)."""
    if not run.exists():
        return 0
    names = {p.name for p in run.iterdir() if not p.name.startswith(".")}
    if "config.json" not in names:
        assert names == set(), names  # killed inside create_run: nothing under a final name
        return 0
    checkpoint.load_config(run)
    assert names <= {"config.json", "metrics.jsonl", "loss.png", "samples"} | {
        p.name for p in checkpoint.checkpoints(run)
    }, names  # no incomplete ckpt-* directory
    if (run / "metrics.jsonl").exists():
        steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
        assert steps == sorted(set(steps)), steps  # parses, and no step twice
    for png in [run / "loss.png", *run.glob("samples/[!.]*")]:
        if png.exists():
            Image.open(png).verify()
    ckpts = checkpoint.checkpoints(run)
    assert len(ckpts) <= keep + 1, [p.name for p in ckpts]
    for ckpt in ckpts:
        assert {p.name for p in ckpt.iterdir()} == FILES
        state, train_state = checkpoint.load_state(ckpt)
        assert state["step"] == int(ckpt.name[5:]) and set(train_state) >= {"optimizer", "cpu_rng"}
        for name in ("model", "ema"):
            assert all(torch.isfinite(v).all() for v in load_file(str(ckpt / f"{name}.safetensors")).values())
    return int(ckpts[-1].name[5:]) if ckpts else 0


def final_weights(run: Path) -> tuple:
    ckpt = checkpoint.latest_checkpoint(run)
    _, train_state = checkpoint.load_state(ckpt)
    return (
        load_file(str(ckpt / "model.safetensors")),
        load_file(str(ckpt / "ema.safetensors")),
        train_state["optimizer"]["state"],
        train_state["cpu_rng"],
    )


def assert_same_tensors(a, b):
    if isinstance(a, dict):
        assert a.keys() == b.keys()
        for k in a:
            assert_same_tensors(a[k], b[k])
    elif isinstance(a, torch.Tensor):
        assert a.dtype == b.dtype and torch.equal(a, b)
    else:
        assert a == b


def read_metrics(run: Path) -> list:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def assert_metrics_match(run: Path, straight: Path, resumed_from: list):
    """The same rows as the uninterrupted run; the loss of a row whose averaging window a resume cut
    short covers fewer steps, every other loss is bit-identical."""
    rows, expected = read_metrics(run), read_metrics(straight)
    assert [r["step"] for r in rows] == [r["step"] for r in expected]
    previous = 0
    for row, want in zip(rows, expected):
        assert (row["lr"], row["nan_skipped"]) == (want["lr"], want["nan_skipped"])
        if not any(previous < s < row["step"] for s in resumed_from):
            assert row["loss"] == want["loss"], (row, want)
        previous = row["step"]


# ---- SIGKILL -------------------------------------------------------------------------------------


def _timeline(proc, run: Path) -> dict:
    """Seconds from the start of an uninterrupted forked run to each checkpoint and to its exit."""
    start, seen = time.monotonic(), {}
    while not proc.finished_within(0.005):
        for ckpt in checkpoint.checkpoints(run):
            seen.setdefault(int(ckpt.name[5:]), time.monotonic() - start)
    assert proc.wait() == 0
    return {**seen, "exit": time.monotonic() - start}


def _survives_kill_moment(
    proc, run: Path, current: int, real: bool, timeline: dict, rng: random.Random, uncovered: set
) -> bool:
    """Wait until a seeded random moment; True if the run finished first. The moments scale with
    this machine's speed (the straight run's timeline): half fall anywhere in a run's life, half
    just after a checkpoint still to come (one no kill has yet landed after, while any is left), so
    kills land between every pair however slow or busy the machine is."""
    if real:  # a real start first imports torch (~3-5 s)
        return proc.finished_within(rng.uniform(2.0, 8.0))
    if current >= TARGET or rng.random() < 0.5:  # (a run killed after its last checkpoint)
        return proc.finished_within(rng.uniform(0.0, timeline["exit"]))
    ahead = range(current + 2, TARGET + 1, 2)
    step = rng.choice([s for s in ahead if s in uncovered] or list(ahead))
    gap = timeline[TARGET] - timeline[TARGET - 2]  # the time between two checkpoints
    while not any(int(c.name[5:]) >= step for c in checkpoint.checkpoints(run)):
        if proc.finished_within(0.002):
            return True
    return proc.finished_within(rng.uniform(0.0, gap))


def test_sigkill_at_random_moments_loses_nothing(tmp_path, zygote):
    """Kill training with SIGKILL at seeded random moments for KILL_BUDGET_S seconds, restarting
    with --resume each time; every run that reaches TARGET steps equals the uninterrupted one."""
    data = make_idx_dataset(tmp_path / "mnist")
    log = tmp_path / "runs.log"
    straight = tmp_path / "straight"
    timeline = _timeline(zygote.start([*train_flags(data), "--out", str(straight)], log), straight)
    reference = final_weights(straight)
    rng, kills, finished, starts = random.Random(6), 0, 0, 0
    killed_at_step, run, resumed_from = set(), tmp_path / "run-0", []
    deadline = time.monotonic() + KILL_BUDGET_S
    while True:
        resume = checkpoint.is_run(run)
        if resume:
            resumed_from.append(assert_run_intact(run, KEEP))
        argv = [*train_flags(data), "--out", str(run), *(["--resume"] if resume else [])]
        real = starts % 10 == 0
        proc = Real(argv, log) if real else zygote.start(argv, log)
        starts += 1
        covered = kills >= 8 and len(killed_at_step) >= 3
        # out of time (and, within a second budget, enough kills seen): let this one finish
        last_chance = time.monotonic() >= deadline + (0 if covered else KILL_BUDGET_S)
        current = resumed_from[-1] if resume else 0
        if not (
            last_chance
            or _survives_kill_moment(proc, run, current, real, timeline, rng, CHECKPOINT_STEPS - killed_at_step)
        ):
            proc.kill()
        status = proc.wait()
        if status == -signal.SIGKILL:
            kills += 1
            killed_at_step.add(assert_run_intact(run, KEEP))
            continue
        assert status == 0, log.read_text()[-3000:]  # finished (perhaps just before the kill)
        assert assert_run_intact(run, KEEP) == TARGET and len(checkpoint.checkpoints(run)) == KEEP
        assert not [p for p in run.rglob(".*")], "temp files left by a finished run"
        for got, want in zip(final_weights(run), reference):
            assert_same_tensors(got, want)  # model, EMA, optimizer state and RNG: bit-identical
        assert_metrics_match(run, straight, resumed_from)
        finished, resumed_from = finished + 1, []
        if last_chance:
            break
        run = tmp_path / f"run-{finished}"
    print(
        f"\nSIGKILL: {kills} kills survived over {starts} starts, {finished} runs finished bit-identical, "
        f"kills landed after checkpoints of steps {sorted(killed_at_step)}"
    )
    assert kills >= 8 and finished >= 1 and len(killed_at_step) >= 3


# ---- SIGINT / SIGTERM ----------------------------------------------------------------------------


def _wait_for_checkpoint(run: Path, proc, seconds=120):
    end = time.monotonic() + seconds
    while not checkpoint.checkpoints(run):
        assert time.monotonic() < end and not proc.finished_within(0.02), "no checkpoint appeared"


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_sigint_and_sigterm_save_the_current_step_and_exit_128_plus_signal(tmp_path, zygote, sig):
    """Documented contract: the loop stops after the step in flight, saves it, and the process
    exits with 128 + the signal (130 for SIGINT, 143 for SIGTERM) and one line on stderr.
    SIGTERM goes to a real `python -m ddpmkit`, SIGINT to a forked run."""
    data, run, log = make_idx_dataset(tmp_path / "mnist"), tmp_path / "run", tmp_path / "run.log"
    argv = [*train_flags(data, steps=10**6, checkpoint_every=1), "--out", str(run)]
    proc = Real(argv, log) if sig == signal.SIGTERM else zygote.start(argv, log)
    _wait_for_checkpoint(run, proc)
    os.kill(proc.pid, sig)
    assert proc.wait() == 128 + sig
    lines = log.read_text().splitlines()
    step = checkpoint.latest_checkpoint(run).name[5:]
    assert lines == [
        f"ddpmkit train: stopped by {sig.name} at step {int(step)} and saved a checkpoint; "
        f"continue with `ddpmkit train --out {run} --resume`"
    ]
    assert assert_run_intact(run, KEEP) == int(step) and read_metrics(run)[-1]["step"] == int(step)
    assert not list(run.glob(".*")) and not list(run.glob("samples/*"))  # and no grid drawn before exiting


# ---- resuming from any checkpoint ----------------------------------------------------------------


def test_resuming_from_every_checkpoint_reproduces_the_straight_run(tmp_path, monkeypatch):
    monkeypatch.setattr(train.viz, "loss_curve", lambda metrics, path: None)  # matplotlib: slow, not under test
    config, data = tiny_config(checkpoint_every=1, keep=100, log_every=3), tiny_data()
    straight = tmp_path / "straight"
    checkpoint.create_run(straight, config)
    Trainer(config, straight, data).fit(8, progress=False)
    want = final_weights(straight)
    for k in range(1, 8):  # a run directory as a kill right after checkpoint k leaves it
        run = tmp_path / f"from-{k}"
        run.mkdir()
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy(straight / name, run / name)  # metrics beyond step k: dropped on resume
        shutil.copytree(straight / f"ckpt-{k:08d}", run / f"ckpt-{k:08d}")
        trainer = Trainer(checkpoint.load_config(run), run, data)
        trainer.resume()
        assert trainer.step == k and [m["step"] for m in trainer.metrics] == [s for s in (3, 6) if s <= k]
        trainer.fit(8, progress=False)
        for got, expected in zip(final_weights(run), want):
            assert_same_tensors(got, expected)
        assert_metrics_match(run, straight, [k])


# ---- NaN and inf ---------------------------------------------------------------------------------


def poison_output(model: torch.nn.Module, trainer_step, bad_steps, value=float("nan")):
    """Make the network's output NaN (or inf) while training the (1-based) steps in bad_steps."""

    def hook(module, inputs, output):
        return output * value if trainer_step() + 1 in bad_steps and module.training else output

    return model.register_forward_hook(hook)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_a_non_finite_loss_stops_the_run_naming_the_step(tmp_path, value):
    config, data = tiny_config(checkpoint_every=2), tiny_data()
    checkpoint.create_run(tmp_path, config)
    trainer = Trainer(config, tmp_path, data)
    poison_output(trainer.model, lambda: trainer.step, {5}, value)
    with pytest.raises(
        DdpmkitError,
        match=r"^non-finite loss or gradient at step 5; the last checkpoint is "
        r"intact \(lower --lr, or pass --on-nan skip",
    ):
        trainer.fit(10, progress=False)
    assert [p.name for p in checkpoint.checkpoints(tmp_path)] == ["ckpt-00000002", "ckpt-00000004"]
    assert assert_run_intact(tmp_path, 2) == 4


def test_on_nan_skip_skips_and_counts_the_bad_steps(tmp_path):
    config, data = tiny_config(checkpoint_every=4, on_nan="skip", log_every=2), tiny_data()
    checkpoint.create_run(tmp_path, config)
    trainer = Trainer(config, tmp_path, data)
    poison_output(trainer.model, lambda: trainer.step, {3, 6})
    trainer.fit(2, progress=False)
    before_3 = {k: v.clone() for k, v in trainer.model.state_dict().items()}
    trainer.fit(3, progress=False)  # step 3 is skipped: the weights do not move
    assert all(torch.equal(v, before_3[k]) for k, v in trainer.model.state_dict().items())
    trainer.fit(8, progress=False)
    state, train_state = checkpoint.load_state(checkpoint.latest_checkpoint(tmp_path))
    assert state["step"] == 8 and state["nan_skipped"] == 2
    adam_steps = {float(s["step"]) for s in train_state["optimizer"]["state"].values()}
    assert adam_steps == {6.0}  # 8 steps, 2 skipped
    assert [(m["step"], m["nan_skipped"]) for m in read_metrics(tmp_path)] == [(2, 0), (3, 1), (4, 1), (6, 2), (8, 2)]
    assert assert_run_intact(tmp_path, 2) == 8


def test_a_huge_learning_rate_stops_the_cli_with_one_line(tmp_path, capsys):
    data, run = make_idx_dataset(tmp_path / "mnist"), tmp_path / "run"
    assert main([*train_flags(data, lr=1e30, warmup=0, checkpoint_every=1, steps=20), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpmkit train: error: non-finite loss or gradient at step ")
    failed_at = int(err.split("at step ")[1].split(";")[0])
    assert 1 < failed_at <= 20 and assert_run_intact(run, KEEP) == failed_at - 1


def test_on_nan_skip_through_the_cli(tmp_path, capsys, monkeypatch):
    """The CLI path with a network whose output turns NaN on its 3rd and 4th training forward."""
    data, run = make_idx_dataset(tmp_path / "mnist"), tmp_path / "run"
    real_build = build.net

    def build_poisoned(config):
        net, calls = real_build(config), []

        def hook(module, inputs, output):
            if not module.training:
                return output
            calls.append(1)
            return output * float("nan") if len(calls) in (3, 4) else output

        net.register_forward_hook(hook)
        return net

    monkeypatch.setattr(build, "net", build_poisoned)
    assert main([*train_flags(data, steps=6, on_nan="skip"), "--out", str(run)]) == 0
    assert capsys.readouterr().err == ""
    state, _ = checkpoint.load_state(checkpoint.latest_checkpoint(run))
    assert state["nan_skipped"] == 2 and [m["nan_skipped"] for m in read_metrics(run)] == [1, 2]
    assert assert_run_intact(run, KEEP) == 6


# ---- disk faults during training -----------------------------------------------------------------


def test_a_full_disk_while_training_is_one_line_and_loses_nothing(trained, capsys, monkeypatch):
    data, run, _ = trained
    before = snapshot(run)
    real_save_file, calls = checkpoint.save_file, []

    def full_after_one_file(*args, **kwargs):  # the model file fits, the EMA file does not
        calls.append(1)
        if len(calls) == 2:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save_file(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_file", full_after_one_file)
    assert main([*train_flags(data, steps=4), "--out", str(run), "--resume"]) == 2
    err = capsys.readouterr().err
    assert (
        err == f"ddpmkit train: error: could not save a checkpoint in {run}: No space left on device; "
        "the previous checkpoint is intact\n"
    )
    assert {k: v for k, v in snapshot(run).items() if k.startswith("ckpt-")} == {
        k: v for k, v in before.items() if k.startswith("ckpt-")
    }
    assert assert_run_intact(run, KEEP) == 2 and not list(run.glob(".*"))
    monkeypatch.undo()
    assert main([*train_flags(data, steps=4), "--out", str(run), "--resume"]) == 0
    assert assert_run_intact(run, KEEP) == 4


def test_a_read_only_run_directory_is_one_line_and_loses_nothing(trained):
    """chmod 0o555 does not stop root, so as root the run drops CAP_DAC_OVERRIDE with setpriv."""
    data, run, _ = trained
    prefix = []
    if os.geteuid() == 0:
        if shutil.which("setpriv") is None:
            pytest.skip("running as root without setpriv: cannot make a directory read-only to this process")
        prefix = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search", "--"]
    before = snapshot(run)
    run.chmod(0o555)
    try:
        result = subprocess.run(
            [*prefix, sys.executable, "-m", "ddpmkit", *train_flags(data, steps=4), "--out", str(run), "--resume"],
            capture_output=True,
            text=True,
            env=ENV,
            timeout=300,
        )
    finally:
        run.chmod(0o755)
    assert result.returncode == 2, result.stderr
    assert (
        result.stderr == f"ddpmkit train: error: could not write the metrics in {run}: Permission denied; "
        "the previous checkpoint is intact\n"
    )
    assert snapshot(run) == before and assert_run_intact(run, KEEP) == 2


# ---- loading safely, through the CLI -------------------------------------------------------------


@pytest.fixture(scope="module")
def trained_once(tmp_path_factory, zygote):
    root = tmp_path_factory.mktemp("trained")
    data, run = make_idx_dataset(root / "mnist"), root / "run"
    assert zygote.start([*train_flags(data, steps=2), "--out", str(run)], root / "log").wait() == 0
    return data, run


@pytest.fixture
def trained(trained_once, tmp_path):
    """A copy of a run trained for 2 steps (its checkpoint at step 2), and its dataset."""
    data, run = trained_once[0], shutil.copytree(trained_once[1], tmp_path / "run")
    return data, run, checkpoint.latest_checkpoint(run)


def one_line(capsys, start: str) -> str:
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith(start) and "Traceback" not in err, err
    return err


class Payload:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_crafted_train_state_is_refused_on_resume_and_runs_nothing(trained, capsys, tmp_path):
    data, run, ckpt = trained
    marker = tmp_path / "pwned"
    torch.save({"optimizer": Payload(marker), "cpu_rng": torch.get_rng_state()}, ckpt / "train_state.pt")
    before = snapshot(run)
    assert main([*train_flags(data, steps=4), "--out", str(run), "--resume"]) == 2
    err = one_line(
        capsys,
        f"ddpmkit train: error: refusing to load {ckpt / 'train_state.pt'}: it is not a plain "
        "tensor file (UnpicklingError: ",
    )
    assert "posix.system" in err and not marker.exists() and snapshot(run) == before
    # sampling needs no optimizer state: `sample` never opens train_state.pt, so the payload cannot run there either
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--out", str(tmp_path / "s.png")]) == 0
    assert not marker.exists() and (tmp_path / "s.png").exists()


def test_train_state_without_the_optimizer_is_a_clear_error_on_resume(trained, capsys):
    data, run, ckpt = trained
    torch.save({"cpu_rng": torch.get_rng_state()}, ckpt / "train_state.pt")
    assert main([*train_flags(data, steps=4), "--out", str(run), "--resume"]) == 2
    one_line(
        capsys,
        f"ddpmkit train: error: {ckpt / 'train_state.pt'} does not hold this run's optimizer and "
        "RNG state (KeyError: 'optimizer')",
    )


def test_a_wrong_checkpoint_format_is_refused(trained, capsys, tmp_path):
    data, run, ckpt = trained
    state = json.loads((ckpt / "state.json").read_text())
    (ckpt / "state.json").write_text(json.dumps({**state, "format": 3}))
    assert main([*train_flags(data, steps=4), "--out", str(run), "--resume"]) == 2
    one_line(capsys, f"ddpmkit train: error: {ckpt} has checkpoint format 3, this ddpmkit reads formats 1, 2")
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 2
    one_line(capsys, f"ddpmkit sample: error: {ckpt} has checkpoint format 3")


def test_corrupt_weights_are_one_line_for_sample_and_resume(trained, capsys, tmp_path):
    data, run, ckpt = trained
    weights = ckpt / "ema.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])  # cut short, as by a full disk outside ddpmkit
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 2
    one_line(capsys, f"ddpmkit sample: error: cannot read weights {weights}: ")
    assert main([*train_flags(data, steps=4), "--out", str(run), "--resume"]) == 2
    one_line(capsys, f"ddpmkit train: error: cannot read weights {weights}: ")


def test_a_config_edited_to_another_width_names_the_first_mismatching_tensor(trained, capsys, tmp_path):
    data, run, ckpt = trained
    config = json.loads((run / "config.json").read_text())
    config["model"]["base_channels"] = 16
    (run / "config.json").write_text(json.dumps(config))
    assert main(["sample", str(run), "--out", str(tmp_path / "s.png")]) == 2
    err = one_line(
        capsys, f"ddpmkit sample: error: weights {ckpt / 'ema.safetensors'} do not fit this architecture: shape of "
    )
    saved, wanted = load_file(str(ckpt / "ema.safetensors")), build.net(checkpoint.load_config(run)).state_dict()
    first = next(k for k, v in wanted.items() if v.shape != saved[k].shape)  # in the model's own order
    shapes = f"shape of {first} is {tuple(saved[first].shape)}, model wants {tuple(wanted[first].shape)}"
    assert err.endswith(f"{shapes} (the config describes 200,033 numbers, the file holds 50,993)\n")
    assert main(["train", "--out", str(run), "--resume", "--steps", "4", "--no-progress"]) == 2
    one_line(capsys, f"ddpmkit train: error: weights {ckpt / 'model.safetensors'} do not fit this architecture")


def test_a_second_signal_during_the_last_save_does_not_cut_it_short(tmp_path, monkeypatch):
    """Ctrl-C at step 3, and Ctrl-C again while the checkpoint of step 3 is being written."""
    config, data = tiny_config(checkpoint_every=100), tiny_data()
    checkpoint.create_run(tmp_path, config)
    trainer = Trainer(config, tmp_path, data)
    trainer.model.register_forward_hook(
        lambda m, i, o: os.kill(os.getpid(), signal.SIGINT) if trainer.step == 2 and m.training else None
    )
    real_save = checkpoint.save_checkpoint

    def save_while_interrupted(*args, **kwargs):
        os.kill(os.getpid(), signal.SIGINT)
        return real_save(*args, **kwargs)

    monkeypatch.setattr(checkpoint, "save_checkpoint", save_while_interrupted)
    assert trainer.fit(10, progress=False) == 3 and trainer.interrupted_by == signal.SIGINT
    assert assert_run_intact(tmp_path, 2) == 3
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler  # the handlers are given back

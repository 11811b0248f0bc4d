"""Progressive distillation: the target's maths, a student fitted to it, the rounds, guidance folded
in, the run directory that `sample` and `eval` open, resume after a kill, and bad input."""

import copy
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import TINY_MODEL, make_idx_dataset, perturb
from hypothesis import HealthCheck, given, settings
from safetensors.torch import load_file
from test_checkpoint import snapshot
from test_cli_errors import argument_lists, fuzz, make_run
from test_reliability import assert_metrics_match, assert_same_tensors, final_weights
from test_train import tiny_config, tiny_data

from ddpmkit.cli import main
from ddpmkit.core import samplers
from ddpmkit.core.denoiser import Denoiser
from ddpmkit.core.distillation import DistillLoss, Grids, ddim_step, halvings, x0_target
from ddpmkit.core.losses import Noise
from ddpmkit.core.schedules import cosine
from ddpmkit.errors import DdpmkitError
from ddpmkit.eval import report
from ddpmkit.run import build, checkpoint
from ddpmkit.run.config import apply_overrides, default_batch_size, distilled_config, resolve
from ddpmkit.train import trainer as train
from ddpmkit.train.distill import Distiller, load_round, round_file, teacher_file

T = 32


@pytest.fixture(autouse=True)
def _one_thread(_few_threads):
    torch.set_num_threads(1)


def tiny_denoiser(num_classes=4, seed=0) -> Denoiser:
    """An 8x8 v-prediction denoiser whose weights are off their (partly zero) initialisation."""
    config = apply_overrides(tiny_config(), {"diffusion": {"timesteps": T}})
    torch.manual_seed(seed)
    net = perturb(build.net(config), 0.05).eval()
    return Denoiser(net, cosine(T), "v", num_classes=num_classes, clip_x0=False)


# ---- the maths -------------------------------------------------------------------------------------


def test_one_ddim_step_with_the_target_lands_where_the_teacher_did():
    """x~ solves x_s = alpha_s x~ + (sigma_s / sigma_t)(x_t - alpha_t x~) for x~, at every pair (t, s)."""
    schedule, g = cosine(T), torch.Generator().manual_seed(0)
    x_t, x_s = torch.randn(6, 1, 8, 8, generator=g), torch.randn(6, 1, 8, 8, generator=g)
    t, s = torch.tensor([32, 32, 20, 9, 2, 1]), torch.tensor([24, 0, 12, 5, 1, 0])
    x_tilde = x0_target(schedule, x_t, t, x_s, s)
    a_t, a_s = schedule.at("alpha_bar", t).double(), schedule.at("alpha_bar", s).double()
    eps_hat = (x_t - a_t.sqrt() * x_tilde) / (1 - a_t).sqrt()
    landed = a_s.sqrt() * x_tilde + (1 - a_s).sqrt() * eps_hat  # the student's DDIM step t -> s
    assert torch.allclose(landed.float(), x_s, atol=2e-4)
    assert torch.equal(x_tilde[1], x_s[1])  # s = 0: the target is the teacher's x_0 itself


def test_grids_nest_and_give_the_teachers_two_steps():
    grids = Grids(T, 4)
    assert grids.student.tolist() == [8, 16, 24, 32]  # trailing: what `sample --steps 4 --spacing trailing` visits
    assert [(int(grids.mid[t]), int(grids.next[t])) for t in (32, 24, 16, 8)] == [(28, 24), (20, 16), (12, 8), (4, 0)]
    assert Grids(1000, 32).student[-1] == 1000 and halvings(64, 4) == [32, 16, 8, 4] and halvings(8, 1) == [4, 2, 1]
    with pytest.raises(DdpmkitError, match="does not contain"):
        Grids(T, 4, "uniform")  # uniform's 8 steps do not contain its 4
    for start, to in ((64, 3), (64, 48), (64, 64), (64, 128), (64, 0)):
        with pytest.raises(DdpmkitError, match="cannot halve"):
            halvings(start, to)


@pytest.mark.parametrize("guidance", [1.0, 3.0])
def test_the_target_is_two_ddim_steps_of_the_guided_teacher(guidance):
    """DistillLoss's target against the library's DDIM sampler run by hand over t -> t' -> t''."""
    teacher, grids = tiny_denoiser(), Grids(T, 4)
    x_t, y = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(1)), torch.tensor([0, 1, 2, 3])
    reached = samplers.Trajectory()
    samplers.ddim(teacher, x_t, [24, 20, 16], y=y, guidance=guidance, callback=reached)
    t = torch.full((4,), 24)
    want = x0_target(teacher.schedule, x_t, t, reached.x_t[2], torch.full((4,), 16))
    got = DistillLoss(teacher, grids, guidance).target(x_t, t, y)
    assert torch.allclose(got, want, atol=1e-5)
    if guidance != 1.0:  # folding the guidance in changes the target
        assert (got - DistillLoss(teacher, grids, 1.0).target(x_t, t, y)).abs().max() > 1e-3


def test_a_student_fitted_to_a_tiny_batch_takes_the_teachers_two_steps_in_one():
    teacher, grids = tiny_denoiser(), Grids(T, 4)
    student = copy.deepcopy(teacher)
    student.net.train()
    loss = DistillLoss(teacher, grids, guidance=2.0)
    g = torch.Generator().manual_seed(2)
    x0, y = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1, torch.tensor([0, 1, 2, 3])
    t, eps = grids.steps(torch.tensor([4, 3, 2, 1])), torch.randn(4, 1, 8, 8, generator=g)
    noise = Noise(t, eps, torch.zeros(4, 2))
    x_t = teacher.schedule.at("alpha_bar", t).sqrt() * x0 + (1 - teacher.schedule.at("alpha_bar", t)).sqrt() * eps

    def gap():  # the student's one DDIM step t -> t'' against the teacher's two
        with torch.no_grad():
            mid, nxt = grids.mid[t], grids.next[t]
            two, _ = ddim_step(teacher, ddim_step(teacher, x_t, t, mid, y, 2.0)[0], mid, nxt, y, 2.0)
            one, _ = ddim_step(student, x_t, t, nxt, y)
        return float((one - two).pow(2).mean())

    before = gap()
    optimizer = torch.optim.Adam(student.net.parameters(), lr=1e-2)
    for _ in range(40):
        optimizer.zero_grad()
        loss(student, x0, y, noise).mean().backward()
        optimizer.step()
    after = gap()
    assert after < before / 30 and after < 1e-4, (before, after)  # seen: 5.7e-3 -> 2.3e-5


# ---- the Distiller: rounds and resume ---------------------------------------------------------------


def distill_setup(tmp_path, start=8, to=2, per_round=3):
    """A teacher run (8x8, T = 32, trained 4 steps) and the config of its student."""
    teacher_config = apply_overrides(tiny_config(), {"diffusion": {"timesteps": T}})
    teacher_dir = tmp_path / "teacher"
    checkpoint.create_run(teacher_dir, teacher_config)
    train.Trainer(teacher_config, teacher_dir, tiny_data()).fit(4, progress=False)
    given = {
        "distill": {"start": start, "to": to, "steps_per_round": per_round},
        "train": {"batch_size": 8, "log_every": 1, "checkpoint_every": 1, "keep": 100, "precision": "fp32"},
    }
    ckpt = checkpoint.latest_checkpoint(teacher_dir)
    return distilled_config(teacher_config, str(teacher_dir), ckpt.name, given), ckpt / "ema.safetensors"


def start_distiller(config, run_dir, teacher_weights) -> Distiller:
    checkpoint.create_run(run_dir, config)
    distiller = Distiller(config, run_dir, tiny_data())
    distiller.start(teacher_weights)
    return distiller


def test_rounds_halve_the_steps_down_to_to_and_hand_the_student_over(tmp_path, monkeypatch):
    monkeypatch.setattr(train.viz, "loss_curve", lambda metrics, path: None)  # matplotlib: slow, not under test
    config, teacher_weights = distill_setup(tmp_path, start=16, to=2, per_round=2)
    distiller = start_distiller(config, tmp_path / "student", teacher_weights)
    assert distiller.counts == [8, 4, 2] and distiller.total == 6
    seen, teachers = [], []
    real_randomness = Distiller.randomness_now

    def recording_randomness(self):
        noise, flips = real_randomness(self)
        seen.append((self.step, sorted(set(noise.t.tolist()))))
        teachers.append({k: v.clone() for k, v in self.teacher.net.state_dict().items()})
        return noise, flips

    monkeypatch.setattr(Distiller, "randomness_now", recording_randomness)
    assert distiller.fit(progress=False) == 6
    for step, steps in seen:  # every t drawn lies on the grid of the student of its round
        n = [8, 4, 2][step // 2]
        assert set(steps) <= set(Grids(T, n).student.tolist()), (step, n, steps)
    run = tmp_path / "student"
    stored = {n: load_file(str(round_file(run, n))) for n in (8, 4, 2)}
    first_teacher = load_file(str(teacher_file(run)))
    assert_same_tensors(first_teacher, load_file(str(teacher_weights)))  # round 1: the teacher run's EMA
    assert_same_tensors(teachers[0], first_teacher)
    assert_same_tensors(teachers[2], stored[8])  # round 2's teacher is round 1's student
    assert_same_tensors(teachers[4], stored[4])
    assert_same_tensors(stored[2], load_file(str(checkpoint.latest_checkpoint(run) / "ema.safetensors")))
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [(r["round"], r["student_steps"]) for r in rows] == [(1, 8), (1, 8), (2, 4), (2, 4), (3, 2), (3, 2)]
    assert [r["lr"] for r in rows] == [2e-4, 1e-4] * 3  # linear to 0 within each round, fresh in the next
    _, train_state = checkpoint.load_state(checkpoint.latest_checkpoint(run))
    assert {float(s["step"]) for s in train_state["optimizer"]["state"].values()} == {2.0}  # Adam restarted
    grids = sorted(p.name for p in (run / "samples").iterdir())
    assert grids == ["step-00000002.png", "step-00000004.png", "step-00000006.png"]  # one a round
    _, student = load_round(run, 4)
    assert_same_tensors(student.net.state_dict(), stored[4])


def test_resuming_from_every_checkpoint_is_bit_identical(tmp_path, monkeypatch):
    """A run directory as a kill right after checkpoint k leaves it, for every k, within rounds and
    at their boundaries: resumed, it ends bit-identical to the uninterrupted run."""
    monkeypatch.setattr(train.viz, "loss_curve", lambda metrics, path: None)
    monkeypatch.setattr(Distiller, "write_grid", lambda self, config=None: None)  # not under test here
    config, teacher_weights = distill_setup(tmp_path)
    straight = tmp_path / "straight"
    start_distiller(config, straight, teacher_weights).fit(progress=False)
    want = final_weights(straight)
    # killed before the teacher's copy, before a checkpoint, within round 1, at the boundary, within round 2
    for k, copied in ((0, False), (0, True), (2, True), (3, True), (4, True)):
        run = tmp_path / f"from-{k}-{copied}"
        run.mkdir()
        for name in ("config.json", "metrics.jsonl"):
            shutil.copy(straight / name, run / name)
        (run / "rounds").mkdir()
        if copied:
            shutil.copy(teacher_file(straight), teacher_file(run))
        if k > 3:  # round 1's student is written as round 2 begins, after checkpoint 3
            shutil.copy(round_file(straight, 4), round_file(run, 4))
        if k:
            shutil.copytree(straight / f"ckpt-{k:08d}", run / f"ckpt-{k:08d}")
        distiller = Distiller(checkpoint.load_config(run), run, tiny_data())
        distiller.resume()
        assert distiller.step == k
        distiller.fit(progress=False)
        for got, expected in zip(final_weights(run), want):
            assert_same_tensors(got, expected)
        assert_metrics_match(run, straight, [k])
        for n in (4, 2):
            assert_same_tensors(load_file(str(round_file(run, n))), load_file(str(round_file(straight, n))))


# ---- the command line -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    """A class-conditional 28x28 teacher (T = 50) trained for 4 steps with label dropout."""
    root = tmp_path_factory.mktemp("distill")
    data, run = make_idx_dataset(root / "mnist"), root / "teacher"
    flags = ["--batch-size", "8", "--no-progress", "--precision", "fp32", "--sample-every", "99", "--sample-steps", "2"]
    args = ["train", "--dataset", "mnist", "--data-dir", str(data), *TINY_MODEL, *flags, "--steps", "4"]
    assert main([*args, "--out", str(run)]) == 0
    return run


# 2 rounds (8 -> 4 -> 2 steps) of 2 optimizer steps, the teacher's guidance 2 folded in
DISTILL = ["--from", "8", "--to", "2", "--steps-per-round", "2", "--batch-size", "8", "--guidance", "2"]
DISTILL += ["--precision", "fp32", "--checkpoint-every", "1", "--log-every", "1", "--sample-every", "99"]
DISTILL += ["--no-progress"]


@pytest.fixture(scope="module")
def student_run(teacher_run):
    """The teacher distilled by `ddpmkit distill` without interruption (tests only read it)."""
    student = teacher_run.parent / "student"
    assert main(["distill", str(teacher_run), "--out", str(student), *DISTILL]) == 0
    return student


def test_sample_and_eval_default_to_the_students_steps(teacher_run, student_run, tmp_path, capsys, monkeypatch):
    config = checkpoint.load_config(student_run)
    sample = config.sample
    assert (sample.sampler, sample.steps, sample.spacing, sample.guidance) == ("ddim", 2, "trailing", 1.0)
    assert config.distill.guidance == 2.0 and config.distill.teacher == str(teacher_run.resolve())
    calls = []
    real_forward = Denoiser.forward

    def counting(self, x_t, t, *args, **kwargs):  # (t, guidance) of every network evaluation
        calls.append((int(t), *args[1:2]))
        return real_forward(self, x_t, t, *args, **kwargs)

    monkeypatch.setattr(Denoiser, "forward", counting)
    assert main(["sample", str(student_run), "--n", "4", "--out", str(tmp_path / "s.png")]) == 0
    assert [c[0] for c in calls] == [50, 25] and all(c[1:] in ((), (1.0,)) for c in calls)  # 2 steps, unguided
    capsys.readouterr()
    assert main(["sample", str(student_run), "--guidance", "3", "--out", str(tmp_path / "g.png")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "guidance 2 is folded in" in err and not (tmp_path / "g.png").exists()
    # eval: its sampling (scoring is tested in test_evaluate.py; its classifier takes seconds to train)
    calls.clear()
    scored = []
    monkeypatch.setattr(report, "score_images", lambda images, *a: scored.append(images.shape) or {"domain": {"n": 8}})
    out = tmp_path / "eval.json"
    args = ["eval", str(student_run), "--n", "8", "--nll-n", "0", "--inception", "off", "--no-progress"]
    assert main([*args, "--out", str(out)]) == 0
    sampling = json.loads(out.read_text())["sampling"]
    assert (sampling["steps"], sampling["spacing"]) == (2, "trailing") and [c[0] for c in calls] == [50, 25]
    assert scored == [(8, 1, 28, 28)]


def test_a_sigkilled_distillation_resumes_bit_identical(teacher_run, student_run, tmp_path):
    """SIGKILL a real `python -m ddpmkit distill` after its first checkpoints, resume it with --resume:
    its weights, EMA, optimizer and RNG state end as the uninterrupted run's, and so do its metrics."""
    killed = tmp_path / "killed"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    argv = [sys.executable, "-m", "ddpmkit", "distill", str(teacher_run), "--out", str(killed), *DISTILL]
    with open(tmp_path / "log", "w") as log:
        proc = subprocess.Popen(argv, stdout=log, stderr=log, env=env)
    deadline = time.monotonic() + 120
    while not checkpoint.checkpoints(killed) and proc.poll() is None:
        assert time.monotonic() < deadline
        time.sleep(0.002)
    proc.send_signal(signal.SIGKILL)
    assert proc.wait() == -signal.SIGKILL, (tmp_path / "log").read_text()
    resumed_from = int(checkpoint.latest_checkpoint(killed).name[5:])
    assert resumed_from < 4
    assert main(["distill", "--out", str(killed), "--resume", "--no-progress"]) == 0
    for got, want in zip(final_weights(killed), final_weights(student_run)):
        assert_same_tensors(got, want)
    assert_metrics_match(killed, student_run, [resumed_from])


def test_sigint_saves_and_resume_finishes_the_same(teacher_run, student_run, tmp_path, capsys, monkeypatch):
    run = tmp_path / "run"
    real_step = Distiller.train_step

    def interrupt_at_3(self):
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return real_step(self)

    monkeypatch.setattr(Distiller, "train_step", interrupt_at_3)
    capsys.readouterr()
    assert main(["distill", str(teacher_run), "--out", str(run), *DISTILL]) == 130
    assert capsys.readouterr().err == (
        f"ddpmkit distill: stopped by SIGINT at step 3 and saved a checkpoint; "
        f"continue with `ddpmkit distill --out {run} --resume`\n"
    )
    monkeypatch.setattr(Distiller, "train_step", real_step)
    assert main(["distill", str(teacher_run), "--out", str(run), "--resume", "--no-progress"]) == 0
    for got, want in zip(final_weights(run), final_weights(student_run)):
        assert_same_tensors(got, want)
    assert_metrics_match(run, student_run, [3])


def one_line_exit_2(capsys, argv, expected: str):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "Traceback" not in err and expected in err, err
    return err


def test_bad_input_is_one_line_and_touches_nothing(teacher_run, tmp_path, capsys):
    before, out = snapshot(teacher_run), tmp_path / "new"
    run = ["distill", str(teacher_run), "--out", str(out)]
    for flags, expected in [
        (["--from", "8", "--to", "3"], "--from 8 --to 3: cannot halve 8 steps down to 3"),
        (["--from", "8", "--to", "8"], "cannot halve 8 steps down to 8"),
        (["--from", "8", "--to", "16"], "cannot halve"),
        (["--from", "8", "--to", "0"], "cannot halve"),
        (["--from", "64"], "--from must be between 2 and the model's T = 50 steps, got 64"),
        (["--from", "8", "--steps-per-round", "0"], "--steps-per-round must be >= 1"),
        (["--from", "8", "--guidance", "-1"], "--guidance must be a finite number >= 0"),
        (["--from", "8", "--lr", "0"], "--lr must be a finite number > 0"),
    ]:
        one_line_exit_2(capsys, [*run, *flags], expected)
        assert not out.exists()
    one_line_exit_2(capsys, ["distill", str(tmp_path), "--out", str(out)], "is not a ddpmkit run directory")
    one_line_exit_2(capsys, ["distill", "--out", str(out)], "give the teacher's run directory")
    one_line_exit_2(capsys, [*run[:2], "--out", str(teacher_run / "student")], "inside the teacher's run directory")
    one_line_exit_2(capsys, [*run[:2], "--out", str(teacher_run)], "already holds a run")
    one_line_exit_2(capsys, ["distill", "--out", str(teacher_run), "--resume"], "was not made by `ddpmkit distill`")
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    one_line_exit_2(capsys, [*run, "--from", "8"], "already holds files")
    assert snapshot(out) == {"notes.txt": snapshot(out)["notes.txt"]} and snapshot(teacher_run) == before


def test_teachers_that_cannot_be_distilled_are_refused(teacher_run, tmp_path, capsys):
    eps = shutil.copytree(teacher_run, tmp_path / "eps")
    config = json.loads((eps / "config.json").read_text())
    config["diffusion"]["objective"] = "eps"
    (eps / "config.json").write_text(json.dumps(config))
    distill = ["distill", str(eps), "--from", "8", "--out"]
    one_line_exit_2(capsys, [*distill, str(tmp_path / "a")], "needs a model that predicts v or x0")
    config["diffusion"]["objective"], config["data"]["label_dropout"] = "v", 0.0
    (eps / "config.json").write_text(json.dumps(config))
    one_line_exit_2(capsys, [*distill, str(tmp_path / "b"), "--guidance", "3"], "label dropout")
    for ckpt in checkpoint.checkpoints(eps):
        shutil.rmtree(ckpt)
    one_line_exit_2(capsys, [*distill, str(tmp_path / "c")], "no complete checkpoint")
    assert not any((tmp_path / name).exists() for name in "abc")


def test_train_resume_refuses_a_distilled_run(student_run, capsys):
    before = snapshot(student_run)
    one_line_exit_2(capsys, ["train", "--out", str(student_run), "--resume", "--steps", "10"], "ddpmkit distill --out")
    resume = ["distill", "--out", str(student_run), "--resume"]
    one_line_exit_2(capsys, [*resume, "--to", "1"], "--to cannot change when resuming")
    assert snapshot(student_run) == before


@pytest.fixture(scope="module")
def untrained_teacher(tmp_path_factory):
    return make_run(tmp_path_factory.mktemp("fuzz") / "run")


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(argv=argument_lists("distill"))
def test_random_distill_arguments_exit_2_and_create_nothing(untrained_teacher, tmp_path_factory, argv):
    """Random flags (values of their type, sometimes junk) with a data directory that does not exist:
    every check before the data runs, nothing starts, --out is never created, the teacher never changes."""
    root = untrained_teacher.parent
    before, out = snapshot(untrained_teacher), root / "fuzz-out"
    valid = ["--from", "8", "--to", "2"]  # the random flags come after, and override them
    argv = [argv[0], str(untrained_teacher), *valid, *argv[1:], "--data-dir", str(root / "no-data"), "--out", str(out)]
    assert fuzz(argv) == 2
    assert not out.exists() and snapshot(untrained_teacher) == before


def test_a_students_config_has_its_derived_defaults_resolved(tmp_path):
    """Without --batch-size the student's batch size is derived (64 up to 64x64) in its config, as
    `ddpmkit train` writes it: the CLI's check that the data is the teacher's compares the config with
    the resolved one, and a None there refused every distillation at the default batch size."""
    teacher_config = resolve(apply_overrides(tiny_config(), {"diffusion": {"timesteps": T}}))
    teacher_dir = tmp_path / "teacher"
    checkpoint.create_run(teacher_dir, teacher_config)
    config = distilled_config(teacher_config, str(teacher_dir), "ckpt-00000004", {"distill": {"start": 8, "to": 2}})
    assert config.train.batch_size == default_batch_size(teacher_config.image_size) == 64
    assert resolve(config) == config

"""Smoke test of the benchmarks' ddpmkit side (bench/ is scripts, not a package).

The reference implementations are optional extras (`.[bench]`), not installed in CI: these
tests never import them, and run the speed benchmark with --skip-references.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ddpmkit.cli import BOOL_FLAGS
from ddpmkit.core.precision import resolve_precision
from ddpmkit.run.build import net as build_net
from ddpmkit.run.config import RunConfig

BENCH = Path(__file__).resolve().parents[1] / "bench"


def _bench_module(name: str):
    sys.path.insert(0, str(BENCH))
    try:
        return __import__(name)
    finally:
        sys.path.remove(str(BENCH))


@pytest.fixture(scope="module")
def speed():
    return _bench_module("speed")


def test_matched_model_finds_an_exact_config_in_its_search_space(speed):
    model = {"base_channels": 28, "channel_mults": (1, 2, 4), "num_res_blocks": 1, "attn_resolutions": (7,)}
    target = speed.ddpmkit_params(model, conditional=False)
    found, params = speed.matched_model(target, (1, 2, 4), (7,))
    assert (found, params) == (model, target)


def test_matched_model_widens_before_deepening(speed):
    # lucidrains' Unet(dim=32, dim_mults=(1, 2, 4), channels=1) has 2,607,681 parameters: ddpmkit's
    # depth of one block per level, made wider, comes within 5% before a second block is tried
    found, params = speed.matched_model(2_607_681, (1, 2, 4), (7,))
    assert abs(params / 2_607_681 - 1) <= speed.TOLERANCE
    assert (found["channel_mults"], found["num_res_blocks"]) == ((1, 2, 4), 1)
    net = build_net(speed.ddpmkit_config(found, conditional=False, precision="fp32", sizes=speed.QUICK))
    assert sum(p.numel() for p in net.parameters()) == params


def test_matched_model_falls_back_to_default_mults_when_the_references_cannot_work(speed):
    # two levels at 28x28 are [28, 14]: attention at 7 matches none, so every (1, 1) config is invalid
    found, params = speed.matched_model(2_607_681, (1, 1), (7,))
    assert found["channel_mults"] != (1, 1)
    assert abs(params / 2_607_681 - 1) <= speed.TOLERANCE


def test_quick_speed_run_measures_the_ddpmkit_rows(tmp_path):
    proc = subprocess.run(
        [sys.executable, str(BENCH / "speed.py"), "--quick", "--skip-references", "--results-dir", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "skipping lucidrains: --skip-references" in proc.stderr
    (result_file,) = tmp_path.glob("speed-*.json")
    result = json.loads(result_file.read_text())
    rows = result["rows"]
    assert [(r["name"], r["precision"]) for r in rows] == [("ddpmkit default", "auto"), ("ddpmkit default", "fp32")]
    default_params = sum(p.numel() for p in build_net(RunConfig()).parameters())
    for r in rows:
        assert r["params"] == default_params
        assert r["resolved_precision"] == resolve_precision(r["precision"], "cpu")
        assert 0 < r["train_images_per_s"] < float("inf") and 0 < r["sample_images_per_s"] < float("inf")
        assert len(r["train_windows"]) == result["sizes"]["windows"]
        # a training step is a forward and a backward pass (about twice the forward's FLOPs)
        assert 2.5 < r["train_step_flops"] / r["forward_flops"] < 3.5
        assert r["rss_train_mib"] >= r["rss_sample_mib"] >= r["rss_built_mib"] > result["idle_torch_rss_mib"] > 0
    assert "ddpmkit default" in result_file.with_suffix(".md").read_text()


def test_quality_npz_round_trip_matches_ddpmkit_sample(tmp_path):
    quality = _bench_module("quality")
    images = torch.linspace(-1, 1, 3 * 28 * 28).reshape(3, 1, 28, 28)
    quality.save_npz(tmp_path / "s.npz", images, [4, 0, 9])
    back, labels = quality.load_npz(tmp_path / "s.npz")
    assert labels.tolist() == [4, 0, 9]
    assert back.shape == images.shape and (back - images).abs().max() <= 1 / 127.5
    quality.save_npz(tmp_path / "u.npz", images, None)
    assert quality.load_npz(tmp_path / "u.npz")[1] is None


def test_flop_count_includes_cpu_attention():
    measure = _bench_module("_measure")
    B, H, N, d = 2, 4, 49, 16
    q = torch.randn(B, H, N, d)
    flops = measure.count_flops(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q))
    assert flops == 2 * (2 * B * H * N * N * d)  # q k^T and (softmax) v, a multiply-add each


def test_busy_warning_reads_the_cpus_now_not_the_load_a_finished_benchmark_left(tmp_path):
    measure = _bench_module("_measure")
    chained = {"cores": 2, "load_average_at_start": 1.6, "cpu_busy_at_start": 0.02}  # the last bench just ended
    assert measure.busy_warning(chained) == ""
    assert "60% of the 2 CPUs busy" in measure.busy_warning({**chained, "cpu_busy_at_start": 0.6})
    assert "load average 1.6" in measure.busy_warning({"cores": 2, "load_average_at_start": 1.6})  # old reports
    stat = tmp_path / "stat"
    ticks = iter(["cpu  100 0 100 800 0 0 0 0 0 0", "cpu  150 0 130 820 0 0 0 0 0 0"])  # 80 of 100 busy

    class Stat:  # each open() of the file reads the next snapshot
        def __fspath__(self):
            stat.write_text(next(ticks) + "\ncpu0 ...\n")
            return str(stat)

    assert measure.cpu_busy_share(0.0, Stat()) == pytest.approx(0.8)
    assert measure.cpu_busy_share(0.0, str(tmp_path / "missing")) is None
    assert 0.0 <= measure.cpu_busy_share(0.2) <= 1.0  # this kernel's /proc/stat reads the same way


def test_recipe_rows_are_one_change_each_and_bad_rows_are_refused(capsys):
    recipe = _bench_module("recipe")
    for dataset, size, rows in recipe.ROW_SETS.values():
        flags = list(rows.values())
        assert flags[0] == [] and all(f[0].startswith("--") for f in flags[1:])
        switches = BOOL_FLAGS  # `ddpmkit train`'s flags that take no value
        assert all(len(f) % 2 == 0 or (len(f) == 1 and f[0] in switches) for f in flags[1:])  # flag-value pairs
        assert len({tuple(f) for f in flags}) == len(flags)  # no row repeats another
        assert (dataset == "folder") == (size is not None)
    args, chosen = recipe.parse_rows(recipe.row_parser("x", 4.0, "recipe"), ["--rows", "0,7"], list(recipe.ROWS))
    assert chosen == [list(recipe.ROWS)[0], list(recipe.ROWS)[7]] and args.minutes == 4.0
    for bad in (["--rows", "9"], ["--rows", "a"], ["--minutes", "0"]):
        with pytest.raises(SystemExit):
            recipe.parse_rows(recipe.row_parser("x", 4.0, "recipe"), bad, list(recipe.ROWS))
        errors = [line for line in capsys.readouterr().err.splitlines() if "error:" in line]
        assert len(errors) == 1 and ("--rows" in errors[0] or "--minutes" in errors[0])  # after argparse's usage
    with pytest.raises(SystemExit):
        recipe.main(["--set", "folder-32", "--rows", "0"])  # a folder set needs the folder
    assert "--set folder-32 needs --data-dir" in capsys.readouterr().err


def test_row_runs_are_removed_unless_kept(tmp_path, monkeypatch):
    options = _bench_module("options")
    made = []

    def fake_row(name, flags, args, run):  # stands in for training and scoring one row
        run.mkdir()
        made.append(run)
        return {"name": name}

    monkeypatch.setattr(options, "run_row", fake_row)
    for keep in (False, True):
        argv = ["--out-dir", str(tmp_path / str(keep)), *(["--keep-runs"] if keep else [])]
        args, chosen = options.parse_rows(options.row_parser("x", 1.0, "recipe"), argv, ["a", "b"])
        result = options.run_rows(args, chosen, {"a": [], "b": ["--lr", "1"]}, "recipe", argv)
        assert [r["name"] for r in result["rows"]] == ["a", "b"]
        assert all(run.is_dir() == keep for run in made[-2:])  # a --keep-runs run can be sampled afterwards


def test_recipe_report_shows_minutes_and_flags_memory_over_4_gib():
    recipe = _bench_module("recipe")
    machine = {"cpu": "cpu", "cores": 2, "torch": "t", "load_average_at_start": 0.0}
    row = {"params": 1e6, "train_images_per_s": 100.0, "steps": 10, "fd_dom": 20.0, "conditional_accuracy": 0.5}
    row |= {"precision": 0.5, "recall": 0.5, "train_process_minutes": 15.4, "conditional_balanced_accuracy": 0.4}
    rows = [{**row, "name": "default", "peak_rss_mib": 1500.0}, {**row, "name": "big", "peak_rss_mib": 5000.0}]
    rows[0]["classifier"] = {"accuracy": 0.85, "balanced_accuracy": 0.7}
    result = {"date": "d", "command": "c", "machine": machine, "threads": 2, "minutes": 15, "seed": 0, "n": 9}
    text = recipe.report({**result, "rows": rows, "dataset": "folder", "data_dir": "/x/emoji", "image_size": 64})
    assert "folder emoji at 64x64" in text and "| 15.4 | 1500 |" in text and "| 5000 (over 4 GiB) |" in text
    assert "0.850 accuracy and 0.700 balanced accuracy" in text


def test_speed_shapes_place_attention_where_the_references_have_it(speed):
    assert speed.attention_sizes(speed.REFERENCES["lucidrains"]["attn_levels"], 28) == (7,)
    assert speed.attention_sizes(speed.REFERENCES["diffusers"]["attn_levels"], 64) == (32, 16)
    assert speed.default_model(28)["attn_resolutions"] == (7,)  # the default model of `ddpmkit train` at 28x28
    for channels, size in ((3, 32), (3, 64)):
        model = speed.default_model(size)
        levels = [size // 2**level for level in range(len(model["channel_mults"]))]
        assert model["attn_resolutions"] == (levels[-1],)  # the lowest level, as 7 is at 28
        config = speed.ddpmkit_config(model, True, "fp32", speed.QUICK, shape=(channels, size))
        net = build_net(config)
        x = torch.randn(2, channels, size, size)
        assert net(x, torch.tensor([3, 500]), torch.tensor([0, 1])).shape == x.shape
        assert speed.synthetic_data(4, (channels, size)).images.shape == (4, channels, size, size)


def test_quality_report_compares_with_the_better_lucidrains_row(tmp_path):
    quality = _bench_module("quality")
    score = {"precision": 0.5, "recall": 0.4, "class_entropy": 2.0, "conditional_accuracy": None}
    scores = {
        "ddpmkit": {**score, "fd_dom": 30.0, "conditional_accuracy": 0.6, "conditional_balanced_accuracy": 0.5},
        "lucidrains lr 0.0001": {**score, "fd_dom": 120.0},
        "lucidrains lr 0.0003": {**score, "fd_dom": 80.0},
        "floor": {**score, "fd_dom": 5.0},
        "blurred": {**score, "fd_dom": 200.0},
    }
    assert quality.best_reference(scores) == "lucidrains lr 0.0003"
    classifier = {"train_images": 3403, "test_images": 378, "test_accuracy": 0.85, "test_balanced_accuracy": 0.7}
    machine = {"cpu": "cpu", "cores": 2, "torch": "t", "load_average_at_start": 0.0}
    contestants = {"ddpmkit": {"steps": 900, "grid": str(tmp_path / "q-ddpmkit.png")}, "lucidrains lr 0.0001": {}}
    result = {"date": "d", "command": "c", "machine": machine, "threads": 2, "minutes": 15, "n": 1000}
    result |= {"dataset": "folder", "data_dir": "/data/emoji-noto", "image_size": 32, "channels": 3}
    text = quality.report({**result, "contestants": contestants, "scores": scores, "classifier": classifier})
    assert "| ddpmkit | 15 | 900 |" in text and "**0.38x**" in text  # 30 / 80
    assert "| lucidrains lr 0.0003 | 15 |  |  | 80.000 | best |" in text
    assert "real train images blurred (sigma 1 px)" in text and "channels=3" in text
    assert "0.850 accuracy and 0.700 balanced accuracy on the 378 held-out" in text
    assert "![ddpmkit](q-ddpmkit.png)" in text
    args = type("Args", (), {"dataset": "folder", "data_dir": "/data/emoji-noto/", "image_size": 32})()
    assert quality.result_stem(args, "2026-12-01") == "quality-2026-12-01-emoji-noto-32"
    args.dataset, args.data_dir, args.image_size = "fashion-mnist", None, None
    assert quality.result_stem(args, "2026-12-01") == "quality-2026-12-01"


def test_sampler_benchmark_plans_nfes_per_sampler():
    bench = _bench_module("samplers")
    todo, skipped = bench.plan(["heun-karras", "dpm++"], [4, 15, 35, 101], T=50)
    assert [(r["row"], r["nfe"], r["steps"]) for r in todo] == [
        ("heun-karras", 15, 8),
        ("heun-karras", 35, 18),
        ("dpm++", 4, 4),
        ("dpm++", 15, 15),
        ("dpm++", 35, 35),
    ]
    assert [(s["row"], s["nfe"]) for s in skipped] == [("heun-karras", 4), ("heun-karras", 101), ("dpm++", 101)]
    assert "no step count" in skipped[0]["why"] and "51 steps > T = 50" in skipped[1]["why"]
    rows = [
        {"fd_dom": 10.0, "s_per_1000": 200.0},  # too slow
        {"fd_dom": 10.5, "s_per_1000": 80.0},
        {"fd_dom": 10.9, "s_per_1000": 30.0},
        {"fd_dom": 11.5, "s_per_1000": 10.0},  # too far above the reference
    ]
    assert bench.best_choice(rows, reference_fd=10.0) == (rows[1], rows[2])
    assert bench.best_choice(rows[3:], reference_fd=10.0) == (None, None)
    result = {
        "reference": {"fd_dom": 10.0, "steps": 100},
        "rows": [
            {"row": "a", "nfe": 4, "fd_dom": 30.0},
            {"row": "a", "nfe": 10, "fd_dom": 11.5},
            {"row": "b", "nfe": 10, "fd_dom": 10.8},
        ],
    }
    assert bench.fd_table(result) == [
        "| row | NFE 4 | NFE 10 |",
        "|---|---|---|",
        "| a | **30.0** | 11.5 |",
        "| b |  | **10.8** |",
    ]
    assert bench.at_nfe_line(result) == "Best at 10 NFE: b, FD_dom 10.80, 1.08x DDIM-100's 10.00 (within 10%)."
    result["rows"][2]["fd_dom"] = 11.2
    assert "1.12x DDIM-100's 10.00 (not within 10%)" in bench.at_nfe_line(result)
    assert bench.at_nfe_line(result, 6) == "No row at 6 NFE."


def test_sampler_benchmark_smoke_run_matches_ddpmkit_eval(tiny_mnist, tmp_path, monkeypatch, capsys):
    """Two samplers at two NFEs on a 20-step toy run, 16 samples: the tables, the plot, and each row's
    FD_dom equal to what its recorded `ddpmkit eval` command reports."""
    from conftest import FAST, TINY_MODEL

    from ddpmkit.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))  # the domain classifier of the toy data
    run = tmp_path / "run"
    train = ["train", "--dataset", "mnist", "--data-dir", str(tiny_mnist), *TINY_MODEL, *FAST, "--steps", "20"]
    assert main([*train, "--precision", "fp32", "--out", str(run)]) == 0
    bench = _bench_module("samplers")
    argv = [str(run), "--rows", "dpm++,heun-karras", "--nfe", "3,4", "--n", "16", "--threads", "1"]
    assert bench.main([*argv, "--results-dir", str(tmp_path / "results"), "--tag", "toy"]) == 0
    (stem,) = {p.with_suffix("") for p in (tmp_path / "results").iterdir()}
    assert stem.name.endswith("-toy")
    result = json.loads(stem.with_suffix(".json").read_text())
    assert [(r["row"], r["nfe"], r["steps"]) for r in result["rows"]] == [
        ("dpm++", 3, 3),
        ("dpm++", 4, 4),
        ("heun-karras", 4, 3),  # its entry step from t = T (sigma_T > 80) is one evaluation: 2n - 2
    ]
    assert result["skipped"] == [{"row": "heun-karras", "nfe": 3, "why": "no step count makes 3 NFE"}]
    assert result["reference"]["steps"] == 50 and stem.with_suffix(".png").stat().st_size > 10_000
    table = stem.with_suffix(".md").read_text()
    assert table.count("| dpm++ |") == 3 and "reference DDIM-50" in table  # the FD_dom table's line and two rows
    assert "Best choice for" in table or "No row meets" in table
    stem.with_suffix(".md").unlink()  # --render remakes the report from the JSON alone
    assert bench.main(["--render", str(stem.with_suffix(".json"))]) == 0
    assert stem.with_suffix(".md").read_text() == table
    row = result["rows"][2]
    capsys.readouterr()
    eval_argv = row["command"].split()[1:] + ["--no-progress", "--out", str(tmp_path / "eval.json")]
    assert main(eval_argv) == 0
    scored = json.loads((tmp_path / "eval.json").read_text())["results"]["domain"]
    assert scored["fd_dom"] == pytest.approx(row["fd_dom"], rel=1e-6) and scored["recall"] == row["recall"]


def test_guidance_benchmark_scores_each_weight_like_ddpmkit_eval(tiny_mnist, tmp_path, monkeypatch, capsys):
    """Two guidance weights on a 20-step toy run, 16 samples: one row per weight at the run's own
    sampler, the floor row, and a row's FD_dom equal to what its recorded `ddpmkit eval` reports."""
    from conftest import FAST, TINY_MODEL

    from ddpmkit.cli import main

    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    run = tmp_path / "run"
    train = ["train", "--dataset", "mnist", "--data-dir", str(tiny_mnist), *TINY_MODEL, *FAST, "--steps", "20"]
    assert main([*train, "--precision", "fp32", "--sample-steps", "3", "--out", str(run)]) == 0
    bench = _bench_module("guidance")
    argv = [str(run), "--weights", "1,3", "--n", "16", "--threads", "1", "--results-dir", str(tmp_path / "r")]
    assert bench.main([*argv, "--intervals", "all,1e8:1e9,0:1e8"]) == 0
    (stem,) = {p.with_suffix("") for p in (tmp_path / "r").iterdir()}
    assert stem.name.endswith("-run")
    result = json.loads(stem.with_suffix(".json").read_text())
    # W = 1 once; W = 3 guided at every step, at none (no sigma_t above 1e8), at all (every sigma_t below it)
    assert [(r["guidance"], r["guidance_interval"]) for r in result["rows"]] == [
        (1.0, None),
        (3.0, None),
        (3.0, [1e8, 1e9]),
        (3.0, [0, 1e8]),
    ]
    assert result["sampling"]["steps"] == 3  # the run's own sampler settings
    fd = [r["fd_dom"] for r in result["rows"]]
    assert fd[0] != fd[1] and fd[2] == fd[0] and fd[3] == fd[1]  # guidance changes the samples, where it acts
    table = stem.with_suffix(".md").read_text()
    assert "| 3 | every step |" in table and "| 3 | (1e+08, 1e+09] |" in table and "(floor)" in table
    capsys.readouterr()
    for row, flag in ((result["rows"][1], "--guidance 3 "), (result["rows"][2], "--guidance-interval 1e+08,1e+09")):
        assert flag in row["command"]
        assert main(row["command"].split()[1:] + ["--no-progress", "--out", str(tmp_path / "e.json")]) == 0
        scored = json.loads((tmp_path / "e.json").read_text())["results"]["domain"]
        assert scored["fd_dom"] == pytest.approx(row["fd_dom"], rel=1e-6)
    with pytest.raises(SystemExit):
        bench.main([*argv, "--intervals", "5:1"])
    assert "--intervals takes all or LO:HI" in capsys.readouterr().err


def test_guidance_benchmark_rejects_an_unconditional_run_in_one_line(tmp_path, capsys):
    from ddpmkit.run import checkpoint

    run = tmp_path / "run"
    config = RunConfig()
    config.data.conditional = False
    checkpoint.create_run(run, config)
    assert _bench_module("guidance").main([str(run), "--results-dir", str(tmp_path / "r")]) == 2
    assert "is unconditional" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_distill_baselines_parse_and_the_report_compares_with_the_first():
    bench = _bench_module("distill")
    assert bench.parse_baselines("ddim:50, dpm++:10:uniform,") == [("ddim", 50, None), ("dpm++", 10, "uniform")]
    row = {"settings": {"sampler": "ddim", "spacing": "trailing", "guidance": 1.0, "steps": 4}, "sample_s": 1.0}
    scores = {"conditional_accuracy": 0.9, "precision": 0.8, "recall": 0.7}
    result = {
        "date": "d",
        "command": "c",
        "machine": {"cpu": "x", "cores": 2, "torch": "t", "load_average_at_start": 0.0},
        "threads": 2,
        "teacher": "RUN",
        "n": 10,
        "seed": 0,
        "distillation": {"wall_s": 600, "cpu_s": 1200, "command": ["distill"], "round_written_s": {4: 300}},
        "rows": [
            {**row, "name": "teacher, ddim 50", "fd_dom": 20.0, **scores},
            {**row, "name": "student, 4 steps", "fd_dom": 30.0, **scores},
        ],
    }
    text = bench.report(result)
    assert "10.0 wall minutes, 20.0 CPU minutes" in text
    assert "| student, 4 steps | ddim trailing, guidance 1 | 4 | 30.00 | 1.50x |" in text and text.rstrip().endswith(
        "ended."
    )
    assert "| 5.0 |" in text  # the 4-step student existed 5 minutes into the distillation


def test_headline_names_the_cpu_kind_and_labels_both_likelihoods():
    headline = _bench_module("headline")
    assert headline.cpu_kind({"avx2", "avx512f", "avx512_bf16"}) == "AVX-512 BF16"
    assert headline.cpu_kind({"avx2", "amx_bf16"}) == "AVX-512 BF16"
    assert headline.cpu_kind({"avx2", "avx512f"}) == "AVX-512 (no bf16)"
    assert headline.cpu_kind({"avx2"}) == "AVX2" and headline.cpu_kind(set()) == "no AVX2"
    assert headline._slug("AVX-512 (no bf16)") == "avx-512-no-bf16" and headline._slug("AVX2") == "avx2"
    domain = {"fd_dom": 24.8, "conditional_accuracy": 0.868, "precision": 0.836, "recall": 0.72}
    nll = {
        "conditional": {"quantity": "-log p(x|y)", "bpd": 3.49, "bpd_sem": 0.04},
        "unconditional": {"quantity": "-log p(x)", "bpd": 3.61, "bpd_sem": 0.05},
    }
    rows = {key: {"results": {"domain": domain}, "seconds": 10.0} for key, _, _ in headline.ROWS}
    rows["default"] = {"results": {"domain": domain, "nll": nll}, "seconds": 600.0, "nll_n": 1000, "nll_stride": 10}
    rows["default"]["sampling"] = {"sampler": "dpm++", "steps": 10, "spacing": "karras"}
    machine = {"cpu": "X", "cores": 2, "threads": 2, "cpu_kind": "AVX2", "auto_precision": "fp32", "torch": "2"}
    result = {
        "date": "d",
        "command": "python bench/headline.py",
        "minutes": 15.0,
        "n": 1000,
        "machine": {**machine, "python": "3", "load_average_at_start": 0.0},
        "train": {"steps": 1400, "images_seen": 89600, "last_images_per_s": 100.0, "seconds": 900.0},
        "rows": rows,
        "samples_png": "s.png",
    }
    text = headline.table(result)
    assert "CPU kind **AVX2**, `--precision auto` = **fp32**" in text and "step 1,400" in text
    assert "bits/dim -log p(x\\|y) | bits/dim -log p(x) |" in text
    assert "| 3.49 ± 0.04 | 3.61 ± 0.05 | 600 |" in text
    assert "the default sampler (dpm++, 10 steps, karras spacing)" in text


def test_breakdown_profiles_a_colour_default_model_and_names_its_shape(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            str(BENCH / "breakdown.py"),
            "--channels",
            "3",
            "--size",
            "16",
            "--steps",
            "1",
            "--precision",
            "fp32",
            "--results-dir",
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (result_file,) = tmp_path.glob("breakdown-*-native-default-fp32-3x16x16.json")
    result = json.loads(result_file.read_text())
    speed = _bench_module("speed")
    assert result["model"] == json.loads(json.dumps(speed.default_model(16)))
    for name in ("train step", "sampling forward"):
        assert result[name]["total_ms"] > 0
        assert sum(result[name]["kinds"].values()) == pytest.approx(1.0)
        assert "convolution" in result[name]["kinds"]
    assert "batch 64 of 3x16x16" in result_file.with_suffix(".md").read_text()


def test_speed_refuses_an_unknown_reference(speed, capsys):
    with pytest.raises(SystemExit) as exit_info:
        speed.main(["--quick", "--references", "lucidrains,k-diffusion"])
    assert exit_info.value.code == 2
    assert "--references takes lucidrains and/or diffusers" in capsys.readouterr().err


def test_attention_bench_times_each_forward_rule_in_the_model_and_restores_the_pick(speed, monkeypatch):
    """The in-model table's columns run what they name (the fused kernel, or two matmuls up to 256
    positions) and the library's own pick is back afterwards."""
    from ddpmkit.models import layers

    attention = _bench_module("attention")
    picked, kernels = layers.cpu_attention_kernel, []
    monkeypatch.setattr(attention, "time_ms", lambda fn, seconds, windows: (fn(), 1.0)[1])

    def spy(name, kernel):
        def run(q, k, v):
            kernels.append(name)
            return kernel(q, k, v)

        return run

    monkeypatch.setattr(layers, "ATTENTION_KERNELS", {n: spy(n, k) for n, k in layers.ATTENTION_KERNELS.items()})
    rows = attention.model_rows({"batch": 2, "seconds": 0.0, "rounds": 1, "dtypes": ["float32"]})
    assert [r["model"] for r in rows] == ["default", "lucidrains", "diffusers"]
    assert all(r["pick_ms"] == r["fused_ms"] == r["matmul_ms"] == 1.0 for r in rows)
    assert set(kernels) == {"fused", "matmul"}  # fp32: the pick and "fused" run fused, the matmul rule matmul
    assert layers.cpu_attention_kernel is picked


def test_killing_a_bench_script_stops_the_row_it_started(tmp_path):
    # `kill PID` on a bench script must not leave its `ddpmkit train` row running on the cores
    # the next measurement needs: run_main turns SIGTERM into an exit that subprocess.run cleans up
    pid_file = tmp_path / "child.pid"
    row = f"import os, time; open({str(pid_file)!r}, 'w').write(str(os.getpid())); time.sleep(60)"
    script = (
        f"import subprocess, sys; sys.path.insert(0, {str(BENCH)!r}); import _measure\n"
        f"sys.exit(_measure.run_main(lambda: subprocess.run([sys.executable, '-c', {row!r}]).returncode))\n"
    )
    bench = subprocess.Popen([sys.executable, "-c", script])
    deadline = time.monotonic() + 30
    while not (pid_file.exists() and pid_file.read_text()) and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(pid_file.read_text())
    bench.send_signal(signal.SIGTERM)
    try:
        assert bench.wait(timeout=30) == 128 + signal.SIGTERM
        with pytest.raises(ProcessLookupError):  # killed and reaped, not orphaned
            os.kill(child, 0)
    finally:  # leave no sleeper behind if the assertions fail
        try:
            os.kill(child, signal.SIGKILL)
        except ProcessLookupError:
            pass

"""`ddpmkit serve` (issue #13): one server on two tiny trained runs, started as a subprocess on a free
loopback port, driven through gradio_client (every control, bad values, 8 clients at once) and in
headless Chromium; plus the start-up errors and the plain functions behind the page.

The server runs under a socket guard that refuses and records every connection it attempts to a
non-loopback address: this machine is offline, and a server must not depend on the network.

`python tests/test_serve.py RUN OUT.png` serves RUN and saves the browser test's screenshot to OUT.png
(the README's picture: docs/img/serve.png).
"""

from __future__ import annotations

import importlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import ddpmkit.serve
from ddpmkit.cli import main
from ddpmkit.core import schedules
from ddpmkit.core.samplers import SAMPLERS, sampler_options
from ddpmkit.data import FASHION_CLASSES
from ddpmkit.run import checkpoint
from ddpmkit.run.config import SampleConfig
from ddpmkit.run.sampling import generate
from ddpmkit.serve import requests as page_requests
from ddpmkit.serve.generate import Frame, Result, stream
from ddpmkit.serve.requests import EVERY_CLASS, UNCONDITIONAL
from ddpmkit.serve.runs import latest_eval, load_runs, read_metrics
from ddpmkit.serve.settings import Limits, exposure_warning

sys.path.insert(0, str(Path(__file__).parent))
from conftest import FAST, TINY_MODEL, make_idx_dataset  # noqa: E402


def _needed(module: str):
    """The serve extra and the browser driver are installed by scripts/test.sh; CI never skips them."""
    try:
        return importlib.import_module(module)
    except ImportError:
        if os.environ.get("CI"):
            raise
        pytest.skip(f"{module} is missing: pip install -e '.[serve,test]'", allow_module_level=True)


gradio_client = _needed("gradio_client")
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
CHROMIUM_ARGS = [  # as root, and quiet on an offline machine
    "--no-sandbox",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
    "--disable-quic",
]
T = 50  # TINY_MODEL's timesteps
MAX_IMAGES = 24
# the server's socket guard: refuse and record any connection or name lookup beyond loopback
GUARD = """
import ipaddress, os, socket, sys

LOG = os.environ["DDPMKIT_TEST_NETWORK_LOG"]


def _loopback(host):
    if host is None or host == "localhost":
        return True
    try:
        return ipaddress.ip_address(str(host).split("%")[0]).is_loopback
    except ValueError:
        return False


def _refuse(what):
    with open(LOG, "a") as f:
        f.write(what + "\\n")
    raise OSError(111, "refused by the test's network guard")


_connect, _connect_ex, _getaddrinfo = socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo


def connect(self, address):
    if isinstance(address, tuple) and not _loopback(address[0]):
        _refuse(f"connect {address!r}")
    return _connect(self, address)


def connect_ex(self, address):
    if isinstance(address, tuple) and not _loopback(address[0]):
        _refuse(f"connect_ex {address!r}")
    return _connect_ex(self, address)


def getaddrinfo(host, *args, **kwargs):
    if not _loopback(host if not isinstance(host, bytes) else host.decode()):
        _refuse(f"getaddrinfo {host!r}")
    return _getaddrinfo(host, *args, **kwargs)


socket.socket.connect, socket.socket.connect_ex, socket.getaddrinfo = connect, connect_ex, getaddrinfo
from ddpmkit.cli import main  # noqa: E402

sys.exit(main(sys.argv[1:]))
"""


# ---- fixtures: two tiny runs, one server ---------------------------------------------------------


def _train(out: Path, data: Path, *flags) -> Path:
    argv = ["train", "--dataset", "fashion-mnist", "--data-dir", str(data), "--out", str(out), *TINY_MODEL, *FAST]
    assert main([*argv, *flags]) == 0
    return out


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """A class-conditional run (Fashion-MNIST's class names, label dropout for guidance) with two eval
    reports, and an unconditional one with T = 60; both tiny, on a tiny MNIST-format dataset."""
    root = tmp_path_factory.mktemp("serve")
    data = make_idx_dataset(root / "data")
    cond = _train(root / "cond", data, "--steps", "4", "--checkpoint-every", "4", "--log-every", "1")
    for stamp, fd in (("20260101-000000", 9.5), ("20260102-000000", 7.25)):  # the newer one must show
        report = {"n": 8, "sampling": {"sampler": "ddim", "steps": 4}, "results": {"domain": {"fd_dom": fd}}}
        (cond / f"eval-{stamp}-ddim4.json").write_text(json.dumps(report))
    uncond = _train(
        root / "uncond", data, "--unconditional", "--timesteps", "60", "--steps", "2", "--checkpoint-every", "2"
    )
    return {"cond": cond, "uncond": uncond, "root": root}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, root: Path, run_dirs: list[Path], *flags):
        self.port, self.root = _free_port(), root
        self.url = f"http://127.0.0.1:{self.port}/"
        self.temp, self.network_log = root / "tmp", root / "network.log"
        self.temp.mkdir()
        (root / "guard.py").write_text(GUARD)
        env = {**os.environ, "TMPDIR": str(self.temp), "DDPMKIT_TEST_NETWORK_LOG": str(self.network_log)}
        env["PYTHONUNBUFFERED"] = "1"
        self.out, self.err = open(root / "stdout.log", "w+"), open(root / "stderr.log", "w+")
        argv = ["serve", *map(str, run_dirs), "--port", str(self.port), "--device", "cpu", *flags]
        self.process = subprocess.Popen(
            [sys.executable, str(root / "guard.py"), *argv], stdout=self.out, stderr=self.err, env=env
        )

    def wait_ready(self, timeout: float = 240.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.url in self.stdout():
                return
            if self.process.poll() is not None:
                raise AssertionError(f"the server exited {self.process.returncode}: {self.stderr()}")
            time.sleep(0.2)
        raise AssertionError(f"the server did not start in {timeout} s: {self.stderr()}")

    def stdout(self) -> str:
        return (self.root / "stdout.log").read_text()

    def stderr(self) -> str:
        return (self.root / "stderr.log").read_text()

    def rss_mb(self) -> float:
        status = Path(f"/proc/{self.process.pid}/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmRSS"))) / 1024

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(60)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self.out.close(), self.err.close()
        return self.process.returncode


@pytest.fixture(scope="module")
def server(runs, tmp_path_factory):
    server = Server(tmp_path_factory.mktemp("server"), [runs["cond"], runs["uncond"]], "--max-images", str(MAX_IMAGES))
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def client(server):
    return connect(server)


def connect(server):
    """A client that leaves files on the server (fetch one with `fetch`): half the time per request."""
    return gradio_client.Client(server.url, verbose=False, download_files=False)


def fetch(file: dict) -> bytes:
    with urllib.request.urlopen(file["url"], timeout=60) as response:
        return response.read()


def picture(file: dict) -> Image.Image:
    return Image.open(io.BytesIO(fetch(file)))


def generate_args(
    run="cond", cls=EVERY_CLASS, guidance=1.0, sampler="ddim", steps=4, spacing="uniform", seed=0, n=4, **options
):
    """The /generate endpoint's inputs in order; each sampler option defaults to SampleConfig's."""
    values = [run, cls, guidance, sampler, steps, spacing, seed, n]
    return values + [options.get(name, getattr(SampleConfig(), name)) for name in page_requests.option_names()]


def draw(client, **kwargs) -> tuple[str, np.ndarray, np.ndarray, str]:
    """(info, images, labels, status) of one finished /generate request."""
    out = client.predict(*generate_args(**kwargs), api_name="/generate")
    assert out[6] == "", out[6]
    with np.load(io.BytesIO(fetch(out[5]))) as arrays:
        return out[2], arrays["images"], arrays["labels"], out[6]


def refused(client, api_name="/generate", **kwargs) -> str:
    """The message of a request the page must refuse (it returns no images)."""
    args = generate_args(**kwargs) if api_name == "/generate" else kwargs["args"]
    out = client.predict(*args, api_name=api_name)
    status = out[-1]
    assert status.startswith("**Cannot do that:**"), out
    return status


def nfe(info: str) -> int:
    return int(re.search(r"(\d+) network evaluations", info).group(1))


# ---- Generate --------------------------------------------------------------------------------------


def test_generate_streams_x_t_and_x0_hat_then_the_grid_time_nfe_and_files(client, runs):
    job = client.submit(*generate_args(cls="Dress", steps=10, n=6, seed=3), api_name="/generate")
    job.result(timeout=300)
    outputs = job.outputs()
    frames = [out for out in outputs if "url" in out[0]]
    # the newest step as it comes: a reader that falls behind skips steps, never reorders them
    every_step = [f"step {i + 1} of 10 (t = {t})" for i, t in enumerate(schedules.timesteps(T, 10))]
    shown = [out[6] for out in frames]
    assert set(shown) <= set(every_step) and shown == sorted(shown, key=every_step.index)
    assert shown[-1] == every_step[-1]  # the last step always
    x_t_and_x0_hat = picture(frames[-1][0])
    final = outputs[-1]
    grid = picture(final[1])
    assert x_t_and_x0_hat.width > 1.8 * grid.width  # two grids side by side
    assert re.fullmatch(
        r"6 images in [0-9.]+ s, 10 network evaluations \(ddim, 10 steps, uniform spacing, "
        r"guidance 1, seed 3\)",
        final[2],
    ), final[2]
    assert picture(final[3]).size == grid.size  # the PNG download is the grid
    assert picture(final[4]).n_frames == 10 + 1  # every step, then the sample
    with np.load(io.BytesIO(fetch(final[5]))) as arrays:
        images, labels = arrays["images"], arrays["labels"]
    assert images.shape == (6, 28, 28) and images.dtype == np.uint8
    assert labels.tolist() == [FASHION_CLASSES.index("Dress")] * 6
    # the images are the model's for that seed and class (up to one grey level: other thread counts)
    run = load_runs([runs["cond"]])["cond"]
    request = page_requests.generate_request(run, "Dress", 1.0, "ddim", 10, "uniform", 3, 6)
    expected = generate(run.denoiser, 6, run.shape, labels=request.labels, settings=request.settings, seed=3)
    expected = ((expected.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)[:, 0].numpy()
    assert np.abs(images.astype(int) - expected.astype(int)).max() <= 1


def test_every_sampler_runs_and_counts_its_network_evaluations(client):
    for sampler in SAMPLERS:
        info, images, _, _ = draw(client, sampler=sampler, steps=5, n=2)
        assert f"({sampler}, 5 steps" in info and images.shape == (2, 28, 28)
        assert nfe(info) >= 5  # at least one evaluation a step (two for a second-order step like Heun's)
        if sampler in ("ddpm", "ddim", "dpm++"):
            assert nfe(info) == 5


def test_sampler_options_class_and_guidance_reach_the_sampler(client):
    _, eta_0, _, _ = draw(client, sampler="ddim", steps=6, eta=0.0)
    _, eta_1, _, _ = draw(client, sampler="ddim", steps=6, eta=1.0)
    _, beta, _, _ = draw(client, sampler="ddpm", steps=6, variance="beta")
    _, beta_tilde, _, _ = draw(client, sampler="ddpm", steps=6, variance="beta_tilde")
    assert not np.array_equal(eta_0, eta_1) and not np.array_equal(beta, beta_tilde)
    info, plain, labels, _ = draw(client, cls="Sandal", steps=6)
    _, guided, guided_labels, _ = draw(client, cls="Sandal", steps=6, guidance=3.0)
    _, other_class, _, _ = draw(client, cls="Bag", steps=6)
    assert labels.tolist() == guided_labels.tolist() == [FASHION_CLASSES.index("Sandal")] * 4
    assert not np.array_equal(plain, guided) and not np.array_equal(plain, other_class)
    _, _, every, _ = draw(client, cls=EVERY_CLASS, n=4)
    _, _, none, _ = draw(client, cls=UNCONDITIONAL, n=4)
    assert every.tolist() == [0, 1, 2, 3] and none.tolist() == [-1] * 4


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"steps": 0}, "positive integer, got 0"),
        ({"steps": T + 1}, f"only T = {T} diffusion steps"),
        ({"steps": 2.5}, "whole number"),
        ({"n": MAX_IMAGES + 1}, f"1 to {MAX_IMAGES} on this server"),
        ({"n": 0}, f"1 to {MAX_IMAGES}"),
        ({"cls": "Unicorn"}, "unknown class 'Unicorn'"),
        ({"seed": -1}, "the seed must be 0 to"),
        ({"eta": 2.0}, "eta must be in [0, 1]"),
        ({"spacing": "cubic"}, "spacing"),
        ({"run": "nope"}, "unknown run 'nope'"),
        ({"run": "uncond", "cls": EVERY_CLASS}, "unconditional"),
        ({"cls": UNCONDITIONAL, "guidance": 3.0}, "guidance steers towards a class"),
    ],
)
def test_bad_values_come_back_as_a_message_and_the_server_goes_on(client, server, kwargs, message):
    assert message in refused(client, **kwargs)
    assert server.process.poll() is None
    assert draw(client, steps=2, n=1)[1].shape == (1, 28, 28)


def test_an_unconditional_run_is_served_beside_the_conditional_one(client):
    info, images, labels, _ = draw(client, run="uncond", cls=UNCONDITIONAL, n=3, steps=55)  # its T is 60
    assert images.shape == (3, 28, 28) and labels.tolist() == [-1] * 3 and "guidance" not in info
    title = client.predict("uncond", api_name="/run_info")[0]
    assert title.startswith("**uncond**: 2 steps trained")
    # choosing it in the run menu: no class but none, no guidance, the forward slider up to its T
    updates = client.predict("uncond", api_name="/select_run")
    assert updates[0]["choices"] == [[UNCONDITIONAL, UNCONDITIONAL]] and updates[1]["interactive"] is False
    assert updates[6]["maximum"] == 60 and updates[7] == ""
    conditional = client.predict("cond", api_name="/select_run")  # and back: this client's page shows cond
    assert [choice for choice, _ in conditional[0]["choices"]] == [EVERY_CLASS, *FASHION_CLASSES, UNCONDITIONAL]
    assert conditional[1]["interactive"] is True


def test_each_sampler_shows_its_own_options_and_every_spacing_works(client):
    for sampler in SAMPLERS:
        shown = [update["visible"] for update in client.predict(sampler, api_name="/sampler_options")]
        assert shown == [name in sampler_options(sampler) for name in page_requests.option_names()]
    images = {}
    for spacing in schedules.SPACINGS:
        info, images[spacing], _, _ = draw(client, spacing=spacing)
        assert f"4 steps, {spacing} spacing" in info
    assert len({array.tobytes() for array in images.values()}) == len(schedules.SPACINGS)


def test_a_closed_stream_stops_its_sampler(runs):
    """A browser that goes away mid-request (the page's generator is closed) frees the server."""
    run = load_runs([runs["cond"]])["cond"]
    calls = []
    run.denoiser.register_forward_hook(lambda *_: calls.append(1))
    request = page_requests.generate_request(run, EVERY_CLASS, 1.0, "ddpm", T, "uniform", 0, 64)
    updates = stream(run, request)
    assert isinstance(next(updates), Frame)
    updates.close()
    deadline = time.monotonic() + 60
    while any(t.name.startswith("ddpmkit-sample") for t in threading.enumerate()) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not any(t.name.startswith("ddpmkit-sample") for t in threading.enumerate())
    assert len(calls) < T  # it stopped instead of finishing the request


def test_a_request_streams_every_few_steps_and_always_the_last(runs):
    run = load_runs([runs["cond"]])["cond"]
    request = page_requests.generate_request(run, "Coat", 1.0, "ddim", T, "uniform", 0, 2)
    *frames, result = stream(run, request, Limits(max_frames=20))
    kept = [0, 3, 6, 9, 12, 15, 18, 21, 24, 27, 30, 33, 36, 39, 42, 45, 48, 49]  # every 3rd of 50, the last
    assert isinstance(result, Result) and result.nfe == T
    assert len(result.trajectory.t) == len(kept)  # all of them in the GIF
    assert frames and {frame.i for frame in frames} <= set(kept) and frames[-1].i == T - 1 and frames[-1].t == 1


# ---- Forward process, Compare, Run -----------------------------------------------------------------


def _alpha_bar(text: str) -> float:
    return float(re.search(r"\\prod_\{s=1\}\^\{t\} \(1 - \\beta_s\) = ([0-9.e+-]+)\$\$", text).group(1))


def test_forward_process_shows_x0_and_x_t_with_alpha_bar_snr_and_the_equation(client):
    cosine = schedules.cosine(T)
    image = "0: T-shirt/top"
    at_0, at_25, at_25_again, at_T = (client.predict("cond", image, t, api_name="/forward") for t in (0, 25, 25, T))
    for t, (_, text, status) in zip((0, 25, T), (at_0, at_25, at_T)):
        assert status == "" and f"**t = {t}** of T = {T} (cosine schedule)" in text
        assert _alpha_bar(text) == pytest.approx(float(cosine.alpha_bar[t]), rel=1e-3)
        assert "\\mathrm{SNR}(t)" in text and "x_t = \\sqrt{\\bar\\alpha_t}" in text
    assert "= \\infty" in at_0[1] and "1.000\\, x_0 + 0.000\\, \\epsilon" in at_0[1]
    one, two = picture(at_0[0]), picture(at_25[0])
    assert two.width > 1.8 * one.width  # x0 alone at t = 0; x0 and x_t beyond
    assert np.array_equal(np.asarray(two), np.asarray(picture(at_25_again[0])))  # one eps per image
    # choosing uncond (T = 60) moves the slider's end to 60; the page still refuses t > T for cond
    client.predict("uncond", api_name="/select_run")
    assert client.predict("uncond", image, 55, api_name="/forward")[2] == ""
    assert "t must be 0 to T = 50, got 55" in refused(client, "/forward", args=("cond", image, 55))
    client.predict("cond", api_name="/select_run")
    with pytest.raises(gradio_client.exceptions.AppError, match="greater than maximum value 50"):
        client.predict("cond", image, 55, api_name="/forward")  # Gradio's own check of the slider
    assert "unknown image" in refused(client, "/forward", args=("cond", "../../etc/passwd", 3))


def _rows(*settings):
    rows = []
    for k in range(page_requests.COMPARE_MAX):
        use = k < len(settings)
        sampler, steps = settings[k] if use else ("ddim", 2)
        rows += [use, sampler, steps, "uniform"]
    return rows


def test_compare_draws_the_same_seed_and_class_through_each_setting(client):
    gallery, table, status = client.predict(
        "cond", "Trouser", 1.0, 7, 3, *_rows(("ddim", 6), ("dpm++", 6), ("ddpm", 4)), api_name="/compare"
    )
    assert status == "" and len(gallery) == 3
    for item, (sampler, steps) in zip(gallery, (("ddim", 6), ("dpm++", 6), ("ddpm", 4))):
        assert f"({sampler}, {steps} steps, uniform spacing, guidance 1, seed 7)" in item["caption"]
        assert f"| {sampler} | {steps} | uniform |" in table
    assert [nfe(item["caption"]) for item in gallery] == [6, 6, 4]
    pictures = [np.asarray(picture(item["image"])) for item in gallery]
    assert not np.array_equal(pictures[0], pictures[1])
    alone = client.predict(*generate_args(cls="Trouser", steps=6, seed=7, n=3), api_name="/generate")
    assert np.array_equal(pictures[0], np.asarray(picture(alone[3])))  # the same request as Generate's
    args = ("cond", "Trouser", 1.0, 7, 3, *_rows(("ddim", 6)))
    assert "choose 2 to 4 settings to compare, got 1" in refused(client, "/compare", args=args)


def test_run_tab_shows_config_steps_loss_curve_and_the_latest_eval(client, runs):
    title, loss, evaluation, config = client.predict("cond", api_name="/run_info")
    assert title == "**cond**: 4 steps trained; fashion-mnist, 28x28, T = 50"
    assert picture(loss).width > 200
    assert "eval-20260102-000000-ddim4.json" in evaluation and "7.2500" in evaluation and "9.5" not in evaluation
    assert json.loads(config) == json.loads((runs["cond"] / "config.json").read_text())


def test_the_run_tab_survives_broken_reports_and_metrics(tmp_path):
    """An eval report or metrics line that is not what `ddpmkit eval` or `train` writes is skipped or
    named, never a traceback at start-up (a run directory may come from someone else)."""
    (tmp_path / "eval-20260101-000000-ddim4.json").write_text('{"results": {"domain": {"fd_dom": 3.5}}}')
    assert "3.5000" in latest_eval(tmp_path)[1]
    for text in ("[" * 100_000, '{"results": [1, 2]}', "not json", '{"results": {"domain": "x"}}'):
        (tmp_path / "eval-20270101-000000-ddim4.json").write_text(text)
        name, table = latest_eval(tmp_path)
        assert name == "eval-20270101-000000-ddim4.json" and table.startswith("(could not read"), table
    lines = ['{"step": 1, "loss": 0.5}', "[" * 100_000, '{"step": 2, "loss": NaN}', '{"step": "3", "loss": 1}']
    (tmp_path / "metrics.jsonl").write_text("\n".join([*lines, '{"step": 4, "loss": 0.25}']))
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.jsonl")] == [1, 4]


# ---- serving rules ---------------------------------------------------------------------------------


def _get(url: str) -> int:
    try:
        with urllib.request.urlopen(url, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as e:
        return e.code


def test_the_server_reads_no_files_outside_its_own_and_accepts_none(server, runs):
    for path in (runs["cond"] / "config.json", Path("/etc/passwd")):
        assert _get(f"{server.url}gradio_api/file={path}") in (403, 404)
    upload = urllib.request.Request(
        f"{server.url}gradio_api/upload",
        data=b'--b\r\nContent-Disposition: form-data; name="files"; filename="a.txt"\r\n\r\nhello\r\n--b--\r\n',
        headers={"Content-Type": "multipart/form-data; boundary=b"},
    )
    with pytest.raises(urllib.error.HTTPError) as refused_upload:
        urllib.request.urlopen(upload, timeout=30)
    assert refused_upload.value.code == 413


def test_no_network_access_and_no_analytics(server):
    with urllib.request.urlopen(f"{server.url}config", timeout=30) as response:
        assert json.load(response)["analytics_enabled"] is False
    assert not server.network_log.exists(), server.network_log.read_text()
    assert "warning" not in server.stderr()  # loopback: no exposure warning


def test_exposure_warning_names_any_host_beyond_loopback():
    for host in ("127.0.0.1", "127.0.0.2", "::1", "localhost"):
        assert exposure_warning(host) is None
    for host in ("0.0.0.0", "192.168.1.5", "::", "my-machine.example"):
        assert host in exposure_warning(host) and "no login" in exposure_warning(host)


def test_eight_clients_three_requests_each_get_their_own_images(server, client):
    """All 24 complete; each is bit-identical to the same request alone; the memory stays bounded."""
    asked = {
        (k, j): {"cls": FASHION_CLASSES[k], "seed": 100 * k + j, "n": 2, "steps": 3} for k in range(8) for j in range(3)
    }
    draw(client, **asked[0, 0])  # warm
    rss_before, got, failures = server.rss_mb(), {}, []

    def one_client(k):
        try:
            own = connect(server)
            for j in range(3):
                got[k, j] = draw(own, **asked[k, j])
        except Exception as e:  # reported below
            failures.append(repr(e))

    threads = [threading.Thread(target=one_client, args=(k,)) for k in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=600)
    assert not failures and len(got) == 24
    rss_after = server.rss_mb()
    for key, request in asked.items():
        info, images, labels, _ = got[key]
        assert f"seed {request['seed']})" in info and labels.tolist() == [key[0]] * 2
        _, alone, _, _ = draw(client, **request)
        assert np.array_equal(images, alone), key
    # bounded: some growth as caches warm (12 MB here), none that goes on with 24 more requests
    assert rss_after - rss_before < 100 and server.rss_mb() - rss_after < 50, (rss_before, rss_after, server.rss_mb())


# ---- in a real browser -----------------------------------------------------------------------------


def _browser():
    playwright = _needed("playwright.sync_api")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI"):
            raise AssertionError("chromium is missing: apt-get install -y chromium")
        pytest.skip("chromium is missing: apt-get install -y chromium")
    return playwright


def _generate_in_page(page, class_name: str, steps: int, previous: str) -> tuple[str, bytes]:
    """Choose a class and steps, press Generate, wait for the final grid; (its address, its PNG)."""
    box = page.locator("#class input")
    box.click()
    box.fill(class_name)
    box.press("Enter")
    page.locator("#steps input").fill(str(steps))
    page.locator("#generate").click()
    page.wait_for_function(
        """previous => {
            const grid = document.querySelector('#grid img');
            const info = document.querySelector('#generate-info');
            return grid && grid.src && grid.src !== previous && info.innerText.includes('network evaluations');
        }""",
        arg=previous,
        timeout=240_000,
    )
    src = page.locator("#grid img").get_attribute("src")
    return src, page.request.get(src).body()


def browse(url: str, screenshot: Path, classes=("Sneaker", "Trouser"), steps: int = 8) -> list[np.ndarray]:
    """Load the page in headless Chromium, generate one grid per class, screenshot the page."""
    playwright = _browser()
    with playwright.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1280, "height": 1000})
            page.goto(url)
            page.locator("#generate").wait_for(timeout=120_000)
            grids, previous = [], ""
            for name in classes:
                previous, png = _generate_in_page(page, name, steps, previous)
                grids.append(np.asarray(Image.open(io.BytesIO(png)).convert("L")))
            page.screenshot(path=str(screenshot), full_page=True)
        finally:
            browser.close()
    return grids


def test_in_a_browser_a_class_and_steps_give_a_grid_and_two_classes_differ(server, tmp_path):
    screenshot = tmp_path / "serve.png"
    sneaker, trouser = browse(server.url, screenshot)
    for grid in (sneaker, trouser):
        assert grid.std() > 20  # not blank: the samples, not an empty canvas
    # the samples (right half: the captions naming the class are on the left) differ between classes
    half = sneaker.shape[1] // 2
    assert sneaker.shape == trouser.shape and not np.array_equal(sneaker[:, half:], trouser[:, half:])
    assert Image.open(screenshot).size[0] == 1280


# ---- start-up ----------------------------------------------------------------------------------------


def test_without_gradio_serve_says_how_to_install_it(runs, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "gradio", None)  # importing it now fails
    monkeypatch.delitem(sys.modules, "ddpmkit.serve.app", raising=False)
    monkeypatch.delattr(ddpmkit.serve, "app", raising=False)
    monkeypatch.setenv("GRADIO_TEMP_DIR", "unset")  # serve sets these; monkeypatch restores them
    monkeypatch.setenv("GRADIO_ANALYTICS_ENABLED", "unset")
    assert main(["serve", str(runs["cond"]), "--device", "cpu"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "pip install 'ddpmkit[serve]'" in err


@pytest.mark.parametrize(
    "argv,message",
    [
        (["not-a-run"], "cannot serve not-a-run: not-a-run is not a ddpmkit run directory"),
        (["{cond}", "{cond}"], "is given twice"),
        (["{cond}", "--port", "0"], "--port must be 1 to 65535"),
        (["{cond}", "--max-images", "0"], "--max-images must be >= 1"),
    ],
)
def test_a_run_that_cannot_load_or_a_bad_flag_is_one_line_at_start_up(
    runs, tmp_path, monkeypatch, capsys, argv, message
):
    monkeypatch.chdir(tmp_path)
    assert main(["serve", *(a.format(cond=runs["cond"]) for a in argv)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("ddpmkit serve: error: ") and message in err, err


def test_sigterm_stops_the_server_and_removes_its_files(server):
    """Last in this file: it stops the module's server."""
    assert server.stop() == 0
    assert list(server.temp.iterdir()) == []


if __name__ == "__main__":  # the README's screenshot of RUN: python tests/test_serve.py RUN OUT.png
    run_dir, out = Path(sys.argv[1]), Path(sys.argv[2])
    with tempfile.TemporaryDirectory() as scratch:
        served = Server(Path(scratch), [run_dir])
        try:
            served.wait_ready()
            names = checkpoint.load_config(run_dir).class_names
            browse(served.url, out, classes=(names[7], names[1]), steps=15)
        finally:
            served.stop()
    print(f"wrote {out}")

"""Datasets: where files are looked for, IDX / CIFAR-10 / folder loading, safety, pixel conversions."""

import functools
import gzip
import hashlib
import http.server
import io
import pickle
import struct
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from ddpmkit.data import (
    DATASETS,
    FolderDataset,
    ImageData,
    datasets,
    folder,
    load_dataset,
    open_folder_dataset,
    resize_center_crop,
    safe_unpickle,
    to_model_range,
    to_uint8,
)
from ddpmkit.data.idx import write_idx
from ddpmkit.errors import DdpmkitError
from ddpmkit.notes import collect_notes

REAL_FASHION = Path("/usr/share/datasets/fashion-mnist")


@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test sees this machine's datasets, cache or network unless it asks for them."""
    monkeypatch.setattr(datasets, "DEBIAN_DATA_ROOT", tmp_path / "debian")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.delenv("DDPMKIT_DATA_DIR", raising=False)
    for name in ("mnist", "fashion-mnist", "cifar10"):
        monkeypatch.setitem(datasets.MIRRORS, name, ["http://127.0.0.1:9/"])  # the discard port: nothing listens


@pytest.fixture
def http_dir(tmp_path):
    """A local HTTP server on 127.0.0.1 serving tmp_path/'www'; yields its base URL."""
    root = tmp_path / "www"
    root.mkdir()
    handler = functools.partial(QuietHandler, directory=str(root))
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True).start()
    yield root, f"http://127.0.0.1:{httpd.server_address[1]}/"
    httpd.shutdown()
    httpd.server_close()


class QuietHandler(http.server.SimpleHTTPRequestHandler):
    def log_message(self, *args):
        pass


def make_idx_split(directory: Path, n: int, split="train", compress=True, height=28):
    """Write an images and a labels IDX file with ``n`` examples; returns the images."""
    prefix = "train" if split == "train" else "t10k"
    images = np.random.default_rng(n).integers(0, 256, (n, height, 28), dtype=np.uint8)
    suffix = ".gz" if compress else ""
    write_idx(directory / f"{prefix}-images-idx3-ubyte{suffix}", images, gzip=compress)
    write_idx(directory / f"{prefix}-labels-idx1-ubyte{suffix}", np.arange(n, dtype=np.uint8) % 10, gzip=compress)
    return images


# ---------------------------------------------------------------- pixel conversions


def test_pixel_conversions_round_trip_exactly():
    pixels = torch.arange(256, dtype=torch.uint8)
    x = to_model_range(pixels)
    assert x.dtype == torch.float32 and x[0] == -1 and x[-1] == 1
    assert torch.equal(to_uint8(x), pixels)
    assert torch.equal(to_uint8(torch.tensor([-3.0, 5.0, 0.0])), torch.tensor([0, 255, 128], dtype=torch.uint8))


def test_resize_center_crop_keeps_the_middle():
    image = torch.zeros(1, 3, 20, 40, dtype=torch.uint8)
    image[:, 2, :, 4:36] = 200  # a blue middle band, black at the far left and right
    out = resize_center_crop(image, 10)
    assert out.shape == (1, 3, 10, 10) and out.dtype == torch.uint8
    assert torch.all(out[:, 2] == 200) and torch.all(out[:, :2] == 0)
    assert resize_center_crop(image[..., :20], 20) is not None and resize_center_crop(out, 10) is out


# ---------------------------------------------------------------- MNIST-style IDX datasets


@pytest.mark.parametrize("compress", [True, False])
def test_idx_dataset_from_data_dir(tmp_path, compress):
    images = make_idx_split(tmp_path / "d", 5, compress=compress)
    make_idx_split(tmp_path / "d", 3, split="test", compress=compress)
    train = load_dataset("mnist", data_dir=tmp_path / "d")
    assert train.images.shape == (5, 1, 28, 28) and train.images.dtype == torch.uint8
    assert torch.equal(train.images[:, 0], torch.from_numpy(images))
    assert train.labels.tolist() == [0, 1, 2, 3, 4] and train.info == DATASETS["mnist"]
    assert len(load_dataset("mnist", "test", data_dir=tmp_path / "d")) == 3


def test_data_dir_may_hold_a_subfolder_named_after_the_dataset(tmp_path):
    make_idx_split(tmp_path / "d" / "fashion-mnist", 4)
    fashion = load_dataset("fashion-mnist", data_dir=tmp_path / "d")
    assert len(fashion) == 4 and fashion.info.class_names[9] == "Ankle boot"


def test_search_order_data_dir_then_env_then_debian_then_cache(tmp_path, monkeypatch):
    make_idx_split(tmp_path / "explicit", 2)
    make_idx_split(tmp_path / "env" / "mnist", 3)
    make_idx_split(tmp_path / "debian" / "mnist", 4)
    make_idx_split(tmp_path / "cache" / "ddpmkit" / "mnist", 5)
    monkeypatch.setenv("DDPMKIT_DATA_DIR", str(tmp_path / "env"))
    assert len(load_dataset("mnist", data_dir=tmp_path / "explicit")) == 2
    assert len(load_dataset("mnist")) == 3
    monkeypatch.delenv("DDPMKIT_DATA_DIR")
    assert len(load_dataset("mnist")) == 4
    monkeypatch.setattr(datasets, "DEBIAN_DATA_ROOT", tmp_path / "nowhere")
    assert len(load_dataset("mnist", download=False)) == 5


def test_missing_files_in_explicit_data_dir_say_where_we_looked(tmp_path):
    make_idx_split(tmp_path / "cache" / "ddpmkit" / "mnist", 5)  # not used: data_dir is explicit
    with pytest.raises(DdpmkitError, match="not found in data_dir") as caught:
        load_dataset("mnist", data_dir=tmp_path / "empty")
    assert str(tmp_path / "empty" / "mnist") in str(caught.value)


def test_nothing_found_without_download_lists_the_places(tmp_path):
    with pytest.raises(DdpmkitError, match="not found") as caught:
        load_dataset("fashion-mnist", download=False)
    assert str(tmp_path / "debian" / "fashion-mnist") in str(caught.value)


def test_download_lands_in_the_cache(http_dir, tmp_path, monkeypatch):
    www, url = http_dir
    images = make_idx_split(www, 6)
    monkeypatch.setitem(datasets.MIRRORS, "mnist", ["http://127.0.0.1:9/", url])  # first mirror refuses
    digests = {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in www.iterdir()}
    monkeypatch.setitem(datasets.SHA256, "mnist", digests)
    loaded = load_dataset("mnist", progress=False)
    assert torch.equal(loaded.images[:, 0], torch.from_numpy(images))
    cached = tmp_path / "cache" / "ddpmkit" / "mnist"
    assert sorted(p.name for p in cached.iterdir()) == sorted(digests)


def test_download_with_a_wrong_checksum_fails_cleanly(http_dir, tmp_path, monkeypatch):
    www, url = http_dir
    make_idx_split(www, 6)
    monkeypatch.setitem(datasets.MIRRORS, "mnist", [url])
    monkeypatch.setitem(datasets.SHA256, "mnist", {p.name: "0" * 64 for p in www.iterdir()})
    with pytest.raises(DdpmkitError, match="checksum mismatch"):
        load_dataset("mnist", progress=False)
    assert not list((tmp_path / "cache" / "ddpmkit" / "mnist").iterdir())


@pytest.mark.parametrize(
    "damage, message",
    [
        (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.zeros(4, np.uint8), gzip=True), "does not match"),
        (lambda d: write_idx(d / "train-labels-idx1-ubyte.gz", np.full(5, 10, np.uint8), gzip=True), "below 10"),
        (lambda d: make_idx_split(d, 5, height=27), "not uint8 28x28"),
        (
            lambda d: (d / "train-images-idx3-ubyte.gz").write_bytes(
                gzip.compress(gzip.decompress((d / "train-images-idx3-ubyte.gz").read_bytes())[:-1])
            ),
            "truncated",
        ),
    ],
)
def test_corrupt_local_files_name_the_file(tmp_path, damage, message):
    make_idx_split(tmp_path, 5)
    damage(tmp_path)
    with pytest.raises(DdpmkitError, match=message) as caught:
        load_dataset("mnist", data_dir=tmp_path)
    assert str(tmp_path / "train-") in str(caught.value)


def test_image_size_resizes_named_datasets(tmp_path):
    make_idx_split(tmp_path, 3)
    resized = load_dataset("mnist", data_dir=tmp_path, image_size=32)
    assert resized.images.shape == (3, 1, 32, 32) and resized.info.image_size == 32


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "imagenet"}, "mnist, fashion-mnist, cifar10, folder"),
        ({"name": "mnist", "split": "valid"}, "Unknown split"),
        ({"name": "mnist", "channels": 3}, "channel"),
        ({"name": "mnist", "image_size": 0}, "positive integer"),
    ],
)
def test_bad_arguments_are_clear_errors(tmp_path, kwargs, message):
    make_idx_split(tmp_path, 3)
    with pytest.raises(DdpmkitError, match=message):
        load_dataset(data_dir=tmp_path, **kwargs)


@pytest.mark.skipif(not REAL_FASHION.is_dir(), reason=f"{REAL_FASHION} does not exist (Debian dataset-fashion-mnist)")
def test_real_debian_fashion_mnist(monkeypatch):
    monkeypatch.setattr(datasets, "DEBIAN_DATA_ROOT", REAL_FASHION.parent)
    fashion = load_dataset("fashion-mnist", download=False)
    assert fashion.images.shape == (60000, 1, 28, 28) and fashion.info.num_classes == 10
    assert torch.bincount(fashion.labels).tolist() == [6000] * 10
    assert len(load_dataset("fashion-mnist", "test", download=False)) == 10000


# ---------------------------------------------------------------- CIFAR-10


class Py2Pickler(pickle._Pickler):
    """Pickles the way the real CIFAR-10 files were made: Python 2 strings and numpy.core names."""

    dispatch = dict(pickle._Pickler.dispatch)

    def save_py2_string(self, obj):
        raw = obj.encode("latin1") if isinstance(obj, str) else obj
        if len(raw) < 256:
            self.write(pickle.SHORT_BINSTRING + bytes([len(raw)]))
        else:
            self.write(pickle.BINSTRING + struct.pack("<i", len(raw)))
        self.write(raw)
        self.memoize(obj)

    def save_global(self, obj, name=None):
        module = obj.__module__.replace("numpy._core", "numpy.core")
        self.write(pickle.GLOBAL + f"{module}\n{name or obj.__qualname__}\n".encode())
        self.memoize(obj)

    dispatch[str] = dispatch[bytes] = save_py2_string
    dispatch[type] = save_global


def py2_pickle(obj) -> bytes:
    buffer = io.BytesIO()
    Py2Pickler(buffer, protocol=2).dump(obj)
    return buffer.getvalue()


def cifar_members(per_batch=2, meta=True, labels=None):
    """name -> pickled bytes, shaped like cifar-10-batches-py but tiny."""
    rng = np.random.default_rng(0)
    members = {}
    for name in [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]:
        members[name] = py2_pickle(
            {
                "batch_label": "batch",
                "labels": labels or [i % 10 for i in range(per_batch)],
                "data": rng.integers(0, 256, (per_batch, 3072), dtype=np.uint8),
                "filenames": ["x.png"] * per_batch,
            }
        )
    if meta:
        members["batches.meta"] = py2_pickle(
            {"label_names": [f"class{i}" for i in range(10)], "num_cases_per_batch": per_batch, "num_vis": 3072}
        )
    return members


def write_cifar_tarball(path: Path, members: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as archive:
        for name, blob in {**members, "readme.html": b"<html></html>"}.items():
            info = tarfile.TarInfo(f"cifar-10-batches-py/{name}")
            info.size = len(blob)
            archive.addfile(info, io.BytesIO(blob))
    return path


def test_cifar10_from_a_tarball_in_data_dir(tmp_path):
    members = cifar_members()
    write_cifar_tarball(tmp_path / "d" / "cifar-10-python.tar.gz", members)
    train = load_dataset("cifar10", data_dir=tmp_path / "d")
    assert train.images.shape == (10, 3, 32, 32) and train.labels.tolist() == [0, 1] * 5
    first = pickle.loads(members["data_batch_1"], encoding="bytes")[b"data"][0]
    assert torch.equal(train.images[0], torch.from_numpy(first.reshape(3, 32, 32)))  # R, G, B planes
    assert train.info.class_names[3] == "class3" and train.info.channels == 3
    assert len(load_dataset("cifar10", "test", data_dir=tmp_path / "d")) == 2


def test_cifar10_from_an_extracted_directory_without_meta(tmp_path):
    batches = tmp_path / "d" / "cifar10" / "cifar-10-batches-py"
    batches.mkdir(parents=True)
    for name, blob in cifar_members(meta=False).items():
        (batches / name).write_bytes(blob)
    test = load_dataset("cifar10", "test", data_dir=tmp_path / "d")
    assert len(test) == 2 and test.info.class_names == DATASETS["cifar10"].class_names


def test_cifar10_download_lands_in_the_cache(http_dir, tmp_path, monkeypatch):
    www, url = http_dir
    tarball = write_cifar_tarball(www / "cifar-10-python.tar.gz", cifar_members())
    monkeypatch.setitem(datasets.MIRRORS, "cifar10", [url])
    monkeypatch.setitem(datasets.SHA256, "cifar10", {tarball.name: hashlib.sha256(tarball.read_bytes()).hexdigest()})
    assert len(load_dataset("cifar10", progress=False)) == 10
    assert (tmp_path / "cache" / "ddpmkit" / "cifar10" / tarball.name).read_bytes() == tarball.read_bytes()


class CreatesFile:
    def __init__(self, path):
        self.path = str(path)

    def __reduce__(self):
        return open, (self.path, "w")


def test_malicious_pickle_is_refused_and_runs_nothing(tmp_path):
    armed = pickle.dumps({"data": CreatesFile(tmp_path / "proof")}, protocol=2)
    pickle.loads(armed)  # the plain unpickler really does run it...
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "marker"
    members = cifar_members()
    members["data_batch_3"] = pickle.dumps({"data": CreatesFile(marker), "labels": []}, protocol=2)
    write_cifar_tarball(tmp_path / "d" / "cifar-10-python.tar.gz", members)
    with pytest.raises(DdpmkitError, match="Refusing to unpickle"):
        load_dataset("cifar10", data_dir=tmp_path / "d")
    assert not marker.exists()  # ...ours does not


@pytest.mark.parametrize("payload", [b"cos\nsystem\n(S'true'\ntR.", pickle.dumps(print, protocol=4)])
def test_safe_unpickle_refuses_any_other_global(payload):
    with pytest.raises(DdpmkitError, match="Refusing"):
        safe_unpickle(payload, "x")


def test_corrupt_cifar_files_are_clear_errors(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "cifar-10-python.tar.gz").write_bytes(b"\x1f\x8b not a tarball")
    with pytest.raises(DdpmkitError, match="not a readable tar.gz"):
        load_dataset("cifar10", data_dir=tmp_path / "a")
    write_cifar_tarball(tmp_path / "b" / "cifar-10-python.tar.gz", cifar_members(labels=[3, 12]))
    with pytest.raises(DdpmkitError, match="label in 0..9"):
        load_dataset("cifar10", data_dir=tmp_path / "b")
    members = cifar_members()
    members["test_batch"] = b"\x80\x02garbage"
    write_cifar_tarball(tmp_path / "c" / "cifar-10-python.tar.gz", members)
    with pytest.raises(DdpmkitError, match="not a readable pickle"):
        load_dataset("cifar10", "test", data_dir=tmp_path / "c")


# ---------------------------------------------------------------- image folders


def save_image(path: Path, mode="RGB", size=(12, 12), color=(200, 30, 30), fmt=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, color).save(path, format=fmt)
    return path


def test_labelled_subfolders(tmp_path):
    save_image(tmp_path / "dog" / "a.png")
    save_image(tmp_path / "cat" / "b.jpg")
    save_image(tmp_path / "cat" / "nested" / "c.bmp")
    folder = load_dataset("folder", data_dir=tmp_path, image_size=8)
    assert folder.info.class_names == ("cat", "dog") and folder.info.num_classes == 2
    assert folder.labels.tolist() == [0, 0, 1] and folder.images.shape == (3, 3, 8, 8)
    assert abs(int(folder.images[2, 0, 4, 4]) - 200) <= 1 and int(folder.images[2, 2, 4, 4]) == 30


def test_unlabelled_flat_folder_keeps_a_common_square_size(tmp_path):
    for i in range(3):
        save_image(tmp_path / f"{i}.png", size=(10, 10))
    folder = load_dataset("folder", data_dir=tmp_path)
    assert folder.labels.tolist() == [-1, -1, -1] and folder.info.num_classes == 0
    assert folder.images.shape == (3, 3, 10, 10)


def test_grayscale_and_rgb_channels(tmp_path):
    save_image(tmp_path / "a.png", "L", color=90)
    save_image(tmp_path / "b.gif", "L", color=90)
    gray = load_dataset("folder", data_dir=tmp_path, image_size=6)
    assert gray.images.shape == (2, 1, 6, 6) and torch.all(gray.images == 90)
    save_image(tmp_path / "c.webp", "RGB", color=(10, 20, 30))
    assert load_dataset("folder", data_dir=tmp_path, image_size=6).images.shape == (3, 3, 6, 6)
    assert load_dataset("folder", data_dir=tmp_path, image_size=6, channels=1).images.shape == (3, 1, 6, 6)


def test_resize_shorter_side_then_center_crop(tmp_path):
    image = Image.new("RGB", (40, 20), (0, 0, 255))
    image.paste((255, 0, 0), (0, 0, 5, 20))  # a red strip at the left edge falls outside the crop
    image.save(tmp_path / "wide.png")
    folder = load_dataset("folder", data_dir=tmp_path, image_size=10)
    assert folder.images.shape == (1, 3, 10, 10)
    assert torch.all(folder.images[0, 0] == 0) and torch.all(folder.images[0, 2] == 255)


def test_transparency_becomes_white_and_16_bit_gray_scales(tmp_path):
    save_image(tmp_path / "a.png", "RGBA", color=(255, 0, 0, 0))
    Image.fromarray(np.full((4, 4), 65535, np.uint16)).save(tmp_path / "b.png")
    folder = load_dataset("folder", data_dir=tmp_path, image_size=4)
    assert torch.all(folder.images == 255)


def test_the_command_line_says_each_note_once_though_a_folder_is_read_twice(tmp_path, capsys):
    from ddpmkit.cli import note_printer
    from ddpmkit.notes import notes_to

    for name in ("a", "b"):
        for i in range(5):  # a class of 5 holds one image out
            save_image(tmp_path / name / f"{i}.png")
    (tmp_path / "README.md").write_text("about the images")
    with notes_to(note_printer("eval")):
        for split in ("train", "test"):  # as ddpmkit eval reads a folder
            load_dataset("folder", split, data_dir=tmp_path, image_size=8)
    lines = capsys.readouterr().err.splitlines()
    note = f"ddpmkit eval: note: Ignored 1 file(s) without an image extension under {tmp_path}: README.md."
    assert lines == [note]  # once, though both splits' scans skipped it


def test_the_library_says_each_note_once_per_process_when_no_one_collects_them(tmp_path, capsys, monkeypatch):
    from ddpmkit import notes

    monkeypatch.setattr(notes, "_said", set())
    save_image(tmp_path / "a" / "0.png")
    (tmp_path / "README.md").write_text("about the images")
    for _ in range(3):  # as a bench script scoring several rows reloads the folder
        load_dataset("folder", data_dir=tmp_path, image_size=8)
    lines = capsys.readouterr().err.splitlines()
    assert lines == [f"ddpmkit: note: Ignored 1 file(s) without an image extension under {tmp_path}: README.md."]


def test_corrupt_and_non_image_files_are_skipped_and_reported(tmp_path):
    save_image(tmp_path / "good.png")
    (tmp_path / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n broken")
    (tmp_path / "notes.txt").write_text("not an image")
    (tmp_path / ".hidden.png").write_bytes(b"ignored silently")
    with collect_notes() as notes:
        folder = load_dataset("folder", data_dir=tmp_path, image_size=8)
    messages = " ".join(notes)
    assert len(folder) == 1 and len(notes) == 2
    assert "Skipped 1 unreadable image" in messages and "broken.png" in messages
    assert "Ignored 1 file" in messages and "notes.txt" in messages and ".hidden" not in messages
    with pytest.raises(DdpmkitError, match="strict mode.*broken.png"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, strict=True)


def test_truncated_image_with_a_good_header_is_skipped(tmp_path):
    save_image(tmp_path / "good.png")
    whole = save_image(tmp_path / "cut.jpg", size=(64, 64), fmt="JPEG").read_bytes()
    (tmp_path / "cut.jpg").write_bytes(whole[: len(whole) // 2])
    with collect_notes() as notes:
        assert len(load_dataset("folder", data_dir=tmp_path, image_size=8)) == 1
    assert len(notes) == 1 and "cut.jpg" in notes[0]
    with pytest.raises(DdpmkitError, match="cut.jpg"):
        load_dataset("folder", data_dir=tmp_path, image_size=8, strict=True)


@pytest.mark.parametrize(
    "setup, kwargs, message",
    [
        (lambda d: save_image(d / "a.png"), {"split": "test"}, "holds out no images"),
        (lambda d: (save_image(d / "a.png"), save_image(d / "c" / "b.png")), {}, "mixes images"),
        (lambda d: (save_image(d / "a.png", size=(4, 4)), save_image(d / "b.png", size=(6, 6))), {}, "image_size"),
        (lambda d: (d / "x.txt").write_text("hi"), {}, "No readable images"),
        (lambda d: save_image(d / "a.png"), {"channels": 4}, "channels"),
        (lambda d: None, {"data_dir": None}, "needs data_dir"),
    ],
)
def test_folder_errors(tmp_path, setup, kwargs, message):
    setup(tmp_path)
    with pytest.raises(DdpmkitError, match=message), collect_notes():
        load_dataset("folder", **{"data_dir": tmp_path, **kwargs})


def test_too_big_for_memory_points_to_streaming(tmp_path, monkeypatch):
    save_image(tmp_path / "a.png")
    monkeypatch.setattr(folder, "IN_MEMORY_MAX_BYTES", 100)
    with pytest.raises(DdpmkitError, match="open_folder_dataset"):
        load_dataset("folder", data_dir=tmp_path, image_size=8)


def test_streaming_dataset_with_a_dataloader(tmp_path):
    save_image(tmp_path / "a" / "1.png", color=(0, 0, 0))
    save_image(tmp_path / "b" / "2.png", color=(255, 255, 255))
    dataset = open_folder_dataset(tmp_path, image_size=4)
    assert isinstance(dataset, FolderDataset) and len(dataset) == 2
    images, labels = next(iter(torch.utils.data.DataLoader(dataset, batch_size=2)))
    assert images.shape == (2, 3, 4, 4) and images.dtype == torch.uint8 and labels.tolist() == [0, 1]
    (tmp_path / "a" / "1.png").write_bytes(b"gone bad after the scan")
    with collect_notes() as notes:
        image, label = dataset[0]  # the next good image stands in; the epoch goes on
    assert label == 1 and torch.all(image == 255) and "1.png" in notes[0]
    dataset.strict = True
    with pytest.raises(DdpmkitError, match="1.png"):
        dataset[0]


VALID_PNG = io.BytesIO()
Image.new("RGB", (5, 5), (1, 2, 3)).save(VALID_PNG, format="PNG")
VALID_PNG = VALID_PNG.getvalue()

fuzzed_png = st.one_of(
    st.binary(max_size=200),
    st.binary(max_size=200).map(lambda tail: VALID_PNG[:16] + tail),
    st.tuples(st.integers(0, len(VALID_PNG) - 1), st.integers(0, 255), st.integers(1, len(VALID_PNG))).map(
        lambda t: (VALID_PNG[: t[0]] + bytes([t[1]]) + VALID_PNG[t[0] + 1 :])[: t[2]]
    ),
)


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(blob=fuzzed_png, strict=st.booleans())
def test_random_bytes_as_png_never_crash_the_folder_loader(tmp_path_factory, blob, strict):
    root = tmp_path_factory.mktemp("fuzz")
    (root / "good.png").write_bytes(VALID_PNG)
    (root / "fuzz.png").write_bytes(blob)
    try:
        with collect_notes():
            folder = load_dataset("folder", data_dir=root, image_size=4, strict=strict)
    except DdpmkitError:
        assert strict
        return
    assert isinstance(folder, ImageData) and len(folder) in (1, 2) and folder.images.shape[1:] == (3, 4, 4)

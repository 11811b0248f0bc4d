"""What real image folders contain (issue #12, point 7): each case is handled correctly or gets one
plain note or one-line error, through the library and through `ddpmkit train`."""

import json
import os
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from ddpmkit.cli import main
from ddpmkit.data import load_dataset, open_folder_dataset
from ddpmkit.errors import DdpmkitError
from ddpmkit.notes import collect_notes
from ddpmkit.run import checkpoint

TINY = [
    *("--base-channels", "8", "--channel-mults", "1,2", "--num-heads", "2", "--timesteps", "20"),
    *("--batch-size", "2", "--sample-steps", "1", "--warmup", "1", "--precision", "fp32", "--no-progress"),
]


def save(path: Path, image: Image.Image, **kwargs) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, **kwargs)
    return path


def solid(path: Path, mode="RGB", size=(8, 8), colour=(200, 30, 30), **kwargs) -> Path:
    return save(path, Image.new(mode, size, colour), **kwargs)


def load(root, **kwargs):
    """load_dataset("folder") and the notes it made."""
    with collect_notes() as notes:
        data = load_dataset("folder", data_dir=root, **kwargs)
    return data, notes


def png_16_bit_rgb(path: Path, rgb16: np.ndarray) -> Path:
    """A 16-bit-per-channel RGB PNG written by hand (Pillow writes no such file)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    h, w, _ = rgb16.shape
    rows = b"".join(b"\x00" + rgb16[i].astype(">u2").tobytes() for i in range(h))
    header = struct.pack(">IIBBBBB", w, h, 16, 2, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")
    path.write_bytes(data)
    return path


# ---- shapes: the resize policy --------------------------------------------------------------------


def test_mixed_sizes_and_aspect_ratios_crop_by_default_or_letterbox_with_pad(tmp_path):
    wide = Image.new("RGB", (40, 20), (0, 0, 255))
    wide.paste((255, 0, 0), (0, 0, 5, 20))  # a red strip at the left edge: outside a centre crop
    save(tmp_path / "wide.png", wide)
    solid(tmp_path / "tall.png", size=(10, 30), colour=(0, 255, 0))
    solid(tmp_path / "square.png", size=(64, 64), colour=(9, 9, 9))
    with pytest.raises(DdpmkitError, match="differ in size.*--image-size"):
        load(tmp_path)
    crop, _ = load(tmp_path, image_size=10)
    assert crop.images.shape == (3, 3, 10, 10)
    assert torch.all(crop.images[1] == torch.tensor([0, 255, 0]).view(3, 1, 1))  # tall: all green
    assert torch.all(crop.images[2] == torch.tensor([0, 0, 255]).view(3, 1, 1))  # wide: no red left
    pad, _ = load(tmp_path, image_size=10, fit="pad", background=(1, 2, 3))
    wide, tall = pad.images[2], pad.images[1]
    assert torch.all(wide[:, :2] == torch.tensor([1, 2, 3]).view(3, 1, 1))  # bars above and below
    assert torch.all(wide[:, 3:7, 0] == torch.tensor([255, 0, 0]).view(3, 1))  # the red strip is kept
    assert torch.all(tall[:, :, 0] == torch.tensor([1, 2, 3]).view(3, 1))  # bars left and right
    assert torch.all(tall[:, :, 4:6] == torch.tensor([0, 255, 0]).view(3, 1, 1))
    with pytest.raises(DdpmkitError, match="fit must be crop or pad"):
        load(tmp_path, image_size=10, fit="stretch")


def test_grayscale_mixed_with_colour_becomes_rgb_and_gray_stays_gray(tmp_path):
    solid(tmp_path / "a.png", "L", colour=90)
    solid(tmp_path / "b.jpg", "RGB", colour=(10, 200, 30))
    data, notes = load(tmp_path)
    assert data.images.shape == (2, 3, 8, 8) and notes == []
    assert torch.all(data.images[0] == 90)  # the gray image: R = G = B
    gray, _ = load(tmp_path, channels=1)
    assert gray.images.shape == (2, 1, 8, 8)


def test_palette_pngs_colour_gray_and_transparent(tmp_path):
    colour = Image.new("P", (8, 8), 1)
    colour.putpalette([0, 0, 0, 250, 10, 20] + [0] * 762)
    save(tmp_path / "colour" / "a.png", colour)
    gray = Image.new("P", (8, 8), 1)
    gray.putpalette([0, 0, 0, 77, 77, 77] + [0] * 762)
    save(tmp_path / "gray" / "a.png", gray)
    holes = Image.new("P", (8, 8), 0)
    holes.putpalette([9, 9, 9, 250, 10, 20] + [0] * 762)
    holes.paste(1, (0, 0, 4, 8))
    save(tmp_path / "holes" / "a.png", holes, transparency=0)  # palette entry 0 is transparent
    data, _ = load(tmp_path, background=(0, 0, 255))
    assert data.info.channels == 3
    assert torch.all(data.images[0] == torch.tensor([250, 10, 20]).view(3, 1, 1))
    assert torch.all(data.images[1] == 77)
    assert torch.all(data.images[2, :, :, :4] == torch.tensor([250, 10, 20]).view(3, 1, 1))
    assert torch.all(data.images[2, :, :, 4:] == torch.tensor([0, 0, 255]).view(3, 1, 1))  # on the background
    only_gray, _ = load(tmp_path / "gray")
    assert only_gray.info.channels == 1  # a gray palette is a grayscale image


def test_16_bit_pngs_are_scaled_to_8_bits(tmp_path):
    Image.fromarray(np.full((4, 4), 257 * 200, np.uint16)).save(tmp_path / "gray16.png")
    assert Image.open(tmp_path / "gray16.png").mode.startswith("I")
    data, _ = load(tmp_path)
    assert data.info.channels == 1 and torch.all(data.images == 200)  # 51400 / 257, not clipped to 255
    rgb16 = np.zeros((4, 4, 3), np.uint16)
    rgb16[..., 0], rgb16[..., 2] = 65535, 257 * 10
    png_16_bit_rgb(tmp_path / "rgb16.png", rgb16)
    data, _ = load(tmp_path)
    assert data.info.channels == 3
    assert data.images[1].flatten(1).unique(dim=1).tolist() == [[255], [0], [10]]


@pytest.mark.parametrize("background, expected", [((255, 255, 255), 255), ((0, 0, 0), 0), ((10, 20, 30), None)])
def test_transparency_is_composited_on_the_chosen_background(tmp_path, background, expected):
    image = Image.new("RGBA", (8, 8), (0, 0, 0, 0))
    image.paste((200, 100, 0, 255), (0, 0, 4, 8))  # opaque left half
    image.paste((200, 100, 0, 128), (4, 0, 8, 4))  # half transparent quarter
    save(tmp_path / "a.png", image)
    data, _ = load(tmp_path, background=background)
    pixels, bg = data.images[0], torch.tensor(background).view(3, 1, 1)
    assert torch.all(pixels[:, :, :4] == torch.tensor([200, 100, 0]).view(3, 1, 1))
    assert torch.all(pixels[:, 4:, 4:] == bg)  # fully transparent
    half = (torch.tensor([200, 100, 0]) * 128 + torch.tensor(background) * 127) / 255
    assert torch.allclose(pixels[:, 0, 6].float(), half, atol=1.5)
    if expected is not None:
        assert torch.all(pixels[:, 4:, 4:] == expected)
    with pytest.raises(DdpmkitError, match="background must be three integers"):
        load(tmp_path, background=(0, 0, 256))


def test_jpeg_webp_and_exif_rotation(tmp_path):
    solid(tmp_path / "a.jpg", colour=(200, 30, 30), quality=95)
    solid(tmp_path / "b.webp", colour=(30, 200, 30), lossless=True)
    tall = Image.new("RGB", (8, 16), (0, 0, 0))
    tall.paste((255, 255, 255), (0, 0, 8, 8))  # white on top as stored
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    save(tmp_path / "c.jpg", tall, exif=exif, quality=95)
    data, notes = load(tmp_path, image_size=8, fit="pad", background=(128, 128, 128))
    assert notes == []
    assert (data.images[0].float().mean((1, 2)) - torch.tensor([200.0, 30, 30])).abs().max() < 6
    assert torch.all(data.images[1] == torch.tensor([30, 200, 30]).view(3, 1, 1))
    rotated = data.images[2].float().mean(0)  # displayed 16x8: white on the right, padded above and below
    assert rotated[2:6, 5:].mean() > 240 and rotated[2:6, :3].mean() < 15 and abs(rotated[0].mean() - 128) < 2


# ---- what else a folder holds -------------------------------------------------------------------


def test_non_image_files_and_undecodable_images_are_skipped_with_one_note_each(tmp_path):
    solid(tmp_path / "cats" / "a.png")
    solid(tmp_path / "dogs" / "b.png")
    (tmp_path / "README.md").write_text("# my photos")
    (tmp_path / "dogs" / "Thumbs.db").write_bytes(b"\0" * 10)
    (tmp_path / "dogs" / "fake.jpg").write_text("not a jpeg")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "x.png").write_bytes(b"hidden: never looked at")
    data, notes = load(tmp_path)
    assert len(data) == 2 and data.info.class_names == ("cats", "dogs")
    assert len(notes) == 2 and all("\n" not in n for n in notes)
    assert notes[0].startswith("Skipped 1 unreadable image(s)") and "fake.jpg" in notes[0]
    assert notes[1].startswith("Ignored 2 file(s) without an image extension") and "README.md" in notes[1]
    assert not any(".git" in n for n in notes)


def test_a_class_with_one_image_trains_and_an_empty_class_folder_is_no_class(tmp_path):
    for i in range(3):
        solid(tmp_path / "many" / f"{i}.png", colour=(40 * i, 0, 0))
    solid(tmp_path / "one" / "only.png", colour=(0, 0, 200))
    (tmp_path / "empty").mkdir()
    (tmp_path / "unreadable").mkdir()
    (tmp_path / "unreadable" / "x.png").write_bytes(b"\x89PNG broken")
    data, notes = load(tmp_path)
    assert data.info.class_names == ("many", "one") and data.labels.tolist() == [0, 0, 0, 1]
    assert any(n.startswith("2 folder(s)") and "empty; unreadable" in n for n in notes), notes
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path), *TINY, "--steps", "2", "--out", str(run)]
    assert main(args) == 0
    assert checkpoint.load_config(run).class_names == ("many", "one")


def test_symlinks_are_followed_and_loops_read_once(tmp_path):
    outside = tmp_path / "elsewhere"
    solid(outside / "x.png", colour=(0, 200, 0))
    root = tmp_path / "data"
    solid(root / "a" / "1.png")
    os.symlink(outside, root / "b")  # a class folder that is a link
    os.symlink(root, root / "a" / "loop")  # a link back to the top: a loop
    os.symlink("self", root / "a" / "self")  # a link to itself
    os.symlink(root / "nowhere", root / "a" / "broken.png")  # a broken link
    os.symlink(outside / "x.png", root / "a" / "2.png")  # a linked file
    data, notes = load(root)
    assert data.info.class_names == ("a", "b") and data.labels.tolist() == [0, 0, 1]
    (read_once,) = [n for n in notes if n.startswith("Did not read 3 item(s)")]
    assert "a/loop (a folder already read" in read_once and "a/self" in read_once and "a/broken.png" in read_once
    assert len(open_folder_dataset(root, fit="pad")) == 3


def test_readme_in_the_folder_is_one_plain_note_from_the_cli(tmp_path, capfd):
    for name in ("cats", "dogs"):
        solid(tmp_path / "data" / name / "a.png")
    (tmp_path / "data" / "README.md").write_text("about these images")
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), *TINY, "--steps", "1"]
    assert main([*args, "--out", str(tmp_path / "run")]) == 0
    err = capfd.readouterr().err
    assert "Warning" not in err and "warn(" not in err
    (line,) = [line for line in err.splitlines() if "README" in line]
    assert line.startswith("ddpmkit train: note: Ignored 1 file(s) without an image extension") and line.endswith(
        "README.md."
    )


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--background", "300,0,0"], "argument --background: invalid colour"),
        (["--background", "pink"], "argument --background: invalid colour"),
        (["--fit", "stretch"], "--fit must be crop or pad, got 'stretch'"),
    ],
)
def test_bad_fit_and_background_flags_are_one_line_errors(tmp_path, capsys, flags, message):
    solid(tmp_path / "data" / "a.png")
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--unconditional", "--steps", "1"]
    try:
        status = main([*args, *flags, "--out", str(tmp_path / "run")])
    except SystemExit as exit_:
        status = exit_.code
    err = capsys.readouterr().err
    assert status == 2 and err.count("\n") == 1 and message in err and not (tmp_path / "run").exists()


def test_background_and_fit_flags_reach_the_images(tmp_path):
    image = Image.new("RGBA", (8, 4), (0, 0, 0, 0))
    save(tmp_path / "data" / "a.png", image)
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", str(tmp_path / "data"), "--unconditional", *TINY]
    args += ["--image-size", "8", "--fit", "pad", "--background", "black", "--steps", "1", "--batch-size", "1"]
    assert main([*args, "--out", str(run)]) == 0
    config = checkpoint.load_config(run)
    assert (config.data.fit, config.data.background) == ("pad", (0, 0, 0))


def test_the_many_files_benchmark_measures_both_paths(tmp_path):
    """bench/folders.py's two measurements, in this process, on a folder of 30 files."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
    try:
        import folders
    finally:
        sys.path.pop(0)
    folders.write_folder(tmp_path / "f", 30, 8, 3)
    memory, stream = folders.worker("memory", tmp_path / "f", 4), folders.worker("stream", tmp_path / "f", 4)
    assert memory["images"] == stream["images"] == 30 and memory["notes"] == []
    assert memory["tensor_mib"] * 2**20 == 30 * 3 * 4 * 4 and "decode_s" not in stream
    assert memory["peak_rss_mib"] >= memory["idle_rss_mib"] > 0


# ---- the real folder: 3,781 Noto emoji (RGBA PNGs) in 9 class folders and a README.md ----------------

EMOJI = Path(os.environ.get("DDPMKIT_EMOJI_DIR", Path(__file__).resolve().parents[2] / "shared/data/emoji-noto"))


@pytest.mark.skipif(not EMOJI.is_dir(), reason=f"{EMOJI} does not exist (set DDPMKIT_EMOJI_DIR)")
def test_the_real_emoji_folder_trains_with_one_plain_note(tmp_path, capfd):
    run = tmp_path / "run"
    args = ["train", "--dataset", "folder", "--data-dir", str(EMOJI), "--image-size", "16", *TINY, "--steps", "1"]
    assert main([*args, "--stream", "--workers", "0", "--background", "black", "--out", str(run)]) == 0
    notes = [line for line in capfd.readouterr().err.splitlines() if line.strip()]
    assert len(notes) == 1 and notes[0].startswith("ddpmkit train: note: Ignored 1 file(s)"), notes
    assert notes[0].endswith("README.md.")
    config = checkpoint.load_config(run)
    assert config.num_classes == 9 and config.in_channels == 3 and config.class_names[0] == "activities"
    assert json.loads((run / "metrics.jsonl").read_text().splitlines()[0])["step"] == 1
    one = tmp_path / "one"
    one.mkdir()
    os.symlink(EMOJI / "smileys-and-emotion" / "1f600.png", one / "grinning.png")  # U+1F600 grinning face
    face, _ = open_folder_dataset(one, 16, background=(0, 0, 0))[0]
    assert torch.all(face[:, 0, 0] == 0) and face.float().mean() > 40  # a transparent corner on black; the face

"""Loading a folder of many small images: time and memory of `ddpmkit train --dataset folder`'s data step.

    python bench/folders.py                    # 50,000 PNGs of 32x32 in 10 class folders (~1 min to write)
    python bench/folders.py --n 2000 --quick   # a smoke test of the harness

Writes N small RGB PNGs (random shapes on random grounds, as a real folder's files are all
different) into --dir, then, in a fresh process each, measures what the trainer does with a folder:
`memory` scans it (open_folder_dataset: directory walk and every header) and decodes every image
into one uint8 tensor (decode_all); `stream` only scans it (the --stream path, which decodes in
DataLoader workers while training). Reported: seconds per phase, images/s, and the process's peak
resident memory against an idle `import ddpmkit` process. Results: bench/results/folders-<date>.{md,json}.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import _measure
import numpy as np

HERE = Path(__file__).resolve().parent


def write_folder(root: Path, n: int, size: int, classes: int, seed: int = 0) -> None:
    """n PNGs of size x size in `classes` subfolders: a coloured disc or box on a coloured ground."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng(seed)
    for c in range(classes):
        (root / f"class{c:02d}").mkdir(parents=True, exist_ok=True)
    for i in range(n):
        ground, ink = (tuple(int(v) for v in rng.integers(0, 256, 3)) for _ in range(2))
        image = Image.new("RGB", (size, size), ground)
        x, y, r = *rng.integers(0, size, 2), int(rng.integers(2, max(3, size // 3)))
        draw = ImageDraw.Draw(image)
        (draw.ellipse if i % 2 else draw.rectangle)((x - r, y - r, x + r, y + r), fill=ink)
        image.save(root / f"class{i % classes:02d}" / f"{i:06d}.png")


def worker(mode: str, folder: Path, image_size: int) -> dict:
    """One measurement in this (fresh) process."""
    from ddpmkit.data.folder import decode_all, open_folder_dataset
    from ddpmkit.notes import collect_notes

    idle = _measure.peak_rss_mib()
    with collect_notes() as notes:
        start = time.perf_counter()
        dataset = open_folder_dataset(folder, image_size, split="all")
        scanned = time.perf_counter()
        record = {"mode": mode, "images": len(dataset), "scan_s": scanned - start, "idle_rss_mib": idle}
        if mode == "memory":
            data = decode_all(dataset, folder)
            record["decode_s"] = time.perf_counter() - scanned
            record["tensor_mib"] = data.images.numel() / _measure.MIB
    record["total_s"] = time.perf_counter() - start
    record["peak_rss_mib"] = _measure.peak_rss_mib()
    record["notes"] = notes
    return record


def measure(mode: str, folder: Path, image_size: int, threads: int) -> dict:
    command = [sys.executable, str(Path(__file__).resolve()), "--worker", mode, "--dir", str(folder)]
    command += ["--image-size", str(image_size), "--threads", str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"the {mode} worker failed:\n{done.stderr[-2000:]}")
    return _measure.parse_result(done.stdout)


def report(result: dict) -> str:
    lines = [
        f"# Loading a folder of {result['n']:,} PNGs ({result['file_size']}x{result['file_size']} RGB, "
        f"{result['classes']} classes), {result['date']}",
        "",
        f"`{result['command']}` on {result['machine']['cpu']} ({result['machine']['cores']} cores, "
        f"torch {result['machine']['torch']}); {result['files_mib']:.1f} MiB of files, written in "
        f"{result['write_s']:.0f} s (the page cache holds them: warm reads).",
        "",
    ]
    warning = _measure.busy_warning(result["machine"])
    lines += [warning, ""] if warning else []
    lines += [
        "| path | images | scan s | decode s | total s | images/s | peak RSS MiB | over idle MiB | tensor MiB |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in result["rows"]:
        rate = r["images"] / r["total_s"]
        lines.append(
            f"| {r['mode']} | {r['images']:,} | {r['scan_s']:.1f} | {r.get('decode_s', 0):.1f} | {r['total_s']:.1f} "
            f"| {rate:,.0f} | {r['peak_rss_mib']:.0f} | {r['peak_rss_mib'] - r['idle_rss_mib']:.0f} "
            f"| {r.get('tensor_mib', 0):.0f} |"
        )
    lines += [
        "",
        "scan: the directory walk and every image's header (channels, size); decode: every image to "
        f"3x{result['image_size']}x{result['image_size']} uint8 in one tensor (`memory`, the default "
        "for folders that fit in 2 GiB); `stream` scans only and decodes in DataLoader workers while training.",
        "",
    ]
    return "\n".join(lines)


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=50_000, help="number of image files (50000)")
    p.add_argument("--file-size", type=int, default=32, help="pixels per side of each file (32)")
    p.add_argument("--classes", type=int, default=10, help="class folders (10)")
    p.add_argument("--image-size", type=int, default=32, help="the size images are decoded to (32)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (2)")
    p.add_argument("--dir", help="where the folder is written (default bench/_work/folders-N; removed after)")
    p.add_argument("--keep", action="store_true", help="keep the folder afterwards")
    p.add_argument("--quick", action="store_true", help="a smoke test: results under bench/_work")
    p.add_argument("--results-dir", help="where to write the report (bench/results, or bench/_work with --quick)")
    p.add_argument("--worker", choices=("memory", "stream"), help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        import torch

        torch.set_num_threads(args.threads)
        _measure.emit(worker(args.worker, Path(args.dir), args.image_size))
        return
    folder = Path(args.dir) if args.dir else HERE / "_work" / f"folders-{args.n}"
    if folder.exists():
        raise SystemExit(f"{folder} exists; remove it or choose another --dir")
    machine = _measure.machine(args.threads)
    start = time.perf_counter()
    write_folder(folder, args.n, args.file_size, args.classes)
    write_s = time.perf_counter() - start
    try:
        files_mib = sum(f.stat().st_size for f in folder.rglob("*.png")) / _measure.MIB
        rows = [measure(mode, folder, args.image_size, args.threads) for mode in ("stream", "memory")]
    finally:
        if not args.keep:
            shutil.rmtree(folder)
    command = "python bench/folders.py " + " ".join(sys.argv[1:] if argv is None else argv)
    result = {
        "date": datetime.date.today().isoformat(),
        "command": command.strip(),
        "machine": machine,
        "n": args.n,
        "file_size": args.file_size,
        "classes": args.classes,
        "image_size": args.image_size,
        "write_s": write_s,
        "files_mib": files_mib,
        "rows": rows,
    }
    results = Path(args.results_dir) if args.results_dir else HERE / ("_work" if args.quick else "results")
    results.mkdir(parents=True, exist_ok=True)
    _measure.write_report(results / f"folders-{result['date']}-{args.n}", result, report(result))
    print(json.dumps({r["mode"]: round(r["total_s"], 2) for r in rows}), file=sys.stderr)


if __name__ == "__main__":
    sys.exit(_measure.run_main(main))

"""What ``--cache-dir`` pays to notice changed image files: ``data.files_fingerprint`` (a stat of every
file of a split, hashed) on a folder of ``--files`` images, against the folder walk that finding the
images already costs and against decoding them (the least a feature cache build does).

Files are one 20x20 PNG copied ``--files`` times into 100 subfolders of a temporary folder; times are
medians of ``--repeats`` runs with the page cache warm (a cold network disk will be slower for all
three). Writes ``benchmarks/results/cache_key_cost.json``.

    python benchmarks/cache_key_cost.py [--files 10000] [--repeats 5]
"""
from __future__ import annotations

import argparse
import io
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

from PIL import Image

from pteenet.backbones.specs import Preprocess
from pteenet.data import ImageTransform, files_fingerprint
from pteenet.data.files import ImageFiles, image_paths, unlabelled_samples


def median_ms(fn, repeats: int) -> float:  # type: ignore[no-untyped-def]
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(1000 * (time.perf_counter() - t0))
    return statistics.median(times)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", type=int, default=10_000)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "cache_key_cost.json")
    args = ap.parse_args()
    buf = io.BytesIO()
    Image.new("RGB", (20, 20), (10, 120, 200)).save(buf, "PNG")
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(args.files):
            sub = root / f"d{i % 100:02d}"
            sub.mkdir(exist_ok=True)
            (sub / f"{i}.png").write_bytes(buf.getvalue())
        pre = Preprocess((3, 20, 20), (0.5,) * 3, (0.5,) * 3)
        ds = ImageFiles(unlabelled_samples(root), 3, ImageTransform(pre))
        doc = {
            "files": args.files, "repeats": args.repeats, "python": platform.python_version(),
            "machine": platform.machine(), "cpus": __import__("os").cpu_count(),
            "fingerprint_ms": median_ms(lambda: files_fingerprint(ds), args.repeats),
            "folder_walk_ms": median_ms(lambda: image_paths(root), args.repeats),
            "decode_all_ms": median_ms(lambda: [ds[i] for i in range(len(ds))], max(1, args.repeats // 2)),
        }
    args.out.write_text(json.dumps(doc, indent=1) + "\n")
    print(json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()

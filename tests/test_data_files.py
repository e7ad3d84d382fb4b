"""Folders of image files: one folder of class folders, images without labels, image modes, and
broken files (skipped and named, or an error with --strict-images), in and out of DataLoader workers."""
from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from helpers import error_line, run_cli
from pteenet.backbones.specs import Preprocess
from pteenet.data import SKIPPED, UNLABELLED, DataConfig, ImageSkipped, load_splits, make_loader, read_image
from pteenet.errors import PteenetError

RGB16 = Preprocess((3, 16, 16), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5))


def _png(path: Path, colour: tuple[int, int, int] = (10, 120, 200), size: tuple[int, int] = (12, 10)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def _class_folders(root: Path, classes: list[str], per_class: int) -> None:
    for k, name in enumerate(classes):
        for i in range(per_class):
            _png(root / name / f"{i}.png", (60 * k, 5 * i, 100))


def _broken_jpeg(path: Path) -> None:
    """A JPEG cut off in the middle of its data, as a failed copy leaves it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.random.default_rng(0).integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(path, quality=90)
    path.write_bytes(path.read_bytes()[:700])


def _paths(split: torch.utils.data.Subset) -> list[str]:
    """The files of a split of a single folder: a Subset of a Subset (train or test part) of the files."""
    part = split.dataset
    return [part.dataset.samples[part.indices[i]][0] for i in split.indices]


def test_one_folder_of_class_folders_is_split_three_ways(tmp_path: Path) -> None:
    _class_folders(tmp_path, ["cat", "dog"], 10)
    cfg = DataConfig(spec=f"imagefolder:{tmp_path}", calibration_split=0.25, test_split=0.2, seed=3)
    s = load_splits(cfg, RGB16, num_classes=2)
    assert s.class_names == ["cat", "dog"] and s.split_info["labelled"] is True
    assert s.split_info["test_split"] == 0.2 and s.split_info["source_sizes"] == {"train": 16, "test": 4}
    assert s.split_info["sizes"] == {"train": 12, "val": 4, "test": 4}
    train, val, test = (_paths(d) for d in (s.train, s.calibration, s.test))
    assert not set(test) & (set(train) | set(val)) and not set(train) & set(val)  # disjoint
    assert len(set(test) | set(train) | set(val)) == 20  # together the whole folder
    again = load_splits(DataConfig.from_split_info(s.split_info), RGB16, num_classes=2)
    assert [int(y) for _, y in again.test] == [int(y) for _, y in s.test]  # the record rebuilds it
    other = load_splits(DataConfig(spec=cfg.spec, calibration_split=0.25, test_split=0.2, seed=4), RGB16, num_classes=2)
    assert _paths(other.test) != test  # seeded


def test_images_without_labels_at_any_depth(tmp_path: Path) -> None:
    for rel in ("a.png", "day1/b.jpg", "day1/cam2/c.png", "day2/d.webp", "day2/e.png", ".hidden.png", "notes.txt"):
        p = tmp_path / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        if rel.endswith(".txt"):
            p.write_text("not an image")
        else:
            Image.new("RGB", (9, 9), (1, 2, 3)).save(p)
    s = load_splits(DataConfig(spec=f"images:{tmp_path}", calibration_split=0.25, test_split=0.2), RGB16, num_classes=10)
    assert s.class_names is None and s.split_info["labelled"] is False and s.split_info["num_classes"] == 10
    assert sum(s.split_info["sizes"].values()) == 5  # the hidden file and the text file are not images
    x, y = s.train[0]
    assert x.shape == (3, 16, 16) and y == UNLABELLED
    (tmp_path / "empty").mkdir()
    with pytest.raises(PteenetError, match="found no images"):
        load_splits(DataConfig(spec=f"images:{tmp_path / 'empty'}"), RGB16)
    with pytest.raises(PteenetError, match="does not exist"):
        load_splits(DataConfig(spec=f"images:{tmp_path / 'nope'}"), RGB16)


def test_class_count_mismatch_suggests_images_spec(tmp_path: Path) -> None:
    _class_folders(tmp_path, ["a", "b", "c"], 2)
    with pytest.raises(PteenetError, match="has 3 classes but the backbone outputs 10.*images:PATH"):
        load_splits(DataConfig(spec=f"imagefolder:{tmp_path}"), RGB16, num_classes=10)


def _pixel(path: Path, channels: int) -> list[int]:
    return read_image(str(path), channels)[:, 0, 0].tolist()


def test_image_modes_become_what_the_backbone_takes(tmp_path: Path) -> None:
    Image.new("L", (4, 4), 77).save(tmp_path / "grey.png")
    assert _pixel(tmp_path / "grey.png", 3) == [77, 77, 77] and _pixel(tmp_path / "grey.png", 1) == [77]
    Image.new("RGBA", (4, 4), (255, 0, 0, 0)).save(tmp_path / "clear.png")  # fully transparent red
    Image.new("RGBA", (4, 4), (0, 0, 255, 255)).save(tmp_path / "opaque.png")
    assert _pixel(tmp_path / "clear.png", 3) == [255, 255, 255]  # over white, not the hidden red
    assert _pixel(tmp_path / "opaque.png", 3) == [0, 0, 255]
    Image.new("CMYK", (4, 4), (0, 255, 255, 0)).save(tmp_path / "cmyk.jpg", quality=100)
    r, g, b = _pixel(tmp_path / "cmyk.jpg", 3)
    assert r > 200 and g < 60 and b < 60  # cyan-free, full magenta and yellow: red
    pal = Image.new("P", (4, 4), 1)
    pal.putpalette([0, 0, 0, 0, 200, 0] + [0] * 762)
    pal.save(tmp_path / "palette.png")
    assert _pixel(tmp_path / "palette.png", 3) == [0, 200, 0]
    pal.save(tmp_path / "palette_clear.png", transparency=1)
    assert _pixel(tmp_path / "palette_clear.png", 3) == [255, 255, 255]
    deep = np.full((4, 4), 32896, dtype=np.uint16)  # 50.2% grey in 16 bits
    deep[0, 0] = 65535
    Image.fromarray(deep).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    img = read_image(str(tmp_path / "deep.png"), 3)
    assert img[:, 0, 0].tolist() == [255] * 3 and img[:, 1, 1].tolist() == [128] * 3  # scaled, not clipped
    assert read_image(str(tmp_path / "deep.png"), 1).shape == (1, 4, 4)


def _folder_with_broken_files(root: Path) -> list[str]:
    _class_folders(root, ["a", "b"], 6)
    _broken_jpeg(root / "a" / "cut.jpg")
    (root / "b" / "empty.png").write_bytes(b"")
    return [str(root / "a" / "cut.jpg"), str(root / "b" / "empty.png")]


@pytest.mark.parametrize("workers", [0, 1])
def test_broken_images_are_skipped_and_named(tmp_path: Path, workers: int) -> None:
    broken = _folder_with_broken_files(tmp_path)
    s = load_splits(DataConfig(spec=f"imagefolder:{tmp_path}", calibration_split=0.0, test_split=0.1, augment=False), RGB16, 2)
    whole = torch.utils.data.ConcatDataset([s.train, s.test])
    mark = SKIPPED.mark()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        seen = sum(len(y) for _, y in make_loader(whole, 4, shuffle=False, workers=workers))
    assert seen == 12  # every image that decodes, nothing else lost
    assert sorted(SKIPPED.since(mark)) == sorted(broken)
    named = [str(w.message) for w in caught if issubclass(w.category, ImageSkipped)]
    assert len(named) == 2 and all(any(b in m for m in named) for b in broken)
    assert "2 image files could not be decoded" in SKIPPED.summary(SKIPPED.since(mark))


@pytest.mark.parametrize("workers", [0, 1])
def test_strict_images_makes_a_broken_file_an_error(tmp_path: Path, workers: int) -> None:
    _folder_with_broken_files(tmp_path)
    s = load_splits(DataConfig(spec=f"imagefolder:{tmp_path}", calibration_split=0.0, strict_images=True), RGB16, 2)
    whole = torch.utils.data.ConcatDataset([s.train, s.test])
    with pytest.raises(PteenetError, match=r"cannot decode image .*(cut\.jpg|empty\.png).*--strict-images"):
        for _ in make_loader(whole, 4, shuffle=False, workers=workers):
            pass


def test_a_batch_of_only_broken_files_is_left_out(tmp_path: Path) -> None:
    for i in range(3):
        (tmp_path / f"{i}.png").write_bytes(b"not a png")
    _png(tmp_path / "z.png")
    s = load_splits(DataConfig(spec=f"images:{tmp_path}", calibration_split=0.0, test_split=0.25, augment=False), RGB16, 10)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ImageSkipped)
        batches = list(make_loader(torch.utils.data.ConcatDataset([s.train, s.test]), 3, shuffle=False))
    assert [len(y) for _, y in batches] == [1]


def test_train_and_sweep_on_unlabelled_images_with_a_broken_file(tiny_checkpoint: Path, tmp_path: Path) -> None:
    folder = tmp_path / "photos"
    for i in range(40):
        _png(folder / f"day{i % 3}" / f"{i}.png", (6 * i, 255 - 6 * i, (37 * i) % 256), (20, 20))
    _broken_jpeg(folder / "day0" / "cut.jpg")
    ckpt, trained = tiny_checkpoint, tmp_path / "t.safetensors"
    code, stdout, stderr = run_cli("train-branches", ckpt, "-o", trained, "--data", f"images:{folder}", "--epochs", 1,
                                "--batch-size", 8, "--val-split", 0.3, "--cache-features", "--json")
    assert code == 0, stderr
    cut = str(folder / "day0" / "cut.jpg")
    assert f"skipped {cut}" in " ".join(stderr.split())
    assert "1 image file could not be decoded and was skipped" in " ".join(stderr.split())
    doc = json.loads(stdout)
    assert doc["final"]["skipped_images"] == {"count": 1, "files": [cut]}
    assert doc["final"]["val"]["accuracy"] is None and doc["final"]["val"]["agreement"] is not None
    code, stdout, stderr = run_cli("sweep-threshold", trained, "-o", tmp_path / "sweep", "--thresholds", "0:1:0.25",
                                "--max-drop", 50, "--json")
    assert code == 0, stderr
    sweep = json.loads(stdout)
    assert sweep["metric"] == "agreement" and sweep["backbone"]["accuracy"] is None
    assert "no labels" in sweep["no_accuracy"] and "no labels" in " ".join(stderr.split())
    code, _, stderr = run_cli("train-branches", ckpt, "-o", trained, "--data", f"images:{folder}", "--targets", "labels")
    assert code == 1 and "--targets labels needs labels" in stderr
    code, _, stderr = run_cli("train-branches", ckpt, "-o", tmp_path / "s.safetensors", "--data", f"images:{folder}",
                           "--epochs", 1, "--strict-images")
    assert code == 1 and "cut.jpg" in error_line(stderr)


def test_unlabelled_calibration_for_labelled_training(tmp_path: Path) -> None:
    for i in range(6):
        _png(tmp_path / "shots" / f"{i}.png", (40 * i, 0, 0))
    s = load_splits(DataConfig(spec="synthetic", calibration=f"images:{tmp_path / 'shots'}#half=0"), RGB16, 10)
    assert s.split_info["calibration_labelled"] is False and s.split_info["labelled"] is True
    assert len(s.calibration) == 3 and s.calibration[0][1] == UNLABELLED and s.split_info["sizes"]["train"] == 500


def test_feature_cache_dir_and_broken_files(tiny_checkpoint: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A cache built while a file was skipped names it when reused (and --strict-images stops at it);
    repairing the file gives that split another key, so its features are computed again."""
    from pteenet.data import loader
    from pteenet.training import feature_cache as feature_store
    from pteenet.training.run import TrainConfig, train_branches

    folder = tmp_path / "photos"
    for i in range(30):
        _png(folder / f"{i}.png", (8 * i, 255 - 8 * i, (37 * i) % 256), (20, 20))
    cut = folder / "cut.jpg"
    _broken_jpeg(cut)
    ckpt, store = tiny_checkpoint, tmp_path / "features"
    built: list[int] = []
    real = feature_store.build_feature_cache
    monkeypatch.setattr(feature_store, "build_feature_cache", lambda *a, **k: built.append(1) or real(*a, **k))

    def run(name: str, **kw: object) -> tuple[list[str], list[str]]:
        """Trains in what stands for a fresh process (a new ``SKIPPED``): the ImageSkipped warnings, the files recorded."""
        monkeypatch.setattr(loader.SKIPPED, "files", {})
        monkeypatch.setattr(loader.SKIPPED, "met", [])
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            out = train_branches(ckpt, tmp_path / name, DataConfig(spec=f"images:{folder}", calibration_split=0.3, augment=False, **kw),
                                 TrainConfig(epochs=1, batch_size=8, device="cpu", cache_features=True, cache_dir=str(store)))
        return [str(w.message) for w in caught if issubclass(w.category, ImageSkipped)], out["final"]["skipped_images"]["files"]

    warned, recorded = run("1.safetensors")
    assert built == [1, 1] and recorded == [str(cut)] and len(warned) == 1
    warned, recorded = run("2.safetensors")
    assert built == [1, 1]  # both splits read from the store, and the skipped file is named again
    assert recorded == [str(cut)] and len(warned) == 1 and str(cut) in warned[0] and "cached features" in warned[0]
    with pytest.raises(PteenetError, match="cannot decode image .*cut.jpg"):
        run("3.safetensors", strict_images=True)
    _png(cut, (1, 2, 3), (20, 20))  # repaired: the split holding it is computed again, the other one reused
    warned, recorded = run("4.safetensors")
    assert built == [1, 1, 1] and warned == [] and recorded == []
    assert len(list(store.glob("features-*.safetensors"))) == 3

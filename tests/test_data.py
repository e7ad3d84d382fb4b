"""pteenet.data: offline, fast, no downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pteenet.backbones import Preprocess
from pteenet.data import DEBIAN_FASHION_DIR, DataConfig, ImageTransform, load_splits, make_loader
from pteenet.errors import PteenetError

RGB32 = Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _indices(subset: torch.utils.data.Subset) -> set[int]:
    return set(subset.indices)


def test_synthetic_sizes_and_no_overlap() -> None:
    s = load_splits(DataConfig("synthetic"), RGB32, num_classes=10)
    assert s.split_info["sizes"] == {"train": 450, "val": 50, "test": 100}
    assert (len(s.train), len(s.val), len(s.test)) == (450, 50, 100)
    assert not _indices(s.train) & _indices(s.val)
    assert s.class_names == [f"class{i}" for i in range(10)]
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)


def test_synthetic_is_deterministic_and_val_is_not_augmented() -> None:
    a = load_splits(DataConfig("synthetic", seed=3), RGB32)
    b = load_splits(DataConfig("synthetic", seed=3), RGB32)
    assert a.val.indices == b.val.indices and a.train.indices == b.train.indices
    assert torch.equal(a.val[0][0], b.val[0][0]) and torch.equal(a.test[5][0], b.test[5][0])
    assert torch.equal(a.val[0][0], a.val[0][0])  # no randomness in the calibration split
    c = load_splits(DataConfig("synthetic", seed=4), RGB32)
    assert c.val.indices != a.val.indices


def test_limit_caps_every_split_and_keeps_val() -> None:
    full = load_splits(DataConfig("synthetic"), RGB32)
    s = load_splits(DataConfig("synthetic", limit=20), RGB32)
    assert s.split_info["sizes"] == {"train": 20, "val": 20, "test": 20}
    assert s.val.indices == full.val.indices[:20]  # calibration images do not depend on the cap
    assert DataConfig.from_split_info(s.split_info).limit == 20


def test_synthetic_is_learnable_by_class_means() -> None:
    s = load_splits(DataConfig("synthetic", augment=False), RGB32)
    xs = torch.stack([s.train[i][0] for i in range(len(s.train))])
    ys = torch.tensor([s.train[i][1] for i in range(len(s.train))])
    means = torch.stack([xs[ys == k].mean(0) for k in range(10)])
    xt = torch.stack([s.test[i][0] for i in range(len(s.test))])
    yt = torch.tensor([s.test[i][1] for i in range(len(s.test))])
    pred = torch.cdist(xt.flatten(1), means.flatten(1)).argmin(1)
    assert (pred == yt).float().mean() > 0.8


def test_normalisation_and_channel_conversion() -> None:
    img = torch.full((3, 8, 8), 255, dtype=torch.uint8)
    img[0] = 0
    x = ImageTransform(Preprocess((3, 8, 8), (0.5, 0.5, 0.5), (0.5, 0.5, 0.5)))(img)
    assert torch.allclose(x[0], torch.tensor(-1.0)) and torch.allclose(x[1:], torch.tensor(1.0))
    gray = ImageTransform(Preprocess((1, 8, 8), (0.0,), (1.0,)))(img)
    assert gray.shape == (1, 8, 8) and torch.allclose(gray, torch.tensor(0.701), atol=1e-3)
    rgb = ImageTransform(Preprocess((3, 16, 16), (0.0,) * 3, (1.0,) * 3))(torch.full((1, 8, 8), 51, dtype=torch.uint8))
    assert rgb.shape == (3, 16, 16) and torch.allclose(rgb, torch.tensor(0.2), atol=1e-5)


def test_augmentation_keeps_shape_and_changes_pixels() -> None:
    img = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    aug = ImageTransform(Preprocess((1, 28, 28), (0.0,), (1.0,)), augment=True, crop_padding=2)
    torch.manual_seed(0)
    outs = [aug(img) for _ in range(8)]
    assert all(o.shape == (1, 28, 28) for o in outs)
    assert any(not torch.equal(o, outs[0]) for o in outs)


def _write_imagefolder(root: Path, split: str, classes: list[str], per_class: int, size: tuple[int, int]) -> None:
    for k, name in enumerate(classes):
        (root / split / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", size, (40 * k, 10 * i, 200)).save(root / split / name / f"{i}.png")


def test_imagefolder(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, "train", ["cat", "dog"], 5, (20, 12))
    _write_imagefolder(tmp_path, "val", ["cat", "dog"], 2, (20, 12))
    s = load_splits(DataConfig(f"imagefolder:{tmp_path}", val_split=0.2), RGB32, num_classes=2)
    assert s.class_names == ["cat", "dog"]
    assert s.split_info["sizes"] == {"train": 8, "val": 2, "test": 4}
    x, y = s.test[3]
    assert x.shape == (3, 32, 32) and y == 1
    gray = load_splits(DataConfig(f"imagefolder:{tmp_path}"), Preprocess((1, 16, 16), (0.5,), (0.5,)))
    assert gray.val[0][0].shape == (1, 16, 16)
    xb, yb = next(iter(make_loader(s.train, 4, shuffle=True, seed=1)))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.long


def test_imagefolder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PteenetError, match="imagefolder needs"):
        load_splits(DataConfig(f"imagefolder:{tmp_path / 'nope'}"), RGB32)


def test_class_count_mismatch(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, "train", ["a", "b", "c"], 2, (8, 8))
    _write_imagefolder(tmp_path, "test", ["a", "b", "c"], 1, (8, 8))
    with pytest.raises(PteenetError, match="has 3 classes but the backbone outputs 10"):
        load_splits(DataConfig(f"imagefolder:{tmp_path}"), RGB32, num_classes=10)


def test_unknown_spec_lists_names() -> None:
    with pytest.raises(PteenetError) as e:
        load_splits(DataConfig("cifar11"), RGB32)
    assert "unknown dataset 'cifar11'" in str(e.value) and "cifar10" in str(e.value)


def test_missing_files_is_a_pteenet_error(tmp_path: Path) -> None:
    with pytest.raises(PteenetError) as e:
        load_splits(DataConfig("cifar10", data_dir=str(tmp_path), download=False), RGB32)
    assert str(tmp_path) in e.value.message and "data_batch_1" in e.value.message and "\n" not in str(e.value)


def test_bad_val_split_and_limit() -> None:
    with pytest.raises(PteenetError, match="val split"):
        load_splits(DataConfig("synthetic", val_split=1.0), RGB32)
    with pytest.raises(PteenetError, match="limit"):
        load_splits(DataConfig("synthetic", limit=0), RGB32)


def test_loader_shuffle_is_seeded() -> None:
    s = load_splits(DataConfig("synthetic", augment=False, limit=64), RGB32)
    first = [next(iter(make_loader(s.train, 16, shuffle=True, seed=7)))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])


@pytest.mark.skipif(not (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    s = load_splits(DataConfig("fashion-mnist", data_dir=str(tmp_path), download=False, limit=32), RGB32, 10)
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert s.split_info["source_sizes"] == {"train": 60000, "test": 10000}
    assert s.class_names[0] == "T-shirt/top" and s.train[0][0].shape == (3, 32, 32)

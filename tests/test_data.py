"""pteenet.data: offline, fast, no downloads."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from PIL import Image

from pteenet.backbones.specs import Preprocess
from pteenet.data import DEBIAN_FASHION_DIR, DataConfig, ImageTransform, load_splits, make_loader, parse_calibration
from pteenet.errors import PteenetError

RGB32 = Preprocess((3, 32, 32), (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _indices(subset: torch.utils.data.Subset) -> set[int]:
    return set(subset.indices)


def test_synthetic_sizes_and_no_overlap() -> None:
    s = load_splits(DataConfig(spec="synthetic"), RGB32, num_classes=10)
    assert s.split_info["sizes"] == {"train": 450, "val": 50, "test": 100}
    assert (len(s.train), len(s.calibration), len(s.test)) == (450, 50, 100)
    assert not _indices(s.train) & _indices(s.calibration)
    assert s.class_names == [f"class{i}" for i in range(10)]
    x, y = s.train[0]
    assert x.shape == (3, 32, 32) and x.dtype == torch.float32 and isinstance(y, int)


def test_synthetic_is_deterministic_and_val_is_not_augmented() -> None:
    a = load_splits(DataConfig(spec="synthetic", seed=3), RGB32)
    b = load_splits(DataConfig(spec="synthetic", seed=3), RGB32)
    assert a.calibration.indices == b.calibration.indices and a.train.indices == b.train.indices
    assert torch.equal(a.calibration[0][0], b.calibration[0][0]) and torch.equal(a.test[5][0], b.test[5][0])
    assert torch.equal(a.calibration[0][0], a.calibration[0][0])  # no randomness in the calibration split
    c = load_splits(DataConfig(spec="synthetic", seed=4), RGB32)
    assert c.calibration.indices != a.calibration.indices


def test_limit_caps_every_split_and_keeps_val() -> None:
    full = load_splits(DataConfig(spec="synthetic"), RGB32)
    s = load_splits(DataConfig(spec="synthetic", limit=20), RGB32)
    assert s.split_info["sizes"] == {"train": 20, "val": 20, "test": 20}
    assert s.calibration.indices == full.calibration.indices[:20]  # calibration images do not depend on the cap
    assert DataConfig.from_split_info(s.split_info).limit == 20


def test_synthetic_is_learnable_by_class_means() -> None:
    s = load_splits(DataConfig(spec="synthetic", augment=False), RGB32)
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
    s = load_splits(DataConfig(spec=f"imagefolder:{tmp_path}", calibration_split=0.2), RGB32, num_classes=2)
    assert s.class_names == ["cat", "dog"]
    assert s.split_info["sizes"] == {"train": 8, "val": 2, "test": 4}
    x, y = s.test[3]
    assert x.shape == (3, 32, 32) and y == 1
    gray = load_splits(DataConfig(spec=f"imagefolder:{tmp_path}"), Preprocess((1, 16, 16), (0.5,), (0.5,)))
    assert gray.calibration[0][0].shape == (1, 16, 16)
    xb, yb = next(iter(make_loader(s.train, 4, shuffle=True, seed=1)))
    assert xb.shape == (4, 3, 32, 32) and yb.dtype == torch.long


def test_imagefolder_missing_folder(tmp_path: Path) -> None:
    with pytest.raises(PteenetError, match="image folder .*nope does not exist"):
        load_splits(DataConfig(spec=f"imagefolder:{tmp_path / 'nope'}"), RGB32)


def test_class_count_mismatch(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, "train", ["a", "b", "c"], 2, (8, 8))
    _write_imagefolder(tmp_path, "test", ["a", "b", "c"], 1, (8, 8))
    with pytest.raises(PteenetError, match="has 3 classes but the backbone outputs 10"):
        load_splits(DataConfig(spec=f"imagefolder:{tmp_path}"), RGB32, num_classes=10)


def test_unknown_spec_lists_names() -> None:
    with pytest.raises(PteenetError) as e:
        load_splits(DataConfig(spec="cifar11"), RGB32)
    assert "unknown dataset 'cifar11'" in str(e.value) and "cifar10" in str(e.value)


def test_missing_files_is_a_pteenet_error(tmp_path: Path) -> None:
    with pytest.raises(PteenetError) as e:
        load_splits(DataConfig(spec="cifar10", data_dir=str(tmp_path), download=False), RGB32)
    assert str(tmp_path) in e.value.message and "data_batch_1" in e.value.message and "\n" not in str(e.value)


def test_bad_val_split_and_limit() -> None:
    with pytest.raises(PteenetError, match="calibration split"):
        load_splits(DataConfig(spec="synthetic", calibration_split=1.0), RGB32)
    with pytest.raises(PteenetError, match="limit"):
        load_splits(DataConfig(spec="synthetic", limit=0), RGB32)


def test_loader_shuffle_is_seeded() -> None:
    s = load_splits(DataConfig(spec="synthetic", augment=False, limit=64), RGB32)
    first = [next(iter(make_loader(s.train, 16, shuffle=True, seed=7)))[1] for _ in range(2)]
    assert torch.equal(first[0], first[1])


@pytest.mark.skipif(not (DEBIAN_FASHION_DIR / "train-images-idx3-ubyte.gz").is_file(),
                    reason="Debian's dataset-fashion-mnist is not installed")
def test_fashion_mnist_from_debian_package(tmp_path: Path) -> None:
    s = load_splits(DataConfig(spec="fashion-mnist", data_dir=str(tmp_path), download=False, limit=32), RGB32, 10)
    assert (tmp_path / "FashionMNIST" / "raw" / "t10k-labels-idx1-ubyte").is_file()
    assert s.split_info["source_sizes"] == {"train": 60000, "test": 10000}
    assert s.class_names[0] == "T-shirt/top" and s.train[0][0].shape == (3, 32, 32)


# -- calibration on other data (DataConfig.calibration) ------------------------------------------------
def test_calibration_from_another_folder_takes_val_from_it_and_carves_nothing(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "data", "train", ["cat", "dog"], 5, (8, 8))
    _write_imagefolder(tmp_path / "data", "test", ["cat", "dog"], 2, (8, 8))
    _write_imagefolder(tmp_path, "labelled", ["cat", "dog"], 3, (8, 8))  # class folders, no train/test level
    cfg = DataConfig(spec=f"imagefolder:{tmp_path / 'data'}", calibration=f"imagefolder:{tmp_path / 'labelled'}")
    s = load_splits(cfg, RGB32, num_classes=2)
    assert s.split_info["sizes"] == {"train": 10, "val": 6, "test": 4}  # all of train is train
    assert Path(s.calibration.dataset.root) == tmp_path / "labelled"
    assert sorted(s.calibration.indices) == list(range(6)) and s.calibration[0][0].shape == (3, 32, 32)
    info = s.split_info
    assert info["calibration"] == cfg.calibration and info["source_sizes"]["calibration"] == 6
    assert info["calibration_overlap"] is None and info["test_half"] is None
    # The training data's own train folder as calibration data is flagged, not refused.
    on_train = load_splits(DataConfig(spec=cfg.spec, calibration=f"imagefolder:{tmp_path / 'data' / 'train'}"), RGB32)
    assert on_train.split_info["calibration_overlap"] == "train"


def test_calibration_spec_means_its_test_split(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path / "other", "train", ["a", "b"], 4, (8, 8))
    _write_imagefolder(tmp_path / "other", "val", ["a", "b"], 3, (8, 8))
    s = load_splits(DataConfig(spec="synthetic", calibration=f"imagefolder:{tmp_path / 'other'}"), RGB32, num_classes=2)
    assert Path(s.calibration.dataset.root) == tmp_path / "other" / "val" and len(s.calibration) == 6
    # `synthetic` as calibration for `synthetic` data: exactly its test images, flagged as such.
    same = load_splits(DataConfig(spec="synthetic", calibration="synthetic"), RGB32, num_classes=10)
    assert same.calibration.dataset is same.test.dataset and sorted(same.calibration.indices) == sorted(same.test.indices)
    assert same.split_info["calibration_overlap"] == "test"
    # ... and for other data, the same images `synthetic` gives as --data (same seed).
    _write_imagefolder(tmp_path / "two", "train", ["a", "b"], 2, (8, 8))
    _write_imagefolder(tmp_path / "two", "test", ["a", "b"], 1, (8, 8))
    other = load_splits(DataConfig(spec=f"imagefolder:{tmp_path / 'two'}", seed=4, calibration="synthetic"), RGB32, 2)
    plain = load_splits(DataConfig(spec="synthetic", seed=4), RGB32, 2)
    assert len(other.calibration) == 100 and torch.equal(other.calibration.dataset.images, plain.test.dataset.images)


def test_halves_are_deterministic_disjoint_and_cover_the_set() -> None:
    def halves(seed: int) -> tuple[list[int], list[int], list[int]]:
        h0 = load_splits(DataConfig(spec="synthetic", seed=seed, calibration="synthetic#half=0"), RGB32)
        h1 = load_splits(DataConfig(spec="synthetic", seed=seed, calibration="synthetic#half=1"), RGB32)
        return h0.calibration.indices, h0.test.indices, h1.calibration.indices

    val0, test0, val1 = halves(5)
    assert halves(5) == (val0, test0, val1)
    assert len(val0) == len(val1) == 50 and not set(val0) & set(val1) and set(val0) | set(val1) == set(range(100))
    # Calibrating on a half of the test data reports on the other half.
    assert sorted(test0) == sorted(val1)
    assert halves(6)[0] != val0  # the seed picks the halves
    s = load_splits(DataConfig(spec="synthetic", seed=5, calibration="synthetic#half=0"), RGB32)
    assert s.split_info["test_half"] == 1 and s.split_info["calibration_overlap"] is None
    assert s.split_info["sizes"] == {"train": 500, "val": 50, "test": 50}


def test_calibration_round_trips_through_split_info() -> None:
    cfg = DataConfig(spec="synthetic", seed=2, limit=30, calibration="synthetic#half=1")
    s = load_splits(cfg, RGB32)
    again = DataConfig.from_split_info(s.split_info)
    assert again.calibration == "synthetic#half=1" and (again.seed, again.limit) == (2, 30)
    t = load_splits(again, RGB32)
    assert (t.calibration.indices, t.test.indices, t.train.indices) == (s.calibration.indices, s.test.indices, s.train.indices)
    old = {k: v for k, v in s.split_info.items() if k not in ("calibration", "test_half", "calibration_overlap")}
    assert DataConfig.from_split_info(old).calibration is None  # records from before calibration load


@pytest.mark.parametrize("text, base, half", [
    ("cifar10", "cifar10", None), ("cifar10#half=1", "cifar10", 1),
    ("imagefolder:/a#b/c", "imagefolder:/a#b/c", None), ("imagefolder:/a#b/c#half=0", "imagefolder:/a#b/c", 0),
])
def test_parse_calibration(text: str, base: str, half: int | None) -> None:
    assert parse_calibration(text) == (base, half)


@pytest.mark.parametrize("text", ["synthetic#half=2", "synthetic#half=", "#half=0"])
def test_bad_half_suffix(text: str) -> None:
    with pytest.raises(PteenetError, match="bad calibration spec"):
        parse_calibration(text)


def test_calibration_class_count_and_names_must_match(tmp_path: Path) -> None:
    _write_imagefolder(tmp_path, "three", ["a", "b", "c"], 1, (8, 8))
    with pytest.raises(PteenetError, match="calibration data imagefolder:.* has 3 classes but the backbone outputs 10"):
        load_splits(DataConfig(spec="synthetic", calibration=f"imagefolder:{tmp_path / 'three'}"), RGB32, num_classes=10)
    _write_imagefolder(tmp_path / "data", "train", ["a", "b"], 2, (8, 8))
    _write_imagefolder(tmp_path / "data", "test", ["a", "b"], 1, (8, 8))
    with pytest.raises(PteenetError, match="has 3 classes but dataset imagefolder:.* has 2"):
        load_splits(DataConfig(spec=f"imagefolder:{tmp_path / 'data'}", calibration=f"imagefolder:{tmp_path / 'three'}"), RGB32)
    _write_imagefolder(tmp_path, "renamed", ["x", "y"], 1, (8, 8))
    with pytest.raises(PteenetError, match="same class folders"):
        load_splits(DataConfig(spec=f"imagefolder:{tmp_path / 'data'}", calibration=f"imagefolder:{tmp_path / 'renamed'}"), RGB32)


def test_unknown_or_missing_calibration_data(tmp_path: Path) -> None:
    with pytest.raises(PteenetError) as e:
        load_splits(DataConfig(spec="synthetic", calibration="cifar11"), RGB32)
    assert "unknown calibration dataset 'cifar11'" in str(e.value) and "cifar10" in str(e.value)
    with pytest.raises(PteenetError, match="does not exist"):
        load_splits(DataConfig(spec="synthetic", calibration=f"imagefolder:{tmp_path / 'nope'}"), RGB32)

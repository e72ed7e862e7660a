import numpy as np
import pytest
from PIL import Image

from lungsam.data import DEMO_DATA, DataError, holdout_split, kfold_splits, load_dataset


def _write_pair(root, stem, size=(40, 30), mask_size=None, empty=False, mode="L"):
    (root / "images").mkdir(parents=True, exist_ok=True)
    (root / "masks").mkdir(parents=True, exist_ok=True)
    w, h = size
    img = (np.random.default_rng(len(stem)).random((h, w)) * 255).astype(np.uint8)
    Image.fromarray(img).convert(mode).save(root / "images" / f"{stem}.png")
    mw, mh = mask_size or size
    m = np.zeros((mh, mw), np.uint8)
    if not empty:
        m[mh // 4: 3 * mh // 4, mw // 4: 3 * mw // 4] = 255
    Image.fromarray(m).save(root / "masks" / f"{stem}.png")


def test_demo_data_loads_at_working_size():
    d = load_dataset(DEMO_DATA, 64)
    assert len(d.samples) == 16 and not d.skipped
    s = d.samples[0]
    assert s.image.shape == (64, 64, 3) and s.image.dtype == np.uint8
    assert s.mask.shape == (64, 64) and s.mask.dtype == bool and s.mask.any()


def test_16bit_and_rgb_images(tmp_path):
    root = tmp_path / "set"
    _write_pair(root, "rgb", mode="RGB")
    (root / "images").mkdir(exist_ok=True)
    a16 = (np.arange(30 * 40, dtype=np.uint16).reshape(30, 40) * 50)
    Image.fromarray(a16).save(root / "images" / "wide.png")
    Image.open(root / "masks" / "rgb.png").save(root / "masks" / "wide.png")
    d = load_dataset(root, 32)
    assert {s.id for s in d.samples} == {"set/rgb", "set/wide"}
    wide = d.by_id()["set/wide"]
    assert wide.image.max() > 200 and wide.original_hw == (30, 40)


def test_bad_pairs_are_skipped_and_named(tmp_path):
    root = tmp_path / "bad"
    _write_pair(root, "good")
    _write_pair(root, "empty", empty=True)
    _write_pair(root, "mismatch", mask_size=(20, 20))
    _write_pair(root, "nomask")
    (root / "masks" / "nomask.png").unlink()
    (root / "images" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n not really")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "broken.png")
    (root / "images" / "zero.png").write_bytes(b"")
    Image.fromarray(np.zeros((30, 40), np.uint8)).save(root / "masks" / "zero.png")
    messages = []
    d = load_dataset(root, 32, log=messages.append)
    assert [s.id for s in d.samples] == ["bad/good"]
    reasons = {r["image"].split("/")[-1] if r["image"] else r["mask"]: r["reason"] for r in d.skipped}
    assert len(d.skipped) == 5 and len(messages) == 5
    assert "empty" in reasons["empty.png"]
    assert "differs" in reasons["mismatch.png"]
    assert "no mask" in reasons["nomask.png"]
    assert "cannot read" in reasons["broken.png"] and "broken.png" in reasons["broken.png"]
    assert "empty (0 bytes)" in reasons["zero.png"]


def test_no_usable_pair_is_an_error(tmp_path):
    root = tmp_path / "none"
    _write_pair(root, "a", empty=True)
    with pytest.raises(DataError, match="no usable"):
        load_dataset(root, 32)
    with pytest.raises(DataError, match="images/"):
        load_dataset(tmp_path / "missing", 32)


def test_splits_are_deterministic_and_partition():
    ids = [f"s/{i:03d}" for i in range(138)]
    a, b = holdout_split(ids, 0), holdout_split(list(reversed(ids)), 0)
    assert a == b
    assert holdout_split(ids, 1) != a
    assert (len(a["train"]), len(a["val"]), len(a["test"])) == (82, 28, 28)
    assert set(a["train"]) | set(a["val"]) | set(a["test"]) == set(ids)
    folds = kfold_splits(ids, 5, seed=3)
    assert folds == kfold_splits(ids, 5, seed=3)
    tests = [x for f in folds for x in f["test"]]
    assert sorted(tests) == sorted(ids)  # each sample tested exactly once
    for f in folds:
        assert not (set(f["train"]) & set(f["val"])) and not (set(f["train"]) & set(f["test"]))
        assert not (set(f["val"]) & set(f["test"]))
        assert len(f["train"]) + len(f["val"]) + len(f["test"]) == 138
        assert abs(len(f["test"]) - 138 / 5) < 1 and abs(len(f["val"]) - 138 / 5) < 1
    with pytest.raises(DataError):
        kfold_splits(ids, 2, 0)


@pytest.mark.parametrize("k", [1, 5])
def test_pooled_splits_are_each_sets_own_splits_joined(k):
    mc = [f"montgomery/MCUCXR_{i:04d}" for i in range(138)]
    sz = [f"shenzhen/CHNCXR_{i:04d}" for i in range(566)]
    pooled = kfold_splits(sz + mc, k, seed=0)
    alone = {name: kfold_splits(ids, k, seed=0) for name, ids in (("mc", mc), ("sz", sz))}
    assert len(pooled) == k
    for i, f in enumerate(pooled):
        for part in ("train", "val", "test"):
            assert f[part] == sorted(alone["mc"][i][part] + alone["sz"][i][part])
        n_mc = sum(x.startswith("montgomery/") for x in f["test"])
        assert abs(n_mc - 138 * 0.2) <= 1  # each set keeps its 20 % test share


def test_pooled_split_names_the_set_that_is_too_small():
    ids = [f"big/{i:03d}" for i in range(50)] + ["small/a", "small/b"]
    with pytest.raises(DataError, match="small: 2 samples are too few for 5 folds"):
        kfold_splits(ids, 5, 0)

"""Offline augmentation: deterministic views, image and mask moved together, cached and drawn per epoch."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from lungsam.data import DEMO_DATA, load_dataset
from lungsam.metrics import f1_score
from lungsam.train.augment import AugmentSpec, augment_pair, augmented_views, view_seed
from lungsam.train.config import TrainConfig
from lungsam.train.run import AugmentedViews, epoch_views, train_run


@pytest.fixture(scope="module")
def demo():
    return load_dataset(DEMO_DATA, 64)


def test_views_are_deterministic_and_independent_of_order(demo):
    s = demo.samples[:3]
    a = augmented_views(s, 2, seed=0)
    b = augmented_views(list(reversed(s)), 2, seed=0)
    assert [v.id for v in a[1]] == [f"{x.id}#aug1" for x in s]
    for v in range(2):
        for i in range(3):
            assert np.array_equal(a[v][i].image, b[v][2 - i].image) and np.array_equal(a[v][i].mask, b[v][2 - i].mask)
    c = augmented_views(s, 1, seed=1)
    assert not np.array_equal(a[0][0].image, c[0][0].image)
    assert view_seed(0, "x", 0) != view_seed(0, "x", 1)


def test_augment_moves_image_and_mask_together():
    # the image is the mask painted white: after the joint affine, the bright pixels must still be the mask
    yy, xx = np.mgrid[:96, :96]
    mask = ((yy - 40) ** 2 / 600 + (xx - 50) ** 2 / 300) < 1
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    out_img, out_mask = augment_pair(image, mask, seed=123, spec=AugmentSpec(gamma=(1.0, 1.0)))
    assert out_img.shape == (96, 96, 3) and out_img.dtype == np.uint8 and out_mask.dtype == bool
    assert np.array_equal(out_img[..., 0], out_img[..., 2])
    assert not np.array_equal(out_mask, mask)  # it did move
    assert f1_score(out_img[..., 0] > 127, out_mask) > 0.97
    with pytest.raises(ValueError, match="square"):
        augment_pair(image[:80], mask[:80], seed=0)


def test_draw_views_is_uniform_over_the_original_and_each_view():
    from lungsam.train.augment import draw_views

    pick = draw_views(np.random.default_rng(3), 30000, 2)
    assert pick.shape == (30000,) and set(np.unique(pick)) == {0, 1, 2}
    assert np.all(np.abs(np.bincount(pick) / 30000 - 1 / 3) < 0.02)
    assert np.array_equal(draw_views(np.random.default_rng(3), 30000, 2), pick)  # same generator state, same epoch
    assert set(np.unique(draw_views(np.random.default_rng(0), 50, 0))) == {0}  # no views: always the original


def test_epoch_views_draw_originals_and_views():
    rng = np.random.default_rng(0)
    E = np.zeros((4, 2, 3, 3), np.float16)
    M = [np.zeros((3, 3), bool) for _ in range(4)]
    ids = ["a", "b", "c", "d"]
    assert epoch_views(rng, ids, E, M, None) == (E, M)
    aug = AugmentedViews(embeddings={i: np.full((2, 2, 3, 3), k + 1, np.float16) for k, i in enumerate(ids)},
                         masks={i: [np.ones((3, 3), bool)] * 2 for i in ids}, record={"views": 2})
    seen = set()
    for _ in range(20):
        e, m = epoch_views(rng, ids, E, M, aug)
        assert e.shape == E.shape and len(m) == 4
        for k in range(4):
            orig = bool(e[k].max() == 0)
            assert orig == (not m[k].any())  # embedding and mask come from the same view
            seen.add(orig)
    assert seen == {True, False}


def test_tiny_run_with_augmentation(tmp_path, isolated_cache):
    cfg = TrainConfig(backbone="tiny", folds=1, epochs=2, lr=1e-3, batch_size=4, augment_views=2)
    logs = []
    summary = train_run(cfg, tmp_path / "r", log=logs.append, progress=False)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    rec = run["augmentation"]
    assert rec["views"] == 2 and rec["images"] == 10 and rec["computed"] == 20  # 10 training images x 2 views
    assert run["config"]["augment_views"] == 2
    assert 0.0 <= summary["aggregate"]["test_f1_pooled"]["mean"] <= 1.0
    # a second run reuses the cached views
    train_run(cfg, tmp_path / "r2", log=logs.append, progress=False)
    rec2 = json.loads((tmp_path / "r2" / "run.json").read_text())["augmentation"]
    assert rec2["computed"] == 0 and rec2["cache_hits"] == 20


def test_compare_runs_pairs_test_images(tmp_path):
    from click.testing import CliRunner

    from lungsam.cli import main

    base = TrainConfig(backbone="tiny", folds=1, epochs=2, lr=1e-3, batch_size=4)
    train_run(base, tmp_path / "a", log=lambda m: None, progress=False)
    train_run(TrainConfig(**{**base.to_dict(), "lr": 3e-3}), tmp_path / "b", log=lambda m: None, progress=False)
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "b"), "--out", str(tmp_path / "c.md")])
    assert r.exit_code == 0, r.output
    res = json.loads((tmp_path / "c.json").read_text())
    assert res["n_images"] == 3 and res["runs"][1]["changed"] == {"lr": [0.001, 0.003]}
    fa = json.loads((tmp_path / "a" / "folds" / "fold_0" / "metrics.json").read_text())["per_image"]
    fb = json.loads((tmp_path / "b" / "folds" / "fold_0" / "metrics.json").read_text())["per_image"]
    want = np.mean([b["f1"] - a["f1"] for a, b in zip(fa, fb)])
    assert res["runs"][1]["f1_vs_baseline"]["mean"] == pytest.approx(want)
    assert "lr: 0.001 → 0.003" in (tmp_path / "c.md").read_text()
    # another seed tests other images: refused
    train_run(TrainConfig(**{**base.to_dict(), "seed": 1}), tmp_path / "s", log=lambda m: None, progress=False)
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "s")])
    assert r.exit_code == 1 and "different test splits" in r.output and "seed" in r.output
    # the splits decide, not how --data was spelled
    shutil.copytree(tmp_path / "a", tmp_path / "a2")
    run = json.loads((tmp_path / "a2" / "run.json").read_text())
    run["config"]["data"] = [str(Path(d).resolve()) + "/" for d in run["config"]["data"]]
    (tmp_path / "a2" / "run.json").write_text(json.dumps(run))
    assert CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "a2")]).exit_code == 0
    # a run that has not finished its folds is refused, or compared on its finished folds with --allow-partial
    run["config"]["folds"] = 2
    (tmp_path / "a2" / "run.json").write_text(json.dumps(run))
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "a2")])
    assert r.exit_code == 1 and "has 1 of 2 folds" in r.output and "--allow-partial" in r.output
    r = CliRunner().invoke(main, ["compare", str(tmp_path / "a"), str(tmp_path / "a2"), "--allow-partial"])
    assert r.exit_code == 0 and "**Partial**" in r.output and "| 1/2 |" in r.output

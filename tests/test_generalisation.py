"""Generalisation options: synthetic opacities, burnt-in text/tubes, the acquisition policy, recorded in run.json."""
import json

import numpy as np
import pytest

from lungsam.data import DEMO_DATA, load_dataset
from lungsam.errors import ConfigError
from lungsam.train.augment import AugmentSpec, augment_pair, augmented_views
from lungsam.train.burnin import burn_in
from lungsam.train.config import TrainConfig
from lungsam.train.opacity import OpacitySpec, add_opacities, basal_alpha, opacity_alpha


def two_lungs(side: int = 96) -> np.ndarray:
    yy, xx = np.mgrid[:side, :side]
    left = ((yy - side * 0.5) ** 2 / (side * 0.3) ** 2 + (xx - side * 0.3) ** 2 / (side * 0.12) ** 2) < 1
    right = ((yy - side * 0.5) ** 2 / (side * 0.3) ** 2 + (xx - side * 0.7) ** 2 / (side * 0.12) ** 2) < 1
    return left | right


def radiograph(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    """Bright body, dark lungs, some texture: (S, S, 3) uint8."""
    rng = np.random.default_rng(seed)
    grey = np.where(mask, 60, 200) + rng.integers(-20, 21, size=mask.shape)
    grey = np.clip(grey, 0, 255).astype(np.uint8)
    return np.repeat(grey[..., None], 3, axis=2)


@pytest.mark.parametrize("seed", [0, 1, 7])
def test_opacities_raise_intensity_only_inside_the_lungs(seed):
    mask = two_lungs()
    image = radiograph(mask)
    before = mask.copy()
    out = add_opacities(image, mask, seed)
    assert np.array_equal(mask, before)  # the mask is not changed
    assert out.shape == image.shape and out.dtype == np.uint8
    assert np.array_equal(out[..., 0], out[..., 2])
    assert np.array_equal(out[~mask], image[~mask])  # nothing outside the lung fields moves
    assert (out[mask].astype(int) >= image[mask].astype(int)).all()  # inside: never darker
    raised = (out[..., 0].astype(int) - image[..., 0]) > 5
    assert raised[mask].mean() > 0.05  # ... and visibly whiter somewhere


def test_opacities_are_deterministic_with_the_seed():
    mask = two_lungs()
    image = radiograph(mask)
    a, b, c = add_opacities(image, mask, 3), add_opacities(image, mask, 3), add_opacities(image, mask, 4)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, c)


def test_opacity_alpha_is_zero_outside_and_covers_about_the_asked_fraction():
    mask = two_lungs(128)
    spec = OpacitySpec(coverage=(0.3, 0.3), basal_prob=0.0, edge=1e-6)
    alpha = opacity_alpha(mask, np.random.default_rng(0), spec)
    assert alpha.dtype == np.float32 and (alpha[~mask] == 0).all() and 0 <= alpha.min() <= alpha.max() <= 1
    assert abs((alpha[mask] > 0.5).mean() - 0.3) < 0.02
    assert not opacity_alpha(np.zeros((32, 32), bool), np.random.default_rng(0), spec).any()


def test_basal_opacity_sits_at_the_bottom_of_each_lung():
    mask = two_lungs(128)
    alpha = basal_alpha(mask, np.random.default_rng(0), OpacitySpec(basal_height=(0.3, 0.3)))
    rows = np.nonzero(mask)[0]
    top, bottom = rows.min(), rows.max()
    for half in (alpha[:, :64], alpha[:, 64:]):  # each lung gets its own ramp
        assert half[bottom - 2:bottom + 1].max() > 0.8 and half[top:top + 20].max() == 0


def test_opacities_refuse_mismatched_shapes():
    with pytest.raises(ValueError, match="mask"):
        add_opacities(np.zeros((32, 32, 3), np.uint8), np.zeros((16, 16), bool), 0)


def test_burn_in_is_deterministic_and_draws_something():
    image = radiograph(two_lungs())
    outs = [burn_in(image, s) for s in range(6)]
    assert np.array_equal(outs[0], burn_in(image, 0))
    assert all(o.shape == image.shape and o.dtype == np.uint8 for o in outs)
    assert sum(not np.array_equal(o, image) for o in outs) >= 4


def test_acquisition_policy_keeps_the_mask_geometry_and_is_deterministic():
    # the image is the mask painted white: the acquisition stages change intensities, only the affine moves pixels
    side = 96
    mask = two_lungs(side)
    image = np.repeat((mask * 255).astype(np.uint8)[..., None], 3, axis=2)
    spec = AugmentSpec(policy="acquisition", opacity=1.0)
    img, msk = augment_pair(image, mask, seed=11, spec=spec)
    img2, msk2 = augment_pair(image, mask, seed=11, spec=spec)
    assert np.array_equal(img, img2) and np.array_equal(msk, msk2)
    assert img.shape == (side, side, 3) and img.dtype == np.uint8 and msk.dtype == bool
    _, msk_affine = augment_pair(image, mask, seed=11, spec=AugmentSpec(policy="affine", scale=spec.fov_scale))
    assert np.array_equal(msk, msk_affine)  # the same affine draw moved the mask; nothing else touched it
    assert not np.array_equal(msk, mask)


def test_affine_policy_is_unchanged_by_the_new_options():
    demo = load_dataset(DEMO_DATA, 64).samples[:2]
    plain = augmented_views(demo, 1, seed=0)
    assert AugmentSpec().to_dict() == {"rotate_deg": 10.0, "scale": [0.9, 1.1], "translate": 0.06,
                                       "gamma": [0.7, 1.5], "policy": "affine", "opacity": 0.0}
    with_opacity = augmented_views(demo, 1, seed=0, spec=AugmentSpec(opacity=1.0))
    for a, b in zip(plain[0], with_opacity[0]):
        assert np.array_equal(a.mask, b.mask)
        assert np.array_equal(a.image[~a.mask], b.image[~b.mask])  # opacities only inside the lungs


def test_augment_options_are_checked():
    with pytest.raises(ConfigError, match="augment_views"):
        TrainConfig(opacity_prob=0.5)
    with pytest.raises(ConfigError, match="augment_views"):
        TrainConfig(augment_policy="acquisition")
    with pytest.raises(ConfigError, match="augment_policy"):
        TrainConfig(augment_views=1, augment_policy="mixup")
    with pytest.raises(ConfigError, match="opacity_prob"):
        TrainConfig(augment_views=1, opacity_prob=1.5)
    with pytest.raises(ValueError, match="policy"):
        AugmentSpec(policy="mixup")


def test_cli_train_takes_the_augment_options(tmp_path, isolated_cache):
    from click.testing import CliRunner

    from lungsam.cli import main

    args = ["train", "--backbone", "tiny", "--folds", "1", "--epochs", "1", "--lr", "1e-3", "-q"]
    r = CliRunner().invoke(main, [*args, "--opacity-prob", "0.5", "--out", str(tmp_path / "bad")])
    assert r.exit_code != 0 and "--augment" in r.output
    r = CliRunner().invoke(main, [*args, "--augment", "1", "--augment-policy", "acquisition", "--opacity-prob",
                                  "1", "--out", str(tmp_path / "r")])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["config"]["augment_policy"] == "acquisition" and run["config"]["opacity_prob"] == 1.0
    t = run["augmentation"]["transforms"]
    assert t["policy"] == "acquisition" and t["opacity"] == 1.0
    assert t["opacities"]["strength"] == list(OpacitySpec().strength) and "burn_in" in t
    assert run["augmentation"]["computed"] == 10  # 10 training images x 1 view


def test_cli_policy_choices_are_the_config_policies():
    from lungsam.train.commands import train
    from lungsam.train.config import AUGMENT_POLICIES

    opt = next(p for p in train.params if p.name == "augment_policy")
    assert tuple(opt.type.choices) == AUGMENT_POLICIES

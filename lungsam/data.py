"""Data sets of chest X-rays with lung masks, and deterministic splits. Torch-free.

A data set is a folder with ``images/`` and ``masks/`` holding files with the same stems
(PNG/JPEG/TIFF, 8/16-bit, grayscale or RGB, any size). Pairs are loaded into the **working** frame
(``S x S``): images bilinear, masks nearest and binarised. Bad pairs are skipped, counted and
reported with the file named; a data set with no usable pair is an error.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from .errors import LungsamError
from .imageio import IMAGE_SUFFIXES, ImageReadError, read_image, read_mask
from .preprocess import resize_mask, to_working

DEMO_DATA = "demo:montgomery"


class DataError(LungsamError, ValueError):
    pass


@dataclass
class Sample:
    """One image/mask pair in the working frame.

    Attributes:
        id: ``<dataset>/<stem>``, unique across pooled data sets.
        image: ``(S, S, 3)`` uint8 RGB.
        mask: ``(S, S)`` bool.
        image_path, mask_path: sources.
        original_hw: size of the image file.
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    image_path: Path
    mask_path: Path
    original_hw: tuple[int, int]

    @property
    def content_hash(self) -> str:
        """sha256 of the working-frame image bytes (keys the embedding cache)."""
        return hashlib.sha256(self.image.tobytes() + repr(self.image.shape).encode()).hexdigest()


@dataclass
class Dataset:
    name: str
    root: Path
    samples: list[Sample]
    skipped: list[dict] = field(default_factory=list)

    def by_id(self) -> dict[str, Sample]:
        return {s.id: s for s in self.samples}


def demo_data_dir() -> Path:
    """The small Montgomery demo sample shipped in the package (16 pairs, 256x256)."""
    return Path(str(resources.files("lungsam") / "demo_data" / "montgomery"))


def resolve_data_dir(path: str | Path) -> Path:
    if str(path) == DEMO_DATA:
        return demo_data_dir()
    return Path(path)


def _index_by_stem(folder: Path) -> dict[str, Path]:
    out: dict[str, Path] = {}
    for p in sorted(folder.iterdir()):
        if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES and not p.name.startswith("."):
            out.setdefault(p.stem, p)
    return out


def load_pair(name: str, img_path: Path, mask_path: Path, size: int) -> Sample:
    """Load one pair into the working frame; raises :class:`DataError` with the reason."""
    try:
        img = read_image(img_path)
    except ImageReadError as e:
        raise DataError(str(e)) from e
    try:
        mask = read_mask(mask_path)
    except ImageReadError as e:
        raise DataError(str(e)) from e
    if mask.shape != img.hw:
        raise DataError(f"{mask_path}: mask size {mask.shape[1]}x{mask.shape[0]} differs from image size "
                        f"{img.hw[1]}x{img.hw[0]} ({img_path.name})")
    if not mask.any():
        raise DataError(f"{mask_path}: mask is empty (no foreground pixel)")
    m = resize_mask(mask, (size, size))
    if not m.any():
        raise DataError(f"{mask_path}: mask vanishes at the working resolution {size}x{size}")
    return Sample(id=f"{name}/{img_path.stem}", image=to_working(img.pixels, size), mask=m,
                  image_path=img_path, mask_path=mask_path, original_hw=img.hw)


def load_dataset(path: str | Path, size: int = 256, *, log=None) -> Dataset:
    """Load every usable pair of a data set folder at working resolution ``size``.

    Bad pairs (unreadable file, missing or size-mismatched mask, empty mask) are logged through
    ``log`` (a ``str -> None`` callable), skipped and listed in ``Dataset.skipped``.
    """
    root = resolve_data_dir(path)
    name = "montgomery-demo" if str(path) == DEMO_DATA else root.resolve().name
    img_dir, mask_dir = root / "images", root / "masks"
    for d in (img_dir, mask_dir):
        if not d.is_dir():
            raise DataError(f"{root}: expected folders images/ and masks/ ({d} is missing)")
    images, masks = _index_by_stem(img_dir), _index_by_stem(mask_dir)
    samples, skipped = [], []
    for stem, ip in images.items():
        mp = masks.get(stem)
        try:
            if mp is None:
                raise DataError(f"{ip}: no mask with stem {stem!r} in {mask_dir}")
            samples.append(load_pair(name, ip, mp, size))
        except DataError as e:
            skipped.append({"image": str(ip), "mask": str(mp) if mp else None, "reason": str(e)})
            if log:
                log(f"skipping pair: {e}")
    for stem in sorted(set(masks) - set(images)):
        skipped.append({"image": None, "mask": str(masks[stem]), "reason": f"{masks[stem]}: mask without image"})
        if log:
            log(f"skipping pair: {skipped[-1]['reason']}")
    if not samples:
        raise DataError(f"{root}: no usable image/mask pair ({len(skipped)} skipped)")
    return Dataset(name=name, root=root, samples=samples, skipped=skipped)


def pool(datasets: list[Dataset]) -> Dataset:
    """Concatenate data sets (ids stay unique through their data set prefix)."""
    if len(datasets) == 1:
        return datasets[0]
    ids = [s.id for d in datasets for s in d.samples]
    if len(set(ids)) != len(ids):
        raise DataError("pooled data sets share sample ids; give them folders with different names")
    return Dataset(name="+".join(d.name for d in datasets), root=datasets[0].root,
                   samples=[s for d in datasets for s in d.samples], skipped=[x for d in datasets for x in d.skipped])


# ---------------------------------------------------------------------------------------------
# splits
# ---------------------------------------------------------------------------------------------

def shuffled_ids(ids: list[str], seed: int) -> list[str]:
    """The ids sorted, then permuted by a seeded generator: the order every split and subset draws from."""
    ordered = sorted(ids)
    return [ordered[i] for i in np.random.default_rng(seed).permutation(len(ordered))]


def holdout_split(ids: list[str], seed: int,
                  fractions: tuple[float, float, float] = (0.6, 0.2, 0.2)) -> dict[str, list[str]]:
    """Deterministic train/val/test split (60/20/20 by default) of sample ids."""
    s = shuffled_ids(ids, seed)
    n = len(s)
    n_test = int(round(n * fractions[2]))
    n_val = int(round(n * fractions[1]))
    if n - n_test - n_val < 1 or n_val < 1 or n_test < 1:
        raise DataError(f"{n} samples are too few for a train/val/test split")
    return {"train": sorted(s[: n - n_val - n_test]), "val": sorted(s[n - n_val - n_test: n - n_test]),
            "test": sorted(s[n - n_test:])}


def dataset_of(sample_id: str) -> str:
    """The data set part of a sample id (``<dataset>/<stem>``)."""
    return sample_id.split("/", 1)[0]


def kfold_splits(ids: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """k-fold cross-validation: fold i tests on part i, validates on part (i+1) mod k, trains on the rest.

    With k=5 every fold is a 60/20/20 split and each sample is tested exactly once. ``k == 1``
    gives one :func:`holdout_split`. Pooled data sets are split each on its own (stratified by
    :func:`dataset_of`) and joined fold by fold, so a pooled run's test part of, say, Montgomery in
    fold i is exactly fold i's test part of a Montgomery-only run with the same ``k`` and ``seed``.
    """
    groups: dict[str, list[str]] = {}
    for x in ids:
        groups.setdefault(dataset_of(x), []).append(x)
    per_set = []
    for name, group in sorted(groups.items()):
        try:
            per_set.append(_single_set_splits(group, k, seed))
        except DataError as e:
            raise DataError(f"{name}: {e}" if len(groups) > 1 else str(e)) from None
    return [{part: sorted(x for splits in per_set for x in splits[i][part]) for part in ("train", "val", "test")}
            for i in range(len(per_set[0]))]


def _single_set_splits(ids: list[str], k: int, seed: int) -> list[dict[str, list[str]]]:
    """:func:`kfold_splits` of one data set's ids."""
    if k == 1:
        return [holdout_split(ids, seed)]
    if k < 3:
        raise DataError("--folds must be 1 (one 60/20/20 split) or at least 3")
    s = shuffled_ids(ids, seed)
    parts = [sorted(p.tolist()) for p in np.array_split(np.asarray(s, dtype=object), k)]
    if min(len(p) for p in parts) < 1:
        raise DataError(f"{len(ids)} samples are too few for {k} folds")
    folds = []
    for i in range(k):
        j = (i + 1) % k
        train = sorted(x for m, p in enumerate(parts) if m not in (i, j) for x in p)
        folds.append({"train": train, "val": parts[j], "test": parts[i]})
    return folds

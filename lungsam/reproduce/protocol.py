"""The paper's experimental protocol as resumable steps (``lungsam reproduce``).

Layout of ``OUT/<backbone>/``::

    tables.md, results.json         the paper's Tables 1-10 with our numbers beside them
    figures/                        copies of the figures the tables cite
    runs/                           (git-ignored) one folder per step, each with step.json once finished
      _data/                        symlinked subsets (zero-shot prompt sources, --subset/--quick sets)
      <set>/encode/                 encoder pass over the set (fills the embedding cache)
      <set>/zeroshot_<prompt>/      lungsam.train.evaluate.evaluate(...) of the untuned backbone
      <set>/train/<prompt>_lr.._wd.._k.._e../   lungsam.train.run.train_run(...) runs (grid and k-fold)
      cross/<A>_to_<B>/             evaluate(...) of A's point-prompt run on B
      pooled/points_lr.._wd.._k.._e../   one point-prompt model for both sets (train_run on MC+SZ pooled)
      <set>/unet_k.._e../           the U-Net baseline on the same folds (lungsam.train.unet.train_unet_run)

The protocol reads as its phases (:func:`run_protocol`): :func:`encode_sets`, :func:`zero_shot`,
:func:`hyperparameter_grid`, :func:`kfold_and_pooled`, :func:`cross_dataset`, :func:`unet_baseline`; tables.md is
rewritten after each. The step engine is :mod:`lungsam.reproduce.steps`: a step is skipped when its ``step.json``
holds the same settings; a killed training step is continued with ``train_run(..., resume=True)``; a step whose
folder holds different settings is an error (never overwritten). ``--jobs N`` runs independent training steps N at
a time in worker processes (:meth:`Steps.run_training`), ``--ray`` as Ray tasks. Results are collected by
:mod:`lungsam.reproduce.collect`, costed by :mod:`lungsam.reproduce.cost` and rendered by
:mod:`lungsam.reproduce.tables`.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from ..artifacts import machine_record, package_versions, read_json, utc_now
from ..data import DataError, kfold_splits, load_dataset, shuffled_ids
from ..layout import RunLayout, StepLayout
from ..ranges import check_fields
from . import paper
from .collect import Found, collect
from .steps import Log, ProtocolError, Steps, TrainingStep, _quiet

_LOG = logging.getLogger(__name__)
SETS = ("montgomery", "shenzhen")
PROMPTS = ("points", "box", "both", "auto-box")
ZERO_SHOT_PROMPTS = ("box", "points", "both", "auto-box")
QUICK_EPOCHS = 5
QUICK_SUBSET = 60  # images per set in --quick (seeded random subset; each set is encoded only for these)
QUICK_GRID = ((1e-4, 0.0), (1e-3, 0.0))


@dataclass
class Settings:
    """Everything that defines a reproduction (recorded in results.json).

    Attributes:
        data_root: folder with ``montgomery/`` and ``shenzhen/``.
        backbone, checkpoint: backbone name and resolved weights path (``None`` for ``tiny``).
        quick: the reduced protocol.
        folds: 5 (paper) or 1 (one 60/20/20 split, ``--quick``).
        epochs, patience: per training run.
        grid: ``[(lr, weight_decay)]`` cells tried on one 60/20/20 split per set (prompt ``points``).
        subset: per set, at most this many images (``None``: all), drawn with a seeded permutation.
        unet: train the U-Net baseline (Table 9) on each set's folds.
        encoder_size: the image encoder's input side for every SAM step (``None``: the backbone's native
            one); a smaller one makes the decoder's token grid, and so training, cheaper (results go to
            ``OUT/<backbone>-enc<S>/``).
        cpu_bf16: every training step (SAM decoders and U-Nets) in bfloat16 autocast on a CPU with native
            bfloat16 (results go to ``OUT/<label>-bf16/``: other settings, other steps).
        jobs: training steps run at once, each in its own process with its share of the torch threads (how
            the work is scheduled, not what it computes: steps do not record it and are reused across values).
    """

    data_root: str
    backbone: str
    checkpoint: str | None
    device: str = "auto"
    quick: bool = False
    folds: int = 5
    epochs: int = 100
    patience: int = 15
    grid: list[tuple[float, float]] = field(default_factory=lambda: [(lr, wd) for lr in paper.LR_GRID
                                                                     for wd in paper.WD_GRID])
    subset: dict[str, int | None] = field(default_factory=lambda: {s: None for s in SETS})
    prompts: tuple[str, ...] = PROMPTS
    zero_shot_prompts: tuple[str, ...] = ZERO_SHOT_PROMPTS
    points_per_lung: int = 3
    unet: bool = True
    size: int = 256
    encoder_size: int | None = None
    batch_size: int = 8
    seed: int = 0
    cpu_bf16: bool = False
    jobs: int = 1
    ray: str | None = None  # --ray ADDRESS ("local": a local Ray): training steps as Ray tasks (ray_steps.py)
    ray_cpus: int = 1  # --ray-cpus-per-step: CPUs (torch threads) Ray reserves per training step

    def __post_init__(self) -> None:  # the same ranges as the click options (lungsam.ranges)
        check_fields(self, ("folds", "epochs", "patience", "points_per_lung", "size", "encoder_size", "batch_size",
                            "seed", "jobs"))

    @property
    def label(self) -> str:
        """The results folder's name: the backbone, its encoder input when not native, ``-bf16`` with --cpu-bf16."""
        label = self.backbone if self.encoder_size is None else f"{self.backbone}-enc{self.encoder_size}"
        return label + ("-bf16" if self.cpu_bf16 else "")

    def to_dict(self) -> dict:
        return json.loads(json.dumps(asdict(self)))

    def command(self, out: str | None = None) -> str:
        """The ``lungsam reproduce`` command line that gives these settings (``out``: its --out, when known).

        Options equal to what the mode sets by itself (full or --quick) are left out."""
        full = Settings(data_root=self.data_root, backbone=self.backbone, checkpoint=None)
        mode_epochs = QUICK_EPOCHS if self.quick else full.epochs
        mode_subset = {s: QUICK_SUBSET for s in SETS} if self.quick else full.subset
        parts = ["lungsam reproduce", f"--data-root {self.data_root}", f"--backbone {self.backbone}"]
        if self.checkpoint:
            parts.append(f"--checkpoint {self.checkpoint}")
        if self.device != "auto":
            parts.append(f"--device {self.device}")
        if self.quick:
            parts.append("--quick")
        if out is not None:
            parts.append(f"--out {out}")
        if self.epochs != mode_epochs:
            parts.append(f"--epochs {self.epochs}")
        if self.subset != mode_subset and len(set(self.subset.values())) == 1:
            parts.append(f"--subset {next(iter(self.subset.values()))}")
        if self.size != full.size:
            parts.append(f"--size {self.size}")
        if self.encoder_size is not None:
            parts.append(f"--encoder-size {self.encoder_size}")
        if self.cpu_bf16:
            parts.append("--cpu-bf16")
        if self.jobs != 1:
            parts.append(f"--jobs {self.jobs}")
        if self.ray is not None:
            parts.append(f"--ray {self.ray}")
            if self.ray_cpus != 1:
                parts.append(f"--ray-cpus-per-step {self.ray_cpus}")
        return " ".join(parts)


def protocol_settings(*, data_root: str, backbone: str, checkpoint: str | None = None, device: str = "auto",
                      quick: bool = False, epochs: int | None = None, subset: int | None = None,
                      size: int = 256, encoder_size: int | None = None, cpu_bf16: bool = False,
                      jobs: int = 1, ray: str | None = None, ray_cpus: int = 1) -> Settings:
    """The full protocol, or the ``--quick`` one: one 60/20/20 split, ``QUICK_EPOCHS`` epochs without early stop,
    the 2-cell grid ``QUICK_GRID`` and ``QUICK_SUBSET`` images per set (``epochs``/``subset`` override)."""
    from ..backbones import get_backbone, preprocess_for
    from ..samples import checkpoint_for
    from ..train.config import TrainConfig
    from ..train.engine import mixed_precision, pick_device

    get_backbone(backbone)
    mixed_precision(pick_device(device), False, cpu_bf16)  # --cpu-bf16 where it cannot run fails before any work
    if encoder_size is not None:
        if encoder_size == get_backbone(backbone).preprocess.img_size:
            encoder_size = None  # the native size: the same protocol and results folder as without the option
        else:
            preprocess_for(backbone, encoder_size)  # a size that does not fit fails before any work
    root = Path(data_root).resolve()
    for s in SETS:
        if not (root / s / "images").is_dir() or not (root / s / "masks").is_dir():
            raise ProtocolError(f"{root}: expected {s}/images and {s}/masks")
    ckpt = checkpoint_for(TrainConfig(backbone=backbone, checkpoint=checkpoint))
    if jobs < 1:
        raise ProtocolError("--jobs must be at least 1")
    if ray is not None and jobs != 1:
        raise ProtocolError("--jobs (a local process pool) and --ray (Ray tasks) schedule the same steps: choose one "
                            "(with --ray, --ray-cpus-per-step sets each step's threads)")
    st = Settings(data_root=str(root), backbone=backbone, checkpoint=ckpt, device=device, quick=quick, size=size,
                  encoder_size=encoder_size, cpu_bf16=cpu_bf16, jobs=jobs, ray=ray,
                  ray_cpus=ray_cpus)
    if quick:
        st.folds, st.epochs = 1, QUICK_EPOCHS
        st.grid = list(QUICK_GRID)
        st.subset = {s: QUICK_SUBSET for s in SETS}
    if epochs is not None:
        if epochs < 1:
            raise ProtocolError("--epochs must be at least 1")
        st.epochs = epochs
    if quick:
        st.patience = st.epochs  # no early stop in a short run
    if subset is not None:
        if subset < 5:
            raise ProtocolError("--subset must be at least 5")
        st.subset = {s: subset for s in SETS}
    return st


# ---------------------------------------------------------------------------------------------
# data folders
# ---------------------------------------------------------------------------------------------

def _link_pairs(dest: Path, name: str, pairs: list[tuple[Path, Path]]) -> Path:
    """``dest/<name>/{images,masks}`` holding symlinks (copies where links fail) to ``pairs``; returns the set
    folder."""
    folder = dest / name
    want = sorted(p[0].name for p in pairs)
    if (folder / "images").is_dir() and sorted(p.name for p in (folder / "images").iterdir()) == want:
        return folder
    if folder.exists():
        shutil.rmtree(folder)
    tmp = dest / f".{name}.tmp"
    if tmp.exists():
        shutil.rmtree(tmp)
    for sub in ("images", "masks"):
        (tmp / sub).mkdir(parents=True)
    for img, msk in pairs:
        for src, sub in ((img, "images"), (msk, "masks")):
            try:
                os.symlink(src.resolve(), tmp / sub / src.name)
            except OSError:
                shutil.copy2(src, tmp / sub / src.name)
    tmp.rename(folder)
    return folder


@dataclass
class DataSet:
    name: str            # montgomery | shenzhen
    tag: str             # folder tag under runs/: name, or name-n<N> for a subset
    path: Path           # folder passed to train_run/evaluate
    source: Path         # the user's folder
    ids: list[str]
    n_source: int
    skipped: list[dict]
    splits: list[dict]   # kfold_splits(ids, folds, seed) as train_run computes them
    prompt_source: Path  # folder holding the reference split's training pairs (zero-shot prompt)


def prepare_data(st: Settings, runs: Path, log: Log) -> dict[str, DataSet]:
    """Load each set once (working frame), apply the subset, compute the splits train_run will use."""
    out = {}
    for name in SETS:
        src = Path(st.data_root) / name
        ds = load_dataset(src, st.size, log=log)
        pairs = {s.id: (s.image_path, s.mask_path) for s in ds.samples}
        ids = sorted(pairs)
        cap = st.subset.get(name)
        path, tag = src, name
        if cap is not None and cap < len(ids):
            ids = sorted(shuffled_ids(ids, st.seed)[:cap])
            tag = f"{name}-n{cap}"
            path = _link_pairs(runs / "_data" / tag, name, [pairs[i] for i in ids])
        splits = kfold_splits(ids, st.folds, st.seed)
        ref_train = splits[0]["train"]
        psrc = _link_pairs(runs / "_data" / f"{tag}-k{st.folds}-split0-train", name, [pairs[i] for i in ref_train])
        out[name] = DataSet(name=name, tag=tag, path=path, source=src, ids=ids, n_source=len(ds.samples),
                            skipped=ds.skipped, splits=splits, prompt_source=psrc)
        log(f"{name}: {len(ids)} of {len(ds.samples)} usable pairs ({len(ds.skipped)} skipped); "
            f"{st.folds} fold(s); zero-shot prompt from split 0's {len(ref_train)} training masks")
    return out


# ---------------------------------------------------------------------------------------------
# the protocol, phase by phase
# ---------------------------------------------------------------------------------------------

@dataclass
class Invocation:
    """One ``lungsam reproduce``: its settings, folders, data and steps, and the step folders each table reads
    (``found``, filled as the phases finish). ``step_settings`` is what every SAM step adds to its recorded
    settings (``encoder_size`` when not native; absent otherwise, so earlier steps stay the same)."""

    st: Settings
    root: Path
    data: dict[str, DataSet]
    steps: Steps
    device: str
    weights_sha256: str
    log: Log
    progress: bool
    command: str | None
    started: str
    t0: float
    found: Found = field(default_factory=Found)
    table_of: dict[str, tuple[dict, object]] = field(default_factory=dict)  # step name -> (found's dict, key)

    @property
    def runs(self) -> Path:
        return self.root / "runs"

    @property
    def step_settings(self) -> dict:
        return {} if self.st.encoder_size is None else {"encoder_size": self.st.encoder_size}

    @property
    def quiet_log(self) -> Log:
        return _quiet(self.log)

    def write_tables(self, complete: bool) -> dict:
        """Collect what has finished into results.json and render tables.md (after every phase)."""
        from . import tables

        res = collect(self.st, self.root, self.data, self.steps.records, self.found)
        res.update({
            "format": "lungsam-reproduce/1", "complete": complete, "command": self.command or self.st.command(),
            "settings": self.st.to_dict(), "weights_sha256": self.weights_sha256, "device": self.device,
            "machine": {**machine_record(), "loadavg_at_end": _loadavg()}, "versions": package_versions(),
            "started": self.started, "finished": utc_now(), "wall_time_s": time.perf_counter() - self.t0,
        })
        tables.write(res, self.root)
        return res

    def finished(self, t: TrainingStep) -> None:
        """A training step of a batch finished (or was reused): its table gets the folder, tables.md is rewritten."""
        table, key = self.table_of[t.name]
        table[key] = t.out
        self.write_tables(False)


def run_protocol(st: Settings, out: str | Path, *, command: str | None = None, log: Log = _LOG.info,
                 progress: bool = True) -> dict:
    """Run (or resume) every step of the protocol and write tables.md, results.json and figures; tables.md is
    rewritten after each phase (sections still to run are marked pending)."""
    inv = start(st, out, command, log, progress)
    encode_sets(inv)
    zero_shot(inv)
    inv.write_tables(False)
    grid_val = hyperparameter_grid(inv)
    inv.write_tables(False)
    kfold_and_pooled(inv, grid_val)
    cross_dataset(inv)
    inv.write_tables(False)
    if st.unet:
        unet_baseline(inv)
    return inv.write_tables(True)


def start(st: Settings, out: str | Path, command: str | None, log: Log, progress: bool) -> Invocation:
    """The results root ``OUT/<label>/``, its data folders and an empty step record."""
    from ..embeddings import weights_fingerprint
    from ..train.engine import pick_device

    root = Path(out) / st.label
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    t0, started = time.perf_counter(), utc_now()
    device = pick_device(st.device)
    wsha = weights_fingerprint(st.backbone, st.checkpoint)
    data = prepare_data(st, runs, log)
    steps = Steps(root, log, ray=st.ray, ray_cpus=st.ray_cpus, device=st.device)
    return Invocation(st=st, root=root, data=data, steps=steps, device=device, weights_sha256=wsha, log=log,
                      progress=progress, command=command, started=started, t0=t0)


def encode_sets(inv: Invocation) -> None:
    """Phase 1: the encoder pass per set (fills the shared embedding cache; every later step hits it)."""
    st = inv.st
    for ds in inv.data.values():
        inv.steps.run(f"encode {ds.tag}", "encode", inv.runs / ds.tag / "encode",
                      {"backbone": st.backbone, "weights_sha256": inv.weights_sha256, "data": str(ds.path),
                       "n": len(ds.ids), "size": st.size, **inv.step_settings},
                      lambda ds=ds: _encode(inv, ds))


def _encode(inv: Invocation, ds: DataSet) -> dict:
    """Embed every image of ``ds`` (cached ones are read back); returns the step's info."""
    from ..backbones import build_backbone
    from ..samples import embed_samples, load_data
    from ..train.config import TrainConfig

    st = inv.st
    cfg = TrainConfig(backbone=st.backbone, checkpoint=st.checkpoint, size=st.size, encoder_size=st.encoder_size)
    d = load_data([str(ds.path)], st.size, inv.quiet_log)
    sam = build_backbone(st.backbone, st.checkpoint, encoder_size=st.encoder_size)
    t = time.perf_counter()
    _, cache = embed_samples(sam, cfg, st.checkpoint, d.samples, inv.device, inv.progress)
    return {"n": len(d.samples), "computed": cache.misses, "cache_hits": cache.hits,
            "encode_seconds": time.perf_counter() - t, "device": inv.device, "cache_dir": str(cache.directory)}


def zero_shot(inv: Invocation) -> None:
    """Phase 2 (Tables 1-2): the untuned backbone per set and prompt, prompts from the mean mask of split 0's
    training part."""
    st = inv.st
    for name, ds in inv.data.items():
        for mode in st.zero_shot_prompts:
            o = inv.runs / ds.tag / f"zeroshot_{mode}"
            sets = {"backbone": st.backbone, "weights_sha256": inv.weights_sha256, "data": str(ds.path),
                    "prompt": mode, "prompt_from": str(ds.prompt_source), "points_per_lung": st.points_per_lung,
                    "size": st.size, "threshold": 0.5, **inv.step_settings}
            inv.steps.run(f"zero-shot {ds.tag} {mode}", "zero-shot", o, sets,
                          lambda o=o, ds=ds, mode=mode: _zero_shot_eval(inv, o, ds, mode))
            inv.found.zero[(name, mode)] = o


def _zero_shot_eval(inv: Invocation, out: Path, ds: DataSet, mode: str) -> dict:
    from ..train.evaluate import evaluate

    st = inv.st
    return _brief(evaluate(
        out=out, data_paths=[str(ds.path)], backbone=st.backbone, checkpoint=st.checkpoint, prompt_mode=mode,
        points_per_lung=st.points_per_lung, prompt_from=[str(ds.prompt_source)], threshold=None, size=st.size,
        encoder_size=st.encoder_size, device=inv.device, log=inv.quiet_log, progress=inv.progress))


def sam_training_step(inv: Invocation, ds: DataSet | list[DataSet], prompt: str, lr: float, wd: float, folds: int,
                      kind: str) -> TrainingStep:
    """A SAM decoder training run on one set (``ds``) or several pooled (a list) as a :class:`TrainingStep`."""
    from ..train.config import TrainConfig

    st = inv.st
    sets_ = ds if isinstance(ds, list) else [ds]
    cfg = TrainConfig(data=[str(d.path) for d in sets_], backbone=st.backbone, checkpoint=st.checkpoint,
                      prompt=prompt, points_per_lung=st.points_per_lung, size=st.size, folds=folds,
                      epochs=st.epochs, patience=st.patience, lr=lr, weight_decay=wd, batch_size=st.batch_size,
                      seed=st.seed, device=st.device, encoder_size=st.encoder_size, cpu_bf16=st.cpu_bf16)
    where = inv.runs / "pooled" if len(sets_) > 1 else inv.runs / ds.tag / "train"
    label = "+".join(d.tag for d in sets_)
    return TrainingStep(f"{kind} {label} {prompt} lr={lr:g} wd={wd:g} k={folds}", kind,
                        where / f"{prompt}_lr{lr:g}_wd{wd:g}_k{folds}_e{st.epochs}", "sam", cfg.to_dict(),
                        cfg.comparable(), work=folds * sum(len(d.ids) for d in sets_))


def hyperparameter_grid(inv: Invocation) -> dict[str, dict]:
    """Phase 3: the lr x weight-decay grid on one 60/20/20 split per set (prompt points; every cell of both
    sets may run at once); picks each set's best cell. Returns ``{set: {(lr, wd): validation F1}}``."""
    st, found = inv.st, inv.found
    cells = {(name, lr, wd): sam_training_step(inv, ds, "points", lr, wd, 1, "grid")
             for name, ds in inv.data.items() for lr, wd in st.grid}
    inv.steps.run_training(list(cells.values()), st.jobs, inv.progress)
    found.grid.update({k: t.out for k, t in cells.items()})
    grid_val: dict[str, dict] = {}
    for name in inv.data:
        scores = {(lr, wd): read_json(RunLayout(found.grid[(name, lr, wd)]).metrics_json)["folds"][0]["val"]["f1"]
                  ["mean"] for lr, wd in st.grid}
        grid_val[name] = scores
        found.best_hp[name] = max(st.grid, key=lambda c: (scores[c], -st.grid.index(c)))
        inv.log(f"{name}: best grid cell lr={found.best_hp[name][0]:g} wd={found.best_hp[name][1]:g} "
                f"(val F1 {scores[found.best_hp[name]]:.4f})")
    return grid_val


def kfold_and_pooled(inv: Invocation, grid_val: dict[str, dict]) -> None:
    """Phases 4 and 6: k-fold per prompt with the set's best grid cell (Tables 3-4, 7-8), and one model for
    both sets (Table 10): MC+SZ pooled, points (kfold_splits splits each set on its own, so a set's test images
    in pooled fold i are those of its own k-fold run's fold i: a paired comparison). None depends on another:
    they may run at once."""
    st, found = inv.st, inv.found
    lr, wd = pooled_hyperparameters(grid_val, st.grid)
    found.pooled["hp"] = (lr, wd)
    sam_steps = []
    for name, ds in inv.data.items():
        for prompt in st.prompts:
            sam_steps.append(sam_training_step(inv, ds, prompt, *found.best_hp[name], st.folds, "k-fold"))
            inv.table_of[sam_steps[-1].name] = (found.kfold, (name, prompt))
    sam_steps.append(sam_training_step(inv, list(inv.data.values()), "points", lr, wd, st.folds, "pooled"))
    inv.table_of[sam_steps[-1].name] = (found.pooled, "run")
    inv.steps.run_training(sam_steps, st.jobs, inv.progress, finished=inv.finished)


def cross_dataset(inv: Invocation) -> None:
    """Phase 5 (Tables 5-6): A's point-prompt run (its fold with the best validation F1) on every image of B."""
    data = inv.data
    for a, b in (("shenzhen", "montgomery"), ("montgomery", "shenzhen")):
        run_dir, ds_b = inv.found.kfold[(a, "points")], data[b]
        o = inv.runs / "cross" / f"{data[a].tag}_to_{ds_b.tag}"
        sets = {"run": str(run_dir.relative_to(inv.root)),
                "run_settings": read_json(StepLayout(run_dir).step_json)["settings"],
                "data": str(ds_b.path), "size": inv.st.size}
        inv.steps.run(f"cross {data[a].tag} -> {ds_b.tag}", "cross", o, sets,
                      lambda o=o, r=run_dir, d=ds_b: _cross_eval(inv, o, r, d))
        inv.found.cross[(a, b)] = o


def _cross_eval(inv: Invocation, out: Path, run_dir: Path, ds: DataSet) -> dict:
    from ..train.evaluate import evaluate

    return _brief(evaluate(out=out, data_paths=[str(ds.path)], run_dir=str(run_dir), checkpoint=inv.st.checkpoint,
                           device=inv.device, log=inv.quiet_log, progress=inv.progress))


def unet_baseline(inv: Invocation) -> None:
    """Phase 7 (Table 9): the U-Net baseline on each set's folds: same splits, loss, optimiser and early stopping."""
    from ..train.unet import UNetConfig

    st = inv.st
    unet_steps = []
    for name, ds in inv.data.items():
        ucfg = UNetConfig(data=[str(ds.path)], size=st.size, folds=st.folds, seed=st.seed, epochs=st.epochs,
                          patience=st.patience, batch_size=st.batch_size, device=st.device, cpu_bf16=st.cpu_bf16)
        o = inv.runs / ds.tag / f"unet_k{st.folds}_e{st.epochs}"
        unet_steps.append(TrainingStep(f"unet {ds.tag} k={st.folds}", "unet", o, "unet", ucfg.to_dict(),
                                       ucfg.comparable(), work=st.folds * len(ds.ids)))
        inv.table_of[unet_steps[-1].name] = (inv.found.unet, name)
    inv.steps.run_training(unet_steps, st.jobs, inv.progress, finished=inv.finished)


def pooled_hyperparameters(grid_val: dict[str, dict], cells: list[tuple[float, float]]) -> tuple[float, float]:
    """The grid cell with the best validation F1 averaged over the sets (ties: the earlier cell)."""
    return max(cells, key=lambda c: (sum(v[c] for v in grid_val.values()) / len(grid_val), -cells.index(c)))


def _brief(result: dict) -> dict:
    return {"f1": result["f1"], "iou": result["iou"], "n": result["n"], "threshold": result["threshold"]}


def _loadavg() -> list[float] | None:
    try:
        return [round(x, 2) for x in os.getloadavg()]
    except OSError:
        return None


__all__ = ["DataError", "ProtocolError", "Settings", "protocol_settings", "run_protocol"]

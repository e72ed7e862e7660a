"""The paper's experimental protocol as resumable steps (``lungsam reproduce``).

Layout of ``OUT/<backbone>/``::

    tables.md, results.json         the paper's Tables 1-9 with our numbers beside them
    figures/                        copies of the figures the tables cite
    runs/                           (git-ignored) one folder per step, each with step.json once finished
      _data/                        symlinked subsets (zero-shot prompt sources, --subset/--quick sets)
      <set>/encode/                 encoder pass over the set (fills the embedding cache)
      <set>/zeroshot_<prompt>/      lungsam.train.run.evaluate(...) of the untuned backbone
      <set>/train/<prompt>_lr.._wd.._k.._e../   lungsam.train.run.train_run(...) runs (grid and k-fold)
      cross/<A>_to_<B>/             evaluate(...) of A's point-prompt run on B
      pooled/points_lr.._wd.._k.._e../   one point-prompt model for both sets (train_run on MC+SZ pooled)
      <set>/unet_k.._e../           the U-Net baseline on the same folds (lungsam.train.unet.train_unet_run)

A step is skipped when its ``step.json`` holds the same settings; a killed training step is continued with
``train_run(..., resume=True)``; a step whose folder holds different settings is an error (never overwritten).
``--jobs N`` runs independent training steps N at a time in worker processes (:meth:`Steps.run_training`).
"""
from __future__ import annotations

import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from ..artifacts import machine_record, package_versions, read_json, utc_now, write_json_atomic
from ..data import DataError, kfold_splits, load_dataset, shuffled_ids
from ..errors import LungsamError
from ..ranges import check_fields
from . import paper

Log = Callable[[str], None]
SETS = ("montgomery", "shenzhen")
PROMPTS = ("points", "box", "both", "auto-box")
ZERO_SHOT_PROMPTS = ("box", "points", "both", "auto-box")
QUICK_EPOCHS = 5
QUICK_SUBSET = 60  # images per set in --quick (seeded random subset; each set is encoded only for these)
QUICK_GRID = ((1e-4, 0.0), (1e-3, 0.0))


class ProtocolError(LungsamError, RuntimeError):
    # exit 2: what it reports is the command line or --out's contents (data root layout, option values, a step
    # folder holding other settings), as it always did
    exit_code = 2


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
    """``dest/<name>/{images,masks}`` holding symlinks (copies where links fail) to ``pairs``; returns the set folder."""
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
# steps
# ---------------------------------------------------------------------------------------------

class Steps:
    """Runs steps once: ``step.json`` (settings, seconds, finish time) marks a finished step."""

    def __init__(self, root: Path, log: Log, ray: str | None = None, ray_cpus: int = 1, device: str = "auto"):
        self.root, self.log = root, log
        self.records: list[dict] = []
        # a Ray address: run_training sends its steps to Ray (lungsam.reproduce.ray_steps)
        self.ray, self.ray_cpus, self.device = ray, ray_cpus, device

    def reuse(self, name: str, kind: str, out: Path, settings: dict,
              normalize: Callable[[dict], dict] | None = None) -> dict | None:
        """The record of ``out``'s finished step when it holds ``settings`` (``None`` when it is still to run).
        ``normalize`` maps recorded settings to today's form (a training step recorded before a config field
        existed gets its default); a folder holding other settings is an error."""
        sj = out / "step.json"
        if not sj.exists():
            return None
        old = read_json(sj)
        recorded = old.get("settings")
        if normalize is not None and isinstance(recorded, dict):
            recorded = json.loads(json.dumps(normalize(recorded)))
        if recorded != json.loads(json.dumps(settings)):
            raise ProtocolError(f"{out} holds step {old.get('name')!r} with different settings; remove that folder "
                                f"or choose another --out")
        earlier = next((r for r in self.records if r["out"] == old["out"]), None)
        if earlier is not None:  # the same run serves two parts of the protocol (e.g. a grid cell)
            self.log(f"[{name}] same settings as [{earlier['name']}], sharing {out}")
            rec = {**old, "name": name, "kind": kind, "status": f"shared with: {earlier['name']}"}
        else:
            self.log(f"[{name}] finished earlier ({old['seconds']:.0f} s), reusing {out}")
            rec = {**old, "name": name, "kind": kind, "status": "reused"}
        self.records.append(rec)
        return rec

    def record(self, name: str, kind: str, out: Path, settings: dict, started: str, seconds: float,
               info: dict) -> dict:
        """Write ``out/step.json`` for a step that just ran and keep its record."""
        rec = {"name": name, "kind": kind, "out": str(out.relative_to(self.root)),
               "settings": json.loads(json.dumps(settings)), "started": started, "finished": utc_now(),
               "seconds": seconds, "info": info}
        write_json_atomic(out / "step.json", rec)
        self.log(f"[{name}] done in {seconds:.0f} s")
        self.records.append({**rec, "status": "ran"})
        return self.records[-1]

    def run(self, name: str, kind: str, out: Path, settings: dict, fn: Callable[[], dict | None],
            normalize: Callable[[dict], dict] | None = None) -> dict:
        """Run ``fn`` in this process unless ``out`` holds a finished step with the same settings."""
        rec = self.reuse(name, kind, out, settings, normalize)
        return rec if rec is not None else self.execute(name, kind, out, settings, fn)

    def execute(self, name: str, kind: str, out: Path, settings: dict, fn: Callable[[], dict | None]) -> dict:
        """Run ``fn`` in this process, timed, and record it."""
        self.log(f"[{name}] running -> {out}")
        started, t0 = utc_now(), time.perf_counter()
        info = fn() or {}
        return self.record(name, kind, out, settings, started, time.perf_counter() - t0, info)

    def run_training(self, steps: list["TrainingStep"], jobs: int, progress: bool,
                     finished: Callable[["TrainingStep"], None] = lambda step: None) -> None:
        """Run the training ``steps`` that are not finished yet; ``finished(step)`` follows each step reused or
        done, with the records in the order of ``steps`` (whatever order the steps finish in). The steps must not
        depend on each other.

        ``jobs`` 1 (or one step to run): one after another in this process; the first failure stops the batch.
        Otherwise ``jobs`` at a time in worker processes that split this process's torch threads, costliest step
        first; a failed step does not stop the others, and the failures are raised together once they are done.
        Worker log lines go to stderr, prefixed with the step's name."""
        first, order = len(self.records), {s.name: i for i, s in enumerate(steps)}

        def done(s: TrainingStep) -> None:
            self.records[first:] = sorted(self.records[first:], key=lambda r: order[r["name"]])
            finished(s)

        todo = []
        for s in steps:
            if self.reuse(s.name, s.kind, s.out, s.settings, s.normalize) is None:
                todo.append(s)
            else:
                done(s)
        if self.ray is not None and todo:
            from .ray_steps import run_on_ray

            run_on_ray(self, todo, done, self.ray, cpus_per_step=self.ray_cpus, device=self.device)
        elif jobs <= 1 or len(todo) <= 1:
            for s in todo:
                self.execute(s.name, s.kind, s.out, s.settings,
                             lambda s=s: train_step(s.model, s.config, s.out, _quiet(self.log), progress))
                done(s)
        else:
            self._run_in_workers(todo, min(jobs, len(todo)), done)

    def _run_in_workers(self, todo: list["TrainingStep"], jobs: int, done: Callable[["TrainingStep"], None]) -> None:
        import multiprocessing
        from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

        import torch

        threads = max(1, torch.get_num_threads() // jobs)
        self.log(f"running {len(todo)} training steps, {jobs} at a time ({threads} torch thread(s) each)")
        errors = []
        with ProcessPoolExecutor(max_workers=jobs, mp_context=multiprocessing.get_context("spawn"),
                                 initializer=_init_worker, initargs=(threads,)) as pool:
            pending = {}
            for s in sorted(todo, key=lambda s: -s.work):
                self.log(f"[{s.name}] queued -> {s.out}")
                pending[pool.submit(_train_step_in_worker, s.name, s.model, s.config, s.out)] = s
            try:
                running = set(pending)
                while running:  # waits of at most a second, so Ctrl-C reaches this process at once
                    finished_now, running = wait(running, timeout=1.0, return_when=FIRST_COMPLETED)
                    for fut in finished_now:
                        s = pending[fut]
                        try:
                            started, seconds, info = fut.result()
                        except Exception as e:  # noqa: BLE001 -- reported with the step's name, after the rest
                            self.log(f"[{s.name}] failed: {e}")
                            errors.append((s, e))
                            continue
                        # how it ran, so cost estimates can tell overlapping step times apart
                        info = {**info, "jobs": jobs, "threads": threads}
                        self.record(s.name, s.kind, s.out, s.settings, started, seconds, info)
                        done(s)
            except BaseException:  # Ctrl-C, or a failure here: stop the workers now (a rerun resumes their steps)
                workers = list((pool._processes or {}).values())  # no public way before Python 3.14
                pool.shutdown(wait=False, cancel_futures=True)  # (this forgets the workers)
                for w in workers:
                    w.terminate()
                raise
        if errors:
            raise ProtocolError("training step(s) failed: " + "; ".join(f"[{s.name}] {e}" for s, e in errors)
                                ) from errors[0][1]


@dataclass
class TrainingStep:
    """One training step: a SAM decoder run (``model`` "sam", ``config`` a TrainConfig's dict) or the U-Net
    baseline ("unet", a UNetConfig's dict), in plain values a worker process receives.

    Attributes:
        settings: what ``step.json`` records and a rerun compares (the config's ``comparable()``).
        work: relative cost (training images x folds) to start the costliest steps first.
    """

    name: str
    kind: str
    out: Path
    model: str
    config: dict
    settings: dict
    work: float

    def normalize(self, recorded: dict) -> dict:
        """Recorded settings in today's form (fields added since get their defaults)."""
        config_class, _ = _model_api(self.model)
        return config_class.from_dict(recorded).comparable()


def _model_api(model: str) -> tuple[type, Callable[..., dict]]:
    """``(config class, run trainer)`` of a training step's ``model``: "unet" or "sam"."""
    if model == "unet":
        from ..train.unet import UNetConfig, train_unet_run

        return UNetConfig, train_unet_run
    from ..train.config import TrainConfig
    from ..train.run import train_run

    return TrainConfig, train_run


def train_step(model: str, config: dict, out: Path, log: Log = print, progress: bool = True) -> dict:
    """Train the run ``config`` describes into ``out`` (continuing a killed one); returns the step's info."""
    config_class, train = _model_api(model)
    resume = (out / "run.json").exists()
    if resume:
        log(f"continuing the killed run in {out}")
    try:
        s = train(config_class.from_dict(config), out, resume=resume, log=log, progress=progress)
    except ValueError as e:
        raise ProtocolError(f"{out}: {e}") from e
    return {"test_f1": s["aggregate"]["test_f1_across_folds"], "folds": len(s["folds"])}


def _init_worker(threads: int) -> None:
    import torch

    torch.set_num_threads(threads)


def _train_step_in_worker(name: str, model: str, config: dict, out: Path) -> tuple[str, float, dict]:
    """:func:`train_step` in a worker process (no progress bars; log lines carry the step's name);
    returns ``(started, seconds, info)``."""
    import sys

    def log(m: str) -> None:
        print(f"[{name}] {m}", file=sys.stderr, flush=True)

    started, t0 = utc_now(), time.perf_counter()
    info = train_step(model, config, out, _quiet(log), progress=False)
    return started, time.perf_counter() - t0, info


def _quiet(log: Log) -> Log:
    return lambda m: None if m.startswith("skipping pair") else log(m)


def run_protocol(st: Settings, out: str | Path, *, command: str | None = None, log: Log = print,
                 progress: bool = True) -> dict:
    """Run (or resume) every step of the protocol and write tables.md, results.json and figures."""
    from ..embeddings import weights_fingerprint
    from ..samples import embed_samples, load_data
    from ..train.config import TrainConfig
    from ..train.engine import pick_device
    from ..train.evaluate import evaluate
    from . import tables

    root = Path(out) / st.label
    runs = root / "runs"
    runs.mkdir(parents=True, exist_ok=True)
    t0, started = time.perf_counter(), utc_now()
    device = pick_device(st.device)
    wsha = weights_fingerprint(st.backbone, st.checkpoint)
    data = prepare_data(st, runs, log)
    steps = Steps(root, log, ray=st.ray, ray_cpus=st.ray_cpus, device=st.device)
    qlog = _quiet(log)
    enc = {} if st.encoder_size is None else {"encoder_size": st.encoder_size}  # step settings (absent: native)

    # 1. encoder pass per set (fills the shared embedding cache; all later steps hit it)
    for name, ds in data.items():
        def encode(ds=ds):
            from ..backbones import build_backbone

            cfg = TrainConfig(backbone=st.backbone, checkpoint=st.checkpoint, size=st.size, encoder_size=st.encoder_size)
            d = load_data([str(ds.path)], st.size, qlog)
            sam = build_backbone(st.backbone, st.checkpoint, encoder_size=st.encoder_size)
            t = time.perf_counter()
            _, cache = embed_samples(sam, cfg, st.checkpoint, d.samples, device, progress)
            return {"n": len(d.samples), "computed": cache.misses, "cache_hits": cache.hits,
                    "encode_seconds": time.perf_counter() - t, "device": device, "cache_dir": str(cache.directory)}
        steps.run(f"encode {ds.tag}", "encode", runs / ds.tag / "encode",
                  {"backbone": st.backbone, "weights_sha256": wsha, "data": str(ds.path), "n": len(ds.ids),
                   "size": st.size, **enc}, encode)

    zero, grid, best_hp, kfold, cross, pooled, unet = {}, {}, {}, {}, {}, {}, {}

    def write_tables(complete: bool) -> dict:
        res = tables.collect(st, root, data, steps.records, zero, grid, best_hp, kfold, cross, pooled, unet)
        res.update({
            "format": "lungsam-reproduce/1", "complete": complete, "command": command or st.command(),
            "settings": st.to_dict(), "weights_sha256": wsha, "device": device,
            "machine": {**machine_record(), "loadavg_at_end": _loadavg()}, "versions": package_versions(),
            "started": started, "finished": utc_now(), "wall_time_s": time.perf_counter() - t0,
        })
        tables.write(res, root)
        return res

    # 2. zero-shot (Tables 1-2): prompts from the mean mask of split 0's training part
    for name, ds in data.items():
        for mode in st.zero_shot_prompts:
            o = runs / ds.tag / f"zeroshot_{mode}"
            sets = {"backbone": st.backbone, "weights_sha256": wsha, "data": str(ds.path), "prompt": mode,
                    "prompt_from": str(ds.prompt_source), "points_per_lung": st.points_per_lung, "size": st.size,
                    "threshold": 0.5, **enc}
            steps.run(f"zero-shot {ds.tag} {mode}", "zero-shot", o, sets, lambda o=o, ds=ds, mode=mode: _brief(evaluate(
                out=o, data_paths=[str(ds.path)], backbone=st.backbone, checkpoint=st.checkpoint, prompt_mode=mode,
                points_per_lung=st.points_per_lung, prompt_from=[str(ds.prompt_source)], threshold=None, size=st.size,
                encoder_size=st.encoder_size, device=device, log=qlog, progress=progress)))
            zero[(name, mode)] = o
    write_tables(False)

    def cfg_for(sets_: list[DataSet], prompt: str, lr: float, wd: float, folds: int) -> TrainConfig:
        return TrainConfig(data=[str(d.path) for d in sets_], backbone=st.backbone, checkpoint=st.checkpoint, prompt=prompt,
                           points_per_lung=st.points_per_lung, size=st.size, folds=folds, epochs=st.epochs,
                           patience=st.patience, lr=lr, weight_decay=wd, batch_size=st.batch_size, seed=st.seed,
                           device=st.device, encoder_size=st.encoder_size, cpu_bf16=st.cpu_bf16)

    def train(ds: DataSet | list[DataSet], prompt: str, lr: float, wd: float, folds: int, kind: str) -> TrainingStep:
        sets_ = ds if isinstance(ds, list) else [ds]
        cfg = cfg_for(sets_, prompt, lr, wd, folds)
        where = runs / "pooled" if len(sets_) > 1 else runs / ds.tag / "train"
        label = "+".join(d.tag for d in sets_)
        return TrainingStep(f"{kind} {label} {prompt} lr={lr:g} wd={wd:g} k={folds}", kind,
                            where / f"{prompt}_lr{lr:g}_wd{wd:g}_k{folds}_e{st.epochs}", "sam", cfg.to_dict(),
                            cfg.comparable(), work=folds * sum(len(d.ids) for d in sets_))

    # 3. lr x weight-decay grid on one 60/20/20 split per set (points); every cell of both sets may run at once
    cells = {(name, lr, wd): train(ds, "points", lr, wd, 1, "grid") for name, ds in data.items() for lr, wd in st.grid}
    steps.run_training(list(cells.values()), st.jobs, progress)
    grid.update({k: t.out for k, t in cells.items()})
    grid_val: dict[str, dict] = {}
    for name in data:
        scores = {(lr, wd): read_json(grid[(name, lr, wd)] / "metrics.json")["folds"][0]["val"]["f1"]["mean"]
                  for lr, wd in st.grid}
        grid_val[name] = scores
        best_hp[name] = max(st.grid, key=lambda c: (scores[c], -st.grid.index(c)))
        log(f"{name}: best grid cell lr={best_hp[name][0]:g} wd={best_hp[name][1]:g} "
            f"(val F1 {scores[best_hp[name]]:.4f})")
    write_tables(False)

    table_of: dict[str, tuple[dict, object]] = {}  # step name -> (the dict the tables read, its key there)

    def finished(t: TrainingStep) -> None:
        table, key = table_of[t.name]
        table[key] = t.out
        write_tables(False)

    # 4. k-fold per prompt with the set's best grid cell (Tables 3-4, 7-8), and 6. one model for both sets (Table 10):
    #    MC+SZ pooled, points (kfold_splits splits each set on its own, so a set's test images in pooled fold i are
    #    those of its own k-fold run's fold i: a paired comparison). None depends on another: they may run at once.
    lr, wd = pooled_hyperparameters(grid_val, st.grid)
    pooled["hp"] = (lr, wd)
    sam_steps = []
    for name, ds in data.items():
        for prompt in st.prompts:
            sam_steps.append(train(ds, prompt, *best_hp[name], st.folds, "k-fold"))
            table_of[sam_steps[-1].name] = (kfold, (name, prompt))
    sam_steps.append(train(list(data.values()), "points", lr, wd, st.folds, "pooled"))
    table_of[sam_steps[-1].name] = (pooled, "run")
    steps.run_training(sam_steps, st.jobs, progress, finished=finished)

    # 5. cross-dataset (Tables 5-6): A's point-prompt run (fold with the best validation F1) on all of B
    for a, b in (("shenzhen", "montgomery"), ("montgomery", "shenzhen")):
        run_dir, ds_b = kfold[(a, "points")], data[b]
        o = runs / "cross" / f"{data[a].tag}_to_{ds_b.tag}"
        sets = {"run": str(run_dir.relative_to(root)), "run_settings": read_json(run_dir / "step.json")["settings"],
                "data": str(ds_b.path), "size": st.size}
        steps.run(f"cross {data[a].tag} -> {ds_b.tag}", "cross", o, sets, lambda o=o, r=run_dir, d=ds_b: _brief(evaluate(
            out=o, data_paths=[str(d.path)], run_dir=str(r), checkpoint=st.checkpoint, device=device, log=qlog,
            progress=progress)))
        cross[(a, b)] = o
    write_tables(False)

    # 7. the U-Net baseline (Table 9) on each set's folds: same splits, loss, optimiser and early stopping
    if st.unet:
        from ..train.unet import UNetConfig

        unet_steps = []
        for name, ds in data.items():
            ucfg = UNetConfig(data=[str(ds.path)], size=st.size, folds=st.folds, seed=st.seed, epochs=st.epochs,
                              patience=st.patience, batch_size=st.batch_size, device=st.device, cpu_bf16=st.cpu_bf16)
            o = runs / ds.tag / f"unet_k{st.folds}_e{st.epochs}"
            unet_steps.append(TrainingStep(f"unet {ds.tag} k={st.folds}", "unet", o, "unet", ucfg.to_dict(),
                                           ucfg.comparable(), work=st.folds * len(ds.ids)))
            table_of[unet_steps[-1].name] = (unet, name)
        steps.run_training(unet_steps, st.jobs, progress, finished=finished)

    return write_tables(True)


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

"""``lungsam bench --sweep``: accuracy and latency across encoder input size, precision and backbone
(torch path), so a user can pick a point on the accuracy/latency curve.

What is varied, exactly:

* **encoder input size** (``--sizes``): the image encoder runs at ``s x s`` instead of its native
  size with the *same weights* (nothing is retrained): TinyViT encoders (MobileSAM, LiteMedSAM) change
  only their token-grid bookkeeping, SAM ViTs get their position embedding resized bicubically.
  The prompt encoder's frame follows, so the embedding grid is ``s/16`` (``s/4`` for LiteMedSAM)
  and the low-res mask ``4x`` that; masks are brought back to the working resolution and scored
  there against ground truth. Sizes above a backbone's native size are left out.
* **precision** (``--precisions``): fp32 everywhere; fp16/bf16 autocast with CUDA graphs on GPU only.
* **backbone** (``--backbones``): the run's backbone, plus any other registry name;
  ``name=PATH`` gives a checkpoint path (needed for vit_b/l/h).
* **decoder**: for the run's own backbone two rows per point: ``tuned`` (the run's fine-tuned decoder,
  trained on *native-size* embeddings only, so at other sizes it is used outside its training
  conditions) and ``zero-shot`` (the official pretrained decoder). Other backbones are zero-shot
  only. Tuned rows use the run's validation threshold, zero-shot rows SAM's own (probability 0.5).
  Every row uses the run's learned prompt (``prompt`` column), no ground-truth box.

Latency per row is the tuned (or, for other backbones, zero-shot) pipeline's batch-1 end to end on
the same images (preprocess, encoder, decoder, postprocess; synchronised on GPU), and the
throughput at each ``--batch`` size; the zero-shot decoder of the run's backbone is run on the same
embeddings and is not timed separately (its decoder costs the same).
"""
from __future__ import annotations

import copy
import gc
import logging
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifacts import utc_now, write_json_atomic, write_text_atomic
from ..layout import SweepLayout
from ..metrics import f1_score, iou_score, summarize
from .bench import _finite
from .inputs import Images, load_images
from .machine import describe_machine, full_machine_record, versions
from .plan import BenchError
from .schema import PRECISIONS, validate
from .stats import LATENCY_KEYS, StageTimer, latency_summary, throughput_summary
from .timing import run_pipeline, time_batches

Log = Callable[[str], None]
_LOG = logging.getLogger(__name__)

SWEEP_FORMAT = "lungsam-sweep/1"
ZERO_SHOT_THRESHOLD = 0.5  # SAM's mask_threshold 0.0 on logits

_SUMMARY = {"type": "object", "required": ["mean", "std", "min", "max", "n"]}
_LAT = {"type": "object", "required": ["p50", "p95", "p99", "mean", "min", "max", "n"]}
SWEEP_ROW = {
    "type": "object",
    "required": ["backbone", "img_size", "native_img_size", "precision", "decoder", "status"],
    "properties": {
        "backbone": {"type": "string"}, "img_size": {"type": "integer", "minimum": 1},
        "native_img_size": {"type": "integer", "minimum": 1}, "embedding_size": {"type": "integer", "minimum": 1},
        "precision": {"type": "string", "enum": list(PRECISIONS)},
        "decoder": {"type": "string", "enum": ["tuned", "zero-shot"]},
        "status": {"type": "string", "enum": ["ok", "skipped", "failed"]}, "reason": {"type": ["string", "null"]},
        "threshold": {"type": "number"}, "mode": {"type": ["string", "null"]},
        "accuracy": {"type": "object", "required": ["f1", "iou"], "properties": {"f1": _SUMMARY, "iou": _SUMMARY}},
        "latency_ms": {"type": "object", "required": list(LATENCY_KEYS), "properties": {k: _LAT for k in LATENCY_KEYS}},
        "throughput": {"type": "array", "items": {"type": "object", "required": ["batch", "images_per_s"]}},
    },
}
SWEEP_SCHEMA = {
    "type": "object",
    "required": ["format", "created", "run", "data", "settings", "machine", "versions", "rows"],
    "properties": {"format": {"const": SWEEP_FORMAT}, "rows": {"type": "array", "items": SWEEP_ROW},
                   "data": {"type": "object", "required": ["source", "n_images", "ids"]},
                   "settings": {"type": "object", "required": ["device", "sizes", "precisions", "batches"]}},
}


def validate_sweep(obj: Any) -> list[str]:
    errs = validate(obj, SWEEP_SCHEMA)
    for i, r in enumerate(obj.get("rows", []) if isinstance(obj, dict) else []):
        if isinstance(r, dict) and r.get("status") == "ok" and "accuracy" not in r:
            errs.append(f"$.rows[{i}]: status ok but no accuracy")
        if isinstance(r, dict) and r.get("status") != "ok" and not r.get("reason"):
            errs.append(f"$.rows[{i}]: status {r.get('status')!r} needs a reason")
    return errs


def parse_backbones(items: list[str] | None, default: str) -> list[tuple[str, str | None]]:
    """``["mobile_sam", "vit_b=/w/sam_vit_b.pth"]`` -> ``[(name, checkpoint or None)]``; the run's first."""
    out: list[tuple[str, str | None]] = [(default, None)]
    for it in items or []:
        name, _, path = it.partition("=")
        name = name.strip()
        if name == default:
            if path:
                raise BenchError(f"{name} is the run's backbone: its weights come from the run")
            continue
        out.append((name, path.strip() or None))
    return out


def sizes_for(native: int, sizes: list[int]) -> list[int]:
    return sorted({s for s in sizes if s <= native} | {native}, reverse=True)


def _score(masks: list[np.ndarray], gts: list[np.ndarray]) -> dict:
    return {"f1": summarize(f1_score(p, g) for p, g in zip(masks, gts)),
            "iou": summarize(iou_score(p, g) for p, g in zip(masks, gts))}


def sweep_point(timed, extra, data: Images, batches: list[int], warmup: int, repeats: int,
                tick: Callable[[int], Any]) -> tuple[dict, list[np.ndarray], list[np.ndarray] | None]:
    """Latency/throughput of the ``timed`` backend, masks of ``timed`` and of ``extra`` (a second decoder
    run on the same embeddings, untimed)."""
    n = len(data.images)
    for i in range(warmup):
        j = i % n
        run_pipeline(timed, [data.images[j]], [data.masks[j]])
        tick(1)
    timer = StageTimer(sync=timed.sync)
    masks, extra_masks = [], ([] if extra is not None else None)
    for rep in range(repeats):
        for j in range(n):
            timed.sync()
            t0 = time.perf_counter()
            m, _, enc = run_pipeline(timed, [data.images[j]], [data.masks[j]], timer, with_encoding=True)
            timed.sync()
            timer.add("end_to_end", time.perf_counter() - t0)
            if rep == 0:
                masks.append(m[0])
                if extra is not None:
                    plain = {"emb": enc["emb"], "prompts": extra._prompts([data.masks[j]], 1)}
                    extra_masks.append(extra.postprocess(extra.decode(plain))[0])
            tick(1)
    tput = [throughput_summary(1, timer.samples["end_to_end"])]
    tput += time_batches(timed, data.images, data.masks, [b for b in batches if b > 1], repeats, tick)
    timing = {"latency_ms": {k: latency_summary(timer.samples[k]) for k in LATENCY_KEYS}, "throughput": tput}
    return timing, masks, extra_masks


@dataclass
class SweepContext:
    """What every point of one sweep shares: the run, its images, the device and timing settings, the progress
    bar (``tick``) and the log."""

    rm: Any
    data: Images
    device: str
    batches: list[int]
    warmup: int
    repeats: int
    threads: int | None
    tick: Callable[[int], Any]
    log: Log
    per_point: int


def run_sweep(run_dir: str | Path, out_dir: str | Path, *, data_dir: str | None = None, sizes: list[int],
              precisions: list[str], backbones: list[str] | None = None, device: str = "cpu",
              batches: list[int] | None = None, warmup: int = 1, repeats: int = 2, limit: int | None = None,
              threads: int | None = None, progress: bool = True, log: Log = _LOG.info) -> dict:
    """Accuracy and latency of the run ``run_dir`` (and ``backbones``) at each encoder input size and precision;
    writes ``sweep.json``, ``sweep.md`` and ``sweep.png`` to ``out_dir`` (:class:`lungsam.layout.SweepLayout`)."""
    from tqdm import tqdm

    from ..backbones import get_backbone
    from ..runs import load_run

    t_start = time.perf_counter()
    rm = load_run(run_dir)
    data = load_images(rm.working_size, data_dir, rm.run, rm.split, limit, log)
    batches = sorted(set(batches or [1]) | {1})
    plan_bb = parse_backbones(backbones, rm.backbone)
    n_points = sum(len(sizes_for(get_backbone(b).preprocess.img_size, sizes)) for b, _ in plan_bb) * len(precisions)
    per_point = calls_per_point(warmup, repeats, len(data.images), batches)
    bar = tqdm(total=n_points * per_point, unit="call", desc="sweep", disable=not progress)
    ctx = SweepContext(rm, data, device, batches, warmup, repeats, threads, bar.update, log, per_point)
    rows: list[dict] = []
    for name, ckpt in plan_bb:
        rows += sweep_backbone(ctx, name, ckpt, sizes, precisions)
    bar.close()
    settings = {"device": device, "sizes": sizes, "precisions": precisions, "batches": batches,
                "warmup": warmup, "repeats": repeats, "threads": threads}
    out = sweep_record(run_dir, rm, data, settings, rows, time.perf_counter() - t_start)
    write_sweep(out, out_dir)
    return out


def calls_per_point(warmup: int, repeats: int, n_images: int, batches: list[int]) -> int:
    """Pipeline calls one sweep point makes (the progress bar's unit)."""
    return warmup + repeats * n_images + sum(1 + repeats * len(range(0, n_images, b)) for b in batches if b > 1)


def sweep_backbone(ctx: SweepContext, name: str, ckpt: str | None, sizes: list[int],
                   precisions: list[str]) -> list[dict]:
    """Every (size, precision) point of one backbone; the run's own backbone also gets its tuned decoder. Weights
    that cannot be loaded make every point of the backbone a skipped row."""
    import torch

    from ..backbones import build_backbone, get_backbone
    from ..runs import resolve_checkpoint

    spec0 = get_backbone(name).preprocess
    own = name == ctx.rm.backbone
    try:
        pre_sam = build_backbone(name, resolve_checkpoint(ctx.rm.run) if own else ckpt)
    except Exception as e:  # noqa: BLE001 - missing weights: report, go on
        ctx.tick(len(sizes_for(spec0.img_size, sizes)) * len(precisions) * ctx.per_point)
        return [{"backbone": name, "img_size": s, "native_img_size": spec0.img_size, "precision": p,
                 "decoder": "zero-shot", "status": "skipped", "reason": f"weights: {e}"}
                for s in sizes_for(spec0.img_size, sizes) for p in precisions]
    rows: list[dict] = []
    for s in sizes_for(spec0.img_size, sizes):
        for p in precisions:
            point = sweep_point_rows(ctx, name, own, pre_sam, spec0, s, p)
            rows += point
            gc.collect()
            if ctx.device == "cuda":
                torch.cuda.empty_cache()
            _log_point(ctx.log, name, s, p, point[0])
    return rows


def sweep_point_rows(ctx: SweepContext, name: str, own: bool, pre_sam, spec0, s: int, p: str) -> list[dict]:
    """The rows of one point (backbone ``name`` at encoder input ``s``, precision ``p``): for the run's own
    backbone the tuned row (timed) and the zero-shot row (same embeddings, untimed); else the zero-shot row."""
    from ..backbones import resize_encoder
    from .torch_backend import TorchBackend, TorchUnavailable, check_torch_available

    rm, device = ctx.rm, ctx.device
    base = {"backbone": name, "img_size": s, "native_img_size": spec0.img_size, "precision": p}
    try:
        check_torch_available(device, p)
        mode = "cuda_graph" if (device == "cuda" and p != "fp32") else "eager"
        zs_sam, spec = resize_encoder(pre_sam, spec0, s)
        zs = TorchBackend(zs_sam if own else copy.deepcopy(zs_sam), spec, rm.prompt, ZERO_SHOT_THRESHOLD,
                          rm.working_size, device=device, precision=p, mode="eager" if own else mode,
                          threads=ctx.threads)
        base = {**base, "embedding_size": spec.embedding_size}
        if own:
            rows = _tuned_rows(ctx, base, zs, spec0, spec, s, p, mode)
        else:
            timing, masks, _ = sweep_point(zs, None, ctx.data, ctx.batches, ctx.warmup, ctx.repeats, ctx.tick)
            rows = [{**base, "decoder": "zero-shot", "status": "ok", "reason": None,
                     "threshold": ZERO_SHOT_THRESHOLD, "mode": mode, "accuracy": _score(masks, ctx.data.masks),
                     **timing}]
        zs.close()
        return rows
    except TorchUnavailable as e:
        ctx.tick(ctx.per_point)
        return [{**_point_base(base), "decoder": "tuned" if own else "zero-shot", "status": "skipped",
                 "reason": str(e)}]
    except Exception as e:  # noqa: BLE001
        ctx.log(f"sweep {name} {s} {p} failed: {type(e).__name__}: {e}")
        return [{**_point_base(base), "decoder": "tuned" if own else "zero-shot", "status": "failed",
                 "reason": f"{type(e).__name__}: {e}"}]


def _point_base(base: dict) -> dict:
    """A point's identifying keys (a row that did not run has no embedding size)."""
    return {k: base[k] for k in ("backbone", "img_size", "native_img_size", "precision")}


def _tuned_rows(ctx: SweepContext, base: dict, zs, spec0, spec, s: int, p: str, mode: str) -> list[dict]:
    """The run's own backbone at one point: its tuned decoder timed, the official decoder on the same
    embeddings."""
    from ..backbones import resize_encoder
    from .torch_backend import TorchBackend

    rm = ctx.rm
    t_sam, _ = resize_encoder(rm.sam, spec0, s)
    timed = TorchBackend(copy.deepcopy(t_sam) if t_sam is rm.sam else t_sam, spec, rm.prompt, rm.threshold,
                         rm.working_size, device=ctx.device, precision=p, mode=mode, threads=ctx.threads)
    timing, masks, zs_masks = sweep_point(timed, zs, ctx.data, ctx.batches, ctx.warmup, ctx.repeats, ctx.tick)
    timed.close()
    return [{**base, "decoder": "tuned", "status": "ok", "reason": None, "threshold": rm.threshold, "mode": mode,
             "accuracy": _score(masks, ctx.data.masks), **timing},
            {**base, "decoder": "zero-shot", "status": "ok", "reason": None, "threshold": ZERO_SHOT_THRESHOLD,
             "mode": "same embeddings as the tuned row (decoder not timed separately)",
             "accuracy": _score(zs_masks, ctx.data.masks)}]


def _log_point(log: Log, name: str, s: int, p: str, r: dict) -> None:
    if r["status"] == "ok":
        log(f"  {name} {s} {p}: F1 {r['accuracy']['f1']['mean']:.4f}, end-to-end p50 "
            f"{r['latency_ms']['end_to_end']['p50']:.2f} ms, best "
            f"{max(t['images_per_s'] for t in r['throughput']):.1f} img/s")


def sweep_record(run_dir: str | Path, rm, data: Images, settings: dict, rows: list[dict], wall_s: float) -> dict:
    """``sweep.json`` (format :data:`SWEEP_FORMAT`), strict JSON, checked against :data:`SWEEP_SCHEMA`."""
    out = {"format": SWEEP_FORMAT, "created": utc_now(), "command": [Path(sys.argv[0]).name] + sys.argv[1:],
           "run": {"path": str(Path(run_dir).resolve()), "backbone": rm.backbone, "fold": rm.fold,
                   "prompt": rm.prompt.mode, "threshold": rm.threshold, "working_size": rm.working_size},
           "data": {"source": data.source, "n_images": len(data.ids), "ids": data.ids},
           "settings": settings, "machine": full_machine_record(), "versions": versions(), "rows": rows,
           "wall_s": wall_s}
    out = _finite(out)
    errs = validate_sweep(out)
    if errs:
        raise RuntimeError("sweep.json does not match its schema: " + "; ".join(errs[:10]))
    return out


def write_sweep(res: dict, out_dir: str | Path) -> SweepLayout:
    """``sweep.json``, the ``sweep.md`` rendered from it and ``sweep.png``, into ``out_dir``."""
    layout = SweepLayout(Path(out_dir))
    layout.root.mkdir(parents=True, exist_ok=True)
    write_json_atomic(layout.sweep_json, res)
    write_text_atomic(layout.sweep_md, sweep_markdown(res))
    sweep_chart(res, layout.sweep_png)
    return layout


def sweep_markdown(res: dict) -> str:
    run, s = res["run"], res["settings"]
    lines = [f"## lungsam bench --sweep: run {Path(run['path']).name} ({run['backbone']}, prompt "
             f"`{run['prompt']}`)", "",
             f"- machine: {describe_machine(res['machine'])}",
             f"- data: {res['data']['source']}, scored at the working resolution {run['working_size']}",
             f"- device {s['device']}, warm-up {s['warmup']}, repeats {s['repeats']}",
             "- same weights at every size (not retrained); `tuned` = the run's decoder (trained at the native size "
             "only), `zero-shot` = the official decoder", "",
             "| backbone | encoder input | precision | decoder | F1 mean ± std (min) | IoU mean | encoder p50 ms "
             "| end-to-end p50 / p95 ms | images/s (batch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        native = " (native)" if r["img_size"] == r["native_img_size"] else ""
        head = f"| {r['backbone']} | {r['img_size']}{native} | {r['precision']} | {r['decoder']} |"
        if r["status"] != "ok":
            lines.append(head + f" **{r['status']}**: {r['reason']} | | | | |")
            continue
        f1 = r["accuracy"]["f1"]
        lat = r.get("latency_ms")
        enc = f"{lat['encoder']['p50']:.2f}" if lat else "(as above)"
        e2e = f"{lat['end_to_end']['p50']:.2f} / {lat['end_to_end']['p95']:.2f}" if lat else "(as above)"
        tp = ", ".join(f"{t['images_per_s']:.1f} ({t['batch']})" for t in r.get("throughput", [])) or "(as above)"
        lines.append(head + f" {f1['mean']:.4f} ± {f1['std']:.4f} ({f1['min']:.4f}) | "
                     f"{r['accuracy']['iou']['mean']:.4f} | {enc} | {e2e} | {tp} |")
    return "\n".join(lines) + "\n"


def sweep_chart(res: dict, path: str | Path) -> Path | None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ok = [r for r in res["rows"] if r["status"] == "ok"]
    if not ok:
        return None
    fig, ax = plt.subplots(figsize=(8, 5))
    groups: dict[tuple, list[dict]] = {}
    timed = {(r["backbone"], r["img_size"], r["precision"]): r for r in ok if r.get("latency_ms")}
    for r in ok:
        groups.setdefault((r["backbone"], r["precision"], r["decoder"]), []).append(r)
    for (bb, p, dec), rs in groups.items():
        keys = [(r, (r["backbone"], r["img_size"], r["precision"])) for r in rs]
        pts = [(timed[k]["latency_ms"]["end_to_end"]["p50"], r["accuracy"]["f1"]["mean"], r["img_size"])
               for r, k in keys if k in timed]
        if not pts:
            continue
        pts.sort()
        ax.plot([x for x, _, _ in pts], [y for _, y, _ in pts], marker="o", linestyle="-" if dec == "tuned" else "--",
                label=f"{bb} {p} {dec}")
        for x, y, s in pts:
            ax.annotate(str(s), (x, y), textcoords="offset points", xytext=(3, 3), fontsize=7)
    ax.set_xscale("log")
    ax.set_xlabel("end-to-end p50 ms per image (batch 1, log)")
    ax.set_ylabel("F1 (mean, working resolution)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    ax.set_title(f"accuracy vs latency by encoder input size — {describe_machine(res['machine'])}", fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path

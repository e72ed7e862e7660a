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
import sys
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..artifacts import utc_now, write_json_atomic, write_text_atomic
from ..metrics import f1_score, iou_score, summarize
from .bench import BenchError, Images, bundle_run, load_images, run_pipeline, time_batches
from .machine import describe_machine, full_machine_record, versions
from .schema import PRECISIONS, validate
from .stats import LATENCY_KEYS, StageTimer, latency_summary, throughput_summary

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


def run_sweep(run_dir: str | Path, out_dir: str | Path, *, data_dir: str | None = None, sizes: list[int],
              precisions: list[str], backbones: list[str] | None = None, device: str = "cpu",
              batches: list[int] | None = None, warmup: int = 1, repeats: int = 2, limit: int | None = None,
              threads: int | None = None, progress: bool = True, log: Callable[[str], None] = print) -> dict:
    import torch
    from tqdm import tqdm

    from ..backbones import build_backbone, get_backbone, resize_encoder
    from ..runs import load_run, resolve_checkpoint
    from .torch_backend import TorchBackend, TorchUnavailable, check_torch_available

    t_start = time.perf_counter()
    rm = load_run(run_dir)
    data = load_images(rm.working_size, data_dir, rm.run, rm.split, limit, log)
    batches = sorted(set(batches or [1]) | {1})
    plan_bb = parse_backbones(backbones, rm.backbone)
    rows: list[dict] = []
    n_points = sum(len(sizes_for(get_backbone(b).preprocess.img_size, sizes)) for b, _ in plan_bb) * len(precisions)
    per_point = warmup + repeats * len(data.images) + sum(1 + repeats * len(range(0, len(data.images), b))
                                                        for b in batches if b > 1)
    bar = tqdm(total=n_points * per_point, unit="call", desc="sweep", disable=not progress)
    for name, ckpt in plan_bb:
        spec0 = get_backbone(name).preprocess
        own = name == rm.backbone
        try:
            if own:
                tuned_sam = rm.sam
                pre_sam = build_backbone(name, resolve_checkpoint(rm.run))
            else:
                tuned_sam = None
                pre_sam = build_backbone(name, ckpt)
        except Exception as e:  # noqa: BLE001 - missing weights: report, go on
            for s in sizes_for(spec0.img_size, sizes):
                for p in precisions:
                    rows.append({"backbone": name, "img_size": s, "native_img_size": spec0.img_size, "precision": p,
                                 "decoder": "zero-shot", "status": "skipped", "reason": f"weights: {e}"})
            bar.update(len(sizes_for(spec0.img_size, sizes)) * len(precisions) * per_point)
            continue
        for s in sizes_for(spec0.img_size, sizes):
            for p in precisions:
                base = {"backbone": name, "img_size": s, "native_img_size": spec0.img_size, "precision": p}
                try:
                    check_torch_available(device, p)
                    mode = "cuda_graph" if (device == "cuda" and p != "fp32") else "eager"
                    zs_sam, spec = resize_encoder(pre_sam, spec0, s)
                    zs = TorchBackend(zs_sam if own else copy.deepcopy(zs_sam), spec, rm.prompt, ZERO_SHOT_THRESHOLD,
                                      rm.working_size, device=device, precision=p,
                                      mode="eager" if own else mode, threads=threads)
                    if own:
                        t_sam, _ = resize_encoder(tuned_sam, spec0, s)
                        timed = TorchBackend(copy.deepcopy(t_sam) if t_sam is tuned_sam else t_sam, spec, rm.prompt,
                                             rm.threshold, rm.working_size, device=device, precision=p, mode=mode,
                                             threads=threads)
                        timing, masks, zs_masks = sweep_point(timed, zs, data, batches, warmup, repeats, bar.update)
                        rows.append({**base, "embedding_size": spec.embedding_size, "decoder": "tuned",
                                     "status": "ok", "reason": None, "threshold": rm.threshold, "mode": mode,
                                     "accuracy": _score(masks, data.masks), **timing})
                        rows.append({**base, "embedding_size": spec.embedding_size, "decoder": "zero-shot",
                                     "status": "ok", "reason": None, "threshold": ZERO_SHOT_THRESHOLD,
                                     "mode": "same embeddings as the tuned row (decoder not timed separately)",
                                     "accuracy": _score(zs_masks, data.masks)})
                        timed.close()
                    else:
                        timing, masks, _ = sweep_point(zs, None, data, batches, warmup, repeats, bar.update)
                        rows.append({**base, "embedding_size": spec.embedding_size, "decoder": "zero-shot",
                                     "status": "ok", "reason": None, "threshold": ZERO_SHOT_THRESHOLD, "mode": mode,
                                     "accuracy": _score(masks, data.masks), **timing})
                    zs.close()
                except TorchUnavailable as e:
                    rows.append({**base, "decoder": "tuned" if own else "zero-shot", "status": "skipped",
                                 "reason": str(e)})
                    bar.update(per_point)
                except Exception as e:  # noqa: BLE001
                    rows.append({**base, "decoder": "tuned" if own else "zero-shot", "status": "failed",
                                 "reason": f"{type(e).__name__}: {e}"})
                    log(f"sweep {name} {s} {p} failed: {type(e).__name__}: {e}")
                gc.collect()
                if device == "cuda":
                    torch.cuda.empty_cache()
                r = rows[-1] if rows[-1].get("decoder") == "tuned" or not own else rows[-2]
                if r["status"] == "ok":
                    log(f"  {name} {s} {p}: F1 {r['accuracy']['f1']['mean']:.4f}, end-to-end p50 "
                        f"{r['latency_ms']['end_to_end']['p50']:.2f} ms, best "
                        f"{max(t['images_per_s'] for t in r['throughput']):.1f} img/s")
        del pre_sam
    bar.close()
    out = {"format": SWEEP_FORMAT, "created": utc_now(), "command": [Path(sys.argv[0]).name] + sys.argv[1:],
           "run": {"path": str(Path(run_dir).resolve()), "backbone": rm.backbone, "fold": rm.fold,
                   "prompt": rm.prompt.mode, "threshold": rm.threshold, "working_size": rm.working_size},
           "data": {"source": data.source, "n_images": len(data.ids), "ids": data.ids},
           "settings": {"device": device, "sizes": sizes, "precisions": precisions, "batches": batches,
                        "warmup": warmup, "repeats": repeats, "threads": threads},
           "machine": full_machine_record(), "versions": versions(), "rows": rows,
           "wall_s": time.perf_counter() - t_start}
    from .bench import _finite

    out = _finite(out)
    errs = validate_sweep(out)
    if errs:
        raise RuntimeError("sweep.json does not match its schema: " + "; ".join(errs[:10]))
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "sweep.json", out)
    write_text_atomic(out_dir / "sweep.md", sweep_markdown(out))
    sweep_chart(out, out_dir / "sweep.png")
    return out


def sweep_markdown(res: dict) -> str:
    run, s = res["run"], res["settings"]
    lines = [f"## lungsam bench --sweep: run {Path(run['path']).name} ({run['backbone']}, prompt `{run['prompt']}`)", "",
             f"- machine: {describe_machine(res['machine'])}",
             f"- data: {res['data']['source']}, scored at the working resolution {run['working_size']}",
             f"- device {s['device']}, warm-up {s['warmup']}, repeats {s['repeats']}",
             "- same weights at every size (not retrained); `tuned` = the run's decoder (trained at the native size "
             "only), `zero-shot` = the official decoder", "",
             "| backbone | encoder input | precision | decoder | F1 mean ± std (min) | IoU mean | encoder p50 ms "
             "| end-to-end p50 / p95 ms | images/s (batch) |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        head = f"| {r['backbone']} | {r['img_size']}" + (" (native)" if r["img_size"] == r["native_img_size"] else "") \
               + f" | {r['precision']} | {r['decoder']} |"
        if r["status"] != "ok":
            lines.append(head + f" **{r['status']}**: {r['reason']} | | | | |")
            continue
        f1 = r["accuracy"]["f1"]
        lat = r.get("latency_ms")
        enc = f"{lat['encoder']['p50']:.2f}" if lat else "(as above)"
        e2e = f"{lat['end_to_end']['p50']:.2f} / {lat['end_to_end']['p95']:.2f}" if lat else "(as above)"
        tp = ", ".join(f"{t['images_per_s']:.1f} ({t['batch']})" for t in r.get("throughput", [])) or "(as above)"
        lines.append(head + f" {f1['mean']:.4f} ± {f1['std']:.4f} ({f1['min']:.4f}) | {r['accuracy']['iou']['mean']:.4f} "
                     f"| {enc} | {e2e} | {tp} |")
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
        pts = [(timed[(r["backbone"], r["img_size"], r["precision"])]["latency_ms"]["end_to_end"]["p50"],
                r["accuracy"]["f1"]["mean"], r["img_size"]) for r in rs if (r["backbone"], r["img_size"], r["precision"]) in timed]
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


def run_sweep_cli(*, bundle, run, data_dir, out_dir, sizes, precisions, backbones, device, batches, warmup, repeats,
                  limit, threads) -> None:
    import click

    from ..data import DataError
    from ..runs import RunError

    run_dir = run
    if run_dir is None:
        if bundle is None:
            raise click.UsageError("--sweep needs BUNDLE (whose run is used) or --run RUN")
        from ..artifacts import read_json

        run_dir, _ = bundle_run(read_json(Path(bundle) / "manifest.json"))
        if run_dir is None or not Path(run_dir, "run.json").exists():
            raise click.ClickException(f"the bundle's run {run_dir} is not here; pass --run RUN")
    try:
        res = run_sweep(run_dir, out_dir, data_dir=data_dir, sizes=sizes or [1024, 768, 512, 384, 256],
                        precisions=precisions or ["fp32", "fp16"], backbones=backbones, device=device, batches=batches,
                        warmup=warmup, repeats=repeats, limit=limit, threads=threads,
                        log=lambda m: click.echo(m, err=True))
    except (BenchError, RunError, DataError) as e:
        raise click.ClickException(str(e)) from e
    click.echo(f"wrote {Path(out_dir) / 'sweep.json'}, sweep.md, sweep.png ({res['wall_s']:.0f} s)")

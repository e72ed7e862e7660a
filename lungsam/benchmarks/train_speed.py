"""Training-speed benchmark: what the frozen-encoder embedding cache buys.

Measured side by side in one process on the same images and decoder settings:

* **cached epoch**: embeddings read from the on-disk cache (float16 ``.npy``) + one decoder epoch;
* **recompute epoch**: the image encoder runs on every batch (no cache) + the same decoder steps;
* **decoder time per sample** at several batch sizes (forward + backward + Adam step, cached inputs); on a CPU
  with native bfloat16, also with ``--cpu-bf16``'s bfloat16 autocast, in the same process right after.

Writes ``train_speed.json`` and ``train_speed.md``. Nothing here is a test; figures are reported.
"""
from __future__ import annotations

import logging
import time
from pathlib import Path

import numpy as np
import torch

from ..artifacts import machine_record, package_versions, utc_now, write_json_atomic, write_text_atomic
from ..backbones import build_backbone, preprocess_for
from ..layout import TrainSpeedLayout
from ..preprocess import encoder_input
from ..prompts import learn_prompt
from ..samples import checkpoint_for, embed_samples, load_data
from ..train import engine
from ..train.config import TrainConfig
from ..train.engine import DecoderTrainer, mixed_precision, pick_device

_LOG = logging.getLogger(__name__)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _step_seconds_per_sample(trainer: DecoderTrainer, emb: np.ndarray, masks: list[np.ndarray], bs: int) -> dict:
    """Seconds per sample of one decoder epoch at batch ``bs`` over as many whole batches as ``emb`` holds,
    after a two-batch warm-up."""
    trainer.batch_size = bs
    trainer.train_epoch(emb[:2 * bs], masks[:2 * bs])
    n = (len(emb) // bs) * bs
    _, secs = trainer.train_epoch(emb[:n], masks[:n])
    return {"batch_size": bs, "seconds_per_sample": secs / n, "samples": n}


def measure_train_speed(cfg: TrainConfig, n_images: int, batch_sizes: tuple[int, ...] = (1, 4, 8, 16),
                        log=_LOG.info) -> dict:
    """Time cached vs recomputed epochs and the decoder step per sample (see module docstring)."""
    device = pick_device(cfg.device)
    mixed_precision(device, cfg.amp, cfg.cpu_bf16)  # --cpu-bf16 where it cannot run fails before any work
    ckpt = checkpoint_for(cfg)
    data = load_data(cfg.data, cfg.size, log)
    samples = data.samples[:n_images]
    spec = preprocess_for(cfg.backbone, cfg.encoder_size)
    sam = build_backbone(cfg.backbone, ckpt, encoder_size=cfg.encoder_size)
    masks = [s.mask for s in samples]
    prompt = learn_prompt(masks, cfg.prompt, cfg.points_per_lung)

    embed_samples(sam, cfg, ckpt, samples, device, progress=False)  # fill the cache (not timed)
    kw = dict(lr=cfg.lr, weight_decay=cfg.weight_decay, batch_size=cfg.batch_size, box_jitter=cfg.box_jitter,
              device=device, amp=cfg.amp, seed=cfg.seed)
    trainer = DecoderTrainer(sam, spec, cfg.size, prompt, cpu_bf16=cfg.cpu_bf16, **kw)
    # cached epoch: read embeddings from disk, then one decoder epoch
    _sync(device)
    t0 = time.perf_counter()
    emb, _ = embed_samples(sam, cfg, ckpt, samples, device, progress=False)
    t_read = time.perf_counter() - t0
    _, t_dec = trainer.train_epoch(emb, masks)
    cached = t_read + t_dec

    # recompute epoch: encoder on every batch, then the same decoder step
    encoder = sam.image_encoder.to(device).eval()
    _sync(device)
    t0 = time.perf_counter()
    t_enc = 0.0
    for s in range(0, len(samples), cfg.batch_size):
        chunk = samples[s:s + cfg.batch_size]
        te = time.perf_counter()
        with torch.no_grad():
            x = torch.from_numpy(np.stack([encoder_input(c.image, spec) for c in chunk])).to(device)
            e = encoder(x).float().cpu().numpy()
        _sync(device)
        t_enc += time.perf_counter() - te
        trainer.step(e, [c.mask for c in chunk])  # the same optimiser step the cached epoch takes
    _sync(device)
    recompute = time.perf_counter() - t0

    sizes = [bs for bs in batch_sizes if bs <= len(samples)]
    per_sample = [_step_seconds_per_sample(trainer, emb, masks, bs) for bs in sizes]
    per_sample_bf16 = None
    if device == "cpu" and not cfg.cpu_bf16 and engine.cpu_has_native_bf16():  # the --cpu-bf16 steps beside them
        bf16 = DecoderTrainer(sam, spec, cfg.size, prompt, cpu_bf16=True, **kw)
        per_sample_bf16 = [_step_seconds_per_sample(bf16, emb, masks, bs) for bs in sizes]

    return {
        "created": utc_now(), "machine": machine_record(), "versions": package_versions(), "device": device,
        "backbone": cfg.backbone, "images": len(samples), "batch_size": cfg.batch_size, "working_size": cfg.size,
        "encoder_size": spec.img_size, "embedding_grid": spec.embedding_size,
        "epoch_cached_s": cached, "epoch_cached_read_s": t_read, "epoch_cached_decoder_s": t_dec,
        "epoch_recompute_s": recompute, "epoch_recompute_encoder_s": t_enc,
        "speedup_cached_vs_recompute": recompute / cached if cached > 0 else float("nan"),
        "decoder_step_per_sample": per_sample, "cpu_bf16": cfg.cpu_bf16,
        "decoder_step_per_sample_cpu_bf16": per_sample_bf16,
    }


def train_speed_markdown(r: dict) -> str:
    lines = [
        f"# Training speed: {r['backbone']} on {r['device']} ({r['machine']['cpu']}, {r['machine']['cpu_count']} "
        "cores)",
        "",
        f"{r['images']} images, batch {r['batch_size']}, working size {r['working_size']}, encoder input "
        f"{r['encoder_size']} ({r['embedding_grid']}x{r['embedding_grid']} embedding grid); {r['created']}.",
        "",
        "| epoch | seconds | of which encoder / cache read |",
        "|---|---|---|",
        f"| with embedding cache | {r['epoch_cached_s']:.2f} | {r['epoch_cached_read_s']:.2f} (read) |",
        f"| recomputing the encoder every step | {r['epoch_recompute_s']:.2f} | "
        f"{r['epoch_recompute_encoder_s']:.2f} (encoder) |",
        "",
        f"**Cached epochs are {r['speedup_cached_vs_recompute']:.1f}x faster** (same images, same process).",
        "",
        "| decoder batch size | ms per sample (fwd + bwd + Adam) |",
        "|---|---|",
    ]
    bf16 = r.get("decoder_step_per_sample_cpu_bf16")
    if bf16 is None:
        lines += [f"| {p['batch_size']} | {1000 * p['seconds_per_sample']:.1f} |"
                  for p in r["decoder_step_per_sample"]]
        if r.get("cpu_bf16"):
            lines += ["", "The decoder steps (in both epochs and in this table) ran in bfloat16 autocast "
                      "(`--cpu-bf16`); the encoder of the recompute epoch in float32."]
        return "\n".join(lines) + "\n"
    lines[-2:] = ["| decoder batch size | ms per sample (fwd + bwd + Adam), float32 | the same in bfloat16 autocast "
                  "(`--cpu-bf16`) | float32 / bfloat16 |", "|---|---|---|---|"]
    lines.insert(-2, "The epochs above ran in float32; the bfloat16 steps below were timed right after, in this "
                     "process.")
    lines.insert(-2, "")
    for p, q in zip(r["decoder_step_per_sample"], bf16):
        a, b = p["seconds_per_sample"], q["seconds_per_sample"]
        lines.append(f"| {p['batch_size']} | {1000 * a:.1f} | {1000 * b:.1f} | {a / b:.2f}x |")
    return "\n".join(lines) + "\n"


def run_train_speed(cfg: TrainConfig, n_images: int, out: str | Path, log=_LOG.info) -> dict:
    """Measure and write ``train_speed.json`` and ``train_speed.md`` into ``out`` (``log``: a ``log(message)``
    callback, INFO on this module's logger by default)."""
    r = measure_train_speed(cfg, n_images, log=log)
    layout = TrainSpeedLayout(Path(out))
    write_json_atomic(layout.train_speed_json, r)
    write_text_atomic(layout.train_speed_md, train_speed_markdown(r))
    return r

"""Decoder-only fine-tuning and batched prediction on cached embeddings.

Frames: embeddings are the frozen encoder's output for the working image; prompts are built in
the model frame; logits are brought back to the working frame (S x S) with SAM's own
``Sam.postprocess_masks`` (the numpy twin lives in :mod:`lungsam.preprocess` and is pinned to it in
tests); loss and metrics are computed there.
"""
from __future__ import annotations

import contextlib
import time
from dataclasses import dataclass, replace

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..errors import UnsupportedHereError
from ..metrics import f1_score, iou_score
from ..modeling.decoder import decode
from ..postprocess import CleanupSpec, clean_masks
from ..preprocess import PreprocessSpec, encoder_input, fractions_to_pixels, preprocess_shape
from ..prompts import LearnedPrompt, first_pass_prompt, jitter_prompts, mask_box, model_prompt, perturb_box


def pick_device(device: str) -> str:
    """``auto`` -> cuda when available, else cpu; an explicit ``cuda`` without CUDA is an error."""
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise UnsupportedHereError("--device cuda was asked for but torch sees no CUDA device "
                                   "(torch.cuda.is_available() is False)")
    return device


def freeze_all_but_decoder(sam: Sam) -> list[torch.nn.Parameter]:
    """Freeze image and prompt encoders; return the mask decoder's parameters (the only trainable ones)."""
    for p in sam.parameters():
        p.requires_grad_(False)
    for p in sam.mask_decoder.parameters():
        p.requires_grad_(True)
    sam.image_encoder.eval()
    sam.prompt_encoder.eval()
    return list(sam.mask_decoder.parameters())


@dataclass
class PromptTensors:
    """Model-frame prompts for a batch: ``coords (B, N, 2)``, ``labels (B, N)``, ``boxes (B, 4)`` or ``None``."""

    coords: torch.Tensor | None
    labels: torch.Tensor | None
    boxes: torch.Tensor | None


def batch_prompts(prompt: LearnedPrompt, spec: PreprocessSpec, masks: list[np.ndarray], size: int, device: str,
                  rng: np.random.Generator | None = None, box_jitter: float = 0.0) -> PromptTensors:
    """Prompts for images whose working-frame masks are ``masks`` (``(S, S)`` bool, used only for
    ground-truth boxes). ``rng`` enables the training-time box perturbation."""
    coords, labels, boxes = [], [], []
    for m in masks:
        gt = None
        if prompt.needs_ground_truth:
            gt = mask_box(m)
            if rng is not None and box_jitter > 0:
                gt = perturb_box(gt, (size, size), rng, box_jitter)
        c, lab, b = model_prompt(prompt, spec, (size, size), gt_box=gt)
        coords.append(c)
        labels.append(lab)
        boxes.append(b)
    as_t = lambda xs: None if xs[0] is None else torch.from_numpy(np.stack(xs)).to(device)  # noqa: E731
    return PromptTensors(as_t(coords), as_t(labels), as_t(boxes))


def logits_at_working(sam: Sam, embeddings: torch.Tensor, prompts: PromptTensors, spec: PreprocessSpec,
                      size: int) -> torch.Tensor:
    """Decode and bring logits to the working frame: ``(B, C, E, E)`` -> ``(B, 1, S, S)`` float."""
    low_res, _ = decode(sam, embeddings, prompts.coords, prompts.labels, prompts.boxes)
    input_hw = preprocess_shape(size, size, spec.img_size)
    return sam.postprocess_masks(low_res.float(), input_hw, (size, size))


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bfloat16 natively (AVX512-BF16 or AMX tiles), where torch's CPU autocast
    to bfloat16 is faster than float32 (decoder steps about 1.6x on a 2-core EPYC). Elsewhere bfloat16 is
    emulated: the same steps with oneDNN held to AVX2 took 10x longer than float32."""
    probes = [getattr(torch.cpu, n, None) for n in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(bool(p()) for p in probes if p is not None)


def mixed_precision(device: str, amp: bool, cpu_bf16: bool) -> bool:
    """Whether a training run on ``device`` computes in mixed precision: ``amp`` on CUDA (bfloat16 where
    supported, else float16 with a gradient scaler); ``cpu_bf16`` on the CPU (bfloat16 autocast).

    Raises:
        RuntimeError: ``cpu_bf16`` on a CUDA device, or on a CPU without native bfloat16 (no silent
            fallback to float32, and no emulated bfloat16 that would be slower than float32).
    """
    if device.startswith("cuda"):
        if cpu_bf16:
            raise UnsupportedHereError("--cpu-bf16 is for CPU runs; this run is on CUDA, where mixed precision is on "
                                       "by default")
        return amp
    if cpu_bf16 and not cpu_has_native_bf16():
        raise UnsupportedHereError("--cpu-bf16 needs a CPU with native bfloat16 (AVX512-BF16 or AMX); this CPU has "
                                   "neither, so bfloat16 would be emulated and slower than float32: run without "
                                   "--cpu-bf16")
    return cpu_bf16


def autocast(device: str, enabled: bool):
    """The autocast context of a run whose :func:`mixed_precision` is ``enabled``: CUDA in bfloat16 where
    supported (else float16), the CPU in bfloat16; a no-op when not enabled."""
    if not enabled:
        return contextlib.nullcontext()
    if device.startswith("cuda"):
        dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.autocast(device_type="cuda", dtype=dtype)
    return torch.autocast(device_type="cpu", dtype=torch.bfloat16)


@torch.no_grad()
def predict_probabilities(sam: Sam, embeddings: np.ndarray, masks: list[np.ndarray], prompt: LearnedPrompt,
                          spec: PreprocessSpec, size: int, device: str, batch_size: int = 8,
                          amp: bool = False) -> np.ndarray:
    """``(N, S, S)`` float32 probabilities for cached ``(N, C, E, E)`` embeddings (no box jitter)."""
    return predict_with_iou(sam, embeddings, masks, prompt, spec, size, device, batch_size, amp)[0]


@torch.no_grad()
def predict_with_iou(sam: Sam, embeddings: np.ndarray, masks: list[np.ndarray], prompt: LearnedPrompt,
                     spec: PreprocessSpec, size: int, device: str, batch_size: int = 8,
                     amp: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """``(probabilities (N, S, S) float32, predicted IoU (N,) float32)`` for cached ``(N, C, E, E)``
    embeddings: :func:`predict_probabilities` plus the decoder's own score (what the runtime reports)."""
    sam.eval()
    out, ious = [], []
    input_hw = preprocess_shape(size, size, spec.img_size)
    for s in range(0, len(embeddings), batch_size):
        emb = torch.from_numpy(embeddings[s:s + batch_size].astype(np.float32)).to(device)
        pt = batch_prompts(prompt, spec, masks[s:s + batch_size], size, device)
        with autocast(device, amp):
            low_res, iou = decode(sam, emb, pt.coords, pt.labels, pt.boxes)
            logits = sam.postprocess_masks(low_res.float(), input_hw, (size, size))
        out.append(torch.sigmoid(logits.float())[:, 0].cpu().numpy())
        ious.append(iou.float().reshape(len(emb), -1)[:, 0].cpu().numpy())
    return np.concatenate(out).astype(np.float32), np.concatenate(ious).astype(np.float32)


def predict_variants(sam: Sam, embeddings: np.ndarray, masks: list[np.ndarray], prompt: LearnedPrompt,
                     spec: PreprocessSpec, size: int, device: str, shift: float, names: tuple[str, ...],
                     batch_size: int = 8, amp: bool = False) -> np.ndarray:
    """``(V, N, S, S)`` float32 probabilities of the prompt's jitter variants ``names``
    (:func:`lungsam.prompts.jitter_prompts`, in that order) for cached ``(N, C, E, E)`` embeddings: what the
    quality flag's prompt-jitter agreement reads (:class:`lungsam.qc.JitterTerm`)."""
    variants = jitter_prompts(prompt, shift)
    return np.stack([predict_with_iou(sam, embeddings, masks, variants[n], spec, size, device, batch_size, amp)[0]
                     for n in names])


@torch.no_grad()
def predict_with_first_pass_box(sam: Sam, embeddings: np.ndarray, prompt: LearnedPrompt, spec: PreprocessSpec,
                                size: int, device: str, threshold: float, batch_size: int = 8,
                                amp: bool = False) -> tuple[np.ndarray, int]:
    """Two passes and no ground truth: a per-image box predicted by the model itself.

    Pass 1 prompts with the learned points (if the prompt has any) and the mean-mask box of the
    training split; the bounding box of its mask (``probability > threshold``, working frame) is the
    box of pass 2, again with the learned points. An image whose first mask is empty keeps the
    mean-mask box. Meant for decoders trained with a box (``box``/``both`` learn from jittered
    ground-truth boxes, ``auto-box``/``auto-both`` from the mean-mask box).

    Args:
        embeddings: ``(N, C, E, E)`` cached encoder output of the working images.
    Returns:
        ``(probs (N, S, S) float32 of pass 2, number of images that kept the mean-mask box)``.
    """
    first_prompt = first_pass_prompt(prompt)
    first = predict_probabilities(sam, embeddings, [None] * len(embeddings), first_prompt, spec, size, device,
                                  batch_size, amp)
    x0, y0, x1, y1 = np.round(fractions_to_pixels(prompt.box.reshape(2, 2), (size, size)).reshape(4)).astype(int)
    mean_box = np.zeros((size, size), bool)
    mean_box[y0:y1 + 1, x0:x1 + 1] = True
    boxes_from = [p > threshold for p in first]
    empty = [i for i, m in enumerate(boxes_from) if not m.any()]
    for i in empty:
        boxes_from[i] = mean_box
    # the box modes take each image's box from the mask they are given: here the first pass's mask
    second_prompt = replace(prompt, mode="both" if prompt.uses_points else "box")
    probs = predict_probabilities(sam, embeddings, boxes_from, second_prompt, spec, size, device, batch_size, amp)
    return probs, len(empty)


def binarize(probs: np.ndarray, threshold: float, cleanup: CleanupSpec | None = None) -> list[np.ndarray]:
    """Masks ``probs > threshold`` (``(N, S, S)`` -> N x ``(S, S)`` bool), cleaned by ``cleanup`` when given and
    enabled (:func:`lungsam.postprocess.clean_mask`, the runtime's code)."""
    masks = [p > threshold for p in probs]
    return clean_masks(masks, cleanup) if cleanup is not None and cleanup.enabled else masks


def score(probs: np.ndarray, masks: list[np.ndarray], threshold: float,
          cleanup: CleanupSpec | None = None) -> tuple[list[float], list[float]]:
    """Per-image F1 and IoU of ``probs > threshold`` (cleaned by ``cleanup`` when enabled) against ``masks``."""
    pred = binarize(probs, threshold, cleanup)
    return [f1_score(p, m) for p, m in zip(pred, masks)], [iou_score(p, m) for p, m in zip(pred, masks)]


def sweep_thresholds(probs: np.ndarray, masks: list[np.ndarray], thresholds: tuple[float, ...],
                     cleanup: CleanupSpec | None = None) -> list[dict]:
    """Mean F1/IoU at each threshold: ``[{"threshold", "f1", "iou"}]``; with an enabled ``cleanup`` also
    ``"f1_cleaned"`` and ``"iou_cleaned"`` (the same masks after :func:`lungsam.postprocess.clean_mask`)."""
    rows = []
    for t in thresholds:
        f1, iou = score(probs, masks, t)
        row = {"threshold": float(t), "f1": float(np.mean(f1)), "iou": float(np.mean(iou))}
        if cleanup is not None and cleanup.enabled:
            f1c, iouc = score(probs, masks, t, cleanup)
            row.update(f1_cleaned=float(np.mean(f1c)), iou_cleaned=float(np.mean(iouc)))
        rows.append(row)
    return rows


def choose_threshold(sweep: list[dict], key: str = "f1") -> float:
    """The threshold with the best mean validation F1 (``key``: ``f1`` or ``f1_cleaned``; the lowest on ties)."""
    best = max(r[key] for r in sweep)
    return min(r["threshold"] for r in sweep if r[key] == best)


def threshold_edge(sweep: list[dict], chosen: float) -> str | None:
    """``"low"`` / ``"high"`` when ``chosen`` is the sweep's lowest / highest threshold (the best may lie
    outside the range swept), else ``None`` (also for a sweep of one threshold, which has no inside)."""
    ts = sorted(r["threshold"] for r in sweep)
    if len(ts) < 2:
        return None
    return "low" if chosen <= ts[0] else "high" if chosen >= ts[-1] else None


@dataclass
class ThresholdChoice:
    """What validation chose: ``threshold``, ``cleanup`` (enabled or not), the ``sweep`` rows
    (:func:`sweep_thresholds`), ``edge`` (:func:`threshold_edge`) and the best validation F1 without and
    with clean-up (``val_f1_raw``, ``val_f1_cleaned``)."""

    threshold: float
    cleanup: CleanupSpec
    sweep: list[dict]
    edge: str | None
    val_f1_raw: float
    val_f1_cleaned: float
    rule: str = "clean-up on when its best validation F1 is higher than without"

    def record(self) -> dict:
        """The ``metrics.json`` fields: ``threshold``, ``threshold_sweep``, ``threshold_range`` [lo, hi],
        ``threshold_edge``, ``postprocess`` (:meth:`CleanupSpec.to_dict`) and ``postprocess_choice``."""
        ts = [r["threshold"] for r in self.sweep]
        return {"threshold": self.threshold, "threshold_sweep": self.sweep, "threshold_range": [min(ts), max(ts)],
                "threshold_edge": self.edge, "postprocess": self.cleanup.to_dict(),
                "postprocess_choice": {"chosen_on": "validation", "val_f1_raw": self.val_f1_raw,
                                       "val_f1_cleaned": self.val_f1_cleaned,
                                       "rule": self.rule}}

    def edge_warning(self) -> str | None:
        """A one-line warning when the threshold sits at the sweep's edge, else ``None``."""
        if self.edge is None:
            return None
        ts = [r["threshold"] for r in self.sweep]
        return (f"warning: the validation threshold {self.threshold:.2f} is the {self.edge} edge of the sweep "
                f"{min(ts):.2f}-{max(ts):.2f}; the best may lie outside it: widen --thresholds")


def choose_threshold_and_cleanup(probs: np.ndarray, masks: list[np.ndarray], thresholds: tuple[float, ...],
                                 cleanup: CleanupSpec | None = None, allow_cleanup: bool = True) -> ThresholdChoice:
    """Sweep ``thresholds`` on validation probabilities ``(N, S, S)``, without and with clean-up (``cleanup``:
    its size rules; default :class:`CleanupSpec`), and keep the better: clean-up is on only when its best mean
    F1 is strictly higher. ``allow_cleanup=False`` (``TrainConfig.cleanup == "off"``): it stays off (both
    sweeps are still recorded)."""
    spec = replace(cleanup or CleanupSpec(), enabled=True)
    sweep = sweep_thresholds(probs, masks, thresholds, spec)
    t_raw, t_clean = choose_threshold(sweep, "f1"), choose_threshold(sweep, "f1_cleaned")
    f_raw = max(r["f1"] for r in sweep)
    f_clean = max(r["f1_cleaned"] for r in sweep)
    on = allow_cleanup and f_clean > f_raw
    thr = t_clean if on else t_raw
    rule = {} if allow_cleanup else {"rule": "off (cleanup = off)"}
    return ThresholdChoice(thr, replace(spec, enabled=on), sweep, threshold_edge(sweep, thr), f_raw, f_clean, **rule)


@dataclass
class EarlyStopping:
    """Best-epoch and early-stopping bookkeeping of a training run (SAM decoder folds and U-Net folds).

    Stop once validation F1 has not risen by ``min_delta`` over its mark for ``patience`` epochs. The four
    marks (:meth:`marks`) are what a fold's ``train_state.pt`` keeps to resume.
    """

    patience: int
    min_delta: float
    best_f1: float = -1.0
    best_epoch: int = 0
    mark_f1: float = -1.0
    mark_epoch: int = 0

    def marks(self) -> dict[str, float | int]:
        """``{best_f1, best_epoch, mark_f1, mark_epoch}``."""
        return {"best_f1": self.best_f1, "best_epoch": self.best_epoch, "mark_f1": self.mark_f1,
                "mark_epoch": self.mark_epoch}

    @classmethod
    def restore(cls, patience: int, min_delta: float, state: dict) -> "EarlyStopping":
        """The marks saved in a loaded ``train_state.pt`` (flat keys; U-Net states written before 2026-11-28
        kept them, with patience and min_delta, under ``"stop"``), with this run's patience and min_delta."""
        saved = state.get("stop", state)
        return cls(patience, min_delta, **{k: saved[k] for k in ("best_f1", "best_epoch", "mark_f1", "mark_epoch")})

    def should_stop(self, epoch: int) -> bool:
        return self.mark_epoch > 0 and epoch - self.mark_epoch > self.patience

    def update(self, epoch: int, f1: float) -> bool:
        """Record epoch ``epoch``'s validation F1; True when it is the best so far."""
        if f1 >= self.mark_f1 + self.min_delta:
            self.mark_f1, self.mark_epoch = f1, epoch
        if f1 > self.best_f1:
            self.best_f1, self.best_epoch = f1, epoch
            return True
        return False


class DecoderTrainer:
    """One fold's optimisation state: Adam on the mask decoder, MONAI DiceFocalLoss.

    Args:
        sam: backbone (encoders frozen here).
        spec, size, prompt: preprocessing, working resolution, learned prompt.
        lr, weight_decay, batch_size, box_jitter, device, amp, cpu_bf16: see :class:`~lungsam.train.config.TrainConfig`
            (the precision rule is :func:`mixed_precision`).
        seed: seeds torch and the numpy generator used for shuffling and box jitter.
    """

    def __init__(self, sam: Sam, spec: PreprocessSpec, size: int, prompt: LearnedPrompt, *, lr: float,
                 weight_decay: float, batch_size: int, box_jitter: float, device: str, amp: bool, seed: int,
                 cpu_bf16: bool = False):
        from monai.losses import DiceFocalLoss

        torch.manual_seed(seed)
        self.sam = sam.to(device)
        self.spec, self.size, self.prompt = spec, size, prompt
        self.batch_size, self.box_jitter, self.device = batch_size, box_jitter, device
        self.mixed = mixed_precision(device, amp, cpu_bf16)
        self.params = freeze_all_but_decoder(sam)
        self.optimizer = torch.optim.Adam(self.params, lr=lr, weight_decay=weight_decay)
        self.loss_fn = DiceFocalLoss(sigmoid=True, squared_pred=True, reduction="mean")
        self.scaler = torch.amp.GradScaler("cuda", enabled=not torch.cuda.is_bf16_supported()) \
            if self.mixed and device.startswith("cuda") else None
        self.rng = np.random.default_rng(seed)
        self.distributed = None  # torchrun: a lungsam.train.distributed.DistributedStep (train/distributed.attach)

    def loop_state(self) -> dict:
        """What a resumed fold needs besides its weights, optimiser and epoch bookkeeping: the shuffling
        generator's state and, with fp16 AMP, the gradient scaler's (scale and growth tracker). Plain values,
        loadable with ``torch.load(..., weights_only=True)``."""
        st = {"rng": self.rng.bit_generator.state}
        if self.scaler is not None and self.scaler.is_enabled():
            st["scaler"] = self.scaler.state_dict()
        return st

    def restore_loop_state(self, st: dict) -> None:
        """Inverse of :meth:`loop_state` (a state saved without a scaler leaves the scaler as built)."""
        self.rng.bit_generator.state = st["rng"]
        if self.scaler is not None and "scaler" in st:
            self.scaler.load_state_dict(st["scaler"])

    def embed(self, batch: np.ndarray) -> torch.Tensor:
        """Image embeddings ``(B, C, E, E)`` float32 on the device from a batch of training inputs: here
        cached embeddings ``(B, C, E, E)``."""
        return torch.from_numpy(batch.astype(np.float32)).to(self.device)

    def _logits_and_loss(self, emb: np.ndarray, masks: list[np.ndarray], rng: np.random.Generator | None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """Working-frame logits ``(B, 1, S, S)`` and the DiceFocal loss against ``masks``."""
        x = self.embed(emb)
        target = torch.from_numpy(np.stack(masks)[:, None].astype(np.float32)).to(self.device)
        pt = batch_prompts(self.prompt, self.spec, masks, self.size, self.device, rng, self.box_jitter)
        with autocast(self.device, self.mixed):
            logits = logits_at_working(self.sam, x, pt, self.spec, self.size).float()
        return logits, self.loss_fn(logits, target)

    def train_epoch(self, embeddings: np.ndarray, masks: list[np.ndarray]) -> tuple[float, float]:
        """One pass over shuffled training data; returns ``(mean loss, seconds)``."""
        self.sam.mask_decoder.train()
        t0 = time.perf_counter()
        order = self.rng.permutation(len(embeddings))
        total, n = 0.0, 0
        for s in range(0, len(order), self.batch_size):
            idx = order[s:s + self.batch_size]
            total += self.step(embeddings[idx], [masks[i] for i in idx]) * len(idx)
            n += len(idx)
        return total / max(n, 1), time.perf_counter() - t0

    def step(self, embeddings: np.ndarray, masks: list[np.ndarray]) -> float:
        """One optimisation step on a batch (``(B, C, E, E)`` embeddings, ``B`` masks); returns the loss."""
        if self.distributed is not None:  # under torchrun: this rank's slice of the global batch, DDP
            return self.distributed.step(self, embeddings, masks)
        self.sam.mask_decoder.train()
        _, loss = self._logits_and_loss(embeddings, masks, self.rng)
        self.optimizer.zero_grad(set_to_none=True)
        self.backward_and_step(loss)
        return float(loss.detach())

    def backward_and_step(self, loss: torch.Tensor) -> None:
        """Back-propagate ``loss`` and take the optimiser step (through the AMP scaler on CUDA)."""
        if self.scaler is not None:
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
        else:
            loss.backward()
            self.optimizer.step()

    @torch.no_grad()
    def validate(self, embeddings: np.ndarray, masks: list[np.ndarray], threshold: float = 0.5) -> dict:
        """Validation loss and mean F1 at ``threshold`` (no box jitter)."""
        self.sam.mask_decoder.eval()
        losses, f1, iou = [], [], []
        for s in range(0, len(embeddings), self.batch_size):
            m = masks[s:s + self.batch_size]
            logits, loss = self._logits_and_loss(embeddings[s:s + self.batch_size], m, None)
            losses.append(float(loss) * len(m))
            a, b = score(torch.sigmoid(logits)[:, 0].cpu().numpy(), m, threshold)
            f1 += a
            iou += b
        return {"val_loss": sum(losses) / len(masks), "val_f1": float(np.mean(f1)), "val_iou": float(np.mean(iou))}


class EncoderLoraTrainer(DecoderTrainer):
    """Decoder fine-tuning plus low-rank adapters on the (otherwise frozen) image encoder.

    Training inputs are working-frame images ``(B, S, S, 3)`` uint8 instead of cached embeddings: the
    encoder runs in every step (in eval mode, so its batch-norm statistics stay fixed), and Adam
    updates the decoder and the adapters together.
    """

    def __init__(self, sam: Sam, spec: PreprocessSpec, size: int, prompt: LearnedPrompt, *,
                 lora_params: list[torch.nn.Parameter], **kw):
        super().__init__(sam, spec, size, prompt, **kw)
        for p in lora_params:
            p.requires_grad_(True)
        self.optimizer.add_param_group({"params": lora_params})

    def embed(self, batch: np.ndarray) -> torch.Tensor:
        """Embeddings of working images ``(B, S, S, 3)`` uint8 through the adapted encoder."""
        x = torch.from_numpy(np.stack([encoder_input(im, self.spec) for im in batch])).to(self.device)
        self.sam.image_encoder.eval()
        with autocast(self.device, self.mixed):
            return self.sam.image_encoder(x).float()

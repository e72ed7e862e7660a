"""Parity of exported models against the torch model, end to end on held-out images.

For each image: torch (``preprocess.encoder_input`` -> ``sam.image_encoder`` -> :func:`decode`) and each
exported pipeline (raw ``preprocess.model_input`` -> encoder -> decoder) give low-res logits; both are
postprocessed with :func:`lungsam.preprocess.postprocess_logits` to the working frame and thresholded
(``sigmoid(logits) > threshold``, as training does). Figures: max |logit difference| (low-res), mask
agreement (F1 between the two binary masks) mean/min, F1 against ground truth for both.

With the quality flag's prompt-jitter term (``qc.jitter``: the learned points moved or thinned, decoded on the
same embedding, :func:`lungsam.prompts.jitter_prompts`) every prompted pipeline is also compared at each variant:
the variants' masks (agreement with torch's at the same variant) and the jitter IoU the flag reads, per image
(:class:`JitterParity`), so the gate covers the decoder at the point counts and positions the flag feeds it, not
only at the learned prompt.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..metrics import f1_score, summarize
from ..postprocess import CleanupSpec, clean_mask
from ..preprocess import PreprocessSpec, encoder_input, model_input, postprocess_logits, sigmoid
from ..prompts import (
    LearnedPrompt,
    jitter_model_prompts,
    labelled_points,
    mask_box,
    model_prompt,
    point_count_groups,
)
from ..qc import agreement_of_masks

#: ``(B, N, 2)`` point coords, ``(B, N)`` labels: one prompt per image in SAM's ONNX point form (model frame).
Points = tuple[np.ndarray, np.ndarray]


@dataclass(frozen=True)
class Pipeline:
    """An exported encoder + decoder pair as the gate runs it.

    Attributes:
        encode: raw images ``(B, 3, img, img)`` float32 -> embeddings ``(B, C, E, E)`` float32.
        decode: ``(embeddings, point_coords (B, N, 2), point_labels (B, N))`` -> low-res logits ``(B, 1, L, L)``.
        fixed: a ``decoder_fixed`` (the learned prompt baked in: it ignores the points, so no jitter variants).
    """

    encode: Callable[[np.ndarray], np.ndarray]
    decode: Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]
    fixed: bool = False

    def __call__(self, raw: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        return self.decode(self.encode(raw), points, labels)


@dataclass(frozen=True)
class JitterVariants:
    """The quality flag's prompt variants the gate decodes (the manifest's ``qc.jitter``).

    Attributes:
        names: variant names in calibration order. model: each one's model-frame ``(coords (N, 2), labels (N,),
        None)`` for torch (:func:`lungsam.prompts.jitter_model_prompts`); onnx: the same in ONNX point form
        ``(coords (N', 2), labels (N',))`` (:func:`lungsam.prompts.jitter_point_inputs`, what the runtime feeds).
        shift: the move, fraction of the frame; scale, weight: the term's (``weight`` log-odds of the flag per
        ``scale`` of jitter IoU).
    """

    names: tuple[str, ...]
    model: list[tuple]
    onnx: list[tuple[np.ndarray, np.ndarray]]
    shift: float
    scale: float
    weight: float

    @classmethod
    def of(cls, qc: dict | None, prompt: LearnedPrompt, spec: PreprocessSpec, size: int) -> "JitterVariants | None":
        """From the run's ``qc`` section (validated by :func:`lungsam.qc.load_calibration`); ``None`` without a
        jitter term."""
        from ..qc import load_calibration

        term = getattr(load_calibration(qc), "jitter", None)
        if term is None:
            return None
        model = jitter_model_prompts(prompt, spec, size, term.shift, term.variants)
        return cls(tuple(term.variants), model, [labelled_points(*m) for m in model], term.shift, term.scale,
                   term.weight)

    def torch_points(self, i: int, n: int) -> Points:
        """Variant ``i`` for a batch of ``n`` images, model frame: ``(coords (n, N, 2), labels (n, N))``."""
        c, lab, _ = self.model[i]
        return np.repeat(c[None], n, 0), np.repeat(lab[None], n, 0)


@dataclass
class JitterParity:
    """One pipeline's figures at the prompt variants, against torch at the same variants.

    Attributes:
        agreement: F1 between the exported and torch masks, per image and variant (working frame, cleaned).
        iou_diff: per image, |jitter IoU exported - jitter IoU torch| (:func:`lungsam.qc.agreement_of_masks`).
        scale, weight: the term's; ``iou_diff * weight / scale`` is the shift of the flag's log-odds.
        times: ``(seconds, images)`` per batch of the variants' decoder calls (:func:`variant_logits`; model calls
            only, the masks' postprocessing left out): what the flag adds to an image on this pipeline.
    """

    scale: float
    weight: float
    agreement: list[float] = field(default_factory=list)
    iou_diff: list[float] = field(default_factory=list)
    times: list[tuple[float, int]] = field(default_factory=list)

    def summary(self) -> dict:
        """The manifest's ``parity.results[pipeline].jitter``; ``ms_per_image`` (the variants' decodes per image,
        :func:`ms_per_image`) is left out when nothing was timed."""
        a = summarize(self.agreement)
        worst = max(self.iou_diff) if self.iou_diff else 0.0
        out = {"n": a["n"], "agreement_mean": a["mean"], "agreement_min": a["min"],
               "max_abs_jitter_iou_diff": worst, "mean_abs_jitter_iou_diff": float(np.mean(self.iou_diff or [0.0])),
               "max_log_odds_shift": worst * self.weight / self.scale}
        ms = ms_per_image(self.times)
        if ms is not None:
            out["ms_per_image"] = ms
        return out


@dataclass
class ParityCase:
    """One held-out image with its prompt.

    Attributes:
        id: sample id.
        image: ``(S, S, 3)`` uint8 working image; mask: ``(S, S)`` bool ground truth.
        raw: ``(3, img, img)`` float32 raw model input; input_hw: resized size before padding.
        coords, labels, box: model-frame prompt as :func:`lungsam.prompts.model_prompt` returns it.
        points, point_labels: the same in ONNX form ``(N, 2)`` / ``(N,)`` float32 (:func:`labelled_points`).
    """

    id: str
    image: np.ndarray
    mask: np.ndarray
    raw: np.ndarray
    input_hw: tuple[int, int]
    coords: np.ndarray | None
    labels: np.ndarray | None
    box: np.ndarray | None
    points: np.ndarray
    point_labels: np.ndarray


def make_cases(samples, prompt: LearnedPrompt, spec: PreprocessSpec) -> list[ParityCase]:
    """:class:`ParityCase` per :class:`lungsam.data.Sample` (box prompts use the exact GT box, unperturbed)."""
    cases = []
    for s in samples:
        hw = s.image.shape[:2]
        gt_box = mask_box(s.mask) if prompt.needs_ground_truth else None
        coords, labels, box = model_prompt(prompt, spec, hw, gt_box)
        pts, pl = labelled_points(coords, labels, box)
        raw, input_hw = model_input(s.image, spec)
        cases.append(ParityCase(s.id, s.image, s.mask, raw, input_hw, coords, labels, box, pts, pl))
    return cases


def torch_embeddings(sam, spec: PreprocessSpec, cases: list[ParityCase]):
    """The reference encoder: SAM's own preprocessing and ``sam.image_encoder``; ``(B, C, E, E)`` torch tensor."""
    import torch

    x = torch.from_numpy(np.stack([encoder_input(c.image, spec) for c in cases]))
    with torch.no_grad():
        return sam.image_encoder(x)


def torch_decode(sam, emb, cases: list[ParityCase], points: Points | None = None) -> np.ndarray:
    """The reference decoder (:func:`lungsam.modeling.decoder.decode`) on ``emb`` for ``cases``' own prompts, or for
    ``points`` (a jitter variant: points only, model frame). Returns ``(B, 1, L, L)`` float32 low-res logits."""
    import torch

    from ..modeling.decoder import decode

    opt = lambda a: None if a is None else torch.from_numpy(np.stack(a).astype(np.float32))  # noqa: E731
    first = cases[0]
    if points is not None:
        coords, labels, boxes = opt(list(points[0])), opt(list(points[1])), None
    else:
        coords = opt([c.coords for c in cases]) if first.coords is not None else None
        labels = opt([c.labels for c in cases]) if first.labels is not None else None
        boxes = opt([c.box for c in cases]) if first.box is not None else None
    with torch.no_grad():
        low, _ = decode(sam, emb, coords, labels, boxes)
    return low.numpy().astype(np.float32)


def working_logits(low_res: np.ndarray, case: ParityCase, spec: PreprocessSpec) -> np.ndarray:
    """``(1, L, L)`` or ``(L, L)`` low-res logits -> ``(S, S)`` float32 logits in the working frame."""
    low = np.asarray(low_res, np.float32).reshape(low_res.shape[-2:])
    return postprocess_logits(low, spec, case.input_hw, case.mask.shape)


@dataclass
class ParityResult:
    """Figures of one exported pipeline against torch.

    Attributes:
        name: e.g. ``"fp32/decoder"``.
        max_abs_logit_diff: max |exported - torch| over all low-res logits.
        agreement: per-image F1 between exported and torch binary masks (working frame).
        f1_gt: per-image F1 of the exported masks against ground truth; f1_gt_torch: same for torch.
        ms_per_image: the pipeline's wall time per image (encoder + decoder at the learned prompt) on the parity
            batches, the median over the batches after the first (:func:`ms_per_image`).
        jitter: its figures at the quality flag's prompt variants (``None``: no jitter term, or a fixed decoder).
    """

    name: str
    max_abs_logit_diff: float = 0.0
    agreement: list[float] = field(default_factory=list)
    f1_gt: list[float] = field(default_factory=list)
    f1_gt_torch: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    ms_per_image: float | None = None
    jitter: JitterParity | None = None
    times: list[tuple[float, int]] = field(default_factory=list)  # (seconds, images) per batch

    def summary(self) -> dict:
        a = summarize(self.agreement)
        out = {"n": a["n"], "max_abs_logit_diff": self.max_abs_logit_diff,
               "agreement_mean": a["mean"], "agreement_min": a["min"],
               "f1_gt_mean": summarize(self.f1_gt)["mean"], "f1_gt_torch_mean": summarize(self.f1_gt_torch)["mean"],
               "worst_image": self.ids[int(np.argmin(self.agreement))] if self.agreement else None}
        if self.jitter is not None:
            out["jitter"] = self.jitter.summary()
        return out


def ms_per_image(times: list[tuple[float, int]]) -> float | None:
    """Wall ms per image of a pipeline's parity batches ``[(seconds, images)]``: the median over the batches of its
    per-image time, the first (warm-up) batch left out (kept when it is the only one). A median, so a one-off cost
    inside one batch (OpenVINO compiling a shape statically on its second call) does not move it."""
    rest = times[1:] if len(times) > 1 else times
    per_image = [1000.0 * t / k for t, k in rest if k]
    return float(np.median(per_image)) if per_image else None


def compare(pipelines: dict[str, Pipeline], sam, spec: PreprocessSpec, cases: list[ParityCase], threshold: float,
            batch_size: int = 2, log=None, cleanup: CleanupSpec | None = None,
            jitter: JitterVariants | None = None) -> dict[str, ParityResult]:
    """Run torch and every pipeline over ``cases`` in batches; return a :class:`ParityResult` per pipeline.

    Pipelines get batches of ``batch_size`` images (exercising the dynamic batch axis), all pipelines on one batch
    before the next (their timings interleaved). ``cleanup``: the run's mask clean-up
    (:func:`lungsam.postprocess.clean_mask`), applied to torch's and the exported masks alike when enabled, so the
    gate covers what the runtime returns. ``jitter``: the quality flag's prompt variants; every prompted pipeline is
    also decoded at each of them on its own embeddings and compared with torch's (:class:`JitterParity`; its
    decoder calls timed apart from the learned prompt's, so ``--backend auto`` can add what the flag costs).
    """
    rules = cleanup or CleanupSpec()  # disabled: clean_mask returns the mask as it is

    def masks_of(low: np.ndarray, batch: list[ParityCase]) -> list[np.ndarray]:
        return [clean_mask(sigmoid(working_logits(low[i], c, spec)) > threshold, rules) for i, c in enumerate(batch)]

    results = {name: ParityResult(name) for name in pipelines}
    for name, pipe in pipelines.items():
        if jitter is not None and not pipe.fixed:
            results[name].jitter = JitterParity(jitter.scale, jitter.weight)
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        emb = torch_embeddings(sam, spec, batch)
        ref = torch_decode(sam, emb, batch)
        ref_masks = masks_of(ref, batch)
        ref_variants = None
        if jitter is not None:
            ref_variants = [masks_of(torch_decode(sam, emb, batch, jitter.torch_points(v, len(batch))), batch)
                            for v in range(len(jitter.names))]
        raw = np.stack([c.raw for c in batch])
        pts = np.stack([c.points for c in batch])
        pl = np.stack([c.point_labels for c in batch])
        for name, pipe in pipelines.items():
            r = results[name]
            t0 = time.perf_counter()
            out_emb = pipe.encode(raw)
            out = pipe.decode(out_emb, pts, pl)
            r.times.append((time.perf_counter() - t0, len(batch)))
            r.max_abs_logit_diff = max(r.max_abs_logit_diff, float(np.abs(out - ref).max()))
            masks = masks_of(out, batch)
            for i, c in enumerate(batch):
                r.agreement.append(f1_score(masks[i], ref_masks[i]))
                r.f1_gt.append(f1_score(masks[i], c.mask))
                r.f1_gt_torch.append(f1_score(ref_masks[i], c.mask))
                r.ids.append(c.id)
            if r.jitter is not None:
                compare_variants(r.jitter, pipe, out_emb, jitter, masks, ref_masks, ref_variants, batch, masks_of)
        if log:
            log(f"parity: {min(start + batch_size, len(cases))}/{len(cases)} images")
    for r in results.values():
        r.ms_per_image = ms_per_image(r.times)
    return results


def compare_variants(out: JitterParity, pipe: Pipeline, emb: np.ndarray, jitter: JitterVariants,
                     masks: list[np.ndarray], ref_masks: list[np.ndarray], ref_variants: list[list[np.ndarray]],
                     batch: list[ParityCase], masks_of) -> None:
    """One batch of :func:`compare` at the prompt variants: each image's variants decoded by ``pipe`` on its
    embedding as the runtime decodes them (:func:`variant_logits`); per image and variant the mask agreement with
    torch's variant mask, and per image the difference of the jitter IoU (:func:`lungsam.qc.agreement_of_masks`,
    the flag's own definition; exported variants against the exported mask, torch's against torch's). The decoder
    calls are timed (``out.times``), the masks' postprocessing not."""
    n, k = len(batch), len(jitter.names)
    t0 = time.perf_counter()
    low = variant_logits(pipe, emb, jitter)
    out.times.append((time.perf_counter() - t0, n))
    variants = [masks_of(low[v], batch) for v in range(k)]
    for i in range(n):
        for v in range(k):
            out.agreement.append(f1_score(variants[v][i], ref_variants[v][i]))
        ours = agreement_of_masks(masks[i], [variants[v][i] for v in range(k)])
        theirs = agreement_of_masks(ref_masks[i], [ref_variants[v][i] for v in range(k)])
        out.iou_diff.append(abs(ours - theirs))


def variant_logits(pipe: Pipeline, emb: np.ndarray, jitter: JitterVariants) -> np.ndarray:
    """``(V, B, 1, L, L)`` low-res logits of every variant for each of the ``B`` embeddings ``(B, C, E, E)``, decoded
    the way the runtime's flag decodes them (:meth:`lungsam.runtime.segmenter.LungSegmenter.jitter_maps`): one
    image at a time, its variants of equal point count in one decoder call (the four moves, then the six dropped
    points), so the timing of these calls is the flag's cost per image on this pipeline."""
    groups = [(idx, np.stack([jitter.onnx[v][0] for v in idx]).astype(np.float32),
               np.stack([jitter.onnx[v][1] for v in idx]).astype(np.float32))
              for idx in point_count_groups(jitter.onnx).values()]
    out = None
    for i in range(emb.shape[0]):
        for idx, coords, labels in groups:
            lo = np.asarray(pipe.decode(np.repeat(emb[i:i + 1], len(idx), 0), coords, labels), np.float32)
            if out is None:
                out = np.empty((len(jitter.names), emb.shape[0], *lo.shape[1:]), np.float32)
            out[idx, i] = lo
    return out


def ort_session(path: str | Path):
    """onnxruntime CPU session with full graph optimisation (ORT_ENABLE_ALL)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    so.log_severity_level = 3  # constant-folding notes about FP16 kernels are not errors
    return ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])


def onnx_pipeline(encoder_path: str | Path, decoder_path: str | Path, fixed: bool) -> Pipeline:
    """An exported encoder + decoder (``fixed``: ``decoder_fixed``, which ignores the given points)."""
    enc, dec = ort_session(encoder_path), ort_session(decoder_path)

    def encode(raw: np.ndarray) -> np.ndarray:
        return enc.run(["embeddings"], {"image": raw.astype(np.float32)})[0]

    def decode(emb: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        feeds = {"embeddings": emb} if fixed else {"embeddings": emb, "point_coords": points.astype(np.float32),
                                                  "point_labels": labels.astype(np.float32)}
        return dec.run(["low_res_logits"], feeds)[0]

    return Pipeline(encode, decode, fixed)


def openvino_pipeline(encoder_path: str | Path, decoder_path: str | Path, fixed: bool,
                      precision: str = "fp32") -> Pipeline:
    """The same as :func:`onnx_pipeline` through OpenVINO's CPU plugin (:class:`lungsam.runtime.openvino_backend.
    OvModel`, latency hint, the precision hint of ``precision``); ``encoder_path`` may be an OpenVINO IR."""
    from ..runtime.openvino_backend import OvModel

    enc, dec = OvModel(encoder_path, precision), OvModel(decoder_path, precision)

    def encode(raw: np.ndarray) -> np.ndarray:
        return enc.run({"image": raw.astype(np.float32)})["embeddings"]

    def decode(emb: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        feeds = {"embeddings": emb} if fixed else {"embeddings": emb, "point_coords": points.astype(np.float32),
                                                  "point_labels": labels.astype(np.float32)}
        return dec.run(feeds)["low_res_logits"]

    return Pipeline(encode, decode, fixed)


#: The jitter part of the gate, by default (``lungsam export --max-jitter-log-odds-shift``): the largest move of the
#: quality flag's log-odds that a pipeline's jitter IoU may cause against torch's on one image
#: (``max_log_odds_shift``). One log-odds unit is one tail scale of the validation images' jitter IoU (0.005-0.007
#: on LiteMedSAM runs): a decoder that is exact at the learned prompt but ignores or misplaces moved points shifts it
#: by several units; FP16, INT8 and bf16 of a trained LiteMedSAM by 0.03-0.32 (results/quality/jitter_parity_gate.md).
MAX_JITTER_LOG_ODDS_SHIFT = 1.0


def failing(results: dict[str, ParityResult], min_agreement: float,
            max_jitter_shift: float = MAX_JITTER_LOG_ODDS_SHIFT) -> dict[str, str]:
    """``{pipeline: what missed}`` for the pipelines whose mean mask agreement with torch is below
    ``min_agreement`` at the learned prompt or, with a jitter term, at its prompt variants, or whose jitter IoU moves
    the flag's log-odds by more than ``max_jitter_shift`` on some image (empty: the gate passes)."""
    out = {}
    for n, r in results.items():
        s = r.summary()
        j = s.get("jitter")
        if not s["agreement_mean"] >= min_agreement:
            out[n] = f"mean mask agreement {s['agreement_mean']:.5f} < {min_agreement}"
        elif j is not None and not j["agreement_mean"] >= min_agreement:
            out[n] = (f"mean mask agreement at the quality flag's prompt variants {j['agreement_mean']:.5f} < "
                      f"{min_agreement}")
        elif j is not None and not j["max_log_odds_shift"] <= max_jitter_shift:
            out[n] = (f"the quality flag's jitter IoU differs from torch's by {j['max_abs_jitter_iou_diff']:.4f} "
                      f"({j['max_log_odds_shift']:.2f} log-odds > {max_jitter_shift})")
    return out


def format_table(results: dict[str, ParityResult], min_agreement: float,
                 max_jitter_shift: float = MAX_JITTER_LOG_ODDS_SHIFT) -> str:
    """Plain-text table of the parity figures (with a jitter term: the variants' agreement and the largest
    jitter IoU difference, in the flag's log-odds)."""
    jit = any(r.jitter is not None for r in results.values())
    extra = f" {'jitter agree':>12} {'max dlogodds':>12}" if jit else ""
    lines = [f"{'model':<28} {'n':>4} {'max|dlogit|':>12} {'agree mean':>11} {'agree min':>10} "
             f"{'F1 gt':>7} {'F1 gt torch':>12}{extra}  gate (agreement >= {min_agreement}"
             f"{f', |dlogodds| <= {max_jitter_shift}' if jit else ''})"]
    failed = failing(results, min_agreement, max_jitter_shift)
    for name, r in results.items():
        s = r.summary()
        cells = ""
        if jit:
            j = s.get("jitter")
            cells = (f" {j['agreement_mean']:>12.5f} {j['max_log_odds_shift']:>12.3f}" if j
                     else f" {'-':>12} {'-':>12}")
        lines.append(f"{name:<28} {s['n']:>4} {s['max_abs_logit_diff']:>12.3g} {s['agreement_mean']:>11.5f} "
                     f"{s['agreement_min']:>10.5f} {s['f1_gt_mean']:>7.4f} {s['f1_gt_torch_mean']:>12.4f}{cells}  "
                     f"{'FAIL' if name in failed else 'ok'}")
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------------
# the in-graph path (lungsam export --in-graph-preprocess) against the host path
# ---------------------------------------------------------------------------------------------

#: The in-graph gate: mean mask agreement with the host path and the largest F1 difference against ground truth.
#: The graph's resize equals Pillow's on whole-factor and equal sizes (measured bit-identical on Montgomery
#: 512 -> 256 -> 1024) but not always elsewhere (256 -> 192: 0.05 % of the values 1 grey level apart, Pillow's
#: fixed-point weights), and the logits reach the original size by two float32 steps instead of one composed matrix,
#: which flips only pixels at the threshold; a wrong resize, normalisation, frame or threshold moves whole edges.
IN_GRAPH_MIN_AGREEMENT = 0.995
IN_GRAPH_MAX_F1_DIFF = 0.001
STAGES = ("preprocess_s", "encode_s", "decode_s", "postprocess_s")


def in_graph_backends() -> list[str]:
    """The runtime backends the in-graph gate runs: those that can run the in-graph path
    (:data:`lungsam.runtime.ingraph.GRAPH_BACKENDS`; OpenVINO cannot: ``OPENVINO_REFUSAL`` there)."""
    from ..runtime.ingraph import GRAPH_BACKENDS

    return list(GRAPH_BACKENDS)


def in_graph_check(bundle_dir: str | Path, samples: list, log=None) -> dict:
    """The in-graph path against the host path, through the runtime (:class:`lungsam.runtime.LungSegmenter`,
    ``preprocess="host"`` / ``"graph"``, fp32) on the parity images' ORIGINAL files (``samples``:
    :class:`lungsam.data.Sample`), per backend of :func:`in_graph_backends`, the two paths interleaved image by
    image. Returns the manifest's ``parity.in_graph`` record (:func:`in_graph_failures` applies the gate)."""
    from ..imageio import read_image, read_mask
    from .ingraph import resize_difference

    images = [(read_image(s.image_path), read_mask(s.mask_path)) for s in samples]
    results = {b: compare_paths(bundle_dir, b, images) for b in in_graph_backends()}
    if log:
        for b, r in results.items():
            log(f"in-graph gate ({b}, {r['n']} images): agreement with the host path {r['agreement_mean']:.5f} (min "
                f"{r['agreement_min']:.5f}), F1 {r['f1_gt_mean']:.4f} vs host {r['f1_gt_host_mean']:.4f}; ms per image "
                f"host {r['ms_per_image']['host']:.1f}, graph {r['ms_per_image']['graph']:.1f}")
    from ..runtime.bundle import Bundle

    b = Bundle.load(bundle_dir, verify=False)
    resize = resize_difference([img.pixels for img, _ in images], b.spec, b.working_size)
    return {"reference": "the runtime's host path (numpy/Pillow preprocessing, low-res logits postprocessed in "
                         "numpy), same backend, fp32, original image files, masks at the original size",
            "tolerance": {"min_agreement_mean": IN_GRAPH_MIN_AGREEMENT, "max_f1_diff": IN_GRAPH_MAX_F1_DIFF,
                          "rule": f"mean agreement >= {IN_GRAPH_MIN_AGREEMENT} and |F1 graph - F1 host| <= "
                                  f"{IN_GRAPH_MAX_F1_DIFF}"},
            "resize": {**resize, "what": "|graph - Pillow| over the raw model input (grey levels), onnxruntime"},
            "timing": "ms_per_image: preprocess + encode + decode + postprocess per image (read excluded), host and "
                      "graph interleaved image by image, the first image left out",
            "results": results}


def compare_paths(bundle_dir: str | Path, backend: str, images: list) -> dict:
    """The host and the in-graph path of ``bundle_dir`` through the runtime with ``backend`` (fp32) on ``images``
    (``[(LoadedImage, ground-truth mask at the original size)]``), interleaved image by image (the order alternates):
    mask agreement, F1 of each path, mean ms per stage (the first image left out). One backend's row of
    :func:`in_graph_check`; ``scripts/bench_in_graph.py`` runs it too."""
    from ..runtime.segmenter import LungSegmenter

    segs = {p: LungSegmenter.load(bundle_dir, backend=backend, precision="fp32", preprocess=p)
            for p in ("host", "graph")}
    agree, f1 = [], {"host": [], "graph": []}
    stages: dict[str, list[dict]] = {"host": [], "graph": []}
    for i, (img, gt) in enumerate(images):
        masks = {}
        for p in (("host", "graph") if i % 2 == 0 else ("graph", "host")):
            r = segs[p].segment(img)
            masks[p] = r.mask
            f1[p].append(f1_score(r.mask, gt))
            if i > 0 or len(images) == 1:  # the first image warms both paths up
                stages[p].append(r.timings)
        agree.append(f1_score(masks["graph"], masks["host"]))
    a = summarize(agree)
    stage_ms = {p: {k: 1000.0 * float(np.mean([t[k] for t in ts])) for k in STAGES} for p, ts in stages.items()}
    return {"n": len(images), "agreement_mean": a["mean"], "agreement_min": a["min"],
            "f1_gt_mean": summarize(f1["graph"])["mean"], "f1_gt_host_mean": summarize(f1["host"])["mean"],
            "ms_per_image": {p: sum(v.values()) for p, v in stage_ms.items()}, "stages_ms": stage_ms}


def in_graph_failures(record: dict) -> list[str]:
    """Backends of an in-graph record (:func:`in_graph_check`) that miss its tolerance (empty: the gate passes)."""
    tol = record["tolerance"]
    return [b for b, r in record["results"].items()
            if not (r["agreement_mean"] >= tol["min_agreement_mean"]
                    and abs(r["f1_gt_mean"] - r["f1_gt_host_mean"]) <= tol["max_f1_diff"])]


def format_in_graph_table(record: dict) -> str:
    """Plain-text rows of the in-graph gate (one per backend)."""
    tol = record["tolerance"]
    lines = [f"{'in-graph vs host':<28} {'n':>4} {'agree mean':>11} {'agree min':>10} {'F1 graph':>9} {'F1 host':>8} "
             f"{'ms host':>8} {'ms graph':>9}  gate ({tol['rule']})"]
    failed = set(in_graph_failures(record))
    for b, r in record["results"].items():
        lines.append(f"{b:<28} {r['n']:>4} {r['agreement_mean']:>11.5f} {r['agreement_min']:>10.5f} "
                     f"{r['f1_gt_mean']:>9.4f} {r['f1_gt_host_mean']:>8.4f} {r['ms_per_image']['host']:>8.1f} "
                     f"{r['ms_per_image']['graph']:>9.1f}  {'FAIL' if b in failed else 'ok'}")
    return "\n".join(lines)

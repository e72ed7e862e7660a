"""Parity of exported models against the torch model, end to end on held-out images.

For each image: torch (``preprocess.encoder_input`` -> ``sam.image_encoder`` -> :func:`decode`) and each
exported pipeline (raw ``preprocess.model_input`` -> encoder -> decoder) give low-res logits; both are
postprocessed with :func:`lungsam.preprocess.postprocess_logits` to the working frame and thresholded
(``sigmoid(logits) > threshold``, as training does). Figures: max |logit difference| (low-res), mask
agreement (F1 between the two binary masks) mean/min, F1 against ground truth for both.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import numpy as np

from ..metrics import f1_score, summarize
from ..postprocess import CleanupSpec, clean_mask
from ..preprocess import PreprocessSpec, encoder_input, model_input, postprocess_logits, sigmoid
from ..prompts import LearnedPrompt, labelled_points, mask_box, model_prompt

# (raw images (B, 3, img, img) float32, point_coords (B, N, 2), point_labels (B, N)) -> low-res logits (B, 1, L, L)
Pipeline = Callable[[np.ndarray, np.ndarray, np.ndarray], np.ndarray]


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


def torch_low_res(sam, spec: PreprocessSpec, cases: list[ParityCase]) -> np.ndarray:
    """The reference: SAM's own preprocessing, image encoder and :func:`lungsam.modeling.decoder.decode`.

    Returns ``(B, 1, L, L)`` float32 low-res logits for ``cases`` (one batch).
    """
    import torch

    from ..modeling.decoder import decode

    x = torch.from_numpy(np.stack([encoder_input(c.image, spec) for c in cases]))
    opt = lambda a: None if a is None else torch.from_numpy(np.stack(a).astype(np.float32))  # noqa: E731
    with torch.no_grad():
        emb = sam.image_encoder(x)
        first = cases[0]
        coords = opt([c.coords for c in cases]) if first.coords is not None else None
        labels = opt([c.labels for c in cases]) if first.labels is not None else None
        boxes = opt([c.box for c in cases]) if first.box is not None else None
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
        ms_per_image: the pipeline's wall time per image on the parity batches (``None`` until timed).
    """

    name: str
    max_abs_logit_diff: float = 0.0
    agreement: list[float] = field(default_factory=list)
    f1_gt: list[float] = field(default_factory=list)
    f1_gt_torch: list[float] = field(default_factory=list)
    ids: list[str] = field(default_factory=list)
    ms_per_image: float | None = None  # wall time, set by the export (lungsam.export.bundle.run_parity)

    def summary(self) -> dict:
        a = summarize(self.agreement)
        return {"n": a["n"], "max_abs_logit_diff": self.max_abs_logit_diff,
                "agreement_mean": a["mean"], "agreement_min": a["min"],
                "f1_gt_mean": summarize(self.f1_gt)["mean"], "f1_gt_torch_mean": summarize(self.f1_gt_torch)["mean"],
                "worst_image": self.ids[int(np.argmin(self.agreement))] if self.agreement else None}


def compare(pipelines: dict[str, Pipeline], sam, spec: PreprocessSpec, cases: list[ParityCase], threshold: float,
            batch_size: int = 2, log=None, cleanup: CleanupSpec | None = None) -> dict[str, ParityResult]:
    """Run torch and every pipeline over ``cases`` in batches; return a :class:`ParityResult` per pipeline.

    Pipelines get batches of ``batch_size`` images (exercising the dynamic batch axis). ``cleanup``: the run's
    mask clean-up (:func:`lungsam.postprocess.clean_mask`), applied to torch's and the exported masks alike
    when enabled, so the gate covers what the runtime returns.
    """
    rules = cleanup or CleanupSpec()  # disabled: clean_mask returns the mask as it is

    def finish(mask: np.ndarray) -> np.ndarray:
        return clean_mask(mask, rules)
    results = {name: ParityResult(name) for name in pipelines}
    for start in range(0, len(cases), batch_size):
        batch = cases[start:start + batch_size]
        ref = torch_low_res(sam, spec, batch)
        raw = np.stack([c.raw for c in batch])
        pts = np.stack([c.points for c in batch])
        pl = np.stack([c.point_labels for c in batch])
        ref_masks = [finish(sigmoid(working_logits(ref[i], c, spec)) > threshold) for i, c in enumerate(batch)]
        for name, run in pipelines.items():
            out = run(raw, pts, pl)
            r = results[name]
            r.max_abs_logit_diff = max(r.max_abs_logit_diff, float(np.abs(out - ref).max()))
            for i, c in enumerate(batch):
                m = finish(sigmoid(working_logits(out[i], c, spec)) > threshold)
                r.agreement.append(f1_score(m, ref_masks[i]))
                r.f1_gt.append(f1_score(m, c.mask))
                r.f1_gt_torch.append(f1_score(ref_masks[i], c.mask))
                r.ids.append(c.id)
        if log:
            log(f"parity: {min(start + batch_size, len(cases))}/{len(cases)} images")
    return results


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

    def run(raw: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        emb = enc.run(["embeddings"], {"image": raw.astype(np.float32)})[0]
        feeds = {"embeddings": emb} if fixed else {"embeddings": emb, "point_coords": points.astype(np.float32),
                                                  "point_labels": labels.astype(np.float32)}
        return dec.run(["low_res_logits"], feeds)[0]

    return run


def openvino_pipeline(encoder_path: str | Path, decoder_path: str | Path, fixed: bool,
                      precision: str = "fp32") -> Pipeline:
    """The same as :func:`onnx_pipeline` through OpenVINO's CPU plugin (:class:`lungsam.runtime.openvino_backend.
    OvModel`, latency hint, the precision hint of ``precision``); ``encoder_path`` may be an OpenVINO IR."""
    from ..runtime.openvino_backend import OvModel

    enc, dec = OvModel(encoder_path, precision), OvModel(decoder_path, precision)

    def run(raw: np.ndarray, points: np.ndarray, labels: np.ndarray) -> np.ndarray:
        emb = enc.run({"image": raw.astype(np.float32)})["embeddings"]
        feeds = {"embeddings": emb} if fixed else {"embeddings": emb, "point_coords": points.astype(np.float32),
                                                  "point_labels": labels.astype(np.float32)}
        return dec.run(feeds)["low_res_logits"]

    return run


def gate(results: dict[str, ParityResult], min_agreement: float) -> list[str]:
    """Names of the pipelines whose mean agreement is below ``min_agreement`` (empty: the gate passes)."""
    return [n for n, r in results.items() if not r.summary()["agreement_mean"] >= min_agreement]


def format_table(results: dict[str, ParityResult], min_agreement: float) -> str:
    """Plain-text table of the parity figures."""
    lines = [f"{'model':<28} {'n':>4} {'max|dlogit|':>12} {'agree mean':>11} {'agree min':>10} "
             f"{'F1 gt':>7} {'F1 gt torch':>12}  gate (>= {min_agreement})"]
    for name, r in results.items():
        s = r.summary()
        ok = "ok" if s["agreement_mean"] >= min_agreement else "FAIL"
        lines.append(f"{name:<28} {s['n']:>4} {s['max_abs_logit_diff']:>12.3g} {s['agreement_mean']:>11.5f} "
                     f"{s['agreement_min']:>10.5f} {s['f1_gt_mean']:>7.4f} {s['f1_gt_torch_mean']:>12.4f}  {ok}")
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

"""The in-graph path of the runtime (``lungsam predict --preprocess graph``): a bundle's ``encoder_raw`` takes the
decoded image as uint8 at its own size and ``decoder_mask`` returns the thresholded mask at that size
(:mod:`lungsam.export.ingraph` builds them), so no numpy resize, normalisation or logits upsampling runs on the host.

What stays on the host: reading the file, :func:`lungsam.preprocess.to_uint8` (a no-op for 8-bit images; the
min-max scaling of 16-bit ones), the mask clean-up when the bundle enables it (:mod:`lungsam.postprocess` has no
graph form) and the quality flag's features (from the ``S x S`` working-frame probability the decoder also returns).

Limits, each refused with its reason (:class:`InGraphUnavailableError`): fp32 only; onnxruntime only (OpenVINO:
:data:`OPENVINO_REFUSAL`; TensorRT engines of these models are not built); the learned prompt only (interactive
prompts and the box from a first pass need the host path's decoder); one image per model call (each image keeps its
own size).
Torch-free.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np

from .. import preprocess as pp
from ..imageio import DEFAULT_MAX_PIXELS
from ..manifest import GRAPH_MODEL_NAMES
from ..postprocess import clean_mask
from .backends import BackendUnavailableError, resolve_backend, timing_text
from .bundle import Bundle
from .segmenter import LungSegmenter, Prepared, SegmentationResult, open_bundle, open_models

PREPROCESS_PATHS = ("host", "graph", "auto")
GRAPH_BACKENDS = ("onnxruntime",)
#: Why OpenVINO cannot run ``encoder_raw``: measured on its CPU plugin (2026.4), ONNX Resize with antialias does not
#: reproduce Pillow's downscaling (up to 57 grey levels off on 512..2000-pixel radiographs; onnxruntime: 0-1).
OPENVINO_REFUSAL = ("OpenVINO's CPU plugin does not compute ONNX Resize with antialias as Pillow does (measured up to "
                    "57 grey levels off when downscaling; docs/in_graph_preprocessing.md), so its in-graph masks are "
                    "not the host path's: use --backend onnxruntime, or --preprocess host with OpenVINO")


class InGraphUnavailableError(BackendUnavailableError):
    """``--preprocess graph`` cannot run this bundle, backend or request (the message says why and what to do)."""


def has_jitter_term(bundle: Bundle) -> bool:
    """Whether the bundle's quality flag reads the prompt-jitter agreement (then the prompted ``decoder`` runs
    beside the in-graph models, once per prompt variant)."""
    return getattr(bundle.quality_model, "jitter", None) is not None


def graph_unavailable(bundle: Bundle, precision: str, box_from_first_pass: bool | None) -> str | None:
    """Why ``bundle`` cannot run the in-graph path as asked (``None`` when it can)."""
    if bundle.meta is None or not bundle.meta.graph_model_names():
        return (f"bundle {bundle.root} has no in-graph models ({', '.join(GRAPH_MODEL_NAMES)}); export it with "
                "`lungsam export RUN --in-graph-preprocess`, or use --preprocess host")
    if precision != "fp32":
        return f"the in-graph models are fp32 only (asked: {precision}); use --preprocess host for {precision}"
    if box_from_first_pass or (box_from_first_pass is None and bundle.box_from_first_pass):
        return "a box from a first pass needs the host path's prompted decoder; use --preprocess host"
    return None


def auto_preprocess(bundle: Bundle, backend: str, precision: str, box_from_first_pass: bool | None) -> tuple[str, str]:
    """``(path, why)`` for ``--preprocess auto``: ``graph`` when the bundle can run it as asked and its export timed
    the graph path faster than the host path with that backend on a CPU with this one's model and ISA flags
    (``manifest.parity.in_graph.results[backend].ms_per_image``), else ``host``."""
    from ..cpufeatures import cpu_features

    if (why := graph_unavailable(bundle, precision, box_from_first_pass)) is not None:
        return "host", f"auto: host ({why})"
    parity = bundle.meta.parity
    record = (parity.in_graph if parity else None) or {}
    machine = ((parity.machine if parity else None) or {}).get("cpu_features") or {}
    here = cpu_features()
    if (machine.get("model"), machine.get("isa")) != (here["model"], here["isa"]):
        return "host", "auto: host (the bundle's in-graph timings are from another CPU, or absent)"
    ms = ((record.get("results") or {}).get(backend) or {}).get("ms_per_image") or {}
    host, graph = ms.get("host"), ms.get("graph")
    if not isinstance(host, (int, float)) or not isinstance(graph, (int, float)) or graph >= host:
        return "host", (f"auto: host (export timing on this CPU, {backend}: host {timing_text(host)}, graph "
                        f"{timing_text(graph)})")
    return "graph", f"auto: graph (export timing on this CPU, {backend}: {graph:.0f} ms per image against {host:.0f})"


def choose_preprocess(bundle: Bundle, preprocess: str, backend: str, device: str, precision: str,
                      box_from_first_pass: bool | None) -> tuple[str, str]:
    """``(host | graph, why)`` for ``--preprocess`` (:data:`PREPROCESS_PATHS`); ``auto`` is :func:`auto_preprocess`
    with onnxruntime (the one backend of the graph path) for ``--backend auto`` / ``onnxruntime`` on the CPU, host
    otherwise (the in-graph timings are CPU ones; OpenVINO runs the host path only)."""
    if preprocess not in PREPROCESS_PATHS:
        raise ValueError(f"unknown preprocess path {preprocess!r}; choose from {', '.join(PREPROCESS_PATHS)}")
    if preprocess != "auto":
        return preprocess, f"--preprocess {preprocess}"
    if device != "cpu" or backend not in ("auto", *GRAPH_BACKENDS):
        return "host", f"auto: host (the in-graph path runs on onnxruntime on the CPU; asked {backend} on {device})"
    return auto_preprocess(bundle, GRAPH_BACKENDS[0], precision, box_from_first_pass)


class GraphLungSegmenter(LungSegmenter):
    """:class:`LungSegmenter` on the in-graph path: same results (masks equal to the host path's within the export's
    in-graph gate, ``manifest.parity.in_graph``), stages timed the same way (``preprocess_s``: host uint8 view;
    ``encode_s``: resize + normalise + encoder in the graph; ``decode_s``: decoder + upsampling + threshold in the
    graph; ``postprocess_s``: host clean-up and quality flag)."""

    preprocess_path = "graph"
    preprocess_choice: str | None = None  # why this path ran (--preprocess auto)

    @classmethod
    def load(cls, bundle: str | Path | Bundle, backend: str = "auto", device: str = "cpu", precision: str = "fp32",
             allow_fallback: bool = False, threads: int | None = None, box_from_first_pass: bool | None = None,
             expect_digest: str | None = None, max_pixels: int | None = DEFAULT_MAX_PIXELS,
             performance_hint: str | None = None) -> "GraphLungSegmenter":
        """Open ``bundle``'s in-graph models (arguments as :meth:`LungSegmenter.load`; raises
        :class:`InGraphUnavailableError` when the request needs the host path)."""
        b = open_bundle(bundle, expect_digest)
        if (why := graph_unavailable(b, precision, box_from_first_pass)) is not None:
            raise InGraphUnavailableError(f"--preprocess graph: {why}")
        if backend == "openvino":
            raise InGraphUnavailableError(f"--preprocess graph: {OPENVINO_REFUSAL}")
        choice = resolve_backend(b, "onnxruntime" if backend == "auto" else backend, device, precision,
                                 allow_fallback, models=GRAPH_MODEL_NAMES)
        if backend == "auto":
            choice.why = "auto: onnxruntime (the in-graph path runs on onnxruntime only)"
        if choice.backend not in GRAPH_BACKENDS or choice.precision != "fp32":
            raise InGraphUnavailableError(f"--preprocess graph runs on {' or '.join(GRAPH_BACKENDS)} fp32; the request "
                                          f"resolved to {choice.backend} {choice.precision}: use --preprocess host")
        names = list(GRAPH_MODEL_NAMES) + (["decoder"] if has_jitter_term(b) else [])  # the qc's prompt variants
        models = open_models(b, names, choice, threads, performance_hint)
        return cls(b, models, choice, threads, False, max_pixels)

    def describe(self) -> dict[str, Any]:
        d = {**super().describe(), "preprocess": self.preprocess_path}
        return {**d, "preprocess_choice": self.preprocess_choice} if self.preprocess_choice else d

    def to_model_input(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Original pixels -> ``image_u8 (1, H, W, C)`` uint8 (C = 1 grey, 3 RGB; a view of 8-bit data) and the
        model frame's resized size (the whole ``img x img`` frame: the working frame is square)."""
        a = pp.to_uint8(pixels)
        return a.reshape(1, a.shape[0], a.shape[1], -1), pp.preprocess_shape(self.working_size, self.working_size,
                                                                            self.spec.img_size)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """``image_u8 (1, H, W, C)`` uint8 -> ``embeddings (1, C', E, E)`` float32 (``encoder_raw``)."""
        return self._models["encoder_raw"].run({"image_u8": np.ascontiguousarray(batch, np.uint8)})["embeddings"]

    def decode_mask(self, embeddings: np.ndarray, original_hw: tuple[int, int]) -> dict[str, np.ndarray]:
        """``embeddings (1, C', E, E)`` -> ``decoder_mask``'s outputs at ``original_hw`` (see the module doc of
        :mod:`lungsam.export.ingraph`)."""
        return self._models["decoder_mask"].run({"embeddings": np.ascontiguousarray(embeddings, np.float32),
                                                 "original_hw": np.asarray(original_hw, np.int64)})

    def decode(self, embeddings, prompts=None):
        raise InGraphUnavailableError("the in-graph path returns masks, not low-res logits (decode_mask); use "
                                      "--preprocess host for the decoder's logits or interactive prompts")

    def _run(self, batch: list[Prepared], prompts: list) -> list[SegmentationResult]:
        if any(p is not None for p in prompts):
            raise InGraphUnavailableError("interactive prompts need the host path's prompted decoder; use "
                                          "--preprocess host")
        return [self._run_one(p) for p in batch]

    def _run_one(self, prepared: Prepared) -> SegmentationResult:
        t0 = time.perf_counter()
        emb = self.encode(prepared.model_input)
        t1 = time.perf_counter()
        out = self.decode_mask(emb, prepared.original_hw)
        t2 = time.perf_counter()
        timings = dict(prepared.timings, encode_s=t1 - t0, decode_s=t2 - t1)
        return self._finish_mask(prepared, out, timings, emb)

    def _finish_mask(self, prepared: Prepared, out: dict[str, np.ndarray], timings: dict[str, float],
                     embedding: np.ndarray | None = None) -> SegmentationResult:
        t0 = time.perf_counter()
        mask = clean_mask(np.asarray(out["mask"])[0, 0].view(bool), self.cleanup)
        score = float(np.asarray(out["iou_predictions"]).reshape(-1)[0])
        qc = None
        if self.qc is not None:
            working = np.asarray(out["working_probability"], np.float32)[0, 0]
            image = np.asarray(prepared.model_input)[0]  # (H, W, C) uint8 at the original size; qc stretches it
            variants = None if embedding is None else self.jitter_maps(embedding, prepared.input_hw)
            qc = self.qc.assess_map(working, self.threshold, score, self.cleanup, image=image,
                                    variants=variants).to_dict()
        timings["postprocess_s"] = time.perf_counter() - t0
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        area = int(np.count_nonzero(mask))
        sp = prepared.pixel_spacing_mm
        return SegmentationResult(
            mask=mask, probability=np.asarray(out["probability"], np.float32)[0, 0], score=score, area_px=area,
            qc=qc, area_mm2=None if sp is None else float(area * sp[0] * sp[1]), threshold=self.threshold,
            original_hw=prepared.original_hw, pixel_spacing_mm=sp, source=prepared.source, timings=timings,
            prompt="learned", pixels=prepared.pixels, warnings=list(prepared.warnings))

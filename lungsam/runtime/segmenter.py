"""``LungSegmenter``: an exported bundle run torch-free, stage by stage.

Pipeline (the same code path training used, :mod:`lungsam.preprocess`)::

    read (imageio.read_image) -> preprocess.to_working(pixels, S) -> preprocess.model_input(working, spec)
    -> encoder (normalisation in-graph) -> decoder -> low-res logits (4E x 4E)
    -> SAM postprocess to the working frame (preprocess.postprocess_matrices) composed with bilinear
       resizing to the original size (preprocess.bilinear_matrix) -> sigmoid -> probability > threshold

Each stage is a public method (:meth:`~LungSegmenter.preprocess`, :meth:`~LungSegmenter.encode`,
:meth:`~LungSegmenter.decode`, :meth:`~LungSegmenter.postprocess`) so benchmarks can time them.
"""
from __future__ import annotations

import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping, Union

import numpy as np

from .. import preprocess as pp
from ..imageio import (
    DEFAULT_MAX_PIXELS,
    ImageReadError,
    LoadedImage,
    check_max_pixels,
    check_pixel_limit,
    plausible_spacing,
    read_image,
)
from ..manifest import normalize_digest
from ..postprocess import clean_mask
from ..prompts import (
    LearnedPrompt,
    first_pass_box,
    first_pass_prompt,
    jitter_point_inputs,
    labelled_points,
    model_prompt,
    point_count_groups,
)
from ..qc_site import SiteOperatingPoint, read_site_file, site_quality_model
from .backends import BackendChoice, Model, open_model, resolve_backend
from .bundle import ONNX_IO, Bundle, BundleError, BundleIntegrityError
from .prompting import (
    FIRST_PASS_KIND,
    INTERACTIVE_KIND,
    LEARNED_KIND,
    PromptPolicy,
    PromptRequiredError,
    box_required,
    check_policy,
    resolve_policy,
    result_box_source,
    validated_box,
    validated_points,
)
from .stream import chunks, in_order_runs, prefetched

ImageSource = Union[str, Path, LoadedImage, np.ndarray]


class UnusableImageError(ImageReadError):
    """An image that was read but is no radiograph to segment: too small, constant (blank), or non-finite."""


MIN_IMAGE_SIDE = 32
"""Smallest image side (pixels) segmented; smaller inputs are refused (a radiograph is thousands of pixels)."""


def check_segmentable(pixels: np.ndarray, source: object, min_side: int = MIN_IMAGE_SIDE) -> None:
    """Refuse, with the reason, an original-frame image ``(H, W)`` / ``(H, W, C)`` that would give a meaningless
    mask: a side below ``min_side``, NaN/Inf values (e.g. after a DICOM rescale), or a constant (blank) image.

    Raises:
        UnusableImageError
    """
    a = np.asarray(pixels)
    h, w = int(a.shape[0]), int(a.shape[1])
    if min(h, w) < min_side:
        raise UnusableImageError(f"{source}: image is {w}x{h}, below the minimum of {min_side} pixels on a side")
    if a.dtype.kind == "f":
        bad = int(np.count_nonzero(~np.isfinite(a)))
        if bad:
            raise UnusableImageError(f"{source}: {bad} pixel value(s) are NaN or infinite (after rescale); refused")
    if a.dtype.kind not in "biuf":
        raise UnusableImageError(f"{source}: pixel type {a.dtype} is not numeric")
    lo, hi = a.min(), a.max()
    if lo == hi:
        raise UnusableImageError(f"{source}: image is constant (every pixel {lo.item()!r}): blank, nothing to segment")


@dataclass
class Prepared:
    """One image read and preprocessed, ready for :meth:`LungSegmenter.encode`.

    Attributes:
        model_input: ``(3, img, img)`` float32 raw model input (0..255, padded with
            :func:`lungsam.preprocess.pad_fill_value`; the encoder normalises in-graph).
        input_hw: resized size before padding, ``(h', w')`` (for postprocessing).
        original_hw: ``(H0, W0)``.
        working_size: S.
        pixel_spacing_mm: ``(row, col)`` mm per pixel when known.
        source: path of the input (``None`` for arrays).
        pixels: the original pixels (kept for overlays).
        timings: ``read_s``, ``preprocess_s``.
        warnings: what was ignored while reading (e.g. an implausible pixel spacing).
    """

    model_input: np.ndarray
    input_hw: tuple[int, int]
    original_hw: tuple[int, int]
    working_size: int
    pixel_spacing_mm: tuple[float, float] | None = None
    source: Path | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    timings: dict[str, float] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)


@dataclass
class SegmentationResult:
    """Lungs of one image, in its original frame.

    Attributes:
        mask: ``(H0, W0)`` bool.
        probability: ``(H0, W0)`` float32 lung probability.
        score: the decoder's predicted IoU.
        area_px: lung pixels in ``mask``.
        area_mm2: lung area in mm² when the pixel spacing is known, else ``None``.
        threshold: probability threshold used.
        original_hw: ``(H0, W0)``.
        pixel_spacing_mm: ``(row, col)`` or ``None``.
        source: input path (``None`` for arrays).
        timings: seconds per stage: ``read_s``, ``preprocess_s``, ``encode_s``, ``decode_s``,
            ``postprocess_s``, ``total_s`` (encode/decode are the batch's time divided by its size).
        prompt: ``"learned"`` (baked-in prompt), ``"interactive"`` or ``"first-pass box"`` (the learned
            points with the box of the model's own first mask).
        box_source: where the box of the prompt that ran came from: ``"learned"`` (the learned mean-mask box),
            ``"given"`` (the caller's), ``"first-pass"``, or ``None`` (a prompt without a box).
        warnings: what was ignored while reading (e.g. an implausible pixel spacing, so no ``area_mm2``).
        qc: the quality flag ``{"score": 0..1 (higher is better), "flag": bool (a human should look),
            "reasons": [str]}`` (:mod:`lungsam.qc`, calibrated on the run's validation images), or ``None`` for a
            bundle without a ``qc`` manifest section.
    """

    mask: np.ndarray
    probability: np.ndarray
    score: float
    area_px: int
    area_mm2: float | None
    threshold: float
    original_hw: tuple[int, int]
    pixel_spacing_mm: tuple[float, float] | None
    source: Path | None
    timings: dict[str, float]
    prompt: str = LEARNED_KIND
    box_source: str | None = None
    pixels: np.ndarray | None = field(default=None, repr=False)
    warnings: list[str] = field(default_factory=list)
    qc: dict | None = None

    ok = True


@dataclass
class SegmentationFailure:
    """One input of :meth:`LungSegmenter.segment_many` that failed; the batch goes on."""

    source: Path | None
    error: str
    stage: str
    timings: dict[str, float] = field(default_factory=dict)

    ok = False


Prompt = tuple[np.ndarray, np.ndarray]  # model-frame (N, 2) coords and (N,) labels (SAM ONNX convention)


def learned_prompt_decoder(model_names: Iterable[str], policy: PromptPolicy, prompt: LearnedPrompt) -> str:
    """The bundle model that decodes an image given no prompt: ``decoder_fixed`` (the learned prompt baked in)
    when the bundle has one and the policy's box source is ``learned``, else ``decoder`` (the caller's box, or the
    first pass's)."""
    return "decoder_fixed" if "decoder_fixed" in model_names and policy.source(prompt) == "learned" else "decoder"


def bundle_box_from_first_pass(bundle: Bundle) -> bool:
    """Whether ``bundle`` was exported to take its box from a first pass (``manifest.inference``)."""
    return bundle.box_from_first_pass


PromptSpec = Union[Mapping[str, Mapping[str, Any]], Callable[[Any], Union[Mapping[str, Any], None]], None]


def prompt_lookup(prompts: PromptSpec) -> Callable[[Any], dict]:
    """``source -> {"points", "labels", "box"}`` (``{}``: the learned prompt) from :meth:`LungSegmenter.segment_many`'s
    ``prompts``: a mapping keyed by ``str(path)``, or a callable ``source -> dict | None``."""
    def lookup(src: Any) -> dict:
        if prompts is None:
            return {}
        if callable(prompts):
            found = prompts(src)
        else:
            found = prompts.get(str(src)) if isinstance(src, (str, Path)) else None
        return dict(found) if found else {}
    return lookup


def failure_stage(e: Exception) -> str:
    """The stage a failed input of ``segment_many`` is recorded with, from its exception."""
    if isinstance(e, PromptRequiredError):
        return "prompt"
    return "validate" if isinstance(e, UnusableImageError) else "read"


def failure_message(e: Exception, path: Path | None) -> str:
    """A failed input's error line: the exception's message (its type for others), prefixed by the path when it
    does not name it."""
    msg = str(e) if isinstance(e, (ImageReadError, ValueError)) and str(e) else f"{type(e).__name__}: {e}"
    if path is not None and str(path) not in msg:
        msg = f"{path}: {msg}"
    return msg


def listing_failure(e: Exception) -> SegmentationFailure:
    return SegmentationFailure(None, f"input listing failed: {type(e).__name__}: {e}", "list")


def _site_file(path: str | Path) -> tuple[SiteOperatingPoint, dict]:
    """A site file read, with what :meth:`LungSegmenter.describe` records of it (path, sha256)."""
    op, digest = read_site_file(path)
    return op, {"file": str(path), "sha256": digest}


def open_bundle(bundle: str | Path | Bundle, expect_digest: str | None) -> Bundle:
    """The bundle folder (or its manifest.json) loaded, or a loaded :class:`Bundle`, with every file's sha256
    verified and, with ``expect_digest``, its digest checked; raises :class:`BundleIntegrityError` otherwise."""
    b = bundle if isinstance(bundle, Bundle) else Bundle.load(bundle, verify=True, expect_digest=expect_digest)
    if expect_digest is not None and b.digest != normalize_digest(expect_digest):
        raise BundleIntegrityError(f"bundle {b.root}: digest {b.digest} is not the expected {expect_digest}")
    if not b.verified:
        b.verify()
    return b


def open_models(bundle: Bundle, names: list[str], choice: BackendChoice, threads: int | None,
                performance_hint: str | None) -> dict[str, Model]:
    """Open each of the bundle's models ``names`` with the chosen backend and check its input/output names
    (:data:`lungsam.runtime.bundle.ONNX_IO`); raises :class:`BundleError` naming the model."""
    models = {n: open_model(bundle, n, choice, threads, performance_hint) for n in names}
    for n, m in models.items():
        want_in, want_out = ONNX_IO[n]
        if set(m.input_names) != set(want_in) or not set(want_out) <= set(m.output_names):
            raise BundleError(f"bundle {bundle.root}: {n} has inputs {m.input_names} / outputs {m.output_names}, "
                              f"expected {want_in} / {want_out}")
    return models


def _load_graph(b: Bundle, preprocess: str, backend: str, device: str, precision: str, allow_fallback: bool,
                threads: int | None, first_pass: bool | None, expect_digest: str | None, max_pixels: int | None,
                performance_hint: str | None) -> "LungSegmenter | None":
    """The in-graph segmenter when ``preprocess`` (``graph`` or ``auto``) chooses it for bundle ``b``, else
    ``None`` (the host path; :func:`lungsam.runtime.ingraph.choose_preprocess` refuses what cannot run)."""
    from .ingraph import GraphLungSegmenter, choose_preprocess

    path, why = choose_preprocess(b, preprocess, backend, device, precision, first_pass)
    if path != "graph":
        return None
    seg = GraphLungSegmenter.load(b, backend, device, precision, allow_fallback, threads, first_pass, expect_digest,
                                  max_pixels, performance_hint)
    seg.preprocess_choice = why
    return seg


class LungSegmenter:
    """Segments lungs with an exported bundle; no torch.

    Create with :meth:`load`. Thread-safety: one segmenter per thread for inference; reading and
    :meth:`preprocess` are safe to run in other threads (``segment_many`` does).
    """

    preprocess_path = "host"  # resize and normalise in numpy (lungsam.runtime.ingraph: "graph")

    def __init__(self, bundle: Bundle, models: dict[str, Model], choice: BackendChoice, threads: int | None = None,
                 box_from_first_pass: bool = False, max_pixels: int | None = DEFAULT_MAX_PIXELS,
                 policy: PromptPolicy | None = None):
        self.max_pixels = check_max_pixels(max_pixels)
        if policy is None:  # the boolean alias of the policy (older callers)
            policy = resolve_policy(None, box_from_first_pass=box_from_first_pass or None)
        check_policy(policy, bundle.prompt, list(models), bundle.root)
        self.policy = policy
        self.bundle = bundle
        self.spec = bundle.spec
        self.working_size = bundle.working_size
        self.prompt = bundle.prompt
        self.threshold = bundle.threshold
        self.cleanup = bundle.postprocess  # optional manifest sections (absent: no clean-up, no quality flag)
        self.qc = bundle.quality_model
        self._site: dict | None = None  # what use_site_operating_point applied (None: the bundle's line)
        self.choice = choice
        self.threads = threads
        self._models = models
        self._matrices: OrderedDict[tuple, tuple[np.ndarray, np.ndarray]] = OrderedDict()
        self._jitter = self.jitter_prompt_inputs()
        self._jitter_dropped = False  # drop_qc_jitter()

    def jitter_prompt_inputs(self) -> list[Prompt] | None:
        """Model-frame ``(coords, labels)`` of the quality flag's prompt variants (the learned prompt moved and
        thinned as training calibrated it: :func:`lungsam.prompts.jitter_prompts`, the manifest's ``qc.jitter``),
        or ``None`` for a calibration without a jitter term. Raises :class:`BundleError` when the variants
        cannot be made as calibrated (other names, no prompted decoder)."""
        term = getattr(self.qc, "jitter", None)
        if term is None:
            return None
        if "decoder" not in self._models:
            raise BundleError(f"bundle {self.bundle.root}: the quality flag's prompt jitter needs the prompted "
                              f"decoder; this bundle has {', '.join(self._models)}")
        try:
            return jitter_point_inputs(self.prompt, self.spec, self.working_size, term.shift, term.variants)
        except ValueError as e:
            raise BundleError(f"bundle {self.bundle.root}: qc.jitter: {e}") from None

    # -----------------------------------------------------------------------------------------
    @classmethod
    def load(cls, bundle: str | Path | Bundle, backend: str = "auto", device: str = "cpu", precision: str = "fp32",
             allow_fallback: bool = False, threads: int | None = None,
             box_from_first_pass: bool | None = None, expect_digest: str | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS, performance_hint: str | None = None,
             box_source: str | None = None, preprocess: str = "host", qc_jitter: bool = True) -> "LungSegmenter":
        """Open a bundle (verifying every file's sha256) with the requested backend.

        Args:
            bundle: bundle folder (or its manifest.json), or a loaded :class:`Bundle`.
            backend: ``auto`` (TensorRT when ``device="cuda"`` and usable engines exist, else
                onnxruntime; on the CPU OpenVINO where the bundle's export timed it faster on this CPU:
                :func:`lungsam.runtime.backends.auto_cpu_backend`), ``onnxruntime``, ``openvino`` or ``tensorrt``.
            device: ``cpu`` or ``cuda``.
            precision: ``fp32``, ``fp16`` or ``int8`` (its models/engines must be in the bundle; ``int8`` is
                onnxruntime on CPU only).
            allow_fallback: downgrade (with a warning) instead of raising when the request cannot be met.
            threads: onnxruntime intra-op threads / OpenVINO ``INFERENCE_NUM_THREADS`` (``None``: the backend's
                default).
            performance_hint: OpenVINO only: ``latency`` (default) or ``throughput``.
            box_source: the prompt policy, where each image's box comes from (:mod:`lungsam.runtime.prompting`):
                ``learned`` (the learned mean-mask box; a ``box``/``both`` bundle has none), ``given`` (the caller's
                ``box=``), ``first-pass`` (for a bundle prompted with a box: the model's own first mask, from the
                learned points + the mean-mask box, so a ``both`` bundle needs no box). ``None``: the bundle's
                ``manifest["inference"]["box_source"]`` (``lungsam export --box-from-first-pass`` sets
                ``first-pass``), else the prompt mode's own (``given`` for ``box``/``both``, else ``learned``).
            box_from_first_pass: the boolean alias of ``box_source`` (``True``: ``first-pass``; ``False``: the
                prompt mode's own box source); ``None``: as ``box_source`` says.
            expect_digest: refuse the bundle unless its digest (sha256 of ``manifest.json``, which lists
                every file's sha256; ``lungsam export`` prints it) is this one: pins the validated bundle.
            max_pixels: largest input (rows x columns) read or segmented, checked from each file's header
                before decoding (``None``: no limit); bounds memory per image.
            preprocess: ``host`` (numpy), ``graph`` (the bundle's in-graph models, ``lungsam export
                --in-graph-preprocess``: :class:`lungsam.runtime.ingraph.GraphLungSegmenter`) or ``auto``
                (:func:`lungsam.runtime.ingraph.choose_preprocess`).
            qc_jitter: ``False``: the quality flag without its prompt-jitter term (:meth:`drop_qc_jitter`,
                ``lungsam predict --no-qc-jitter``); ``auto`` then times the backends without the variant decodes.
        Raises:
            BundleError / BundleIntegrityError: not a bundle, a malformed manifest, a listed file missing or
                changed, or a digest other than ``expect_digest``.
            BackendUnavailableError: the backend/device/precision is not available and no fallback allowed.
        """
        b = open_bundle(bundle, expect_digest)
        if preprocess != "host":  # the in-graph path (lungsam.runtime.ingraph), where it is chosen
            first_pass = True if box_source == "first-pass" else box_from_first_pass
            seg = _load_graph(b, preprocess, backend, device, precision, allow_fallback, threads, first_pass,
                              expect_digest, max_pixels, performance_hint)
            if seg is not None:
                if not qc_jitter:
                    seg.drop_qc_jitter()
                return seg
        names = b.model_names()
        if "encoder" not in names or not ({"decoder", "decoder_fixed"} & set(names)):
            raise BundleError(f"bundle {b.root} needs an encoder and a decoder (has: {', '.join(names) or 'none'})")
        policy = resolve_policy(b.meta.inference if b.meta is not None else None, box_source, box_from_first_pass)
        choice = resolve_backend(b, backend, device, precision, allow_fallback, models=names, qc_jitter=qc_jitter,
                                 learned_decoder=learned_prompt_decoder(names, policy, b.prompt))
        models = open_models(b, names, choice, threads, performance_hint)
        seg = cls(b, models, choice, threads, max_pixels=max_pixels, policy=policy)
        if not qc_jitter:
            seg.drop_qc_jitter()
        return seg

    @property
    def backend(self) -> str:
        return self.choice.backend

    @property
    def device(self) -> str:
        return self.choice.device

    @property
    def precision(self) -> str:
        return self.choice.precision

    @property
    def box_from_first_pass(self) -> bool:
        """The boolean alias of the prompt policy: ``policy.box_source == "first-pass"``."""
        return self.policy.first_pass

    @property
    def box_source(self) -> str:
        """Where each image's box comes from when the caller gives no prompt (:class:`PromptPolicy`)."""
        return self.policy.source(self.prompt)

    @property
    def needs_box(self) -> bool:
        """True when the prompt policy asks the caller for each image's box (box source ``given``: by default a
        ``box``/``both`` bundle without ``first-pass``)."""
        return self.box_source == "given"

    @property
    def uses_fixed_decoder(self) -> bool:
        """True when :meth:`decode` without prompts runs ``decoder_fixed`` (the learned prompt baked in)."""
        return learned_prompt_decoder(self._models, self.policy, self.prompt) == "decoder_fixed"

    def describe(self) -> dict[str, Any]:
        """Facts for logs/reports: backend, device, precision, providers, prompt mode, fallbacks."""
        return {"bundle": str(self.bundle.root), "backbone": self.bundle.backbone, "digest": self.bundle.digest,
                "backend": self.backend, "device": self.device, "precision": self.precision,
                "providers": {n: list(getattr(m, "providers", [])) for n, m in self._models.items()},
                "prompt_mode": self.prompt.mode, "box_from_first_pass": self.box_from_first_pass,
                "box_source": self.box_source,
                "threshold": self.threshold, "working_size": self.working_size,
                "postprocess": self.cleanup.enabled, "quality_flag": self.qc is not None,
                "qc_operating_point": self.qc_operating_point, "qc_jitter": self._jitter is not None,
                "img_size": self.spec.img_size, "threads": self.threads, "fallbacks": list(self.choice.fallbacks),
                "max_pixels": self.max_pixels, "preprocess": self.preprocess_path,
                **({"backend_choice": self.choice.why} if self.choice.why else {})}

    def drop_qc_jitter(self) -> None:
        """Score the quality flag without its prompt-jitter term (no variant decodes: about a third of a CPU
        image's time, docs/quality.md): the logistic model alone at its own line. Refused after a site's line
        (:meth:`use_site_operating_point`), which was set on scores with the term. :meth:`describe` records it."""
        if self._site is not None:
            raise BundleError("the site's flag line was set on scores with the prompt-jitter term; drop the jitter "
                              "before a site line, or not at all")
        if getattr(self.qc, "jitter", None) is not None:
            self.qc = self.qc.without_jitter()
            self._jitter_dropped = True
        self._jitter = None

    def use_site_operating_point(self, site: str | Path | SiteOperatingPoint) -> None:
        """Flag at a site's own line (a ``lungsam qc-site`` file, :mod:`lungsam.qc_site`) instead of the bundle's:
        only ``qc.flag`` changes, every score stays. Refused (:class:`lungsam.qc_site.SiteQcError`) for a file
        made for another bundle, or a bundle without a version 2 quality model, and after :meth:`drop_qc_jitter`
        (the site's line was set on the full scores). :meth:`describe` records it."""
        if self._jitter_dropped:
            raise BundleError("a site's flag line is set on the bundle's full scores (with the prompt jitter); it "
                              "cannot follow drop_qc_jitter()")
        op, file = (site, {}) if isinstance(site, SiteOperatingPoint) else _site_file(site)
        self.qc = site_quality_model(self.qc, op, self.bundle.digest)
        self._site = {"flag_share": op.flag_share, "n": op.n, "bundle_flag_below": op.bundle_flag_below,
                      "created": op.created, **file}

    @property
    def qc_operating_point(self) -> dict:
        """The flag line in use: ``{"source": "bundle" | "site", "flag_below": line or None (no score line), ...}``
        with, for a site's line, its share, image count, the bundle's own line, and the file's path and sha256."""
        return {"source": "bundle" if self._site is None else "site",
                "flag_below": getattr(self.qc, "flag_below", None), **(self._site or {})}

    # -----------------------------------------------------------------------------------------
    # stages
    # -----------------------------------------------------------------------------------------
    @staticmethod
    def read(source: ImageSource, pixel_spacing_mm: tuple[float, float] | None = None,
             max_pixels: int | None = DEFAULT_MAX_PIXELS) -> LoadedImage:
        """Path / LoadedImage / array -> :class:`LoadedImage` (raises :class:`ImageReadError`). A caller's
        ``pixel_spacing_mm`` (arrays) that is implausible is ignored with a warning in ``.warnings``."""
        if isinstance(source, LoadedImage):
            check_pixel_limit(source.path, *source.hw, max_pixels)
            return source
        if isinstance(source, np.ndarray):
            if source.ndim < 2 or source.shape[0] == 0 or source.shape[1] == 0:
                raise ImageReadError(f"array input has unusable shape {source.shape}")
            check_pixel_limit("<array>", source.shape[0], source.shape[1], max_pixels)
            spacing, why = plausible_spacing(pixel_spacing_mm, "pixel_spacing_mm")
            return LoadedImage(pixels=source, path=Path("<array>"), pixel_spacing_mm=spacing,
                               warnings=[why] if why else [])
        if isinstance(source, (str, Path)):
            return read_image(source, max_pixels)
        raise TypeError(f"expected a path, LoadedImage or numpy array, got {type(source).__name__}")

    def preprocess(self, image: ImageSource, pixel_spacing_mm: tuple[float, float] | None = None) -> Prepared:
        """Read (if needed), refuse an unusable image (:func:`check_segmentable`: too small, constant,
        non-finite; raises :class:`UnusableImageError`), and map original -> working -> raw model input."""
        t0 = time.perf_counter()
        img = self.read(image, pixel_spacing_mm, self.max_pixels)
        check_segmentable(img.pixels, img.path)
        t1 = time.perf_counter()
        try:
            raw, input_hw = self.to_model_input(img.pixels)
        except ValueError as e:
            raise ImageReadError(f"{img.path}: {e}") from e
        t2 = time.perf_counter()
        notes = list(img.warnings)
        spacing = img.pixel_spacing_mm
        if spacing is None and pixel_spacing_mm is not None and not isinstance(image, np.ndarray):
            spacing, why = plausible_spacing(pixel_spacing_mm, "pixel_spacing_mm")
            notes += [why] if why else []
        src = None if str(img.path) == "<array>" else img.path
        return Prepared(model_input=raw, input_hw=input_hw, original_hw=img.hw, working_size=self.working_size,
                        pixel_spacing_mm=spacing, source=src, pixels=img.pixels,
                        timings={"read_s": t1 - t0, "preprocess_s": t2 - t1}, warnings=notes)

    def to_model_input(self, pixels: np.ndarray) -> tuple[np.ndarray, tuple[int, int]]:
        """Original pixels -> raw model input ``(3, img, img)`` float32 and its resized size (original -> working
        -> model frame, :func:`lungsam.preprocess.to_working`, :func:`lungsam.preprocess.model_input`)."""
        return pp.model_input(pp.to_working(pixels, self.working_size), self.spec)

    def encode(self, batch: np.ndarray) -> np.ndarray:
        """``(B, 3, img, img)`` (or ``(3, img, img)``) raw model inputs -> ``(B, C, E, E)`` embeddings."""
        x = np.asarray(batch, np.float32)
        if x.ndim == 3:
            x = x[None]
        n = self.spec.img_size
        if x.ndim != 4 or x.shape[1:] != (3, n, n):
            raise ValueError(f"encoder input must be (B, 3, {n}, {n}), got {x.shape}")
        return self._models["encoder"].run({"image": np.ascontiguousarray(x)})["embeddings"]

    def decode(self, embeddings: np.ndarray, prompts: Prompt | list[Prompt | None] | None = None
               ) -> tuple[np.ndarray, np.ndarray]:
        """Embeddings -> ``(low_res_logits (B, 1, 4E, 4E), iou (B, 1))``.

        Args:
            embeddings: ``(B, C, E, E)``.
            prompts: ``None`` for the learned prompt baked into ``decoder_fixed``; one model-frame
                ``(coords (N, 2), labels (N,))`` pair (from :meth:`model_prompts`) for all images, or a
                list with one pair per image (``None`` entries use the learned prompt).
        """
        e = np.ascontiguousarray(np.asarray(embeddings, np.float32))
        if e.ndim == 3:
            e = e[None]
        b = e.shape[0]
        if prompts is None:
            return self._decode_fixed(e)
        if isinstance(prompts, tuple):
            prompts = [prompts] * b
        if len(prompts) != b:
            raise ValueError(f"{len(prompts)} prompts for {b} embeddings")
        low = np.empty((b, 1, self.spec.low_res_size, self.spec.low_res_size), np.float32)
        iou = np.empty((b, 1), np.float32)
        for n, idx in point_count_groups(prompts).items():
            if n is None:
                lo, io = self._decode_fixed(e[idx])
            else:
                coords = np.stack([np.asarray(prompts[i][0], np.float32).reshape(n, 2) for i in idx])
                labels = np.stack([np.asarray(prompts[i][1], np.float32).reshape(n) for i in idx])
                out = self._models["decoder"].run({"embeddings": np.ascontiguousarray(e[idx]),
                                                   "point_coords": coords, "point_labels": labels})
                lo, io = out["low_res_logits"], out["iou_predictions"]
            low[idx] = np.asarray(lo, np.float32)[:, :1]
            iou[idx] = np.asarray(io, np.float32).reshape(len(idx), -1)[:, :1]
        return low, iou

    def _box_required(self) -> PromptRequiredError:
        return box_required(self.prompt)

    def _decode_fixed(self, e: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        if self.needs_box:
            raise self._box_required()
        if "decoder_fixed" in self._models:
            out = self._models["decoder_fixed"].run({"embeddings": e})
            return np.asarray(out["low_res_logits"], np.float32), np.asarray(out["iou_predictions"], np.float32)
        coords, labels, box = model_prompt(self.prompt, self.spec, (self.working_size,) * 2)
        c, lab = labelled_points(coords, labels, box)
        b = e.shape[0]
        out = self._models["decoder"].run({"embeddings": e, "point_coords": np.repeat(c[None], b, 0),
                                           "point_labels": np.repeat(lab[None], b, 0)})
        return np.asarray(out["low_res_logits"], np.float32), np.asarray(out["iou_predictions"], np.float32)

    def model_prompts(self, original_hw: tuple[int, int], points: np.ndarray | None = None,
                      labels: np.ndarray | None = None, box: np.ndarray | None = None) -> Prompt | None:
        """Interactive prompts in ORIGINAL image pixels -> model-frame ``(coords, labels)`` for :meth:`decode`.

        ``points`` ``(N, 2)`` ``(x, y)`` with ``labels`` ``(N,)`` (1 lung, 0 background; default all 1),
        ``box`` ``(4,)`` ``x0, y0, x1, y1``. Coordinates go original -> working (S, S) -> model frame.
        The caller's prompt replaces the learned one, except that a box alone in a ``both`` or ``auto-both``
        bundle is combined with the learned points (its training prompt). Returns ``None`` when neither is given
        (the learned prompt; :class:`PromptRequiredError` for ``box``/``both`` bundles).
        """
        if points is None and box is None:
            if self.needs_box:
                raise self._box_required()
            return None
        s = (self.working_size, self.working_size)
        h0, w0 = original_hw
        coords = labs = b = None
        if box is not None:
            b = pp.scale_coords(validated_box(box).reshape(2, 2), (h0, w0), s).reshape(4)
        if points is not None:
            pts, labs = validated_points(points, labels)
            coords = pp.coords_to_model(pp.scale_coords(pts, (h0, w0), s), s, self.spec)
        elif labels is not None:
            raise ValueError("labels given without points")
        if coords is None and self.prompt.mode in ("both", "auto-both"):  # the caller's box + the learned points
            coords, labs, _ = model_prompt(self.prompt, self.spec, s, gt_box=b)
        return labelled_points(coords, labs, None if b is None else pp.boxes_to_model(b, s, self.spec))

    def _cached_matrices(self, key: tuple, make: Callable[[], tuple[np.ndarray, np.ndarray]]
                         ) -> tuple[np.ndarray, np.ndarray]:
        """``make()`` once per ``key``, kept in a small LRU cache (at most 16 entries)."""
        m = self._matrices.get(key)
        if m is None:
            m = self._matrices[key] = make()
            if len(self._matrices) > 16:
                self._matrices.popitem(last=False)
        else:
            self._matrices.move_to_end(key)
        return m

    def working_matrices(self, input_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``(A_y (S, L), A_x (S, L))``: SAM postprocess to the working frame (S x S), so working-frame logits =
        ``A_y @ low_res @ A_x.T`` (:func:`lungsam.preprocess.postprocess_matrices`, cached per size)."""
        s = (self.working_size, self.working_size)
        return self._cached_matrices(("working", tuple(input_hw)),
                                     lambda: pp.postprocess_matrices(self.spec, tuple(input_hw), s))

    def output_matrices(self, input_hw: tuple[int, int], original_hw: tuple[int, int]) -> tuple[np.ndarray, np.ndarray]:
        """``(M_y (H0, L), M_x (W0, L))``: SAM postprocess to the working frame composed with bilinear
        resizing to the original size, so logits = ``M_y @ low_res @ M_x.T`` (cached per size)."""
        def make():
            s = self.working_size
            ay, ax = pp.postprocess_matrices(self.spec, tuple(input_hw), (s, s))
            return ((pp.bilinear_matrix(s, original_hw[0]) @ ay.astype(np.float64)).astype(np.float32),
                    (pp.bilinear_matrix(s, original_hw[1]) @ ax.astype(np.float64)).astype(np.float32))

        return self._cached_matrices((tuple(input_hw), tuple(original_hw)), make)

    def postprocess_logits(self, low_res: np.ndarray, prepared: Prepared) -> np.ndarray:
        """Low-res logits ``(L, L)`` (or ``(1, L, L)``, ``(1, 1, L, L)``) -> ``(H0, W0)`` float32 logits."""
        lr = np.asarray(low_res, np.float32)
        while lr.ndim > 2:
            if lr.shape[0] != 1:
                raise ValueError(f"postprocess takes one image's logits, got shape {np.shape(low_res)}")
            lr = lr[0]
        my, mx = self.output_matrices(prepared.input_hw, prepared.original_hw)
        return (my @ lr @ mx.T).astype(np.float32)

    def postprocess(self, low_res: np.ndarray, prepared: Prepared) -> tuple[np.ndarray, np.ndarray]:
        """Low-res logits of one image -> ``(mask (H0, W0) bool, probability (H0, W0) float32)``; the mask is
        ``probability > threshold``, cleaned when the bundle's ``postprocess`` section enables it."""
        prob = pp.sigmoid(self.postprocess_logits(low_res, prepared))
        return clean_mask(prob > self.threshold, self.cleanup), prob

    def working_probability(self, low_res: np.ndarray, input_hw: tuple[int, int]) -> np.ndarray:
        """Low-res logits ``(L, L)`` (or ``(1, L, L)``) -> ``(S, S)`` float32 probability in the working frame (what
        the quality flag was calibrated on)."""
        ay, ax = self.working_matrices(input_hw)
        return pp.sigmoid(ay @ np.asarray(low_res, np.float32).reshape(ay.shape[1], ax.shape[1]) @ ax.T)

    def jitter_maps(self, embedding: np.ndarray, input_hw: tuple[int, int]) -> list[np.ndarray] | None:
        """Working-frame probabilities ``(S, S)`` of the prompt variants (:meth:`jitter_prompt_inputs`) for one
        image's embedding ``(C, E, E)`` or ``(1, C, E, E)``: the prompted decoder run once per variant group on
        the same embedding, no second encoder pass. ``None`` without a jitter term."""
        if self._jitter is None:
            return None
        e = np.asarray(embedding, np.float32).reshape((1, *np.shape(embedding)[-3:]))
        low, _ = LungSegmenter.decode(self, np.repeat(e, len(self._jitter), 0), self._jitter)
        return [self.working_probability(lo, input_hw) for lo in low]

    def quality(self, low_res: np.ndarray, iou: float, prepared: Prepared,
                variants: list[np.ndarray] | None = None) -> dict | None:
        """The quality flag of one image (``SegmentationResult.qc``) from its low-res logits ``(1, L, L)``,
        predicted IoU and the prompt variants' working-frame maps (:meth:`jitter_maps`; ``None`` for an
        interactive prompt, scored without the jitter term), computed in the working frame (S x S) as
        calibrated; ``None`` without calibration."""
        if self.qc is None:
            return None
        prob = self.working_probability(low_res, prepared.input_hw)
        h, w = prepared.input_hw  # the resized image before padding; qc brings it to the working frame
        image = prepared.model_input[:, :h, :w].transpose(1, 2, 0)
        return self.qc.assess_map(prob, self.threshold, iou, self.cleanup, image=image, variants=variants).to_dict()

    # -----------------------------------------------------------------------------------------
    # whole pipeline
    # -----------------------------------------------------------------------------------------
    def _finish(self, prepared: Prepared, low: np.ndarray, iou: np.ndarray, timings: dict[str, float],
                prompt_kind: str, box_source: str | None, embedding: np.ndarray) -> SegmentationResult:
        """The result of one image; ``embedding`` ``(C, E, E)``: its encoder output, for the quality flag's prompt
        variants when the prompt is the learned one (their decodes count in ``postprocess_s``)."""
        t0 = time.perf_counter()
        mask, prob = self.postprocess(low, prepared)
        score = float(np.asarray(iou).reshape(-1)[0])
        variants = self.jitter_maps(embedding, prepared.input_hw) if prompt_kind == LEARNED_KIND else None
        qc = self.quality(low, score, prepared, variants)
        timings["postprocess_s"] = time.perf_counter() - t0
        timings["total_s"] = sum(v for k, v in timings.items() if k != "total_s")
        area = int(np.count_nonzero(mask))
        sp = prepared.pixel_spacing_mm
        return SegmentationResult(
            mask=mask, probability=prob, score=score, area_px=area, qc=qc,
            area_mm2=None if sp is None else float(area * sp[0] * sp[1]), threshold=self.threshold,
            original_hw=prepared.original_hw, pixel_spacing_mm=sp, source=prepared.source, timings=timings,
            prompt=prompt_kind, box_source=box_source, pixels=prepared.pixels, warnings=list(prepared.warnings))

    def segment(self, image: ImageSource, points: np.ndarray | None = None, labels: np.ndarray | None = None,
                box: np.ndarray | None = None, pixel_spacing_mm: tuple[float, float] | None = None
                ) -> SegmentationResult:
        """Segment one image (path, :class:`LoadedImage` or array).

        Args:
            points, labels, box: optional interactive prompts in ORIGINAL pixels (see :meth:`model_prompts`).
            pixel_spacing_mm: ``(row, col)`` for array inputs (files carry their own where they state it).
        """
        prepared = self.preprocess(image, pixel_spacing_mm)
        prompt = self.model_prompts(prepared.original_hw, points, labels, box)
        return self._run([prepared], [prompt])[0]

    def segment_dicom(self, ds: Any, *, fractional: bool = False, sr: bool = True, secondary_capture: bool = False):
        """Segment a chest radiograph given as a pydicom Dataset and return its DICOM results, without files.

        Returns :class:`lungsam.runtime.dicom_out.DicomResults`: ``.seg`` (DICOM-SEG, right/left lung; FRACTIONAL
        with ``fractional``), ``.sr`` (TID 1500 report, with ``sr``), ``.sc`` (overlay, with ``secondary_capture``)
        and ``.result`` (the :class:`SegmentationResult`). Needs ``lungsam[dicom]``.
        Raises :class:`~lungsam.imageio.ImageReadError` / ``DicomOutputError`` naming what is unusable."""
        from ..imageio import read_dicom_dataset
        from .dicom_out import dicom_results

        image = read_dicom_dataset(ds, Path(f"<dataset {ds.get('SOPInstanceUID', '?')}>"), self.max_pixels)
        result = self.segment(image)
        return dicom_results(ds, result, self.bundle, fractional=fractional, sr=sr,
                             secondary_capture=secondary_capture)

    def _run(self, batch: list[Prepared], prompts: list[Prompt | None]) -> list[SegmentationResult]:
        b = len(batch)
        t0 = time.perf_counter()
        emb = self.encode(np.stack([p.model_input for p in batch]))
        t1 = time.perf_counter()
        kinds = [LEARNED_KIND if p is None else INTERACTIVE_KIND for p in prompts]
        if self.box_from_first_pass and None in prompts:
            prompts = self.first_pass_prompts(emb, batch, prompts)
            kinds = [FIRST_PASS_KIND if k == LEARNED_KIND else k for k in kinds]
        low, iou = self.decode(emb, None if all(p is None for p in prompts) else prompts)
        t2 = time.perf_counter()
        out = []
        for i, p in enumerate(batch):
            timings = dict(p.timings, encode_s=(t1 - t0) / b, decode_s=(t2 - t1) / b)
            box_source = result_box_source(kinds[i], self.prompt, None if prompts[i] is None else prompts[i][1])
            out.append(self._finish(p, low[i], iou[i], timings, kinds[i], box_source, emb[i]))
        return out

    def first_pass_prompts(self, embeddings: np.ndarray, batch: list[Prepared], prompts: list[Prompt | None]
                           ) -> list[Prompt | None]:
        """Replace each ``None`` (learned) prompt by the learned points plus the box of the model's own
        first mask, as ``lungsam eval --box-from-first-pass`` does in training's code.

        Pass 1 decodes with the learned points and the mean-mask box; its logits are brought to the
        working frame (S x S), thresholded (``sigmoid > threshold``), and the mask's bounding box (the
        mean-mask box when the mask is empty) goes to the model frame. Returns model-frame prompts.
        """
        s = (self.working_size, self.working_size)
        coords, labels, mean_box = model_prompt(first_pass_prompt(self.prompt), self.spec, s)
        todo = [i for i, p in enumerate(prompts) if p is None]
        low, _ = self.decode(embeddings[todo], [labelled_points(coords, labels, mean_box)] * len(todo))
        out = list(prompts)
        for j, i in enumerate(todo):
            mask = self.working_probability(low[j, 0], batch[i].input_hw) > self.threshold
            out[i] = labelled_points(coords, labels, first_pass_box(mask, mean_box, self.spec))
        return out

    def segment_many(self, sources: Iterable[ImageSource], *, batch_size: int = 1, prefetch: int = 2,
                     prompts: PromptSpec = None) -> Iterator[SegmentationResult | SegmentationFailure]:
        """Stream results in input order; a background thread (:func:`lungsam.runtime.stream.prefetched`) reads
        and preprocesses the next images while the current ones run. Every input yields one
        :class:`SegmentationResult` or one :class:`SegmentationFailure` (``.ok`` tells which); a bad input never
        stops the batch.

        Args:
            sources: paths, :class:`LoadedImage` or arrays.
            batch_size: images per encoder/decoder call.
            prefetch: how many prepared images may wait in the queue.
            prompts: optional per-input interactive prompts, ``{"points", "labels", "box"}`` in original
                pixels: a mapping keyed by ``str(path)`` or a callable ``source -> dict | None``.
        """
        if batch_size < 1 or prefetch < 1:
            raise ValueError("batch_size and prefetch must be >= 1")
        lookup = prompt_lookup(prompts)
        stream = prefetched(sources, lambda src: self._prepare_item(src, lookup), max(prefetch, batch_size),
                            listing_failure)
        for chunk in chunks(stream, batch_size):
            # keep input order: failures are yielded in place, images are run in runs of consecutive ones
            for group in in_order_runs(chunk, lambda item: isinstance(item, tuple)):
                if isinstance(group, list):
                    yield from self._run_safe(group)
                else:
                    yield group

    def _prepare_item(self, src: ImageSource, lookup: Callable[[Any], dict]
                      ) -> tuple[Prepared, Prompt | None] | SegmentationFailure:
        """One source read, preprocessed and its prompt mapped to the model frame, or its failure (never raises:
        one bad input never stops the batch)."""
        path = Path(src) if isinstance(src, (str, Path)) else getattr(src, "path", None)
        try:
            prepared = self.preprocess(src)
            p = lookup(src)
            return prepared, self.model_prompts(prepared.original_hw, p.get("points"), p.get("labels"), p.get("box"))
        except Exception as e:  # one bad input never stops the batch
            return SegmentationFailure(path, failure_message(e, path), failure_stage(e))

    def _run_safe(self, run: list[tuple[Prepared, Prompt | None]]) -> list[SegmentationResult | SegmentationFailure]:
        try:
            return self._run([p for p, _ in run], [pr for _, pr in run])
        except Exception as e:
            if len(run) > 1:  # isolate the failing image
                return [r for one in run for r in self._run_safe([one])]
            p = run[0][0]
            return [SegmentationFailure(p.source, f"{type(e).__name__}: {e}", "inference", dict(p.timings))]

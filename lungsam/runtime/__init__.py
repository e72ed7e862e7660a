"""Torch-free runtime: run an exported bundle (``lungsam export``) with onnxruntime or TensorRT.

Depends on numpy, Pillow and onnxruntime only; TensorRT (``lungsam[trt]``) and pydicom
(``lungsam[dicom]``) are imported lazily when used. Never imports torch, ``lungsam.train`` or
``lungsam.export``. See docs/runtime.md.

    from lungsam.runtime import LungSegmenter
    seg = LungSegmenter.load("bundle/")
    result = seg.segment("chest.png")
    result.mask, result.probability, result.score, result.area_px, result.area_mm2, result.timings
"""
from .backends import BackendChoice, BackendUnavailableError, OrtModel, TrtModel, resolve_backend
from .bundle import BUNDLE_FORMAT, Bundle, BundleError, BundleIntegrityError
from .segmenter import (
                        LungSegmenter,
                        Prepared,
                        PromptRequiredError,
                        SegmentationFailure,
                        SegmentationResult,
                        UnusableImageError,
)

__all__ = [
    "BUNDLE_FORMAT", "BackendChoice", "BackendUnavailableError", "Bundle", "BundleError", "BundleIntegrityError",
    "LungSegmenter", "OrtModel", "Prepared", "PromptRequiredError", "SegmentationFailure", "SegmentationResult",
    "TrtModel", "UnusableImageError", "resolve_backend",
]

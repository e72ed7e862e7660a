"""lungsam: Segment Anything fine-tuned for lung segmentation in chest X-rays, exported to ONNX/TensorRT, run
by a torch-free runtime (:mod:`lungsam.runtime`). Importing the package loads nothing heavy."""
from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("lungsam")
except PackageNotFoundError:  # a source tree on PYTHONPATH without an install
    __version__ = "0+unknown"

__all__ = ["__version__"]

"""The rows' backends of ``lungsam bench``, all in one four-stage interface (``preprocess``, ``encode``,
``decode``, ``postprocess``, plus ``low_res`` outside timing, ``sync`` and ``close``): the torch reference
(:class:`lungsam.benchmarks.torch_backend.TorchBackend`, rebuilt from the bundle's run) and the runtime backends
through :class:`lungsam.runtime.LungSegmenter` (exactly what users run). Both apply the bundle's recorded mask
clean-up (manifest ``postprocess``), so accuracy and agreement compare like with like."""
from __future__ import annotations

import numpy as np

from ..postprocess import CleanupSpec
from .plan import Plan
from .stats import ThreadMap

FIRST_PASS_MODE = "first-pass box: two decoder calls"


class Skip(Exception):
    """A backend/precision this machine or bundle cannot run; the message is the reason."""


class RuntimeBackend:
    """:class:`lungsam.runtime.LungSegmenter` in the bench's four-stage interface."""

    def __init__(self, bundle, backend: str, device: str, precision: str, threads: int | None,
                 box_from_first_pass: bool = False):
        from ..runtime.backends import BackendUnavailableError
        from ..runtime.segmenter import LungSegmenter

        try:
            self.seg = LungSegmenter.load(bundle, backend=backend, device=device, precision=precision,
                                          allow_fallback=False, threads=threads,
                                          box_from_first_pass=box_from_first_pass)
        except BackendUnavailableError as e:
            raise Skip(str(e)) from e
        d = self.seg.describe()
        self.providers = sorted({p for ps in d["providers"].values() for p in ps})
        self.mode = (FIRST_PASS_MODE if box_from_first_pass else
                     "fixed-prompt decoder" if self.seg.uses_fixed_decoder else None)
        self.notes: list[str] = list(d["fallbacks"])
        self._map = ThreadMap()

    def sync(self) -> None:  # the runtime returns host arrays: every stage is complete when it returns
        pass

    def preprocess(self, images, masks=None):
        prepared = self._map(self.seg.preprocess, images)
        prompts = None
        if self.seg.needs_box:
            from ..prompts import mask_box

            prompts = [self.seg.model_prompts(p.original_hw, box=mask_box(m)) for p, m in zip(prepared, masks)]
        return prepared, np.stack([p.model_input for p in prepared]), prompts

    def encode(self, pre):
        prepared, x, prompts = pre
        return prepared, self.seg.encode(x), prompts

    def decode(self, enc):
        prepared, emb, prompts = enc
        if self.seg.box_from_first_pass:  # two decoder calls: the box of the model's own first mask
            prompts = self.seg.first_pass_prompts(emb, prepared, [None] * len(prepared))
        low, _ = self.seg.decode(emb, prompts)
        return prepared, low

    def postprocess(self, dec) -> np.ndarray:
        prepared, low = dec
        return np.stack([self.seg.postprocess(low[i], p)[0] for i, p in enumerate(prepared)])

    def low_res(self, dec) -> np.ndarray:
        return np.asarray(dec[1], np.float32)[:, 0]

    def close(self) -> None:
        self._map.close()
        self.seg = None


def open_backend(plan: Plan, bundle, run_model, device: str, threads: int | None,
                 box_from_first_pass: bool = False):
    """The backend of ``plan``'s row, opened (``Skip`` when it cannot run here)."""
    if plan.backend == "torch":
        from .torch_backend import TorchBackend, TorchUnavailable

        if run_model is None:
            raise Skip("the bundle's training run is not available here (pass --run RUN) to rebuild the torch model")
        try:
            return TorchBackend(run_model.sam, run_model.spec, run_model.prompt, run_model.threshold,
                                run_model.working_size, device=device, precision=plan.precision,
                                mode=plan.mode or "eager", threads=threads, first_pass=box_from_first_pass,
                                cleanup=bundle_cleanup(bundle))
        except TorchUnavailable as e:
            raise Skip(str(e)) from e
    return RuntimeBackend(bundle, plan.backend, device, plan.precision, threads, box_from_first_pass)


def bundle_cleanup(bundle) -> CleanupSpec:
    """The mask clean-up the bundle records (manifest ``postprocess``; off when absent, as the runtime reads it);
    off too without a bundle (a torch row benchmarked from a run alone)."""
    meta = getattr(bundle, "meta", None)
    return CleanupSpec.from_dict(None if meta is None else meta.postprocess)

"""The PyTorch side of ``lungsam bench``: the reference (torch FP32 eager, rebuilt from the run with
:func:`lungsam.runs.load_run`) and the fast torch paths on GPU (FP16/BF16 autocast + CUDA graphs).

Every backend in the bench has the same four stages, each taking and returning a batch:
``preprocess(images, masks) -> x``, ``encode(x) -> emb``, ``decode(emb) -> low``,
``postprocess(low) -> (B, S, S) bool masks`` and ``low_res(low) -> (B, L, L) float32`` (outside timing).
Images are working-frame ``(S, S, 3)`` uint8; the masks argument is used only by ground-truth prompts.

:func:`lungsam.backbones.resize_encoder` runs a backbone at another encoder input size (same weights) for the
size sweep.
"""
from __future__ import annotations

import contextlib

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..errors import LungsamError
from ..modeling.decoder import decode, decode_embedded, encode_prompts
from ..postprocess import CleanupSpec, clean_mask
from ..preprocess import PreprocessSpec, encoder_input, preprocess_shape
from ..prompts import LearnedPrompt, first_pass_box, first_pass_prompt, mask_box, model_prompt
from .stats import ThreadMap

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


class TorchUnavailable(LungsamError, RuntimeError):
    """This torch precision/device combination cannot run here (reported as skipped)."""


def check_torch_available(device: str, precision: str) -> None:
    if device == "cuda" and not torch.cuda.is_available():
        raise TorchUnavailable("torch sees no CUDA device (torch.cuda.is_available() is False)")
    if precision == "int8":
        raise TorchUnavailable("int8 is the bundle's onnxruntime CPU quantisation (lungsam export --int8), not a torch "
                               "path: measure it with lungsam bench BUNDLE")
    if precision not in DTYPES:
        raise TorchUnavailable(f"unknown precision {precision!r}")
    if device == "cpu" and precision != "fp32":
        raise TorchUnavailable(f"torch {precision} is benchmarked on GPU only (CPU autocast to {precision} is an "
                               "emulation slower than fp32, not a deployment path)")
    if device == "cuda" and precision == "bf16" and not torch.cuda.is_bf16_supported():
        raise TorchUnavailable("this GPU does not support bf16")


# ---------------------------------------------------------------------------------------------
# backend
# ---------------------------------------------------------------------------------------------

class TorchBackend:
    """Torch inference in four stages (see module docstring).

    Modes: ``eager`` (FP32, or autocast to FP16/BF16 on GPU) and ``cuda_graph`` (encoder and decoder
    each captured once per batch size and replayed; GPU only). Postprocessing is SAM's own
    ``Sam.postprocess_masks`` followed by ``sigmoid > threshold`` (what ``lungsam eval`` does), then the mask
    clean-up ``cleanup`` (:func:`lungsam.postprocess.clean_mask`: the bundle's recorded ``postprocess``, applied
    as the runtime applies it; off by default).

    ``first_pass`` (a model prompted with a box): the decoder stage runs twice, as
    ``lungsam eval --box-from-first-pass`` and the runtime do: pass 1 with the learned points and the
    mean-mask box, pass 2 with the bounding box of pass 1's working-frame mask (the mean-mask box when
    that mask is empty). No ground truth is used.
    """

    backend = "torch"

    def __init__(self, sam: Sam, spec: PreprocessSpec, prompt: LearnedPrompt, threshold: float, working_size: int,
                 device: str = "cpu", precision: str = "fp32", mode: str = "eager", threads: int | None = None,
                 preprocess_threads: int | None = None, first_pass: bool = False,
                 cleanup: CleanupSpec | None = None):
        check_torch_available(device, precision)
        if mode == "cuda_graph" and device != "cuda":
            raise TorchUnavailable("CUDA graphs need --device cuda")
        if threads is not None and device == "cpu":
            torch.set_num_threads(int(threads))
        self.device, self.precision, self.mode = device, precision, mode
        self.sam = sam.to(device).eval()
        self.spec, self.threshold, self.size = spec, float(threshold), int(working_size)
        self.first_pass = first_pass
        self.cleanup = cleanup if cleanup is not None else CleanupSpec()
        # the prompt fed by the preprocess stage: pass 1's (learned points + mean-mask box) with first_pass
        self.prompt = first_pass_prompt(prompt) if first_pass else prompt
        self.input_hw = preprocess_shape(self.size, self.size, spec.img_size)
        self.providers = [f"torch {torch.__version__} ({device})"]
        self.notes: list[str] = []
        self._prompt_cache: dict[int, tuple] = {}
        self._graphs: dict[int, dict] = {}
        self._host: dict[int, tuple] = {}
        self._map = ThreadMap(preprocess_threads)

    # -- helpers --------------------------------------------------------------------------------
    def sync(self) -> None:
        if self.device == "cuda":
            torch.cuda.synchronize()

    def _autocast(self):
        if self.precision == "fp32":
            return contextlib.nullcontext()
        # CUDA graphs replay the captured casts, so autocast's weight-cast cache must stay off (torch docs)
        return torch.autocast(device_type="cuda", dtype=DTYPES[self.precision], cache_enabled=self.mode != "cuda_graph")

    def _prompts(self, masks: list[np.ndarray] | None, batch: int):
        """Model-frame prompt tensors; prompts that need no ground truth are built once per batch size."""
        if not self.prompt.needs_ground_truth and batch in self._prompt_cache:
            return self._prompt_cache[batch]
        rows = []
        for i in range(batch):
            gt = mask_box(masks[i]) if self.prompt.needs_ground_truth else None
            rows.append(model_prompt(self.prompt, self.spec, (self.size, self.size), gt_box=gt))
        out = tuple(None if rows[0][k] is None else torch.from_numpy(np.stack([r[k] for r in rows])).to(self.device)
                    for k in range(3))
        if not self.prompt.needs_ground_truth:
            self._prompt_cache[batch] = out
        return out

    # -- stages ---------------------------------------------------------------------------------
    def preprocess(self, images: list[np.ndarray], masks: list[np.ndarray] | None = None):
        """Working images -> the normalised batch on the device, written image by image (in parallel
        threads: Pillow and numpy release the GIL) straight into a reused host batch, pinned on GPU."""
        b = len(images)
        host, copied = self._host_batch(b)
        if copied is not None:
            copied.synchronize()  # the previous copy out of this buffer has finished
        rows = host.numpy()
        self._map(lambda i: encoder_input(images[i], self.spec, out=rows[i]), range(b))
        if self.device == "cuda":
            x = host.to(self.device, non_blocking=True)
            done = torch.cuda.Event()
            done.record()
            self._host[b] = (host, done)
        else:
            x = host
        return {"x": x, "prompts": self._prompts(masks, b)}

    def _host_batch(self, b: int):
        """``((b, 3, img, img) float32 host tensor, event of its last device copy or None)``."""
        if b not in self._host:
            n = self.spec.img_size
            self._host[b] = (torch.empty((b, 3, n, n), dtype=torch.float32, pin_memory=self.device == "cuda"), None)
        return self._host[b]

    @torch.inference_mode()
    def encode(self, pre):
        if self.mode == "cuda_graph":
            g = self._graph(pre)
            g["x"].copy_(pre["x"])
            g["enc"].replay()
            return {"emb": g["emb"], "prompts": pre["prompts"], "graph": g}
        with self._autocast():
            emb = self.sam.image_encoder(pre["x"])
        return {"emb": emb, "prompts": pre["prompts"]}

    @torch.inference_mode()
    def decode(self, enc):
        if "graph" in enc:
            return self._decode_graph(enc["graph"], enc["prompts"])
        with self._autocast():
            low, _ = decode(self.sam, enc["emb"], *enc["prompts"])
            if self.first_pass:
                coords, labels, _ = enc["prompts"]
                low, _ = decode(self.sam, enc["emb"], coords, labels, self._first_pass_boxes(low, enc["prompts"]))
        return low

    def _decode_graph(self, g: dict, prompts):
        """Replay the captured decoder; boxes that change per image refresh its static prompt embeddings."""
        b = g["sparse"].shape[0]
        if self.prompt.needs_ground_truth or self.first_pass:
            sparse, dense = self._embed_prompts(prompts, b)
            g["sparse"].copy_(sparse)
            g["dense"].copy_(dense)
        g["dec"].replay()
        if not self.first_pass:
            return g["low"]
        boxes = self._first_pass_boxes(g["low"], prompts)
        sparse, dense = self._embed_prompts((prompts[0], prompts[1], boxes), b)
        g["sparse"].copy_(sparse)
        g["dense"].copy_(dense)
        g["dec"].replay()
        return g["low"]

    def _first_pass_boxes(self, low: torch.Tensor, prompts) -> torch.Tensor:
        """Pass 2's model-frame boxes ``(B, 4)`` from pass 1's low-res logits ``(B, 1, L, L)``: the bounding
        box of each working-frame mask (``sigmoid > threshold``, not cleaned, as in the runtime's first pass), or
        pass 1's mean-mask box when empty."""
        masks = self._threshold(low)
        mean_box = prompts[2][0].cpu().numpy()
        boxes = np.stack([first_pass_box(m, mean_box, self.spec) for m in masks])
        return torch.from_numpy(boxes).to(self.device)

    def _embed_prompts(self, prompts, batch: int):
        """Prompt embeddings, eagerly: SAM's point embedding indexes with boolean masks (a host sync),
        which a CUDA graph cannot capture, so graphs take the embeddings as static inputs."""
        with self._autocast():
            return encode_prompts(self.sam, *prompts, batch)

    @torch.inference_mode()
    def postprocess(self, low) -> np.ndarray:
        """Low-res logits ``(B, 1, L, L)`` -> working-frame masks ``(B, S, S)`` bool, cleaned as ``cleanup`` says."""
        masks = self._threshold(low)
        if not self.cleanup.enabled:
            return masks
        return np.stack([clean_mask(m, self.cleanup) for m in masks])

    @torch.inference_mode()
    def _threshold(self, low) -> np.ndarray:
        """Low-res logits ``(B, 1, L, L)`` -> ``sigmoid > threshold`` in the working frame, ``(B, S, S)`` bool."""
        logits = self.sam.postprocess_masks(low.float(), self.input_hw, (self.size, self.size))
        return (torch.sigmoid(logits) > self.threshold)[:, 0].cpu().numpy()

    @torch.inference_mode()
    def low_res(self, low) -> np.ndarray:
        return low.float()[:, 0].cpu().numpy()

    # -- CUDA graphs ----------------------------------------------------------------------------
    def _graph(self, pre) -> dict:
        """Capture the encoder and the mask decoder (from prompt embeddings) for this batch size."""
        b = pre["x"].shape[0]
        if b in self._graphs:
            return self._graphs[b]
        x = pre["x"].clone()
        sparse, dense = (t.clone() for t in self._embed_prompts(pre["prompts"], b))
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side), self._autocast():
            for _ in range(3):  # warm-up on a side stream, as torch.cuda.graphs requires
                emb = self.sam.image_encoder(x)
                decode_embedded(self.sam, emb, sparse, dense)
        torch.cuda.current_stream().wait_stream(side)
        g_enc, g_dec = torch.cuda.CUDAGraph(), torch.cuda.CUDAGraph()
        with torch.cuda.graph(g_enc), self._autocast():
            emb = self.sam.image_encoder(x)
        with torch.cuda.graph(g_dec, pool=g_enc.pool()), self._autocast():
            low, _ = decode_embedded(self.sam, emb, sparse, dense)
        self._graphs[b] = {"x": x, "emb": emb, "low": low, "sparse": sparse, "dense": dense,
                           "enc": g_enc, "dec": g_dec}
        return self._graphs[b]

    def close(self) -> None:
        self._map.close()
        self._host.clear()
        self._graphs.clear()
        self._prompt_cache.clear()
        self.sam = None
        if self.device == "cuda":
            torch.cuda.empty_cache()

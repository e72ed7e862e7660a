"""Torch modules traced into the bundle's ONNX graphs (see docs/DEVELOPING.md, "Bundle format").

* :class:`EncoderGraph`: raw padded model input -> image embeddings, normalisation inside.
* :class:`DecoderGraph`: embeddings + points in SAM's ONNX label convention -> first-mask-token logits.
* :class:`FixedPromptDecoderGraph`: :class:`DecoderGraph` with the learned prompt baked in.

All of them reuse segment-anything's submodules and :func:`lungsam.modeling.decoder.decode_embedded`,
so they compute exactly what :func:`lungsam.modeling.decoder.decode` computes.
"""
from __future__ import annotations

import numpy as np
import torch
from segment_anything.modeling import Sam

from ..modeling.decoder import decode_embedded
from ..preprocess import PreprocessSpec
from ..prompts import LearnedPrompt, labelled_points, model_prompt

ENCODER_INPUTS = ("image",)
ENCODER_OUTPUTS = ("embeddings",)
DECODER_INPUTS = ("embeddings", "point_coords", "point_labels")
FIXED_DECODER_INPUTS = ("embeddings",)
DECODER_OUTPUTS = ("low_res_logits", "iou_predictions")


class EncoderGraph(torch.nn.Module):
    """``image (B, 3, img, img)`` float32 raw 0..255 values, padded as :func:`lungsam.preprocess.model_input`
    pads -> ``embeddings (B, C, E, E)`` float32.

    Normalisation follows ``spec.normalization``: ``mean_std`` uses ``spec.pixel_mean``/``pixel_std``;
    ``minmax`` scales each image by its own min/max (the padding holds the image minimum, so the
    result equals normalising the unpadded resized image, as LiteMedSAM does).
    """

    def __init__(self, sam: Sam, spec: PreprocessSpec):
        super().__init__()
        if spec.normalization not in ("mean_std", "minmax"):
            raise ValueError(f"unknown normalization {spec.normalization!r}")
        self.encoder = sam.image_encoder
        self.minmax = spec.normalization == "minmax"
        self.register_buffer("mean", torch.tensor(spec.pixel_mean, dtype=torch.float32).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(spec.pixel_std, dtype=torch.float32).view(1, 3, 1, 1))

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """Same arithmetic as :func:`lungsam.preprocess.normalize_model_input`."""
        if self.minmax:
            flat = image.flatten(1)
            lo = flat.min(dim=1).values.view(-1, 1, 1, 1)
            hi = flat.max(dim=1).values.view(-1, 1, 1, 1)
            return (image - lo) / torch.clamp(hi - lo, min=1e-8)
        return (image - self.mean) / self.std

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        return self.encoder(self.normalize(image))


class DecoderGraph(torch.nn.Module):
    """Tuned mask decoder with prompts as inputs.

    Inputs:
        embeddings ``(B, C, E, E)`` float32;
        point_coords ``(B, N, 2)`` float32 ``(x, y)`` in the model frame;
        point_labels ``(B, N)`` float32, :func:`lungsam.prompts.labelled_points` convention
        (1 fg, 0 bg, 2/3 box corners, -1 padding point).
    Outputs:
        low_res_logits ``(B, 1, 4E, 4E)`` float32 (padded model frame), iou_predictions ``(B, 1)``,
        from the first mask token (= ``multimask_output=False``), as :func:`lungsam.modeling.decoder.decode`.
    """

    def __init__(self, sam: Sam):
        super().__init__()
        self.sam = sam
        self.img_size = float(sam.prompt_encoder.input_image_size[0])

    def embed_points(self, point_coords: torch.Tensor, point_labels: torch.Tensor) -> torch.Tensor:
        """Sparse embeddings ``(B, N, C)``: segment-anything's ``SamOnnxModel._embed_points``.

        Equals ``PromptEncoder`` on points (+0.5 pixel centre, padding point -> ``not_a_point_embed``)
        and boxes (corners labelled 2/3 -> ``point_embeddings[2]``/``[3]``).
        """
        pe = self.sam.prompt_encoder
        coords = (point_coords + 0.5) / self.img_size
        emb = pe.pe_layer._pe_encoding(coords)
        labels = point_labels.unsqueeze(-1).expand_as(emb)
        emb = emb * (labels != -1)
        emb = emb + pe.not_a_point_embed.weight * (labels == -1)
        for i in range(pe.num_point_embeddings):
            emb = emb + pe.point_embeddings[i].weight * (labels == i)
        return emb

    def forward(self, embeddings: torch.Tensor, point_coords: torch.Tensor, point_labels: torch.Tensor
                ) -> tuple[torch.Tensor, torch.Tensor]:
        b, _, e, _ = embeddings.shape
        sparse = self.embed_points(point_coords, point_labels)
        dense = self.sam.prompt_encoder.no_mask_embed.weight.reshape(1, -1, 1, 1).expand(b, -1, e, e)
        return decode_embedded(self.sam, embeddings, sparse, dense)


def fixed_prompt_points(prompt: LearnedPrompt, spec: PreprocessSpec,
                        working_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The learned prompt of a points / auto-box / auto-both run as labelled points in the model frame.

    Returns:
        ``coords (N, 2)`` float32 and ``labels (N,)`` float32 (see :func:`lungsam.prompts.labelled_points`).
    Raises:
        ValueError: for ``box`` / ``both`` prompts, which need each image's ground-truth box.
    """
    if prompt.needs_ground_truth:
        raise ValueError(f"prompt {prompt.mode!r} needs a ground-truth box per image; it cannot be baked in")
    coords, labels, box = model_prompt(prompt, spec, (working_size, working_size))
    return labelled_points(coords, labels, box)


class FixedPromptDecoderGraph(torch.nn.Module):
    """:class:`DecoderGraph` with constant ``point_coords (1, N, 2)`` / ``point_labels (1, N)`` broadcast
    over the batch. Input ``embeddings (B, C, E, E)``; same outputs as :class:`DecoderGraph`."""

    def __init__(self, sam: Sam, coords: np.ndarray, labels: np.ndarray):
        super().__init__()
        self.decoder = DecoderGraph(sam)
        self.register_buffer("coords", torch.as_tensor(np.asarray(coords, np.float32)).view(1, -1, 2))
        self.register_buffer("labels", torch.as_tensor(np.asarray(labels, np.float32)).view(1, -1))

    def forward(self, embeddings: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        b = embeddings.shape[0]
        return self.decoder(embeddings, self.coords.expand(b, -1, -1), self.labels.expand(b, -1))

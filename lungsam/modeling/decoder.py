"""Batched single-mask decoding with segment-anything's prompt encoder and mask decoder.

SAM's ``MaskDecoder.predict_masks`` repeats one image embedding for every prompt
(``repeat_interleave``), so a batch of B images with one prompt each would become B*B pairs.
:func:`decode` pairs image i with prompt i, using SAM's own submodules, and returns the mask of
the first mask token, exactly what ``multimask_output=False`` returns (tested against SAM).
"""
from __future__ import annotations

import torch
from segment_anything.modeling import Sam


def encode_prompts(sam: Sam, coords: torch.Tensor | None, labels: torch.Tensor | None, boxes: torch.Tensor | None,
                   batch: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Sparse ``(B, T, C)`` and dense ``(B, C, E, E)`` prompt embeddings.

    Args:
        coords: ``(B, N, 2)`` float32 ``(x, y)`` in the model frame, or ``None``.
        labels: ``(B, N)`` float32 (1 foreground, 0 background), or ``None``.
        boxes: ``(B, 4)`` float32 ``x0, y0, x1, y1`` in the model frame, or ``None``.
    """
    points = (coords, labels) if coords is not None else None
    sparse, dense = sam.prompt_encoder(points=points, boxes=boxes, masks=None)
    if sparse.shape[0] != batch:  # no prompt at all: SAM returns a batch of 1
        sparse = sparse.expand(batch, -1, -1)
        dense = dense.expand(batch, -1, -1, -1)
    return sparse, dense


def decode(sam: Sam, embeddings: torch.Tensor, coords: torch.Tensor | None = None, labels: torch.Tensor | None = None,
           boxes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Decode one mask per image.

    Args:
        embeddings: ``(B, C, E, E)`` image embeddings.
        coords, labels, boxes: see :func:`encode_prompts`; row i prompts image i.
    Returns:
        ``(low_res_logits (B, 1, 4E, 4E), iou_pred (B, 1))`` in the padded model frame.
    """
    sparse, dense = encode_prompts(sam, coords, labels, boxes, embeddings.shape[0])
    return decode_embedded(sam, embeddings, sparse, dense)


def decode_embedded(sam: Sam, embeddings: torch.Tensor, sparse: torch.Tensor, dense: torch.Tensor
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """:func:`decode` from prompt embeddings already computed (shared with the ONNX export).

    Args:
        embeddings: ``(B, C, E, E)`` image embeddings.
        sparse: ``(B, T, C)`` sparse prompt embeddings; dense: ``(B, C, E, E)``.
    Returns:
        ``(low_res_logits (B, 1, 4E, 4E), iou_pred (B, 1))``.
    """
    md = sam.mask_decoder
    b, c, e, _ = embeddings.shape
    output_tokens = torch.cat([md.iou_token.weight, md.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(b, -1, -1), sparse.to(output_tokens.dtype)], dim=1)
    src = embeddings + dense
    pos = sam.prompt_encoder.get_dense_pe().expand(b, -1, -1, -1)
    hs, src = md.transformer(src, pos, tokens)
    upscaled = md.output_upscaling(src.transpose(1, 2).reshape(b, c, e, e))
    hyper = md.output_hypernetworks_mlps[0](hs[:, 1, :])  # first mask token = multimask_output=False
    _, cu, h, w = upscaled.shape
    masks = (hyper.unsqueeze(1) @ upscaled.reshape(b, cu, h * w)).reshape(b, 1, h, w)
    iou = md.iou_prediction_head(hs[:, 0, :])[:, :1]
    return masks, iou

"""Registry of SAM backbones, in the spirit of segment-anything's ``sam_model_registry``.

Each :class:`BackboneSpec` names a builder, its :class:`~lungsam.preprocess.PreprocessSpec` and,
where official weights exist, the :mod:`lungsam.weights` entry to fetch them. Builders return a
``segment_anything.modeling.Sam`` whose ``image_encoder``, ``prompt_encoder`` and ``mask_decoder``
follow the official key names, so official checkpoints load with ``strict=True``.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer

from .errors import ArgumentError, LungsamError
from .modeling.tiny_vit import PatchMerging, TinyViT, TinyViTBlock
from .preprocess import PreprocessSpec

SAM_PREPROCESS = PreprocessSpec(img_size=1024)


@dataclass(frozen=True)
class BackboneSpec:
    """A named SAM variant.

    Attributes:
        name: registry key.
        description: one line for ``lungsam weights list`` and reports.
        preprocess: input spec (size, normalisation, embedding grid).
        build: ``() -> Sam`` with random weights.
        weights: key in :data:`lungsam.weights.OFFICIAL_WEIGHTS`, or ``None`` when the user must give a path.
    """

    name: str
    description: str
    preprocess: PreprocessSpec
    build: Callable[[], Sam]
    weights: str | None


def _sam_heads(embed_dim: int, embedding_size: int, img_size: int, *, mlp_dim: int = 2048, num_heads: int = 8,
               iou_hidden: int = 256, mask_in_chans: int = 16) -> tuple[PromptEncoder, MaskDecoder]:
    prompt_encoder = PromptEncoder(
        embed_dim=embed_dim,
        image_embedding_size=(embedding_size, embedding_size),
        input_image_size=(img_size, img_size),
        mask_in_chans=mask_in_chans,
    )
    mask_decoder = MaskDecoder(
        num_multimask_outputs=3,
        transformer=TwoWayTransformer(depth=2, embedding_dim=embed_dim, mlp_dim=mlp_dim, num_heads=num_heads),
        transformer_dim=embed_dim,
        iou_head_depth=3,
        iou_head_hidden_dim=iou_hidden,
    )
    return prompt_encoder, mask_decoder


def _assemble(encoder: torch.nn.Module, spec: PreprocessSpec, prompt_encoder: PromptEncoder,
              mask_decoder: MaskDecoder) -> Sam:
    # Sam keeps its own mean/std buffers; lungsam normalises in preprocess.py, so they are unused here.
    sam = Sam(image_encoder=encoder, prompt_encoder=prompt_encoder, mask_decoder=mask_decoder,
              pixel_mean=list(spec.pixel_mean), pixel_std=list(spec.pixel_std))
    return sam.eval()


def build_sam_vit(encoder_embed_dim: int, encoder_depth: int, encoder_num_heads: int,
                  encoder_global_attn_indexes: tuple[int, ...]) -> Sam:
    """Original SAM ViT (B/L/H), same hyper-parameters as segment-anything's ``build_sam``."""
    spec = SAM_PREPROCESS
    encoder = ImageEncoderViT(
        depth=encoder_depth, embed_dim=encoder_embed_dim, img_size=spec.img_size, mlp_ratio=4,
        norm_layer=partial(torch.nn.LayerNorm, eps=1e-6), num_heads=encoder_num_heads, patch_size=16,
        qkv_bias=True, use_rel_pos=True, global_attn_indexes=encoder_global_attn_indexes, window_size=14,
        out_chans=256,
    )
    return _assemble(encoder, spec, *_sam_heads(256, 64, spec.img_size))


MOBILE_SAM_PREPROCESS = PreprocessSpec(img_size=1024)
LITE_MEDSAM_PREPROCESS = PreprocessSpec(img_size=256, normalization="minmax", pixel_mean=(0.0, 0.0, 0.0),
                                        pixel_std=(1.0, 1.0, 1.0))
TINY_PREPROCESS = PreprocessSpec(img_size=128, embedding_size=8)


def build_mobile_sam() -> Sam:
    """MobileSAM: TinyViT-5M at 1024x1024 (patch stride 4) with SAM's prompt encoder and decoder."""
    spec = MOBILE_SAM_PREPROCESS
    encoder = TinyViT(img_size=spec.img_size, patch_stride=4, classifier_classes=1000)
    return _assemble(encoder, spec, *_sam_heads(256, 64, spec.img_size))


def build_lite_medsam() -> Sam:
    """LiteMedSAM: TinyViT-5M at 256x256 (patch stride 1); prompts in a 256x256 frame."""
    spec = LITE_MEDSAM_PREPROCESS
    encoder = TinyViT(img_size=spec.img_size, patch_stride=1)
    return _assemble(encoder, spec, *_sam_heads(256, 64, spec.img_size))


def build_tiny() -> Sam:
    """A small random SAM for fast tests: TinyViT with 16..48 channels at 128x128, 32-d decoder."""
    spec = TINY_PREPROCESS
    dim = 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # deterministic "weights" so tiny runs and exports are reproducible
        return _build_tiny(spec, dim)


def _build_tiny(spec: PreprocessSpec, dim: int) -> Sam:
    encoder = TinyViT(img_size=spec.img_size, patch_stride=4, embed_dims=(16, 24, 32, 48), depths=(1, 1, 1, 1),
                      num_heads=(1, 2, 2, 2), window_sizes=(4, 4, 4, 4), out_chans=dim)
    return _assemble(encoder, spec, *_sam_heads(dim, spec.embedding_size, spec.img_size, mlp_dim=64, num_heads=2,
                                                iou_hidden=32, mask_in_chans=4))


BACKBONES: dict[str, BackboneSpec] = {
    spec.name: spec
    for spec in [
        BackboneSpec("mobile_sam", "MobileSAM (TinyViT-5M, 1024 input)", MOBILE_SAM_PREPROCESS, build_mobile_sam,
                     "mobile_sam"),
        BackboneSpec("lite_medsam", "LiteMedSAM (TinyViT-5M, 256 input, medical pre-training)", LITE_MEDSAM_PREPROCESS,
                     build_lite_medsam, "lite_medsam"),
        BackboneSpec("vit_b", "SAM ViT-B (checkpoint from a user path)", SAM_PREPROCESS,
                     partial(build_sam_vit, 768, 12, 12, (2, 5, 8, 11)), None),
        BackboneSpec("vit_l", "SAM ViT-L (checkpoint from a user path)", SAM_PREPROCESS,
                     partial(build_sam_vit, 1024, 24, 16, (5, 11, 17, 23)), None),
        BackboneSpec("vit_h", "SAM ViT-H (checkpoint from a user path)", SAM_PREPROCESS,
                     partial(build_sam_vit, 1280, 32, 16, (7, 15, 23, 31)), None),
        BackboneSpec("tiny", "tiny random SAM for tests (no weights)", TINY_PREPROCESS, build_tiny, None),
    ]
}


class UnknownBackboneError(LungsamError, KeyError):
    exit_code = 2  # a bad --backbone value: a usage error

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def get_backbone(name: str) -> BackboneSpec:
    """Look up a backbone by name; the error lists the known names."""
    try:
        return BACKBONES[name]
    except KeyError:
        raise UnknownBackboneError(f"unknown backbone {name!r}; known backbones: {', '.join(BACKBONES)}") from None


def load_checkpoint_state(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a SAM checkpoint (plain state dict, or one under ``model``/``state_dict``) with ``weights_only=True``."""
    state = torch.load(Path(path), map_location="cpu", weights_only=True)
    if isinstance(state, dict):
        for key in ("model", "state_dict"):
            if key in state and isinstance(state[key], dict):
                state = state[key]
    if not isinstance(state, dict):
        raise ValueError(f"{path}: not a state dict")
    return state


def build_backbone(name: str, checkpoint: str | Path | None = None, *, random_init: bool = False,
                   encoder_size: int | None = None) -> Sam:
    """Build a backbone and load its weights strictly.

    Args:
        name: registry key.
        checkpoint: path to weights; when ``None`` the official weights are taken from the cache
            (downloaded when missing), unless ``random_init`` or the backbone is ``tiny``.
        random_init: keep random weights (tests, architecture checks).
        encoder_size: run the image encoder at this input side instead of the native one (same weights,
            :func:`resize_encoder`); its preprocessing is :func:`preprocess_for` ``(name, encoder_size)``.
    """
    spec = get_backbone(name)
    sam = spec.build()
    if not (random_init or (checkpoint is None and spec.name == "tiny")):
        sam = _load_weights(sam, spec, checkpoint)
    if encoder_size is not None and encoder_size != spec.preprocess.img_size:
        preprocess_for(name, encoder_size)  # a clear error for a size that does not fit
        sam, _ = resize_encoder(sam, spec.preprocess, encoder_size)
    return sam


def _load_weights(sam: Sam, spec: BackboneSpec, checkpoint: str | Path | None) -> Sam:
    if checkpoint is None:
        if spec.weights is None:
            raise ArgumentError(f"backbone {spec.name!r} has no downloadable weights: pass --checkpoint PATH")
        from .weights import ensure_weights

        checkpoint = ensure_weights(spec.weights)
    state = load_checkpoint_state(checkpoint)
    sam.load_state_dict(state, strict=True)
    return sam.eval()


def resize_encoder(sam: Sam, spec: PreprocessSpec, img_size: int) -> tuple[Sam, PreprocessSpec]:
    """A copy of ``sam`` whose image encoder takes ``img_size x img_size`` input (same weights), with the
    prompt encoder's frame and embedding grid adjusted, and the matching :class:`PreprocessSpec`.

    Raises ``ValueError`` when ``img_size`` does not divide the encoder's token grids exactly.
    """
    if img_size == spec.img_size:
        return sam, spec
    sam2 = copy.deepcopy(sam)
    enc = sam2.image_encoder
    old = spec.img_size
    if isinstance(enc, TinyViT):
        def scaled(res: tuple[int, int]) -> tuple[int, int]:
            if (res[0] * img_size) % old:
                raise ArgumentError(f"encoder input {img_size} does not divide TinyViT's {res[0]}-token grid at {old}; "
                                 "use a multiple of 64 (MobileSAM) or 4 (LiteMedSAM)")
            return (res[0] * img_size // old, res[1] * img_size // old)

        for m in enc.modules():
            if isinstance(m, (PatchMerging, TinyViTBlock)):
                m.resolution = scaled(m.resolution)
        enc.out_resolution = scaled((enc.out_resolution, enc.out_resolution))[0]
        enc.img_size = img_size
        emb = enc.out_resolution
    elif isinstance(enc, ImageEncoderViT):
        patch = enc.patch_embed.proj.kernel_size[0]
        if img_size % patch:
            raise ArgumentError(f"encoder input {img_size} is not a multiple of the ViT patch size {patch}")
        emb = img_size // patch
        if enc.pos_embed is not None:
            pe = enc.pos_embed.data.permute(0, 3, 1, 2)
            pe = F.interpolate(pe, size=(emb, emb), mode="bicubic", align_corners=False)
            enc.pos_embed = torch.nn.Parameter(pe.permute(0, 2, 3, 1).contiguous())
        enc.img_size = img_size
    else:
        raise ValueError(f"cannot resize encoder {type(enc).__name__}")
    pe = sam2.prompt_encoder
    pe.image_embedding_size = (emb, emb)
    pe.input_image_size = (img_size, img_size)
    return sam2, replace(spec, img_size=img_size, embedding_size=emb)


def preprocess_for(name: str, encoder_size: int | None = None) -> PreprocessSpec:
    """The backbone's :class:`PreprocessSpec`, or the one of its encoder run at ``encoder_size`` (same
    normalisation; model frame ``encoder_size`` and an embedding grid scaled with it).

    Raises ``ValueError`` when ``encoder_size`` does not scale the embedding grid to a whole number.
    """
    spec = get_backbone(name).preprocess
    if encoder_size is None or encoder_size == spec.img_size:
        return spec
    if encoder_size < 1 or (spec.embedding_size * encoder_size) % spec.img_size:
        step = spec.img_size // spec.embedding_size
        raise ArgumentError(f"encoder size {encoder_size} does not fit {name}'s {spec.embedding_size}-token grid at "
                         f"{spec.img_size}: use a multiple of {step}")
    return replace(spec, img_size=encoder_size, embedding_size=spec.embedding_size * encoder_size // spec.img_size)

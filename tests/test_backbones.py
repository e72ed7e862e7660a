import pytest
import torch
from segment_anything import sam_model_registry

from lungsam.backbones import BACKBONES, UnknownBackboneError, build_backbone, get_backbone

from .conftest import LITE_MEDSAM, MOBILE_SAM, need


def test_unknown_backbone_lists_known_names():
    with pytest.raises(UnknownBackboneError) as e:
        get_backbone("vit_xl")
    for name in BACKBONES:
        assert name in str(e.value)


def test_every_backbone_carries_its_preprocessing():
    assert get_backbone("mobile_sam").preprocess.img_size == 1024
    assert get_backbone("lite_medsam").preprocess.img_size == 256
    assert get_backbone("lite_medsam").preprocess.normalization == "minmax"
    assert get_backbone("vit_b").preprocess.pixel_mean == (123.675, 116.28, 103.53)


def test_tiny_is_deterministic_and_runs():
    a, b = build_backbone("tiny"), build_backbone("tiny")
    for (k, v), (_, w) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(v, w), k
    spec = get_backbone("tiny").preprocess
    with torch.no_grad():
        e = a.image_encoder(torch.randn(2, 3, spec.img_size, spec.img_size))
    assert e.shape == (2, 32, spec.embedding_size, spec.embedding_size)


@pytest.mark.integration
@pytest.mark.parametrize("name,path", [("mobile_sam", MOBILE_SAM), ("lite_medsam", LITE_MEDSAM)])
def test_official_checkpoints_load_strictly(name, path):
    sam = build_backbone(name, need(path))
    sd = torch.load(path, map_location="cpu", weights_only=True)
    own = sam.state_dict()
    assert set(sd) == set(own)
    for k in ("mask_decoder.iou_token.weight", "image_encoder.neck.0.weight"):
        assert torch.equal(sd[k], own[k])


def test_strict_loading_rejects_a_foreign_checkpoint(tmp_path):
    sd = build_backbone("tiny").state_dict()
    sd["image_encoder.extra"] = torch.zeros(1)
    torch.save(sd, tmp_path / "x.pt")
    with pytest.raises(RuntimeError, match="Unexpected key"):
        build_backbone("tiny", tmp_path / "x.pt")


@pytest.mark.parametrize("name", ["vit_b", pytest.param("vit_l", marks=pytest.mark.slow), pytest.param("vit_h", marks=pytest.mark.slow)])
def test_vit_architectures_match_segment_anything(name, tmp_path):
    """Our ViT builders produce exactly segment-anything's parameter names and shapes (random weights),
    so official checkpoints given by path load strictly."""
    ours = build_backbone(name, random_init=True).state_dict()
    ref = sam_model_registry[name](checkpoint=None).state_dict()
    assert {k: tuple(v.shape) for k, v in ours.items()} == {k: tuple(v.shape) for k, v in ref.items()}
    if name == "vit_b":  # a checkpoint file saved the way Meta ships them loads strictly
        torch.save(ref, tmp_path / "sam_vit_b.pth")
        sam = build_backbone(name, tmp_path / "sam_vit_b.pth")
        assert torch.equal(sam.state_dict()["mask_decoder.iou_token.weight"], ref["mask_decoder.iou_token.weight"])


def test_encoder_size_scales_the_model_frame_and_the_embedding_grid():
    from lungsam.backbones import preprocess_for

    native = get_backbone("mobile_sam").preprocess
    assert preprocess_for("mobile_sam") is native and preprocess_for("mobile_sam", 1024) is native
    s512 = preprocess_for("mobile_sam", 512)
    assert (s512.img_size, s512.embedding_size, s512.low_res_size) == (512, 32, 128)
    assert s512.pixel_mean == native.pixel_mean and s512.normalization == native.normalization
    assert preprocess_for("lite_medsam", 128).embedding_size == 32
    with pytest.raises(ValueError, match="multiple of 16"):
        preprocess_for("mobile_sam", 520)
    tiny = preprocess_for("tiny", 64)
    sam = build_backbone("tiny", encoder_size=64)
    assert sam.prompt_encoder.input_image_size == (64, 64)
    with torch.no_grad():
        emb = sam.image_encoder(torch.zeros(1, 3, 64, 64))
    assert emb.shape[-1] == tiny.embedding_size == sam.prompt_encoder.image_embedding_size[0]

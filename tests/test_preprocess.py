"""Pin the numpy/Pillow preprocessing to segment-anything's own transforms."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from segment_anything.utils.transforms import ResizeLongestSide

from lungsam import preprocess as pp
from lungsam.backbones import build_backbone, get_backbone

from .conftest import MONTGOMERY, need


@pytest.fixture(scope="module")
def real_image():
    p = need(MONTGOMERY / "images" / "MCUCXR_0001_0.png")
    return np.asarray(Image.open(p))


@pytest.mark.parametrize("hw", [(256, 256), (300, 180), (77, 130)])
def test_resize_and_coords_match_sam(real_image, hw):
    spec = get_backbone("mobile_sam").preprocess
    img = pp.resize_image(pp.to_rgb_uint8(real_image), hw)
    t = ResizeLongestSide(spec.img_size)
    np.testing.assert_array_equal(pp.resize_longest_side(img, spec.img_size), t.apply_image(img))
    coords = np.array([[[10.0, 20.0], [hw[1] - 1, hw[0] - 1]]])
    np.testing.assert_allclose(pp.coords_to_model(coords, hw, spec), t.apply_coords(coords, hw), rtol=1e-6)
    boxes = np.array([[3.0, 4.0, hw[1] - 5, hw[0] - 2]])
    np.testing.assert_allclose(pp.boxes_to_model(boxes, hw, spec), t.apply_boxes(boxes, hw), rtol=1e-6)


@pytest.mark.parametrize("hw", [(256, 256), (200, 256)])
def test_encoder_input_matches_sam_preprocess(real_image, hw):
    spec = get_backbone("mobile_sam").preprocess
    sam = build_backbone("tiny")  # Sam.preprocess only uses mean/std and image_encoder.img_size
    sam.image_encoder.img_size = spec.img_size
    img = pp.resize_image(pp.to_rgb_uint8(real_image), hw)
    resized = ResizeLongestSide(spec.img_size).apply_image(img)
    x = torch.as_tensor(resized).permute(2, 0, 1).contiguous()[None].float()
    ref = sam.preprocess(x[0]).numpy()  # (x - mean) / std, then zero pad bottom/right
    ours = pp.encoder_input(img, spec)
    np.testing.assert_allclose(ours, ref, atol=1e-5)
    raw, input_hw = pp.model_input(img, spec)
    assert input_hw == resized.shape[:2]
    np.testing.assert_allclose(pp.normalize_model_input(raw, spec), ref, atol=1e-5)


def test_minmax_normalisation_pads_with_image_minimum(real_image):
    spec = get_backbone("lite_medsam").preprocess
    img = pp.resize_image(pp.to_rgb_uint8(real_image), (128, 256))
    x = pp.encoder_input(img, spec)
    resized = pp.resize_longest_side(img, spec.img_size).astype(np.float32)
    lo, hi = resized.min(), resized.max()
    np.testing.assert_allclose(x[:, :128, :], ((resized - lo) / (hi - lo)).transpose(2, 0, 1), atol=1e-6)
    assert np.all(x[:, 128:, :] == 0)


@pytest.mark.parametrize("input_hw,out_hw", [((1024, 1024), (256, 256)), ((768, 1024), (300, 400)), ((1024, 512), (2048, 1000))])
def test_postprocess_matches_sam(input_hw, out_hw):
    spec = get_backbone("mobile_sam").preprocess
    sam = build_backbone("tiny")
    sam.image_encoder.img_size = spec.img_size
    low = torch.randn(2, 1, 256, 256) * 8
    ref = sam.postprocess_masks(low, input_hw, out_hw).numpy()
    ours = pp.postprocess_logits(low.numpy(), spec, input_hw, out_hw)
    # torch computes source coordinates in float32: differences stay at float32 rounding level
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-3)
    assert np.mean((ours > 0) == (ref > 0)) > 0.9999


@pytest.mark.parametrize("n_in,n_out", [(8, 32), (256, 1024), (256, 100), (5, 7)])
def test_bilinear_matrix_equals_torch(n_in, n_out):
    x = np.random.default_rng(0).random((n_in, n_in)).astype(np.float32)
    ref = F.interpolate(torch.from_numpy(x)[None, None], size=(n_out, n_out), mode="bilinear", align_corners=False)[0, 0]
    m = pp.bilinear_matrix(n_in, n_out)
    np.testing.assert_allclose(m @ x @ m.T, ref.numpy(), atol=5e-5)


def test_to_rgb_uint8_handles_16bit_and_rgba():
    a16 = (np.arange(64, dtype=np.uint16).reshape(8, 8) * 1000)
    out = pp.to_rgb_uint8(a16)
    assert out.shape == (8, 8, 3) and out.dtype == np.uint8 and out.min() == 0 and out.max() == 255
    rgba = np.zeros((4, 5, 4), np.uint8)
    assert pp.to_rgb_uint8(rgba).shape == (4, 5, 3)
    with pytest.raises(ValueError):
        pp.to_rgb_uint8(np.zeros((0, 4), np.uint8))

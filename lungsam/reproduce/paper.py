"""Numbers reported by Carvalho & Almeida, "Exploiting the Segment Anything Model (SAM) for Lung Segmentation in
Chest X-ray Images", CIARP 2024 (SAM ViT-B; F1 = Dice). Only values we know are listed; every other cell of the
reproduced tables prints ``n/a``. Torch-free."""
from __future__ import annotations

CITATION = ("Carvalho & Almeida, \"Exploiting the Segment Anything Model (SAM) for Lung Segmentation in Chest X-ray "
            "Images\", CIARP 2024 (SAM ViT-B)")

#: Tables 1-2: zero-shot F1 per prompt.
ZERO_SHOT = {
    "montgomery": {"box": "0.718", "points": "0.860", "both": "0.848"},
    "shenzhen": {"box": "0.782", "points": "0.726", "both": "0.863"},
}
#: Tables 3-4 (validation F1 per threshold): values not transcribed here.
THRESHOLD_RANGE = (0.50, 0.70)
#: lr x weight-decay grid and the paper's choice.
LR_GRID = (1e-5, 1e-4, 1e-3)
WD_GRID = (0.0, 1e-3, 1e-1)
GRID_BEST = {"lr": 1e-5, "weight_decay": 0.0}
#: Tables 5-6: cross-dataset F1, keyed (train set, test set).
CROSS = {("shenzhen", "montgomery"): "0.924", ("montgomery", "shenzhen"): "0.933"}
#: Tables 7-8: 5-fold test F1 per prompt (only the point-prompt rows are known here).
KFOLD = {
    "montgomery": {"points": "0.943 ± 0.007"},
    "shenzhen": {"points": "0.915 ± 0.011"},
}
#: Table 9: U-Net F1.
UNET = {"montgomery": "0.973", "shenzhen": "0.941"}

NA = "n/a"


def get(table: dict, *keys) -> str:
    """The paper's value at ``keys`` or ``n/a``."""
    cur = table
    for k in keys:
        if not isinstance(cur, dict) or k not in cur:
            return NA
        cur = cur[k]
    return cur if isinstance(cur, str) else NA


def as_dict() -> dict:
    """JSON-friendly copy for results.json."""
    return {
        "citation": CITATION, "zero_shot_f1": ZERO_SHOT, "kfold_test_f1": KFOLD,
        "cross_dataset_f1": {f"{a}->{b}": v for (a, b), v in CROSS.items()}, "unet_f1": UNET,
        "grid": {"lr": list(LR_GRID), "weight_decay": list(WD_GRID), "best": GRID_BEST},
        "threshold_range": list(THRESHOLD_RANGE),
        "not_transcribed": ["Tables 3-4 values (validation F1 per threshold)", "Tables 7-8 box and both rows",
                            "grid cell values"],
    }

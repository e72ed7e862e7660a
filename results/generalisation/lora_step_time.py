"""Time LoRA training steps on LiteMedSAM's image encoder (TinyViT at 256): rank 4 on ``qkv``
(:func:`lungsam.lora.add_lora`), batch 4, float32, forward and backward through the encoder only.

Usage: ``python results/generalisation/lora_step_time.py WEIGHTS [--steps 2]`` (one line per step, with the load).
"""
from __future__ import annotations

import argparse
import logging
import os
import time

import torch

from lungsam.backbones import build_backbone
from lungsam.lora import LoraSpec, add_lora

log = logging.getLogger("lora_step_time")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("weights")
    ap.add_argument("--steps", type=int, default=2)
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    torch.manual_seed(0)
    sam = build_backbone("lite_medsam", args.weights)
    opt = torch.optim.Adam(add_lora(sam.image_encoder, LoraSpec(4, 8.0, ("qkv",))), lr=1e-4)
    x = torch.randn(4, 3, 256, 256)
    for i in range(args.steps):
        t = time.perf_counter()
        loss = sam.image_encoder(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        log.info("step %d: %.1f s (load average %s)", i, time.perf_counter() - t, os.getloadavg())


if __name__ == "__main__":
    main()

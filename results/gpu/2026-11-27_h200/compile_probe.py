"""Probe: torch.compile on the MobileSAM encoder (fp16 autocast) vs eager and CUDA graphs, H200."""
import json, os, sys, time
import torch
sys.path.insert(0, os.getcwd())
from lungsam.backbones import build_backbone
T0 = time.perf_counter()
LIMIT = float(os.environ.get("PROBE_S", "170"))
out = {"torch": torch.__version__, "gpu": torch.cuda.get_device_name(0)}
sam = build_backbone("mobile_sam", "gpu_kit/weights/mobile_sam.pt").cuda().eval()
enc = sam.image_encoder

def timeit(fn, x, n=30):
    for _ in range(3):
        fn(x)
    torch.cuda.synchronize(); t = time.perf_counter()
    for _ in range(n):
        fn(x)
    torch.cuda.synchronize()
    return (time.perf_counter() - t) / n * 1e3

def dump():
    print(json.dumps(out, indent=1), flush=True)
    json.dump(out, open(os.path.join(os.environ["OUT"], "probe.json"), "w"), indent=1)

xs = {b: torch.randn(b, 3, 1024, 1024, device="cuda") for b in (1, 32)}
with torch.inference_mode(), torch.autocast("cuda", torch.float16):
    ref = {b: enc(x).float() for b, x in xs.items()}
    for b, x in xs.items():
        out[f"eager_fp16_b{b}_ms"] = timeit(enc, x)
    dump()
    for mode in ("default", "max-autotune-no-cudagraphs"):
        for b, x in xs.items():
            if time.perf_counter() - T0 > LIMIT:
                out[f"{mode}_b{b}"] = "skipped (time)"; continue
            torch._dynamo.reset()
            c = torch.compile(enc, mode=mode, dynamic=False)
            t = time.perf_counter(); y = c(x).float(); torch.cuda.synchronize()
            out[f"{mode}_b{b}_compile_s"] = time.perf_counter() - t
            out[f"{mode}_b{b}_ms"] = timeit(c, x)
            out[f"{mode}_b{b}_maxdiff_vs_eager"] = float((y - ref[b]).abs().max())
            out[f"{mode}_b{b}_img_per_s"] = b / out[f"{mode}_b{b}_ms"] * 1e3
            dump()
out["total_s"] = time.perf_counter() - T0
dump()

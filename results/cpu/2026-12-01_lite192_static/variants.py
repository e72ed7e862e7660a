"""Quantise the encoder with variant settings; embedding error vs FP32 on 8 test images."""
import sys, time, logging, json
import numpy as np, onnx, onnxruntime as ort
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationMethod
logging.getLogger().setLevel(logging.ERROR)
D = "/work/cache/cpu/qdq"; SRC = sys.argv[1] if len(sys.argv) > 1 else "/tmp/d/b_lite192d/encoder.onnx"
calib = list(np.load(f"{D}/calib.npy")[:, None]); test = np.load(f"{D}/test.npy")

class R:
    def __init__(s, xs): s.xs = xs; s.it = iter(xs)
    def get_next(s):
        x = next(s.it, None); return None if x is None else {"image": x}
    def rewind(s): s.it = iter(s.xs)

def run(path, xs):
    so = ort.SessionOptions(); so.intra_op_num_threads = 2
    s = ort.InferenceSession(path, so, providers=["CPUExecutionProvider"])
    return np.concatenate([s.run(None, {"image": x[None]})[0] for x in xs])

ref = run(SRC, test)
def err(y):
    d = (y - ref).reshape(len(ref), -1); r = ref.reshape(len(ref), -1)
    cos = (d * 0 + y.reshape(len(ref), -1) * r).sum(1) / np.linalg.norm(y.reshape(len(ref), -1), axis=1) / np.linalg.norm(r, axis=1)
    return float(np.linalg.norm(d) / np.linalg.norm(r)), float(cos.min())

def variant(name, **kw):
    out = f"{D}/{name}.onnx"; t = time.time()
    base = dict(quant_format=QuantFormat.QDQ, op_types_to_quantize=["Conv", "MatMul", "Gemm"], per_channel=True,
                activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
                extra_options={"MatMulConstBOnly": True, "WeightSymmetric": True, "ActivationSymmetric": False})
    ex = dict(base["extra_options"]); ex.update(kw.pop("extra", {})); base["extra_options"] = ex
    base.update(kw)
    quantize_static(SRC, out, R(calib), **base)
    rel, cos = err(run(out, test))
    print(f"{name}: rel_err {rel:.4f} min_cos {cos:.5f} ({time.time()-t:.0f}s)", flush=True)
    return out

if __name__ == "__main__":
    names = sys.argv[2].split(",") if len(sys.argv) > 2 else ["base"]
    V = {
        "base": {},
        "noconv": dict(op_types_to_quantize=["MatMul", "Gemm"]),
        "convonly": dict(op_types_to_quantize=["Conv"]),
        "pct": dict(calibrate_method=CalibrationMethod.Percentile, extra={"CalibPercentile": 99.99}),
        "entropy": dict(calibrate_method=CalibrationMethod.Entropy),
        "pertensor": dict(per_channel=False),
        "s8s8": dict(activation_type=QuantType.QInt8, extra={"ActivationSymmetric": True}),
        "reduce": dict(reduce_range=True),
    }
    for n in names:
        variant(n, **V[n])

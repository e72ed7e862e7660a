"""Low-res mask agreement (Dice of sigmoid(logits) > 0.5) of each INT8 encoder against FP32, 8 test images."""
import sys
import numpy as np, onnxruntime as ort
D = "/work/cache/cpu/qdq"; B = "/tmp/d/b_lite192d"
test = np.load(f"{D}/test.npy")
so = ort.SessionOptions(); so.intra_op_num_threads = 2
dec = ort.InferenceSession(f"{B}/decoder_fixed.onnx", so)
def masks(enc_path):
    enc = ort.InferenceSession(enc_path, so)
    return [dec.run(None, {"embeddings": enc.run(None, {"image": x[None]})[0]})[0][0, 0] > 0 for x in test]
ref = masks(f"{B}/encoder.onnx")
for name in sys.argv[1:]:
    path = f"{B}/encoder_int8.onnx" if name == "dynamic" else f"{D}/{name}.onnx"
    got = masks(path)
    d = [2 * (a & b).sum() / (a.sum() + b.sum()) for a, b in zip(got, ref)]
    print(f"{name}: low-res mask agreement mean {np.mean(d):.4f} min {np.min(d):.4f}", flush=True)

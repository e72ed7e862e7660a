"""Per-tensor SQNR (dB) of the QDQ encoder against FP32 on one calibration image (onnxruntime qdq_loss_debug)."""
import sys, logging
import numpy as np
from onnxruntime.quantization import qdq_loss_debug as dbg
logging.getLogger().setLevel(logging.ERROR)
D = "/work/cache/cpu/qdq"; SRC, QDQ = sys.argv[1], sys.argv[2]
x = np.load(f"{D}/calib.npy")[:1]
class R:
    def __init__(s): s.it = iter([x])
    def get_next(s):
        v = next(s.it, None); return None if v is None else {"image": v}
    def rewind(s): s.it = iter([x])
    def __iter__(s): return iter([{"image": x}])
dbg.modify_model_output_intermediate_tensors(SRC, f"{D}/fp32_aug.onnx", save_as_external_data=False)
dbg.modify_model_output_intermediate_tensors(QDQ, f"{D}/qdq_aug.onnx", save_as_external_data=False)
fa = dbg.collect_activations(f"{D}/fp32_aug.onnx", R())
qa = dbg.collect_activations(f"{D}/qdq_aug.onnx", R())
m = dbg.create_activation_matching(qa, fa)
e = dbg.compute_activation_error(m)
order = list(m.keys())
print("tensor, qdq_err (SQNR of the quantisation step alone), xmodel_err (SQNR vs FP32 model, accumulated)")
for k in order:
    v = e[k]
    print(f"{k[:70]:70s} qdq {v.get('qdq_err', float('nan')):7.2f} xmodel {v.get('xmodel_err', float('nan')):7.2f}")

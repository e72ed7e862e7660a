"""Per-op FP32 vs QDQ activations on LiteMedSAM@192's encoder (issue 19 static INT8)."""
import sys, time, json, logging
import numpy as np, onnx, onnxruntime as ort
from onnxruntime.quantization import quantize_static, QuantFormat, QuantType, CalibrationMethod
from onnxruntime.quantization import qdq_loss_debug as dbg
from lungsam.runs import load_run
from lungsam.export.quantize import calibration_inputs, _Reader
from lungsam.data import load_dataset, pool
from lungsam.preprocess import model_input

RUN, SRC, OUT = "/tmp/d/lite192", "/tmp/d/b_lite192d/encoder.onnx", "/work/cache/cpu/qdq"
rm = load_run(RUN)
calib, _ = calibration_inputs(rm, 32)
by_id = pool([load_dataset(d, rm.working_size) for d in rm.run["config"]["data"]]).by_id()
test = [model_input(by_id[i].image, rm.spec)[0][None].astype(np.float32) for i in rm.split["test"][:8]]
np.save(f"{OUT}/calib.npy", np.concatenate(calib)); np.save(f"{OUT}/test.npy", np.concatenate(test))
print("saved", len(calib), len(test), flush=True)

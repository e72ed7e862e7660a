"""``--backend triton``: the bundle's models served by a Triton Inference Server (tritonclient HTTP or gRPC).

The workstation keeps the bundle (its manifest gives preprocessing, prompt and threshold; its files are verified as
always) and runs pre- and postprocessing locally; the encoder and decoders run on the server, from the repository
that ``lungsam export RUN --out B --triton REPO`` wrote. Each served model must carry the bundle's manifest
sha256 (``parameters.lungsam_bundle_manifest_sha256`` in its config), so a server serving another bundle is refused.

Server: ``LUNGSAM_TRITON_URL`` (``http://host:8000`` or ``grpc://host:8001``; a bare ``host:port`` is HTTP) and the
model name prefix ``LUNGSAM_TRITON_MODEL`` (default ``lungsam``, the ``--triton-name`` of the export).
``pip install 'lungsam[triton]'``. Torch-free.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

TRITON_URL_ENV = "LUNGSAM_TRITON_URL"
TRITON_MODEL_ENV = "LUNGSAM_TRITON_MODEL"
BUNDLE_SHA_PARAMETER = "lungsam_bundle_manifest_sha256"  # the key lungsam.export.triton writes
MODEL_SUFFIX = {"encoder": "_encoder", "decoder_fixed": "_decoder_fixed", "decoder": "_decoder"}


def triton_url() -> str:
    """The server from ``LUNGSAM_TRITON_URL``; raises :class:`BackendUnavailableError` when unset."""
    from .backends import BackendUnavailableError

    url = os.environ.get(TRITON_URL_ENV, "").strip()
    if not url:
        raise BackendUnavailableError(f"backend 'triton' needs the server's address in {TRITON_URL_ENV} "
                                      "(http://host:8000 or grpc://host:8001)")
    return url


def _client(url: str):
    """``(tritonclient module, client)`` for ``http://``, ``grpc://`` or bare ``host:port`` (HTTP)."""
    from .backends import BackendUnavailableError

    protocol, _, rest = url.partition("://")
    if not rest:
        protocol, rest = "http", url
    if protocol not in ("http", "grpc"):
        raise BackendUnavailableError(f"{TRITON_URL_ENV}={url!r}: use http://host:8000 or grpc://host:8001")
    try:
        if protocol == "grpc":
            import tritonclient.grpc as tc
        else:
            import tritonclient.http as tc
    except ImportError as e:
        raise BackendUnavailableError("backend 'triton' needs tritonclient: pip install 'lungsam[triton]'") from e
    return tc, tc.InferenceServerClient(url=rest), protocol


class TritonModel:
    """One bundle model served by Triton; :meth:`run` sends float32 numpy inputs and returns the outputs."""

    def __init__(self, url: str, model_name: str, bundle_sha256: str):
        from .backends import BackendUnavailableError

        self.url, self.model_name = url, model_name
        self._tc, self.client, self._protocol = _client(url)
        try:
            ready = self.client.is_model_ready(model_name)
        except Exception as e:  # tritonclient raises its own exception types on connection errors
            raise BackendUnavailableError(f"Triton server {url} is not reachable ({e})") from e
        if not ready:
            raise BackendUnavailableError(f"Triton server {url} does not serve a ready model {model_name!r} "
                                          f"(set {TRITON_MODEL_ENV} to the --triton-name of the export)")
        meta = self.client.get_model_metadata(model_name)
        config = self.client.get_model_config(model_name)
        if self._protocol == "grpc":
            inputs, outputs = [i.name for i in meta.inputs], [o.name for o in meta.outputs]
            served = config.config.parameters[BUNDLE_SHA_PARAMETER].string_value \
                if BUNDLE_SHA_PARAMETER in config.config.parameters else None
        else:
            inputs, outputs = [i["name"] for i in meta["inputs"]], [o["name"] for o in meta["outputs"]]
            served = (config.get("parameters", {}).get(BUNDLE_SHA_PARAMETER) or {}).get("string_value")
        if served != bundle_sha256:
            raise BackendUnavailableError(
                f"Triton model {model_name!r} at {url} was written from another bundle (manifest sha256 {served}, "
                f"this bundle {bundle_sha256}); serve this bundle's repository (lungsam export --triton)")
        self.input_names, self.output_names = tuple(inputs), tuple(outputs)
        self.providers = [f"triton:{url}/{model_name}"]

    def run(self, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
        tc = self._tc
        inputs = []
        for name in self.input_names:
            arr = np.ascontiguousarray(feeds[name], np.float32)
            inp = tc.InferInput(name, list(arr.shape), "FP32")
            inp.set_data_from_numpy(arr)
            inputs.append(inp)
        outputs = [tc.InferRequestedOutput(n) for n in self.output_names]
        result = self.client.infer(self.model_name, inputs, outputs=outputs)
        return {n: np.asarray(result.as_numpy(n), np.float32) for n in self.output_names}


def open_triton_model(bundle: Any, name: str) -> TritonModel:
    """The served counterpart of the bundle's model ``name`` (``encoder``, ``decoder``, ``decoder_fixed``)."""
    from ..artifacts import sha256_file
    from ..manifest import MANIFEST_FILE

    prefix = os.environ.get(TRITON_MODEL_ENV, "lungsam")
    return TritonModel(triton_url(), prefix + MODEL_SUFFIX[name], sha256_file(bundle.root / MANIFEST_FILE))

"""Python-based `pytorch` backend: runs a TorchScript model.pt with the libtorch backend's naming rules.

Installed as `<backend-dir>/pytorch/model.py`; Triton uses it for every config with `backend: "pytorch"` when
no libtorch backend is present, so one config.pbtxt serves here and on the NGC image's real libtorch backend.

Rules kept from the libtorch backend:
- inputs are named after forward()'s arguments, or all follow `NAME__<index>` (positional);
- outputs are `NAME__<index>`: the index-th element of forward()'s output (a lone tensor is index 0);
- parameters INFERENCE_MODE, DISABLE_OPTIMIZED_EXECUTION, INTRA_OP_THREAD_COUNT, INTER_OP_THREAD_COUNT.
"""

from __future__ import annotations

import json
import os
import re
import traceback

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

_INDEXED = re.compile(r"^(.*)__(\d+)$")


def _bool_param(params: dict, name: str, default: bool) -> bool:
    value = (params.get(name) or {}).get("string_value")
    return default if value in (None, "") else value.strip().lower() in ("true", "1", "yes", "on")


def _int_param(params: dict, name: str, default: int) -> int:
    value = (params.get(name) or {}).get("string_value")
    return default if value in (None, "") else int(value)


class TritonPythonModel:
    """TorchScript runner: one forward per group of same-shaped requests in an execute."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        params = config.get("parameters") or {}
        self.inference_mode = _bool_param(params, "INFERENCE_MODE", True)
        self.optimized = not _bool_param(params, "DISABLE_OPTIMIZED_EXECUTION", False)
        intra = _int_param(params, "INTRA_OP_THREAD_COUNT", 0)
        inter = _int_param(params, "INTER_OP_THREAD_COUNT", 0)
        if intra > 0:
            torch.set_num_threads(intra)
        if inter > 0:
            try:
                torch.set_num_interop_threads(inter)
            except RuntimeError:  # only settable before any parallel work
                pass

        kind = args.get("model_instance_kind", "CPU")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        if kind == "GPU" and torch.cuda.is_available():
            self.device = torch.device(f"cuda:{device_id}")
        else:
            if kind == "GPU":
                self.logger.log_warn(f"{args['model_name']}: KIND_GPU requested but CUDA is unavailable; using CPU")
            self.device = torch.device("cpu")

        filename = config.get("default_model_filename") or "model.pt"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.model = torch.jit.load(path, map_location=self.device)
        self.model.eval()

        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.outputs = []
        for o in config["output"]:
            m = _INDEXED.match(o["name"])
            if not m:
                raise pb_utils.TritonModelException(
                    f"output {o['name']!r} must be named <name>__<index> (libtorch backend rule)"
                )
            self.outputs.append((o["name"], int(m.group(2)), pb_utils.triton_string_to_numpy(o["data_type"])))
        self.arg_index = self._map_inputs([n for n, _ in self.inputs])
        self.logger.log_info(
            f"{args['model_name']}: loaded {filename} on {self.device}, inputs {self.arg_index}, "
            f"outputs {[n for n, _, _ in self.outputs]}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}/{torch.get_num_interop_threads()}, "
            f"cpu {torch.backends.cpu.get_cpu_capability()}"
        )

    def _map_inputs(self, names: list[str]) -> dict[str, int]:
        """Config input name -> forward() argument position, per the libtorch backend's rules."""
        arg_names = [a.name for a in self.model.forward.schema.arguments][1:]  # drop self
        if all(n in arg_names for n in names):
            return {n: arg_names.index(n) for n in names}
        indexed = {n: _INDEXED.match(n) for n in names}
        if all(indexed.values()):
            return {n: int(m.group(2)) for n, m in indexed.items()}
        raise pb_utils.TritonModelException(
            f"inputs {names} match neither forward()'s arguments {arg_names} nor the NAME__<index> convention"
        )

    def _forward(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One forward over numpy inputs -> numpy outputs in config order."""
        args = [None] * (max(self.arg_index.values()) + 1)
        for name, array in arrays.items():
            args[self.arg_index[name]] = torch.from_numpy(array).to(self.device)
        with torch.jit.optimized_execution(self.optimized):
            if self.inference_mode:
                with torch.inference_mode():
                    result = self.model(*args)
            else:
                with torch.no_grad():
                    result = self.model(*args)
        if isinstance(result, torch.Tensor):
            result = (result,)
        elif isinstance(result, dict):
            result = tuple(result.values())
        out = []
        for name, index, dtype in self.outputs:
            if index >= len(result):
                raise RuntimeError(f"output {name} asks for element {index} but forward() returned {len(result)}")
            out.append(result[index].detach().to("cpu").numpy().astype(dtype, copy=False))
        return out

    def execute(self, requests):
        responses: list = [None] * len(requests)
        groups: dict[tuple, list[int]] = {}
        arrays: list[dict[str, np.ndarray] | None] = [None] * len(requests)
        for r, request in enumerate(requests):
            try:
                item = {}
                for name, dtype in self.inputs:
                    tensor = pb_utils.get_input_tensor_by_name(request, name)
                    if tensor is None:
                        raise ValueError(f"missing input {name}")
                    array = np.ascontiguousarray(tensor.as_numpy(), dtype=dtype)
                    item[name] = array if array.flags.writeable else array.copy()  # torch wants writable memory
                arrays[r] = item
                key = tuple((n, a.shape[1:] if self.batching else a.shape) for n, a in item.items())
                groups.setdefault(key, []).append(r)
            except (ValueError, TypeError) as exc:  # the caller's tensors: missing input, uncastable dtype
                responses[r] = pb_utils.InferenceResponse(
                    error=pb_utils.TritonError(str(exc), pb_utils.TritonError.INVALID_ARG))

        for members in groups.values():
            try:
                if self.batching and len(members) > 1:
                    sizes = [next(iter(arrays[r].values())).shape[0] for r in members]
                    batch = {n: np.concatenate([arrays[r][n] for r in members]) for n, _ in self.inputs}
                    outs = self._forward(batch)
                    offsets = np.cumsum([0] + sizes)
                    for j, r in enumerate(members):
                        lo, hi = offsets[j], offsets[j + 1]
                        responses[r] = pb_utils.InferenceResponse(
                            output_tensors=[pb_utils.Tensor(n, o[lo:hi]) for (n, _, _), o in zip(self.outputs, outs)]
                        )
                else:
                    for r in members:
                        outs = self._forward(arrays[r])
                        responses[r] = pb_utils.InferenceResponse(
                            output_tensors=[pb_utils.Tensor(n, o) for (n, _, _), o in zip(self.outputs, outs)]
                        )
            except Exception as exc:
                self.logger.log_error(f"forward failed: {traceback.format_exc()}")
                for r in members:
                    if responses[r] is None:
                        responses[r] = pb_utils.InferenceResponse(
                            error=pb_utils.TritonError(f"model execution failed: {type(exc).__name__}: {exc}")
                        )
        return responses

    def finalize(self):
        self.model = None

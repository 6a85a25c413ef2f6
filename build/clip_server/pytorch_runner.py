"""Python-based `pytorch` backend: runs a TorchScript model.pt with the libtorch backend's naming rules.

Copied as `<backend-dir>/pytorch/model.py` (clip_server.backend_dir); Triton uses it for every config with
`backend: "pytorch"` when no libtorch backend is present, so one config.pbtxt serves here and on the NGC image's
real libtorch backend.

Rules kept from the libtorch backend:
- inputs are named after forward()'s arguments, or all follow `NAME__<index>` (positional);
- outputs are `NAME__<index>`: the index-th element of forward()'s output (a lone tensor is index 0);
- parameters INFERENCE_MODE, DISABLE_OPTIMIZED_EXECUTION, INTRA_OP_THREAD_COUNT, INTER_OP_THREAD_COUNT.
"""

from __future__ import annotations

import json
import os
import re

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from clip_runtime.batching import execute_batched, execute_each
from clip_runtime.errors import InvalidInputError
from clip_runtime.params import read_parameters

_INDEXED = re.compile(r"^(.*)__(\d+)$")
PARAMS = ("INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION", "INTRA_OP_THREAD_COUNT", "INTER_OP_THREAD_COUNT")


class TritonPythonModel:
    """TorchScript runner: one forward per group of same-shaped requests in an execute."""

    def initialize(self, args):
        self.logger = pb_utils.Logger
        config = json.loads(args["model_config"])
        p = read_parameters(config, PARAMS)
        self.inference_mode = p["INFERENCE_MODE"]
        self.optimized = not p["DISABLE_OPTIMIZED_EXECUTION"]
        if p["INTRA_OP_THREAD_COUNT"] > 0:
            torch.set_num_threads(p["INTRA_OP_THREAD_COUNT"])
        if p["INTER_OP_THREAD_COUNT"] > 0:
            try:
                torch.set_num_interop_threads(p["INTER_OP_THREAD_COUNT"])
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

    # ---- one request's tensors
    def _read(self, request) -> dict[str, np.ndarray]:
        """The request's inputs as writable, contiguous numpy arrays of the config's dtypes."""
        item = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise InvalidInputError(f"missing input {name}")
            try:
                array = np.ascontiguousarray(tensor.as_numpy(), dtype=dtype)
            except (ValueError, TypeError) as exc:  # the caller's tensors: uncastable dtype
                raise InvalidInputError(f"input {name}: {exc}") from None
            item[name] = array if array.flags.writeable else array.copy()  # torch wants writable memory
        return item

    def _forward(self, arrays: dict[str, np.ndarray]) -> list[np.ndarray]:
        """One forward over numpy inputs -> numpy outputs in config order."""
        args = [None] * (max(self.arg_index.values()) + 1)
        for name, array in arrays.items():
            args[self.arg_index[name]] = torch.from_numpy(array).to(self.device)
        with torch.jit.optimized_execution(self.optimized):
            with torch.inference_mode() if self.inference_mode else torch.no_grad():
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

    def _forward_batch(self, items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Items (one per request, each [n_r, ...]) -> outputs [sum n_r, ...] in item order; one forward per group
        of items whose shapes past the batch dim agree."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple((n, a.shape[1:]) for n, a in item.items()), []).append(i)
        names = [n for n, _, _ in self.outputs]
        if len(groups) == 1:
            batch = items[0] if len(items) == 1 else {n: np.concatenate([x[n] for x in items]) for n, _ in self.inputs}
            return dict(zip(names, self._forward(batch)))
        parts: list[list[np.ndarray] | None] = [None] * len(items)
        for members in groups.values():
            sizes = [len(next(iter(items[i].values()))) for i in members]
            batch = {n: np.concatenate([items[i][n] for i in members]) for n, _ in self.inputs}
            outs = self._forward(batch)
            offsets = np.cumsum([0] + sizes)
            for k, i in enumerate(members):
                parts[i] = [o[offsets[k]:offsets[k + 1]] for o in outs]
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}

    def execute(self, requests):
        if not self.batching:  # max_batch_size 0: each request is its own forward, outputs as forward() shapes them
            return execute_each(
                pb_utils, requests,
                lambda r: [pb_utils.Tensor(n, o) for (n, _, _), o in zip(self.outputs, self._forward(self._read(r)))],
                what="model execution", logger=self.logger)
        return execute_batched(
            pb_utils, requests,
            read=lambda request: [self._read(request)],
            rows=lambda item: len(next(iter(item.values()))),
            compute=self._forward_batch,
            label="request", logger=self.logger)

    def finalize(self):
        self.model = None

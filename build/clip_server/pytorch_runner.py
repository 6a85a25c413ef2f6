"""Python-based `pytorch` backend: runs a TorchScript model.pt with the libtorch backend's naming rules.

Copied as `<backend-dir>/pytorch/model.py` (clip_server.backend_dir); Triton uses it for every config with
`backend: "pytorch"` when no libtorch backend is present, so one config.pbtxt serves here and on the NGC image's
real libtorch backend.

Rules kept from the libtorch backend:
- inputs are named after forward()'s arguments, or all follow `NAME__<index>` (positional);
- outputs are `NAME__<index>`: the index-th element of forward()'s output (a lone tensor is index 0);
- parameters INFERENCE_MODE, DISABLE_OPTIMIZED_EXECUTION, INTRA_OP_THREAD_COUNT, INTER_OP_THREAD_COUNT;
- batching (max_batch_size > 0): an input with `allow_ragged_batch` reaches forward() as ONE 1-D tensor, every
  request's buffer flattened and concatenated in request order; any other input as [total batch size, ...]; a
  `batch_input` of kind BATCH_ITEM_SHAPE as [total batch size, ndims - 1], each batch row's shape past the batch dim
  (the only kind this runner makes: another fails the load); each output is split back along dim 0 by the
  requests' batch sizes (libtorch.cc SetInputTensors / ReadOutputTensors, backend_input_collector.cc).

Devices: a KIND_GPU instance runs on `cuda:<model_instance_device_id>` with its own CUDA stream (one instance = one
stub process); each forward gathers the requests' inputs straight into page-locked host memory, copies them to the
device asynchronously on that stream, and copies each output back once for the whole batch. KIND_GPU without a CUDA
device visible to torch fails the model load with a clear message: no silent fallback to CPU.
Inputs that arrive on the GPU (FORCE_CPU_ONLY_INPUT_TENSORS "no", set by `build --image-decode gpu` on image_encoder:
the pixels come from preprocess_image on the GPU) are taken through DLPack as they are, without a host round trip,
as the libtorch backend takes them.
"""

from __future__ import annotations

import contextlib
import json
import os
import re

import numpy as np
import torch
import triton_python_backend_utils as pb_utils

from clip_runtime.batching import execute_batched, execute_each
from clip_runtime.errors import InvalidInputError, internal_error
from clip_runtime.memory import TRIM_ROWS, malloc_trim
from clip_runtime.params import read_parameters

_INDEXED = re.compile(r"^(.*)__(\d+)$")
# In a CPU batch of more rows than TRIM_ROWS, the smallest requests (up to EARLY_ROWS rows together) are computed first
# and answered at once through their response senders; the rest follow in one forward. A one-image request batched
# with 56 rows of bulk (or abandoned) work is answered after ~1/57 of the batch's time instead of all of it: measured
# with 96 abandoned 8-image requests over HTTP, a good request after them went from 6.2 s to ~1 s (docs/deploy.md).
EARLY_ROWS = 8


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

        self.trim = malloc_trim()
        self.device = self._device(args)
        self.stream = torch.cuda.Stream(self.device) if self.device.type == "cuda" else None

        filename = config.get("default_model_filename") or "model.pt"
        path = os.path.join(args["model_repository"], args["model_version"], filename)
        self.model = torch.jit.load(path, map_location=self.device)
        self.model.eval()
        if self.stream is not None:  # the weights' copies (default stream) are done before our stream reads them
            torch.cuda.synchronize(self.device)

        self.batching = int(config.get("max_batch_size", 0)) > 0
        self.inputs = [(i["name"], pb_utils.triton_string_to_numpy(i["data_type"])) for i in config["input"]]
        self.ragged = {i["name"] for i in config["input"] if i.get("allow_ragged_batch")}
        self.batch_inputs = []  # (target name, source input, numpy dtype)
        for b in config.get("batch_input") or []:
            if b.get("kind") != "BATCH_ITEM_SHAPE":
                raise pb_utils.TritonModelException(
                    f"batch_input kind {b.get('kind')} is not supported by this runner (BATCH_ITEM_SHAPE is)"
                )
            dtype = pb_utils.triton_string_to_numpy(b["data_type"])
            self.batch_inputs += [(t, b["source_input"][0], dtype) for t in b["target_name"]]
        # torch dtypes of the inputs (a BYTES input has none): pinned staging buffers, inputs arriving on the GPU
        self.torch_dtypes = {
            n: torch.from_numpy(np.empty(0, d)).dtype
            for n, d in self.inputs + [(t, d) for t, _, d in self.batch_inputs]
            if d != np.object_
        }
        self.outputs = []
        for o in config["output"]:
            m = _INDEXED.match(o["name"])
            if not m:
                raise pb_utils.TritonModelException(
                    f"output {o['name']!r} must be named <name>__<index> (libtorch backend rule)"
                )
            self.outputs.append((o["name"], int(m.group(2)), pb_utils.triton_string_to_numpy(o["data_type"])))
        self.arg_index = self._map_inputs([n for n, _ in self.inputs] + [t for t, _, _ in self.batch_inputs])
        self.logger.log_info(
            f"{args['model_name']}: loaded {filename} on {self.device}, inputs {self.arg_index}, "
            f"outputs {[n for n, _, _ in self.outputs]}, torch {torch.__version__}, "
            f"threads {torch.get_num_threads()}/{torch.get_num_interop_threads()}, "
            f"cpu {torch.backends.cpu.get_cpu_capability()}"
        )

    @staticmethod
    def _device(args: dict) -> torch.device:
        """The instance's device: cuda:<id> for KIND_GPU (TritonModelException without CUDA), else cpu."""
        if args.get("model_instance_kind", "CPU") != "GPU":
            return torch.device("cpu")
        device_id = int(args.get("model_instance_device_id", 0) or 0)
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if device_id >= count:
            raise pb_utils.TritonModelException(
                f"{args['model_name']}: instance_group kind KIND_GPU asks for GPU {device_id}, but torch "
                f"{torch.__version__} sees {count} CUDA device(s) (CUDA build: {torch.version.cuda or 'none'}); "
                "serve this model where torch has CUDA, or build the repository with --instance-kind cpu"
            )
        torch.cuda.set_device(device_id)
        return torch.device("cuda", device_id)

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
    def _read(self, request) -> dict[str, np.ndarray | torch.Tensor]:
        """The request's inputs: contiguous numpy arrays of the config's dtypes (read-only views are fine), or torch
        tensors where an input is on the GPU (taken through DLPack, no copy)."""
        item = {}
        for name, dtype in self.inputs:
            tensor = pb_utils.get_input_tensor_by_name(request, name)
            if tensor is None:
                raise InvalidInputError(f"missing input {name}")
            if not tensor.is_cpu():
                item[name] = torch.from_dlpack(tensor.to_dlpack()).to(self.torch_dtypes[name])
                continue
            try:
                array = np.ascontiguousarray(tensor.as_numpy(), dtype=dtype)
            except (ValueError, TypeError) as exc:  # the caller's tensors: uncastable dtype
                raise InvalidInputError(f"input {name}: {exc}") from None
            item[name] = array
        return item

    def _to_device(self, name: str, parts: list[np.ndarray | torch.Tensor]) -> torch.Tensor:
        """Input `name`'s parts (one per request) as ONE tensor on the device (cuda: via pinned memory, async):
        concatenated along the batch dim, or flattened and concatenated for a ragged input (as libtorch does)."""
        # cpu: the numpy memory itself when there is one writable part, else one concatenation. cuda: one concatenation
        # into page-locked memory, then an asynchronous copy on the instance's stream; torch's pinned-memory cache
        # takes the host buffer back only once that copy is done. Parts already on a GPU: concatenated there.
        if name in self.ragged:
            parts = [p.reshape(-1) for p in parts]
        if any(isinstance(p, torch.Tensor) for p in parts):
            on = [
                p.to(self.device, non_blocking=True)
                if isinstance(p, torch.Tensor)
                else torch.from_numpy(np.array(p)).to(self.device, non_blocking=True)
                for p in parts
            ]
            return on[0] if len(on) == 1 else torch.cat(on)
        if self.stream is None:
            whole = parts[0] if len(parts) == 1 else np.concatenate(parts)
            return torch.from_numpy(whole if whole.flags.writeable else whole.copy())  # torch wants writable memory
        rows = sum(len(p) for p in parts)
        host = torch.empty((rows, *parts[0].shape[1:]), dtype=self.torch_dtypes[name], pin_memory=True)
        np.concatenate(parts, out=host.numpy())
        return host.to(self.device, non_blocking=True)

    def _to_host(self, tensors: list[torch.Tensor]) -> list[torch.Tensor]:
        """Outputs back to the host, one copy each for the whole batch (cuda: into pinned memory, then one sync)."""
        if self.stream is None:
            return [t.detach() for t in tensors]
        out = []
        for t in tensors:
            host = torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
            host.copy_(t.detach(), non_blocking=True)
            out.append(host)
        self.stream.synchronize()
        return out

    def _forward(self, inputs: dict[str, list[np.ndarray]]) -> list[np.ndarray]:
        """One forward over each input's parts (concatenated along the batch dim) -> numpy outputs in config order."""
        for target, source, dtype in self.batch_inputs:  # BATCH_ITEM_SHAPE: each row's shape past the batch dim
            inputs = {**inputs, target: [np.tile(np.array(p.shape[1:], dtype), (len(p), 1)) for p in inputs[source]]}
        args = [None] * (max(self.arg_index.values()) + 1)
        stream = torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()
        with stream:
            for name, parts in inputs.items():
                args[self.arg_index[name]] = self._to_device(name, parts)
            grad_mode = torch.inference_mode() if self.inference_mode else torch.no_grad()
            with torch.jit.optimized_execution(self.optimized), grad_mode:
                result = self.model(*args)
            if isinstance(result, torch.Tensor):
                result = (result,)
            elif isinstance(result, dict):
                result = tuple(result.values())
            for name, index, _ in self.outputs:
                if index >= len(result):
                    raise RuntimeError(f"output {name} asks for element {index} but forward() returned {len(result)}")
            host = self._to_host([result[index] for _, index, _ in self.outputs])
        return [t.numpy().astype(dtype, copy=False) for t, (_, _, dtype) in zip(host, self.outputs)]

    def _rows(self, item: dict[str, np.ndarray]) -> int:
        """A request's batch size: the first dim of its inputs (Triton makes them agree)."""
        return len(next(iter(item.values())))

    def _forward_batch(self, items: list[dict[str, np.ndarray]]) -> dict[str, np.ndarray]:
        """Items (one per request, each [n_r, ...]) -> outputs [sum n_r, ...] in item order; one forward per group
        of items whose non-ragged inputs agree past the batch dim (Triton's batcher only merges such requests)."""
        groups: dict[tuple, list[int]] = {}
        for i, item in enumerate(items):
            groups.setdefault(tuple((n, a.shape[1:]) for n, a in item.items() if n not in self.ragged), []).append(i)
        names = [n for n, _, _ in self.outputs]
        if len(groups) == 1:
            return dict(
                zip(
                    names,
                    self._forward_rows({n: [x[n] for x in items] for n, _ in self.inputs}, sum(map(self._rows, items))),
                )
            )
        parts: list[list[np.ndarray] | None] = [None] * len(items)
        for members in groups.values():
            sizes = [self._rows(items[i]) for i in members]
            outs = self._forward_rows({n: [items[i][n] for i in members] for n, _ in self.inputs}, sum(sizes))
            offsets = np.cumsum([0] + sizes)
            for k, i in enumerate(members):
                parts[i] = [o[offsets[k] : offsets[k + 1]] for o in outs]
        return {n: np.concatenate([p[j] for p in parts]) for j, n in enumerate(names)}

    def _forward_rows(self, inputs: dict[str, list[np.ndarray]], rows: int) -> list[np.ndarray]:
        """_forward, checking that every output has one row per batch row (else the split would misattribute)."""
        outs = self._forward(inputs)
        for (name, _, _), out in zip(self.outputs, outs):
            if out.ndim == 0 or len(out) != rows:
                raise RuntimeError(f"output {name}: forward() returned shape {list(out.shape)} for a batch of {rows}")
        return outs

    def execute(self, requests):
        if not self.batching:  # max_batch_size 0: each request is its own forward, outputs as forward() shapes them
            return execute_each(
                pb_utils,
                requests,
                lambda r: [
                    pb_utils.Tensor(n, o)
                    for (n, _, _), o in zip(self.outputs, self._forward({k: [a] for k, a in self._read(r).items()}))
                ],
                what="model execution",
                logger=self.logger,
            )
        early, total = self._early(requests)
        responses: list = [None] * len(requests)
        for i, response in zip(early, self._execute_batched([requests[i] for i in early])):
            responses[i] = _send_now(requests[i], response, self.logger)
        answered = set(early)
        rest = [i for i in range(len(requests)) if i not in answered]
        try:
            for i, response in zip(rest, self._execute_batched([requests[i] for i in rest])):
                responses[i] = response
        except Exception as exc:  # noqa: BLE001 - once a response was sent, execute must not raise (the backend
            # would then release every request's response factory, the sent ones' a second time)
            for i in rest:
                responses[i] = internal_error(pb_utils, self.logger, "internal error while computing the batch", exc)
        if total > TRIM_ROWS and self.trim is not None and self.device.type == "cpu":  # the batch's rows
            self.trim(0)  # tens of ms; no CPU cost measured on the next batch (ViT-B/32, batch 32: 5.5 s either way)
        return responses

    def _execute_batched(self, requests) -> list:
        if not requests:
            return []
        return execute_batched(
            pb_utils,
            requests,
            read=lambda request: [self._read(request)],
            rows=self._rows,
            compute=self._forward_batch,
            label="request",
            logger=self.logger,
        )

    def _early(self, requests) -> tuple[list[int], int]:
        """(indices of the requests to compute and answer first, the batch's rows): on the CPU, in a batch of more
        than TRIM_ROWS rows, the smallest requests up to EARLY_ROWS rows together (none when that would be all)."""
        rows = [_request_rows(r, self.inputs, self.ragged) for r in requests]
        if self.device.type != "cpu" or len(requests) < 2 or sum(rows) <= TRIM_ROWS:
            return [], sum(rows)
        early, total = [], 0
        for i in sorted(range(len(requests)), key=rows.__getitem__):
            if total + rows[i] > EARLY_ROWS:
                break
            early.append(i)
            total += rows[i]
        return (early if len(early) < len(requests) else []), sum(rows)

    def finalize(self):
        self.model = self.stream = None


def _request_rows(request, inputs: list[tuple[str, object]], ragged: set[str]) -> int:
    """A request's batch size from its first non-ragged input's shape (0 when it is missing: it fails on reading)."""
    for name, _ in inputs:
        if name in ragged:
            continue
        tensor = pb_utils.get_input_tensor_by_name(request, name)
        try:
            shape = tensor.shape() if hasattr(tensor, "shape") else tensor.as_numpy().shape
            return int(shape[0]) if len(shape) else 0
        except Exception:  # noqa: BLE001 - missing, or no host view (a GPU input): reading decides
            return 0
    return 0


def _send_now(request, response, logger=None):
    """Send `response` through the request's response sender now (None goes in execute's list in its place). A stub
    without response senders (an older python backend): the response is returned with the others. Once send() was
    called the sender is closed whatever happens (python backend r24.10), so a failing send is logged, not retried."""
    if not hasattr(request, "get_response_sender"):
        return response
    try:
        request.get_response_sender().send(response, flags=pb_utils.TRITONSERVER_RESPONSE_COMPLETE_FINAL)
    except Exception as exc:  # noqa: BLE001 - the sender is closed: returning the response would fail the batch
        if logger is not None:
            logger.log_error(f"could not send an early response: {type(exc).__name__}: {exc}")
    return None

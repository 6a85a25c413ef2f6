"""The tensor contract of a clip-triton model repository, written once, as data (standard library only).

Every model's inputs and outputs (name, datatype, dims) and each ensemble's steps live here. The config generator
(clip_build.repository) renders config.pbtxt from it; the Python models, the runner, the client, the locustfile,
the perf_analyzer input files and the container health check take their names from it.

Naming, three levels (docs/ARCHITECTURE.md):
- public models (the ensembles and clip_info): lowercase tensors (`text`, `image_embeds`);
- internal Python models: UPPER_SNAKE tensors (`TEXT`, `PIXEL_VALUES`);
- TorchScript encoders: the libtorch backend's rules (inputs named after forward()'s arguments, outputs
  `<name>__<index>`);
- tensors that only flow inside an ensemble start with `_` (`_input_ids`).

Dims may be symbolic: D (the embedding size) and S (the image side) are filled in from the weights' manifest.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

# Triton datatypes used by the contract.
BYTES, FP32, INT32, INT64 = "BYTES", "FP32", "INT32", "INT64"
# Symbolic dims, resolved per repository.
D, S = "D", "S"

_CONFIG_TYPE = {BYTES: "TYPE_STRING", FP32: "TYPE_FP32", INT32: "TYPE_INT32", INT64: "TYPE_INT64"}
_NUMPY_TYPE = {BYTES: "object", FP32: "float32", INT32: "int32", INT64: "int64"}


@dataclass(frozen=True)
class TensorSpec:
    """One input or output of a model: name, Triton datatype, dims (batch dim excluded when the model batches)."""

    name: str
    dtype: str  # BYTES | FP32 | INT32 | INT64
    dims: tuple[int | str, ...]  # -1 = variable; D / S = filled in from the manifest
    optional: bool = False
    # allow_ragged_batch: requests whose shapes differ are batched together; the libtorch backend (and our runner)
    # hand forward() ONE 1-D tensor, every request's buffer flattened, in request order
    ragged: bool = False

    @property
    def config_type(self) -> str:
        """The config.pbtxt data_type (TYPE_STRING for BYTES)."""
        return _CONFIG_TYPE[self.dtype]

    @property
    def numpy_dtype(self) -> str:
        """numpy dtype name of the tensor's values ("object" for BYTES)."""
        return _NUMPY_TYPE[self.dtype]

    def resolve(self, sizes: Mapping[str, int] | None = None) -> tuple[int, ...]:
        """Dims with D / S replaced by `sizes`."""
        sizes = sizes or {}
        try:
            return tuple(d if isinstance(d, int) else int(sizes[d]) for d in self.dims)
        except KeyError as exc:
            raise ValueError(f"{self.name}: no size given for dim {exc.args[0]}") from None


@dataclass(frozen=True)
class BatchInputSpec:
    """A tensor Triton itself makes for each batch (config.pbtxt `batch_input`), passed to the model as an input."""

    kind: str  # BATCH_ITEM_SHAPE: each batch row's shape past the batch dim, [rows, ndims - 1]
    target: str  # the model's input (forward() argument) it becomes
    dtype: str  # INT32 | FP32 (the only types Triton allows)
    source: str  # the input it describes


@dataclass(frozen=True)
class StepSpec:
    """One ensemble step: the composing model and its tensor -> ensemble tensor maps."""

    model: str
    inputs: Mapping[str, str]  # composing model's input -> ensemble tensor
    outputs: Mapping[str, str]  # composing model's output -> ensemble tensor


@dataclass(frozen=True)
class ModelSpec:
    """One model of the repository."""

    name: str
    kind: str  # "python" | "pytorch" | "ensemble"
    public: bool  # reachable by clients; internal models sit behind the ensembles (the gateway refuses them)
    batching: bool  # max_batch_size > 0 (dims then exclude the batch dim)
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    steps: tuple[StepSpec, ...] = field(default=())
    batch_inputs: tuple[BatchInputSpec, ...] = field(default=())

    def input(self, name: str) -> TensorSpec:
        """The input called `name`."""
        return _find(self.inputs, name, self.name, "input")

    def output(self, name: str) -> TensorSpec:
        """The output called `name`."""
        return _find(self.outputs, name, self.name, "output")

    @property
    def input_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.inputs)

    @property
    def output_names(self) -> tuple[str, ...]:
        return tuple(t.name for t in self.outputs)


def _find(tensors: tuple[TensorSpec, ...], name: str, model: str, what: str) -> TensorSpec:
    for t in tensors:
        if t.name == name:
            return t
    raise KeyError(f"{model} has no {what} {name!r}")


def _map(**pairs: str) -> Mapping[str, str]:
    return MappingProxyType(dict(pairs))


# --------------------------------------------------------------------------------------------- names
class EncodeText:
    """Public ensemble: texts -> text embeddings."""

    NAME = "encode_text"
    TEXT = "text"  # BYTES [N, 1], UTF-8
    TEXT_EMBEDS = "text_embeds"  # FP32 [N, D], not normalised
    TOKEN_COUNTS = "token_counts"  # INT32 [N]: tokens fed to the encoder per text (special included, padding not)
    MODEL_ID = "model_id"  # BYTES [1]: the answering model's model_id (clip_info's)


class EncodeImage:
    """Public ensemble: images -> image embeddings."""

    NAME = "encode_image"
    IMAGE = "image"  # BYTES [N, 1], encoded image or .npy uint8 (H, W, 3)
    IMAGE_EMBEDS = "image_embeds"  # FP32 [N, D]
    MODEL_ID = "model_id"  # BYTES [1]


class ZeroShot:
    """Public ensemble: T texts and I images -> embeddings, logits, probabilities, top-k both ways.

    probs: softmax over the texts ("scoring": "softmax"), or each label's own sigmoid ("scoring": "sigmoid", SigLIP).
    """

    NAME = "zero_shot"
    TEXT = "text"
    IMAGE = "image"
    TOP_K = "top_k"  # INT32 [1], optional
    TEXT_EMBEDS = "text_embeds"
    IMAGE_EMBEDS = "image_embeds"
    LOGITS_PER_IMAGE = "logits_per_image"  # [I, T]
    LOGITS_PER_TEXT = "logits_per_text"  # [T, I]
    PROBS = "probs"  # [I, T]
    TOPK_TEXTS = "topk_texts"  # INT64 [I, min(k, T)]
    TOPK_IMAGES = "topk_images"  # INT64 [T, min(k, I)]
    OUTPUTS = (TEXT_EMBEDS, IMAGE_EMBEDS, LOGITS_PER_IMAGE, LOGITS_PER_TEXT, PROBS, TOPK_TEXTS, TOPK_IMAGES)
    MODEL_ID = "model_id"  # BYTES [1]


class ClipInfo:
    """Public Python model: the served model's identity and limits as JSON."""

    NAME = "clip_info"
    REQUEST = "request"  # BYTES [1], optional, ignored
    INFO = "info"  # BYTES [1], JSON


class PreprocessText:
    """Internal Python model: UTF-8 texts -> token ids and each row's token count."""

    NAME = "preprocess_text"
    TEXT = "TEXT"
    INPUT_IDS = "INPUT_IDS"  # INT64 [N, L]: the rows padded to the longest text of the execute
    LENGTHS = "LENGTHS"  # INT64 [N, 1]: tokens in each row (the rest of the row is padding)
    TOKEN_COUNTS = "TOKEN_COUNTS"  # INT32 [N] per request: non-padding tokens of each text (encode_text's token_counts)
    MODEL_ID = "MODEL_ID"  # BYTES [1] per request: the model_id parameter


class PreprocessImage:
    """Internal Python model: image bytes -> normalised pixel values."""

    NAME = "preprocess_image"
    IMAGE = "IMAGE"
    PIXEL_VALUES = "PIXEL_VALUES"
    MODEL_ID = "MODEL_ID"  # BYTES [1] per request


class TextEncoder:
    """Internal TorchScript model (libtorch naming): a ragged batch of token rows -> text embeddings.

    input_ids is ragged (allow_ragged_batch): requests of different lengths share one batch and forward() gets every
    request's [n, L] ids flattened into one 1-D tensor. widths is made by Triton (batch_input BATCH_ITEM_SHAPE of
    input_ids: each row's L, [rows, 1] INT32), so where a row starts never depends on what another request sent;
    lengths ([n, 1] per request) says how many of a row's ids are tokens. forward() pads the batch to its longest row.
    """

    NAME = "text_encoder"
    INPUT_IDS = "input_ids"
    LENGTHS = "lengths"
    WIDTHS = "widths"  # batch input, not sent by callers
    TEXT_EMBEDS = "text_embeds__0"


class ImageEncoder:
    """Internal TorchScript model (libtorch naming)."""

    NAME = "image_encoder"
    PIXEL_VALUES = "pixel_values"
    IMAGE_EMBEDS = "image_embeds__0"


class Postprocess:
    """Internal Python model: embeddings -> logits, probabilities, top-k (echoes the embeddings)."""

    NAME = "postprocess"
    TEXT_EMBEDS = "TEXT_EMBEDS"
    IMAGE_EMBEDS = "IMAGE_EMBEDS"
    TOP_K = "TOP_K"
    TEXT_EMBEDS_OUT = "TEXT_EMBEDS_OUT"
    IMAGE_EMBEDS_OUT = "IMAGE_EMBEDS_OUT"
    LOGITS_PER_IMAGE = "LOGITS_PER_IMAGE"
    LOGITS_PER_TEXT = "LOGITS_PER_TEXT"
    PROBS = "PROBS"
    TOPK_TEXTS = "TOPK_TEXTS"
    TOPK_IMAGES = "TOPK_IMAGES"


# Tensors that flow only inside an ensemble.
_INPUT_IDS, _LENGTHS, _PIXEL_VALUES = "_input_ids", "_lengths", "_pixel_values"
_TEXT_EMBEDS, _IMAGE_EMBEDS = "_text_embeds", "_image_embeds"


# --------------------------------------------------------------------------------------------- models
def _t(name: str, dtype: str, *dims: int | str, optional: bool = False, ragged: bool = False) -> TensorSpec:
    return TensorSpec(name, dtype, tuple(dims), optional, ragged)


_TEXT_IN = _map(**{PreprocessText.TEXT: EncodeText.TEXT})
_PREPROCESS_TEXT_STEP = StepSpec(
    PreprocessText.NAME,
    _TEXT_IN,
    _map(
        **{
            PreprocessText.INPUT_IDS: _INPUT_IDS,
            PreprocessText.LENGTHS: _LENGTHS,
            PreprocessText.MODEL_ID: ZeroShot.MODEL_ID,
        }
    ),
)
_ENCODE_TEXT_STEP = StepSpec(
    PreprocessText.NAME,
    _TEXT_IN,
    _map(
        **{
            PreprocessText.INPUT_IDS: _INPUT_IDS,
            PreprocessText.LENGTHS: _LENGTHS,
            PreprocessText.TOKEN_COUNTS: EncodeText.TOKEN_COUNTS,
            PreprocessText.MODEL_ID: EncodeText.MODEL_ID,
        }
    ),
)
_PREPROCESS_IMAGE_STEP = StepSpec(
    PreprocessImage.NAME,
    _map(**{PreprocessImage.IMAGE: EncodeImage.IMAGE}),
    _map(**{PreprocessImage.PIXEL_VALUES: _PIXEL_VALUES}),
)
_ENCODE_IMAGE_STEP = StepSpec(
    PreprocessImage.NAME,
    _map(**{PreprocessImage.IMAGE: EncodeImage.IMAGE}),
    _map(**{PreprocessImage.PIXEL_VALUES: _PIXEL_VALUES, PreprocessImage.MODEL_ID: EncodeImage.MODEL_ID}),
)
_TEXT_ENCODER_INPUTS = _map(**{TextEncoder.INPUT_IDS: _INPUT_IDS, TextEncoder.LENGTHS: _LENGTHS})
_IMAGE_ENCODER_INPUTS = _map(**{ImageEncoder.PIXEL_VALUES: _PIXEL_VALUES})

_TEXT_EMBEDS_OUT = _t(EncodeText.TEXT_EMBEDS, FP32, -1, D)
_IMAGE_EMBEDS_OUT = _t(EncodeImage.IMAGE_EMBEDS, FP32, -1, D)
_MODEL_ID_OUT = _t(EncodeText.MODEL_ID, BYTES, 1)

MODELS: Mapping[str, ModelSpec] = MappingProxyType(
    {
        m.name: m
        for m in (
            ModelSpec(
                PreprocessText.NAME,
                "python",
                public=False,
                batching=True,
                inputs=(_t(PreprocessText.TEXT, BYTES, 1),),
                # TOKEN_COUNTS and MODEL_ID are answered per request ([n] and [1], not [n, 1]):
                # the ensembles pass them on
                outputs=(
                    _t(PreprocessText.INPUT_IDS, INT64, -1),
                    _t(PreprocessText.LENGTHS, INT64, 1),
                    _t(PreprocessText.TOKEN_COUNTS, INT32, 1),
                    _t(PreprocessText.MODEL_ID, BYTES, 1),
                ),
            ),
            ModelSpec(
                PreprocessImage.NAME,
                "python",
                public=False,
                batching=True,
                inputs=(_t(PreprocessImage.IMAGE, BYTES, 1),),
                outputs=(_t(PreprocessImage.PIXEL_VALUES, FP32, 3, S, S), _t(PreprocessImage.MODEL_ID, BYTES, 1)),
            ),
            ModelSpec(
                TextEncoder.NAME,
                "pytorch",
                public=False,
                batching=True,
                inputs=(_t(TextEncoder.INPUT_IDS, INT64, -1, ragged=True), _t(TextEncoder.LENGTHS, INT64, 1)),
                outputs=(_t(TextEncoder.TEXT_EMBEDS, FP32, D),),
                batch_inputs=(BatchInputSpec("BATCH_ITEM_SHAPE", TextEncoder.WIDTHS, INT32, TextEncoder.INPUT_IDS),),
            ),
            ModelSpec(
                ImageEncoder.NAME,
                "pytorch",
                public=False,
                batching=True,
                inputs=(_t(ImageEncoder.PIXEL_VALUES, FP32, 3, S, S),),
                outputs=(_t(ImageEncoder.IMAGE_EMBEDS, FP32, D),),
            ),
            ModelSpec(
                Postprocess.NAME,
                "python",
                public=False,
                batching=False,
                inputs=(
                    _t(Postprocess.TEXT_EMBEDS, FP32, -1, D),
                    _t(Postprocess.IMAGE_EMBEDS, FP32, -1, D),
                    _t(Postprocess.TOP_K, INT32, 1, optional=True),
                ),
                outputs=(
                    _t(Postprocess.TEXT_EMBEDS_OUT, FP32, -1, D),
                    _t(Postprocess.IMAGE_EMBEDS_OUT, FP32, -1, D),
                    _t(Postprocess.LOGITS_PER_IMAGE, FP32, -1, -1),
                    _t(Postprocess.LOGITS_PER_TEXT, FP32, -1, -1),
                    _t(Postprocess.PROBS, FP32, -1, -1),
                    _t(Postprocess.TOPK_TEXTS, INT64, -1, -1),
                    _t(Postprocess.TOPK_IMAGES, INT64, -1, -1),
                ),
            ),
            ModelSpec(
                ClipInfo.NAME,
                "python",
                public=True,
                batching=False,
                inputs=(_t(ClipInfo.REQUEST, BYTES, 1, optional=True),),
                outputs=(_t(ClipInfo.INFO, BYTES, 1),),
            ),
            ModelSpec(
                EncodeText.NAME,
                "ensemble",
                public=True,
                batching=False,
                inputs=(_t(EncodeText.TEXT, BYTES, -1, 1),),
                outputs=(_TEXT_EMBEDS_OUT, _t(EncodeText.TOKEN_COUNTS, INT32, -1), _MODEL_ID_OUT),
                steps=(
                    _ENCODE_TEXT_STEP,
                    StepSpec(
                        TextEncoder.NAME,
                        _TEXT_ENCODER_INPUTS,
                        _map(**{TextEncoder.TEXT_EMBEDS: EncodeText.TEXT_EMBEDS}),
                    ),
                ),
            ),
            ModelSpec(
                EncodeImage.NAME,
                "ensemble",
                public=True,
                batching=False,
                inputs=(_t(EncodeImage.IMAGE, BYTES, -1, 1),),
                outputs=(_IMAGE_EMBEDS_OUT, _MODEL_ID_OUT),
                steps=(
                    _ENCODE_IMAGE_STEP,
                    StepSpec(
                        ImageEncoder.NAME,
                        _IMAGE_ENCODER_INPUTS,
                        _map(**{ImageEncoder.IMAGE_EMBEDS: EncodeImage.IMAGE_EMBEDS}),
                    ),
                ),
            ),
            # Triton 2.51 fails ("unexpected deadlock") when a client asks for a subset of outputs and an ensemble
            # output is also an intermediate tensor: the encoders feed internal tensors and postprocess echoes the
            # embeddings.
            ModelSpec(
                ZeroShot.NAME,
                "ensemble",
                public=True,
                batching=False,
                inputs=(
                    _t(ZeroShot.TEXT, BYTES, -1, 1),
                    _t(ZeroShot.IMAGE, BYTES, -1, 1),
                    _t(ZeroShot.TOP_K, INT32, 1, optional=True),
                ),  # absent: default_top_k
                outputs=(
                    _TEXT_EMBEDS_OUT,
                    _IMAGE_EMBEDS_OUT,
                    _t(ZeroShot.LOGITS_PER_IMAGE, FP32, -1, -1),
                    _t(ZeroShot.LOGITS_PER_TEXT, FP32, -1, -1),
                    _t(ZeroShot.PROBS, FP32, -1, -1),
                    _t(ZeroShot.TOPK_TEXTS, INT64, -1, -1),
                    _t(ZeroShot.TOPK_IMAGES, INT64, -1, -1),
                    _MODEL_ID_OUT,
                ),
                steps=(
                    _PREPROCESS_TEXT_STEP,
                    StepSpec(TextEncoder.NAME, _TEXT_ENCODER_INPUTS, _map(**{TextEncoder.TEXT_EMBEDS: _TEXT_EMBEDS})),
                    _PREPROCESS_IMAGE_STEP,
                    StepSpec(
                        ImageEncoder.NAME, _IMAGE_ENCODER_INPUTS, _map(**{ImageEncoder.IMAGE_EMBEDS: _IMAGE_EMBEDS})
                    ),
                    StepSpec(
                        Postprocess.NAME,
                        _map(
                            **{
                                Postprocess.TEXT_EMBEDS: _TEXT_EMBEDS,
                                Postprocess.IMAGE_EMBEDS: _IMAGE_EMBEDS,
                                Postprocess.TOP_K: ZeroShot.TOP_K,
                            }
                        ),
                        _map(
                            **{
                                Postprocess.TEXT_EMBEDS_OUT: ZeroShot.TEXT_EMBEDS,
                                Postprocess.IMAGE_EMBEDS_OUT: ZeroShot.IMAGE_EMBEDS,
                                Postprocess.LOGITS_PER_IMAGE: ZeroShot.LOGITS_PER_IMAGE,
                                Postprocess.LOGITS_PER_TEXT: ZeroShot.LOGITS_PER_TEXT,
                                Postprocess.PROBS: ZeroShot.PROBS,
                                Postprocess.TOPK_TEXTS: ZeroShot.TOPK_TEXTS,
                                Postprocess.TOPK_IMAGES: ZeroShot.TOPK_IMAGES,
                            }
                        ),
                    ),
                ),
            ),
        )
    }
)

PYTHON_MODELS = tuple(n for n, m in MODELS.items() if m.kind == "python")
ENCODERS = tuple(n for n, m in MODELS.items() if m.kind == "pytorch")
ENSEMBLES = tuple(n for n, m in MODELS.items() if m.kind == "ensemble")
PUBLIC_MODELS = tuple(n for n, m in MODELS.items() if m.public)
INTERNAL_MODELS = tuple(n for n, m in MODELS.items() if not m.public)

# --------------------------------------------------------------------------------------------- several models
# One repository may serve several models: the first keeps the names above; every further model, named N (the
# pattern below, no underscore), has each of its Triton models prefixed "N__" (`siglip__encode_text`). The unprefixed
# clip_info lists them all ("models": [{"name", "prefix", "model_id", ...}], the first with prefix "").
MODEL_NAME_PATTERN = r"^[a-z0-9][a-z0-9-]{0,39}$"
PREFIX_SEPARATOR = "__"


def model_prefix(name: str) -> str:
    """The prefix of a further model called `name` ("siglip" -> "siglip__"); ValueError for a bad name."""
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    if not (0 < len(name) <= 40 and set(name) <= allowed and name[0] != "-"):  # MODEL_NAME_PATTERN, without re
        raise ValueError(f"model name {name!r} must match {MODEL_NAME_PATTERN} (lowercase letters, digits, '-')")
    return name + PREFIX_SEPARATOR


def prefixed(model: str, prefix: str = "") -> str:
    """A Triton model's name in a repository's model with that prefix (`prefixed("encode_text", "siglip__")`)."""
    return prefix + model

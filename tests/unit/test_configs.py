"""Every generated config.pbtxt, parsed as Triton parses it (its ModelConfig protobuf), against the tensor contract."""

from __future__ import annotations

import pytest

from clip_build.preprocess_plan import plan_preprocessing
from clip_build.repository import (
    PREPROCESS_QUEUE_TIMEOUT_US,
    QUEUE_TIMEOUT_US,
    generate_configs,
    image_parameters,
    info_payload,
)
from clip_build.tuning import encoder_tuning
from clip_common import contract as C
from clip_runtime.params import read_parameters
from tests.configs import parameters, parse_config

TYPE_OF = {C.BYTES: "TYPE_STRING", C.FP32: "TYPE_FP32", C.INT32: "TYPE_INT32", C.INT64: "TYPE_INT64"}


def _tensors(protos) -> list[tuple]:
    return [(t.name, model_config_type(t.data_type), tuple(t.dims), getattr(t, "optional", False)) for t in protos]


def model_config_pb2():
    from tritonclient.grpc import model_config_pb2 as pb2

    return pb2


def model_config_type(code: int) -> str:
    return model_config_pb2().DataType.Name(code)


@pytest.mark.parametrize("kind,count,mbs", [("cpu", 1, 64), ("gpu", 2, 16)])
def test_configs_follow_the_contract(manifest, kind, count, mbs):
    configs = generate_configs(
        manifest, instance_kind=kind, max_batch_size=mbs, tuning=encoder_tuning(kind, 2, mbs, instances=count)
    )
    plan = plan_preprocessing(kind)  # the auto rule: what generate_configs uses when given no plan
    counts = {C.PreprocessImage.NAME: plan.image_instances, C.PreprocessText.NAME: plan.text_instances}
    assert set(configs) == set(C.MODELS)
    sizes = {C.D: manifest["projection_dim"], C.S: manifest["image"]["crop_size"]}
    for name, spec in C.MODELS.items():
        cfg = parse_config(configs[name])
        assert cfg.name == name
        assert cfg.max_batch_size == (mbs if spec.batching else 0), name
        assert _tensors(cfg.input) == [(t.name, TYPE_OF[t.dtype], t.resolve(sizes), t.optional) for t in spec.inputs]
        assert [t.allow_ragged_batch for t in cfg.input] == [t.ragged for t in spec.inputs], name
        assert [
            (
                model_config_pb2().BatchInput.Kind.Name(b.kind),
                tuple(b.target_name),
                model_config_type(b.data_type),
                tuple(b.source_input),
            )
            for b in cfg.batch_input
        ] == [(b.kind, (b.target,), TYPE_OF[b.dtype], (b.source,)) for b in spec.batch_inputs], name
        assert _tensors(cfg.output) == [(t.name, TYPE_OF[t.dtype], t.resolve(sizes), False) for t in spec.outputs]
        if spec.kind == "ensemble":
            assert cfg.platform == "ensemble"
            steps = [(s.model_name, dict(s.input_map), dict(s.output_map)) for s in cfg.ensemble_scheduling.step]
            assert steps == [(s.model, dict(s.inputs), dict(s.outputs)) for s in spec.steps]
            continue
        assert cfg.backend == spec.kind
        assert cfg.HasField("dynamic_batching") == spec.batching, name
        (group,) = cfg.instance_group
        expected_kind = ("KIND_GPU" if kind == "gpu" else "KIND_CPU") if spec.kind == "pytorch" else "KIND_CPU"
        assert group.kind == parse_config(f"instance_group [{{ kind: {expected_kind} }}]").instance_group[0].kind
        assert group.count == (count if spec.kind == "pytorch" else counts.get(name, 1))


def test_every_ensemble_tensor_is_produced_before_it_is_consumed():
    for name in C.ENSEMBLES:
        spec = C.MODELS[name]
        available = set(spec.input_names)
        for step in spec.steps:
            model = C.MODELS[step.model]
            assert set(step.inputs) <= set(model.input_names), (name, step.model)
            assert set(step.outputs) <= set(model.output_names), (name, step.model)
            required = {k for k in step.inputs if not model.input(k).optional}
            assert {step.inputs[k] for k in required} <= available, (name, step.model)
            available |= set(step.outputs.values())
        assert set(spec.output_names) <= available, name


def test_naming_levels():
    """Public tensors lowercase, internal Python models UPPER_SNAKE, encoders libtorch-style, internals start with _."""
    for spec in C.MODELS.values():
        names = spec.input_names + spec.output_names
        if spec.public:
            assert all(n == n.lower() and not n.startswith("_") for n in names), spec.name
        elif spec.kind == "python":
            assert all(n == n.upper() for n in names), spec.name
        elif spec.kind == "pytorch":
            assert all(n.split("__")[-1].isdigit() for n in spec.output_names), spec.name
        for step in spec.steps:
            for value in list(step.inputs.values()) + list(step.outputs.values()):
                assert value in spec.input_names + spec.output_names or value.startswith("_"), (spec.name, value)
    assert set(C.PUBLIC_MODELS) == {"encode_text", "encode_image", "zero_shot", "clip_info"}


def test_parameters_parse_back(manifest):
    configs = generate_configs(manifest, instance_kind="gpu", max_batch_size=16, limits={"max_pixels": 1234})
    image = read_parameters(
        parameters(configs["preprocess_image"]),
        ["max_pixels", "max_items_per_request", "image_size", "crop_size", "image_mean"],
    )
    assert image == {
        "max_pixels": 1234,
        "max_items_per_request": 16,
        "image_size": 32,
        "crop_size": 32,
        "image_mean": manifest["image"]["mean"],
    }
    post = read_parameters(parameters(configs["postprocess"]), ["logit_scale", "model_id", "default_top_k"])
    assert post == {"logit_scale": manifest["logit_scale"], "model_id": manifest["model_id"], "default_top_k": 5}
    text = read_parameters(
        parameters(configs["preprocess_text"]), ["max_length", "pad_token_id", "max_items_per_request"]
    )
    assert text == {"max_length": 77, "pad_token_id": 0, "max_items_per_request": 16}
    torch = read_parameters(parameters(configs["text_encoder"]), ["INFERENCE_MODE", "DISABLE_OPTIMIZED_EXECUTION"])
    assert torch == {"INFERENCE_MODE": True, "DISABLE_OPTIMIZED_EXECUTION": True}


def test_tuning_knobs_reach_the_configs(manifest):
    configs = generate_configs(
        manifest,
        limits={"default_top_k": 3, "decode_threads": 0, "jpeg_draft_gap": 4, "allowed_formats": ["png", "JPG"]},
    )
    image = read_parameters(
        parameters(configs["preprocess_image"]), ["decode_threads", "jpeg_draft_gap", "allowed_formats"]
    )
    assert image == {"decode_threads": 0, "jpeg_draft_gap": 4.0, "allowed_formats": ["png", "JPG"]}
    post = read_parameters(parameters(configs["postprocess"]), ["default_top_k", "logit_scale"])
    assert post == {"default_top_k": 3, "logit_scale": manifest["logit_scale"]}


def test_old_manifest_shortest_edge_without_crop_is_refused(manifest):
    manifest["image"] = {**manifest["image"], "shortest_edge": 32, "do_center_crop": False}
    for key in ("resize_mode", "resize_size"):
        manifest["image"].pop(key)
    with pytest.raises(ValueError, match="without a center crop"):
        generate_configs(manifest)


def test_image_flags_reach_the_preprocessor(manifest):
    manifest["image"] = {**manifest["image"], "do_normalize": False, "do_rescale": False}
    p = read_parameters(
        parameters(generate_configs(manifest)["preprocess_image"]), ["image_mean", "image_std", "rescale_factor"]
    )
    assert p == {"image_mean": [0.0, 0.0, 0.0], "image_std": [1.0, 1.0, 1.0], "rescale_factor": 1.0}
    manifest["image"]["do_resize"] = False
    with pytest.raises(ValueError, match="do_resize=false"):
        generate_configs(manifest)


def test_exact_resize_layout(manifest):
    """Chinese-CLIP's preprocessor (height/width size, no center crop): an exact resize to the encoder's side."""
    manifest["image"] = {
        **manifest["image"],
        "resize_mode": "exact",
        "do_center_crop": False,
        "shortest_edge": None,
        "size": 40,
        "resize_size": 40,
        "crop_size": 40,
    }
    configs = generate_configs(manifest)
    p = read_parameters(parameters(configs["preprocess_image"]), ["resize_mode", "image_size", "do_center_crop"])
    assert p == {"resize_mode": "exact", "image_size": 40, "do_center_crop": False}
    assert tuple(parse_config(configs["image_encoder"]).input[0].dims) == (3, 40, 40)
    assert image_parameters(manifest)["resize_mode"] == "exact"
    assert info_payload(manifest)["image_size"] == 40


def test_read_parameters_defaults_and_errors():
    p = read_parameters({"parameters": {}}, ["max_length", "allowed_formats"])
    assert p == {"max_length": 77, "allowed_formats": ["JPEG", "PNG", "WEBP", "BMP", "GIF", "TIFF"]}
    with pytest.raises(ValueError, match="max_length"):
        read_parameters({"parameters": {"max_length": {"string_value": "many"}}}, ["max_length"])


def test_every_batching_model_has_a_bounded_queue_policy(manifest):
    """Overload is refused (UNAVAILABLE) instead of queued forever; a request's timeout may only shorten the default."""
    configs = generate_configs(manifest, max_queue_size=7, queue_timeout_us=1234)
    batching = [name for name, spec in C.MODELS.items() if spec.batching]
    assert set(batching) == {C.PreprocessText.NAME, C.PreprocessImage.NAME, C.TextEncoder.NAME, C.ImageEncoder.NAME}
    for name in batching:
        policy = parse_config(configs[name]).dynamic_batching.default_queue_policy
        reject = parse_config("dynamic_batching { default_queue_policy { timeout_action: REJECT } }")
        assert policy.timeout_action == reject.dynamic_batching.default_queue_policy.timeout_action, name
        assert (policy.max_queue_size, policy.default_timeout_microseconds) == (7, 1234), name
        assert policy.allow_timeout_override, name
    defaults = parse_config(generate_configs(manifest)[C.ImageEncoder.NAME]).dynamic_batching.default_queue_policy
    assert defaults.max_queue_size > 0 and defaults.default_timeout_microseconds > 0


def test_the_first_ensemble_step_refuses_sooner_than_the_rest(manifest):
    """Triton 2.51 never cancels an ensemble's first step (and its HTTP frontend cancels nothing): the preprocessors'
    own shorter queue timeout is what keeps abandoned requests from being decoded and encoded; capped by the rest's."""

    def timeouts(**options) -> dict[str, int]:
        configs = generate_configs(manifest, **options)
        return {
            name: parse_config(configs[name]).dynamic_batching.default_queue_policy.default_timeout_microseconds
            for name, spec in C.MODELS.items()
            if spec.batching
        }

    pre, enc = (C.PreprocessText.NAME, C.PreprocessImage.NAME), (C.TextEncoder.NAME, C.ImageEncoder.NAME)
    default = timeouts()
    assert {default[n] for n in pre} == {PREPROCESS_QUEUE_TIMEOUT_US} and {default[n] for n in enc} == {
        QUEUE_TIMEOUT_US
    }
    assert PREPROCESS_QUEUE_TIMEOUT_US < QUEUE_TIMEOUT_US
    given = timeouts(preprocess_queue_timeout_us=250_000, queue_timeout_us=3_000_000)
    assert [given[n] for n in pre + enc] == [250_000, 250_000, 3_000_000, 3_000_000]
    capped = timeouts(preprocess_queue_timeout_us=9_000_000, queue_timeout_us=2_000_000)
    assert set(capped.values()) == {2_000_000}


def _batching(config: str) -> tuple:
    cfg = parse_config(config)
    (group,) = cfg.instance_group
    threads = read_parameters(parameters(config), ["INTRA_OP_THREAD_COUNT"])["INTRA_OP_THREAD_COUNT"]
    return (
        group.count,
        threads,
        tuple(cfg.dynamic_batching.preferred_batch_size),
        cfg.dynamic_batching.max_queue_delay_microseconds,
    )


@pytest.mark.parametrize(
    "cores,text,image",
    [
        (2, (1, 2, (8,), 30000), (1, 2, (4,), 30000)),  # measured: docs/benchmarks.md, "Batching defaults"
        (1, (1, 1, (8,), 30000), (1, 1, (4,), 30000)),
        (16, (1, 16, (8,), 30000), (1, 16, (4,), 30000)),
    ],
)
def test_cpu_batching_defaults_follow_the_core_count(manifest, cores, text, image):
    configs = generate_configs(manifest, tuning=encoder_tuning("cpu", cores))
    assert _batching(configs[C.TextEncoder.NAME]) == text
    assert _batching(configs[C.ImageEncoder.NAME]) == image
    assert _batching(configs[C.PreprocessText.NAME])[2:] == ((4, 8, 16, 32, 64), 1000)  # the preprocessors keep theirs


def test_gpu_defaults_and_overrides(manifest):
    gpu = generate_configs(manifest, instance_kind="gpu", tuning=encoder_tuning("gpu", 16))
    for name in C.ENCODERS:
        assert _batching(gpu[name]) == (2, 1, (), 2000)
    tuned = encoder_tuning("cpu", 2, 16, instances=3, threads=0, preferred=[16, 2, 2], queue_delay_us=500)
    configs = generate_configs(manifest, max_batch_size=16, tuning=tuned)
    for name in C.ENCODERS:
        assert _batching(configs[name]) == (3, 0, (2, 16), 500)
    assert (
        _batching(generate_configs(manifest, max_batch_size=4, tuning=encoder_tuning("cpu", 2, 4))[C.TextEncoder.NAME])[
            2
        ]
        == ()
    )  # preferred sizes over max_batch_size are dropped
    every = generate_configs(manifest, max_queue_delay_us=2000)
    assert {_batching(every[n])[3] for n in C.MODELS if C.MODELS[n].batching} == {2000}
    for bad in ({"instances": 0}, {"threads": -1}, {"preferred": [65]}, {"queue_delay_us": -1}):
        with pytest.raises(ValueError):
            encoder_tuning("cpu", 2, 64, **bad)

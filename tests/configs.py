"""Read generated config.pbtxt the way Triton does: protobuf text format into Triton's own ModelConfig message."""

from __future__ import annotations

from google.protobuf import json_format, text_format
from tritonclient.grpc import model_config_pb2


def parse_config(pbtxt: str) -> model_config_pb2.ModelConfig:
    """config.pbtxt text -> ModelConfig; a malformed file or an unknown field raises ParseError."""
    return text_format.Parse(pbtxt, model_config_pb2.ModelConfig())


def config_json(pbtxt: str) -> dict:
    """config.pbtxt text -> the JSON dict a Python model's initialize() receives as args["model_config"]."""
    return json_format.MessageToDict(parse_config(pbtxt), preserving_proto_field_name=True)


def parameters(pbtxt: str) -> dict:
    """The `parameters {}` of a config as {key: {"string_value": value}} (read_parameters' input)."""
    return {"parameters": {k: {"string_value": v.string_value} for k, v in parse_config(pbtxt).parameters.items()}}

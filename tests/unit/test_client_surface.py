"""CLIPClient and AsyncCLIPClient are one implementation with two transports: the same public names, the same
signatures (modulo async), the same docstrings, and return types everywhere."""

from __future__ import annotations

import inspect
import typing

from clip_client import AsyncCLIPClient, CLIPClient
from clip_client._api import DOCS, public_names

ERRORS = ("InvalidInputError", "ServerUnavailableError", "ServerTimeoutError", "InvalidResponseError")


def _member(cls, name):
    return inspect.getattr_static(cls, name)


def test_the_two_clients_have_the_same_public_names():
    assert public_names(CLIPClient) == public_names(AsyncCLIPClient)
    assert "logit_scale" in public_names(AsyncCLIPClient)  # was missing from the async twin


def test_same_signatures_modulo_async_and_same_docstrings():
    for name in public_names(CLIPClient):
        sync, aio = _member(CLIPClient, name), _member(AsyncCLIPClient, name)
        if isinstance(sync, property):
            assert isinstance(aio, property) and sync.__doc__ == aio.__doc__, name
            continue
        assert inspect.signature(sync) == inspect.signature(aio).replace(), name
        assert (inspect.getdoc(sync), inspect.getdoc(aio)) == (inspect.getdoc(aio), inspect.getdoc(sync)), name
        if name != "clear_cache":  # the one method both inherit from the core (no I/O)
            assert inspect.iscoroutinefunction(aio) and not inspect.iscoroutinefunction(sync), name


def test_every_public_method_has_a_return_type_and_documents_its_errors():
    for cls in (CLIPClient, AsyncCLIPClient):
        for name in public_names(cls):
            member = _member(cls, name)
            fn = member.fget if isinstance(member, property) else member
            assert inspect.signature(fn).return_annotation is not inspect.Signature.empty, (cls.__name__, name)
            assert inspect.getdoc(fn) == inspect.cleandoc(DOCS[name]), (cls.__name__, name)
    for name in (
        "encode_text",
        "encode_image",
        "compute_similarity",
        "find_best_matches",
        "classify",
        "zero_shot_classification",
        "zero_shot",
        "class_embeddings",
        "get_model_info",
    ):
        doc = DOCS[name]
        assert "Returns" in doc and "Raises" in doc, name
        assert all(e in doc for e in ERRORS[1:]), name


def test_encode_methods_are_overloaded_one_item_and_many():
    for cls in (CLIPClient, AsyncCLIPClient):
        for name in ("encode_text", "encode_image"):
            overloads = typing.get_overloads(getattr(cls, name))
            assert len(overloads) == 2, (cls.__name__, name)

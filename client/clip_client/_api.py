"""The public methods' docstrings, written once for CLIPClient and AsyncCLIPClient (whose methods are coroutines).

`documented` puts them on both classes; tests/unit/test_client_surface.py checks that the two surfaces match.
"""

from __future__ import annotations

_NET = (
    "ServerUnavailableError: no server answered (after the retries, once one had answered).\n"
    "    ServerTimeoutError: no complete answer within `timeout` (a total deadline per request, retries "
    "included).\n"
    "    RateLimitedError: a gateway refused the request for rate limiting (HTTP 429), still after the retries.\n"
    "    ModelNotFoundError: the server does not serve the model (or `model=` names none of its models).\n"
    "    InvalidResponseError: the answer breaks the contract (missing output, wrong row count or size, "
    "values not finite).\n"
    "    ModelChangedError: the server now serves another model than the one read before (caches dropped).\n"
    "    ServerError: the server failed the request for another reason."
)
_INPUT = "InvalidInputError: the input was refused (by the client's checks or by the server, message verbatim).\n    "

_ENCODE_TEXT = f"""Text embeddings, float32, L2-normalised unless normalize=False.

Parameters
    texts: one str, or any iterable of str (a generator is consumed batch by batch).
    normalize: L2-normalise each row.
    batch_size: at most this many texts per request (default: the server's limit).
    show_progress: a tqdm progress bar over the texts.
Returns
    (D,) for one str, (N, D) for an iterable.
Raises
    {_INPUT}{_NET}
"""

_ENCODE_IMAGE = f"""Image embeddings, float32, L2-normalised unless normalize=False.

Parameters
    images: one image or an iterable of them (read lazily, batch by batch). An image is a file path, an http(s) URL
        (fetched here, at most max_download_bytes), encoded bytes, a PIL image or a uint8 (H, W, 3) array; a uint8
        (N, H, W, 3) array is N images.
    normalize: L2-normalise each row.
    batch_size: at most this many images per request (default: the server's limit, and for a sized collection
        at most half of it, 8 at the fewest, so that decoding and encoding overlap).
    show_progress: a tqdm progress bar over the images.
Returns
    (D,) for one image, (N, D) for an iterable.
Raises
    {_INPUT}{_NET}
"""

DOCS: dict[str, str] = {
    "close": "Close the connections (and the worker pool). Returns None. Raises nothing.",
    "get_model_info": f"""The served model's identity, embedding size, logit_scale, scoring and per-request limits.

Read from the clip_info model once (only the inference API is needed), or from the model configs of repositories
built without it; cached until clear_cache() or a ModelChangedError.
Returns
    ModelInfo.
Raises
    {_NET}
""",
    "logit_scale": "The model's raw logit_scale (similarities are multiplied by exp of it); a float (AsyncCLIPClient: "
    "an awaitable of it). Raises what get_model_info raises.",
    "dimension": "Embedding size D (providers.EmbeddingProvider). Returns int. Raises what get_model_info raises.",
    "model_id": "The served weights' identity (providers.EmbeddingProvider). Returns str. Raises what get_model_info "
    "raises.",
    "embed_texts": "Normalised text embeddings (n, D); one str is one text (providers.EmbeddingProvider). Raises what "
    "encode_text raises.",
    "embed_images": "Normalised image embeddings (n, D); one image is one item "
    "(providers.MultimodalEmbeddingProvider). Raises what encode_image raises.",
    "encode_text": _ENCODE_TEXT,
    "encode_image": _ENCODE_IMAGE,
    "compute_similarity": f"""Similarities of every text with every image.

Parameters
    texts, images: precomputed embeddings (float arrays (D,) or (N, D)), or texts / images to encode.
    apply_temperature: multiply the cosines by exp(logit_scale) (and add logit_bias for a sigmoid model): the
        model's logits.
Returns
    (n_texts, n_images) float32.
Raises
    {_INPUT}(embeddings of different sizes, not finite, or of zero norm)
    {_NET}
""",
    "find_best_matches": f"""The best images for each text.

Parameters
    texts, images: embeddings or inputs, as for compute_similarity.
    top_k: how many, an int >= 1 (a float or bool is refused).
    return_scores: also return the logits the indices point at.
Returns
    indices (n_texts, min(top_k, n_images)) int64, best first; with return_scores, (indices, logits).
Raises
    {_INPUT}{_NET}
""",
    "find_best_text_matches": f"""The best texts for each image.

Parameters
    images, texts: embeddings or inputs, as for compute_similarity.
    top_k: how many, an int >= 1.
    return_scores: also return the logits the indices point at.
Returns
    indices (n_images, min(top_k, n_texts)) int64, best first; with return_scores, (indices, logits).
Raises
    {_INPUT}{_NET}
""",
    "class_embeddings": f"""Normalised class embeddings: per class, its prompts' embeddings normalised, averaged,
re-normalised. Prompt embeddings are cached: a prompt already seen is not sent again.

Parameters
    class_texts: the class names (a str or an iterable of str).
    templates: a str or a list of str with "{{}}" for the class name (several are averaged); None: the bare names.
Returns
    (C, D) float32.
Raises
    {_INPUT}{_NET}
""",
    "classify": f"""Zero-shot classification, the transformers pipeline's shape.

Parameters
    images: anything encode_image takes, or precomputed image embeddings.
    labels: the class names.
    templates: prompts with "{{}}" for the label (default DEFAULT_TEMPLATE, "This is a photo of {{}}."; several are
        averaged; ["{{}}"] uses the bare labels).
    top_k: only the best top_k labels (an int >= 1); None: all.
Returns
    Per image, [{{"label": ..., "score": ...}}] sorted by score, best first: one list for one image, a list of lists
    for several. Scores are the softmax over the labels (they sum to 1), or for a sigmoid model (SigLIP) each
    label's own sigmoid probability.
Raises
    {_INPUT}{_NET}
""",
    "zero_shot_classification": f"""Zero-shot classification as class indices and probabilities.

Parameters
    images: anything encode_image takes.
    class_texts: the class names (bare, unless templates are given).
    return_probabilities: also return the probabilities.
    templates: prompts with "{{}}" (averaged), or None for the bare class texts.
Returns
    (predictions (n_images,) int64 indices into class_texts, probabilities (n_images, n_classes) float32 or None):
    the softmax over classes of exp(logit_scale) * cosine as the zero_shot ensemble's `probs`, or per class
    sigmoid(exp(logit_scale) * cosine + logit_bias) for a sigmoid model.
Raises
    {_INPUT}{_NET}
""",
    "zero_shot": f"""One raw call of the zero_shot ensemble; texts and images must fit in one request.

Parameters
    images: anything encode_image takes.
    texts: one str or an iterable of str.
    top_k: the ensemble's top-k, an int >= 1.
Returns
    dict of its outputs (text_embeds, image_embeds, logits_per_image, logits_per_text, probs, topk_texts,
    topk_images), each checked for shape.
Raises
    {_INPUT}{_NET}
""",
    "clear_cache": "Forget cached prompt embeddings and the model info (e.g. after the server's model changed). "
    "Returns None. Raises nothing.",
}


def documented(cls: type) -> type:
    """Class decorator: the DOCS docstring on each of cls's public methods and properties."""
    for name, doc in DOCS.items():
        attr = cls.__dict__.get(name)
        if attr is None:
            continue
        if isinstance(attr, property):
            attr.fget.__doc__ = doc
            setattr(cls, name, property(attr.fget, attr.fset, attr.fdel, doc))
        else:
            attr.__doc__ = doc
    return cls


def public_names(cls: type) -> list[str]:
    """The public methods and properties of a client class (its own and inherited, no dunders)."""
    return sorted(n for n in dir(cls) if not n.startswith("_"))

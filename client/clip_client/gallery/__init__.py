"""Image galleries: index a collection of images once, search it by text, image or stored embedding.

    from clip_client.gallery import Gallery
    g = Gallery.create("photos.gallery", dim=512, model_id="...")   # Gallery.open(uri) for an existing one
    g.add(paths, embeddings, metadata)                             # metadata: one dict per row (tags, ...)
    hits = g.search(queries, k=10, filter='array_contains(tags, "cat")')

Backends (chosen by the URI): a local folder (embedded FAISS index + Parquet, extra `gallery`) or Milvus
(`http://host:19530`, or a milvus-lite `*.db` file; extra `milvus`). Heavy imports happen inside the backends.
"""

from .base import FIELDS, Gallery, GalleryError, Hit, MissingExtraError
from .filters import FilterError
from .indexing import IndexReport, encode_tolerant, index_folder, iter_image_files

__all__ = [
    "FIELDS",
    "FilterError",
    "Gallery",
    "GalleryError",
    "Hit",
    "IndexReport",
    "MissingExtraError",
    "encode_tolerant",
    "index_folder",
    "iter_image_files",
]

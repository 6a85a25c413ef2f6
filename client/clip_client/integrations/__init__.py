"""Adapters to the embedding interfaces of other libraries (each an optional extra of the client):

- clip_client.integrations.langchain: CLIPEmbeddings, a langchain_core Embeddings (extra `langchain`);
- clip_client.integrations.llamaindex: CLIPMultiModalEmbedding, a llama_index MultiModalEmbedding (extra `llamaindex`).
"""

"""What the client and the server share: the tensor contract (`contract`), the embedding math (`ops`) and the
server URL rules (`endpoint`).

Standard library and numpy only, so both a client-only install and the Triton Python models can import it.
"""

"""What the client and the server share: the tensor contract (`contract`) and the embedding math (`ops`).

Standard library and numpy only, so both a client-only install and the Triton Python models can import it.
"""

"""Typed errors for user input in the Triton Python models (no torch)."""


class InvalidInputError(ValueError):
    """A request item is invalid (bad UTF-8, undecodable image, wrong shape...); fails only its own request."""

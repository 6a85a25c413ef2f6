"""A fake triton_python_backend_utils for unit tests of the Python models (a request is {input name: FakeTensor})."""

from __future__ import annotations

import numpy as np


class FakeTensor:
    """pb_utils.Tensor: a name and a numpy array."""

    def __init__(self, name, array):
        self._name, self._array = name, np.asarray(array)

    def name(self):
        return self._name

    def as_numpy(self):
        return self._array

    def is_cpu(self):
        return True


class FakeResponse:
    """pb_utils.InferenceResponse: outputs by name, or an error."""

    def __init__(self, output_tensors=None, error=None):
        self.outputs = {t.name(): t.as_numpy() for t in output_tensors or []}
        self.error = error


class FakeError:
    """pb_utils.TritonError with its codes."""

    INVALID_ARG, INTERNAL = "INVALID_ARG", "INTERNAL"

    def __init__(self, message, code=None):
        self.message, self.code = message, code


class FakeLogger:
    """pb_utils.Logger: errors are kept for the test to read."""

    errors: list[str] = []

    @classmethod
    def log_error(cls, msg):
        cls.errors.append(msg)

    log_info = log_warn = log_verbose = classmethod(lambda cls, msg: None)

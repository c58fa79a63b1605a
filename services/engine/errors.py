"""Errors the engine raises for bad input; each carries a message meant for the user."""


class EngineError(Exception):
    """Base class of every error the engine reports to its caller."""


class ModelLoadError(EngineError):
    """A model directory is missing files or holds malformed ones."""


class UnsupportedModelError(ModelLoadError):
    """The checkpoint uses an architecture or feature the engine does not implement."""


class InvalidRequestError(EngineError):
    """A request's prompt or sampling parameters are invalid; the engine is unchanged."""


class CapacityError(EngineError):
    """The KV cache cannot hold what was asked (e.g. importing KV with no free blocks)."""


class DeviceMemoryError(CapacityError):
    """A step ran out of device memory: its requests were stopped (blocks freed), the engine goes on."""

    def __init__(self, request_ids: list[str], message: str):
        super().__init__(message)
        self.request_ids = request_ids
        """The requests of the step, each stopped (some may have produced their last output in it)."""


class KVFenceError(EngineError):
    """A KV write or commit for a reservation that expired, was released, or carries a stale lease."""

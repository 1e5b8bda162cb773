"""Typed errors: each names its cause so the CLI and the API can print one clear line."""


class DllmError(Exception):
    """Base class: the CLI prints str(e) without a traceback."""


class ConfigError(DllmError):
    """A checkpoint's config is missing, malformed or of an unsupported architecture."""


class WeightsError(DllmError):
    """A shard or tensor is missing, corrupt (sha256 mismatch) or of an unsupported type."""


class UnsupportedQuantError(WeightsError):
    """A GGUF tensor uses a quantization type we cannot dequantize."""


class KVBudgetExceeded(DllmError):
    """The KV cache has no free blocks for a sequence: the stage is busy."""


class RequestError(DllmError):
    """A user request is invalid (empty prompt, bad parameters)."""


class FetchError(DllmError):
    """A default model could not be downloaded, assembled or verified."""


class StageFailure(DllmError):
    """A pass through the stage chain failed or stalled; the pipeline may recover by failover."""


class StageBusy(KVBudgetExceeded):
    """A remote stage has no KV room for the request right now."""


class ChainError(DllmError):
    """The stage chain cannot be built: no live peer serves some layer range."""

"""One small exception hierarchy; the CLI and the server map it to exit codes and HTTP errors."""


class SlimserveError(Exception):
    """Base of every error slimserve raises on purpose."""

    http_status = 500
    error_type = "internal_error"


class InvalidRequest(SlimserveError, ValueError):
    """The caller asked for something malformed or out of range (bad sampling params, ...)."""

    http_status = 400
    error_type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class ContextLengthExceeded(InvalidRequest):
    """Prompt plus requested tokens do not fit the model's context."""


class ModelLoadError(SlimserveError):
    """A model file or directory is missing, truncated, corrupt or of an unsupported kind."""

    error_type = "model_load_error"


class UnsupportedModel(ModelLoadError):
    """The file is readable but its architecture or format is not one we run."""


class CapacityError(SlimserveError):
    """The engine cannot hold the request (KV cache or queue full)."""

    http_status = 503
    error_type = "capacity_error"


class RequestFailed(SlimserveError):
    """The engine could not serve one request (an internal error attributed to it); the engine
    goes on serving the others."""

    error_type = "internal_error"


class EngineDead(SlimserveError):
    """The engine cannot go on (a step fails even for a trivial request): the process should exit
    so that a supervisor restarts it."""

    error_type = "internal_error"

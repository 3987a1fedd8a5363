"""The one exception type a failed start raises, wherever in the layer tree it happens."""

EXIT_RUNTIME = 1  # the kernel refused something, a process died during start
EXIT_USAGE = 2  # the spec does not fit this machine: a missing source, an unknown program


class StartError(Exception):
    """A layer could not be built; the message names the operation and what went wrong."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME, layer: str | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.layer = layer

    def __str__(self) -> str:
        return f"layer '{self.layer}': {self.message}" if self.layer else self.message


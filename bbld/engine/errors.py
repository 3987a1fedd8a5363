"""The one exception type a failed start raises, wherever in the layer tree it happens."""

EXIT_RUNTIME = 1  # the kernel refused something, a process died during start
EXIT_USAGE = 2  # the spec does not fit this machine: a missing source, an unknown program


class StartError(Exception):
    """A layer could not be built; the message names the operation and what went wrong."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME):
        super().__init__(message)
        self.exit_code = exit_code


def describe_os_error(exc: OSError) -> str:
    return exc.strerror or str(exc)

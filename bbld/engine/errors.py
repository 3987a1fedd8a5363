"""The one exception type a failed start raises, wherever in the layer tree it happens."""

EXIT_RUNTIME = 1  # the kernel refused something, a process died during start
EXIT_USAGE = 2  # the spec does not fit this machine: a missing source, an unknown program

# What went wrong, for front ends that word it their own way (bbld.bwrap.bwrap_message):
WHATS = ("source-missing", "mkdir", "symlink", "chdir", "exec", "namespaces", "join-user",
         "join-pid")
FIELDS = ("what", "where", "path", "strerror", "command")


class StartError(Exception):
    """A layer could not be built. Besides its words (`message`, shown after the layer and
    `where`), it carries what a front end needs to say it in its own terms, as fields that
    travel with it from the process that failed to the engine's caller (bbld.engine.reports):
    `what` happened (one of WHATS, or None), `where` (the operation: `fs[3] (ro-bind) /usr`,
    a profile's `mounts[0] (ro-bind) /x`, or `command 'sh'`), the `path` concerned, the
    kernel's `strerror`, the `command` (argv[0]) concerned."""

    def __init__(self, message: str, exit_code: int = EXIT_RUNTIME, layer: str | None = None,
                 *, what: str | None = None, where: str | None = None, path: str | None = None,
                 strerror: str | None = None, command: str | None = None):
        super().__init__(message)
        self.message = message
        self.exit_code = exit_code
        self.layer = layer
        self.what, self.where, self.path = what, where, path
        self.strerror, self.command = strerror, command

    def __str__(self) -> str:
        if self.where and self.where.startswith("/"):  # a file's line (a profile's key)
            return f"{self.where}: {self.message}" + (f" (layer '{self.layer}')"
                                                      if self.layer else "")
        return ": ".join(part for part in (f"layer '{self.layer}'" if self.layer else None,
                                           self.where, self.message) if part)

    def fields(self) -> dict[str, str]:
        """The fields that are set (to send along with the message)."""
        return {name: getattr(self, name) for name in FIELDS if getattr(self, name)}

    def located(self, where: str | None = None, layer: str | None = None,
                **fields) -> "StartError":
        """This error, said of `where` and `layer` where it says nothing of them yet (the
        innermost context knows best); other fields likewise."""
        self.where = self.where or where
        self.layer = self.layer or layer
        for name, value in fields.items():
            if not getattr(self, name):
                setattr(self, name, value)
        return self

"""A bubblewrap command line run by the engine in this very process, without bbld: what
`bbl-bwrap` and `bblctl run` do inside a sandbox, where bbld does not serve (bbld.peer).

The new sandbox is made from the caller's own namespaces, view, ids and privileges, so it can
only narrow what the caller has: bubblewrap inside bubblewrap. It behaves as the daemon's
monitor would with the same command line (messages, exit codes, fds, signals), in the
caller's process: the caller is the one that bwrap's --die-with-parent, --info-fd and the
rest refer to.
"""

import os

from bbld import bwrap, spec
from bbld.engine.errors import StartError
from bbld.engine.instance import Instance
from bbld.engine.plan import prepare


def run_bwrap(argv: list[str], prog: str, sandbox: spec.Sandbox | None = None,
              front: bwrap.FrontEnd | None = None) -> int:
    """Run the command line (or the sandbox it was already made into by `front`); returns
    the command's exit status, or bubblewrap's 1 after saying why nothing ran."""
    front = front or bwrap.FrontEnd(prog)
    try:
        if sandbox is None:
            sandbox = front.sandbox(argv, dict(os.environ), os.getuid(), os.getgid())
        instance = Instance(prepare(sandbox))
        instance.start()
        try:
            return instance.wait()
        finally:
            instance.finish()
    except bwrap.Done as done:
        return done.status
    except spec.SpecError as exc:
        front.start_failed("\n".join(exc.problems))
    except StartError as exc:
        front.start_failed(str(exc), {**exc.fields(), "message": exc.message})
    return 1

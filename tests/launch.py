"""A test helper: run a spec through bbld and stay its client until it ends.

    python -m tests.launch SPEC.json ID_FILE

writes the instance id to ID_FILE once it runs, passes its own stdio to the sandbox and exits
with the main command's status (a failed start's exit code, or 1 if the daemon goes away
first).
"""

import os
import sys

from bblctl.client import ClientError, RemoteError, connect


def main(spec_path: str, id_path: str) -> int:
    with open(spec_path) as f:
        spec = f.read()
    cwd = os.open(".", os.O_PATH | os.O_DIRECTORY)
    try:
        with connect() as conn:
            for reply in conn.stream("io.bbl.Manager.Run", fds=(0, 1, 2, cwd), spec=spec,
                                     args=[], env=dict(os.environ)):
                if reply["event"] == "started":
                    with open(id_path + ".tmp", "w") as f:
                        f.write(reply["id"])
                    os.rename(id_path + ".tmp", id_path)
                elif reply["event"] == "exited":
                    return reply["status"]
    except RemoteError as exc:  # (StartFailed: its message and code, as bblctl says them)
        print(f"launch: {exc.parameters.get('message', exc)}", file=sys.stderr)
        return exc.parameters.get("exit_code", 1)
    except ClientError as exc:
        print(f"launch: {exc}", file=sys.stderr)
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], sys.argv[2]))

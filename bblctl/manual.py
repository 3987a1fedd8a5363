"""Man pages and shell completion, made from the texts `--help` prints, so that they cannot
drift apart: bblctl(1) from bblctl's HELP, bbld(1) from bbld's usage, bbl-bwrap(1) from the
bubblewrap front-end's option table, bbl-profile(5) from docs/profiles.md's tables of keys.

    python -m bblctl.manual DIRECTORY

writes man/*.1, man/bbl-profile.5 and completions/ (bash, zsh, fish) into DIRECTORY (the tree keeps
them in docs/; a test regenerates them and compares). Not on any command's start-up path.
"""

from __future__ import annotations

import os
import re
import sys

from bbld import __version__

DATE = "2026"


def _roff(text: str) -> str:
    """Text safe in a roff paragraph: backslashes and leading dots or quotes escaped."""
    text = text.replace("\\", "\\e").replace("-", "\\-")
    return re.sub(r"^([.'])", r"\\&\1", text, flags=re.MULTILINE)


def _page(name: str, section: int, summary: str, synopsis: list[str],
          sections: list[tuple[str, list[tuple[str, str]] | str]]) -> str:
    lines = [f'.TH {name.upper()} {section} "{DATE}" "BBL {__version__}" "BBL"', ".SH NAME",
             f"{name} \\- {_roff(summary)}", ".SH SYNOPSIS"]
    for line in synopsis:
        lines += [".nf", _roff(line), ".fi"]
    for title, body in sections:
        lines.append(f".SH {title}")
        if isinstance(body, str):
            lines += [_roff(paragraph) if paragraph else ".PP" for paragraph in
                      body.split("\n")]
            continue
        for term, text in body:
            lines += [".TP", f"\\fB{_roff(term)}\\fR", _roff(text)]
    return "\n".join(lines) + "\n"


def bblctl_page() -> str:
    from bblctl.__main__ import HELP, IDS

    return _page("bblctl", 1, "start, list, enter and end BBL sandboxes", [
        "bblctl COMMAND [ARGS...]", "bblctl COMMAND --help", "bblctl --version"], [
        ("DESCRIPTION", "bblctl is the client of bbld, the per-user BBL daemon, which it "
                        "starts when none runs. " + IDS),
        ("COMMANDS", [(synopsis, text) for _, synopsis, text in HELP]),
        ("EXIT STATUS", "The sandbox's main command's status (128+N for signal N) for run, "
                        "start and attach (0 when they detach); 2 for a bad command line "
                        "or profile, with one line saying what and how to fix it; 1 for a "
                        "failure at run time."),
        ("ENVIRONMENT", [("BBL_DETACH_KEY", "the detach key of start and attach when "
                                            "--detach-key is not given (default ctrl-])"),
                         ("XDG_RUNTIME_DIR", "where bbld's socket is: "
                                             "$XDG_RUNTIME_DIR/bbl/bbld.sock (without it, "
                                             "/run/user/UID/bbl/bbld.sock)")]),
        ("SEE ALSO", "bbld(1), bbl-bwrap(1), bbl-profile(5)")])


def bbld_page() -> str:
    from bbld.daemon.main import USAGE

    synopsis, _, text = USAGE.partition("\n\n")
    return _page("bbld", 1, "the BBL daemon: owns every sandbox instance of one user",
                 [synopsis.removeprefix("usage: ")], [
                     ("DESCRIPTION", text + "\nbblctl starts it when needed; under systemd "
                      "the user units bbld.socket and bbld.service do (bblctl setup)."),
                     ("OPTIONS", [("--socket PATH", "listen there"),
                                  ("--help", "print the usage"),
                                  ("--version", "print the version")]),
                     ("SEE ALSO", "bblctl(1), bbl-bwrap(1), bbl-profile(5)")])


def bwrap_page() -> str:
    from bbld.bwrap import HELP

    return _page("bbl-bwrap", 1, "bubblewrap's command line, run by BBL",
                 ["bbl-bwrap [OPTIONS...] [--] COMMAND [ARGS...]"], [
                     ("DESCRIPTION", "Takes bubblewrap's options with their meaning, "
                      "messages and exit codes, and runs the sandbox as an instance of bbld."),
                     ("OPTIONS", list(HELP)),
                     ("SEE ALSO", "bblctl(1), bwrap(1)")])


def profile_page(docs: str) -> str:
    """The keys of docs/profiles.md's tables (`| key | ... | meaning |`), section by
    section."""
    with open(docs) as f:
        text = f.read()
    sections = []
    for title, body in re.findall(r"^## (.+?)\n(.*?)(?=^## |\Z)", text, re.M | re.S):
        rows = re.findall(r"^\| `([^`]+)` \|(.*)\|\s*$", body, re.M)
        if rows:
            sections.append((title.upper(), [
                (key, re.sub(r"`", "", cells.split(" | ")[-1].strip())) for key, cells in rows]))
    return _page("bbl-profile", 5, "BBL's profile files: TOML that says what to sandbox",
                 ["~/.config/bbl/profiles/NAME.toml"], [
                     ("DESCRIPTION", "A profile holds a few options that expand into BBL's "
                      "nested template, or a [layer] table of its own (a spec). bblctl "
                      "profile validate reports every problem as FILE:LINE: key: message."),
                     *sections, ("SEE ALSO", "bblctl(1)")])


def bash_completion() -> str:
    """Commands, each one's options, profile names after start/desktop/show/validate, and
    running instances' ids and names where an ID goes."""
    from bblctl.__main__ import HELP

    options = {name: sorted(set(re.findall(r"--[a-z-]+", synopsis)) | {"--help"})
               for name, synopsis, _ in HELP}
    cases = "\n".join(f'        {name}) opts="{" ".join(opts)}" ;;'
                      for name, opts in options.items())
    takes_id = " ".join(name for name, synopsis, _ in HELP if " ID" in f" {synopsis}")
    takes_profile = "start desktop profile"
    return f"""# bash completion for bblctl (made by bblctl.manual from bblctl --help)
_bblctl() {{
    local cur=${{COMP_WORDS[COMP_CWORD]}} command=${{COMP_WORDS[1]}} opts words
    if [ "$COMP_CWORD" -eq 1 ]; then
        COMPREPLY=($(compgen -W "{' '.join(options)} --help --version" -- "$cur"))
        return
    fi
    case $command in
{cases}
    esac
    if [[ $cur == -* ]]; then
        COMPREPLY=($(compgen -W "$opts" -- "$cur"))
        return
    fi
    case " {takes_id} " in *" $command "*)
        words=$(bblctl ps --json 2>/dev/null |
            sed -n 's/.*"\\(id\\|name\\)": "\\([^"]*\\)".*/\\2/p')
        COMPREPLY=($(compgen -W "$words" -- "$cur"))
        return ;;
    esac
    case " {takes_profile} " in *" $command "*)
        words="$(bblctl profile list 2>/dev/null | awk 'NR > 1 {{print $1}}')"
        words="$words list show validate install"
        COMPREPLY=($(compgen -W "$words" -- "$cur") $(compgen -f -- "$cur"))
        return ;;
    esac
    COMPREPLY=($(compgen -f -- "$cur"))
}}
complete -F _bblctl bblctl
"""


def _commands() -> list[tuple[str, str, list[str]]]:
    """(command, what it does in a line, its options) from bblctl's HELP."""
    from bblctl.__main__ import HELP

    found = []
    for name, synopsis, text in HELP:
        summary = re.sub(r" \([^)]*\)?", "", text.split(";")[0].split(":")[0])
        found.append((name, summary[:70],
                      sorted(set(re.findall(r"--[a-z-]+", synopsis)) | {"--help"})))
    return found


def zsh_completion() -> str:
    """Commands with their descriptions, each one's options, instances and profiles."""
    commands = "\n".join(f"        '{name}:{summary.replace(chr(39), '')}'"
                          for name, summary, _ in _commands())
    cases = "\n".join(f"        {name}) opts=({' '.join(opts)}) ;;"
                      for name, _, opts in _commands())
    return f"""#compdef bblctl
# zsh completion for bblctl (made by bblctl.manual from bblctl --help)
_bblctl() {{
    local -a commands opts words
    commands=(
{commands}
    )
    if (( CURRENT == 2 )); then
        _describe 'command' commands
        return
    fi
    case $words[2] in
{cases}
    esac
    if [[ $PREFIX == -* ]]; then
        compadd -- $opts
        return
    fi
    case $words[2] in
        start|desktop|profile)
            compadd -- ${{(f)"$(bblctl profile list 2>/dev/null | awk 'NR > 1 {{print $1}}')"}}
            _files ;;
        ps|setup|doctor|daemon|run) _files ;;
        *)
            compadd -- ${{(f)"$(bblctl ps --json 2>/dev/null |
                sed -n 's/.*"\\(id\\|name\\)": "\\([^"]*\\)".*/\\2/p')"}} ;;
    esac
}}
_bblctl "$@"
"""


def fish_completion() -> str:
    lines = ["# fish completion for bblctl (made by bblctl.manual from bblctl --help)",
             "complete -c bblctl -f",
             "complete -c bblctl -n __fish_use_subcommand -l version -d \"print BBL's version\""]
    for name, summary, opts in _commands():
        lines.append(f"complete -c bblctl -n __fish_use_subcommand -a {name} "
                     f"-d {_fish_quote(summary)}")
        for option in opts:
            lines.append(f"complete -c bblctl -n '__fish_seen_subcommand_from {name}' "
                         f"-l {option[2:]}")
    lines += FISH_LOOKUPS.strip().splitlines()
    return "\n".join(lines) + "\n"


FISH_LOOKUPS = r"""
function __bblctl_profiles
    bblctl profile list 2>/dev/null | tail -n +2 | string split -f1 ' '
end
function __bblctl_instances
    bblctl ps --json 2>/dev/null | string match -rg '"(?:id|name)": "([^"]*)"'
end
complete -c bblctl -n '__fish_seen_subcommand_from start desktop profile' \
    -a '(__bblctl_profiles)' -F
complete -c bblctl -n '__fish_seen_subcommand_from tree exec attach send-args stop kill' \
    -a '(__bblctl_instances)'
"""


def _fish_quote(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def write_all(directory: str, docs: str) -> list[str]:
    """Every page and completion into `directory`; the paths written."""
    made = {"man/bblctl.1": bblctl_page(), "man/bbld.1": bbld_page(),
            "man/bbl-bwrap.1": bwrap_page(), "man/bbl-profile.5": profile_page(docs),
            "completions/bblctl.bash": bash_completion(),
            "completions/_bblctl": zsh_completion(),
            "completions/bblctl.fish": fish_completion()}
    for name, text in made.items():
        path = os.path.join(directory, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(text)
    return sorted(made)


if __name__ == "__main__":
    target = sys.argv[1] if len(sys.argv) > 1 else "docs"
    here = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    for written in write_all(target, os.path.join(here, "docs", "profiles.md")):
        print(os.path.join(target, written))

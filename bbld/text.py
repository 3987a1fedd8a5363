"""Text that may come from inside a sandbox or from a client, made safe to show (no imports:
bblctl uses it for every line it prints, bbld for its log)."""


def printable(text: str) -> str:
    """`text` with control characters (escape sequences, newlines, tabs) and invisible or
    reordering ones (bidi overrides) as \\xHH or \\uHHHH escapes, so that nothing a sandbox
    chooses (a process's name, a command line, a message) can set a terminal's title, clear
    its screen, fake a prompt or forge a log line."""
    if text.isprintable():
        return text
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode()
                   for c in text)

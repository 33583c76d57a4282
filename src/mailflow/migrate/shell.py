"""Does a `|command` need `/bin/sh`? And the words `/bin/sh` makes of it when it does not.

sendmail and postfix hand `|command` to `/bin/sh -c`. mailflow never runs a shell: it splits a
route's command once (POSIX `shlex`) and execs the words. The two agree exactly when the command
uses nothing but words and quoting, which is what `shell_needs` decides, conservatively: a
command with any expansion, operator, glob, comment, assignment or builtin is refused, with the
reason, rather than carried over with a guess at what the shell would have done.

`/bin/sh` may be dash or bash; the refusals cover both (bash's brace expansion included).
"""

from __future__ import annotations

import re
import shlex

#: Reserved words and builtins with no program of the same meaning on PATH: as the first word
#: they make the command mean something an exec of argv cannot do (`exec` replaces the shell,
#: `cd` changes its directory, `.` reads a script, …).
SHELL_WORDS = frozenset(
    {
        "!", "{", "}", "[[", "]]", ".", ":", "alias", "bg", "break", "builtin", "case", "cd",
        "command", "continue", "do", "done", "elif", "else", "esac", "eval", "exec", "exit",
        "export", "fg", "fi", "for", "function", "getopts", "hash", "if", "in", "jobs",
        "local", "read", "readonly", "return", "select", "set", "shift", "source", "then",
        "time", "times", "trap", "type", "ulimit", "umask", "unalias", "unset", "until",
        "wait", "while",
    },
)  # fmt: skip

_OPERATORS = {
    "|": "a pipe (|)",
    "&": "& or && (background job or command list)",
    ";": "; (a command list)",
    "<": "a redirection (<)",
    ">": "a redirection (>)",
    "(": "a subshell or function ( )",
    ")": "a subshell or function ( )",
    "$": "$ (variable, command or arithmetic expansion)",
    "`": "` (command substitution)",
    "*": "a glob (* ? [)",
    "?": "a glob (* ? [)",
    "[": "a glob (* ? [)",
    "{": "unquoted braces (bash as /bin/sh expands them)",
    "}": "unquoted braces (bash as /bin/sh expands them)",
}
_AT_WORD_START = {
    "~": "~ (home-directory expansion)",
    "#": "# (a shell comment)",
}
_ASSIGNMENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*=")


def _is_control(ch: str) -> bool:
    return (ord(ch) < 0x20 and ch != "\t") or ord(ch) == 0x7F


def shell_needs(command: str) -> str | None:
    """Why exec'ing the words of `command` would differ from `/bin/sh -c command`; None if not.

    Every distinct reason is named (`a redirection (>); & or && …`), so one reading of the
    refusal says everything that has to change.
    """
    reasons = _scan(command)
    if reasons:
        return "; ".join(reasons)
    words = shlex.split(command)
    if not words or not words[0]:
        return "no program name"
    if words[0] in SHELL_WORDS:
        return f"{words[0]!r} is a shell builtin or keyword"
    if _ASSIGNMENT.match(command.lstrip(" \t")):
        return "a variable assignment before the program name"
    return None


def sh_words(command: str) -> tuple[str, ...]:
    """The argv `/bin/sh` runs for a command `shell_needs` accepted (POSIX word splitting)."""
    return tuple(shlex.split(command))


_CONTROL = "a newline or control character (a second command, or worse)"


def _scan(command: str) -> list[str]:
    """Every distinct shell-only construct in `command`, following sh's quoting rules."""
    if any(_is_control(ch) for ch in command):
        return [_CONTROL]
    reasons: list[str] = []
    i, word_start = 0, True
    while i < len(command):
        ch = command[i]
        if ch in " \t":
            word_start = True
            i += 1
            continue
        if word_start and ch in _AT_WORD_START:
            _note(reasons, _AT_WORD_START[ch])
        word_start = False
        i, found = _step(command, i)
        for reason in found:
            _note(reasons, reason)
    return reasons


def _note(reasons: list[str], reason: str) -> None:
    if reason not in reasons:
        reasons.append(reason)


def _step(command: str, i: int) -> tuple[int, list[str]]:
    """Past the character (or quoted string) at `i`: (next index, shell-only constructs)."""
    ch = command[i]
    if ch == "'":
        close = command.find("'", i + 1)
        if close < 0:
            return len(command), ["unterminated single quote (')"]
        return close + 1, []
    if ch == '"':
        return _double_quoted(command, i + 1)
    if ch == "\\":
        if i + 1 < len(command):
            return i + 2, []
        return i + 1, ["a backslash at the end"]
    reason = _OPERATORS.get(ch)
    return i + 1, [] if reason is None else [reason]


def _double_quoted(command: str, start: int) -> tuple[int, list[str]]:
    """(index past the closing quote, shell-only constructs) of a double-quoted string."""
    reasons: list[str] = []
    i, n = start, len(command)
    while i < n:
        ch = command[i]
        if ch == '"':
            return i + 1, reasons
        if ch in "$`":
            _note(reasons, _OPERATORS[ch])
        elif ch == "\\":
            # sh removes this backslash, POSIX shlex keeps it: the word would differ.
            if command[i + 1 : i + 2] in ("$", "`"):
                _note(reasons, "a backslash before $ or ` inside double quotes")
            i += 1
        i += 1
    return n, [*reasons, 'unterminated double quote (")']

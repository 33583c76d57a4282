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
    """Why exec'ing the words of `command` would differ from `/bin/sh -c command`; None if not."""
    reason = _scan(command)
    if reason is not None:
        return reason
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


def _scan(command: str) -> str | None:
    """First shell-only construct in `command`, following sh's quoting rules."""
    if any(_is_control(ch) for ch in command):
        return _CONTROL
    i, word_start = 0, True
    while i < len(command):
        ch = command[i]
        if ch in " \t":
            word_start = True
            i += 1
            continue
        if word_start and ch in _AT_WORD_START:
            return _AT_WORD_START[ch]
        word_start = False
        i, reason = _step(command, i)
        if reason is not None:
            return reason
    return None


def _step(command: str, i: int) -> tuple[int, str | None]:
    """Past the character (or quoted string) at `i`: (next index, reason if shell-only)."""
    ch = command[i]
    if ch == "'":
        close = command.find("'", i + 1)
        return (close + 1, None) if close >= 0 else (i, "unterminated single quote (')")
    if ch == '"':
        close, reason = _double_quoted(command, i + 1)
        return close + 1, reason
    if ch == "\\":
        return (i + 2, None) if i + 1 < len(command) else (i, "a backslash at the end")
    return i + 1, _OPERATORS.get(ch)


def _double_quoted(command: str, start: int) -> tuple[int, str | None]:
    """(index of the closing quote, reason) for the double-quoted string starting at `start`."""
    i, n = start, len(command)
    while i < n:
        ch = command[i]
        if ch == '"':
            return i, None
        if ch in "$`":
            return i, _OPERATORS[ch]
        if ch == "\\":
            # sh removes this backslash, POSIX shlex keeps it: the word would differ.
            if command[i + 1 : i + 2] in ("$", "`"):
                return i, "a backslash before $ or ` inside double quotes"
            i += 2
            continue
        i += 1
    return i, 'unterminated double quote (")'

"""Migration from sendmail/postfix: `/etc/aliases` → mailflow routes, and the proof they agree.

- `aliases`: the aliases(5) reader (logical lines, quoting, duplicates), with line numbers.
- `shell`: whether a `|command` needs `/bin/sh`, and how `/bin/sh` splits it when it does not.
- `families`: aliases that differ only in a token that is also in the command → one route.
- `importer`: the whole import (what is carried over, what is refused and why).
- `check`: for every alias, the argv mailflow's real routing would run next to the alias's own.

Nothing here depends on the CLI; the CLI only parses arguments and renders these results.
"""

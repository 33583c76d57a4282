"""Named process exit codes: what `echo $?` means at 3 a.m."""

EXIT_OK = 0
#: Something failed (a check, a command's work); the message says what.
EXIT_FAILURE = 1
#: Bad configuration or usage: nothing was started.
EXIT_CONFIG = 2
#: The worker was stopped and running deliveries outlived the shutdown grace: they were
#: killed and handed back (another worker completes them).
EXIT_DRAIN_TIMEOUT = 3
#: Interrupted by a signal during a one-shot command.
EXIT_INTERRUPTED = 130

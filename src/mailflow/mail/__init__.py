"""What arrives: the SES notification (`notification`), and the mail's header summary
(`summary`) with its Japanese charset handling (`charsets`). Pure: no I/O."""

"""mailflow: order mail from SES (S3 + SNS → SQS) to the legacy processor, one delivery each."""

#: The one place the version is written: pyproject.toml reads it from here (hatch), so a
#: command never scans the installed distributions for it at start-up (~40 ms).
__version__ = "0.1.0"

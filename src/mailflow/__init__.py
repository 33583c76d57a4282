"""mailflow: order mail from SES (S3 + SNS → SQS) to the legacy processor, one delivery each."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("mailflow")
except PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

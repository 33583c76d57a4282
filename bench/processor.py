"""Bench processor, the Python twin of processor.php (used only when php-cli is missing)."""

import fcntl
import os
import sys
import time

t0 = time.time()
size = 0
while chunk := sys.stdin.buffer.read(65536):
    size += len(chunk)
time.sleep(int(sys.argv[2]) / 1000)
t1 = time.time()
line = f"{os.environ.get('MAILFLOW_DELIVERY_ID', 'none')} {t0:.6f} {t1:.6f} {size}\n"
with open(sys.argv[3], "a", encoding="utf-8") as out:  # noqa: PTH123 - no pathlib import cost
    fcntl.flock(out, fcntl.LOCK_EX)
    out.write(line)

"""The bench's backend: mailflow's embedded moto server plus a per-operation request counter.

    python bench/moto_counting.py      # prints MOTO_URL=http://127.0.0.1:PORT when ready

`GET /_bench/calls` answers the counts since the last call as JSON ({"sqs.ReceiveMessage": 12,
...}) and resets them, so the bench can say how many AWS calls each consumer made per delivery.
"""

from __future__ import annotations

import json
import sys
import threading
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from mailflow.dev import motoserver

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


def _operation(environ: dict[str, Any]) -> str:
    target = environ.get("HTTP_X_AMZ_TARGET", "")
    if target:  # JSON protocols: DynamoDB_20120810.UpdateItem, AmazonSQS.ReceiveMessage
        service, _, op = target.partition(".")
        return f"{'ddb' if service.startswith('DynamoDB') else 'sqs'}.{op}"
    query = environ.get("QUERY_STRING", "")
    if "Action=" in query:
        return "query." + query.split("Action=", 1)[1].split("&", 1)[0]
    return f"s3.{environ.get('REQUEST_METHOD', '?')}"


def counting(app: WsgiApp) -> WsgiApp:
    """`app` that counts requests by operation and answers /_bench/calls."""
    counts: Counter[str] = Counter()
    lock = threading.Lock()

    def wrapped(environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/_bench/calls":
            with lock:
                body = json.dumps(dict(counts)).encode()
                counts.clear()
            start_response(
                "200 OK", [("Content-Type", "application/json"), ("Content-Length", str(len(body)))]
            )
            return [body]
        with lock:
            counts[_operation(environ)] += 1
        return app(environ, start_response)

    return wrapped


if __name__ == "__main__":
    sys.exit(motoserver.main(middleware=counting))

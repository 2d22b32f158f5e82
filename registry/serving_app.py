"""MLflow's scoring app (`/invocations`) behind a guard, as `cpmant serve` runs it.

    python -m registry.serving_app serve -m MODEL_FOLDER --host 127.0.0.1 --port 5001 --workers 1

`mlflow models serve` runs uvicorn on `mlflow.pyfunc.scoring_server.app:app` and offers no limit on the request:
a 2 MB body kept a worker busy for minutes, and `[1, null, {}]` reached the model as the strings "1", "None" and
"{}" (MLflow's parser turns every value of a string column into a string). The guard, a plain ASGI wrapper around
the same app, answers before MLflow parses anything:
- a body over MAX_BODY_BYTES: 413 with a message;
- JSON prompts (`inputs`, `instances`, `dataframe_split`, `dataframe_records`) that are not strings: 400.
Everything else (other paths, other content types, malformed JSON) goes to MLflow's app unchanged.
"""

from __future__ import annotations

import argparse
import json
import os

MAX_BODY_BYTES = 1 << 20  # 1 MiB: far more than the few hundred tokens a prompt can use


def _leaves(value) -> list:
    """The prompt values of one row: a string, or the values of a {"column": value} record."""
    return list(value.values()) if isinstance(value, dict) else [value]


def non_string_prompts(body: bytes, content_type: str) -> str | None:
    """A message when a JSON request's prompts are not all strings; None otherwise (or when it is not JSON that
    MLflow would read as prompts: MLflow answers that itself)."""
    if "json" not in (content_type or ""):
        return None
    try:
        doc = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return None
    if not isinstance(doc, dict):
        return None
    rows: list = []
    for key in ("inputs", "instances"):
        v = doc.get(key)
        rows += v if isinstance(v, list) else [] if v is None or isinstance(v, str) else [v]
    split = doc.get("dataframe_split")
    if isinstance(split, dict) and isinstance(split.get("data"), list):
        rows += [c for r in split["data"] for c in (r if isinstance(r, list) else [r])]
    if isinstance(doc.get("dataframe_records"), list):
        rows += doc["dataframe_records"]
    bad = [v for r in rows for v in _leaves(r) if not isinstance(v, str)]
    if not bad:
        return None
    kinds = ", ".join(sorted({"null" if v is None else type(v).__name__ for v in bad}))
    return (f"every prompt must be a string; {len(bad)} are not ({kinds}) "
            '(fix: send {"inputs": ["a prompt", ...]})')


async def _answer(send, status: int, code: str, message: str) -> None:
    body = json.dumps({"error_code": code, "message": message}).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})


def guard(app, max_bytes: int = MAX_BODY_BYTES):
    """`app` with /invocations requests checked first (size, then prompt types); the body is read once and handed
    on as it came."""
    too_big = (f"the request body is larger than {max_bytes:,} bytes (fix: send shorter prompts: only the last "
               "few hundred tokens of each are used)")

    async def guarded(scope, receive, send):
        if scope["type"] != "http" or scope.get("path") != "/invocations":
            return await app(scope, receive, send)
        headers = {k.lower(): v for k, v in scope.get("headers", [])}
        length = headers.get(b"content-length", b"")
        if length.isdigit() and int(length) > max_bytes:
            return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return None
            chunks.append(message.get("body", b""))
            size += len(chunks[-1])
            more = message.get("more_body", False)
            if size > max_bytes:
                return await _answer(send, 413, "REQUEST_LIMIT_EXCEEDED", too_big)
        body = b"".join(chunks)
        problem = non_string_prompts(body, headers.get(b"content-type", b"").decode("latin-1"))
        if problem:
            return await _answer(send, 400, "INVALID_PARAMETER_VALUE", problem)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        return await app(scope, replay, send)

    return guarded


def create_app():
    """uvicorn's factory: MLflow's scoring app for the model folder in MLflow's own variable, guarded."""
    from mlflow.pyfunc import scoring_server

    model = scoring_server.load_model_with_mlflow_config(os.environ[scoring_server._SERVER_MODEL_PATH])
    return guard(scoring_server.init(model))


def main(argv: list[str] | None = None) -> None:
    import uvicorn
    from mlflow.pyfunc import scoring_server
    from mlflow.utils.file_utils import path_to_local_file_uri

    ap = argparse.ArgumentParser(prog="python -m registry.serving_app")
    ap.add_argument("command", choices=["serve"])
    ap.add_argument("-m", dest="model", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=5001)
    ap.add_argument("--workers", type=int, default=1)
    args = ap.parse_args(argv)
    os.environ[scoring_server._SERVER_MODEL_PATH] = path_to_local_file_uri(os.path.abspath(args.model))
    uvicorn.run("registry.serving_app:create_app", factory=True, host=args.host, port=args.port,
                workers=args.workers)


if __name__ == "__main__":
    main()

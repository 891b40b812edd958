"""`nli serve`: a fine-tuned run behind a page to teach with and a JSON API to build on.

Starlette routes the requests and uvicorn speaks HTTP. The model runs in one worker thread (MXNet's
inference is not thread-safe), fed by an asyncio queue: requests that arrive together, while the model is
busy or within `MAX_WAIT` of each other, go to it as one batch of at most `MAX_PAIRS` pairs, which it sorts
by length and runs in forward passes of `--batch-size` pairs, as `predict --file` runs a file.
"""
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import ipaddress
import json
import os
import socket
import sys
from importlib import resources

import uvicorn
from mxnet import npx
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.responses import HTMLResponse, JSONResponse
from starlette.routing import Route

from . import attention, data, predict
from .errors import UserError
from .snli import LABELS

MAX_TEXT_CHARS = 2000  # a premise or hypothesis; the longest in SNLI's dev split has 310 characters
MAX_PAIRS = 256  # pairs in one request, and in one batch of requests
MAX_BODY_BYTES = 16 * 2 ** 20  # above MAX_PAIRS pairs of MAX_TEXT_CHARS characters, each escaped as \uXXXX
MAX_WAIT = 0.005  # seconds a request may wait for others to share its batch
BACKLOG = 2048  # connections waiting to be accepted, as uvicorn's default
PAIR_FIELDS = ("premise", "hypothesis")
OPTIONAL_FIELDS = ("tokenized",)
JSON_TYPES = {dict: "an object", list: "an array", str: "a string", int: "a number", float: "a number",
              bool: "true or false", type(None): "null"}


def describe_model(predictor):
    """'MXNet', 'ONNX Runtime fp32' or 'ONNX Runtime int8' (', an ensemble of N runs'): what computes the
    predictions."""
    onnx = predictor.config.get("onnx")
    engine = "MXNet" if onnx is None else f"ONNX Runtime {'int8' if onnx['int8'] else 'fp32'}"
    return engine + (f", an ensemble of {len(predictor.members)} runs" if predict.is_ensemble(predictor.config) else "")


def attention_refusal(predictor):
    """Why this run gives no attention weights (an ONNX export computes only logits), or None when it does."""
    onnx = predictor.config.get("onnx")
    if onnx is None:
        return None
    return (f"This run is an ONNX export, which computes labels but not attention weights; serve the MXNet run it "
            f"came from ({onnx['source_run']}) to see them.")


def warm_up(predictor):
    """One batch of the longest pairs before the first request: the tokenizer is imported, the graph built and
    the memory later passes reuse taken, so the first user does not wait for them and memory stays flat under load."""
    text = " ".join(["a"] * predictor.config["max_len"])
    predictor.predict_pairs([(text, text)] * predictor.batch_size)


@dataclasses.dataclass
class Job:
    """Pairs waiting for the model (or one pair's attention), with the future their request awaits."""
    pairs: list
    tokenized: bool
    future: asyncio.Future
    arrived: float  # the event loop's clock
    attention: bool = False


class Batcher:
    """The model's one worker thread and its queue: predictions that arrive together go to it as one batch."""

    def __init__(self, predictor, executor, max_pairs, max_wait=MAX_WAIT):
        self.predictor, self.executor = predictor, executor
        self.max_pairs, self.max_wait = max_pairs, max_wait
        self.queue = asyncio.Queue()
        self.served = {"requests": 0, "pairs": 0, "batches": 0}  # of predictions: how much requests share

    async def submit(self, pairs, tokenized, want_attention=False):
        """Queue a job and wait for its result: a list of predictions, or one pair's attention data."""
        loop = asyncio.get_running_loop()
        job = Job(pairs, tokenized, loop.create_future(), loop.time(), want_attention)
        await self.queue.put(job)
        return await job.future

    async def next_batch(self, first):
        """`first` and the prediction jobs queued behind it, up to `max_pairs` pairs, waiting at most until
        `first` has waited `max_wait`; (batch, the job that did not fit or None)."""
        loop = asyncio.get_running_loop()
        batch, count = [first], len(first.pairs)
        while count < self.max_pairs:
            left = first.arrived + self.max_wait - loop.time()
            try:  # what is already queued joins even past the deadline: under load no one waits for company
                job = self.queue.get_nowait() if left <= 0 else await asyncio.wait_for(self.queue.get(), left)
            except (asyncio.QueueEmpty, TimeoutError):
                break
            if job.attention or job.tokenized != first.tokenized or count + len(job.pairs) > self.max_pairs:
                return batch, job
            batch.append(job)
            count += len(job.pairs)
        return batch, None

    def compute(self, batch):
        """In the worker thread: each job's result, in order (one `predict_pairs` call for a batch of predictions)."""
        if batch[0].attention:
            return [attention.view_data(self.predictor.attention(*batch[0].pairs[0], batch[0].tokenized))]
        predictions = iter(self.predictor.predict_pairs([p for job in batch for p in job.pairs], batch[0].tokenized))
        return [[next(predictions) for _ in job.pairs] for job in batch]

    async def run(self):
        """Take jobs from the queue for ever, batch them and hand each request its result (or the error)."""
        loop = asyncio.get_running_loop()
        left_over = None
        while True:
            first = left_over or await self.queue.get()
            batch, left_over = ([first], None) if first.attention else await self.next_batch(first)
            batch = [job for job in batch if not job.future.done()]  # a client that went away
            if not batch:
                continue
            try:
                results = await loop.run_in_executor(self.executor, self.compute, batch)
            except Exception as e:  # noqa: BLE001  (each request gets it; the server goes on)
                for job in batch:
                    if not job.future.done():
                        job.future.set_exception(e)
                continue
            if not first.attention:
                self.served["requests"] += len(batch)
                self.served["pairs"] += sum(len(job.pairs) for job in batch)
                self.served["batches"] += 1
            for job, result in zip(batch, results):
                if not job.future.done():
                    job.future.set_result(result)


async def read_json(request):
    """The request's JSON object, or an HTTPException saying in one sentence what is wrong with the body."""
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip().lower() != "application/json":
        raise HTTPException(415, f"Send the body as JSON with Content-Type: application/json, not "
                                 f"{content_type or 'no Content-Type'}.")
    body = bytearray()
    async for chunk in request.stream():
        body += chunk
        if len(body) > MAX_BODY_BYTES:
            raise HTTPException(413, f"The body is over the limit of {MAX_BODY_BYTES // 2 ** 20} MiB.")
    if not body.strip():
        raise HTTPException(400, 'The body is empty; send a JSON object such as {"premise": "...", '
                                 '"hypothesis": "..."}.')
    try:
        value = json.loads(body)
    except json.JSONDecodeError as e:
        raise HTTPException(400, f"The body is not valid JSON ({e.msg}, line {e.lineno}, column {e.colno}).") from None
    except UnicodeDecodeError:
        raise HTTPException(400, "The body is not UTF-8 text.") from None
    if not isinstance(value, dict):
        raise HTTPException(422, f"The body must be a JSON object, not {JSON_TYPES[type(value)]}.")
    return value


def check_text(value, name):
    """`value` if it is a non-empty string within MAX_TEXT_CHARS, else an HTTPException naming `name`."""
    if not isinstance(value, str):
        raise HTTPException(422, f"{name} must be a string, not {JSON_TYPES[type(value)]}.")
    if not value.strip():
        raise HTTPException(422, f"{name} is empty.")
    if len(value) > MAX_TEXT_CHARS:
        raise HTTPException(413, f"{name} has {len(value)} characters, over the limit of {MAX_TEXT_CHARS}.")
    return value


def check_fields(body, allowed):
    """Refuse a field the endpoint does not know (a misspelt one would otherwise be ignored)."""
    for key in body:
        if key not in allowed:
            raise HTTPException(422, f"Unknown field {key!r}; expected {', '.join(allowed)}.")


def tokenized_flag(body):
    """The optional `tokenized` field: the text is already split as SNLI's is (`nli predict --tokenized`)."""
    value = body.get("tokenized", False)
    if not isinstance(value, bool):
        raise HTTPException(422, f"tokenized must be true or false, not {JSON_TYPES[type(value)]}.")
    return value


def one_pair(body):
    """The (premise, hypothesis) of a `{"premise": ..., "hypothesis": ...}` body, checked."""
    check_fields(body, PAIR_FIELDS + OPTIONAL_FIELDS)
    for name in PAIR_FIELDS:
        if name not in body:
            raise HTTPException(422, f"{name} is missing from the request.")
    return tuple(check_text(body[name], name) for name in PAIR_FIELDS)


def many_pairs(body):
    """The pairs of a `{"pairs": [[premise, hypothesis], ...]}` body, checked."""
    check_fields(body, ("pairs",) + OPTIONAL_FIELDS)
    pairs = body["pairs"]
    if not isinstance(pairs, list):
        raise HTTPException(422, f"pairs must be an array of [premise, hypothesis] arrays, not "
                                 f"{JSON_TYPES[type(pairs)]}.")
    if not pairs:
        raise HTTPException(422, "pairs is empty.")
    if len(pairs) > MAX_PAIRS:
        raise HTTPException(413, f"pairs has {len(pairs)} pairs, over the limit of {MAX_PAIRS} a request.")
    for i, pair in enumerate(pairs):
        if not isinstance(pair, list) or len(pair) != 2:
            raise HTTPException(422, f"pairs[{i}] must be a [premise, hypothesis] array.")
        for j, name in enumerate(PAIR_FIELDS):
            check_text(pair[j], f"pairs[{i}]'s {name}")
    return [tuple(pair) for pair in pairs]


def create_app(predictor, executor, run_name):
    """The Starlette app: the page, the API and the error handlers, over a loaded predictor whose model runs
    only in `executor` (one thread)."""
    page = resources.files(__package__).joinpath("serve_page.html").read_text(encoding="utf-8")
    refusal = attention_refusal(predictor)
    health = {"status": "ok", "run": run_name, "model": describe_model(predictor), "labels": list(LABELS),
              "attention": refusal is None, "attention_refusal": refusal,
              "limits": {"text_chars": MAX_TEXT_CHARS, "pairs": MAX_PAIRS, "body_bytes": MAX_BODY_BYTES}}
    batcher = None

    @contextlib.asynccontextmanager
    async def lifespan(app):
        nonlocal batcher
        batcher = Batcher(predictor, executor, MAX_PAIRS)
        worker = asyncio.create_task(batcher.run())
        yield
        worker.cancel()

    async def index(request):
        return HTMLResponse(page)

    async def api_health(request):
        return JSONResponse({**health, "served": batcher.served})

    async def api_predict(request):
        body = await read_json(request)
        tokenized = tokenized_flag(body)
        if "pairs" in body:
            if any(name in body for name in PAIR_FIELDS):
                raise HTTPException(422, "Send premise and hypothesis, or pairs, not both.")
            return JSONResponse({"predictions": await batcher.submit(many_pairs(body), tokenized)})
        return JSONResponse((await batcher.submit([one_pair(body)], tokenized))[0])

    async def pair_attention(premise, hypothesis, tokenized):
        if refusal:
            raise HTTPException(409, refusal)
        return await batcher.submit([(premise, hypothesis)], tokenized, want_attention=True)

    async def api_attention(request):
        body = await read_json(request)
        return JSONResponse(await pair_attention(*one_pair(body), tokenized_flag(body)))

    async def attention_page(request):
        """The page `nli predict --attention FILE.html` writes, for the pair in the query string."""
        query = dict(request.query_params)
        tokenized = query.pop("tokenized", "false")
        if tokenized not in ("true", "false"):
            raise HTTPException(422, f"tokenized must be true or false, not {tokenized!r}.")
        return HTMLResponse(attention.page_html(await pair_attention(*one_pair(query), tokenized == "true")))

    async def http_error(request, exc):
        sentence = {404: f"Nothing is served at {request.url.path}; the page is at /, the API at /api/predict, "
                         f"/api/attention and /api/health.",
                    405: f"{request.url.path} does not take {request.method}."}.get(exc.status_code, exc.detail)
        return JSONResponse({"error": sentence}, exc.status_code, headers=exc.headers)

    async def user_error(request, exc):  # what the predictor refuses, in its one sentence
        return JSONResponse({"error": str(exc)}, 422)

    async def server_error(request, exc):  # the traceback goes to the server's log, never to the client
        return JSONResponse({"error": "The server failed on this request (its log says why); it goes on serving."},
                            500)

    routes = [Route("/", index), Route("/attention", attention_page), Route("/api/health", api_health),
              Route("/api/predict", api_predict, methods=["POST"]),
              Route("/api/attention", api_attention, methods=["POST"])]
    handlers = {HTTPException: http_error, UserError: user_error, Exception: server_error}
    return Starlette(routes=routes, lifespan=lifespan, exception_handlers=handlers)


def is_loopback(host):
    """Whether `host` is only reachable from this machine (127.0.0.1, ::1, localhost)."""
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"


def bind(host, port):
    """A socket bound to host:port before the model loads (a port in use fails at once, in one sentence); it
    listens once the model is loaded."""
    try:
        family, kind, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
        sock = socket.socket(family, kind)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # as uvicorn's own bind does
        sock.bind(address)
    except OSError as e:
        raise UserError(f"Cannot listen on {host} port {port}: {e.strerror or e}; choose another with "
                        f"--host/--port.") from None
    return sock


def url_of(sock):
    """http://host:port/ of a bound socket (IPv6 hosts in brackets)."""
    host, port = sock.getsockname()[:2]
    return f"http://{f'[{host}]' if ':' in host else host}:{port}/"


def serve(args):
    """`nli serve`: load the run, then answer on --host/--port until Ctrl-C."""
    if not is_loopback(args.host):
        print(f"warning: --host {args.host} lets other machines reach this server, and its API has no "
              f"authentication: anyone who reaches the port can use the model.", file=sys.stderr, flush=True)
    sock = bind(args.host, args.port)
    # MXNet's NumPy semantics are set per thread (nli/bert.py sets them for the main one)
    executor = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="nli-model", initializer=npx.set_np)
    try:  # the model is loaded in the thread that will run it
        predictor = executor.submit(predict.load_predictor, args.run, data.scoring_devices(args.devices),
                                    args.batch_size, args.max_memory).result()
        executor.submit(warm_up, predictor).result()
        app = create_app(predictor, executor, os.path.basename(os.path.normpath(args.run)))
        server = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False, ws="none",
                                               timeout_graceful_shutdown=5))
        sock.listen(BACKLOG)  # from now on a client waits for an answer: none is refused while uvicorn starts
        print(f"serving {args.run} ({describe_model(predictor)}) at {url_of(sock)} (Ctrl-C stops)", flush=True)
        with contextlib.suppress(KeyboardInterrupt):  # uvicorn shuts down gracefully, then re-raises Ctrl-C
            server.run(sockets=[sock])
        print("stopped", flush=True)
    finally:
        sock.close()
        executor.shutdown(cancel_futures=True)

r"""An exported model as an HTTP service: decisions for single images, batched on the way.

  python -m ccl_jax.serve --model ~/models/demo [--backend onnx] [--port 8000]
  curl -F image=@part.png http://127.0.0.1:8000/v1/predict

Endpoints (the OpenAPI description is at /openapi.json):
  POST /v1/predict   one image, as the raw request body (Content-Type image/png, image/jpeg,
                     image/bmp, image/tiff or application/octet-stream) or as the multipart
                     field 'image'; `class_name` (query or multipart field) puts it in that
                     class's group instead of routing it; `overlay=true` adds the anomaly
                     map overlay as a base64 PNG. The answer holds the columns of a
                     `python -m ccl_jax.predict` row: class, class_source, score, threshold,
                     decision.
  GET  /v1/model     the model directory's facts: kind, image size, groups and thresholds,
                     precision (when the manifest has one), versions, serving limits
  GET  /healthz      the process answers (liveness)
  GET  /readyz       the model is loaded and compiled for every batch size (readiness)
  GET  /             a web page: drop images, see each one's decision and overlay

Images are read by `ccl_jax.predict.read_image` (the same formats, bit depths and colour
modes, the same resize) and scored by `ccl_jax.predict.score_images`, so each answer equals
the `predict --model` row of the same file.

Batching: requests are queued; one worker thread takes the first waiting image, gathers
more until it has --max_batch or --max_wait_ms has passed since that first image arrived,
and runs them through the model together. Batches are padded to the next power of two (or
--max_batch), so the model sees a few fixed batch sizes, each compiled before /readyz
reports ready. A lone request waits at most --max_wait_ms for company.

Safety: the server listens on 127.0.0.1 unless --host says otherwise; on any other address
it refuses to start without a bearer token (--token or the CCL_JAX_SERVE_TOKEN environment
variable), which every endpoint except /healthz, /readyz and the page's static HTML then
requires (the page asks for it). Request bodies over --max_request_bytes get 413, images
over --max_pixels 413 (checked from the image header, before decoding), bodies slower than
--request_timeout_s 408, anything but the accepted image formats 415, unreadable images
400, and a full queue or an answer later than --request_timeout_s 503. A bad request
never reaches the model.
"""
from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import contextlib
import dataclasses
import io
import ipaddress
import os
import queue
import secrets
import socket
import tempfile
import threading
import time
from typing import Any, Literal

import numpy as np
from absl import app as absl_app, flags
from PIL import Image

try:
  import fastapi
  import pydantic
  import uvicorn
  from fastapi import security
  from fastapi.concurrency import run_in_threadpool
  from fastapi.responses import HTMLResponse, JSONResponse
  import starlette.exceptions
  from starlette.datastructures import UploadFile
except ImportError as error:
  raise ImportError(f"ccl_jax.serve needs the serve extra ({error}): "
                    'pip install -e ".[serve]"') from error

from ccl_jax import predict
from ccl_jax.decisions import grouping, thresholds
from ccl_jax.deploy import loader

TOKEN_ENVIRONMENT_VARIABLE = "CCL_JAX_SERVE_TOKEN"
MIN_TOKEN_LENGTH = 16
# PIL's names of the accepted formats (MPO: a JPEG with extra pictures, e.g. from cameras).
IMAGE_FORMATS = ("PNG", "JPEG", "MPO", "BMP", "TIFF")
RAW_CONTENT_TYPES = ("image/png", "image/jpeg", "image/bmp", "image/tiff",
                     "application/octet-stream")
MULTIPART = "multipart/form-data"
PAGE_FILE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "deploy",
                         "serve_page.html")


@dataclasses.dataclass(frozen=True)
class Options:
  """How the service batches, limits and authenticates (the flags of the same names)."""
  max_batch: int = 16
  max_wait_ms: float = 5.0
  threshold_mode: str = "classwise"
  max_request_bytes: int = 32 << 20
  max_pixels: int = 40_000_000
  request_timeout_s: float = 30.0
  max_queue: int = 256
  token: str | None = None

  def __post_init__(self):
    for name in ("max_batch", "max_request_bytes", "max_pixels", "max_queue"):
      if getattr(self, name) < 1:
        raise ValueError(f"--{name} must be at least 1, got {getattr(self, name)}.")
    if self.max_wait_ms < 0 or self.request_timeout_s <= 0:
      raise ValueError(f"--max_wait_ms must be >= 0 and --request_timeout_s > 0, got "
                       f"{self.max_wait_ms} and {self.request_timeout_s}.")
    if self.threshold_mode not in ("classwise", "agnostic"):
      raise ValueError(f"--threshold must be classwise or agnostic, got "
                       f"{self.threshold_mode!r}.")
    if self.token is not None and len(self.token) < MIN_TOKEN_LENGTH:
      raise ValueError(f"the token must be at least {MIN_TOKEN_LENGTH} characters long "
                       f"(got {len(self.token)}); e.g. python -c 'import secrets; "
                       "print(secrets.token_urlsafe())'.")


def batch_sizes(max_batch: int) -> tuple[int, ...]:
  """The padded batch sizes the model runs at: powers of two below `max_batch`, and it."""
  sizes = [1]
  while sizes[-1] * 2 < max_batch:
    sizes.append(sizes[-1] * 2)
  return tuple(sorted(set(sizes + [max_batch])))


def padded_size(count: int, max_batch: int) -> int:
  return next(size for size in batch_sizes(max_batch) if size >= count)


class ServiceBusy(RuntimeError):
  """The queue of images waiting for the model is full."""


@dataclasses.dataclass
class _Pending:
  image: np.ndarray  # [S, S, 3] uint8
  group: int         # given group, or -1 to route
  arrived: float     # time.monotonic()
  future: concurrent.futures.Future


class Batcher:
  """Scores queued images in batches on one worker thread (module docstring)."""

  def __init__(self, model: loader.ExportedModel, groups: grouping.Groups,
               max_batch: int, max_wait_s: float, max_queue: int):
    self.model, self.groups = model, groups
    self.max_batch, self.max_wait_s = max_batch, max_wait_s
    self._queue: queue.Queue[_Pending | None] = queue.Queue(max_queue)
    self.ready = threading.Event()
    self.batches = self.images = 0
    self._thread = threading.Thread(target=self._run, name="ccl_jax-serve-batcher",
                                    daemon=True)

  def start(self) -> None:
    self._thread.start()

  def stop(self) -> None:
    self._queue.put(None)
    self._thread.join()

  @property
  def alive(self) -> bool:
    return self._thread.is_alive()

  def submit(self, image: np.ndarray, group: int) -> concurrent.futures.Future:
    """A future of ((group, score, anomaly map), batch size) for `image`."""
    pending = _Pending(image, group, time.monotonic(), concurrent.futures.Future())
    try:
      self._queue.put_nowait(pending)
    except queue.Full:
      raise ServiceBusy(f"{self._queue.maxsize} images are already waiting for the model "
                        "(--max_queue); retry shortly.") from None
    return pending.future

  def _score(self, images: np.ndarray, given: np.ndarray):
    return predict.score_images(self.model, padded_size(len(images), self.max_batch),
                                self.groups, images, given)

  def _run(self) -> None:
    size = self.model.image_size
    for batch_size in batch_sizes(self.max_batch):  # compile every shape before serving
      self._score(np.zeros((batch_size, size, size, 3), np.uint8),
                  np.full(batch_size, -1))
    self.ready.set()
    while True:
      first = self._queue.get()
      if first is None:
        return
      batch = [first]
      deadline = first.arrived + self.max_wait_s
      while len(batch) < self.max_batch:
        remaining = deadline - time.monotonic()
        try:
          pending = (self._queue.get(timeout=remaining) if remaining > 0
                     else self._queue.get_nowait())
        except queue.Empty:
          break
        if pending is None:
          self._queue.put(None)
          break
        batch.append(pending)
      # Requests that gave up waiting (timed out) are dropped here.
      batch = [p for p in batch if p.future.set_running_or_notify_cancel()]
      if not batch:
        continue
      try:
        results = self._score(np.stack([p.image for p in batch]),
                              np.array([p.group for p in batch]))
      except Exception as err:  # noqa: BLE001 - reported to each request, worker lives on
        for pending in batch:
          pending.future.set_exception(err)
        continue
      self.batches += 1
      self.images += len(batch)
      for pending, result in zip(batch, results):
        pending.future.set_result((result, len(batch)))


def is_loopback(host: str) -> bool:
  if host == "localhost":
    return True
  try:
    return ipaddress.ip_address(host).is_loopback
  except ValueError:
    return False


def check_listen(host: str, token: str | None) -> None:
  """Refuses to listen beyond this machine without a token."""
  if not is_loopback(host) and not token:
    raise ValueError(
        f"--host {host!r} accepts connections from other machines, so requests must carry "
        f"a bearer token: pass --token, or set {TOKEN_ENVIRONMENT_VARIABLE} (e.g. to the "
        "output of python -c 'import secrets; print(secrets.token_urlsafe())'). Or listen "
        "on 127.0.0.1 only (the default).")


def model_facts(model: loader.ExportedModel, options: Options) -> dict[str, Any]:
  """The answer of GET /v1/model."""
  manifest = model.manifest
  groups = grouping.Groups.from_json(manifest["groups"])
  cutoffs = thresholds.Thresholds.from_json(manifest["thresholds"])
  return {
      "model_kind": model.name, "image_size": model.image_size, "backend": model.backend,
      "format_version": manifest["format_version"],
      "precision": manifest.get("precision"),
      "groups": [{"name": name, "threshold": float(cutoffs.per_group[g])}
                 for g, name in enumerate(groups.names)],
      "groups_are_classes": groups.from_labels,
      "agnostic_threshold": float(cutoffs.agnostic), "threshold_rule": cutoffs.rule,
      "threshold_mode": options.threshold_mode,
      "versions": {k: str(v) for k, v in manifest.get("versions", {}).items()},
      "batching": {"max_batch": options.max_batch, "max_wait_ms": options.max_wait_ms},
      "limits": {"max_request_bytes": options.max_request_bytes,
                 "max_pixels": options.max_pixels,
                 "request_timeout_s": options.request_timeout_s},
      "token_required": options.token is not None}


class Prediction(pydantic.BaseModel):
  """The columns of a `python -m ccl_jax.predict` row for the image."""
  model_config = pydantic.ConfigDict(populate_by_name=True)
  class_: str = pydantic.Field(alias="class", description="The group's name (a class "
                               "name when the groups came from class labels).")
  class_source: Literal["given", "routed"] = pydantic.Field(
      description="'given' (class_name) or 'routed' (nearest group centroid).")
  score: float = pydantic.Field(description="Image anomaly score (the map's maximum).")
  threshold: float = pydantic.Field(description="The threshold the score was compared "
                                    "with (the group's, or the class-agnostic one).")
  decision: Literal["anomalous", "normal"] = pydantic.Field(
      description="'anomalous' when score > threshold.")
  overlay: str | None = pydantic.Field(
      None, description="With overlay=true: base64 PNG of the image at its own size with "
      "the anomaly map blended in, coloured from 0 (blue) to 2 x threshold (red).")


class Group(pydantic.BaseModel):
  name: str
  threshold: float = pydantic.Field(description="The group's (class-wise) threshold.")


class ModelFacts(pydantic.BaseModel):
  """The model directory's facts (manifest.json) and the serving settings."""
  model_kind: str
  image_size: int = pydantic.Field(description="Images are resized to this square.")
  backend: str
  format_version: int
  precision: Any = pydantic.Field(None, description="The manifest's precision entry, "
                                  "when it has one.")
  groups: list[Group]
  groups_are_classes: bool = pydantic.Field(description="Whether class_name is accepted "
                                            "(groups from class labels, not clusters).")
  agnostic_threshold: float
  threshold_rule: str
  threshold_mode: Literal["classwise", "agnostic"]
  versions: dict[str, str] = pydantic.Field(description="Versions that wrote the model.")
  batching: dict[str, int | float]
  limits: dict[str, int | float]
  token_required: bool


class Problem(pydantic.BaseModel):
  detail: str


class Health(pydantic.BaseModel):
  status: Literal["ok"]


class Readiness(pydantic.BaseModel):
  ready: bool
  batches: int = pydantic.Field(description="Batches scored since the start.")
  images: int = pydantic.Field(description="Images scored since the start.")


def create_app(model: loader.ExportedModel, options: Options = Options()):
  """The FastAPI application serving `model` (the batch worker runs while it is up)."""
  groups = grouping.Groups.from_json(model.manifest["groups"])
  cutoffs = thresholds.Thresholds.from_json(model.manifest["thresholds"])
  batcher = Batcher(model, groups, options.max_batch, options.max_wait_ms / 1000,
                    options.max_queue)
  facts = model_facts(model, options)
  # Decoding holds whole images in memory: at most one per core at a time.
  decoding = asyncio.Semaphore(os.cpu_count() or 1)
  uploads = tempfile.TemporaryDirectory(prefix="ccl_jax_serve_")

  problems = {code: {"model": Problem, "description": text} for code, text in (
      (400, "Not a readable image, a malformed multipart body, or an unknown class name"),
      (401, "Missing or wrong bearer token"),
      (408, "The request body did not arrive within --request_timeout_s"),
      (413, "Body over --max_request_bytes, or image over --max_pixels"),
      (415, "Content type or image format not accepted"),
      (503, "Queue full, or no answer within --request_timeout_s; retry later"))}

  @contextlib.asynccontextmanager
  async def lifespan(_):
    batcher.start()
    try:
      yield
    finally:
      batcher.stop()
      uploads.cleanup()

  application = fastapi.FastAPI(
      title="ccl_jax anomaly detector", lifespan=lifespan, docs_url=None, redoc_url=None,
      openapi_url=None, version=facts["versions"].get("ccl_jax", "unknown"),
      description=f"Decisions of the exported {model.name} model "
      f"({model.image_size} px, {len(groups.names)} groups) for single images.")
  application.add_middleware(_BodyLimit, max_bytes=options.max_request_bytes)
  bearer = security.HTTPBearer(auto_error=False,
                               description=f"The token of --token or {TOKEN_ENVIRONMENT_VARIABLE}.")

  async def check_token(
      credentials: security.HTTPAuthorizationCredentials | None = fastapi.Depends(bearer)):
    if credentials is None or not secrets.compare_digest(
        credentials.credentials.encode(), options.token.encode()):
      raise fastapi.HTTPException(401, "This server requires 'Authorization: Bearer <token>' "
                                  "with its token.", headers={"WWW-Authenticate": "Bearer"})

  guarded = [fastapi.Depends(check_token)] if options.token is not None else []
  if not guarded:
    del problems[401]

  @application.get("/healthz", response_model=Health, tags=["health"])
  async def healthz():
    """Liveness: the process answers."""
    return {"status": "ok"}

  @application.get("/readyz", response_model=Readiness, tags=["health"],
                   responses={503: {"model": Readiness, "description": "Not ready yet"}})
  async def readyz():
    """Readiness: the model is compiled for every batch size and its worker runs."""
    ready = batcher.ready.is_set() and batcher.alive
    return JSONResponse({"ready": ready, "batches": batcher.batches,
                         "images": batcher.images}, 200 if ready else 503)

  @application.get("/v1/model", response_model=ModelFacts, dependencies=guarded,
                   tags=["model"], responses={k: v for k, v in problems.items() if k == 401})
  async def model_info():
    """The model directory's facts (manifest.json) and the serving settings."""
    return facts

  predict_body = {"required": True, "content": {
      **{kind: {"schema": {"type": "string", "format": "binary"}}
         for kind in RAW_CONTENT_TYPES},
      MULTIPART: {"schema": {"type": "object", "required": ["image"], "properties": {
          "image": {"type": "string", "format": "binary",
                    "description": "PNG, JPEG, BMP or TIFF; 8 or 16 bit; grey, RGB or RGBA"},
          "class_name": {"type": "string", "description": "As the query parameter."}}}}}}

  @application.post("/v1/predict", response_model=Prediction, dependencies=guarded,
                    tags=["model"], openapi_extra={"requestBody": predict_body},
                    responses=problems)
  async def predict_image(
      request: fastapi.Request,
      class_name: str | None = fastapi.Query(
          None, description="The image's class: score it in that class's group instead "
          "of routing it (only for models whose groups are classes)."),
      overlay: bool = fastapi.Query(False, description="Add the anomaly map overlay.")):
    """Scores one image (PNG, JPEG, BMP, TIFF; 8/16 bit; grey, RGB, RGBA) and decides."""
    deadline = time.monotonic() + options.request_timeout_s
    try:
      data, name, form_class = await asyncio.wait_for(_read_image_body(request),
                                                      options.request_timeout_s)
    except TimeoutError:
      raise fastapi.HTTPException(408, f"The request body did not arrive within "
                                  f"{options.request_timeout_s} s (--request_timeout_s)."
                                  ) from None
    class_name = form_class if form_class is not None else class_name
    try:
      group = predict.given_group(groups, class_name)
    except ValueError as err:
      raise fastapi.HTTPException(400, str(err)) from None
    try:
      async with asyncio.timeout(max(deadline - time.monotonic(), 0)):
        async with decoding:
          loaded = await run_in_threadpool(_decode, data, name, model.image_size,
                                           options.max_pixels, overlay, uploads.name)
        future = batcher.submit(loaded.image, -1 if group is None else group)
        (found, score, anomaly_map), batch_size = await asyncio.wrap_future(future)
    except TimeoutError:
      raise fastapi.HTTPException(503, f"No answer within {options.request_timeout_s} s "
                                  "(--request_timeout_s): the server is busy; retry later.",
                                  headers={"Retry-After": "1"}) from None
    except ServiceBusy as err:
      raise fastapi.HTTPException(503, str(err), headers={"Retry-After": "1"}) from None
    row = predict.decide(groups, cutoffs, options.threshold_mode, found, score,
                         group is not None)
    if overlay:
      row["overlay"] = await run_in_threadpool(_overlay_png, loaded.original, anomaly_map,
                                               row["threshold"])
    return JSONResponse(Prediction(**row).model_dump(by_alias=True, exclude_none=True),
                        headers={"X-Batch-Size": str(batch_size)})

  @application.get("/", response_class=HTMLResponse, tags=["page"])
  async def page():
    """The web page: drop or pick images, see their decisions and overlays."""
    with open(PAGE_FILE, encoding="utf-8") as f:
      return f.read()

  @application.get("/openapi.json", dependencies=guarded, include_in_schema=False)
  async def openapi():
    return application.openapi()

  return application


async def _read_image_body(request) -> tuple[bytes, str, str | None]:
  """(image bytes, a name for messages, the multipart class_name) of a predict request."""
  content_type = request.headers.get("content-type", "").split(";")[0].strip().lower()
  accepted = f"{', '.join(RAW_CONTENT_TYPES)} (the image as the body) or {MULTIPART}"
  if content_type == MULTIPART:
    try:
      form = await request.form(max_files=1, max_fields=1)
    except starlette.exceptions.HTTPException as err:
      raise fastapi.HTTPException(400, f"Malformed multipart body: {err.detail}") from None
    try:
      image, class_name = form.get("image"), form.get("class_name")
      if not isinstance(image, UploadFile):
        raise fastapi.HTTPException(400, f"The multipart body has no file field 'image' "
                                    f"(fields: {', '.join(form.keys()) or 'none'}).")
      if class_name is not None and not isinstance(class_name, str):
        raise fastapi.HTTPException(400, "The multipart field 'class_name' must be text.")
      return await image.read(), image.filename or "the uploaded image", class_name
    finally:
      await form.close()
  if content_type not in RAW_CONTENT_TYPES:
    raise fastapi.HTTPException(
        415, f"Content-Type {content_type or '(none)'!r} is not accepted; send {accepted}.")
  return await request.body(), "the request body", None


def _decode(data: bytes, name: str, image_size: int, max_pixels: int, keep_original: bool,
            folder: str):
  """predict.read_image of `data`, after checking its format and size from its header."""
  if not data:
    raise fastapi.HTTPException(400, f"{name} is empty; send an image.")
  try:
    with Image.open(io.BytesIO(data)) as image:
      kind, (width, height) = image.format, image.size
  except Image.DecompressionBombError as err:
    raise fastapi.HTTPException(413, f"{name}: {err}") from None
  except Exception:  # noqa: BLE001 - PIL raises assorted types for non-images
    raise fastapi.HTTPException(
        400, f"{name} is not an image PIL can read (expected {', '.join(IMAGE_FORMATS)})."
    ) from None
  if kind not in IMAGE_FORMATS:
    raise fastapi.HTTPException(415, f"{name} is a {kind} image; expected "
                                f"{', '.join(IMAGE_FORMATS)}.")
  if width * height > max_pixels:
    raise fastapi.HTTPException(413, f"{name} is {width} x {height} = {width * height} "
                                f"pixels; this server accepts up to {max_pixels} "
                                "(--max_pixels).")
  with tempfile.NamedTemporaryFile(dir=folder, delete=False) as f:
    f.write(data)
  try:
    loaded = predict.read_image(f.name, image_size, keep_original)
  finally:
    os.unlink(f.name)
  if loaded.error:
    raise fastapi.HTTPException(400, f"Cannot read {name}: "
                                f"{loaded.error.replace(f.name, name)}")
  return loaded


def _overlay_png(original: np.ndarray, anomaly_map: np.ndarray, threshold: float) -> str:
  buffer = io.BytesIO()
  Image.fromarray(predict.overlay(original, anomaly_map, threshold)).save(buffer, "PNG")
  return base64.b64encode(buffer.getvalue()).decode("ascii")


class _BodyLimit:
  """ASGI middleware: 413 for request bodies over `max_bytes`, declared or streamed."""

  def __init__(self, app, max_bytes: int):
    self.app, self.max_bytes = app, max_bytes
    self.message = f"The request body is over {max_bytes} bytes (--max_request_bytes)."

  async def __call__(self, scope, receive, send):
    if scope["type"] != "http":
      await self.app(scope, receive, send)
      return
    declared = dict(scope["headers"]).get(b"content-length", b"0")
    if not declared.isdigit() or int(declared) > self.max_bytes:
      await JSONResponse({"detail": self.message}, 413)(scope, receive, send)
      return
    received = 0

    async def limited_receive():
      nonlocal received
      message = await receive()
      received += len(message.get("body", b""))
      if received > self.max_bytes:
              raise fastapi.HTTPException(413, self.message)
      return message

    await self.app(scope, limited_receive, send)


def define_flags(flag_values: flags.FlagValues = flags.FLAGS) -> None:
  """This program's flags (defined when it runs, never on import)."""
  fv = flag_values
  defaults = Options()
  flags.DEFINE_string("model", None, "Model directory of `python -m ccl_jax.export`.",
                      flag_values=fv)
  flags.DEFINE_enum("backend", "jax", list(loader.BACKENDS), "How the model runs (the "
                    "backends of ccl_jax.deploy.loader).", flag_values=fv)
  flags.DEFINE_string("host", "127.0.0.1", "Address to listen on; any other than a "
                      "loopback address needs a token.", flag_values=fv)
  flags.DEFINE_integer("port", 8000, "Port to listen on (0: any free port, printed).",
                       lower_bound=0, upper_bound=65535, flag_values=fv)
  flags.DEFINE_string("token", None, "Bearer token every request but the health checks "
                      f"must carry (default: ${TOKEN_ENVIRONMENT_VARIABLE}).", flag_values=fv)
  flags.DEFINE_enum("threshold", defaults.threshold_mode, ["classwise", "agnostic"],
                    "Per-group thresholds or the single class-agnostic one.", flag_values=fv)
  flags.DEFINE_integer("max_batch", defaults.max_batch, "Most images per model call.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_float("max_wait_ms", defaults.max_wait_ms, "Longest a request waits for "
                     "others to share its batch.", lower_bound=0, flag_values=fv)
  flags.DEFINE_integer("max_queue", defaults.max_queue, "Most images waiting for the "
                       "model; more get 503.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("max_request_bytes", defaults.max_request_bytes, "Largest request "
                       "body.", lower_bound=1, flag_values=fv)
  flags.DEFINE_integer("max_pixels", defaults.max_pixels, "Largest image, width x height.",
                       lower_bound=1, flag_values=fv)
  flags.DEFINE_float("request_timeout_s", defaults.request_timeout_s, "Longest time to "
                     "receive a request body, and to answer it.", lower_bound=0.001,
                     flag_values=fv)
  flags.DEFINE_integer("max_connections", 64, "Most connections at once; more get 503.",
                       lower_bound=1, flag_values=fv)
  flags.mark_flags_as_required(["model"], flag_values=fv)


def options_from_flags(flag_values: flags.FlagValues) -> Options:
  token = flag_values.token or os.environ.get(TOKEN_ENVIRONMENT_VARIABLE) or None
  check_listen(flag_values.host, token)
  return Options(max_batch=flag_values.max_batch, max_wait_ms=flag_values.max_wait_ms,
                 threshold_mode=flag_values.threshold,
                 max_request_bytes=flag_values.max_request_bytes,
                 max_pixels=flag_values.max_pixels,
                 request_timeout_s=flag_values.request_timeout_s,
                 max_queue=flag_values.max_queue, token=token)


def listen(host: str, port: int) -> socket.socket:
  """A socket bound to (host, port); port 0 picks a free one."""
  family = socket.AF_INET6 if ":" in host else socket.AF_INET
  sock = socket.socket(family, socket.SOCK_STREAM)
  sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
  sock.bind((host, port))
  return sock


def main(argv):
  if len(argv) > 1:
    raise absl_app.UsageError(f"Unexpected arguments: {argv[1:]}")
  fv = flags.FLAGS
  options = options_from_flags(fv)
  model = loader.load(fv.model, fv.backend)
  sock = listen(fv.host, fv.port)
  host, port = sock.getsockname()[:2]
  print(f"Serving {model.name} ({model.model_dir}, backend {model.backend}) on "
        f"http://{host if ':' not in host else f'[{host}]'}:{port}/", flush=True)
  server = uvicorn.Server(uvicorn.Config(create_app(model, options),
                                         limit_concurrency=fv.max_connections,
                                         timeout_keep_alive=5, log_level="info"))
  server.run(sockets=[sock])


if __name__ == "__main__":
  define_flags()
  absl_app.run(main)

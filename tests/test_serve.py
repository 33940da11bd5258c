"""`python -m ccl_jax.serve` on the exported smoke models (CCL and HierCore): its answers are
`predict --model`'s rows, its limits and token hold, hostile requests leave it unchanged,
and its page works in a real browser (headless chromium driven over the DevTools protocol)."""
from __future__ import annotations

import base64
import concurrent.futures
import contextlib
import fcntl
import html.parser
import io
import json
import os
import shutil
import socket
import struct
import subprocess
import tempfile
import threading
import time
import zlib

import httpx
import numpy as np
import pytest
from absl import flags
from fastapi.testclient import TestClient
from PIL import Image

from ccl_jax import export, predict, serve
from ccl_jax.decisions import thresholds
from ccl_jax.deploy import loader
from ccl_jax.runs.run_dir import RunDir
from ccl_jax.runs.loading import load_detector

TOKEN = "a-token-of-24-characters"
ORIGINAL_SIZE = (48, 40)  # (width, height): not the model's 32 x 32
INSTALL_CHROMIUM = ("chromium is not installed, so the serve page cannot be tested in a "
                    "browser; install it with `apt-get update && apt-get install -y chromium` "
                    "(.ci/run does this)")


def _save(image: Image.Image, path: str, form: str) -> None:
  if form == "grey16":
    Image.fromarray((np.asarray(image.convert("L"), np.uint16) * 257)).save(path)
  elif form == "grey":
    image.convert("L").save(path)
  elif form == "rgba":
    image.convert("RGBA").save(path)
  else:
    image.save(path)


# Every input form predict reads: format and colour mode / bit depth.
FORMS = (("0.png", "rgb"), ("1_grey.png", "grey"), ("2_grey16.png", "grey16"),
         ("3_alpha.png", "rgba"), ("4.jpg", "rgb"), ("5.bmp", "rgb"), ("6.tif", "rgb"),
         ("7.png", "rgb"))


@pytest.fixture(scope="module")
def served(smoke_runs, tmp_path_factory):
  """The CCL and HierCore smoke runs exported (jax) with thresholds at the median score of
  8 test images in several forms, those images, and predict --model's rows for them."""
  root = tmp_path_factory.mktemp("serve")
  _, workdirs, dataset = smoke_runs
  ccl_dir, hiercore_dir = workdirs["ccl"], workdirs["hiercore"]
  folder = root / "images"
  folder.mkdir()
  picks = np.linspace(0, len(dataset.test) - 1, len(FORMS)).astype(int)
  paths = []
  for (name, form), index in zip(FORMS, picks):
    image = Image.fromarray(dataset.test[int(index)]["image"]).resize(
        ORIGINAL_SIZE, Image.Resampling.BICUBIC)
    paths.append(str(folder / name))
    _save(image, paths[-1], form)
  models, rows, loaded = {}, {}, {}
  for kind, workdir in (("ccl", ccl_dir), ("hiercore", hiercore_dir)):
    detector = load_detector(workdir)
    groups, decision, _ = RunDir(workdir).read_decision()
    scores = np.array([r["score"] for r in predict.predict_images(detector, groups, decision,
                                                                  paths)])
    # Both decisions occur: each threshold in the middle of the images' scores.
    cutoffs = thresholds.Thresholds(per_group=np.full(groups.num_groups, np.median(scores)),
                                    agnostic=float(np.quantile(scores, 0.25)),
                                    rule="quantile", params={})
    models[kind] = str(root / f"model_{kind}")
    export.write_model(detector, groups, cutoffs, models[kind], ("jax",),
                       source={"workdir": workdir})
    flag_values = flags.FlagValues()
    predict.define_flags(flag_values)
    flag_values(["predict", f"--model={models[kind]}", f"--images={folder}",
                 f"--output={root / f'{kind}.json'}", f"--overlay_dir={root / kind}"])
    rows[kind] = {os.path.basename(r["path"]): r for r in predict.run(flag_values)}
    assert {r["decision"] for r in rows[kind].values()} == {"normal", "anomalous"}
    loaded[kind] = loader.load(models[kind])  # compiled once, shared by the apps below
  return dict(models=models, rows=rows, loaded=loaded, paths=paths, folder=str(folder))


@contextlib.contextmanager
def _client(served, kind="ccl", **options):
  options.setdefault("max_batch", 4)
  app = serve.create_app(served["loaded"][kind], serve.Options(**options))
  with TestClient(app) as client:
    _wait_until_ready(client)
    yield client


def _wait_until_ready(client):
  for _ in range(600):
    if client.get("/readyz").status_code == 200:
      return
    time.sleep(0.1)
  raise AssertionError("the server never became ready")


def _read(path: str) -> bytes:
  with open(path, "rb") as f:
    return f.read()


def _assert_row(answer: dict, row: dict) -> None:
  assert {k: answer[k] for k in ("class", "class_source", "decision")} == {
      k: row[k] for k in ("class", "class_source", "decision")}
  # The same model at another batch size: XLA's float32 sums may differ in the last bits.
  assert answer["score"] == pytest.approx(row["score"], rel=1e-5)
  assert answer["threshold"] == row["threshold"]


def _png_of(text: str) -> np.ndarray:
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(text))))


@pytest.mark.parametrize("kind", ["ccl", "hiercore"])
def test_answers_equal_the_predict_rows(served, kind):
  rows = served["rows"][kind]
  with _client(served, kind) as client:
    def ask(path, multipart):
      name = os.path.basename(path)
      if multipart:
        return name, client.post("/v1/predict", params={"overlay": "true"},
                                 files={"image": (name, _read(path))})
      return name, client.post("/v1/predict", content=_read(path),
                               headers={"Content-Type": "application/octet-stream"})
    # Concurrent, so batches of several images form.
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
      answers = list(pool.map(ask, served["paths"] * 2, [True] * 8 + [False] * 8))
  sizes = set()
  for name, answer in answers:
    assert answer.status_code == 200, answer.text
    _assert_row(answer.json(), rows[name])
    sizes.add(int(answer.headers["X-Batch-Size"]))
    if "overlay" in answer.json():
      # predict's overlay file, up to a level of rounding where a map value moved.
      got = _png_of(answer.json()["overlay"]).astype(int)
      want = np.asarray(Image.open(rows[name]["overlay"])).astype(int)
      assert got.shape == (ORIGINAL_SIZE[1], ORIGINAL_SIZE[0], 3)
      assert np.abs(got - want).max() <= 1
    else:
      assert answer.json().keys() == {"class", "class_source", "score", "threshold",
                                      "decision"}
  assert max(sizes) > 1 and max(sizes) <= 4


def test_class_name_puts_the_image_in_that_group(served):
  path = served["paths"][0]
  names = served["loaded"]["hiercore"].manifest["groups"]["names"]
  with _client(served, "hiercore") as client:
    for name in names:
      by_query = client.post("/v1/predict", params={"class_name": name}, content=_read(path),
                             headers={"Content-Type": "image/png"}).json()
      by_field = client.post("/v1/predict", data={"class_name": name},
                             files={"image": ("0.png", _read(path))}).json()
      assert by_query == by_field
      assert (by_query["class"], by_query["class_source"]) == (name, "given")
    flag_values = flags.FlagValues()
    predict.define_flags(flag_values)
    with tempfile.TemporaryDirectory() as folder:
      flag_values(["predict", f"--model={served['models']['hiercore']}", f"--images={path}",
                   f"--class_name={names[1]}", f"--output={folder}/given.csv"])
      (row,) = predict.run(flag_values)
    _assert_row(client.post("/v1/predict", params={"class_name": names[1]},
                            content=_read(path),
                            headers={"Content-Type": "image/png"}).json(), row)
    unknown = client.post("/v1/predict", params={"class_name": "nope"}, content=_read(path),
                          headers={"Content-Type": "image/png"})
    assert unknown.status_code == 400
    assert "'nope'" in unknown.json()["detail"] and names[0] in unknown.json()["detail"]


def test_model_health_and_openapi_endpoints(served):
  manifest = served["loaded"]["ccl"].manifest
  with _client(served, max_batch=3, max_wait_ms=7) as client:
    assert client.get("/healthz").json() == {"status": "ok"}
    assert client.get("/readyz").json() == {"ready": True, "batches": 0, "images": 0}
    facts = client.get("/v1/model").json()
    assert facts["model_kind"] == manifest["model_kind"]
    assert facts["image_size"] == manifest["image_size"] == 32
    assert [g["name"] for g in facts["groups"]] == manifest["groups"]["names"]
    assert [g["threshold"] for g in facts["groups"]] == manifest["thresholds"]["per_group"]
    assert facts["agnostic_threshold"] == manifest["thresholds"]["agnostic"]
    assert facts["versions"] == manifest["versions"]
    assert facts["batching"] == {"max_batch": 3, "max_wait_ms": 7}
    assert facts["precision"] == manifest["precision"] == "f32" and facts["token_required"] is False
    spec = client.get("/openapi.json").json()
    assert set(spec["paths"]) == {"/", "/healthz", "/readyz", "/v1/model", "/v1/predict"}
    post = spec["paths"]["/v1/predict"]["post"]
    content = post["requestBody"]["content"]
    assert set(content) == {*serve.RAW_CONTENT_TYPES, "multipart/form-data"}
    assert content["multipart/form-data"]["schema"]["required"] == ["image"]
    assert {p["name"] for p in post["parameters"]} == {"class_name", "overlay"}
    assert set(post["responses"]) == {"200", "400", "408", "413", "415", "422", "503"}
    prediction = spec["components"]["schemas"]["Prediction"]["properties"]
    assert set(prediction) == {"class", "class_source", "score", "threshold", "decision",
                               "overlay"}
    assert "groups" in spec["components"]["schemas"]["ModelFacts"]["properties"]
    assert "securitySchemes" not in spec.get("components", {})
  # The batch sizes the model is compiled for: 1, 2 and the largest.
  assert serve.batch_sizes(3) == (1, 2, 3) and serve.batch_sizes(16) == (1, 2, 4, 8, 16)


def test_a_token_guards_everything_but_the_health_checks_and_the_page(served):
  image = _read(served["paths"][0])
  with _client(served, token=TOKEN) as client:
    guarded = [("get", "/v1/model", {}), ("get", "/openapi.json", {}),
               ("post", "/v1/predict", {"content": image,
                                        "headers": {"Content-Type": "image/png"}})]
    for method, path, kwargs in guarded:
      for headers in ({}, {"Authorization": "Bearer wrong-token-of-24-chars"},
                      {"Authorization": f"Basic {TOKEN}"}):
        kwargs_with = {**kwargs, "headers": {**kwargs.get("headers", {}), **headers}}
        answer = getattr(client, method)(path, **kwargs_with)
        assert answer.status_code == 401, (path, headers)
        assert answer.headers["WWW-Authenticate"] == "Bearer"
      kwargs_with = {**kwargs, "headers": {**kwargs.get("headers", {}),
                                           "Authorization": f"Bearer {TOKEN}"}}
      assert getattr(client, method)(path, **kwargs_with).status_code == 200, path
    for path in ("/healthz", "/readyz", "/"):
      assert client.get(path).status_code == 200
    spec = client.get("/openapi.json", headers={"Authorization": f"Bearer {TOKEN}"}).json()
    assert spec["paths"]["/v1/predict"]["post"]["security"] == [{"HTTPBearer": []}]
    assert "401" in spec["paths"]["/v1/predict"]["post"]["responses"]
  with pytest.raises(ValueError, match="at least 16 characters"):
    serve.Options(token="short")


def test_listening_beyond_this_machine_needs_a_token(monkeypatch):
  def options(*args):
    flag_values = flags.FlagValues()
    serve.define_flags(flag_values)
    flag_values(["serve", "--model=unused", *args])
    return serve.options_from_flags(flag_values)
  monkeypatch.delenv(serve.TOKEN_ENVIRONMENT_VARIABLE, raising=False)
  for host in ("127.0.0.1", "::1", "localhost", "127.0.0.2"):
    assert options(f"--host={host}").token is None
  for host in ("0.0.0.0", "::", "192.168.1.10", "line-pc.example"):
    with pytest.raises(ValueError, match=f"--host '{host}'.*--token.*CCL_JAX_SERVE_TOKEN"):
      options(f"--host={host}")
  assert options("--host=0.0.0.0", f"--token={TOKEN}").token == TOKEN
  monkeypatch.setenv(serve.TOKEN_ENVIRONMENT_VARIABLE, TOKEN)
  assert options("--host=0.0.0.0").token == TOKEN
  assert options().token == TOKEN  # a token given on loopback is required too
  flag_values = flags.FlagValues()
  serve.define_flags(flag_values)
  assert flag_values["backend"].parser.enum_values == list(loader.BACKENDS)
  assert flag_values["host"].default == "127.0.0.1"


def _png_header(width: int, height: int) -> bytes:
  """A PNG of one grey row claiming `width` x `height` pixels (a decompression bomb's
  header: decoding it would allocate width x height bytes)."""
  def chunk(kind, data):
    return (struct.pack(">I", len(data)) + kind + data
            + struct.pack(">I", zlib.crc32(kind + data)))
  return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", width, height, 8, 0,
                                                            0, 0, 0))
          + chunk(b"IDAT", zlib.compress(b"\0" * (width + 1))) + chunk(b"IEND", b""))


def test_limits_answer_413(served):
  image = _read(served["paths"][0])
  with _client(served, max_request_bytes=len(image) - 1, max_pixels=48 * 40 - 1) as client:
    declared = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
    assert declared.status_code == 413 and "--max_request_bytes" in declared.json()["detail"]
    # A chunked body (no Content-Length) is counted as it arrives.
    streamed = client.post("/v1/predict", content=iter([image[:100], image[100:]]),
                           headers={"Content-Type": "image/png"})
    assert streamed.status_code == 413 and "--max_request_bytes" in streamed.json()["detail"]
  with _client(served, max_pixels=48 * 40 - 1) as client:
    answer = client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
    assert answer.status_code == 413
    assert answer.json()["detail"] == ("the request body is 48 x 40 = 1920 pixels; this "
                                       "server accepts up to 1919 (--max_pixels).")
  with _client(served) as client:  # the default limits
    for width, height in ((8000, 6000), (100_000, 100_000)):
      answer = client.post("/v1/predict", content=_png_header(width, height),
                           headers={"Content-Type": "image/png"})
      assert answer.status_code == 413, answer.text
      assert f"{width * height}" in answer.json()["detail"]


class _SlowModel:
  """The model, with `delay` seconds added to each scoring call once it is set."""

  def __init__(self, model):
    self.model, self.delay = model, 0.0

  def __getattr__(self, name):
    return getattr(self.model, name)

  def score(self, images, group_ids):
    time.sleep(self.delay)
    return self.model.score(images, group_ids)


def test_a_late_answer_or_a_full_queue_gives_503_and_the_server_recovers(served):
  model = _SlowModel(served["loaded"]["ccl"])
  image = _read(served["paths"][0])
  app = serve.create_app(model, serve.Options(max_batch=1, max_queue=2,
                                              request_timeout_s=0.5))
  with TestClient(app) as client:
    _wait_until_ready(client)

    def ask(_):
      return client.post("/v1/predict", content=image, headers={"Content-Type": "image/png"})
    model.delay = 0.3
    with concurrent.futures.ThreadPoolExecutor(12) as pool:
      codes = [a.status_code for a in pool.map(ask, range(12))]
    assert set(codes) == {200, 503} and codes.count(200) >= 1, codes
    model.delay = 0.0
    time.sleep(1.0)  # the queue drains
    answer = ask(0)
    assert answer.status_code == 200
    _assert_row(answer.json(), served["rows"]["ccl"]["0.png"])
    model.delay = 0.8
    late = ask(0)
    assert late.status_code == 503 and "--request_timeout_s" in late.json()["detail"]
    assert late.headers["Retry-After"] == "1"
    model.delay = 0.0
    assert client.get("/readyz").json()["ready"] is True


def test_hostile_requests_leave_the_server_unchanged(served, tmp_path):
  good = _read(served["paths"][0])
  gif, float_tiff = io.BytesIO(), io.BytesIO()
  Image.new("RGB", (8, 8)).save(gif, "GIF")
  Image.fromarray(np.zeros((8, 8), np.float32)).save(float_tiff, "TIFF")
  png = {"Content-Type": "image/png"}
  hostile = [  # (request, status, words of the answer)
      (dict(content=good[:len(good) // 2], headers=png), 400, "truncated"),
      (dict(content=b"just some text, no image", headers=png), 400, "not an image"),
      (dict(content=b"", headers=png), 400, "is empty"),
      (dict(content=gif.getvalue(), headers=png), 415, "GIF image"),
      (dict(content=float_tiff.getvalue(), headers={"Content-Type": "image/tiff"}), 400,
       "32-bit float"),
      (dict(content=good, headers={"Content-Type": "application/json"}), 415,
       "'application/json' is not accepted"),
      (dict(content=good, headers={"Content-Type": "text/plain"}), 415, "image/png"),
      (dict(content=good, headers={}), 415, "(none)"),
      (dict(files={"picture": ("0.png", good)}), 400, "no file field 'image'"),
      (dict(files=[("image", ("0.png", good)), ("image", ("1.png", good))]), 400,
       "Malformed multipart"),
      (dict(content=b"--x\r\nnot multipart", headers={
          "Content-Type": "multipart/form-data; boundary=zzz"}), 400, "Malformed multipart"),
      (dict(content=good, headers=png, params={"overlay": "maybe"}), 422, "bool"),
  ]
  with _client(served) as client:
    before = client.post("/v1/predict", content=good, headers=png).json()
    images_scored = client.get("/readyz").json()["images"]
    for request, status, words in hostile:
      answer = client.post("/v1/predict", **request)
      assert answer.status_code == status, (request.get("headers"), answer.text)
      assert words in json.dumps(answer.json()), answer.text
    # Nothing of them reached the model, and it answers as before.
    assert client.get("/readyz").json()["images"] == images_scored
    assert client.post("/v1/predict", content=good, headers=png).json() == before
    assert client.get("/healthz").status_code == 200


def test_a_flood_within_the_bounds_is_answered_in_batches(served):
  rows = served["rows"]["ccl"]
  names = [os.path.basename(p) for p in served["paths"]] * 6
  with _client(served, max_batch=8, max_wait_ms=20, max_queue=64) as client:
    def ask(name):
      return client.post("/v1/predict", content=_read(os.path.join(served["folder"], name)),
                         headers={"Content-Type": "image/png"})
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
      answers = list(pool.map(ask, names))
    for name, answer in zip(names, answers):
      assert answer.status_code == 200
      _assert_row(answer.json(), rows[name])
    sizes = [int(a.headers["X-Batch-Size"]) for a in answers]
    assert max(sizes) <= 8 and np.mean(sizes) > 2
    ready = client.get("/readyz").json()
    assert ready["images"] == len(names) and ready["batches"] < len(names) / 2


# ---------------------------------------------------------------- a real server and browser

@pytest.fixture(scope="module")
def live_server(served):
  """The CCL model behind uvicorn on 127.0.0.1, an ephemeral port; its base URL."""
  import uvicorn  # pylint: disable=import-outside-toplevel
  sock = serve.listen("127.0.0.1", 0)
  port = sock.getsockname()[1]
  app = serve.create_app(served["loaded"]["ccl"],
                         serve.Options(max_batch=4, request_timeout_s=2.0))
  server = uvicorn.Server(uvicorn.Config(app, log_level="warning"))
  thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
  thread.start()
  url = f"http://127.0.0.1:{port}"
  for _ in range(600):
    with contextlib.suppress(httpx.HTTPError):
      if httpx.get(url + "/readyz").status_code == 200:
        break
    time.sleep(0.1)
  yield url
  server.should_exit = True
  thread.join(30)


def test_a_real_server_answers_and_times_out_a_slow_body(served, live_server):
  path = served["paths"][3]
  answer = httpx.post(live_server + "/v1/predict", files={"image": ("3.png", _read(path))})
  assert answer.status_code == 200
  _assert_row(answer.json(), served["rows"]["ccl"]["3_alpha.png"])
  port = int(live_server.rsplit(":", 1)[1])
  with socket.create_connection(("127.0.0.1", port), timeout=10) as conn:
    conn.sendall(b"POST /v1/predict HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                 b"Content-Length: 1000\r\n\r\n" + _read(path)[:100])
    reply = conn.recv(4096).decode()
  assert reply.startswith("HTTP/1.1 408") and "--request_timeout_s" in reply
  assert httpx.get(live_server + "/readyz").json()["ready"] is True


class _Browser:
  """Headless chromium driven over the DevTools protocol on a pipe (--remote-debugging-pipe:
  JSON messages ended by a NUL byte, commands on its fd 3, answers on its fd 4)."""

  def __init__(self, profile: str):
    binary = shutil.which("chromium")
    if binary is None:
      pytest.fail(INSTALL_CHROMIUM)

    def high(fd):  # away from 3 and 4, which the child's fds become
      moved = fcntl.fcntl(fd, fcntl.F_DUPFD, 10)
      os.close(fd)
      return moved
    commands_read, self._commands = map(high, os.pipe())
    self._answers, answers_write = map(high, os.pipe())
    self.process = subprocess.Popen(
        ["bash", "-c", f"exec 3<&{commands_read} 4>&{answers_write} {commands_read}<&- "
         f"{answers_write}>&- && exec {binary} --headless --no-sandbox --disable-gpu "
         f"--remote-debugging-pipe --user-data-dir={profile} about:blank"],
        pass_fds=(commands_read, answers_write), stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE)
    os.close(commands_read)
    os.close(answers_write)
    self._next_id, self._buffer, self.session = 0, b"", None

  def send(self, method: str, **params):
    self._next_id += 1
    message = {"id": self._next_id, "method": method, "params": params}
    if self.session:
      message["sessionId"] = self.session
    os.write(self._commands, json.dumps(message).encode() + b"\0")
    while True:
      while b"\0" in self._buffer:
        text, self._buffer = self._buffer.split(b"\0", 1)
        answer = json.loads(text)
        if answer.get("id") == self._next_id:
          assert "error" not in answer, answer
          return answer["result"]
      chunk = os.read(self._answers, 1 << 20)
      assert chunk, f"chromium stopped: {self.process.stderr.read().decode()[-2000:]}"
      self._buffer += chunk

  def open(self, url: str) -> None:
    target = self.send("Target.createTarget", url="about:blank")["targetId"]
    self.session = self.send("Target.attachToTarget", targetId=target,
                             flatten=True)["sessionId"]
    self.send("Page.navigate", url=url)

  def evaluate(self, expression: str):
    return self.send("Runtime.evaluate", expression=expression,
                     returnByValue=True)["result"].get("value")

  def wait_for(self, expression: str, timeout: float = 60):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
      value = self.evaluate(expression)
      if value:
        return value
      time.sleep(0.1)
    raise AssertionError(f"the page never satisfied {expression}")

  def close(self) -> None:
    with contextlib.suppress(Exception):
      self.session = None
      self.send("Browser.close")
    self.process.wait(30)
    os.close(self._commands)
    os.close(self._answers)


class _Links(html.parser.HTMLParser):
  def __init__(self):
    super().__init__()
    self.external = []

  def handle_starttag(self, tag, attrs):
    self.external += [v for k, v in attrs if k in ("src", "href") and v
                      and not v.startswith(("data:", "#"))]


def test_the_page_uploads_images_and_shows_their_decisions(served, live_server, tmp_path):
  page = httpx.get(live_server + "/").text
  links = _Links()
  links.feed(page)
  assert not links.external and "http://" not in page and "https://" not in page
  rows = served["rows"]["ccl"]
  files = [p for p in served["paths"] if os.path.basename(p) in ("1_grey.png", "4.jpg",
                                                                 "6.tif")]
  assert {rows[os.path.basename(p)]["decision"] for p in served["paths"]} == {
      "normal", "anomalous"}
  browser = _Browser(str(tmp_path / "profile"))
  try:
    browser.open(live_server + "/")
    kind = browser.wait_for("document.getElementById('model').dataset.loaded")
    assert kind == served["loaded"]["ccl"].name
    facts = browser.evaluate("document.getElementById('model').textContent")
    for name in served["loaded"]["ccl"].manifest["groups"]["names"]:
      assert name in facts
    # A real upload: the file input gets the files as a user picking them would.
    document = browser.send("DOM.getDocument")["root"]["nodeId"]
    node = browser.send("DOM.querySelector", nodeId=document, selector="#files")["nodeId"]
    browser.send("DOM.setFileInputFiles", files=files, nodeId=node)
    cards = browser.wait_for(
        "(() => { const cards = [...document.querySelectorAll('.result')];"
        " if (cards.length < 3 || cards.some(c => c.dataset.decision === 'pending' ||"
        " (c.dataset.decision !== 'error' && !(c.querySelector('img') &&"
        " c.querySelector('img').complete))))"
        " return null;"
        " return cards.map(c => ({name: c.querySelector('.name').textContent,"
        " decision: c.dataset.decision, score: Number(c.dataset.score),"
        " text: c.textContent,"
        " width: c.querySelector('img') ? c.querySelector('img').naturalWidth : 0,"
        " height: c.querySelector('img') ? c.querySelector('img').naturalHeight : 0})); })()")
    screenshot = base64.b64decode(browser.send("Page.captureScreenshot")["data"])
  finally:
    browser.close()
  assert sorted(c["name"] for c in cards) == sorted(os.path.basename(p) for p in files)
  for card in cards:
    row = rows[card["name"]]
    assert card["decision"] == row["decision"], card["text"]
    assert card["score"] == pytest.approx(row["score"], rel=1e-5)
    assert f"{row['threshold']:.4g}"[:4] in card["text"]
    assert (card["width"], card["height"]) == ORIGINAL_SIZE  # the overlay image, shown
  pixels = np.asarray(Image.open(io.BytesIO(screenshot)).convert("RGB"))
  assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 100

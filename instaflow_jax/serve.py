r"""A live text-to-image page: the image follows the prompt as you type.

  python -m instaflow_jax.serve --model=PATH [--port=7860] [--host=127.0.0.1] \
      [--stage=NAME] [--params=ema|raw] [--lora=FILE --lora_scale=1]

--model: what generate takes (a diffusers folder, or a workdir, stage directory, params/ or
checkpoints/STEP of ours). Open http://HOST:PORT/ : a prompt box, seed, steps and guidance;
every change regenerates the image (a one-step model takes milliseconds), and the page
shows the time per image. --port=0 takes a free port; the line `serving on URL` says which.

The page's API, for programs: POST /api/generate with the JSON {"prompt": str, "seed": int,
"steps": int, "guidance": float} answers {"image": "data:image/png;base64,...",
"ms": generation time in milliseconds, "width", "height"}; a bad request answers 400 with
{"error": "..."}. One image is generated at a time; the programs for 1, 2 and 4 steps are
compiled before the server starts.
"""
import base64
import http.server
import io
import json
import threading
import time
from typing import Sequence

import numpy as np
from absl import flags
from PIL import Image

from instaflow_jax import cli
from instaflow_jax import generate
from instaflow_jax import huge_pages
from instaflow_jax import images as image_io
from instaflow_jax import pipeline as pipeline_lib

FLAGS = flags.FlagValues()
_MODEL = generate.ModelFlags.define(FLAGS)
_HOST = flags.DEFINE_string('host', '127.0.0.1', 'The address to listen on.', flag_values=FLAGS)
_PORT = flags.DEFINE_integer('port', 7860, 'The port (0: a free one).', lower_bound=0,
                             upper_bound=65535, flag_values=FLAGS)
flags.mark_flags_as_required(['model'], flag_values=FLAGS)

MAX_STEPS = 50
WARM_STEPS = (1, 2, 4)
# Small models' images are shown enlarged to at least this many pixels a side.
DISPLAY_SIZE = 256


def _request_settings(body: dict) -> dict:
  """The generation settings of an API request; ValueError for a bad one."""
  prompt = body.get('prompt', '')
  if not isinstance(prompt, str):
    raise ValueError('prompt must be a string')
  settings = {'prompt': prompt}
  for name, kind, low, high in (('seed', int, 0, 2 ** 31 - 1), ('steps', int, 1, MAX_STEPS),
                                ('guidance', float, 0.0, 30.0)):
    value = body.get(name, {'seed': 0, 'steps': 1, 'guidance': 0.0}[name])
    if isinstance(value, bool) or not isinstance(value, (int, float)) or (
        kind is int and value != int(value)) or not low <= value <= high:
      raise ValueError(f'{name} must be a number in [{low}, {high}]'
                       + (' (a whole number)' if kind is int else ''))
    settings[name] = kind(value)
  return settings


def png_data_url(image: np.ndarray) -> str:
  buffer = io.BytesIO()
  Image.fromarray(image_io.to_uint8(image)).save(buffer, format='PNG')
  return 'data:image/png;base64,' + base64.b64encode(buffer.getvalue()).decode('ascii')


class Generator:
  """The pipeline behind the page: one generation at a time (JAX calls from the server's
  threads are serialised), each timed on its own."""

  def __init__(self, pipe: pipeline_lib.Pipeline):
    self.pipe = pipe
    self._lock = threading.Lock()

  def warm_up(self) -> None:
    for steps in WARM_STEPS:
      self.pipe.generate([''], num_inference_steps=steps)

  def generate(self, prompt: str, seed: int, steps: int, guidance: float) -> dict:
    with self._lock:
      began = time.perf_counter()
      image = self.pipe.generate([prompt], num_inference_steps=steps, guidance_scale=guidance,
                                 seed=seed)[0]
      seconds = time.perf_counter() - began
    return {'image': png_data_url(image), 'ms': round(1000 * seconds, 2),
            'width': int(image.shape[1]), 'height': int(image.shape[0])}


PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>instaflow_jax</title>
<style>
 body { font-family: sans-serif; margin: 16px; }
 #controls { display: flex; gap: 12px; align-items: center; height: 40px; }
 #prompt { width: 360px; font-size: 16px; }
 label { white-space: nowrap; }
 #seed, #steps, #guidance { width: 64px; }
 #result { position: absolute; top: 72px; left: 16px; width: SIZEpx; height: SIZEpx;
           image-rendering: pixelated; background: #eee; }
 #time { position: absolute; top: calc(80px + SIZEpx); left: 16px; }
</style></head>
<body>
<div id="controls">
 <input id="prompt" placeholder="a prompt" value="">
 <label>seed <input id="seed" type="number" value="0" min="0"></label>
 <label>steps <input id="steps" type="number" value="1" min="1" max="MAX_STEPS"></label>
 <label>guidance <input id="guidance" type="number" value="0" min="0" step="0.5"></label>
</div>
<img id="result" alt="">
<div id="time">&nbsp;</div>
<script>
const field = id => document.getElementById(id);
const query = new URLSearchParams(location.search);
for (const id of ['prompt', 'seed', 'steps', 'guidance'])
  if (query.has(id)) field(id).value = query.get(id);
let latest = 0;
async function regenerate() {
  const request = ++latest;
  const body = {prompt: field('prompt').value, seed: Number(field('seed').value),
                steps: Number(field('steps').value), guidance: Number(field('guidance').value)};
  const response = await fetch('/api/generate', {method: 'POST', body: JSON.stringify(body)});
  const answer = await response.json();
  if (request !== latest) return;  // a newer prompt is on its way
  if (!response.ok) { field('time').textContent = 'error: ' + answer.error; return; }
  field('result').src = answer.image;
  field('time').textContent = answer.ms.toFixed(1) + ' ms / image (' + answer.width + 'x' +
                              answer.height + ', ' + body.steps + ' step' +
                              (body.steps > 1 ? 's' : '') + ')';
}
for (const id of ['prompt', 'seed', 'steps', 'guidance'])
  field(id).addEventListener('input', regenerate);
regenerate();
</script>
</body></html>
"""


def page(image_size: int) -> bytes:
  """The page, the image shown at a whole multiple of its size (crisp pixels)."""
  shown = image_size * max(1, -(-DISPLAY_SIZE // image_size))
  return PAGE.replace('SIZE', str(shown)).replace('MAX_STEPS', str(MAX_STEPS)).encode()


class Handler(http.server.BaseHTTPRequestHandler):
  """GET / (the page) and POST /api/generate; `generator` and `page_bytes` are bound."""
  generator: Generator = None
  page_bytes: bytes = b''

  def _send(self, status: int, body: bytes, content_type: str) -> None:
    self.send_response(status)
    self.send_header('Content-Type', content_type)
    self.send_header('Content-Length', str(len(body)))
    self.end_headers()
    self.wfile.write(body)

  def _json(self, status: int, data: dict) -> None:
    self._send(status, json.dumps(data).encode(), 'application/json')

  def do_GET(self):  # noqa: N802 (http.server's name)
    if self.path.split('?')[0] == '/':
      self._send(200, self.page_bytes, 'text/html; charset=utf-8')
    else:
      self._json(404, {'error': f'no page {self.path}; the page is / and the API /api/generate'})

  def do_POST(self):  # noqa: N802
    if self.path != '/api/generate':
      self._json(404, {'error': f'no API {self.path}; POST /api/generate'})
      return
    try:
      body = json.loads(self.rfile.read(int(self.headers.get('Content-Length', 0))) or b'{}')
      if not isinstance(body, dict):
        raise ValueError('the body must be a JSON object')
      settings = _request_settings(body)
    except (ValueError, json.JSONDecodeError) as e:
      self._json(400, {'error': str(e)})
      return
    self._json(200, self.generator.generate(**settings))

  def log_message(self, format, *args):  # one line per request is noise at typing speed
    pass


def make_server(pipe: pipeline_lib.Pipeline, host: str, port: int) -> http.server.HTTPServer:
  """The server (not yet serving) of the page and API for `pipe`, warmed up."""
  generator = Generator(pipe)
  generator.warm_up()
  handler = type('BoundHandler', (Handler,), dict(generator=generator,
                                                  page_bytes=page(pipe.default_size)))
  return http.server.ThreadingHTTPServer((host, port), handler)


def serve_from_flags() -> None:
  pipe = _MODEL.load(_MODEL.source())
  try:
    server = make_server(pipe, _HOST.value, _PORT.value)
  except OSError as e:
    raise OSError(f'--host={_HOST.value} --port={_PORT.value}: cannot listen ({e.strerror or e}); '
                  'give another port') from None
  host, port = server.server_address[:2]
  print(f'serving on http://{host}:{port}/', flush=True)
  try:
    server.serve_forever()
  except KeyboardInterrupt:
    pass
  finally:
    server.server_close()


def main(argv: Sequence[str]) -> None:
  cli.run_command(FLAGS, argv, serve_from_flags)


if __name__ == '__main__':
  huge_pages.restart_with_huge_pages()
  cli.run_main(main)

"""`python -m instaflow_jax.serve`: the live page's server started as a user starts it, its
HTTP API, and the page in a headless browser (Debian's chromium), whose screenshot must
show the image the API gives.

  python -m tests.test_serve MODEL PROMPT STEPS OUT.png   # the screenshot of docs/serve_demo.png
"""
import base64
import io
import json
import os
import subprocess
import sys
import tempfile
import urllib.error
import urllib.parse
import urllib.request

import numpy as np
import pytest
from PIL import Image

from instaflow_jax import serve
from tests import runs
from tests import tiny_models

PROMPT = 'a red dot'
# The page's image: its top-left corner and shown size, as serve.PAGE places it.
IMAGE_TOP, IMAGE_LEFT = 72, 16
WINDOW = (640, 420)


class Server:
  """`python -m instaflow_jax.serve --model=MODEL --port=0`, running until closed."""

  def __init__(self, model: str, *flags):
    self.process = subprocess.Popen(
        [sys.executable, '-m', 'instaflow_jax.serve', f'--model={model}', '--port=0', *flags],
        cwd=runs.REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    line = self.process.stdout.readline()
    if not line.startswith('serving on '):
      self.process.kill()
      raise RuntimeError(f'the server did not start: {line}{self.process.stderr.read()[-3000:]}')
    self.url = line.split()[-1]

  def post(self, body: dict):
    request = urllib.request.Request(self.url + 'api/generate', data=json.dumps(body).encode(),
                                     method='POST')
    try:
      with urllib.request.urlopen(request, timeout=300) as response:
        return response.status, json.loads(response.read())
    except urllib.error.HTTPError as e:
      return e.code, json.loads(e.read())

  def close(self):
    self.process.terminate()
    self.process.wait(timeout=60)


def decode_image(data_url: str) -> np.ndarray:
  assert data_url.startswith('data:image/png;base64,')
  return np.asarray(Image.open(io.BytesIO(base64.b64decode(data_url.split(',', 1)[1]))),
                    np.int32)


def screenshot(url: str, path: str) -> np.ndarray:
  """The page at `url` as headless chromium shows it once its requests are answered."""
  with tempfile.TemporaryDirectory() as profile:
    subprocess.run(
        ['chromium', '--headless', '--no-sandbox', '--disable-gpu', '--hide-scrollbars',
         f'--user-data-dir={profile}', '--force-device-scale-factor=1',
         f'--window-size={WINDOW[0]},{WINDOW[1]}', '--virtual-time-budget=60000',
         f'--screenshot={path}', url],
        check=True, capture_output=True, timeout=300)
  return np.asarray(Image.open(path).convert('RGB'), np.int32)


def shown_image(shot: np.ndarray, size: int) -> np.ndarray:
  """The page's image in a screenshot, back at its own size (each shown pixel's centre)."""
  scale = -(-serve.DISPLAY_SIZE // size)
  centres = np.arange(size) * scale + scale // 2
  return shot[IMAGE_TOP + centres][:, IMAGE_LEFT + centres]


@pytest.fixture(scope='module')
def server(tmp_path_factory):
  folder = str(tmp_path_factory.mktemp('tiny_flow'))
  tiny_models.write_tiny_pipeline(folder)
  running = Server(folder)
  yield running
  running.close()


def test_api_answers_with_an_image_and_its_time(server):
  status, answer = server.post({'prompt': PROMPT, 'seed': 3, 'steps': 2, 'guidance': 0})
  assert status == 200, answer
  image = decode_image(answer['image'])
  assert image.shape == (16, 16, 3) and image.std() > 2
  assert answer['width'] == answer['height'] == 16 and 0 < answer['ms'] < 60_000
  again = decode_image(server.post({'prompt': PROMPT, 'seed': 3, 'steps': 2})[1]['image'])
  np.testing.assert_array_equal(again, image)
  other = decode_image(server.post({'prompt': 'two blue cubes', 'seed': 3, 'steps': 2})[1]['image'])
  assert np.abs(other - image).max() > 0, 'the prompt changes nothing'


@pytest.mark.parametrize('body,message', [
    ({'prompt': 3}, 'prompt must be a string'),
    ({'prompt': 'a', 'steps': 0}, r'steps must be a number in [1, 50] (a whole number)'),
    ({'prompt': 'a', 'seed': 'x'}, 'seed must be a number in')])
def test_bad_requests_are_refused(server, body, message):
  status, answer = server.post(body)
  assert status == 400 and answer['error'].startswith(message), answer


def test_browser_shows_the_generated_image(server, tmp_path):
  expected = decode_image(server.post({'prompt': PROMPT, 'seed': 5, 'steps': 1})[1]['image'])
  url = server.url + '?' + urllib.parse.urlencode({'prompt': PROMPT, 'seed': 5, 'steps': 1})
  shot = screenshot(url, str(tmp_path / 'page.png'))
  assert shot.shape[:2] == (WINDOW[1], WINDOW[0])
  # Colour management may move a level or two.
  assert np.abs(shown_image(shot, 16) - expected).max() <= 3


@pytest.mark.slow
def test_starts_on_the_embedded_default_workdir(quick_chain):
  running = Server(quick_chain)
  try:
    status, answer = running.post({'prompt': 'a red circle', 'seed': 0, 'steps': 1})
  finally:
    running.close()
  assert status == 200 and decode_image(answer['image']).shape == (16, 16, 3)


def test_unknown_model_is_one_line(tmp_path):
  result = subprocess.run([sys.executable, '-m', 'instaflow_jax.serve',
                           f'--model={tmp_path}/missing', '--port=0'], cwd=runs.REPO,
                          capture_output=True, text=True, timeout=300)
  assert result.returncode == 1
  assert result.stderr.strip().splitlines()[-1].startswith('error: ')
  assert 'missing' in result.stderr.strip().splitlines()[-1]


if __name__ == '__main__':
  model, prompt, steps, out = sys.argv[1:5]
  running = Server(model)
  try:
    size = decode_image(running.post({'prompt': prompt})[1]['image']).shape[0]
    screenshot(running.url + '?' + urllib.parse.urlencode({'prompt': prompt, 'steps': steps}),
               out)
  finally:
    running.close()
  print(f'wrote {out} ({size}x{size} image shown)')

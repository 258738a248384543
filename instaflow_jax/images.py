"""Image grids, PNG files, and the conversions of pixel values."""
import math
import os

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, columns: int = None, pad: int = 1) -> np.ndarray:
  """[N, H, W, C] images in [0, 1] -> one [rows*(H+pad)+pad, cols*(W+pad)+pad, C] grid."""
  images = np.asarray(images, np.float32)
  n, h, w, c = images.shape
  columns = columns or math.ceil(math.sqrt(n))
  rows = math.ceil(n / columns)
  grid = np.ones((rows * (h + pad) + pad, columns * (w + pad) + pad, c), np.float32)
  for i, image in enumerate(images):
    r, col = divmod(i, columns)
    top, left = pad + r * (h + pad), pad + col * (w + pad)
    grid[top:top + h, left:left + w] = image
  return grid


def labelled_rows(rows, upscale: int = 1, label_width: int = 150, pad: int = 2) -> np.ndarray:
  """[(label, images [N, H, W, 3] in [0, 1]), ...] -> one image: a row of images per label,
  enlarged `upscale` times (nearest), with the label written to the left of its row."""
  from PIL import ImageDraw
  strips = [make_grid(np.asarray(images).repeat(upscale, 1).repeat(upscale, 2),
                      columns=len(images), pad=pad) for _, images in rows]
  height, width = strips[0].shape[:2]
  canvas = np.ones((height * len(strips), label_width + width, 3), np.float32)
  for r, strip in enumerate(strips):
    canvas[r * height:(r + 1) * height, label_width:label_width + strip.shape[1]] = strip
  picture = Image.fromarray(to_uint8(canvas))
  draw = ImageDraw.Draw(picture)
  for r, (label, _) in enumerate(rows):
    draw.text((4, r * height + height // 2 - 6), label, fill=(0, 0, 0))
  return np.asarray(picture, np.float32) / 255.0


def to_uint8(image: np.ndarray) -> np.ndarray:
  return (np.clip(np.asarray(image, np.float32), 0.0, 1.0) * 255.0 + 0.5).astype(np.uint8)


def to_unit_range(pixels):
  """uint8 pixels -> float32 in [0, 1] (numpy or jax arrays)."""
  return pixels.astype(np.float32) / 255.0


def to_model_range(pixels):
  """uint8 pixels -> float32 in [-1, 1], the range the autoencoder encodes (numpy or jax
  arrays: the input pipeline keeps images uint8, and the jitted step converts them)."""
  return pixels.astype(np.float32) / 127.5 - 1.0


def save_png(path: str, image: np.ndarray, upscale: int = 1) -> None:
  """Writes an [H, W, 3] image in [0, 1] atomically, optionally enlarged (nearest)."""
  pixels = to_uint8(image)
  if upscale > 1:
    pixels = pixels.repeat(upscale, axis=0).repeat(upscale, axis=1)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = path + '.tmp.png'
  Image.fromarray(pixels).save(tmp)
  os.replace(tmp, path)


def read_image(path: str) -> Image.Image:
  """An image file as RGB; ValueError naming the file when it is none that PIL reads."""
  if not os.path.isfile(path):
    raise OSError(f'{path}: file not found')
  try:
    with Image.open(path) as image:
      return image.convert('RGB')
  except (OSError, Image.DecompressionBombError) as e:
    raise ValueError(f'{path}: not an image ({e}); give a PNG or JPEG file') from None


def resized_pixels(image: Image.Image, size: int) -> np.ndarray:
  """An RGB image -> float32 [size, size, 3] in [0, 1] (bicubic resize)."""
  return to_unit_range(np.asarray(image.resize((size, size), Image.BICUBIC)))

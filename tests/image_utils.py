"""Test images and a local HTTP server for the image tests.

No installed package ships a real photograph (matplotlib, scipy and scikit-image are absent; the
JPEGs elsewhere on a machine are not ours to rely on), so `natural_photo_jpeg` synthesises one
deterministically: a landscape of sky, clouds, two mountain ridges and a meadow from fractal
(1/f) noise, with sensor noise and vignetting, saved as a camera would save it (baseline JPEG,
4:2:0 chroma subsampling, an EXIF block naming a camera).
"""

from __future__ import annotations

import base64
import http.server
import io
import struct
import threading
import time
import zlib
from collections.abc import Callable

import numpy as np
from PIL import Image


def encode(image: Image.Image, fmt: str = "PNG", **params) -> bytes:
    out = io.BytesIO()
    image.save(out, fmt, **params)
    return out.getvalue()


def data_url(data: bytes, mime: str = "image/png") -> str:
    return f"data:{mime};base64,{base64.b64encode(data).decode()}"


def _fractal(rng: np.random.Generator, height: int, width: int, octaves: int = 7,
             persistence: float = 0.55) -> np.ndarray:  # fmt: skip
    """[height, width] noise in [0, 1] with a 1/f-like spectrum (octaves of bicubic noise)."""
    total = np.zeros((height, width), np.float32)
    amplitude, norm = 1.0, 0.0
    for octave in range(octaves):
        cells = 2 ** (octave + 1)
        coarse = rng.random((max(2, cells * height // width), cells), dtype=np.float32)
        layer = Image.fromarray(coarse, mode="F").resize((width, height), Image.Resampling.BICUBIC)
        total += amplitude * np.asarray(layer)
        norm += amplitude
        amplitude *= persistence
    total /= norm
    return (total - total.min()) / (total.max() - total.min())


def natural_photo(width: int = 1024, height: int = 768, seed: int = 7) -> Image.Image:
    rng = np.random.default_rng(seed)
    rows = np.linspace(0.0, 1.0, height, dtype=np.float32)[:, None]
    # Sky: deep blue overhead to haze at the horizon, with clouds.
    sky = (1 - rows) * np.array([70, 120, 200]) + rows * np.array([200, 215, 230])
    sky = np.broadcast_to(sky[:, None, :], (height, width, 3)).copy()
    clouds = np.clip((_fractal(rng, height, width) - 0.55) * 2.5, 0, 1)[..., None]
    image = sky * (1 - clouds) + np.array([245, 245, 248]) * clouds
    # Two ridges: far (blue-grey, hazy) and near (green-brown), each a fractal skyline.
    cols = np.arange(width)
    for base, relief, colour, haze in ((0.42, 0.18, (105, 120, 145), 0.35),
                                       (0.55, 0.12, (70, 95, 55), 0.1)):  # fmt: skip
        skyline = _fractal(rng, 8, width, octaves=6, persistence=0.6)[0]
        top = ((base - relief * skyline) * height).astype(int)
        mask = np.arange(height)[:, None] >= top[None, cols]
        shade = 0.6 + 0.8 * _fractal(rng, height, width, octaves=9, persistence=0.75)[..., None]
        rock = np.clip(np.array(colour) * shade, 0, 255)
        rock = (1 - haze) * rock + haze * np.array([190, 200, 215])
        image = np.where(mask[..., None], rock, image)
    # Meadow: grass texture, brighter towards the camera, below an uneven edge.
    edge = ((0.66 + 0.05 * _fractal(rng, 8, width, octaves=6)[0]) * height).astype(int)
    grass = _fractal(rng, height, width, octaves=9, persistence=0.75)[..., None]
    depth = np.linspace(0.4, 1.1, height)[:, None, None]
    meadow = np.clip(np.array([90, 140, 50]) * (0.5 + 0.7 * grass) * depth, 0, 255)
    image = np.where((np.arange(height)[:, None] >= edge[None, cols])[..., None], meadow, image)
    # Sensor noise and vignetting.
    image = image + rng.normal(0, 3.0, image.shape)
    yy, xx = np.mgrid[-1 : 1 : complex(height), -1 : 1 : complex(width)]
    image = image * (1 - 0.25 * (xx**2 + yy**2)[..., None] / 2)
    return Image.fromarray(np.clip(image, 0, 255).astype(np.uint8))


def natural_photo_jpeg(width: int = 1024, height: int = 768, seed: int = 7) -> bytes:
    exif = Image.Exif()
    exif[0x010F] = "Kimiserve"  # Make
    exif[0x0110] = "Synthetic Camera"  # Model
    exif[0x0132] = "2025:06:01 12:00:00"  # DateTime
    exif[0x0112] = 1  # Orientation: upright
    photo = natural_photo(width, height, seed)
    return encode(photo, "JPEG", quality=88, subsampling="4:2:0", exif=exif.tobytes())


def png_bomb(width: int, height: int) -> bytes:
    """A valid 1-bit PNG of width x height black pixels, a few hundred KB compressed."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return (
            struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))
        )

    row = bytes(1 + (width + 7) // 8)  # filter byte 0, then the packed bits
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row * 1000) for _ in range(height // 1000))
    idat += packer.compress(row * (height % 1000)) + packer.flush()
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat)
            + chunk(b"IEND", b""))  # fmt: skip


# ---------------------------------------------------------------- a local HTTP server

Route = tuple[int, dict[str, str], bytes] | Callable[[http.server.BaseHTTPRequestHandler], None]


class ImageServer:
    """A threaded HTTP server on 127.0.0.1 with fixed routes. It counts every TCP connection it
    accepts and logs every request as (path, Host header), so tests can prove that a refused
    URL never reached it."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.num_connections = 0
        self.requests: list[tuple[str, str]] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (the http.server API)
                owner.requests.append((self.path, self.headers.get("Host", "")))
                route = owner.routes.get(self.path, (404, {}, b"not found"))
                if callable(route):
                    route(self)
                    return
                status, headers, body = route
                self.send_response(status)
                for name, value in {"Content-Length": str(len(body)), **headers}.items():
                    self.send_header(name, value)
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args) -> None:
                pass

        class Server(http.server.ThreadingHTTPServer):
            daemon_threads = True

            def verify_request(self, request, client_address) -> bool:
                owner.num_connections += 1
                return True

        self.server = Server(("127.0.0.1", 0), Handler)
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> ImageServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def stall(seconds: float) -> Route:
    """A route that sends its headers, one byte, then nothing for `seconds`."""

    def handle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Content-Length", "1000")
        handler.end_headers()
        handler.wfile.write(b"\x89")
        handler.wfile.flush()
        time.sleep(seconds)

    return handle


def chunked(body: bytes, piece: int = 4096) -> Route:
    """A route that streams `body` with chunked transfer encoding (no Content-Length)."""

    def handle(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.protocol_version = "HTTP/1.1"
        handler.send_response(200)
        handler.send_header("Content-Type", "image/png")
        handler.send_header("Transfer-Encoding", "chunked")
        handler.end_headers()
        for start in range(0, len(body), piece):
            part = body[start : start + piece]
            handler.wfile.write(f"{len(part):x}\r\n".encode() + part + b"\r\n")
        handler.wfile.write(b"0\r\n\r\n")
        handler.close_connection = True

    return handle

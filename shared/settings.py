"""Process settings, parsed from the command line: one frozen dataclass per process role.

Flags are generated from the fields (`--num-pages` for `num_pages`), so names and defaults live
in one place. Booleans become `--flag` / `--no-flag`, tuples of strings take a comma-separated
list, and a field defaulting to None takes a string.
"""

from __future__ import annotations

import argparse
import dataclasses
import logging
from typing import TypeVar

ConfigT = TypeVar("ConfigT")

# 64 Mi pixels (8192 x 8192): larger than any image the resize keeps at full size (7168 px a side),
# and below Pillow's own decompression-bomb warning threshold (89 M pixels).
DEFAULT_MAX_PIXELS = 64 * 1024 * 1024


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    model_path: str
    worker_id: str
    host: str = "127.0.0.1"
    port: int = 0
    num_pages: int = 2048
    page_size: int = 16
    kv_transfer_timeout: float = 30.0
    # Decode: host memory for the latents of requests preempted when the page pool runs dry;
    # -1: as many bytes as the page pool; 0: no swapping (such requests end with an error).
    swap_space_bytes: int = -1
    ep_size: int = 1  # expert parallelism: ranks of this decode worker
    ep_rank: int = 0
    ep_rendezvous: str = ""  # host:port where rank 0 hosts the worker's group store
    expert_placement: str = ""  # JSON list expert -> rank; "" = round robin
    expert_stats: bool = False  # decode: count tokens per expert, sent with the heartbeat
    fault_kv_delay: float = 0.0  # fault tests only: seconds between KV control and data
    prefix_cache: bool = True  # prefill: reuse the KV pages of cached prompt prefixes
    router_address: str = ""  # register with this router and send heartbeats ("" = static)
    dtype: str = "float32"
    device: str = "cpu"  # where the model and its KV cache live: "cpu", "cuda", "cuda:1", ...
    attention_backend: str = "auto"  # "torch", "flashinfer", or "auto" (FlashInfer on CUDA)
    log_level: str = "INFO"


@dataclasses.dataclass(frozen=True)
class VisionWorkerConfig:
    model_path: str
    worker_id: str
    host: str = "127.0.0.1"
    port: int = 0
    max_cache_bytes: int = 2 * 1024**3  # embeddings kept for reuse (LRU beyond this)
    max_batch_patches: int = 65536  # patches of all images in one encoder pass
    pin_timeout: float = 300.0  # an encoded image stays pinned for its request at most this long
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    dtype: str = "float32"
    log_level: str = "INFO"
    router_address: str = ""  # register with this router and send heartbeats ("" = static)


@dataclasses.dataclass(frozen=True)
class MediaConfig:
    """The router's limits and URL policy for image inputs (`router/media.py`).

    Image URLs are fetched only from public addresses: loopback, private, link-local,
    multicast, reserved and cloud metadata addresses are refused unless
    `allow_private_media_urls`. A non-empty `allowed_media_domains` restricts fetching to those
    hosts (a name matches itself and its subdomains); the operator vouches for them, so they may
    also resolve to private addresses (never to metadata ones)."""

    max_images_per_request: int = 16
    max_image_bytes: int = 20 * 1024 * 1024  # per image, after base64 decoding or download
    max_image_pixels: int = DEFAULT_MAX_PIXELS
    media_connect_timeout: float = 3.0  # DNS lookup and TCP (and TLS) connect, per hop
    media_read_timeout: float = 10.0  # the whole response of one hop
    media_max_redirects: int = 3
    allowed_media_domains: tuple[str, ...] = ()
    allow_private_media_urls: bool = False


def add_dataclass_flags(parser: argparse.ArgumentParser, cls: type) -> None:
    """One flag per field of the dataclass `cls` (see the module docstring)."""
    for field in dataclasses.fields(cls):
        flag = "--" + field.name.replace("_", "-")
        default = field.default
        if default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        elif isinstance(default, bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=default)
        elif isinstance(default, tuple):
            parser.add_argument(flag, type=comma_list, default=default)
        elif default is None:
            parser.add_argument(flag, default=None)
        else:
            parser.add_argument(flag, type=type(default), default=default)


def comma_list(text: str) -> tuple[str, ...]:
    return tuple(item.strip() for item in text.split(",") if item.strip())


def config_from_args(cls: type[ConfigT], args: argparse.Namespace) -> ConfigT:
    """The dataclass `cls` from the parsed flags that `add_dataclass_flags(_, cls)` added."""
    names = {field.name for field in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in vars(args).items() if k in names})


def parse_config(cls: type[ConfigT], argv: list[str] | None, description: str) -> ConfigT:
    """Parses a worker's command line into `cls` and sets up logging at its `log_level`."""
    parser = argparse.ArgumentParser(description=description)
    add_dataclass_flags(parser, cls)
    config = config_from_args(cls, parser.parse_args(argv))
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return config


def parse_worker_config(argv: list[str] | None, description: str) -> WorkerConfig:
    return parse_config(WorkerConfig, argv, description)

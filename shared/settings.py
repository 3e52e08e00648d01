"""Worker settings shared by the prefill and decode processes, parsed from the command line."""

from __future__ import annotations

import argparse
import dataclasses
import logging


@dataclasses.dataclass(frozen=True)
class WorkerConfig:
    model_path: str
    worker_id: str
    host: str = "127.0.0.1"
    port: int = 0
    num_pages: int = 2048
    page_size: int = 16
    kv_transfer_timeout: float = 30.0
    dtype: str = "float32"
    log_level: str = "INFO"


def parse_worker_config(argv: list[str] | None, description: str) -> WorkerConfig:
    """Builds the CLI from the dataclass fields, so flags and defaults stay in one place."""
    parser = argparse.ArgumentParser(description=description)
    for field in dataclasses.fields(WorkerConfig):
        flag = "--" + field.name.replace("_", "-")
        if field.default is dataclasses.MISSING:
            parser.add_argument(flag, required=True)
        else:
            parser.add_argument(flag, default=field.default, type=type(field.default))
    args = parser.parse_args(argv)
    config = WorkerConfig(**vars(args))
    logging.basicConfig(
        level=config.log_level, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    return config

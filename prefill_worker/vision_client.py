"""The prefill worker's side of image inputs: fetch embeddings by handle, splice them in.

The router sends `PrefillRequest.images` (a vision worker's address and the handles of the
prompt's images, in order). `VisionClient.prompt_embeds` fetches those embeddings straight from
that vision worker and returns the prompt's input embeddings [S, E]: the token embeddings with
the placeholder rows replaced, in order, by the image rows. Called on gRPC handler threads, never
on the engine loop.
"""

from __future__ import annotations

import math
import threading
from collections.abc import Sequence

import grpc
import torch
from torch import nn

from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc
from shared.model.vision import splice_image_embeds
from shared.wire import GRPC_OPTIONS

EMBED_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class VisionFetchError(Exception):
    """Embeddings could not be fetched or do not fit the prompt; `code` is the gRPC status the
    prefill call should end with."""

    def __init__(self, message: str, code: grpc.StatusCode) -> None:
        super().__init__(message)
        self.code = code


class VisionClient:
    def __init__(self, embed_tokens: nn.Embedding, placeholder_id: int,
                 timeout: float = 60.0) -> None:  # fmt: skip
        self.embed_tokens = embed_tokens
        self.placeholder_id = placeholder_id
        self.timeout = timeout
        self._stubs: dict[str, vpb_grpc.VisionWorkerStub] = {}
        self._lock = threading.Lock()

    def prompt_embeds(self, refs: vpb.ImageRefs, token_ids: Sequence[int]) -> torch.Tensor | None:
        """Input embeddings [S, E] of a prompt with images; None when `refs` lists none."""
        if not refs.images:
            return None
        images = self.fetch(refs)
        ids = torch.tensor(
            list(token_ids), dtype=torch.long, device=self.embed_tokens.weight.device
        )
        with torch.no_grad():
            token_embeds = self.embed_tokens(ids)  # [S, E]
        try:
            return splice_image_embeds(token_embeds, token_ids, images, self.placeholder_id)
        except ValueError as exc:
            raise VisionFetchError(str(exc), grpc.StatusCode.INVALID_ARGUMENT) from exc

    def fetch(self, refs: vpb.ImageRefs) -> list[torch.Tensor]:
        """The embeddings [N_i, E] of each handle in `refs`, in order."""
        hashes = [image.content_hash for image in refs.images]
        parts: list[list[bytes]] = [[] for _ in hashes]
        shapes: list[tuple[int, ...]] = [()] * len(hashes)
        dtypes = [""] * len(hashes)
        try:
            stream = self._stub(refs.vision_address).Fetch(
                vpb.FetchRequest(content_hashes=hashes), timeout=self.timeout
            )
            for chunk in stream:
                parts[chunk.image_index].append(chunk.data)
                shapes[chunk.image_index] = tuple(chunk.shape)
                dtypes[chunk.image_index] = chunk.dtype
        except grpc.RpcError as exc:
            # The vision worker is gone, stuck, or restarted without these embeddings: the
            # handles no longer hold. FAILED_PRECONDITION tells the router that this worker is
            # fine and the images must be encoded again (UNAVAILABLE would take it out of rotation).
            raise VisionFetchError(
                f"cannot fetch image embeddings from {refs.vision_address}: "
                f"{exc.code().name}: {exc.details()}",
                grpc.StatusCode.FAILED_PRECONDITION,
            ) from exc
        embeds = [_tensor(b"".join(p), s, d) for p, s, d in zip(parts, shapes, dtypes)]
        for image, rows in zip(refs.images, embeds):
            if rows.shape[0] != image.num_tokens:
                raise VisionFetchError(
                    f"image {image.content_hash} has {rows.shape[0]} embeddings, the handle "
                    f"says {image.num_tokens}", grpc.StatusCode.INTERNAL)  # fmt: skip
        return embeds

    def _stub(self, address: str) -> vpb_grpc.VisionWorkerStub:
        with self._lock:
            stub = self._stubs.get(address)
            if stub is None:
                channel = grpc.insecure_channel(address, options=GRPC_OPTIONS)
                stub = self._stubs[address] = vpb_grpc.VisionWorkerStub(channel)
            return stub


def _tensor(data: bytes, shape: tuple[int, ...], dtype: str) -> torch.Tensor:
    torch_dtype = EMBED_DTYPES.get(dtype)
    size = math.prod(shape) * torch_dtype.itemsize if shape and torch_dtype else -1
    if len(shape) != 2 or len(data) != size:
        raise VisionFetchError(f"the vision worker sent {len(data)} bytes of {dtype or '?'} for "
                               f"shape {list(shape)}", grpc.StatusCode.INTERNAL)  # fmt: skip
    return torch.frombuffer(bytearray(data), dtype=torch_dtype).view(*shape)  # [N, E]

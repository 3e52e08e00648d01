"""Image inputs without a stack: data URLs, placeholder expansion, the URL address policy and
limits (against a local HTTP server on 127.0.0.1), the vision worker's cache and engine, and
embeddings fetched by handle and spliced into a prompt."""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import socket
import textwrap
import threading
import time
import types
from concurrent import futures

import grpc
import numpy as np
import pytest
import torch
from image_utils import ImageServer, chunked, data_url, encode, natural_photo_jpeg, stall
from PIL import Image

from proto import kimiserve_pb2 as pb
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc
from router.lifecycle import SampleError
from router.media import (
    MediaError,
    MediaResolver,
    decode_data_url,
    expand_placeholders,
    image_parts,
)
from router.media_fetch import UrlFetcher, address_kind
from router.pools import Pool
from router.prompt import Prompt
from shared.image_processing import ImageProcessingConfig, num_image_tokens, process_image_bytes
from shared.settings import MediaConfig, VisionWorkerConfig
from vision_worker.cache import EmbeddingCache
from vision_worker.engine import DecodedImage, VisionEngine, content_hash

PHOTO = natural_photo_jpeg(320, 240)
PNG = encode(Image.new("RGB", (60, 40), (10, 200, 30)))


def _run(coro):
    return asyncio.run(coro)


# ---------------------------------------------------------------- data URLs


@pytest.mark.parametrize(
    "url",
    [
        "data:image/png;base64, " + base64.b64encode(PNG).decode(),  # the model card's form
        "data:image/png;base64," + "\n".join(textwrap.wrap(base64.b64encode(PNG).decode(), 20)),
        "data:image/png;base64," + base64.urlsafe_b64encode(PNG).decode().rstrip("="),
        "data:;base64," + base64.b64encode(PNG).decode(),
        "data:IMAGE/PNG;BASE64," + base64.b64encode(PNG).decode(),
    ],
)
def test_data_url_spellings_decode(url):
    assert decode_data_url(url, 1 << 20) == PNG


def test_percent_encoded_data_url():
    assert decode_data_url("data:image/png,%89PNG%0D%0A", 100) == b"\x89PNG\r\n"


@pytest.mark.parametrize(
    "url,message",
    [
        ("data:image/png;base64,@@@not-base64", "not valid base64: it contains '@'"),
        ("data:image/png;base64,abcde", "not valid base64"),
        ("data:text/html;base64,PGh0bWw+", "media type 'text/html' is not an image"),
        ("data:image/png;base64", "no ','"),
        ("data:image/png;base64," + "A" * 2000, "larger than 1000 bytes"),
    ],
)
def test_broken_data_urls_name_the_problem(url, message):
    with pytest.raises(MediaError, match=message):
        decode_data_url(url, 1000)


# ---------------------------------------------------------------- parts and placeholders


def test_image_parts_in_prompt_order_with_their_params():
    messages = [
        pb.ChatMessage(role="system", content="Rules."),
        pb.ChatMessage(role="user", parts=[
            pb.ContentPart(type="text", text="Compare "),
            pb.ContentPart(type="image_url", image_url="data:a"),
            pb.ContentPart(type="text", text="and"),
            pb.ContentPart(type="image_url", image_url="data:b"),
        ]),
        pb.ChatMessage(role="user", parts=[pb.ContentPart(type="image_url", image_url="data:c")]),
    ]  # fmt: skip
    assert image_parts(messages) == [
        ("messages[1].content[1]", "data:a"),
        ("messages[1].content[3]", "data:b"),
        ("messages[2].content[0]", "data:c"),
    ]


def test_expand_placeholders():
    assert expand_placeholders([1, 9, 2, 9, 3], [3, 1], pad_id=9) == [1, 9, 9, 9, 2, 9, 3]
    assert expand_placeholders([1, 2], [], pad_id=9) == [1, 2]
    with pytest.raises(MediaError, match="2 image placeholders for 1 images"):
        expand_placeholders([9, 9], [4], pad_id=9)


class _FakeVisionStub:
    def __init__(self) -> None:
        self.requests: list[vpb.EncodeRequest] = []
        self.released: list[str] = []

    async def Encode(self, request, timeout=None):
        self.requests.append(request)
        cfg = ImageProcessingConfig()
        results = []
        for image in request.images:
            width, height = Image.open(io.BytesIO(image.data)).size
            handle = vpb.ImageHandle(content_hash=content_hash(image.data),
                                     num_tokens=num_image_tokens(width, height, cfg))  # fmt: skip
            results.append(vpb.EncodeResult(handle=handle))
        return vpb.EncodeResponse(results=results)

    async def Release(self, request, timeout=None):
        self.released.append(request.request_id)
        return vpb.ReleaseResponse()


class _FakePool:
    def __init__(self) -> None:
        self.worker = types.SimpleNamespace(worker_id="vision-0", address="127.0.0.1:1",
                                            num_inflight=0, num_served=0, num_pinned=0,
                                            stub=_FakeVisionStub())  # fmt: skip
        self.workers = [self.worker]

    def pick(self, prompt_ids=None, exclude=frozenset()):
        return self.worker


def test_k30_two_images_reach_the_encoder_in_prompt_order():
    """K30: text + two images; the encoder gets both in order, each pad becomes its count."""
    small, large = encode(Image.new("RGB", (28, 28))), encode(Image.new("RGB", (112, 56)))
    request = pb.GenerateRequest(request_id="k30", messages=[pb.ChatMessage(role="user", parts=[
        pb.ContentPart(type="text", text="Compare "),
        pb.ContentPart(type="image_url", image_url=data_url(large)),
        pb.ContentPart(type="text", text="and"),
        pb.ContentPart(type="image_url", image_url=data_url(small)),
    ])])  # fmt: skip
    pool = _FakePool()
    resolver = MediaResolver(MediaConfig(), ImageProcessingConfig(), pad_id=9, vision=pool)
    prompt = Prompt(token_ids=[1, 9, 2, 9, 3])

    async def scenario():
        expanded, images = await resolver.expand(request, prompt)
        encoded = await resolver.encode("k30", expanded, images)
        resolver.release("k30")
        await asyncio.sleep(0.05)
        return expanded, encoded

    expanded, encoded = _run(scenario())
    assert expanded.token_ids == [1, *[9] * 8, 2, 9, 3]  # 112x56 -> 4x2 tokens, 28x28 -> 1
    sent = pool.worker.stub.requests[0]
    assert [i.data for i in sent.images] == [large, small]
    assert [h.num_tokens for h in encoded.images.images] == [8, 1]
    assert encoded.images.vision_address == "127.0.0.1:1"
    assert pool.worker.stub.released == ["k30"]


class _DeadVisionStub(_FakeVisionStub):
    async def Encode(self, request, timeout=None):
        self.requests.append(request)
        raise grpc.aio.AioRpcError(grpc.StatusCode.UNAVAILABLE, grpc.aio.Metadata(),
                                   grpc.aio.Metadata(), "Socket closed")  # fmt: skip


def test_a_lost_vision_worker_is_replaced_once_then_503():
    """The first pick is unreachable: it leaves the rotation and the images go to the other
    worker; with no other worker left, the request is a 503 naming the problem."""
    request = pb.GenerateRequest(request_id="lost", messages=[pb.ChatMessage(role="user", parts=[
        pb.ContentPart(type="image_url", image_url=data_url(encode(Image.new("RGB", (28, 28))))),
    ])])  # fmt: skip

    async def scenario():
        pool = Pool("vision", vpb_grpc.VisionWorkerStub)
        dead = pool.add("vision-static-0", "127.0.0.1:1", static=True)
        spare = pool.add("vision-static-1", "127.0.0.1:2", static=True)
        dead.stub, spare.stub = _DeadVisionStub(), _FakeVisionStub()
        resolver = MediaResolver(MediaConfig(), ImageProcessingConfig(), pad_id=9, vision=pool)
        expanded, images = await resolver.expand(request, Prompt(token_ids=[1, 9]))
        encoded = await resolver.encode("lost", expanded, images)
        states = (dead.state, spare.state)
        again = await resolver.encode_again("lost", encoded, images)  # excludes the spare, but
        pool.remove("vision-static-1")  # the dead one is lost: the spare encodes again
        with pytest.raises(SampleError) as err:
            await resolver.encode("lost-2", expanded, images)
        resolver.release("lost")
        await asyncio.sleep(0.05)
        await pool.close()
        return encoded, again, states, err.value, dead.stub, spare.stub

    encoded, again, states, error, dead, spare = _run(scenario())
    assert encoded.images.vision_address == again.images.vision_address == "127.0.0.1:2"
    assert states == ("lost", "ready") and len(dead.requests) == 1 and len(spare.requests) == 2
    assert error.http_status == 503 and "no vision worker is available" in str(error)
    assert spare.released == ["lost"]  # once, though it encoded the request twice


def test_too_many_images_and_a_model_without_vision():
    parts = [(f"messages[0].content[{i}]", "data:image/png;base64,AAAA") for i in range(3)]
    resolver = MediaResolver(MediaConfig(max_images_per_request=2), ImageProcessingConfig(), 9,
                             _FakePool())  # fmt: skip
    with pytest.raises(MediaError, match="3 images; this server accepts at most 2"):
        _run(resolver.load(parts))
    text_only = MediaResolver(MediaConfig(), None, 9, _FakePool())
    with pytest.raises(MediaError, match="does not accept images"):
        _run(text_only.load(parts[:1]))


def test_undecodable_image_names_its_part():
    resolver = MediaResolver(MediaConfig(), ImageProcessingConfig(), 9, _FakePool())
    bad = "data:image/png;base64," + base64.b64encode(b"P6\n2 2\n255\n" + bytes(12)).decode()
    with pytest.raises(MediaError, match=r"messages\[0\].content\[1\]: not a supported image"):
        _run(resolver.load([("messages[0].content[1]", bad)]))


# ---------------------------------------------------------------- URL address policy


@pytest.mark.parametrize(
    "address,kind",
    [
        ("127.0.0.1", "loopback"), ("::1", "loopback"), ("::ffff:127.0.0.1", "loopback"),
        ("10.1.2.3", "private"), ("172.16.0.1", "private"), ("192.168.1.1", "private"),
        ("fc00::1", "private"), ("169.254.1.1", "link-local"), ("fe80::1", "link-local"),
        ("169.254.169.254", "cloud metadata"), ("fd00:ec2::254", "cloud metadata"),
        ("224.0.0.1", "multicast"), ("ff02::1", "multicast"), ("0.0.0.0", "unspecified"),
        ("100.64.0.1", "non-public"), ("8.8.8.8", None), ("2606:4700:4700::1111", None),
        ("64:ff9b::a9fe:a9fe", "cloud metadata"), ("2002:7f00:1::", "loopback"),
    ],
)  # fmt: skip
def test_address_kinds(address, kind):
    assert address_kind(ipaddress.ip_address(address)) == kind


class _Resolver:
    """A fake DNS: a table of names; records every lookup."""

    def __init__(self, table: dict[str, list[str] | Exception], delay: float = 0.0) -> None:
        self.table = table
        self.delay = delay
        self.calls: list[str] = []

    def __call__(self, host: str, port: int):
        self.calls.append(host)
        time.sleep(self.delay)
        answer = self.table.get(
            host, socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        )
        if isinstance(answer, Exception):
            raise answer
        return [ipaddress.ip_address(a) for a in answer]


@pytest.fixture
def no_connections(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError(f"a connection was attempted: {args}")

    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.mark.parametrize(
    "url,message",
    [
        ("http://127.0.0.1/x.png", "127.0.0.1 is a loopback address"),
        ("http://169.254.169.254/latest/meta-data/", "cloud metadata address"),
        ("http://[fd00:ec2::254]/latest", "cloud metadata address"),
        ("http://[::1]:8080/x.png", "loopback address"),
        ("http://10.0.0.7/x.png", "private address"),
        ("http://localhost:9/x.png", r"localhost \(127.0.0.1\) is a loopback address"),
        ("http://images.invalid/x.png", "does not resolve"),
        ("ftp://example.com/x.png", "scheme 'ftp' is not supported"),
        ("http:///x.png", "no host"),
        ("http://example.com:99999/x.png", "invalid port"),
    ],
)
def test_refused_before_any_lookup_or_connection(url, message, no_connections):
    resolver = _Resolver({})
    with pytest.raises(MediaError, match=message):
        _run(UrlFetcher(MediaConfig(), resolver).check(url))
    assert resolver.calls == []


def test_every_address_of_a_name_is_checked(no_connections):
    resolver = _Resolver({"mixed.example": ["93.184.216.34", "10.0.0.1"]})
    with pytest.raises(MediaError, match=r"mixed.example \(10.0.0.1\) is a private address"):
        _run(UrlFetcher(MediaConfig(), resolver).check("https://mixed.example/a.png"))


def test_names_that_do_not_resolve(no_connections):
    fetcher = UrlFetcher(MediaConfig(media_connect_timeout=0.2), _Resolver({}))
    with pytest.raises(MediaError, match="nowhere.example does not resolve"):
        _run(fetcher.check("http://nowhere.example/a.png"))
    slow = UrlFetcher(MediaConfig(media_connect_timeout=0.2),
                      _Resolver({"slow.example": ["93.184.216.34"]}, delay=1.0))  # fmt: skip

    async def timed_check() -> float:
        started = time.monotonic()
        with pytest.raises(MediaError, match="did not resolve within 0.2 s"):
            await slow.check("http://slow.example/a.png")
        return time.monotonic() - started

    assert _run(timed_check()) < 0.9


def test_allowed_media_domains_restrict_and_vouch(no_connections):
    resolver = _Resolver({"cdn.images.example": ["10.0.0.5"], "meta.images.example":
                          ["169.254.169.254"]})  # fmt: skip
    fetcher = UrlFetcher(MediaConfig(allowed_media_domains=("images.example",)), resolver)
    target = _run(fetcher.check("http://cdn.images.example/a.png"))  # private, but vouched for
    assert target.addresses == (ipaddress.ip_address("10.0.0.5"),)
    with pytest.raises(MediaError, match="cloud metadata"):
        _run(fetcher.check("http://meta.images.example/a.png"))
    for url in ("http://other.example/a.png", "http://93.184.216.34/a.png"):
        with pytest.raises(MediaError, match="not in this server's allowed_media_domains"):
            _run(fetcher.check(url))
    assert resolver.calls == ["cdn.images.example", "meta.images.example"]


def test_allow_private_media_urls_opens_the_address_check(no_connections):
    fetcher = UrlFetcher(MediaConfig(allow_private_media_urls=True), _Resolver({}))
    assert _run(fetcher.check("http://127.0.0.1:8000/a.png")).port == 8000


# ---------------------------------------------------------------- fetching from a local server


@pytest.fixture
def server():
    with ImageServer() as srv:
        srv.routes["/photo.jpg"] = (200, {"Content-Type": "image/jpeg"}, PHOTO)
        yield srv


def _local_fetcher(**overrides) -> tuple[UrlFetcher, _Resolver]:
    """Fetches `images.test` (the local server, 127.0.0.1), vouched for by the operator."""
    resolver = _Resolver({"images.test": ["127.0.0.1"]})
    config = MediaConfig(allowed_media_domains=("images.test",), **overrides)
    return UrlFetcher(config, resolver), resolver


def test_fetch_connects_to_the_checked_address_with_the_url_host(server):
    fetcher, resolver = _local_fetcher()
    assert _run(fetcher.fetch(f"http://images.test:{server.port}/photo.jpg")) == PHOTO
    assert server.requests == [("/photo.jpg", f"images.test:{server.port}")]
    assert resolver.calls == ["images.test"]  # one lookup; the connection reused its answer


def test_redirects_are_followed_and_each_hop_is_checked(server):
    base = f"http://images.test:{server.port}"
    for i in range(4):
        server.routes[f"/r{i}"] = (302, {"Location": f"/r{i + 1}" if i < 3 else "/photo.jpg"}, b"")
    loopback = f"http://127.0.0.1:{server.port}/photo.jpg"
    server.routes["/to-loopback"] = (301, {"Location": loopback}, b"")
    server.routes["/to-elsewhere"] = (307, {"Location": "http://elsewhere.example/photo.jpg"}, b"")
    fetcher, resolver = _local_fetcher(media_max_redirects=4)
    assert _run(fetcher.fetch(f"{base}/r0")) == PHOTO
    strict, _ = _local_fetcher(media_max_redirects=3)
    with pytest.raises(MediaError, match="redirected more than 3 times"):
        _run(strict.fetch(f"{base}/r0"))
    server.requests.clear()
    with pytest.raises(MediaError, match="127.0.0.1 is a loopback address"):
        _run(fetcher.fetch(f"{base}/to-loopback"))
    with pytest.raises(MediaError, match="elsewhere.example is not in"):
        _run(fetcher.fetch(f"{base}/to-elsewhere"))
    assert [path for path, _ in server.requests] == ["/to-loopback", "/to-elsewhere"]
    assert "elsewhere.example" not in resolver.calls


def test_fetch_limits_and_bad_answers(server):
    big = bytes(5000)
    server.routes["/big"] = (200, {"Content-Type": "image/png"}, big)
    server.routes["/big-chunked"] = chunked(big, piece=1000)
    server.routes["/page"] = (200, {"Content-Type": "text/html"}, b"<html>404</html>")
    server.routes["/stall"] = stall(3.0)
    fetcher, _ = _local_fetcher(max_image_bytes=4000, media_read_timeout=0.5)
    base = f"http://images.test:{server.port}"
    cases = [("/big", "larger than 4000 bytes"), ("/big-chunked", "larger than 4000 bytes"),
             ("/page", "returned text/html, not an image"), ("/missing", "answered HTTP 404"),
             ("/stall", "timed out")]  # fmt: skip
    for path, message in cases:
        started = time.monotonic()
        with pytest.raises(MediaError, match=message):
            _run(fetcher.fetch(base + path))
        assert time.monotonic() - started < 2.0, path
    small, _ = _local_fetcher()
    assert _run(small.fetch(f"{base}/big-chunked")) == big


def test_connection_refused_is_a_clear_error():
    with socket.socket() as sock:  # a port nobody listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    fetcher, _ = _local_fetcher()
    with pytest.raises(MediaError, match="cannot fetch image URL .*refused"):
        _run(fetcher.fetch(f"http://images.test:{port}/a.png"))


# ---------------------------------------------------------------- the vision worker's cache


def test_cache_evicts_least_recently_used_unpinned_entries():
    now = [0.0]
    cache = EmbeddingCache(max_bytes=3 * 400, pin_timeout=10.0, clock=lambda: now[0])
    rows = torch.zeros(10, 10)  # 400 bytes
    for key in "abc":
        cache.put(key, rows, f"req-{key}")
    cache.put("d", rows, "req-d")  # over the bound, but everything is pinned
    assert cache.stats().num_entries == 4
    cache.release("req-a")
    assert cache.get("a") is None  # released, least recently used: evicted
    cache.release("req-b")
    cache.release("req-c")
    assert cache.pin("b", "req-e") is not None  # b is now the most recently used
    cache.put("f", rows, "req-f")
    assert cache.get("c") is None and cache.get("b") is not None
    stats = cache.stats()
    assert (stats.num_hits, stats.num_misses, stats.num_bytes) == (1, 5, 3 * 400)


def test_cache_pins_expire():
    now = [0.0]
    cache = EmbeddingCache(max_bytes=400, pin_timeout=10.0, clock=lambda: now[0])
    cache.put("a", torch.zeros(10, 10), "gone")
    cache.put("b", torch.zeros(10, 10), "gone-too")
    assert cache.stats().num_pinned == 2
    now[0] = 11.0
    stats = cache.stats()
    assert stats.num_pinned == 0 and stats.num_entries == 1  # the router never released them
    assert cache.release("gone") == 0


# ---------------------------------------------------------------- engine, Fetch and splicing


@pytest.fixture(scope="module")
def vision_model(tiny_checkpoint):
    from shared.model.vision import load_vision_model

    return load_vision_model(tiny_checkpoint, dtype=torch.float32)


def _engine(model, max_bytes: int = 1 << 30) -> VisionEngine:
    cache = EmbeddingCache(max_bytes, pin_timeout=60.0)
    engine = VisionEngine(model, ImageProcessingConfig(), cache, max_batch_patches=65536,
                          max_pixels=1 << 26)  # fmt: skip
    engine.start()
    return engine


def test_engine_batches_requests_and_encodes_each_image_once(vision_model):
    engine = _engine(vision_model)
    passes = []
    original = vision_model.encode

    def counting_encode(pixels, grids):
        passes.append(len(grids))
        return original(pixels, grids)

    vision_model.encode = counting_encode
    try:
        photo, png = natural_photo_jpeg(200, 150, seed=1), PNG
        gate = threading.Barrier(3)

        def request(request_id, images):
            gate.wait()
            return engine.encode(request_id, images)

        with futures.ThreadPoolExecutor(3) as pool:
            jobs = [pool.submit(request, "a", [photo, png, photo]),
                    pool.submit(request, "b", [png, b"garbage"]),
                    pool.submit(request, "c", [photo])]  # fmt: skip
            a, b, c = (job.result(timeout=60) for job in jobs)
    finally:
        del vision_model.encode
    assert [r.num_tokens for r in a] == [48, 6, 48]  # 200x150 -> 224x168; 60x40 -> 84x56
    assert a[0].content_hash == a[2].content_hash == c[0].content_hash
    assert "not a supported image" in b[1].error and b[0].content_hash == a[1].content_hash
    assert sum(passes) == 2  # two distinct images encoded, however the batches fell
    stats = engine.cache.stats()
    assert (stats.num_misses, stats.num_hits) == (2, 3)  # every usable image is one or the other
    expected = vision_model.encode(*_patches(photo))[0]
    assert torch.allclose(engine.cache.get(a[0].content_hash), expected, atol=1e-5)


def _patches(data: bytes):
    image = process_image_bytes(data, ImageProcessingConfig())
    return image.pixel_values, [image.grid_thw]


def test_decoded_pixels_encode_like_the_file(vision_model):
    engine = _engine(vision_model)
    rgb = np.asarray(Image.open(io.BytesIO(PNG)).convert("RGB"))
    decoded = DecodedImage(rgb.shape[1], rgb.shape[0], rgb.tobytes())
    from_file, from_pixels = engine.encode("r", [PNG, decoded])
    assert from_pixels.num_tokens == from_file.num_tokens == 6
    assert from_pixels.content_hash != from_file.content_hash
    embeds = engine.cache.get(from_file.content_hash)
    assert torch.allclose(embeds, engine.cache.get(from_pixels.content_hash), atol=1e-6)
    bad = DecodedImage(4, 4, b"\x00" * 10)
    assert "needs 48 bytes" in engine.encode("r", [bad])[0].error


def test_prefill_fetches_embeddings_by_handle_and_splices_them(vision_model, tiny_checkpoint,
                                                                monkeypatch):  # fmt: skip
    """Fetch streams rows in several messages; the prefill side rebuilds and splices them."""
    from prefill_worker.vision_client import VisionClient, VisionFetchError
    from shared.model.loader import load_text_model
    from shared.model.vision import splice_image_embeds
    from vision_worker import server as vision_server

    monkeypatch.setattr(vision_server, "FETCH_CHUNK_BYTES", 5 * 128 * 4)  # 5 rows a message
    engine = _engine(vision_model)
    config = VisionWorkerConfig(model_path=str(tiny_checkpoint), worker_id="vision-t")
    grpc_server = grpc.server(futures.ThreadPoolExecutor(4))
    vpb_grpc.add_VisionWorkerServicer_to_server(
        vision_server.VisionServicer(config, engine), grpc_server
    )
    port = grpc_server.add_insecure_port("127.0.0.1:0")
    grpc_server.start()
    try:
        photo = natural_photo_jpeg(200, 150, seed=2)
        results = engine.encode("req", [photo, PNG])
        refs = vpb.ImageRefs(vision_address=f"127.0.0.1:{port}", images=[
            vpb.ImageHandle(content_hash=r.content_hash, num_tokens=r.num_tokens) for r in results
        ])  # fmt: skip
        text = load_text_model(tiny_checkpoint)
        pad = 7
        ids = [1, *[pad] * 48, 2, *[pad] * 6, 3]
        client = VisionClient(text.embed_tokens, pad)
        got = client.prompt_embeds(refs, ids)
        images = [engine.cache.get(r.content_hash) for r in results]
        expected = splice_image_embeds(text.embed_tokens.weight[ids], ids, images, pad)
        assert torch.equal(got, expected)
        with pytest.raises(VisionFetchError, match="2 image placeholders"):
            client.prompt_embeds(refs, [1, pad, pad])
        gone = vpb.ImageHandle(content_hash="00" * 32, num_tokens=1)
        missing = vpb.ImageRefs(vision_address=refs.vision_address, images=[gone])
        with pytest.raises(VisionFetchError) as error:
            client.prompt_embeds(missing, [pad])
        assert error.value.code == grpc.StatusCode.FAILED_PRECONDITION  # encode them again
        assert "NOT_FOUND" in str(error.value)
    finally:
        grpc_server.stop(None)


def test_chunked_prefill_carries_image_embeddings_across_chunks(vision_model, tiny_checkpoint):
    """A prompt whose image straddles chunk boundaries prefills like one forward pass."""
    from prefill_worker.engine import PrefillEngine, PrefillJob
    from shared.config import ModelConfig
    from shared.model.generate import reference_logits
    from shared.model.loader import load_text_model
    from shared.model.vision import splice_image_embeds
    from shared.runner import ModelRunner
    from shared.sampling import SamplingConfig

    model = load_text_model(tiny_checkpoint)
    pad = ModelConfig.from_dir(tiny_checkpoint).media_placeholder_token_id
    embeds = vision_model.encode(*_patches(PNG))  # one image of 6 tokens
    prompt = [5, 6, 7, *[pad] * 6, 8, 9]
    rows = splice_image_embeds(model.embed_tokens.weight[prompt], prompt, embeds, pad)
    results = []
    for chunk in (4, 64):  # chunks of 4 tokens cut the image twice; 64 runs it whole
        engine = PrefillEngine(ModelRunner(model, num_pages=8, page_size=16), chunk)
        job = PrefillJob("job", prompt, SamplingConfig(temperature=0), input_embeds=rows)
        future = engine.submit(job)
        while not future.done():
            engine.step()
        results.append(future.result())
    expected = int(reference_logits(model, prompt, embeds, pad)[-1].argmax())
    assert results[0].first.token_id == results[1].first.token_id == expected
    assert torch.allclose(results[0].kv, results[1].kv, atol=1e-5)
    plain = reference_logits(model, prompt)[-1]
    assert float((plain - reference_logits(model, prompt, embeds, pad)[-1]).abs().max()) > 1e-3

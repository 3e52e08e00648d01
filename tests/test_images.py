"""Images through a live stack (gateway, router, vision, prefill, decode) with the openai client.

The photograph is synthesised (see `image_utils`): no installed package ships a real one. The
stack vouches for `localhost` only (`allowed_media_domains`), so the local HTTP server these
tests start on 127.0.0.1 is reachable by that name, while every other URL host is refused
before any lookup or connection: no test sends traffic beyond 127.0.0.1.

Expected placeholder counts come from the K2.5 resize rule (spec section 6.2): pad the
(possibly downscaled) size to multiples of 28, one token per 28x28 block.
"""

from __future__ import annotations

import base64
import json
import time

import grpc
import numpy as np
import openai
import pytest
import torch
from image_utils import ImageServer, data_url, encode, natural_photo_jpeg, png_bomb
from PIL import Image, ImageDraw
from stack_utils import curl_chat, router_address, start_stack

from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from proto import vision_pb2 as vpb
from proto import vision_pb2_grpc as vpb_grpc
from router.media import expand_placeholders
from shared.chat_template import render_chat
from shared.config import ModelConfig
from shared.tokenizer import KimiTokenizer

MODEL = "moonshotai/Kimi-K2.5"
MAX_IMAGES = 8
PHOTO = natural_photo_jpeg()  # 1024x768: 1036 tokens (74 x 56 blocks after padding to 1036x784)
PHOTO_TOKENS = 1036
GUIDE_IMAGE_URL = "https://huggingface.co/moonshotai/Kimi-K2.5/resolve/main/figures/kimi-logo.png"


def _transparent_png() -> bytes:
    """200x150 RGBA, transparent except an opaque disc: 224x168 padded, 8 x 6 = 48 tokens."""
    image = Image.new("RGBA", (200, 150), (255, 0, 0, 0))
    ImageDraw.Draw(image).ellipse((50, 25, 150, 125), fill=(20, 60, 200, 255))
    return encode(image, "PNG")


def _palette_gif() -> bytes:
    """120x90 palette GIF with a transparent index: 140x112 padded, 5 x 4 = 20 tokens."""
    image = Image.new("P", (120, 90), 0)
    image.putpalette([255, 255, 255, 200, 30, 30, 30, 30, 200])
    ImageDraw.Draw(image).rectangle((10, 10, 60, 80), fill=1)
    ImageDraw.Draw(image).rectangle((70, 20, 110, 70), fill=2)
    return encode(image, "GIF", transparency=0)


def _logo_png() -> bytes:
    """A 400x160 logo on a transparent background: 420x168 padded, 15 x 6 = 90 tokens."""
    image = Image.new("RGBA", (400, 160), (0, 0, 0, 0))
    draw = ImageDraw.Draw(image)
    draw.ellipse((10, 10, 150, 150), fill=(23, 131, 255, 255))
    for i in range(4):
        draw.rectangle((180 + 50 * i, 50, 215 + 50 * i, 110), fill=(10, 10, 10, 255))
    return encode(image, "PNG")


IMAGES = {
    "photo": (PHOTO, "image/jpeg", PHOTO_TOKENS),
    "png": (_transparent_png(), "image/png", 48),
    "gif": (_palette_gif(), "image/gif", 20),
}


@pytest.fixture(scope="module")
def image_server():
    with ImageServer() as server:
        server.routes["/photo.jpg"] = (200, {"Content-Type": "image/jpeg"}, PHOTO)
        server.routes["/page.html"] = (200, {"Content-Type": "text/html"}, b"<html>no</html>")
        loopback = f"http://127.0.0.1:{server.port}/photo.jpg"
        server.routes["/to-loopback"] = (302, {"Location": loopback}, b"")
        yield server


@pytest.fixture(scope="module")
def stack(tiny_checkpoint):
    stack = start_stack(tiny_checkpoint, max_images_per_request=MAX_IMAGES,
                        allowed_media_domains=("localhost",))  # fmt: skip
    yield stack
    stack.stop()


@pytest.fixture(scope="module")
def client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def count_text(tiny_checkpoint):
    """Prompt tokens before expansion (one placeholder per image) of a user message's content,
    or of a list of messages."""
    tokenizer = KimiTokenizer.from_dir(tiny_checkpoint)
    template = (tiny_checkpoint / "chat_template.jinja").read_text()

    def count(content: list[dict], messages: list[dict] | None = None) -> int:
        messages = messages or [{"role": "user", "content": content}]
        return len(tokenizer.encode(render_chat(template, messages)))

    return count


def _image_part(data: bytes, mime: str = "image/png") -> dict:
    return {"type": "image_url", "image_url": {"url": data_url(data, mime)}}


def _url_part(url: str) -> dict:
    return {"type": "image_url", "image_url": {"url": url}}


def _chat(client: openai.OpenAI, content: list[dict], **kwargs):
    return client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": content}],
        max_tokens=kwargs.pop("max_tokens", 2),
        temperature=0,
        **kwargs,
    )


def _vision_status(stack) -> vpb.VisionStatus:
    with grpc.insecure_channel(f"127.0.0.1:{stack.child('vision-0').port}") as channel:
        return vpb_grpc.VisionWorkerStub(channel).Status(vpb.VisionStatusRequest(), timeout=10)


def _still_serving(stack, client) -> None:
    assert stack.dead_child() is None
    assert _chat(client, [{"type": "text", "text": "Hi"}], max_tokens=1).usage.completion_tokens


# ---------------------------------------------------------------- images that work


def test_photo_png_and_gif_in_one_request(client, count_text):
    content = [{"type": "text", "text": "Compare these: "}]
    content += [_image_part(data, mime) for data, mime, _ in IMAGES.values()]
    response = _chat(client, content)
    expected = count_text(content) + sum(tokens - 1 for _, _, tokens in IMAGES.values())
    assert response.usage.prompt_tokens == expected
    assert response.choices[0].message.role == "assistant"


@pytest.mark.parametrize("name", list(IMAGES))
def test_each_image_in_its_own_request(client, count_text, name):
    data, mime, tokens = IMAGES[name]
    content = [_image_part(data, mime), {"type": "text", "text": "Describe it."}]
    assert _chat(client, content).usage.prompt_tokens == count_text(content) + tokens - 1


def test_same_image_twice_is_encoded_once(stack, client, count_text):
    image = natural_photo_jpeg(300, 200, seed=11)  # 308x224 padded: 11 x 8 = 88 tokens
    part = _image_part(image, "image/jpeg")
    before = _vision_status(stack)
    content = [part, {"type": "text", "text": "and again"}, part]
    assert _chat(client, content).usage.prompt_tokens == count_text(content) + 2 * 87
    after_one = _vision_status(stack)
    assert after_one.num_misses - before.num_misses == 1
    assert after_one.num_hits - before.num_hits == 1
    _chat(client, [part])
    after_two = _vision_status(stack)
    assert after_two.num_misses == after_one.num_misses
    assert after_two.num_hits - after_one.num_hits == 1
    assert after_two.num_cached_images >= 1 and after_two.cache_bytes > 0


def test_prefix_cache_tells_images_apart(client, tiny_checkpoint):
    """The prefill worker's prefix cache keys an image's placeholders by the image's content: a
    prompt with another image at the same place reuses only the pages before the image."""
    text = {"type": "text", "text": "Which colour fills this picture, exactly? " * 3}
    red, blue = (encode(Image.new("RGB", (200, 150), c), "PNG") for c in ("#c81e1e", "#1e1ec8"))
    tokenizer = KimiTokenizer.from_dir(tiny_checkpoint)
    template = (tiny_checkpoint / "chat_template.jinja").read_text()
    pad = ModelConfig.from_dir(tiny_checkpoint).media_placeholder_token_id
    hi = tokenizer.encode(render_chat(template, [{"role": "user", "content": "Hi"}]))
    messages = [{"role": "user", "content": [text, _url_part("x")]}]
    prompt = expand_placeholders(tokenizer.encode(render_chat(template, messages)), [48], pad)
    header = next(i for i, (a, b) in enumerate(zip(hi, prompt)) if a != b)  # the system part
    _chat(client, [{"type": "text", "text": "Hi"}], max_tokens=1)  # caches the system part
    usages = [_chat(client, [text, _image_part(image)]).usage for image in (red, blue, red)]
    assert [u.prompt_tokens for u in usages] == [len(prompt)] * 3
    cached = [u.prompt_tokens_details.cached_tokens for u in usages]
    image_start = prompt.index(pad)
    assert cached == [header // 16 * 16, image_start // 16 * 16, (len(prompt) - 1) // 16 * 16]


def test_image_fetched_from_an_allowed_local_url(client, count_text, image_server):
    url = f"http://localhost:{image_server.port}/photo.jpg"
    content = [{"type": "text", "text": "What is this?"}, _url_part(url)]
    assert _chat(client, content).usage.prompt_tokens == count_text(content) + PHOTO_TOKENS - 1
    assert ("/photo.jpg", f"localhost:{image_server.port}") in image_server.requests


def test_served_tokens_with_an_image_equal_single_process(stack, tiny_checkpoint):
    """Greedy tokens through the router (vision encode, prefill splice, KV transfer, decode)
    equal one process running the same models on the same prompt."""
    from shared.image_processing import ImageProcessingConfig, process_image_bytes
    from shared.model.loader import load_text_model
    from shared.model.vision import load_vision_model, splice_image_embeds
    from shared.runner import ModelRunner, SeqStep

    image = IMAGES["png"][0]
    request = pb.GenerateRequest(
        request_id="image-reference",
        messages=[pb.ChatMessage(role="user", parts=[
            pb.ContentPart(type="image_url", image_url=data_url(image)),
            pb.ContentPart(type="text", text="Describe it."),
        ])],
        sampling=pb.SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
    )  # fmt: skip
    with grpc.insecure_channel(router_address(stack)) as channel:
        chunks = list(pb_grpc.RouterStub(channel).Generate(request, timeout=120))
    served = [t for chunk in chunks for c in chunk.choices for t in c.token_ids]

    tokenizer = KimiTokenizer.from_dir(tiny_checkpoint)
    template = (tiny_checkpoint / "chat_template.jinja").read_text()
    text = render_chat(template, [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}, {"type": "text", "text": "Describe it."},
    ]}])  # fmt: skip
    pad = ModelConfig.from_dir(tiny_checkpoint).media_placeholder_token_id
    prompt = expand_placeholders(tokenizer.encode(text), [48], pad)
    processed = process_image_bytes(image, ImageProcessingConfig.from_dir(tiny_checkpoint))
    vision = load_vision_model(tiny_checkpoint)
    embeds = vision.encode(processed.pixel_values, [processed.grid_thw])
    model = load_text_model(tiny_checkpoint)
    runner = ModelRunner(model, num_pages=16, page_size=16)
    pages: list[int] = []
    runner.ensure_pages(pages, len(prompt) + 8)
    with torch.no_grad():
        rows = splice_image_embeds(model.embed_tokens(torch.tensor(prompt)), prompt, embeds, pad)
    logits = runner.run([SeqStep(prompt, 0, pages, rows)])
    expected = [int(logits[0].argmax())]
    while len(expected) < 8:
        logits = runner.run([SeqStep([expected[-1]], len(prompt) + len(expected) - 1, pages)])
        expected.append(int(logits[0].argmax()))
    assert served == expected


# ---------------------------------------------------------------- images that fail (400)

BAD_IMAGES = {
    "truncated-jpeg": (lambda port: data_url(PHOTO[: len(PHOTO) // 2], "image/jpeg"),
                       "truncated"),
    "random-bytes": (lambda port: data_url(np.random.default_rng(3).bytes(20)),
                     "not a supported image"),
    "30000x30000": (lambda port: data_url(png_bomb(30_000, 30_000)),
                    "image too large"),  # Pillow's own bomb check names the 900000000 pixels
    "broken-base64": (lambda port: "data:image/png;base64,@@@not-base64", "not valid base64"),
    "unresolvable-host": (lambda port: "http://images.kimiserve.invalid/photo.jpg",
                          "images.kimiserve.invalid does not resolve"),
    "loopback-url": (lambda port: f"http://127.0.0.1:{port}/photo.jpg",
                     "127.0.0.1 is a loopback address"),
    "metadata-url": (lambda port: "http://169.254.169.254/latest/meta-data/",
                     "169.254.169.254 is a cloud metadata address"),
    "redirect-to-loopback": (lambda port: f"http://localhost:{port}/to-loopback",
                             "127.0.0.1 is a loopback address"),
}  # fmt: skip


@pytest.mark.parametrize("name", list(BAD_IMAGES))
def test_bad_image_is_a_400_naming_the_problem(stack, client, image_server, name):
    url, message = BAD_IMAGES[name]
    image_server.requests.clear()
    connections = image_server.num_connections
    content = [{"type": "text", "text": "What is this?"}, _url_part(url(image_server.port))]
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, content)
    assert time.monotonic() - started < 10
    body = error.value.body
    assert body["type"] == "invalid_request_error" and body["param"] == "messages[0].content[1]"
    assert message in body["message"] and body["message"].startswith("messages[0].content[1]: ")
    if name == "loopback-url":  # refused before any connection
        assert image_server.num_connections == connections
    if name == "redirect-to-loopback":  # the first hop was allowed, the redirect was not
        assert [path for path, _ in image_server.requests] == ["/to-loopback"]
    _still_serving(stack, client)


def test_more_images_than_the_limit(stack, client):
    content = [_image_part(IMAGES["gif"][0], "image/gif")] * (MAX_IMAGES + 1)
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, content)
    assert f"{MAX_IMAGES + 1} images; this server accepts at most {MAX_IMAGES}" in str(
        error.value.body["message"]
    )
    _still_serving(stack, client)


def test_deployment_guide_image_example(stack, client):
    """The model card's `chat_with_image`
    (https://huggingface.co/moonshotai/Kimi-K2.5#6-model-usage, mirrored at
    https://github.com/WolframRavenwolf/Kimi-K2.5/blob/main/README.md): its public URL is
    refused here before any lookup or connection (only localhost is allowed), quickly and
    clearly; the guide's own form, the image as a base64 data URL (with its space after the
    comma), is served in both modes, sent with curl as the JSON body the card's openai calls send
    (the card downloads its logo; a logo drawn here stands in for it, with no network)."""
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "text", "text": "Describe this image in detail."},
                {"type": "image_url", "image_url": {"url": GUIDE_IMAGE_URL}},
            ],
        }
    ]
    started = time.monotonic()
    with pytest.raises(openai.BadRequestError) as error:
        client.chat.completions.create(model=MODEL, messages=messages, stream=False, max_tokens=16)
    assert time.monotonic() - started < 5
    assert "huggingface.co is not in this server's allowed_media_domains" in str(
        error.value.body["message"]
    )
    image_base64 = base64.b64encode(_logo_png()).decode()
    messages[0]["content"][1]["image_url"]["url"] = f"data:image/png;base64, {image_base64}"
    body = {"messages": messages, "model": MODEL, "stream": False}
    thinking = curl_chat(stack.base_url, json.dumps({**body, "max_tokens": 8192}))
    # The Instant-mode call with the card's line "for vLLM/SGLang".
    instant_kwargs = {"chat_template_kwargs": {"thinking": False}}
    instant = curl_chat(stack.base_url, json.dumps({**body, "max_tokens": 4096, **instant_kwargs}))
    for data, limit in ((thinking, 8192), (instant, 4096)):
        assert data["choices"][0]["message"]["role"] == "assistant"
        assert 0 < data["usage"]["completion_tokens"] <= limit
    assert thinking["choices"][0]["message"]["reasoning_content"]
    assert thinking["usage"]["completion_tokens_details"]["reasoning_tokens"] > 0
    # The bodies sample, and random weights may open `<think>` themselves (the parser then reads
    # reasoning, docs/parsers.md); greedy, this checkpoint does not, and nothing is reasoning.
    greedy = {**body, "max_tokens": 64, "temperature": 0, **instant_kwargs}
    greedy = curl_chat(stack.base_url, json.dumps(greedy))
    assert greedy["choices"][0]["message"]["content"]
    assert not greedy["choices"][0]["message"].get("reasoning_content")
    assert greedy["usage"]["completion_tokens_details"]["reasoning_tokens"] == 0
    assert thinking["usage"]["prompt_tokens"] > 90  # the logo's 90 placeholders are in the prompt
    assert thinking["usage"]["prompt_tokens"] == instant["usage"]["prompt_tokens"] - 1
    _still_serving(stack, client)


# ---------------------------------------------------------------- group D cases of cases.md


def test_k30_system_parts_and_two_images(client, count_text):
    """K30: text parts concatenated, two images in prompt order, each placeholder expanded."""
    content = [
        {"type": "text", "text": "Compare "},
        _image_part(IMAGES["png"][0]),
        {"type": "text", "text": "and"},
        _image_part(IMAGES["gif"][0], "image/gif"),
    ]
    messages = [
        {"role": "system", "content": [{"type": "text", "text": "Rule A. "},
                                       {"type": "text", "text": "Rule B."}]},
        {"role": "user", "content": content},
    ]  # fmt: skip
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2)
    assert response.usage.prompt_tokens == count_text([], messages) + (48 - 1) + (20 - 1)


@pytest.mark.parametrize(
    "width,height,tokens",
    [
        # 14.5k and 16.8k patches: MoonViT's attention over them takes 35 s and 100 s on 2 cores.
        pytest.param(2048, 1365, 3626, marks=pytest.mark.slow),
        (17, 64, 3),
        pytest.param(5000, 6000, 4189, marks=pytest.mark.slow),
    ],
)
def test_k32_prompt_tokens_grow_by_the_image_token_counts(client, count_text, width, height,
                                                          tokens):  # fmt: skip
    content = [_image_part(encode(Image.new("RGB", (width, height)))),
               {"type": "text", "text": "Describe it."}]  # fmt: skip
    assert _chat(client, content).usage.prompt_tokens == count_text(content) + tokens - 1


def test_k33_transparent_and_non_rgb_images_are_served(client, count_text):
    square = [(10, 10, 20, 20)]
    variants = []
    for mode, background, fill in (("RGBA", (255, 0, 0, 0), (0, 0, 0, 255)),
                                   ("LA", (128, 0), (0, 255)), ("L", 255, 0)):  # fmt: skip
        image = Image.new(mode, (64, 64), background)
        image.paste(fill, square[0])
        variants.append(_image_part(encode(image)))
    palette = Image.new("P", (64, 64), 0)
    palette.putpalette([255, 0, 0, 0, 0, 0])
    palette.paste(1, square[0])
    variants.append(_image_part(encode(palette, "PNG", transparency=0)))
    variants.append(_image_part(encode(palette, "GIF", transparency=0), "image/gif"))
    sixteen = np.full((64, 64), 65535, dtype=np.uint16)
    sixteen[10:20, 10:20] = 0
    variants.append(_image_part(encode(Image.fromarray(sixteen))))
    cmyk = Image.new("CMYK", (64, 64), (0, 0, 0, 0))
    cmyk.paste((0, 0, 0, 255), square[0])
    variants.append(_image_part(encode(cmyk, "JPEG", quality=95), "image/jpeg"))
    response = _chat(client, variants)  # 64x64 -> 84x84 padded: 3 x 3 = 9 tokens each
    assert response.usage.prompt_tokens == count_text(variants) + len(variants) * 8


@pytest.mark.parametrize(
    "url,message",
    [
        (data_url(encode(Image.new("RGB", (8, 8)), "PPM")), "not a supported image"),
        ("data:image/png;base64,@@@not-base64", "not valid base64"),
        (data_url(np.random.default_rng(5).bytes(20)), "not a supported image"),
        ("http://127.0.0.1:9/missing.png", "loopback address"),
        ("LOCAL/page.html", "returned text/html, not an image"),
    ],
)
def test_k35_undecodable_or_unsupported_images(stack, client, image_server, url, message):
    url = url.replace("LOCAL", f"http://localhost:{image_server.port}")
    content = [{"type": "text", "text": "What is this?"}, _url_part(url)]
    with pytest.raises(openai.BadRequestError) as error:
        _chat(client, content)
    body = error.value.body
    assert body["type"] == "invalid_request_error"
    assert body["message"].startswith("messages[0].content[1]: ") and message in body["message"]
    _still_serving(stack, client)

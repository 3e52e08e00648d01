"""Live scaling of the vision pool: registered vision workers come and go while image and text
requests run, and a killed one leaves after its heartbeats stop. Static `--vision` workers (run
by hand) still leave the rotation when they fail and come back when they answer again."""

from __future__ import annotations

import asyncio
import re
import signal
import threading
import time

import grpc
import openai
from image_utils import data_url, natural_photo_jpeg
from prometheus_client import CollectorRegistry
from stack_utils import free_port, router_address

from deploy.cli import format_status
from deploy.launcher import start_process
from proto import control_pb2 as ctl
from proto import control_pb2_grpc as ctl_grpc
from proto import kimiserve_pb2 as pb
from proto import kimiserve_pb2_grpc as pb_grpc
from proto import vision_pb2_grpc as vpb_grpc
from router.metrics import VisionCacheHits
from router.pools import Pool
from shared.chat_template import render_chat
from shared.tokenizer import KimiTokenizer

MODEL = "moonshotai/Kimi-K2.5"
IMAGE_TOKENS = 12  # 96x64 pads to 112x84: 4 x 3 blocks of 28
# The image chats' content; the URL of the image part differs from request to request.
IMAGE_CONTENT = [{"type": "text", "text": "What is it?"}, {"type": "image_url", "image_url": {}}]


def test_router_counts_vision_cache_hits_across_heartbeats_and_restarts():
    registry = CollectorRegistry()
    counters = VisionCacheHits(registry)
    beats = [("v0", 0, 2), ("v1", 1, 1), ("v0", 3, 2), ("v0", 3, 5), ("v0", 1, 0), ("p0", 0, 0)]
    for worker_id, hits, misses in beats:
        counters.update(worker_id, ctl.WorkerLoad(num_cache_hits=hits, num_cache_misses=misses))
    # v0: 3 hits and 5 misses, then a new process with 1 hit; v1: 1 and 1; p0 is no vision worker
    assert registry.get_sample_value("kimiserve:vision_cache_hits_total") == 3 + 1 + 1
    assert registry.get_sample_value("kimiserve:vision_cache_misses_total") == 5 + 0 + 1


def test_a_worker_registering_again_gets_a_fresh_channel_and_keeps_its_counts():
    async def scenario():
        pool = Pool("vision", vpb_grpc.VisionWorkerStub)
        worker = pool.add("vision-0", "127.0.0.1:1")
        worker.num_served, worker.state, old_channel = 7, "lost", worker.channel
        again = pool.add("vision-0", "127.0.0.1:1")
        await asyncio.sleep(0)
        await pool.close()
        return worker, again, old_channel

    worker, again, old_channel = asyncio.run(scenario())
    assert again is worker and worker.channel is not old_channel
    assert (worker.state, worker.num_served) == ("ready", 7)


def test_status_shows_the_vision_cache_and_pins():
    load = ctl.WorkerLoad(num_cached_images=3, cache_bytes=3 * 2**20 // 2)
    workers = [
        ctl.WorkerInfo(role="vision", worker_id="vision-0", address="127.0.0.1:5", state="ready",
                       load=load, num_inflight=1, num_served=9, num_pinned=2),
        ctl.WorkerInfo(role="decode", worker_id="decode-0", address="127.0.0.1:6",
                       state="draining", load=ctl.WorkerLoad(num_free_pages=3, num_total_pages=8)),
    ]  # fmt: skip
    assert format_status(workers).splitlines() == [
        "worker    role    state     address      in flight  served  free pages / cache",
        "decode-0  decode  draining  127.0.0.1:6  0          0       3/8",
        "vision-0  vision  ready     127.0.0.1:5  1          9       3 images, 1.5 MiB, 2 pinned",
    ]


def _client(stack) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{stack.base_url}/v1", api_key="x", max_retries=0, timeout=60)


def _workers(stack, role: str = "vision") -> dict[str, ctl.WorkerInfo]:
    with grpc.insecure_channel(router_address(stack)) as channel:
        reply = ctl_grpc.ControlStub(channel).ListWorkers(ctl.ListWorkersRequest(), timeout=5)
    return {w.worker_id: w for w in reply.workers if w.role == role}


def _metric(stack, sample: str) -> float:
    with grpc.insecure_channel(router_address(stack)) as channel:
        text = ctl_grpc.ControlStub(channel).Metrics(ctl.MetricsRequest(), timeout=5).text.decode()
    match = re.search(rf"^{re.escape(sample)} ([0-9.e+-]+)$", text, re.M)
    assert match, f"{sample} missing"
    return float(match.group(1))


def _image_chat(client: openai.OpenAI, seed: int, max_tokens: int = 4):
    """A chat about a photo of its own, so a vision worker encodes it: (finish reason, number
    of completion tokens, prompt tokens)."""
    image = {"type": "image_url",
             "image_url": {"url": data_url(natural_photo_jpeg(96, 64, seed), "image/jpeg")}}  # fmt: skip
    messages = [{"role": "user", "content": [IMAGE_CONTENT[0], image]}]
    reply = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=max_tokens,
                                           temperature=0)  # fmt: skip
    usage = reply.usage
    return reply.choices[0].finish_reason, usage.completion_tokens, usage.prompt_tokens


def _text_chat(client: openai.OpenAI, seed: int):
    reply = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "Hi"}], max_tokens=4, temperature=0
    )
    return reply.choices[0].finish_reason, reply.usage.completion_tokens, reply.usage.prompt_tokens


def _prompt_tokens(checkpoint, content) -> int:
    """Prompt tokens of one user message, an image's placeholder counted as its tokens."""
    template = (checkpoint / "chat_template.jinja").read_text()
    messages = [{"role": "user", "content": content}]
    ids = KimiTokenizer.from_dir(checkpoint).encode(render_chat(template, messages))
    num_images = 0 if isinstance(content, str) else sum(p["type"] == "image_url" for p in content)
    return len(ids) + num_images * (IMAGE_TOKENS - 1)


class _Load:
    """Threads sending requests until stopped; every outcome (or error) is kept."""

    def __init__(self, stack, senders) -> None:
        self.client = _client(stack)
        self.outcomes: list = []
        self._stop = threading.Event()
        self._seed = iter(range(1_000_000))
        self._threads = [threading.Thread(target=self._run, args=(s,)) for s in senders]

    def _run(self, send) -> None:
        while not self._stop.is_set():
            try:
                self.outcomes.append(send(self.client, next(self._seed)))
            except openai.APIError as exc:
                self.outcomes.append(exc)

    def __enter__(self) -> _Load:
        for thread in self._threads:
            thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        for thread in self._threads:
            thread.join(60)


def _pages(stack) -> dict[str, tuple[int, int]]:
    """(free, total) KV pages of the prefill and decode workers."""
    pages = {}
    for role in ("prefill", "decode"):
        for worker_id, w in _workers(stack, role).items():
            pages[worker_id] = (w.load.num_free_pages, w.load.num_total_pages)
    return pages


def _until(condition, within: float, what: str):
    deadline = time.monotonic() + within
    while not (found := condition()):
        assert time.monotonic() < deadline, what
        time.sleep(0.1)
    return found


def test_vision_pool_scales_1_3_1_while_image_and_text_requests_run(stack, tiny_checkpoint):
    """1 -> 3 -> 1 vision workers under image and text load: every request succeeds, the new
    workers take encodes, a leaving worker waits for the requests whose images it holds, and KV
    pages come back to their start."""
    start_pages = {"prefill-0": (512, 512), "decode-0": (512, 512)}  # all free (num_pages 512)
    _until(lambda: _pages(stack) == start_pages, 10, "no heartbeat reported the KV pages")
    draining_seen: list[ctl.WorkerInfo] = []
    with _Load(stack, [_image_chat, _image_chat, _text_chat]) as load:
        time.sleep(2)
        sizes = stack.scale({"vision": 3})
        assert sizes == {"vision": 3, "prefill": 1, "decode": 1}
        assert {w: i.state for w, i in _workers(stack).items()} == {
            "vision-0": "ready", "vision-1": "ready", "vision-2": "ready"}  # fmt: skip
        _until(lambda: all(_workers(stack)[n].num_served > 0 for n in ("vision-1", "vision-2")),
               30, "a new vision worker took no encode")  # fmt: skip
        assert _metric(stack, 'kimiserve:pool_workers{role="vision",state="ready"}') == 3

        # Long requests keep their images pinned while they decode; scale down once a leaving
        # worker holds some, and watch it drain with nothing encoding but images still held.
        long = [None, None, None]
        streams = [threading.Thread(target=lambda k=k: long.__setitem__(
            k, _image_chat(load.client, 500_000 + k, max_tokens=160)))
            for k in range(3)]  # fmt: skip
        for thread in streams:
            thread.start()
        _until(lambda: sum(_workers(stack)[n].num_pinned for n in ("vision-1", "vision-2")),
               20, "no image was pinned on a leaving worker")  # fmt: skip
        watching = threading.Event()

        def watch() -> None:
            while not watching.is_set():
                draining_seen.extend(w for w in _workers(stack).values() if w.state == "draining"
                                     and w.num_pinned and not w.num_inflight)  # fmt: skip
                time.sleep(0.05)

        watcher = threading.Thread(target=watch)
        watcher.start()
        started = time.monotonic()
        sizes = stack.scale({"vision": 1})
        took = time.monotonic() - started
        watching.set()
        watcher.join()
        assert sizes == {"vision": 1, "prefill": 1, "decode": 1}
        assert list(_workers(stack)) == ["vision-0"]
        for thread in streams:
            thread.join(60)
        time.sleep(1)
    print(
        f"{len(load.outcomes)} requests under load; scaling 3 -> 1 vision workers took "
        f"{took:.1f} s; seen draining with pins: {sorted({w.worker_id for w in draining_seen})}"
    )
    assert took < stack.config.vision_drain_timeout, took  # drained, not cut off by the grace
    assert draining_seen, "no leaving worker was seen holding images while draining"
    assert all(w.worker_id in ("vision-1", "vision-2") for w in draining_seen)
    image_prompt = _prompt_tokens(tiny_checkpoint, IMAGE_CONTENT)
    text_prompt = _prompt_tokens(tiny_checkpoint, "Hi")
    assert long == [("length", 160, image_prompt)] * 3, long
    errors = [o for o in load.outcomes if isinstance(o, Exception)]
    assert errors == [], errors[:3]
    assert len(load.outcomes) > 20
    assert set(load.outcomes) == {("length", 4, image_prompt), ("length", 4, text_prompt)}
    assert _metric(stack, 'kimiserve:pool_workers{role="vision",state="ready"}') == 1
    assert _metric(stack, "kimiserve:vision_cache_misses_total") > 0
    assert _metric(stack, 'kimiserve:pool_cached_images{role="vision"}') > 0
    assert _metric(stack, 'kimiserve:pool_cache_bytes{role="vision"}') > 0
    deadline = time.monotonic() + 10
    while (pages := _pages(stack)) != start_pages:
        assert time.monotonic() < deadline, f"KV pages not back to {start_pages}: {pages}"
        time.sleep(0.2)


def test_killed_vision_worker_leaves_after_missed_heartbeats_and_a_new_one_registers(stack):
    """SIGKILL an idle registered vision worker: its silence takes it out of rotation, the other
    one encodes meanwhile, and a replacement started by `scale` registers and takes traffic."""
    client = _client(stack)
    assert stack.scale({"vision": 2})["vision"] == 2
    victim = stack.child("vision-1")
    old_address = _workers(stack)["vision-1"].address
    stack.kill("vision-1")  # no request reaches it: only its silence can take it out
    killed = time.monotonic()
    lost = _until(lambda: (w := _workers(stack)["vision-1"]).state == "lost" and w, 10,
                  "the killed worker stayed in rotation")  # fmt: skip
    waited = time.monotonic() - killed
    print(f"killed vision worker out of rotation after {waited:.1f} s")
    assert lost.seconds_since_heartbeat > 3.0 and waited < 6.0
    for seed in range(4):  # all go to the one left
        assert _image_chat(client, 700_000 + seed)[:2] == ("length", 4)

    stack.forget(victim)  # as `kimiserve up` does with a worker that died
    assert list(_workers(stack)) == ["vision-0"]
    assert stack.scale({"vision": 2})["vision"] == 2
    new = _workers(stack)["vision-1"]
    assert new.state == "ready" and new.address != old_address
    served = new.num_served
    for seed in range(4):  # round robin: two of them go to the new worker
        assert _image_chat(client, 800_000 + seed)[:2] == ("length", 4)
    assert _workers(stack)["vision-1"].num_served == served + 2
    assert stack.scale({"vision": 1})["vision"] == 1


def _generate_image(stub, seed: int) -> pb.GenerateChunk:
    """The router's first answer to an image request (there is no prefill worker: an error)."""
    url = data_url(natural_photo_jpeg(96, 64, seed), "image/jpeg")
    request = pb.GenerateRequest(request_id=f"static-{seed}", messages=[
        pb.ChatMessage(role="user", parts=[pb.ContentPart(type="image_url", image_url=url)])])  # fmt: skip
    return next(iter(stub.Generate(request, timeout=60)))


def test_static_vision_worker_leaves_when_unreachable_and_returns_when_restarted(
    tiny_checkpoint,
):
    """A vision worker run by hand and given with `--vision`: a failed encode takes it out of
    rotation (503 at once), and it is back once it serves on the same address again."""
    port = free_port()
    vision_args = ["--model-path", str(tiny_checkpoint), "--worker-id", "hand-0", "--port",
                   str(port)]  # fmt: skip
    children = [start_process("vision", "vision_worker.server", vision_args, "127.0.0.1")]
    try:
        children[0].await_ready(120)
        router = start_process("router", "router.server", [
            "--model-path", str(tiny_checkpoint), "--vision", f"127.0.0.1:{port}"], "127.0.0.1")  # fmt: skip
        children.append(router)
        router.await_ready(120)
        with grpc.insecure_channel(router.address) as channel:
            control, stub = ctl_grpc.ControlStub(channel), pb_grpc.RouterStub(channel)

            def state() -> str:
                workers = control.ListWorkers(ctl.ListWorkersRequest(), timeout=5).workers
                return {w.worker_id: w.state for w in workers}["vision-static-0"]

            # Encoded, then no prefill worker: the vision worker did its part.
            assert "no prefill worker" in _generate_image(stub, 1).error.message
            assert state() == "ready"
            children[0].signal(signal.SIGKILL)
            children[0].wait(10)
            error = _generate_image(stub, 2).error
            assert (error.http_status, state()) == (503, "lost")
            assert "no vision worker is available" in error.message
            children[0] = start_process("vision", "vision_worker.server", vision_args,
                                        "127.0.0.1")  # fmt: skip
            children[0].await_ready(120)
            _until(lambda: state() == "ready", 10, "the restarted worker stayed out")
            assert "no prefill worker" in _generate_image(stub, 3).error.message
    finally:
        for child in children:
            child.signal(signal.SIGKILL)
            child.wait(10)
            child.close()

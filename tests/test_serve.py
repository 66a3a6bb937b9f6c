"""`sali serve`: a real server process on a loopback port, driven by the `openai` client and raw HTTP.

Every request loop here is bounded in count and time; the servers listen on 127.0.0.1 only.
"""

from __future__ import annotations

import json
import signal
import socket
import subprocess
import sys
import threading
import time
from contextlib import contextmanager

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from conftest import ROOT, THREADS, forcing_and_steering_heads, run_sali

httpx = pytest.importorskip("httpx")
openai = pytest.importorskip("openai")

HOST = "127.0.0.1"
PROMPT = "The baker asked my friend about"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@contextmanager
def running_server(*args: str, startup: float = 120.0):
    """Start `sali serve ARGS` on a free loopback port; yield (base URL, process); stop it with SIGTERM."""
    port = free_port()
    process = subprocess.Popen(
        [sys.executable, "-m", "sali", "serve", *args, "--host", HOST, "--port", str(port)],
        cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    base = f"http://{HOST}:{port}"
    deadline = time.monotonic() + startup
    try:
        while True:
            if process.poll() is not None:
                raise AssertionError(f"server exited: {process.stderr.read()}")
            try:
                if httpx.get(f"{base}/health", timeout=2).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not start in time"
            time.sleep(0.2)
        yield base, process
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()
                process.wait()


@pytest.fixture(scope="module")
def heads(tiny_model, tmp_path_factory):
    """A forcing head (always token 77, never an end token) and a random steering head."""
    force, steer = forcing_and_steering_heads(tiny_model, tmp_path_factory.mktemp("serve-heads"))
    return force, steer, tiny_model.llm.detokenize([77]).decode()


@pytest.fixture(scope="module")
def server(tiny, heads):
    force, steer, _ = heads
    with running_server(str(tiny.f32), "-H", str(force), "-H", str(steer), "-H", f"{steer}+{force}@0.5", "--ctx", "512",
                        "-t", THREADS) as (base, process):
        yield base, process
    assert process.returncode == 0, process.stderr.read()  # SIGTERM: a clean shutdown


@pytest.fixture()
def client(server):
    return openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", timeout=60, max_retries=0)


def chat(client, model: str, text: str = PROMPT, **extra):
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **extra)


def test_model_list_has_plain_model_and_one_entry_per_head(client):
    ids = [m.id for m in client.models.list().data]
    assert ids == ["tiny-f32", "tiny-f32+force77", "tiny-f32+steer", "tiny-f32+steer+force77@0.5"]


def test_a_combination_offered_on_the_command_line_equals_sali_generate_with_both_heads(client, tiny, heads):
    force, steer, piece = heads
    reply = chat(client, "tiny-f32+steer+force77@0.5", max_tokens=12, temperature=0)
    done = run_sali("generate", str(tiny.f32), "-H", str(steer), "-H", f"{force}@0.5", "-p", PROMPT, "-n", "12", "-t", THREADS)
    assert done.returncode == 0, done.stderr
    assert reply.choices[0].message.content == done.stdout.rstrip("\n")
    # force77 (bias 500 on token 77) comes second: it can lift 77 only where steer kept it among its
    # candidates (steer: its top 8 and 5, 9, 40), which here it never does, so the reply is steer's own
    assert reply.choices[0].message.content == chat(client, "tiny-f32+steer", max_tokens=12, temperature=0).choices[0].message.content
    assert reply.choices[0].message.content != piece * 12  # what lifting a masked token would give
    with pytest.raises(openai.NotFoundError):  # a combination the command line did not offer is not served
        chat(client, "tiny-f32+force77+steer", max_tokens=2)


def test_greedy_chat_equals_sali_generate(client, tiny, heads):
    _, steer, _ = heads
    reply = chat(client, "tiny-f32+steer", max_tokens=12, temperature=0)
    done = run_sali("generate", str(tiny.f32), "-H", str(steer), "-p", PROMPT, "-n", "12", "-t", THREADS)
    assert done.returncode == 0, done.stderr
    assert reply.choices[0].message.content == done.stdout[:-1]
    assert reply.choices[0].finish_reason in ("length", "stop")
    assert reply.usage.completion_tokens <= 12 and reply.usage.prompt_tokens > 5
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_a_long_shared_system_message_is_read_once_and_never_changes_an_answer(client):
    """Requests sharing a long opening keep its whole 256-token read batches (reported as
    OpenAI's cached_tokens), with the answer a fresh read gives."""
    system = " ".join(["The baker walked to the market and bought bread for the city."] * 12)

    def ask(question: str):
        messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
        return client.chat.completions.create(model="tiny-f32+steer", messages=messages, max_tokens=6, temperature=0)

    first = ask(PROMPT)
    assert 256 < first.usage.prompt_tokens < 500
    again = ask(PROMPT)
    assert again.usage.prompt_tokens_details.cached_tokens == 256
    assert again.choices[0].message.content == first.choices[0].message.content
    other = ask("A story about the river")
    assert other.usage.prompt_tokens_details.cached_tokens == 256
    chat(client, "tiny-f32", max_tokens=2)  # another opening: the cache no longer holds the system message
    fresh = ask("A story about the river")
    assert fresh.usage.prompt_tokens_details.cached_tokens == 0
    assert fresh.choices[0].message.content == other.choices[0].message.content


def test_alpha_zero_equals_plain_model_and_the_head_changes_text(client):
    plain = chat(client, "tiny-f32", max_tokens=16, temperature=0).choices[0].message.content
    zero = chat(client, "tiny-f32+steer", max_tokens=16, temperature=0, extra_body={"alpha": 0}).choices[0].message.content
    steered = chat(client, "tiny-f32+steer", max_tokens=16, temperature=0).choices[0].message.content
    assert zero == plain
    assert steered != plain


def test_forcing_head_and_finish_reason_length(client, heads):
    piece = heads[2]
    reply = chat(client, "tiny-f32+force77", max_tokens=6, temperature=0.8, seed=3)
    assert reply.choices[0].message.content == piece * 6
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 6


def test_streamed_chat_equals_the_plain_reply(client):
    whole = chat(client, "tiny-f32+steer", max_tokens=12, temperature=0)
    stream = chat(client, "tiny-f32+steer", max_tokens=12, temperature=0, stream=True, stream_options={"include_usage": True})
    pieces, finish, usage = [], None, None
    for event in stream:
        if event.usage is not None:
            usage = event.usage
        for choice in event.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == whole.choices[0].message.content
    assert finish == whole.choices[0].finish_reason
    assert usage is not None and usage.completion_tokens == whole.usage.completion_tokens


def test_completions_plain_and_streamed_equal_sali_generate_plain_format(client, tiny):
    whole = client.completions.create(model="tiny-f32", prompt=PROMPT, max_tokens=10, temperature=0)
    done = run_sali("generate", str(tiny.f32), "--format", "plain", "-p", PROMPT, "-n", "10", "-t", THREADS)
    assert whole.choices[0].text == done.stdout[:-1]
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny-f32", prompt=PROMPT, max_tokens=10, temperature=0, stream=True) if c.choices)
    assert streamed == whole.choices[0].text


def test_sampling_fields_are_applied(client):
    greedy = chat(client, "tiny-f32", max_tokens=24, temperature=0).choices[0].message.content
    penalised = chat(client, "tiny-f32", max_tokens=24, temperature=0, frequency_penalty=2.0,
                     extra_body={"repeat_penalty": 1.5}).choices[0].message.content
    assert penalised != greedy
    a = chat(client, "tiny-f32", max_tokens=24, temperature=1.0, seed=7, extra_body={"min_p": 0.0, "top_k": 0}).choices[0].message.content
    b = chat(client, "tiny-f32", max_tokens=24, temperature=1.0, seed=7, extra_body={"min_p": 0.0, "top_k": 0}).choices[0].message.content
    assert a == b  # a seed reproduces a sample


def test_concurrent_clients_get_complete_uninterleaved_replies(client, server):
    """12 streaming clients at once; each reply equals that prompt's reply asked alone."""
    prompts = [f"{PROMPT} number {i}" for i in range(12)]
    alone = {p: chat(client, "tiny-f32+steer", p, max_tokens=20, temperature=0).choices[0].message.content for p in prompts[:3]}
    results: dict[str, str] = {}
    errors: list[BaseException] = []

    def ask(text: str) -> None:
        try:
            own = openai.OpenAI(base_url=f"{server[0]}/v1", api_key="unused", timeout=120, max_retries=0)
            stream = chat(own, "tiny-f32+steer", text, max_tokens=20, temperature=0, stream=True)
            results[text] = "".join(e.choices[0].delta.content or "" for e in stream if e.choices)
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=ask, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=180)
    assert not errors and len(results) == len(prompts)
    for text in prompts[:3]:
        assert results[text] == alone[text]
    for text in prompts[3:]:
        assert results[text] == chat(client, "tiny-f32+steer", text, max_tokens=20, temperature=0).choices[0].message.content


def test_a_client_that_disconnects_mid_stream_stops_its_generation(server, client):
    base = server[0]
    before = httpx.get(f"{base}/health").json()["cancelled"]
    body = {"model": "tiny-f32+force77", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 480, "stream": True}
    with httpx.stream("POST", f"{base}/v1/chat/completions", json=body, timeout=60) as response:
        assert response.status_code == 200
        for line in response.iter_lines():
            if '"content": "' in line and '"content": ""' not in line:
                break  # one real token arrived; leave
    deadline = time.monotonic() + 30
    while httpx.get(f"{base}/health").json()["cancelled"] == before:
        assert time.monotonic() < deadline, "the abandoned generation was not stopped"
        time.sleep(0.1)
    assert chat(client, "tiny-f32+force77", max_tokens=3).usage.completion_tokens == 3  # the model is free


BAD = [
    ("unknown model", {"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
    ("unknown head", {"model": "tiny-f32+nope", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
    ("head path", {"model": "tiny-f32+/etc/passwd", "messages": [{"role": "user", "content": "hi"}]}, 404, "not served"),
    ("missing messages", {"model": "tiny-f32"}, 400, "messages"),
    ("missing model", {"messages": [{"role": "user", "content": "hi"}]}, 400, "model"),
    ("messages not a list", {"model": "tiny-f32", "messages": "hi"}, 400, "messages"),
    ("empty messages", {"model": "tiny-f32", "messages": []}, 400, "messages"),
    ("bad role", {"model": "tiny-f32", "messages": [{"role": "tool", "content": "hi"}]}, 400, "role"),
    ("last turn not user", {"model": "tiny-f32", "messages": [{"role": "assistant", "content": "hi"}]}, 400, "user"),
    ("wrong type", {"model": "tiny-f32", "messages": [{"role": "user", "content": "hi"}], "temperature": "hot"}, 400, "temperature"),
    ("number as string", {"model": "tiny-f32", "messages": [{"role": "user", "content": "hi"}], "max_tokens": "5"}, 400, "max_tokens"),
    ("negative max_tokens", {"model": "tiny-f32", "messages": [{"role": "user", "content": "hi"}], "max_tokens": -5}, 400, "max_tokens"),
    ("huge max_tokens", {"model": "tiny-f32", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 10**9}, 400, "max_tokens"),
    ("n > 1", {"model": "tiny-f32", "messages": [{"role": "user", "content": "hi"}], "n": 3}, 400, "n"),
    ("prompt too long", {"model": "tiny-f32", "messages": [{"role": "user", "content": "river " * 900}]}, 400, "too many"),
]


@pytest.mark.parametrize("name,body,status,words", BAD, ids=[b[0] for b in BAD])
def test_bad_chat_requests_get_openai_style_errors(server, name, body, status, words):
    response = httpx.post(f"{server[0]}/v1/chat/completions", json=body, timeout=30)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert words in error["message"] and error["type"]
    assert "Traceback" not in response.text


def test_invalid_json_oversized_body_bad_completion_and_unknown_route(server):
    base = server[0]
    cases = [
        (httpx.post(f"{base}/v1/chat/completions", content=b'{"model": "tiny-f32", "messages": [', headers={"Content-Type": "application/json"}), 400, "JSON"),
        (httpx.post(f"{base}/v1/chat/completions", content=b"x" * (2 << 20), headers={"Content-Type": "application/json"}), 413, "limit"),
        (httpx.post(f"{base}/v1/completions", json={"model": "tiny-f32", "prompt": 5}), 400, "prompt"),
        (httpx.post(f"{base}/v1/completions", json={"model": "tiny-f32", "prompt": ["a", "b"]}), 400, "prompt"),
        (httpx.post(f"{base}/v1/completions", json={"model": "tiny-f32", "prompt": "river " * 900}), 400, "too many"),
        (httpx.get(f"{base}/v1/nothing"), 404, "Not Found"),
    ]
    for response, status, words in cases:
        assert response.status_code == status, response.text
        assert words in response.json()["error"]["message"]
    assert httpx.get(f"{base}/health").json()["status"] == "ok"  # still serving


JSON_VALUES = st.recursive(
    st.none() | st.booleans() | st.integers(-10**12, 10**12) | st.floats(allow_nan=True) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=8,
)
FIELDS = ["model", "messages", "prompt", "max_tokens", "temperature", "top_p", "min_p", "seed", "stop", "stream", "alpha",
          "repeat_penalty", "frequency_penalty", "presence_penalty", "n"]


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(path=st.sampled_from(["/v1/chat/completions", "/v1/completions"]),
       replaced=st.dictionaries(st.sampled_from(FIELDS), JSON_VALUES, max_size=4),
       dropped=st.sets(st.sampled_from(FIELDS), max_size=3))
def test_fuzzed_request_bodies_get_a_reply_or_a_4xx_json_error(server, path, replaced, dropped):
    """Fields of the wrong type, out of range or missing: 2xx, or an OpenAI-style 4xx error, never a 5xx."""
    body = {"model": "tiny-f32+steer", "max_tokens": 3}
    body.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path else {"prompt": "hi"})
    body.update(replaced)
    for name in dropped:
        body.pop(name, None)
    response = httpx.post(server[0] + path, content=json.dumps(body, allow_nan=True), timeout=60,
                          headers={"Content-Type": "application/json"})
    assert response.status_code < 500, response.text
    if response.status_code >= 400:
        assert response.json()["error"]["message"]


def test_api_key_guards_every_route_but_health_and_sigint_stops_cleanly(tiny):
    with running_server(str(tiny.f32), "--api-key", "s3cret", "--ctx", "256", "-t", THREADS) as (base, process):
        assert httpx.get(f"{base}/health").status_code == 200
        assert httpx.get(f"{base}/v1/models").status_code == 401
        assert httpx.get(f"{base}/v1/models", headers={"Authorization": "Bearer wrong"}).status_code == 401
        refused = httpx.post(f"{base}/v1/chat/completions", json={"model": "tiny-f32", "messages": [{"role": "user", "content": "hi"}]})
        assert refused.status_code == 401 and refused.json()["error"]["code"] == "invalid_api_key"
        good = openai.OpenAI(base_url=f"{base}/v1", api_key="s3cret", timeout=60, max_retries=0)
        assert [m.id for m in good.models.list().data] == ["tiny-f32"]
        assert chat(good, "tiny-f32", max_tokens=3).usage.completion_tokens >= 1
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=30) == 0
        assert "Traceback" not in process.stderr.read()


def test_serve_without_fastapi_says_how_to_install(tiny, tmp_path):
    """With FastAPI hidden from the import system, `sali serve` names the extra to install."""
    blocker = tmp_path / "sitecustomize.py"
    blocker.write_text("import sys\nsys.modules['fastapi'] = None\n")
    done = run_sali("serve", str(tiny.f32), env={"PYTHONPATH": str(tmp_path)})
    assert done.returncode == 1 and "pip install 'sali[serve]'" in done.stderr


def test_serve_load_benchmark_smoke_mode(tiny, heads):
    """bench/serve_load.py --quick on the tiny model: both levels finish with no errors and the
    ratio to `sali generate` is printed."""
    done = subprocess.run(
        [sys.executable, "bench/serve_load.py", "--quick", "--model", str(tiny.f32), "--head", str(heads[1])],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    rows = [line.split() for line in done.stdout.splitlines() if line.split() and line.split()[0] in ("1", "4")]
    assert [row[0] for row in rows] == ["1", "4"] and all(row[-1] == "0" for row in rows)
    assert "ratio server tok/s at C=1 / sali generate tok/s:" in done.stdout

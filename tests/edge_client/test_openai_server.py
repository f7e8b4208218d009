"""`specbridge edge serve` end to end, with the official `openai` package as the client: a real verifier (a child
process) on a tiny pair, the edge server as a user starts it (another child process).

Greedy text equals the target's own greedy output, for completions and for chat (rendered with the target's
chat template); usage adds up; refusals come in OpenAI's error shape; a client that disconnects frees its
verifier session at once.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from dataclasses import dataclass

import httpx
import openai
import pytest

from edge_client.client import VerifierClient
from edge_client.launcher import EdgeServeProcess
from edge_client.openai_server import EdgeServeConfig
from tests.cloud_verifier.conftest import ServedPair

MODEL = "tiny-target"
API_KEY = "sk-local-test"
PROMPTS = ["The quick brown fox", "def fibonacci(n):\n    "]
MESSAGES = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "Where is Tokyo?"}]
MAX_TOKENS = 16
LONG_TOKENS = 200


@dataclass
class Endpoint:
    served: ServedPair
    base_url: str

    def client(self, api_key: str = API_KEY) -> openai.OpenAI:
        return openai.OpenAI(base_url=self.base_url, api_key=api_key, max_retries=0, timeout=60)

    def reference_text(self, prompt_ids: list[int], max_tokens: int = MAX_TOKENS) -> str:
        ids = self.served.reference_for_ids(prompt_ids, max_tokens)
        return self.served.vocab.decode_bytes(ids).decode("utf-8", errors="replace")

    def chat_ids(self, messages: list[dict[str, str]]) -> list[int]:
        """The target tokenizer's own rendering of the messages, as Hugging Face tokenizes a chat."""
        return list(self.served.vocab.tokenizer.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)["input_ids"])

    def live_sessions(self) -> int:
        async def stats() -> int:
            async with VerifierClient(self.served.address) as client:
                return (await client.stats()).live_sessions

        return asyncio.run(stats())

    def wait_for_no_live_sessions(self, timeout_s: float = 5.0) -> float:
        """Seconds until the verifier holds no session."""
        started = time.perf_counter()
        while self.live_sessions():
            assert time.perf_counter() - started < timeout_s, f"sessions still live after {timeout_s} s"
            time.sleep(0.02)
        return time.perf_counter() - started


def _endpoint(served: ServedPair, **options) -> Iterator[Endpoint]:
    config = EdgeServeConfig(server=served.address, draft=str(served.draft_onnx_dir), port=0, model_name=MODEL, **options)
    with EdgeServeProcess(config) as edge:
        yield Endpoint(served, edge.base_url)
    assert edge.stop() == 0, "edge serve did not shut down cleanly on SIGTERM"


@pytest.fixture(scope="module")
def chat_endpoint(chat_served: ServedPair, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Endpoint]:
    key_file = tmp_path_factory.mktemp("key") / "api_key"
    key_file.write_text(API_KEY + "\n")
    yield from _endpoint(chat_served, api_key_file=str(key_file))


@pytest.fixture(scope="module")
def plain_endpoint(plain_served: ServedPair) -> Iterator[Endpoint]:
    yield from _endpoint(plain_served)


def _assert_usage_adds_up(usage, completion_tokens: int, prompt_tokens: int) -> None:
    details = usage.completion_tokens_details
    extension = usage.model_extra["specbridge"]
    assert (usage.prompt_tokens, usage.completion_tokens) == (prompt_tokens, completion_tokens)
    assert usage.total_tokens == prompt_tokens + completion_tokens
    # Each round commits its accepted tokens plus one correction or bonus token (none after an accepted EOS).
    corrections = completion_tokens - details.accepted_prediction_tokens
    assert 0 <= corrections <= extension["rounds"] and details.rejected_prediction_tokens >= 0
    assert extension["mode"] == "speculative" and extension["draft_tokens"] >= extension["rounds"]
    assert extension["mean_accepted_length"] == pytest.approx(completion_tokens / extension["rounds"])
    assert extension["round_trip_ms"]["p50"] > 0 and extension["verify_ms"]["p50"] <= extension["round_trip_ms"]["p90"]


@pytest.mark.parametrize("prompt", PROMPTS)
def test_completion_equals_target_greedy(chat_endpoint: Endpoint, prompt: str) -> None:
    client = chat_endpoint.client()
    prompt_ids = chat_endpoint.served.prompt_ids(prompt)
    expected = chat_endpoint.reference_text(prompt_ids)

    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0)
    assert response.object == "text_completion" and response.model == MODEL
    assert response.choices[0].text == expected
    assert response.choices[0].finish_reason in ("length", "stop")
    completion_tokens = len(chat_endpoint.served.reference_for_ids(prompt_ids, MAX_TOKENS))
    _assert_usage_adds_up(response.usage, completion_tokens, len(prompt_ids))

    chunks = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS, temperature=0, stream=True,
                                            stream_options={"include_usage": True}))
    assert "".join(choice.text for chunk in chunks for choice in chunk.choices) == expected
    assert chunks[-2].choices[0].finish_reason == response.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == completion_tokens


def test_chat_equals_target_greedy_on_its_own_chat_template(chat_endpoint: Endpoint) -> None:
    client = chat_endpoint.client()
    prompt_ids = chat_endpoint.chat_ids(MESSAGES)
    expected = chat_endpoint.reference_text(prompt_ids)

    response = client.chat.completions.create(model=MODEL, messages=MESSAGES, max_completion_tokens=MAX_TOKENS,
                                              temperature=0)
    assert response.object == "chat.completion"
    assert response.choices[0].message.role == "assistant" and response.choices[0].message.content == expected
    completion_tokens = len(chat_endpoint.served.reference_for_ids(prompt_ids, MAX_TOKENS))
    _assert_usage_adds_up(response.usage, completion_tokens, len(prompt_ids))

    chunks = list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=MAX_TOKENS, temperature=0,
                                                 stream=True))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(chunk.choices[0].delta.content or "" for chunk in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == response.choices[0].finish_reason
    assert all(chunk.usage is None for chunk in chunks)  # no include_usage: no usage chunk


def test_stop_sequence_cuts_the_target_output_and_ends_the_session(chat_endpoint: Endpoint) -> None:
    prompt = PROMPTS[0]
    full = chat_endpoint.reference_text(chat_endpoint.served.prompt_ids(prompt), 40)
    stop = full[12:15]
    expected = full[: full.find(stop)]
    client = chat_endpoint.client()
    response = client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=[stop, "\x00"])
    assert response.choices[0].text == expected and response.choices[0].finish_reason == "stop"
    streamed = list(client.completions.create(model=MODEL, prompt=prompt, max_tokens=40, temperature=0, stop=stop,
                                              stream=True))
    assert "".join(chunk.choices[0].text for chunk in streamed) == expected
    assert chat_endpoint.wait_for_no_live_sessions() < 2.0  # the stop cancelled the session; the cancel lands at once


def test_sampling_with_a_seed_is_reproducible(chat_endpoint: Endpoint) -> None:
    client = chat_endpoint.client()
    texts = [client.completions.create(model=MODEL, prompt=PROMPTS[0], max_tokens=12, temperature=0.8, top_p=0.9,
                                       seed=-7).choices[0].text for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]


def test_concurrent_requests_each_get_the_target_output(chat_endpoint: Endpoint) -> None:
    async def scenario() -> list[str]:
        client = openai.AsyncOpenAI(base_url=chat_endpoint.base_url, api_key=API_KEY, max_retries=0)
        responses = await asyncio.gather(*(client.completions.create(model=MODEL, prompt=prompt, max_tokens=MAX_TOKENS,
                                                                     temperature=0) for prompt in PROMPTS * 2))
        return [response.choices[0].text for response in responses]

    expected = [chat_endpoint.reference_text(chat_endpoint.served.prompt_ids(prompt)) for prompt in PROMPTS * 2]
    assert asyncio.run(scenario()) == expected
    health = httpx.get(chat_endpoint.base_url.removesuffix("/v1") + "/health").json()
    assert health["status"] == "ok" and health["drafts_loaded"] >= 2  # one draft state per concurrent request


@pytest.mark.parametrize(("options", "param", "message"), [
    ({"n": 2}, "n", "n must be 1"),
    ({"logprobs": 2}, "logprobs", "not supported"),
    ({"frequency_penalty": 0.5}, "frequency_penalty", "not supported"),
    ({"extra_body": {"mirostat": 1}}, "mirostat", "Unrecognized request argument"),
    ({"temperature": 3}, "temperature", "must lie in"),
    ({"max_tokens": 0}, "max_tokens", ">= 1"),
    ({"stop": ["a", "b", "c", "d", "e"]}, "stop", "at most 4"),
    ({"prompt": [1, 2, 3]}, "prompt", "token ids"),
    ({"max_tokens": 10**6}, None, "exceeds this verifier's limit"),
])
def test_bad_parameters_get_openai_400(chat_endpoint: Endpoint, options: dict, param: str | None, message: str) -> None:
    arguments = {"model": MODEL, "prompt": "hi", "max_tokens": 4, **options}
    with pytest.raises(openai.BadRequestError) as caught:
        chat_endpoint.client().completions.create(**arguments)
    body = caught.value.response.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["type"] == "invalid_request_error" and body["error"]["param"] == param
    assert message in body["error"]["message"]


def test_unknown_model_missing_key_and_unsupported_chat_fields(chat_endpoint: Endpoint) -> None:
    with pytest.raises(openai.NotFoundError) as caught:
        chat_endpoint.client().completions.create(model="gpt-4o", prompt="hi")
    assert caught.value.body["code"] == "model_not_found" and MODEL in caught.value.body["message"]
    with pytest.raises(openai.AuthenticationError) as caught:
        chat_endpoint.client(api_key="wrong").models.list()
    assert caught.value.body["code"] == "invalid_api_key"
    with pytest.raises(openai.BadRequestError) as caught:
        chat_endpoint.client().chat.completions.create(model=MODEL, messages=[{"role": "tool", "content": "x"}])
    assert caught.value.body["param"] == "messages[0].role"
    with pytest.raises(openai.BadRequestError) as caught:
        chat_endpoint.client().chat.completions.create(model=MODEL, messages=MESSAGES, tools=[{
            "type": "function", "function": {"name": "f", "parameters": {}}}])
    assert caught.value.body["param"] == "tools"


def test_models_and_health(chat_endpoint: Endpoint) -> None:
    assert [model.id for model in chat_endpoint.client().models.list()] == [MODEL]
    assert chat_endpoint.client().models.retrieve(MODEL).owned_by == "specbridge"
    health = httpx.get(chat_endpoint.base_url.removesuffix("/v1") + "/health")
    assert health.status_code == 200 and health.json()["target_model"] == "hf"
    missing = httpx.get(chat_endpoint.base_url + "/engines")
    assert missing.status_code == 404 and set(missing.json()["error"]) == {"message", "type", "param", "code"}


def test_raw_stream_is_server_sent_events_ending_with_done(chat_endpoint: Endpoint) -> None:
    body = {"model": MODEL, "messages": MESSAGES, "max_tokens": 4, "temperature": 0, "stream": True}
    response = httpx.post(chat_endpoint.base_url + "/chat/completions", json=body, timeout=60,
                          headers={"Authorization": f"Bearer {API_KEY}"})
    assert response.headers["content-type"].startswith("text/event-stream")
    events = [line.removeprefix("data: ") for line in response.text.split("\n\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]" and all(json.loads(event)["object"] == "chat.completion.chunk" for event in events[:-1])


def _long_generation(endpoint: Endpoint) -> dict:
    """A request that runs for seconds: the target does not stop early on this prompt."""
    assert len(endpoint.served.reference_for_ids(endpoint.served.prompt_ids(PROMPTS[1]), LONG_TOKENS)) == LONG_TOKENS
    return {"model": MODEL, "prompt": PROMPTS[1], "max_tokens": LONG_TOKENS, "temperature": 0}


def test_a_disconnect_mid_stream_frees_the_verifier_session(chat_endpoint: Endpoint) -> None:
    body = {**_long_generation(chat_endpoint), "stream": True}
    with httpx.Client(base_url=chat_endpoint.base_url, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60) as http:
        with http.stream("POST", "/completions", json=body) as response:
            lines = response.iter_lines()  # held: dropping the iterator would close the response already
            assert next(lines).startswith("data: ")  # the first text is out: the session runs
            assert chat_endpoint.live_sessions() == 1
        # leaving the block closes the connection mid-stream
    assert chat_endpoint.wait_for_no_live_sessions() < 2.0


def test_a_disconnect_before_a_plain_answer_frees_the_verifier_session(chat_endpoint: Endpoint) -> None:
    body = _long_generation(chat_endpoint)
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(chat_endpoint.base_url + "/completions", json=body, timeout=1.0,
                   headers={"Authorization": f"Bearer {API_KEY}"})
    assert chat_endpoint.wait_for_no_live_sessions() < 2.0


def test_chat_on_a_target_without_chat_template_is_a_clear_400(plain_endpoint: Endpoint) -> None:
    client = plain_endpoint.client()
    with pytest.raises(openai.BadRequestError) as caught:
        client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4)
    assert "no chat template" in caught.value.body["message"] and caught.value.body["type"] == "invalid_request_error"
    with pytest.raises(openai.BadRequestError):
        list(client.chat.completions.create(model=MODEL, messages=MESSAGES, max_tokens=4, stream=True))
    assert client.completions.create(model=MODEL, prompt="hi", max_tokens=2, temperature=0).choices[0].text is not None


"""Drives crystald's HTTP API with the official `openai` package, as the
tools people connect to it do, and parses /metrics with prometheus_client.

usage: openai_client.py BASE_URL UNIX_SOCKET API_KEY MODEL PROMPT

BASE_URL is the TCP address (http://127.0.0.1:PORT), UNIX_SOCKET the path of
the HTTP Unix socket, PROMPT a user message whose greedy reply runs to at
least 8 tokens. Asserts as it goes (a failure exits non-zero with a
traceback) and prints a JSON summary for the Rust side to compare with the
daemon's own socket protocol.
"""
import json
import sys

import openai

try:  # openai 3 is built on httpx2; its http_client must be one of those.
    import httpx2 as httpx
except ImportError:
    import httpx
from prometheus_client.parser import text_string_to_metric_families

base, uds, key, model, prompt = sys.argv[1:6]
client = openai.OpenAI(base_url=base + "/v1", api_key=key, max_retries=0, timeout=60)
MESSAGES = [{"role": "user", "content": prompt}]
OPTS = dict(temperature=0, max_tokens=8, seed=7)


def metrics():
    r = httpx.get(base + "/metrics", headers={"Authorization": f"Bearer {key}"}, timeout=30)
    assert r.status_code == 200, r.text
    out = {}
    for fam in text_string_to_metric_families(r.text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def total(m, name):
    return sum(v for (n, _), v in m.items() if n == name)


summary = {}
before = metrics()

# /v1/models
models = client.models.list()
assert [m.id for m in models.data] == [model], models
summary["model"] = models.data[0].id

# Chat, whole.
chat = client.chat.completions.create(model=model, messages=MESSAGES, **OPTS)
assert chat.object == "chat.completion", chat
choice = chat.choices[0]
assert choice.message.role == "assistant"
assert choice.finish_reason in ("stop", "length"), choice.finish_reason
assert chat.usage.completion_tokens == 8 and choice.finish_reason == "length", chat
assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
cached = chat.usage.prompt_tokens_details.cached_tokens
assert isinstance(cached, int), chat.usage
summary["chat_text"] = choice.message.content
summary["chat_usage"] = chat.usage.model_dump()

# Chat, streamed with usage: the same text, piece by piece.
stream = client.chat.completions.create(
    model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True}, **OPTS
)
pieces, finish, usage, roles = [], None, None, []
for chunk in stream:
    assert chunk.object == "chat.completion.chunk", chunk
    if chunk.usage is not None:
        assert chunk.choices == [], chunk
        usage = chunk.usage
        continue
    delta = chunk.choices[0].delta
    if delta.role:
        roles.append(delta.role)
    if delta.content:
        pieces.append(delta.content)
    finish = chunk.choices[0].finish_reason or finish
assert roles == ["assistant"], roles
assert "".join(pieces) == summary["chat_text"], (pieces, summary["chat_text"])
assert finish == choice.finish_reason, finish
assert usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage
# The same prompt again: the KV pool served it in whole 16-token blocks,
# all but the last (partial, or holding the last token, whose logits start
# the reply).
cached = usage.prompt_tokens_details.cached_tokens
assert cached % 16 == 0 and usage.prompt_tokens - 16 <= cached < usage.prompt_tokens, usage
summary["stream_pieces"] = len(pieces)

# Log-probabilities.
lp = client.chat.completions.create(model=model, messages=MESSAGES, logprobs=True, top_logprobs=2, **OPTS)
content = lp.choices[0].logprobs.content
assert len(content) == lp.usage.completion_tokens, (len(content), lp.usage)
for t in content:
    assert len(t.top_logprobs) == 2 and t.logprob <= 0.0, t
    assert t.top_logprobs[0].logprob >= t.top_logprobs[1].logprob, t
assert lp.choices[0].message.content == summary["chat_text"]

# Completions, whole and streamed.
comp = client.completions.create(model=model, prompt="def fibonacci(n):", **OPTS)
assert comp.object == "text_completion", comp
summary["completion_text"] = comp.choices[0].text
streamed = "".join(
    c.choices[0].text for c in client.completions.create(model=model, prompt="def fibonacci(n):", stream=True, **OPTS)
)
assert streamed == summary["completion_text"], (streamed, summary["completion_text"])

# Errors arrive as the client's exceptions, with OpenAI's error object.
try:
    client.chat.completions.create(model=model, messages=MESSAGES, n=2, **OPTS)
    raise AssertionError("n=2 was accepted")
except openai.BadRequestError as e:
    assert e.status_code == 400 and e.body["param"] == "n", e.body
    summary["n2_error"] = e.body["message"]
try:
    openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
    raise AssertionError("a wrong key was accepted")
except openai.AuthenticationError as e:
    assert e.status_code == 401, e

# The Unix socket: the same API through httpx's Unix-socket transport.
unix_client = openai.OpenAI(
    base_url="http://localhost/v1",
    api_key=key,
    max_retries=0,
    http_client=httpx.Client(transport=httpx.HTTPTransport(uds=uds), timeout=60),
)
over_unix = unix_client.chat.completions.create(model=model, messages=MESSAGES, **OPTS)
assert over_unix.choices[0].message.content == summary["chat_text"]

# The counters moved: 6 finished requests (chat, stream, logprobs,
# completion x2, unix) and one refused for n=2.
after = metrics()
done = total(after, "crystald_requests_total") - total(before, "crystald_requests_total")
assert done == 7, done
refused = after.get(("crystald_requests_total", (("outcome", "invalid_request"),)), 0) - before.get(
    ("crystald_requests_total", (("outcome", "invalid_request"),)), 0
)
assert refused == 1, refused
tokens = total(after, "crystald_completion_tokens_total") - total(before, "crystald_completion_tokens_total")
assert tokens >= 6, tokens
ttft = after[("crystald_time_to_first_token_seconds_count", ())] - before.get(
    ("crystald_time_to_first_token_seconds_count", ()), 0
)
assert ttft == 6, ttft
assert total(after, "crystald_cached_tokens_total") > total(before, "crystald_cached_tokens_total")
build = [labels for (n, labels) in after if n == "crystald_build_info"]
assert dict(build[0])["model"] == model, build
summary["metrics_requests"] = done
print(json.dumps(summary))

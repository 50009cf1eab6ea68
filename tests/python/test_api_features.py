"""The API surface DeepSeek users rely on, through the official `openai` client against
`shardseek up` on a generated model (random weights, DeepSeek's special tokens and a template in
DeepSeek's format): structured output, tool calls, reasoning_content, the sampling surface,
vLLM/OpenAI fields accepted, /tokenize and /detokenize, X-Request-Id, cached_tokens.

Random weights cannot be asked for anything, so outputs are forced: tool calls and JSON by
constrained decoding (tool_choice, response_format), reasoning by a logit_bias on `</think>`,
sampling parameters by comparing against what they must equal. Skipped without a tokenizer.
"""

import json
import os
import urllib.error
import urllib.request

import pytest

openai = pytest.importorskip("openai")

URL = os.environ.get("SHARDSEEK_URL")
pytestmark = [
    pytest.mark.skipif(not URL, reason="SHARDSEEK_URL is not set"),
    # The reference fixture has no tokenizer: these tests run on the generated model.
    pytest.mark.skipif(bool(os.environ.get("SHARDSEEK_EXPECTED")), reason="needs a tokenizer"),
]

TOKENS = [10, 11, 12, 13, 14, 15]
MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 8},
        "age": {"type": "integer", "minimum": 0, "maximum": 120},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
    },
    "required": ["name", "age", "ok", "color"],
    "additionalProperties": False,
}

WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather of a city",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"enum": ["Paris", "Rome", "Oslo"]},
                "days": {"type": "integer", "minimum": 1, "maximum": 7},
            },
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {
        "name": "get_time",
        "description": "Current time in a time zone",
        "parameters": {
            "type": "object",
            "properties": {"utc": {"type": "boolean"}},
            "required": ["utc"],
            "additionalProperties": False,
        },
    },
}


@pytest.fixture(scope="module")
def client():
    return openai.OpenAI(base_url=URL.rstrip("/") + "/v1", api_key="unused", max_retries=0, timeout=300)


@pytest.fixture(scope="module")
def model(client):
    return client.models.list().data[0].id


class Resp:
    def __init__(self, status, headers, body):
        self.status_code, self.headers, self.text = status, headers, body

    def json(self):
        return json.loads(self.text)


class Http:
    """Plain HTTP for the endpoints the openai client has no method for (stdlib only)."""

    def __init__(self, base):
        self.base = base

    def post(self, path, json=None, headers=None):
        data = __import__("json").dumps(json).encode()
        req = urllib.request.Request(self.base + path, data=data, method="POST",
                                     headers={"content-type": "application/json", **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return Resp(r.status, {k.lower(): v for k, v in r.headers.items()}, r.read().decode())
        except urllib.error.HTTPError as e:
            return Resp(e.code, {k.lower(): v for k, v in e.headers.items()}, e.read().decode())


@pytest.fixture(scope="module")
def http():
    return Http(URL.rstrip("/"))


@pytest.fixture(scope="module")
def tok(http):
    """Token id of a text that is exactly one token."""

    def one(text):
        r = http.post("/tokenize", json={"prompt": text, "add_special_tokens": False})
        if r.status_code == 400 and "tokenizer" in r.text:
            pytest.skip("the server has no tokenizer")
        assert r.status_code == 200, r.text
        ids = r.json()["tokens"]
        assert len(ids) == 1, (text, ids)
        return ids[0]

    return one


def check_schema(v):
    assert isinstance(v, dict) and set(v) == {"name", "age", "ok", "color"}, v
    assert isinstance(v["name"], str) and len(v["name"]) <= 8
    assert isinstance(v["age"], int) and not isinstance(v["age"], bool) and 0 <= v["age"] <= 120
    assert isinstance(v["ok"], bool)
    assert v["color"] in ("red", "green", "blue")


def check_weather_args(args):
    a = json.loads(args)
    assert set(a) == {"city", "days"} and a["city"] in ("Paris", "Rome", "Oslo") and 1 <= a["days"] <= 7, a


# --- fields accepted ---------------------------------------------------------------------------

# Every field of OpenAI's and vLLM's chat/completions schemas, at a neutral value: none may be a
# 400 for its presence alone.
NEUTRAL_FIELDS = {
    "frequency_penalty": 0, "presence_penalty": 0, "logit_bias": {}, "user": "u", "store": False,
    "metadata": {"k": "v"}, "service_tier": "auto", "seed": 1, "top_p": 1, "n": 1,
    "parallel_tool_calls": True, "prediction": None, "audio": None, "modalities": ["text"],
    "reasoning_effort": None, "web_search_options": None, "function_call": None, "functions": None,
    "prompt_cache_key": "k", "safety_identifier": "s", "best_of": 1, "use_beam_search": False,
    "top_k": -1, "min_p": 0, "repetition_penalty": 1, "length_penalty": 1, "stop_token_ids": [],
    "include_stop_str_in_output": False, "ignore_eos": False, "min_tokens": 0,
    "skip_special_tokens": True, "spaces_between_special_tokens": True,
    "truncate_prompt_tokens": None, "prompt_logprobs": None, "allowed_token_ids": None,
    "bad_words": [], "echo": False, "add_generation_prompt": True, "continue_final_message": False,
    "add_special_tokens": False, "documents": None, "chat_template": None, "chat_template_kwargs": {},
    "mm_processor_kwargs": None, "structured_outputs": None, "guided_json": None, "guided_regex": None,
    "guided_choice": None, "guided_grammar": None, "guided_decoding_backend": "auto",
    "guided_whitespace_pattern": None, "priority": 0, "request_id": "r1", "logits_processors": None,
    "return_tokens_as_token_ids": False, "return_token_ids": False, "cache_salt": None,
    "kv_transfer_params": None, "vllm_xargs": None, "some_future_field": {"x": 1},
}


def test_every_known_field_is_accepted_at_its_neutral_value(client, model, tok):
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=2, temperature=0, extra_body=NEUTRAL_FIELDS
    )
    assert r.choices[0].message.role == "assistant"
    body = {k: v for k, v in NEUTRAL_FIELDS.items() if k not in ("add_generation_prompt", "continue_final_message",
                                                                  "documents", "chat_template", "chat_template_kwargs",
                                                                  "parallel_tool_calls")}
    body["suffix"] = None
    r = client.completions.create(model=model, prompt=TOKENS, max_tokens=2, temperature=0, extra_body=body)
    assert r.usage.completion_tokens == 2


def test_unimplemented_fields_are_refused_when_set(client, model):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=1,
                                       extra_body={"use_beam_search": True})
    assert e.value.body.get("param") == "use_beam_search"


# --- sampling surface --------------------------------------------------------------------------


def detok(http, ids, skip=False):
    r = http.post("/detokenize", json={"tokens": ids, "skip_special_tokens": skip})
    assert r.status_code == 200, r.text
    return r.json()["prompt"]


def test_logit_bias_forces_a_token(client, model, http, tok):
    x = tok(" the")
    r = client.completions.create(model=model, prompt=TOKENS, max_tokens=5, temperature=1, seed=3,
                                  logit_bias={str(x): 100}, extra_body={"ignore_eos": True})
    assert r.choices[0].text == detok(http, [x] * 5)


def test_min_tokens_holds_back_end_of_sequence(client, model, tok):
    eos = tok("<｜end▁of▁sentence｜>")
    kw = dict(model=model, prompt=TOKENS, max_tokens=10, temperature=0, logit_bias={str(eos): 100})
    assert client.completions.create(**kw).usage.completion_tokens == 1
    r = client.completions.create(**kw, extra_body={"min_tokens": 4})
    assert r.usage.completion_tokens == 5 and r.choices[0].finish_reason == "stop"


def test_min_p_one_is_greedy(client, model):
    kw = dict(model=model, prompt=TOKENS, max_tokens=8, extra_body={"ignore_eos": True})
    greedy = client.completions.create(temperature=0, **kw).choices[0].text
    for seed in (1, 2):
        r = client.completions.create(temperature=1.5, seed=seed, **{**kw, "extra_body": {"ignore_eos": True, "min_p": 1.0}})
        assert r.choices[0].text == greedy


def test_penalties_change_greedy_output_deterministically(client, model):
    kw = dict(model=model, prompt=TOKENS, max_tokens=16, temperature=0)
    plain = client.completions.create(**kw, extra_body={"ignore_eos": True}).choices[0].text
    outs = []
    for extra in ({"repetition_penalty": 3.0}, {"frequency_penalty": 2.0, "presence_penalty": 2.0}):
        a = client.completions.create(**kw, extra_body={"ignore_eos": True, **extra}).choices[0].text
        b = client.completions.create(**kw, extra_body={"ignore_eos": True, **extra}).choices[0].text
        assert a == b
        outs.append(a)
    assert any(o != plain for o in outs), "penalties changed nothing"
    with pytest.raises(openai.BadRequestError):
        client.completions.create(**kw, extra_body={"repetition_penalty": 0})


def test_skip_special_tokens_and_include_stop_str(client, model, http, tok):
    user = tok("<｜User｜>")
    kw = dict(model=model, prompt=TOKENS, max_tokens=3, temperature=0, logit_bias={str(user): 100},
              extra_body={"ignore_eos": True})
    assert client.completions.create(**kw).choices[0].text == ""
    r = client.completions.create(**{**kw, "extra_body": {"ignore_eos": True, "skip_special_tokens": False}})
    assert r.choices[0].text == "<｜User｜>" * 3
    x = tok(" the")
    word = detok(http, [x])
    kw = dict(model=model, prompt=TOKENS, max_tokens=4, temperature=0, logit_bias={str(x): 100}, stop=[word])
    assert client.completions.create(**kw).choices[0].text == ""
    r = client.completions.create(**kw, extra_body={"include_stop_str_in_output": True})
    assert r.choices[0].text == word and r.choices[0].finish_reason == "stop"


# --- structured output -------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_json_schema_output_validates(client, model, stream):
    fmt = {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}}
    for seed in range(4):
        kw = dict(model=model, messages=MESSAGES, max_tokens=80, temperature=1, seed=seed, response_format=fmt)
        if stream:
            text = "".join(c.choices[0].delta.content or "" for c in client.chat.completions.create(stream=True, **kw)
                           if c.choices)
        else:
            r = client.chat.completions.create(**kw)
            assert r.choices[0].finish_reason == "stop"
            text = r.choices[0].message.content
        check_schema(json.loads(text))


def test_json_object_and_completions_structured_outputs(client, model):
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"},
                                       extra_body={"structured_outputs": None})
    # A random model may fill the object until max_tokens; a finished one parses.
    if r.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(r.choices[0].message.content), dict)
    for stream in (False, True):
        kw = dict(model=model, prompt=TOKENS, max_tokens=80, temperature=1, seed=7,
                  extra_body={"structured_outputs": {"json": SCHEMA}})
        if stream:
            text = "".join(c.choices[0].text for c in client.completions.create(stream=True, **kw) if c.choices)
        else:
            text = client.completions.create(**kw).choices[0].text
        check_schema(json.loads(text))
    r = client.completions.create(model=model, prompt=TOKENS, max_tokens=10, temperature=1, seed=1,
                                  extra_body={"guided_choice": ["yes", "no"]})
    assert r.choices[0].text in ("yes", "no")


def test_bad_schema_is_400(client, model):
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, response_format={
            "type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "no-such-type"}}})


# --- tools -------------------------------------------------------------------------------------


@pytest.mark.parametrize("stream", [False, True])
def test_named_tool_choice_returns_a_parsed_call(client, model, stream):
    kw = dict(model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=60, temperature=1, seed=2,
              tool_choice={"type": "function", "function": {"name": "get_weather"}})
    if not stream:
        r = client.chat.completions.create(**kw)
        c = r.choices[0]
        assert c.finish_reason == "tool_calls"
        assert len(c.message.tool_calls) == 1
        call = c.message.tool_calls[0]
        assert call.type == "function" and call.id and call.function.name == "get_weather"
        check_weather_args(call.function.arguments)
        return
    calls, reasons = {}, []
    for ch in client.chat.completions.create(stream=True, **kw):
        if not ch.choices:
            continue
        d = ch.choices[0].delta
        for tc in d.tool_calls or []:
            e = calls.setdefault(tc.index, {"name": "", "args": ""})
            e["name"] += tc.function.name or ""
            e["args"] += tc.function.arguments or ""
        if ch.choices[0].finish_reason:
            reasons.append(ch.choices[0].finish_reason)
    assert reasons == ["tool_calls"]
    assert [c["name"] for c in calls.values()] == ["get_weather"]
    check_weather_args(calls[0]["args"])


def test_required_tool_choice_calls_one_of_the_tools(client, model):
    for seed in range(3):
        r = client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER, TIME], max_tokens=120,
                                           temperature=1, seed=seed, tool_choice="required")
        c = r.choices[0]
        assert c.finish_reason == "tool_calls" and c.message.tool_calls
        for call in c.message.tool_calls:
            assert call.function.name in ("get_weather", "get_time")
            args = json.loads(call.function.arguments)
            if call.function.name == "get_weather":
                check_weather_args(call.function.arguments)
            else:
                assert isinstance(args["utc"], bool)


def test_tool_history_auto_and_none(client, model):
    history = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": "{\"city\": \"Paris\", \"days\": 1}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "sunny"},
    ]
    for choice in ("auto", "none"):
        r = client.chat.completions.create(model=model, messages=history, tools=[WEATHER], tool_choice=choice,
                                           max_tokens=8, temperature=0)
        c = r.choices[0]
        assert c.finish_reason in ("stop", "length", "tool_calls")
        if choice == "none":
            assert not c.message.tool_calls
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=MESSAGES, tools=[WEATHER], max_tokens=4,
                                       tool_choice={"type": "function", "function": {"name": "nope"}})


# --- reasoning ---------------------------------------------------------------------------------


def test_reasoning_content_is_split_at_think_end(client, model, http, tok):
    end = tok("</think>")
    thinking = {"chat_template_kwargs": {"thinking": True}, "logit_bias": {str(end): 6.0}}
    # The raw text the model produced, through completions on the same prompt and seed.
    rendered = http.post("/tokenize", json={"messages": MESSAGES, "chat_template_kwargs": {"thinking": True}}).json()
    split_seen = False
    for seed in range(6):
        kw = dict(model=model, max_tokens=20, temperature=1, seed=seed)
        r = client.chat.completions.create(messages=MESSAGES, extra_body=thinking, **kw)
        m = r.choices[0].message
        raw = client.completions.create(prompt=rendered["tokens"], logit_bias={str(end): 6.0}, **kw).choices[0].text
        reasoning = getattr(m, "reasoning_content", None) or ""
        content = m.content or ""
        if "</think>" in raw:
            split_seen = True
            before, after = raw.split("</think>", 1)
            assert reasoning == before and content == after, (raw, reasoning, content)
            # Streaming gives the same split.
            sr, sc = "", ""
            for ch in client.chat.completions.create(messages=MESSAGES, extra_body=thinking, stream=True, **kw):
                if ch.choices:
                    d = ch.choices[0].delta
                    sr += getattr(d, "reasoning_content", None) or ""
                    sc += d.content or ""
            assert (sr, sc) == (reasoning, content)
        else:
            assert reasoning == raw and content == ""
    assert split_seen, "no seed produced </think>"
    # Without thinking, the reply is all content.
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, temperature=0)
    assert not getattr(r.choices[0].message, "reasoning_content", None)


# --- operations --------------------------------------------------------------------------------


def test_tokenize_detokenize_round_trip(http, model):
    r = http.post("/tokenize", json={"model": model, "prompt": "Hello world"})
    assert r.status_code == 200
    v = r.json()
    assert v["count"] == len(v["tokens"]) and v["max_model_len"] > 0
    assert http.post("/detokenize", json={"model": model, "tokens": v["tokens"]}).json()["prompt"].endswith("Hello world")
    r = http.post("/tokenize", json={"messages": MESSAGES})
    assert r.status_code == 200 and r.json()["count"] > 0


def test_request_id_is_echoed(http, model):
    r = http.post("/v1/completions", headers={"X-Request-Id": "my-req-42"},
                  json={"model": model, "prompt": TOKENS, "max_tokens": 1})
    assert r.status_code == 200 and r.headers["x-request-id"] == "my-req-42"
    r = http.post("/v1/completions", json={"model": model, "prompt": TOKENS, "max_tokens": 1})
    assert r.headers.get("x-request-id")


def test_cached_tokens_are_reported(client, model):
    prompt = [(7 * i) % 200 + 10 for i in range(200)]
    client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
    r = client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0)
    assert r.usage.prompt_tokens_details.cached_tokens >= 128


def test_n_samples_share_the_prompt_prefill(client, model):
    # A prompt no earlier request used: only the first sample can have filled the cache.
    words = " ".join(f"w{(i * 7919 + os.getpid()) % 9973}" for i in range(160))
    r = client.chat.completions.create(model=model, messages=[{"role": "user", "content": words}],
                                       n=3, max_tokens=2, temperature=1, seed=5)
    assert len(r.choices) == 3
    assert r.usage.prompt_tokens >= 128
    # Every full 64-token block of the prompt came from the first sample's prefill.
    assert r.usage.prompt_tokens_details.cached_tokens >= (r.usage.prompt_tokens // 64 - 1) * 64

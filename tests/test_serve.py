"""`vptq serve` (issue 28): a real server process on 127.0.0.1 (a free port) over a tiny quantized
Llama on CPU (its linears on the CPU kernels), driven by the official `openai` client (streaming and
not, concurrent requests decoded as one batch) and by plain HTTP for the refusals."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest
import torch

openai = pytest.importorskip("openai")

from vptq_service.serve.run import exposure_warning  # noqa: E402

from tests.test_architectures import token_ids  # noqa: E402 - the tiny models' tokenizer fields
from tests.test_generate import home, run  # noqa: E402,F401 - VPTQ_HOME, the CLI (the tiny folder: conftest)

KEY = "test-key"
MODEL = "tiny-q"


@pytest.fixture(scope="module")
def server(quantized_dir, tmp_path_factory):  # noqa: F811
    """`vptq serve DIR` in its own process; yields (base URL, log path); the log is checked at the end."""
    from vptq_service.serve.launch import launch

    log = tmp_path_factory.mktemp("serve") / "server.log"
    try:
        proc, url = launch(quantized_dir, "--api-key", KEY, "--served-name", MODEL, "--max-batch", "4",
                           "--max-tokens", "4096", log=log)
    except RuntimeError as e:
        pytest.fail(str(e))
    yield url, log
    proc.terminate()
    proc.wait(timeout=30)
    text = log.read_text()
    assert "Traceback" not in text, text[-3000:]


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)


def test_models_and_health(server, client):
    assert [m.id for m in client.models.list().data] == [MODEL]
    h = httpx.get(server[0] + "/health").json()
    assert h["status"] == "ok" and h["model"] == MODEL


def test_completion_streaming_equals_non_streaming(client):
    r = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0)
    c = r.choices[0]
    assert r.usage.prompt_tokens > 0 and r.usage.completion_tokens == 8 and c.finish_reason == "length"
    assert r.usage.total_tokens == r.usage.prompt_tokens + 8 and c.text
    streamed = client.completions.create(model=MODEL, prompt="Once upon a time", max_tokens=8, temperature=0,
                                         stream=True)
    assert "".join(ch.choices[0].text for ch in streamed) == c.text


def test_chat_streaming_usage_and_seed(client):
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi!"}]
    r = client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0)
    assert r.choices[0].message.role == "assistant" and r.usage.completion_tokens <= 6
    chunks = list(client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=6, temperature=0,
                                                 stream=True, stream_options={"include_usage": True}))
    text = "".join(ch.choices[0].delta.content or "" for ch in chunks if ch.choices)
    assert text == r.choices[0].message.content
    assert chunks[-1].usage.completion_tokens == r.usage.completion_tokens
    sampled = [client.chat.completions.create(model=MODEL, messages=msgs, max_tokens=10, temperature=1.0,
                                              top_p=0.9, seed=7).choices[0].message.content for _ in range(2)]
    assert sampled[0] == sampled[1]  # same seed, same text


def test_stop_string_ends_the_text_before_it(client):
    full = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0).choices[0].text
    stop = full[len(full) // 2: len(full) // 2 + 3]
    assert stop
    r = client.completions.create(model=MODEL, prompt="Hello", max_tokens=12, temperature=0, stop=[stop])
    assert r.choices[0].text == full[: full.find(stop)] and r.choices[0].finish_reason == "stop"


def test_concurrent_requests_decode_as_one_batch(server, client):
    """Four requests at once: each gets the text it gets alone, and decode passes held several."""
    prompts = ["The cat", "A long time ago in a galaxy", "1 2 3", "Paris is"]
    alone = [client.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0).choices[0].text
             for p in prompts]

    async def together():
        aclient = openai.AsyncOpenAI(base_url=server[0] + "/v1", api_key=KEY, max_retries=0, timeout=60)
        rs = await asyncio.gather(*[aclient.completions.create(model=MODEL, prompt=p, max_tokens=24, temperature=0)
                                    for p in prompts])
        await aclient.close()
        return [r.choices[0].text for r in rs]

    assert asyncio.run(together()) == alone
    metrics = httpx.get(server[0] + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    one = float(next(line.split()[-1] for line in metrics.splitlines()
                     if line.startswith('vptq_decode_batch_size_bucket{le="1.0"}')))
    total = float(next(line.split()[-1] for line in metrics.splitlines()
                       if line.startswith("vptq_decode_batch_size_count")))
    assert total > one  # some decode passes ran several sequences
    assert "vptq_requests_total" in metrics and "vptq_time_to_first_token_seconds_bucket" in metrics


def test_client_disconnect_cancels_the_sequence(server):
    url, _ = server
    body = {"model": MODEL, "prompt": "Tell me a story", "max_tokens": 480, "temperature": 0, "stream": True}
    with httpx.stream("POST", url + "/v1/completions", json=body, headers={"Authorization": f"Bearer {KEY}"},
                      timeout=60) as r:
        assert r.status_code == 200
        next(r.iter_lines())  # the first event, then the client goes away
    deadline = time.monotonic() + 20
    while httpx.get(url + "/health").json()["running"] and time.monotonic() < deadline:
        time.sleep(0.1)
    metrics = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {KEY}"}).text
    assert "vptq_cancelled_sequences 1.0" in metrics


BAD = [
    # (body or raw bytes, headers, status, error code or param that must be named)
    (b'{"model": "tiny-q", "prompt": ', {}, 400, None),  # malformed JSON
    ({"model": "gpt-4", "prompt": "hi"}, {}, 404, "model_not_found"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 0}, {}, 400, "max_tokens"),
    ({"model": MODEL, "prompt": "hi", "max_tokens": 1000}, {}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "hi " * 600}, {}, 400, "context_length_exceeded"),
    ({"model": MODEL, "prompt": "hi", "temperature": -1}, {}, 400, "temperature"),
    ({"model": MODEL, "prompt": "hi", "n": 2}, {}, 400, "n"),
    ({"model": MODEL, "prompt": 5}, {}, 400, "prompt"),
    ({"model": MODEL, "messages": []}, {}, 400, "messages"),
    ({"model": MODEL, "prompt": "hi"}, {"Authorization": "Bearer wrong"}, 401, "invalid_api_key"),
]


@pytest.mark.parametrize("body,headers,status,named", BAD)
def test_bad_input_is_an_openai_error(server, body, headers, status, named):
    url, _ = server
    path = "/v1/chat/completions" if isinstance(body, dict) and "messages" in body else "/v1/completions"
    headers = {"Authorization": f"Bearer {KEY}", "Content-Type": "application/json", **headers}
    r = httpx.post(url + path, content=body if isinstance(body, bytes) else None,
                   json=None if isinstance(body, bytes) else body, headers=headers, timeout=30)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["message"] and err["type"] and "Traceback" not in r.text
    if named:
        assert named in (err["code"], err["param"]), err


def test_unknown_route_and_missing_key(server):
    url, _ = server
    r = httpx.get(url + "/v1/nothing", headers={"Authorization": f"Bearer {KEY}"})
    assert r.status_code == 404 and r.json()["error"]["message"]
    assert httpx.get(url + "/v1/models").status_code == 401
    assert httpx.get(url + "/health").status_code == 200  # health needs no key


def test_queue_full_is_429():
    """An engine whose thread is not running keeps every request waiting: past --max-queue, 429."""
    from fastapi.testclient import TestClient
    from vptq_service.serve.api import create_app
    from vptq_service.serve.engine import Engine

    class Tok:
        eos_token_id, pad_token_id = 0, 0

        def __call__(self, text, add_special_tokens=True):
            return type("E", (), {"input_ids": [1, 2, 3]})()

    class Model:
        config = type("C", (), {"max_position_embeddings": 64})()
        generation_config = type("G", (), {"eos_token_id": 0})()

        def parameters(self):
            import torch

            yield torch.zeros(1)

    engine = Engine(Model(), Tok(), max_batch=1, max_queue=1)
    app = create_app(engine, "m")
    body = {"model": "m", "prompt": "x", "max_tokens": 2}
    with TestClient(app) as tc:
        import threading

        first = threading.Thread(target=lambda: tc.post("/v1/completions", json=body), daemon=True)
        first.start()
        deadline = time.monotonic() + 10
        while engine.queue_depth < 1 and time.monotonic() < deadline:
            time.sleep(0.01)
        r = tc.post("/v1/completions", json=body)
        assert r.status_code == 429 and r.json()["error"]["code"] == "rate_limit_exceeded"
        for s in list(engine.waiting):  # release the first request before the client closes
            s.emit(("error", "stopped"))
        first.join(timeout=30)


def test_exposure_warning():
    assert exposure_warning("127.0.0.1", None) is None
    assert exposure_warning("0.0.0.0", "k") is None
    w = exposure_warning("0.0.0.0", None)
    assert w.startswith("warning:") and "--api-key" in w and "\n" not in w


def test_serve_pulls_a_registry_name_verified(quantized_dir, home, monkeypatch):  # noqa: F811
    """NAME[:VERSION] is pulled (sha256-verified) into VPTQ_HOME's cache, as `vptq generate` does, and
    served under that name; bad options and unknown names are one-line errors."""
    import vptq_service.serve.run as serve_run
    from vptq_service.store.artifacts import open_artifact_store
    from vptq_service.store.registry import Registry

    calls = []
    monkeypatch.setattr(serve_run, "serve", lambda path, model_id, **kw: calls.append((path, model_id, kw)))
    Registry(open_artifact_store()).publish("tiny", "v1", quantized_dir)
    code, out, err = run("serve", "tiny:v1", "--port", "9001")
    assert code == 0, err
    path, model_id, kw = calls[0]
    assert path == str(home / "cache" / "artifacts" / "tiny" / "v1") and model_id == "tiny:v1"
    assert kw["host"] == "127.0.0.1" and kw["port"] == 9001 and kw["api_key"] is None
    for args, code_, needle in ((["serve", "bad name!"], 2, "does not exist"),
                                (["serve", "tiny", "--port", "0"], 2, "--port 0"),
                                (["serve", "tiny", "--max-batch", "0"], 2, "--max-batch 0"),
                                (["serve", "nosuch:v9"], 1, "nosuch")):
        code, out, err = run(*args)
        assert code == code_ and needle in err and len(err.strip().splitlines()) == 1, (args, err)


def test_public_bind_without_key_warns_in_one_line(quantized_dir, monkeypatch):  # noqa: F811
    """`--host 0.0.0.0` without --api-key: one warning line on stderr before anything is loaded."""
    import vptq_service.serve.run as serve_run

    def stop(*a, **k):
        raise RuntimeError("stopped before loading")

    monkeypatch.setattr(serve_run, "load_engine", stop)
    code, out, err = run("serve", quantized_dir, "--host", "0.0.0.0")
    lines = err.strip().splitlines()
    assert code == 1 and lines[0].startswith("warning: serving on 0.0.0.0 without authentication")
    assert lines[1].startswith("error: RuntimeError: stopped before loading") and len(lines) == 2
    code, out, err = run("serve", quantized_dir, "--host", "0.0.0.0", "--api-key", "k")
    assert "warning" not in err


def test_bad_graph_settings_are_refused_by_name_before_loading(quantized_dir, monkeypatch):  # noqa: F811
    """VPTQ_SERVE_GRAPHS / VPTQ_SERVE_GRAPH_TOKENS / VPTQ_SERVE_COMPILE with a bad value: one usage line naming the setting (exit 2),
    before the model is loaded."""
    import vptq.generate

    monkeypatch.setattr(vptq.generate, "load_for_generation", lambda *a, **k: pytest.fail("the model was loaded"))
    for env, val in (("VPTQ_SERVE_GRAPH_TOKENS", "lots"), ("VPTQ_SERVE_GRAPH_TOKENS", "1"),
                     ("VPTQ_SERVE_GRAPHS", "yes"), ("VPTQ_SERVE_COMPILE", "on")):
        monkeypatch.setenv(env, val)
        code, out, err = run("serve", quantized_dir)
        assert code == 2 and err.startswith(f"error: {env}: {val!r}") and len(err.strip().splitlines()) == 1, err
        monkeypatch.delenv(env)


def test_cuda_warm_up_compiles_every_kernel_route_before_the_port_opens():
    """The CUDA gemv kernels are compiled per token-row count (1..FUSED_MAX_ROWS) and more rows take the
    dequantize kernel: a warm-up at 2 and 1 rows left each new prompt length to compile on its first request
    (H100, `vptq serve --device cuda`, 2-bit layout: time to first token 8.6 s at one client, 0.24 s once
    compiled)."""
    from vptq_service.serve.run import warm_up_rows

    from vptq.kernels.dispatch import FUSED_MAX_ROWS

    cuda = warm_up_rows("cuda")
    assert set(range(1, FUSED_MAX_ROWS + 1)) <= set(cuda) and max(cuda) > FUSED_MAX_ROWS


def test_cpu_warm_up_loads_every_kernel_variant_before_the_port_opens(quantized_dir):  # noqa: F811
    """The CPU kernels are generated per mode and, for histograms, per token-row count (1..rows_apart), with a
    batched mode above and a dequantize above MAX_ROWS: a warm-up at 2 and 1 rows left the batched mode to compile on
    the first batch of 4-8 rows (a 12 s stall of every client at 4 clients on a fresh install, bench/RESULTS.md,
    "Lanes"). After the warm-up, no row count a request can bring loads a kernel."""
    from vptq_service.serve.run import load_engine, warm_up_rows

    from vptq.kernels import cpu, cpu_source

    assert max(warm_up_rows("cpu")) > cpu.MAX_ROWS  # the dequantize of a long prefill
    eng = load_engine(str(quantized_dir), "cpu")
    loaded = cpu_source.kernel.cache_info().currsize
    with torch.no_grad():
        for n in range(1, cpu.MAX_ROWS + 3):
            eng.model(input_ids=torch.zeros((1, n), dtype=torch.long))
    assert cpu_source.kernel.cache_info().currsize == loaded



def decode_schedule(model, tok, a: tuple[str, int], b: tuple[str, int], graphs: bool,
                    tokens: int | None = None) -> tuple[list[torch.Tensor], int, tuple]:
    """Greedy request A alone, B joining at step 5, each (prompt, max_tokens), through one Engine on CPU (graphs:
    a lone sequence on serve/graph.py's static cache, eager here; tokens: its length): (every logits row sampled
    from, in order; the steps A ran on the static cache; the two finish reasons)."""
    import vptq_service.serve.engine as engine_mod
    from vptq_service.serve.engine import Engine, Sampling, Sequence

    seen: list[torch.Tensor] = []
    sample = engine_mod.sample
    engine_mod.sample = lambda logits, s, gen: seen.append(logits) or sample(logits, s, gen)
    try:
        eng = Engine(model, tok, max_batch=4, graphs=graphs)
        if graphs and tokens:
            eng.graph.max_len = tokens
        sa, sb = (Sequence(eng.encode(text), Sampling(max_tokens=n, temperature=0), emit=lambda e: None)
                  for text, n in (a, b))
        eng.submit(sa)
        static_steps = 0
        for i in range(30):
            if i == 5:
                eng.submit(sb)
            eng.step()
            static_steps += eng.batch.static is not None
            if sa.finish and sb.finish:
                break
    finally:
        engine_mod.sample = sample
    return seen, static_steps, (sa.finish, sb.finish)


def test_lone_sequence_static_cache_gives_the_dynamic_paths_logits(quantized_dir, monkeypatch, caplog):  # noqa: F811
    """On CUDA a lone sequence decodes through serve/graph.py (its keys/values in a static cache, the step a
    CUDA graph). The same static-cache step, run eagerly here, must give the logits the dynamic cache gives on
    the same schedule: A alone (moved in), B joining mid-way (A moved back out and batched with B), B done (A
    moved in again), and a static cache too short for A (back to the dynamic cache when it fills). Logits, not
    only tokens: a tiny random model's greedy tokens hardly depend on the cache."""
    from vptq_service.serve.graph import GraphStep

    from vptq.generate import load_for_generation

    orig_init = GraphStep.__init__
    model, tok = load_for_generation(str(quantized_dir), "cpu")

    def run(graphs: bool, tokens: int = 4096) -> tuple[list[torch.Tensor], int]:
        seen, static_steps, finish = decode_schedule(
            model, tok, ("The cat sat on the", 24),
            ("A long time ago in a galaxy far far away there lived a small robot who", 6), graphs, tokens)
        assert finish == ("length", "length")
        return seen, static_steps

    dyn, none = run(False)
    static, some = run(True)
    assert none == 0 and some >= 15  # A ran alone before B joined and after B finished
    assert_same_logits(static, dyn)
    full, _ = run(True, tokens=20)  # A's prompt + 24 tokens outgrow 20 slots: back to the dynamic cache
    assert_same_logits(full, dyn)

    # a capture that fails after its warm-up steps ran (they advance the static cache's write position):
    # that step eager at the right slot, the sequence back on the dynamic cache after it, a warning logged
    def failing(self):
        for _ in range(2):
            self.eager_step()
        raise RuntimeError("operation not permitted when stream is capturing")

    monkeypatch.setattr(GraphStep, "capture_graph", failing)
    monkeypatch.setattr(GraphStep, "__init__", lambda self, *a, capture=True, **k: orig_init(self, *a, **k))
    failed, steps = run(True)
    assert steps == 1  # the failed step only: then the dynamic cache
    assert "CUDA graph capture failed (RuntimeError: operation not permitted" in caplog.text

    # a static cache that refuses the copy: the dynamic cache serves on, nothing lost
    from transformers import StaticCache

    def refuse(self, *a, **k):
        raise ValueError("unexpected cache layout")

    monkeypatch.setattr(StaticCache, "update", refuse)
    refused, steps = run(True)
    assert steps == 0 and "the static cache did not take the sequence (ValueError" in caplog.text
    assert_same_logits(refused, dyn)
    assert_same_logits(failed, dyn)




def assert_same_logits(got: list[torch.Tensor], want: list[torch.Tensor]) -> None:
    """As many logits rows as wanted, each equal to its twin to 1e-4."""
    assert len(got) == len(want)
    for x, y in zip(got, want, strict=True):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-4)


def decode_joining(model, tok, prompts: list[tuple[str, int]], join_at: int = 3,
                   logits: list | None = None) -> tuple[list[tuple], list[int]]:
    """Greedy requests through one Engine on CPU: the first submitted at once, the others at step join_at;
    ((finish, tokens) per request, the rows of each decode pass). `logits`: filled with each request's list of
    the logits its tokens were sampled from."""
    import vptq_service.serve.engine as engine_mod
    from vptq_service.serve.engine import Engine, Sampling, Sequence

    eng = Engine(model, tok, max_batch=4, graphs=False)
    rows: list[int] = []
    eng.on_decode = rows.append
    seqs = [Sequence(eng.encode(text), Sampling(max_tokens=n, temperature=0), emit=lambda e: None) for text, n in prompts]
    seen = {id(s.sampling): [] for s in seqs}
    sample = engine_mod.sample
    engine_mod.sample = lambda row, s, gen: seen[id(s)].append(row) or sample(row, s, gen)
    try:
        eng.submit(seqs[0])
        for step in range(40):
            if step == join_at:
                for s in seqs[1:]:
                    eng.submit(s)
            eng.step()
            if all(s.finish for s in seqs):
                break
    finally:
        engine_mod.sample = sample
    if logits is not None:
        logits.extend(seen[id(s.sampling)] for s in seqs)
    return [(s.finish, s.out_ids) for s in seqs], rows


def assert_joined_as_alone(model, tok, prompts: list[tuple[str, int]], rows: int, own: bool = False) -> list[tuple]:
    """Each request decoded alone, then all of them joining (decode_joining): the same tokens, each token's logits
    equal, and `rows` rows in the widest decode pass (1: one pass per sequence). own: every token's logits alone
    also equal the model's own uncached forward over the prompt and the tokens before it (own_logits). The requests'
    (finish, tokens) alone."""
    alone_logits, together_logits = [], []
    alone = [decode_joining(model, tok, [p], logits=alone_logits)[0][0] for p in prompts]
    together, passes = decode_joining(model, tok, prompts, logits=together_logits)
    assert together == alone and max(passes) == rows
    for mine, want in zip(together_logits, alone_logits, strict=True):  # logits, not only a random model's tokens
        assert_same_logits(mine, want)
    for (text, _), (_, out), logits in zip(prompts, alone, alone_logits, strict=True) if own else ():
        ids = tok(text).input_ids
        assert_same_logits(logits, [own_logits(model, ids + out[:k]) for k in range(len(logits))])
    return alone


def own_logits(model, ids: list[int]) -> torch.Tensor:
    """The model's own next-token logits after ids: one uncached pass, no positions or mask given (its definition)."""
    with torch.no_grad():
        return model(input_ids=torch.tensor([ids])).logits[0, -1].float()


def test_a_joining_request_on_caches_that_cannot_be_merged(smol_tokenizer):
    """Caches the batch cannot merge (DeepSeek-V4's compressed attention cache; Llama 4 and BERT-style decoders took
    this path until they were found to merge: test_chunked_attention_requests_decode_as_one_batch,
    test_bert_style_decoders_decode_as_one_batch): a request joining a running one failed (or made both fail). Each
    sequence then decodes on its own cache, every step: both give the logits they give alone, and the model's own.
    (Sliding-window and recurrent-state layers, which failed the same way, now merge:
    test_sliding_window_requests_decode_as_one_batch, test_recurrent_state_requests_decode_as_one_batch.)"""
    import transformers
    from vptq_service.serve.engine import cache_kind

    torch.manual_seed(0)
    tok = smol_tokenizer
    model = transformers.DeepseekV4ForCausalLM(transformers.DeepseekV4Config(
        hidden_size=64, moe_intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, q_lora_rank=16, num_experts_per_tok=2, n_routed_experts=4, n_shared_experts=1,
        max_position_embeddings=256, sliding_window=16, o_lora_rank=64, **token_ids(tok))).eval()
    assert cache_kind(model, torch.device("cpu")) == "lanes"
    prompts = [("The cat sat on the mat and looked at the", 12),
               ("A long time ago in a galaxy far far away there lived a small robot who", 6)]
    alone = assert_joined_as_alone(model, tok, prompts, rows=1, own=True)
    assert [a[0] for a in alone] == ["length", "length"]


def bert_style_decoder(family: str, tokenizer):
    """A 2-block random Megatron-BERT, RemBERT or RoC-BERT language model (hidden 64) made a decoder (is_decoder, as a
    checkpoint that generates is): they build an encoder-decoder cache of their own."""
    import transformers

    kw = dict(vocab_size=len(tokenizer), hidden_size=64, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=128, max_position_embeddings=256, is_decoder=True, pad_token_id=tokenizer.pad_token_id)
    cls = {"megatron-bert": (transformers.MegatronBertConfig, transformers.MegatronBertForCausalLM, {}),
           "rembert": (transformers.RemBertConfig, transformers.RemBertForCausalLM,
                       {"input_embedding_size": 64, "output_embedding_size": 64}),
           "roc_bert": (transformers.RoCBertConfig, transformers.RoCBertForCausalLM,
                        {"pronunciation_vocab_size": 16, "shape_vocab_size": 16, "pronunciation_embed_dim": 16,
                         "shape_embed_dim": 16})}[family]
    torch.manual_seed(0)
    return cls[1](cls[0](**kw, **cls[2]))


def test_a_decoder_that_refuses_a_plain_cache_stays_in_lanes(smol_tokenizer, monkeypatch):
    """The plain cache is tried on the model before it is used: a decoder with an encoder-decoder cache that fails
    when given a plain one is served in lanes on its own cache (not refused, not failing every request)."""
    from vptq_service.serve.engine import cache_kind

    model = bert_style_decoder("megatron-bert", smol_tokenizer).eval()
    real = model.forward

    def forward(*args, cache=None, **kwargs):
        if type(cache).__name__ == "DynamicCache":
            raise TypeError("this model takes only its own cache")
        return real(*args, cache=cache, **kwargs)

    monkeypatch.setattr(model, "forward", forward)
    assert cache_kind(model, torch.device("cpu")) == "lanes"


@pytest.mark.parametrize("family", ["megatron-bert", "rembert", "roc_bert"])
def test_bert_style_decoders_decode_as_one_batch(family, smol_tokenizer):
    """BERT-style decoders build an encoder-decoder cache (a self-attention part and an empty cross-attention one,
    there being no encoder), which the batch could not merge: they were served in lanes. Given a plain cache they
    keep their keys and values in it: requests joining at different steps decode in one batch with the logits of
    each alone and of the model's own forward."""
    from vptq_service.serve.engine import cache_kind

    model = bert_style_decoder(family, smol_tokenizer).eval()
    with torch.no_grad():
        own = model(input_ids=torch.zeros((1, 1), dtype=torch.long), use_cache=True).cache
    assert type(own).__name__ == "EncoderDecoderCache"
    assert cache_kind(model, torch.device("cpu")) == "plain"
    prompts = [("The cat sat on the mat and looked at the", 12),
               ("A long time ago in a galaxy far far away there lived a small robot who", 6), ("Once", 8)]
    assert_joined_as_alone(model, smol_tokenizer, prompts, rows=3, own=True)


def tiny_chunked(tokenizer):
    """A 4-block random Llama 4 text model (hidden 64) whose chunked attention has 8-token chunks (three chunked
    layers, then a full-attention one, as Llama 4 interleaves them), so that short prompts cross chunk boundaries."""
    import transformers

    torch.manual_seed(0)
    return transformers.Llama4ForCausalLM(transformers.Llama4TextConfig(
        hidden_size=64, intermediate_size=32, intermediate_size_mlp=128, num_hidden_layers=4, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=256, num_local_experts=4, num_experts_per_tok=1,
        interleave_moe_layer_step=1, attention_chunk_size=8, **token_ids(tokenizer)))


def test_chunked_attention_requests_decode_as_one_batch(smol_tokenizer):
    """Llama 4's chunked attention was served in lanes (one pass per sequence): its chunks start at absolute
    positions, which left padding shifts. But transformers counts each row's left padding in the chunked mask
    (chunks start at the row's first token), so plain caches that keep every token merge: requests joining at
    different steps, across chunk boundaries, decode in one batch with the logits of each alone and of the
    model's own forward."""
    from vptq_service.serve.engine import cache_kind

    model = tiny_chunked(smol_tokenizer).eval()
    assert model.config.layer_types.count("chunked_attention") == 3
    assert cache_kind(model, torch.device("cpu")) == "plain"
    prompts = [("The cat sat on the mat and looked at the", 14),  # 10 + 14 tokens: three chunks of 8
               ("A long time ago in a galaxy far far away there lived a small robot who", 8),
               ("Once", 10)]
    assert_joined_as_alone(model, smol_tokenizer, prompts, rows=3, own=True)


@pytest.mark.parametrize("family", ["mamba", "falcon_mamba"])
def test_state_space_requests_decode_as_one_batch(family, smol_tokenizer):
    """Pure state-space stacks (Mamba, Falcon-Mamba: no attention layer) decoded other logits with their states
    stacked along the batch, and so were served one pass per sequence; the cause was the attention mask passed with
    each step, which their decode step misreads (3.9 off the model's own forward at logits of 6, alone too; without
    the cache positions transformers' generate passes). Their states need no mask (each sequence is prefilled
    alone, every row takes one token a step): none is passed, and requests joining at different steps decode in one
    batch with, at every token, the model's own logits."""
    from vptq_service.serve.engine import cache_kind

    from tests.test_architectures import tiny_family

    model = tiny_family(family, smol_tokenizer).eval()
    assert cache_kind(model, torch.device("cpu")) == "recurrent"
    prompts = [("The cat sat on the mat and looked at the", 12),
               ("A long time ago in a galaxy far far away there lived a small robot who", 6), ("Once", 8)]
    assert_joined_as_alone(model, smol_tokenizer, prompts, rows=3, own=True)


def tiny_lfm3(tokenizer):
    """A 2-block random LFM3 (a short-convolution block, then full attention; hidden 64): its convolution layer keeps a
    convolution window and no recurrent state (None in the cache's dict)."""
    import transformers

    torch.manual_seed(0)
    return transformers.Lfm3ForCausalLM(transformers.Lfm3Config(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        head_dim=16, max_position_embeddings=256, layer_types=["conv", "full_attention"], **token_ids(tokenizer)))


def tiny_nemotron_h(tokenizer):
    """A 4-block random Nemotron-H (hidden 64): a Mamba-2 block, an MLP block, an attention block, an MLP block; the
    MLP blocks hold no cache (DummyLayer in transformers' cache)."""
    import transformers

    torch.manual_seed(0)
    return transformers.NemotronHForCausalLM(transformers.NemotronHConfig(
        hidden_size=64, intermediate_size=128, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
        max_position_embeddings=256, layers_block_type=["linear_attention", "mlp", "full_attention", "mlp"],
        ssm_state_size=16, mamba_num_heads=8, mamba_head_dim=16, n_groups=1, chunk_size=16, use_mamba_kernels=False,
        **token_ids(tokenizer)))


@pytest.mark.parametrize("family", ["qwen3_next", "falcon_h1", "lfm3", "nemotron_h"])
def test_recurrent_state_requests_decode_as_one_batch(family, smol_tokenizer, tmp_path):
    """Linear-attention and state-space layers (Qwen3-Next's gated delta-net, Falcon-H1's Mamba-2 beside attention)
    keep a recurrent state and a short convolution window per sequence, with no length to pad: each joining request
    is prefilled alone and its states are stacked along the batch (the attention layers padded as usual), so
    requests joining at different steps decode in one batch with the tokens each gives alone. (LFM3's convolution
    layers hold None for the recurrent state they do not have: its merge failed, and it was served in lanes.
    Nemotron-H's MLP blocks hold no cache at all, a DummyLayer each: it was served in lanes too.)"""
    from vptq_service.serve.engine import cache_kind

    from tests.test_architectures import tiny_family

    builders = {"lfm3": tiny_lfm3, "nemotron_h": tiny_nemotron_h}
    model = (builders[family](smol_tokenizer) if family in builders else tiny_family(family, smol_tokenizer)).eval()
    assert cache_kind(model, torch.device("cpu")) == "states"
    prompts = [("The cat sat on the mat and looked at the", 12),
               ("A long time ago in a galaxy far far away there lived a small robot who", 6),
               ("Once", 8)]
    assert_joined_as_alone(model, smol_tokenizer, prompts, rows=3)

    # the cache's own count of tokens (a recurrent layer's, which the model reads its position from where such a
    # layer comes first) stays the batch's padded width through joins and departures
    from vptq_service.serve.engine import Engine, Sampling, Sequence

    eng = Engine(model, smol_tokenizer, max_batch=4, graphs=False)
    seqs = [Sequence(eng.encode(text), Sampling(max_tokens=n, temperature=0), emit=lambda e: None) for text, n in prompts]
    eng.submit(seqs[2])
    for step in range(12):
        if step == 2:
            eng.submit(seqs[0]), eng.submit(seqs[1])
        eng.step()
        if eng.batch.seqs:
            assert int(eng.batch.cache.get_seq_length()) == eng.batch.mask.shape[1]


@pytest.mark.parametrize("family", ["mistral", "gemma2", "gemma3"])
def test_sliding_window_requests_decode_as_one_batch(family, smol_tokenizer, tmp_path):
    """Sliding-window layers (Mistral; Gemma 2 and 3 beside full-attention layers) apply their window in the attention
    mask too, so plain caches that keep every token give the same logits and merge across sequences: requests
    joining at different steps, past the window, decode in one batch (not one pass per sequence) with the tokens
    each gives alone."""
    from tests.test_architectures import build

    model = build(family, smol_tokenizer, tmp_path).eval()
    assert model.config.sliding_window == 16
    prompts = [("The cat sat on the mat and looked at the", 14),  # past the 16-token window
               ("A long time ago in a galaxy far far away there lived a small robot who", 8),
               ("Once", 10)]
    assert_joined_as_alone(model, smol_tokenizer, prompts, rows=3)  # one pass for all three, not a lane each


@pytest.mark.parametrize("family", ["mistral", "gemma3", "llama4_chunked", "megatron-bert"])
def test_sliding_window_lone_sequence_takes_the_static_cache(family, smol_tokenizer, tmp_path):
    """A lone sequence of a sliding-window model decodes through serve/graph.py's static cache (on CUDA: one
    graph a step) with full-length layers, the window applied in the mask: the logits of the dynamic path on the
    same schedule (A alone past the 16-token window, B joining, B done), and most steps on the static cache.
    The same for chunked attention (8-token chunks), whose chunks the mask applies too, and for a BERT-style decoder
    (its static cache in place of its encoder-decoder one)."""
    from tests.test_architectures import build

    builders = {"llama4_chunked": tiny_chunked, "megatron-bert": lambda tok: bert_style_decoder("megatron-bert", tok)}
    model = (builders[family](smol_tokenizer) if family in builders else build(family, smol_tokenizer, tmp_path)).eval()

    def run(graphs: bool) -> tuple[list[torch.Tensor], int]:
        seen, static_steps, _ = decode_schedule(model, smol_tokenizer, ("The cat sat on the mat and looked at the", 24),
                                                ("A long time ago in a galaxy far far away", 4), graphs)
        return seen, static_steps

    dyn, none = run(False)
    static, some = run(True)
    assert none == 0 and some >= 15
    assert_same_logits(static, dyn)


@pytest.mark.parametrize("family", ["qwen3_next", "mistral", "llama"])
def test_a_merge_that_changes_the_logits_falls_back_to_lanes(family, smol_tokenizer, tmp_path, monkeypatch, caplog):
    """Before its first pass the engine checks a merge on the model itself (two short sequences, alone and
    together): some hybrid families of transformers 5.25 (Kimi-Linear, LFM3, Bailing-hybrid: shapes that do not
    stack) failed when joined, and Dory failed on plain layers even alone (bench/results/serve_cache_kinds_20261207.json).
    Plain caches too: GIT's joined requests decoded other logits (0.74 off) and MiniMax's failed, unchecked
    (bench/results/serve_cache_kinds_20261207c_first.json). A merge that fails or changes the logits leaves the model in
    lanes: every request as it decodes alone."""
    import vptq_service.serve.engine as engine_mod

    from tests.test_architectures import build, tiny_family

    model = (tiny_family(family, smol_tokenizer) if family == "qwen3_next" else build(family, smol_tokenizer, tmp_path))
    model.eval()
    real_add = engine_mod.Batch.add

    def bad_add(self, seqs, cache, mask):  # a merge that swaps the first layer's rows, as a wrong stacking would
        merged = self.cache is not None
        real_add(self, seqs, cache, mask)
        layer = self.cache.layers[0]
        if merged and getattr(layer, "keys", None) is not None and layer.keys.numel():
            layer.keys = layer.keys.flip(0)
        for name in ("conv_states", "recurrent_states") if merged else ():  # transformers' recurrent layers
            states = getattr(layer, name, None)
            for i in states if isinstance(states, dict) else ():
                states[i] = states[i].flip(0)

    monkeypatch.setattr(engine_mod.Batch, "add", bad_add)
    prompts = [("The cat sat on the mat and looked at the", 8), ("A long time ago in a galaxy far far away", 5)]
    with caplog.at_level("WARNING", logger="vptq.serve"):
        assert_joined_as_alone(model, smol_tokenizer, prompts, rows=1)
    assert "joining sequences changed" in caplog.text

def roberta_decoder(family: str, tokenizer, is_decoder: bool = True):
    """A 2-block random CamemBERT or XLM-RoBERTa-XL language model (hidden 64); is_decoder=False is the encoder
    that attends to later tokens (a BERT-style checkpoint as it is most often published)."""
    import transformers

    cls = {"camembert": (transformers.CamembertConfig, transformers.CamembertForCausalLM),
           "xlm-roberta-xl": (transformers.XLMRobertaXLConfig, transformers.XLMRobertaXLForCausalLM)}[family]
    torch.manual_seed(0)
    return cls[1](cls[0](hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                         max_position_embeddings=128, is_decoder=is_decoder, **token_ids(tokenizer))).eval()


@pytest.mark.parametrize("family", ["camembert", "xlm-roberta-xl"])
def test_a_decoder_whose_positions_start_past_zero_decodes_its_own_logits(family, smol_tokenizer):
    """RoBERTa-style decoders (CamemBERT, XLM-RoBERTa and -XL) number a sequence's positions from padding_idx + 1,
    not 0: the engine passed 0-based position ids and decoded other logits than the model's own (0.5 off at logits
    of 0.8). Requests alone and joining give, at every token, the logits of the model's own uncached forward over
    the prompt and the tokens so far, in one batch."""
    model = roberta_decoder(family, smol_tokenizer)
    prompts = [("The cat sat on the mat and looked at the", 8), ("A long time ago in a galaxy far far away", 5)]
    assert_joined_as_alone(model, smol_tokenizer, prompts, rows=2, own=True)


def test_a_model_that_reads_later_tokens_is_refused_before_serving(smol_tokenizer, tmp_path):
    """A BERT-style checkpoint without is_decoder attends to later tokens: token by token it decodes logits unrelated
    to its own forward (bench/serve_cache_kinds.py's five 'differ from generate' types were such encoders). The
    server refuses it when it loads, before the port opens, with the fix in the message; a decoder loads."""
    from vptq_service.serve.run import load_engine

    from vptq.errors import SourceError

    for is_decoder in (False, True):
        folder = tmp_path / f"decoder-{is_decoder}"
        roberta_decoder("camembert", smol_tokenizer, is_decoder).save_pretrained(folder)
        smol_tokenizer.save_pretrained(folder)
        if is_decoder:
            assert load_engine(str(folder)).caches == "merge"
            continue
        with pytest.raises(SourceError, match="later tokens.*is_decoder"):
            load_engine(str(folder))
        code, out, err = run("serve", folder)  # the command: one usage line, no traceback, no port opened
        assert code == 2 and err.startswith("error: CamembertForCausalLM reads later tokens"), err
        assert len(err.strip().splitlines()) == 1 and "set is_decoder=true" in err


def test_a_compiled_lone_sequence_decodes_as_the_eager_one(quantized_dir, monkeypatch, caplog):  # noqa: F811
    """VPTQ_SERVE_COMPILE=1: the lone sequence's step goes through torch.compile (vptq.compiled; here without
    code generation, seconds instead of inductor's minute) and gives the eager step's logits on the schedule of
    the static-cache test (alone, joined, alone again); on CPU, without a capture, the static cache then serves
    the compiled step. A compile that fails leaves the eager step serving, logged once, nothing lost."""
    import functools

    import vptq_service.serve.engine as engine_mod
    from vptq_service.serve.engine import Engine, Sampling, Sequence

    import vptq.compiled
    from vptq.generate import load_for_generation

    model, tok = load_for_generation(str(quantized_dir), "cpu")
    seen: list[torch.Tensor] = []
    sample = engine_mod.sample
    monkeypatch.setattr(engine_mod, "sample", lambda logits, s, gen: seen.append(logits) or sample(logits, s, gen))
    real = vptq.compiled.compile_step
    monkeypatch.setattr(vptq.compiled, "compile_step", functools.partial(real, backend="aot_eager"))

    def run(compiled: bool) -> tuple[list[torch.Tensor], Engine]:
        seen.clear()
        monkeypatch.setenv("VPTQ_SERVE_COMPILE", "1" if compiled else "0")
        eng = Engine(model, tok, max_batch=4)
        a = Sequence(eng.encode("The cat sat on the"), Sampling(max_tokens=16, temperature=0), emit=lambda e: None)
        b = Sequence(eng.encode("Once upon a time"), Sampling(max_tokens=4, temperature=0), emit=lambda e: None)
        eng.submit(a)
        for i in range(30):
            if i == 4:
                eng.submit(b)
            eng.step()
            if a.finish and b.finish:
                break
        assert a.finish == "length" and b.finish == "length"
        return list(seen), eng

    want, eager = run(False)
    assert eager.graph is None  # CPU, no compile: the dynamic cache as before
    got, eng = run(True)
    assert eng.graph is not None and eng.graph.run is not eng.graph.eager_step  # the compiled step served
    assert len(got) == len(want)
    assert_same_logits(got, want)

    def broken(fn, backend="inductor"):
        def fails():
            raise RuntimeError("no working C compiler")
        return fails

    monkeypatch.setattr(vptq.compiled, "compile_step", broken)
    failed, eng = run(True)
    assert eng.graph.run == eng.graph.eager_step
    assert caplog.text.count("torch.compile of the decode step failed (RuntimeError: no working C compiler)") == 1
    assert_same_logits(failed, want)

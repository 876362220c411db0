"""The continuous-batching engine against SmolVLM.generate run alone on each request (float32):
token for token, with rows joining and leaving, windows shifted in a small KV pool, prompts
prefilled in chunks, greedy and seeded sampling, stop tokens, repeated images from the encoder
cache; and the pool, the text deltas and the queue on their own."""

import random

import pytest
import torch

from tests.models.smolvlm_helpers import build_batch, tiny_model
from vlmfast.serving import Engine, QueueFull, Request, SamplingParams, ShuttingDown
from vlmfast.serving import kv_pool, prefill
from vlmfast.serving.text import AnswerText

STOPS = [7, 42]


@pytest.fixture(scope="module")
def models():
    return tiny_model(seed=3), tiny_model(seed=3)  # the engine's, and the reference run alone


def _requests(n, seed):
    """Mixed requests: 0-2 images of 1 or 5 tiles (a padded last tile sometimes), prompts of
    different lengths, greedy or sampled (temperature, top_p, top_k), 1-24 new tokens."""
    rnd = random.Random(seed)
    out = []
    for i in range(n):
        tiles = rnd.choice([0, 0, 1, 2, 5])
        pad = (rnd.randint(9, 31), rnd.randint(9, 31)) if tiles and rnd.random() < 0.3 else None
        ids, _, pv, pm = build_batch([(tiles, rnd.randint(1, 12), rnd.randint(1, 25), pad)], seed=1000 * seed + i)
        vision = {"pixel_values": pv, "pixel_attention_mask": pm} if tiles else {}
        sampled = rnd.random() < 0.4
        params = SamplingParams(max_tokens=rnd.randint(1, 24), temperature=rnd.choice([0.7, 1.0, 1.3]) if sampled else 0,
                                top_p=rnd.choice([1.0, 0.8]), top_k=rnd.choice([None, 20]), seed=rnd.randint(0, 10**6))
        out.append(Request(ids, vision, params))
    return out


def _alone(model, request: Request) -> list[int]:
    p = request.params
    options = {}
    if not p.greedy:
        options = dict(do_sample=True, temperature=p.temperature, top_p=p.top_p, top_k=p.top_k,
                       generator=torch.Generator().manual_seed(p.seed))
    out = model.generate(request.input_ids[None], **request.vision, max_new_tokens=p.max_tokens,
                         eos_token_id=STOPS, **options)
    return out[0, request.prompt_len:].tolist()


@pytest.mark.parametrize("decode, chunk", [("eager", 256), ("eager", 5), ("static", 7)])
def test_answers_equal_generate_alone(models, decode, chunk, monkeypatch):
    model, reference = models
    shifts = []
    original = kv_pool.KVPool.shift
    monkeypatch.setattr(kv_pool.KVPool, "shift", lambda self, k: (shifts.append(k), original(self, k))[1])
    requests = _requests(24, seed=7)
    # 3 rows only as long as the longest request: rows wait for room, windows are shifted, the
    # native step (<= 2 rows here) and the eager batched one both run
    from vlmfast.models.smolvlm import fast_decode

    monkeypatch.setattr(fast_decode, "MAX_ROWS", 2)
    need = max(r.prompt_len + r.params.max_tokens for r in requests)
    engine = Engine(model, max_batch=3, max_len=need, chunk_tokens=chunk, decode=decode, eos_token_id=STOPS)
    results = engine.generate(requests)
    for request, result in zip(requests, results):
        assert result["token_ids"] == _alone(reference, request), request.params
    reasons = {r["finish_reason"] for r in results}
    assert reasons == {"stop", "length"}  # both endings were exercised
    assert any(k > 0 for k in shifts)
    assert engine.pool.n == 0 and not engine.running and engine.job is None


def test_generic_runner_equals_generate_alone(models, monkeypatch):
    """Any model with generate()'s protocol: one model.prefill per prompt (no chunks)."""
    model, reference = models
    monkeypatch.setattr(prefill.SmolVLMRunner, "applies", staticmethod(lambda m: False))
    requests = _requests(8, seed=11)
    engine = Engine(model, max_batch=3, max_len=96, eos_token_id=STOPS)
    assert isinstance(engine.runner, prefill.GenericRunner)
    for request, result in zip(requests, engine.generate(requests)):
        assert result["token_ids"] == _alone(reference, request)
    again = _requests(8, seed=11)  # the same prompts: their images come from the cache
    runs = engine.runner.encoder_runs
    engine.generate(again)
    assert engine.runner.encoder_runs == runs and engine.encoder_cache.hits > 0


def test_repeated_image_skips_the_vision_encoder(models):
    model, reference = models
    calls = []
    hook = model.model.vision_model.register_forward_hook(lambda *a: calls.append(1))
    try:
        # the prefix cache off: with it, the same prompt would skip its tiles altogether
        engine = Engine(model, max_batch=2, max_len=96, eos_token_id=STOPS, prefix_cache_bytes=0)
        first = _requests(1, seed=5)[0]
        while not first.vision:
            first = _requests(1, seed=len(calls) + 6)[0]
        tiles = first.vision["pixel_values"].shape[1]
        engine.generate([first])
        assert len(calls) == tiles
        same = Request(first.input_ids.clone(), {k: v.clone() for k, v in first.vision.items()}, first.params)
        (result,) = engine.generate([same])
        assert len(calls) == tiles  # every tile came from the cache
        assert engine.encoder_cache.hits == tiles
        assert result["token_ids"] == _alone(reference, first)
    finally:
        hook.remove()


def test_pool_keeps_each_window_through_shift_and_remove():
    model = tiny_model(seed=1)
    pool = kv_pool.KVPool(model, rows=3, max_len=12)
    rows = []
    for length in (5, 3, 4):
        staging = pool.reset_staging()
        for t in staging.keys + staging.values:
            t[0, :, :length] = torch.randn_like(t[0, :, :length])
        saved = [t[0, :, :length].clone() for t in staging.keys + staging.values]
        pool.join(length, 2)
        rows.append((length, saved))
        for t in pool.cache.keys + pool.cache.values:  # a decode step's slot for every row
            t[: pool.n, :, pool.length] = 0.5
        pool.cache.key_mask[: pool.n, pool.length] = True
        pool.length += 1

    def window(i):
        start = pool.start[i]
        assert pool.cache.key_mask[i, start:pool.length].all() and not pool.cache.key_mask[i, :start].any()
        return [t[i, :, start:start + rows_by_start[i][0]] for t in pool.cache.keys + pool.cache.values]

    rows_by_start = list(rows)
    for i in range(3):
        assert all(torch.equal(a, b) for a, b in zip(window(i), rows_by_start[i][1]))
    pool.remove(0)  # the last row moves into row 0
    rows_by_start = [rows[2], rows[1]]
    pool.shift(min(pool.start))
    assert min(pool.start) == 0
    for i in range(2):
        assert all(torch.equal(a, b) for a, b in zip(window(i), rows_by_start[i][1]))
    assert not pool.cache.key_mask[:, pool.length:].any() and not pool.cache.key_mask[2].any()


def test_answer_text_holds_back_stop_prefixes_and_partial_characters():
    pieces = {1: "Hel", 2: "lo", 3: " wo", 4: "rld", 5: "\ufffd", 6: "!"}
    decode = lambda ids: "".join(pieces[i] for i in ids)  # noqa: E731
    text = AnswerText(decode, stop=["world", "lo!"])
    deltas = []
    for token in (1, 2, 3):
        text.add(token)
        deltas.append(text.delta())
    assert deltas == ["He", "l", "lo "]  # "l", "lo" may start "lo!"; "wo" may start "world"
    text.add(4)
    assert text.stopped and text.text == "Hello " and text.delta(final=True) == ""  # "wo" never sent
    text = AnswerText(decode, stop=[])
    text.add(1)
    text.add(5)
    assert text.delta() == "Hel"  # an unfinished character (U+FFFD at the end) waits
    text.add(6)
    assert text.delta() == "\ufffd!" and text.text == "Hel\ufffd!"
    with pytest.raises(ValueError, match="stop"):
        AnswerText(None, ["x"])


def test_stop_strings_end_the_answer_early(models):
    model, reference = models
    request = _requests(1, seed=21)[0]
    request.params.max_tokens, request.params.temperature = 20, 0
    decode = lambda ids: "".join(chr(65 + i % 26) for i in ids)  # noqa: E731 - one letter per token
    full = _alone(reference, request)
    stop = decode(full[2:4])
    request.params.stop = [stop]
    engine = Engine(model, max_batch=2, max_len=96, eos_token_id=STOPS, decode_text=decode)
    (result,) = engine.generate([request])
    cut = decode(full).find(stop)
    assert result["finish_reason"] == "stop" and result["text"] == decode(full)[:cut]
    assert result["token_ids"] == full[:len(result["token_ids"])]


def test_queue_limit_context_check_cancel_and_shutdown(models):
    model, _ = models
    engine = Engine(model, max_batch=1, max_len=40, max_queue=2, eos_token_id=[])
    short = lambda n: Request(torch.arange(1, 6), params=SamplingParams(max_tokens=n, temperature=0))  # noqa: E731
    with pytest.raises(ValueError, match="context of 40"):
        engine.submit(Request(torch.arange(1, 31), params=SamplingParams(max_tokens=11)))
    events = []
    first = engine.submit(short(30), on_event=events.append)
    engine.submit(short(3))
    with pytest.raises(QueueFull):
        engine.submit(short(3))
    engine.step()  # first prefilled and running, the second waits for the row
    engine.step()
    assert len(engine.running) == 1 and engine.queue_length == 1
    engine.cancel(first)
    engine.step()  # the row is freed at once and the second request takes it
    assert first.finish_reason == "abort" and events[-1].finished and events[-1].finish_reason == "abort"
    assert len(first.tokens) < 30 and engine.queue_length == 0 and len(engine.running) == 1
    engine.start()
    engine.stop(drain=True)
    assert not engine.has_work()
    with pytest.raises(ShuttingDown):
        engine.submit(short(3))

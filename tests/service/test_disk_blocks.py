"""Patch 0005's disk tier in blocks (issue 24): a turn writes only its new blocks and the
tail, sessions with the same system prompt share its blocks, a restart serves the next turn
from the chain, and layers whose state is not per token are kept at the chain's end.

Real servers with the demo model; checks read the server's log, GET /metrics and the files.
The last tests drive the tier in-process with mlx-lm's real cache classes."""

from __future__ import annotations

import json
import subprocess
import textwrap

import pytest

from mlx_local.models.demo_model import corpus_text
from tests.helpers import running_server
from tests.service.test_patch_prompt_cache_dir import (
    BLOCK,
    LOADED,
    LONG,
    SAVED,
    answer,
    blocks_of,
    chat,
    conversation,
    metadata,
    metric,
    next_turn,
    serve_once,
    shared_prefix,
    tails_of,
    wait_written,
)

pytestmark = pytest.mark.slow


def test_follow_ups_write_only_their_new_blocks(patched_runtime, demo_model, tmp_path):
    python = patched_runtime.python
    folder = tmp_path / "prompt-cache"
    args = ["--model", str(demo_model), "--prompt-cache-dir", str(folder)]
    messages = conversation("Project Delta", LONG)
    with running_server(python, args) as (url, log_path):
        reply = chat(url, messages)
        wait_written(url)
        first_bytes = metric(url, "prompt_cache_disk_written_bytes_total")
        saved = SAVED.findall(log_path.read_text())
        length = int(saved[-1][0])
        assert length // BLOCK >= 4 and int(saved[-1][2]) == length // BLOCK + 1
        for _ in range(5):
            before = {p.name for p in blocks_of(folder)}
            tails_before = len(tails_of(folder))
            messages = next_turn(messages, reply)
            reply = chat(url, messages)
            wait_written(url)
            new_length = int(SAVED.findall(log_path.read_text())[-1][0])
            new_blocks = [p for p in blocks_of(folder) if p.name not in before]
            # only blocks that end after the last full block of the previous turn
            assert all(int(metadata(p)["start"]) >= length // BLOCK * BLOCK for p in new_blocks)
            assert len(new_blocks) == new_length // BLOCK - length // BLOCK
            # One new tail at most: Qwen3's template renders the previous answer without
            # its thought, so the tail that held it is another conversation's end and stays.
            assert len(tails_of(folder)) <= tails_before + 1
            length = new_length
        follow_bytes = metric(url, "prompt_cache_disk_written_bytes_total") - first_bytes
    # five follow-ups of ~20 tokens wrote less than the first turn did (whole entries: 5x)
    assert follow_bytes < first_bytes

    # the sixth turn after a restart processes only its new tokens, and answers the same
    sixth = next_turn(messages, reply)
    reply6, log = serve_once(python, demo_model, args[2:], sixth)
    loaded = LOADED.search(log)
    assert loaded, log[-3000:]
    shared = shared_prefix(python, demo_model, messages, sixth)
    cached = reply6["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert cached == int(loaded.group(1)) >= shared
    cold, _ = serve_once(python, demo_model, [], sixth)
    assert answer(reply6) == answer(cold)


def test_sessions_sharing_a_system_prompt_share_its_blocks(patched_runtime, demo_model, tmp_path):
    python = patched_runtime.python
    folder = tmp_path / "prompt-cache"
    args = ["--model", str(demo_model), "--prompt-cache-dir", str(folder)]
    sessions = [
        [
            {"role": "system", "content": LONG},
            {"role": "user", "content": f"Session {i}: {corpus_text()[300 * i : 300 * i + 300]}"},
        ]
        for i in range(4)
    ]
    with running_server(python, args) as (url, _):
        chat(url, sessions[0])
        wait_written(url)
        one = metric(url, 'prompt_cache_bytes{tier="disk"}')
        for session in sessions[1:]:
            chat(url, session)
        wait_written(url)
        four = metric(url, 'prompt_cache_bytes{tier="disk"}')
        shared_metric = metric(url, "prompt_cache_disk_blocks_shared")
    shared = shared_prefix(python, demo_model, sessions[0], sessions[1])
    prefix = [p for p in blocks_of(folder) if int(metadata(p)["start"]) + BLOCK <= shared]
    starts = sorted(int(metadata(p)["start"]) for p in prefix)
    assert starts == [i * BLOCK for i in range(shared // BLOCK)]  # each block once
    assert shared_metric >= shared // BLOCK
    assert len(tails_of(folder)) == 4
    # three more sessions grew the tier by a fraction of one (whole entries: 3.8x)
    assert four / one < 2.0


SLIDING_MODEL = textwrap.dedent(
    """
    import json, shutil, sys
    from pathlib import Path
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import gemma3_text

    demo, dest = Path(sys.argv[1]), Path(sys.argv[2])
    dest.mkdir(parents=True)
    for p in demo.glob("tokenizer*"):
        shutil.copy(p, dest / p.name)
    demo_config = json.loads((demo / "config.json").read_text())
    config = {
        "model_type": "gemma3_text", "architectures": ["Gemma3ForCausalLM"],
        "hidden_size": 64, "num_hidden_layers": 2, "intermediate_size": 128,
        "num_attention_heads": 4, "head_dim": 16, "num_key_value_heads": 2,
        "vocab_size": demo_config["vocab_size"], "query_pre_attn_scalar": 16,
        "sliding_window": 128, "sliding_window_pattern": 2,
        "eos_token_id": demo_config.get("eos_token_id"),
    }
    mx.random.seed(3)
    model = gemma3_text.Model(gemma3_text.ModelArgs.from_dict(config))
    weights = dict(tree_flatten(model.parameters()))
    mx.save_safetensors(str(dest / "model.safetensors"), weights, {"format": "mlx"})
    (dest / "config.json").write_text(json.dumps(config, indent=2))
    """
)


def test_a_sliding_window_model_restarts_from_the_chain_end(patched_runtime, demo_model, tmp_path):
    """Gemma 3's layout (random weights, the demo tokenizer): a sliding-window layer
    (RotatingKVCache of 128 tokens, long past its window) and a global one (KVCache)."""
    python = patched_runtime.python
    model = tmp_path / "tiny-gemma3"
    subprocess.run([str(python), "-c", SLIDING_MODEL, str(demo_model), str(model)], check=True)
    folder = tmp_path / "prompt-cache"
    args = ["--prompt-cache-dir", str(folder)]
    first = conversation("Project Window", LONG)
    reply, log = serve_once(python, model, args, first)
    assert SAVED.search(log), log[-3000:]
    # the global layer in shared blocks, the window whole in each tail
    assert {metadata(p)["roles"] for p in tails_of(folder)} == {json.dumps(["end", "seq"])}
    assert all(metadata(p)["roles"] == json.dumps(["end", "seq"]) for p in blocks_of(folder))
    # the next turn after a restart and a new session with the same system prompt: each
    # served from the end of a stored chain (a checkpoint of mlx-lm's prompt segments)
    for messages in (
        next_turn(first, reply),
        [first[0], {"role": "user", "content": "Another question."}],
    ):
        reply2, log2 = serve_once(python, model, args, messages)
        loaded = LOADED.search(log2)
        assert loaded, log2[-3000:]
        assert reply2["usage"]["prompt_tokens_details"]["cached_tokens"] == int(loaded.group(1))
        assert int(loaded.group(1)) > 1900
        cold, _ = serve_once(python, model, [], messages)
        assert answer(reply2) == answer(cold)


TIER_SCRIPT = textwrap.dedent(
    """
    import argparse, json, sys
    import mlx.core as mx
    from mlx_lm.models.cache import (
        ArraysCache, KVCache, LRUPromptCache, RotatingKVCache, load_prompt_cache,
    )
    from mlx_lm.prompt_cache_disk import TieredPromptCache

    folder, kind = sys.argv[1], sys.argv[2]
    args = argparse.Namespace(
        prompt_cache_dir=folder, prompt_cache_dir_bytes=1 << 30, model="tiny-" + kind,
        adapter_path=None, draft_model=None, kv_bits=None, kv_group_size=64,
        quantized_kv_start=0,
    )
    key = ("tiny-" + kind, None, None)

    def layers(n, seed):
        kv = KVCache()
        k = mx.random.normal((1, 2, n, 8), key=mx.random.key(seed))
        kv.update_and_fetch(k, -k)
        if kind == "linear":  # a linear-attention layer: conv and recurrent state
            other = ArraysCache(2)
            other[0] = mx.random.normal((1, 3, 16), key=mx.random.key(seed + 1))
            other[1] = mx.random.normal((1, 2, 4, 4), key=mx.random.key(seed + 2))
        else:  # a sliding-window layer past its window
            other = RotatingKVCache(max_size=64, keep=0)
            for i in range(0, n, 50):
                part = mx.random.normal((1, 2, min(50, n - i), 8), key=mx.random.key(seed + i))
                other.update_and_fetch(part, part)
        return [kv, other]

    a = list(range(1, 601))
    first = TieredPromptCache(LRUPromptCache(2), args)
    stored = layers(600, 1)
    sliding = kind == "sliding"
    want = [mx.array(x) for x in stored[1].state[:2]] if sliding else list(stored[1].cache)
    mx.eval(want)
    first.insert_cache(key, a, stored)
    first.flush()
    b = a + list(range(1000, 1100))
    first.insert_cache(key, b, layers(700, 9))
    first.close()
    out = {"first": first.disk_stats()}

    second = TieredPromptCache(LRUPromptCache(2), args)
    # a prompt that continues the first entry: served from its chain and end state
    cache, rest = second.fetch_nearest_cache(key, a + [5, 6, 7])
    out["extends"] = [second.last_fetch_tier, second.last_fetch_tokens, len(rest)]
    out["kv_offset"] = cache[0].offset
    got = list(cache[1].state[:2]) if kind == "sliding" else list(cache[1].cache)
    out["same_end_state"] = all(mx.array_equal(x, y).item() for x, y in zip(got, want))
    keys = cache[0].keys[..., :600, :]
    out["same_kv"] = mx.array_equal(keys, stored[0].keys[..., :600, :]).item()
    # a prompt that leaves the entry inside a block: no end state there, nothing loaded
    cache, rest = second.fetch_nearest_cache(key, a[:450] + [5, 6])
    out["inside"] = [second.last_fetch_tier, second.last_fetch_tokens]
    second.close()
    print(json.dumps(out))
    """
)


@pytest.mark.parametrize("kind", ["linear", "sliding"])
def test_layers_not_per_token_are_kept_at_the_chain_end(patched_runtime, tmp_path, kind):
    folder = tmp_path / "pc"
    result = subprocess.run(
        [str(patched_runtime.python), "-c", TIER_SCRIPT, str(folder), kind],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout)
    first = out["first"]
    # the per-token layer in blocks (two of 600 tokens, shared by both entries), the
    # whole layer in each entry's tail: the first entry is not redundant, as it is the
    # only end state at 600 tokens
    assert first["blocks"] == 2 and first["entries"] == 2 and first["blocks_shared"] == 2
    assert len(tails_of(folder)) == 2
    tail_roles = {metadata(p)["roles"] for p in tails_of(folder)}
    assert tail_roles == {json.dumps(["seq", "end"])}
    assert out["extends"] == ["disk", 600, 3]
    assert out["kv_offset"] == 600 and out["same_kv"] and out["same_end_state"]
    assert out["inside"] == [None, 0]


QUANTIZED_SCRIPT = textwrap.dedent(
    """
    import argparse, sys
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, LRUPromptCache
    from mlx_lm.prompt_cache_disk import TieredPromptCache

    args = argparse.Namespace(
        prompt_cache_dir=sys.argv[1], prompt_cache_dir_bytes=1 << 30, model="q",
        adapter_path=None, draft_model=None, kv_bits=4, kv_group_size=32,
        quantized_kv_start=300,
    )
    key, tokens = ("q", None, None), list(range(700))
    k = mx.random.normal((1, 2, 700, 32), key=mx.random.key(5))
    tier = TieredPromptCache(LRUPromptCache(2), args)
    c = KVCache()
    c.update_and_fetch(k[..., :280, :], -k[..., :280, :])
    tier.insert_cache(key, tokens[:280], [c])  # a float block and tail
    tier.flush()
    q = c.to_quantized(group_size=32, bits=4)  # the conversation crossed the start
    q.update_and_fetch(k[..., 280:, :], -k[..., 280:, :])
    tier.insert_cache(key, tokens, [q])  # quantized blocks after the float one
    tier.close()
    again = TieredPromptCache(LRUPromptCache(2), args)
    got, rest = again.fetch_nearest_cache(key, tokens + [1])
    ref = KVCache()
    ref.update_and_fetch(k, -k)
    ref = ref.to_quantized(group_size=32, bits=4)
    same = all(mx.array_equal(a[..., :700, :], b[..., :700, :]).item()
               for a, b in zip(got[0].keys + got[0].values, ref.keys + ref.values))
    print(type(got[0]).__name__, got[0].offset, len(rest), same)
    again.close()
    """
)


def test_a_chain_that_crossed_quantized_kv_start_loads_quantized(patched_runtime, tmp_path):
    """Blocks written before --quantized-kv-start are float, after it quantized: the chain
    loads as one QuantizedKVCache, the same as mlx-lm quantizing the whole cache."""
    result = subprocess.run(
        [str(patched_runtime.python), "-c", QUANTIZED_SCRIPT, str(tmp_path / "pc")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split() == ["QuantizedKVCache", "700", "1", "True"]

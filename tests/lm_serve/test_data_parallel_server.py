"""`lm serve api_server --dp 2` on the CPU, driven by the official openai client: concurrent chats go to both
replicas, and `/metrics` shows each replica's gauges and routed requests beside the whole engine's.

The model is lm-lite's tiny random Llama with the default model's tokenizer and chat template.
"""

from __future__ import annotations

import random
from concurrent.futures import ThreadPoolExecutor

import pytest

openai = pytest.importorskip("openai")


def test_api_server_with_dp_2_routes_to_both_replicas_and_exports_them(
    tmp_path, default_model_dir, server_process, scrape, tiny_models
):
    model = tiny_models.make_tiny("llama", tmp_path / "tiny-llama", default_model_dir)
    flags = ["--dp", "2", "--model-name", "tiny", "--session-len", "256", "--num-kv-blocks", "64", "--num-threads", "1"]
    server = server_process(model, *flags)
    try:
        client = openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        rng = random.Random(7)
        words = ["river", "stone", "cloud", "lamp", "orbit", "maple", "violet", "engine", "harbor", "quartz"]
        # Long, distinct messages: the chat template's common start is a small part of each prompt.
        messages = [" ".join(rng.choice(words) for _ in range(60)) for _ in range(6)]

        def chat(content: str):
            return client.chat.completions.create(
                model="tiny", messages=[{"role": "user", "content": content}], max_tokens=8
            )

        with ThreadPoolExecutor(len(messages)) as pool:
            answers = list(pool.map(chat, messages))
        assert all(a.choices[0].finish_reason in ("stop", "length") for a in answers)
        samples = scrape(server)
    finally:
        server.stop()
    per_replica = [samples[f'lm_dp_requests_routed_total{{replica="{i}"}}'] for i in range(2)]
    assert sum(per_replica) == len(messages) and min(per_replica) >= 1, per_replica
    for name in ("lm_requests_running", "lm_requests_waiting", "lm_kv_cache_usage_ratio", "lm_prefix_cache_hit_rate"):
        assert name in samples  # the whole engine, as without --dp
        assert f'{name}{{replica="0"}}' in samples and f'{name}{{replica="1"}}' in samples
    assert samples['lm_dp_requests_in_flight{replica="0"}'] == samples['lm_dp_requests_in_flight{replica="1"}'] == 0

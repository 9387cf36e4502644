"""Online serving benchmark against any OpenAI-compatible server (ours, its proxy, vLLM, SGLang, LMDeploy, ...).

Requests take their lengths from ShareGPT pairs (`--dataset`, default benchmarks/data/sharegpt_lengths_1000.json):
the prompt is random common English words, about the pair's input length in tokens (one word is one token in the
usual BPE vocabularies; the chat template adds its own few tokens), and `max_tokens` is the pair's output length
(capped by --max-output-len), with `"ignore_eos": true` so each request generates all of it (--no-ignore-eos for
servers that refuse unknown fields). Every request streams, with `stream_options.include_usage`.

Arrivals are a Poisson process at --request-rate requests/s (inf: all at once), optionally capped by
--max-concurrency requests in flight:

    lm serve api_server &                                    # listens on http://127.0.0.1:23333
    python benchmarks/serving.py --base-url http://127.0.0.1:23333 --max-concurrency 64 --num-prompts 64 \
        --max-output-len 128
    python benchmarks/serving.py --base-url http://127.0.0.1:23333 --request-rate 2 --num-prompts 64 \
        --max-output-len 128 --endpoint completions

Image workload (`--workload image`, like LMDeploy's `profile_restful_api.py --dataset-name image`): every request
is `--images-per-request` random JPEGs of `--image-size` (WxH, or a preset: 4k, 1080p, 720p, 360p) sent as data
URLs in `image_url` parts, then about `--image-input-len` tokens of text, and asks for `--image-output-len` tokens.
Each image is new random noise, so no request hits another's prefix or encoder cache. Needs Pillow.

    python benchmarks/serving.py --workload image --image-size 720p --num-prompts 500 --max-concurrency 64

Prints one JSON object: completed and failed counts, duration, req/s, output tok/s, TTFT / TPOT / ITL / end-to-end
latency (mean, p50, p99, in ms) and the first distinct errors. Exits 1 if any request failed.

- TTFT: request sent to the first chunk carrying text. TPOT: (latency - TTFT) / (output tokens - 1), per request.
- ITL: the gaps between successive text chunks (a chunk holding several tokens counts as one gap).
- Output tokens: the server's `usage.completion_tokens` when it reports usage, else the number of text chunks.
- Failed: a non-200 answer, an error event in the stream, a dropped connection, or a stream without `[DONE]`.

Needs only httpx (and tqdm for the progress bar, optional).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

HERE = Path(__file__).parent
DEFAULT_DATASET = HERE / "data" / "sharegpt_lengths_1000.json"

# Frequent English words that the common BPE vocabularies (Llama, Qwen, GPT-2, SmolLM) hold as single tokens,
# with or without a leading space: N of them joined by spaces make a prompt of about N tokens.
_WORD_TEXT = (
    "the of and to in is was for on that with as by at from his her are this be which or an had not but have were "
    "their one all also has its new first two after other who more time year years can into would only over most "
    "some such when what made there many may then these them well used where later during people him while about "
    "world city state part between under three both work known since number before each because through school "
    "called being high life same music back will did way found any game than home war long name area around film "
    "four family team end left early best local said book came small great began major public held best last due "
    "until very own group took series old off just much show water five second set day still house line good major "
    "based form place along including until city church several country land power best red main among however "
    "street light king story play top love field party open making point late head given men women run lead"
)
WORDS = tuple(dict.fromkeys(_WORD_TEXT.split()))


@dataclass
class RequestSpec:
    """One request of the workload: its prompt text and lengths, and its images (data URLs) if any."""

    prompt: str
    input_len: int
    output_len: int
    images: list[str] = field(default_factory=list)


# Image sizes of `--image-size` presets (width x height), as LMDeploy's image dataset names them.
IMAGE_PRESETS = {"4k": (3840, 2160), "1080p": (1920, 1080), "720p": (1280, 720), "360p": (640, 360)}


def image_size(text: str) -> tuple[int, int]:
    """`--image-size`: a preset name or WIDTHxHEIGHT."""
    if text.lower() in IMAGE_PRESETS:
        return IMAGE_PRESETS[text.lower()]
    try:
        width, height = (int(v) for v in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected WIDTHxHEIGHT or one of {sorted(IMAGE_PRESETS)}, got {text!r}"
        ) from None
    if width < 1 or height < 1:
        raise argparse.ArgumentTypeError(f"image size must be positive, got {text!r}")
    return width, height


def random_jpeg_url(rng: random.Random, size: tuple[int, int]) -> str:
    """A data URL of a JPEG of random noise (quality 90) of `size`."""
    import base64
    import io

    from PIL import Image

    width, height = size
    image = Image.frombytes("RGB", size, rng.randbytes(width * height * 3))
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", quality=90)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode()


def image_requests(args: argparse.Namespace) -> list[RequestSpec]:
    """`--num-prompts` requests of the image workload (see the module docstring)."""
    rng = random.Random(args.seed)
    specs = []
    for _ in range(args.num_prompts):
        images = [random_jpeg_url(rng, args.image_size) for _ in range(args.images_per_request)]
        prompt = make_prompt(rng, args.image_input_len)
        specs.append(RequestSpec(prompt, args.image_input_len, args.image_output_len, images))
    return specs


@dataclass
class RequestResult:
    """What one request measured; times are seconds on `time.perf_counter`."""

    ok: bool = False
    error: str | None = None
    latency: float = 0.0
    ttft: float | None = None
    itls: list[float] = field(default_factory=list)
    num_chunks: int = 0
    output_tokens: int = 0
    prompt_tokens: int | None = None
    expected_output_len: int = 0


def make_prompt(rng: random.Random, num_tokens: int) -> str:
    """About `num_tokens` tokens of random common words (a new draw for every request, so no prefix is shared)."""
    return " ".join(rng.choice(WORDS) for _ in range(max(1, num_tokens)))


def load_requests(path: Path, num_prompts: int, max_output_len: int | None, seed: int) -> list[RequestSpec]:
    """The first `num_prompts` pairs of the dataset as requests (the dataset repeats if it is shorter)."""
    pairs = json.loads(path.read_text())["pairs"]
    if not pairs:
        raise SystemExit(f"{path}: no pairs")
    rng = random.Random(seed)
    specs = []
    for i in range(num_prompts):
        input_len, output_len = pairs[i % len(pairs)]
        if max_output_len:
            output_len = min(output_len, max_output_len)
        specs.append(RequestSpec(make_prompt(rng, input_len), input_len, output_len))
    return specs


def build_payload(args: argparse.Namespace, spec: RequestSpec) -> dict:
    """The JSON body of one streamed request."""
    payload: dict = {
        "model": args.model,
        "max_tokens": spec.output_len,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    if args.temperature is not None:
        payload["temperature"] = args.temperature
    if args.ignore_eos:
        payload["ignore_eos"] = True
    if args.endpoint == "chat" and spec.images:
        parts: list[dict] = [{"type": "image_url", "image_url": {"url": url}} for url in spec.images]
        parts.append({"type": "text", "text": spec.prompt})
        payload["messages"] = [{"role": "user", "content": parts}]
    elif args.endpoint == "chat":
        payload["messages"] = [{"role": "user", "content": spec.prompt}]
    else:
        payload["prompt"] = spec.prompt
    return payload


def chunk_text(event: dict, chat: bool) -> str:
    """The text a streamed chunk carries (chat: content or reasoning; completions: text)."""
    pieces = []
    for choice in event.get("choices") or []:
        if chat:
            delta = choice.get("delta") or {}
            pieces.append((delta.get("content") or "") + (delta.get("reasoning_content") or ""))
        else:
            pieces.append(choice.get("text") or "")
    return "".join(pieces)


async def send_request(client: httpx.AsyncClient, url: str, payload: dict, chat: bool) -> RequestResult:
    """Send one streamed request and time its chunks."""
    result = RequestResult(expected_output_len=payload["max_tokens"])
    usage = None
    done = False
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = f"HTTP {response.status_code}: {body[:300]}"
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data:"):
                    continue
                data = line[len("data:") :].strip()
                if data == "[DONE]":
                    done = True
                    break
                event = json.loads(data)
                if "error" in event:
                    result.error = f"error event: {json.dumps(event['error'])[:300]}"
                    return result
                if event.get("usage"):
                    usage = event["usage"]
                if chunk_text(event, chat):
                    now = time.perf_counter()
                    if result.ttft is None:
                        result.ttft = now - start
                    else:
                        result.itls.append(now - last)
                    last = now
                    result.num_chunks += 1
    except (httpx.HTTPError, ValueError) as exc:
        result.error = f"{type(exc).__name__}: {exc}"
        return result
    result.latency = time.perf_counter() - start
    if not done:
        result.error = "the stream ended without [DONE]"
        return result
    result.ok = True
    result.output_tokens = result.num_chunks
    if usage:
        result.output_tokens = usage.get("completion_tokens", result.num_chunks)
        result.prompt_tokens = usage.get("prompt_tokens")
    return result


async def run(args: argparse.Namespace, specs: list[RequestSpec]) -> tuple[float, list[RequestResult]]:
    """Issue every request (Poisson arrivals, at most --max-concurrency in flight); returns (seconds, results)."""
    chat = args.endpoint == "chat"
    url = f"{args.base_url}/v1/{'chat/completions' if chat else 'completions'}"
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    timeout = httpx.Timeout(args.timeout, connect=30.0, pool=None)
    limits = httpx.Limits(max_connections=None, max_keepalive_connections=None)
    semaphore = asyncio.Semaphore(args.max_concurrency or len(specs))
    arrivals = random.Random(args.seed + 1)
    bar = _progress_bar(len(specs), args.disable_tqdm)

    async with httpx.AsyncClient(headers=headers, timeout=timeout, limits=limits, trust_env=False) as client:

        async def one(spec: RequestSpec) -> RequestResult:
            async with semaphore:
                result = await send_request(client, url, build_payload(args, spec), chat)
            if bar is not None:
                bar.update(1)
            return result

        start = time.perf_counter()
        tasks = []
        for spec in specs:
            tasks.append(asyncio.create_task(one(spec)))
            if math.isfinite(args.request_rate):
                await asyncio.sleep(arrivals.expovariate(args.request_rate))
        results = await asyncio.gather(*tasks)
        elapsed = time.perf_counter() - start
    if bar is not None:
        bar.close()
    return elapsed, list(results)


def _progress_bar(total: int, disabled: bool):
    if disabled:
        return None
    try:
        from tqdm.auto import tqdm
    except ImportError:
        return None
    return tqdm(total=total, desc="requests", file=sys.stderr)


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile with linear interpolation between the closest ranks (numpy's default)."""
    ordered = sorted(values)
    rank = q / 100 * (len(ordered) - 1)
    low = math.floor(rank)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (rank - low)


def summary_ms(values_s: list[float]) -> dict | None:
    """Mean, p50 and p99 of `values_s` (seconds) in milliseconds; None when there are none."""
    if not values_s:
        return None
    ms = [value * 1000 for value in values_s]
    return {
        "mean": round(sum(ms) / len(ms), 2),
        "p50": round(percentile(ms, 50), 2),
        "p99": round(percentile(ms, 99), 2),
    }


def report(args: argparse.Namespace, specs: list[RequestSpec], elapsed: float, results: list[RequestResult]) -> dict:
    """The benchmark's result as one JSON-ready dict."""
    done = [r for r in results if r.ok]
    output_tokens = sum(r.output_tokens for r in done)
    reported_prompt = [r.prompt_tokens for r in done if r.prompt_tokens is not None]
    errors = list(dict.fromkeys(r.error for r in results if not r.ok))
    return {
        "base_url": args.base_url,
        "endpoint": args.endpoint,
        "model": args.model,
        "num_prompts": len(specs),
        "request_rate": "inf" if math.isinf(args.request_rate) else args.request_rate,
        "max_concurrency": args.max_concurrency,
        "completed": len(done),
        "failed": len(results) - len(done),
        "duration_s": round(elapsed, 2),
        "request_throughput": round(len(done) / elapsed, 3),
        "output_throughput": round(output_tokens / elapsed, 2),
        "total_output_tokens": output_tokens,
        # The server's count when it reports usage for every request (chat templates add tokens), else the dataset's.
        "total_input_tokens": sum(reported_prompt) if len(reported_prompt) == len(done) else None,
        "dataset_input_tokens": sum(s.input_len for s in specs),
        "workload": args.workload,
        "images_per_request": args.images_per_request if args.workload == "image" else 0,
        "image_size": "x".join(map(str, args.image_size)) if args.workload == "image" else None,
        "num_short_outputs": sum(r.output_tokens < r.expected_output_len for r in done),
        "ttft_ms": summary_ms([r.ttft for r in done if r.ttft is not None]),
        "tpot_ms": summary_ms([(r.latency - r.ttft) / (r.output_tokens - 1) for r in done if r.output_tokens > 1]),
        "itl_ms": summary_ms([gap for r in done for gap in r.itls]),
        "e2e_latency_ms": summary_ms([r.latency for r in done]),
        "errors": errors[:5],
    }


def first_model(base_url: str, api_key: str | None) -> str:
    """The first model the server lists."""
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    try:
        response = httpx.get(f"{base_url}/v1/models", headers=headers, timeout=30.0, trust_env=False)
        response.raise_for_status()
        return response.json()["data"][0]["id"]
    except (httpx.HTTPError, ValueError, KeyError, IndexError) as exc:
        raise SystemExit(f"cannot read the model from {base_url}/v1/models ({exc}); pass --model") from None


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", default="http://127.0.0.1:23333", help="the server, with or without /v1")
    parser.add_argument("--endpoint", choices=["chat", "completions"], default="chat")
    parser.add_argument("--model", default=None, help="model name to request (default: the server's first model)")
    parser.add_argument("--dataset", type=Path, default=DEFAULT_DATASET, help='JSON {"pairs": [[in, out], ...]}')
    parser.add_argument("--num-prompts", type=int, default=64)
    parser.add_argument("--request-rate", type=float, default=math.inf, help="requests/s, Poisson (default inf)")
    parser.add_argument("--max-concurrency", type=int, default=None, help="most requests in flight at once")
    parser.add_argument("--max-output-len", type=int, default=None, help="cap on each request's max_tokens")
    parser.add_argument("--temperature", type=float, default=0.0, help="sampling temperature sent (default greedy)")
    parser.add_argument("--ignore-eos", action=argparse.BooleanOptionalAction, default=True)
    parser.add_argument("--api-key", default=None, help="sent as 'Authorization: Bearer KEY'")
    parser.add_argument("--timeout", type=float, default=600.0, help="seconds a stream may go silent before failing")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--disable-tqdm", action="store_true")
    parser.add_argument("--workload", choices=["text", "image"], default="text", help="ShareGPT text, or images")
    parser.add_argument("--image-size", type=image_size, default=(1280, 720), help="WxH or 4k/1080p/720p/360p")
    parser.add_argument("--images-per-request", type=int, default=1)
    parser.add_argument("--image-input-len", type=int, default=64, help="text tokens beside the images")
    parser.add_argument("--image-output-len", type=int, default=128, help="max_tokens of an image request")
    args = parser.parse_args(argv)
    if args.workload == "image" and args.endpoint != "chat":
        parser.error("--workload image needs --endpoint chat")
    for name in ("num_prompts", "max_concurrency", "max_output_len", "images_per_request", "image_output_len"):
        value = getattr(args, name)
        if value is not None and value < 1:
            parser.error(f"--{name.replace('_', '-')} must be at least 1, got {value}")
    if not args.request_rate > 0:
        parser.error(f"--request-rate must be positive (inf: all at once), got {args.request_rate}")
    args.base_url = args.base_url.rstrip("/").removesuffix("/v1")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.model is None:
        args.model = first_model(args.base_url, args.api_key)
    if args.workload == "image":
        specs = image_requests(args)
    else:
        specs = load_requests(args.dataset, args.num_prompts, args.max_output_len, args.seed)
    elapsed, results = asyncio.run(run(args, specs))
    result = report(args, specs, elapsed, results)
    print(json.dumps(result, indent=2))
    return 1 if result["failed"] else 0


if __name__ == "__main__":
    sys.exit(main())

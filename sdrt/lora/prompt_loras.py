"""LoRAs named by `<lora:NAME:WEIGHT>` prompt tags, on a pipeline loaded with `lora_dirs=[...]`.

Each call's tags say which *tag LoRAs* are fused for it, at which scales: a tagged name is looked up in the
folders (`LoraFolders`), loaded or re-scaled; a tag LoRA of an earlier call that this call does not name is
unloaded (a call with no tags runs without tag LoRAs, as in AUTOMATIC1111). LoRAs loaded with
`pipe.load_lora` are never touched by tags; a tag naming one of them is an error. A list of prompts shares
the weights, so every prompt in it must carry the same tags. Everything is checked, and the files read,
before any weight changes; the changes are then fused in one pass (`batch_lora_changes`)."""
from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Iterable, Mapping, Optional

from sdrt.errors import InvalidInputError
from sdrt.lora.folders import LoraFolders
from sdrt.lora.tags import has_lora_tags, parse_lora_tags

Wanted = dict[str, tuple[Path, float]]  # name -> (file, scale)


def take_lora_tags(prompt: Any, negative_prompt: Any, folders: Optional[LoraFolders]) -> tuple[Any, dict]:
    """(the prompt(s) without tags, {name: weight}); the prompt is returned as given when it has no tags."""
    for negative in ([negative_prompt] if isinstance(negative_prompt, str) else negative_prompt or []):
        if isinstance(negative, str) and has_lora_tags(negative):
            raise InvalidInputError("negative_prompt: <lora:...> tags belong in the prompt")
    texts = [prompt] if isinstance(prompt, str) else prompt
    if not isinstance(texts, (list, tuple)) or not any(isinstance(t, str) and has_lora_tags(t) for t in texts):
        return prompt, {}
    if folders is None:
        raise InvalidInputError("the prompt has <lora:...> tags, but this pipeline has no LoRA folders: load it with "
                                "sdrt.load(..., lora_dirs=[...]) (sdrt generate --lora-dir DIR), or remove the tags")
    parsed = [parse_lora_tags(t) if isinstance(t, str) else (t, ()) for t in texts]
    if len({tags for _, tags in parsed}) > 1:
        raise InvalidInputError("every prompt of a list must carry the same <lora:...> tags (they change the "
                                "weights all the images of a call share)")
    stripped = [text for text, _ in parsed]
    return (stripped[0] if isinstance(prompt, str) else stripped), dict(parsed[0][1])


def resolve(tags: Mapping[str, float], folders: Optional[LoraFolders], explicit: Iterable[str]) -> Wanted:
    """{name: (file, weight)} for the tags; InvalidInputError for an unknown name or one loaded by load_lora."""
    explicit = set(explicit)
    wanted: Wanted = {}
    for name, weight in tags.items():
        if name in explicit:
            raise InvalidInputError(f"<lora:{name}:...>: a LoRA named {name!r} was loaded with load_lora; "
                                    f"set its scale with set_lora_scale, or unload it to use the tag")
        wanted[name] = (folders.find(name), weight)
    return wanted


def sync_loras(pipe: Any, wanted: Mapping[str, tuple[Path, float]], managed: Iterable[str]) -> None:
    """Make the fused LoRAs among `managed` (and the wanted ones) exactly `wanted`: unload the others, load or
    re-scale these, each weight rewritten once."""
    current = dict(pipe.loras)
    stale = [name for name in managed if name in current and name not in wanted]
    changes = [name for name, (_, w) in wanted.items() if current.get(name) != w]
    if not stale and not changes:
        return
    batch = getattr(pipe, "batch_lora_changes", contextlib.nullcontext)  # a pipeline may lack the batching
    with batch():
        for name in stale:
            pipe.unload_lora(name)
        for name in changes:
            path, weight = wanted[name]
            if name in current:
                pipe.set_lora_scale(name, weight)
            else:
                pipe.load_lora(path, scale=weight, name=name)

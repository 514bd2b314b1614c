"""The TensorRT engine cache: keys, atomic writes and the staleness check. Needs no TensorRT.

An entry is two files, `<component>-<key>.plan` (the serialized engine) and `<component>-<key>.json`
(the full key plus the plan's size and sha256). Both are written to temporary names and renamed, plan
first, so a reader finds either a complete pair or no `.json`. A plan is used only when its `.json`
holds exactly the expected key and the plan matches the recorded size and hash; anything else (an
interrupted write, another GPU's or TensorRT version's engine, an edited file) is rebuilt, never run.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable, Optional

from sdrt.export.contracts import ShapeProfile

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class BuildFlags:
    """precision: "fp32" | "fp16" | "bf16" (TensorRT may pick lower-precision kernels, costing accuracy:
    fp16 ~1e-3 relative, bf16 ~1e-2; an fp16 engine from an fp16 export keeps the graph's types, see
    `sdrt.export.tensorrt`). refit: weights can be swapped later (LoRA), at some speed cost.
    static: min == opt == max shapes, which lets the backend capture CUDA graphs."""
    precision: str = "fp16"
    refit: bool = False
    static: bool = False


@dataclass(frozen=True)
class EngineKey:
    component: str
    onnx_sha256: str
    profile: ShapeProfile
    flags: BuildFlags
    tensorrt_version: str
    gpu_name: str

    def as_dict(self) -> dict:
        return {"component": self.component, "onnx_sha256": self.onnx_sha256, "profile": self.profile.as_dict(),
                "flags": asdict(self.flags), "tensorrt_version": self.tensorrt_version, "gpu_name": self.gpu_name}

    def digest(self) -> str:
        return hashlib.sha256(json.dumps(self.as_dict(), sort_keys=True).encode()).hexdigest()


class EngineCache:
    def __init__(self, directory: Path):
        self.directory = Path(directory)

    def paths(self, key: EngineKey) -> tuple[Path, Path]:
        stem = f"{key.component}-{key.digest()[:20]}"
        return self.directory / f"{stem}.plan", self.directory / f"{stem}.json"

    def load(self, key: EngineKey) -> Optional[bytes]:
        """The cached plan for exactly `key`, or None when absent, stale or damaged."""
        plan_path, meta_path = self.paths(key)
        try:
            meta = json.loads(meta_path.read_text(encoding="utf-8"))
            plan = plan_path.read_bytes()
        except (OSError, ValueError):
            return None
        if meta.get("key") != key.as_dict():
            log.warning("%s was built for another key; rebuilding", plan_path)
            return None
        if meta.get("bytes") != len(plan) or meta.get("sha256") != hashlib.sha256(plan).hexdigest():
            log.warning("%s does not match its recorded size/hash; rebuilding", plan_path)
            return None
        return plan

    def store(self, key: EngineKey, plan: bytes) -> Path:
        plan_path, meta_path = self.paths(key)
        self.directory.mkdir(parents=True, exist_ok=True)
        meta = {"key": key.as_dict(), "bytes": len(plan), "sha256": hashlib.sha256(plan).hexdigest()}
        meta_path.unlink(missing_ok=True)  # no reader may pair the old metadata with the new plan
        write_atomic(plan_path, plan)
        write_atomic(meta_path, json.dumps(meta, indent=1).encode())
        return plan_path

    def get_or_build(self, key: EngineKey, build: Callable[[], bytes]) -> bytes:
        plan = self.load(key)
        if plan is None:
            log.info("building the %s TensorRT engine (%s)", key.component, self.paths(key)[0].name)
            plan = build()
            self.store(key, plan)
        return plan


def write_atomic(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)

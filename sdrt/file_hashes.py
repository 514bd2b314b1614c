"""The short file hashes AUTOMATIC1111 writes into image parameters (`Lora hashes: "name: 0123456789ab"`).

A1111 shows the first 12 hex digits of a SHA-256: for a LoRA in .safetensors, of the file after its header
(sd-webui-additional-networks' "addnet" hash, so editing the metadata keeps it), for other files of the whole
file (embeddings: `TI hashes`). A1111 prefers a hash a LoRA's metadata claims (`sshs_model_hash`); sdrt always
computes it from the bytes."""
from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Union

SHORT = 12
_BLOCK = 1 << 20


def short_hash(path: Union[str, Path], skip_safetensors_header: bool = True) -> str:
    """12 hex digits of SHA-256 over the file (after the safetensors header when `skip_safetensors_header`
    and the file is a .safetensors)."""
    path = Path(path)
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        if skip_safetensors_header and path.suffix == ".safetensors":
            header_len = int.from_bytes(f.read(8), "little")
            f.seek(8 + header_len)
        for block in iter(lambda: f.read(_BLOCK), b""):
            digest.update(block)
    return digest.hexdigest()[:SHORT]


def a1111_hash_list(hashes: dict[str, str]) -> str:
    """'name: hash, name2: hash2' as A1111 writes the value of `Lora hashes` (':' and ',' in names dropped)."""
    return ", ".join(f"{name.replace(':', '').replace(',', '')}: {h}" for name, h in hashes.items())

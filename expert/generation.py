"""Which generation of an expert a checkpoint is: ``generation.json`` in the expert's output folder
(``ROOT/experts/NAME/generation.json``, beside ``checkpoints/``), written by the coordinator when it
records the expert in the run's lineage (``ddm.coordinator.lineage``). A server reads it to say, in its
ExpertInfo, which generation answers; a checkpoint without one (trained outside a run, or by a ddm
before lineages) is generation 0 with lifecycle "" (unknown)."""

from __future__ import annotations

from typing import Any

from ddm.core import storage

GENERATION_FILE = "generation.json"


def generation_url(checkpoint: str) -> str:
    """Where the generation of ``checkpoint`` (a checkpoints folder or one file in it) is recorded."""
    url = checkpoint.rstrip("/")
    if url.endswith(".safetensors"):
        url = url.rsplit("/", 1)[0]
    if url.rsplit("/", 1)[-1] == "checkpoints":
        url = url.rsplit("/", 1)[0] if "/" in url else "."
    return storage.join(url, GENERATION_FILE)


def read_generation(checkpoint: str) -> tuple[int, str]:
    """(generation, lifecycle) of the expert whose checkpoint this is; (0, "") when none is recorded.
    A malformed file is a ValueError naming it (a server must not report a wrong generation)."""
    url = generation_url(checkpoint)
    if not storage.exists(url):
        return 0, ""
    rec: Any = storage.read_json(url)
    gen, life = (rec.get("generation"), rec.get("lifecycle")) if isinstance(rec, dict) else (None, None)
    if not isinstance(gen, int) or isinstance(gen, bool) or gen < 0 or not isinstance(life, str):
        raise ValueError(f"{url}: expected {{'generation': int >= 0, 'lifecycle': str}}, got {rec!r}")
    return gen, life

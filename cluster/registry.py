"""Turn the MODEL argument of `clusterctl run MODEL` into a local directory.

MODEL is a local directory, a friendly registry name (`llama-3.2-1b`, `qwen3-0.6b-4bit`, ...) or a
Hugging Face repo id (`org/name`). Repos are fetched with `huggingface_hub.snapshot_download` into the
standard HF cache, so a model downloaded once resolves offline afterwards.
"""

from __future__ import annotations

import difflib
import logging
import os
from pathlib import Path
from typing import Any

from huggingface_hub import snapshot_download
from huggingface_hub.errors import (
    GatedRepoError,
    HfHubHTTPError,
    HFValidationError,
    IncompleteSnapshotError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from tqdm import tqdm

log = logging.getLogger(__name__)

# Friendly name -> Hub repo id. The -4bit/-8bit variants are MLX affine-quantized checkpoints.
REGISTRY: dict[str, str] = {
    "llama-3.2-1b": "meta-llama/Llama-3.2-1B-Instruct",
    "llama-3.2-1b-4bit": "mlx-community/Llama-3.2-1B-Instruct-4bit",
    "llama-3.2-1b-8bit": "mlx-community/Llama-3.2-1B-Instruct-8bit",
    "llama-3.2-3b": "meta-llama/Llama-3.2-3B-Instruct",
    "llama-3.2-3b-4bit": "mlx-community/Llama-3.2-3B-Instruct-4bit",
    "llama-3.2-3b-8bit": "mlx-community/Llama-3.2-3B-Instruct-8bit",
    "llama-3.1-8b": "meta-llama/Llama-3.1-8B-Instruct",
    # mlx-community kept the original "Meta-" prefix for the 3.1 conversions.
    "llama-3.1-8b-4bit": "mlx-community/Meta-Llama-3.1-8B-Instruct-4bit",
    "llama-3.1-8b-8bit": "mlx-community/Meta-Llama-3.1-8B-Instruct-8bit",
    "qwen2.5-0.5b": "Qwen/Qwen2.5-0.5B-Instruct",
    "qwen2.5-0.5b-4bit": "mlx-community/Qwen2.5-0.5B-Instruct-4bit",
    "qwen2.5-0.5b-8bit": "mlx-community/Qwen2.5-0.5B-Instruct-8bit",
    "qwen2.5-1.5b": "Qwen/Qwen2.5-1.5B-Instruct",
    "qwen2.5-1.5b-4bit": "mlx-community/Qwen2.5-1.5B-Instruct-4bit",
    "qwen2.5-1.5b-8bit": "mlx-community/Qwen2.5-1.5B-Instruct-8bit",
    "qwen2.5-7b": "Qwen/Qwen2.5-7B-Instruct",
    "qwen2.5-7b-4bit": "mlx-community/Qwen2.5-7B-Instruct-4bit",
    "qwen2.5-7b-8bit": "mlx-community/Qwen2.5-7B-Instruct-8bit",
    "qwen3-0.6b": "Qwen/Qwen3-0.6B",
    "qwen3-0.6b-4bit": "mlx-community/Qwen3-0.6B-4bit",
    "qwen3-0.6b-8bit": "mlx-community/Qwen3-0.6B-8bit",
    "qwen3-1.7b": "Qwen/Qwen3-1.7B",
    "qwen3-1.7b-4bit": "mlx-community/Qwen3-1.7B-4bit",
    "qwen3-1.7b-8bit": "mlx-community/Qwen3-1.7B-8bit",
    "qwen3-4b": "Qwen/Qwen3-4B",
    "qwen3-4b-4bit": "mlx-community/Qwen3-4B-4bit",
    "qwen3-4b-8bit": "mlx-community/Qwen3-4B-8bit",
    "qwen3-8b": "Qwen/Qwen3-8B",
    "qwen3-8b-4bit": "mlx-community/Qwen3-8B-4bit",
    "qwen3-8b-8bit": "mlx-community/Qwen3-8B-8bit",
    "mistral-7b": "mistralai/Mistral-7B-Instruct-v0.3",
    "mistral-7b-4bit": "mlx-community/Mistral-7B-Instruct-v0.3-4bit",
    "mistral-7b-8bit": "mlx-community/Mistral-7B-Instruct-v0.3-8bit",
}

# Everything the engine and tokenizer read; skips *.bin / *.pth / *.gguf duplicates of the weights.
ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model"]

_TRUE = {"1", "on", "yes", "true"}


class ModelNotFoundError(LookupError):
    """MODEL could not be turned into a local directory holding a model."""


def list_models() -> dict[str, str]:
    """Registry names -> Hub repo ids (a copy, safe to modify)."""
    return dict(REGISTRY)


def local_path(model: str) -> Path:
    """MODEL read as a local path with `~` expanded; `~name` for a user this host lacks stays as written (it is
    then no directory, and the model is looked up as a name instead of failing on the expansion)."""
    try:
        return Path(model).expanduser()
    except RuntimeError:  # "Could not determine home directory"
        return Path(model)


def resolve_model(
    model: str,
    *,
    models_dir: Path | None = None,
    offline: bool | None = None,
    progress: bool = True,
) -> Path:
    """Return a local directory holding MODEL's config.json, weights and tokenizer files.

    `models_dir` is the Hugging Face cache directory to use (default: HF_HUB_CACHE). `offline=None` follows
    HF_HUB_OFFLINE; offline resolution only looks in the cache and never touches the network.
    """
    path = local_path(model)
    if path.is_dir():
        return _checked_dir(path, source=str(path))
    repo_id = REGISTRY.get(model.lower()) or (model if _is_repo_id(model) else None)
    if repo_id is None:
        raise ModelNotFoundError(_unknown_model_message(model, path))
    if offline is None:
        offline = _env_offline()
    snapshot = _download(repo_id, models_dir=models_dir, offline=offline, progress=progress)
    return _checked_dir(snapshot, source=f"Hugging Face repo {repo_id!r}")


def _env_offline() -> bool:
    # Read at call time: huggingface_hub.constants captures HF_HUB_OFFLINE once, at import.
    value = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    return value.strip().lower() in _TRUE


def _looks_like_path(model: str) -> bool:
    return model.startswith(("/", ".", "~")) or model.count("/") > 1


def _is_repo_id(model: str) -> bool:
    if model.count("/") != 1 or _looks_like_path(model):
        return False
    try:
        validate_repo_id(model)
    except HFValidationError:
        return False
    return True


def _unknown_model_message(model: str, path: Path) -> str:
    if _looks_like_path(model):
        return f"model directory {str(path)!r} does not exist"
    close = difflib.get_close_matches(model.lower(), REGISTRY, n=5, cutoff=0.5)
    if close:
        hint = f"did you mean {', '.join(close)}? (`clusterctl models` lists them all)"
    else:
        base = [name for name in REGISTRY if not name.endswith(("-4bit", "-8bit"))]
        hint = f"known models: {', '.join(base)} (each also as -4bit and -8bit)"
    return f"unknown model {model!r}: not a directory, a registry name or a Hugging Face repo id (org/name); {hint}"


def _checked_dir(path: Path, *, source: str) -> Path:
    if not (path / "config.json").is_file():
        raise ModelNotFoundError(
            f"{source} resolved to {str(path)!r}, which has no config.json; a model directory needs "
            "config.json, *.safetensors and tokenizer files"
        )
    return path


def _download(repo_id: str, *, models_dir: Path | None, offline: bool, progress: bool) -> Path:
    kwargs: dict[str, Any] = {} if progress else {"tqdm_class": _NoProgress}
    log.info("resolving %s (offline=%s, cache=%s)", repo_id, offline, models_dir or "default")
    try:
        folder = snapshot_download(
            repo_id,
            allow_patterns=ALLOW_PATTERNS,
            cache_dir=models_dir,
            local_files_only=offline,
            **kwargs,
        )
    except (HfHubHTTPError, LocalEntryNotFoundError) as exc:
        raise ModelNotFoundError(_download_error_message(repo_id, exc, offline=offline)) from exc
    return Path(folder)


def _download_error_message(repo_id: str, exc: Exception, *, offline: bool) -> str:
    local_hint = "or pass a local directory holding config.json, *.safetensors and tokenizer.json instead"
    if isinstance(exc, GatedRepoError) or _http_status(exc) == 401:
        return (
            f"access to {repo_id!r} was refused: the repo is gated or private. Accept its licence on "
            f"https://huggingface.co/{repo_id}, then run `huggingface-cli login` (or set HF_TOKEN), "
            f"{local_hint}"
        )
    if isinstance(exc, RepositoryNotFoundError):
        return (
            f"Hugging Face repo {repo_id!r} does not exist (or is private: run `huggingface-cli login` "
            f"or set HF_TOKEN); check the name, {local_hint}"
        )
    if isinstance(exc, RevisionNotFoundError):
        return f"Hugging Face repo {repo_id!r} has no 'main' revision; {local_hint}"
    if isinstance(exc, IncompleteSnapshotError):
        return (
            f"the cached copy of {repo_id!r} at {exc.snapshot_path!r} is incomplete and the Hub cannot be "
            f"reached to finish it; reconnect and run again, {local_hint}"
        )
    if isinstance(exc, LocalEntryNotFoundError):
        why = (
            "offline mode is on (HF_HUB_OFFLINE=1 or offline=True)"
            if offline
            else "this machine appears offline (the Hugging Face Hub cannot be reached)"
        )
        return (
            f"{why} and {repo_id!r} is not in the local cache; download it on a connected machine "
            f"(e.g. `huggingface-cli download {repo_id}`), {local_hint}"
        )
    return f"could not download {repo_id!r} from the Hugging Face Hub ({exc}); {local_hint}"


def _http_status(exc: Exception) -> int | None:
    response = getattr(exc, "response", None)
    return getattr(response, "status_code", None)


class _NoProgress(tqdm):  # type: ignore[type-arg]
    """A tqdm that never draws, for progress=False (huggingface_hub builds all its bars from it)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs["disable"] = True
        super().__init__(*args, **kwargs)

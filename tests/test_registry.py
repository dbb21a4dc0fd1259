from __future__ import annotations

import http.server
import ipaddress
import json
import socket
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import huggingface_hub.constants
import pytest

from cluster.registry import REGISTRY, ModelNotFoundError, list_models, resolve_model

COMMIT = "0123456789abcdef0123456789abcdef01234567"


@pytest.fixture(autouse=True)
def no_internet(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Any]]:
    """Refuse (and record) every connection that leaves the machine; loopback stays usable."""
    attempts: list[Any] = []
    real_connect = socket.socket.connect

    def guarded_connect(self: socket.socket, address: Any) -> Any:
        host = address[0] if isinstance(address, tuple) else None
        if host is not None and not _is_loopback(host):
            attempts.append(address)
            raise OSError(f"test blocked a connection to {address}")
        return real_connect(self, address)

    def guarded_getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        if not _is_loopback(host):
            attempts.append(host)
            raise socket.gaierror(f"test blocked a name lookup of {host}")
        return real_getaddrinfo(host, *args, **kwargs)

    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(socket.socket, "connect", guarded_connect)
    monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_TOKEN", "")  # never send a developer's real token to the fake hub
    yield attempts


def _is_loopback(host: Any) -> bool:
    if host in ("localhost", None):
        return True
    try:
        return ipaddress.ip_address(str(host)).is_loopback
    except ValueError:
        return False


def _model_dir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    (path / "tokenizer.json").write_text("{}")
    (path / "model.safetensors").write_bytes(b"")
    return path


def _cached_repo(cache: Path, repo_id: str) -> Path:
    """The standard HF cache layout: models--org--name/{refs/main, snapshots/<commit>/...}."""
    repo = cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(COMMIT)
    (repo / "blobs").mkdir()
    return _model_dir(repo / "snapshots" / COMMIT)


def test_local_directory_is_returned_as_is(tmp_path: Path) -> None:
    model = _model_dir(tmp_path / "my-model")
    assert resolve_model(str(model)) == model


def test_local_directory_without_config_is_rejected(tmp_path: Path) -> None:
    (tmp_path / "weights.safetensors").write_bytes(b"")
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        resolve_model(str(tmp_path))


def test_missing_local_path_says_so(tmp_path: Path) -> None:
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        resolve_model(str(tmp_path / "nope" / "model"))


def test_a_home_directory_of_no_user_is_no_crash(tmp_path: Path) -> None:
    # Path("~0").expanduser() raises RuntimeError on a host without user "0"; the name is then no directory
    for model in ("~0", "~no-such-user-0/model"):
        with pytest.raises(ModelNotFoundError):
            resolve_model(model, models_dir=tmp_path, offline=True)


def test_registry_names_map_to_hub_repos() -> None:
    models = list_models()
    assert models["llama-3.2-1b"] == "meta-llama/Llama-3.2-1B-Instruct"
    assert models["qwen3-0.6b-4bit"] == "mlx-community/Qwen3-0.6B-4bit"
    assert models["qwen2.5-0.5b-8bit"] == "mlx-community/Qwen2.5-0.5B-Instruct-8bit"
    assert models["mistral-7b-4bit"] == "mlx-community/Mistral-7B-Instruct-v0.3-4bit"
    base = [name for name in models if not name.endswith(("-4bit", "-8bit"))]
    assert len(base) == 11
    for name in base:
        assert f"{name}-4bit" in models and f"{name}-8bit" in models
        assert models[f"{name}-4bit"].startswith("mlx-community/")
    models["x"] = "y"  # a copy: the registry itself is untouched
    assert "x" not in REGISTRY


def test_registry_name_resolves_from_cache(tmp_path: Path) -> None:
    snapshot = _cached_repo(tmp_path, "Qwen/Qwen3-0.6B")
    assert resolve_model("qwen3-0.6b", models_dir=tmp_path, offline=True) == snapshot
    assert resolve_model("Qwen3-0.6B", models_dir=tmp_path, offline=True) == snapshot


def test_repo_id_resolves_from_cache_offline(tmp_path: Path, no_internet: list[Any]) -> None:
    snapshot = _cached_repo(tmp_path, "someorg/tiny-model")
    assert resolve_model("someorg/tiny-model", models_dir=tmp_path, offline=True, progress=False) == snapshot
    assert no_internet == []


def test_env_offline_uses_cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_internet: list[Any]) -> None:
    snapshot = _cached_repo(tmp_path, "someorg/tiny-model")
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert resolve_model("someorg/tiny-model", models_dir=tmp_path) == snapshot
    assert no_internet == []


def test_close_matches_are_suggested() -> None:
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("lama-3.2-1b")
    message = str(info.value)
    assert "unknown model 'lama-3.2-1b'" in message
    assert "llama-3.2-1b" in message


def test_unknown_name_without_matches_lists_registry() -> None:
    with pytest.raises(ModelNotFoundError, match="known models: .*qwen3-8b"):
        resolve_model("zzzzzz")


def test_offline_with_empty_cache_is_a_clear_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_internet: list[Any]
) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("llama-3.2-1b", models_dir=tmp_path)
    message = str(info.value)
    assert "offline" in message
    assert "meta-llama/Llama-3.2-1B-Instruct" in message
    assert "local directory" in message
    assert no_internet == []


def test_unreachable_hub_says_machine_appears_offline(tmp_path: Path, no_internet: list[Any]) -> None:
    with pytest.raises(ModelNotFoundError, match="appears offline") as info:
        resolve_model("someorg/tiny-model", models_dir=tmp_path, offline=False, progress=False)
    assert "someorg/tiny-model" in str(info.value)
    assert no_internet, "the hub should have been tried (and blocked by the test)"


def test_unreachable_hub_falls_back_to_cache(tmp_path: Path) -> None:
    snapshot = _cached_repo(tmp_path, "someorg/tiny-model")
    assert resolve_model("someorg/tiny-model", models_dir=tmp_path, offline=False, progress=False) == snapshot


def test_cached_snapshot_without_config_is_rejected(tmp_path: Path) -> None:
    snapshot = _cached_repo(tmp_path, "someorg/tiny-model")
    (snapshot / "config.json").unlink()
    with pytest.raises(ModelNotFoundError, match="someorg/tiny-model.*no config.json"):
        resolve_model("someorg/tiny-model", models_dir=tmp_path, offline=True)


@pytest.fixture
def fake_hub(monkeypatch: pytest.MonkeyPatch) -> Iterator[dict[str, Any]]:
    """A loopback HTTP server that answers every Hub API call with a configurable error."""
    reply: dict[str, Any] = {"status": 404, "error_code": "RepoNotFound"}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            body = json.dumps({"error": "test hub says no"}).encode()
            self.send_response(reply["status"])
            self.send_header("Content-Type", "application/json")
            self.send_header("X-Error-Code", reply["error_code"])
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_HEAD = do_GET

        def log_message(self, format: str, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", f"http://127.0.0.1:{server.server_port}")
    yield reply
    server.shutdown()
    server.server_close()


def test_gated_repo_explains_login(tmp_path: Path, fake_hub: dict[str, Any]) -> None:
    fake_hub.update(status=403, error_code="GatedRepo")
    with pytest.raises(ModelNotFoundError) as info:
        resolve_model("llama-3.2-1b", models_dir=tmp_path, progress=False)
    message = str(info.value)
    assert "gated" in message and "huggingface-cli login" in message and "HF_TOKEN" in message
    assert "meta-llama/Llama-3.2-1B-Instruct" in message


def test_unauthorized_repo_explains_login(tmp_path: Path, fake_hub: dict[str, Any]) -> None:
    fake_hub.update(status=401, error_code="RepoNotFound")
    with pytest.raises(ModelNotFoundError, match="huggingface-cli login"):
        resolve_model("someorg/private-model", models_dir=tmp_path, progress=False)


def test_missing_repo_is_reported(tmp_path: Path, fake_hub: dict[str, Any]) -> None:
    fake_hub.update(status=404, error_code="RepoNotFound")
    with pytest.raises(ModelNotFoundError, match="'someorg/no-such-model' does not exist"):
        resolve_model("someorg/no-such-model", models_dir=tmp_path, progress=False)

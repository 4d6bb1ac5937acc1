"""Checks on the model a run is pointed at, made before anything is loaded or written."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from transformers import AutoConfig, AutoTokenizer

from recipes.core.config import ConfigError


def require_model(
    model_name_or_path: str, trust_remote_code: bool = False, field: str = "model_name_or_path"
) -> None:
    """Fail in seconds, in one paragraph, when config `field`, `model_name_or_path`, names no loadable
    model."""
    if not model_name_or_path:
        raise ConfigError(f"{field} is empty; set it to a Hub id or the directory of a saved model")
    path = Path(model_name_or_path).expanduser()
    if path.is_dir() and not (path / "config.json").is_file():
        raise ConfigError(
            f"{field} {model_name_or_path} is a directory without config.json, so it holds no "
            "saved model; point it at the directory save_pretrained wrote (e.g. a run's final/)"
        )
    if not path.exists() and _is_local_path(model_name_or_path):
        raise ConfigError(
            f"{field} {model_name_or_path}: no such directory (relative paths start where the run "
            "starts); pass the directory save_pretrained wrote (e.g. the final/ of a run that has finished) "
            "or a Hub id"
        )
    try:
        AutoConfig.from_pretrained(model_name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as err:
        reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
        if "Repo id must" in reason:  # the Hub's rule for ids, which this name does not follow
            reason = "not a valid Hub id either: an organisation/name pair"
        raise ConfigError(
            f"{field} {model_name_or_path} is not a local directory and cannot be loaded as a "
            f"Hub model ({reason}); pass the directory of a saved model or a Hub id (offline, only models "
            "already in the cache; `recipes prepare` fetches the default ones)"
        ) from None


def _is_local_path(name: str) -> bool:
    """A name no Hub id can be: absolute, relative to here or home, or with more than one '/'."""
    return name.startswith(("/", "./", "../", "~")) or name.count("/") > 1


def load_tokenizer(cfg: Any) -> Any:
    """The tokenizer of the run's model, after checking that model_name_or_path names a model."""
    require_model(cfg.model_name_or_path, cfg.trust_remote_code)
    return AutoTokenizer.from_pretrained(cfg.model_name_or_path, trust_remote_code=cfg.trust_remote_code)

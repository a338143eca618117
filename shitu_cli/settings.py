"""User settings: a small config.yaml under $SHITU_HOME (else the XDG config dir); SHITU_<KEY> env vars win.

Precedence, highest on the right: default < config file < environment < command-line flag.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from shitu_cli.artifacts import atomic_write_text, read_yaml
from shitu_cli.errors import BadInput

CONFIG_FILE = "config.yaml"


@dataclass(frozen=True)
class Setting:
    key: str
    kind: str  # "path" (stored absolute), "model" (a path, stored absolute, or a model name) or "url"
    help: str

    @property
    def env(self) -> str:
        return f"SHITU_{self.key.upper()}"


SETTINGS = {
    s.key: s
    for s in (
        Setting("index", "path", "gallery index `shitu predict` uses when --index is not given"),
        Setting("rec", "model", "rec model `shitu build-index` embeds with when --rec is not given (a dir or a model name)"),
        Setting("model_base_url", "url", "mirror serving the official model files (same paths as the official host)"),
    )
}


@dataclass
class SettingValue:
    key: str
    value: str | None
    source: str  # "env SHITU_...", "config", or "default"
    help: str
    note: str | None = None


def config_path() -> Path:
    """$SHITU_HOME/config.yaml, else $XDG_CONFIG_HOME/shitu/config.yaml (~/.config/shitu/config.yaml)."""
    shitu_home = os.environ.get("SHITU_HOME")
    if shitu_home:
        return Path(shitu_home).expanduser() / CONFIG_FILE
    xdg = os.environ.get("XDG_CONFIG_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".config") / "shitu" / CONFIG_FILE


def check_key(key: str) -> Setting:
    from shitu_cli.recipes import merge_settings

    merge_settings(dict.fromkeys(SETTINGS), {key: None})  # refuses an unknown key, naming the closest one
    return SETTINGS[key]


def read_config() -> dict[str, Any]:
    path = config_path()
    if not path.is_file():
        return {}
    data = read_yaml(path) or {}
    if not isinstance(data, dict):
        raise BadInput("config file must be a mapping of key: value", path=path, hint="fix or delete it")
    for key in data:
        try:
            check_key(str(key))
        except BadInput as exc:
            raise BadInput(exc.message, hint=exc.hint, path=path) from None
    return data


def get_setting(key: str) -> SettingValue:
    setting = check_key(key)
    from_env = os.environ.get(setting.env, "").strip()
    if from_env:
        return SettingValue(key, from_env, f"env {setting.env}", setting.help)
    stored = read_config().get(key)
    if stored is not None:
        return SettingValue(key, str(stored), "config", setting.help)
    return SettingValue(key, None, "default", setting.help)


def all_settings() -> list[SettingValue]:
    return [get_setting(key) for key in SETTINGS]


def set_setting(key: str, value: str) -> SettingValue:
    """Store `value` for `key` in the config file (paths made absolute, URLs checked)."""
    setting = check_key(key)
    note = None
    if setting.kind == "path":
        path = Path(value).expanduser().absolute()
        value = str(path)
        if not path.exists():
            note = f"{path} does not exist yet"
    elif setting.kind == "model" and Path(value).expanduser().exists():
        value = str(Path(value).expanduser().absolute())
    elif setting.kind == "url" and not value.startswith(("http://", "https://")):
        raise BadInput(f"{key} must be an http(s) URL, got {value!r}", hint="e.g. https://mirror.example.com/paddle")
    data = read_config()
    data[key] = value
    _write_config(data)
    effective = get_setting(key)
    if effective.source != "config":
        note = f"stored, but {effective.source} overrides it"
    return SettingValue(key, value, "config", setting.help, note)


def _write_config(data: dict[str, Any]) -> None:
    # Block style: the file is for people to read and edit too.
    text = yaml.safe_dump(data, default_flow_style=False, sort_keys=True, allow_unicode=True)
    atomic_write_text(config_path(), "# shitu settings: `shitu config show` lists them\n" + text)


def unset_setting(key: str) -> SettingValue:
    check_key(key)
    data = read_config()
    if key in data:
        del data[key]
        _write_config(data)
    return get_setting(key)


def default_index() -> Path | None:
    """The index `shitu predict` uses when no --index is given: $SHITU_INDEX, else `index` in the config."""
    value = get_setting("index").value
    return Path(value).expanduser() if value else None

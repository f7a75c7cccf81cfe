"""Configuration, built once at the edge and passed down.

Precedence: explicit overrides (command-line flags) > ``CONVLOG_*`` variables
from the given mapping (default ``os.environ``) > defaults.  Nothing below the
entrypoint reads the environment.  Bad values fail at startup naming the
variable.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any, Literal

from .errors import BadRequestError
from .subjects import Subjects

__all__ = ["ConfigError", "Settings", "default_data_dir", "load_settings"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"


class ConfigError(BadRequestError):
    """A configuration value is missing or malformed."""


def default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or os.path.join(environ.get("HOME", "."), ".local", "share")
    return Path(base) / "convlog"


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob convlog has.  Field ``x`` is read from ``CONVLOG_X``."""

    nats_url: str = DEFAULT_NATS_URL
    prefix: str = "convlog"
    data_dir: Path = Path(".")
    db: Path | None = None
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    embedded: bool = True
    request_timeout: float = 5.0
    max_item_bytes: int = 256 * 1024
    commit_batch: int = 512
    stream_replicas: int = 1
    log_level: str = "INFO"
    agents: Path | None = None
    grace: float = 10.0
    web_token: str | None = None
    nats_seam: Literal["auto", "public"] = "auto"  # "public": nats-py public API only (shared.nats_seam)

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.data_dir / "convlog.db"

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` derived from the credentials settings."""
        opts: dict[str, Any] = {}
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey:
            opts["nkeys_seed"] = self.nkey
        if self.user:
            opts["user"] = self.user
        if self.password:
            opts["password"] = self.password
        if self.token:
            opts["token"] = self.token
        if self.tls_ca or self.tls_cert:
            import ssl

            ctx = ssl.create_default_context(cafile=self.tls_ca)
            if self.tls_cert:
                ctx.load_cert_chain(self.tls_cert, self.tls_key)
            opts["tls"] = ctx
        return opts


def _convert(name: str, raw: Any, typ: Any) -> Any:
    text = str(raw)
    typ_s = str(typ)
    try:
        if "bool" in typ_s:
            if isinstance(raw, bool):
                return raw
            low = text.strip().lower()
            if low in ("1", "true", "yes", "on"):
                return True
            if low in ("0", "false", "no", "off"):
                return False
            raise ValueError("expected true/false")
        if "int" in typ_s:
            return int(text)
        if "float" in typ_s:
            value = float(text)
            if value <= 0:
                raise ValueError("must be positive")
            return value
        if "Path" in typ_s:
            return Path(text).expanduser()
    except ValueError as e:
        raise ConfigError(f"CONVLOG_{name.upper()}={text!r} is invalid: {e}") from e
    return text


def load_settings(
    overrides: Mapping[str, Any] | None = None, environ: Mapping[str, str] | None = None
) -> Settings:
    """Build :class:`Settings` from flags, then ``CONVLOG_*`` variables, then defaults.

    ``overrides`` entries whose value is ``None`` are ignored (an unset flag).

    Raises:
        ConfigError: a value cannot be parsed; the message names the variable.
    """
    env = os.environ if environ is None else environ
    values: dict[str, Any] = {"data_dir": Path(env.get("CONVLOG_DATA_DIR") or default_data_dir(env))}
    for f in fields(Settings):
        key = f"CONVLOG_{f.name.upper()}"
        if key in env and env[key] != "":
            values[f.name] = _convert(f.name, env[key], f.type)
    for name, value in (overrides or {}).items():
        if value is not None:
            values[name] = _convert(name, value, next(f.type for f in fields(Settings) if f.name == name))
    settings = replace(Settings(), **values)
    try:
        _ = settings.subjects  # validates the prefix at startup
    except BadRequestError as e:
        raise ConfigError(f"CONVLOG_PREFIX={settings.prefix!r} is invalid: {e.message}") from e
    if settings.max_item_bytes < 1024:
        raise ConfigError("CONVLOG_MAX_ITEM_BYTES must be at least 1024")
    if settings.nats_seam not in ("auto", "public"):
        raise ConfigError(f"CONVLOG_NATS_SEAM={settings.nats_seam!r} is invalid: use auto or public")
    return settings

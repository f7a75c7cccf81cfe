"""Configuration, built once at the edge and passed down.

Precedence: explicit overrides (command-line flags) > ``CONVLOG_*`` variables
from the given mapping (default ``os.environ``) > defaults.  Nothing below the
entrypoint reads the environment.

Each value is parsed by its field's type (``int``, ``float``, ``bool``,
``Path``, a ``Literal`` of choices, optional or not) through msgspec, with the
range in the type (``Annotated[int, Meta(ge=1)]``); then the values that need
more than a type are checked (NATS URLs, the prefix, files that must exist).
A bad value fails at start-up with one message naming the variable (or the
flag) it came from.
"""

from __future__ import annotations

import os
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Annotated, Any, Literal
from urllib.parse import urlparse

import msgspec
from msgspec import Meta

from .errors import BadRequestError
from .subjects import Subjects, inbox_prefix

__all__ = ["STORES", "ConfigError", "Settings", "default_data_dir", "load_settings", "nats_servers"]

DEFAULT_NATS_URL = "nats://127.0.0.1:4222"
NATS_SCHEMES = ("nats", "tls", "ws", "wss")
#: The log stores ``CONVLOG_STORE`` / ``--store`` may name (the first is the default).
STORES = ("sqlite", "jetstream")

Seconds = Annotated[float, Meta(gt=0, le=86_400)]
LogLevel = Literal["DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL"]


class ConfigError(BadRequestError):
    """A configuration value is missing or malformed; the message names where it came from."""


def default_data_dir(environ: Mapping[str, str]) -> Path:
    base = environ.get("XDG_DATA_HOME") or os.path.join(environ.get("HOME", "."), ".local", "share")
    return Path(base) / "convlog"


def _nkey_public_key(path: str | Path) -> str | None:
    """The public key of the nkey seed file at ``path`` (``None``: unreadable or not a
    seed; nats-py says so when it connects)."""
    try:
        import nkeys

        return nkeys.from_seed(bytearray(Path(path).read_bytes().strip())).public_key.decode()
    except Exception:  # noqa: BLE001 - any failure here is nats-py's to report at connect
        return None


@dataclass(frozen=True, slots=True)
class Settings:
    """Every knob convlog has.  Field ``x`` is read from ``CONVLOG_X``."""

    nats_url: str = DEFAULT_NATS_URL
    prefix: str = "convlog"
    data_dir: Path = Path(".")
    db: Path | None = None
    store: Literal["sqlite", "jetstream"] = "sqlite"  # one of STORES
    creds: str | None = None
    nkey: str | None = None
    user: str | None = None
    password: str | None = None
    token: str | None = None
    tls_ca: str | None = None
    tls_cert: str | None = None
    tls_key: str | None = None
    embedded: bool = True
    request_timeout: Seconds = 5.0
    max_item_bytes: Annotated[int, Meta(ge=1024)] = 256 * 1024
    commit_batch: Annotated[int, Meta(ge=1, le=1_000_000)] = 512
    stream_replicas: Annotated[int, Meta(ge=1, le=5)] = 1  # JetStream allows 1..5
    shards: Annotated[int, Meta(ge=1, le=64)] = 1  # log streams of the JetStream store (fixed per log)
    log_level: LogLevel = "INFO"
    agents: Path | None = None
    grace: Annotated[float, Meta(ge=0, le=86_400)] = 10.0
    web_token: str | None = None
    nats_seam: Literal["auto", "public"] = "auto"  # "public": nats-py public API only (shared.nats_seam)
    signing_key: Path | None = None  # this process's private key (shared.signing)
    keyring: Path | None = None  # the public keyring: who may sign what
    require_signatures: bool = False  # the log service refuses unsigned or foreign appends
    head_interval: Seconds = 1.0  # most seconds before a commit is covered by a signed head
    metrics_port: Annotated[int, Meta(ge=0, le=65535)] | None = None  # Prometheus /metrics (0: any free port)
    log_format: Literal["text", "json"] = "text"  # "json": one JSON object per log line

    @property
    def subjects(self) -> Subjects:
        return Subjects(self.prefix)

    @property
    def db_path(self) -> Path:
        return self.db if self.db is not None else self.data_dir / "convlog.db"

    def nats_options(self) -> dict[str, Any]:
        """Keyword arguments for ``nats.connect`` derived from the credentials settings.

        Raises:
            ConfigError: a TLS file cannot be loaded (the message names it).
        """
        opts: dict[str, Any] = {}
        if self.creds:
            opts["user_credentials"] = self.creds
        if self.nkey:
            opts["nkeys_seed"] = self.nkey
            # nats-users.conf lets each nkey user subscribe to _INBOX.<its key>.> only
            # (services/cli/nats_users.py): its replies come there.
            if (key_id := _nkey_public_key(self.nkey)) is not None:
                opts["inbox_prefix"] = inbox_prefix(key_id)
        if self.user:
            opts["user"] = self.user
        if self.password:
            opts["password"] = self.password
        if self.token:
            opts["token"] = self.token
        if self.tls_ca or self.tls_cert:
            import ssl

            try:
                ctx = ssl.create_default_context(cafile=self.tls_ca)
            except (OSError, ssl.SSLError) as e:
                raise ConfigError(f"CONVLOG_TLS_CA={self.tls_ca!r}: cannot load it: {e}") from e
            if self.tls_cert:
                try:
                    ctx.load_cert_chain(self.tls_cert, self.tls_key)
                except (OSError, ssl.SSLError) as e:
                    raise ConfigError(
                        f"CONVLOG_TLS_CERT={self.tls_cert!r} / CONVLOG_TLS_KEY={self.tls_key!r}: "
                        f"cannot load the certificate and key: {e}"
                    ) from e
            opts["tls"] = ctx
        return opts


_HINTS: dict[str, Any] = typing.get_type_hints(Settings, include_extras=True)
_TRUE, _FALSE = ("1", "true", "yes", "on"), ("0", "false", "no", "off")


def _base(typ: Any) -> Any:
    """The type under ``Annotated`` and ``| None``."""
    while True:
        origin = typing.get_origin(typ)
        if origin is Annotated:
            typ = typing.get_args(typ)[0]
        elif origin in (typing.Union, types.UnionType):
            args = [a for a in typing.get_args(typ) if a is not type(None)]
            if len(args) != 1:
                return typ
            typ = args[0]
        else:
            return typ


def _dec_hook(typ: type, obj: Any) -> Any:
    if typ is Path and isinstance(obj, str):
        return Path(obj).expanduser()
    raise NotImplementedError


def _parse(name: str, raw: Any, source: str) -> Any:
    """``raw`` (a string from the environment, or a flag's value) as field ``name``'s type."""
    typ = _HINTS[name]
    base = _base(typ)
    value = raw
    if isinstance(raw, str):
        value = raw.strip()
        if base is Path and not value:  # Path("") is ".": the log went to the working directory
            raise ConfigError(f"{source}={raw!r} is invalid: an empty path")
        if base is bool:
            low = value.lower()
            value = True if low in _TRUE else False if low in _FALSE else value
        elif typing.get_origin(base) is Literal:  # any case: "info", "PUBLIC"
            value = next((a for a in typing.get_args(base) if a.lower() == value.lower()), value)
    try:
        return msgspec.convert(value, typ, strict=False, dec_hook=_dec_hook)
    except msgspec.ValidationError as e:
        detail = str(e)
        if base is bool:
            detail = "expected one of true/false, yes/no, on/off, 1/0"
        elif typing.get_origin(base) is Literal:
            detail = f"expected one of {', '.join(typing.get_args(base))}"
        raise ConfigError(f"{source}={raw!r} is invalid: {detail}") from e


def nats_servers(url: str) -> list[tuple[str, int]]:
    """``(host, port)`` of each server in a comma-separated NATS URL list.

    Raises:
        ValueError: a server has an unknown scheme, no host, or a bad port.
    """
    out = []
    for part in url.split(","):
        part = part.strip()
        if not part:
            raise ValueError("empty server in the list")
        parsed = urlparse(part if "://" in part else f"nats://{part}")
        if parsed.scheme not in NATS_SCHEMES:
            raise ValueError(f"{part!r}: scheme must be one of {', '.join(NATS_SCHEMES)}")
        if not parsed.hostname:
            raise ValueError(f"{part!r}: no host")
        try:
            port = parsed.port
        except ValueError as e:  # "Port out of range 0-65535", "could not be cast to integer"
            raise ValueError(f"{part!r}: bad port: {e}") from None
        if port == 0:
            raise ValueError(f"{part!r}: bad port: 0")
        out.append((parsed.hostname, port or 4222))
    return out


def _check(settings: Settings, source: dict[str, str], *, paths: bool) -> None:
    """What a type cannot say: URLs, the prefix, and (``paths``) files that must exist."""
    try:
        nats_servers(settings.nats_url)
    except ValueError as e:
        raise ConfigError(f"{source['nats_url']}={settings.nats_url!r} is invalid: {e}") from None
    try:
        _ = settings.subjects
    except BadRequestError as e:
        raise ConfigError(f"{source['prefix']}={settings.prefix!r} is invalid: {e.message}") from e
    if not paths:
        return
    if settings.data_dir.exists() and not settings.data_dir.is_dir():
        raise ConfigError(f"{source['data_dir']}={str(settings.data_dir)!r} is not a directory")
    if settings.db is not None and settings.db.is_dir():
        raise ConfigError(f"{source['db']}={str(settings.db)!r} is a directory, not a database file")
    # (The agents spec is read, and a missing one named, by the spec loader.)
    # The signing key and the keyring were read only once NATS answered: a missing one was
    # reported as NATS being unavailable (exit 3), after the whole start-up wait.
    for name in ("creds", "nkey", "tls_ca", "tls_cert", "tls_key", "signing_key", "keyring"):
        value = getattr(settings, name)
        if value is None:
            continue
        path = Path(value)
        if not path.is_file():
            what = "is a directory" if path.is_dir() else "does not exist"
            raise ConfigError(f"{source[name]}={str(value)!r}: {path} {what}")
        if not os.access(path, os.R_OK):
            raise ConfigError(f"{source[name]}={str(value)!r}: {path} is not readable")
    if settings.tls_key and not settings.tls_cert:  # (it was never loaded: no TLS at all, unsaid)
        raise ConfigError(f"{source['tls_key']}={settings.tls_key!r}: the key of a client certificate, "
                          "but CONVLOG_TLS_CERT is not set")
    if settings.tls_ca or settings.tls_cert:
        settings.nats_options()  # loads the CA and the certificate now, not at the first connect


def load_settings(
    overrides: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
    *,
    check_paths: bool = True,
) -> Settings:
    """Build :class:`Settings` from flags, then ``CONVLOG_*`` variables, then defaults.

    ``overrides`` entries whose value is ``None`` are ignored (an unset flag).
    With ``check_paths`` (the default) the files named (credentials, nkey seed, TLS,
    signing key, keyring)
    must exist and load, and the data directory must not be a file;
    without, only the values themselves are checked (e.g. to read a command
    line meant for another machine).

    Raises:
        ConfigError: a value cannot be parsed or is out of range; the message
            names the variable (or the flag) it came from.
    """
    env = os.environ if environ is None else environ
    source = {f.name: f"CONVLOG_{f.name.upper()}" for f in fields(Settings)}
    values: dict[str, Any] = {"data_dir": default_data_dir(env)}
    for f in fields(Settings):
        key = source[f.name]
        if env.get(key, "") != "":
            values[f.name] = _parse(f.name, env[key], key)
    for name, value in (overrides or {}).items():
        if value is not None:
            if name not in _HINTS:
                raise ConfigError(f"unknown setting {name!r}")
            source[name] = f"--{name.replace('_', '-')}"
            values[name] = _parse(name, value, source[name])
    settings = replace(Settings(), **values)
    _check(settings, source, paths=check_paths)
    return settings

"""NATS decentralized auth for tests: an operator, accounts and users as nkeys
and JWTs made here with the ``nkeys`` package, a server config in operator
mode (``resolver: MEMORY`` with the account JWTs preloaded), and ``.creds``
files as ``nsc`` writes them.

A JWT is ``base64url(header) . base64url(claims) . base64url(signature)``
with the header ``{"typ":"JWT","alg":"ed25519-nkey"}``, the signature an
Ed25519 signature by the issuer's nkey over the first two parts; ``jti`` is
the base32 SHA-512/256 of the claims, as the Go ``jwt`` library computes it::

    op = Operator.create("test-op")
    acct = op.account("APP", jetstream=True)
    user = acct.user("svc")
    server = NatsServer(tmp, config=op.server_config([acct, op.account("SYS")], system="SYS"))
    creds_file.write_text(user.creds())
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import nkeys

__all__ = ["Account", "Operator", "User", "new_key"]

_HEADER = {"typ": "JWT", "alg": "ed25519-nkey"}
_UNLIMITED = {"subs": -1, "data": -1, "payload": -1}


def new_key(prefix: int) -> nkeys.KeyPair:
    """A fresh nkey of the given role (``nkeys.PREFIX_BYTE_*``)."""
    return nkeys.from_seed(nkeys.encode_seed(os.urandom(32), prefix))


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def _public(key: nkeys.KeyPair) -> str:
    return key.public_key.decode()


def encode_jwt(claims: dict[str, Any], issuer: nkeys.KeyPair) -> str:
    """Sign ``claims`` (``iss``, ``iat`` and ``jti`` are filled in) with ``issuer``."""
    claims = {**claims, "iss": _public(issuer), "iat": int(time.time()), "jti": ""}
    digest = hashlib.new("sha512_256", json.dumps(claims, separators=(",", ":")).encode()).digest()
    claims["jti"] = base64.b32encode(digest).rstrip(b"=").decode()
    signing_input = f"{_b64(json.dumps(_HEADER).encode())}.{_b64(json.dumps(claims).encode())}"
    return f"{signing_input}.{_b64(issuer.sign(signing_input.encode()))}"


@dataclass
class User:
    name: str
    key: nkeys.KeyPair
    jwt: str

    def creds(self) -> str:
        """The ``.creds`` file text, as ``nsc generate creds`` writes it."""
        return (
            "-----BEGIN NATS USER JWT-----\n"
            f"{self.jwt}\n"
            "------END NATS USER JWT------\n\n"
            "************************* IMPORTANT *************************\n"
            "NKEY Seed printed below can be used to sign and prove identity.\n"
            "NKEYs are sensitive and should be treated as secrets.\n\n"
            "-----BEGIN USER NKEY SEED-----\n"
            f"{self.key.seed.decode()}\n"
            "------END USER NKEY SEED------\n\n"
            "*************************************************************\n"
        )


@dataclass
class Account:
    name: str
    key: nkeys.KeyPair
    jwt: str

    @property
    def public_key(self) -> str:
        return _public(self.key)

    def user(self, name: str) -> User:
        key = new_key(nkeys.PREFIX_BYTE_USER)
        claims = {"name": name, "sub": _public(key),
                  "nats": {"pub": {}, "sub": {}, **_UNLIMITED, "type": "user", "version": 2}}
        return User(name, key, encode_jwt(claims, self.key))


@dataclass
class Operator:
    name: str
    key: nkeys.KeyPair
    jwt: str = ""
    accounts: dict[str, Account] = field(default_factory=dict)

    @classmethod
    def create(cls, name: str) -> Operator:
        key = new_key(nkeys.PREFIX_BYTE_OPERATOR)
        claims = {"name": name, "sub": _public(key), "nats": {"type": "operator", "version": 2}}
        return cls(name, key, encode_jwt(claims, key))  # an operator signs itself

    def account(self, name: str, *, jetstream: bool = False) -> Account:
        key = new_key(nkeys.PREFIX_BYTE_ACCOUNT)
        limits: dict[str, Any] = {**_UNLIMITED, "imports": -1, "exports": -1, "wildcards": True,
                                  "conn": -1, "leaf": -1}
        if jetstream:
            limits.update({"mem_storage": -1, "disk_storage": -1, "streams": -1, "consumer": -1})
        claims = {"name": name, "sub": _public(key),
                  "nats": {"limits": limits, "default_permissions": {"pub": {}, "sub": {}},
                           "type": "account", "version": 2}}
        account = Account(name, key, encode_jwt(claims, self.key))
        self.accounts[name] = account
        return account

    def server_config(self, *, system: str | None = None) -> str:
        """nats-server config text: operator mode, every account preloaded in memory."""
        preload = "\n".join(f"  {a.public_key}: {a.jwt}" for a in self.accounts.values())
        lines = [f"operator: {self.jwt}", "resolver: MEMORY", f"resolver_preload: {{\n{preload}\n}}"]
        if system is not None:
            lines.append(f"system_account: {self.accounts[system].public_key}")
        return "\n".join(lines) + "\n"

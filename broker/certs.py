"""A throw-away certificate authority for CLUE Edge: a CA, the broker's certificate, one client
certificate per node and service identity.

For tests and first deployments; a production fleet uses its own PKI. Everything goes through the
`openssl` command (no Python crypto dependency) with EC P-256 keys, so a certificate takes a few
milliseconds.

Layout of the output directory (mode 0755: mosquitto must reach it after dropping privileges):

- `ca.crt`, `ca.key`: the CA. `ca.key` signs everything else: keep it off the brokers.
- `server.crt`, `server.key`: the broker's certificate; subjectAltName `localhost`, `127.0.0.1`,
  `::1` and any `hosts` given.
- `<identity>.crt`, `<identity>.key`: a client certificate with CN = identity, which is the MQTT
  username under Mosquitto's `use_identity_as_username` (see `broker.topology`).

Keys are 0600. Run as root, the keys mosquitto itself uses (`server.key`, and `bridge.key` for a
site broker's bridge) are handed to the user it drops to (`mosquitto`, else `nobody`): it loads
keys after dropping root. Files already there are kept (the CA too), so
running again with more `--nodes` adds certificates signed by the same CA; `--force` starts over.

    python -m broker.certs OUTDIR --nodes n1,n2 --roles mds,relay,operator

>>> certs = generate(tmp, nodes=["n1"], roles=["mds"])            # doctest: +SKIP
>>> MqttClient.from_url("mqtts://127.0.0.1", client_id="n1", **certs.client_kwargs("n1"))   # doctest: +SKIP
"""

from __future__ import annotations

import argparse
import ipaddress
import os
import pwd
import secrets
import shutil
import subprocess
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable, Sequence

from broker import topology
from broker.errors import TopicError
from broker.topics import validate_node_id

DEFAULT_HOSTS: tuple[str, ...] = ("localhost", "127.0.0.1", "::1")
DEFAULT_DAYS = 365
CA_NAME = "CLUE Edge throw-away CA"
_FILE_NAMES = frozenset(("ca", "server"))
#: The identity a site broker's bridge uses (see broker/mosquitto/bridge.conf).
BRIDGE = "bridge"

# A config of our own, so the system's openssl.cnf (and its defaults) plays no part.
_REQ_CONF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = unused
[ca_ext]
basicConstraints = critical, CA:TRUE, pathlen:0
keyUsage = critical, keyCertSign, cRLSign
subjectKeyIdentifier = hash
"""
_LEAF_EXT = """\
[leaf]
basicConstraints = critical, CA:FALSE
keyUsage = critical, digitalSignature
extendedKeyUsage = {usage}
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
{san}"""


class CertError(RuntimeError):
    """openssl is missing or failed; the message carries its output."""


@dataclass(frozen=True)
class CertSet:
    """Paths of a generated CA, server certificate and client certificates."""

    directory: Path

    @property
    def ca(self) -> Path:
        return self.directory / "ca.crt"

    @property
    def server_cert(self) -> Path:
        return self.directory / "server.crt"

    @property
    def server_key(self) -> Path:
        return self.directory / "server.key"

    def cert(self, identity: str) -> Path:
        return self.directory / f"{validate_node_id(identity)}.crt"

    def key(self, identity: str) -> Path:
        return self.directory / f"{validate_node_id(identity)}.key"

    def client_kwargs(self, identity: str) -> dict[str, Path]:
        """`tls_ca`, `tls_cert`, `tls_key` for `ClientSettings(...)` as `identity`."""
        return {"tls_ca": self.ca, "tls_cert": self.cert(identity), "tls_key": self.key(identity)}


def generate(
    directory: str | os.PathLike[str],
    *,
    nodes: Iterable[str] = (),
    roles: Iterable[str] = tuple(topology.ROLES),
    hosts: Sequence[str] = DEFAULT_HOSTS,
    days: int = DEFAULT_DAYS,
    broker_key_owner: str | None = "auto",
    force: bool = False,
) -> CertSet:
    """Make (or complete) a CA, a server certificate and client certificates in `directory`.

    `nodes` are node ids and must not be role names; `roles` must be in `broker.topology.ROLES`.
    `broker_key_owner`: the user to give `server.key` and `bridge.key` to when running as root
    (`"auto"`: the user mosquitto drops to; None: leave them to root).
    """
    nodes, roles = list(nodes), list(roles)
    for node in nodes:
        validate_node_id(node)
        if topology.is_role(node) or node in _FILE_NAMES:
            raise TopicError(f"node id {node!r} is reserved (roles: {', '.join(topology.ROLES)}; files: ca, server)")
    for role in roles:
        if not topology.is_role(role):
            raise ValueError(f"unknown role {role!r}; known: {', '.join(topology.ROLES)}")
    if days < 1:
        raise ValueError("days must be >= 1")
    out = Path(directory)
    if force and out.exists():
        for name in os.listdir(out):
            if name.endswith((".crt", ".key")):
                (out / name).unlink()
    out.mkdir(parents=True, exist_ok=True)
    os.chmod(out, 0o755)
    certs = CertSet(out)
    with tempfile.TemporaryDirectory(prefix="clue-certs-") as tmp:
        work = Path(tmp)
        (work / "req.cnf").write_text(_REQ_CONF)
        if not (certs.ca.exists() and (out / "ca.key").exists()):
            _make_ca(out, work, days)
        if not (certs.server_cert.exists() and certs.server_key.exists()):
            _make_leaf(out, work, "server", days, usage="serverAuth", hosts=hosts)
        for identity in dict.fromkeys(roles + nodes):
            if not (certs.cert(identity).exists() and certs.key(identity).exists()):
                _make_leaf(out, work, identity, days, usage="clientAuth")
    owner = _broker_user() if broker_key_owner == "auto" else broker_key_owner
    if owner is not None and os.geteuid() == 0:
        entry = pwd.getpwnam(owner)
        for key in (certs.server_key, certs.key(BRIDGE)):
            if key.exists():
                os.chown(key, entry.pw_uid, entry.pw_gid)
    return certs


def _broker_user() -> str | None:
    """The user mosquitto drops to when started as root (as `broker.launcher` configures it)."""
    if os.geteuid() != 0:
        return None
    try:
        pwd.getpwnam("mosquitto")
        return "mosquitto"
    except KeyError:
        return "nobody"


def _make_ca(out: Path, work: Path, days: int) -> None:
    _openssl(
        "req", "-x509", "-new", "-config", str(work / "req.cnf"), "-extensions", "ca_ext",
        *_new_key(out / "ca.key"), "-subj", f"/CN={CA_NAME}", "-days", str(days), "-sha256",
        "-set_serial", _serial(), "-out", str(out / "ca.crt"),
    )  # fmt: skip
    os.chmod(out / "ca.crt", 0o644)


def _make_leaf(out: Path, work: Path, name: str, days: int, *, usage: str, hosts: Sequence[str] = ()) -> None:
    csr = work / f"{name}.csr"
    ext = work / f"{name}.ext"
    _openssl(
        "req", "-new", "-config", str(work / "req.cnf"), *_new_key(out / f"{name}.key"),
        "-subj", f"/CN={hosts[0] if hosts else name}", "-out", str(csr),
    )  # fmt: skip
    san = f"subjectAltName = {', '.join(_san(h) for h in hosts)}\n" if hosts else ""
    ext.write_text(_LEAF_EXT.format(usage=usage, san=san))
    _openssl(
        "x509", "-req", "-in", str(csr), "-CA", str(out / "ca.crt"), "-CAkey", str(out / "ca.key"),
        "-set_serial", _serial(), "-days", str(days), "-sha256", "-extfile", str(ext), "-extensions", "leaf",
        "-out", str(out / f"{name}.crt"),
    )  # fmt: skip
    os.chmod(out / f"{name}.crt", 0o644)


def _new_key(path: Path) -> list[str]:
    return ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256", "-nodes", "-keyout", str(path)]


def _san(host: str) -> str:
    try:
        return f"IP:{ipaddress.ip_address(host)}"
    except ValueError:
        return f"DNS:{host}"


def _serial() -> str:
    return "0x" + secrets.token_hex(16)


def _openssl(*args: str) -> None:
    binary = shutil.which("openssl")
    if binary is None:
        raise CertError("openssl not found: install the Debian package 'openssl'")
    # umask 077: keys are private from the moment they exist, not after a chmod.
    proc = subprocess.run([binary, *args], capture_output=True, text=True, umask=0o077, check=False)
    if proc.returncode != 0:
        raise CertError(f"openssl {args[0]} failed ({proc.returncode}): {proc.stderr.strip()[-2000:]}")


def _split(text: str) -> list[str]:
    return [part.strip() for part in text.split(",") if part.strip()]


def main(argv: Sequence[str] | None = None) -> int:
    """`python -m broker.certs OUTDIR --nodes n1,n2 --roles mds,relay,operator`."""
    ap = argparse.ArgumentParser(prog="python -m broker.certs", description="Make a throw-away CA and certificates.")
    ap.add_argument("outdir", help="output directory (created; existing certificates are kept)")
    ap.add_argument("--nodes", default="", help="comma-separated node ids")
    ap.add_argument("--roles", default=",".join(topology.ROLES), help="comma-separated service identities")
    ap.add_argument("--host", action="append", default=[], help="extra DNS name or IP of the broker (repeatable)")
    ap.add_argument("--days", type=int, default=DEFAULT_DAYS, help="validity in days")
    ap.add_argument("--force", action="store_true", help="replace every certificate, the CA included")
    args = ap.parse_args(argv)
    try:
        certs = generate(
            args.outdir,
            nodes=_split(args.nodes),
            roles=_split(args.roles),
            hosts=[*DEFAULT_HOSTS, *args.host],
            days=args.days,
            force=args.force,
        )
    except (CertError, ValueError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(certs.directory)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())


__all__ = ["CA_NAME", "CertError", "CertSet", "DEFAULT_HOSTS", "generate", "main"]

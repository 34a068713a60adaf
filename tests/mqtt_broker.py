"""Real mosquitto brokers for the test suite (plain or TLS with client certificates and an ACL).

Usage::

    broker = make_broker(tmp_path / "broker", tls=True, acl=DEVICE_ACL)
    broker.start()
    cert, key = broker.tls.client("dev-a")   # CN=dev-a, which mosquitto uses as the username
    ...
    broker.stop()

Each broker runs ``mosquitto -c <workdir>/mosquitto.conf`` as a subprocess on a free loopback port that is
chosen once in :func:`make_broker` and kept across :meth:`Broker.restart`. Everything the broker uses lives in
``workdir``: the config, the certificates, the ACL, ``mosquitto.log`` (the broker's own log) and
``mosquitto.out`` (its stdout/stderr, where errors land when the log file cannot be opened), plus ``data/``
for the persistence database when ``persistence=True``.

Privileges: mosquitto started as root drops to the ``mosquitto`` user *before* it opens the log file, the
TLS certificates and keys, the ACL file and the persistence database, so with a root test run each of those
(and every parent directory, e.g. pytest's 0700 ``/tmp/pytest-of-root``) would have to be readable - and the
log and persistence directory writable - by that user. Instead, when the tests run as root, the config says
``user root``, which (documented in mosquitto.conf(5) and checked with 2.0.11) keeps the broker root; it only
logs "Warning: Mosquitto should not be run as root/administrator.". As a non-root user ``user`` has no
effect and the broker runs as that user. Either way ``workdir`` can be anywhere, pytest's ``tmp_path``
included, and the files stay there for inspection after a failure.

Certificates are made with ``cryptography``: an EC P-256 CA, a server certificate for IP 127.0.0.1 and DNS
localhost, and client certificates created on demand with CN = the client name, all valid for one day.
"""

from __future__ import annotations

import datetime as dt
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from ipaddress import IPv4Address
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

__all__ = ["DEVICE_ACL", "Broker", "BrokerError", "TlsFiles", "free_port", "make_broker", "mosquitto_binary"]

HOST = "127.0.0.1"

DEVICE_ACL = """\
# the fleet console may do everything under the prefix
user console
topic readwrite edge/v1/#
# each device only its own subtree, plus reading its groups' commands
pattern readwrite edge/v1/devices/%u/#
pattern read edge/v1/groups/+/commands
# MQTT 5 command responses go to the console's own response topic (write-only for devices)
pattern write edge/v1/console/+/responses
"""

_CLIENT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


class BrokerError(RuntimeError):
    """mosquitto did not start (the message carries its log)."""


def mosquitto_binary() -> str:
    """Path of the mosquitto executable (Debian installs it in /usr/sbin, often not on a user's PATH)."""
    found = shutil.which("mosquitto")
    if found:
        return found
    for candidate in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto", "/opt/homebrew/sbin/mosquitto"):
        if os.access(candidate, os.X_OK):
            return candidate
    raise BrokerError("mosquitto not found (apt-get install mosquitto)")


def free_port() -> int:
    """A currently free TCP port on the loopback interface."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


# --------------------------------------------------------------------------------------------------- certificates


def _write_key(path: Path, key: ec.EllipticCurvePrivateKey) -> None:
    path.write_bytes(
        key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )


def _load_key(path: Path) -> ec.EllipticCurvePrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    assert isinstance(key, ec.EllipticCurvePrivateKey)
    return key


def _issue(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: x509.Certificate | None,
    issuer_key: ec.EllipticCurvePrivateKey,
    *,
    ca: bool = False,
    server: bool = False,
) -> x509.Certificate:
    now = dt.datetime.now(dt.timezone.utc)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)])
    public = key.public_key()
    builder = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(issuer.subject if issuer else name)
        .public_key(public)
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=0 if ca else None), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer_key.public_key()),
            critical=False,
        )
    )
    if ca:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
    else:
        builder = builder.add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        ).add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH if server else ExtendedKeyUsageOID.CLIENT_AUTH]),
            critical=False,
        )
    if server:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(IPv4Address(HOST)), x509.DNSName("localhost")]),
            critical=False,
        )
    return builder.sign(issuer_key, hashes.SHA256())


@dataclass(frozen=True)
class TlsFiles:
    """PEM files of a test PKI: CA, server certificate/key, and client certificates made on demand."""

    ca: Path
    server_cert: Path
    server_key: Path
    ca_key: Path

    @property
    def directory(self) -> Path:
        return self.ca.parent

    def client(self, name: str) -> tuple[Path, Path]:
        """(cert, key) of a client whose certificate CN is ``name``, signed by the CA; created on first use."""
        if not _CLIENT_NAME.fullmatch(name):
            raise ValueError(f"unsupported client name {name!r}")
        cert_path = self.directory / f"client-{name}.crt"
        key_path = self.directory / f"client-{name}.key"
        if not (cert_path.exists() and key_path.exists()):
            ca_cert = x509.load_pem_x509_certificate(self.ca.read_bytes())
            key = ec.generate_private_key(ec.SECP256R1())
            cert = _issue(name, key, ca_cert, _load_key(self.ca_key))
            _write_key(key_path, key)
            cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
        return cert_path, key_path

    @classmethod
    def create(cls, directory: Path) -> TlsFiles:
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(directory / "ca.crt", directory / "server.crt", directory / "server.key", directory / "ca.key")
        ca_key = ec.generate_private_key(ec.SECP256R1())
        ca_cert = _issue("edge-agent test CA", ca_key, None, ca_key, ca=True)
        server_key = ec.generate_private_key(ec.SECP256R1())
        server_cert = _issue("localhost", server_key, ca_cert, ca_key, server=True)
        _write_key(files.ca_key, ca_key)
        files.ca.write_bytes(ca_cert.public_bytes(serialization.Encoding.PEM))
        _write_key(files.server_key, server_key)
        files.server_cert.write_bytes(server_cert.public_bytes(serialization.Encoding.PEM))
        return files


# --------------------------------------------------------------------------------------------------------- broker


@dataclass
class Broker:
    """One mosquitto process; ``port`` stays the same across restarts."""

    host: str
    port: int
    workdir: Path
    tls: TlsFiles | None
    config: Path = field(repr=False)
    proc: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    @property
    def log_path(self) -> Path:
        return self.workdir / "mosquitto.log"

    def log_text(self) -> str:
        """The broker's log file followed by anything it wrote to stdout/stderr."""
        parts = []
        for path in (self.log_path, self.workdir / "mosquitto.out"):
            if path.exists():
                parts.append(path.read_text(errors="replace"))
        return "".join(parts)

    def start(self, timeout: float = 10) -> None:
        """Spawn mosquitto and wait until the port accepts connections; BrokerError with its log otherwise."""
        if self.running:
            raise BrokerError(f"broker on port {self.port} is already running")
        with (self.workdir / "mosquitto.out").open("ab") as out:
            self.proc = subprocess.Popen(
                [mosquitto_binary(), "-c", str(self.config)],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=self.workdir,
            )
        deadline = time.monotonic() + timeout
        while True:
            code = self.proc.poll()
            if code is not None:
                self.proc = None
                raise BrokerError(f"mosquitto exited with {code} on port {self.port}:\n{self.log_text()}")
            try:
                with socket.create_connection((self.host, self.port), timeout=0.5):
                    pass
            except OSError:
                if time.monotonic() > deadline:
                    self.stop()
                    raise BrokerError(
                        f"mosquitto not accepting on port {self.port} after {timeout}s:\n{self.log_text()}"
                    ) from None
                time.sleep(0.01)
                continue
            # The listener is open; make sure the broker did not die right after (e.g. an unreadable key).
            if self.proc.poll() is None:
                return

    def stop(self) -> None:
        """SIGTERM (mosquitto saves its persistence database), then SIGKILL after 5 s. Idempotent."""
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)

    def kill(self) -> None:
        """SIGKILL: a crash, without saving the persistence database."""
        proc, self.proc = self.proc, None
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait(5)

    def restart(self) -> None:
        self.stop()
        self.start()

    def set_passwords(self, passwords: dict[str, str]) -> None:
        """Replace the password file (brokers made with ``passwords=``); takes effect at :meth:`reload` or a restart."""
        write_passwords(self.workdir / "passwords", passwords)

    def reload(self) -> None:
        """SIGHUP: mosquitto re-reads its password file, ACL and ``allow_anonymous`` without dropping clients."""
        if self.proc is None or self.proc.poll() is not None:
            raise BrokerError("broker is not running")
        self.proc.send_signal(signal.SIGHUP)


def write_passwords(path: Path, passwords: dict[str, str]) -> None:
    """A mosquitto password file: plain ``user:password`` lines, hashed in place by ``mosquitto_passwd -U``."""
    path.write_text("".join(f"{user}:{password}\n" for user, password in passwords.items()))
    tool = shutil.which("mosquitto_passwd") or str(Path(mosquitto_binary()).with_name("mosquitto_passwd"))
    subprocess.run([tool, "-U", str(path)], check=True, capture_output=True, timeout=30)


def make_broker(workdir: Path, *, tls: bool = False, acl: str | None = None, persistence: bool = False,
                passwords: dict[str, str] | None = None) -> Broker:
    """Write the config (and the PKI, ACL) into ``workdir`` and return a stopped :class:`Broker`.

    Plain brokers allow anonymous clients, unless ``passwords`` (user -> password) is given: then only those
    users may connect. TLS brokers require a client certificate signed by the test CA and use its CN as the
    username (no anonymous clients); ``acl`` is the text of a mosquitto ACL file.
    """
    workdir = Path(workdir).resolve()
    if any(c.isspace() for c in str(workdir)):
        raise ValueError(f"mosquitto.conf cannot hold paths with whitespace: {workdir}")
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    lines = [f"listener {port} {HOST}"]
    tls_files: TlsFiles | None = None
    if tls:
        tls_files = TlsFiles.create(workdir / "tls")
        lines += [
            f"cafile {tls_files.ca}",
            f"certfile {tls_files.server_cert}",
            f"keyfile {tls_files.server_key}",
            "require_certificate true",
            "use_identity_as_username true",
            "allow_anonymous false",
        ]
    elif passwords is not None:
        write_passwords(workdir / "passwords", passwords)
        lines += ["allow_anonymous false", f"password_file {workdir / 'passwords'}"]
    else:
        lines.append("allow_anonymous true")
    if acl is not None:
        acl_path = workdir / "acl"
        acl_path.write_text(acl)
        lines.append(f"acl_file {acl_path}")
    if persistence:
        data = workdir / "data"
        data.mkdir(exist_ok=True)
        lines += ["persistence true", f"persistence_location {data}/"]
    else:
        lines.append("persistence false")
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        lines.append("user root")  # see the module docstring: no privilege drop, so file modes do not matter
    lines += [
        f"log_dest file {workdir / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        "log_type information",
        "log_timestamp_format %Y-%m-%dT%H:%M:%S",
        "max_inflight_messages 0",
        "max_queued_messages 100000",
    ]
    config = workdir / "mosquitto.conf"
    config.write_text("\n".join(lines) + "\n")
    return Broker(host=HOST, port=port, workdir=workdir, tls=tls_files, config=config)

"""Private signing keys on disk: one PEM (PKCS#8, mode 0600) per key, grouped by role.

Layout: ``KEYS_DIR/<role>/<keyid>.pem``; keys retired by a rotation move to
``KEYS_DIR/retired/<role>/``. The key id is derived from the public key, so it matches
the id the root metadata lists. This directory must never be published: the repository
refuses to use a keys directory inside the repository directory.
"""

from __future__ import annotations

import os
from pathlib import Path

import structlog
from cryptography.hazmat.primitives.serialization import load_pem_private_key
from securesystemslib.signer import CryptoSigner

from cloud_sync.errors import RepositoryError

log = structlog.get_logger(__name__)


class KeyStore:
    """Ed25519 signing keys for the four top-level TUF roles."""

    def __init__(self, keys_dir: Path) -> None:
        self.dir = Path(keys_dir)

    def generate(self, role: str) -> CryptoSigner:
        """Create a new Ed25519 key for ``role`` and store its private half (0600)."""
        signer = CryptoSigner.generate_ed25519()
        role_dir = self.dir / role
        role_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
        self.dir.chmod(0o700)
        role_dir.chmod(0o700)
        path = role_dir / f"{signer.public_key.keyid}.pem"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as fh:
            fh.write(signer.private_bytes)
            fh.flush()
            os.fsync(fh.fileno())
        log.info("repo.key_generated", role=role, keyid=signer.public_key.keyid)
        return signer

    def has_keys(self, role: str) -> bool:
        return any((self.dir / role).glob("*.pem"))

    def signers(self, role: str, keyids: list[str]) -> list[CryptoSigner]:
        """Signers for the ``keyids`` that have a private key here (others are skipped)."""
        found = []
        for keyid in keyids:
            path = self.dir / role / f"{keyid}.pem"
            if not path.is_file():
                continue
            try:
                private = load_pem_private_key(path.read_bytes(), None)
                signer = CryptoSigner(private)
            except (ValueError, TypeError) as exc:
                raise RepositoryError(f"cannot load key {path}: {exc}") from exc
            if signer.public_key.keyid != keyid:
                raise RepositoryError(f"key file {path} does not hold key {keyid}")
            found.append(signer)
        return found

    def retire(self, role: str, keyid: str) -> None:
        """Move a key no longer listed for ``role`` out of the active set (kept, not deleted)."""
        src = self.dir / role / f"{keyid}.pem"
        if src.is_file():
            dest = self.dir / "retired" / role
            dest.mkdir(parents=True, exist_ok=True, mode=0o700)
            src.replace(dest / src.name)
            log.info("repo.key_retired", role=role, keyid=keyid)

    def export(self, dest: Path, roles: tuple[str, ...]) -> list[Path]:
        """Copy the keys of ``roles`` (not retired ones) into a new keys directory ``dest``.

        This is how the fleet service gets the online keys (targets, snapshot, timestamp)
        without the root key, which stays offline. ``dest`` must not hold keys yet.

        Raises:
            RepositoryError: ``dest`` already holds keys, or a role has no key here.
        """
        dest = Path(dest)
        if dest.exists() and any(dest.rglob("*.pem")):
            raise RepositoryError(f"{dest} already holds keys; export into a new directory")
        copied: list[Path] = []
        for role in roles:
            keys = sorted((self.dir / role).glob("*.pem"))
            if not keys:
                raise RepositoryError(f"no {role} key in {self.dir / role}")
            role_dir = dest / role
            role_dir.mkdir(parents=True, exist_ok=True, mode=0o700)
            dest.chmod(0o700)
            role_dir.chmod(0o700)
            for key in keys:
                fd = os.open(role_dir / key.name, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
                with os.fdopen(fd, "wb") as fh:
                    fh.write(key.read_bytes())
                    fh.flush()
                    os.fsync(fh.fileno())
                copied.append(role_dir / key.name)
        log.info("repo.keys_exported", dest=str(dest), roles=list(roles), keys=len(copied))
        return copied

"""Fleet-side TUF repository: keys, publishing bundles as targets, and a dev HTTP server."""

from cloud_sync.repo.keys import KeyStore
from cloud_sync.repo.repository import (
    DEFAULT_EXPIRY,
    ONLINE_ROLES,
    ROLES,
    PublishedTarget,
    Repository,
    RoleKeys,
    target_path,
)
from cloud_sync.repo.server import RepoHTTPServer, RepoRequestHandler, make_server, parse_range, serve

__all__ = ["DEFAULT_EXPIRY", "ONLINE_ROLES", "ROLES", "KeyStore", "PublishedTarget", "RepoHTTPServer",
           "RepoRequestHandler", "Repository", "RoleKeys", "make_server", "parse_range", "serve", "target_path"]

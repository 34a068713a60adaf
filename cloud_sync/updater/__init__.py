"""Device side of bundle delivery: a TUF client with a pinned root and a resumable fetcher."""

from cloud_sync.updater.client import BundleInfo, BundleUpdater, map_tuf_errors
from cloud_sync.updater.fetcher import Progress, ResumableFetcher, is_immutable_target

__all__ = ["BundleInfo", "BundleUpdater", "Progress", "ResumableFetcher", "is_immutable_target", "map_tuf_errors"]

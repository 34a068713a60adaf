"""Model bundles: manifest schema, archive format, safe extraction and building."""

from cloud_sync.bundles.archive import (
    ExtractLimits,
    extract_bundle,
    load_extracted,
    read_manifest,
    safe_extract,
    write_archive,
)
from cloud_sync.bundles.build import (
    build_bundle,
    bundle_file_name,
    generate_test_vectors,
    runtime_for,
    tensor_array,
    tensor_value,
)
from cloud_sync.bundles.manifest import (
    SCHEMA_VERSION,
    Constraints,
    Manifest,
    Processing,
    TensorSpec,
    TensorValue,
    TestVector,
)

__all__ = [
    "SCHEMA_VERSION",
    "Constraints",
    "ExtractLimits",
    "Manifest",
    "Processing",
    "TensorSpec",
    "TensorValue",
    "TestVector",
    "build_bundle",
    "bundle_file_name",
    "extract_bundle",
    "generate_test_vectors",
    "load_extracted",
    "read_manifest",
    "runtime_for",
    "safe_extract",
    "tensor_array",
    "tensor_value",
    "write_archive",
]

"""Every registered pipeline part, and the config types built from their registries.

Importing this module imports every source, pre-processor and post-processor (each registers
itself), then builds the types the agent config validates a stream with: ``SourceConfig`` (the
discriminated union of the sources' options) and ``PreOverride`` / ``PostOverride`` (a stream's
partial ``pre``/``post`` tables). A new part only registers; it never has to be listed here. No
part is opened or run, and OpenCV is not imported.
"""

from __future__ import annotations

from typing import Any

from agent.pipelines import postprocess, preprocess, sources  # noqa: F401 - importing registers the parts
from agent.pipelines.base import POSTPROCESSORS, PREPROCESSORS, SOURCES
from agent.pipelines.options import Overrides

PRE_OVERRIDES = Overrides(PREPROCESSORS, "pre-processing")
POST_OVERRIDES = Overrides(POSTPROCESSORS, "post-processing")

SourceConfig: Any = SOURCES.options_union()
"""``[stream.NAME] source``: one of the registered sources' options, chosen by ``type``."""

PreprocessConfig: Any = PREPROCESSORS.options_union()
"""A complete ``preprocess`` object: one of the registered pre-processors' options."""

PostprocessConfig: Any = POSTPROCESSORS.options_union()
"""A complete ``postprocess`` object: one of the registered post-processors' options."""

PreOverride: Any = PRE_OVERRIDES.annotation()
"""``[stream.NAME] pre``: keys overriding the manifest's ``preprocess``, each checked."""

PostOverride: Any = POST_OVERRIDES.annotation()
"""``[stream.NAME] post``: keys overriding the manifest's ``postprocess``, each checked."""

"""facecap's stages, one folder each: the stage class, its helpers and its command-line options.

Each folder registers its stage on import (``facecap.pipeline.registry.register``); ``shared``
holds the helpers that several stages use (image codecs, JPEG parsing, value checks).
"""

STAGES_PACKAGE = __name__

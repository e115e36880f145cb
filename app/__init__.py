"""facecap: build face image-text training corpora from raw image URLs.

``facecap.pipeline`` is the framework, ``facecap.stages`` the stages (one folder each),
``facecap.configs`` the packaged recipes and prompts; this package's own modules are the thin
application layer: the CLI root, the report and the demo.
"""

__version__ = "0.1.0"

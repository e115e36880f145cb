"""facecap's packaged recipes (``demo``, ``default``, ``hq``) and prompt templates, read through
``importlib.resources`` so that an installed wheel has them too."""

"""Code shared by stages (image codecs, HTTP fetching); not stages themselves."""

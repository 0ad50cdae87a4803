"""lsync test suite (pytest); tests/compat also runs without pytest on Python >= 3.6."""

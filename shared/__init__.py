"""Code both sides of specbridge use: vocabularies as bytes, UTF-8 boundaries, re-tokenization, wire codecs."""

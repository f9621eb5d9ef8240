"""Box <-> location-token text, one codec per model family."""

from loctune.codecs.base import Codec, LocationSpace, get_codec, list_codecs, register_codec

__all__ = ["Codec", "LocationSpace", "get_codec", "list_codecs", "register_codec"]

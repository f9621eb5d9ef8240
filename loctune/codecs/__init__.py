"""Box <-> location-token text, one codec per model family (``get_codec(name, **kw)``)."""

from loctune.codecs.base import Codec, LocationSpace, get_codec, list_codecs, register_codec
from loctune.codecs.bins import BinCodec, Florence2Codec, PaliGemmaCodec, RowColCodec
from loctune.codecs.grid import Kosmos2Codec, PatchCodec
from loctune.codecs.qwen2vl import Qwen2VLCodec

__all__ = [
    "BinCodec",
    "Codec",
    "Florence2Codec",
    "Kosmos2Codec",
    "LocationSpace",
    "PaliGemmaCodec",
    "PatchCodec",
    "Qwen2VLCodec",
    "RowColCodec",
    "get_codec",
    "list_codecs",
    "register_codec",
]

"""In-context inspection prompts: examples with their answers, then a query, as adapter turns.

A prompt is a list of :class:`~loctune.models.base.Turn`: one per example
(its images, the question, its answer), then the query's without an answer.
How turns become tokens is each adapter's own business (a chat template's
turn pairs, the small VLM's episode sequence), so nothing here knows a model.

Tiled (:class:`~loctune.inspect.tiling.Tiling`), a turn shows a downscaled
global view plus the crops, and its text begins with their layout
(``tiling.layout_description``), so it numbers its own images.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from PIL import Image

from loctune.codecs import Codec
from loctune.inspect.answers import answer_target
from loctune.inspect.tiling import Tiling
from loctune.models.base import Turn
from loctune.types import Sample


@dataclass
class Episode:
    """Examples (shown in this order, each with its answer), then the query, all of one product."""

    examples: list[Sample]
    query: Sample
    tiling: Tiling | None = None

    @property
    def name(self) -> str:
        return f"episode of query {self.query.image_id!r} after {len(self.examples)} examples"


def turn_images(sample: Sample, tiling: Tiling | None) -> tuple[list[Image.Image], str]:
    """The images one turn shows for a sample (the image, or global view + crops) and,
    when tiled, the text describing their layout ("" otherwise)."""
    image = sample.load_image()
    if tiling is None:
        return [image], ""
    views = tiling.views(image)
    return views.images, views.layout


def _turn(sample: Sample, codec: Codec, tiling: Tiling | None, answered: bool) -> Turn:
    images, layout = turn_images(sample, tiling)
    text = f"{layout} {sample.prompt}" if layout else sample.prompt
    if not answered:
        return Turn(images, text)
    answer, boxes = answer_target(sample, codec, tiling)
    return Turn(images, text, answer, boxes)


def build_prompt(
    examples: Sequence[Sample],
    query: Sample,
    codec: Codec,
    tiling: Tiling | None = None,
    answer_query: bool = False,
) -> list[Turn]:
    """One turn per example (in the given order), then the query's; with ``answer_query``
    the query's turn holds its answer too (a training sequence)."""
    turns = [_turn(example, codec, tiling, True) for example in examples]
    return [*turns, _turn(query, codec, tiling, answer_query)]


def episode_prompt(episode: Episode, codec: Codec, answer_query: bool = False) -> list[Turn]:
    """:func:`build_prompt` of an episode."""
    return build_prompt(episode.examples, episode.query, codec, episode.tiling, answer_query)

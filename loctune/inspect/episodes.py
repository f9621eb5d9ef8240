"""In-context inspection by loctune's own small VLM: episodes as training data.

An episode (:class:`~loctune.inspect.prompts.Episode`) is ``k`` good and ``k``
defective examples of one product, each followed by its answer, then a query.
As one sequence of the small VLM
(:func:`~loctune.models.small_vlm_adapter.in_context_parts`)::

    <bos> [images of example 1] <sep> answer <eos> ... [images of the query] <sep> answer <eos>

- A turn's images are the image, or with tiling the global view and the crops
  (:func:`~loctune.inspect.prompts.turn_images`), each as ``n_image_tokens``
  ``<image>`` placeholders.
- Answers are those of :func:`~loctune.inspect.answers.answer_text` ("good",
  "defective: scratch <bin_3>... scratch", tiled "... image 3: <bin_..>..."),
  boxes through the adapter's codec, so the location losses and their soft
  targets apply and :func:`~loctune.inspect.answers.parse_answer` reads them back.
- No instruction text: it would be the same in every episode, and naming the
  product would put words in test prompts that training never showed (the
  evaluation products are unseen types). The examples say what the product is.
- Training (:func:`training_episodes`) shuffles the examples, so position does
  not give the class away; labels cover the query's answer and, with
  ``supervise_examples``, every example's answer too: the answer of example j
  is then a prediction from the j turns before it, so one sequence trains every
  number of examples up to its own.
- Answering goes through :meth:`SmallVLMAdapter.generate_in_context`, as for
  chat VLMs (:mod:`loctune.inspect.run`).
"""

from __future__ import annotations

import random
from collections.abc import Sequence

import torch
from torch import nn

from loctune.codecs import Codec
from loctune.inspect.prompts import Episode, episode_prompt
from loctune.inspect.records import by_product
from loctune.inspect.selection import ExampleSelector
from loctune.inspect.tiling import Tiling
from loctune.models.base import Generation, VLMAdapter
from loctune.models.small_vlm import SmallVLM
from loctune.models.small_vlm_adapter import Part, SmallVLMAdapter, in_context_parts
from loctune.types import Sample


def episode_parts(
    episode: Episode, codec: Codec, train: bool = True, supervise_examples: bool = True
) -> list[Part]:
    """The episode as a sequence for :meth:`SmallVLMAdapter.collate_sequences`.

    With ``train`` the query's answer ends the sequence; without, it stops
    where the answer starts. Example answers are :class:`Answer` parts (their
    ids supervised) when ``train and supervise_examples``, plain text otherwise;
    the ids are the same either way.
    """
    turns = episode_prompt(episode, codec, answer_query=train)
    return in_context_parts(turns, supervise_examples=train and supervise_examples)


def _episodes(items: Sequence[Episode | Sequence[Episode]]) -> list[Episode]:
    """Items as a flat list: an item is an episode or a group (a list) of episodes."""
    return [e for item in items for e in ([item] if isinstance(item, Episode) else item)]


class EpisodeAdapter(VLMAdapter):
    """A :class:`SmallVLMAdapter` whose batches are episodes, for :func:`loctune.train.train`.

    An item is an :class:`Episode` or a group (list) of them, flattened into
    one batch: :func:`training_episodes` groups episodes of equal ``k`` and
    tiling, so training with ``batch_size=1`` over groups pads little although
    sequence lengths differ a hundredfold between ``k=0`` and ``k=8`` tiled.
    The model, codec and weights are the wrapped adapter's.
    """

    is_encoder_decoder = False

    def __init__(self, adapter: SmallVLMAdapter, supervise_examples: bool = True):
        if not isinstance(adapter, SmallVLMAdapter):
            raise TypeError(f"EpisodeAdapter wraps a SmallVLMAdapter, got {type(adapter).__name__}")
        self.adapter = adapter
        self.model = adapter.model
        self.codec = adapter.codec
        self.supervise_examples = supervise_examples

    @property
    def loc_token_ids(self) -> list[int]:
        return self.adapter.loc_token_ids

    def collate(
        self, items: Sequence[Episode | Sequence[Episode]], train: bool = True
    ) -> dict[str, torch.Tensor]:
        episodes = _episodes(items)
        return self.adapter.collate_sequences(
            [episode_parts(e, self.codec, train, self.supervise_examples) for e in episodes],
            train,
            names=[e.name for e in episodes],
        )

    def forward(self, batch: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.adapter.forward(batch)

    def generate(
        self, items: Sequence[Episode | Sequence[Episode]], max_new_tokens: int = 64
    ) -> list[Generation]:
        episodes = _episodes(items)
        return self.adapter.generate_sequences(
            [episode_parts(e, self.codec, train=False) for e in episodes],
            max_new_tokens,
            names=[e.name for e in episodes],
        )

    def save_pretrained(self, path: str) -> None:
        self.adapter.save_pretrained(path)


def training_episodes(
    samples: Sequence[Sample],
    n_groups: int,
    group_images: int = 64,
    k_choices: Sequence[int] = (0, 1, 2, 4),
    tiling: Tiling | None = None,
    tiled_fraction: float = 0.5,
    seed: int = 0,
) -> list[list[Episode]]:
    """``n_groups`` groups of training episodes, deterministic in ``seed``.

    A group draws ``k`` from ``k_choices`` and is tiled (with ``tiling``) with
    probability ``tiled_fraction``; it holds as many episodes as fit in
    ``group_images`` images (at least one), so every training step costs about
    the same and trains about as many answers (one per turn) whatever ``k``.
    Each episode draws a product, a query that is good or defective with equal
    chance, and ``k`` class-balanced examples of that product
    (:class:`ExampleSelector`, ``"balanced"``: defect types cycled), shown in
    random order.
    """
    if n_groups < 1 or group_images < 1:
        raise ValueError(f"n_groups and group_images must be >= 1, got {n_groups}, {group_images}")
    if not k_choices or min(k_choices) < 0:
        raise ValueError(f"k_choices must be non-empty numbers >= 0, got {list(k_choices)}")
    if tiled_fraction > 0 and tiling is None:
        raise ValueError(f"tiled_fraction={tiled_fraction} needs a tiling")
    products = by_product(samples)
    for product, group in products.items():
        if not group.good or not group.defective:
            raise ValueError(
                f"product {product!r}: episodes need good and defective samples, got "
                f"{len(group.good)} good and {len(group.defective)} defective"
            )
    names = list(products)
    rng = random.Random(seed)
    groups = []
    for _ in range(n_groups):
        k = rng.choice(list(k_choices))
        group_tiling = tiling if rng.random() < tiled_fraction else None
        views = 1 if group_tiling is None else 1 + group_tiling.rows * group_tiling.cols
        group = []
        for _ in range(max(1, group_images // ((2 * k + 1) * views))):
            pool = products[rng.choice(names)]
            query = rng.choice(pool.defective if rng.random() < 0.5 else pool.good)
            selector = ExampleSelector(
                pool.good + pool.defective, k, "balanced", seed=rng.randrange(2**31)
            )
            examples = selector.select(query)
            rng.shuffle(examples)
            group.append(Episode(examples, query, group_tiling))
        groups.append(group)
    return groups


class EncoderFeatures(nn.Module):
    """The small VLM's vision encoder as a PatchCore feature extractor.

    Images ``[B, 3, H, W]`` in [0, 1] (at the model's ``image_size``) are
    normalised as the model's preprocessing does and encoded; the tokens come
    back as a ``[B, vision_width, grid, grid]`` map, so the baseline compares
    exactly the features the VLM reads.
    """

    def __init__(self, model: SmallVLM):
        super().__init__()
        cfg = model.config
        self.vision = model.vision
        self.grid = cfg.grid_size
        device = next(model.vision.parameters()).device  # the encoder may be on the GPU already
        for name, value in (("mean", cfg.image_mean), ("std", cfg.image_std)):
            self.register_buffer(
                name, torch.tensor(value, device=device)[:, None, None], persistent=False
            )

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        tokens = self.vision((images - self.mean) / self.std)
        return tokens.transpose(1, 2).reshape(len(images), -1, self.grid, self.grid)

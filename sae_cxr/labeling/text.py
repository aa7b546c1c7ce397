"""The text labeler: name a pattern by the nearest vocabulary phrases in the backbone's text space.

Works with any Backbone that has a text tower (BiomedCLIP, the phantom model): image and text
embeddings share one space, so a direction among images can be read against phrase embeddings.

The query is a DIFFERENCE OF MEANS: the mean embedding of the pattern's top activating images
minus the mean embedding of all images, normalised. Why not the raw centroid of the top images?
Embeddings of one modality share a large common component (to the model every chest radiograph
looks alike, and contrastive training leaves a "modality gap": all images sit offset from all
texts). The raw centroid is dominated by that shared part, so its nearest phrases are whatever
matches every radiograph ("normal chest radiograph", "clear lungs") for every pattern alike.
Subtracting the population mean cancels the shared component and the modality offset and leaves
the direction along which the pattern's images DIFFER from the rest, which is what the pattern
encodes. (Centring the text side as well would not change the ranking: a shared text component
adds the same d . t_mean to every phrase's score.)

Scores are cosines between the query and each phrase embedding; the label is the best phrase,
with its vocabulary category. Confidence comes from the MARGIN over the best phrase of a
different meaning (another concept, or another phrase when neither names a concept): synonyms of
the winner ("pacemaker", "cardiac pacemaker") are not rivals, and a label far ahead of every
alternative meaning is a confident one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sae_cxr.findings import CATEGORIES, VocabPhrase, radiology_vocabulary
from sae_cxr.labeling.base import UNRESOLVED, PatternLabel


@dataclass
class TextConfig:
    """How the text labeler queries the text space."""

    template: str = "{}"
    """Prompt template each phrase is wrapped in before encoding (e.g. "a chest x-ray showing {}")."""
    top_k: int = 50
    """Top activating images whose mean forms the pattern's side of the difference of means."""
    fire_threshold: float = 0.0
    """Only images with activation above this count as activating."""
    min_top: int = 3
    """Fewer activating images than this: no direction is estimated."""
    n_alternatives: int = 5
    """Runner-up phrases kept in the evidence."""
    full_confidence_margin: float = 0.1
    """Cosine margin over the best phrase of another meaning at which confidence reaches 1."""
    min_cosine: float = 0.0
    """If no phrase has a cosine above this, the pattern is left unresolved (nothing points its way)."""
    unresolved_category: str = "structural"
    """Category of an unresolved pattern (the evidence labeler's default, for the same reason)."""
    batch_size: int = 256
    """Phrases encoded per text-tower call."""

    def __post_init__(self) -> None:
        if "{}" not in self.template:
            raise ValueError(f"template must contain '{{}}' where the phrase goes, got {self.template!r}")
        if self.top_k < 1 or self.min_top < 1 or self.batch_size < 1:
            raise ValueError("top_k, min_top and batch_size must be >= 1")
        if self.full_confidence_margin <= 0:
            raise ValueError(f"full_confidence_margin must be > 0, got {self.full_confidence_margin}")
        if self.unresolved_category not in CATEGORIES:
            raise ValueError(f"unresolved_category must be one of {', '.join(CATEGORIES)}")


class NoDirectionError(ValueError):
    """The pattern has no readable direction: it fires on too few images, or its top mean is the mean."""


def encode_phrases(backbone: Any, texts: Sequence[str], batch_size: int = 256) -> np.ndarray:
    """[len(texts), D] float32 unit-norm text embeddings; a clear error for a backbone without text."""
    if not getattr(backbone, "has_text", False):
        raise ValueError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} has no text tower "
                         "(has_text is False): use the evidence or LMM labeler, or a backbone with text "
                         "(BiomedCLIP, the phantom model)")
    out = []
    for i in range(0, len(texts), batch_size):
        emb = backbone.encode_texts(list(texts[i:i + batch_size]))
        emb = emb.detach().cpu().numpy() if hasattr(emb, "detach") else np.asarray(emb)
        out.append(np.asarray(emb, dtype=np.float32))
    emb = np.concatenate(out, axis=0) if out else np.zeros((0, 0), dtype=np.float32)
    if emb.shape[0] != len(texts):
        raise ValueError(f"backbone returned {emb.shape[0]} text embeddings for {len(texts)} texts")
    norms = np.linalg.norm(emb, axis=1, keepdims=True)
    if (norms == 0).any():
        raise ValueError("backbone returned a zero text embedding; cannot compare by cosine")
    return emb / norms


def pattern_direction(image_embeddings: Any, activations: Any, top_k: int = 50, fire_threshold: float = 0.0,
                      min_top: int = 3) -> tuple[np.ndarray, int]:
    """(unit difference-of-means direction, number of top images used) for one pattern.

    top = the `top_k` strongest images with activation > fire_threshold; direction =
    mean(top) - mean(all), normalised.
    """
    x = np.asarray(image_embeddings, dtype=np.float64)
    a = np.asarray(activations, dtype=np.float64).reshape(-1)
    if x.ndim != 2 or x.shape[0] != a.shape[0]:
        raise ValueError(f"image_embeddings must be [N, D] with one row per activation; got {x.shape} "
                         f"for {a.shape[0]} activations")
    idx = np.flatnonzero(a > fire_threshold)
    if len(idx) < min_top:
        raise NoDirectionError(f"the pattern fires on {len(idx)} image(s), fewer than min_top={min_top}: "
                         "no direction to read")
    idx = idx[np.argsort(-a[idx], kind="stable")][:top_k]
    return difference_of_means(x[idx], x.mean(0)), len(idx)


def difference_of_means(top_embeddings: Any, mean_embedding: Any) -> np.ndarray:
    """normalise(mean(top_embeddings) - mean_embedding)."""
    top = np.asarray(top_embeddings, dtype=np.float64)
    if top.ndim != 2 or top.shape[0] == 0:
        raise ValueError(f"top_embeddings must be a non-empty [n, D] array, got shape {top.shape}")
    d = top.mean(0) - np.asarray(mean_embedding, dtype=np.float64).reshape(-1)
    n = np.linalg.norm(d)
    if not np.isfinite(n) or n == 0:
        raise NoDirectionError("the top images' mean equals the population mean: the direction is undefined")
    return d / n


class TextLabeler:
    """Names patterns by nearest vocabulary phrases; phrase embeddings are computed once and cached."""

    def __init__(self, backbone: Any, vocabulary: Sequence[VocabPhrase] | None = None,
                 config: TextConfig | None = None):
        self.config = config or TextConfig()
        if not getattr(backbone, "has_text", False):
            raise ValueError(f"backbone {getattr(backbone, 'name', type(backbone).__name__)!r} has no text tower "
                             "(has_text is False): the text labeler needs one; use the evidence labeler instead")
        self.backbone = backbone
        self.vocabulary = list(radiology_vocabulary() if vocabulary is None else vocabulary)
        if not self.vocabulary:
            raise ValueError("the vocabulary is empty: give the text labeler phrases to choose from")
        self._phrase_emb: np.ndarray | None = None
        self._groups = [v.concept or f"phrase:{v.phrase}" for v in self.vocabulary]

    @property
    def phrase_embeddings(self) -> np.ndarray:
        """[V, D] unit-norm embeddings of the (templated) vocabulary; encoded on first use only."""
        if self._phrase_emb is None:
            texts = [self.config.template.format(v.phrase) for v in self.vocabulary]
            self._phrase_emb = encode_phrases(self.backbone, texts, self.config.batch_size)
        return self._phrase_emb

    def scores(self, direction: Any) -> np.ndarray:
        """Cosine of each vocabulary phrase with a direction in the embedding space."""
        d = np.asarray(direction, dtype=np.float64).reshape(-1)
        emb = self.phrase_embeddings
        if d.shape[0] != emb.shape[1]:
            raise ValueError(f"direction has {d.shape[0]} dimensions; the backbone's text space has {emb.shape[1]}")
        n = np.linalg.norm(d)
        if n == 0 or not np.isfinite(n):
            raise ValueError("direction must be a finite non-zero vector")
        return emb.astype(np.float64) @ (d / n)

    def label(self, pattern_id: int | str, direction: Any = None, *, image_embeddings: Any = None,
              activations: Any = None, top_embeddings: Any = None, mean_embedding: Any = None) -> PatternLabel:
        """Name one pattern from ONE of: a direction; image embeddings [N, D] + activations [N];
        or its top images' embeddings + the mean embedding of all images."""
        cfg = self.config
        given = [direction is not None, image_embeddings is not None or activations is not None,
                 top_embeddings is not None or mean_embedding is not None]
        if sum(given) != 1:
            raise ValueError(f"pattern {pattern_id}: give exactly one of direction, (image_embeddings, activations) "
                             "or (top_embeddings, mean_embedding)")
        query, n_top = "direction", None
        try:
            if given[1]:
                if image_embeddings is None or activations is None:
                    raise ValueError("image_embeddings and activations go together")
                direction, n_top = pattern_direction(image_embeddings, activations, cfg.top_k, cfg.fire_threshold,
                                                     cfg.min_top)
                query = "difference_of_means"
            elif given[2]:
                if top_embeddings is None or mean_embedding is None:
                    raise ValueError("top_embeddings and mean_embedding go together")
                direction = difference_of_means(top_embeddings, mean_embedding)
                n_top, query = int(np.asarray(top_embeddings).shape[0]), "difference_of_means"
        except NoDirectionError as e:
            return PatternLabel(label=UNRESOLVED, description=f"No label: {e}.", category=cfg.unresolved_category,
                                confidence=0.0, labeler="text", pattern_id=pattern_id,
                                evidence={"method": "text", "query": "difference_of_means", "reason": str(e),
                                          "concept": None})
        except ValueError as e:
            raise ValueError(f"pattern {pattern_id}: {e}") from None

        s = self.scores(direction)
        order = np.argsort(-s, kind="stable")
        best = int(order[0])
        v = self.vocabulary[best]
        rival = next((int(j) for j in order[1:] if self._groups[j] != self._groups[best]), None)
        margin = float(s[best] - s[rival]) if rival is not None else float(s[best])
        alternatives = [{"phrase": self.vocabulary[j].phrase, "category": self.vocabulary[j].category,
                         "concept": self.vocabulary[j].concept, "cosine": float(s[j])}
                        for j in order[1:1 + cfg.n_alternatives]]
        evidence = {"method": "text", "query": query, "n_top": n_top, "template": cfg.template,
                    "backbone": getattr(self.backbone, "name", type(self.backbone).__name__),
                    "cosine": float(s[best]), "margin": margin, "concept": v.concept,
                    "rival": self.vocabulary[rival].phrase if rival is not None else None,
                    "alternatives": alternatives}
        if s[best] <= cfg.min_cosine:
            return PatternLabel(label=UNRESOLVED, description=f"No label: no phrase has cosine above {cfg.min_cosine} "
                                f"with the pattern's direction (best: {v.phrase!r} at {s[best]:.3f}).",
                                category=cfg.unresolved_category, confidence=0.0, labeler="text",
                                pattern_id=pattern_id, evidence={**evidence, "concept": None})
        confidence = float(np.clip(margin / cfg.full_confidence_margin, 0.0, 1.0))
        rival_text = (f"; best other meaning {self.vocabulary[rival].phrase!r} at {s[rival]:.3f}"
                      if rival is not None else "")
        description = (f"Nearest vocabulary phrase to the pattern's direction in the text space of "
                       f"{evidence['backbone']}: cosine {s[best]:.3f}{rival_text}.")
        return PatternLabel(label=v.phrase, description=description, category=v.category, confidence=confidence,
                            labeler="text", pattern_id=pattern_id, evidence=evidence)

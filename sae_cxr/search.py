"""Search a run: image -> similar images, pattern -> similar patterns, text -> patterns.

Indices (indices/, built by the galleries and label stages, all cosine on unit vectors):
    images.faiss     image embeddings, ids = record ids
    patterns.faiss   pattern prototypes [encoder direction, decoder direction] / sqrt(2), ids = pattern ids
    labels.faiss     text embeddings of the pattern labels, ids = pattern ids (needs a text tower)
Text queries embed the query with the backbone's text tower and look it up among the label
embeddings; without labels they fall back to the patterns' image-space directions (the difference
of means of their top images), which live in the same space as the text embeddings.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Sequence

import numpy as np

from sae_cxr.index import IndexConfig, VectorIndex
from sae_cxr.run import RunDir

IDX_DIR = "indices"
IMAGES = "indices/images.faiss"
PATTERNS = "indices/patterns.faiss"
LABELS = "indices/labels.faiss"


def _files(path: str) -> list[str]:
    return [path, path + ".json"]


def _unit(a: np.ndarray) -> np.ndarray:
    return a / np.maximum(np.linalg.norm(a, axis=1, keepdims=True), 1e-12)


def build_run_indices(run: RunDir, store, cfg: IndexConfig | None = None) -> tuple[list[str], dict[str, Any]]:
    """The image and pattern indices of a run (called by the galleries stage)."""
    from sae_cxr.ingest import read_records_table
    from sae_cxr.patterns import load_patterns

    cfg = cfg or IndexConfig()
    run.sub(IDX_DIR).mkdir(parents=True, exist_ok=True)
    ids = read_records_table(run)["id"].astype(str).to_numpy()
    valid = store.valid
    img = VectorIndex(cfg).build(store.image()[valid], ids[valid])
    img.save(run.sub(IMAGES))
    table, arrays = load_patterns(run)
    proto = np.concatenate([_unit(arrays["encoder_prototype"]), _unit(arrays["decoder_prototype"])], axis=1)
    pat = VectorIndex(cfg).build(proto / np.sqrt(2), table["pattern_id"].to_numpy().astype(np.int64))
    pat.save(run.sub(PATTERNS))
    info = img.info()
    return _files(IMAGES) + _files(PATTERNS), {"images": info["kind"], "image_count": len(img),
                                               "image_shards": info["shards"], "image_index_bytes": info["memory_bytes"],
                                               "image_recall": (info["recall"] or {}).get("recall"),
                                               "patterns": len(pat)}


def build_label_index(run: RunDir, labels: Sequence, backbone, cfg: IndexConfig | None = None) -> list[str]:
    """Index the text embeddings of resolved pattern labels (called by the label stage)."""
    resolved = [lab for lab in labels if not lab.unresolved]
    if not resolved:
        return []
    emb = backbone.encode_texts([lab.label for lab in resolved]).numpy()
    idx = VectorIndex(cfg or IndexConfig()).build(emb, np.array([int(lab.pattern_id) for lab in resolved]))
    idx.save(run.sub(LABELS))
    return _files(LABELS)


@dataclass
class Hit:
    kind: str  # "image" | "pattern"
    id: str | int
    score: float
    label: str | None = None
    category: str | None = None

    def to_dict(self) -> dict[str, Any]:
        return {"kind": self.kind, "id": self.id, "score": round(self.score, 4), "label": self.label,
                "category": self.category}


class RunSearch:
    """Loads a run's indices once and answers queries."""

    def __init__(self, run: RunDir):
        self.run = run
        self._images: VectorIndex | None = None
        self._patterns: VectorIndex | None = None
        self._labels: VectorIndex | None = None
        self._backbone = None
        self._names: dict[int, Any] | None = None

    def _load(self, rel: str) -> VectorIndex:
        if not self.run.sub(rel).exists():
            raise FileNotFoundError(f"{self.run.sub(rel)} not found: run `sae-cxr galleries --run {self.run.path}`"
                                    + (" and `sae-cxr label`" if rel == LABELS else ""))
        return VectorIndex.load(self.run.verify(rel))

    @property
    def names(self) -> dict[int, Any]:
        if self._names is None:
            from sae_cxr.labeling.stage import load_labels

            self._names = load_labels(self.run)
        return self._names

    def _pattern_hit(self, pid: int, score: float) -> Hit:
        lab = self.names.get(int(pid))
        return Hit("pattern", int(pid), float(score), None if lab is None else lab.label,
                   None if lab is None else lab.category)

    def similar_images(self, image_id: str, k: int = 20) -> list[Hit]:
        from sae_cxr.extract import EmbeddingStore
        from sae_cxr.ingest import read_records_table

        ids = read_records_table(self.run)["id"].astype(str).tolist()
        if image_id not in ids:
            raise KeyError(f"image {image_id!r} is not in run {self.run.path}")
        q = EmbeddingStore(self.run).image(np.array([ids.index(image_id)]))
        self._images = self._images or self._load(IMAGES)
        scores, found = self._images.search(q, k + 1)
        return [Hit("image", str(i), float(s)) for s, i in zip(scores[0], found[0]) if str(i) != image_id][:k]

    def similar_patterns(self, pattern_id: int, k: int = 20) -> list[Hit]:
        self._patterns = self._patterns or self._load(PATTERNS)
        from sae_cxr.patterns import load_patterns

        table, arrays = load_patterns(self.run)
        rows = np.flatnonzero(table["pattern_id"].to_numpy() == int(pattern_id))
        if len(rows) == 0:
            raise KeyError(f"pattern {pattern_id} does not exist (the run has {len(table)} patterns)")
        r = int(rows[0])
        q = np.concatenate([_unit(arrays["encoder_prototype"][r:r + 1]), _unit(arrays["decoder_prototype"][r:r + 1])],
                           axis=1) / np.sqrt(2)
        scores, found = self._patterns.search(q, k + 1)
        return [self._pattern_hit(int(i), s) for s, i in zip(scores[0], found[0]) if int(i) != int(pattern_id)][:k]

    def text_to_patterns(self, text: str, k: int = 20) -> list[Hit]:
        if not text.strip():
            raise ValueError("the text query is empty")
        if self._backbone is None:
            from sae_cxr.backbones.base import load_backbone
            from sae_cxr.pipeline import config_from_run

            self._backbone = load_backbone(config_from_run(self.run).extract.backbone)
        if not self._backbone.has_text:
            raise ValueError(f"backbone {self._backbone.name} has no text tower: text search is unavailable")
        q = self._backbone.encode_texts([text]).numpy()
        if self.run.sub(LABELS).exists():
            self._labels = self._labels or self._load(LABELS)
            scores, found = self._labels.search(q, k)
            return [self._pattern_hit(int(i), s) for s, i in zip(scores[0], found[0])]
        return self._text_by_direction(q[0], k)

    def _text_by_direction(self, q: np.ndarray, k: int) -> list[Hit]:
        """No labels yet: compare the query with each pattern's difference-of-means image direction."""
        from sae_cxr.extract import EmbeddingStore
        from sae_cxr.patterns import dense_activations, load_activations

        rows, cols, vals, (n, p) = load_activations(self.run)
        act = dense_activations(rows, cols, vals, n, p)
        emb = EmbeddingStore(self.run).image()
        mean = emb.mean(0)
        dirs = np.zeros((p, emb.shape[1]))
        for j in range(p):
            top = np.argsort(-act[:, j])[:50]
            top = top[act[top, j] > 0]
            if len(top):
                dirs[j] = emb[top].mean(0) - mean
        s = _unit(dirs) @ q
        order = np.argsort(-s)[:k]
        return [self._pattern_hit(int(j), float(s[j])) for j in order]


def search(run: RunDir, *, pattern: int | None = None, image: str | None = None, text: str | None = None,
           k: int = 20) -> list[Hit]:
    """One query of exactly one kind (the Python face of `sae-cxr search`)."""
    given = [v is not None for v in (pattern, image, text)]
    if sum(given) != 1:
        raise ValueError("give exactly one of pattern, image or text")
    s = RunSearch(run)
    if pattern is not None:
        return s.similar_patterns(int(pattern), k)
    if image is not None:
        return s.similar_images(str(image), k)
    return s.text_to_patterns(str(text), k)

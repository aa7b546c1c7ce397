"""The text labeler on a stand-in backbone whose phrase vectors are known."""

from __future__ import annotations

import numpy as np
import pytest

from sae_cxr.findings import CONCEPTS, VocabPhrase, radiology_vocabulary
from sae_cxr.labeling.base import UNRESOLVED
from sae_cxr.labeling.text import TextConfig, TextLabeler, difference_of_means, pattern_direction
from tests.labeling.fake_text import FakeTextBackbone, NoTextBackbone, PlantedSpace

N = 800
PREVALENCE = {"pacemaker": 0.15, "pleural_effusion": 0.2, "scoliosis": 0.1, "laterality_marker": 0.5,
              "cardiomegaly": 0.3}


@pytest.fixture(scope="module")
def world():
    space = PlantedSpace(seed=0)
    vocab = radiology_vocabulary()
    space.add_vocabulary(vocab)
    rng = np.random.default_rng(2)
    masks = {c: rng.random(N) < p for c, p in PREVALENCE.items()}
    return space, vocab, masks, space.images(masks, N)


def _acts(mask: np.ndarray, seed: int = 0) -> np.ndarray:
    return np.where(mask, np.random.default_rng(seed).uniform(0.5, 1.5, mask.shape), 0.0)


@pytest.mark.parametrize("concept", ["pacemaker", "pleural_effusion", "scoliosis", "laterality_marker"])
def test_picks_the_planted_phrase_and_category(world, concept) -> None:
    space, vocab, masks, x = world
    labeler = TextLabeler(FakeTextBackbone(space), vocab)
    lab = labeler.label(12, image_embeddings=x, activations=_acts(masks[concept]))
    chosen = next(v for v in vocab if v.phrase == lab.label)
    assert chosen.concept == concept and lab.evidence["concept"] == concept
    assert lab.category == CONCEPTS[concept].category
    assert lab.labeler == "text" and lab.pattern_id == 12 and lab.evidence["query"] == "difference_of_means"
    # runner-ups are kept; the best rival of another meaning is clearly behind
    assert len(lab.evidence["alternatives"]) == 5 and lab.evidence["margin"] > 0.2 and lab.confidence == 1.0


def test_difference_of_means_beats_the_raw_centroid() -> None:
    """A generic phrase sits on the component every radiograph shares: the raw centroid picks it."""
    space = PlantedSpace(seed=4)
    vocab = [VocabPhrase("pacemaker", "device", "pacemaker"),
             VocabPhrase("pleural effusion", "pleural", "pleural_effusion"),
             VocabPhrase("normal chest radiograph", "structural", None)]
    space.add_vocabulary(vocab[:2])
    space.set("normal chest radiograph", space.common)
    rng = np.random.default_rng(0)
    masks = {"pacemaker": rng.random(N) < 0.2, "pleural_effusion": rng.random(N) < 0.2}
    x = space.images(masks, N, common=3.0)
    labeler = TextLabeler(FakeTextBackbone(space), vocab)
    acts = _acts(masks["pacemaker"])
    top = x[acts > 0]
    raw_centroid = top.mean(0)
    assert vocab[int(np.argmax(labeler.scores(raw_centroid)))].phrase == "normal chest radiograph"
    assert labeler.label(1, direction=difference_of_means(top, x.mean(0))).label == "pacemaker"
    assert labeler.label(1, top_embeddings=top, mean_embedding=x.mean(0)).label == "pacemaker"


def test_phrase_embeddings_are_encoded_once(world) -> None:
    space, vocab, masks, x = world
    backbone = FakeTextBackbone(space)
    labeler = TextLabeler(backbone, vocab, TextConfig(batch_size=100))
    for c in ("pacemaker", "scoliosis"):
        labeler.label(c, image_embeddings=x, activations=_acts(masks[c]))
    assert backbone.text_calls == -(-len(vocab) // 100)  # one pass in batches, then the cache
    assert labeler.phrase_embeddings.shape == (len(vocab), x.shape[1])
    assert np.allclose(np.linalg.norm(labeler.phrase_embeddings, axis=1), 1.0, atol=1e-5)


def test_template_is_applied_before_encoding(world) -> None:
    _, vocab, masks, _ = world
    space = PlantedSpace(seed=0)
    space.add_vocabulary(vocab, template="a chest x-ray showing {}")
    x = space.images(masks, N)
    labeler = TextLabeler(FakeTextBackbone(space), vocab, TextConfig(template="a chest x-ray showing {}"))
    lab = labeler.label(3, image_embeddings=x, activations=_acts(masks["pacemaker"]))
    assert lab.evidence["concept"] == "pacemaker" and lab.evidence["template"] == "a chest x-ray showing {}"
    with pytest.raises(ValueError, match="must contain"):
        TextConfig(template="no slot")


def test_confidence_reflects_the_margin_over_other_meanings_not_synonyms() -> None:
    space = PlantedSpace(seed=5, phrase_noise=0.0)
    pm = space.concept["pacemaker"]
    vocab = [VocabPhrase("pacemaker", "device", "pacemaker"), VocabPhrase("cardiac pacemaker", "device", "pacemaker"),
             VocabPhrase("cardiomegaly", "cardiac", "cardiomegaly")]
    space.set("pacemaker", pm)
    space.set("cardiac pacemaker", pm)  # an exact synonym: no rival
    space.set("cardiomegaly", space.concept["cardiomegaly"])
    labeler = TextLabeler(FakeTextBackbone(space), vocab)
    clear = labeler.label(1, direction=pm)
    assert clear.evidence["rival"] == "cardiomegaly" and clear.confidence == 1.0
    ambiguous = labeler.label(2, direction=pm + 0.95 * space.concept["cardiomegaly"])
    assert ambiguous.evidence["concept"] == "pacemaker" and 0 < ambiguous.confidence < 0.5
    assert ambiguous.evidence["margin"] == pytest.approx(0.05 / np.linalg.norm([1, 0.95]), abs=1e-4)


def test_unresolved_when_no_direction_or_nothing_points_its_way(world) -> None:
    space, vocab, masks, x = world
    labeler = TextLabeler(FakeTextBackbone(space), vocab)
    acts = np.zeros(N)
    acts[:2] = 1.0
    lab = labeler.label(5, image_embeddings=x, activations=acts)
    assert lab.label == UNRESOLVED and lab.confidence == 0.0 and "fewer than min_top" in lab.description
    # a direction opposite to every phrase: no cosine above 0
    lone = PlantedSpace(seed=6)
    lone.set("pacemaker", lone.concept["pacemaker"])
    lab = TextLabeler(FakeTextBackbone(lone), [VocabPhrase("pacemaker", "device", "pacemaker")]).label(
        6, direction=-lone.concept["pacemaker"])
    assert lab.unresolved and lab.evidence["concept"] is None


def test_errors_at_the_boundary(world) -> None:
    space, vocab, masks, x = world
    with pytest.raises(ValueError, match="has no text tower"):
        TextLabeler(NoTextBackbone(space), vocab)
    labeler = TextLabeler(FakeTextBackbone(space), vocab)
    with pytest.raises(ValueError, match="exactly one of"):
        labeler.label(1)
    with pytest.raises(ValueError, match="exactly one of"):
        labeler.label(1, direction=x[0], image_embeddings=x, activations=np.ones(N))
    with pytest.raises(ValueError, match="go together"):
        labeler.label(1, image_embeddings=x)
    with pytest.raises(ValueError, match="dimensions"):
        labeler.label(1, direction=np.ones(3))
    with pytest.raises(ValueError, match="one row per activation"):
        pattern_direction(x, np.ones(N - 1))
    with pytest.raises(ValueError, match="empty"):
        TextLabeler(FakeTextBackbone(space), [])

"""Finding vocabularies, planted concepts and their categories.

Every stage, table, label and test names findings and concepts with the identifiers defined
here, so that a phantom concept, a public data set's label and a pattern's category always
meet on the same string.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

FINDINGS: tuple[str, ...] = ("Atelectasis", "Cardiomegaly", "Consolidation", "Edema", "Pleural Effusion")
"""The five diagnostic findings the classifier predicts, in logit order."""

CATEGORIES: tuple[str, ...] = ("cardiac", "pulmonary", "pleural", "structural", "device", "artifact")
"""Pattern categories. Device and artifact patterns are the ones a shortcut audit looks for."""

NUISANCE_CATEGORIES: frozenset[str] = frozenset({"device", "artifact"})


@dataclass(frozen=True)
class Concept:
    """A planted concept of the phantom world."""

    name: str
    category: str
    finding: str | None  # the diagnostic label this concept implies, if any
    phrase: str  # how a radiologist would name it in a label or a report
    appearance: str  # what it looks like, as documented in DESIGN.md
    sided: bool = False  # whether the concept has a side (left/right)


_CONCEPT_ROWS: tuple[Concept, ...] = (
    Concept("cardiomegaly", "cardiac", "Cardiomegaly", "cardiomegaly",
            "cardiac silhouette wider than half the thorax"),
    Concept("consolidation", "pulmonary", "Consolidation", "consolidation",
            "dense, patchy, lobar opacity, air bronchograms optional", sided=True),
    Concept("edema", "pulmonary", "Edema", "pulmonary edema",
            "bilateral perihilar haze, fine septal lines"),
    Concept("atelectasis", "pulmonary", "Atelectasis", "atelectasis",
            "linear or plate-like opacity, local volume loss", sided=True),
    Concept("nodule", "pulmonary", None, "pulmonary nodule", "round opacity, 5-30 mm equivalent", sided=True),
    Concept("pleural_effusion", "pleural", "Pleural Effusion", "pleural effusion",
            "meniscus blunting a costophrenic angle, side-specific", sided=True),
    Concept("pneumothorax", "pleural", None, "pneumothorax",
            "lucent apical or lateral rim without lung markings, pleural line", sided=True),
    Concept("scoliosis", "structural", None, "scoliosis", "laterally curved spine"),
    Concept("elevated_hemidiaphragm", "structural", None, "elevated hemidiaphragm",
            "one dome higher than the other", sided=True),
    Concept("rotation", "structural", None, "patient rotation", "asymmetric clavicle heads around the spine"),
    Concept("pacemaker", "device", None, "pacemaker", "bright generator box, leads to the heart"),
    Concept("et_tube", "device", None, "endotracheal tube", "tube in the trachea with a bright tip"),
    Concept("central_line", "device", None, "central venous catheter",
            "thin bright catheter along a vein to the heart"),
    Concept("sternotomy_wires", "device", None, "sternotomy wires", "small bright loops along the sternum"),
    Concept("laterality_marker", "artifact", None, "laterality marker", 'a bright "L" or "R" letter near a corner'),
    Concept("burned_in_text", "artifact", None, "burned-in text", "a bright text strip along an edge"),
    Concept("low_exposure", "artifact", None, "low exposure", "global noise, low contrast"),
    Concept("collimation_edge", "artifact", None, "collimation edge", "a dark or bright band along the border"),
)

CONCEPTS: dict[str, Concept] = {c.name: c for c in _CONCEPT_ROWS}
CONCEPT_NAMES: tuple[str, ...] = tuple(CONCEPTS)

FINDING_CATEGORY: dict[str, str] = {"Atelectasis": "pulmonary", "Cardiomegaly": "cardiac",
                                     "Consolidation": "pulmonary", "Edema": "pulmonary",
                                     "Pleural Effusion": "pleural"}


def finding_index(name: str) -> int:
    """Position of a finding in the logit vector, accepting loose spellings ("pleural_effusion")."""
    key = _normalise(name)
    for i, f in enumerate(FINDINGS):
        if _normalise(f) == key:
            return i
    raise ValueError(f"unknown finding {name!r}; expected one of: {', '.join(FINDINGS)}")


def canonical_finding(name: str) -> str:
    return FINDINGS[finding_index(name)]


def _normalise(name: str) -> str:
    return re.sub(r"[^a-z]", "", name.lower())


# Source vocabularies: how each public data set spells its labels, mapped onto the five findings.
# Labels that do not map stay in a record's metadata with their original spelling.
CHEXPERT_LABELS: tuple[str, ...] = (
    "No Finding", "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices",
)
CHEXPERT_TO_FINDING: dict[str, str] = {f: f for f in FINDINGS}

NIH_LABELS: tuple[str, ...] = (
    "Atelectasis", "Cardiomegaly", "Effusion", "Infiltration", "Mass", "Nodule", "Pneumonia", "Pneumothorax",
    "Consolidation", "Edema", "Emphysema", "Fibrosis", "Pleural_Thickening", "Hernia", "No Finding",
)
# BBox_List_2017.csv spells Infiltration as "Infiltrate".
NIH_LABEL_ALIASES: dict[str, str] = {"Infiltrate": "Infiltration"}
NIH_TO_FINDING: dict[str, str] = {"Atelectasis": "Atelectasis", "Cardiomegaly": "Cardiomegaly",
                                  "Effusion": "Pleural Effusion", "Consolidation": "Consolidation",
                                  "Edema": "Edema"}


@dataclass(frozen=True)
class Shortcut:
    """A planted spurious correlation: `nuisance` agrees with `finding` with probability `rate`.

    In train, val and test, P(nuisance | finding) = rate and P(nuisance | no finding) = 1 - rate;
    in the test_shifted split the nuisance is drawn independently of the finding, at the
    nuisance's marginal train prevalence. rate = 0.5 plants nothing.
    """

    nuisance: str
    finding: str
    rate: float

    def __post_init__(self) -> None:
        if self.nuisance not in CONCEPTS:
            raise ValueError(f"shortcut nuisance {self.nuisance!r} is not a phantom concept; "
                             f"expected one of: {', '.join(CONCEPT_NAMES)}")
        if CONCEPTS[self.nuisance].finding is not None:
            raise ValueError(f"shortcut nuisance {self.nuisance!r} implies a finding itself; "
                             "pick a concept without one (a device, an artifact, a structural concept)")
        object.__setattr__(self, "finding", canonical_finding(self.finding))
        if not 0.0 <= self.rate <= 1.0:
            raise ValueError(f"shortcut rate must lie in [0, 1], got {self.rate}")

    @classmethod
    def parse(cls, text: str) -> "Shortcut":
        """Parse `nuisance:finding:rate`, e.g. `pacemaker:Cardiomegaly:0.9`."""
        parts = text.split(":")
        if len(parts) != 3:
            raise ValueError(f"shortcut {text!r} must be written nuisance:finding:rate, "
                             "e.g. pacemaker:Cardiomegaly:0.9")
        try:
            rate = float(parts[2])
        except ValueError:
            raise ValueError(f"shortcut {text!r}: rate {parts[2]!r} is not a number") from None
        return cls(parts[0].strip(), parts[1].strip(), rate)

    def __str__(self) -> str:
        return f"{self.nuisance}:{self.finding}:{self.rate:g}"


@dataclass(frozen=True)
class VocabPhrase:
    """A phrase of the shipped radiology vocabulary (text labeler, backbone training)."""

    phrase: str
    category: str
    concept: str | None  # the phantom concept it names, if any


def radiology_vocabulary() -> list[VocabPhrase]:
    """The shipped vocabulary: a few hundred phrases over the six categories (assets/radiology_vocabulary.tsv)."""
    from importlib import resources

    text = (resources.files("sae_cxr") / "assets" / "radiology_vocabulary.tsv").read_text(encoding="utf-8")
    out = []
    for n, line in enumerate(text.splitlines(), start=1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split("\t")
        if len(parts) < 2 or parts[1] not in CATEGORIES:
            raise ValueError(f"radiology_vocabulary.tsv line {n} is malformed: {line!r}")
        concept = parts[2].strip() if len(parts) > 2 and parts[2].strip() else None
        if concept is not None and concept not in CONCEPTS:
            raise ValueError(f"radiology_vocabulary.tsv line {n} names unknown concept {concept!r}")
        out.append(VocabPhrase(parts[0].strip(), parts[1], concept))
    return out

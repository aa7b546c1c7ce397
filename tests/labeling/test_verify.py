"""Verification by the text tower (and by an LMM through the same call), flagging, labels.jsonl."""

from __future__ import annotations

import base64
import io
import json

import numpy as np
import pytest

from sae_cxr.findings import radiology_vocabulary
from sae_cxr.labeling.base import (
    JudgeVote,
    PatternLabel,
    balanced_accuracy,
    read_labels,
    verification_from_votes,
    write_labels,
)
from sae_cxr.labeling.llm_client import LLMConfig, OpenAIChatClient
from sae_cxr.labeling.lmm import LMMLabeler
from sae_cxr.labeling.verify import (
    TextJudge,
    TextJudgeConfig,
    VerifyConfig,
    calibrate_and_verify,
    select_images,
    verify,
    youden_threshold,
)
from tests.labeling.fake_text import FakeTextBackbone, NoTextBackbone, PlantedSpace
from tests.labeling.loopback import ChatServer, Recorded, Reply, completion, make_png

N = 600


@pytest.fixture(scope="module")
def splits():
    """A labelling split and a held-out split of planted embeddings; the pattern fires on pacemakers."""
    space = PlantedSpace(seed=0)
    space.add_vocabulary(radiology_vocabulary())
    out = []
    for seed in (1, 2):
        rng = np.random.default_rng(seed)
        masks = {"pacemaker": rng.random(N) < 0.2, "pleural_effusion": rng.random(N) < 0.2,
                 "laterality_marker": rng.random(N) < 0.5}
        x = space.images(masks, N, seed=seed + 10)
        acts = np.where(masks["pacemaker"], rng.uniform(0.5, 1.5, N), 0.0)
        out.append((x, acts))
    return space, out[0], out[1]


def _label(text: str, category: str) -> PatternLabel:
    return PatternLabel(text, f"{text} on the image", category, 0.9, labeler="evidence", pattern_id=4)


# -- scores, pinned by hand -----------------------------------------------------------------------
def test_balanced_accuracy_hand_worked_votes() -> None:
    # positives 3 of 4 yes (TPR .75), negatives 4 of 5 no (TNR .8): (0.75 + 0.8) / 2
    pos = [JudgeVote(True, 0.9), JudgeVote(True, 0.5), JudgeVote(False, 0.6), True]
    neg = [JudgeVote(False, 0.9)] * 3 + [JudgeVote(True, 0.7), False]
    assert balanced_accuracy(pos, neg) == pytest.approx(0.775)
    v = verification_from_votes(pos[:3] + [JudgeVote(True, 1.0)], neg[:4] + [JudgeVote(False, 1.0)], judge="text")
    assert (v.true_positive_rate, v.true_negative_rate, v.balanced_accuracy) == pytest.approx((0.75, 0.8, 0.775))
    assert v.details() == {"judge": "text", "balanced_accuracy": pytest.approx(0.775), "true_positive_rate": 0.75,
                           "true_negative_rate": pytest.approx(0.8), "n_pos": 4, "n_neg": 5}
    # yes to everything passes a positives-only 0.7 rule, but is chance on both sides
    assert balanced_accuracy([True] * 8, [True] * 8) == pytest.approx(0.5)


def test_youden_threshold_hand_worked() -> None:
    assert youden_threshold([0.5, 0.6, 0.7], [0.1, 0.2, 0.3]) == pytest.approx(0.4)  # the gap's midpoint
    # overlap: t = .25 gives TPR 1 + TNR 2/3; t = .5 gives TPR .75 + TNR 1 (best); t = .35 gives .75 + 2/3
    assert youden_threshold([0.3, 0.6, 0.7, 0.8], [0.1, 0.2, 0.4]) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="both"):
        youden_threshold([], [0.1])


def test_flagging_at_the_threshold() -> None:
    lab = _label("pacemaker", "device")
    assert not lab.with_verification(0.7, 0.7).flagged
    flagged = lab.with_verification(0.6999, 0.7, {"judge": "text"})
    assert flagged.flagged and flagged.verification == pytest.approx(0.6999)
    assert flagged.evidence["verification"] == {"judge": "text", "threshold": 0.7} and flagged.label == "pacemaker"


def test_select_images_top_and_random_quiet() -> None:
    acts = np.array([0.0, 3.0, 0.0, 1.0, 2.0, 0.0, 0.0, 0.5])
    pos, neg = select_images(acts, n_pos=2, n_neg=3, seed=0)
    assert pos.tolist() == [1, 4] and set(neg.tolist()) <= {0, 2, 5, 6} and len(neg) == 3
    assert select_images(acts, 2, 3, seed=0)[1].tolist() == neg.tolist()  # seeded
    with pytest.raises(ValueError, match="fires on 0 of 3"):
        select_images(np.zeros(3), 1, 1)


# -- the text judge ------------------------------------------------------------------------------
def test_correct_label_scores_high_wrong_label_low(splits) -> None:
    space, (xl, al), (xh, ah) = splits
    judge = TextJudge(FakeTextBackbone(space))
    cfg = VerifyConfig(n_pos=60, n_neg=60)
    right, v_right = calibrate_and_verify(_label("pacemaker", "device"), judge, xl, al, xh, ah, cfg)
    wrong, v_wrong = calibrate_and_verify(_label("pleural effusion", "pleural"), judge, xl, al, xh, ah, cfg)
    assert v_right.balanced_accuracy >= 0.95 and right.verification == v_right.balanced_accuracy
    assert not right.flagged
    assert v_wrong.balanced_accuracy < 0.65 and wrong.flagged
    info = right.evidence["verification"]
    assert info["judge"] == "text" and info["n_pos"] == 60 and info["calibration"]["method"] == "youden"
    vote = json.loads(v_right.votes_pos[0].raw)
    assert vote["threshold"] == pytest.approx(judge.calibrations["pacemaker"].threshold, abs=1e-6)


def test_threshold_is_fitted_on_the_labelling_split_only(splits) -> None:
    space, (xl, al), (xh, ah) = splits
    judge = TextJudge(FakeTextBackbone(space), TextJudgeConfig(method="midpoint"))
    lab = _label("pacemaker", "device")
    with pytest.raises(ValueError, match="calibrate on the labelling split first"):
        verify(lab, judge, xh[:3], xh[3:6])
    cal = judge.calibrate("pacemaker", xl[al > 0], xl[al == 0])
    cos = judge.cosines("pacemaker", xl)
    assert cal.threshold == pytest.approx((cos[al > 0].mean() + cos[al == 0].mean()) / 2)
    # verifying on held-out images does not move the threshold
    verify(lab, judge, xh[ah > 0], xh[ah == 0])
    assert judge.calibrations["pacemaker"].threshold == cal.threshold
    ids = [f"img{i}" for i in range(N)]
    with pytest.raises(ValueError, match="in both the labelling and the held-out split"):
        calibrate_and_verify(lab, judge, xl, al, xh, ah, labelling_ids=ids, heldout_ids=ids[:10])


def test_text_judge_needs_a_text_tower(splits) -> None:
    space = splits[0]
    with pytest.raises(ValueError, match="no text tower"):
        TextJudge(NoTextBackbone(space))
    judge = TextJudge(FakeTextBackbone(space))
    with pytest.raises(ValueError, match="embeddings"):
        judge.cosines("pacemaker", np.ones(5))


# -- an LMM judge through the same verify() ------------------------------------------------------
def test_verify_accepts_an_lmm_judge(server: ChatServer) -> None:
    """The loopback model says yes to red images; the label is verified exactly as with the text judge."""
    from PIL import Image

    def vote(req: Recorded) -> Reply:
        url = req.body["messages"][1]["content"][0]["image_url"]["url"]
        with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
            r, _, _ = img.convert("RGB").getpixel((0, 0))
        return Reply(body=completion(f'{{"applies": {str(r > 128).lower()}, "confidence": 0.8}}'))

    server.responder = vote
    lmm = LMMLabeler(OpenAIChatClient(LLMConfig(base_url=server.base_url, model="tiny-test", api_key_env="",
                                                max_retries=0, concurrency=2)))
    pos = [make_png((220, 10, 10))] * 3 + [make_png((10, 10, 220))]
    neg = [make_png((10, 10, 200))] * 4
    labelled, result = verify(_label("red square", "artifact"), lmm, pos, neg, threshold=0.9)
    # TPR 3/4, TNR 4/4 -> 0.875 < 0.9: flagged
    assert result.balanced_accuracy == pytest.approx(0.875) and result.judge == "lmm"
    assert labelled.verification == pytest.approx(0.875) and labelled.flagged
    assert labelled.evidence["verification"]["judge"] == "lmm"


# -- labels.jsonl --------------------------------------------------------------------------------
def test_labels_jsonl_round_trip(tmp_path) -> None:
    a = PatternLabel("pacemaker", "Over-represented ...", "device", 0.93, labeler="evidence", pattern_id=np.int64(17),
                     evidence={"terms": [{"odds_ratio": np.float32(12.5), "p": 1e-30, "q": float("nan")}],
                               "n_top": np.int64(50), "concept": "pacemaker", "ok": np.bool_(True)})
    b = _label("pleural effusion", "pleural").with_verification(0.55, 0.7, {"judge": "text"})
    c = PatternLabel("pneumothorax", "apical lucency", "pleural", 0.6, labeler="lmm", raw='{"label": "x"}',
                     pattern_id="p-3")
    path = write_labels(tmp_path / "labels.jsonl", [a, b, c])
    lines = path.read_text().splitlines()
    assert len(lines) == 3 and all("\n" not in line for line in lines)
    back = read_labels(path)
    assert [x.to_dict() for x in back] == [x.to_dict() for x in (a, b, c)]
    assert back[0].pattern_id == 17 and back[0].evidence["terms"][0]["q"] is None
    assert back[0].evidence["terms"][0]["odds_ratio"] == pytest.approx(12.5)
    assert back[1].flagged and back[1].verification == pytest.approx(0.55) and back[2].raw == '{"label": "x"}'


def test_labels_jsonl_errors(tmp_path) -> None:
    with pytest.raises(ValueError, match="unknown key"):
        PatternLabel.from_json('{"label": "x", "description": "", "category": "device", "confidence": 1, '
                               '"labeler": "text", "colour": "red"}')
    with pytest.raises(ValueError, match="category must be one of"):
        PatternLabel("x", "", "hardware", 0.5, labeler="text")
    with pytest.raises(ValueError, match="verification must be"):
        PatternLabel("x", "", "device", 0.5, labeler="text", verification=1.5)
    bad = tmp_path / "labels.jsonl"
    bad.write_text(_label("pacemaker", "device").to_json() + "\n{not json\n")
    with pytest.raises(ValueError, match="line 2"):
        read_labels(bad)

"""The LMM labeler and judge over the HTTP back end, against a loopback chat-completions server.

These tests check the PROTOCOL and the parsing, not a model: the server answers with canned
replies (good JSON, fenced JSON, prose, wrong schemas) and, for verification, with a rule that
reads the image the client sent. What a real model would call a pattern is out of scope here.
"""

from __future__ import annotations

import base64
import io

import pytest

from sae_cxr.findings import CATEGORIES
from sae_cxr.labeling.llm_client import LLMConfig, OpenAIChatClient
from sae_cxr.labeling.lmm import (
    DESCRIBE_SYSTEM,
    JUDGE_SYSTEM,
    JudgeVote,
    LMMConfig,
    LMMLabeler,
    LMMReplyError,
    balanced_accuracy,
    parse_json_object,
    parse_judge_vote,
    parse_pattern_label,
)
from tests.labeling.loopback import ChatServer, Recorded, Reply, completion, make_png

GOOD = '{"label": "pacemaker generator", "description": "Bright box over the left upper chest with leads.", ' \
       '"category": "device", "confidence": 0.85}'


def labeler(server: ChatServer, **config) -> LMMLabeler:
    client = OpenAIChatClient(LLMConfig(base_url=server.base_url, model="tiny-test", api_key_env="",
                                        max_retries=0, concurrency=3))
    return LMMLabeler(client, LMMConfig(**config))


def test_describe_pattern_request_and_label(server: ChatServer) -> None:
    server.queue(Reply(body=completion("```json\n" + GOOD + "\n```")))
    montage = make_png((90, 90, 90), (32, 16))
    context = {"pattern_id": 1812, "stability": 0.9, "density": 0.0123456, "top_findings": ["Cardiomegaly"]}
    reports = ["Pacemaker in place. " + "x" * 500, "  ", "Dual-lead pacemaker."]
    label = labeler(server, max_report_chars=60).describe_pattern(montage, reports, context)

    assert (label.label, label.category, label.confidence, label.labeler) == \
        ("pacemaker generator", "device", 0.85, "lmm")
    assert label.description.startswith("Bright box") and GOOD in label.raw
    [req] = server.requests
    assert req.body["response_format"] == {"type": "json_object"}
    system, user = req.body["messages"]
    assert system == {"role": "system", "content": DESCRIBE_SYSTEM}
    assert all(c in DESCRIBE_SYSTEM for c in CATEGORIES)
    image, text = user["content"]
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == montage
    body = text["text"]
    assert "- Pacemaker in place. xxx" in body and "x" * 100 not in body  # clipped snippet
    assert "- Dual-lead pacemaker." in body
    assert "- stability: 0.9" in body and "- density: 0.01235" in body and '["Cardiomegaly"]' in body
    assert "1812" not in body  # the id is for error messages, not for the model


def test_malformed_reply_is_reasked_with_the_reason(server: ChatServer) -> None:
    server.queue(Reply(body=completion("Sure! Here is the label: " + GOOD)),
                 Reply(body=completion(GOOD.replace('"device"', '"hardware"'))),
                 Reply(body=completion(GOOD)))
    label = labeler(server).describe_pattern(make_png(), [], {"pattern_id": 7})
    assert label.category == "device"
    assert len(server.requests) == 3
    third = server.requests[2].body["messages"]
    # system, user, then (assistant reply, re-ask) twice
    assert [m["role"] for m in third] == ["system", "user", "assistant", "user", "assistant", "user"]
    assert third[2]["content"].startswith("Sure!")
    assert "not a JSON object" in third[3]["content"]
    assert "category must be one of" in third[5]["content"] and "'hardware'" in third[5]["content"]


def test_gives_up_after_bounded_reasks_naming_the_pattern(server: ChatServer) -> None:
    server.responder = lambda req: Reply(body=completion("I think this is a pacemaker."))
    with pytest.raises(LMMReplyError, match=r"pattern 1812: no valid reply from the model after 3 attempt\(s\)"):
        labeler(server, max_reasks=2).describe_pattern(make_png(), [], {"pattern_id": 1812})
    assert len(server.requests) == 3


def test_json_mode_off_sends_no_response_format(server: ChatServer) -> None:
    server.queue(Reply(body=completion(GOOD)))
    labeler(server, json_mode=False).describe_pattern(make_png(), [], {})
    assert "response_format" not in server.requests[0].body


def test_non_png_montage_names_the_pattern(server: ChatServer) -> None:
    with pytest.raises(ValueError, match="pattern 3: image bytes are not a PNG"):
        labeler(server).describe_pattern(b"GIF89a...", [], {"pattern_id": 3})
    assert not server.requests


@pytest.mark.parametrize("text", [
    GOOD,
    "  \n" + GOOD + "\n",
    "```json\n" + GOOD + "\n```",
    "```\n" + GOOD + "```",
    GOOD.replace('"device"', '"Device"'),
])
def test_parse_accepts_strict_json(text: str) -> None:
    label = parse_pattern_label(text)
    assert label.label == "pacemaker generator" and label.category == "device"


@pytest.mark.parametrize("text, reason", [
    ("Label: " + GOOD, "not a JSON object"),
    (GOOD + " Hope this helps!", "not valid JSON"),
    ("```json\n" + GOOD + "\n``` extra", "not a JSON object"),
    ("[" + GOOD + "]", "not a JSON object"),
    ('{"label": "x", "description": "y", "category": "device", "confidence": NaN}', "NaN is not allowed"),
    ('{"label": "x", "description": "y", "category": "device"}', r"missing key\(s\) \['confidence'\]"),
    (GOOD[:-1] + ', "notes": "hi"}', r"unexpected key\(s\) \['notes'\]"),
    (GOOD.replace("0.85", "true"), "confidence must be a number"),
    (GOOD.replace("0.85", "1.5"), r"confidence must lie in \[0, 1\]"),
    (GOOD.replace("0.85", '"high"'), "confidence must be a number"),
    (GOOD.replace('"pacemaker generator"', '""'), "label must be a non-empty string"),
    (GOOD.replace('"pacemaker generator"', '"' + "a" * 81 + '"'), "keep it under 80"),
    (GOOD.replace('"device"', '"Pleural Effusion"'), "category must be one of"),
])
def test_parse_rejects_everything_else(text: str, reason: str) -> None:
    with pytest.raises(ValueError, match=reason):
        parse_pattern_label(text)


def test_parse_json_object_rejects_non_objects() -> None:
    assert parse_json_object('{"a": 1}') == {"a": 1}
    for bad in ('"just a string"', "42", "", "yes"):
        with pytest.raises(ValueError):
            parse_json_object(bad)


def test_judge_vote_parsing() -> None:
    assert parse_judge_vote('{"applies": false, "confidence": 0.2}') == \
        JudgeVote(False, 0.2, '{"applies": false, "confidence": 0.2}')
    with pytest.raises(ValueError, match="applies must be JSON true or false"):
        parse_judge_vote('{"applies": "yes", "confidence": 0.9}')


def test_judge_request_and_vote(server: ChatServer) -> None:
    server.queue(Reply(body=completion('{"applies": true, "confidence": 0.8}')))
    png = make_png((10, 200, 10))
    vote = labeler(server).judge(png, "pacemaker generator", "Bright box over the left upper chest.")
    assert (vote.applies, vote.confidence) == (True, 0.8)
    system, user = server.requests[0].body["messages"]
    assert system["content"] == JUDGE_SYSTEM
    image, text = user["content"]
    assert base64.b64decode(image["image_url"]["url"].split(",", 1)[1]) == png
    assert '"pacemaker generator": Bright box over the left upper chest.' in text["text"]


def test_judge_gives_up_naming_the_label(server: ChatServer) -> None:
    server.responder = lambda req: Reply(body=completion("Yes."))
    with pytest.raises(LMMReplyError, match=r"judge of label 'pacemaker': no valid reply .* after 2 attempt\(s\)"):
        labeler(server, max_reasks=1).judge(make_png(), "pacemaker", "a box")


def test_balanced_accuracy_hand_worked() -> None:
    # positives: 3 of 4 yes -> TPR 0.75; negatives: 4 of 5 no -> TNR 0.8; (0.75 + 0.8) / 2 = 0.775
    pos = [True, True, True, False]
    neg = [JudgeVote(False, 0.9), JudgeVote(False, 0.6), JudgeVote(True, 0.7), False, False]
    assert balanced_accuracy(pos, neg) == pytest.approx(0.775)
    # a label that says yes to everything passes a yes-rate >= 0.7 check, but scores chance here
    assert balanced_accuracy([True] * 10, [True] * 10) == pytest.approx(0.5)
    assert balanced_accuracy([True] * 3, [False] * 7) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="both activating"):
        balanced_accuracy([True], [])


def _first_pixel(req: Recorded) -> tuple[int, int, int]:
    """The top-left pixel of the image the client sent to the judge."""
    from PIL import Image

    url = req.body["messages"][1]["content"][0]["image_url"]["url"]
    with Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1]))) as img:
        return img.convert("RGB").getpixel((0, 0))


def test_verify_scores_both_sides(server: ChatServer) -> None:
    """The server reads each image: yes to red ones, and (wrongly) to the blue one with green = 99."""
    def vote(req: Recorded) -> Reply:
        r, g, _ = _first_pixel(req)
        applies = r > 128 or g == 99
        return Reply(body=completion(f'{{"applies": {str(applies).lower()}, "confidence": 0.9}}'), delay=0.1)

    server.responder = vote
    pos = [make_png((220, 10, 10)) for _ in range(3)] + [make_png((10, 10, 220))]
    neg = [make_png((10, 99, 220)), make_png((10, 10, 200)), make_png((10, 10, 180))]
    result = labeler(server).verify("red", "a red square", pos, neg)
    # positives: 3 of 4 yes (the blue one is missed) -> 0.75; negatives: 2 of 3 no -> 2/3
    assert result.true_positive_rate == pytest.approx(0.75)
    assert result.true_negative_rate == pytest.approx(2 / 3)
    assert result.balanced_accuracy == pytest.approx((0.75 + 2 / 3) / 2)
    assert [v.applies for v in result.votes_pos] == [True, True, True, False]
    assert [v.applies for v in result.votes_neg] == [True, False, False]
    assert len(server.requests) == 7 and 1 < server.max_in_flight <= 3  # judged in parallel, within the limit

"""Prompt templates (editable YAML files under data_gen/templates/LANG/) and the replies they ask for.

A template renders a document into chat messages; `parse_reply` turns the model's reply into the fields
its kind requires, or raises Rejected with a short reason that the job counts.
"""
from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import yaml

from embedlib.records import Document

DEFAULT_TEMPLATE_DIR = Path(__file__).parent / "templates"
DEFAULT_TEMPLATES = ("query_keyword", "query_question", "query_long", "title", "sts")

# The fields each kind of reply must hold; all are strings except the STS score.
REPLY_FIELDS = {
    "query": ("query",),
    "title": ("title",),
    "sts": ("sentence1", "sentence2"),
}
STS_SCORE_RANGE = (0.0, 5.0)

_PLACEHOLDER = re.compile(r"\{(passage|title|text)\}")


class Rejected(Exception):
    """A reply that cannot become a record; `reason` is a short counter name such as "not_json"."""

    def __init__(self, reason: str, detail: str = ""):
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Template:
    name: str
    kind: str  # "query" | "title" | "sts"
    language: str  # "en" | "zh"
    user: str
    system: str | None = None
    task: str | None = None
    instruction: str | None = None
    min_chars: int = 1
    max_chars: int = 1000

    def render(self, doc: Document, max_passage_chars: int) -> list[dict[str, str]]:
        """Chat messages for `doc`; long texts are cut to `max_passage_chars` to fit the model's context."""
        values = {
            "passage": doc.passage[:max_passage_chars],
            "title": doc.title[:max_passage_chars],
            "text": (doc.text or doc.passage)[:max_passage_chars],
        }
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)
        messages = [{"role": "system", "content": self.system}] if self.system else []
        return messages + [{"role": "user", "content": user}]


def load_template(path: Path) -> Template:
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ValueError(f"{path}: not valid YAML: {e}") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a mapping of template fields")
    known = {"kind", "language", "user", "system", "task", "instruction", "min_chars", "max_chars"}
    for key in data:
        if key not in known:
            raise ValueError(f"{path}: field '{key}': unknown; expected: {', '.join(sorted(known))}")
    for key in ("kind", "language", "user"):
        if not isinstance(data.get(key), str) or not data[key].strip():
            raise ValueError(f"{path}: field '{key}': required string is missing")
    if data["kind"] not in REPLY_FIELDS:
        raise ValueError(f"{path}: field 'kind': {data['kind']!r} is not one of {', '.join(REPLY_FIELDS)}")
    if not _PLACEHOLDER.search(data["user"]):
        raise ValueError(f"{path}: field 'user': has none of the placeholders {{passage}}, {{title}}, {{text}}")
    return Template(name=path.stem, **{k: (v.strip() if isinstance(v, str) else v) for k, v in data.items()})


def load_templates(names: list[str], language: str, template_dir: Path = DEFAULT_TEMPLATE_DIR) -> list[Template]:
    directory = Path(template_dir) / language
    templates = []
    for name in names:
        path = directory / f"{name}.yaml"
        if not path.is_file():
            available = sorted(p.stem for p in directory.glob("*.yaml"))
            raise ValueError(f"no template {name!r} for language {language!r} in {directory}; "
                             f"available: {', '.join(available) or 'none'}")
        templates.append(load_template(path))
    return templates


# ---------------------------------------------------------------------------------------------------
# Replies

_THINK = re.compile(r"<think>.*?</think>", re.DOTALL)  # reasoning models put their thoughts first


def extract_json_object(text: str) -> dict:
    """The first JSON object in a reply, tolerating code fences and text around it."""
    text = _THINK.sub("", text)
    decoder = json.JSONDecoder()
    start = text.find("{")
    while start != -1:
        try:
            value, _ = decoder.raw_decode(text, start)
        except json.JSONDecodeError:
            start = text.find("{", start + 1)
            continue
        if isinstance(value, dict):
            return value
        start = text.find("{", start + 1)
    raise Rejected("not_json", text[:200])


def parse_reply(template: Template, text: str) -> dict:
    """The reply's fields for `template.kind`, stripped; Rejected("not_json" | "schema" | "too_short" |
    "too_long") otherwise. Extra keys in the reply are ignored."""
    obj = extract_json_object(text)
    fields = {}
    for name in REPLY_FIELDS[template.kind]:
        value = obj.get(name)
        if not isinstance(value, str) or not value.strip():
            raise Rejected("schema", f"field {name!r} must be a non-empty string, got {value!r:.80}")
        value = " ".join(value.split())
        if len(value) < template.min_chars:
            raise Rejected("too_short", f"{name}: {len(value)} < {template.min_chars} characters")
        if len(value) > template.max_chars:
            raise Rejected("too_long", f"{name}: {len(value)} > {template.max_chars} characters")
        fields[name] = value
    if template.kind == "sts":
        score = obj.get("score")
        if isinstance(score, str):  # "4.5" is a common slip that loses nothing
            try:
                score = float(score)
            except ValueError:
                pass
        if isinstance(score, bool) or not isinstance(score, (int, float)) or not math.isfinite(score):
            raise Rejected("schema", f"field 'score' must be a number, got {score!r:.80}")
        low, high = STS_SCORE_RANGE
        if not low <= score <= high:
            raise Rejected("schema", f"field 'score' {score} is outside [{low}, {high}]")
        fields["score"] = float(score)
    return fields

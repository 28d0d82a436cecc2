"""Report-style prompt text, built column-wise with pyarrow compute (no per-row Python).

"PA chest radiograph of a 67-year-old woman. Moderate left pleural effusion."
"""

from __future__ import annotations

import re

import pyarrow as pa
import pyarrow.compute as pc

from ..contracts.jobs import laterality_column, severity_column
from ..contracts.vocabulary import FINDINGS, NO_FINDING

_FIELD = re.compile(r"\{([^{}]*)\}")


def sex_words(sex: pa.Array, age: pa.Array) -> pa.Array:
    adult = pc.greater_equal(age, 18)
    female = pc.equal(sex, "F")
    return pc.if_else(adult, pc.if_else(female, "woman", "man"), pc.if_else(female, "girl", "boy"))


def findings_text(columns: dict[str, pa.Array], n: int) -> pa.Array:
    """One sentence per present finding, in vocabulary order; the No Finding sentence otherwise."""
    sentences = []
    for finding in FINDINGS:
        if finding.name == NO_FINDING or finding.name not in columns:
            continue
        present = pc.equal(columns[finding.name], 1)
        if not pc.any(present).as_py():
            continue
        parts = []
        for chunk in re.split(r"(\{severity\}|\{laterality\})", finding.phrase):
            if chunk == "{severity}":
                parts.append(pc.fill_null(columns[severity_column(finding.name)], ""))
            elif chunk == "{laterality}":
                parts.append(pc.fill_null(columns[laterality_column(finding.name)], ""))
            elif chunk:
                parts.append(pa.scalar(chunk))
        text = pc.binary_join_element_wise(*parts, "") if len(parts) > 1 else pa.repeat(pa.scalar(finding.phrase), n)
        text = pc.utf8_trim_whitespace(squeeze(text))
        text = pc.binary_join_element_wise(pc.utf8_capitalize(text), ".", "")
        sentences.append(pc.if_else(present, text, ""))
    none = next(f for f in FINDINGS if f.name == NO_FINDING).phrase + "."
    if not sentences:
        return pa.repeat(pa.scalar(none), n)
    # Join with blanks and squeeze them (null_handling="skip" misbehaves with a single array).
    joined = pc.binary_join_element_wise(*sentences, "", " ") if len(sentences) == 1 else \
        pc.binary_join_element_wise(*sentences, " ")
    joined = pc.utf8_trim_whitespace(squeeze(joined))
    return pc.if_else(pc.equal(pc.utf8_length(joined), 0), none, joined)


def squeeze(text: pa.Array) -> pa.Array:
    """Collapse the double blanks an empty field leaves (plain substring replace: faster than regex)."""
    while pc.any(pc.match_substring(text, "  ")).as_py():
        text = pc.replace_substring(text, "  ", " ")
    return text


def article(age: pa.Array) -> pa.Array:
    """'an' before ages read with a leading vowel sound (8, 11, 18, 80-89), else 'a'."""
    an = pc.or_(pc.is_in(age, pa.array([8, 11, 18], age.type)),
                pc.and_(pc.greater_equal(age, 80), pc.less(age, 90)))
    return pc.if_else(an, "an", "a")


def render(template: str, fields: dict[str, pa.Array], n: int) -> pa.Array:
    """Fill `{field}` placeholders column-wise and tidy spacing and articles."""
    parts: list[pa.Array | pa.Scalar] = []
    pos = 0
    for m in _FIELD.finditer(template):
        literal = template[pos:m.start()]
        if m.group(1) == "age" and re.search(r"(^|\s)a $", literal):  # "a {age}" → "an 80-year-old"
            literal = literal[:-2]
            parts += [pa.scalar(literal), article(fields["age"]), pa.scalar(" ")]
        elif literal:
            parts.append(pa.scalar(literal))
        parts.append(pc.fill_null(pc.cast(fields[m.group(1)], pa.string()), ""))
        pos = m.end()
    if pos < len(template):
        parts.append(pa.scalar(template[pos:]))
    if not parts:
        return pa.repeat(pa.scalar(""), n)
    if all(isinstance(p, pa.Scalar) for p in parts):
        return pa.repeat(pa.scalar("".join(p.as_py() for p in parts)), n)
    parts.append(pa.scalar(""))  # binary_join_element_wise takes the separator last
    return pc.utf8_trim_whitespace(squeeze(pc.binary_join_element_wise(*parts)))

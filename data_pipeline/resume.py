"""LABOR-LLM resume text, built as segments so that token prefixes line up with entries.

Template ``labor-llm-v1`` (after Athey et al. 2024, section 3), for a worker with all fields::

  <NLSY79 resume>
  The following information is available about the work history of a male black worker residing in the south.
  The worker was born in 1959.
  The worker has the following records of work experience, one entry per line, including year, education level, and the job title:
  1980 (some college): Service workers
  1981 (some college): Sales workers
  <END OF DATA>

Fields a panel lacks are left out of the sentence (no "unknown" placeholders); an entry
without education reads ``1980: Service workers``. The ``codes`` variant writes the
occupation code instead of its title (the paper's ablation).

Segments: the header, then per entry ``"\\n"``, ``"1980 (some college):"`` (the entry
prefix) and ``" Service workers"`` (the title, with its leading space), then ``"\\n"``
and ``"<END OF DATA>"``. A title is always followed by a newline: that newline is the
entry terminator the scorer appends to every candidate.

One renderer: :func:`render_panel` makes every resume (training data and the history a
prediction starts from), and :meth:`Resume.prompt` opens the next entry (``"\\n1982
(some college):"``) in place of the end marker: the text a prediction continues. Its
tokens are exactly the training tokens before that entry's title (tested).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pandas as pd

from data_pipeline.titles import TitleTable

TEMPLATE_VERSION = "labor-llm-v1"
END_OF_DATA = "<END OF DATA>"
NEWLINE = "\n"
VARIANTS = ("titles", "codes")


@dataclasses.dataclass(frozen=True)
class Entry:
  year: int
  prefix: str  # "1980 (some college):"
  title: str  # " Service workers" (leading space included)
  code: str  # occupation code


def entry_prefix(year: int, education=None) -> str:
  """``"1980 (some college):"``, or ``"1980:"`` without an education level."""
  return f"{int(year)} ({education}):" if _present(education) else f"{int(year)}:"


@dataclasses.dataclass(frozen=True)
class Resume:
  dataset: str
  person_id: str
  header: str
  entries: tuple[Entry, ...]
  next_prefix: str | None = None  # a prompt: the opened next entry ("1982 (some college):") ends the text

  def segments(self) -> list[str]:
    segs = [self.header]
    for e in self.entries:
      segs += [NEWLINE, e.prefix, e.title]
    return segs + [NEWLINE, END_OF_DATA if self.next_prefix is None else self.next_prefix]

  def prompt(self, year: int, education=None) -> "Resume":
    """This history followed by the opened entry of ``year`` (the text a prediction continues)."""
    return dataclasses.replace(self, next_prefix=entry_prefix(year, education))

  def history(self, entries: int) -> "Resume":
    """The resume of the first ``entries`` entries."""
    return dataclasses.replace(self, entries=self.entries[:entries], next_prefix=None)

  @property
  def text(self) -> str:
    return "".join(self.segments())


def _article(word: str) -> str:
  return "an" if word[:1].lower() in "aeiou" else "a"


def header(dataset: str, sex=None, race=None, ethnicity=None, region=None, birth_year=None) -> str:
  words = [w for w in (sex, race, ethnicity) if w]
  who = " ".join(words + ["worker"])
  sentence = f"The following information is available about the work history of {_article(who)} {who}"
  if region:
    sentence += f" residing in {region}"
  lines = [f"<{dataset} resume>", sentence + "."]
  if _present(birth_year):
    lines.append(f"The worker was born in {int(birth_year)}.")
  lines.append("The worker has the following records of work experience, one entry per line, "
               "including year, education level, and the job title:")
  return "\n".join(lines)


def _present(v) -> bool:
  return v is not None and v is not pd.NA and not (isinstance(v, float) and np.isnan(v))


def _first(values):
  for v in values:
    if _present(v):
      return v
  return None


def render_panel(panel: pd.DataFrame, titles: TitleTable, variant: str = "titles") -> list[Resume]:
  """All resumes of a validated panel (sorted by dataset, person, year), in panel order.

  Header fields are each person's first non-missing value. No pandas groupby: 100,000
  workers render in seconds.
  """
  if variant not in VARIANTS:
    raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
  n = len(panel)
  cols = {c: (panel[c].to_numpy(dtype=object) if c in panel.columns else np.full(n, None, dtype=object))
          for c in ("dataset", "person_id", "sex", "race", "ethnicity", "region", "birth_year", "education")}
  years = panel["year"].to_numpy()
  codes = panel["occupation"].to_numpy(dtype=object)
  labels = dict(zip(titles.codes, titles.titles)) if variant == "titles" else {c: c for c in titles.codes}
  key = pd.Series(list(zip(cols["dataset"], cols["person_id"])))
  starts = np.flatnonzero(np.r_[True, (key.to_numpy()[1:] != key.to_numpy()[:-1])])
  ends = np.r_[starts[1:], n]
  out, headers = [], {}
  for s, e in zip(starts, ends):
    hk = tuple(_first(cols[c][s:e]) for c in ("sex", "race", "ethnicity", "region", "birth_year"))
    hk = (cols["dataset"][s],) + hk
    head = headers.get(hk)
    if head is None:
      head = headers[hk] = header(*hk)
    entries = tuple(Entry(int(years[i]), entry_prefix(years[i], cols["education"][i]), " " + labels[codes[i]], codes[i])
                    for i in range(s, e))
    out.append(Resume(cols["dataset"][s], str(cols["person_id"][s]), head, entries))
  return out


def render_person(rows: pd.DataFrame, titles: TitleTable, variant: str = "titles") -> Resume:
  """The resume of one person's rows (a validated panel holding one person)."""
  out = render_panel(rows, titles, variant)
  if len(out) != 1:
    raise ValueError(f"render_person needs the rows of one person, got {len(out)}")
  return out[0]


def candidate_texts(titles: TitleTable, variant: str = "titles") -> list[str]:
  """The title segments the scorer compares, in table order (leading space included)."""
  return [" " + (t if variant == "titles" else c) for c, t in zip(titles.codes, titles.titles)]

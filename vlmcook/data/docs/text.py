"""Text for synthetic pages: a small built-in English corpus, or paragraphs from a user's text file.

Notable:
- The built-in corpus is a few dozen plain encyclopedic sentences written for this project, enough for tests and
  demos; real training data should pass `--text FILE` (UTF-8, paragraphs separated by blank lines), whose
  paragraphs are then what the model learns to restore from context.
- Every draw takes an explicit `random.Random`; nothing here keeps state.
- Characters are restricted to what the fonts render and tesseract reads (ASCII letters, digits, punctuation).
"""

from __future__ import annotations

import random
import re
from dataclasses import dataclass
from pathlib import Path

_BUILTIN = """
The river rises in the northern hills and flows south for about four hundred kilometres before it reaches the sea.
Early settlers built their villages on the higher ground, where the spring floods could not reach them.
The city grew quickly after the railway arrived, and its population doubled within twenty years.
Most of the old market buildings were replaced by offices during the second half of the century.
Wheat and barley remain the main crops, although vineyards have spread along the southern slopes.
The climate is mild, with wet winters and long dry summers that favour olive trees.
A stone bridge with seven arches still carries the main road across the valley.
The library holds more than two million books, maps and manuscripts, many of them donated by local families.
Its reading room was designed to use daylight from a large glass roof.
The committee published its final report in March, after three years of hearings and field visits.
The report recommends better public transport, more housing near the centre and protection for the wetlands.
Engineers measured the flow of the river every hour and stored the readings in a central archive.
The data show that the average flow has fallen by almost a fifth since the dam was completed.
Researchers compared the results with records kept by the harbour office since the early years of the port.
The experiment was repeated five times, and each run produced a similar curve.
A small change in temperature caused a large change in the rate of the reaction.
The authors suggest that the effect is caused by impurities in the surface of the metal.
Further tests are needed before the method can be used in industry.
The museum is open every day except Monday, and entry is free on the first Sunday of each month.
Visitors can follow a marked path through the gardens to the old observatory on the hill.
The observatory was built to track the movement of comets and to keep accurate time for the harbour.
Its telescope is still used by students and amateur astronomers on clear evenings.
The company was founded by two brothers who repaired clocks and sewing machines.
Within a decade it was making bicycles, and later it produced small engines for farm machinery.
Sales grew steadily until the factory was damaged by a fire and had to close for a year.
The new plant uses less energy and recycles most of the water needed for cooling.
Children in the region start school at the age of six and study two foreign languages.
Teachers use local history and geography to connect lessons with the world outside the classroom.
The island has no airport, so most visitors arrive by ferry from the mainland.
Fishing and tourism provide most of the jobs, and many young people move away to study.
The festival takes place at the end of summer and lasts for nine days.
Musicians, dancers and cooks from neighbouring towns take part in the parade through the old streets.
The forest covers almost half of the park and is home to deer, foxes and more than a hundred kinds of birds.
Rangers close some trails in spring so that the animals can raise their young without disturbance.
The treaty set the border along the ridge of the mountains and gave both countries access to the lake.
Trade between the two regions increased after a new road was opened through the pass.
The hospital added a research centre that studies diseases of the heart and lungs.
Patients from across the country come for treatment, and the waiting lists have grown every year.
The council plans to plant ten thousand trees along the streets and in the parks of the city.
Each neighbourhood will choose the species that suit its soil and the space available.
"""

_HEADINGS = ("Introduction", "Background", "Methods", "Results", "Discussion", "Summary", "History", "Geography",
             "Economy", "Climate", "Population", "Transport", "Education", "Culture", "Data and Methods",
             "Related Work", "Conclusions", "Overview", "Key Findings", "Recommendations", "Appendix")
_STOP = {"a", "an", "the", "of", "at", "for", "and", "to", "in", "on", "by", "with", "from", "its", "their", "that",
         "is", "was", "are", "were", "has", "have", "had", "or", "but", "as", "into", "than", "so", "more", "most"}
_TABLE_WORDS = ("North", "South", "East", "West", "Central", "Total", "Average", "Region", "Year", "Sales", "Costs",
                "Income", "Share", "Growth", "Stock", "Price", "Volume", "Rate", "Score", "Count", "Level", "Site")


def _clean(text: str) -> str:
    text = text.replace("\u2019", "'").replace("\u201c", '"').replace("\u201d", '"').replace("\u2014", "-")
    text = re.sub(r"[^\x20-\x7e]", " ", text)
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class TextSource:
    """Sentences to draw paragraphs, list items and captions from."""
    sentences: tuple[str, ...]
    paragraphs: tuple[str, ...] = ()  # whole paragraphs from a user's file, used verbatim when present

    @classmethod
    def builtin(cls) -> "TextSource":
        return cls(tuple(s.strip() for s in _BUILTIN.strip().splitlines() if s.strip()))

    @classmethod
    def from_file(cls, path: str | Path) -> "TextSource":
        raw = Path(path).read_text(encoding="utf-8", errors="replace")
        paras = tuple(p for p in (_clean(b) for b in re.split(r"\n\s*\n", raw)) if len(p) >= 20)
        sents = tuple(s for p in paras for s in re.split(r"(?<=[.!?])\s+", p) if len(s) >= 10)
        if not sents:
            raise ValueError(f"{path}: no usable text (need paragraphs of >= 20 printable characters)")
        return cls(sents, paras)

    def paragraph(self, rng: random.Random, min_words: int = 25, max_words: int = 80) -> str:
        if self.paragraphs and rng.random() < 0.7:
            words = rng.choice(self.paragraphs).split()
            return " ".join(words[:rng.randint(min_words, max_words)])
        start = rng.randrange(len(self.sentences))  # consecutive sentences read like a paragraph
        out, i = [], start
        while sum(len(s.split()) for s in out) < rng.randint(min_words, max_words):
            out.append(self.sentences[i % len(self.sentences)])
            i += 1
        return " ".join(out)

    def sentence(self, rng: random.Random, max_words: int = 14) -> str:
        """A sentence cut to `max_words`, never ending on a function word ("... the")."""
        words = rng.choice(self.sentences).split()[:max_words]
        while len(words) > 2 and words[-1].lower().strip(",;:") in _STOP:
            words.pop()
        return " ".join(words).rstrip(",;:")

    def heading(self, rng: random.Random) -> str:
        return rng.choice(_HEADINGS)

    def title(self, rng: random.Random) -> str:
        words = [w.strip(".,;") for w in self.sentence(rng, 8).split()]
        return " ".join(w.capitalize() if len(w) > 3 else w for w in words)

    def table(self, rng: random.Random, rows: int, cols: int) -> list[list[str]]:
        head = ["Item"] + rng.sample(_TABLE_WORDS, cols - 1)
        body = []
        for r in range(rows - 1):
            label = rng.choice(_TABLE_WORDS) + f" {r + 1}"
            body.append([label] + [_number(rng) for _ in range(cols - 1)])
        return [head] + body


def _number(rng: random.Random) -> str:
    style = rng.randrange(4)
    if style == 0:
        return str(rng.randint(1, 9999))
    if style == 1:
        return f"{rng.uniform(0, 100):.1f}"
    if style == 2:
        return f"{rng.uniform(0, 100):.0f}%"
    return str(rng.randint(1950, 2025))

"""Open-ended VQA in the VLMEvalKit TSV layout: ANLS (DocVQA, InfoVQA) and VQA accuracy (TextVQA).

ANLS (Biten et al. 2019, as the RRC / ST-VQA evaluation script and VLMEvalKit compute it): answers and prediction
are stripped, lower-cased and whitespace-collapsed; NL = Levenshtein / max(len) (0 when both are empty); the row
scores 1 - min NL over its reference answers, or 0 when that is below 0.5. At NL exactly 0.5 the script keeps 0.5
(the paper's formula, "NL < tau", would give 0): we follow the script that produced the published numbers.
The RL verifier `vlmcook.rl.rewards.anls` calls this one.
VQA accuracy (the VQA v2 evaluation script, as VLMEvalKit applies it to TextVQA): both sides normalised (below);
with the ten human answers, the score is the mean over the ten leave-one-out subsets of min(#matches / 3, 1),
i.e. 0.3 / 0.6 / 0.9 / 1 for 1 / 2 / 3 / 4+ matching humans. VLMEvalKit normalises every answer; the VQA v2
script only when the humans disagree - identical on TextVQA, whose answers come normalised.
Normalisation: newlines/tabs -> spaces, strip; punctuation `;/[]"{}()=+\\_-><@`,?!` removed when it touches a space
(or when the text holds a digit,digit comma) else replaced by a space; a period not followed by a digit removed (at
most 32 of them: the script passes re.UNICODE where `count` goes); lower case; number words zero..ten -> digits
("none" -> "0"); articles a/an/the dropped; the script's contraction table.
"""

from __future__ import annotations

import re
from vlmcook.eval.metrics import edit_distance
from vlmcook.eval.tasks.common import VQA_HINT, Item, TsvTask, answer_list, group_means

ANLS_THRESHOLD = 0.5
_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_DIGIT_COMMA = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # sic: "(?!<=" is a lookahead, so only "not before a digit" acts
_NUMBERS = {"none": "0", "zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
            "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
_ARTICLES = {"a", "an", "the"}
# The VQA script's contraction targets. A target with one apostrophe is reached from itself without it; one with
# several from each spelling missing exactly one of them ("couldnt've", "couldn'tve" -> "couldn't've").
_CONTRACTED = (
    "ain't aren't can't could've couldn't didn't doesn't don't hadn't hasn't haven't he'd he's how'd how'll how's "
    "isn't it'd it'll ma'am mightn't might've mustn't must've needn't not've o'clock oughtn't shan't should've "
    "shouldn't somebody'll somebody's someone'd someone'll someone's something'd something'll that's there'd "
    "there're there's they'd they'll they're they've 'twas wasn't we've weren't what'll what're what's what've "
    "when's where'd where's where've who'd who'll who's who've why'll why're why's won't would've wouldn't y'all "
    "you'd you'll you're you've couldn't've hadn't've he'd've it'd've mightn't've she'd've shouldn't've "
    "somebody'd've someone'd've something'd've there'd've they'd've we'd've who'd've wouldn't've you'd've "
    "y'all'll y'all'd've 'ow's'at").split()


def _contractions() -> dict[str, str]:
    table = {}
    for target in _CONTRACTED:
        cuts = [i for i, ch in enumerate(target) if ch == "'"]
        for i in cuts if len(cuts) > 1 else cuts[:1]:
            table[target[:i] + target[i + 1:]] = target
    table["somebody'd"] = "somebodyd"  # sic: the script's table maps this one backwards
    return table  # (its keys "Id've", "Im", "Ive", ... never match lower-cased text and are left out)


CONTRACTIONS = _contractions()


def normalize_vqa(text: str) -> str:
    text = text.replace("\n", " ").replace("\t", " ").strip()
    out = text
    for p in _PUNCT:
        if p + " " in text or " " + p in text or _DIGIT_COMMA.search(text):
            out = out.replace(p, "")
        else:
            out = out.replace(p, " ")
    out = _PERIOD.sub("", out, count=32)
    words = [_NUMBERS.get(w, w) for w in out.lower().split()]
    return " ".join(CONTRACTIONS.get(w, w) for w in words if w not in _ARTICLES)


def vqa_accuracy(prediction: str, answers: list[str]) -> float:
    """Mean over leave-one-out subsets of min(#matching other answers / 3, 1)."""
    gts = [normalize_vqa(str(a)) for a in answers]
    pred = normalize_vqa(prediction)
    accs = [min(1.0, sum(g == pred for j, g in enumerate(gts) if j != i) / 3) for i in range(len(gts))]
    return sum(accs) / len(accs) if accs else 0.0


def anls(prediction: str, answers: list[str], threshold: float = ANLS_THRESHOLD) -> float:
    pred = " ".join(prediction.strip().lower().split())
    nls = []
    for a in answers:
        gt = " ".join(str(a).strip().lower().split())
        length = max(len(gt), len(pred))
        nls.append(edit_distance(gt, pred) / length if length else 0.0)
    score = 1.0 - min(nls) if nls else 0.0
    return 0.0 if score < threshold else score


class VqaTask(TsvTask):
    """name: docvqa / infovqa (ANLS) or textvqa (VQA accuracy); overall and per split, else per category."""

    max_new_tokens = 64
    group_keys = ("split", "category")

    def __init__(self, name: str):
        self.name = name
        self.fn = vqa_accuracy if name == "textvqa" else anls
        self.metric = "VQA accuracy (%)" if name == "textvqa" else "ANLS (%)"

    def check(self, it: Item) -> None:
        it.meta.update({"answers": answer_list(it.row), **{k: it.row[k] for k in self.group_keys if it.row.get(k)}})

    def messages(self, item: Item) -> list[dict]:
        return [{"role": "user", "content": [VQA_HINT, *self.images(item), item.row["question"]]}]

    def score(self, item: Item, answer: str) -> dict:
        return {"extracted": answer, "score": self.fn(answer, item.meta["answers"])}

    def aggregate(self, records: list[dict]) -> dict:
        return {"metric": self.metric, **group_means(records, self.group_keys)}

"""Benchmark metrics as pure functions, by the official definitions (../shared/reference/METRICS.md).

nanovl follows the official rule everywhere. Where VLMEvalKit or lmms-eval score differently:
- ANLS (DocVQA, InfoVQA): both harnesses divide by the raw (not normalised) lengths, so trailing
  whitespace raises the score ("abd\n" vs "abc": 0.75, officially 0.667), and score NL = 0.5 as 0.5
  (officially 0).
- ChartQA: VLMEvalKit strips the prediction, lmms-eval does not ("inspired " fails there); nanovl
  strips, as the answer's meaning does not change. Both harnesses (and nanovl) compare a gold of 0 as
  a string, count years as numbers and do not strip punctuation ("Yes." != "Yes").
- TextVQA (VQA accuracy): lmms-eval uses the EvalAI / MMF processor (as nanovl), whose period rule
  strips "25." to "25"; VLMEvalKit keeps a period after a digit and scores it 0.
- OCRBench v1: lmms-eval strips the prediction and, since 2026-07, folds full-width ASCII to ASCII;
  the official script and VLMEvalKit do neither, nor does nanovl. lmms-eval's aggregator also keeps a
  module-level counter (scores double when run twice in one process).
- AI2D: no official extractor. VLMEvalKit takes a lone capital letter among the last four words, then
  "answer is X", then option text (else wrong, or an LLM judge); lmms-eval takes a leading "X." and
  otherwise compares the raw response to the letter. nanovl's `choice_letter` accepts all the plain
  styles of both and never guesses.
- MMMU: lmms-eval's parser looks for "X " (trailing space only, so "MRI " yields "I"), draws unseeded
  random letters, and at 75571cfe scores every open question 0; VLMEvalKit turns open questions into a
  fake two-option MCQ. nanovl runs the official parsers, seeded with 42, on the full candidate list.
- Video-MME: lmms-eval ranks candidate letters by position patterns; the official extractor (nanovl's)
  takes the first A-D character after dropping answer prefixes.
"""

from __future__ import annotations

import random
import re

from rapidfuzz.distance import Levenshtein

# --- ANLS (DocVQA, InfoVQA) ------------------------------------------------------------------------


def _anls_norm(s: str) -> str:
    return " ".join(s.strip().lower().split())


def anls(prediction: str, golds: list[str], tau: float = 0.5) -> float:
    """Official ANLS of one question: max over gold answers of 1 - NL when NL < tau, else 0, where
    NL = Levenshtein(a, b) / max(len(a), len(b)) on strings stripped, lowercased and with whitespace
    runs collapsed."""
    p = _anls_norm(prediction)
    best = 0.0
    for gold in golds:
        g = _anls_norm(gold)
        longest = max(len(g), len(p))
        nl = Levenshtein.distance(g, p) / longest if longest else 0.0
        best = max(best, 1.0 - nl if nl < tau else 0.0)
    return best


# --- ChartQA relaxed accuracy ---------------------------------------------------------------------


def _to_float(s: str) -> float | None:
    s = s.strip()
    try:
        return float(s[:-1]) / 100 if s.endswith("%") else float(s)
    except ValueError:
        return None


def relaxed_accuracy(prediction: str, gold: str, tolerance: float = 0.05) -> bool:
    """ChartQA: numbers within 5% of a non-zero gold (a trailing % divides by 100, on both sides);
    everything else (text, a gold of 0, "1,000") by case-insensitive exact match of the stripped
    strings. Years are numbers: 2008 passes for 2010 (as in pix2struct and both harnesses)."""
    p, g = _to_float(prediction), _to_float(gold)
    if p is not None and g:
        return abs(p - g) / abs(g) <= tolerance
    return prediction.strip().lower() == gold.strip().lower()


# --- OCRBench v1 -----------------------------------------------------------------------------------

OCRBENCH_CATEGORIES = {
    "Regular Text Recognition": 50,
    "Irregular Text Recognition": 50,
    "Artistic Text Recognition": 50,
    "Handwriting Recognition": 50,
    "Digit String Recognition": 50,
    "Non-Semantic Text Recognition": 50,
    "Scene Text-centric VQA": 200,
    "Doc-oriented VQA": 200,
    "Key Information Extraction": 200,
    "Handwritten Mathematical Expression Recognition": 100,
}


def ocrbench_hit(prediction: str, golds: str | list[str], dataset_name: str = "") -> bool:
    """One OCRBench v1 point: a gold answer is a substring of the prediction. HME100k keeps case and
    deletes every space (after turning newlines into spaces); every other item lowercases, strips and
    turns newlines into spaces. No length check: verbose answers that contain the gold count."""
    golds = [golds] if isinstance(golds, str) else golds
    if dataset_name == "HME100k":
        norm = lambda s: s.strip().replace("\n", " ").replace(" ", "")  # noqa: E731
    else:
        norm = lambda s: s.lower().strip().replace("\n", " ")  # noqa: E731
    p = norm(prediction)
    return any(norm(str(g)) in p for g in golds)


def ocrbench_score(hits_by_category: dict[str, int]) -> dict:
    """Final Score = hits out of 1000; per category too; `norm` = Final / 10 as model cards quote it."""
    final = sum(hits_by_category.values())
    return {"final": final, "norm": final / 10, "categories": dict(hits_by_category)}


# --- multiple choice --------------------------------------------------------------------------------

_VIDEOMME_PREFIXES = (
    "The best answer is",
    "The correct answer is",
    "The answer is",
    "The answer",
    "The best option is",
    "The correct option is",
    "Best answer:",
    "Best option:",
    "Answer:",
    "Option:",
)


def videomme_choice(response: str) -> str:
    """The official Video-MME extractor: strip, drop an answer prefix, give up ("") on more than ten
    words without a letter A-D, else the first A-D character anywhere."""
    s = response.strip()
    for prefix in _VIDEOMME_PREFIXES:
        s = s.replace(prefix, "")
    if len(s.split()) > 10 and not re.search("[ABCD]", s):
        return ""
    m = re.search("[ABCD]", s)
    return m.group(0) if m else ""


def mmmu_choice(response: str, options: dict[str, str], seed: int = 42) -> str:
    """The official MMMU multiple-choice parser: "(X)" candidates, then " X " candidates, then (for
    responses over five words) option texts; the last candidate wins; none: a random option, drawn
    from a generator seeded with 42 as the official eval_utils does at import."""
    for ch in ",.!?;:'":
        response = response.strip(ch)
    response = " " + response + " "
    letters = list(options)
    candidates = [x for x in letters if f"({x})" in response]
    by_text = False
    if not candidates:
        candidates = [x for x in letters if f" {x} " in response]
    if not candidates and len(response.split()) > 5:
        candidates = [x for x, text in options.items() if text.lower() in response.lower()]
        by_text = bool(candidates)
    if not candidates:
        return random.Random(seed).choice(letters)
    if len(candidates) == 1:
        return candidates[0]
    # several: the one that occurs last
    if by_text:
        positions = {x: response.lower().rfind(options[x].lower()) for x in candidates}
    else:
        positions = {x: max(response.rfind(f"({x})"), response.rfind(f" {x} ")) for x in candidates}
    return max(candidates, key=lambda x: positions[x])


def choice_letter(response: str, options: dict[str, str]) -> str | None:
    """nanovl's extractor for AI2D-style questions (no official one exists). In order:
    1. a leading letter: "B", "(B)", "B.", "B)", "B:" (any case), the rest ignored;
    2. "answer is B" / "answer: B" / "option B" anywhere (the last such phrase);
    3. exactly one option letter standing alone as a word (capital);
    4. exactly one option's text contained in a response at most twice the options' total length.
    None when nothing (or more than one thing) matches: scored wrong, never guessed."""
    letters = "".join(options)
    s = response.strip()
    m = re.match(rf"^\(?([{letters}{letters.lower()}])(?:[\).:\s]|$)", s)
    if m:
        return m.group(1).upper()
    found = re.findall(rf"(?:answer(?: is)?|option)\s*[:\-]?\s*\(?([{letters}])\b", s, flags=re.IGNORECASE)
    if found:
        return found[-1].upper()
    words = set(re.sub(r"[.()\[\],:;!*#{}]", " ", s).split())
    alone = [x for x in options if x in words]
    if len(alone) == 1:
        return alone[0]
    if len(s) <= 2 * sum(len(t) for t in options.values()):
        texts = [x for x, t in options.items() if t and t.lower() in s.lower()]
        if len(texts) == 1:
            return texts[0]
    return None


# --- MMMU open answers -----------------------------------------------------------------------------

_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?")
_KEYS = ("could be ", "so ", "is ", "thus ", "therefore ", "final ", "answer ", "result ")


def _normalise_open(value):
    if isinstance(value, str):
        try:
            return round(float(value.replace(",", "")), 2)
        except ValueError:
            s = value.strip().lower()
            return f" {s} " if len(s) == 1 else s
    return round(float(value), 2)


def mmmu_open_candidates(response: str) -> list:
    """The official open-answer parser: per sentence, the text after the last key phrase ("=" too in
    the last sentence); every number in it (comma-grouped and scientific forms); strings lowercased,
    numbers as floats rounded to 2 decimals, one-character strings padded with spaces."""
    sentences = [s for s in re.split(r"\.\s(?=[A-Z])|\n", response.strip()) if s.strip()]
    tails = []
    for i, sentence in enumerate(sentences):
        keys = _KEYS + (("=",) if i == len(sentences) - 1 else ())
        best = None
        for key in keys:
            pos = sentence.lower().rfind(key)
            if pos >= 0 and (best is None or pos > best[0]):
                best = (pos, sentence[pos + len(key) :].strip())
        if best and best[1] and best[1] not in (":", ",", ".", "!", "?", ";", "'"):
            tails.append(best[1])
    if not tails:
        tails = [response]
    candidates = list(tails)
    for t in tails:
        candidates += _NUMBER.findall(t)
    return [_normalise_open(c) for c in dict.fromkeys(candidates)]


def mmmu_open_correct(response: str, golds: str | list[str]) -> bool:
    """Correct if a numeric candidate equals a numeric gold, or a gold string is inside a string
    candidate (the full candidate list: lmms-eval at 75571cfe kept only the first and scored 0)."""
    golds = [golds] if isinstance(golds, str) else golds
    candidates = mmmu_open_candidates(response)
    for gold in map(_normalise_open, golds):
        for c in candidates:
            if isinstance(gold, float) and isinstance(c, float) and gold == c:
                return True
            if isinstance(gold, str) and isinstance(c, str) and gold in c:
                return True
    return False


# --- VQA accuracy (TextVQA), with the EvalAI / MMF answer processing --------------------------------

_PUNCT = [";", "/", "[", "]", '"', "{", "}", "(", ")", "=", "+", "\\", "_", "-", ">", "<", "@", "`", ",", "?", "!"]
_COMMA_IN_NUMBER = re.compile(r"(\d)(,)(\d)")
_PERIOD = re.compile(r"(?!<=\d)(\.)(?!\d)")  # MMF's pattern as written: any period not before a digit
_NUMBERS = {w: str(i) for i, w in enumerate("zero one two three four five six seven eight nine ten".split())}
_NUMBERS["none"] = "0"
_ARTICLES = {"a", "an", "the"}
# Common English contractions; each spelling with some or all apostrophes dropped maps back to it.
_CONTRACTED = """ain't aren't can't could've couldn't couldn't've didn't doesn't don't hadn't hadn't've hasn't
haven't he'd he'd've he's how'd how'll how's i'd i'd've i'm i've isn't it'd it'd've it'll let's ma'am mightn't
mightn't've might've mustn't must've needn't not've o'clock oughtn't shan't she'd she'd've she's should've
shouldn't shouldn't've somebody'd somebody'd've somebody'll somebody's someone'd someone'd've someone'll
someone's something'd something'd've something'll that's there'd there'd've there're there's they'd they'd've
they'll they're they've wasn't we'd we'd've we'll we're we've weren't what'll what're what's what've when's
where'd where's where've who'd who'd've who'll who's who've why'll why're why's won't would've wouldn't
wouldn't've y'all y'all'll y'all'd've you'd you'd've you'll you're you've""".split()


def _contraction_table() -> dict[str, str]:
    table = {}
    for word in _CONTRACTED:
        cuts = [i for i, ch in enumerate(word) if ch == "'"]
        for mask in range(1, 2 ** len(cuts)):  # drop every non-empty subset of the apostrophes
            drop = {cuts[j] for j in range(len(cuts)) if mask >> j & 1}
            table["".join(ch for i, ch in enumerate(word) if i not in drop)] = word
    return table


_CONTRACTIONS = _contraction_table()


def vqa_normalise(answer: str) -> str:
    """EvalAI / MMF answer processing (TextVQA): lowercase; drop "," and "?"; split "'s"; newlines
    and tabs to spaces; punctuation deleted where it touches a space or the text has a digit,digit
    comma, else replaced by a space; periods not before a digit removed; number words to digits;
    articles dropped; contractions restored. (VLMEvalKit keeps a period after a digit: "25." stays.)"""
    s = answer.lower().replace(",", "").replace("?", "").replace("'s", " 's")
    s = s.replace("\n", " ").replace("\t", " ").strip()
    for p in _PUNCT:
        if (p + " " in s or " " + p in s) or _COMMA_IN_NUMBER.search(s) is not None:
            s = s.replace(p, "")
        else:
            s = s.replace(p, " ")
    s = _PERIOD.sub("", s)
    words = []
    for w in s.split():
        w = _NUMBERS.get(w, w)
        if w not in _ARTICLES:
            words.append(_CONTRACTIONS.get(w, w))
    return " ".join(words)


def vqa_accuracy(prediction: str, golds: list[str]) -> float:
    """The VQA metric over 10 annotators: for each gold answer left out, min(1, matches among the other
    nine / 3); the mean of the ten. Prediction and golds are processed alike (EvalAI / MMF)."""
    p = vqa_normalise(prediction)
    g = [vqa_normalise(a) for a in golds]
    scores = [min(1.0, sum(x == p for j, x in enumerate(g) if j != i) / 3) for i in range(len(g))]
    return sum(scores) / len(scores) if scores else 0.0


def cer(prediction: str, gold: str) -> float:
    """Character error rate: Levenshtein edits to turn the prediction into the gold, over the gold's
    length (can exceed 1 for long wrong outputs; callers cap it where they average)."""
    return Levenshtein.distance(prediction.strip(), gold.strip()) / max(1, len(gold.strip()))


def _plain(s: str) -> str:
    return " ".join(s.strip().rstrip(".").casefold().split())


def exact_answer(prediction: str, gold: str) -> bool:
    """Exact match after case/space folding and a trailing period; numbers also match by value when
    the gold carries no unit or currency (so "1,204" = "1204" = "1204.0")."""
    if _plain(prediction) == _plain(gold):
        return True
    g, p = _to_float(gold.replace(",", "")), _to_float(prediction.replace(",", ""))
    bare = re.fullmatch(r"-?[\d,]+(\.\d+)?", gold.strip()) is not None
    return bare and g is not None and p is not None and abs(g - p) < 1e-9

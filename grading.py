"""The one grader of a boxed final answer: evaluate.py, analysis.py and the toy use these functions.

    1. Extract   the last complete \\boxed{...} (nested braces balanced; also \\fbox{...} and MATH's
                 `\\boxed 5`). Text before a `</think>` is a draft and is not graded. No box: wrong.
    2. Verify    math-verify parses answer and gold (each wrapped in \\boxed{}) to SymPy and
                 compares them (\\frac12 = 0.5 = 1/2, \\dfrac, `5\\text{ cm}` = 5), not our code.

Trap handled here: math-verify times out with signal.alarm, which only works in the main thread,
so elsewhere (a background thread) grading runs without a timeout instead of crashing.
"""
import re
import threading


BOX = re.compile(r"\\(?:boxed|fbox)\b")


def _box_content(text, i):
    """The argument of the box command that ends at index i, or None if it is not complete."""
    j = i + len(text[i:]) - len(text[i:].lstrip())
    if text[j:j + 1] != "{":
        # `\boxed 5` (MATH solutions use it): one token, up to a space or `$`; a sentence's
        # full stop is not part of the answer (math-verify reads "5." as a string).
        bare = re.match(r"[ \t]+([^\s$]+)", text[i:])
        return bare.group(1).rstrip(".,;") if bare else None
    depth, k = 0, j
    while k < len(text):
        if text[k] == "\\":
            k += 2  # \{ \} \\ are escaped characters, not grouping: `\left\{ x \right.` is fine
            continue
        depth += {"{": 1, "}": -1}.get(text[k], 0)
        if depth == 0:
            return text[j + 1:k].strip()
        k += 1
    return None  # never closed: a completion cut off inside its answer


def extract_boxed(text):
    """The content of the last complete, non-empty \\boxed{}, \\fbox{} or `\\boxed x`, else None.

    An unclosed box (truncated output) and an empty one (the instruction's `\\boxed{}` echoed back)
    are skipped, so an earlier real answer still counts.
    """
    for match in reversed(list(BOX.finditer(text))):
        content = _box_content(text, match.end())
        if content:
            return content
    return None


def _timeout():
    # signal.alarm, math-verify's timeout, raises outside the main thread; None turns it off there.
    return 5 if threading.current_thread() is threading.main_thread() else None


def parse_answer(answer):
    """An answer string -> math-verify's parsed form (a list of SymPy objects and/or the string).
    Wrapping in \\boxed{} tells its LaTeX extractor that the whole string is the answer."""
    from math_verify import parse
    return parse(f"\\boxed{{{answer}}}", parsing_timeout=_timeout())


def grade(completion, parsed_gold):
    """(extracted answer or None, verdict) for one completion against a parse_answer()'d gold."""
    from math_verify import verify
    answer = extract_boxed(completion.rsplit("</think>", 1)[-1])  # boxes while thinking are drafts
    if answer is None:
        return None, False
    # verify is not symmetric: the gold goes first (it decides e.g. how `x = 3` vs `3` is read).
    return answer, verify(parsed_gold, parse_answer(answer), timeout_seconds=_timeout())


def is_correct(completion, gold):
    """Whether the last boxed answer of `completion` is equivalent to the gold answer string."""
    return grade(completion, parse_answer(gold))[1]

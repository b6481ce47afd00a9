"""explain/grounding.py on constructed cases: a quote present in the context, absent from it,
among the model's next-token predictions, and the edges of what counts as a quote."""

from __future__ import annotations

import pytest

from nla_serve.explain.grounding import ground, normalize, quotes_in

CONTEXT = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\nThe capital of France is"


def test_a_quote_in_the_context_is_found():
    g = ground('The last words read: "capital of France is". The user asked a geography question.', CONTEXT)
    assert g.quotes == 1 and g.found == ("capital of France is",) and g.unfound == () and g.score == 1.0


def test_an_invented_quote_is_unfound_and_named():
    g = ground('the user asked: "What does this Bible verse mean: And the…"; the last words read "France is"',
               CONTEXT)
    assert g.quotes == 2 and g.found == ("France is",)
    assert g.unfound == ("What does this Bible verse mean: And the…",) and g.score == 0.5


def test_a_quote_among_the_next_token_predictions_is_predicted_not_found():
    text = 'The final token is "is". Next, the model expects "Paris", or perhaps "Lyon" or "a city".'
    g = ground(text, CONTEXT, predictions=[" Paris", " Lyon", " the"])
    assert g.found == ("is",) and g.predicted == ("Paris", "Lyon") and g.unfound == ("a city",)
    assert g.score == pytest.approx(3 / 4) and g.checked_predictions
    # the continuation across the boundary counts too: the context followed by a predicted token
    g = ground('the model is about to write "France is Paris"', CONTEXT, predictions=[" Paris"])
    assert g.predicted == ("France is Paris",)
    # without predictions the same quote is unfound, and the result says predictions were not checked
    g = ground('Next, the model expects "Paris".', CONTEXT)
    assert g.unfound == ("Paris",) and not g.checked_predictions


def test_no_quotes_means_no_score():
    g = ground("An assistant's reply in a chat about geography.", CONTEXT, predictions=[" Paris"])
    assert g.quotes == 0 and g.score is None and g.as_dict()["score"] is None
    assert ground(None, CONTEXT).quotes == 0


def test_matching_ignores_case_spacing_quote_marks_and_edge_punctuation():
    assert ground('“THE   CAPITAL of france”', CONTEXT).score == 1.0
    assert ground("it reads ‘capital of France is.’", CONTEXT).score == 1.0
    assert ground('the words "What is the capital…"', CONTEXT).score == 1.0
    # an ellipsis inside a quote: each part must occur, in order
    assert ground('"What is … France?"', CONTEXT).score == 1.0
    assert ground('"France … What is"', CONTEXT).score == 0.0
    assert normalize("  Don’t  STOP. ") == "don't stop"


def test_what_counts_as_a_quote():
    assert quotes_in("don't and it's are not quotes, but 'this one' is") == ["this one"]
    assert quotes_in('a `code span`, a "double", a “curly” and ‘single’') == ["code span", "double", "curly",
                                                                              "single"]
    assert quotes_in('empty "" or only punctuation "..." are not quotes') == []
    assert quotes_in('"' + "x" * 1000 + '"') == []  # an unbalanced mark, not a quote
    # a single-quoted span inside a double-quoted one is part of it, not a second quote
    assert quotes_in('"the \'inner\' one"') == ["the 'inner' one"]


def test_chinese_quotes_are_checked_like_any_other():
    ctx = "用户问：今天天气怎么样？"
    assert ground("用户问的是“今天天气”", ctx).score == 1.0
    assert ground("用户问的是“明天下雨”", ctx).unfound == ("明天下雨",)


def test_quotes_match_whole_words_but_the_current_token_may_be_part_of_one():
    ctx = "What is the capital of France? The answer is in NameError"
    assert ground('the model expects "It"', ctx).unfound == ("It",)  # not inside "capital"
    assert ground('"capital of France"', ctx).score == 1.0
    # the text so far may end mid-word: a quote ending there is still found
    assert ground('the last words read "is in NameErr"', "The answer is in NameErr").score == 1.0
    # the final token is often a piece of a word; it is found as the token, not as a word
    assert ground('The final token is "Error".', ctx).unfound == ("Error",)
    assert ground('The final token is "Error".', ctx, tokens=["Name", "Error"]).found == ("Error",)
    # and so is the token before it, but no earlier one: "Name" only as the token at p-1
    before = 'The final token is "Error". The token before it is "Name".'
    assert ground(before, ctx, tokens=["Name", "Error"]).score == 1.0
    assert ground(before, ctx, tokens=["Error"]).unfound == ("Name",)
    with pytest.raises(TypeError):
        ground(before, ctx, tokens="Error")  # a string would match its letters

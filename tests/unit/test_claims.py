"""explain/claims.py: an explanation as claims, and the explanation without each one."""

from __future__ import annotations

from nla_serve.explain.claims import MAX_CLAIMS, split_claims, without

PARAGRAPH = ('The final token is ".". The model expects "Paris" next! It reads a user\'s question about '
             'France?\nA line of its own\n\n  and a last one.')


def test_sentences_and_lines_are_claims_and_quotes_never_split():
    assert [c.text for c in split_claims(PARAGRAPH)] == [
        'The final token is ".".', 'The model expects "Paris" next!', "It reads a user's question about France?",
        "A line of its own", "and a last one."]
    for c in split_claims(PARAGRAPH):
        assert PARAGRAPH[c.start:c.end] == c.text


def test_without_closes_up_the_text():
    first, second, *_ = split_claims(PARAGRAPH)
    assert without(PARAGRAPH, second).startswith('The final token is ".". It reads')
    assert without(PARAGRAPH, first).startswith('The model expects "Paris" next!')
    line = split_claims(PARAGRAPH)[3]
    assert without(PARAGRAPH, line).endswith("France?\nand a last one.")
    only = split_claims("One claim only")
    assert len(only) == 1 and without("One claim only", only[0]) == ""


def test_no_words_no_claims_and_a_cap_on_how_many():
    assert split_claims("...  \n !") == []
    many = " ".join(f"Claim {i}." for i in range(30))
    claims = split_claims(many)
    assert len(claims) == MAX_CLAIMS and claims[-1].text.startswith(f"Claim {MAX_CLAIMS - 1}.")
    assert claims[-1].text.endswith("Claim 29.")

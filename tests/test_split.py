"""Long-text splitting (engine/split.py): boundaries a reader would choose, limits held, nothing lost."""
import re

import pytest

from chatterbox_accel.engine.split import FIRST_CHARS, MAX_CHARS, sentences, split_text


def words(text):
    return re.findall(r"[\w'’]+", text)


def test_sentences_respect_abbreviations_numbers_and_lines():
    text = ("Dr. Smith paid $3.50 at 5 p.m. on Jan. 5 with J. Doe. He said: \"Hello!\" Then left... Really? Yes.\n"
            "- a bullet point\n# A heading\n1) numbered item")
    assert sentences(text) == ["Dr. Smith paid $3.50 at 5 p.m. on Jan. 5 with J. Doe.", 'He said: "Hello!"',
                               "Then left...", "Really?", "Yes.", "a bullet point", "A heading", "numbered item"]


def test_cjk_sentences_split_without_spaces():
    assert sentences("你好。今天天气很好！你呢？") == ["你好。", "今天天气很好！", "你呢？"]


def test_pieces_hold_the_limits_and_keep_every_word_in_order():
    text = " ".join(f"Sentence {i} says something, then adds a clause; and one more: done." for i in range(40))
    text += " " + "word " * 300  # one very long sentence without punctuation
    pieces = split_text(text)
    assert len(pieces[0]) <= FIRST_CHARS and all(len(p) <= MAX_CHARS for p in pieces)
    assert words(" ".join(pieces)) == words(text)


def test_short_lines_join_with_a_period_and_tags_stay_whole():
    pieces = split_text("# Title\nA first line [laugh] that is fine.\n" + "More text here. " * 30)
    assert pieces[0].startswith("Title. A first line [laugh] that is fine.")
    assert all(p.count("[") == p.count("]") for p in pieces)


def test_limits_are_validated():
    with pytest.raises(ValueError, match="max_chars"):
        split_text("Hello.", max_chars=5)


def test_complete_prefix_of_text_still_being_written():
    """What a streamed text (Wyoming) may submit now: complete sentences only, wherever the
    raw spacing differs from the sentences' (a double space after "Dr." once raised there)."""
    from chatterbox_accel.engine.split import complete_prefix

    for text, done in [("Dr.  Smith is here. And so", "Dr.  Smith is here. "), ("Hello there. This is ", "Hello there. "),
                       ("Hello there. ", "Hello there. "), ("Hello", ""), ("Line one\nLine", "Line one\n"),
                       ("你好。世界", "你好。"), ('He said "Hi." Then', 'He said "Hi." '), ("J. Smith came", "")]:
        assert text[:complete_prefix(text)] == done, text
    assert sentences("Dr.  Smith is here. ") == ["Dr. Smith is here."]

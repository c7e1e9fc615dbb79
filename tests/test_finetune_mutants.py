"""finetune's label masking, packing and padding on the tiny model's real tokenizer: the expected ids
are built here from the tokenizer itself (prompt and response tokenized apart, as documented), the
packing and padding by hand (what `make mutants` scores as `finetune_masking`)."""

from __future__ import annotations

import pytest
import torch

from domino_ray.finetune import SFTExample, collate, collate_arrays, format_example, pack_examples
from domino_ray.schema import IGNORE_INDEX

DRAFT = "Write a function that adds two numbers.  \n"
RESPONSE = "def add(a, b):\n    return a + b"


@pytest.fixture
def tok(tiny_model_dir):
    from domino_ray.backbone import load_tokenizer

    return load_tokenizer(str(tiny_model_dir))


def _ids(tok, text):
    return tok(text, add_special_tokens=False)["input_ids"]


# ------------------------------------------------------------------------------------- plain format
def test_plain_prompt_is_the_stripped_draft_and_a_blank_line_then_response_and_eos(tok):
    prompt = _ids(tok, "Write a function that adds two numbers.\n\n")
    response = _ids(tok, RESPONSE) + [tok.eos_token_id]
    ex = format_example(tok, DRAFT, RESPONSE, max_length=512, chat=False)
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response


def test_the_response_tail_is_cut_and_the_prompt_kept_whole(tok):
    prompt = _ids(tok, "Write a function that adds two numbers.\n\n")
    response = _ids(tok, RESPONSE)
    one = format_example(tok, DRAFT, RESPONSE, max_length=len(prompt) + 1, chat=False)
    assert one.input_ids == prompt + response[:1] and one.labels == [IGNORE_INDEX] * len(prompt) + response[:1]
    assert format_example(tok, DRAFT, RESPONSE, max_length=len(prompt), chat=False) is None
    assert format_example(tok, DRAFT, RESPONSE, max_length=len(prompt) - 1, chat=False) is None
    full = len(response) + 1  # + EOS
    exact = format_example(tok, DRAFT, RESPONSE, max_length=len(prompt) + full, chat=False)
    assert exact.input_ids[-1] == tok.eos_token_id and len(exact.input_ids) == len(prompt) + full


def test_an_empty_plain_response_still_teaches_eos(tok):
    ex = format_example(tok, "d", "", max_length=64, chat=False)
    assert ex.labels[-1] == tok.eos_token_id and [t for t in ex.labels if t != IGNORE_INDEX] == [tok.eos_token_id]


# -------------------------------------------------------------------------------------- chat format
def test_chat_prompt_and_response_come_from_the_template_without_an_extra_eos(tok):
    user = [{"role": "user", "content": DRAFT}]
    prompt_text = tok.apply_chat_template(user, tokenize=False, add_generation_prompt=True)
    full_text = tok.apply_chat_template(user + [{"role": "assistant", "content": RESPONSE}], tokenize=False)
    prompt, response = _ids(tok, prompt_text), _ids(tok, full_text[len(prompt_text):])
    ex = format_example(tok, DRAFT, RESPONSE, max_length=512, chat=True)
    assert ex.input_ids == prompt + response
    assert ex.labels == [IGNORE_INDEX] * len(prompt) + response
    assert DRAFT in tok.decode(prompt)  # the draft is kept as written in chat mode (no strip)


def test_chat_without_a_template_says_which_setting_to_change(tok, monkeypatch):
    monkeypatch.setattr(tok, "chat_template", None)
    with pytest.raises(ValueError) as err:
        format_example(tok, DRAFT, RESPONSE, max_length=512, chat=True)
    assert str(err.value) == ("finetune.chat_template is true but the tokenizer has no chat template; set "
                              "finetune.chat_template: false (plain 'draft\\n\\nresponse' format) or use an instruct model")
    assert format_example(tok, DRAFT, RESPONSE, max_length=512, chat=False) is not None  # plain needs none


def test_a_template_whose_prompt_is_not_a_prefix_is_refused(tok, monkeypatch):
    # marks the last message: the user turn renders differently once an assistant turn follows it
    template = ("{% for m in messages %}{{ m.role }}: {{ m.content }}{% if loop.last %} <last>{% endif %}\n"
                "{% endfor %}{% if add_generation_prompt %}assistant: {% endif %}")
    monkeypatch.setattr(tok, "chat_template", template)
    with pytest.raises(ValueError) as err:
        format_example(tok, DRAFT, RESPONSE, max_length=512, chat=True)
    assert str(err.value) == ("the tokenizer's chat template renders the user turn differently with and without the "
                              "assistant turn, so prompt tokens cannot be masked; set finetune.chat_template: false")


# ------------------------------------------------------------------------------------------ packing
def _ex(n_prompt: int, n_response: int, tag: int) -> SFTExample:
    return SFTExample([tag] * (n_prompt + n_response), [IGNORE_INDEX] * n_prompt + [tag] * n_response)


def test_packing_by_hand():
    a, b, c, d = _ex(2, 2, 1), _ex(1, 3, 2), _ex(3, 3, 3), _ex(5, 6, 4)
    packed = pack_examples([a, b, c, d], max_length=8)
    # a + b fill exactly 8 (not over), c starts a new one, d (11 > 8) stands alone, never cut
    assert [p.input_ids for p in packed] == [[1] * 4 + [2] * 4, [3] * 6, [4] * 11]
    assert packed[0].labels == [IGNORE_INDEX] * 2 + [1] * 2 + [IGNORE_INDEX] + [2] * 3
    assert packed[2].labels == d.labels
    assert pack_examples([], 8) == []
    assert [len(p.input_ids) for p in pack_examples([d, a], 8)] == [11, 4]  # an oversize first one is closed
    assert a.input_ids == [1] * 4 and a.labels == [IGNORE_INDEX] * 2 + [1] * 2  # the inputs are not modified


# ------------------------------------------------------------------------------------------ padding
def test_collate_pads_right_with_the_pad_id_ignored_labels_and_a_mask():
    batch = collate([SFTExample([5, 6, 7], [IGNORE_INDEX, 6, 7]), SFTExample([8], [8])], pad_id=9)
    assert batch["input_ids"].tolist() == [[5, 6, 7], [8, 9, 9]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 6, 7], [8, IGNORE_INDEX, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1, 1], [1, 0, 0]]
    assert all(batch[k].dtype == torch.long for k in ("input_ids", "labels", "attention_mask"))
    arrays = collate_arrays([[1], [2, 3]], [[1], [IGNORE_INDEX, 3]], pad_id=0)
    assert arrays["input_ids"].tolist() == [[1, 0], [2, 3]] and arrays["labels"].tolist() == [[1, IGNORE_INDEX],
                                                                                              [IGNORE_INDEX, 3]]
    assert set(arrays) == {"input_ids", "labels", "attention_mask"}


def test_collate_arrays_takes_object_arrays_of_ids():
    """A Ray Data batch holds its ragged columns as numpy object arrays; the int64 conversion also takes
    rows whose ids are themselves held as Python objects."""
    import numpy as np

    ids = np.empty(2, dtype=object)
    ids[0], ids[1] = np.array([4, 5], dtype=object), np.array([6], dtype=object)
    labels = np.empty(2, dtype=object)
    labels[0], labels[1] = np.array([IGNORE_INDEX, 5], dtype=object), np.array([6], dtype=object)
    batch = collate_arrays(ids, labels, pad_id=3)
    assert batch["input_ids"].tolist() == [[4, 5], [6, 3]]
    assert batch["labels"].tolist() == [[IGNORE_INDEX, 5], [6, IGNORE_INDEX]]
    assert batch["attention_mask"].tolist() == [[1, 1], [1, 0]]


def test_no_bos_inside_the_sequence_with_a_tokenizer_that_adds_one(tok):
    """With a tokenizer that puts BOS before plain text (as Llama's does), the response part (tokenized
    apart from the prompt) must not get one: it would sit in the middle of the training sequence."""
    from tokenizers.processors import TemplateProcessing

    tok._tokenizer.post_processor = TemplateProcessing(single=f"{tok.bos_token} $A",
                                                       special_tokens=[(tok.bos_token, tok.bos_token_id)])
    assert tok(RESPONSE)["input_ids"][0] == tok.bos_token_id
    for chat in (False, True):
        ex = format_example(tok, DRAFT, RESPONSE, max_length=512, chat=chat)
        targets = [t for t in ex.labels if t != IGNORE_INDEX]
        assert targets == ex.input_ids[len(ex.input_ids) - len(targets):]
        assert tok.bos_token_id not in targets[:-1]  # the tiny BOS is also its EOS: only the plain ending may be it
        body = _ids(tok, RESPONSE)
        assert targets[:len(body)] == body


def test_a_plain_prompt_starts_with_the_bos_the_engines_give_it(tok):
    """With a BOS-adding tokenizer, a plain-format sequence opens with [BOS] + the prompt, as the
    engines encode a plain prompt (Engine.encode_request, add_special_tokens=True), and the BOS is not a
    target; an EOS that a tokenizer appends after a text is not taken into the prompt; the chat format
    keeps what its template renders."""
    from tokenizers.processors import TemplateProcessing

    prompt = DRAFT.rstrip() + "\n\n"
    plain = format_example(tok, DRAFT, RESPONSE, max_length=512, chat=False)
    assert plain.input_ids[:len(_ids(tok, prompt))] == _ids(tok, prompt)  # this tokenizer adds nothing
    bos = tok.bos_token_id
    # copies: a tokenizer's specials are fixed, so format_example may learn them once per tokenizer object
    bos_tok = _with_post_processor(tok, TemplateProcessing(single=f"{tok.bos_token} $A",
                                                           special_tokens=[(tok.bos_token, bos)]))
    ex = format_example(bos_tok, DRAFT, RESPONSE, max_length=512, chat=False)
    assert ex.input_ids[:1 + len(_ids(tok, prompt))] == [bos] + _ids(tok, prompt)
    assert ex.labels[:1 + len(_ids(tok, prompt))] == [IGNORE_INDEX] * (1 + len(_ids(tok, prompt)))
    assert ex.input_ids[1:] == plain.input_ids and ex.labels[1:] == plain.labels  # one token more, in front
    chat = format_example(tok, DRAFT, RESPONSE, max_length=512, chat=True)
    eos_tok = _with_post_processor(tok, TemplateProcessing(single="$A " + tok.eos_token,
                                                           special_tokens=[(tok.eos_token, tok.eos_token_id)]))
    assert format_example(eos_tok, DRAFT, RESPONSE, max_length=512, chat=False) == plain
    assert format_example(eos_tok, DRAFT, RESPONSE, max_length=512, chat=True) == chat


def _with_post_processor(tok, processor):
    """A copy of `tok` whose tokenizer adds the specials of `processor` around a text."""
    import copy

    other = copy.deepcopy(tok)
    other._tokenizer.post_processor = processor
    return other
